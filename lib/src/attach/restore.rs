//! Putting devices back: one device to its recorded original driver, looking at its actual
//! state (correct whichever step a crash interrupted, safe to repeat), and a whole transaction
//! rolled back.

use serde::{Deserialize, Serialize};

use super::journal::{DeviceRecord, Transaction};
use super::persistence::persistence;
use super::reset::HealthCheck;
use super::{AttachError, Host};
use crate::failpoint::Failpoint;
use crate::pci::{PciAddress, valid_driver_name};

/// A device given back to its driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredDevice {
    /// The device.
    pub device: PciAddress,
    /// The driver it is on now (`None`: it had none).
    pub driver: Option<String>,
    /// Reset and verification (detach only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

impl Host {
    /// Put one device back to its recorded original state, looking at what it is now (so that
    /// it is correct whichever step a crash interrupted, and safe to repeat).
    pub(super) fn restore(&self, rec: &DeviceRecord) -> Result<RestoredDevice, AttachError> {
        let restored = self.put_back(rec)?;
        self.persistence_back_on(rec);
        Ok(restored)
    }

    /// Turn persistence mode back on for a GPU attach turned it off for (`nvidia-smi`, under
    /// its time limit; a failure only leaves persistence off, so it is logged). Detach runs it
    /// after the journal lock is released.
    pub(super) fn persistence_back_on(&self, rec: &DeviceRecord) {
        if rec.persistence_disabled
            && let Some(smi) = &self.nvidia_smi
            && let Err(e) = persistence(smi, rec.device, true, self.command_timeout)
        {
            // The device is back on its driver; only its persistence mode is left off.
            tracing::warn!("{}", crate::error_chain(&e));
        }
    }

    /// [`Host::restore`] without persistence mode, which the caller turns back on.
    pub(super) fn put_back(&self, rec: &DeviceRecord) -> Result<RestoredDevice, AttachError> {
        if rec.adopted {
            // It was on vfio-pci before us, maybe in use by a VM we do not know: leave it there.
            return Ok(RestoredDevice {
                device: rec.device,
                driver: self.sysfs.driver(rec.device),
                health: None,
            });
        }
        let a = rec.device.to_string();
        if let Some(cur) = self.sysfs.driver(rec.device)
            && Some(&cur) != rec.original_driver.as_ref()
        {
            self.write(&self.sysfs.driver_dir(&cur).join("unbind"), &a)?;
            Failpoint::MidRollback.hit();
        }
        if self.sysfs.driver_override(rec.device) != rec.original_override {
            let value = rec.original_override.clone().unwrap_or_else(|| "\n".into());
            self.write(
                &self.sysfs.device_dir(rec.device).join("driver_override"),
                &value,
            )?;
        }
        if let Some(orig) = &rec.original_driver
            && valid_driver_name(orig)
            && self.sysfs.driver(rec.device).is_none()
        {
            // Straight to the original driver: drivers_probe would let the kernel choose, and
            // it may choose nouveau, or vfio-pci again through its `ids=` option.
            self.write(&self.sysfs.driver_dir(orig).join("bind"), &a)?;
        }
        let now = self.sysfs.driver(rec.device);
        if now != rec.original_driver {
            return Err(AttachError::Restore {
                device: rec.device,
                wanted: rec
                    .original_driver
                    .clone()
                    .unwrap_or_else(|| "no driver".into()),
                actual: now.unwrap_or_else(|| "no driver".into()),
            });
        }
        self.restore_d3cold(rec);
        Ok(RestoredDevice {
            device: rec.device,
            driver: now,
            health: None,
        })
    }

    /// Roll a transaction back in reverse order; vGPUs and mdevs first (they were created last).
    pub(super) fn roll_back(&self, txn: &Transaction) -> Result<Vec<RestoredDevice>, AttachError> {
        self.guard_release(&txn.devices)?;
        self.release_vgpus(&txn.vgpus)?;
        let mut out = Vec::new();
        for rec in txn.devices.iter().rev() {
            out.push(self.restore(rec)?);
        }
        // Its GPUs are back with the host: the partition follows.
        if let Some(p) = &txn.fabric_partition {
            self.deactivate_partition(p)?;
        }
        Ok(out)
    }
}
