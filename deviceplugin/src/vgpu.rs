//! vGPUs the plugin serves: the ones the library created for the pool owner
//! (`gpu-passthrough attach --vgpu PROFILE --count N --owner device-plugin`), read from the
//! journal like the GPUs, so the plugin creates nothing and keeps no state of its own.
//!
//! KubeVirt takes a vendor-VFIO vGPU as a PCI host device (the VF's address in
//! `PCI_RESOURCE_<NAME>`) and an mdev as a mediated device (its UUID in
//! `MDEV_PCI_RESOURCE_<NAME>`). Resource names are the profile's name with white space as `_`
//! (`NVIDIA L40S-4Q` → `nvidia.com/NVIDIA_L40S-4Q`, `GRID T4-1Q` → `nvidia.com/GRID_T4-1Q`),
//! as kubevirt-gpu-device-plugin names them for both frameworks.

use std::path::{Path, PathBuf};

use gpu_passthrough::attach::journal::VgpuRecord;
use gpu_passthrough::pci::Sysfs;
use gpu_passthrough::vgpu::Framework;

use crate::Quarantine;
use crate::naming::{DOMAIN, ResourceKind};
use crate::served::{Problem, ServedDevice, switch_of};

/// The resource name of a profile.
pub fn resource_name(profile: &str) -> String {
    let name: Vec<&str> = profile.split_whitespace().collect();
    format!("{DOMAIN}/{}", name.join("_"))
}

/// Which environment variable KubeVirt reads for a framework's vGPUs.
pub fn kind(framework: Framework) -> ResourceKind {
    match framework {
        Framework::VendorVfio => ResourceKind::Pci,
        Framework::Mdev => ResourceKind::Mdev,
    }
}

/// The device ID given to the kubelet: the VF's address, or the mdev's UUID.
pub fn id(rec: &VgpuRecord) -> Option<String> {
    match rec.framework {
        Framework::VendorVfio => rec.vf.map(|a| a.to_string()),
        Framework::Mdev => rec.uuid.clone(),
    }
}

/// The vGPU's own sysfs directory (the VF, or the mdev).
fn sysfs_dir(sysfs: &Sysfs, rec: &VgpuRecord) -> Option<PathBuf> {
    match rec.framework {
        Framework::VendorVfio => rec.vf.map(|vf| sysfs.device_dir(vf)),
        Framework::Mdev => rec
            .uuid
            .as_ref()
            .map(|u| sysfs.root().join("bus/mdev/devices").join(u)),
    }
}

fn group_of(dir: &Path) -> Option<u32> {
    std::fs::read_link(dir.join("iommu_group"))
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// What is wrong with a served vGPU now: gone, another type on the VF, its group changed or
/// its node missing, or its parent GPU quarantined.
pub fn problems(
    sysfs: &Sysfs,
    dev_dir: &Path,
    rec: &VgpuRecord,
    quarantine: &dyn Quarantine,
) -> Vec<Problem> {
    let Some(dir) = sysfs_dir(sysfs, rec).filter(|d| d.exists()) else {
        return vec![Problem::Gone];
    };
    let mut out = Vec::new();
    if rec.framework == Framework::VendorVfio {
        let now = std::fs::read_to_string(dir.join("nvidia/current_vgpu_type"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        if now != rec.type_id {
            out.push(Problem::VgpuTypeChanged {
                recorded: rec.type_id.clone(),
                now,
            });
        }
    }
    let now = group_of(&dir);
    if now != rec.iommu_group || now.is_none() {
        out.push(Problem::GroupChanged {
            recorded: rec.iommu_group,
            now,
        });
    }
    // The group node, or on an iommufd-only host the VF's or mdev's own cdev.
    if let Some(g) = rec.iommu_group
        && gpu_passthrough::vfio::present_node(&dir, dev_dir, g).is_none()
    {
        out.push(Problem::NoVfioNode(
            dev_dir.join("vfio").join(g.to_string()),
        ));
    }
    // The parent only on the host's evidence; a VF also on its own tenants' faults.
    if quarantine.is_quarantined(rec.parent)
        || rec.vf.is_some_and(|vf| quarantine.is_quarantined(vf))
    {
        out.push(Problem::Quarantined);
    }
    out
}

/// A verified vGPU record as a served device (`None` while it is still being created).
pub(crate) fn served(
    sysfs: &Sysfs,
    dev_dir: &Path,
    rec: &VgpuRecord,
    quarantine: &dyn Quarantine,
) -> Option<(String, ServedDevice)> {
    if rec.step != gpu_passthrough::attach::journal::VgpuStep::Verified {
        return None;
    }
    let id = id(rec)?;
    // Topology is the parent GPU's: the VF or mdev sits on it.
    let parent = sysfs.device(rec.parent).ok();
    Some((
        resource_name(&rec.profile),
        ServedDevice {
            id,
            kind: kind(rec.framework),
            address: rec.vf.unwrap_or(rec.parent),
            group: rec.iommu_group,
            numa: parent.and_then(|p| p.numa_node),
            switch: switch_of(sysfs, rec.parent),
            problems: problems(sysfs, dev_dir, rec, quarantine),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_keep_the_profile_but_for_white_space() {
        assert_eq!(resource_name("NVIDIA L40S-4Q"), "nvidia.com/NVIDIA_L40S-4Q");
        assert_eq!(resource_name("GRID T4-1Q"), "nvidia.com/GRID_T4-1Q");
    }
}
