//! `vmm`: render a boot spec for Cloud Hypervisor and QEMU.

pub mod disk;
pub mod mmio;
pub mod topology;
pub use disk::{DiskAttach, DiskIsolation, DiskRequest, GpuDisk};
pub use mmio::MmioWindow;
pub use topology::{PlaceInput, Placement};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::pci::PciAddress;
use crate::vfio::VfioReport;

pub use gpu_passthrough_guest_contract::NVLINK_DISABLE;

/// The kernel command-line word that tells the guest init to set up the GPU.
pub const HAS_GPU: &str = "HAS_GPU=1";

/// One device handed to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootDevice {
    /// PCI address (none for an mdev).
    pub address: Option<PciAddress>,
    /// mdev UUID (vGPU), if this is an mdev.
    pub mdev_uuid: Option<String>,
    /// Its sysfs directory (what the VMM opens).
    pub sysfs_path: PathBuf,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// The node the VMM opens: `/dev/vfio/<group>`, or `/dev/vfio/devices/vfioX` on a host
    /// whose kernel has iommufd and no legacy group interface.
    pub vfio_device: PathBuf,
    /// A GPU (display controller or vGPU) rather than a companion function.
    pub gpu: bool,
    /// A vGPU (vendor-VFIO VF or mdev): never in a GPUDirect P2P clique.
    #[serde(default)]
    pub vgpu: bool,
    /// Bytes of 64-bit BARs.
    pub bar64_bytes: u64,
    /// What the VFIO check found.
    pub vfio: Option<VfioReport>,
    /// Its host NUMA node (the guest places it behind that node's expander bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// The upstream port of the host PCIe switch it sits behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_switch: Option<PciAddress>,
    /// A network controller (a NIC beside its GPU goes behind one guest switch with it).
    #[serde(default)]
    pub nic: bool,
}

impl BootDevice {
    /// Whether the VMM opens an iommufd character device (`/dev/vfio/devices/vfioX`).
    pub fn is_iommufd_cdev(&self) -> bool {
        self.vfio_device
            .parent()
            .is_some_and(|p| p.ends_with("vfio/devices"))
    }

    /// What placement needs of it.
    pub fn place_input(&self) -> PlaceInput {
        PlaceInput {
            host: self.address,
            numa_node: self.numa_node,
            host_switch: self.host_switch,
            gpu: self.gpu,
            nic: self.nic,
        }
    }
}

/// Cloud Hypervisor: command-line arguments and the API's `VmConfig.devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudHypervisor {
    /// `--device path=…` arguments.
    pub args: Vec<String>,
    /// The `devices` array of the API's `VmConfig`.
    pub vm_config_devices: Vec<ChDeviceConfig>,
    /// What this VMM cannot do for these devices (e.g. no `-uuid` for an mdev vGPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One entry of Cloud Hypervisor's `VmConfig.devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChDeviceConfig {
    /// The sysfs path, with a trailing `/`.
    pub path: String,
    /// The device's id in the VM (`gpt0`, `gpt1`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Segment 0's slot the device takes: its guest address is `0000:00:SLOT.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// P2P clique id for several GPUs (`x_nv_gpudirect_clique`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_nv_gpudirect_clique: Option<u8>,
}

/// QEMU arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qemu {
    /// `-device vfio-pci,…` arguments (and the GPU disk's, when there is one).
    pub args: Vec<String>,
    /// The GPU disk on virtio-pmem is hot-pluggable memory: give QEMU
    /// `-m RAM,slots=2,maxmem=RAM+this` (MiB). See [`GpuDisk::qemu_memory`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxmem_extra_mib: Option<u64>,
}

/// Where the VM sees a device the boot spec hands it: both VMMs' arguments fix the slot, so a
/// fault its guest reports at that address is about exactly this device (`health::ingest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAddress {
    /// The device's PCI address inside the VM.
    pub guest: PciAddress,
    /// The host device (a vendor-VFIO vGPU's VF; none for an mdev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<PciAddress>,
    /// The mdev UUID, for an mdev vGPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev: Option<String>,
    /// Where Cloud Hypervisor puts it, when that differs from `guest` (QEMU's: behind an
    /// expander bridge; Cloud Hypervisor keeps the flat root-bus slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_hypervisor: Option<PciAddress>,
}

/// The root-bus slots passed-through devices take, in order (and after them, the expander
/// bridges of [`topology`]): above what QEMU's q35 and Cloud
/// Hypervisor give their own devices first (QEMU: VGA 1, default NIC 2; Cloud Hypervisor
/// counts up from 1), then the low ones; 0x1d-0x1f are q35's USB, HD audio and LPC/SATA slots.
pub const GUEST_SLOTS: [u8; 26] = [
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x03, 0x04, 0x05,
    0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
];

/// The 64-bit MMIO window the VM needs for large BARs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioHint {
    /// Sum of the devices' 64-bit BARs.
    pub bar64_bytes: u64,
    /// A window that holds them with alignment slack (next power of two of twice the sum).
    pub window_bytes: u64,
    /// What to do, when the default window is likely too small.
    pub hint: Option<String>,
    /// The window sized from the devices' real BARs, with the guest address bits it takes
    /// (set by [`BootSpec::with_mmio`]; then `window_bytes` is its size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sized: Option<MmioWindow>,
}

/// Everything a VMM needs to boot the VM with its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// The owner the devices are attached to.
    pub owner: String,
    /// The devices, GPUs first.
    pub devices: Vec<BootDevice>,
    /// Other members of their IOMMU groups, bound to vfio-pci only so that the groups are
    /// viable; not given to the VM.
    pub held_devices: Vec<PciAddress>,
    /// Words to add to the guest kernel command line.
    pub kernel_cmdline: Vec<String>,
    /// The initrd to boot (the release's combined layer), when the caller supplied it.
    pub initrd: Option<PathBuf>,
    /// Cloud Hypervisor.
    pub cloud_hypervisor: CloudHypervisor,
    /// QEMU.
    pub qemu: Qemu,
    /// The 64-bit MMIO window.
    pub mmio: MmioHint,
    /// What this spec cannot express for these devices, for every VMM (e.g. a Grace GPU's
    /// memory NUMA nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The GPU payload as a read-only image, when the layers were built in the disk form: its
    /// VMM arguments and kernel word are already in the ones above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<GpuDisk>,
    /// Where the VM sees each device (the guest→host map the journal keeps for `health
    /// ingest`), in the order of `devices`; a device beyond the slots has none.
    #[serde(default)]
    pub guest_addresses: Vec<GuestAddress>,
    /// Where each device sits on the VM's PCI tree (bus, slot, NUMA node, switch), in the
    /// order of `devices` ([`topology`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Placement>,
}

/// A VMM whose arguments a [`BootSpec`] renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    /// Cloud Hypervisor.
    CloudHypervisor,
    /// QEMU.
    Qemu,
}

impl std::str::FromStr for Vmm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cloud-hypervisor" => Ok(Vmm::CloudHypervisor),
            "qemu" => Ok(Vmm::Qemu),
            _ => Err(format!("unknown VMM `{s}`: cloud-hypervisor or qemu")),
        }
    }
}

impl BootSpec {
    /// The command-line arguments for `vmm`.
    pub fn args(&self, vmm: Vmm) -> &[String] {
        match vmm {
            Vmm::CloudHypervisor => &self.cloud_hypervisor.args,
            Vmm::Qemu => &self.qemu.args,
        }
    }
}

/// QEMU's default 64-bit PCI hole on q35 (32 GiB); larger BAR sums need a bigger one.
const DEFAULT_HOLE64: u64 = 32 << 30;

/// Cloud Hypervisor's default `--cpus max_phys_bits` (also capped at the host's).
const CLOUD_HYPERVISOR_DEFAULT_PHYS_BITS: u8 = 46;

impl BootSpec {
    /// Render the spec for `devices` attached to `owner`, with no P2P clique.
    pub fn new(
        owner: &str,
        devices: Vec<BootDevice>,
        held_devices: Vec<PciAddress>,
        initrd: Option<PathBuf>,
    ) -> BootSpec {
        BootSpec::render(owner, devices, held_devices, initrd, false)
    }

    /// Render the spec; with `p2p_clique`, several GPUs go into one P2P (GPUDirect) clique
    /// (both VMMs support the NVIDIA clique option). The caller decides: a clique is right
    /// only when the GPUs can really reach each other (asked for, or behind one PCIe switch).
    pub fn render(
        owner: &str,
        devices: Vec<BootDevice>,
        held_devices: Vec<PciAddress>,
        initrd: Option<PathBuf>,
        p2p_clique: bool,
    ) -> BootSpec {
        let gpus = devices.iter().filter(|d| d.gpu).count();
        // Whole GPUs only (a vGPU has no P2P), and only when asked or behind one switch.
        let whole_gpus = devices.iter().filter(|d| d.gpu && !d.vgpu).count();
        let clique = (p2p_clique && whole_gpus > 1).then_some(0u8);
        // iommufd-only hosts: QEMU opens the device's cdev through an iommufd object, Cloud
        // Hypervisor (v50+) through `--platform iommufd=on`.
        let iommufd = devices.iter().any(BootDevice::is_iommufd_cdev);
        let mut ch_args = Vec::new();
        let mut ch_devices = Vec::new();
        let mut qemu_args = Vec::new();
        if iommufd {
            qemu_args.push("-object".to_owned());
            qemu_args.push("iommufd,id=iommufd0".to_owned());
            ch_args.push("--platform".to_owned());
            ch_args.push("iommufd=on".to_owned());
        }
        let inputs: Vec<PlaceInput> = devices.iter().map(BootDevice::place_input).collect();
        let topo = topology::place(&inputs, &GUEST_SLOTS);
        for b in &topo.qemu_bridges {
            qemu_args.push("-device".to_owned());
            qemu_args.push(b.clone());
        }
        let mut guest_addresses = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let placed = topo.placements.get(i).cloned().flatten();
            let path = format!("{}/", d.sysfs_path.display());
            let gpu_clique = clique.filter(|_| d.gpu && !d.vgpu && d.mdev_uuid.is_none());
            // A fixed slot on the root bus, function 0: the guest address is known before boot.
            let slot = GUEST_SLOTS.get(i).copied();
            let id = slot.map(|_| format!("gpt{i}"));
            let mut ch = format!("path={path}");
            if let (Some(slot), Some(id), Some(p)) = (slot, &id, &placed) {
                ch.push_str(&format!(",id={id},pci_segment=0,pci_device_id={slot}"));
                guest_addresses.push(GuestAddress {
                    guest: p.guest,
                    host: d.address,
                    mdev: d.mdev_uuid.clone(),
                    cloud_hypervisor: p.cloud_hypervisor,
                });
            }
            if let Some(c) = gpu_clique {
                ch.push_str(&format!(",x_nv_gpudirect_clique={c}"));
            }
            ch_args.push("--device".to_owned());
            ch_args.push(ch);
            ch_devices.push(ChDeviceConfig {
                path,
                id,
                pci_device_id: slot,
                x_nv_gpudirect_clique: gpu_clique,
            });
            let mut q = match (&d.address, &d.mdev_uuid) {
                (Some(a), _) => format!("vfio-pci,host={a}"),
                (None, _) => format!("vfio-pci,sysfsdev={}", d.sysfs_path.display()),
            };
            if d.is_iommufd_cdev() {
                // QEMU finds the device's cdev through sysfs itself.
                q.push_str(",iommufd=iommufd0");
            }
            if let Some(c) = gpu_clique {
                q.push_str(&format!(",x-nv-gpudirect-clique={c}"));
            }
            match (&placed, slot) {
                (
                    Some(Placement {
                        port: Some(port), ..
                    }),
                    _,
                ) => {
                    q.push_str(&format!(",bus={port},addr=0x00"));
                }
                (_, Some(slot)) => q.push_str(&format!(",bus=pcie.0,addr={slot:#04x}")),
                _ => {}
            }
            qemu_args.push("-device".to_owned());
            qemu_args.push(q);
        }
        // The vGPU manager reads the VM's UUID: QEMU gets the (first) mdev's; Cloud Hypervisor
        // has no such option.
        let mut ch_warnings = Vec::new();
        let mut warnings = Vec::new();
        if topo.expanded() {
            ch_warnings.push(
                "Cloud Hypervisor emulates no PCIe switches or expander bridges: the devices stay on PCI segment 0 at their flat slots (guest_addresses' cloud_hypervisor), without the NUMA and switch placement QEMU gets".to_owned(),
            );
        }
        if !topo.guest_numa_nodes.is_empty() {
            let map: Vec<String> = topo
                .guest_numa_nodes
                .iter()
                .enumerate()
                .map(|(k, h)| format!("guest node {k} = host node {h}"))
                .collect();
            warnings.push(format!(
                "QEMU: the devices sit behind pxb-pcie expander bridges with numa_node=0..{} ({}); the VM must define those NUMA nodes (-numa node,nodeid=K with its CPUs and memory, best bound to the host node), or QEMU refuses the bridges",
                topo.guest_numa_nodes.len() - 1,
                map.join(", ")
            ));
        }
        if let Some(uuid) = devices.iter().find_map(|d| d.mdev_uuid.as_ref()) {
            qemu_args.push("-uuid".to_owned());
            qemu_args.push(uuid.clone());
            ch_warnings.push(format!(
                "Cloud Hypervisor has no -uuid: the vGPU manager may not match mdev {uuid} to the VM; use QEMU for mdev vGPUs"
            ));
        }
        let bar64: u64 = devices
            .iter()
            .fold(0u64, |a, d| a.saturating_add(d.bar64_bytes));
        let window = bar64
            .saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX);
        // A window above QEMU's default hole: both the argument and the hint come from `gib`.
        let hint = (window > DEFAULT_HOLE64).then(|| {
            let gib = window >> 30;
            qemu_args.push("-global".to_owned());
            qemu_args.push(format!("q35-pcihost.pci-hole64-size={gib}G"));
            format!(
                "the devices' 64-bit BARs total {} GiB: give the VM a {gib} GiB 64-bit MMIO window (QEMU: -global q35-pcihost.pci-hole64-size={gib}G; with OVMF also -fw_cfg name=opt/ovmf/X-PciMmio64Mb,string={}; Cloud Hypervisor sizes it from the host's physical address bits, so keep them unrestricted)",
                bar64 >> 30,
                gib * 1024
            )
        });
        BootSpec {
            owner: owner.to_owned(),
            kernel_cmdline: if gpus > 0 {
                vec![HAS_GPU.to_owned()]
            } else {
                Vec::new()
            },
            initrd,
            cloud_hypervisor: CloudHypervisor {
                args: ch_args,
                vm_config_devices: ch_devices,
                warnings: ch_warnings,
            },
            qemu: Qemu {
                args: qemu_args,
                maxmem_extra_mib: None,
            },
            mmio: MmioHint {
                bar64_bytes: bar64,
                window_bytes: window,
                hint,
                sized: None,
            },
            devices,
            held_devices,
            warnings,
            disk: None,
            guest_addresses,
            placement: topo.placements.into_iter().flatten().collect(),
        }
    }

    /// The spec with its 64-bit MMIO window sized from the devices' real BARs (`None`: kept as
    /// rendered). QEMU gets `pci-hole64-size` and OVMF's `X-PciMmio64Mb` for it; Cloud
    /// Hypervisor has no window size (its 64-bit MMIO space runs from the end of RAM to the top
    /// of the guest's physical address space), so it gets a warning when the window needs more
    /// than its default 46 guest address bits.
    pub fn with_mmio(mut self, window: Option<MmioWindow>) -> BootSpec {
        let Some(w) = window else {
            return self;
        };
        // The rendered estimate's argument, if any, gives way to the sized one.
        if let Some(i) = self
            .qemu
            .args
            .iter()
            .position(|a| a.starts_with("q35-pcihost.pci-hole64-size="))
        {
            self.qemu.args.drain(i - 1..=i);
        }
        let (gib, bits) = (w.window_gib(), w.guest_phys_bits);
        if w.window_bytes > DEFAULT_HOLE64 {
            self.qemu.args.extend([
                "-global".to_owned(),
                format!("q35-pcihost.pci-hole64-size={gib}G"),
                "-fw_cfg".to_owned(),
                format!("name=opt/ovmf/X-PciMmio64Mb,string={}", w.window_mib()),
            ]);
            self.mmio.hint = Some(format!(
                "the devices' 64-bit prefetchable BARs total {} GiB (largest {} GiB): the VM needs a {gib} GiB 64-bit MMIO window, which takes {bits} guest physical address bits (QEMU: -global q35-pcihost.pci-hole64-size={gib}G -fw_cfg name=opt/ovmf/X-PciMmio64Mb,string={} and -cpu host,host-phys-bits=on; Cloud Hypervisor: --cpus max_phys_bits={bits} or more)",
                w.bar_bytes >> 30,
                w.largest_bar >> 30,
                w.window_mib()
            ));
        }
        if bits > CLOUD_HYPERVISOR_DEFAULT_PHYS_BITS {
            self.cloud_hypervisor.warnings.push(format!(
                "the {gib} GiB MMIO window takes {bits} guest physical address bits, more than Cloud Hypervisor's default {CLOUD_HYPERVISOR_DEFAULT_PHYS_BITS}: start it with --cpus max_phys_bits={bits}"
            ));
        }
        self.mmio.window_bytes = w.window_bytes;
        self.mmio.sized = Some(w);
        self
    }

    /// The spec with warnings for Grace GPUs among its devices: what a Grace guest needs that
    /// the spec cannot express yet, said instead of pretending.
    pub fn with_grace_gpus(mut self, gpus: &[PciAddress]) -> BootSpec {
        for g in gpus {
            self.warnings.push(format!(
                "{g} is a Grace superchip GPU: its memory is coherent with the CPU and the guest needs it as NUMA nodes of their own (QEMU: acpi-generic-initiator objects), and a virtual SMMUv3 with nested translation; this boot spec expresses neither yet (the host side, the nvgrace_gpu_vfio_pci variant driver, is bound where the kernel's modules.alias offers it), so the guest sees the GPU without its memory nodes"
            ));
        }
        self
    }

    /// The spec with NVLink turned off in the guest's `nvidia` module (its kernel word
    /// [`NVLINK_DISABLE`], which the guest init passes to the
    /// module as modprobe would), for GPUs of an NVLink board whose links cannot train in
    /// this VM.
    pub fn with_nvlink_disabled(mut self, disabled: bool) -> BootSpec {
        let word = NVLINK_DISABLE;
        if disabled && !self.kernel_cmdline.iter().any(|w| w == word) {
            self.kernel_cmdline.push(word.to_owned());
        }
        self
    }

    /// The spec with the GPU payload delivered as `disk`: its kernel word (next to `HAS_GPU=1`),
    /// its QEMU and Cloud Hypervisor arguments, and QEMU's memory slots for virtio-pmem.
    pub fn with_disk(mut self, disk: GpuDisk) -> BootSpec {
        self.kernel_cmdline.extend(disk.kernel_words());
        self.cloud_hypervisor
            .args
            .extend(disk.cloud_hypervisor_args());
        self.qemu.args.extend(disk.qemu_device_args());
        self.qemu.maxmem_extra_mib = disk.maxmem_extra_mib();
        self.disk = Some(disk);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(addr: &str, bar: u64) -> BootDevice {
        BootDevice {
            address: Some(addr.parse().unwrap()),
            mdev_uuid: None,
            sysfs_path: PathBuf::from(format!("/sys/bus/pci/devices/{addr}")),
            iommu_group: Some(3),
            vfio_device: PathBuf::from("/dev/vfio/3"),
            gpu: true,
            vgpu: false,
            bar64_bytes: bar,
            vfio: None,
            numa_node: None,
            host_switch: None,
            nic: false,
        }
    }

    #[test]
    fn one_gpu_has_no_clique_and_cmdline_word() {
        let s = BootSpec::new("vm", vec![gpu("0000:65:00.0", 16 << 30)], Vec::new(), None);
        assert_eq!(s.kernel_cmdline, vec!["HAS_GPU=1"]);
        assert_eq!(
            s.cloud_hypervisor.args,
            vec![
                "--device",
                "path=/sys/bus/pci/devices/0000:65:00.0/,id=gpt0,pci_segment=0,pci_device_id=16"
            ]
        );
        assert_eq!(
            s.qemu.args,
            vec!["-device", "vfio-pci,host=0000:65:00.0,bus=pcie.0,addr=0x10"]
        );
        assert_eq!(
            serde_json::to_value(&s.guest_addresses).unwrap(),
            serde_json::json!([{"guest": "0000:00:10.0", "host": "0000:65:00.0"}])
        );
        assert!(s.mmio.hint.is_none());
    }

    #[test]
    fn a_disk_adds_its_word_and_arguments_after_the_devices() {
        let spec = BootSpec::new("vm", vec![gpu("0000:65:00.0", 1 << 30)], Vec::new(), None);
        let disk = GpuDisk {
            image: "/c/gpu.erofs".into(),
            size: 160 << 20,
            attach: DiskAttach::Pmem,
            verity: None,
            isolation: Default::default(),
        };
        let s = spec.clone().with_disk(disk.clone());
        assert_eq!(s.kernel_cmdline, ["HAS_GPU=1", "GPU_DISK=pmem"]);
        assert_eq!(&s.qemu.args[..2], &spec.qemu.args[..]);
        assert_eq!(&s.qemu.args[2..], &disk.qemu_device_args()[..]);
        assert_eq!(s.qemu.maxmem_extra_mib, Some(160));
        assert_eq!(
            &s.cloud_hypervisor.args[2..],
            ["--pmem", "file=/c/gpu.erofs,discard_writes=on"]
        );
        assert_eq!(s.disk.as_ref(), Some(&disk));
        let blk = spec.with_disk(GpuDisk {
            attach: DiskAttach::Blk {
                device: "/dev/vda".into(),
            },
            ..disk
        });
        assert_eq!(blk.kernel_cmdline[1], "GPU_DISK=/dev/vda");
        assert_eq!(blk.qemu.maxmem_extra_mib, None);
        let json = serde_json::to_value(&blk).unwrap();
        assert_eq!(json["disk"]["attach"]["kind"], "blk");
        assert!(json["disk"].get("verity").is_none());
        // A verity disk adds its root hash and parameters to the command line.
        let verity = gpu_passthrough_guest_contract::disk::Verity {
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
            data_blocks: 512,
            hash_start_block: 512,
        };
        let blk = blk.disk.clone().unwrap();
        let s = spec_for_disk().with_disk(GpuDisk {
            verity: Some(verity.clone()),
            ..blk
        });
        assert_eq!(
            s.kernel_cmdline[1..],
            ["GPU_DISK=/dev/vda".to_string(), verity.kernel_word()]
        );
        assert!(s.kernel_cmdline[2].starts_with("GPU_DISK_VERITY=abab"));
    }

    fn spec_for_disk() -> BootSpec {
        BootSpec::new("vm", vec![gpu("0000:65:00.0", 1 << 30)], Vec::new(), None)
    }

    #[test]
    fn several_gpus_get_no_clique_unless_asked() {
        let two = vec![gpu("0000:18:00.0", 1 << 30), gpu("0000:2a:00.0", 1 << 30)];
        let s = BootSpec::new("vm", two, Vec::new(), None);
        assert!(
            s.cloud_hypervisor
                .args
                .iter()
                .all(|a| !a.contains("clique"))
        );
        assert!(s.qemu.args.iter().all(|a| !a.contains("clique")));
    }

    #[test]
    fn an_iommufd_cdev_gets_an_iommufd_object() {
        let mut d = gpu("0000:65:00.0", 1 << 30);
        d.vfio_device = PathBuf::from("/dev/vfio/devices/vfio0");
        assert!(d.is_iommufd_cdev());
        let s = BootSpec::new("vm", vec![d], Vec::new(), None);
        assert_eq!(
            s.qemu.args,
            [
                "-object",
                "iommufd,id=iommufd0",
                "-device",
                "vfio-pci,host=0000:65:00.0,iommufd=iommufd0,bus=pcie.0,addr=0x10"
            ]
        );
        assert_eq!(s.cloud_hypervisor.args[..2], ["--platform", "iommufd=on"]);
    }

    #[test]
    fn several_large_gpus_get_a_clique_and_a_window() {
        let s = BootSpec::render(
            "vm",
            vec![
                gpu("0000:18:00.0", 128 << 30),
                gpu("0000:2a:00.0", 128 << 30),
            ],
            Vec::new(),
            None,
            true,
        );
        assert!(s.cloud_hypervisor.args[1].ends_with(",x_nv_gpudirect_clique=0"));
        assert_eq!(
            s.cloud_hypervisor.vm_config_devices[1].x_nv_gpudirect_clique,
            Some(0)
        );
        assert!(
            s.qemu.args[1].ends_with(",x-nv-gpudirect-clique=0,bus=pcie.0,addr=0x10"),
            "{:?}",
            s.qemu.args
        );
        assert_eq!(s.mmio.window_bytes, 512 << 30);
        assert!(
            s.qemu
                .args
                .contains(&"q35-pcihost.pci-hole64-size=512G".to_owned())
        );
    }

    #[test]
    fn each_device_gets_its_own_root_bus_slot_until_they_run_out() {
        let many: Vec<BootDevice> = (1..=27)
            .map(|b| gpu(&format!("0000:{b:02x}:00.0"), 1 << 20))
            .collect();
        let s = BootSpec::new("vm", many, Vec::new(), None);
        let guest: Vec<String> = s
            .guest_addresses
            .iter()
            .map(|g| g.guest.to_string())
            .collect();
        assert_eq!(guest.len(), GUEST_SLOTS.len(), "one per slot, no more");
        assert_eq!(guest[1], "0000:00:11.0");
        assert_eq!(guest[13], "0000:00:03.0");
        let mut unique = guest.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), guest.len(), "{guest:?}");
        // The 27th device has no fixed slot: the VMM places it, and it is in no guest map.
        assert_eq!(s.qemu.args[53], "vfio-pci,host=0000:1b:00.0");
        assert_eq!(s.cloud_hypervisor.vm_config_devices[26].pci_device_id, None);
    }
}
