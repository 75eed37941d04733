//! The VFIO check on a fake tree.

use std::fs;
use std::path::{Path, PathBuf};

use super::take_fault;
use crate::vfio::{VfioCheckError, VfioReport, VfioVerifier};

/// The check on a simulated tree: the group node exists and the device is on vfio-pci.
/// A `fail-once verify` line in the marker file makes one check fail.
#[derive(Debug, Clone)]
pub struct SimulatedVfio {
    /// The fake sysfs root.
    pub sysfs_root: PathBuf,
    /// The fake dev directory.
    pub dev_dir: PathBuf,
}

impl VfioVerifier for SimulatedVfio {
    fn verify(&self, sysfs_device: &Path, group: u32) -> Result<VfioReport, VfioCheckError> {
        if take_fault(&self.sysfs_root, "verify") {
            return Err(VfioCheckError::Device {
                device: sysfs_device.to_owned(),
                detail: "injected failure".into(),
            });
        }
        // iommufd-only: the device's own cdev instead of the group's node.
        let cdev = fs::read_dir(sysfs_device.join("vfio-dev"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                self.dev_dir
                    .join("vfio/devices")
                    .join(e.file_name())
                    .exists()
            });
        if !cdev && !self.dev_dir.join("vfio").join(group.to_string()).exists() {
            // What opening the container reports where the node is missing.
            return Err(VfioCheckError::Container {
                path: self.dev_dir.join("vfio").join(group.to_string()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let on_vfio = fs::read_link(sysfs_device.join("driver"))
            .ok()
            .and_then(|t| {
                t.file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| crate::pci::variant::is_vfio_driver(&self.sysfs_root, n))
            })
            .unwrap_or(false);
        let is_mdev = sysfs_device.join("mdev_type").exists();
        // A vendor-VFIO VF stays on nvidia: it is a VFIO device once it has a vGPU type.
        let is_vgpu_vf = fs::read_to_string(sysfs_device.join("nvidia/current_vgpu_type"))
            .is_ok_and(|t| t.trim() != "0");
        if !on_vfio && !is_mdev && !is_vgpu_vf {
            return Err(VfioCheckError::NotViable { group });
        }
        Ok(VfioReport {
            regions: 9,
            irqs: 5,
            reset: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_check_needs_the_node_and_vfio_pci() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        let device = dir.path().join("sys/bus/pci/devices/0000:01:00.0");
        fs::create_dir_all(&device).unwrap();
        fs::create_dir_all(dev.join("vfio")).unwrap();
        let check = SimulatedVfio {
            sysfs_root: dir.path().join("sys"),
            dev_dir: dev.clone(),
        };
        assert!(matches!(
            check.verify(&device, 4),
            Err(VfioCheckError::Container { .. })
        ));
        fs::write(dev.join("vfio/4"), "").unwrap();
        assert!(matches!(
            check.verify(&device, 4),
            Err(VfioCheckError::NotViable { group: 4 })
        ));
        let driver = dir.path().join("sys/bus/pci/drivers/vfio-pci");
        fs::create_dir_all(&driver).unwrap();
        std::os::unix::fs::symlink(&driver, device.join("driver")).unwrap();
        assert!(check.verify(&device, 4).is_ok());
    }
}
