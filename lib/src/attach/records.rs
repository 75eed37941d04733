//! What the journal records: a transaction's devices and vGPUs with the step each reached, the
//! attachments that hold devices, their history, and the host changes to undo after a crash
//! (a narrowed `reset_method`, an SR-IOV cycle). The on-disk forms of earlier formats are read
//! into these.

use serde::{Deserialize, Serialize};

use super::liveness::ProcessIdentity;
use crate::health::{GuestDevice, HeldDevices, HeldVgpu};
use crate::owner::Owner;
use crate::pci::PciAddress;

/// How far a device's transaction got (the last step begun).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Recorded; nothing written yet.
    Planned,
    /// Persistence mode being turned off for this GPU.
    PersistenceOff,
    /// `driver_override` being set to the device's VFIO driver (vfio-pci or a variant).
    OverrideSet,
    /// Unbinding from the original driver.
    Unbound,
    /// `drivers_probe` being written.
    Probed,
    /// Waiting for `/dev/vfio/<group>`.
    NodeReady,
    /// Verified through VFIO: past the point of no return.
    Verified,
}

/// One device in a transaction or attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device.
    pub device: PciAddress,
    /// Driver bound before we touched it (`None`: none, or adopted from vfio-pci).
    pub original_driver: Option<String>,
    /// `driver_override` before we touched it.
    pub original_override: Option<String>,
    /// It was already on vfio-pci with no owner: adopted, it had no other driver.
    pub adopted: bool,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// Handed to the VM (requested or companion); otherwise only held for group viability.
    pub passed: bool,
    /// We turned persistence mode off with nvidia-smi and turn it back on at restore.
    #[serde(default)]
    pub persistence_disabled: bool,
    /// `d3cold_allowed` before we set it to 0 (kept out of D3cold while attached).
    #[serde(default)]
    pub original_d3cold: Option<String>,
    /// The VFIO driver it was bound to (its registered name: `vfio-pci`, or a variant such
    /// as `nvgrace-gpu-vfio-pci`); detach, rollback and reconcile know it is ours by this
    /// name. Journals of earlier releases read as vfio-pci.
    #[serde(default = "vfio_pci")]
    pub vfio_driver: String,
    /// The last step begun.
    pub step: Step,
    /// What the host read of the device at attach (a device handed to the VM), compared by
    /// the check at detach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<HostBaseline>,
}

fn vfio_pci() -> String {
    crate::pci::variant::VFIO_PCI.into()
}

/// A device's AER error counters and link width, read by the host at attach: the check at
/// detach fails when the counters moved or the link came back narrower.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBaseline {
    /// `TOTAL_ERR_FATAL` of `aer_dev_fatal`.
    pub aer_fatal: Option<u64>,
    /// `TOTAL_ERR_NONFATAL` of `aer_dev_nonfatal`.
    pub aer_nonfatal: Option<u64>,
    /// `current_link_width`.
    pub link_width: Option<u32>,
}

/// An mdev as releases before mdevs became [`VgpuRecord`]s recorded it (`attach --mdev-type`,
/// the `mdevs` list): read from such a journal and turned into a vGPU record of the mdev
/// framework at once, never written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct LegacyMdevRecord {
    parent: PciAddress,
    mdev_type: String,
    uuid: String,
    iommu_group: Option<u32>,
    /// Verified: past the point of no return.
    verified: bool,
}

impl From<LegacyMdevRecord> for VgpuRecord {
    fn from(m: LegacyMdevRecord) -> VgpuRecord {
        VgpuRecord {
            framework: crate::vgpu::Framework::Mdev,
            parent: m.parent,
            profile: m.mdev_type.clone(),
            type_id: m.mdev_type,
            vf: None,
            uuid: Some(m.uuid),
            iommu_group: m.iommu_group,
            // Unverified: the create may or may not have happened; release looks.
            step: if m.verified {
                VgpuStep::Verified
            } else {
                VgpuStep::Creating
            },
        }
    }
}

/// How far the creation of a vGPU got (the last step begun).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VgpuStep {
    /// Recorded; nothing written yet.
    Planned,
    /// The type (vendor VFIO) or UUID (mdev) is being written.
    Creating,
    /// Read back and verified through VFIO: past the point of no return.
    Verified,
}

/// A vGPU this tool created (or is creating) for an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgpuRecord {
    /// The framework it is created through.
    pub framework: crate::vgpu::Framework,
    /// The parent GPU (the PF, or the mdev parent).
    pub parent: PciAddress,
    /// The profile's name.
    pub profile: String,
    /// The type ID written (vendor VFIO) or the mdev type.
    pub type_id: String,
    /// The VF given the type (vendor VFIO).
    pub vf: Option<PciAddress>,
    /// The mdev's UUID (mdev).
    pub uuid: Option<String>,
    /// IOMMU group of the VF or mdev.
    pub iommu_group: Option<u32>,
    /// The last step begun.
    pub step: VgpuStep,
}

impl VgpuRecord {
    /// A name for people: `NVIDIA L40S-4Q on 0000:61:00.4` or `... mdev UUID on PARENT`.
    pub fn label(&self) -> String {
        match (&self.vf, &self.uuid) {
            (Some(vf), _) => format!("{} on {vf}", self.profile),
            (None, Some(u)) => format!("{} mdev {u} on {}", self.profile, self.parent),
            _ => self.profile.clone(),
        }
    }
}

/// A fabric partition activated for a transaction (shared-NVSwitch mode), recorded before it
/// is activated, so a crash at any point leaves it found and deactivated by reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// The fabric manager's partition ID.
    pub id: u32,
    /// Its GPUs.
    pub gpus: Vec<PciAddress>,
    /// The fabric manager said it activated it (until then: activation begun, maybe done).
    pub activated: bool,
}

/// A transaction in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "TransactionOnDisk")]
pub struct Transaction {
    /// Who the devices are for.
    pub owner: Owner,
    /// Process that ran it.
    pub pid: u32,
    /// For a `pid:N` owner: which process that was at attach (absent in older journals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_process: Option<ProcessIdentity>,
    /// Devices, in the order they are moved.
    pub devices: Vec<DeviceRecord>,
    /// vGPUs and mdevs (`attach --vgpu`, `attach --mdev-type`), in the order they are created.
    pub vgpus: Vec<VgpuRecord>,
    /// The boot it ran in (`/proc/sys/kernel/random/boot_id`); `None` when unknown (version 1
    /// journals). After a reboot nothing it did is still in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The fabric partition it activates before its first bind (shared-NVSwitch mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_partition: Option<PartitionRecord>,
}

/// A [`Transaction`] as any release wrote it.
#[derive(Deserialize)]
struct TransactionOnDisk {
    owner: Owner,
    pid: u32,
    #[serde(default)]
    owner_process: Option<ProcessIdentity>,
    #[serde(default)]
    boot_id: Option<String>,
    devices: Vec<DeviceRecord>,
    #[serde(default)]
    mdevs: Vec<LegacyMdevRecord>,
    #[serde(default)]
    vgpus: Vec<VgpuRecord>,
    #[serde(default)]
    fabric_partition: Option<PartitionRecord>,
}

impl From<TransactionOnDisk> for Transaction {
    fn from(t: TransactionOnDisk) -> Transaction {
        Transaction {
            fabric_partition: t.fabric_partition,
            owner: t.owner,
            pid: t.pid,
            owner_process: t.owner_process,
            boot_id: t.boot_id,
            devices: t.devices,
            vgpus: t
                .mdevs
                .into_iter()
                .map(VgpuRecord::from)
                .chain(t.vgpus)
                .collect(),
        }
    }
}

/// Devices (and vGPUs) held for an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AttachmentOnDisk")]
pub struct Attachment {
    /// The owner.
    pub owner: Owner,
    /// For a `pid:N` owner: which process that was at attach (absent in older journals, which
    /// then never count as gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_process: Option<ProcessIdentity>,
    /// Devices bound to vfio-pci for it.
    pub devices: Vec<DeviceRecord>,
    /// vGPUs and mdevs created for it.
    pub vgpus: Vec<VgpuRecord>,
    /// The boot it was made in (`/proc/sys/kernel/random/boot_id`); `None` when unknown
    /// (version 1 journals). `reconcile` ends the attachments of an earlier boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Fabric partitions active for it (shared-NVSwitch mode): deactivated once its devices
    /// are back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fabric_partitions: Vec<PartitionRecord>,
}

/// An [`Attachment`] as any release wrote it.
#[derive(Deserialize)]
struct AttachmentOnDisk {
    owner: Owner,
    #[serde(default)]
    owner_process: Option<ProcessIdentity>,
    #[serde(default)]
    boot_id: Option<String>,
    devices: Vec<DeviceRecord>,
    #[serde(default)]
    mdevs: Vec<LegacyMdevRecord>,
    #[serde(default)]
    vgpus: Vec<VgpuRecord>,
    #[serde(default)]
    fabric_partitions: Vec<PartitionRecord>,
}

impl From<AttachmentOnDisk> for Attachment {
    fn from(a: AttachmentOnDisk) -> Attachment {
        Attachment {
            fabric_partitions: a.fabric_partitions,
            owner: a.owner,
            owner_process: a.owner_process,
            boot_id: a.boot_id,
            devices: a.devices,
            vgpus: a
                .mdevs
                .into_iter()
                .map(VgpuRecord::from)
                .chain(a.vgpus)
                .collect(),
        }
    }
}

/// A PF whose VFs are being removed and re-created (`sriov_numvfs` to 0 and back) to recover
/// a wedged vGPU, and how many VFs it had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovCycle {
    /// The PF.
    pub pf: PciAddress,
    /// `sriov_numvfs` before the cycle.
    pub numvfs: u32,
}

/// A device's `reset_method` narrowed (a bus reset left out while a sibling is in use) for
/// the length of one reset, and its value before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRestriction {
    /// The device.
    pub device: PciAddress,
    /// `reset_method` before it was narrowed.
    pub original: String,
}

impl HistoryEntry {
    /// What the owner's VM had, for [`crate::health::ingest`].
    pub fn held(&self) -> HeldDevices {
        HeldDevices {
            owner: self.owner.clone(),
            devices: self.devices.clone(),
            gpus: self.gpus.clone(),
            vgpus: self.vgpus.clone(),
            guest: self.guest.clone(),
            since: Some(self.since),
            until: self.until,
        }
    }
}

/// How many [`HistoryEntry`]s the journal keeps.
pub const HISTORY_KEEP: usize = 1024;

/// One owner's hold on devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The owner.
    pub owner: Owner,
    /// Devices handed to its VM.
    pub devices: Vec<PciAddress>,
    /// Which of them are GPUs (display controllers).
    pub gpus: Vec<PciAddress>,
    /// Unix time of the attach.
    pub since: u64,
    /// Unix time of the detach, once detached.
    pub until: Option<u64>,
    /// vGPUs handed to its VM (their faults are charged to them, not to the parent GPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vgpus: Vec<HeldVgpu>,
    /// Where its VM sees each device: the guest→host map of the boot spec attach returned
    /// (empty in older journals and for holds `reconcile` finished, which return no spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest: Vec<GuestDevice>,
}
