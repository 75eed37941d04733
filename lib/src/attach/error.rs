//! What a host operation can fail on, what it left behind, and what each error means.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::outcome::{Classify, Outcome};
use crate::owner::Owner;
use crate::pci::{PciAddress, PciError};
use crate::remedy::Remedy;
use crate::vfio::VfioCheckError;

use super::journal::JournalError;
use super::plan::{Refusal, RefusalReason};
use super::{guard, holders};

/// Errors of host operations.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Reading sysfs failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The journal could not be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The supported-gpus table could not be read.
    #[error(transparent)]
    Ids(#[from] crate::pci::ids::IdsError),
    /// The plan has refusals; nothing was changed.
    #[error("refused, nothing was changed: {}", .0.iter().map(|r| r.message.as_str()).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Refusal>),
    /// The VFIO driver planned for a device cannot be used; nothing was changed.
    #[error(
        "refused, nothing was changed: the VFIO driver `{name}` for {device} cannot be used: {why}; load its module, or ask for another VFIO driver (none named: the kernel's modules.alias chooses, else vfio-pci)"
    )]
    VfioDriver {
        /// The device.
        device: PciAddress,
        /// The driver or module asked for, or the variant modules.alias chose.
        name: String,
        /// Why it cannot be used.
        why: String,
    },
    /// Nothing to attach.
    #[error("nothing to attach: name devices (DDDD:BB:DD.F) or ask for a number of GPUs")]
    NothingRequested,
    /// Not enough free GPUs for `--gpus N`.
    #[error(
        "asked for {wanted} GPUs but only {free} are free and passable; list the devices to see which are"
    )]
    NotEnoughGpus {
        /// How many were asked for.
        wanted: usize,
        /// How many are free.
        free: usize,
    },
    /// A sysfs write failed.
    #[error("writing `{value}` to {path} failed{hint}{aftermath}")]
    Write {
        /// The attribute.
        path: PathBuf,
        /// The value.
        value: String,
        /// The I/O error.
        source: std::io::Error,
        /// A fix, if known.
        hint: String,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// No UUID for a new mdev.
    #[error("cannot read a UUID for the new mdev from {path}; nothing was created")]
    Uuid {
        /// The kernel's UUID source.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// After `drivers_probe` the device is not on its VFIO driver.
    #[error(
        "{device} is on {driver} after drivers_probe, not {wanted}; load the driver (modprobe {wanted}) and retry{aftermath}"
    )]
    NotOnVfio {
        /// The device.
        device: PciAddress,
        /// The VFIO driver it was to go to (`vfio-pci` or a variant).
        wanted: String,
        /// Its driver now (or `no driver`).
        driver: String,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// `/dev/vfio/<group>` did not appear in time.
    #[error(
        "{node} did not appear within {waited:?} after binding group {group} to vfio-pci; check dmesg{aftermath}"
    )]
    NoVfioNode {
        /// The node path.
        node: PathBuf,
        /// The group.
        group: u32,
        /// How long we waited.
        waited: Duration,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// The VFIO check failed.
    #[error("the VFIO check failed{aftermath}")]
    Vfio {
        /// Why.
        source: VfioCheckError,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// Rolling back failed too: the journal keeps the transaction for `reconcile`.
    #[error(
        "the attach failed and rolling it back failed too ({}); the journal keeps the transaction: fix the cause and reconcile",
        crate::error_chain(.rollback.as_ref())
    )]
    RollbackFailed {
        /// The original failure.
        #[source]
        cause: Box<AttachError>,
        /// The rollback failure.
        rollback: Box<AttachError>,
    },
    /// Restoring a device's driver failed.
    #[error(
        "{device} did not return to {wanted}: it is on {actual}; check dmesg, then rerun the command (it is safe to repeat)"
    )]
    Restore {
        /// The device.
        device: PciAddress,
        /// The driver it should be on.
        wanted: String,
        /// The driver it is on.
        actual: String,
    },
    /// The owner holds nothing.
    #[error(
        "owner {0} has no attached devices; see the attachments in the state dir's journal.json"
    )]
    NotAttached(Owner),
    /// A process holds the device open (a running VM's VMM, a CUDA program): nothing was
    /// taken from it.
    #[error("{device} is in use: {}; {fix}", guard::describe(holders))]
    DeviceHeld {
        /// The device.
        device: PciAddress,
        /// Who holds it.
        holders: Vec<holders::Holder>,
        /// What to do.
        fix: &'static str,
    },
    /// The proc tree cannot be scanned, so whether a device is in use cannot be told.
    #[error(
        "cannot list the processes in {path}, so cannot tell whether a VM or program holds the device; nothing was changed: run as root with the host's proc filesystem"
    )]
    ProcUnreadable {
        /// The proc root.
        path: PathBuf,
    },
    /// This process does not see the host's processes (a container without `hostPID`):
    /// nothing is moved or released.
    #[error(transparent)]
    Blind(#[from] crate::pidns::Blind),
    /// The health record could not be read or written: nothing is handed out (fail closed).
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    /// A reset that must not be done.
    #[error("not resetting {device}: {reason}")]
    ResetRefused {
        /// The device.
        device: PciAddress,
        /// Why.
        reason: String,
    },
    /// A host check that must not be done now.
    #[error("not checking {device}: {reason}")]
    CheckRefused {
        /// The device.
        device: PciAddress,
        /// Why.
        reason: String,
    },
    /// A program the library runs for a device (`nvidia-smi`) did not finish in time: it was
    /// killed. A GPU that wedges its driver (Xid 79, fallen off the bus) hangs such programs.
    #[error(
        "{device}: `{command}` did not finish within {after:?} and was killed; the GPU may be wedged (check dmesg for Xid 79 or `fallen off the bus`){aftermath}"
    )]
    CommandTimeout {
        /// The device it ran for.
        device: PciAddress,
        /// The command line.
        command: String,
        /// The limit.
        after: Duration,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// The fabric manager did not list, activate or deactivate a partition.
    #[error("fabric partition {partition}: the fabric manager failed{aftermath}")]
    Fabric {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: crate::fabric::FabricError,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// The journal holds an active fabric partition and this host has no fabric manager to
    /// deactivate it with.
    #[error(
        "fabric partition {partition} was activated for this owner, and this host has no fabric manager configured to deactivate it: configure the one that activated it (fmpm), then rerun"
    )]
    NoFabricManager {
        /// The partition.
        partition: u32,
    },
    /// No such vGPU profile, or not enough room for it.
    #[error(transparent)]
    Vgpu(#[from] crate::vgpu::VgpuError),
    /// A vGPU write did not take: the read-back differs.
    #[error(
        "wrote `{wrote}` to {path} but read back `{read}`; the vGPU manager did not take it (check dmesg){aftermath}"
    )]
    VgpuMismatch {
        /// The attribute.
        path: PathBuf,
        /// What was written.
        wrote: String,
        /// What was read back.
        read: String,
        /// What the failure left behind.
        aftermath: Aftermath,
    },
    /// A process holds one of the owner's vGPUs open: nothing was released.
    #[error("not releasing the vGPUs of owner {owner}: {}; stop that VM first (SIGTERM, then wait), then retry", .holders.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    VgpuHeld {
        /// The owner.
        owner: Owner,
        /// Who holds them.
        holders: Vec<holders::Holder>,
    },
    /// The proc filesystem cannot be read, so nobody can tell who holds a vGPU.
    #[error("cannot read {proc_root} to see who holds the vGPUs; nothing was released")]
    HoldersUnknown {
        /// The proc root.
        proc_root: PathBuf,
    },
    /// An mdev type name that the device does not offer.
    #[error("{device} offers no mdev type `{mdev_type}`; list the device's mdev types")]
    NoSuchMdevType {
        /// The device.
        device: PciAddress,
        /// The type.
        mdev_type: String,
    },
}

/// What a failure on the way left behind, said at the end of its message: an attach that was
/// rolled back, or a change the journal keeps (a detach or reconcile to rerun, a rollback that
/// failed too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aftermath {
    /// An attach was rolled back: the host is as it was.
    RolledBack,
    /// The journal keeps the transaction or attachment: rerun the command, or reconcile, once
    /// the cause is fixed.
    KeptInJournal,
}

impl fmt::Display for Aftermath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Aftermath::RolledBack => "; the transaction was rolled back",
            Aftermath::KeptInJournal => {
                "; the journal keeps it: fix the cause, then rerun the command or reconcile"
            }
        })
    }
}

impl AttachError {
    /// The same error, once its attach was rolled back.
    pub(super) fn rolled_back(mut self) -> AttachError {
        match &mut self {
            AttachError::Write { aftermath, .. }
            | AttachError::NotOnVfio { aftermath, .. }
            | AttachError::NoVfioNode { aftermath, .. }
            | AttachError::Vfio { aftermath, .. }
            | AttachError::VgpuMismatch { aftermath, .. }
            | AttachError::CommandTimeout { aftermath, .. }
            | AttachError::Fabric { aftermath, .. } => *aftermath = Aftermath::RolledBack,
            _ => {}
        }
        self
    }

    /// A failed VFIO check, before anything was rolled back.
    pub(crate) fn vfio(source: VfioCheckError) -> AttachError {
        AttachError::Vfio {
            source,
            aftermath: Aftermath::KeptInJournal,
        }
    }
}

impl Classify for AttachError {
    fn outcome(&self) -> Outcome {
        match self {
            AttachError::Pci(e) => e.outcome(),
            AttachError::Journal(e) => e.outcome(),
            AttachError::Ids(e) => e.outcome(),
            AttachError::Vfio { source, .. } => source.outcome(),
            AttachError::Health(e) => e.outcome(),
            AttachError::Vgpu(e) => e.outcome(),
            AttachError::Blind(e) => e.outcome(),
            // A safety rule or the request itself said no: nothing was changed.
            AttachError::Refused(_)
            | AttachError::NotEnoughGpus { .. }
            | AttachError::NoSuchMdevType { .. }
            | AttachError::NothingRequested
            | AttachError::VfioDriver { .. }
            | AttachError::DeviceHeld { .. }
            | AttachError::ProcUnreadable { .. }
            | AttachError::ResetRefused { .. }
            | AttachError::CheckRefused { .. }
            | AttachError::VgpuHeld { .. }
            | AttachError::HoldersUnknown { .. } => Outcome::Refused,
            AttachError::Write { .. }
            | AttachError::CommandTimeout { .. }
            | AttachError::NotOnVfio { .. }
            | AttachError::NoVfioNode { .. }
            | AttachError::RollbackFailed { .. }
            | AttachError::Restore { .. }
            | AttachError::NotAttached(_)
            | AttachError::Uuid { .. }
            | AttachError::NoFabricManager { .. }
            | AttachError::VgpuMismatch { .. } => Outcome::Failed,
            AttachError::Fabric { source, .. } => source.outcome(),
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            AttachError::Pci(e) => e.remedy(),
            AttachError::Journal(e) => e.remedy(),
            AttachError::Ids(e) => e.remedy(),
            AttachError::Vfio { source, .. } => source.remedy(),
            AttachError::Health(e) => e.remedy(),
            AttachError::Vgpu(e) => e.remedy(),
            AttachError::Blind(e) => e.remedy(),
            AttachError::NothingRequested => Some(Remedy::NameDevices),
            AttachError::RollbackFailed { .. } => Some(Remedy::Reconcile),
            AttachError::Refused(refusals) => refusals
                .iter()
                .any(|r| r.reason == RefusalReason::BootVga)
                .then_some(Remedy::AllowBootVga),
            AttachError::NotEnoughGpus { .. }
            | AttachError::VfioDriver { .. }
            | AttachError::NoSuchMdevType { .. }
            | AttachError::DeviceHeld { .. }
            | AttachError::ProcUnreadable { .. }
            | AttachError::ResetRefused { .. }
            | AttachError::CheckRefused { .. }
            | AttachError::VgpuHeld { .. }
            | AttachError::HoldersUnknown { .. }
            | AttachError::Write { .. }
            | AttachError::CommandTimeout { .. }
            | AttachError::NotOnVfio { .. }
            | AttachError::NoVfioNode { .. }
            | AttachError::Restore { .. }
            | AttachError::NotAttached(_)
            | AttachError::Uuid { .. }
            | AttachError::Fabric { .. }
            | AttachError::NoFabricManager { .. }
            | AttachError::VgpuMismatch { .. } => None,
        }
    }
}
