//! The bind transaction, detach and reconcile.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::journal::{Attachment, DeviceRecord, LockedJournal, MdevRecord, Step, Transaction};
use super::{AttachError, AttachRequest, Host, Liveness, Owner, load_supported};
use crate::failpoint::Failpoint;
use crate::outcome::{Outcome, ReportOutcome};
use crate::pci::{PciAddress, valid_driver_name};
use crate::remedy::Remedy;
use crate::vmm::{BootDevice, BootSpec};

/// A device given back to its driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredDevice {
    /// The device.
    pub device: PciAddress,
    /// The driver it is on now (`None`: it had none).
    pub driver: Option<String>,
    /// Reset and verification (detach only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<super::HealthCheck>,
}

/// What detach did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachReport {
    /// The owner.
    pub owner: Owner,
    /// Devices given back, in order.
    pub restored: Vec<RestoredDevice>,
    /// mdevs removed (only ones this tool created).
    pub removed_mdevs: Vec<String>,
    /// vGPUs released (only ones this tool created).
    #[serde(default)]
    pub released_vgpus: Vec<String>,
}

/// A device kept because a process holds it open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDevice {
    /// The owner in the journal.
    pub owner: Owner,
    /// The device.
    pub device: PciAddress,
    /// Who holds it.
    pub holders: Vec<super::holders::Holder>,
}

/// What reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
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

pub(super) fn new_uuid() -> Result<String, AttachError> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(|source| {
        AttachError::Write {
            path: PathBuf::from("/proc/sys/kernel/random/uuid"),
            value: String::new(),
            source,
            hint: "; a UUID is needed for the mdev".into(),
        }
    })?;
    Ok(text.trim().to_owned())
}

impl Host {
    /// Bind the planned devices to vfio-pci as one journaled transaction, verify them and return
    /// the VM's boot spec. Any failure rolls back to the original drivers.
    pub fn attach(&self, req: &AttachRequest) -> Result<BootSpec, AttachError> {
        if req.plan.devices.is_empty() && req.plan.gpus.unwrap_or(0) == 0 {
            return Err(AttachError::NothingRequested);
        }
        let gpus = load_supported(req.plan.supported_gpus.as_deref())?;
        let mut j = self.journal.lock()?;
        let mut plan_req = req.plan.clone();
        plan_req.owner = Some(req.owner.clone());
        let plan = self.plan_with(&j.state, &plan_req, gpus.as_ref())?;
        if !plan.refusals.is_empty() {
            return Err(AttachError::Refused(plan.refusals));
        }
        let txn = Transaction {
            owner: req.owner.clone(),
            pid: std::process::id(),
            owner_process: req
                .owner
                .pid()
                .and_then(|pid| super::process_identity(&self.proc_root, pid)),
            devices: plan
                .devices
                .iter()
                .map(|p| DeviceRecord {
                    device: p.address,
                    original_driver: if p.adopt { None } else { p.driver.clone() },
                    original_override: self.sysfs.driver_override(p.address),
                    adopted: p.adopt,
                    iommu_group: p.iommu_group,
                    passed: p.passed,
                    persistence_disabled: false,
                    original_d3cold: None,
                    step: Step::Planned,
                })
                .collect(),
            mdevs: Vec::new(),
            vgpus: Vec::new(),
        };
        j.state.transactions.push(txn);
        let t = j.state.transactions.len() - 1;
        j.save()?;
        Failpoint::AfterJournal.hit();
        let result = self.run_binds(&mut j, t).and_then(|mut boot| {
            boot.extend(self.run_mdevs(&mut j, t, &plan.mdevs)?);
            Ok(boot)
        });
        match result {
            Ok(boot) => {
                let txn = j.state.transactions.remove(t);
                let held = txn
                    .devices
                    .iter()
                    .filter(|d| !d.passed)
                    .map(|d| d.device)
                    .collect();
                // Kept after detach: faults its VM reports later map to these devices.
                let (passed, gpus) = (
                    boot.iter().filter_map(|b| b.address).collect(),
                    boot.iter()
                        .filter(|b| b.gpu)
                        .filter_map(|b| b.address)
                        .collect(),
                );
                j.state.remember(&req.owner, passed, gpus);
                commit(&mut j, txn);
                j.save()?;
                Failpoint::AfterCommit.hit();
                Ok(self.boot_spec(
                    &req.owner,
                    boot,
                    held,
                    req.initrd.clone(),
                    req.plan.p2p_clique,
                ))
            }
            Err(cause) => {
                let txn = j.state.transactions[t].clone();
                match self.roll_back(&txn) {
                    Ok(_) => {
                        j.state.transactions.remove(t);
                        j.save()?;
                        Err(cause)
                    }
                    Err(rb) => Err(AttachError::RollbackFailed {
                        cause: cause.to_string(),
                        rollback: rb.to_string(),
                    }),
                }
            }
        }
    }

    fn set_step(
        &self,
        j: &mut LockedJournal,
        t: usize,
        i: usize,
        step: Step,
    ) -> Result<(), AttachError> {
        j.state.transactions[t].devices[i].step = step;
        j.save()?;
        Ok(())
    }

    fn run_binds(&self, j: &mut LockedJournal, t: usize) -> Result<Vec<BootDevice>, AttachError> {
        let count = j.state.transactions[t].devices.len();
        for i in 0..count {
            let rec = j.state.transactions[t].devices[i].clone();
            if rec.adopted {
                self.set_step(j, t, i, Step::Probed)?;
                continue;
            }
            let a = rec.device.to_string();
            if rec.original_driver.as_deref() == Some("nvidia") {
                if !self.kernel.is_simulated() {
                    self.set_step(j, t, i, Step::PersistenceOff)?;
                    if persistence(&a, false) {
                        j.state.transactions[t].devices[i].persistence_disabled = true;
                    }
                }
                // Unbinding a GPU that a process holds blocks in the kernel (with our lock
                // held): refuse instead. nvidia-persistenced counts too once persistence is
                // meant to be off.
                let clients = self.gpu_clients(rec.device, true)?;
                if !clients.is_empty() {
                    return Err(AttachError::DeviceHeld {
                        device: rec.device,
                        holders: clients,
                        fix: "close the programs using the GPU (and turn its persistence mode off), then retry",
                    });
                }
            }
            self.hold_d3cold(j, t, i)?;
            self.set_step(j, t, i, Step::OverrideSet)?;
            self.write(
                &self.sysfs.device_dir(rec.device).join("driver_override"),
                "vfio-pci",
            )?;
            Failpoint::AfterOverride.hit();
            if let Some(d) = &rec.original_driver
                && valid_driver_name(d)
            {
                self.set_step(j, t, i, Step::Unbound)?;
                self.write(&self.sysfs.driver_dir(d).join("unbind"), &a)?;
                Failpoint::AfterUnbind.hit();
            }
            self.set_step(j, t, i, Step::Probed)?;
            self.write(&self.sysfs.drivers_probe(), &a)?;
            Failpoint::AfterProbe.hit();
            let now = self.sysfs.driver(rec.device);
            if now.as_deref() != Some("vfio-pci") {
                return Err(AttachError::NotOnVfio {
                    device: rec.device,
                    driver: now.unwrap_or_else(|| "no driver".into()),
                });
            }
        }
        // Wait for each group's node, then verify every device handed to the VM.
        let mut boot = Vec::new();
        for i in 0..count {
            let rec = j.state.transactions[t].devices[i].clone();
            let Some(group) = rec.iommu_group else {
                continue;
            };
            self.set_step(j, t, i, Step::NodeReady)?;
            let node = self.wait_node(group, Some(rec.device))?;
            Failpoint::AfterNode.hit();
            let dir = self.sysfs.device_dir(rec.device);
            let report = if rec.passed {
                Some(self.verifier.verify(&dir, group)?)
            } else {
                None
            };
            self.set_step(j, t, i, Step::Verified)?;
            if rec.passed {
                let dev = self.sysfs.device(rec.device)?;
                boot.push(BootDevice {
                    address: Some(rec.device),
                    mdev_uuid: None,
                    sysfs_path: dir,
                    iommu_group: Some(group),
                    vfio_device: node,
                    gpu: dev.kind == crate::pci::DeviceKind::Display,
                    vgpu: false,
                    bar64_bytes: dev.bar64_bytes(),
                    vfio: report,
                });
            }
        }
        Failpoint::AfterVerify.hit();
        Ok(boot)
    }

    fn run_mdevs(
        &self,
        j: &mut LockedJournal,
        t: usize,
        mdevs: &[(PciAddress, String)],
    ) -> Result<Vec<BootDevice>, AttachError> {
        let mut boot = Vec::new();
        for (parent, mdev_type) in mdevs {
            let uuid = new_uuid()?;
            j.state.transactions[t].mdevs.push(MdevRecord {
                parent: *parent,
                mdev_type: mdev_type.clone(),
                uuid: uuid.clone(),
                iommu_group: None,
                verified: false,
            });
            let m = j.state.transactions[t].mdevs.len() - 1;
            j.save()?;
            let create = self
                .sysfs
                .device_dir(*parent)
                .join("mdev_supported_types")
                .join(mdev_type)
                .join("create");
            self.write(&create, &uuid)?;
            Failpoint::AfterMdevCreate.hit();
            let dir = self.sysfs.root().join("bus/mdev/devices").join(&uuid);
            let group = std::fs::read_link(dir.join("iommu_group"))
                .ok()
                .and_then(|l| l.file_name()?.to_str()?.parse::<u32>().ok());
            let Some(group) = group else {
                return Err(AttachError::Vfio(super::VfioCheckError::Device {
                    device: dir,
                    detail:
                        "the new mdev has no IOMMU group; is the vendor vfio-mdev driver loaded?"
                            .into(),
                }));
            };
            let node = self.wait_node(group, None)?;
            let report = self.verifier.verify(&dir, group)?;
            let rec = &mut j.state.transactions[t].mdevs[m];
            rec.iommu_group = Some(group);
            rec.verified = true;
            j.save()?;
            boot.push(BootDevice {
                address: None,
                mdev_uuid: Some(uuid),
                sysfs_path: dir,
                iommu_group: Some(group),
                vfio_device: node,
                gpu: true,
                vgpu: true,
                bar64_bytes: 0,
                vfio: Some(report),
            });
        }
        Ok(boot)
    }

    /// The node a VMM opens for `device` in `group`: `/dev/vfio/<group>`, or on a kernel with
    /// iommufd and no legacy group interface, the device's `/dev/vfio/devices/vfioX`.
    fn present_node(&self, group: u32, device: Option<PciAddress>) -> Option<PathBuf> {
        let node = self.dev_dir.join("vfio").join(group.to_string());
        if node.exists() {
            return Some(node);
        }
        device
            .into_iter()
            .flat_map(|d| self.vfio_cdevs(d))
            .find(|c| c.exists())
    }

    pub(super) fn wait_node(
        &self,
        group: u32,
        device: Option<PciAddress>,
    ) -> Result<PathBuf, AttachError> {
        let start = Instant::now();
        loop {
            if let Some(node) = self.present_node(group, device) {
                return Ok(node);
            }
            if start.elapsed() >= self.vfio_wait {
                return Err(AttachError::NoVfioNode {
                    node: self.dev_dir.join("vfio").join(group.to_string()),
                    group,
                    waited: self.vfio_wait,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn boot_spec(
        &self,
        owner: &Owner,
        mut boot: Vec<BootDevice>,
        held: Vec<PciAddress>,
        initrd: Option<PathBuf>,
        p2p_asked: bool,
    ) -> BootSpec {
        boot.sort_by_key(|b| !b.gpu);
        let gpus: Vec<PciAddress> = boot
            .iter()
            .filter(|b| b.gpu)
            .filter_map(|b| b.address)
            .collect();
        let clique = p2p_asked || self.sysfs.share_pcie_switch(&gpus);
        BootSpec::render(owner.as_str(), boot, held, initrd, clique)
    }

    /// Put one device back to its recorded original state, looking at what it is now (so that
    /// it is correct whichever step a crash interrupted, and safe to repeat).
    pub(super) fn restore(&self, rec: &DeviceRecord) -> Result<RestoredDevice, AttachError> {
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
        if rec.persistence_disabled {
            persistence(&a, true);
        }
        self.restore_d3cold(rec);
        Ok(RestoredDevice {
            device: rec.device,
            driver: now,
            health: None,
        })
    }

    fn remove_mdev(&self, m: &MdevRecord) -> Result<bool, AttachError> {
        let dir = self.sysfs.root().join("bus/mdev/devices").join(&m.uuid);
        if !dir.exists() {
            return Ok(false);
        }
        self.write(&dir.join("remove"), "1")?;
        Ok(true)
    }

    /// Roll a transaction back in reverse order; mdevs first (they were created last).
    fn roll_back(&self, txn: &Transaction) -> Result<Vec<RestoredDevice>, AttachError> {
        self.guard_release(&txn.devices)?;
        self.release_vgpus(&txn.vgpus)?;
        for m in txn.mdevs.iter().rev() {
            if valid_mdev_uuid(&m.uuid) {
                self.remove_mdev(m)?;
            }
        }
        let mut out = Vec::new();
        for rec in txn.devices.iter().rev() {
            out.push(self.restore(rec)?);
        }
        Ok(out)
    }

    /// Give every device of `owner` back to its original driver (or none, if it had none) and
    /// remove the mdevs created for it. Safe to repeat after a crash.
    pub fn detach(&self, owner: &Owner) -> Result<DetachReport, AttachError> {
        let mut j = self.journal.lock()?;
        let Some(i) = j.state.attachments.iter().position(|a| &a.owner == owner) else {
            return Err(AttachError::NotAttached(owner.clone()));
        };
        let report = self.release(&mut j, i)?;
        Ok(report)
    }

    fn release(&self, j: &mut LockedJournal, i: usize) -> Result<DetachReport, AttachError> {
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
                report.released_vgpus.push(super::vgpu::vgpu_label(v));
            }
            j.state.attachments[i].vgpus.retain(|x| x != v);
            j.save()?;
            Failpoint::VgpuMidRelease.hit();
        }
        for m in att.mdevs.iter().rev() {
            if valid_mdev_uuid(&m.uuid) && self.remove_mdev(m)? {
                report.removed_mdevs.push(m.uuid.clone());
            }
            j.state.attachments[i].mdevs.retain(|x| x.uuid != m.uuid);
            j.save()?;
        }
        for rec in att.devices.iter().rev() {
            report.restored.push(self.release_device(rec, &att.owner)?);
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

    /// Finish or roll back every transaction a crash left in the journal, then release the
    /// attachments whose owner is [`Liveness::Gone`]. Never releases an owner that is alive
    /// or unknown.
    pub fn reconcile(&self) -> Result<ReconcileReport, AttachError> {
        let mut j = self.journal.lock()?;
        let mut report = ReconcileReport::default();
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
                commit(&mut j, txn);
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
                        report
                            .errors
                            .push(format!("rolling back for {}: {e}", txn.owner));
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
                    Err(e) => report.errors.push(format!("releasing {owner}: {e}")),
                },
                Liveness::Alive => report.kept_alive.push(owner),
                Liveness::Unknown => report.kept_unknown.push(owner),
            }
            i += 1;
        }
        j.save()?;
        Ok(report)
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
        let mdevs_ok = txn.mdevs.iter().all(|m| {
            m.verified
                && self
                    .sysfs
                    .root()
                    .join("bus/mdev/devices")
                    .join(&m.uuid)
                    .exists()
        });
        let vgpus_ok = txn
            .vgpus
            .iter()
            .all(|v| v.step == super::journal::VgpuStep::Verified && self.vgpu_present(v));
        (!txn.devices.is_empty() || !txn.mdevs.is_empty() || !txn.vgpus.is_empty())
            && devices_ok
            && mdevs_ok
            && vgpus_ok
    }
}

fn valid_mdev_uuid(u: &str) -> bool {
    u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Move a finished transaction into its owner's attachment.
pub(super) fn commit(j: &mut LockedJournal, txn: Transaction) {
    let Transaction {
        owner,
        owner_process,
        devices,
        mdevs,
        vgpus,
        ..
    } = txn;
    if let Some(a) = j.state.attachments.iter_mut().find(|a| a.owner == owner) {
        a.devices.extend(devices);
        a.mdevs.extend(mdevs);
        a.vgpus.extend(vgpus);
    } else {
        j.state.attachments.push(Attachment {
            owner,
            owner_process,
            devices,
            mdevs,
            vgpus,
        });
    }
}

/// Turn an NVIDIA GPU's persistence mode off (or back on) with `nvidia-smi -i ADDR -pm 0|1`,
/// affecting only that GPU; nvidia-persistenced itself is never stopped. Returns whether
/// nvidia-smi succeeded (absent nvidia-smi: false, the unbind then tells if the GPU is held).
fn persistence(address: &str, on: bool) -> bool {
    let Some(smi) = super::guard::find_nvidia_smi(super::guard::NVIDIA_SMI_PATHS) else {
        return false;
    };
    let status = Command::new(smi)
        .args(["-i", address, "-pm", if on { "1" } else { "0" }])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            tracing::warn!("nvidia-smi -i {address} -pm: exit {s}");
            false
        }
        Err(_) => false,
    }
}
