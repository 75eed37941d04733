//! The kernel's reactions to sysfs writes, performed on a fake tree.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use super::vgpu;
use super::{
    SIM_DEFAULT_DRIVER, SIM_MODULES_ALIAS, SIM_NVIDIA_GPUS, SIM_REGISTERS, SIM_RESET_LOG,
    SIM_SRIOV_LOG, has_flag, take_fault,
};
use crate::kernel::Kernel;
use crate::pci::variant::is_vfio_driver;
use crate::pci::{PciAddress, Sysfs, valid_driver_name};

/// The kernel's reactions, performed on a fake tree (see the module docs).
#[derive(Debug, Clone)]
pub struct SimulatedKernel {
    sysfs: Sysfs,
    dev_dir: PathBuf,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl SimulatedKernel {
    /// A simulation over the fake tree at `sysfs_root`, creating VFIO nodes under `dev_dir`.
    pub fn new(sysfs_root: &Path, dev_dir: &Path) -> Self {
        SimulatedKernel {
            sysfs: Sysfs::new(sysfs_root),
            dev_dir: dev_dir.to_owned(),
        }
    }

    fn parse_addr(value: &str) -> io::Result<PciAddress> {
        value.trim().parse().map_err(|_| errno(libc::EINVAL))
    }

    fn bind(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        let dev = self.sysfs.device_dir(address);
        let driver_dir = self.sysfs.driver_dir(driver);
        if !driver_dir.is_dir() {
            return Err(errno(libc::ENODEV));
        }
        if self.sysfs.driver(address).is_some() {
            return Err(errno(libc::EBUSY));
        }
        // Like the kernel's match: a `driver_override` naming another driver refuses the bind.
        if self
            .sysfs
            .driver_override(address)
            .is_some_and(|o| o != driver)
        {
            return Err(errno(libc::ENODEV));
        }
        symlink(&driver_dir, dev.join("driver"))?;
        if driver == "nvidia" && !has_flag(self.sysfs.root(), "nvidia-no-gpu") {
            fs::create_dir_all(
                self.sysfs
                    .root()
                    .join(SIM_NVIDIA_GPUS)
                    .join(address.to_string()),
            )?;
        }
        let _ = symlink(&dev, driver_dir.join(address.to_string()));
        let vfio = is_vfio_driver(self.sysfs.root(), driver);
        if vfio && has_flag(self.sysfs.root(), "iommufd-only") {
            return self.add_cdev(&dev);
        }
        if vfio
            && let Some(group) = self.sysfs.iommu_group(address)
            && !has_flag(self.sysfs.root(), "no-vfio-node")
        {
            let node_dir = self.dev_dir.join("vfio");
            fs::create_dir_all(&node_dir)?;
            fs::write(node_dir.join(group.to_string()), b"")?;
        }
        Ok(())
    }

    fn add_cdev(&self, dev: &Path) -> io::Result<()> {
        super::add_cdev(&self.dev_dir, dev)
    }

    fn remove_cdevs(&self, dev: &Path) {
        super::remove_cdevs(&self.dev_dir, dev)
    }

    fn unbind(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        if self.sysfs.driver(address).as_deref() != Some(driver) {
            return Err(errno(libc::ENODEV));
        }
        let vfio = is_vfio_driver(self.sysfs.root(), driver);
        if vfio {
            self.remove_cdevs(&self.sysfs.device_dir(address));
        }
        fs::remove_file(self.sysfs.device_dir(address).join("driver"))?;
        let _ = fs::remove_dir(
            self.sysfs
                .root()
                .join(SIM_NVIDIA_GPUS)
                .join(address.to_string()),
        );
        let _ = fs::remove_file(self.sysfs.driver_dir(driver).join(address.to_string()));
        if vfio && let Some(group) = self.sysfs.iommu_group(address) {
            let still_used = self
                .sysfs
                .group_members(group)
                .unwrap_or_default()
                .into_iter()
                .any(|m| {
                    self.sysfs
                        .driver(m)
                        .is_some_and(|d| is_vfio_driver(self.sysfs.root(), &d))
                });
            if !still_used {
                let _ = fs::remove_file(self.dev_dir.join("vfio").join(group.to_string()));
            }
        }
        Ok(())
    }

    fn probe(&self, address: PciAddress) -> io::Result<()> {
        if self.sysfs.driver(address).is_some() {
            return Ok(());
        }
        let dev = self.sysfs.device_dir(address);
        let target = match self.sysfs.driver_override(address) {
            Some(o) => Some(o),
            None => fs::read_to_string(dev.join(SIM_DEFAULT_DRIVER))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
        };
        match target {
            // Like Linux: a probe that finds no driver is not an error.
            Some(d) if valid_driver_name(&d) && self.sysfs.driver_dir(&d).is_dir() => {
                self.bind(address, &d)
            }
            _ => Ok(()),
        }
    }

    /// `reset`: like the kernel, refused (ENOTTY) without a method; the method used (the first
    /// of `reset_method`) is appended to [`SIM_RESET_LOG`] in the device's directory.
    fn reset(&self, address: PciAddress) -> io::Result<()> {
        let dir = self.sysfs.device_dir(address);
        let methods = fs::read_to_string(dir.join("reset_method")).unwrap_or_default();
        let Some(method) = methods.split_whitespace().next() else {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        };
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SIM_RESET_LOG))?;
        writeln!(log, "{method}")
    }

    /// `sriov_numvfs`: like the kernel, a new non-zero count while VFs exist is refused
    /// (EBUSY: go through 0); the count is kept, and each write is appended to
    /// [`SIM_SRIOV_LOG`] in the device's directory.
    fn set_numvfs(&self, address: PciAddress, value: &str) -> io::Result<()> {
        let dir = self.sysfs.device_dir(address);
        let want: u32 = value.trim().parse().map_err(|_| errno(libc::EINVAL))?;
        let now: u32 = fs::read_to_string(dir.join("sriov_numvfs"))
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        if now != 0 && want != 0 && want != now {
            return Err(errno(libc::EBUSY));
        }
        fs::write(dir.join("sriov_numvfs"), format!("{want}\n"))?;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SIM_SRIOV_LOG))?;
        writeln!(log, "{want}")
    }

    fn create_mdev(&self, type_dir: &Path, uuid: &str) -> io::Result<()> {
        let uuid = uuid.trim();
        if uuid.is_empty() || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(errno(libc::EINVAL));
        }
        let avail_path = type_dir.join("available_instances");
        let avail: u32 = fs::read_to_string(&avail_path)?.trim().parse().unwrap_or(0);
        if avail == 0 {
            return Err(errno(libc::ENOSPC));
        }
        let parent = fs::canonicalize(type_dir.join("../.."))?;
        let mdev_dir = parent.join(uuid);
        fs::create_dir(&mdev_dir).map_err(|_| errno(libc::EEXIST))?;
        symlink(fs::canonicalize(type_dir)?, mdev_dir.join("mdev_type"))?;
        fs::write(mdev_dir.join("remove"), b"")?;
        let devices = type_dir.join("devices");
        fs::create_dir_all(&devices)?;
        symlink(&mdev_dir, devices.join(uuid))?;
        // A new IOMMU group for the mdev, as vfio-mdev gives each one.
        let groups = self.sysfs.root().join("kernel/iommu_groups");
        let group = (1000..)
            .find(|g: &u32| !groups.join(g.to_string()).exists())
            .unwrap_or(1000);
        let gdir = groups.join(group.to_string());
        fs::create_dir_all(gdir.join("devices"))?;
        symlink(&gdir, mdev_dir.join("iommu_group"))?;
        symlink(&mdev_dir, gdir.join("devices").join(uuid))?;
        let bus = self.sysfs.root().join("bus/mdev/devices");
        fs::create_dir_all(&bus)?;
        symlink(&mdev_dir, bus.join(uuid))?;
        if !has_flag(self.sysfs.root(), "no-vfio-node") {
            fs::create_dir_all(self.dev_dir.join("vfio"))?;
            fs::write(self.dev_dir.join("vfio").join(group.to_string()), b"")?;
        }
        fs::write(&avail_path, format!("{}\n", avail - 1))?;
        vgpu::recount_mdev(&parent.join("mdev_supported_types"))
    }

    fn remove_mdev(&self, uuid: &str) -> io::Result<()> {
        let link = self.sysfs.root().join("bus/mdev/devices").join(uuid);
        let mdev_dir = fs::canonicalize(&link).map_err(|_| errno(libc::ENODEV))?;
        let type_dir = fs::canonicalize(mdev_dir.join("mdev_type"))?;
        if let Ok(gdir) = fs::canonicalize(mdev_dir.join("iommu_group")) {
            if let Some(g) = gdir.file_name() {
                let _ = fs::remove_file(self.dev_dir.join("vfio").join(g));
            }
            let _ = fs::remove_dir_all(&gdir);
        }
        fs::remove_dir_all(&mdev_dir)?;
        fs::remove_file(&link)?;
        let _ = fs::remove_file(type_dir.join("devices").join(uuid));
        let avail_path = type_dir.join("available_instances");
        let avail: u32 = fs::read_to_string(&avail_path)?.trim().parse().unwrap_or(0);
        fs::write(&avail_path, format!("{}\n", avail + 1))?;
        match type_dir.parent() {
            Some(types) => vgpu::recount_mdev(types),
            None => Ok(()),
        }
    }
}

impl Kernel for SimulatedKernel {
    fn is_simulated(&self) -> bool {
        true
    }

    /// [`SIM_MODULES_ALIAS`] in the tree's root (none: empty).
    fn modules_alias(&self) -> io::Result<String> {
        match fs::read_to_string(self.sysfs.root().join(SIM_MODULES_ALIAS)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            other => other,
        }
    }

    /// Like modprobe: a module is there when the tree has `module/<name>` (the test puts it
    /// there); any other is not found. A module whose directory holds [`SIM_REGISTERS`]
    /// registers the driver named there on load, as the kernel does (`bus/pci/drivers/NAME`
    /// with its `module` link).
    fn load_module(&self, module: &str) -> io::Result<()> {
        let name = module.replace('-', "_");
        let dir = self.sysfs.root().join("module").join(&name);
        if valid_driver_name(&name) && dir.is_dir() {
            if let Ok(driver) = fs::read_to_string(dir.join(SIM_REGISTERS))
                && valid_driver_name(driver.trim())
            {
                let d = self.sysfs.driver_dir(driver.trim());
                fs::create_dir_all(&d)?;
                for attr in ["bind", "unbind"] {
                    fs::write(d.join(attr), b"")?;
                }
                let _ = symlink(&dir, d.join("module"));
            }
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("modprobe: FATAL: Module {module} not found"),
            ))
        }
    }

    fn write_attr(&self, path: &Path, value: &str) -> io::Result<()> {
        let rel = path
            .strip_prefix(self.sysfs.root())
            .map_err(|_| errno(libc::EACCES))?;
        let parts: Vec<&str> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect();
        let attr = parts.last().copied().unwrap_or_default();
        if take_fault(self.sysfs.root(), attr) {
            return Err(errno(libc::EIO));
        }
        match parts[..] {
            ["bus", "pci", "devices", addr, "driver_override"] => {
                let address = Self::parse_addr(addr)?;
                let v = value.trim();
                let stored = if v.is_empty() { "(null)" } else { v };
                fs::write(
                    self.sysfs.device_dir(address).join("driver_override"),
                    format!("{stored}\n"),
                )
            }
            ["bus", "pci", "drivers", driver, "unbind"] => {
                self.unbind(Self::parse_addr(value)?, driver)
            }
            ["bus", "pci", "drivers", driver, "bind"] => {
                self.bind(Self::parse_addr(value)?, driver)
            }
            ["bus", "pci", "drivers_probe"] => self.probe(Self::parse_addr(value)?),
            ["bus", "pci", "devices", addr, "reset"] => self.reset(Self::parse_addr(addr)?),
            [
                "bus",
                "pci",
                "devices",
                addr,
                attr @ ("reset_method" | "d3cold_allowed"),
            ] => {
                let dir = self.sysfs.device_dir(Self::parse_addr(addr)?);
                fs::write(dir.join(attr), format!("{}\n", value.trim()))
            }
            [
                "bus",
                "pci",
                "devices",
                _,
                "mdev_supported_types",
                _,
                "create",
            ] => self.create_mdev(path.parent().unwrap_or(path), value),
            ["bus", "mdev", "devices", uuid, "remove"] => self.remove_mdev(uuid),
            ["bus", "pci", "devices", addr, "sriov_numvfs"] => {
                self.set_numvfs(Self::parse_addr(addr)?, value)
            }
            ["bus", "pci", "devices", addr, "nvidia", "current_vgpu_type"] => {
                vgpu::set_type(&self.sysfs, &self.dev_dir, Self::parse_addr(addr)?, value)
            }
            _ => Err(errno(libc::EACCES)),
        }
    }
}
