//! The quarantine question an allocator asks before handing a device out.
//!
//! Vocabulary shared by `attach`, `vgpu` and the device plugin: they ask it; `health` answers
//! it ([`crate::health::HealthRecords`] from the records, failing closed); a test or a control
//! plane with its own health source implements it too.

use crate::pci::PciAddress;

/// Whether a device must not be handed out (vGPU placement, the KubeVirt device plugin).
pub trait QuarantineCheck: Send + Sync {
    /// Whether `device` must not be handed out.
    fn is_quarantined(&self, device: PciAddress) -> bool;
}

/// No quarantine: every device may be handed out.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoQuarantine;

impl QuarantineCheck for NoQuarantine {
    fn is_quarantined(&self, _device: PciAddress) -> bool {
        false
    }
}
