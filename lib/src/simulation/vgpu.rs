//! The vGPU manager's reactions on a fake tree, for both frameworks.
//!
//! - Vendor-specific VFIO: a PF lists every type its model supports in [`SIM_VGPU_TYPES`]
//!   (`ID : name` lines, as `creatable_vgpu_types`). A write to a VF's
//!   `nvidia/current_vgpu_type` assigns the type (or `0` releases it) and then every VF of the PF
//!   is listed again: a VF with a type lists nothing (header only); a free VF lists the types
//!   that fit the PF's free framebuffer (its total is its largest type's), and, once any vGPU
//!   exists on the PF, only that same type (the default time-sliced mode is homogeneous). The VF's
//!   `/dev/vfio/<group>` appears with the type and goes with it.
//! - mdev: after a create or remove, each type of the parent is recounted from its
//!   `description`'s `max_instance`: the type in use offers `max - used`, the others 0.
//!
//! The flag `vgpu-write-ignored` in the marker file makes a `current_vgpu_type` write succeed
//! without effect (the read-back then differs).

use std::fs;
use std::io;
use std::path::Path;

use super::has_flag;
use crate::pci::{PciAddress, Sysfs};
use crate::vgpu::{framebuffer_from_name, parse_creatable_types};

/// In a simulated tree: in a PF's directory, every vGPU type its model supports.
pub const SIM_VGPU_TYPES: &str = ".sim-vgpu-types";

const HEADER: &str = "ID    : vGPU Name\n";

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn current(sysfs: &Sysfs, vf: PciAddress) -> String {
    fs::read_to_string(sysfs.device_dir(vf).join("nvidia/current_vgpu_type"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".into())
}

fn siblings(pf_dir: &Path) -> Vec<PciAddress> {
    let mut out: Vec<PciAddress> = fs::read_dir(pf_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("virtfn"))
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|t| t.file_name()?.to_str()?.parse().ok())
        .collect();
    out.sort();
    out
}

/// A write of `value` to `vf`'s `nvidia/current_vgpu_type`.
pub(super) fn set_type(
    sysfs: &Sysfs,
    dev_dir: &Path,
    vf: PciAddress,
    value: &str,
) -> io::Result<()> {
    let dir = sysfs.device_dir(vf);
    let pf_dir = fs::canonicalize(dir.join("physfn")).map_err(|_| errno(libc::ENODEV))?;
    let types = parse_creatable_types(&fs::read_to_string(pf_dir.join(SIM_VGPU_TYPES))?);
    let value = value.trim();
    if has_flag(sysfs.root(), "vgpu-write-ignored") {
        return Ok(());
    }
    let now = current(sysfs, vf);
    if value == "0" {
        if now == "0" {
            return Ok(());
        }
    } else {
        if now != "0" {
            return Err(errno(libc::EBUSY));
        }
        let table = parse_creatable_types(
            &fs::read_to_string(dir.join("nvidia/creatable_vgpu_types")).unwrap_or_default(),
        );
        if !table.iter().any(|(id, _)| id == value) {
            return Err(errno(libc::EINVAL));
        }
    }
    fs::write(dir.join("nvidia/current_vgpu_type"), format!("{value}\n"))?;
    if has_flag(sysfs.root(), "iommufd-only") {
        if value == "0" {
            super::remove_cdevs(dev_dir, &dir);
        } else {
            super::add_cdev(dev_dir, &dir)?;
        }
    } else if let Some(group) = sysfs.iommu_group(vf) {
        let node = dev_dir.join("vfio").join(group.to_string());
        if value == "0" {
            let _ = fs::remove_file(node);
        } else {
            fs::create_dir_all(dev_dir.join("vfio"))?;
            fs::write(node, b"")?;
        }
    }
    relist(sysfs, &pf_dir, &types)
}

fn relist(sysfs: &Sysfs, pf_dir: &Path, types: &[(String, String)]) -> io::Result<()> {
    let fb = |id: &str| {
        types
            .iter()
            .find(|(t, _)| t == id)
            .and_then(|(_, n)| framebuffer_from_name(n))
            .unwrap_or(0)
    };
    let total = types.iter().map(|(id, _)| fb(id)).max().unwrap_or(0);
    let vfs = siblings(pf_dir);
    let assigned: Vec<String> = vfs
        .iter()
        .map(|v| current(sysfs, *v))
        .filter(|c| c != "0")
        .collect();
    let used: u64 = assigned.iter().map(|c| fb(c)).sum();
    let free = total.saturating_sub(used);
    for vf in vfs {
        let mut table = String::from(HEADER);
        if current(sysfs, vf) == "0" {
            for (id, name) in types {
                let f = fb(id);
                if f > 0 && f <= free && assigned.first().is_none_or(|a| a == id) {
                    table.push_str(&format!("{id}  : {name}\n"));
                }
            }
        }
        fs::write(
            sysfs.device_dir(vf).join("nvidia/creatable_vgpu_types"),
            table,
        )?;
    }
    Ok(())
}

/// Recount `available_instances` of every type of an mdev parent (see the module docs); a
/// type without `max_instance` in its description is left alone.
pub(super) fn recount_mdev(types_dir: &Path) -> io::Result<()> {
    let mut types = Vec::new();
    for t in fs::read_dir(types_dir)?.flatten() {
        let p = t.path();
        let max = fs::read_to_string(p.join("description"))
            .ok()
            .and_then(|d| {
                d.split([',', '\n']).find_map(|kv| {
                    kv.trim()
                        .strip_prefix("max_instance=")?
                        .trim()
                        .parse::<u32>()
                        .ok()
                })
            });
        let used = fs::read_dir(p.join("devices")).map_or(0, |d| d.count() as u32);
        types.push((p, max, used));
    }
    let in_use = types.iter().any(|t| t.2 > 0);
    for (p, max, used) in types {
        let Some(max) = max else { continue };
        let avail = if used > 0 || !in_use {
            max.saturating_sub(used)
        } else {
            0
        };
        fs::write(p.join("available_instances"), format!("{avail}\n"))?;
    }
    Ok(())
}
