//! The host CLI's `--json` output as run C reads it.
//!
//! Every document is read as the library's own type (`BootSpec`, `DoctorReport`, `Plan`,
//! `DetachReport`, `ReconcileReport`), so a renamed field is a compile error here. `devices
//! --json` rows are read through [`Device`], the few fields run C checks, so the checker's own
//! unit tests can feed it short rows.

pub use gpu_passthrough::attach::{
    CheckStatus, DetachReport, DoctorReport, Plan, ReconcileReport, RefusalReason,
};
pub use gpu_passthrough::pci::{DeviceKind, PciAddress};
pub use gpu_passthrough::vmm::BootSpec;
use serde::Deserialize;

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

/// `devices --json`: the rows and how many PCI devices were looked at.
#[derive(Debug, Deserialize)]
pub struct Listing {
    /// PCI devices looked at.
    pub scanned: usize,
    /// The rows.
    pub devices: Vec<Device>,
    /// Why the list is empty, when it is.
    pub note: Option<String>,
}

/// What the CLI prints on stdout with `--json` when a command fails.
#[derive(Debug, Deserialize)]
pub struct CliError {
    /// The error and its causes.
    pub error: String,
    /// The process exit code.
    pub exit_code: i32,
}
