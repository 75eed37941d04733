//! `failpoint`: named points where a crash test can abort the process, as a power cut or an OOM
//! kill would, to prove that the journal and the layer cache recover.
//!
//! Setting `GPU_PASSTHROUGH_FAILPOINT=<name>` makes the process abort when it reaches that
//! point. Every failpoint is listed in [`Failpoint::ALL`], so a crash test can run each one and
//! fail when a new one is added without a test.

/// The environment variable naming the failpoint to abort at.
pub const FAILPOINT_ENV: &str = "GPU_PASSTHROUGH_FAILPOINT";

/// Which workflow a failpoint interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The attach, rollback and detach transaction of the bind journal.
    Attach,
    /// An initrd layer build.
    Initrd,
    /// The create and release of vGPUs (`attach --vgpu`, detach, reconcile).
    Vgpu,
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
}

impl Failpoint {
    /// Every failpoint.
    pub const ALL: [Failpoint; 16] = [
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
    ];

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
        }
    }

    /// The workflow it interrupts.
    pub fn stage(self) -> Stage {
        match self {
            Failpoint::InitrdMidway => Stage::Initrd,
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

    /// Abort the process if [`FAILPOINT_ENV`] names this failpoint.
    pub fn hit(self) {
        if std::env::var_os(FAILPOINT_ENV).is_some_and(|v| v == self.name()) {
            tracing::error!("failpoint {}: aborting", self.name());
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_failpoint_is_listed() {
        let mut names: Vec<&str> = Failpoint::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Failpoint::ALL.len());
        assert_eq!(
            Failpoint::of(Stage::Attach).count()
                + Failpoint::of(Stage::Initrd).count()
                + Failpoint::of(Stage::Vgpu).count(),
            Failpoint::ALL.len()
        );
    }
}
