//! VFIO verification: after a bind, check from userspace what a VMM will do.
//!
//! [`RealVfio`] uses `vfio-ioctls`: open `/dev/vfio/vfio` (API version, type-1 v2 IOMMU), open
//! the group (viable flag), set container and IOMMU, get the device fd, then read its info
//! (regions, irqs, reset flag). Tests on fake trees use [`SimulatedVfio`].

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::kernel::take_fault;

/// What the VFIO check found for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioReport {
    /// Number of regions (BARs, ROM, config, VGA…).
    pub regions: u32,
    /// Number of interrupt types.
    pub irqs: u32,
    /// The device supports reset (`VFIO_DEVICE_FLAGS_RESET`).
    pub reset: bool,
}

/// Why a VFIO check failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioCheckError {
    /// `/dev/vfio/vfio` cannot be opened.
    #[error("cannot open /dev/vfio/vfio: {0}; load the driver: modprobe vfio-pci")]
    Container(String),
    /// The type-1 IOMMU backend is missing.
    #[error("the VFIO container has no type-1 IOMMU ({0}); load it: modprobe vfio_iommu_type1")]
    NoType1(String),
    /// The group is not viable: some member is bound to a host driver.
    #[error(
        "IOMMU group {group} is not viable: bind every member of /sys/kernel/iommu_groups/{group}/devices to vfio-pci (or leave it driverless)"
    )]
    NotViable {
        /// The group.
        group: u32,
    },
    /// Any other failure, with the device.
    #[error("VFIO check of {device} failed: {detail}")]
    Device {
        /// The device's sysfs path.
        device: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// Checks a device bound to vfio-pci the way a VMM will use it.
pub trait VfioVerifier: Send + Sync {
    /// Verify the device at `sysfs_device` (its sysfs directory) in IOMMU group `group`.
    fn verify(&self, sysfs_device: &Path, group: u32) -> Result<VfioReport, VfioCheckError>;
}

/// The real check through `vfio-ioctls` (needs `/dev/vfio/vfio` and a real IOMMU group).
#[derive(Debug, Default, Clone, Copy)]
pub struct RealVfio;

const VFIO_DEVICE_FLAGS_RESET: u32 = 1;
// VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE ';', VFIO_BASE 100 + 7).
const VFIO_DEVICE_GET_INFO: libc::c_ulong = ((b';' as libc::c_ulong) << 8) | 107;

/// `struct vfio_device_info` from `<linux/vfio.h>`.
#[repr(C)]
#[derive(Default)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    cap_offset: u32,
    pad: u32,
}

fn device_get_info(fd: RawFd) -> std::io::Result<DeviceInfo> {
    let mut info = DeviceInfo {
        argsz: std::mem::size_of::<DeviceInfo>() as u32,
        ..Default::default()
    };
    // SAFETY: `fd` is an open VFIO device fd owned by the caller for the duration of the call,
    // and `info` is a properly sized, writable `vfio_device_info` with `argsz` set.
    let ret = unsafe { libc::ioctl(fd, VFIO_DEVICE_GET_INFO as _, &mut info as *mut DeviceInfo) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

impl VfioVerifier for RealVfio {
    fn verify(&self, sysfs_device: &Path, group: u32) -> Result<VfioReport, VfioCheckError> {
        use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};
        let container = VfioContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(io) => VfioCheckError::Container(io.to_string()),
            other => VfioCheckError::NoType1(other.to_string()),
        })?;
        let device =
            VfioDevice::new(sysfs_device, Arc::new(container), false).map_err(|e| match e {
                VfioError::GroupViable => VfioCheckError::NotViable { group },
                VfioError::ContainerSetIOMMU(_)
                | VfioError::VfioExtension
                | VfioError::VfioType1V2 => VfioCheckError::NoType1(e.to_string()),
                other => VfioCheckError::Device {
                    device: sysfs_device.to_owned(),
                    detail: other.to_string(),
                },
            })?;
        let info = device_get_info(device.as_raw_fd()).map_err(|e| VfioCheckError::Device {
            device: sysfs_device.to_owned(),
            detail: format!("VFIO_DEVICE_GET_INFO: {e}"),
        })?;
        Ok(VfioReport {
            regions: info.num_regions,
            irqs: info.num_irqs,
            reset: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
        })
    }
}

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
        if !self.dev_dir.join("vfio").join(group.to_string()).exists() {
            return Err(VfioCheckError::Container(format!(
                "no {}/vfio/{group}",
                self.dev_dir.display()
            )));
        }
        let on_vfio = fs::read_link(sysfs_device.join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n == "vfio-pci"))
            .unwrap_or(false);
        let is_mdev = sysfs_device.join("mdev_type").exists();
        if !on_vfio && !is_mdev {
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
    fn real_check_without_vfio_names_the_module_to_load() {
        if Path::new("/dev/vfio/vfio").exists() {
            return; // a host with VFIO: the e2e guest covers this path
        }
        let err = RealVfio
            .verify(Path::new("/sys/bus/pci/devices/0000:00:00.0"), 0)
            .unwrap_err();
        assert!(matches!(err, VfioCheckError::Container(_)), "{err}");
        assert!(err.to_string().contains("modprobe vfio-pci"));
    }

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
            Err(VfioCheckError::Container(_))
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
