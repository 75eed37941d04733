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

pub use super::records::{
    Attachment, DeviceRecord, HISTORY_KEEP, HistoryEntry, HostBaseline, PartitionRecord,
    ResetRestriction, SriovCycle, Step, Transaction, VgpuRecord, VgpuStep,
};
use crate::health::{GuestDevice, HeldVgpu};
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
            fabric_partition,
            ..
        } = txn;
        if let Some(a) = self.attachments.iter_mut().find(|a| a.owner == owner) {
            a.devices.extend(devices);
            a.vgpus.extend(vgpus);
            a.fabric_partitions.extend(fabric_partition);
        } else {
            self.attachments.push(Attachment {
                owner,
                owner_process,
                devices,
                vgpus,
                boot_id,
                fabric_partitions: fabric_partition.into_iter().collect(),
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
