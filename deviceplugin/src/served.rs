//! What the plugin serves: one device as the last scan saw it and its problems. The vocabulary
//! `inventory` (GPUs) and `vgpu` (vGPUs) both build, so neither imports the other for it.

use std::fmt;
use std::path::PathBuf;

use gpu_passthrough::pci::{PciAddress, Sysfs};

use crate::naming::ResourceKind;

/// Why a served device is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The device is gone from sysfs.
    Gone,
    /// The group's VFIO node is missing.
    NoVfioNode(PathBuf),
    /// The device is not on a VFIO driver (vfio-pci or a variant) any more.
    NotOnVfio(Option<String>),
    /// The device is not in the IOMMU group the journal recorded.
    GroupChanged {
        /// The journal's group.
        recorded: Option<u32>,
        /// The group now.
        now: Option<u32>,
    },
    /// The health monitor quarantined it (for a vGPU: its parent GPU).
    Quarantined,
    /// A vendor-VFIO VF carries another vGPU type than the one the journal recorded.
    VgpuTypeChanged {
        /// The journal's type ID.
        recorded: String,
        /// The VF's `current_vgpu_type` now.
        now: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Gone => write!(f, "gone from sysfs"),
            Problem::NoVfioNode(p) => write!(f, "{} is missing", p.display()),
            Problem::NotOnVfio(d) => write!(
                f,
                "on {} instead of a VFIO driver (vfio-pci or a variant)",
                d.as_deref().unwrap_or("no driver")
            ),
            Problem::GroupChanged { recorded, now } => {
                write!(f, "IOMMU group changed from {recorded:?} to {now:?}")
            }
            Problem::Quarantined => write!(f, "quarantined"),
            Problem::VgpuTypeChanged { recorded, now } => {
                write!(f, "vGPU type {now} instead of {recorded}")
            }
        }
    }
}

/// One served GPU or vGPU, as the last scan saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedDevice {
    /// The device ID given to the kubelet: a PCI address, or an mdev's UUID.
    pub id: String,
    /// Whole PCI device (a GPU or a vendor-VFIO VF) or mediated device.
    pub kind: ResourceKind,
    /// Its PCI address (for an mdev: its parent GPU's).
    pub address: PciAddress,
    /// The IOMMU group the journal recorded.
    pub group: Option<u32>,
    /// NUMA node.
    pub numa: Option<u32>,
    /// The PCIe switch above it.
    pub switch: Option<PathBuf>,
    /// Empty when healthy.
    pub problems: Vec<Problem>,
}

impl ServedDevice {
    /// No problem found.
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The PCIe switch above a device: the upstream port two levels up in the sysfs device tree,
/// when both levels are PCI devices (a root port alone is not a switch).
pub fn switch_of(sysfs: &Sysfs, address: PciAddress) -> Option<PathBuf> {
    // The library's rule, which also decides the boot spec's P2P clique.
    sysfs.upstream_switch(address)
}
