//! A VM's console log → events of the devices its owner held.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    EventSource, Fault, HealthError, HealthEvent, HealthStore, Quarantine, ScanStats, Scanner,
    scan_file, scan_file_with,
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
    /// vGPUs handed to its VM: a fault its guest reports is charged to the vGPU, never to
    /// the parent GPU that serves other tenants too.
    #[serde(default)]
    pub vgpus: Vec<HeldVgpu>,
    /// Where its VM saw each device (the boot spec fixed it): when present, a fault is mapped
    /// through it exactly, and one at an address not in it is counted and dropped. Empty for
    /// holds recorded before the boot spec fixed addresses (or finished by `reconcile`, which
    /// hands out no boot spec); those are mapped as before, by guessing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest: Vec<GuestDevice>,
    /// Unix time of the attach: console lines stamped with an earlier wall-clock time are not
    /// about this hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Unix time of the detach: console lines stamped later are not about this hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

/// A device as its VM saw it: the guest address the boot spec fixed, and what it is on the
/// host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDevice {
    /// Its address inside the VM.
    pub guest: PciAddress,
    /// The host device: a whole device, or a vendor-VFIO vGPU's VF; none for an mdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<PciAddress>,
    /// The mdev UUID, for an mdev vGPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev: Option<String>,
}

/// A vGPU an owner's VM had: a VF with a vGPU type (vendor VFIO), or an mdev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVgpu {
    /// The physical GPU it is on.
    pub parent: PciAddress,
    /// Its VF (vendor VFIO): faults go to the VF's own record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf: Option<PciAddress>,
    /// Its mdev UUID (mdev): faults go to the parent's record marked with it, and never count
    /// towards the parent's quarantine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev: Option<String>,
}

/// Where a fault is charged: a device's own record, or an mdev on its parent's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Charge {
    Device(PciAddress),
    Mdev(PciAddress, String),
}

impl HeldVgpu {
    fn charge(&self) -> Option<Charge> {
        match (&self.vf, &self.mdev) {
            (Some(vf), _) => Some(Charge::Device(*vf)),
            (None, Some(uuid)) => Some(Charge::Mdev(self.parent, uuid.clone())),
            (None, None) => None,
        }
    }
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
    /// Failures at a guest address the VM did not have (or with none, in a VM of several
    /// devices): counted, never spread over its devices.
    #[serde(default)]
    pub unmapped: u64,
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
        if self.unmapped > 0 {
            writeln!(
                f,
                "{} failures name no device the VM had: not counted",
                self.unmapped
            )?;
        }
        for e in &self.recorded {
            writeln!(f, "{}  {}", e.device, e.fault)?;
        }
        for q in &self.quarantined {
            writeln!(f, "QUARANTINED: {}", q.summary())?;
        }
        Ok(())
    }
}

/// Which held device (or vGPU) a fault is about, through the guest addresses the boot spec
/// fixed: exactly the one at the fault's address, or none (counted and dropped by the caller).
/// A fault naming no address is about the VM's one device, if it had only one.
fn exact_charge(fault: &Fault, guest: &[GuestDevice], vgpus: &[HeldVgpu]) -> Option<Charge> {
    let seen = match fault.address.as_deref() {
        Some(a) => {
            let a = a.parse::<PciAddress>().ok()?;
            guest.iter().find(|g| g.guest == a)?
        }
        None if guest.len() == 1 => &guest[0],
        None => return None,
    };
    match (&seen.mdev, seen.host) {
        (Some(uuid), _) => {
            let parent = vgpus.iter().find(|v| v.mdev.as_ref() == Some(uuid))?.parent;
            Some(Charge::Mdev(parent, uuid.clone()))
        }
        (None, Some(host)) => Some(Charge::Device(host)),
        (None, None) => None,
    }
}

/// Which held devices (or vGPUs) a fault is about, for a hold recorded without guest addresses.
/// The guest names its own PCI addresses, which need not be the host's: an address that is one
/// of the held devices (or vGPU VFs) is taken as it is; otherwise the fault is about the VM's
/// GPU or vGPU if it had one, and about all of them if it had several (one that cannot be
/// ruled out is suspect). A vGPU's parent is never charged: it serves other tenants, and only
/// the host's own evidence can take it out.
fn charges_for(fault: &Fault, held: &HeldDevices) -> Vec<Charge> {
    if !held.guest.is_empty() {
        return exact_charge(fault, &held.guest, &held.vgpus)
            .into_iter()
            .collect();
    }
    let vfs = held.vgpus.iter().filter_map(|v| v.vf);
    if let Some(a) = fault
        .address
        .as_deref()
        .and_then(|a| a.parse::<PciAddress>().ok())
        .filter(|a| held.devices.contains(a) || vfs.clone().any(|vf| vf == *a))
    {
        return vec![Charge::Device(a)];
    }
    let gpus: Vec<Charge> = held
        .gpus
        .iter()
        .map(|g| Charge::Device(*g))
        .chain(held.vgpus.iter().filter_map(HeldVgpu::charge))
        .collect();
    if !gpus.is_empty() {
        return gpus;
    }
    if held.devices.len() == 1 {
        return vec![Charge::Device(held.devices[0])];
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
    let scan = match held.since {
        Some(since) => scan_file_with(console, Scanner::within(since, held.until))?,
        None => scan_file(console)?,
    };
    let faults: Vec<Fault> = scan.faults.into_iter().map(|f| f.fault).collect();
    let mut unmapped = 0;
    let events: Vec<HealthEvent> = faults
        .iter()
        .filter(|f| f.action.needs_host())
        .flat_map(|f| {
            let charges = charges_for(f, held);
            unmapped += u64::from(charges.is_empty());
            charges.into_iter().map(|c| {
                let (device, mdev) = match c {
                    Charge::Device(d) => (d, None),
                    Charge::Mdev(parent, uuid) => (parent, Some(uuid)),
                };
                let mut e =
                    HealthEvent::now(device, Some(owner.clone()), EventSource::Console, f.clone());
                e.mdev = mdev;
                e
            })
        })
        .collect();
    let store = HealthStore::new(state_dir);
    let recorded = store.record(&events)?;
    let mut quarantined = Vec::new();
    let vfs = held.vgpus.iter().filter_map(|v| v.vf);
    for d in held.devices.iter().copied().chain(vfs) {
        if let Some(q) = store.quarantine(d)? {
            quarantined.push(q);
        }
    }
    Ok(IngestReport {
        owner: owner.clone(),
        devices: held.devices.clone(),
        faults,
        scan: scan.stats,
        recorded,
        unmapped,
        quarantined,
    })
}
