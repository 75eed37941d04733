//! Detach: give an owner's devices back to their original drivers (reset and verified on the
//! way) and release its vGPUs, refusing while a process holds any of them.

use serde::{Deserialize, Serialize};

use super::journal::{DeviceRecord, LockedJournal};
use super::reset::HealthCheck;
use super::restore::RestoredDevice;
use super::{AttachError, Host};
use crate::failpoint::Failpoint;
use crate::health::{EventSource, HealthEvent};
use crate::owner::Owner;

/// What detach did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachReport {
    /// The owner.
    pub owner: Owner,
    /// Devices given back, in order.
    pub restored: Vec<RestoredDevice>,
    /// Always empty: mdevs (`attach --mdev-type` too) are vGPU records and listed in
    /// `released_vgpus`. Kept so readers of earlier releases' JSON still find the field.
    #[serde(default)]
    pub removed_mdevs: Vec<String>,
    /// vGPUs and mdevs released (only ones this tool created).
    #[serde(default)]
    pub released_vgpus: Vec<String>,
}

impl Host {
    /// Give every device of `owner` back to its original driver (or none, if it had none) and
    /// remove the mdevs created for it. Safe to repeat after a crash.
    pub fn detach(&self, owner: &Owner) -> Result<DetachReport, AttachError> {
        self.sees_host_processes()?;
        let mut j = self.journal.lock()?;
        // An attachment of an earlier boot ended with it: never released on its record.
        self.end_earlier_boots(&mut j)?;
        let Some(i) = j.state.attachments.iter().position(|a| &a.owner == owner) else {
            return Err(AttachError::NotAttached(owner.clone()));
        };
        let report = self.release(&mut j, i)?;
        Ok(report)
    }

    /// Release attachment `i` of the locked journal: its vGPUs, then its devices, each step
    /// saved, so a failure leaves the rest recorded for a rerun.
    pub(super) fn release(
        &self,
        j: &mut LockedJournal,
        i: usize,
    ) -> Result<DetachReport, AttachError> {
        let att = j.state.attachments[i].clone();
        self.guard_release(&att.devices)?;
        let mut report = DetachReport {
            owner: att.owner.clone(),
            restored: Vec::new(),
            removed_mdevs: Vec::new(),
            released_vgpus: Vec::new(),
        };
        // Nothing is released while a VMM holds one of the vGPUs.
        self.check_vgpu_holders(&att.owner, &att.vgpus)?;
        for v in att.vgpus.iter().rev() {
            if self.release_vgpu(v)? {
                report.released_vgpus.push(v.label());
            }
            j.state.attachments[i].vgpus.retain(|x| x != v);
            j.save()?;
            Failpoint::VgpuMidRelease.hit();
        }
        for rec in att.devices.iter().rev() {
            let (mut restored, events) = self.release_device(rec, &att.owner)?;
            // Recorded before the device leaves the attachment: if that fails, it stays out of
            // placement and detach can be rerun.
            if let Some(check) = &mut restored.health {
                check.events = self.record_health(&events)?;
            }
            report.restored.push(restored);
            j.state.attachments[i]
                .devices
                .retain(|d| d.device != rec.device);
            j.save()?;
            Failpoint::MidDetach.hit();
        }
        j.state.attachments.remove(i);
        j.state.forget(&att.owner);
        j.save()?;
        Ok(report)
    }

    /// Detach of one device: off vfio-pci, reset (devices given to the VM), back to its
    /// original driver, verified; with the owner's health events for what failed (the caller
    /// records them).
    pub(super) fn release_device(
        &self,
        rec: &DeviceRecord,
        owner: &Owner,
    ) -> Result<(RestoredDevice, Vec<HealthEvent>), AttachError> {
        if rec.adopted {
            // Adopted from vfio-pci: it stays there (VFIO resets it), so nothing to verify.
            return Ok((self.restore(rec)?, Vec::new()));
        }
        let reset = if rec.passed {
            if self.sysfs.driver(rec.device).as_deref() == Some("vfio-pci") {
                self.write(
                    &self.sysfs.driver_dir("vfio-pci").join("unbind"),
                    &rec.device.to_string(),
                )?;
            }
            Some(self.kernel_reset(rec.device))
        } else {
            None
        };
        let mut restored = self.restore(rec)?;
        let verify = self.verify_device(rec.device, rec.original_driver.as_deref());
        let events = Self::events_for(Some(owner), EventSource::Detach, reset.as_ref(), &verify);
        restored.health = Some(HealthCheck {
            reset,
            verify,
            events: Vec::new(),
        });
        Ok((restored, events))
    }
}
