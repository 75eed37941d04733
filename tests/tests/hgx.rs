//! HGX boards and Grace (#25) on fake sysfs trees shaped like the real machines
//! (`sysfs::hgx_8gpu`): NVSwitches as devices of their own, baseboards, terabyte BARs.

use gpu_passthrough::attach::{AttachError, AttachRequest, Owner, PlanRequest, RefusalReason};
use gpu_passthrough::pci::{DeviceKind, PciAddress};
use gpu_passthrough_tests::sysfs::{self, FakeDevice, FakeHost, HGX_GPUS, HGX_NVSWITCHES};

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn req(devs: &[&str]) -> PlanRequest {
    PlanRequest {
        devices: devs.iter().map(|d| a(d)).collect(),
        ..Default::default()
    }
}

fn whole_board() -> Vec<&'static str> {
    HGX_GPUS
        .iter()
        .chain(HGX_NVSWITCHES.iter())
        .copied()
        .collect()
}

#[test]
fn nvswitches_are_listed_as_nvswitches_with_their_baseboard() {
    let h = sysfs::hgx_8gpu(false);
    let list = h.host().devices(false, None).unwrap();
    let switches: Vec<_> = list
        .iter()
        .filter(|d| d.device.kind == DeviceKind::NvSwitch)
        .collect();
    let addrs: Vec<String> = switches
        .iter()
        .map(|d| d.device.address.to_string())
        .collect();
    assert_eq!(addrs, HGX_NVSWITCHES);
    for s in &switches {
        assert_eq!(s.baseboard.as_deref(), Some("0000:03:00.0"));
        assert!(!s.ready, "an NVSwitch alone is never ready");
        assert!(
            s.not_ready_because[0].contains("whole baseboard"),
            "{:?}",
            s.not_ready_because
        );
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["kind"], "nvswitch");
        assert_eq!(json["baseboard"], "0000:03:00.0");
    }
    let gpus: Vec<_> = list
        .iter()
        .filter(|d| d.device.kind == DeviceKind::Display)
        .collect();
    assert_eq!(gpus.len(), 8);
    assert!(
        gpus.iter()
            .all(|g| g.ready && g.baseboard.as_deref() == Some("0000:03:00.0"))
    );
    let boards = gpu_passthrough::pci::Sysfs::new(&h.sys)
        .baseboards()
        .unwrap();
    assert_eq!(boards.len(), 1);
    assert_eq!(boards[0].gpus.len(), 8);
    assert_eq!(boards[0].nvswitches.len(), 4);
}

#[test]
fn nvswitches_are_never_counted_as_gpus() {
    let h = sysfs::hgx_8gpu(false);
    let p = h
        .host()
        .plan(&PlanRequest {
            gpus: Some(8),
            ..Default::default()
        })
        .unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    let mut picked: Vec<String> = p.requested.iter().map(|a| a.to_string()).collect();
    picked.sort();
    assert_eq!(picked, HGX_GPUS);
    let nine = h.host().plan(&PlanRequest {
        gpus: Some(9),
        ..Default::default()
    });
    assert!(
        matches!(nine, Err(AttachError::NotEnoughGpus { wanted: 9, free: 8 })),
        "{nine:?}"
    );
}

#[test]
fn an_nvswitch_alone_is_refused_naming_what_is_missing() {
    let h = sysfs::hgx_8gpu(false);
    let p = h.host().plan(&req(&["0000:05:00.0"])).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::NvSwitch)
        .expect("an NVSwitch refusal");
    for missing in HGX_GPUS.iter().chain(&HGX_NVSWITCHES[1..]) {
        assert!(r.message.contains(missing), "{}", r.message);
    }
    assert!(!r.message.contains("missing: 0000:05:00.0"));
    // Bridges of its group (the management switch) never move; the other NVSwitches are
    // group members and refused as such.
    assert!(
        p.devices
            .iter()
            .all(|d| d.kind != DeviceKind::Bridge && d.address.bus >= 5 && d.address.bus <= 8)
    );
    assert_eq!(
        p.refusals
            .iter()
            .filter(|r| r.reason == RefusalReason::NvSwitch)
            .count(),
        4
    );
}

#[test]
fn an_nvswitch_in_a_gpus_group_is_not_moved_by_accident() {
    // A board without ACS between a GPU and an NVSwitch: one IOMMU group.
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:1b:00.0", 0x10de, 0x2330, 0x030200)
            .driver("vfio-pci")
            .group(9),
    )
    .add(FakeDevice::new("0000:05:00.0", 0x10de, 0x22a3, 0x068000).group(9));
    let p = h.host().plan(&req(&["0000:1b:00.0"])).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::NvSwitch)
        .expect("refused");
    assert_eq!(r.device, Some(a("0000:05:00.0")));
    assert!(r.message.contains("IOMMU group 9"), "{}", r.message);
}

#[test]
fn the_whole_board_plans_attaches_and_detaches_as_one() {
    let h = sysfs::hgx_8gpu(true);
    let host = h.host();
    let p = host.plan(&req(&whole_board())).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    assert_eq!(p.devices.len(), 12);
    assert!(p.devices.iter().all(|d| d.kind != DeviceKind::Bridge));
    let owner = Owner::new("vm-hgx").unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: req(&whole_board()),
            owner: owner.clone(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(spec.devices.len(), 12);
    assert_eq!(spec.devices.iter().filter(|d| d.gpu).count(), 8);
    for d in whole_board() {
        assert_eq!(h.driver(d).as_deref(), Some("vfio-pci"), "{d}");
    }
    assert_eq!(h.driver("0000:03:00.0").as_deref(), Some("pcieport"));
    host.detach(&owner).unwrap();
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
    }
    for d in HGX_NVSWITCHES {
        assert_eq!(h.driver(d), None, "{d}");
    }
    assert!(h.journal_clean());
}

/// A proc root in the host's PID namespace whose CPU has `bits` physical address bits.
fn proc_with_address_bits(h: &FakeHost, bits: u8) -> std::path::PathBuf {
    let root = h.dir.path().join(format!("proc-{bits}"));
    std::fs::create_dir_all(root.join("self/ns")).unwrap();
    std::os::unix::fs::symlink(
        gpu_passthrough::pidns::INITIAL_PID_NS,
        root.join("self/ns/pid"),
    )
    .unwrap();
    std::fs::write(
        root.join("cpuinfo"),
        format!(
            "processor\t: 0\nvendor_id\t: GenuineIntel\naddress sizes\t: {bits} bits physical, 57 bits virtual\n\nprocessor\t: 1\naddress sizes\t: {bits} bits physical, 57 bits virtual\n"
        ),
    )
    .unwrap();
    root
}

#[test]
fn eight_h200s_get_a_terabyte_window_in_the_plan_and_the_boot_spec() {
    let h = sysfs::hgx_8gpu(true);
    let host = h.host().with_proc_root(proc_with_address_bits(&h, 46));
    let p = host.plan(&req(&whole_board())).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    let m = p.mmio.expect("a window");
    // 8 × (256 GiB + 32 MiB) of GPU BARs and 4 × 32 MiB of NVSwitch BARs, read from sysfs.
    assert_eq!(
        m.bar_bytes,
        8 * ((256u64 << 30) + (32 << 20)) + 4 * (32 << 20)
    );
    assert_eq!(m.largest_bar, 256 << 30);
    assert!(m.window_bytes >= m.bar_bytes);
    assert!(m.guest_phys_bits <= 46);
    assert_eq!(p.host_phys_bits, Some(46));
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["mmio"]["window_bytes"], m.window_bytes);
    assert_eq!(json["mmio"]["guest_phys_bits"], m.guest_phys_bits);
    eprintln!(
        "eight H200 + four NVSwitches: {} GiB of BARs, window {} GiB ({} bytes), {} guest address bits",
        m.bar_bytes >> 30,
        m.window_gib(),
        m.window_bytes,
        m.guest_phys_bits
    );

    let spec = host
        .attach(&AttachRequest {
            plan: req(&whole_board()),
            owner: Owner::new("vm-h200").unwrap(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(spec.mmio.window_bytes, m.window_bytes);
    let q = &spec.qemu.args;
    let hole = format!("q35-pcihost.pci-hole64-size={}G", m.window_gib());
    let i = q.iter().position(|a| *a == hole).expect("pci-hole64-size");
    assert_eq!(q[i - 1], "-global");
    assert_eq!(
        q.iter().filter(|a| a.contains("pci-hole64-size")).count(),
        1,
        "{q:?}"
    );
    let ovmf = format!("name=opt/ovmf/X-PciMmio64Mb,string={}", m.window_mib());
    let j = q.iter().position(|a| *a == ovmf).expect("X-PciMmio64Mb");
    assert_eq!(q[j - 1], "-fw_cfg");
    assert!(
        spec.mmio
            .hint
            .as_deref()
            .unwrap()
            .contains("guest physical address bits")
    );
}

#[test]
fn a_cpu_with_too_few_address_bits_is_refused_before_anything_moves() {
    let h = sysfs::hgx_8gpu(true);
    // The board's window takes 43 bits; one H200's takes 40.
    let host = h.host().with_proc_root(proc_with_address_bits(&h, 42));
    let p = host.plan(&req(&whole_board())).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::AddressBits)
        .expect("refused for address bits");
    assert!(r.message.contains("has 42"), "{}", r.message);
    let err = host
        .attach(&AttachRequest {
            plan: req(&whole_board()),
            owner: Owner::new("vm-small-cpu").unwrap(),
            initrd: None,
        })
        .unwrap_err();
    assert!(matches!(err, AttachError::Refused(_)), "{err:?}");
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
        assert_eq!(h.driver_override(d), None);
    }
    assert!(h.journal_clean());
    // One H200 fits the same CPU.
    let one = host.plan(&req(&[HGX_GPUS[0]])).unwrap();
    assert!(one.refusals.is_empty(), "{:?}", one.refusals);
    assert!(one.mmio.unwrap().guest_phys_bits <= 42);
}

#[test]
fn a_gh200_in_domain_0009_plans_attaches_and_its_spec_says_what_it_lacks() {
    let h = sysfs::gh200();
    let host = h.host();
    let gpu = "0009:01:00.0";
    let p = host.plan(&req(&[gpu])).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    assert_eq!(p.requested, [a(gpu)]);
    let owner = Owner::new("vm-gh200").unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: req(&[gpu]),
            owner: owner.clone(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(h.driver(gpu).as_deref(), Some("vfio-pci"));
    // At the guest address the boot spec fixes for it.
    let device = format!("vfio-pci,host={gpu},bus=pcie.0,addr=0x10");
    assert!(spec.qemu.args.contains(&device), "{:?}", spec.qemu.args);
    assert_eq!(spec.warnings.len(), 1, "{:?}", spec.warnings);
    assert!(spec.warnings[0].contains(gpu));
    assert!(spec.warnings[0].contains("NUMA nodes"));
    assert!(spec.warnings[0].contains("SMMUv3"));
    // An H100 gets no such warning.
    let hgx = sysfs::hgx_8gpu(false);
    let s = hgx
        .host()
        .attach(&AttachRequest {
            plan: req(&[HGX_GPUS[0]]),
            owner: Owner::new("vm-h100").unwrap(),
            initrd: None,
        })
        .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    host.detach(&owner).unwrap();
    assert_eq!(h.driver(gpu).as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

#[test]
fn a_board_attach_that_fails_midway_rolls_every_device_back() {
    let h = sysfs::hgx_8gpu(false);
    // The seventh device's probe fails: six have moved by then.
    h.inject("fail-once drivers_probe after 6");
    let err = h
        .host()
        .attach(&AttachRequest {
            plan: req(&whole_board()),
            owner: Owner::new("vm-hgx").unwrap(),
            initrd: None,
        })
        .unwrap_err();
    assert!(!matches!(err, AttachError::Refused(_)), "{err:?}");
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
        assert_eq!(h.driver_override(d), None, "{d}");
    }
    for d in HGX_NVSWITCHES {
        assert_eq!(h.driver(d), None, "{d}");
        assert_eq!(h.driver_override(d), None, "{d}");
    }
    assert!(h.journal_clean());
}
