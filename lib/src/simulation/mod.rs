//! `simulation`: a kernel and a VFIO check that react on a fake sysfs tree, for tests and the
//! end-to-end harness. Compiled only with the cargo feature `simulation`, which the test crates
//! enable; a shipped build (`cargo build --release -p gpu-passthrough-cli`) has no way into it.
//!
//! A fake tree marks itself as simulated with the file [`SIMULATION_MARKER`] in its root (sysfs
//! itself cannot hold such a file, so `/sys` always gets the real kernel). Then
//! [`SimulatedKernel`] performs the kernel's reaction on plain files: it moves the `driver`
//! link, stores `driver_override`, creates `<dev>/vfio/<group>` as a regular file, creates and
//! removes mdev directories. Because all state lives in files, the simulation works across
//! processes (crash tests kill the writer mid-transaction).
//!
//! Failure injection: a line `fail-once <attr>` in the marker file makes the next write to an
//! attribute named `<attr>` (`driver_override`, `unbind`, `bind`, `drivers_probe`, `create`,
//! `remove`, `reset`, or `verify` for the VFIO check) fail with EIO; the line is consumed
//! (`fail-once <attr> after K` lets K writes pass first). A line
//! `no-vfio-node` stops the simulation from creating `/dev/vfio/<group>`; `iommufd-only` makes it a
//! kernel without the legacy group interface (`<dev>/vfio-dev/vfioN` and
//! `/dev/vfio/devices/vfioN` instead); `nvidia-no-gpu` makes
//! the `nvidia` driver not take a GPU bound to it (no [`SIM_NVIDIA_GPUS`] entry). `reset`,
//! `reset_method`, `d3cold_allowed` and `sriov_numvfs` writes are kept in the device's files.
//! vGPU writes (`current_vgpu_type`, mdev `create`/`remove`) get the vGPU manager's reactions
//! (see `vgpu.rs`). [`SIM_MODULES_ALIAS`] stands for the kernel's `modules.alias`; loading a
//! module succeeds when the tree has `module/<name>`; a driver is a VFIO driver when it is
//! vfio-pci or its module is among `module/vfio_pci_core/holders`, as on a real host.

mod kernel;
mod vfio;
mod vgpu;

use std::fs;
use std::path::Path;

pub use kernel::SimulatedKernel;
pub use vfio::SimulatedVfio;
pub use vgpu::SIM_VGPU_TYPES;

/// The file that marks a fake sysfs root as simulated.
pub const SIMULATION_MARKER: &str = ".gpu-passthrough-simulated";

/// In a simulated tree: a device's default driver, which `drivers_probe` binds when no
/// `driver_override` is set (the kernel finds it by ID matching).
pub const SIM_DEFAULT_DRIVER: &str = ".sim-default-driver";

/// In a simulated tree: the reset methods used on a device, one line per `reset` write.
pub const SIM_RESET_LOG: &str = ".sim-resets";

/// In a simulated tree: the values written to a PF's `sriov_numvfs`, one line per write.
pub const SIM_SRIOV_LOG: &str = ".sim-sriov-numvfs";

/// In a simulated tree: stands for `/proc/driver/nvidia/gpus/`: a device bound to `nvidia` has
/// an entry, unless the marker file has the line `nvidia-no-gpu` (the driver did not take it).
pub const SIM_NVIDIA_GPUS: &str = ".sim-nvidia-gpus";

/// In a simulated tree: stands for the running kernel's `modules.alias`
/// (`/lib/modules/$(uname -r)/modules.alias`), lines in the kernel's own format.
pub const SIM_MODULES_ALIAS: &str = ".sim-modules.alias";

/// In a simulated tree: in `module/<name>/`, the driver name the module registers when it is
/// loaded (a module not loaded yet: its driver appears on load).
pub const SIM_REGISTERS: &str = ".sim-registers";
/// In a fake sysfs root: the fabric manager's partitions in `fmpm -l`'s JSON; present, the
/// host runs shared-NVSwitch mode with [`crate::fabric::PartitionFile`] over it.
pub const SIM_FABRIC_PARTITIONS: &str = ".sim-fabric-partitions.json";

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

/// A kernel with iommufd and no legacy group interface: `<dev>/vfio-dev/vfioN` and
/// `/dev/vfio/devices/vfioN`, no `/dev/vfio/<group>`.
fn add_cdev(dev_dir: &Path, dev: &Path) -> std::io::Result<()> {
    let cdevs = dev_dir.join("vfio/devices");
    fs::create_dir_all(&cdevs)?;
    let n = (0..)
        .find(|n: &u32| !cdevs.join(format!("vfio{n}")).exists())
        .unwrap_or(0);
    fs::create_dir_all(dev.join("vfio-dev").join(format!("vfio{n}")))?;
    fs::write(cdevs.join(format!("vfio{n}")), b"")
}

/// Undo [`add_cdev`].
fn remove_cdevs(dev_dir: &Path, dev: &Path) {
    for e in fs::read_dir(dev.join("vfio-dev"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_file(dev_dir.join("vfio/devices").join(e.file_name()));
    }
    let _ = fs::remove_dir_all(dev.join("vfio-dev"));
}
