//! What the kernel and the driver say, read directly (not through our library), as the reference
//! our CLI and guest init are compared with.

use crate::Roots;
use serde::Serialize;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The PCI vendor id of NVIDIA.
pub const NVIDIA: u16 = 0x10de;
/// `IORESOURCE_MEM_64` in a sysfs `resource` line's flags.
const MEM_64: u64 = 0x0010_0000;
/// `IORESOURCE_MEM`.
const MEM: u64 = 0x0000_0200;

/// One memory BAR as sysfs gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BarFact {
    /// BAR index 0-5.
    pub index: u8,
    /// Bytes.
    pub size: u64,
    /// 64-bit.
    pub is_64bit: bool,
}

/// One NVIDIA GPU (display-class function of vendor 10de).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuFact {
    /// `DDDD:BB:DD.F`.
    pub address: String,
    /// Device id.
    pub device_id: u16,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// NUMA node (`None` for -1).
    pub numa_node: Option<u32>,
    /// `reset_method` words.
    pub reset_methods: Vec<String>,
    /// Memory BARs with a size.
    pub bars: Vec<BarFact>,
    /// `Model:` from the driver's `information` file.
    pub model: Option<String>,
    /// `Device Minor:` from the same file.
    pub minor: Option<u64>,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Memory BARs from a sysfs `resource` file (`start end flags` per line, in hex).
pub fn bars(resource: &str) -> Vec<BarFact> {
    resource
        .lines()
        .take(6)
        .enumerate()
        .filter_map(|(i, line)| {
            let mut f = line.split_whitespace().map(hex);
            let (start, end, flags) = (f.next()??, f.next()??, f.next()??);
            (flags & MEM != 0 && end > start).then_some(BarFact {
                index: i as u8,
                size: end - start + 1,
                is_64bit: flags & MEM_64 != 0,
            })
        })
        .collect()
}

/// A value after `key` in the driver's `key: value` text.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .map(str::trim)
}

/// Every NVIDIA display-class PCI function under `<sysfs>/bus/pci/devices`, sorted by address.
pub fn nvidia_gpus(roots: &Roots) -> Vec<GpuFact> {
    let dir = roots.sysfs.join("bus/pci/devices");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for entry in entries.filter_map(Result::ok) {
        let d = entry.path();
        let vendor = read(&d.join("vendor")).and_then(|v| hex(&v));
        let class = read(&d.join("class")).and_then(|v| hex(&v));
        if vendor != Some(u64::from(NVIDIA)) || class.map(|c| c >> 16) != Some(0x03) {
            continue;
        }
        let address = entry.file_name().to_string_lossy().into_owned();
        let info = read(
            &roots
                .proc
                .join("driver/nvidia/gpus")
                .join(&address)
                .join("information"),
        )
        .unwrap_or_default();
        out.push(GpuFact {
            device_id: read(&d.join("device")).and_then(|v| hex(&v)).unwrap_or(0) as u16,
            driver: link_name(&d.join("driver")),
            iommu_group: link_name(&d.join("iommu_group")).and_then(|g| g.parse().ok()),
            numa_node: read(&d.join("numa_node"))
                .and_then(|n| n.parse::<i64>().ok())
                .and_then(|n| u32::try_from(n).ok()),
            reset_methods: read(&d.join("reset_method"))
                .map(|r| r.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            bars: bars(&read(&d.join("resource")).unwrap_or_default()),
            model: field(&info, "Model:").map(str::to_string),
            minor: field(&info, "Device Minor:").and_then(|m| m.parse().ok()),
            address,
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

/// The driver version when the NVIDIA driver is loaded, with the GPUs on it; else why not.
pub fn detect(roots: &Roots) -> Result<(String, Vec<GpuFact>), String> {
    let version_file = roots.sysfs.join("module/nvidia/version");
    let Some(version) = read(&version_file) else {
        return Err(format!(
            "no NVIDIA GPU or driver is present here: the nvidia module is not loaded ({} is absent)",
            version_file.display()
        ));
    };
    let gpus: Vec<GpuFact> = nvidia_gpus(roots)
        .into_iter()
        .filter(|g| g.driver.as_deref() == Some("nvidia"))
        .collect();
    if gpus.is_empty() {
        return Err(format!(
            "no NVIDIA GPU is bound to the nvidia driver {version} here ({} lists none)",
            roots.sysfs.join("bus/pci/devices").display()
        ));
    }
    Ok((version, gpus))
}

/// A character node found under the device directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevNode {
    /// Path relative to the device directory.
    pub name: String,
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Permission bits.
    pub mode: u32,
}

/// Every `nvidia*` character node in `dev` and `dev/nvidia-caps/`, sorted by name.
pub fn nvidia_nodes(dev: &Path) -> Vec<DevNode> {
    let mut out = Vec::new();
    for (sub, prefix) in [("", "nvidia"), ("nvidia-caps", "")] {
        let dir = dev.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if !name.starts_with(prefix) || !meta.file_type().is_char_device() {
                continue;
            }
            let rdev = meta.rdev();
            out.push(DevNode {
                name: if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                },
                major: libc::major(rdev) as u64,
                minor: libc::minor(rdev) as u64,
                mode: meta.mode() & 0o7777,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
