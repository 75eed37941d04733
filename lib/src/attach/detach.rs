//! Detach: give an owner's devices back to their original drivers (reset and verified on the
//! way) and release its vGPUs, refusing while a process holds any of them.

use serde::{Deserialize, Serialize};

use super::journal::{DeviceRecord, LockedJournal};
use super::reset::{HealthCheck, ResetOutcome, ResetReport};
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
    /// Fabric partitions deactivated once their GPUs were back (shared-NVSwitch mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deactivated_partitions: Vec<u32>,
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
        let mut given_back = Vec::new();
        let report = self.release_deferring(&mut j, i, &mut given_back);
        // nvidia-smi may hang on a wedged GPU: never with the journal lock held.
        drop(j);
        for rec in &given_back {
            self.persistence_back_on(rec);
        }
        report
    }

    /// Release attachment `i` of the locked journal: its vGPUs, then its devices, each step
    /// saved, so a failure leaves the rest recorded for a rerun.
    pub(super) fn release(
        &self,
        j: &mut LockedJournal,
        i: usize,
    ) -> Result<DetachReport, AttachError> {
        let mut given_back = Vec::new();
        let report = self.release_deferring(j, i, &mut given_back);
        for rec in &given_back {
            self.persistence_back_on(rec);
        }
        report
    }

    /// [`Host::release`], leaving persistence mode of the devices given back (pushed to
    /// `given_back`) for the caller to turn on.
    fn release_deferring(
        &self,
        j: &mut LockedJournal,
        i: usize,
        given_back: &mut Vec<DeviceRecord>,
    ) -> Result<DetachReport, AttachError> {
        let att = j.state.attachments[i].clone();
        self.guard_release(&att.devices)?;
        let mut report = DetachReport {
            owner: att.owner.clone(),
            restored: Vec::new(),
            removed_mdevs: Vec::new(),
            released_vgpus: Vec::new(),
            deactivated_partitions: Vec::new(),
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
            let released = self.release_device(j, rec, &att.owner);
            if released.is_ok() || self.sysfs.driver(rec.device) == rec.original_driver {
                given_back.push(rec.clone());
            }
            let (mut restored, events) = released?;
            // Recorded before the device leaves the attachment: if that fails, it stays out of
            // placement and detach can be rerun.
            if let Some(check) = &mut restored.health {
                check.events = self.record_health(&events)?;
                // A device the guests blamed is decided here, by this check.
                self.settle_suspect(rec.device, &check.verify)?;
            }
            report.restored.push(restored);
            j.state.attachments[i]
                .devices
                .retain(|d| d.device != rec.device);
            j.save()?;
            Failpoint::MidDetach.hit();
        }
        for p in &att.fabric_partitions {
            self.deactivate_partition(p)?;
            report.deactivated_partitions.push(p.id);
            j.state.attachments[i].fabric_partitions.retain(|x| x != p);
            j.save()?;
        }
        j.state.attachments.remove(i);
        j.state.forget(&att.owner);
        j.save()?;
        Ok(report)
    }

    /// Detach of one device: off its VFIO driver, reset (devices given to the VM), back to its
    /// original driver, verified; with the owner's health events for what failed (the caller
    /// records them).
    pub(super) fn release_device(
        &self,
        j: &mut LockedJournal,
        rec: &DeviceRecord,
        owner: &Owner,
    ) -> Result<(RestoredDevice, Vec<HealthEvent>), AttachError> {
        if rec.adopted {
            // Adopted from vfio-pci: it stays there (VFIO resets it), so nothing to verify.
            return Ok((self.put_back(rec)?, Vec::new()));
        }
        let now = self.sysfs.driver(rec.device);
        let reset = if !rec.passed {
            None
        } else if now.is_some()
            && now.as_ref() != Some(&rec.vfio_driver)
            && now == rec.original_driver
        {
            // A rerun of a detach that failed after giving it back (a health write, say): its
            // host driver has it again, and a reset would pull it from under that driver.
            Some(ResetReport {
                device: rec.device,
                methods: Vec::new(),
                method: None,
                outcome: ResetOutcome::AlreadyReturned,
                detail: Some(format!(
                    "already back on {}: a rerun detach does not reset it",
                    now.as_deref().unwrap_or_default()
                )),
                ms: 0,
            })
        } else {
            if now.as_ref() == Some(&rec.vfio_driver) {
                self.write(
                    &self.sysfs.driver_dir(&rec.vfio_driver).join("unbind"),
                    &rec.device.to_string(),
                )?;
            }
            Some(self.kernel_reset(j, rec.device, Some(owner))?)
        };
        let mut restored = self.put_back(rec)?;
        let verify = self.check_device_against(
            rec.device,
            rec.original_driver.as_deref(),
            rec.baseline.as_ref(),
        );
        let events = Self::events_for(Some(owner), EventSource::Detach, reset.as_ref(), &verify);
        restored.health = Some(HealthCheck {
            reset,
            verify,
            events: Vec::new(),
        });
        Ok((restored, events))
    }
}
