//! Records of an earlier boot: ended, never trusted.
//!
//! A reboot undoes every change attach makes (binds, `driver_override`, `d3cold_allowed`,
//! persistence mode, mdevs and vGPU types do not survive it), and the VMs are gone. So the
//! journal's attachments and transactions whose `boot_id` is not this boot's describe nothing
//! that exists: every operation that takes the journal lock to change devices (attach, detach,
//! reset, reconcile; the device plugin at start) first reports them, with each device's driver
//! as the host shows it now, and drops them. Nothing is written to a device on their say-so: a
//! GPU that the boot put on vfio-pci by itself (`vfio-pci.ids=`) is the host's configuration,
//! not ours, and stays there, unowned. Records without a boot ID (journals of version 1), or
//! any record while this boot's ID is unreadable, are kept: a boot that cannot be compared is
//! never judged ended.

use serde::{Deserialize, Serialize};

use super::journal::{DeviceRecord, LockedJournal, VgpuRecord};
use super::{AttachError, Host};
use crate::owner::Owner;
use crate::pci::PciAddress;

/// A device of an ended record, as the host shows it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNow {
    /// The device.
    pub device: PciAddress,
    /// The driver it is on now (`None`: none).
    pub driver: Option<String>,
}

/// An attachment or interrupted transaction of an earlier boot, dropped from the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedByReboot {
    /// The owner it was for.
    pub owner: Owner,
    /// The boot it was recorded in.
    pub boot_id: String,
    /// Whether it was a transaction (interrupted by the reboot), not an attachment.
    pub transaction: bool,
    /// Its devices, each with the driver the host has it on now (never written to).
    pub devices: Vec<DeviceNow>,
    /// Its vGPUs and mdevs (the reboot removed them).
    pub vgpus: Vec<String>,
}

impl Host {
    /// End the records of earlier boots (see the module's documentation) and return them;
    /// what the device plugin does at start. Writes nothing to any device, so it needs no
    /// sight of the host's processes.
    pub fn end_previous_boot(&self) -> Result<Vec<EndedByReboot>, AttachError> {
        let mut j = self.journal.lock()?;
        self.end_earlier_boots(&mut j)
    }

    /// [`Host::end_previous_boot`] under a lock already held; saves only when it ended any.
    pub(super) fn end_earlier_boots(
        &self,
        j: &mut LockedJournal,
    ) -> Result<Vec<EndedByReboot>, AttachError> {
        let Some(now) = self.boot_id() else {
            return Ok(Vec::new());
        };
        let earlier = |b: &Option<String>| b.as_ref().is_some_and(|b| *b != now);
        let state = &mut j.state;
        let (old_txns, txns): (Vec<_>, Vec<_>) = std::mem::take(&mut state.transactions)
            .into_iter()
            .partition(|t| earlier(&t.boot_id));
        let (old_atts, atts): (Vec<_>, Vec<_>) = std::mem::take(&mut state.attachments)
            .into_iter()
            .partition(|a| earlier(&a.boot_id));
        state.transactions = txns;
        state.attachments = atts;
        let mut out: Vec<EndedByReboot> = old_txns
            .iter()
            .map(|t| self.ended(&t.owner, &t.boot_id, &t.devices, &t.vgpus, true))
            .collect();
        out.extend(
            old_atts
                .iter()
                .map(|a| self.ended(&a.owner, &a.boot_id, &a.devices, &a.vgpus, false)),
        );
        if out.is_empty() {
            return Ok(out);
        }
        for e in &out {
            // Its VM ended with the boot: so does its hold in the history.
            if !state.attachments.iter().any(|a| a.owner == e.owner) {
                state.forget(&e.owner);
            }
            tracing::warn!(
                "{} of {} belongs to boot {}, not this one: ended, dropped from the journal",
                if e.transaction {
                    "an interrupted attach"
                } else {
                    "the attachment"
                },
                e.owner,
                e.boot_id
            );
        }
        j.save()?;
        Ok(out)
    }

    fn ended(
        &self,
        owner: &Owner,
        boot: &Option<String>,
        devices: &[DeviceRecord],
        vgpus: &[VgpuRecord],
        transaction: bool,
    ) -> EndedByReboot {
        EndedByReboot {
            owner: owner.clone(),
            boot_id: boot.clone().unwrap_or_default(),
            transaction,
            devices: devices
                .iter()
                .map(|d| DeviceNow {
                    device: d.device,
                    driver: self.sysfs.driver(d.device),
                })
                .collect(),
            vgpus: vgpus.iter().map(VgpuRecord::label).collect(),
        }
    }
}
