//! The real-GPU check kit (`e2e/real-gpu`): reads a live NVIDIA GPU and driver, runs our CLI and
//! guest init next to them, and says which of our assumptions hold. It never changes the GPU's
//! state: no unbind, reset, module load or unload, no persistence-mode change; what it writes is
//! a scratch directory (a private tmpfs in a private mount namespace) and the JSON summary.
//!
//! Every comparison is a function of paths and command outputs, so the tests run it against fake
//! `/sys`, `/proc` and `/dev` trees.
#![deny(missing_docs)]

pub mod checks;
pub mod facts;
pub mod inject;
pub mod probe;

use serde::Serialize;
use std::path::PathBuf;

/// Exit code: every check held.
pub const EXIT_HELD: i32 = 0;
/// Exit code: a check failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: no NVIDIA GPU with a loaded driver here; nothing was checked.
pub const EXIT_NO_GPU: i32 = 3;

/// Where the kit looks.
#[derive(Debug, Clone)]
pub struct Roots {
    /// sysfs (`/sys`).
    pub sysfs: PathBuf,
    /// procfs (`/proc`).
    pub proc: PathBuf,
    /// Device directory (`/dev`).
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sysfs: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// What we assume matched reality.
    Held,
    /// It did not (see `detail`).
    Failed,
}

/// One check's line in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Stable name, e.g. `devices`, `nodes`.
    pub name: String,
    /// Held or failed.
    pub outcome: Outcome,
    /// One sentence per finding; for a failure, what differed.
    pub detail: Vec<String>,
    /// What was measured (free-form JSON for the record).
    pub facts: serde_json::Value,
}

impl CheckResult {
    /// Held when `failures` is empty, else failed with them first in `detail`.
    pub fn from_findings(
        name: &str,
        failures: Vec<String>,
        notes: Vec<String>,
        facts: serde_json::Value,
    ) -> Self {
        let outcome = if failures.is_empty() {
            Outcome::Held
        } else {
            Outcome::Failed
        };
        let mut detail = failures;
        detail.extend(notes);
        CheckResult {
            name: name.into(),
            outcome,
            detail,
            facts,
        }
    }

    /// The line printed for this check.
    pub fn line(&self) -> String {
        let word = match self.outcome {
            Outcome::Held => "HELD  ",
            Outcome::Failed => "FAILED",
        };
        format!("{word} {:<10} {}", self.name, self.detail.join("; "))
    }
}

/// The JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `held`, `failed` or `no_gpu`.
    pub status: String,
    /// The process exit code (0, 1, 3).
    pub exit_code: i32,
    /// Why nothing was checked (`no_gpu`).
    pub reason: Option<String>,
    /// The driver version found.
    pub driver_version: Option<String>,
    /// NVIDIA GPUs found on the driver.
    pub gpus: Vec<String>,
    /// The checks, in order.
    pub checks: Vec<CheckResult>,
    /// Wall time of the run in milliseconds.
    pub elapsed_ms: u64,
}

impl Summary {
    /// The summary of a run that found no GPU.
    pub fn no_gpu(reason: String) -> Self {
        Summary {
            status: "no_gpu".into(),
            exit_code: EXIT_NO_GPU,
            reason: Some(reason),
            driver_version: None,
            gpus: Vec::new(),
            checks: Vec::new(),
            elapsed_ms: 0,
        }
    }

    /// The summary of a run that checked.
    pub fn of(driver_version: String, gpus: Vec<String>, checks: Vec<CheckResult>) -> Self {
        let failed = checks.iter().any(|c| c.outcome == Outcome::Failed);
        Summary {
            status: if failed { "failed" } else { "held" }.into(),
            exit_code: if failed { EXIT_FAILED } else { EXIT_HELD },
            reason: None,
            driver_version: Some(driver_version),
            gpus,
            checks,
            elapsed_ms: 0,
        }
    }
}
