//! Reading the profiles each parent GPU can create now, for both frameworks.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::{Catalogue, Framework, ParentAvailability, Profile};
use crate::pci::{PciAddress, Sysfs};

/// Parse a `creatable_vgpu_types` table into (type ID, name); the header and blank lines are
/// skipped, so a header-only table (a full GPU) gives an empty list.
pub fn parse_creatable_types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (id, name) = l.split_once(':')?;
            let id = id.trim();
            (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
                .then(|| (id.to_owned(), name.trim().to_owned()))
        })
        .collect()
}

/// The framebuffer a profile name implies: `NVIDIA L40S-4Q` → 4096 MiB (the digits after the
/// last `-` are GiB).
pub fn framebuffer_from_name(name: &str) -> Option<u64> {
    let suffix = name.rsplit_once('-')?.1;
    let digits: String = suffix.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse::<u64>().ok().map(|g| g * 1024)
}

/// `framebuffer=NNNNM` from an mdev type's description.
fn framebuffer_from_description(text: &str) -> Option<u64> {
    let v = text
        .split([',', '\n'])
        .find_map(|kv| kv.trim().strip_prefix("framebuffer="))?;
    let v = v.trim();
    match v.strip_suffix('M') {
        Some(m) => m.parse().ok(),
        None => v
            .strip_suffix('G')
            .and_then(|g| g.parse::<u64>().ok())
            .map(|g| g * 1024),
    }
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn link_addresses(dir: &Path, prefix: &str) -> Vec<PciAddress> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PciAddress> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|t| t.file_name()?.to_str()?.parse().ok())
        .collect();
    out.sort();
    out
}

/// The SR-IOV virtual functions of `pf` (its `virtfnN` links), by address.
pub fn virtual_functions(sysfs: &Sysfs, pf: PciAddress) -> Vec<PciAddress> {
    link_addresses(&sysfs.device_dir(pf), "virtfn")
}

/// Why `address` must not be unbound, rebound or reset, if it carries vGPUs: a vendor-VFIO VF,
/// a PF with such VFs, or an mdev parent with mdevs. The message names it and the fix (for a
/// plan's or a reset's refusal).
pub fn vgpu_role(sysfs: &Sysfs, address: PciAddress) -> Option<String> {
    let has_type = |a: PciAddress| {
        sysfs
            .device_dir(a)
            .join("nvidia/current_vgpu_type")
            .exists()
    };
    if has_type(address) {
        return Some(format!(
            "{address} is an SR-IOV VF of NVIDIA's vGPU manager (vendor-specific VFIO): it is never unbound, rebound or reset here (that breaks its VFIO registration); ask for a vGPU profile instead"
        ));
    }
    if virtual_functions(sysfs, address).into_iter().any(has_type) {
        return Some(format!(
            "{address} has vGPU VFs (NVIDIA vendor-specific VFIO): moving or resetting it would destroy them; ask for a vGPU profile, or disable SR-IOV on it (sriov-manage -d) first"
        ));
    }
    // mdevs on it, or on its VFs (Ampere with SR-IOV: the VFs are the mdev parents).
    let mdevs_of = |a: PciAddress| -> usize {
        fs::read_dir(sysfs.device_dir(a).join("mdev_supported_types"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| fs::read_dir(t.path().join("devices")).map_or(0, |d| d.count()))
            .sum()
    };
    let mdevs = mdevs_of(address)
        + virtual_functions(sysfs, address)
            .into_iter()
            .map(mdevs_of)
            .sum::<usize>();
    (mdevs > 0).then(|| {
        format!(
            "{address} has {mdevs} mdev vGPU(s): moving or resetting it would destroy them; detach their owners (or remove the mdevs) first"
        )
    })
}

/// One offer of a parent: (framework, type id) → (name, framebuffer, count creatable).
type Offers = BTreeMap<(Framework, String), (String, u64, u32)>;

struct Parent {
    address: PciAddress,
    numa_node: Option<u32>,
    used_mib: u64,
    offers: Offers,
}

/// Everything the host can create now (see the module docs for how `available` is counted).
pub fn catalogue(sysfs: &Sysfs, quarantine: &dyn crate::quarantine::QuarantineCheck) -> Catalogue {
    catalogue_with(sysfs, quarantine, &mut ModelTotals::new())
}

/// The total framebuffer of each vendor-VFIO GPU model (PCI device ID → MiB) learned so far:
/// a GPU's tables show its largest profile only while it has no vGPU, so a caller that keeps
/// this between calls (the state dir) counts right after its own creates.
pub type ModelTotals = BTreeMap<u16, u64>;

/// [`catalogue`], with totals learned before; `totals` gains what this read shows.
pub fn catalogue_with(
    sysfs: &Sysfs,
    quarantine: &dyn crate::quarantine::QuarantineCheck,
    totals: &mut ModelTotals,
) -> Catalogue {
    let mut parents: Vec<Parent> = Vec::new();
    let devices = sysfs.devices().unwrap_or_default();
    // Vendor VFIO: type IDs are the driver's, shared by GPUs of one model: learn names from
    // every table so that a full GPU's assigned types still have a framebuffer.
    struct Vf {
        current: String,
        table: Vec<(String, String)>,
    }
    let mut pfs: Vec<(PciAddress, Option<u32>, u16, Vec<Vf>)> = Vec::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for d in &devices {
        let vfs: Vec<Vf> = link_addresses(&sysfs.device_dir(d.address), "virtfn")
            .into_iter()
            .filter_map(|vf| {
                let dir = sysfs.device_dir(vf).join("nvidia");
                let table = parse_creatable_types(&read(&dir.join("creatable_vgpu_types"))?);
                let current = read(&dir.join("current_vgpu_type"))?.trim().to_owned();
                Some(Vf { current, table })
            })
            .collect();
        if vfs.is_empty() {
            continue;
        }
        for vf in &vfs {
            for (id, name) in &vf.table {
                names.insert(id.clone(), name.clone());
            }
        }
        pfs.push((d.address, d.numa_node, d.device_id, vfs));
    }
    let fb = |id: &str| names.get(id).and_then(|n| framebuffer_from_name(n));
    // A GPU's total framebuffer is its largest profile's (48Q on a 48 GiB L40S). Once vGPUs
    // exist, a homogeneous GPU lists only their size, so also count what it has plus the
    // largest it still offers, and take the largest of either over every GPU of the model.
    // (A model whose every GPU has vGPUs may be undercounted: then no table shows the total.)
    let used_of = |vfs: &[Vf]| -> u64 {
        vfs.iter()
            .filter(|v| v.current != "0")
            .filter_map(|v| fb(&v.current))
            .sum()
    };
    let model_total = totals;
    for (_, _, model, vfs) in &pfs {
        let largest = |only_free: bool| {
            vfs.iter()
                .filter(|v| !only_free || v.current == "0")
                .flat_map(|v| &v.table)
                .filter_map(|(id, _)| fb(id))
                .max()
                .unwrap_or(0)
        };
        let seen = largest(false).max(used_of(vfs) + largest(true));
        let e = model_total.entry(*model).or_default();
        *e = (*e).max(seen);
    }
    for (address, numa_node, model, vfs) in &pfs {
        let used_mib = used_of(vfs);
        let total = model_total.get(model).copied().unwrap_or(0).max(used_mib);
        let free_mib = total - used_mib;
        let mut offers = Offers::new();
        for vf in vfs.iter().filter(|v| v.current == "0") {
            for (id, name) in &vf.table {
                let Some(f) = framebuffer_from_name(name).filter(|f| *f > 0) else {
                    continue;
                };
                let e = offers
                    .entry((Framework::VendorVfio, id.clone()))
                    .or_insert_with(|| (name.clone(), f, 0));
                e.2 += 1;
            }
        }
        for (_, f, n) in offers.values_mut() {
            *n = (*n).min(u32::try_from(free_mib / *f).unwrap_or(u32::MAX));
        }
        parents.push(Parent {
            address: *address,
            numa_node: *numa_node,
            used_mib,
            offers,
        });
    }
    // mdev: parents listed in class/mdev_bus, or PCI devices with mdev_supported_types.
    let mut mdev_parents = link_addresses(&sysfs.root().join("class/mdev_bus"), "");
    for d in &devices {
        if sysfs
            .device_dir(d.address)
            .join("mdev_supported_types")
            .is_dir()
        {
            mdev_parents.push(d.address);
        }
    }
    mdev_parents.sort();
    mdev_parents.dedup();
    for address in mdev_parents {
        let types_dir = sysfs.device_dir(address).join("mdev_supported_types");
        let Ok(types) = fs::read_dir(&types_dir) else {
            continue;
        };
        let mut offers = Offers::new();
        let mut used_mib = 0;
        for t in types.filter_map(Result::ok) {
            let id = t.file_name().to_string_lossy().into_owned();
            let p = t.path();
            let name = read(&p.join("name")).map_or_else(|| id.clone(), |s| s.trim().to_owned());
            let Some(f) = read(&p.join("description"))
                .and_then(|d| framebuffer_from_description(&d))
                .or_else(|| framebuffer_from_name(&name))
            else {
                continue;
            };
            let made = fs::read_dir(p.join("devices")).map_or(0, |d| d.count() as u64);
            used_mib += made * f;
            let avail = read(&p.join("available_instances"))
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            offers.insert((Framework::Mdev, id), (name, f, avail));
        }
        let numa_node = devices
            .iter()
            .find(|d| d.address == address)
            .and_then(|d| d.numa_node);
        parents.push(Parent {
            address,
            numa_node,
            used_mib,
            offers,
        });
    }
    // Group by profile.
    let mut profiles: BTreeMap<(String, Framework, String), Profile> = BTreeMap::new();
    for p in parents
        .iter()
        .filter(|p| !quarantine.is_quarantined(p.address))
    {
        for ((framework, id), (name, f, n)) in &p.offers {
            let e = profiles
                .entry((name.clone(), *framework, id.clone()))
                .or_insert_with(|| Profile {
                    name: name.clone(),
                    framework: *framework,
                    type_id: id.clone(),
                    framebuffer_mib: *f,
                    available: 0,
                    parents: Vec::new(),
                });
            e.available += n;
            e.parents.push(ParentAvailability {
                address: p.address,
                numa_node: p.numa_node,
                available: *n,
                used_framebuffer_mib: p.used_mib,
            });
        }
    }
    let mut profiles: Vec<Profile> = profiles.into_values().collect();
    for p in &mut profiles {
        p.parents.sort_by_key(|x| x.address);
    }
    profiles.sort_by(|a, b| {
        (a.framework, a.framebuffer_mib, &a.name).cmp(&(b.framework, b.framebuffer_mib, &b.name))
    });
    Catalogue { profiles }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_names_parse() {
        let t = "ID    : vGPU Name\n1147  : NVIDIA L40S-1Q\n1150  : NVIDIA L40S-4Q\n";
        assert_eq!(
            parse_creatable_types(t),
            [
                ("1147".to_owned(), "NVIDIA L40S-1Q".to_owned()),
                ("1150".to_owned(), "NVIDIA L40S-4Q".to_owned())
            ]
        );
        assert!(parse_creatable_types("ID    : vGPU Name\n").is_empty());
        assert_eq!(framebuffer_from_name("NVIDIA L40S-48Q"), Some(49152));
        assert_eq!(framebuffer_from_name("GRID T4-1B4"), Some(1024));
        assert_eq!(framebuffer_from_name("nonsense"), None);
        assert_eq!(
            framebuffer_from_description(
                "num_heads=4, frl_config=45, framebuffer=2048M, max_instance=8"
            ),
            Some(2048)
        );
    }
}
