//! Reconcile: end what an earlier boot left in the journal, finish or roll back what a crash
//! left, then release the owners their liveness check says are gone; never what a process
//! still holds.
//!
//! An earlier boot's records are ended first (`boots.rs`).

use serde::{Deserialize, Serialize};

use super::boots::EndedByReboot;
use super::detach::DetachReport;
use super::holders::Holder;
use super::journal::{Step, Transaction, VgpuStep};
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
                j.state.remember_vgpus(&txn.owner, &txn.vgpus);
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
        // A reset_method a crash left narrowed (reset.rs).
        report.errors.extend(self.undo_reset_restrictions(&mut j)?);
        report.errors.extend(self.undo_sriov_cycles(&mut j)?);
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

    /// Past the point of no return: every device verified and still on its VFIO driver with its
    /// node present, every mdev verified and present.
    fn can_finish(&self, txn: &Transaction) -> bool {
        let devices_ok = txn.devices.iter().all(|d| {
            d.step == Step::Verified
                && self.sysfs.driver(d.device).as_ref() == Some(&d.vfio_driver)
                && d.iommu_group.is_some_and(|g| {
                    self.present_node(g, d.device).is_some()
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
