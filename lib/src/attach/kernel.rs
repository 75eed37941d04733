//! Sysfs writes go through [`Kernel`], so that tests can run against a kernel that reacts.
//!
//! On a real host ([`RealKernel`]) a write is a plain write to the sysfs attribute and Linux does
//! the rest. A fake tree marks itself as simulated with the file [`SIMULATION_MARKER`] in its
//! root (sysfs itself cannot hold such a file, so `/sys` always gets the real kernel); then
//! [`SimulatedKernel`] performs the kernel's reaction on plain files: it moves the `driver`
//! link, stores `driver_override`, creates `<dev>/vfio/<group>` as a regular file, creates and
//! removes mdev directories. Because all state lives in files, the simulation works across
//! processes (crash tests kill the writer mid-transaction).
//!
//! Failure injection: a line `fail-once <attr>` in the marker file makes the next write to an
//! attribute named `<attr>` (`driver_override`, `unbind`, `bind`, `drivers_probe`, `create`,
//! `remove`, `reset`, or `verify` for the VFIO check) fail with EIO; the line is consumed
//! (`fail-once <attr> after K` lets K writes pass first). A line
//! `no-vfio-node` stops the simulation from creating `/dev/vfio/<group>`; `nvidia-no-gpu` makes
//! the `nvidia` driver not take a GPU bound to it (no [`SIM_NVIDIA_GPUS`] entry). `reset`,
//! `reset_method` and `d3cold_allowed` writes are kept in the device's files.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use crate::pci::{PciAddress, Sysfs, valid_driver_name};

/// The file that marks a fake sysfs root as simulated.
pub const SIMULATION_MARKER: &str = ".gpu-passthrough-simulated";

/// In a simulated tree: a device's default driver, which `drivers_probe` binds when no
/// `driver_override` is set (the kernel finds it by ID matching).
pub const SIM_DEFAULT_DRIVER: &str = ".sim-default-driver";

/// In a simulated tree: the reset methods used on a device, one line per `reset` write.
pub const SIM_RESET_LOG: &str = ".sim-resets";

/// In a simulated tree: stands for `/proc/driver/nvidia/gpus/`: a device bound to `nvidia` gets
/// an entry, unless the marker file has the line `nvidia-no-gpu` (the driver did not take it).
pub const SIM_NVIDIA_GPUS: &str = ".sim-nvidia-gpus";

/// Where sysfs attribute writes go.
pub trait Kernel: Send + Sync {
    /// Write `value` to the attribute at `path`, as `echo -n value > path` would.
    fn write_attr(&self, path: &Path, value: &str) -> io::Result<()>;

    /// Whether this is the simulation (no processes are run, no real devices touched).
    fn is_simulated(&self) -> bool {
        false
    }
}

/// The real kernel: a single write to the attribute file.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealKernel;

impl Kernel for RealKernel {
    fn write_attr(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
}

/// Pick the kernel for a sysfs root: simulated when the root holds [`SIMULATION_MARKER`].
pub fn kernel_for(sysfs_root: &Path, dev_dir: &Path) -> Box<dyn Kernel> {
    if is_simulated_root(sysfs_root) {
        Box::new(SimulatedKernel::new(sysfs_root, dev_dir))
    } else {
        Box::new(RealKernel)
    }
}

/// Whether `sysfs_root` is a simulated tree.
pub fn is_simulated_root(sysfs_root: &Path) -> bool {
    fs::symlink_metadata(sysfs_root.join(SIMULATION_MARKER)).is_ok_and(|m| m.is_file())
}

/// Consume a `fail-once <attr>` line from the marker file; true if the write must fail.
/// `fail-once <attr> after K` lets K more writes pass first (the line counts down).
pub fn take_fault(sysfs_root: &Path, attr: &str) -> bool {
    let marker = sysfs_root.join(SIMULATION_MARKER);
    let Ok(text) = fs::read_to_string(&marker) else {
        return false;
    };
    let mut fail = false;
    let mut matched = false;
    let mut kept: Vec<String> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["fail-once", a] if !matched && a == attr => {
                matched = true;
                fail = true;
            }
            ["fail-once", a, "after", k] if !matched && a == attr => {
                matched = true;
                match k.parse::<u32>() {
                    Ok(0) | Err(_) => fail = true,
                    Ok(k) => kept.push(format!("fail-once {a} after {}", k - 1)),
                }
            }
            _ => kept.push(line.to_owned()),
        }
    }
    if matched {
        let _ = fs::write(&marker, kept.join("\n") + "\n");
    }
    fail
}

fn has_flag(sysfs_root: &Path, flag: &str) -> bool {
    fs::read_to_string(sysfs_root.join(SIMULATION_MARKER))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == flag))
}

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
        symlink(&driver_dir, dev.join("driver"))?;
        let _ = symlink(&dev, driver_dir.join(address.to_string()));
        if driver == "nvidia" && !has_flag(self.sysfs.root(), "nvidia-no-gpu") {
            fs::create_dir_all(self.sysfs.root().join(SIM_NVIDIA_GPUS).join(address.to_string()))?;
        }
        if driver == "vfio-pci"
            && let Some(group) = self.sysfs.iommu_group(address)
            && !has_flag(self.sysfs.root(), "no-vfio-node")
        {
            let node_dir = self.dev_dir.join("vfio");
            fs::create_dir_all(&node_dir)?;
            fs::write(node_dir.join(group.to_string()), b"")?;
        }
        Ok(())
    }

    fn unbind(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        if self.sysfs.driver(address).as_deref() != Some(driver) {
            return Err(errno(libc::ENODEV));
        }
        fs::remove_file(self.sysfs.device_dir(address).join("driver"))?;
        let _ = fs::remove_dir(self.sysfs.root().join(SIM_NVIDIA_GPUS).join(address.to_string()));
        let _ = fs::remove_file(self.sysfs.driver_dir(driver).join(address.to_string()));
        if driver == "vfio-pci"
            && let Some(group) = self.sysfs.iommu_group(address)
        {
            let still_used = self
                .sysfs
                .group_members(group)
                .unwrap_or_default()
                .into_iter()
                .any(|m| self.sysfs.driver(m).as_deref() == Some("vfio-pci"));
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
            return Err(errno(libc::ENOTTY));
        };
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SIM_RESET_LOG))?;
        writeln!(log, "{method}")
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
        fs::write(&avail_path, format!("{}\n", avail - 1))
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
        let avail_path = type_dir.join("available_instances");
        let avail: u32 = fs::read_to_string(&avail_path)?.trim().parse().unwrap_or(0);
        fs::write(&avail_path, format!("{}\n", avail + 1))
    }
}

impl Kernel for SimulatedKernel {
    fn is_simulated(&self) -> bool {
        true
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
            ["bus", "pci", "devices", addr, attr @ ("reset_method" | "d3cold_allowed")] => {
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
            _ => Err(errno(libc::EACCES)),
        }
    }
}
