//! `vgpu`: NVIDIA vGPU profiles on both frameworks, and where to place them.
//!
//! - **Vendor-specific VFIO** (vGPU 17+, Ada/Hopper/Blackwell): the PF stays on `nvidia`, its
//!   SR-IOV VFs (`virtfnN` links) each have `nvidia/creatable_vgpu_types` (a table: header
//!   `ID    : vGPU Name`, then `1147  : NVIDIA L40S-1Q`; header only when nothing fits) and
//!   `nvidia/current_vgpu_type` (`0` = free). Never unbind such a VF.
//! - **mdev** (Turing/Ampere, vGPU ≤16): `class/mdev_bus/<parent>/mdev_supported_types/<type>/`
//!   with `name`, `description` (`framebuffer=NNNNM, max_instance=N`), `available_instances`
//!   and `devices/`.
//!
//! [`catalogue`] reads what the host can create now; [`place`] picks parents (least framebuffer
//! in use; ties: the requested NUMA node, then the lowest address; or packed). Creating and
//! releasing them through the journal is `attach` (`Host::attach_vgpu`, detach, reconcile).

mod catalogue;
mod placement;
mod text;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::outcome::{Classify, Outcome};
use crate::pci::PciAddress;

pub use catalogue::{
    ModelTotals, catalogue, catalogue_with, framebuffer_from_name, parse_creatable_types,
    vgpu_role, virtual_functions,
};
pub use placement::{PlaceRequest, Placement, place};

/// Which vGPU framework a profile is created through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Framework {
    /// NVIDIA's vendor-specific VFIO on SR-IOV virtual functions.
    #[serde(rename = "vendor-vfio")]
    VendorVfio,
    /// Mediated devices.
    #[serde(rename = "mdev")]
    Mdev,
}

/// One parent GPU offering a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentAvailability {
    /// The parent (the PF for vendor VFIO, the mdev parent otherwise).
    pub address: PciAddress,
    /// Its NUMA node.
    pub numa_node: Option<u32>,
    /// How many of this profile can be created on it now.
    pub available: u32,
    /// Framebuffer of the vGPUs already on it.
    pub used_framebuffer_mib: u64,
}

/// A profile the host can create, across GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// The driver's name, e.g. `NVIDIA L40S-4Q`.
    pub name: String,
    /// The framework.
    pub framework: Framework,
    /// The type ID (vendor VFIO) or mdev type directory name.
    pub type_id: String,
    /// Its framebuffer.
    pub framebuffer_mib: u64,
    /// Sum of `available` over the parents.
    pub available: u32,
    /// The parents offering it, by address.
    pub parents: Vec<ParentAvailability>,
}

/// Every profile the host offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Catalogue {
    /// Profiles sorted by name.
    pub profiles: Vec<Profile>,
}

impl Catalogue {
    /// The profile named `query`: the driver's name, or the same without `NVIDIA `/`GRID `,
    /// case-insensitive.
    pub fn find(&self, query: &str) -> Result<&Profile, VgpuError> {
        let q = short_name(query).to_ascii_lowercase();
        self.profiles
            .iter()
            .find(|p| short_name(&p.name).to_ascii_lowercase() == q)
            .ok_or_else(|| VgpuError::NoSuchProfile {
                profile: query.chars().take(64).collect(),
                available: self.profiles.iter().map(|p| p.name.clone()).collect(),
            })
    }
}

/// A profile name without the vendor prefix the driver puts on it.
pub fn short_name(name: &str) -> &str {
    let n = name.trim();
    n.strip_prefix("NVIDIA ")
        .or_else(|| n.strip_prefix("GRID "))
        .unwrap_or(n)
}

/// Errors of the vGPU catalogue and placement.
#[derive(Debug, thiserror::Error)]
pub enum VgpuError {
    /// Reading sysfs failed.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No GPU on this host offers the profile.
    #[error("no GPU on this host offers the vGPU profile `{profile}`; available profiles: {}", if .available.is_empty() { "none (is the NVIDIA vGPU manager loaded?)".to_owned() } else { .available.join(", ") })]
    NoSuchProfile {
        /// The name asked for.
        profile: String,
        /// The profiles the host offers.
        available: Vec<String>,
    },
    /// A count of zero: nothing to create.
    #[error("asked for 0 vGPUs of {profile}: ask for at least one")]
    ZeroCount {
        /// The profile.
        profile: String,
    },
    /// Fewer instances can be created than asked for.
    #[error(
        "asked for {wanted} vGPUs of {profile} but only {available} can be created now; detach an owner using that GPU or pick a smaller profile"
    )]
    NotEnough {
        /// The profile.
        profile: String,
        /// How many were asked for.
        wanted: u32,
        /// How many can be created.
        available: u32,
    },
}

impl Classify for VgpuError {
    fn outcome(&self) -> Outcome {
        match self {
            VgpuError::Read { .. } => Outcome::Failed,
            // The request does not fit the host: nothing was created.
            VgpuError::NoSuchProfile { .. }
            | VgpuError::ZeroCount { .. }
            | VgpuError::NotEnough { .. } => Outcome::Refused,
        }
    }
}
