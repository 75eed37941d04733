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
//! to its VFIO driver (vfio-pci, or the variant driver the kernel's `modules.alias` names for
//! it, loaded before anything is recorded; see `vfio_driver.rs`), the device is unbound from its
//! driver and `drivers_probe` binds it there. Then each group's `/dev/vfio/N` is awaited (bounded) and each device handed to the
//! VM is checked through VFIO. A device already on vfio-pci that nobody owns is adopted without
//! writes and recorded as having no other driver. Detach and rollback undo this from the
//! device's actual state: unbind from whatever it is on, restore `driver_override`, probe (or
//! bind) the original driver. Detach also resets each device handed to the VM and verifies it
//! once it is back with the host (see `reset.rs`; failures become [`crate::health`] events,
//! recorded by `health_record.rs`), and placement refuses devices the host's
//! [`QuarantineCheck`] names (by default the health records, [`HealthRecords`]).
//!
//! One concern a file: `plan.rs` (what must move, every refusal), `devices.rs` (the listing),
//! `bind.rs` (the bind transaction), `vfio_driver.rs` (which VFIO driver: vfio-pci or a variant), `vgpu.rs` (vGPUs and mdevs: create, release),
//! `restore.rs` (a device back to its driver, rollback), `detach.rs`, `reconcile.rs`,
//! `boot.rs` (the boot spec), `vfio_node.rs` (waiting for the node), `persistence.rs`
//! (`nvidia-smi`), `reset.rs`, `health_record.rs`, `journal.rs`, `guard.rs`, `holders.rs`,
//! `liveness.rs`, `doctor.rs`, `driver_fit.rs`, `boots.rs` (an earlier boot's records ended),
//! `nvlink.rs` (whole baseboards, NVLink refusals, fabric partitions in shared-NVSwitch mode),
//! `error.rs` (what an operation fails on and leaves behind).
//!
//! vGPUs ([`Host::attach_vgpu`], `vgpu.rs`) are created in the same journal without moving any
//! device: a type ID written to a vendor-VFIO VF, or an mdev created from a UUID (also what
//! [`PlanRequest::mdev_type`] asks for: one record type, [`journal::VgpuRecord`]); detach and
//! reconcile release them only when no process holds them open.

mod bind;
mod boot;
mod boots;
mod detach;
mod devices;
mod doctor;
pub mod driver_fit;
mod error;
mod guard;
mod health_record;
pub mod holders;
mod host_check;
pub mod journal;
mod liveness;
mod nvlink;
mod persistence;
mod plan;
mod reconcile;
mod records;
mod refusals;
mod reset;
mod restore;
mod vfio_driver;
mod vfio_node;
mod vgpu;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use crate::kernel::{self, Kernel, RealKernel};
pub use crate::owner::{Owner, OwnerError};
pub use boots::{DeviceNow, EndedByReboot};
pub use detach::DetachReport;
pub use devices::{DeviceListing, DeviceReport};
pub use doctor::{Check, CheckStatus, DoctorReport};
pub use error::{Aftermath, AttachError};
pub use health_record::{DeviceCheck, ingest_console};
pub use host_check::Verification;
pub use journal::{Journal, JournalError, JournalState};
pub use liveness::{PidLiveness, ProcessIdentity, process_identity};
pub use plan::{
    Plan, PlanRole, PlannedDevice, PlannedPartition, Refusal, RefusalReason, SysfsWrite,
};
pub use reconcile::{HeldDevice, ReconcileReport};
pub use reset::{HealthCheck, ResetOutcome, ResetReport};
pub use restore::RestoredDevice;
pub use vgpu::VgpuAttachRequest;

use crate::fabric::FabricManager;
use crate::health::HealthRecords;
use crate::pci::ids::SupportedGpus;
use crate::pci::{PciAddress, Sysfs};
use crate::quarantine::QuarantineCheck;
use crate::registry::ModuleFlavor;
use crate::vfio::{RealVfio, VfioVerifier};

/// How long `nvidia-smi -pm` may run by default: it answers in well under a second on a
/// healthy GPU, and hangs forever on a wedged one.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Bind the requested devices to this VFIO driver (its registered name, or its module),
    /// loaded first if need be, instead of the one the kernel's `modules.alias` chooses
    /// (a variant driver such as `nvgrace-gpu-vfio-pci`, else vfio-pci). Refused, with
    /// nothing moved, when it is not a VFIO driver once loaded.
    pub vfio_driver: Option<String>,
    /// NVLink: a whole baseboard, NVLink in the guest.
    pub fabric: FabricRequest,
}

/// What a request asks of NVLink (`--baseboard`, `--nvlink` on the CLI).
///
/// Which devices form a baseboard is [`crate::pci::Baseboard`]'s rule, read from sysfs: the
/// NVSwitches behind one upstream PCIe port, and the NVIDIA GPUs of their PCI domain.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct FabricRequest {
    /// Every GPU and NVSwitch of the NVLink baseboard this device (any member of it) is on,
    /// in one transaction; with a fabric manager on the host (shared-NVSwitch mode), the
    /// board's GPUs as one partition, its NVSwitches staying with the host.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DEVICE"))]
    pub baseboard: Option<PciAddress>,
    /// NVLink in the guest: refused unless the GPUs come with every GPU and NVSwitch of their
    /// baseboard (or, in shared-NVSwitch mode, form one fabric partition).
    #[cfg_attr(feature = "cli", arg(long))]
    pub nvlink: bool,
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
    /// Asked before a device or vGPU parent is handed out.
    quarantine: Box<dyn QuarantineCheck>,
    vfio_wait: Duration,
    /// The `nvidia-smi` run for persistence mode (`None`: none found, or a simulated kernel).
    nvidia_smi: Option<PathBuf>,
    /// How long a program run for a device may take before it is killed.
    command_timeout: Duration,
    /// The host's fabric manager: set, the host runs shared-NVSwitch mode (GPUs go to VMs in
    /// its partitions, NVSwitches stay on `nvidia`).
    fabric: Option<Box<dyn FabricManager>>,
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
    /// `crate::simulation::SIMULATION_MARKER` gets the simulated kernel and VFIO check; without
    /// it, every root gets the real ones.
    pub fn new(
        sysfs_root: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        liveness: Box<dyn OwnerLiveness>,
    ) -> Host {
        let state_dir = state_dir.into();
        let mut host = Host {
            sysfs: Sysfs::new(sysfs_root),
            quarantine: Box::new(HealthRecords {
                state_dir: state_dir.clone(),
            }),
            journal: Journal::new(state_dir),
            dev_dir: PathBuf::from("/dev"),
            proc_root: PathBuf::from("/proc"),
            nvidia_gpus: PathBuf::from("/proc/driver/nvidia/gpus"),
            kernel: Box::new(RealKernel),
            verifier: Box::new(RealVfio::default()),
            liveness,
            vfio_wait: Duration::from_secs(10),
            nvidia_smi: guard::find_nvidia_smi(guard::NVIDIA_SMI_PATHS),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            fabric: None,
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
            // The host's nvidia-smi must never act on a simulated tree's addresses.
            self.nvidia_smi = None;
            self.nvidia_gpus = self.sysfs.root().join(crate::simulation::SIM_NVIDIA_GPUS);
            let partitions = self
                .sysfs
                .root()
                .join(crate::simulation::SIM_FABRIC_PARTITIONS);
            if partitions.is_file() {
                self.fabric = Some(Box::new(crate::fabric::PartitionFile::new(partitions)));
            }
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

    /// Ask another health source whether a device is quarantined (by default the health
    /// records in the state dir, [`HealthRecords`]).
    pub fn with_quarantine(mut self, quarantine: Box<dyn QuarantineCheck>) -> Host {
        self.quarantine = quarantine;
        self
    }

    /// Replace the VFIO check.
    pub fn with_verifier(mut self, verifier: Box<dyn VfioVerifier>) -> Host {
        self.verifier = verifier;
        self
    }

    /// Run shared-NVSwitch mode with this fabric manager: GPUs are placed in its partitions,
    /// each activated before the first bind and deactivated once its GPUs are back.
    pub fn with_fabric_manager(mut self, fabric: Box<dyn FabricManager>) -> Host {
        self.fabric = Some(fabric);
        self
    }

    /// How long to wait for `/dev/vfio/<group>` after a bind.
    pub fn with_vfio_wait(mut self, wait: Duration) -> Host {
        self.vfio_wait = wait;
        self
    }

    /// `Ok` when this process sees the host's processes through its proc root; every
    /// operation that moves or releases a device asks first and refuses when blind (see
    /// [`crate::pidns`]).
    pub fn sees_host_processes(&self) -> Result<(), crate::pidns::Blind> {
        crate::pidns::sees_host(&self.proc_root)
    }

    /// This boot's ID as the kernel gives it (`<proc>/sys/kernel/random/boot_id`), recorded
    /// with every transaction; `None` when unreadable (nothing is then judged by boot).
    pub fn boot_id(&self) -> Option<String> {
        std::fs::read_to_string(self.proc_root.join("sys/kernel/random/boot_id"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
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

    /// Run this program as `nvidia-smi` (instead of the first of the fixed paths that exists;
    /// tests use a fake one). Call after [`Host::with_dev_dir`], which picks the kernel again.
    pub fn with_nvidia_smi(mut self, program: impl Into<PathBuf>) -> Host {
        self.nvidia_smi = Some(program.into());
        self
    }

    /// How long a program run for a device (`nvidia-smi`) may take before it is killed and
    /// the operation fails naming the device (default [`DEFAULT_COMMAND_TIMEOUT`]).
    pub fn with_command_timeout(mut self, limit: Duration) -> Host {
        self.command_timeout = limit;
        self
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
                aftermath: Aftermath::KeptInJournal,
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
