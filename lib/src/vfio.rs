//! `vfio`: after a bind, check from userspace what a VMM will do with the device.
//!
//! [`RealVfio`] uses `vfio-ioctls`: open `/dev/vfio/vfio` (API version, type-1 v2 IOMMU), open
//! the group (viable flag), set container and IOMMU, get the device fd, then read its info
//! (regions, irqs, reset flag) with `VFIO_DEVICE_GET_INFO` over `vfio-bindings`' struct.
//! On a kernel with iommufd and no legacy group interface (no `/dev/vfio/<group>`), the device's
//! own `/dev/vfio/devices/vfioX` is opened instead, bound to an iommufd (`/dev/iommu`, which also
//! claims the group's DMA ownership, so a group that is not viable fails here) and asked the
//! same `VFIO_DEVICE_GET_INFO`. Tests on fake trees use the simulated check (feature
//! `simulation`).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_TYPE, vfio_device_bind_iommufd, vfio_device_info,
};
pub use vfio_ioctls::VfioError;

use crate::outcome::{Classify, Outcome};

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
    #[error("cannot open /dev/vfio/vfio; load the driver: modprobe vfio-pci")]
    Container(#[source] std::io::Error),
    /// The type-1 IOMMU backend is missing.
    #[error("the VFIO container has no type-1 IOMMU; load it: modprobe vfio_iommu_type1")]
    NoType1(#[source] VfioError),
    /// The group is not viable: some member is bound to a host driver.
    #[error(
        "IOMMU group {group} is not viable: bind every member of /sys/kernel/iommu_groups/{group}/devices to vfio-pci (or leave it driverless)"
    )]
    NotViable {
        /// The group.
        group: u32,
    },
    /// The device could not be opened through its group.
    #[error("cannot open {device} through VFIO")]
    Open {
        /// The device's sysfs path.
        device: PathBuf,
        /// What `vfio-ioctls` said.
        #[source]
        source: VfioError,
    },
    /// The device's iommufd cdev could not be opened.
    #[error("cannot open the VFIO cdev {cdev} of {device}")]
    Cdev {
        /// The device's sysfs path.
        device: PathBuf,
        /// The cdev.
        cdev: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// `/dev/iommu` could not be opened for a cdev.
    #[error("cannot open /dev/iommu for the cdev {cdev}: load it: modprobe iommufd")]
    NoIommufd {
        /// The cdev.
        cdev: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused to bind the cdev to the iommufd.
    #[error(
        "VFIO_DEVICE_BIND_IOMMUFD of {cdev} failed (EBUSY: in use, or a member of its IOMMU group is on a host driver)"
    )]
    BindIommufd {
        /// The cdev.
        cdev: PathBuf,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// The device did not answer `VFIO_DEVICE_GET_INFO`.
    #[error("VFIO_DEVICE_GET_INFO on {device} failed")]
    GetInfo {
        /// The device's sysfs path (or its cdev).
        device: PathBuf,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// Any other failure, with the device; no lower error to carry.
    #[error("VFIO check of {device} failed: {detail}")]
    Device {
        /// The device's sysfs path.
        device: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl Classify for VfioCheckError {
    fn outcome(&self) -> Outcome {
        match self {
            VfioCheckError::Container(_)
            | VfioCheckError::NoType1(_)
            | VfioCheckError::NotViable { .. }
            | VfioCheckError::Open { .. }
            | VfioCheckError::Cdev { .. }
            | VfioCheckError::NoIommufd { .. }
            | VfioCheckError::BindIommufd { .. }
            | VfioCheckError::GetInfo { .. }
            | VfioCheckError::Device { .. } => Outcome::Failed,
        }
    }
}

/// Checks a device bound to vfio-pci the way a VMM will use it.
pub trait VfioVerifier: Send + Sync {
    /// Verify the device at `sysfs_device` (its sysfs directory) in IOMMU group `group`.
    fn verify(&self, sysfs_device: &Path, group: u32) -> Result<VfioReport, VfioCheckError>;
}

/// The real check through `vfio-ioctls` (needs `/dev/vfio/vfio` and a real IOMMU group), or
/// through the device's iommufd cdev and `/dev/iommu` on a kernel without group nodes.
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

// `VFIO_DEVICE_BIND_IOMMUFD` is `_IO(VFIO_TYPE, VFIO_BASE + 18)`; the kernel writes `out_devid`.
nix::ioctl_readwrite_bad!(
    /// `ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, bind)`.
    vfio_device_bind_iommufd_ioctl,
    nix::request_code_none!(VFIO_TYPE, VFIO_BASE + 18),
    vfio_device_bind_iommufd
);

/// `VFIO_DEVICE_BIND_IOMMUFD` of an open VFIO device cdev to an open `/dev/iommu`.
#[allow(unsafe_code)]
fn device_bind_iommufd(device: RawFd, iommufd: RawFd) -> std::io::Result<()> {
    let mut bind = vfio_device_bind_iommufd {
        argsz: std::mem::size_of::<vfio_device_bind_iommufd>() as u32,
        flags: 0,
        iommufd,
        ..Default::default()
    };
    // SAFETY: both fds are open and owned by the caller for the duration of the call, and
    // `bind` is a properly sized, writable `vfio_device_bind_iommufd` with `argsz` set.
    unsafe { vfio_device_bind_iommufd_ioctl(device, &mut bind) }.map_err(std::io::Error::from)?;
    Ok(())
}

/// The device's iommufd cdevs (`/dev/vfio/devices/vfioX` for each `vfio-dev/vfioX` in its
/// sysfs directory), in name order.
pub(crate) fn cdevs(sysfs_device: &Path, dev_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(sysfs_device.join("vfio-dev"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let n = name.strip_prefix("vfio")?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| dev_dir.join("vfio/devices").join(name))
        })
        .collect();
    out.sort();
    out
}

impl RealVfio {
    /// The check through the device's iommufd cdev (kernels without the legacy group node).
    fn verify_cdev(&self, sysfs_device: &Path, cdev: &Path) -> Result<VfioReport, VfioCheckError> {
        let rw = || {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true);
            o
        };
        let device = rw().open(cdev).map_err(|source| VfioCheckError::Cdev {
            device: sysfs_device.to_owned(),
            cdev: cdev.to_owned(),
            source,
        })?;
        let iommu = rw()
            .open("/dev/iommu")
            .map_err(|source| VfioCheckError::NoIommufd {
                cdev: cdev.to_owned(),
                source,
            })?;
        device_bind_iommufd(device.as_raw_fd(), iommu.as_raw_fd()).map_err(|source| {
            VfioCheckError::BindIommufd {
                cdev: cdev.to_owned(),
                source,
            }
        })?;
        let info =
            device_get_info(device.as_raw_fd()).map_err(|source| VfioCheckError::GetInfo {
                device: cdev.to_owned(),
                source,
            })?;
        Ok(VfioReport {
            regions: info.num_regions,
            irqs: info.num_irqs,
            reset: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
        })
    }
}

impl VfioVerifier for RealVfio {
    fn verify(&self, sysfs_device: &Path, group: u32) -> Result<VfioReport, VfioCheckError> {
        use vfio_ioctls::{VfioContainer, VfioDevice};
        let dev = Path::new("/dev");
        if !dev.join("vfio").join(group.to_string()).exists()
            && let Some(cdev) = cdevs(sysfs_device, dev).first()
        {
            return self.verify_cdev(sysfs_device, cdev);
        }
        let container = VfioContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(io) => VfioCheckError::Container(io),
            other => VfioCheckError::NoType1(other),
        })?;
        let device =
            VfioDevice::new(sysfs_device, Arc::new(container), false).map_err(|e| match e {
                VfioError::GroupViable => VfioCheckError::NotViable { group },
                VfioError::ContainerSetIOMMU(_)
                | VfioError::VfioExtension
                | VfioError::VfioType1V2 => VfioCheckError::NoType1(e),
                source => VfioCheckError::Open {
                    device: sysfs_device.to_owned(),
                    source,
                },
            })?;
        let info =
            device_get_info(device.as_raw_fd()).map_err(|source| VfioCheckError::GetInfo {
                device: sysfs_device.to_owned(),
                source,
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
    fn an_iommufd_host_is_checked_through_the_devices_cdev() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("0000:01:00.0");
        for sub in ["vfio-dev/vfio7", "vfio-dev/vfio12", "vfio-dev/vfiox"] {
            std::fs::create_dir_all(device.join(sub)).unwrap();
        }
        assert_eq!(
            cdevs(&device, Path::new("/dev")),
            [
                PathBuf::from("/dev/vfio/devices/vfio12"),
                PathBuf::from("/dev/vfio/devices/vfio7")
            ]
        );
        assert!(cdevs(&dir.path().join("none"), Path::new("/dev")).is_empty());
        // A cdev that cannot be opened is named in the failure.
        let missing = dir.path().join("vfio-devices-vfio7");
        let err = RealVfio.verify_cdev(&device, &missing).unwrap_err();
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
    }

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
