//! Where `attach` writes the health records: the events that reset and verification produced
//! (detach, on-demand reset), and a VM's console mapped through the attachment history.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::guard::describe;
use super::host_check::Verification;
use super::journal::Journal;
use super::reset::{HealthCheck, ResetOutcome, ResetReport};
use super::{AttachError, Host};
use crate::health::{
    Action, EventSource, Fault, FaultKind, HealthError, HealthEvent, HealthStore, HostCheckRecord,
    IngestReport, Quarantine,
};
use crate::outcome::{Outcome, ReportOutcome};
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

/// The host's own check of a device on demand ([`Host::check_device`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCheck {
    /// What was checked and read.
    pub verify: Verification,
    /// The guests had made it suspect before the check.
    pub was_suspect: bool,
    /// Its standing afterwards: `None` in service; a quarantine when the check failed (or the
    /// host's own earlier evidence already quarantined it).
    pub quarantine: Option<Quarantine>,
}

/// A failed check failed verification.
impl ReportOutcome for DeviceCheck {
    fn outcome(&self) -> Option<Outcome> {
        (!self.verify.ok).then_some(Outcome::VerificationFailed)
    }
}

/// The verification line, then the verdict.
impl std::fmt::Display for DeviceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = &self.verify;
        let readings = v.readings().join(" ");
        if v.ok {
            writeln!(f, "{}  host check passed: {readings}", v.device)?;
        } else {
            writeln!(
                f,
                "{}  HOST CHECK FAILED: {} ({readings})",
                v.device,
                v.problems.join("; ")
            )?;
        }
        match (&self.quarantine, self.was_suspect) {
            (Some(q), _) => writeln!(f, "{}", q.summary()),
            (None, true) => writeln!(f, "{}  suspect, checked: back in service", v.device),
            (None, false) => writeln!(f, "{}  in service", v.device),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Host {
    /// The host's own check of `device` on demand (config space, BAR0 through `resource0`,
    /// link width; no reset), recorded in its health record: a device the guests made suspect
    /// goes back to service if it passes, and a failure quarantines it. Refused while the
    /// device is attached (its VM has it: detach checks it).
    pub fn check_device(&self, device: PciAddress) -> Result<DeviceCheck, AttachError> {
        let mut j = self.journal.lock()?;
        // An earlier boot's attachment must not keep the device "attached" (boots.rs).
        self.end_earlier_boots(&mut j)?;
        if let Some(owner) = j.state.owner_of(device) {
            return Err(AttachError::CheckRefused {
                device,
                reason: format!(
                    "it is attached to owner {owner}; detach checks it (or detach it first)"
                ),
            });
        }
        let driver = self.sysfs.device(device)?.driver;
        let verify = self.check_device_against(device, driver.as_deref(), None);
        let was_suspect = HealthStore::new(self.journal.dir())
            .quarantine(device)?
            .is_some_and(|q| q.suspect);
        let quarantine = self.record_host_check(&verify, was_suspect)?;
        drop(j);
        Ok(DeviceCheck {
            verify,
            was_suspect,
            quarantine,
        })
    }

    /// After the check at detach: a suspect device is decided by it (see
    /// [`Host::check_device`]); any other is left to the owners policy.
    pub(super) fn settle_suspect(
        &self,
        device: PciAddress,
        verify: &Verification,
    ) -> Result<(), AttachError> {
        let suspect = HealthStore::new(self.journal.dir())
            .quarantine(device)?
            .is_some_and(|q| q.suspect);
        if suspect {
            self.record_host_check(verify, true)?;
        }
        Ok(())
    }

    fn record_host_check(
        &self,
        verify: &Verification,
        was_suspect: bool,
    ) -> Result<Option<Quarantine>, AttachError> {
        let record = HostCheckRecord {
            at: unix_now(),
            passed: verify.ok,
            was_suspect,
            readings: verify.readings(),
            problems: verify.problems.clone(),
        };
        let failure = (!verify.ok).then(|| Fault {
            address: Some(verify.device.to_string()),
            kind: FaultKind::VerifyFailed,
            xid: None,
            message: verify.problems.join("; "),
            action: Action::ResetGpu,
        });
        Ok(HealthStore::new(self.journal.dir()).record_check(verify.device, &record, failure)?)
    }

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
    /// transaction, while it is the boot display, while a process uses it on its host driver
    /// (named), and when only a bus reset is possible with a sibling on the bus in use. An
    /// SR-IOV PF with VFs is reset by an SR-IOV cycle ([`Host::sriov_cycle`]: recovers a vGPU
    /// wedged by a VM killed during its initialisation), refused naming every VF's holder.
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
        let found = self.sysfs.device(device)?;
        if found.boot_vga {
            return Err(AttachError::ResetRefused {
                device,
                reason: "it is the boot display (boot_vga=1): a reset blanks the host console and may hang the machine".into(),
            });
        }
        // A PF with VFs: its reset is the SR-IOV cycle that recovers a wedged vGPU, only
        // while nobody holds a VF (it removes them all).
        if let Some(numvfs) = found.sriov_num_vfs.filter(|n| *n > 0) {
            let holders = self.vf_holders(&j.state, device);
            if !holders.is_empty() {
                return Err(AttachError::ResetRefused {
                    device,
                    reason: format!(
                        "an SR-IOV cycle removes all its {numvfs} VFs, and {}; detach their owners (or remove those vGPUs) first",
                        holders.join(", ")
                    ),
                });
            }
            let reset = self.sriov_cycle(&mut j, device, numvfs)?;
            let verify = self.verify_device(device, found.driver.as_deref());
            let events = Self::events_for(None, EventSource::Reset, Some(&reset), &verify);
            let events = self.record_health(&events)?;
            drop(j);
            return Ok(HealthCheck {
                reset: Some(reset),
                verify,
                events,
            });
        }
        if let Some(reason) = crate::vgpu::vgpu_role(&self.sysfs, device) {
            return Err(AttachError::ResetRefused { device, reason });
        }
        let before = found.driver;
        if before.as_deref() == Some("nvidia") {
            // Every client counts, nvidia-persistenced too: a reset pulls the GPU from under them.
            let clients = self.gpu_clients(device, true)?;
            if !clients.is_empty() {
                return Err(AttachError::ResetRefused {
                    device,
                    reason: format!(
                        "it is in use on the host: {}; close those programs (and turn persistence mode off: nvidia-smi -i {device} -pm 0) first",
                        describe(&clients)
                    ),
                });
            }
        }
        let reset = if before
            .as_deref()
            .is_some_and(|d| crate::pci::variant::is_vfio_driver(self.sysfs.root(), d))
        {
            ResetReport {
                device,
                methods: Vec::new(),
                method: Some("vfio".into()),
                outcome: ResetOutcome::ByVfio,
                detail: None,
                ms: 0,
            }
        } else {
            self.kernel_reset(&mut j, device, None)?
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
