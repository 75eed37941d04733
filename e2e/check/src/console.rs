//! A guest's console log as `e2e/run` records it: each line prefixed by seconds since QEMU
//! started (`12.34 <line>`).

use anyhow::Context;
use std::path::Path;

/// The console lines without their timestamp column.
#[derive(Debug, Clone, Default)]
pub struct Console {
    /// The lines, in order.
    pub lines: Vec<String>,
    /// The text again, lines joined, for the report finder.
    pub text: String,
}

impl Console {
    /// Read a log written by `e2e/run`'s `boot`. Bytes that are not UTF-8 (serial noise) are
    /// replaced, not fatal.
    pub fn read(path: &Path) -> anyhow::Result<Console> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Console::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Parse log text.
    pub fn parse(log: &str) -> Console {
        let lines: Vec<String> = log
            .lines()
            .map(|l| match l.split_once(' ') {
                Some((stamp, rest)) if stamp.parse::<f64>().is_ok() => rest,
                _ => l,
            })
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect();
        let text = lines.join("\n");
        Console { lines, text }
    }

    /// Some line contains `needle`.
    pub fn has(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    /// What follows `marker` on the first line that contains it.
    pub fn after(&self, marker: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.find(marker).map(|at| &l[at + marker.len()..]))
    }

    /// What follows `marker` on every line that contains it.
    pub fn all_after<'a>(&'a self, marker: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.lines
            .iter()
            .filter_map(move |l| l.find(marker).map(|at| &l[at + marker.len()..]))
    }

    /// The last lines, for a failure message.
    pub fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines[from..].join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_carriage_returns_are_dropped() {
        let c = Console::parse("0.51 hello world\r\n1.20 E2E-A which /usr/bin/nvidia-smi\nraw\n");
        assert_eq!(
            c.lines,
            ["hello world", "E2E-A which /usr/bin/nvidia-smi", "raw"]
        );
        assert_eq!(c.after("E2E-A which "), Some("/usr/bin/nvidia-smi"));
        assert!(c.has("world") && !c.has("0.51"));
        assert_eq!(c.all_after("E2E-A ").count(), 1);
        assert_eq!(c.tail(2), "E2E-A which /usr/bin/nvidia-smi | raw");
    }
}
