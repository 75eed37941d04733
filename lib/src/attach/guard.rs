//! Guards before the host takes or releases a device: nobody may hold it open.
//!
//! A running VMM holds its devices' VFIO nodes (`/dev/vfio/<group>`, or
//! `/dev/vfio/devices/vfioX` on iommufd hosts); releasing such a device hot-unplugs it from the
//! VM. A CUDA process holds `/dev/nvidiaN`; unbinding `nvidia` then blocks in the kernel (under
//! our journal lock). So both are checked first, through [`super::holders`], and refused naming
//! the processes. An unreadable proc tree says nothing, so the guards fail closed.

use std::fs;
use std::path::PathBuf;

use super::holders::{Holder, holders, scan_readable};
use super::journal::DeviceRecord;
use super::{AttachError, Host};
use crate::pci::PciAddress;

/// nvidia-persistenced's command name as `/proc/N/comm` shows it (truncated to 15 bytes).
/// It holds every GPU while persistence is on; attach turns persistence off first.
pub(super) const PERSISTENCED_COMM: &str = "nvidia-persiste";

/// Where nvidia-smi is looked for: fixed absolute paths, never `PATH` (which a caller's
/// environment controls, and this runs as root).
pub const NVIDIA_SMI_PATHS: &[&str] = &[
    "/usr/bin/nvidia-smi",
    "/usr/local/bin/nvidia-smi",
    "/usr/local/nvidia/bin/nvidia-smi",
    "/opt/nvidia/bin/nvidia-smi",
    "/bin/nvidia-smi",
];

/// The first of `candidates` that is an executable file.
pub fn find_nvidia_smi(candidates: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

impl Host {
    /// A device's iommufd character devices: `/dev/vfio/devices/vfioX` for each `vfio-dev/vfioX`
    /// in its sysfs directory (present while it is on vfio-pci on a kernel with iommufd).
    pub(super) fn vfio_cdevs(&self, device: PciAddress) -> Vec<PathBuf> {
        crate::vfio::cdevs(&self.sysfs.device_dir(device), &self.dev_dir)
    }

    /// The VFIO nodes through which a VMM could hold `device`.
    pub(super) fn vfio_nodes(&self, device: PciAddress, group: Option<u32>) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = group
            .map(|g| self.dev_dir.join("vfio").join(g.to_string()))
            .into_iter()
            .collect();
        out.extend(self.vfio_cdevs(device));
        out
    }

    /// Processes holding any of `paths`; an unreadable proc tree is an error (fail closed).
    pub(super) fn held_by(&self, paths: &[PathBuf]) -> Result<Vec<Holder>, AttachError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        // A scan of another PID namespace's processes finds nobody: that is no answer.
        self.sees_host_processes()?;
        if !scan_readable(&self.proc_root) {
            return Err(AttachError::ProcUnreadable {
                path: self.proc_root.clone(),
            });
        }
        Ok(holders(&self.proc_root, paths))
    }

    /// Refuse to release `devices` while a process holds one of their VFIO nodes.
    pub(super) fn guard_release(&self, devices: &[DeviceRecord]) -> Result<(), AttachError> {
        for rec in devices.iter().filter(|d| !d.adopted) {
            let held = self.held_by(&self.vfio_nodes(rec.device, rec.iommu_group))?;
            if !held.is_empty() {
                return Err(AttachError::DeviceHeld {
                    device: rec.device,
                    holders: held,
                    fix: "stop that VM (or process) first; the device stays on vfio-pci",
                });
            }
        }
        Ok(())
    }

    /// The GPU's `/dev/nvidiaN`, from "Device Minor" in the driver's
    /// `/proc/driver/nvidia/gpus/<addr>/information`.
    fn nvidia_node(&self, device: PciAddress) -> Option<PathBuf> {
        let info = fs::read_to_string(
            self.nvidia_gpus
                .join(device.to_string())
                .join("information"),
        )
        .ok()?;
        let minor: u32 = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("Device Minor:"))?
            .trim()
            .parse()
            .ok()?;
        Some(self.dev_dir.join(format!("nvidia{minor}")))
    }

    /// Processes using an NVIDIA GPU: holders of its `/dev/nvidiaN`; when its minor is unknown,
    /// holders of `/dev/nvidiactl` and `/dev/nvidia-uvm` too (they may be using it).
    /// nvidia-persistenced is left out unless `with_persistenced`.
    pub(super) fn gpu_clients(
        &self,
        device: PciAddress,
        with_persistenced: bool,
    ) -> Result<Vec<Holder>, AttachError> {
        let paths = match self.nvidia_node(device) {
            Some(node) => vec![node],
            None => ["nvidiactl", "nvidia-uvm"]
                .iter()
                .map(|n| self.dev_dir.join(n))
                .collect(),
        };
        let mut held = self.held_by(&paths)?;
        if !with_persistenced {
            held.retain(|h| h.command != PERSISTENCED_COMM);
        }
        Ok(held)
    }
}

/// `holders` as one line: `pid 1 (a) holds X, pid 2 (b) holds Y`.
pub(super) fn describe(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(Holder::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_comes_from_the_fixed_list_never_path() {
        let dir = tempfile::tempdir().unwrap();
        let smi = dir.path().join("nvidia-smi");
        fs::write(&smi, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&smi, fs::Permissions::from_mode(0o755)).unwrap();
        // An executable that is not in the list is never found (the lookup has no PATH).
        assert_eq!(find_nvidia_smi(&["/nonexistent/nvidia-smi"]), None);
        let listed = smi.to_str().unwrap();
        assert_eq!(
            find_nvidia_smi(&["/nonexistent/nvidia-smi", listed]),
            Some(smi.clone())
        );
        fs::set_permissions(&smi, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_nvidia_smi(&[listed]), None, "not executable");
        assert!(NVIDIA_SMI_PATHS.iter().all(|p| p.starts_with('/')));
    }
}
