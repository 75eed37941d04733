//! Whether a release's proprietary modules can drive a GPU, from the driver's own
//! `supported-gpus.json`.
//!
//! Newer drivers mark each GPU the proprietary modules support through GSP RM with the feature
//! `gsp_proprietary_supported` (NVIDIA's gpu-driver-container reads it the same way: a
//! `kernelopen` GPU without it is "open required", e.g. Blackwell). In such a file every
//! `kernelopen` GPU is therefore driven by the proprietary modules through GSP firmware or not at
//! all: a release without GSP firmware cannot serve it. 535's file has no such feature (there the
//! proprietary modules still run Turing and later without GSP), so nothing is refused for it.

use super::plan::{Refusal, RefusalReason};
use crate::pci::PciDevice;
use crate::pci::ids::SupportedGpus;
use crate::registry::{ModuleFlavor, Release};

/// Refusals for passing `devices` to a guest of `release` (empty for an open release: the
/// plan's own `kernelopen` check covers that flavor).
pub fn proprietary_refusals(
    release: &Release,
    gpus: &SupportedGpus,
    devices: &[PciDevice],
) -> Vec<Refusal> {
    if release.module_flavor != Some(ModuleFlavor::Proprietary) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for d in devices.iter().filter(|d| d.is_nvidia_gpu()) {
        let id = d.device_id;
        let named = gpus.name(id).map(|n| format!(", {n}")).unwrap_or_default();
        let refuse = |reason, message| Refusal {
            device: Some(d.address),
            reason,
            message,
            owner: None,
        };
        if gpus.open_required(id) {
            out.push(refuse(
                RefusalReason::NeedsOpenModules,
                format!(
                    "{} ({id:04x}{named}) is supported only by the open modules: release `{}`'s \
                     supported-gpus.json lists `kernelopen` but not `gsp_proprietary_supported` \
                     for it; use a release with the open flavor",
                    d.address, release.name
                ),
            ));
        } else if !release.gsp && gpus.proprietary_needs_gsp(id) {
            out.push(refuse(
                RefusalReason::NeedsGspFirmware,
                format!(
                    "{} ({id:04x}{named}) needs GSP firmware: release `{}` has none, and its \
                     supported-gpus.json marks the GPU `gsp_proprietary_supported` (the \
                     proprietary modules drive it through GSP); use a release with GSP firmware",
                    d.address, release.name
                ),
            ));
        }
    }
    out
}
