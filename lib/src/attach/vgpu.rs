//! vGPUs as journaled transactions, on both frameworks: create, read back, verify, release.
//!
//! Create (under the journal lock): place the instances ([`crate::vgpu::place`], skipping
//! quarantined parents), pick a free VF per vendor-VFIO instance, **record the transaction
//! first**, then per instance write the type ID to the VF's `nvidia/current_vgpu_type` (or a
//! UUID to the mdev type's `create`), read it back (a mismatch rolls everything back: `0` written,
//! mdevs removed), wait for the VFIO node and check it, commit. A crash anywhere is repaired by
//! reconcile: unverified vGPUs are released, fully verified transactions are committed.
//!
//! Release (detach, reconcile of a gone owner) touches only vGPUs recorded as this tool's, and
//! refuses, naming the process, while anyone holds the vGPU's VFIO node open (a running VMM):
//! releasing a vGPU under a VM wedges it. A vendor-VFIO VF is never unbound or rebound (that
//! breaks the driver's VFIO registration); releasing it is writing `0`.

use std::fs;
use std::path::{Path, PathBuf};

use super::holders::{self, Holder};
use super::journal::{JournalError, LockedJournal, Transaction, VgpuRecord, VgpuStep};
use super::liveness::process_identity;
use super::{Aftermath, AttachError, Host};
use crate::failpoint::Failpoint;
use crate::owner::Owner;
use crate::pci::PciAddress;
use crate::vgpu::{self, Catalogue, Framework, ModelTotals, PlaceRequest, Placement};
use crate::vmm::{BootDevice, BootSpec};

/// In the state dir: each vendor-VFIO GPU model's total framebuffer, as learned.
const MODEL_TOTALS: &str = "vgpu-framebuffer.json";

/// vGPUs to create for an owner.
#[derive(Debug, Clone)]
pub struct VgpuAttachRequest {
    /// The profile, how many, and placement preferences.
    pub place: PlaceRequest,
    /// Who holds them.
    pub owner: Owner,
    /// The initrd the VM boots, put in the boot spec.
    pub initrd: Option<PathBuf>,
}

/// A fresh UUID for an mdev, from the kernel.
fn new_uuid() -> Result<String, AttachError> {
    let path = PathBuf::from("/proc/sys/kernel/random/uuid");
    let text = fs::read_to_string(&path).map_err(|source| AttachError::Uuid { path, source })?;
    Ok(text.trim().to_owned())
}

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

impl Host {
    /// Every vGPU profile this host can create now, quarantined parents left out.
    pub fn vgpu_catalogue(&self) -> Catalogue {
        self.vgpu_catalogue_learning().0
    }

    fn totals_path(&self) -> PathBuf {
        self.journal.dir().join(MODEL_TOTALS)
    }

    /// The catalogue, and the GPU models' framebuffer totals known after reading it.
    fn vgpu_catalogue_learning(&self) -> (Catalogue, ModelTotals) {
        let mut totals: ModelTotals = fs::read(self.totals_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let cat = vgpu::catalogue_with(&self.sysfs, self.quarantine.as_ref(), &mut totals);
        (cat, totals)
    }

    /// Where `req`'s vGPUs would go; changes nothing.
    pub fn plan_vgpu(&self, req: &PlaceRequest) -> Result<Placement, AttachError> {
        Ok(vgpu::place(&self.vgpu_catalogue(), req)?)
    }

    fn vf_type_path(&self, vf: PciAddress) -> PathBuf {
        self.sysfs.device_dir(vf).join("nvidia/current_vgpu_type")
    }

    fn mdev_dir(&self, uuid: &str) -> PathBuf {
        self.sysfs.root().join("bus/mdev/devices").join(uuid)
    }

    /// One record per placed instance: a free VF of the parent listing the type (vendor
    /// VFIO), or a fresh UUID (mdev).
    fn vgpu_records(
        &self,
        j: &LockedJournal,
        placement: &Placement,
    ) -> Result<Vec<VgpuRecord>, AttachError> {
        let mut out: Vec<VgpuRecord> = Vec::new();
        for parent in &placement.parents {
            let (vf, uuid) = match placement.framework {
                Framework::VendorVfio => {
                    let vf = vgpu::virtual_functions(&self.sysfs, *parent)
                        .into_iter()
                        .find(|vf| {
                            let dir = self.sysfs.device_dir(*vf).join("nvidia");
                            read_trim(&dir.join("current_vgpu_type")).as_deref() == Some("0")
                                && j.state.owner_of(*vf).is_none()
                                && !out.iter().any(|r| r.vf == Some(*vf))
                                // Its own tenants' faults take a VF (not its GPU) out.
                                && !self.quarantine.is_quarantined(*vf)
                                && fs::read_to_string(dir.join("creatable_vgpu_types")).is_ok_and(
                                    |t| {
                                        vgpu::parse_creatable_types(&t)
                                            .iter()
                                            .any(|(id, _)| *id == placement.type_id)
                                    },
                                )
                        });
                    let Some(vf) = vf else {
                        return Err(AttachError::Vgpu(vgpu::VgpuError::NotEnough {
                            profile: placement.profile.clone(),
                            wanted: placement.parents.len() as u32,
                            available: out.len() as u32,
                        }));
                    };
                    (Some(vf), None)
                }
                Framework::Mdev => (None, Some(new_uuid()?)),
            };
            out.push(VgpuRecord {
                framework: placement.framework,
                parent: *parent,
                profile: placement.profile.clone(),
                type_id: placement.type_id.clone(),
                iommu_group: vf.and_then(|v| self.sysfs.iommu_group(v)),
                vf,
                uuid,
                step: VgpuStep::Planned,
            });
        }
        Ok(out)
    }

    /// The record of an mdev of `mdev_type` to create on `parent` (`attach --mdev-type`): a vGPU
    /// of the mdev framework, named by the type's human name when the driver gives one.
    pub(super) fn mdev_record(
        &self,
        parent: PciAddress,
        mdev_type: &str,
    ) -> Result<VgpuRecord, AttachError> {
        let profile = self
            .sysfs
            .device(parent)
            .ok()
            .and_then(|d| d.mdev_types.into_iter().find(|m| m.id == mdev_type))
            .and_then(|m| m.name)
            .unwrap_or_else(|| mdev_type.to_owned());
        Ok(VgpuRecord {
            framework: Framework::Mdev,
            parent,
            profile,
            type_id: mdev_type.to_owned(),
            vf: None,
            uuid: Some(new_uuid()?),
            iommu_group: None,
            step: VgpuStep::Planned,
        })
    }

    /// Create `req`'s vGPUs as one journaled transaction and return the VM's boot spec. Any
    /// failure releases what was created; nothing is left behind.
    pub fn attach_vgpu(&self, req: &VgpuAttachRequest) -> Result<BootSpec, AttachError> {
        self.sees_host_processes()?;
        let mut j = self.journal.lock()?;
        self.end_earlier_boots(&mut j)?;
        let (cat, totals) = self.vgpu_catalogue_learning();
        let placement = vgpu::place(&cat, &req.place)?;
        // Kept before the tables shrink: the next catalogue still knows each GPU's total.
        let path = self.totals_path();
        let bytes = serde_json::to_vec(&totals).unwrap_or_default();
        crate::fsutil::write_private(&path, &bytes).map_err(|source| JournalError::Io {
            action: "write",
            path,
            source,
        })?;
        let vgpus = self.vgpu_records(&j, &placement)?;
        j.state.transactions.push(Transaction {
            owner: req.owner.clone(),
            pid: std::process::id(),
            owner_process: req
                .owner
                .pid()
                .and_then(|pid| process_identity(&self.proc_root, pid)),
            devices: Vec::new(),
            vgpus,
            boot_id: self.boot_id(),
            fabric_partition: None,
        });
        let t = j.state.transactions.len() - 1;
        j.save()?;
        Failpoint::VgpuAfterJournal.hit();
        match self.create_vgpus(&mut j, t) {
            Ok(boot) => {
                let txn = j.state.transactions.remove(t);
                // Faults its VM reports later are its vGPUs', never the shared parents'.
                let spec = BootSpec::new(req.owner.as_str(), boot, Vec::new(), req.initrd.clone());
                j.state.remember(&req.owner, Vec::new(), Vec::new());
                j.state.remember_vgpus(&req.owner, &txn.vgpus);
                j.state.remember_guest(&req.owner, spec.guest_map());
                j.state.commit(txn);
                j.save()?;
                Failpoint::VgpuAfterCommit.hit();
                Ok(spec)
            }
            Err(cause) => {
                let txn = j.state.transactions[t].clone();
                match self.release_vgpus(&txn.vgpus) {
                    Ok(()) => {
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

    /// Create the transaction's vGPUs and mdevs, each read back and verified through VFIO.
    pub(super) fn create_vgpus(
        &self,
        j: &mut LockedJournal,
        t: usize,
    ) -> Result<Vec<BootDevice>, AttachError> {
        let mut boot = Vec::new();
        for i in 0..j.state.transactions[t].vgpus.len() {
            j.state.transactions[t].vgpus[i].step = VgpuStep::Creating;
            j.save()?;
            let rec = j.state.transactions[t].vgpus[i].clone();
            let (dir, address, group) = match (rec.vf, &rec.uuid) {
                (Some(vf), _) => {
                    let path = self.vf_type_path(vf);
                    self.write(&path, &rec.type_id)?;
                    Failpoint::VgpuAfterCreate.hit();
                    let read = read_trim(&path).unwrap_or_default();
                    if read != rec.type_id {
                        return Err(AttachError::VgpuMismatch {
                            path,
                            wrote: rec.type_id.clone(),
                            read,
                            aftermath: Aftermath::KeptInJournal,
                        });
                    }
                    (
                        self.sysfs.device_dir(vf),
                        Some(vf),
                        self.sysfs.iommu_group(vf),
                    )
                }
                (None, Some(uuid)) => {
                    let create = self
                        .sysfs
                        .device_dir(rec.parent)
                        .join("mdev_supported_types")
                        .join(&rec.type_id)
                        .join("create");
                    self.write(&create, uuid)?;
                    Failpoint::VgpuAfterCreate.hit();
                    Failpoint::AfterMdevCreate.hit();
                    let dir = self.mdev_dir(uuid);
                    let made = fs::read_link(dir.join("mdev_type"))
                        .ok()
                        .and_then(|l| Some(l.file_name()?.to_str()?.to_owned()))
                        .unwrap_or_default();
                    if made != rec.type_id {
                        return Err(AttachError::VgpuMismatch {
                            path: dir.join("mdev_type"),
                            wrote: rec.type_id.clone(),
                            read: made,
                            aftermath: Aftermath::KeptInJournal,
                        });
                    }
                    let group = fs::read_link(dir.join("iommu_group"))
                        .ok()
                        .and_then(|l| l.file_name()?.to_str()?.parse().ok());
                    (dir, None, group)
                }
                (None, None) => continue,
            };
            let Some(group) = group else {
                return Err(AttachError::vfio(crate::vfio::VfioCheckError::Device {
                    device: dir,
                    detail: "the vGPU has no IOMMU group; is the NVIDIA vGPU manager loaded?"
                        .into(),
                }));
            };
            // The VF's or mdev's own cdev where the kernel has no group nodes (iommufd only).
            let node = self.wait_node(group, &dir)?;
            let report = self
                .verifier
                .verify(&dir, group)
                .map_err(AttachError::vfio)?;
            {
                let r = &mut j.state.transactions[t].vgpus[i];
                r.iommu_group = Some(group);
                r.step = VgpuStep::Verified;
            }
            j.save()?;
            boot.push(BootDevice {
                address,
                mdev_uuid: rec.uuid.clone(),
                sysfs_path: dir,
                iommu_group: Some(group),
                vfio_device: node,
                gpu: true,
                vgpu: true,
                bar64_bytes: address
                    .and_then(|a| self.sysfs.device(a).ok())
                    .map_or(0, |d| d.bar64_bytes()),
                vfio: Some(report),
                numa_node: None,
                host_switch: None,
                nic: false,
            });
        }
        Failpoint::VgpuAfterVerify.hit();
        Ok(boot)
    }

    /// Whether a vGPU exists as recorded (the type is on its VF, the mdev is present).
    pub(super) fn vgpu_present(&self, v: &VgpuRecord) -> bool {
        match (v.vf, &v.uuid) {
            (Some(vf), _) => {
                read_trim(&self.vf_type_path(vf)).as_deref() == Some(v.type_id.as_str())
            }
            (None, Some(uuid)) => self.mdev_dir(uuid).exists(),
            (None, None) => false,
        }
    }

    /// Release one vGPU this tool recorded; `false` when there was nothing (left) to release.
    /// A VF holding another type than ours is not ours to release.
    pub(super) fn release_vgpu(&self, v: &VgpuRecord) -> Result<bool, AttachError> {
        if !self.vgpu_present(v) {
            return Ok(false);
        }
        let (path, value, gone): (PathBuf, &str, Box<dyn Fn() -> bool>) = match (v.vf, &v.uuid) {
            (Some(vf), _) => {
                let path = self.vf_type_path(vf);
                let p = path.clone();
                (
                    path,
                    "0",
                    Box::new(move || read_trim(&p).as_deref() == Some("0")),
                )
            }
            (None, Some(uuid)) if valid_uuid(uuid) => {
                let dir = self.mdev_dir(uuid);
                let d = dir.clone();
                (dir.join("remove"), "1", Box::new(move || !d.exists()))
            }
            _ => return Ok(false),
        };
        self.write(&path, value)?;
        if !gone() {
            return Err(AttachError::VgpuMismatch {
                path,
                wrote: value.into(),
                read: "the vGPU still there".into(),
                aftermath: Aftermath::KeptInJournal,
            });
        }
        Ok(true)
    }

    /// Release `vgpus` newest first (rollback: no VMM has them yet).
    pub(super) fn release_vgpus(&self, vgpus: &[VgpuRecord]) -> Result<(), AttachError> {
        for v in vgpus.iter().rev() {
            self.release_vgpu(v)?;
        }
        Ok(())
    }

    /// The VFIO nodes a VMM using the vGPU holds open: the group node and, with iommufd, the
    /// device's `vfio/devices/vfioX`.
    fn vgpu_nodes(&self, v: &VgpuRecord) -> Vec<PathBuf> {
        let mut nodes = Vec::new();
        if let Some(g) = v.iommu_group {
            nodes.push(self.dev_dir.join("vfio").join(g.to_string()));
        }
        let dir = match (v.vf, &v.uuid) {
            (Some(vf), _) => self.sysfs.device_dir(vf),
            (None, Some(uuid)) => self.mdev_dir(uuid),
            _ => return nodes,
        };
        for e in fs::read_dir(dir.join("vfio-dev"))
            .into_iter()
            .flatten()
            .flatten()
        {
            nodes.push(self.dev_dir.join("vfio/devices").join(e.file_name()));
        }
        nodes
    }

    /// Refuse to release `owner`'s vGPUs while a process holds one open (or when `/proc`
    /// cannot be read: then nobody can tell).
    pub(super) fn check_vgpu_holders(
        &self,
        owner: &Owner,
        vgpus: &[VgpuRecord],
    ) -> Result<(), AttachError> {
        if vgpus.is_empty() {
            return Ok(());
        }
        if !holders::scan_readable(&self.proc_root) {
            return Err(AttachError::HoldersUnknown {
                proc_root: self.proc_root.clone(),
            });
        }
        let nodes: Vec<PathBuf> = vgpus.iter().flat_map(|v| self.vgpu_nodes(v)).collect();
        let found: Vec<Holder> = holders::holders(&self.proc_root, &nodes);
        if found.is_empty() {
            Ok(())
        } else {
            Err(AttachError::VgpuHeld {
                owner: owner.clone(),
                holders: found,
            })
        }
    }
}

fn valid_uuid(u: &str) -> bool {
    u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}
