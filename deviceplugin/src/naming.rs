//! Resource names and environment variable names, as KubeVirt and kubevirt-gpu-device-plugin
//! spell them, so an existing `permittedHostDevices` configuration keeps working.

use gpu_passthrough::pci::PciDevice;
use gpu_passthrough::pci::ids::{PciIds, SupportedGpus};

/// The resource domain of every GPU resource.
pub const DOMAIN: &str = "nvidia.com";

/// Where a resource name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameSource {
    /// The `pci.ids` device name (kubevirt-gpu-device-plugin's source).
    PciIds,
    /// The NVIDIA driver's `supported-gpus.json` (when the host has no `pci.ids` entry).
    SupportedGpus,
    /// Neither knows the device: its hexadecimal device ID, as kubevirt-gpu-device-plugin does.
    DeviceId,
    /// A vGPU: the driver's profile name.
    VgpuProfile,
}

/// Names GPUs from `pci.ids`, then `supported-gpus.json`, then the device ID.
#[derive(Debug, Clone, Default)]
pub struct Namer {
    ids: PciIds,
    gpus: Option<SupportedGpus>,
}

impl Namer {
    /// A namer over these tables.
    pub fn new(ids: PciIds, gpus: Option<SupportedGpus>) -> Self {
        Namer { ids, gpus }
    }

    /// The resource name of `device`, e.g. `nvidia.com/GH100_H100_SXM5_80GB`, and its source.
    pub fn resource_name(&self, device: &PciDevice) -> (String, NameSource) {
        if let Some(n) = self.ids.device(device.vendor_id, device.device_id) {
            return (format!("{DOMAIN}/{}", sanitize(n)), NameSource::PciIds);
        }
        if let Some(n) = self.gpus.as_ref().and_then(|g| g.name(device.device_id)) {
            return (
                format!("{DOMAIN}/{}", sanitize(n)),
                NameSource::SupportedGpus,
            );
        }
        (
            format!("{DOMAIN}/{:04x}", device.device_id),
            NameSource::DeviceId,
        )
    }
}

/// A device name as a resource name part: upper case, `/` and `.` as `_`, runs of white space as
/// one `_`, anything else but letters, digits and `_` dropped (`GH100 [H100 SXM5 80GB]` →
/// `GH100_H100_SXM5_80GB`).
pub fn sanitize(name: &str) -> String {
    let upper = name.trim().to_uppercase().replace(['/', '.'], "_");
    let mut out = String::new();
    let mut in_space = false;
    for c in upper.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push('_');
            }
            in_space = true;
            continue;
        }
        in_space = false;
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        }
    }
    out
}

/// What a resource hands out, which decides the environment variable KubeVirt reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// Whole PCI devices: `PCI_RESOURCE_<NAME>` holds their addresses.
    Pci,
    /// Mediated devices (vGPU): `MDEV_PCI_RESOURCE_<NAME>` holds their UUIDs.
    Mdev,
}

/// The variable KubeVirt reads for `resource`: the prefix, then the resource name upper-cased
/// with `.` and `/` as `_` (`nvidia.com/GH100_H100_SXM5_80GB` →
/// `PCI_RESOURCE_NVIDIA_COM_GH100_H100_SXM5_80GB`).
pub fn env_var(kind: ResourceKind, resource: &str) -> String {
    let prefix = match kind {
        ResourceKind::Pci => "PCI_RESOURCE",
        ResourceKind::Mdev => "MDEV_PCI_RESOURCE",
    };
    format!(
        "{prefix}_{}",
        resource.to_uppercase().replace(['.', '/'], "_")
    )
}

/// The socket file, in the kubelet's device-plugins directory, serving `resource`.
pub fn socket_name(resource: &str) -> String {
    let part = resource.rsplit('/').next().unwrap_or(resource);
    let safe: String = part
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("gpu-passthrough-{safe}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_ids_names_become_kubevirt_resource_names() {
        assert_eq!(sanitize("GH100 [H100 SXM5 80GB]"), "GH100_H100_SXM5_80GB");
        assert_eq!(
            sanitize("AD102 [GeForce RTX 4090]"),
            "AD102_GEFORCE_RTX_4090"
        );
        assert_eq!(
            sanitize("TU102GL [Quadro RTX 6000/8000]"),
            "TU102GL_QUADRO_RTX_6000_8000"
        );
        assert_eq!(sanitize("GA100 [A100 SXM4 40GB]  "), "GA100_A100_SXM4_40GB");
        assert_eq!(
            sanitize("GV100GL [Tesla V100 SXM2 16GB]"),
            "GV100GL_TESLA_V100_SXM2_16GB"
        );
    }

    #[test]
    fn env_vars_are_what_kubevirt_reads() {
        assert_eq!(
            env_var(ResourceKind::Pci, "nvidia.com/GH100_H100_SXM5_80GB"),
            "PCI_RESOURCE_NVIDIA_COM_GH100_H100_SXM5_80GB"
        );
        assert_eq!(
            env_var(ResourceKind::Mdev, "nvidia.com/GRID_T4-1Q"),
            "MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q"
        );
    }

    #[test]
    fn names_fall_back_to_supported_gpus_then_device_id() {
        let dev = |id| gpu_passthrough::pci::PciDevice {
            address: "0000:01:00.0".parse().unwrap(),
            vendor_id: 0x10de,
            device_id: id,
            vendor_name: None,
            device_name: None,
            class: 0x030200,
            kind: gpu_passthrough::pci::DeviceKind::Display,
            driver: None,
            driver_override: None,
            iommu_group: None,
            numa_node: None,
            boot_vga: false,
            reset_methods: vec![],
            sriov_total_vfs: None,
            sriov_num_vfs: None,
            physfn: None,
            mdev_types: vec![],
            bars: vec![],
        };
        let ids = PciIds::parse("10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n");
        let namer = Namer::new(ids, None);
        assert_eq!(
            namer.resource_name(&dev(0x2330)),
            ("nvidia.com/GH100_H100_SXM5_80GB".into(), NameSource::PciIds)
        );
        assert_eq!(
            namer.resource_name(&dev(0x2684)),
            ("nvidia.com/2684".into(), NameSource::DeviceId)
        );
        assert_eq!(
            socket_name("nvidia.com/GH100_H100_SXM5_80GB"),
            "gpu-passthrough-GH100_H100_SXM5_80GB.sock"
        );
    }
}
