//! Device names and capabilities: the NVIDIA driver's `supported-gpus.json` and the system's
//! `pci.ids` (read only when present; nothing is downloaded).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::outcome::{Classify, Outcome};
use serde::Deserialize;

/// NVIDIA's PCI vendor ID.
pub const NVIDIA_VENDOR_ID: u16 = 0x10de;

/// Grace superchips' GPUs (GH200 and GB200 parts), which the kernel's `nvgrace_gpu_vfio_pci`
/// variant driver lists.
pub const GRACE_GPU_DEVICE_IDS: [u16; 4] = [0x2342, 0x2345, 0x2348, 0x2941];

/// Where the system's `pci.ids` may live.
pub const PCI_IDS_PATHS: [&str; 2] = ["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// Errors reading an ID table.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    /// The file could not be read.
    #[error(
        "cannot read {path}: {source}; pass the driver's supported-gpus.json (shipped in the NVIDIA driver package)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a `supported-gpus.json`.
    #[error("{path} is not an NVIDIA supported-gpus.json")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

impl Classify for IdsError {
    fn outcome(&self) -> Outcome {
        match self {
            IdsError::Read { .. } | IdsError::Parse { .. } => Outcome::Failed,
        }
    }
}

#[derive(Deserialize)]
struct SupportedGpusFile {
    chips: Vec<Chip>,
}

#[derive(Deserialize)]
struct Chip {
    devid: String,
    name: String,
    #[serde(default)]
    features: Vec<String>,
}

/// What one NVIDIA driver release supports, from its `supported-gpus.json`.
#[derive(Debug, Clone, Default)]
pub struct SupportedGpus {
    /// device ID → (first name, supported by the open kernel modules).
    chips: HashMap<u16, (String, bool)>,
    /// Device IDs with the `gsp_proprietary_supported` feature (newer drivers' files).
    gsp_proprietary: std::collections::HashSet<u16>,
    /// Whether the file uses that feature at all (535's does not).
    marks_gsp_proprietary: bool,
}

impl SupportedGpus {
    /// Read a `supported-gpus.json`.
    pub fn load(path: &Path) -> Result<Self, IdsError> {
        let text = fs::read_to_string(path).map_err(|source| IdsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: SupportedGpusFile =
            serde_json::from_str(&text).map_err(|source| IdsError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let mut chips: HashMap<u16, (String, bool)> = HashMap::new();
        let mut gsp_proprietary = std::collections::HashSet::new();
        for chip in file.chips {
            let Ok(id) = u16::from_str_radix(chip.devid.trim_start_matches("0x"), 16) else {
                continue;
            };
            let open = chip.features.iter().any(|f| f == "kernelopen");
            if chip.features.iter().any(|f| f == GSP_PROPRIETARY) {
                gsp_proprietary.insert(id);
            }
            // A device ID can appear several times (per subsystem); any open entry counts.
            let entry = chips.entry(id).or_insert((chip.name, false));
            entry.1 |= open;
        }
        Ok(SupportedGpus {
            chips,
            marks_gsp_proprietary: !gsp_proprietary.is_empty(),
            gsp_proprietary,
        })
    }

    /// Number of distinct device IDs.
    pub fn len(&self) -> usize {
        self.chips.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.chips.is_empty()
    }

    /// Every device ID the driver lists, in ascending order.
    pub fn device_ids(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.chips.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Marketing name of an NVIDIA device ID.
    pub fn name(&self, device_id: u16) -> Option<&str> {
        self.chips.get(&device_id).map(|(n, _)| n.as_str())
    }

    /// Whether the driver lists the device at all.
    pub fn knows(&self, device_id: u16) -> bool {
        self.chips.contains_key(&device_id)
    }

    /// Whether the proprietary modules drive the device only through GSP firmware: a `kernelopen`
    /// GPU in a file that marks GPUs `gsp_proprietary_supported` (see
    /// [`crate::attach::driver_fit`]). Always false for a file without that feature (535).
    pub fn proprietary_needs_gsp(&self, device_id: u16) -> bool {
        self.marks_gsp_proprietary && self.supports_open(device_id)
    }

    /// Whether only the open modules support the device: `kernelopen` without
    /// `gsp_proprietary_supported`, in a file that uses that feature.
    pub fn open_required(&self, device_id: u16) -> bool {
        self.proprietary_needs_gsp(device_id) && !self.gsp_proprietary.contains(&device_id)
    }

    /// Whether the open kernel modules support the device (`kernelopen` feature).
    pub fn supports_open(&self, device_id: u16) -> bool {
        self.chips.get(&device_id).is_some_and(|(_, open)| *open)
    }
}

/// The `supported-gpus.json` feature of GPUs the proprietary modules drive through GSP RM.
pub const GSP_PROPRIETARY: &str = "gsp_proprietary_supported";

/// Vendor and device names from a `pci.ids` file.
#[derive(Debug, Clone, Default)]
pub struct PciIds {
    vendors: HashMap<u16, String>,
    devices: HashMap<(u16, u16), String>,
}

impl PciIds {
    /// Read the system's `pci.ids` when one of [`PCI_IDS_PATHS`] exists; otherwise empty.
    pub fn system() -> Self {
        PCI_IDS_PATHS
            .iter()
            .find_map(|p| fs::read_to_string(p).ok())
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parse `pci.ids` text (vendor lines and their device lines; subsystems and classes ignored).
    pub fn parse(text: &str) -> Self {
        let mut ids = PciIds::default();
        let mut vendor: Option<u16> = None;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with("C ") {
                // The class section ends the vendor list.
                break;
            }
            if let Some(rest) = line.strip_prefix('\t') {
                if rest.starts_with('\t') {
                    continue;
                }
                if let (Some(v), Some((id, name))) = (vendor, split_id(rest)) {
                    ids.devices.insert((v, id), name.to_owned());
                }
            } else if let Some((id, name)) = split_id(line) {
                vendor = Some(id);
                ids.vendors.insert(id, name.to_owned());
            }
        }
        ids
    }

    /// Vendor name.
    pub fn vendor(&self, vendor: u16) -> Option<&str> {
        self.vendors.get(&vendor).map(String::as_str)
    }

    /// Device name.
    pub fn device(&self, vendor: u16, device: u16) -> Option<&str> {
        self.devices.get(&(vendor, device)).map(String::as_str)
    }
}

fn split_id(s: &str) -> Option<(u16, &str)> {
    let (id, name) = s.split_once("  ")?;
    Some((u16::from_str_radix(id.trim(), 16).ok()?, name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_ids_vendor_and_device_lines() {
        let ids = PciIds::parse(
            "# c\n10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n\t\t10de 16c1  sub\n\
             8086  Intel Corporation\n\t10d3  82574L\nC 00  Unclassified\n",
        );
        assert_eq!(ids.vendor(0x10de), Some("NVIDIA Corporation"));
        assert_eq!(ids.device(0x10de, 0x2330), Some("GH100 [H100 SXM5 80GB]"));
        assert_eq!(ids.device(0x8086, 0x10d3), Some("82574L"));
        assert_eq!(ids.device(0x10de, 0x16c1), None);
    }
}
