//! The protocol between a checker and `e2e/run`: one line per assertion on stdout,
//! `PASS <what>` or `FAIL <what>\t<why>`, and `INFO <text>` for context. `e2e/run` counts them.

/// Collects verdicts in order and prints them.
#[derive(Debug, Default)]
pub struct Checks {
    lines: Vec<String>,
}

impl Checks {
    /// Record one assertion; `why` is only evaluated when it failed.
    pub fn check(&mut self, what: impl Into<String>, ok: bool, why: impl FnOnce() -> String) {
        let what = what.into();
        if ok {
            self.lines.push(format!("PASS {what}"));
        } else {
            // One line: the harness reads verdicts line by line.
            let why = why().split_whitespace().collect::<Vec<_>>().join(" ");
            let why: String = why.chars().take(400).collect();
            self.lines.push(format!("FAIL {what}\t{why}"));
        }
    }

    /// A measured figure for the run's summary table, not counted.
    pub fn figure(&mut self, name: impl Into<String>, value: impl std::fmt::Display) {
        self.lines.push(format!("FIGURE {}|{value}", name.into()));
    }

    /// Context for the log, not counted.
    pub fn info(&mut self, text: impl Into<String>) {
        self.lines.push(format!("INFO {}", text.into()));
    }

    /// The verdict lines so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// How many assertions failed.
    #[cfg(test)]
    pub fn failed(&self) -> usize {
        self.lines.iter().filter(|l| l.starts_with("FAIL ")).count()
    }

    /// Print every line.
    pub fn print(&self) {
        for line in self.lines() {
            println!("{line}");
        }
    }
}

/// Compact JSON of a value for a failure message.
pub fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_their_reason_on_one_line() {
        let mut c = Checks::default();
        c.check("a", true, || unreachable!("not evaluated for a pass"));
        c.check("b", false, || "line one\n  line two".into());
        c.info("note");
        assert_eq!(
            c.lines(),
            ["PASS a", "FAIL b\tline one line two", "INFO note"]
        );
        assert_eq!(c.failed(), 1);
    }
}
