//! Reconcile: end what an earlier boot left in the journal, finish or roll back what a crash
//! left, then release the owners their liveness check says are gone; never what a process
//! still holds.
//!
//! A reboot undoes every change attach makes (binds, `driver_override`, `d3cold_allowed`,
//! persistence mode, mdevs and vGPU types do not survive it), and the VMs are gone. So the
//! records of an earlier boot (their `boot_id` differs from this boot's) describe nothing that
//! exists: they are reported with each device's driver as the host shows it now and dropped,
//! and nothing is written to a device on their say-so. A GPU that the boot put on vfio-pci by
//! itself (`vfio-pci.ids=`) is the host's configuration, not ours: it is left there, unowned.

use serde::{Deserialize, Serialize};

use super::detach::DetachReport;
use super::holders::Holder;
use super::journal::{LockedJournal, Step, Transaction, VgpuStep};
use super::restore::RestoredDevice;
use super::{AttachError, Host, Liveness};
use crate::outcome::{Outcome, ReportOutcome};
use crate::owner::Owner;
use crate::pci::PciAddress;
use crate::remedy::Remedy;

/// A device kept because a process holds it open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDevice {
    /// The owner in the journal.
    pub owner: Owner,
    /// The device.
    pub device: PciAddress,
    /// Who holds it.
    pub holders: Vec<Holder>,
}

/// An attachment or abandoned transaction of an earlier boot, dropped from the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedByReboot {
    /// The owner it was for.
    pub owner: Owner,
    /// The boot it was recorded in.
    pub boot_id: String,
    /// Whether it was a transaction (interrupted by the reboot), not an attachment.
    pub transaction: bool,
    /// Its devices, each with the driver the host has it on now (never written to).
    pub devices: Vec<RestoredDevice>,
    /// Its vGPUs and mdevs (the reboot removed them).
    pub vgpus: Vec<String>,
}

/// What reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Attachments and transactions of an earlier boot: ended, dropped from the journal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended_by_reboot: Vec<EndedByReboot>,
    /// Abandoned transactions that were past the point of no return and still verified:
    /// committed as attachments of their owner.
    pub finished: Vec<Owner>,
    /// Devices of abandoned transactions put back on their original driver.
    pub rolled_back: Vec<RestoredDevice>,
    /// Owners found gone whose devices were released.
    pub released: Vec<DetachReport>,
    /// Owners whose liveness is unknown: kept.
    pub kept_unknown: Vec<Owner>,
    /// Owners alive: kept.
    pub kept_alive: Vec<Owner>,
    /// Devices a process still holds open (a VM running under another name, say): kept,
    /// whatever the owner's liveness says.
    pub kept_in_use: Vec<HeldDevice>,
    /// Failures (each also left in the journal for the next run).
    pub errors: Vec<String>,
}

/// A reconcile with errors failed; an owner it could not judge asks to be declared gone.
impl ReportOutcome for ReconcileReport {
    fn outcome(&self) -> Option<Outcome> {
        (!self.errors.is_empty()).then_some(Outcome::Failed)
    }

    fn remedy(&self) -> Option<Remedy> {
        (!self.kept_unknown.is_empty()).then_some(Remedy::DeclareGone)
    }
}

impl Host {
    /// Finish or roll back every transaction a crash left in the journal, then release the
    /// attachments whose owner is [`Liveness::Gone`]. Never releases an owner that is alive
    /// or unknown.
    pub fn reconcile(&self) -> Result<ReconcileReport, AttachError> {
        self.sees_host_processes()?;
        let mut j = self.journal.lock()?;
        let mut report = ReconcileReport {
            ended_by_reboot: self.end_earlier_boots(&mut j)?,
            ..Default::default()
        };
        // The lock is held by every running attach, so these were all abandoned.
        let txns = std::mem::take(&mut j.state.transactions);
        for txn in txns {
            if self.can_finish(&txn) {
                report.finished.push(txn.owner.clone());
                let passed: Vec<PciAddress> = txn
                    .devices
                    .iter()
                    .filter(|d| d.passed)
                    .map(|d| d.device)
                    .chain(txn.vgpus.iter().map(|v| v.parent))
                    .collect();
                let gpus = passed
                    .iter()
                    .copied()
                    .filter(|a| {
                        self.sysfs
                            .device(*a)
                            .is_ok_and(|d| d.kind == crate::pci::DeviceKind::Display)
                    })
                    .collect();
                j.state.remember(&txn.owner, passed, gpus);
                j.state.commit(txn);
            } else {
                match self.roll_back(&txn) {
                    Ok(restored) => report.rolled_back.extend(restored),
                    Err(AttachError::DeviceHeld {
                        device, holders, ..
                    }) => {
                        report.kept_in_use.push(HeldDevice {
                            owner: txn.owner.clone(),
                            device,
                            holders,
                        });
                        j.state.transactions.push(txn);
                    }
                    Err(e) => {
                        report.errors.push(format!(
                            "rolling back for {}: {}",
                            txn.owner,
                            crate::error_chain(&e)
                        ));
                        j.state.transactions.push(txn);
                    }
                }
            }
            j.save()?;
        }
        let mut i = 0;
        while i < j.state.attachments.len() {
            let owner = j.state.attachments[i].owner.clone();
            let recorded = j.state.attachments[i].owner_process.clone();
            match self.liveness.is_alive_as(&owner, recorded.as_ref()) {
                Liveness::Gone => match self.release(&mut j, i) {
                    Ok(r) => {
                        report.released.push(r);
                        continue;
                    }
                    Err(AttachError::DeviceHeld {
                        device, holders, ..
                    }) => report.kept_in_use.push(HeldDevice {
                        owner,
                        device,
                        holders,
                    }),
                    Err(e) => report
                        .errors
                        .push(format!("releasing {owner}: {}", crate::error_chain(&e))),
                },
                Liveness::Alive => report.kept_alive.push(owner),
                Liveness::Unknown => report.kept_unknown.push(owner),
            }
            i += 1;
        }
        j.save()?;
        Ok(report)
    }

    /// Drop the attachments and transactions an earlier boot recorded (see the module's
    /// documentation); what the device plugin does at start. Writes nothing to any device, so
    /// it needs no sight of the host's processes. Records without a boot ID (journals of
    /// version 1), or any record while this boot's ID is unreadable, are kept: a boot that
    /// cannot be compared is never judged ended.
    pub fn end_previous_boot(&self) -> Result<Vec<EndedByReboot>, AttachError> {
        let mut j = self.journal.lock()?;
        self.end_earlier_boots(&mut j)
    }

    fn end_earlier_boots(&self, j: &mut LockedJournal) -> Result<Vec<EndedByReboot>, AttachError> {
        let Some(now) = self.boot_id() else {
            return Ok(Vec::new());
        };
        let earlier = |b: &Option<String>| b.as_ref().is_some_and(|b| *b != now);
        let state = &mut j.state;
        let (old_txns, txns) = std::mem::take(&mut state.transactions)
            .into_iter()
            .partition::<Vec<_>, _>(|t| earlier(&t.boot_id));
        let (old_atts, atts) = std::mem::take(&mut state.attachments)
            .into_iter()
            .partition::<Vec<_>, _>(|a| earlier(&a.boot_id));
        state.transactions = txns;
        state.attachments = atts;
        let ended = |owner: &Owner,
                     boot: &Option<String>,
                     devices: &[super::journal::DeviceRecord],
                     vgpus: &[super::journal::VgpuRecord],
                     transaction| EndedByReboot {
            owner: owner.clone(),
            boot_id: boot.clone().unwrap_or_default(),
            transaction,
            devices: devices
                .iter()
                .map(|d| RestoredDevice {
                    device: d.device,
                    driver: self.sysfs.driver(d.device),
                    health: None,
                })
                .collect(),
            vgpus: vgpus.iter().map(|v| v.label()).collect(),
        };
        let mut out: Vec<EndedByReboot> = old_txns
            .iter()
            .map(|t| ended(&t.owner, &t.boot_id, &t.devices, &t.vgpus, true))
            .collect();
        out.extend(
            old_atts
                .iter()
                .map(|a| ended(&a.owner, &a.boot_id, &a.devices, &a.vgpus, false)),
        );
        for e in &out {
            // Its VM ended with the boot: its hold ends in the history too.
            if !state.attachments.iter().any(|a| a.owner == e.owner) {
                state.forget(&e.owner);
            }
        }
        if !out.is_empty() {
            for e in &out {
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
        }
        Ok(out)
    }

    /// Past the point of no return: every device verified and still on vfio-pci with its
    /// node present, every mdev verified and present.
    fn can_finish(&self, txn: &Transaction) -> bool {
        let devices_ok = txn.devices.iter().all(|d| {
            d.step == Step::Verified
                && self.sysfs.driver(d.device).as_deref() == Some("vfio-pci")
                && d.iommu_group.is_some_and(|g| {
                    self.present_node(g, Some(d.device)).is_some()
                        && (!d.passed
                            || self
                                .verifier
                                .verify(&self.sysfs.device_dir(d.device), g)
                                .is_ok())
                })
        });
        let vgpus_ok = txn
            .vgpus
            .iter()
            .all(|v| v.step == VgpuStep::Verified && self.vgpu_present(v));
        (!txn.devices.is_empty() || !txn.vgpus.is_empty()) && devices_ok && vgpus_ok
    }
}
