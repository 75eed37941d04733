//! `gpu-passthrough`: everything a VM platform's control plane embeds to give a guest an NVIDIA GPU.
//!
//! One module per concern (see `DESIGN.md`):
//! - [`registry`]: guest kernel release → NVIDIA driver → pinned artifacts.
//! - [`failpoint`]: named crash points for the crash tests.
//! - [`fetch`]: download into a content-addressed cache, verifying sha256 while streaming.
//! - [`archive`]: read tar archives safely; write and read deterministic cpio (newc) archives.
//! - [`modinfo`]: kernel module metadata from a `.ko`'s ELF `.modinfo` section.
//! - [`inspect`]: check extracted artifacts against a release (vermagic, versions, dependencies,
//!   firmware, libraries) and list them in load order.
//! - [`initrd`]: build the base, GPU and combined initrd layers.
//! - [`pci`]: the host's PCI devices as sysfs shows them (read-only).
//! - [`attach`]: plan, bind to vfio-pci as a journaled transaction, verify, detach, reconcile.
//! - [`vfio`]: check a bound device through VFIO the way a VMM will open it.
//! - [`health`]: NVIDIA fault classification, per-device health records, quarantine.
//! - [`vmm`]: render a boot spec for Cloud Hypervisor and QEMU.
//! - `simulation` (cargo feature, tests only): a kernel and VFIO check that react on fake trees.
//!
//! The library never prints: it returns typed results and typed errors, and reports progress
//! through callbacks the caller supplies.
#![deny(missing_docs)]

pub mod archive;
pub mod attach;
pub mod failpoint;
pub mod fetch;
mod fsutil;
pub mod health;
pub mod initrd;
pub mod inspect;
pub mod modinfo;
pub mod pci;
pub mod registry;
#[cfg(feature = "simulation")]
pub mod simulation;
pub mod vfio;
pub mod vmm;
