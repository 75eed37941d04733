//! `gpu-passthrough`: everything a VM platform's control plane embeds to give a guest an NVIDIA GPU.
//!
//! One module per concern; `ARCHITECTURE.md` at the repository root has the layers, the data
//! flow of each command and the guest contract:
//! - [`provision`]: a GPU VM from a release: layers ensured before any device moves, then attach.
//! - [`registry`]: guest kernel release → NVIDIA driver → pinned artifacts.
//! - [`failpoint`]: named crash points for the crash tests.
//! - [`fetch`]: download into a content-addressed cache, verifying sha256 while streaming.
//! - [`capabilities`]: which driver capability (compute, utility, video, ...) each library is.
//! - [`archive`]: read tar archives safely; write and read deterministic cpio (newc) archives.
//! - [`modinfo`]: kernel module metadata from a `.ko`'s ELF `.modinfo` section.
//! - [`modsig`]: the signature appended to a `.ko` (signer, key id, digest), as `modinfo` shows it.
//! - [`inspect`]: check extracted artifacts against a release (vermagic, versions, dependencies,
//!   firmware, libraries) and list them in load order.
//! - [`initrd`]: build the base, GPU and combined initrd layers.
//! - [`driver_build`]: compile NVIDIA's modules for one kernel in a bubblewrap sandbox.
//! - [`paths`]: default locations (cache, state dir, sysfs).
//! - [`tools`]: the host programs the library runs, found at checked system paths, never via `PATH`.
//! - [`pci`]: the host's PCI devices as sysfs shows them (read-only).
//! - [`attach`]: plan, bind to vfio-pci as a journaled transaction, verify, detach, reconcile.
//! - [`owner`]: who holds devices ([`owner::Owner`]), named by every record and report.
//! - [`quarantine`]: the question an allocator asks before handing a device out.
//! - [`kernel`]: the sysfs writer every host change goes through (swapped for the simulation).
//! - [`vfio`]: check a bound device through VFIO the way a VMM will open it.
//! - [`health`]: NVIDIA fault classification, per-device health records, quarantine.
//! - [`remedy`]: the caller settings that fix an error (the CLI names its flag for each).
//! - [`outcome`]: whether an error is a refusal, a verification failure or a failure on the way
//!   (`Classify`, which every error type answers), and what a returned report says
//!   (`ReportOutcome`: a plan with refusals, a host not ready).
//! - [`text`]: the human-readable form of the reports (`Display`).
//! - [`versions`]: the driver-upgrade workflow: add, build, pin and verify releases.
//! - [`vgpu`]: vGPU profiles on both NVIDIA frameworks (vendor VFIO, mdev) and their placement.
//! - [`vmm`]: render a boot spec for Cloud Hypervisor and QEMU.
//! - `simulation` (cargo feature, tests only): a kernel and VFIO check that react on fake trees.
//!
//! The library never prints: it returns typed results and typed errors, and reports progress
//! through callbacks the caller supplies.
#![deny(missing_docs)]

pub mod archive;
pub mod attach;
pub mod capabilities;
pub mod driver_build;
pub mod fabric;
pub mod failpoint;
pub mod fetch;
/// The download progress callback every workflow takes.
pub use fetch::{Fetcher, Progress};
mod fsutil;
pub mod health;
pub mod initrd;
pub mod inspect;
pub mod kernel;
pub mod modinfo;
pub mod modsig;
pub mod outcome;
pub mod owner;
pub mod paths;
pub mod pci;
pub mod pidns;
pub mod provision;
pub mod quarantine;
pub mod registry;
pub mod remedy;
#[cfg(feature = "simulation")]
pub mod simulation;
pub mod text;
pub mod tools;
pub mod versions;
pub mod vfio;
pub mod vgpu;
pub mod vmm;

/// An error and its chain of causes, `: `-joined: for a message that must hold the whole story in
/// one string (a JSON field, a retry log line).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
