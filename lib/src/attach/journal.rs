//! The write-ahead journal under the state dir.
//!
//! One JSON file, `journal.json`, holds every in-flight transaction and every attachment. It is
//! replaced atomically (temp file + fsync + rename + fsync of the directory) and only changed
//! while holding an exclusive `flock` on `lock` in the same directory. An attach holds that lock
//! from planning to commit, so a transaction found in the journal by anyone who holds the lock
//! was abandoned by a process that died: `reconcile` may repair it.
//!
//! A device record's `step` is the last step *begun* (it is saved before the sysfs write), so
//! after a crash the write may or may not have happened; rollback therefore looks at the device's
//! actual state rather than trusting the step.
//!
//! Crash tests abort the process at each [`crate::failpoint::Failpoint`] of the transaction.
//!
//! The file carries its format version ([`JOURNAL_VERSION`]). An older one is read and
//! migrated forward (version 1 had no boot IDs: its records' boot stays unknown); a newer one
//! is refused before anything is done, since saving it would drop what this binary does not
//! know (a plugin image older than the host's CLI sharing the state dir, say).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use super::liveness::ProcessIdentity;
use crate::health::{GuestDevice, HeldDevices, HeldVgpu};
use crate::outcome::{Classify, Outcome};
use crate::owner::Owner;
use crate::pci::PciAddress;
use crate::remedy::Remedy;

/// The journal format this binary reads and writes. 2: attachments and transactions record
/// the boot they belong to (`boot_id`).
pub const JOURNAL_VERSION: u32 = 2;

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A newer binary wrote the journal: this one would drop what it does not know.
    #[error(
        "{path} has journal format version {found}, newer than the version {JOURNAL_VERSION} this binary understands; nothing was read or written. Fix: upgrade this gpu-passthrough (CLI or device-plugin image) to the release that wrote it"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// I/O on the state dir.
    #[error("cannot {action} {path} (check that the state dir is writable: root)")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Others may change the state dir: they could replace the journal or plant links in it.
    #[error(
        "the state dir {path} is not safe: {why}; nothing was read or written. Fix: `chown root:root {path} && chmod 700 {path}`, or choose another state dir"
    )]
    UnsafeStateDir {
        /// The state dir.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The journal does not parse.
    #[error(
        "{path} is corrupt; nothing was changed. Inspect it, move it aside and repair the devices by hand, then rerun"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The state could not be serialized (a bug: every field serializes); nothing was written.
    #[error("cannot serialize the journal for {path}; nothing was written")]
    Serialize {
        /// The file.
        path: PathBuf,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

impl Classify for JournalError {
    fn outcome(&self) -> Outcome {
        match self {
            JournalError::Io { .. }
            | JournalError::Corrupt { .. }
            | JournalError::Serialize { .. } => Outcome::Failed,
            JournalError::Newer { .. } | JournalError::UnsafeStateDir { .. } => Outcome::Refused,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            JournalError::Io { .. } | JournalError::UnsafeStateDir { .. } => Some(Remedy::StateDir),
            JournalError::Corrupt { .. }
            | JournalError::Serialize { .. }
            | JournalError::Newer { .. } => None,
        }
    }
}

/// How far a device's transaction got (the last step begun).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Recorded; nothing written yet.
    Planned,
    /// Persistence mode being turned off for this GPU.
    PersistenceOff,
    /// `driver_override=vfio-pci` being written.
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
    /// The last step begun.
    pub step: Step,
    /// What the host read of the device at attach (a device handed to the VM), compared by
    /// the check at detach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<HostBaseline>,
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
}

impl From<TransactionOnDisk> for Transaction {
    fn from(t: TransactionOnDisk) -> Transaction {
        Transaction {
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
}

impl From<AttachmentOnDisk> for Attachment {
    fn from(a: AttachmentOnDisk) -> Attachment {
        Attachment {
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

/// Everything in the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalState {
    /// Format version ([`JOURNAL_VERSION`] once read: older ones are migrated on reading).
    pub version: u32,
    /// Transactions in flight (or abandoned by a crash).
    pub transactions: Vec<Transaction>,
    /// Committed attachments.
    pub attachments: Vec<Attachment>,
    /// Who held which devices, newest last, kept after detach (bounded to [`HISTORY_KEEP`]):
    /// faults a VM reports later are mapped to the devices it had.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// `reset_method`s narrowed for a reset in progress, saved before the narrowing is
    /// written: reconcile puts back any a crash left ([`ResetRestriction`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset_restrictions: Vec<ResetRestriction>,
    /// SR-IOV cycles of a PF in progress, saved before its VFs are removed: reconcile puts
    /// back any `sriov_numvfs` a crash left at 0 ([`SriovCycle`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sriov_cycles: Vec<SriovCycle>,
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl JournalState {
    /// The owner holding `device` (attached or mid-transaction).
    /// A vGPU's VF and parent count as held: moving either would break the vGPU.
    pub fn owner_of(&self, device: PciAddress) -> Option<&Owner> {
        let vgpu = |v: &VgpuRecord| v.vf == Some(device) || v.parent == device;
        self.attachments
            .iter()
            .find(|a| a.devices.iter().any(|d| d.device == device) || a.vgpus.iter().any(vgpu))
            .map(|a| &a.owner)
            .or_else(|| {
                self.transactions
                    .iter()
                    .find(|t| {
                        t.devices.iter().any(|d| d.device == device) || t.vgpus.iter().any(vgpu)
                    })
                    .map(|t| &t.owner)
            })
    }

    /// The owner that has `device` itself on vfio-pci (attached or mid-transaction); vGPUs
    /// and mdevs on it do not count (more may be created there).
    pub fn bound_to(&self, device: PciAddress) -> Option<&Owner> {
        let bound = |d: &DeviceRecord| d.device == device;
        self.attachments
            .iter()
            .find(|a| a.devices.iter().any(bound))
            .map(|a| &a.owner)
            .or_else(|| {
                self.transactions
                    .iter()
                    .find(|t| t.devices.iter().any(bound))
                    .map(|t| &t.owner)
            })
    }

    /// The newest hold of `owner` (attached now, or the last one it had).
    pub fn last_held(&self, owner: &Owner) -> Option<&HistoryEntry> {
        self.history.iter().rev().find(|h| &h.owner == owner)
    }

    /// Record that `owner` now holds `devices` (`gpus` among them).
    pub fn remember(&mut self, owner: &Owner, devices: Vec<PciAddress>, gpus: Vec<PciAddress>) {
        self.history.push(HistoryEntry {
            owner: owner.clone(),
            devices,
            gpus,
            since: unix_now(),
            until: None,
            vgpus: Vec::new(),
            guest: Vec::new(),
        });
        let excess = self.history.len().saturating_sub(HISTORY_KEEP);
        self.history.drain(..excess);
    }

    /// Add `vgpus` to `owner`'s newest hold (after [`JournalState::remember`]).
    pub fn remember_vgpus(&mut self, owner: &Owner, vgpus: &[VgpuRecord]) {
        if let Some(h) = self.history.iter_mut().rev().find(|h| &h.owner == owner) {
            h.vgpus.extend(vgpus.iter().map(|v| HeldVgpu {
                parent: v.parent,
                vf: v.vf,
                mdev: v.uuid.clone(),
            }));
        }
    }

    /// Add where its VM sees each device to `owner`'s newest hold (after
    /// [`JournalState::remember`]).
    pub fn remember_guest(&mut self, owner: &Owner, guest: Vec<GuestDevice>) {
        if let Some(h) = self.history.iter_mut().rev().find(|h| &h.owner == owner) {
            h.guest = guest;
        }
    }

    /// Record that `owner` gave its devices back.
    pub fn forget(&mut self, owner: &Owner) {
        let now = unix_now();
        for h in self.history.iter_mut().filter(|h| &h.owner == owner) {
            h.until.get_or_insert(now);
        }
    }

    /// Move a finished transaction into its owner's attachment.
    pub fn commit(&mut self, txn: Transaction) {
        let Transaction {
            owner,
            owner_process,
            devices,
            vgpus,
            boot_id,
            ..
        } = txn;
        if let Some(a) = self.attachments.iter_mut().find(|a| a.owner == owner) {
            a.devices.extend(devices);
            a.vgpus.extend(vgpus);
        } else {
            self.attachments.push(Attachment {
                owner,
                owner_process,
                devices,
                vgpus,
                boot_id,
            });
        }
    }

    /// Whether nothing is in flight and nothing is attached.
    pub fn is_clean(&self) -> bool {
        self.transactions.is_empty() && self.attachments.is_empty()
    }
}

/// The journal in a state dir.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// The journal, locked; dropping it releases the lock.
#[derive(Debug)]
pub struct LockedJournal {
    _lock: Flock<File>,
    path: PathBuf,
    /// The state as read when the lock was taken, plus changes not saved yet.
    pub state: JournalState,
}

impl Journal {
    /// The journal kept in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Journal {
            dir: state_dir.into(),
        }
    }

    /// The state dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the journal file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }

    /// Take the lock (blocking) and read the state.
    pub fn lock(&self) -> Result<LockedJournal, JournalError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io {
                action,
                path,
                source,
            }
        };
        // Created 0700; an existing one others may write is refused.
        if let Some(why) = crate::fsutil::private_dir(&self.dir).map_err(io("create", &self.dir))? {
            return Err(JournalError::UnsafeStateDir {
                path: self.dir.clone(),
                why,
            });
        }
        let lock_path = self.dir.join("lock");
        let lock = crate::fsutil::lock_exclusive(&lock_path).map_err(io("lock", &lock_path))?;
        let path = self.path();
        let state = read_state(&path)?;
        Ok(LockedJournal {
            _lock: lock,
            path,
            state,
        })
    }

    /// Read the state without locking (a consistent snapshot thanks to atomic replace).
    pub fn read(&self) -> Result<JournalState, JournalError> {
        read_state(&self.path())
    }
}

fn read_state(path: &Path) -> Result<JournalState, JournalError> {
    match fs::read(path) {
        Ok(bytes) => parse_state(path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(JournalState {
            version: JOURNAL_VERSION,
            ..Default::default()
        }),
        Err(source) => Err(JournalError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// The version first, so a newer format is refused as such (not as corrupt, and before its
/// unknown fields are dropped); then the state, migrated to [`JOURNAL_VERSION`].
fn parse_state(path: &Path, bytes: &[u8]) -> Result<JournalState, JournalError> {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        version: u32,
    }
    let corrupt = |source| JournalError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let found = serde_json::from_slice::<Version>(bytes)
        .map_err(corrupt)?
        .version;
    if found > JOURNAL_VERSION {
        return Err(JournalError::Newer {
            path: path.to_owned(),
            found,
        });
    }
    let mut state: JournalState = serde_json::from_slice(bytes).map_err(corrupt)?;
    // 1 → 2: records without a boot ID keep an unknown boot (`None`); nothing else changed.
    state.version = JOURNAL_VERSION;
    Ok(state)
}

impl LockedJournal {
    /// Write the state atomically: temp file, fsync, rename, fsync the directory.
    pub fn save(&mut self) -> Result<(), JournalError> {
        self.state.version = JOURNAL_VERSION;
        let bytes =
            serde_json::to_vec_pretty(&self.state).map_err(|source| JournalError::Serialize {
                path: self.path.clone(),
                source,
            })?;
        crate::fsutil::write_private(&self.path, &bytes).map_err(|source| JournalError::Io {
            action: "write",
            path: self.path.clone(),
            source,
        })?;
        Ok(())
    }
}
