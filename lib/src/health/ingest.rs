//! A VM's console log → events of the devices its owner held.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    EventSource, Fault, HealthError, HealthEvent, HealthStore, Quarantine, ScanStats, scan_file,
};
use crate::owner::Owner;
use crate::pci::PciAddress;

/// What an owner's VM had: the devices a fault in its console can be about (the caller takes
/// it from the attachment history, `attach`'s journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDevices {
    /// The owner.
    pub owner: Owner,
    /// Devices handed to its VM.
    pub devices: Vec<PciAddress>,
    /// Which of them are GPUs (display controllers).
    pub gpus: Vec<PciAddress>,
}

/// What `ingest` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    /// The owner.
    pub owner: Owner,
    /// The devices its VM had (its newest hold in the journal's history).
    pub devices: Vec<PciAddress>,
    /// Every distinct fault found in the log (at most [`super::MAX_DISTINCT`]).
    pub faults: Vec<Fault>,
    /// What the scan read: lines, long lines, occurrences, refused `GPU-XID` lines.
    #[serde(default)]
    pub scan: ScanStats,
    /// The events recorded (failures only; application faults need nothing of the host).
    pub recorded: Vec<HealthEvent>,
    /// Devices quarantined now.
    pub quarantined: Vec<Quarantine>,
}

/// A summary line, then one line per recorded event and per quarantine.
impl std::fmt::Display for IngestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} faults in the log ({} distinct), {} recorded for {}",
            self.scan.occurrences,
            self.faults.len(),
            self.recorded.len(),
            self.owner
        )?;
        for e in &self.recorded {
            writeln!(f, "{}  {}", e.device, e.fault)?;
        }
        for q in &self.quarantined {
            writeln!(f, "QUARANTINED: {}", q.summary())?;
        }
        Ok(())
    }
}

/// Which held devices a fault is about. The guest names its own PCI addresses, which need not be
/// the host's: an address that is one of the held devices is taken as it is; otherwise the fault
/// is about the VM's GPU if it had one, and about all of its GPUs if it had several (a device that
/// cannot be ruled out is suspect).
fn devices_for(fault: &Fault, devices: &[PciAddress], gpus: &[PciAddress]) -> Vec<PciAddress> {
    if let Some(a) = fault
        .address
        .as_deref()
        .and_then(|a| a.parse::<PciAddress>().ok())
        .filter(|a| devices.contains(a))
    {
        return vec![a];
    }
    if !gpus.is_empty() {
        return gpus.to_vec();
    }
    if devices.len() == 1 {
        return devices.to_vec();
    }
    Vec::new()
}

/// Read `console` (a VM's console or kernel log), map its faults to the devices `held` names
/// and record the failures as events of its owner in the health records of `state_dir`.
pub fn ingest(
    state_dir: &Path,
    held: &HeldDevices,
    console: &Path,
) -> Result<IngestReport, HealthError> {
    let owner = &held.owner;
    // Parsed before any lock is taken; what follows is bounded by the scan's caps.
    let scan = scan_file(console)?;
    let faults: Vec<Fault> = scan.faults.into_iter().map(|f| f.fault).collect();
    let events: Vec<HealthEvent> = faults
        .iter()
        .filter(|f| f.action.needs_host())
        .flat_map(|f| {
            devices_for(f, &held.devices, &held.gpus)
                .into_iter()
                .map(|d| HealthEvent::now(d, Some(owner.clone()), EventSource::Console, f.clone()))
        })
        .collect();
    let store = HealthStore::new(state_dir);
    let recorded = store.record(&events)?;
    let mut quarantined = Vec::new();
    for d in &held.devices {
        if let Some(q) = store.quarantine(*d)? {
            quarantined.push(q);
        }
    }
    Ok(IngestReport {
        owner: owner.clone(),
        devices: held.devices.clone(),
        faults,
        scan: scan.stats,
        recorded,
        quarantined,
    })
}
