//! `attach`: plan, bind to vfio-pci as a journaled transaction, verify, detach, reconcile.
//!
//! A control plane builds one [`Host`] from a sysfs root, a state dir and its own
//! [`OwnerLiveness`], then calls [`Host::plan`], [`Host::attach`] (which returns the VM's
//! [`BootSpec`](crate::vmm::BootSpec)), [`Host::detach`] and [`Host::reconcile`].
//! See [`journal`] for the on-disk format, [`kernel`] for the sysfs writer, [`crate::vfio`] for
//! the VFIO verification and [`crate::failpoint`] for the crash failpoints.
//!
//! # What attach changes on the host, in order
//! Under the journal lock, after recording the transaction: for each device that must move
//! (the requested ones, the other functions of their slots, and every non-bridge member of their
//! IOMMU groups), an NVIDIA GPU on the `nvidia` driver first gets persistence mode turned off for
//! that GPU only (`nvidia-smi -i ADDR -pm 0`, when nvidia-smi exists; nvidia-persistenced itself
//! is never stopped, and persistence is turned back on at detach); `d3cold_allowed` is set to 0
//! (restored at detach: waking from D3cold is a known cause of `RmInitAdapter failed`); then
//! `driver_override` is set
//! to `vfio-pci`, the device is unbound from its driver and `drivers_probe` binds it to
//! vfio-pci. Then each group's `/dev/vfio/N` is awaited (bounded) and each device handed to the
//! VM is checked through VFIO. A device already on vfio-pci that nobody owns is adopted without
//! writes and recorded as having no other driver. Detach and rollback undo this from the
//! device's actual state: unbind from whatever it is on, restore `driver_override`, probe (or
//! bind) the original driver. Detach also resets each device handed to the VM and verifies it
//! once it is back with the host (see `reset.rs`; failures become [`crate::health`] events), and
//! placement refuses devices that [`crate::health::is_quarantined`] names.
//!
//! vGPUs ([`Host::attach_vgpu`], `vgpu.rs`) are created in the same journal without moving any
//! device: a type ID written to a vendor-VFIO VF, or an mdev created from a UUID; detach and
//! reconcile release them only when no process holds them open.

mod doctor;
pub mod driver_fit;
mod guard;
pub mod holders;
pub mod journal;
pub mod kernel;
mod liveness;
mod plan;
mod reset;
mod transaction;
mod vgpu;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use doctor::{Check, CheckStatus, DoctorReport};
pub use journal::{Journal, JournalError, JournalState};
pub use kernel::{Kernel, RealKernel};
pub use liveness::{PidLiveness, ProcessIdentity, process_identity};
pub use plan::{
    DeviceListing, DeviceReport, Plan, PlanRole, PlannedDevice, Refusal, RefusalReason, SysfsWrite,
};
pub use reset::{HealthCheck, ResetOutcome, ResetReport, Verification};
pub use transaction::{DetachReport, HeldDevice, ReconcileReport, RestoredDevice};
pub use vgpu::VgpuAttachRequest;

use crate::pci::ids::SupportedGpus;
use crate::pci::{PciAddress, PciError, Sysfs};
use crate::registry::ModuleFlavor;
use crate::vfio::{RealVfio, VfioCheckError, VfioVerifier};

/// Who holds attached devices: a validated string (it ends up in journal records).
///
/// 1–128 characters from `A–Z a–z 0–9 . _ - : @`, not `.` or `..`, no `/`. The CLI's liveness
/// check understands `pid:N`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(String);

/// Why a string is not a valid owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid owner `{0}`: use 1-128 characters from A-Z a-z 0-9 . _ - : @ (e.g. `vm-42` or `pid:1234`)"
)]
pub struct OwnerError(pub String);

impl Owner {
    /// Validate an owner string.
    pub fn new(s: &str) -> Result<Owner, OwnerError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s != "."
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@'));
        if ok {
            Ok(Owner(s.to_owned()))
        } else {
            Err(OwnerError(
                s.chars().take(40).flat_map(char::escape_default).collect(),
            ))
        }
    }

    /// The owner string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The process ID of a `pid:N` owner.
    pub fn pid(&self) -> Option<u32> {
        self.0.strip_prefix("pid:")?.parse().ok()
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Owner {
    type Err = OwnerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Owner::new(s)
    }
}

impl Serialize for Owner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Owner::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Whether an owner still exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// It exists (a stopped process still exists).
    Alive,
    /// It is gone: its devices may be released.
    Gone,
    /// Cannot tell: never released.
    Unknown,
}

/// The caller's answer to "does this owner still exist?", used by [`Host::reconcile`].
pub trait OwnerLiveness: Send + Sync {
    /// Whether `owner` still exists.
    fn is_alive(&self, owner: &Owner) -> Liveness;

    /// Whether `owner` still exists, given the process identity recorded when it attached
    /// (`None` for records written before identities were kept, or non-process owners).
    fn is_alive_as(&self, owner: &Owner, recorded: Option<&ProcessIdentity>) -> Liveness {
        let _ = recorded;
        self.is_alive(owner)
    }
}

/// What to plan or attach.
#[derive(Debug, Clone, Default)]
pub struct PlanRequest {
    /// Devices asked for by address.
    pub devices: Vec<PciAddress>,
    /// Instead of (or besides) addresses: pick this many free GPUs, preferring one NUMA node.
    pub gpus: Option<usize>,
    /// The owner asking (devices it already holds are reported as attached to it).
    pub owner: Option<Owner>,
    /// The release's module flavor: open modules need `kernelopen` GPUs.
    pub flavor: Option<ModuleFlavor>,
    /// The driver's `supported-gpus.json`, needed to check the open flavor.
    pub supported_gpus: Option<PathBuf>,
    /// Allow moving the boot display.
    pub allow_boot_vga: bool,
    /// Create an mdev of this type on each requested device instead of binding it.
    pub mdev_type: Option<String>,
    /// Put the GPUs in one P2P (GPUDirect) clique even when the topology does not show them
    /// behind one PCIe switch.
    pub p2p_clique: bool,
}

/// What to attach, and for whom.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The devices (see [`PlanRequest`]).
    pub plan: PlanRequest,
    /// The owner.
    pub owner: Owner,
    /// The initrd the VM boots (from `initrd::ensure` for the release), put in the boot spec.
    pub initrd: Option<PathBuf>,
}

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
    /// A sysfs write failed (the transaction was rolled back).
    #[error("writing `{value}` to {path} failed; the transaction was rolled back{hint}")]
    Write {
        /// The attribute.
        path: PathBuf,
        /// The value.
        value: String,
        /// The I/O error.
        source: std::io::Error,
        /// A fix, if known.
        hint: String,
    },
    /// After `drivers_probe` the device is not on vfio-pci.
    #[error(
        "{device} is on {driver} after drivers_probe, not vfio-pci; load the driver (modprobe vfio-pci) and retry; the transaction was rolled back"
    )]
    NotOnVfio {
        /// The device.
        device: PciAddress,
        /// Its driver now (or `no driver`).
        driver: String,
    },
    /// `/dev/vfio/<group>` did not appear in time.
    #[error(
        "{node} did not appear within {waited:?} after binding group {group} to vfio-pci; check dmesg; the transaction was rolled back"
    )]
    NoVfioNode {
        /// The node path.
        node: PathBuf,
        /// The group.
        group: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The VFIO check failed (the transaction was rolled back).
    #[error("the VFIO check failed; the transaction was rolled back")]
    Vfio(#[from] VfioCheckError),
    /// Rolling back failed too: the journal keeps the transaction for `reconcile`.
    #[error(
        "{cause}; rolling back also failed ({rollback}); the journal keeps the transaction: fix the cause and reconcile"
    )]
    RollbackFailed {
        /// The original failure.
        cause: String,
        /// The rollback failure.
        rollback: String,
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
    /// No such vGPU profile, or not enough room for it.
    #[error(transparent)]
    Vgpu(#[from] crate::vgpu::VgpuError),
    /// A vGPU write did not take: the read-back differs (the transaction was rolled back).
    #[error(
        "wrote `{wrote}` to {path} but read back `{read}`; the vGPU manager did not take it (check dmesg); the transaction was rolled back"
    )]
    VgpuMismatch {
        /// The attribute.
        path: PathBuf,
        /// What was written.
        wrote: String,
        /// What was read back.
        read: String,
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

impl AttachError {
    /// Whether a safety rule or the request itself was refused (nothing was changed), as
    /// opposed to a failure on the way.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            AttachError::Refused(_)
                | AttachError::NotEnoughGpus { .. }
                | AttachError::NoSuchMdevType { .. }
                | AttachError::NothingRequested
                | AttachError::DeviceHeld { .. }
                | AttachError::ProcUnreadable { .. }
                | AttachError::ResetRefused { .. }
                | AttachError::Vgpu(_)
                | AttachError::VgpuHeld { .. }
                | AttachError::HoldersUnknown { .. }
        )
    }
}

/// A host: its sysfs tree, state dir, devices dir and owner-liveness check.
pub struct Host {
    sysfs: Sysfs,
    journal: Journal,
    dev_dir: PathBuf,
    proc_root: PathBuf,
    /// Where the nvidia driver lists the GPUs it took (`/proc/driver/nvidia/gpus`).
    nvidia_gpus: PathBuf,
    kernel: Box<dyn Kernel>,
    verifier: Box<dyn VfioVerifier>,
    liveness: Box<dyn OwnerLiveness>,
    vfio_wait: Duration,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("sysfs", &self.sysfs.root())
            .field("dev_dir", &self.dev_dir)
            .field("simulated", &self.kernel.is_simulated())
            .finish()
    }
}

impl Host {
    /// A host over `sysfs_root` (`/sys`) keeping its journal in `state_dir`; devices in `/dev`.
    ///
    /// With the cargo feature `simulation` (tests only), a sysfs root holding
    /// [`crate::simulation::SIMULATION_MARKER`] gets the simulated kernel and VFIO check; without
    /// it, every root gets the real ones.
    pub fn new(
        sysfs_root: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        liveness: Box<dyn OwnerLiveness>,
    ) -> Host {
        let mut host = Host {
            sysfs: Sysfs::new(sysfs_root),
            journal: Journal::new(state_dir),
            dev_dir: PathBuf::from("/dev"),
            proc_root: PathBuf::from("/proc"),
            nvidia_gpus: PathBuf::from("/proc/driver/nvidia/gpus"),
            kernel: Box::new(RealKernel),
            verifier: Box::new(RealVfio::default()),
            liveness,
            vfio_wait: Duration::from_secs(10),
        };
        host.pick_kernel();
        host
    }

    #[cfg(feature = "simulation")]
    fn pick_kernel(&mut self) {
        use crate::simulation::{SimulatedKernel, SimulatedVfio, is_simulated_root};
        let root = self.sysfs.root().to_owned();
        if is_simulated_root(&root) {
            self.kernel = Box::new(SimulatedKernel::new(&root, &self.dev_dir));
            self.verifier = Box::new(SimulatedVfio {
                sysfs_root: root,
                dev_dir: self.dev_dir.clone(),
            });
            self.vfio_wait = Duration::from_millis(200);
            self.nvidia_gpus = self.sysfs.root().join(crate::simulation::SIM_NVIDIA_GPUS);
        }
    }

    #[cfg(not(feature = "simulation"))]
    fn pick_kernel(&mut self) {}

    /// Use another devices directory (where `vfio/<group>` nodes appear); the VFIO check looks
    /// there too, so call this before [`Host::with_verifier`].
    pub fn with_dev_dir(mut self, dev_dir: impl Into<PathBuf>) -> Host {
        self.dev_dir = dev_dir.into();
        self.verifier = Box::new(RealVfio::new(&self.dev_dir));
        self.pick_kernel();
        self
    }

    /// Use another proc filesystem: `/proc/cmdline` for doctor, `<pid>/fd` for who holds a
    /// device, `<pid>/stat` and `<pid>/ns/pid` for a `pid:N` owner's identity, and
    /// `driver/nvidia/gpus`.
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Host {
        self.proc_root = proc_root.into();
        self.nvidia_gpus = self.proc_root.join("driver/nvidia/gpus");
        self
    }

    /// Replace the sysfs writer.
    pub fn with_kernel(mut self, kernel: Box<dyn Kernel>) -> Host {
        self.kernel = kernel;
        self
    }

    /// Replace the VFIO check.
    pub fn with_verifier(mut self, verifier: Box<dyn VfioVerifier>) -> Host {
        self.verifier = verifier;
        self
    }

    /// How long to wait for `/dev/vfio/<group>` after a bind.
    pub fn with_vfio_wait(mut self, wait: Duration) -> Host {
        self.vfio_wait = wait;
        self
    }

    /// The sysfs view.
    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The devices directory.
    pub fn dev_dir(&self) -> &Path {
        &self.dev_dir
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), AttachError> {
        tracing::info!("write {:?} > {}", value, path.display());
        self.kernel
            .write_attr(path, value)
            .map_err(|source| AttachError::Write {
                path: path.to_owned(),
                value: value.trim().to_owned(),
                hint: write_hint(path, &source),
                source,
            })
    }
}

fn write_hint(path: &Path, err: &std::io::Error) -> String {
    let attr = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match (attr, err.raw_os_error()) {
        (_, Some(libc::EACCES) | Some(libc::EPERM)) => "; run as root".into(),
        ("unbind", Some(libc::EBUSY)) | ("unbind", Some(libc::EIO)) => {
            "; something holds the device: for an NVIDIA GPU stop its users (`nvidia-smi -i ADDR -pm 0`, close CUDA processes)".into()
        }
        ("drivers_probe", _) => "; is vfio-pci loaded? modprobe vfio-pci".into(),
        _ => String::new(),
    }
}

fn load_supported(path: Option<&Path>) -> Result<Option<SupportedGpus>, AttachError> {
    Ok(match path {
        Some(p) => Some(SupportedGpus::load(p)?),
        None => None,
    })
}
