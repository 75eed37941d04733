//! The bind transaction: record, then move each planned device to its VFIO driver (vfio-pci or
//! the variant `vfio_driver.rs` chose and loaded), wait for its VFIO node, verify it, create the
//! plan's mdevs, commit; any failure rolls everything back.

use super::journal::{DeviceRecord, LockedJournal, PartitionRecord, Step, Transaction};
use super::liveness::process_identity;
use super::persistence::persistence;
use super::{Aftermath, AttachError, AttachRequest, Host, load_supported};
use crate::fabric::Partitions;
use crate::failpoint::Failpoint;
use crate::pci::{PciAddress, valid_driver_name};
use crate::vmm::{BootDevice, BootSpec};

impl Host {
    /// Bind the planned devices to their VFIO drivers as one journaled transaction, verify them and return
    /// the VM's boot spec. Any failure rolls back to the original drivers.
    pub fn attach(&self, req: &AttachRequest) -> Result<BootSpec, AttachError> {
        if req.plan.devices.is_empty()
            && req.plan.gpus.unwrap_or(0) == 0
            && req.plan.fabric.baseboard.is_none()
        {
            return Err(AttachError::NothingRequested);
        }
        self.sees_host_processes()?;
        let gpus = load_supported(req.plan.supported_gpus.as_deref())?;
        let mut j = self.journal.lock()?;
        self.end_earlier_boots(&mut j)?;
        let mut plan_req = req.plan.clone();
        plan_req.owner = Some(req.owner.clone());
        let plan = self.plan_with(&j.state, &plan_req, gpus.as_ref(), &Partitions::new())?;
        if !plan.refusals.is_empty() {
            return Err(AttachError::Refused(plan.refusals));
        }
        // Every variant driver loaded and named before the journal records anything: one
        // that cannot be used is refused with nothing moved.
        let drivers = plan
            .devices
            .iter()
            .map(|p| self.load_vfio(p))
            .collect::<Result<Vec<_>, _>>()?;
        let txn = Transaction {
            owner: req.owner.clone(),
            pid: std::process::id(),
            owner_process: req
                .owner
                .pid()
                .and_then(|pid| process_identity(&self.proc_root, pid)),
            boot_id: self.boot_id(),
            devices: plan
                .devices
                .iter()
                .zip(drivers)
                .map(|(p, vfio_driver)| DeviceRecord {
                    device: p.address,
                    original_driver: if p.adopt { None } else { p.driver.clone() },
                    original_override: self.sysfs.driver_override(p.address),
                    adopted: p.adopt,
                    iommu_group: p.iommu_group,
                    passed: p.passed,
                    persistence_disabled: false,
                    original_d3cold: None,
                    vfio_driver,
                    step: Step::Planned,
                    baseline: p.passed.then(|| self.host_baseline(p.address)),
                })
                .collect(),
            vgpus: plan
                .mdevs
                .iter()
                .map(|(parent, mdev_type)| self.mdev_record(*parent, mdev_type))
                .collect::<Result<_, _>>()?,
            fabric_partition: plan.partition.as_ref().map(|p| PartitionRecord {
                id: p.id,
                gpus: p.gpus.clone(),
                activated: false,
            }),
        };
        j.state.transactions.push(txn);
        let t = j.state.transactions.len() - 1;
        j.save()?;
        Failpoint::AfterJournal.hit();
        // The partition before the first bind: its GPUs must be free of the host's driver.
        let result = self
            .activate_partition(&mut j, t)
            .and_then(|()| self.run_binds(&mut j, t))
            .and_then(|mut boot| {
                boot.extend(self.create_vgpus(&mut j, t)?);
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
                // vGPUs (`--mdev-type`) are remembered as such: their faults are theirs.
                let whole = || boot.iter().filter(|b| !b.vgpu);
                let (passed, gpus) = (
                    whole().filter_map(|b| b.address).collect(),
                    whole()
                        .filter(|b| b.gpu)
                        .filter_map(|b| b.address)
                        .collect(),
                );
                let spec = self
                    .boot_spec(
                        &req.owner,
                        boot,
                        held,
                        req.initrd.clone(),
                        req.plan.p2p_clique,
                    )
                    .with_mmio(plan.mmio)
                    .with_grace_gpus(&self.grace_gpus(&plan))
                    .with_nvlink_disabled(self.nvlink_unusable(&plan)?);
                j.state.remember(&req.owner, passed, gpus);
                j.state.remember_vgpus(&req.owner, &txn.vgpus);
                j.state.remember_guest(&req.owner, spec.guest_map());
                j.state.commit(txn);
                j.save()?;
                Failpoint::AfterCommit.hit();
                Ok(spec)
            }
            Err(cause) => {
                let txn = j.state.transactions[t].clone();
                match self.roll_back(&txn) {
                    Ok(_) => {
                        j.state.transactions.remove(t);
                        j.save()?;
                        Err(cause.rolled_back())
                    }
                    Err(rollback) => Err(AttachError::RollbackFailed {
                        cause: Box::new(cause),
                        rollback: Box::new(rollback),
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
                if let Some(smi) = &self.nvidia_smi {
                    self.set_step(j, t, i, Step::PersistenceOff)?;
                    if persistence(smi, rec.device, false, self.command_timeout)? {
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
                &rec.vfio_driver,
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
            if now.as_ref() != Some(&rec.vfio_driver) {
                return Err(AttachError::NotOnVfio {
                    device: rec.device,
                    wanted: rec.vfio_driver.clone(),
                    driver: now.unwrap_or_else(|| "no driver".into()),
                    aftermath: Aftermath::KeptInJournal,
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
            let dir = self.sysfs.device_dir(rec.device);
            let node = self.wait_node(group, &dir)?;
            Failpoint::AfterNode.hit();
            let report = if rec.passed {
                Some(
                    self.verifier
                        .verify(&dir, group)
                        .map_err(AttachError::vfio)?,
                )
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
                    numa_node: dev.numa_node,
                    host_switch: self.sysfs.upstream_switch_address(rec.device),
                    nic: dev.kind == crate::pci::DeviceKind::Network,
                });
            }
        }
        Failpoint::AfterVerify.hit();
        Ok(boot)
    }
    /// The passed Grace GPUs of `plan`.
    fn grace_gpus(&self, plan: &super::Plan) -> Vec<PciAddress> {
        plan.devices
            .iter()
            .filter(|p| p.passed)
            .filter(|p| self.sysfs.device(p.address).is_ok_and(|d| d.is_grace_gpu()))
            .map(|p| p.address)
            .collect()
    }
}
