//! Where `attach` writes the health records: the events that reset and verification produced
//! (detach, on-demand reset), and a VM's console mapped through the attachment history.

use std::path::Path;

use super::journal::Journal;
use super::reset::{HealthCheck, ResetOutcome, ResetReport};
use super::{AttachError, Host};
use crate::health::{EventSource, HealthError, HealthEvent, HealthStore, IngestReport};
use crate::owner::Owner;
use crate::pci::PciAddress;

/// Read `console` (a VM's console or kernel log) and record its faults as events of the devices
/// `owner` last held, from the attachment history in `state_dir`'s journal
/// ([`crate::health::ingest`]).
pub fn ingest_console(
    state_dir: &Path,
    owner: &Owner,
    console: &Path,
) -> Result<IngestReport, AttachError> {
    let journal = Journal::new(state_dir).read()?;
    let held = journal
        .last_held(owner)
        .ok_or_else(|| HealthError::NoHistory(owner.clone()))?
        .held();
    Ok(crate::health::ingest(state_dir, &held, console)?)
}

impl Host {
    /// Record `events` in the health records; returns what was recorded.
    pub(super) fn record_health(
        &self,
        events: &[HealthEvent],
    ) -> Result<Vec<HealthEvent>, AttachError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        Ok(HealthStore::new(self.journal.dir()).record(events)?)
    }

    /// Reset `device` on demand, then verify it. Refused while it is attached or in a
    /// transaction, and when only a bus reset is possible with a busy sibling on the bus.
    pub fn reset(&self, device: PciAddress) -> Result<HealthCheck, AttachError> {
        self.sees_host_processes()?;
        let mut j = self.journal.lock()?;
        self.end_earlier_boots(&mut j)?;
        if let Some(owner) = j.state.owner_of(device) {
            return Err(AttachError::ResetRefused {
                device,
                reason: format!("it is attached to owner {owner}; detach it first"),
            });
        }
        if let Some(reason) = crate::vgpu::vgpu_role(&self.sysfs, device) {
            return Err(AttachError::ResetRefused { device, reason });
        }
        let before = self.sysfs.device(device)?.driver;
        let reset = if before.as_deref() == Some("vfio-pci") {
            ResetReport {
                device,
                methods: Vec::new(),
                method: Some("vfio".into()),
                outcome: ResetOutcome::ByVfio,
                detail: None,
                ms: 0,
            }
        } else {
            self.kernel_reset(device)
        };
        if reset.outcome == ResetOutcome::Refused {
            return Err(AttachError::ResetRefused {
                device,
                reason: reset.detail.unwrap_or_default(),
            });
        }
        let verify = self.verify_device(device, before.as_deref());
        let events = Self::events_for(None, EventSource::Reset, Some(&reset), &verify);
        let events = self.record_health(&events)?;
        drop(j);
        Ok(HealthCheck {
            reset: Some(reset),
            verify,
            events,
        })
    }
}
