//! `pci`: the host's PCI devices as sysfs shows them (read-only).
//!
//! Everything is read below a caller-supplied sysfs root (`/sys` on a real host, a fake tree in
//! tests). Paths are only ever built from a parsed [`PciAddress`] or from names read back from
//! sysfs links, never from raw user input.

mod address;
mod baseboard;
pub mod ids;
pub mod variant;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::outcome::{Classify, Outcome};
use crate::remedy::Remedy;
use serde::{Deserialize, Serialize};

pub use address::{AddressError, PciAddress};
pub use baseboard::Baseboard;

/// Errors reading the PCI model from sysfs.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A sysfs directory or attribute could not be read.
    #[error("cannot read {path} (is the sysfs root a sysfs tree?)")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A device address does not exist below the sysfs root.
    #[error("no PCI device {address} under {root}; list the host's PCI devices")]
    NoSuchDevice {
        /// The requested address.
        address: PciAddress,
        /// The sysfs root searched.
        root: PathBuf,
    },
    /// An attribute held something other than what the kernel writes there.
    #[error("unexpected content in {path}: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

impl Classify for PciError {
    fn outcome(&self) -> Outcome {
        match self {
            PciError::Read { .. } | PciError::NoSuchDevice { .. } | PciError::Malformed { .. } => {
                Outcome::Failed
            }
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            PciError::Read { .. } => Some(Remedy::SysfsRoot),
            PciError::NoSuchDevice { .. } | PciError::Malformed { .. } => None,
        }
    }
}

/// What a device is, from its PCI class code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A display controller (class 03xx): a GPU.
    Display,
    /// An audio device (class 0403), e.g. a GPU's HDMI audio function.
    Audio,
    /// A mass-storage controller (class 01xx).
    Storage,
    /// A network controller (class 02xx).
    Network,
    /// A host or PCI-to-PCI bridge (classes 0600, 0604, 0609): stays with its host driver.
    Bridge,
    /// A USB controller (class 0c03), e.g. a GPU's USB-C function.
    Usb,
    /// An NVIDIA NVSwitch (vendor 10de, class 0680): a device of its own, not a bridge and not
    /// a GPU; it moves only with its whole baseboard.
    #[serde(rename = "nvswitch")]
    NvSwitch,
    /// Anything else (including other vendors' class 0680 "other bridge" devices).
    Other,
}

/// One memory or I/O region of a device, from its `resource` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// BAR index (0–5).
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit memory BAR.
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// An mdev (mediated device, e.g. vGPU) type a device offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdevType {
    /// The type id (directory name under `mdev_supported_types`).
    pub id: String,
    /// The human name, when the driver gives one.
    pub name: Option<String>,
    /// How many more instances can be created.
    pub available_instances: u32,
    /// The device API (e.g. `vfio-pci`).
    pub device_api: Option<String>,
}

/// A PCI device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    /// Its address.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Vendor name from `pci.ids`, when present.
    pub vendor_name: Option<String>,
    /// Device name from the NVIDIA driver's `supported-gpus.json` or `pci.ids`, when known.
    pub device_name: Option<String>,
    /// 24-bit class code.
    pub class: u32,
    /// What the class code says it is.
    pub kind: DeviceKind,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// IOMMU group, if the IOMMU is on.
    pub iommu_group: Option<u32>,
    /// NUMA node (`None` when the kernel says -1 or does not say).
    pub numa_node: Option<u32>,
    /// The firmware's boot display (`boot_vga` = 1).
    pub boot_vga: bool,
    /// Reset methods the kernel offers (`reset_method`), e.g. `flr`, `bus`.
    pub reset_methods: Vec<String>,
    /// SR-IOV: how many virtual functions the device can have, if it is a physical function.
    pub sriov_total_vfs: Option<u32>,
    /// SR-IOV: how many virtual functions are enabled.
    pub sriov_num_vfs: Option<u32>,
    /// SR-IOV: this is a virtual function of that physical function (its `physfn` link).
    pub physfn: Option<PciAddress>,
    /// mdev types offered (vGPU profiles).
    pub mdev_types: Vec<MdevType>,
    /// Memory BARs with a non-zero size.
    pub bars: Vec<Bar>,
}

impl PciDevice {
    /// An NVIDIA display controller.
    pub fn is_nvidia_gpu(&self) -> bool {
        self.vendor_id == ids::NVIDIA_VENDOR_ID && self.kind == DeviceKind::Display
    }

    /// The GPU of a Grace superchip (GH200, GB200).
    pub fn is_grace_gpu(&self) -> bool {
        self.is_nvidia_gpu() && ids::GRACE_GPU_DEVICE_IDS.contains(&self.device_id)
    }

    /// Total bytes of the 64-bit memory BARs (what the VM's 64-bit MMIO window must hold).
    pub fn bar64_bytes(&self) -> u64 {
        self.bars
            .iter()
            .filter(|b| b.is_64bit)
            .fold(0u64, |acc, b| acc.saturating_add(b.size))
    }
}

/// The class an NVSwitch reports: 0680, "other bridge device" (it bridges NVLink, not PCI).
pub const NVSWITCH_CLASS: u32 = 0x068000;

/// Classify a device from its vendor and 24-bit class code: an NVIDIA 0680 is an NVSwitch,
/// everything else as [`kind_of_class`] says.
pub fn kind_of(vendor_id: u16, class: u32) -> DeviceKind {
    if vendor_id == ids::NVIDIA_VENDOR_ID && class & 0xffff00 == NVSWITCH_CLASS {
        DeviceKind::NvSwitch
    } else {
        kind_of_class(class)
    }
}

/// Classify a 24-bit class code alone (without the vendor, an NVSwitch is `Other`).
pub fn kind_of_class(class: u32) -> DeviceKind {
    let base = class >> 16;
    let sub = (class >> 8) & 0xff;
    match (base, sub) {
        (0x03, _) => DeviceKind::Display,
        (0x04, 0x03) => DeviceKind::Audio,
        (0x01, _) => DeviceKind::Storage,
        (0x02, _) => DeviceKind::Network,
        (0x06, 0x00 | 0x04 | 0x09) => DeviceKind::Bridge,
        (0x0c, 0x03) => DeviceKind::Usb,
        _ => DeviceKind::Other,
    }
}

/// The PCI part of a sysfs tree.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// A view of the sysfs tree at `root` (`/sys` on a real host).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    /// The sysfs root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/bus/pci/devices/<addr>`.
    pub fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(address.to_string())
    }

    /// `<root>/bus/pci/drivers/<name>`; `name` must come from [`valid_driver_name`].
    pub fn driver_dir(&self, name: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(name)
    }

    /// `<root>/bus/pci/drivers_probe`.
    pub fn drivers_probe(&self) -> PathBuf {
        self.root.join("bus/pci/drivers_probe")
    }

    /// Whether the IOMMU is on: `kernel/iommu_groups` has at least one group.
    pub fn iommu_enabled(&self) -> bool {
        fs::read_dir(self.root.join("kernel/iommu_groups"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }

    /// Number of IOMMU groups.
    pub fn iommu_group_count(&self) -> usize {
        fs::read_dir(self.root.join("kernel/iommu_groups"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Every PCI address present, sorted.
    pub fn addresses(&self) -> Result<Vec<PciAddress>, PciError> {
        let dir = self.root.join("bus/pci/devices");
        let entries = fs::read_dir(&dir).map_err(|source| PciError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut out: Vec<PciAddress> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The members of IOMMU group `group`, sorted.
    pub fn group_members(&self, group: u32) -> Result<Vec<PciAddress>, PciError> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| PciError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut out: Vec<PciAddress> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The driver bound to `address`, read from its `driver` link.
    pub fn driver(&self, address: PciAddress) -> Option<String> {
        link_name(&self.device_dir(address).join("driver"))
    }

    /// Whether `address` is on a VFIO driver: vfio-pci or a variant ([`variant::is_vfio_driver`]).
    pub fn on_vfio(&self, address: PciAddress) -> bool {
        self.driver(address)
            .is_some_and(|d| variant::is_vfio_driver(&self.root, &d))
    }

    /// `modalias` of `address` (`pci:v…d…sv…sd…bc…sc…i…`), which `modules.alias` matches.
    pub fn modalias(&self, address: PciAddress) -> Option<String> {
        read_trimmed(&self.device_dir(address).join("modalias"))
    }

    /// `driver_override` of `address` (`None` when unset: empty or `(null)`).
    pub fn driver_override(&self, address: PciAddress) -> Option<String> {
        read_trimmed(&self.device_dir(address).join("driver_override"))
            .filter(|s| !s.is_empty() && s != "(null)")
    }

    /// IOMMU group of `address`.
    pub fn iommu_group(&self, address: PciAddress) -> Option<u32> {
        link_name(&self.device_dir(address).join("iommu_group")).and_then(|n| n.parse().ok())
    }

    /// The physical function of an SR-IOV virtual function (`None` for any other device).
    pub fn physfn(&self, address: PciAddress) -> Option<PciAddress> {
        let target = fs::read_link(self.device_dir(address).join("physfn")).ok()?;
        target.file_name()?.to_str()?.parse().ok()
    }

    /// Whether `a` and `b` are functions of one physical slot: same bus and device number,
    /// and neither is an SR-IOV virtual function (a VF is its own device; its PF and its
    /// sibling VFs are not its companions, whatever their numbers).
    pub fn same_slot(&self, a: PciAddress, b: PciAddress) -> bool {
        a.same_slot(&b) && self.physfn(a).is_none() && self.physfn(b).is_none()
    }

    /// The upstream port of the PCIe switch `address` sits behind: its sysfs path is
    /// `.../<upstream>/<downstream>/<address>` with both ports PCI functions (not a root bus).
    pub fn upstream_switch(&self, address: PciAddress) -> Option<PathBuf> {
        let real = fs::canonicalize(self.device_dir(address)).ok()?;
        let downstream = real.parent()?;
        let upstream = downstream.parent()?;
        let is_function = |p: &Path| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.parse::<PciAddress>().is_ok())
        };
        (is_function(downstream) && is_function(upstream)).then(|| upstream.to_owned())
    }

    /// [`Sysfs::upstream_switch`] as the upstream port's address.
    pub fn upstream_switch_address(&self, address: PciAddress) -> Option<PciAddress> {
        self.upstream_switch(address)?
            .file_name()?
            .to_str()?
            .parse()
            .ok()
    }

    /// Whether two or more devices all sit behind one PCIe switch (P2P between them stays in
    /// the switch).
    pub fn share_pcie_switch(&self, devices: &[PciAddress]) -> bool {
        if devices.len() < 2 {
            return false;
        }
        let first = self.upstream_switch(devices[0]);
        first.is_some()
            && devices[1..]
                .iter()
                .all(|d| self.upstream_switch(*d) == first)
    }

    /// Read everything known about one device.
    pub fn device(&self, address: PciAddress) -> Result<PciDevice, PciError> {
        let dir = self.device_dir(address);
        if !dir.exists() {
            return Err(PciError::NoSuchDevice {
                address,
                root: self.root.clone(),
            });
        }
        let vendor_id = read_hex(&dir.join("vendor"))? as u16;
        let device_id = read_hex(&dir.join("device"))? as u16;
        let class = read_hex(&dir.join("class"))? as u32;
        let numa_node = read_trimmed(&dir.join("numa_node"))
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        let reset_methods = read_trimmed(&dir.join("reset_method"))
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        Ok(PciDevice {
            address,
            vendor_id,
            device_id,
            vendor_name: None,
            device_name: None,
            class,
            kind: kind_of(vendor_id, class),
            driver: self.driver(address),
            driver_override: self.driver_override(address),
            iommu_group: self.iommu_group(address),
            numa_node,
            boot_vga: read_trimmed(&dir.join("boot_vga")).as_deref() == Some("1"),
            reset_methods,
            sriov_total_vfs: read_trimmed(&dir.join("sriov_totalvfs")).and_then(|s| s.parse().ok()),
            sriov_num_vfs: read_trimmed(&dir.join("sriov_numvfs")).and_then(|s| s.parse().ok()),
            physfn: self.physfn(address),
            mdev_types: read_mdev_types(&dir.join("mdev_supported_types")),
            bars: read_bars(&dir.join("resource")),
        })
    }

    /// Every device, sorted by address; devices that cannot be read are skipped with a log line.
    pub fn devices(&self) -> Result<Vec<PciDevice>, PciError> {
        let mut out = Vec::new();
        for address in self.addresses()? {
            match self.device(address) {
                Ok(d) => out.push(d),
                Err(e) => tracing::warn!("skipping {address}: {e}"),
            }
        }
        Ok(out)
    }
}

/// A driver name read from sysfs is used as a path part: accept only plain names.
pub fn valid_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    let name = target.file_name()?.to_str()?.to_owned();
    valid_driver_name(&name).then_some(name)
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn read_hex(path: &Path) -> Result<u64, PciError> {
    let text = fs::read_to_string(path).map_err(|source| PciError::Read {
        path: path.to_owned(),
        source,
    })?;
    let t = text.trim();
    u64::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| PciError::Malformed {
        path: path.to_owned(),
        detail: format!("`{t}` is not a hexadecimal number"),
    })
}

fn read_mdev_types(dir: &Path) -> Vec<MdevType> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<MdevType> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let id = e.file_name().to_str()?.to_owned();
            let p = e.path();
            Some(MdevType {
                id,
                name: read_trimmed(&p.join("name")),
                available_instances: read_trimmed(&p.join("available_instances"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                device_api: read_trimmed(&p.join("device_api")),
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// Parse a `resource` file: one `start end flags` line per region; the first six are BARs.
pub fn parse_resource(text: &str) -> Vec<Bar> {
    let mut out = Vec::new();
    for (index, line) in text.lines().take(6).enumerate() {
        let nums: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .collect();
        let [start, end, flags] = nums[..] else {
            continue;
        };
        if end <= start || flags & IORESOURCE_MEM == 0 {
            continue;
        }
        out.push(Bar {
            index: index as u8,
            size: end - start + 1,
            is_64bit: flags & IORESOURCE_MEM_64 != 0,
            prefetchable: flags & IORESOURCE_PREFETCH != 0,
        });
    }
    out
}

fn read_bars(path: &Path) -> Vec<Bar> {
    read_trimmed(path)
        .map(|t| parse_resource(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_file_yields_memory_bars_only() {
        let text = "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
                    0x000000e000000000 0x000000efffffffff 0x000000000014220c\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x000000000000e000 0x000000000000e07f 0x0000000000040101\n";
        let bars = parse_resource(text);
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].size, 16 << 20);
        assert!(!bars[0].is_64bit);
        assert_eq!(bars[1].size, 64 << 30);
        assert!(bars[1].is_64bit && bars[1].prefetchable);
    }

    #[test]
    fn class_codes_classify() {
        assert_eq!(kind_of_class(0x030000), DeviceKind::Display);
        assert_eq!(kind_of_class(0x030200), DeviceKind::Display);
        assert_eq!(kind_of_class(0x040300), DeviceKind::Audio);
        assert_eq!(kind_of_class(0x060400), DeviceKind::Bridge);
        assert_eq!(kind_of_class(0x068000), DeviceKind::Other);
        assert_eq!(kind_of_class(0x020000), DeviceKind::Network);
        assert_eq!(kind_of_class(0x010802), DeviceKind::Storage);
    }

    #[test]
    fn an_nvidia_0680_is_an_nvswitch_and_no_bridge() {
        assert_eq!(kind_of(0x10de, 0x068000), DeviceKind::NvSwitch);
        assert_eq!(kind_of(0x8086, 0x068000), DeviceKind::Other);
        assert_eq!(kind_of(0x10de, 0x060400), DeviceKind::Bridge);
        assert_eq!(kind_of(0x10de, 0x030200), DeviceKind::Display);
        assert_eq!(
            serde_json::to_value(DeviceKind::NvSwitch).unwrap(),
            serde_json::json!("nvswitch")
        );
    }

    #[test]
    fn driver_names_that_could_escape_are_rejected() {
        assert!(valid_driver_name("vfio-pci"));
        assert!(valid_driver_name("snd_hda_intel"));
        assert!(!valid_driver_name(".."));
        assert!(!valid_driver_name("a/b"));
        assert!(!valid_driver_name(""));
    }
}
