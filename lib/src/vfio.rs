//! `vfio`: after a bind, check from userspace what a VMM will do with the device.
//!
//! [`RealVfio`] uses `vfio-ioctls`: open `/dev/vfio/vfio` (API version, type-1 v2 IOMMU), open
//! the group (viable flag), set container and IOMMU, get the device fd, then read its info
//! (regions, irqs, reset flag) with `VFIO_DEVICE_GET_INFO` over `vfio-bindings`' struct.
//! Tests on fake trees use the simulated check (feature `simulation`).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_TYPE, vfio_device_info,
};

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

// `VFIO_DEVICE_GET_INFO` is `_IO(VFIO_TYPE, VFIO_BASE + 7)` in `<linux/vfio.h>`: the kernel
// encodes no size in it, hence the `_bad` form.
nix::ioctl_readwrite_bad!(
    /// `ioctl(fd, VFIO_DEVICE_GET_INFO, info)`.
    vfio_device_get_info,
    nix::request_code_none!(VFIO_TYPE, VFIO_BASE + 7),
    vfio_device_info
);

/// `VFIO_DEVICE_GET_INFO` on an open VFIO device fd.
#[allow(unsafe_code)]
fn device_get_info(fd: RawFd) -> std::io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: std::mem::size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `fd` is an open VFIO device fd owned by the caller for the duration of the call,
    // and `info` is a properly sized, writable `vfio_device_info` with `argsz` set.
    unsafe { vfio_device_get_info(fd, &mut info) }.map_err(std::io::Error::from)?;
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
}
