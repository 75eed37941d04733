//! One device's events as `health.json` keeps them: where each came from, its fault, whose it
//! was, and the counts older events are folded into ([`EventTally`]); and the host's own check
//! of a device ([`HostCheckRecord`]).

use serde::{Deserialize, Serialize};

use super::{Fault, FaultKind};
use crate::owner::Owner;
use crate::pci::PciAddress;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// A VM's console log, ingested for its owner.
    Console,
    /// The check after detach.
    Detach,
    /// An on-demand reset.
    Reset,
    /// The host's own check of a suspect device ([`HostCheckRecord`]): its failure
    /// quarantines at once.
    Check,
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
    /// The mdev (its UUID) on `device` the fault is charged to: a vGPU tenant's fault stays
    /// with its vGPU and never counts towards the shared parent's quarantine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev: Option<String>,
    /// For a guest's (console) failure: Unix time of the host check that passed after it.
    /// Checked and found wanting, it no longer makes the device suspect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<u64>,
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
            mdev: None,
            checked: None,
        }
    }

    /// A failure event: one that needs the host to act.
    pub fn is_failure(&self) -> bool {
        self.fault.action.needs_host()
    }

    /// Whether it counts towards `device`'s quarantine: a failure about the device itself, not
    /// one charged to an mdev on it (see [`HealthEvent::mdev`]).
    pub fn counts_for_quarantine(&self) -> bool {
        self.is_failure() && self.mdev.is_none() && self.checked.is_none()
    }

    /// What makes two events the same (their time aside): one is recorded, not both.
    pub(super) fn identity(
        &self,
    ) -> (
        PciAddress,
        Option<String>,
        Option<Owner>,
        EventSource,
        Fault,
    ) {
        (
            self.device,
            self.mdev.clone(),
            self.owner.clone(),
            self.source,
            self.fault.clone(),
        )
    }

    pub(super) fn describe(&self) -> String {
        let owner = self
            .owner
            .as_ref()
            .map_or("unknown owner".to_owned(), |o| o.to_string());
        let what = match self.fault.xid {
            Some(x) => format!("xid {x}"),
            None => self.fault.kind.to_string(),
        };
        let message =
            gpu_passthrough_guest_contract::printable::escape_control(&self.fault.message);
        format!("{owner}: {what} ({message})")
    }
}

/// One line for people: time, owner, the fault.
impl std::fmt::Display for HealthEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = self
            .owner
            .as_ref()
            .map_or("-".to_owned(), |o| o.to_string());
        write!(f, "{} owner {owner}  {}", self.at, self.fault)?;
        if let Some(uuid) = &self.mdev {
            write!(f, "  (mdev {uuid}: not the GPU's)")?;
        }
        match self.checked {
            Some(at) => write!(f, "  (the host's check at {at} passed)"),
            None => Ok(()),
        }
    }
}

/// The host's own check of a device (config space, BAR0, link, AER; see `attach`'s
/// verification): what decides whether a device the guests blamed is quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheckRecord {
    /// Unix time of the check.
    pub at: u64,
    /// Every check passed.
    pub passed: bool,
    /// The device was suspect (guest-reported failures) when checked.
    pub was_suspect: bool,
    /// What was read: one `name=value` a reading (`bar0=0x...`, `link=x16/x16`, ...).
    pub readings: Vec<String>,
    /// What failed, one sentence each.
    pub problems: Vec<String>,
}

/// Events of one device no longer kept one by one: how many, of whom, of what kind, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTally {
    /// Who had the device (`None`: unknown).
    pub owner: Option<Owner>,
    /// Where the events came from.
    pub source: EventSource,
    /// Their kind.
    pub kind: FaultKind,
    /// Whether they were failures (count towards quarantine).
    pub failure: bool,
    /// How many.
    pub count: u64,
    /// Unix time of the first.
    pub first_at: u64,
    /// Unix time of the last.
    pub last_at: u64,
}

impl EventTally {
    pub(super) fn matches(&self, e: &HealthEvent) -> bool {
        self.owner == e.owner
            && self.source == e.source
            && self.kind == e.fault.kind
            && self.failure == e.counts_for_quarantine()
    }

    pub(super) fn describe(&self) -> String {
        let owner = self
            .owner
            .as_ref()
            .map_or("unknown owner".to_owned(), |o| o.to_string());
        format!("{owner}: {} earlier {} events", self.count, self.kind)
    }
}

/// `FIRST..LAST owner OWNER  COUNTx KIND (SOURCE)`.
impl std::fmt::Display for EventTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = self
            .owner
            .as_ref()
            .map_or("-".to_owned(), |o| o.to_string());
        write!(
            f,
            "{}..{} owner {owner}  {}x {} ({:?}, older events summarised)",
            self.first_at, self.last_at, self.count, self.kind, self.source
        )
    }
}

/// Fold `events` into `tallies`, one tally per owner, source, kind and failure.
pub(super) fn tally(tallies: &mut Vec<EventTally>, events: impl IntoIterator<Item = HealthEvent>) {
    for e in events {
        match tallies.iter_mut().find(|t| t.matches(&e)) {
            Some(t) => {
                t.count += 1;
                t.first_at = t.first_at.min(e.at);
                t.last_at = t.last_at.max(e.at);
            }
            None => tallies.push(EventTally {
                failure: e.counts_for_quarantine(),
                owner: e.owner,
                source: e.source,
                kind: e.fault.kind,
                count: 1,
                first_at: e.at,
                last_at: e.at,
            }),
        }
    }
}
