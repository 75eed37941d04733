//! `health.json`: per-device events, and the quarantine policy over them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Fault, HealthError};
use crate::fsutil;
use crate::owner::Owner;
use crate::pci::PciAddress;

/// The record's file name in the state dir.
pub const HEALTH_FILE: &str = "health.json";
/// The format version this build reads and writes.
pub const HEALTH_VERSION: u32 = 1;
const LOCK_FILE: &str = "health.lock";

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// A VM's console log, ingested for its owner.
    Console,
    /// The check after detach.
    Detach,
    /// An on-demand reset.
    Reset,
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthEvent {
    /// The host device it is about.
    pub device: PciAddress,
    /// Who had the device, when known.
    pub owner: Option<Owner>,
    /// Unix time it was recorded.
    pub at: u64,
    /// Where it came from.
    pub source: EventSource,
    /// The fault (its `address` is as the log named it, e.g. the guest's PCI address).
    pub fault: Fault,
}

impl HealthEvent {
    /// An event about `device` recorded now.
    pub fn now(
        device: PciAddress,
        owner: Option<Owner>,
        source: EventSource,
        fault: Fault,
    ) -> Self {
        HealthEvent {
            device,
            owner,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source,
            fault,
        }
    }

    /// A failure event: one that needs the host to act (counts towards quarantine).
    pub fn is_failure(&self) -> bool {
        self.fault.action.needs_host()
    }

    fn describe(&self) -> String {
        let owner = self
            .owner
            .as_ref()
            .map_or("unknown owner".to_owned(), |o| o.to_string());
        let what = match self.fault.xid {
            Some(x) => format!("xid {x}"),
            None => self.fault.kind.to_string(),
        };
        format!("{owner}: {what} ({})", self.fault.message)
    }
}

/// One line for people: time, owner, the fault.
impl std::fmt::Display for HealthEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = self
            .owner
            .as_ref()
            .map_or("-".to_owned(), |o| o.to_string());
        write!(f, "{} owner {owner}  {}", self.at, self.fault)
    }
}

/// The device, its state, then one indented line per event.
impl std::fmt::Display for DeviceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.quarantine {
            Some(q) => write!(f, "{}  QUARANTINED: {}", self.device, q.summary())?,
            None => write!(
                f,
                "{}  in service, {} events",
                self.device,
                self.events.len()
            )?,
        }
        self.events.iter().try_for_each(|e| write!(f, "\n  {e}"))
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFile {
    /// [`HEALTH_VERSION`].
    pub version: u32,
    /// Events per device, oldest first.
    pub devices: BTreeMap<PciAddress, Vec<HealthEvent>>,
}

/// When a device is quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failure events from this many distinct owners quarantine a device (an event with no
    /// known owner counts as one more owner).
    pub quarantine_after: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            quarantine_after: 2,
        }
    }
}

/// A quarantined device and the events that put it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The device.
    pub device: PciAddress,
    /// The distinct owners with failure events (`None`: unknown owner).
    pub owners: Vec<Option<Owner>>,
    /// The failure events.
    pub events: Vec<HealthEvent>,
}

impl Quarantine {
    /// One sentence naming the events, for refusals.
    pub fn summary(&self) -> String {
        format!(
            "{} is quarantined after failure events from {} owners: {}; repair it, then clear its health record",
            self.device,
            self.owners.len(),
            self.events
                .iter()
                .map(HealthEvent::describe)
                .collect::<Vec<_>>()
                .join("; ")
        )
    }
}

/// One device's record, as `health` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHealth {
    /// The device.
    pub device: PciAddress,
    /// Its events, oldest first.
    pub events: Vec<HealthEvent>,
    /// Set when it is quarantined.
    pub quarantine: Option<Quarantine>,
}

/// What `clear` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearReport {
    /// The device.
    pub device: PciAddress,
    /// How many events were removed.
    pub removed: usize,
    /// Whether it was quarantined before.
    pub was_quarantined: bool,
}

impl std::fmt::Display for ClearReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} events removed{}",
            self.device,
            self.removed,
            if self.was_quarantined {
                ", quarantine lifted"
            } else {
                ""
            }
        )
    }
}

/// The health records in a state dir.
#[derive(Debug, Clone)]
pub struct HealthStore {
    dir: PathBuf,
    policy: Policy,
}

impl HealthStore {
    /// The records kept in `state_dir`, with the default [`Policy`].
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        HealthStore {
            dir: state_dir.into(),
            policy: Policy::default(),
        }
    }

    /// Use another policy.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Path of the record file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(HEALTH_FILE)
    }

    /// Read the records (none yet: empty). A snapshot: writers replace the file atomically.
    pub fn read(&self) -> Result<HealthFile, HealthError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => {
                // The version first, so a newer format is reported as such, not as corrupt.
                #[derive(Deserialize)]
                struct Version {
                    version: u32,
                }
                let v: Version =
                    serde_json::from_slice(&bytes).map_err(|e| HealthError::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                if v.version != HEALTH_VERSION {
                    return Err(HealthError::Version {
                        path,
                        found: v.version,
                    });
                }
                serde_json::from_slice(&bytes).map_err(|e| HealthError::Corrupt {
                    path,
                    detail: e.to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HealthFile {
                version: HEALTH_VERSION,
                ..Default::default()
            }),
            Err(source) => Err(HealthError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// The quarantine of `device` under this store's policy, if it is quarantined.
    pub fn quarantine(&self, device: PciAddress) -> Result<Option<Quarantine>, HealthError> {
        let file = self.read()?;
        Ok(self.judge(
            device,
            file.devices.get(&device).map_or(&[][..], Vec::as_slice),
        ))
    }

    fn judge(&self, device: PciAddress, events: &[HealthEvent]) -> Option<Quarantine> {
        let failures: Vec<HealthEvent> =
            events.iter().filter(|e| e.is_failure()).cloned().collect();
        let owners: BTreeSet<Option<Owner>> = failures.iter().map(|e| e.owner.clone()).collect();
        (owners.len() >= self.policy.quarantine_after.max(1)).then(|| Quarantine {
            device,
            owners: owners.into_iter().collect(),
            events: failures,
        })
    }

    /// Every device with a record.
    pub fn records(&self) -> Result<Vec<DeviceHealth>, HealthError> {
        let file = self.read()?;
        Ok(file
            .devices
            .into_iter()
            .map(|(device, events)| DeviceHealth {
                device,
                quarantine: self.judge(device, &events),
                events,
            })
            .collect())
    }

    /// Append events (an identical event already recorded is not added twice). Returns the
    /// events added.
    pub fn record(&self, events: &[HealthEvent]) -> Result<Vec<HealthEvent>, HealthError> {
        self.change(|file| {
            let mut added = Vec::new();
            for e in events {
                let list = file.devices.entry(e.device).or_default();
                let dup = list
                    .iter()
                    .any(|o| o.owner == e.owner && o.fault == e.fault && o.source == e.source);
                if !dup {
                    list.push(e.clone());
                    added.push(e.clone());
                }
            }
            added
        })
    }

    /// Remove every event of `device` (after a repair).
    pub fn clear(&self, device: PciAddress) -> Result<ClearReport, HealthError> {
        self.change(|file| {
            let events = file.devices.remove(&device).unwrap_or_default();
            ClearReport {
                device,
                removed: events.len(),
                was_quarantined: self.judge(device, &events).is_some(),
            }
        })
    }

    /// Lock, read, change, write atomically (temp file, fsync, rename, fsync of the dir).
    fn change<T>(&self, f: impl FnOnce(&mut HealthFile) -> T) -> Result<T, HealthError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| HealthError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let _lock = fsutil::lock_exclusive(&lock_path).map_err(io("lock", &lock_path))?;
        let mut file = self.read()?;
        let out = f(&mut file);
        file.version = HEALTH_VERSION;
        file.devices.retain(|_, v| !v.is_empty());
        let path = self.path();
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| HealthError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        fsutil::write_atomic(&path, &bytes).map_err(io("write", &path))?;
        Ok(out)
    }
}
