//! The quarantine question an allocator asks before handing a device out.
//!
//! Vocabulary shared by `attach`, `vgpu` and the device plugin: they ask it; `health` answers
//! it ([`crate::health::HealthRecords`] from the records, failing closed); a test or a control
//! plane with its own health source implements it too.

use crate::pci::PciAddress;

/// The answer about one device, with what a refusal says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It may be handed out.
    InService,
    /// Quarantined: the sentence names the failures and the fix.
    Quarantined(String),
    /// Its health cannot be told (an unreadable record): not handed out either (fail closed).
    Unknown(String),
}

/// Whether a device must not be handed out (attach, vGPU placement, the device plugin).
pub trait QuarantineCheck: Send + Sync {
    /// Whether `device` must not be handed out.
    fn is_quarantined(&self, device: PciAddress) -> bool;

    /// The answer with its reason, for a refusal; by default from [`Self::is_quarantined`].
    fn standing(&self, device: PciAddress) -> Standing {
        if self.is_quarantined(device) {
            Standing::Quarantined(format!(
                "{device} is quarantined by the caller's health source"
            ))
        } else {
            Standing::InService
        }
    }
}

/// No quarantine: every device may be handed out.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoQuarantine;

impl QuarantineCheck for NoQuarantine {
    fn is_quarantined(&self, _device: PciAddress) -> bool {
        false
    }
}
