//! Download progress on a terminal: an indicatif bar on stderr implementing the library's
//! [`Progress`] callback. Off the terminal, with `--json` or `-q`, nothing is drawn.

use std::io::IsTerminal;
use std::sync::Mutex;

use gpu_passthrough::Progress;
use indicatif::{ProgressBar, ProgressStyle};

use crate::Global;

/// A progress bar for downloads, or nothing when stderr is not a terminal.
pub struct DownloadBar {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl DownloadBar {
    /// A bar if stderr is a terminal and the user wants human output; else a silent sink.
    pub fn new(global: &Global) -> DownloadBar {
        DownloadBar {
            bar: Mutex::new(None),
            enabled: !global.json && !global.quiet && std::io::stderr().is_terminal(),
        }
    }

    fn with_bar(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        if self.enabled {
            let mut guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard);
        }
    }
}

impl Progress for DownloadBar {
    fn begin(&self, url: &str, total: Option<u64>) {
        self.with_bar(|slot| {
            if let Some(old) = slot.take() {
                old.finish_and_clear();
            }
            let name = url.rsplit('/').next().unwrap_or(url).to_string();
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg:30!} {bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.set_message(name);
            *slot = Some(bar);
        });
    }

    fn advance(&self, bytes: u64) {
        self.with_bar(|slot| {
            if let Some(bar) = slot {
                bar.inc(bytes);
            }
        });
    }

    fn end(&self) {
        self.with_bar(|slot| {
            if let Some(bar) = slot.take() {
                bar.finish_and_clear();
            }
        });
    }
}
