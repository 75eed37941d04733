//! `failpoint`: named points where a crash test can abort the process, as a power cut or an OOM
//! kill would, to prove that the journal and the layer cache recover.
//!
//! A binary opts in with [`arm_from_env`] (the CLI's `main` does; so does a crash test's child
//! process): then `GPU_PASSTHROUGH_FAILPOINT=<name>` makes it abort when it reaches that point.
//! A control plane embedding the library never calls it, so the variable in its environment
//! changes nothing. Every failpoint is listed in [`Failpoint::ALL`], so a crash test can run each
//! one and fail when a new one is added without a test.

use std::sync::OnceLock;

use crate::outcome::{Classify, Outcome};

/// The environment variable naming the failpoint to abort at (read by [`arm_from_env`] only).
pub const FAILPOINT_ENV: &str = "GPU_PASSTHROUGH_FAILPOINT";

/// The failpoint this process aborts at, once a binary armed one.
static ARMED: OnceLock<Failpoint> = OnceLock::new();

/// Why [`arm_from_env`] refused the variable.
#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    /// The variable names no failpoint (a typo would otherwise make a crash test pass unhit).
    #[error(
        "{FAILPOINT_ENV}={name} names no failpoint; unset it, or use one of: {}",
        Failpoint::ALL.map(Failpoint::name).join(", ")
    )]
    Unknown {
        /// The value found.
        name: String,
    },
}

/// A bad variable is the request refused before anything ran.
impl Classify for FailpointError {
    fn outcome(&self) -> Outcome {
        match self {
            FailpointError::Unknown { .. } => Outcome::Refused,
        }
    }
}

/// Arm the failpoint [`FAILPOINT_ENV`] names, if it is set: from then on this process aborts
/// when it reaches that point. Only a binary that wants to be crash-tested calls this; the
/// library never reads the variable itself. Returns the armed failpoint.
pub fn arm_from_env() -> Result<Option<Failpoint>, FailpointError> {
    let Some(value) = std::env::var_os(FAILPOINT_ENV) else {
        return Ok(None);
    };
    let name = value.to_string_lossy();
    let failpoint =
        Failpoint::from_name(&name).ok_or_else(|| FailpointError::Unknown { name: name.into() })?;
    Ok(Some(*ARMED.get_or_init(|| failpoint)))
}

/// Which workflow a failpoint interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The attach, rollback and detach transaction of the bind journal.
    Attach,
    /// An initrd layer build.
    Initrd,
    /// The create and release of vGPUs (`attach --vgpu`, detach, reconcile).
    Vgpu,
    /// A kernel reset (detach, `reset`).
    Reset,
    /// The activation of a fabric partition (shared-NVSwitch mode) before the first bind.
    Fabric,
}

/// Every failpoint, in the order its workflow reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The attach transaction is journaled; nothing written to sysfs yet.
    AfterJournal,
    /// `driver_override` of a device is set.
    AfterOverride,
    /// The device is unbound from its driver.
    AfterUnbind,
    /// `drivers_probe` bound it to vfio-pci.
    AfterProbe,
    /// Its group's VFIO node appeared.
    AfterNode,
    /// The VFIO check passed.
    AfterVerify,
    /// The attachment is committed to the journal.
    AfterCommit,
    /// An mdev was created.
    AfterMdevCreate,
    /// Half-way through a rollback.
    MidRollback,
    /// Half-way through a detach.
    MidDetach,
    /// Half-way through writing an initrd layer.
    InitrdMidway,
    /// The vGPU transaction is journaled; nothing written yet.
    VgpuAfterJournal,
    /// A vGPU's type (or mdev UUID) is written, not yet read back.
    VgpuAfterCreate,
    /// Every vGPU of the transaction is verified, not yet committed.
    VgpuAfterVerify,
    /// The vGPUs are committed to the journal.
    VgpuAfterCommit,
    /// One vGPU of a detach is released, the others not yet.
    VgpuMidRelease,
    /// A device's `reset_method` is narrowed for a reset, not yet put back.
    ResetRestricted,
    /// A fabric partition is activated for an attach; no device is bound yet.
    AfterPartitionActivate,
}

impl Failpoint {
    /// Every failpoint.
    pub const ALL: [Failpoint; 18] = [
        Failpoint::AfterJournal,
        Failpoint::AfterOverride,
        Failpoint::AfterUnbind,
        Failpoint::AfterProbe,
        Failpoint::AfterNode,
        Failpoint::AfterVerify,
        Failpoint::AfterCommit,
        Failpoint::AfterMdevCreate,
        Failpoint::MidRollback,
        Failpoint::MidDetach,
        Failpoint::InitrdMidway,
        Failpoint::VgpuAfterJournal,
        Failpoint::VgpuAfterCreate,
        Failpoint::VgpuAfterVerify,
        Failpoint::VgpuAfterCommit,
        Failpoint::VgpuMidRelease,
        Failpoint::ResetRestricted,
        Failpoint::AfterPartitionActivate,
    ];

    /// The failpoint of this [`Failpoint::name`].
    pub fn from_name(name: &str) -> Option<Failpoint> {
        Failpoint::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The name `GPU_PASSTHROUGH_FAILPOINT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Failpoint::AfterJournal => "after-journal",
            Failpoint::AfterOverride => "after-override",
            Failpoint::AfterUnbind => "after-unbind",
            Failpoint::AfterProbe => "after-probe",
            Failpoint::AfterNode => "after-node",
            Failpoint::AfterVerify => "after-verify",
            Failpoint::AfterCommit => "after-commit",
            Failpoint::AfterMdevCreate => "after-mdev-create",
            Failpoint::MidRollback => "mid-rollback",
            Failpoint::MidDetach => "mid-detach",
            Failpoint::InitrdMidway => "initrd-midway",
            Failpoint::VgpuAfterJournal => "vgpu-after-journal",
            Failpoint::VgpuAfterCreate => "vgpu-after-create",
            Failpoint::VgpuAfterVerify => "vgpu-after-verify",
            Failpoint::VgpuAfterCommit => "vgpu-after-commit",
            Failpoint::VgpuMidRelease => "vgpu-mid-release",
            Failpoint::ResetRestricted => "reset-restricted",
            Failpoint::AfterPartitionActivate => "after-partition-activate",
        }
    }

    /// The workflow it interrupts.
    pub fn stage(self) -> Stage {
        match self {
            Failpoint::InitrdMidway => Stage::Initrd,
            Failpoint::ResetRestricted => Stage::Reset,
            Failpoint::AfterPartitionActivate => Stage::Fabric,
            Failpoint::VgpuAfterJournal
            | Failpoint::VgpuAfterCreate
            | Failpoint::VgpuAfterVerify
            | Failpoint::VgpuAfterCommit
            | Failpoint::VgpuMidRelease => Stage::Vgpu,
            _ => Stage::Attach,
        }
    }

    /// The failpoints of one workflow.
    pub fn of(stage: Stage) -> impl Iterator<Item = Failpoint> {
        Failpoint::ALL
            .into_iter()
            .filter(move |f| f.stage() == stage)
    }

    /// Abort the process if this failpoint is armed ([`arm_from_env`]).
    pub fn hit(self) {
        if ARMED.get() == Some(&self) {
            tracing::error!("failpoint {}: aborting", self.name());
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn names_are_unique_and_each_names_its_failpoint() {
        let mut names: Vec<&str> = Failpoint::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Failpoint::ALL.len());
        for f in Failpoint::ALL {
            assert_eq!(Failpoint::from_name(f.name()), Some(f), "{f:?}");
        }
        assert_eq!(Failpoint::from_name("after-unbinds"), None);
    }

    /// Child half of the tests below: reach every failpoint, after arming when `ARM_CHILD` is
    /// set. Ignored in normal runs; the parents run it with `--ignored`.
    #[test]
    #[ignore = "child process of the failpoint tests"]
    fn child_reaches_every_failpoint() {
        if std::env::var_os("ARM_CHILD").is_some() {
            arm_from_env().expect("a known failpoint");
        }
        for f in Failpoint::ALL {
            f.hit();
        }
    }

    fn run_child(failpoint: &str, arm: bool) -> std::process::ExitStatus {
        let mut child = Command::new(std::env::current_exe().unwrap());
        child
            .args(["--exact", "failpoint::tests::child_reaches_every_failpoint"])
            .args(["--ignored", "--test-threads=1"])
            .env(FAILPOINT_ENV, failpoint)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if arm {
            child.env("ARM_CHILD", "1");
        } else {
            child.env_remove("ARM_CHILD");
        }
        child.status().unwrap()
    }

    /// A control plane with the variable in its environment is never aborted by the library:
    /// only a binary that arms the failpoint is.
    #[test]
    fn the_variable_aborts_only_a_process_that_armed_it() {
        let unarmed = run_child("after-journal", false);
        assert!(unarmed.success(), "not armed, yet: {unarmed:?}");
        let armed = run_child("after-journal", true);
        assert_eq!(armed.signal(), Some(libc::SIGABRT), "armed: {armed:?}");
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_known_ones() {
        let err = FailpointError::Unknown {
            name: "after-unbinds".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains("after-unbinds") && text.contains("after-unbind,"),
            "{text}"
        );
    }
}
