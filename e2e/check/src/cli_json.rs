//! The host CLI's `--json` output as run C reads it.
//!
//! The boot spec is read as the library's own [`BootSpec`]. The other documents are mirrored here
//! field by field (only the fields the checks read, with closed enums) because their library types
//! only implement `Serialize`; once they also derive `Deserialize` these mirrors should go.

pub use gpu_passthrough::pci::PciAddress;
pub use gpu_passthrough::vmm::BootSpec;
use serde::Deserialize;

/// `doctor --json`.
#[derive(Debug, Deserialize)]
pub struct DoctorReport {
    /// Every check.
    pub checks: Vec<DoctorCheck>,
}

/// One doctor check.
#[derive(Debug, Deserialize)]
pub struct DoctorCheck {
    /// Stable name (`iommu`, `vfio_pci`, …).
    pub name: String,
    /// Outcome.
    pub status: CheckStatus,
}

/// A doctor check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// Passthrough will not work until fixed.
    Fail,
}

/// One entry of `devices --json`.
#[derive(Debug, Deserialize)]
pub struct Device {
    /// Its address.
    pub address: PciAddress,
    /// The bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// The firmware's boot display.
    pub boot_vga: bool,
    /// What the class code says it is.
    pub kind: DeviceKind,
}

/// A device's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// Display controller.
    Display,
    /// Audio device.
    Audio,
    /// Mass-storage controller.
    Storage,
    /// Network controller.
    Network,
    /// Bridge.
    Bridge,
    /// USB controller.
    Usb,
    /// Anything else.
    Other,
}

/// `plan --json`.
#[derive(Debug, Deserialize)]
pub struct Plan {
    /// Refusals: attach does nothing if there is any.
    pub refusals: Vec<Refusal>,
    /// The sysfs writes attach would make, in order.
    pub writes: Vec<SysfsWrite>,
}

/// One refusal.
#[derive(Debug, Deserialize)]
pub struct Refusal {
    /// The device concerned.
    pub device: Option<PciAddress>,
    /// The reason.
    pub reason: RefusalReason,
}

/// The refusal reasons run C provokes; any other is [`RefusalReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The firmware's boot display.
    BootVga,
    /// Attached to an owner already.
    AttachedToOwner,
    /// Any other reason.
    #[serde(other)]
    Other,
}

/// One planned sysfs write.
#[derive(Debug, Deserialize)]
pub struct SysfsWrite {
    /// The attribute.
    pub path: std::path::PathBuf,
}

/// `detach --json` (and each owner reconcile released).
#[derive(Debug, Deserialize)]
pub struct DetachReport {
    /// Devices given back.
    pub restored: Vec<RestoredDevice>,
}

/// `reconcile --json`.
#[derive(Debug, Deserialize)]
pub struct ReconcileReport {
    /// Devices of abandoned transactions put back on their original driver.
    pub rolled_back: Vec<RestoredDevice>,
    /// Failures.
    pub errors: Vec<String>,
}

/// A device given back to the host.
#[derive(Debug, Deserialize)]
pub struct RestoredDevice {
    /// The device.
    pub device: PciAddress,
    /// Its driver now.
    pub driver: Option<String>,
}

/// What the CLI prints on stdout with `--json` when a command fails.
#[derive(Debug, Deserialize)]
pub struct CliError {
    /// The error and its causes.
    pub error: String,
    /// The process exit code.
    pub exit_code: i32,
}
