//! `health`: whether each device is fit to hand to the next tenant.
//!
//! - Fault classification of kernel and VM console logs: the guest contract's classifier
//!   ([`gpu_passthrough_guest_contract::xid`], shared with the guest init), re-exported here;
//!   [`scan_file`] reads a log.
//! - Health records per device under the state dir ([`HealthStore`], `health.json`, versioned,
//!   replaced atomically with fsync, changed under a lock).
//! - Quarantine: a device with [`Policy::quarantine_after`] (default 2) failure events of the
//!   host's own (detach, reset) from distinct owners, or one failed host check
//!   ([`EventSource::Check`]), is not handed out again until its record is cleared after a
//!   repair. Guests' failures (console events) from as many owners only make it *suspect*
//!   ([`Quarantine::suspect`]): out of service until the host checks it itself
//!   ([`HealthStore::record_check`]: a pass returns it, a failure quarantines it). A vGPU
//!   tenant's failures are its vGPU's, never its parent GPU's ([`HealthEvent::mdev`]).
//!   Placement (attach by address, `--gpus N`, vGPU parents) and any other allocator (e.g. a
//!   device plugin) ask [`is_quarantined`]; an unreadable record is an error, so callers fail
//!   closed.
//! - [`ingest`]: a VM's console log, mapped to the devices its owner held ([`HeldDevices`], which
//!   the caller takes from the attachment history: `attach::ingest_console`), recorded as events
//!   of that owner.
//!
//! Reset and verification at detach live in `attach` (they write sysfs); they record their
//! failures here.

mod event;
mod ingest;
mod store;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use gpu_passthrough_guest_contract::xid::{
    Action, Classifier, Fault, FaultKind, MAX_DISTINCT, MAX_LINE, MAX_MESSAGE, ScanReport,
    ScanStats, Scanner, SeenFault, XID_PREFIX, classify_line, host_view, wall_time, xid_action,
};
pub use ingest::{GuestDevice, HeldDevices, HeldVgpu, IngestReport, ingest};
pub use store::{
    ClearReport, DeviceHealth, EventSource, EventTally, HEALTH_FILE, HealthEvent, HealthFile,
    HealthStore, HostCheckRecord, MAX_EVENTS_PER_DEVICE, Policy, Quarantine,
};

use crate::outcome::{Classify, Outcome};
use crate::owner::Owner;
use crate::pci::PciAddress;
pub use crate::quarantine::{NoQuarantine, QuarantineCheck, Standing};
use crate::remedy::Remedy;

/// Errors of the health records.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// I/O on the health record.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The record does not parse: every device is treated as unfit until it is repaired.
    #[error(
        "the health record {path} is corrupt ({detail}); no device is handed out until it is repaired or moved aside"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
    /// The record was written by a newer version.
    #[error(
        "the health record {path} has format version {found}, this build reads {}: upgrade gpu-passthrough",
        store::HEALTH_VERSION
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// A console or kernel log could not be read.
    #[error("cannot read the log {path}")]
    Log {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The owner never held a device on this host.
    #[error(
        "owner {0} never held a device on this host (no entry in the journal's history): its console cannot be mapped to devices"
    )]
    NoHistory(Owner),
}

impl Classify for HealthError {
    fn outcome(&self) -> Outcome {
        match self {
            HealthError::Io { .. }
            | HealthError::Corrupt { .. }
            | HealthError::Version { .. }
            | HealthError::Log { .. }
            | HealthError::NoHistory(_) => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            HealthError::Io { .. } => Some(Remedy::StateDir),
            HealthError::Corrupt { .. }
            | HealthError::Version { .. }
            | HealthError::Log { .. }
            | HealthError::NoHistory(_) => None,
        }
    }
}

/// The health records of a state dir: quarantined when the record says so, and also when it
/// cannot be read (fail closed).
#[derive(Debug, Clone)]
pub struct HealthRecords {
    /// The state dir holding the health records.
    pub state_dir: PathBuf,
}

impl QuarantineCheck for HealthRecords {
    fn is_quarantined(&self, device: PciAddress) -> bool {
        !matches!(is_quarantined(&self.state_dir, device), Ok(None))
    }

    fn standing(&self, device: PciAddress) -> Standing {
        match is_quarantined(&self.state_dir, device) {
            Ok(None) => Standing::InService,
            Ok(Some(q)) => Standing::Quarantined(q.summary()),
            Err(e) => Standing::Unknown(format!(
                "{device} cannot be checked for quarantine: {}",
                crate::error_chain(&e)
            )),
        }
    }
}

/// Whether `address` is quarantined under the default [`Policy`], with the events that put it
/// there. The one question every allocator asks before handing a device out; an `Err` means the
/// record cannot be read and the device must not be handed out (fail closed).
pub fn is_quarantined(
    state_dir: &Path,
    address: PciAddress,
) -> Result<Option<Quarantine>, HealthError> {
    HealthStore::new(state_dir).quarantine(address)
}

/// How much of a log is read at a time: the whole of the scan's memory besides its bounded
/// results ([`gpu_passthrough_guest_contract::xid::MAX_LINE`], `MAX_DISTINCT`).
const SCAN_CHUNK: usize = 1 << 20;

/// Every distinct NVIDIA fault in a console or kernel log, in the order first seen, with
/// counts. Read in chunks through the guest contract's [`Scanner`], so a console of any size and
/// content (binary, one line of gigabytes) is read in bounded memory and linear time. Takes
/// no lock: callers parse first and record after.
pub fn scan_file(path: &Path) -> Result<ScanReport, HealthError> {
    scan_file_with(path, Scanner::default())
}

/// [`scan_file`] with a scanner of the caller's (e.g. [`Scanner::within`] an attachment's
/// lifetime).
pub fn scan_file_with(path: &Path, mut scanner: Scanner) -> Result<ScanReport, HealthError> {
    let err = |source| HealthError::Log {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mut buf = vec![0u8; SCAN_CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        };
        scanner.feed(&buf[..n]);
    }
    Ok(scanner.finish())
}
