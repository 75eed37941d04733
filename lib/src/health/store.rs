//! `health.json`: per-device events, and the quarantine policy over them.
//!
//! Bounded: each device keeps its newest [`MAX_EVENTS_PER_DEVICE`] events, older ones are
//! summarised as counts ([`EventTally`]) that still count towards quarantine. `health.lock` is
//! held only for the read-modify-write of that bounded file (duplicates dropped before it is
//! taken), and nothing waits for another lock while holding it: the lock order is the journal
//! lock, then `health.lock`, never the other way. Reads take no lock and reuse the last parse
//! while the file's bytes are unchanged, so a device plugin polling every device parses once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::event::tally;
pub use super::event::{EventSource, EventTally, HealthEvent, HostCheckRecord};
use super::{Fault, HealthError};
use crate::fsutil;
use crate::owner::Owner;
use crate::pci::PciAddress;

/// The record's file name in the state dir.
pub const HEALTH_FILE: &str = "health.json";
/// The format version this build reads and writes. Version 3 added host checks, mdev events
/// and checked guest events: a build that knows only 2 would count an mdev tenant's failures
/// against its parent GPU, so it refuses the file (fail closed) instead.
pub const HEALTH_VERSION: u32 = 3;
/// The earliest format version this build still reads (version 1 had no tallies; 2 no
/// checks); older files read as they are.
const OLDEST_READABLE: u32 = 1;
/// Events kept per device (the newest); older ones become [`EventTally`] counts.
pub const MAX_EVENTS_PER_DEVICE: usize = 32;
const LOCK_FILE: &str = "health.lock";

/// The device, its state, then one indented line per event.
impl std::fmt::Display for DeviceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.quarantine {
            Some(q) if q.suspect => write!(f, "{}  SUSPECT: {}", self.device, q.summary())?,
            Some(q) => write!(f, "{}  QUARANTINED: {}", self.device, q.summary())?,
            None => write!(
                f,
                "{}  in service, {} events",
                self.device,
                self.events.len()
            )?,
        }
        self.older.iter().try_for_each(|t| write!(f, "\n  {t}"))?;
        self.events.iter().try_for_each(|e| write!(f, "\n  {e}"))?;
        match &self.last_check {
            Some(c) => write!(
                f,
                "\n  {} host check {}: {}{}",
                c.at,
                if c.passed { "passed" } else { "FAILED" },
                c.readings.join(" "),
                if c.problems.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", c.problems.join("; "))
                }
            ),
            None => Ok(()),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFile {
    /// [`HEALTH_VERSION`].
    pub version: u32,
    /// Events per device, oldest first, at most [`MAX_EVENTS_PER_DEVICE`] each.
    pub devices: BTreeMap<PciAddress, Vec<HealthEvent>>,
    /// Per device, the events no longer kept, as counts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub older: BTreeMap<PciAddress, Vec<EventTally>>,
    /// Per device, the newest check the host made of it itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<PciAddress, HostCheckRecord>,
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
    /// Earlier failure events, as counts.
    #[serde(default)]
    pub older: Vec<EventTally>,
    /// Only guests reported the failures: held out of service until the host checks it
    /// itself (at the next detach, or on demand); that check returns it or quarantines it.
    #[serde(default)]
    pub suspect: bool,
}

impl Quarantine {
    /// One sentence naming the events, for refusals.
    pub fn summary(&self) -> String {
        let what = if self.suspect {
            "is suspect (out of service, not quarantined) after guest-reported failures"
        } else {
            "is quarantined after failure events"
        };
        let fix = if self.suspect {
            "the host's own check (the next detach, or on demand) returns it to service or quarantines it"
        } else {
            "repair it, then clear its health record"
        };
        format!(
            "{} {what} from {} owners: {}; {fix}",
            self.device,
            self.owners.len(),
            self.older
                .iter()
                .map(EventTally::describe)
                .chain(self.events.iter().map(HealthEvent::describe))
                .collect::<Vec<_>>()
                .join("; "),
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
    /// Its events no longer kept, as counts.
    #[serde(default)]
    pub older: Vec<EventTally>,
    /// Set when it is quarantined (or suspect).
    pub quarantine: Option<Quarantine>,
    /// The newest check the host made of it itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<HostCheckRecord>,
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
        Ok(self.snapshot()?.as_ref().clone())
    }

    /// The records as last parsed, parsed again only when the file's bytes changed: one parse
    /// serves every device a poll asks about.
    fn snapshot(&self) -> Result<Arc<HealthFile>, HealthError> {
        /// The last parse per record file (a process has one or a few state dirs): a hash of
        /// its bytes and the records.
        type Parsed = HashMap<PathBuf, (u64, u64, Arc<HealthFile>)>;
        static LAST: Mutex<Option<Parsed>> = Mutex::new(None);
        const FILES_REMEMBERED: usize = 8;
        let path = self.path();
        let bytes = match read_record(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Arc::new(HealthFile {
                    version: HEALTH_VERSION,
                    ..Default::default()
                }));
            }
            Err(source) => {
                return Err(HealthError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut hasher);
        let digest = hasher.finish();
        let len = bytes.len() as u64;
        let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
        let last = last.get_or_insert_with(HashMap::new);
        if let Some((l, d, file)) = last.get(&path)
            && (*l, *d) == (len, digest)
        {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(parse(&path, &bytes)?);
        if last.len() >= FILES_REMEMBERED && !last.contains_key(&path) {
            last.clear();
        }
        last.insert(path, (len, digest, Arc::clone(&file)));
        Ok(file)
    }

    /// The quarantine of `device` under this store's policy, if it is quarantined.
    pub fn quarantine(&self, device: PciAddress) -> Result<Option<Quarantine>, HealthError> {
        let file = self.snapshot()?;
        Ok(self.judge(device, &file))
    }

    /// The host's own evidence (detach and reset checks: the owners policy; a failed host
    /// check: at once) quarantines; guests' failures alone (console events not checked since)
    /// only make the device suspect.
    fn judge(&self, device: PciAddress, file: &HealthFile) -> Option<Quarantine> {
        let events = file.devices.get(&device).map_or(&[][..], Vec::as_slice);
        let older = file.older.get(&device).map_or(&[][..], Vec::as_slice);
        let verdict = |guest: bool| {
            let failures: Vec<HealthEvent> = events
                .iter()
                .filter(|e| {
                    e.counts_for_quarantine() && (e.source == EventSource::Console) == guest
                })
                .cloned()
                .collect();
            let older: Vec<EventTally> = older
                .iter()
                .filter(|t| t.failure && (t.source == EventSource::Console) == guest)
                .cloned()
                .collect();
            let owners: BTreeSet<Option<Owner>> = failures
                .iter()
                .map(|e| e.owner.clone())
                .chain(older.iter().map(|t| t.owner.clone()))
                .collect();
            let failed_check = failures.iter().any(|e| e.source == EventSource::Check)
                || older.iter().any(|t| t.source == EventSource::Check);
            (failed_check || owners.len() >= self.policy.quarantine_after.max(1)).then(|| {
                Quarantine {
                    device,
                    owners: owners.into_iter().collect(),
                    events: failures,
                    older,
                    suspect: guest,
                }
            })
        };
        verdict(false).or_else(|| verdict(true))
    }

    /// Record the host's own check of `device`. A pass clears the guests' failures recorded
    /// so far (kept, marked checked: the evidence stays) and so returns a suspect device to
    /// service; a failure is a [`EventSource::Check`] event, which quarantines it. Returns the
    /// device's standing afterwards.
    pub fn record_check(
        &self,
        device: PciAddress,
        check: &HostCheckRecord,
        failure: Option<Fault>,
    ) -> Result<Option<Quarantine>, HealthError> {
        if let Some(fault) = failure {
            let mut e = HealthEvent::now(device, None, EventSource::Check, fault);
            e.at = check.at;
            self.record(&[e])?;
        }
        self.change(|file| {
            if check.passed {
                for e in file.devices.get_mut(&device).into_iter().flatten() {
                    if e.source == EventSource::Console && e.is_failure() {
                        e.checked.get_or_insert(check.at);
                    }
                }
                for t in file.older.get_mut(&device).into_iter().flatten() {
                    if t.source == EventSource::Console {
                        t.failure = false;
                    }
                }
            }
            file.checks.insert(device, check.clone());
            self.judge(device, file)
        })
    }

    /// Every device with a record.
    pub fn records(&self) -> Result<Vec<DeviceHealth>, HealthError> {
        let file = self.snapshot()?;
        let devices: BTreeSet<PciAddress> = file
            .devices
            .keys()
            .chain(file.older.keys())
            .chain(file.checks.keys())
            .copied()
            .collect();
        Ok(devices
            .into_iter()
            .map(|device| DeviceHealth {
                device,
                last_check: file.checks.get(&device).cloned(),
                quarantine: self.judge(device, &file),
                events: file.devices.get(&device).cloned().unwrap_or_default(),
                older: file.older.get(&device).cloned().unwrap_or_default(),
            })
            .collect())
    }

    /// Append events (an identical event already kept is not added twice; beyond
    /// [`MAX_EVENTS_PER_DEVICE`] the oldest become counts). Returns the events added.
    pub fn record(&self, events: &[HealthEvent]) -> Result<Vec<HealthEvent>, HealthError> {
        // Duplicates dropped before the lock, in one pass.
        let mut seen = HashSet::new();
        let fresh: Vec<&HealthEvent> = events
            .iter()
            .filter(|e| seen.insert(e.identity()))
            .collect();
        if fresh.is_empty() {
            return Ok(Vec::new());
        }
        self.change(|file| {
            let mut added = Vec::new();
            // Per device, what it keeps (at most the cap), hashed once.
            let mut kept: HashMap<PciAddress, HashSet<_>> = HashMap::new();
            for e in fresh {
                let list = file.devices.entry(e.device).or_default();
                let known = kept
                    .entry(e.device)
                    .or_insert_with(|| list.iter().map(HealthEvent::identity).collect());
                if known.insert(e.identity()) {
                    list.push(e.clone());
                    added.push(e.clone());
                }
            }
            for device in kept.into_keys() {
                let Some(list) = file.devices.get_mut(&device) else {
                    continue;
                };
                if list.len() > MAX_EVENTS_PER_DEVICE {
                    let excess = list.len() - MAX_EVENTS_PER_DEVICE;
                    tally(file.older.entry(device).or_default(), list.drain(..excess));
                }
            }
            added
        })
    }

    /// Remove every event of `device` (after a repair).
    pub fn clear(&self, device: PciAddress) -> Result<ClearReport, HealthError> {
        self.change(|file| {
            let was_quarantined = self.judge(device, file).is_some();
            let events = file.devices.remove(&device).unwrap_or_default();
            let older = file.older.remove(&device).unwrap_or_default();
            file.checks.remove(&device);
            ClearReport {
                device,
                removed: events.len() + older.iter().map(|t| t.count as usize).sum::<usize>(),
                was_quarantined,
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
        file.older.retain(|_, v| !v.is_empty());
        let path = self.path();
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| HealthError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        fsutil::write_private(&path, &bytes).map_err(io("write", &path))?;
        Ok(out)
    }
}

/// The record file's bytes. The file is bounded by [`MAX_EVENTS_PER_DEVICE`]; a larger one
/// (written by hand, or by an earlier build without the cap) is still read whole.
fn read_record(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = fs::File::open(path)?;
    let mut bytes = Vec::with_capacity(file.metadata().map_or(0, |m| m.size() as usize));
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Parse the record: the version first, so a newer format is reported as such, not as corrupt.
fn parse(path: &Path, bytes: &[u8]) -> Result<HealthFile, HealthError> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let corrupt = |e: serde_json::Error| HealthError::Corrupt {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let v: Version = serde_json::from_slice(bytes).map_err(corrupt)?;
    if !(OLDEST_READABLE..=HEALTH_VERSION).contains(&v.version) {
        return Err(HealthError::Version {
            path: path.to_owned(),
            found: v.version,
        });
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Action, classify_line};

    fn event(device: &str, owner: &str, pid: u32) -> HealthEvent {
        let line =
            format!("NVRM: Xid (PCI:0000:01:00): 79, pid={pid}, GPU has fallen off the bus.");
        HealthEvent::now(
            device.parse().unwrap(),
            Some(Owner::new(owner).unwrap()),
            EventSource::Console,
            classify_line(&line).unwrap(),
        )
    }

    fn check(passed: bool) -> HostCheckRecord {
        HostCheckRecord {
            at: 1,
            passed,
            was_suspect: true,
            readings: vec!["bar0=0x192000a1".into()],
            problems: Vec::new(),
        }
    }

    /// Guests' failures, even tallied beyond the cap, only make a device suspect; a passing
    /// host check clears them (kept tallies too), later guest failures count afresh, and a
    /// failed check quarantines even once it is tallied itself.
    #[test]
    fn guest_failures_make_a_device_suspect_until_the_host_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = HealthStore::new(dir.path());
        let device: PciAddress = "0000:01:00.0".parse().unwrap();
        let flood = |owner: &str, from: u32| -> Vec<HealthEvent> {
            (from..from + 40)
                .map(|i| event("0000:01:00.0", owner, i))
                .collect()
        };
        store.record(&flood("a", 0)).unwrap();
        store.record(&flood("b", 0)).unwrap();
        let q = store.quarantine(device).unwrap().expect("out of service");
        assert!(q.suspect && !q.older.is_empty(), "{q:?}");
        assert_eq!(
            store.record_check(device, &check(true), None).unwrap(),
            None
        );
        // New guest failures from two owners make it suspect again.
        store.record(&flood("c", 100)).unwrap();
        assert_eq!(store.quarantine(device).unwrap(), None, "one owner");
        store.record(&flood("d", 100)).unwrap();
        assert!(store.quarantine(device).unwrap().unwrap().suspect);
        // mdev tenants' failures never count towards the parent.
        let other: PciAddress = "0000:02:00.0".parse().unwrap();
        let mdev: Vec<HealthEvent> = ["a", "b"]
            .iter()
            .map(|o| {
                let mut e = event("0000:02:00.0", o, 1);
                e.mdev = Some(format!("uuid-{o}"));
                e
            })
            .collect();
        assert_eq!(store.record(&mdev).unwrap().len(), 2, "one per mdev");
        assert_eq!(store.quarantine(other).unwrap(), None);
        // A failed check quarantines, and still does once flooded into the tallies.
        let fault =
            classify_line("NVRM: Xid (PCI:0000:01:00): 79, pid=1, GPU has fallen off the bus.")
                .unwrap();
        let q = store
            .record_check(device, &check(false), Some(fault))
            .unwrap()
            .expect("quarantined");
        assert!(!q.suspect);
        store.record(&flood("e", 200)).unwrap();
        let q = store
            .quarantine(device)
            .unwrap()
            .expect("still quarantined");
        assert!(!q.suspect && q.events.is_empty(), "{q:?}");
        assert!(q.older.iter().any(|t| t.source == EventSource::Check));
    }

    #[test]
    fn a_device_keeps_its_newest_events_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = HealthStore::new(dir.path()).with_policy(Policy {
            quarantine_after: 2,
        });
        // One owner's flood: 10 000 distinct events in one call, then the same again.
        let flood: Vec<HealthEvent> = (0..10_000).map(|i| event("0000:01:00.0", "a", i)).collect();
        assert_eq!(store.record(&flood).unwrap().len(), 10_000);
        let file = store.read().unwrap();
        let kept = &file.devices[&"0000:01:00.0".parse().unwrap()];
        assert_eq!(kept.len(), MAX_EVENTS_PER_DEVICE);
        assert!(kept.last().unwrap().fault.message.contains("pid=9999,"));
        let older = &file.older[&"0000:01:00.0".parse().unwrap()];
        assert_eq!(
            older.len(),
            1,
            "one tally per owner, source, kind: {older:?}"
        );
        assert_eq!(older[0].count, (10_000 - MAX_EVENTS_PER_DEVICE) as u64);
        let size = fs::metadata(store.path()).unwrap().len();
        assert!(size < 64 * 1024, "{size} bytes");
        // The same events again: what is kept is not added twice.
        let again = store.record(&flood[flood.len() - 5..]).unwrap();
        assert!(again.is_empty(), "{again:?}");
        // The tallied owner still counts: one more owner quarantines.
        assert!(
            store
                .quarantine("0000:01:00.0".parse().unwrap())
                .unwrap()
                .is_none()
        );
        let mut others: Vec<HealthEvent> = (0..MAX_EVENTS_PER_DEVICE as u32)
            .map(|i| event("0000:01:00.0", "b", i))
            .collect();
        others.push(event("0000:01:00.0", "b", 0)); // a duplicate in the same call
        assert_eq!(store.record(&others).unwrap().len(), MAX_EVENTS_PER_DEVICE);
        let q = store
            .quarantine("0000:01:00.0".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(q.owners.len(), 2, "{q:?}");
        assert!(q.summary().contains("a: "), "{}", q.summary());
        // Clearing removes the counts too.
        let cleared = store.clear("0000:01:00.0".parse().unwrap()).unwrap();
        assert!(cleared.was_quarantined);
        assert_eq!(cleared.removed, 10_000 + MAX_EVENTS_PER_DEVICE);
        assert!(store.records().unwrap().is_empty());
    }

    #[test]
    fn a_version_1_record_is_read_and_rewritten_as_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let store = HealthStore::new(dir.path());
        let e = event("0000:02:00.0", "a", 1);
        let v1 = serde_json::json!({
            "version": 1,
            "devices": { "0000:02:00.0": [e] },
        });
        fs::write(store.path(), serde_json::to_vec(&v1).unwrap()).unwrap();
        assert_eq!(store.records().unwrap()[0].events, std::slice::from_ref(&e));
        store.record(&[event("0000:02:00.0", "b", 1)]).unwrap();
        let file = store.read().unwrap();
        assert_eq!(file.version, HEALTH_VERSION);
        assert_eq!(file.devices[&e.device].len(), 2);
        assert!(matches!(
            parse(&store.path(), br#"{"version": 4, "devices": {}}"#),
            Err(HealthError::Version { found: 4, .. })
        ));
    }

    #[test]
    fn a_read_is_parsed_again_only_when_the_bytes_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = HealthStore::new(dir.path());
        store.record(&[event("0000:03:00.0", "a", 1)]).unwrap();
        let first = store.snapshot().unwrap();
        assert!(Arc::ptr_eq(&first, &store.snapshot().unwrap()), "reused");
        // Rewritten in place with other bytes of the same length: parsed again.
        let text = fs::read_to_string(store.path()).unwrap();
        fs::write(store.path(), text.replace("pid=1,", "pid=2,")).unwrap();
        let second = store.snapshot().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(
            second.devices.values().next().unwrap()[0]
                .fault
                .message
                .contains("pid=2,")
        );
        assert_eq!(
            second.devices.values().next().unwrap()[0].fault.action,
            Action::ResetGpu
        );
    }
}
