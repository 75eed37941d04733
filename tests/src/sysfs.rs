//! Fake sysfs trees shaped like the real one, and the simulated kernel that reacts to writes.
//!
//! A [`FakeHost`] is a temp dir with `sys/` (the sysfs root), `dev/` (for `vfio/<group>`
//! nodes) and `state/` (the journal). Devices live in `sys/devices/pciDDDD:BB/ADDR` and are
//! linked from `sys/bus/pci/devices/ADDR`; `driver` links point into `sys/bus/pci/drivers/NAME`,
//! `iommu_group` links into `sys/kernel/iommu_groups/N` (whose `devices/` links back).
//!
//! The root holds the simulation marker (`gpu_passthrough::simulation::SIMULATION_MARKER`),
//! so the library's writer performs the kernel's reactions itself on these plain files (moving
//! `driver` links, creating `dev/vfio/N` as a regular file). Everything is files, so the
//! simulation works across processes: crash tests run the CLI and kill it at a failpoint.
//! Failures are injected by lines in the marker file ([`FakeHost::inject`]): `fail-once ATTR`
//! (or `fail-once ATTR after K` to let K writes pass first), `no-vfio-node`.
//!
//! Scenarios: [`workstation`], [`server_8gpu`], [`iommu_off`], [`shared_group`], [`vgpu_host`].

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use gpu_passthrough::attach::{Host, Liveness, Owner, OwnerLiveness, PidLiveness};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough::simulation::{
    SIM_DEFAULT_DRIVER, SIM_FABRIC_PARTITIONS, SIM_MODULES_ALIAS, SIM_NVIDIA_GPUS, SIM_REGISTERS,
    SIM_VGPU_TYPES, SIMULATION_MARKER,
};

/// One fake PCI device.
#[derive(Debug, Clone)]
pub struct FakeDevice {
    /// Address `DDDD:BB:DD.F`.
    pub address: String,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// 24-bit class.
    pub class: u32,
    /// Bound driver (also its default driver for `drivers_probe`).
    pub driver: Option<String>,
    /// IOMMU group (ignored when the host has the IOMMU off).
    pub group: Option<u32>,
    /// NUMA node (-1 for none).
    pub numa: i32,
    /// `boot_vga` = 1.
    pub boot_vga: bool,
    /// 64-bit prefetchable BAR sizes, in bytes.
    pub bars64: Vec<u64>,
    /// mdev types: (id, name, available instances).
    pub mdev_types: Vec<(String, String, u32)>,
    /// `reset_method` contents (`None`: no reset method, no `reset_method` file).
    pub reset_method: Option<String>,
    /// Where it sits under `sys/devices` (bridges on the way, e.g. behind a PCIe switch);
    /// `None`: straight on its root bus `pciDDDD:BB`.
    pub parent: Option<String>,
}

impl FakeDevice {
    /// A device with the given identity, bound to `driver`, in `group`.
    pub fn new(address: &str, vendor: u16, device: u16, class: u32) -> Self {
        FakeDevice {
            address: address.into(),
            vendor,
            device,
            class,
            driver: None,
            group: None,
            numa: -1,
            boot_vga: false,
            bars64: Vec::new(),
            mdev_types: Vec::new(),
            reset_method: Some("flr bus".into()),
            parent: None,
        }
    }
    /// Under `path` in `sys/devices` (e.g. `pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0`).
    pub fn under(mut self, path: &str) -> Self {
        self.parent = Some(path.into());
        self
    }
    /// With these reset methods (`""`: none, as a device without FLR, PM or a bus to reset).
    pub fn reset_method(mut self, methods: &str) -> Self {
        self.reset_method = (!methods.is_empty()).then(|| methods.into());
        self
    }
    /// Bound to `driver`.
    pub fn driver(mut self, d: &str) -> Self {
        self.driver = Some(d.into());
        self
    }
    /// In IOMMU group `g`.
    pub fn group(mut self, g: u32) -> Self {
        self.group = Some(g);
        self
    }
    /// On NUMA node `n`.
    pub fn numa(mut self, n: i32) -> Self {
        self.numa = n;
        self
    }
    /// The boot display.
    pub fn boot_vga(mut self) -> Self {
        self.boot_vga = true;
        self
    }
    /// With a 64-bit BAR of `bytes`.
    pub fn bar64(mut self, bytes: u64) -> Self {
        self.bars64.push(bytes);
        self
    }
    /// Offering an mdev type.
    pub fn mdev(mut self, id: &str, name: &str, available: u32) -> Self {
        self.mdev_types.push((id.into(), name.into(), available));
        self
    }
}

/// A fake host: sysfs tree, dev dir and state dir in a temp dir.
pub struct FakeHost {
    /// Keeps the temp dir alive.
    pub dir: tempfile::TempDir,
    /// The sysfs root.
    pub sys: PathBuf,
    /// The dev dir.
    pub dev: PathBuf,
    /// The state dir.
    pub state: PathBuf,
    iommu: bool,
}

fn w(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl FakeHost {
    /// An empty host with the IOMMU on (or off) and the vfio-pci driver loaded.
    pub fn new(iommu: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        let state = dir.path().join("state");
        for d in [
            "bus/pci/devices",
            "bus/pci/drivers",
            "devices",
            "kernel/iommu_groups",
        ] {
            fs::create_dir_all(sys.join(d)).expect("mkdir");
        }
        fs::create_dir_all(dev.join("vfio")).expect("mkdir dev");
        w(&dev.join("vfio/vfio"), "");
        w(&sys.join(SIMULATION_MARKER), "");
        w(&sys.join("bus/pci/drivers_probe"), "");
        let host = FakeHost {
            dir,
            sys,
            dev,
            state,
            iommu,
        };
        host.ensure_driver("vfio-pci");
        fs::create_dir_all(host.sys.join("module/vfio_pci")).expect("mkdir");
        fs::create_dir_all(host.sys.join("module/vfio_iommu_type1")).expect("mkdir");
        host
    }

    fn ensure_driver(&self, name: &str) -> PathBuf {
        let d = self.sys.join("bus/pci/drivers").join(name);
        if !d.exists() {
            fs::create_dir_all(&d).expect("mkdir driver");
            w(&d.join("bind"), "");
            w(&d.join("unbind"), "");
        }
        d
    }

    /// Add a device.
    pub fn add(&self, dev: FakeDevice) -> &Self {
        let addr: PciAddress = dev.address.parse().expect("fake address");
        let a = addr.to_string();
        let parent = dev
            .parent
            .clone()
            .unwrap_or_else(|| format!("pci{:04x}:{:02x}", addr.domain, addr.bus));
        let real = self.sys.join("devices").join(parent).join(&a);
        fs::create_dir_all(&real).expect("mkdir device");
        w(&real.join("vendor"), &format!("0x{:04x}\n", dev.vendor));
        w(&real.join("device"), &format!("0x{:04x}\n", dev.device));
        w(&real.join("class"), &format!("0x{:06x}\n", dev.class));
        w(&real.join("numa_node"), &format!("{}\n", dev.numa));
        // As the kernel writes it (subsystem IDs: the vendor's own, device 0).
        w(
            &real.join("modalias"),
            &format!(
                "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}\n",
                dev.vendor,
                dev.device,
                dev.vendor,
                0,
                dev.class >> 16,
                (dev.class >> 8) & 0xff,
                dev.class & 0xff
            ),
        );
        w(&real.join("driver_override"), "(null)\n");
        if let Some(m) = &dev.reset_method {
            w(&real.join("reset_method"), &format!("{m}\n"));
        }
        w(&real.join("d3cold_allowed"), "1\n");
        // The first config-space bytes: vendor and device ID, little-endian, as the kernel shows.
        let mut config = vec![0u8; 64];
        config[..2].copy_from_slice(&dev.vendor.to_le_bytes());
        config[2..4].copy_from_slice(&dev.device.to_le_bytes());
        fs::write(real.join("config"), &config).expect("write config");
        if dev.class >> 16 == 0x03 {
            w(
                &real.join("boot_vga"),
                if dev.boot_vga { "1\n" } else { "0\n" },
            );
        }
        let mut resource =
            String::from("0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n");
        let mut base: u64 = 0x0000_2000_0000_0000;
        for size in &dev.bars64 {
            resource.push_str(&format!(
                "0x{base:016x} 0x{:016x} 0x000000000014220c\n0x0000000000000000 0x0000000000000000 0x0000000000000000\n",
                base + size - 1
            ));
            base += size;
        }
        w(&real.join("resource"), &resource);
        for (id, name, avail) in &dev.mdev_types {
            let t = real.join("mdev_supported_types").join(id);
            fs::create_dir_all(&t).expect("mkdir mdev type");
            w(&t.join("name"), &format!("{name}\n"));
            w(&t.join("available_instances"), &format!("{avail}\n"));
            w(&t.join("device_api"), "vfio-pci\n");
            w(&t.join("create"), "");
        }
        symlink(&real, self.sys.join("bus/pci/devices").join(&a)).expect("link device");
        if let Some(d) = &dev.driver {
            let ddir = self.ensure_driver(d);
            symlink(&ddir, real.join("driver")).expect("link driver");
            let _ = symlink(&real, ddir.join(&a));
            w(&real.join(SIM_DEFAULT_DRIVER), &format!("{d}\n"));
            if d == "nvidia" {
                fs::create_dir_all(self.sys.join(SIM_NVIDIA_GPUS).join(&a)).expect("mkdir");
            }
        }
        if let (true, Some(g)) = (self.iommu, dev.group) {
            let gdir = self.sys.join("kernel/iommu_groups").join(g.to_string());
            fs::create_dir_all(gdir.join("devices")).expect("mkdir group");
            symlink(&gdir, real.join("iommu_group")).expect("link group");
            symlink(&real, gdir.join("devices").join(&a)).expect("link member");
        }
        self
    }

    /// The running kernel's `modules.alias` as the simulation reads it
    /// ([`SIM_MODULES_ALIAS`]): lines in the kernel's own format.
    pub fn set_modules_alias(&self, text: &str) -> &Self {
        w(&self.sys.join(SIM_MODULES_ALIAS), text);
        self
    }

    /// A loaded VFIO variant driver as the kernel shows one: `module/<module>`, held by
    /// `vfio_pci_core`, and `bus/pci/drivers/<driver>` whose `module` link names it.
    pub fn load_vfio_variant(&self, module: &str, driver: &str) -> &Self {
        let m = self.sys.join("module").join(module);
        fs::create_dir_all(&m).expect("mkdir module");
        let holders = self.sys.join("module/vfio_pci_core/holders");
        fs::create_dir_all(&holders).expect("mkdir holders");
        let _ = symlink(&m, holders.join(module));
        let d = self.ensure_driver(driver);
        let _ = symlink(&m, d.join("module"));
        self
    }

    /// A VFIO variant module that is installed but not loaded: loading it (attach does)
    /// registers `driver`, built on `vfio_pci_core`.
    pub fn install_vfio_variant(&self, module: &str, driver: &str) -> &Self {
        let m = self.sys.join("module").join(module);
        fs::create_dir_all(&m).expect("mkdir module");
        w(&m.join(SIM_REGISTERS), driver);
        let holders = self.sys.join("module/vfio_pci_core/holders");
        fs::create_dir_all(&holders).expect("mkdir holders");
        let _ = symlink(&m, holders.join(module));
        self
    }

    /// Append a failure-injection line to the marker file (see the module docs).
    pub fn inject(&self, line: &str) {
        let m = self.sys.join(SIMULATION_MARKER);
        let mut t = fs::read_to_string(&m).unwrap_or_default();
        t.push_str(line);
        t.push('\n');
        w(&m, &t);
    }

    /// Remove all injected failures.
    pub fn clear_faults(&self) {
        w(&self.sys.join(SIMULATION_MARKER), "");
    }

    /// The driver `addr` is bound to now.
    pub fn driver(&self, addr: &str) -> Option<String> {
        fs::read_link(self.sys.join("bus/pci/devices").join(addr).join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// `driver_override` of `addr` (`None` when unset).
    pub fn driver_override(&self, addr: &str) -> Option<String> {
        fs::read_to_string(
            self.sys
                .join("bus/pci/devices")
                .join(addr)
                .join("driver_override"),
        )
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "(null)")
    }

    /// A library host over this tree; `gone` owners are released by reconcile.
    pub fn host(&self) -> Host {
        self.host_with(Box::new(PidLiveness::default()))
    }

    /// A library host with a given liveness check.
    pub fn host_with(&self, liveness: Box<dyn OwnerLiveness>) -> Host {
        Host::new(&self.sys, &self.state, liveness).with_dev_dir(&self.dev)
    }

    /// The journal as JSON (`None` if never written).
    pub fn journal(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.state.join("journal.json")).ok()?;
        Some(serde_json::from_str(&text).expect("journal.json parses"))
    }

    /// Whether the journal has no transaction and no attachment.
    pub fn journal_clean(&self) -> bool {
        self.journal().is_none_or(|j| {
            j["transactions"].as_array().is_some_and(|a| a.is_empty())
                && j["attachments"].as_array().is_some_and(|a| a.is_empty())
        })
    }

    /// The global flags that point the CLI at this tree.
    pub fn cli_args(&self) -> Vec<String> {
        vec![
            "--sysfs-root".into(),
            self.sys.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
        ]
    }
}

/// A liveness check with fixed answers (others: unknown).
pub struct FixedLiveness(pub Vec<(String, Liveness)>);

impl OwnerLiveness for FixedLiveness {
    fn is_alive(&self, owner: &Owner) -> Liveness {
        self.0
            .iter()
            .find(|(o, _)| o == owner.as_str())
            .map_or(Liveness::Unknown, |(_, l)| *l)
    }
}

/// Workstation: boot VGA iGPU, an RTX 4090 with its HDMI audio, SATA and NVMe on their own.
pub fn workstation() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(FakeDevice::new("0000:00:00.0", 0x8086, 0x4660, 0x060000).group(0))
        .add(
            FakeDevice::new("0000:00:01.0", 0x8086, 0x460d, 0x060400)
                .driver("pcieport")
                .group(1),
        )
        .add(
            FakeDevice::new("0000:00:02.0", 0x8086, 0x4680, 0x030000)
                .driver("i915")
                .group(2)
                .boot_vga(),
        )
        .add(
            FakeDevice::new("0000:00:17.0", 0x8086, 0x7ae2, 0x010601)
                .driver("ahci")
                .group(5),
        )
        .add(
            FakeDevice::new("0000:01:00.0", 0x10de, 0x2684, 0x030000)
                .driver("nvidia")
                .group(12)
                .numa(0)
                .bar64(32 << 30),
        )
        .add(
            FakeDevice::new("0000:01:00.1", 0x10de, 0x22ba, 0x040300)
                .driver("snd_hda_intel")
                .group(12)
                .numa(0),
        )
        .add(
            FakeDevice::new("0000:03:00.0", 0x144d, 0xa80a, 0x010802)
                .driver("nvme")
                .group(13),
        );
    h
}

/// 8× H100 SXM (NUMA 0: first four, NUMA 1: last four), 4 NVSwitches, 2 NICs.
pub fn server_8gpu() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(FakeDevice::new("0000:00:00.0", 0x8086, 0x09a2, 0x060000).group(0));
    for (i, bus) in [0x18u8, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb]
        .iter()
        .enumerate()
    {
        h.add(
            FakeDevice::new(&format!("0000:{bus:02x}:00.0"), 0x10de, 0x2330, 0x030200)
                .driver("nvidia")
                .group(20 + i as u32)
                .numa(if i < 4 { 0 } else { 1 })
                .bar64(128 << 30)
                .bar64(32 << 20),
        );
    }
    for (i, bus) in [0x05u8, 0x06, 0x07, 0x08].iter().enumerate() {
        h.add(
            FakeDevice::new(&format!("0000:{bus:02x}:00.0"), 0x10de, 0x22a3, 0x068000)
                .group(40 + i as u32)
                .numa(0),
        );
    }
    h.add(
        FakeDevice::new("0000:1a:00.0", 0x15b3, 0x1021, 0x020000)
            .driver("mlx5_core")
            .group(50)
            .numa(0),
    )
    .add(
        FakeDevice::new("0000:9c:00.0", 0x15b3, 0x1021, 0x020000)
            .driver("mlx5_core")
            .group(51)
            .numa(1),
    );
    h
}

/// The IOMMU off: a GPU and its audio, no groups.
pub fn iommu_off() -> FakeHost {
    let h = FakeHost::new(false);
    h.add(
        FakeDevice::new("0000:01:00.0", 0x10de, 0x2231, 0x030000)
            .driver("nvidia")
            .group(1),
    )
    .add(
        FakeDevice::new("0000:01:00.1", 0x10de, 0x1aef, 0x040300)
            .driver("snd_hda_intel")
            .group(1),
    );
    h
}

/// An RTX 2080 Ti and its audio sharing IOMMU group 7 with an in-use NIC (no ACS).
pub fn shared_group() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:00:1c.0", 0x8086, 0xa338, 0x060400)
            .driver("pcieport")
            .group(7),
    )
    .add(
        FakeDevice::new("0000:02:00.0", 0x10de, 0x1e04, 0x030000)
            .driver("nvidia")
            .group(7),
    )
    .add(
        FakeDevice::new("0000:02:00.1", 0x10de, 0x10f7, 0x040300)
            .driver("snd_hda_intel")
            .group(7),
    )
    .add(
        FakeDevice::new("0000:03:00.0", 0x8086, 0x1533, 0x020000)
            .driver("igb")
            .group(7),
    )
    // A V100, which the open modules do not support.
    .add(
        FakeDevice::new("0000:04:00.0", 0x10de, 0x1db4, 0x030200)
            .driver("nvidia")
            .group(8),
    );
    h
}

/// A vGPU host: an A16 on the nvidia driver offering two mdev types (one exhausted).
pub fn vgpu_host() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:3d:00.0", 0x10de, 0x25b6, 0x030200)
            .driver("nvidia")
            .group(30)
            .mdev("nvidia-735", "NVIDIA A16-4Q", 4)
            .mdev("nvidia-736", "NVIDIA A16-8Q", 0),
    );
    h
}

/// L40S vGPU type IDs and names used by the fake tables (a subset of the driver's).
pub const L40S_TYPES: [(&str, &str); 4] = [
    ("1147", "NVIDIA L40S-1Q"),
    ("1150", "NVIDIA L40S-4Q"),
    ("1155", "NVIDIA L40S-24Q"),
    ("1156", "NVIDIA L40S-48Q"),
];

impl FakeHost {
    /// An L40S PF on `nvidia` with SR-IOV VFs `.4`, `.5`, … (vendor-specific VFIO): each VF is
    /// `(current_vgpu_type, creatable type IDs)`; an empty list is a header-only table.
    pub fn add_l40s(&self, pf: &str, group: u32, numa: i32, vfs: &[(&str, &[&str])]) -> &Self {
        self.add(
            FakeDevice::new(pf, 0x10de, 0x26b9, 0x030200)
                .driver("nvidia")
                .group(group)
                .numa(numa)
                .bar64(64 << 30),
        );
        let pf_dir = self.sys.join("bus/pci/devices").join(pf);
        let every: String = L40S_TYPES
            .iter()
            .map(|(id, name)| format!("{id}  : {name}\n"))
            .collect();
        w(
            &pf_dir.join(SIM_VGPU_TYPES),
            &format!("ID    : vGPU Name\n{every}"),
        );
        let pf_addr: PciAddress = pf.parse().expect("fake PF");
        for (i, (current, ids)) in vfs.iter().enumerate() {
            let vf = PciAddress {
                function: 4 + i as u8,
                ..pf_addr
            }
            .to_string();
            self.add(
                FakeDevice::new(&vf, 0x10de, 0x26b9, 0x030200)
                    .driver("nvidia")
                    .group(group + 1 + i as u32)
                    .numa(numa),
            );
            let vf_dir = self.sys.join("bus/pci/devices").join(&vf);
            symlink(
                fs::canonicalize(&vf_dir).expect("vf"),
                pf_dir.join(format!("virtfn{i}")),
            )
            .expect("virtfn");
            symlink(
                fs::canonicalize(&pf_dir).expect("pf"),
                vf_dir.join("physfn"),
            )
            .expect("physfn");
            let n = vf_dir.join("nvidia");
            fs::create_dir_all(&n).expect("mkdir nvidia");
            let mut table = String::from("ID    : vGPU Name\n");
            for id in ids.iter() {
                let name = L40S_TYPES
                    .iter()
                    .find(|t| t.0 == *id)
                    .expect("known type")
                    .1;
                table.push_str(&format!("{id}  : {name}\n"));
            }
            w(&n.join("creatable_vgpu_types"), &table);
            w(&n.join("current_vgpu_type"), &format!("{current}\n"));
        }
        self
    }

    /// A T4 on `nvidia` offering mdev types 1B and 2Q (homogeneous: once a 1B exists, 2Q shows 0),
    /// with `used` 1B instances already created by someone.
    pub fn add_t4_mdev(&self, addr: &str, group: u32, numa: i32, used: u32) -> &Self {
        self.add(
            FakeDevice::new(addr, 0x10de, 0x1eb8, 0x030200)
                .driver("nvidia")
                .group(group)
                .numa(numa)
                .mdev("nvidia-222", "GRID T4-1B", 16 - used)
                .mdev("nvidia-223", "GRID T4-2Q", if used > 0 { 0 } else { 8 }),
        );
        let dir = self.sys.join("bus/pci/devices").join(addr);
        let types = dir.join("mdev_supported_types");
        for (t, fb, max) in [("nvidia-222", 1024, 16), ("nvidia-223", 2048, 8)] {
            w(
                &types.join(t).join("description"),
                &format!(
                    "num_heads=4, frl_config=45, framebuffer={fb}M, max_resolution=5120x2880, max_instance={max}\n"
                ),
            );
            fs::create_dir_all(types.join(t).join("devices")).expect("mkdir devices");
        }
        for i in 0..used {
            let uuid = format!("aaaaaaaa-0000-0000-0000-{i:012}");
            let m = fs::canonicalize(&dir).expect("parent").join(&uuid);
            fs::create_dir_all(&m).expect("mkdir mdev");
            symlink(&m, types.join("nvidia-222/devices").join(&uuid)).expect("link mdev");
            symlink(types.join("nvidia-222"), m.join("mdev_type")).expect("link mdev_type");
            let bus = self.sys.join("bus/mdev/devices");
            fs::create_dir_all(&bus).expect("mkdir bus/mdev");
            symlink(&m, bus.join(&uuid)).expect("link bus/mdev");
        }
        let bus = self.sys.join("class/mdev_bus");
        fs::create_dir_all(&bus).expect("mkdir mdev_bus");
        symlink(fs::canonicalize(&dir).expect("parent"), bus.join(addr)).expect("mdev_bus link");
        self
    }
}

impl FakeHost {
    /// Load the fake `nvidia` module (the vGPU manager) of `version`.
    pub fn set_manager_version(&self, version: &str) -> &Self {
        let m = self.sys.join("module/nvidia");
        fs::create_dir_all(&m).expect("mkdir module");
        w(&m.join("version"), &format!("{version}\n"));
        self
    }

    /// A VF's `nvidia/current_vgpu_type`.
    pub fn vgpu_type(&self, vf: &str) -> String {
        fs::read_to_string(
            self.sys
                .join("bus/pci/devices")
                .join(vf)
                .join("nvidia/current_vgpu_type"),
        )
        .expect("current_vgpu_type")
        .trim()
        .to_owned()
    }

    /// The type IDs a VF's `nvidia/creatable_vgpu_types` lists now.
    pub fn creatable(&self, vf: &str) -> Vec<String> {
        let t = fs::read_to_string(
            self.sys
                .join("bus/pci/devices")
                .join(vf)
                .join("nvidia/creatable_vgpu_types"),
        )
        .expect("creatable_vgpu_types");
        gpu_passthrough::vgpu::parse_creatable_types(&t)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// An mdev type's `available_instances`.
    pub fn available_instances(&self, parent: &str, mdev_type: &str) -> u32 {
        fs::read_to_string(
            self.sys
                .join("bus/pci/devices")
                .join(parent)
                .join("mdev_supported_types")
                .join(mdev_type)
                .join("available_instances"),
        )
        .expect("available_instances")
        .trim()
        .parse()
        .expect("a number")
    }

    /// The mdevs that exist now (`bus/mdev/devices`).
    pub fn mdevs(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.sys.join("bus/mdev/devices"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }
}

/// A fake VMM: a process holding `node` open (its stdin), as QEMU holds `/dev/vfio/N`. Kill it
/// (and wait) when done.
pub fn fake_vmm(node: &Path) -> std::process::Child {
    let f = fs::File::open(node).expect("open the node");
    std::process::Command::new("sleep")
        .arg("120")
        .stdin(f)
        .spawn()
        .expect("spawn sleep")
}

/// Three L40S on vendor-specific VFIO: 41:00.0 (NUMA 0) has two 4Q vGPUs, 61:00.0 (NUMA 0) is
/// empty, a1:00.0 (NUMA 1) is full (two 24Q; its free VFs have header-only tables).
pub fn l40s_host() -> FakeHost {
    let h = FakeHost::new(true);
    let all: &[&str] = &["1147", "1150", "1155", "1156"];
    h.add_l40s(
        "0000:41:00.0",
        60,
        0,
        &[
            ("1150", &[]),
            ("1150", &[]),
            ("0", &["1150"]),
            ("0", &["1150"]),
        ],
    )
    .add_l40s(
        "0000:61:00.0",
        70,
        0,
        &[("0", all), ("0", all), ("0", all), ("0", all)],
    )
    .add_l40s(
        "0000:a1:00.0",
        80,
        1,
        &[("1155", &[]), ("1155", &[]), ("0", &[]), ("0", &[])],
    );
    h
}

/// A T4 on mdev with one 1B instance in use.
pub fn t4_mdev_host() -> FakeHost {
    let h = FakeHost::new(true);
    h.add_t4_mdev("0000:3b:00.0", 90, 0, 1);
    h
}

/// Both frameworks on one host: an empty L40S and an unused T4.
pub fn mixed_vgpu_host() -> FakeHost {
    let h = FakeHost::new(true);
    h.add_l40s(
        "0000:41:00.0",
        60,
        0,
        &[("0", &["1150", "1156"]), ("0", &["1150", "1156"])],
    )
    .add_t4_mdev("0000:3b:00.0", 90, 1, 0);
    h
}

/// The GPUs of [`hgx_8gpu`], NUMA node 0 first: the addresses of the DGX H100 user guide's GPU
/// table (GPU0–7), which the HGX H100/H200 baseboard gives every 8-GPU server built on it.
pub const HGX_GPUS: [&str; 8] = [
    "0000:1b:00.0",
    "0000:43:00.0",
    "0000:52:00.0",
    "0000:61:00.0",
    "0000:9d:00.0",
    "0000:c3:00.0",
    "0000:d1:00.0",
    "0000:df:00.0",
];

/// The four NVSwitches of [`hgx_8gpu`] (10de:22a3, class 0680), behind management switch
/// `0000:03:00.0`.
pub const HGX_NVSWITCHES: [&str; 4] = [
    "0000:05:00.0",
    "0000:06:00.0",
    "0000:07:00.0",
    "0000:08:00.0",
];

/// An 8-GPU HGX H100 (or, with `h200`, H200) board as a DGX H100-class server shows it.
///
/// Where it comes from: the GPU addresses are those of the DGX H100 user guide's GPU table;
/// each GPU sits behind its own PCIe switch with a ConnectX-7 beside it (the guide's block
/// diagram: one switch per GPU/NIC pair; the NIC at GPU bus − 3 as in public DGX H100
/// `lspci -t` dumps, root port and switch ports numbered below it); the four NVSwitches
/// (10de:22a3) sit behind one management switch on NUMA node 0 and share its IOMMU group, as
/// the issue describes; NUMA 0 holds GPUs 0–3, NUMA 1 GPUs 4–7. Hopper BARs: BAR0 16 MiB
/// (32-bit), BAR1 128 GiB (H200: 256 GiB as the issue asks) and BAR3 32 MiB, both 64-bit
/// prefetchable. Bus numbers of switch ports are plausible, not copied from one machine.
pub fn hgx_8gpu(h200: bool) -> FakeHost {
    hgx_board(h200, None)
}

/// The partitions NVIDIA's fabric manager guide lists for an HGX H100 board in shared-NVSwitch
/// mode, over [`HGX_GPUS`] (physical IDs 1–8 in that order): ID 0 all eight, 1–2 four (one per
/// NUMA node), 3–6 two, 7–14 one.
pub fn hgx_partitions() -> Vec<(u32, Vec<&'static str>)> {
    let mut out = vec![(0, HGX_GPUS.to_vec())];
    for (i, c) in HGX_GPUS.chunks(4).enumerate() {
        out.push((1 + i as u32, c.to_vec()));
    }
    for (i, c) in HGX_GPUS.chunks(2).enumerate() {
        out.push((3 + i as u32, c.to_vec()));
    }
    for (i, g) in HGX_GPUS.iter().enumerate() {
        out.push((7 + i as u32, vec![*g]));
    }
    out
}

/// [`hgx_8gpu`] (H100) in shared-NVSwitch mode: the NVSwitches on `nvidia` (the host's fabric
/// manager drives them) and the fabric manager's partitions, [`hgx_partitions`], all inactive.
pub fn hgx_shared_nvswitch() -> FakeHost {
    let h = hgx_board(false, Some("nvidia"));
    let parts = hgx_partitions();
    h.set_partitions(
        &parts
            .iter()
            .map(|(id, gpus)| (*id, gpus.as_slice(), false))
            .collect::<Vec<_>>(),
    );
    h
}

impl FakeHost {
    /// Write the fabric manager's partitions, as `fmpm -l` prints them (NVML bus IDs), into
    /// the file that puts the host in shared-NVSwitch mode: (ID, GPUs, active).
    pub fn set_partitions(&self, parts: &[(u32, &[&str], bool)]) {
        let info: Vec<serde_json::Value> = parts
            .iter()
            .map(|(id, gpus, active)| {
                let gpu_info: Vec<serde_json::Value> = gpus
                    .iter()
                    .enumerate()
                    .map(|(i, g)| {
                        serde_json::json!({
                            "physicalId": i + 1,
                            "uuid": format!("GPU-{id:08x}-{i}"),
                            "pciBusId": format!("0000{}", g.to_uppercase()),
                            "numNvLinksAvailable": 18,
                            "maxNumNvLinks": 18,
                            "nvlinkLineRateMBps": 26562,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "partitionId": id,
                    "isActive": u32::from(*active),
                    "numGpus": gpus.len(),
                    "gpuInfo": gpu_info,
                })
            })
            .collect();
        let list = serde_json::json!({
            "version": 16777240,
            "numPartitions": parts.len(),
            "maxNumPartitions": 31,
            "partitionInfo": info,
        });
        w(
            &self.sys.join(SIM_FABRIC_PARTITIONS),
            &serde_json::to_string_pretty(&list).expect("json"),
        );
    }

    /// The IDs of the partitions active now.
    pub fn active_partitions(&self) -> Vec<u32> {
        let text = fs::read_to_string(self.sys.join(SIM_FABRIC_PARTITIONS)).expect("partitions");
        let list: serde_json::Value = serde_json::from_str(&text).expect("json");
        list["partitionInfo"]
            .as_array()
            .expect("partitionInfo")
            .iter()
            .filter(|p| p["isActive"] == 1)
            .map(|p| p["partitionId"].as_u64().expect("id") as u32)
            .collect()
    }
}

fn hgx_board(h200: bool, switch_driver: Option<&str>) -> FakeHost {
    let h = FakeHost::new(true);
    let port = |addr: String, under: Option<String>, group: u32, numa: i32| {
        let d = FakeDevice::new(&addr, 0x8086, 0x352a, 0x060400)
            .driver("pcieport")
            .group(group)
            .numa(numa);
        match under {
            Some(u) => d.under(&u),
            None => d,
        }
    };
    h.add(FakeDevice::new("0000:00:00.0", 0x8086, 0x09a2, 0x060000).group(0));
    // The management switch: root port, upstream port, one downstream port per NVSwitch.
    let root = "pci0000:00/0000:00:01.1".to_owned();
    h.add(port("0000:00:01.1".into(), None, 40, 0));
    let up = format!("{root}/0000:03:00.0");
    h.add(port("0000:03:00.0".into(), Some(root), 40, 0));
    for (i, sw) in HGX_NVSWITCHES.iter().enumerate() {
        let down = format!("0000:04:{i:02x}.0");
        h.add(port(down.clone(), Some(up.clone()), 40, 0));
        let switch = FakeDevice::new(sw, 0x10de, 0x22a3, 0x068000)
            .group(40)
            .numa(0)
            .bar64(32 << 20)
            .under(&format!("{up}/{down}"));
        h.add(match switch_driver {
            Some(d) => switch.driver(d),
            None => switch,
        });
    }
    let bar1: u64 = if h200 { 256 << 30 } else { 128 << 30 };
    let device_id = if h200 { 0x2335 } else { 0x2330 };
    for (i, gpu) in HGX_GPUS.iter().enumerate() {
        let b = u8::from_str_radix(&gpu[5..7], 16).expect("bus");
        let numa = if i < 4 { 0 } else { 1 };
        let g = 100 + 10 * i as u32;
        let root_port = format!("0000:{:02x}:01.0", b - 6);
        let root = format!("pci0000:{:02x}/{root_port}", b - 6);
        h.add(port(root_port, None, g, numa));
        let upstream = format!("0000:{:02x}:00.0", b - 5);
        let up = format!("{root}/{upstream}");
        h.add(port(upstream, Some(root), g + 1, numa));
        let (nic_port, gpu_port) = (
            format!("0000:{:02x}:00.0", b - 4),
            format!("0000:{:02x}:01.0", b - 4),
        );
        h.add(port(nic_port.clone(), Some(up.clone()), g + 2, numa));
        h.add(port(gpu_port.clone(), Some(up.clone()), g + 3, numa));
        h.add(
            FakeDevice::new(
                &format!("0000:{:02x}:00.0", b - 3),
                0x15b3,
                0x1021,
                0x020700,
            )
            .driver("mlx5_core")
            .group(g + 4)
            .numa(numa)
            .under(&format!("{up}/{nic_port}")),
        );
        h.add(
            FakeDevice::new(gpu, 0x10de, device_id, 0x030200)
                .driver("nvidia")
                .group(g + 5)
                .numa(numa)
                .bar64(bar1)
                .bar64(32 << 20)
                .under(&format!("{up}/{gpu_port}")),
        );
    }
    h
}

/// A GH200 superchip's GPU at its real address, PCI domain 0009 (`0009:01:00.0`, as
/// `nvidia-smi` shows it on GH200 systems), 10de:2342, behind its root port, on the `nvidia`
/// driver: BAR0 16 MiB, BAR2 the 128 GiB device-memory aperture and BAR4 32 MiB.
pub fn gh200() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0009:00:00.0", 0x10de, 0x22b2, 0x060400)
            .driver("pcieport")
            .group(8),
    )
    .add(
        FakeDevice::new("0009:01:00.0", 0x10de, 0x2342, 0x030200)
            .driver("nvidia")
            .group(9)
            .numa(0)
            .bar64(128 << 30)
            .bar64(32 << 20)
            .under("pci0009:00/0009:00:00.0"),
    );
    h
}
