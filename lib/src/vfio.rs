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
    /// The VFIO container (`/dev/vfio/vfio`) cannot be opened.
    #[error("cannot open {path}; load the driver: modprobe vfio-pci")]
    Container {
        /// The container node.
        path: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
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
    /// The iommufd node (`/dev/iommu`) could not be opened for a cdev.
    #[error("cannot open {iommu} for the cdev {cdev}: load it: modprobe iommufd")]
    NoIommufd {
        /// The iommufd node.
        iommu: PathBuf,
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
            VfioCheckError::Container { .. }
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
///
/// Its devices directory is `/dev` unless [`RealVfio::new`] names another (the host's `/dev`
/// mounted elsewhere, or a test's empty directory). `vfio-ioctls` opens the legacy group
/// interface at `/dev/vfio` only, so under another directory a device is checked through its
/// cdev there, and one without a cdev is refused rather than checked against the wrong `/dev`.
#[derive(Debug, Clone)]
pub struct RealVfio {
    dev_dir: PathBuf,
}

impl Default for RealVfio {
    fn default() -> Self {
        RealVfio::new("/dev")
    }
}

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

/// The node a VMM opens for the device at `sysfs_device` in `group`: `dev_dir/vfio/<group>`,
/// or on a kernel with iommufd and no legacy group interface, the device's
/// `dev_dir/vfio/devices/vfioX`. `None` while neither exists.
pub fn present_node(sysfs_device: &Path, dev_dir: &Path, group: u32) -> Option<PathBuf> {
    let node = dev_dir.join("vfio").join(group.to_string());
    if node.exists() {
        return Some(node);
    }
    cdevs(sysfs_device, dev_dir)
        .into_iter()
        .find(|c| c.exists())
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
    /// The check of the nodes under `dev_dir` (`vfio/`, `vfio/devices/`, `iommu`).
    pub fn new(dev_dir: impl Into<PathBuf>) -> RealVfio {
        RealVfio {
            dev_dir: dev_dir.into(),
        }
    }

    /// Under a devices directory other than `/dev`, where `vfio-ioctls` cannot follow: the
    /// container must open there, and then the device needs a cdev there.
    fn verify_elsewhere(
        &self,
        sysfs_device: &Path,
        group: u32,
    ) -> Result<VfioReport, VfioCheckError> {
        let container = self.dev_dir.join("vfio/vfio");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&container)
            .map_err(|source| VfioCheckError::Container {
                path: container.clone(),
                source,
            })?;
        match cdevs(sysfs_device, &self.dev_dir).first() {
            Some(cdev) => self.verify_cdev(sysfs_device, cdev),
            None => Err(VfioCheckError::Device {
                device: sysfs_device.to_owned(),
                detail: format!(
                    "group {group} has no VFIO device cdev under {dir}/vfio/devices, and the \
                     group interface opens /dev/vfio only: check it with the devices directory \
                     /dev, or on a kernel with VFIO device cdevs",
                    dir = self.dev_dir.display()
                ),
            }),
        }
    }

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
        let iommu_path = self.dev_dir.join("iommu");
        let iommu = rw()
            .open(&iommu_path)
            .map_err(|source| VfioCheckError::NoIommufd {
                iommu: iommu_path.clone(),
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
        use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};
        if self.dev_dir != Path::new("/dev") {
            return self.verify_elsewhere(sysfs_device, group);
        }
        if !self.dev_dir.join("vfio").join(group.to_string()).exists()
            && let Some(cdev) = cdevs(sysfs_device, &self.dev_dir).first()
        {
            return self.verify_cdev(sysfs_device, cdev);
        }
        let container = VfioContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(source) => VfioCheckError::Container {
                path: self.dev_dir.join("vfio/vfio"),
                source,
            },
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
        let err = RealVfio::default()
            .verify_cdev(&device, &missing)
            .unwrap_err();
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
    }

    /// A devices directory without VFIO (an empty one here, so the test runs the same on every
    /// host): the check names the container it looked for and the module to load.
    #[test]
    fn real_check_without_vfio_names_the_module_to_load() {
        let dev = tempfile::tempdir().unwrap();
        let err = RealVfio::new(dev.path())
            .verify(Path::new("/sys/bus/pci/devices/0000:00:00.0"), 0)
            .unwrap_err();
        assert!(matches!(err, VfioCheckError::Container { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("modprobe vfio-pci"), "{text}");
        let container = dev.path().join("vfio/vfio");
        assert!(text.contains(container.to_str().unwrap()), "{text}");
    }

    /// Under another devices directory the check follows it: a device without a cdev there is
    /// refused (vfio-ioctls would open /dev/vfio instead), one with a cdev is opened there.
    #[test]
    fn real_check_under_another_dev_dir_opens_nothing_under_dev() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("dev");
        std::fs::create_dir_all(dev.join("vfio/devices")).unwrap();
        std::fs::write(dev.join("vfio/vfio"), b"").unwrap();
        let device = root.path().join("0000:01:00.0");
        std::fs::create_dir_all(&device).unwrap();
        let err = RealVfio::new(&dev).verify(&device, 12).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, VfioCheckError::Device { .. }) && text.contains("no VFIO device cdev"),
            "{text}"
        );
        // With a cdev: it is the node opened (a plain file here, so the bind fails naming it).
        std::fs::create_dir_all(device.join("vfio-dev/vfio3")).unwrap();
        std::fs::write(dev.join("vfio/devices/vfio3"), b"").unwrap();
        let err = RealVfio::new(&dev).verify(&device, 12).unwrap_err();
        let iommu = dev.join("iommu");
        assert!(
            err.to_string().contains(iommu.to_str().unwrap()),
            "the iommufd under the devices directory: {err}"
        );
    }
}
