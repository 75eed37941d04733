//! Which GPUs the plugin serves and their health, read from the journal and sysfs each time.
//!
//! The served set is the journal: the passed NVIDIA GPUs of the attachments whose owner is the
//! plugin's pool (`device-plugin`) or one of its allocations (`device-plugin:alloc-…`). Nothing
//! about a device is kept in memory between scans.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use gpu_passthrough::attach::journal::JournalState;
use gpu_passthrough::attach::{
    AttachError, AttachRequest, EndedByReboot, Host, Owner, PlanRequest,
};
use gpu_passthrough::pci::{PciAddress, Sysfs};

use crate::naming::{NameSource, Namer, ResourceKind};
pub use crate::served::{Problem, ServedDevice, switch_of};
use crate::{PluginError, Quarantine};

/// The owner holding served, unallocated GPUs.
pub const POOL_OWNER: &str = "device-plugin";
/// The owner prefix of allocations.
pub const ALLOC_PREFIX: &str = "device-plugin:alloc-";

/// Whether `owner` is the plugin's pool or one of its allocations.
pub fn is_plugin_owner(owner: &Owner) -> bool {
    owner.as_str() == POOL_OWNER || owner.as_str().starts_with(ALLOC_PREFIX)
}

/// Every served GPU by resource name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Resource name → devices, by address.
    pub resources: BTreeMap<String, Vec<ServedDevice>>,
    /// Where each resource name came from (`pci.ids`, `supported-gpus.json` or the device ID).
    pub name_sources: BTreeMap<String, NameSource>,
}

/// The problems of a journaled device now, from sysfs and the devices directory.
pub fn problems(
    sysfs: &Sysfs,
    dev_dir: &Path,
    address: PciAddress,
    recorded_group: Option<u32>,
    quarantine: &dyn Quarantine,
) -> Vec<Problem> {
    let mut out = Vec::new();
    if !sysfs.device_dir(address).exists() {
        return vec![Problem::Gone];
    }
    // vfio-pci, or a VFIO variant driver (nvgrace-gpu-vfio-pci on Grace).
    if !sysfs.on_vfio(address) {
        out.push(Problem::NotOnVfio(sysfs.driver(address)));
    }
    let now = sysfs.iommu_group(address);
    if now != recorded_group || now.is_none() {
        out.push(Problem::GroupChanged {
            recorded: recorded_group,
            now,
        });
    }
    // The group node, or on an iommufd-only host the device's own cdev.
    if let Some(g) = recorded_group
        && gpu_passthrough::vfio::present_node(&sysfs.device_dir(address), dev_dir, g).is_none()
    {
        out.push(Problem::NoVfioNode(
            dev_dir.join("vfio").join(g.to_string()),
        ));
    }
    if quarantine.is_quarantined(address) {
        out.push(Problem::Quarantined);
    }
    out
}

/// Scan the journal and sysfs.
pub fn scan(
    host: &Host,
    namer: &Namer,
    quarantine: &dyn Quarantine,
) -> Result<Inventory, PluginError> {
    let state = host.journal().read()?;
    Ok(scan_state(host, &state, namer, quarantine))
}

pub(crate) fn scan_state(
    host: &Host,
    state: &JournalState,
    namer: &Namer,
    quarantine: &dyn Quarantine,
) -> Inventory {
    let mut inv = Inventory::default();
    let sysfs = host.sysfs();
    for att in state
        .attachments
        .iter()
        .filter(|a| is_plugin_owner(&a.owner))
    {
        for rec in att.devices.iter().filter(|d| d.passed) {
            // A device gone from sysfs cannot be named: it leaves the list, which the kubelet
            // takes as removed.
            let Ok(dev) = sysfs.device(rec.device) else {
                continue;
            };
            if !dev.is_nvidia_gpu() {
                continue;
            }
            let (name, source) = namer.resource_name(&dev);
            inv.name_sources.insert(name.clone(), source);
            inv.resources.entry(name).or_default().push(ServedDevice {
                id: rec.device.to_string(),
                kind: ResourceKind::Pci,
                address: rec.device,
                group: rec.iommu_group,
                numa: dev.numa_node,
                switch: switch_of(sysfs, rec.device),
                problems: problems(
                    sysfs,
                    host.dev_dir(),
                    rec.device,
                    rec.iommu_group,
                    quarantine,
                ),
            });
        }
    }
    for att in state
        .attachments
        .iter()
        .filter(|a| is_plugin_owner(&a.owner))
    {
        for rec in &att.vgpus {
            if let Some((name, dev)) = crate::vgpu::served(sysfs, host.dev_dir(), rec, quarantine) {
                inv.name_sources
                    .insert(name.clone(), NameSource::VgpuProfile);
                inv.resources.entry(name).or_default().push(dev);
            }
        }
    }
    for list in inv.resources.values_mut() {
        list.sort_by(|a, b| a.address.cmp(&b.address).then_with(|| a.id.cmp(&b.id)));
    }
    inv
}

/// How many GPUs to move to vfio-pci at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// None: serve only what is already on vfio-pci.
    None,
    /// At most this many.
    Count(usize),
    /// Every GPU that can be moved.
    All,
}

/// `N` or `all`, as a node's configuration spells it; the error names the value and both forms.
impl std::str::FromStr for Prepare {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(Prepare::All);
        }
        s.parse::<usize>()
            .map(Prepare::Count)
            .map_err(|_| format!("`{s}` is neither a number nor `all`"))
    }
}

/// What the start-up pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrepareReport {
    /// Attachments of an earlier boot (the plugin's or anyone's), ended and dropped from the
    /// journal before anything else: after a reboot none of them is in place.
    pub ended_by_reboot: Vec<EndedByReboot>,
    /// GPUs already on vfio-pci, recorded for the pool without a write.
    pub adopted: Vec<PciAddress>,
    /// GPUs moved to vfio-pci by the attach transaction.
    pub moved: Vec<PciAddress>,
    /// GPUs left alone, with why (boot display, a group with host devices, a failed attach).
    pub skipped: Vec<(PciAddress, String)>,
    /// How many of the skipped GPUs an attach failed on.
    pub attach_errors: usize,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[PciAddress]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        for e in &self.ended_by_reboot {
            writeln!(f, "ended {} (recorded in boot {})", e.owner, e.boot_id)?;
        }
        writeln!(f, "adopted (already on vfio-pci): {}", list(&self.adopted))?;
        writeln!(f, "moved to vfio-pci: {}", list(&self.moved))?;
        for (a, why) in &self.skipped {
            writeln!(f, "skipped {a}: {why}")?;
        }
        Ok(())
    }
}

/// Record the unowned NVIDIA GPUs already on vfio-pci for the pool, and move `prepare` more
/// to vfio-pci, each through the attach transaction with owner [`POOL_OWNER`]. Never takes
/// the boot display or a group with host devices (the plan refuses them).
///
/// A plugin that cannot see the host's processes (no `hostPID`) refuses a `prepare` other
/// than [`Prepare::None`] outright, naming the fix: it was asked to move GPUs and cannot do so
/// safely. With [`Prepare::None`] it adopts nothing (each candidate is skipped with that
/// reason) and serves what the journal already holds.
pub fn prepare(
    host: &Host,
    prepare: Prepare,
    supported_gpus: Option<&Path>,
) -> Result<PrepareReport, PluginError> {
    // First, so a GPU the reboot left on vfio-pci (`vfio-pci.ids=`) is adopted afresh rather
    // than served on an earlier boot's record.
    let ended_by_reboot = host.end_previous_boot()?;
    if prepare != Prepare::None {
        host.sees_host_processes().map_err(AttachError::from)?;
    }
    let owner = Owner::new(POOL_OWNER).expect("valid owner");
    let mut report = PrepareReport {
        ended_by_reboot,
        ..Default::default()
    };
    let mut budget = match prepare {
        Prepare::None => 0,
        Prepare::Count(n) => n,
        Prepare::All => usize::MAX,
    };
    let devices = host.devices(false, supported_gpus)?;
    for d in devices
        .iter()
        .filter(|d| d.device.is_nvidia_gpu() && d.owner.is_none())
    {
        let addr = d.device.address;
        let on_vfio = host.sysfs().on_vfio(addr);
        if !on_vfio && budget == 0 {
            continue;
        }
        if !d.ready {
            report.skipped.push((addr, d.not_ready_because.join("; ")));
            continue;
        }
        let req = AttachRequest {
            plan: PlanRequest {
                devices: vec![addr],
                owner: Some(owner.clone()),
                ..Default::default()
            },
            owner: owner.clone(),
            initrd: None,
        };
        match host.attach(&req) {
            Ok(_) if on_vfio => report.adopted.push(addr),
            Ok(_) => {
                report.moved.push(addr);
                budget -= 1;
            }
            Err(e) => {
                report.attach_errors += 1;
                report.skipped.push((addr, e.to_string()));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_parses_a_count_or_all_and_names_anything_else() {
        assert_eq!("all".parse(), Ok(Prepare::All));
        assert_eq!("2".parse(), Ok(Prepare::Count(2)));
        assert_eq!(
            "some".parse::<Prepare>(),
            Err("`some` is neither a number nor `all`".to_owned())
        );
    }

    #[test]
    fn the_switch_is_the_upstream_port_two_levels_up() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        // Root port 00:01.0 → switch upstream 01:00.0 → downstream 02:08.0 → GPU 03:00.0;
        // and a GPU 04:00.0 straight under root port 00:02.0 (no switch).
        let gpu =
            sys.join("devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:08.0/0000:03:00.0");
        let direct = sys.join("devices/pci0000:00/0000:00:02.0/0000:04:00.0");
        std::fs::create_dir_all(&gpu).unwrap();
        std::fs::create_dir_all(&direct).unwrap();
        std::fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
        std::os::unix::fs::symlink(&gpu, sys.join("bus/pci/devices/0000:03:00.0")).unwrap();
        std::os::unix::fs::symlink(&direct, sys.join("bus/pci/devices/0000:04:00.0")).unwrap();
        let s = Sysfs::new(sys);
        let sw = switch_of(&s, "0000:03:00.0".parse().unwrap()).unwrap();
        assert!(
            sw.ends_with("0000:00:01.0/0000:01:00.0"),
            "{}",
            sw.display()
        );
        assert_eq!(switch_of(&s, "0000:04:00.0".parse().unwrap()), None);
    }
}
