//! HGX boards and Grace (#25) on fake sysfs trees shaped like the real machines
//! (`sysfs::hgx_8gpu`): NVSwitches as devices of their own, baseboards, terabyte BARs.

use gpu_passthrough::attach::{
    AttachError, AttachRequest, FabricRequest, Owner, PlanRequest, RefusalReason,
};
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

// --- Point 2: a whole baseboard as one request; NVLink refused for a partial set. ---

fn board_req() -> PlanRequest {
    PlanRequest {
        fabric: FabricRequest {
            // Any member names the board: here its fifth GPU.
            baseboard: Some(a(HGX_GPUS[4])),
            nvlink: true,
        },
        ..Default::default()
    }
}

#[test]
fn a_baseboard_request_takes_eight_gpus_and_four_nvswitches_in_one_transaction() {
    let h = sysfs::hgx_8gpu(true);
    let host = h.host();
    let p = host.plan(&board_req()).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    let mut requested: Vec<String> = p.requested.iter().map(|a| a.to_string()).collect();
    requested.sort();
    let mut expected = whole_board();
    expected.sort();
    assert_eq!(requested, expected);
    let kinds = |k| p.devices.iter().filter(|d| d.kind == k && d.passed).count();
    assert_eq!(
        (kinds(DeviceKind::Display), kinds(DeviceKind::NvSwitch)),
        (8, 4)
    );
    assert!(p.partition.is_none());

    let owner = Owner::new("vm-board").unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: board_req(),
            owner: owner.clone(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(spec.devices.len(), 12);
    // NVLink trains through the NVSwitches the VM has: not turned off.
    assert!(!spec.kernel_cmdline.iter().any(|w| w.contains("NvLink")));
    // One attachment of twelve devices, one history entry: one transaction.
    let j = h.journal().unwrap();
    assert_eq!(j["attachments"].as_array().unwrap().len(), 1);
    assert_eq!(j["attachments"][0]["devices"].as_array().unwrap().len(), 12);
    assert_eq!(j["history"].as_array().unwrap().len(), 1);
    for d in whole_board() {
        assert_eq!(h.driver(d).as_deref(), Some("vfio-pci"), "{d}");
    }

    let report = host.detach(&owner).unwrap();
    assert_eq!(report.restored.len(), 12);
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
        assert_eq!(h.driver_override(d), None, "{d}");
    }
    for d in HGX_NVSWITCHES {
        assert_eq!(h.driver(d), None, "{d}");
    }
    assert!(h.journal_clean());
}

#[test]
fn nvlink_for_a_partial_board_is_refused_naming_the_missing_devices_and_nothing_moves() {
    let h = sysfs::hgx_8gpu(false);
    let host = h.host();
    let partial = PlanRequest {
        fabric: FabricRequest {
            baseboard: None,
            nvlink: true,
        },
        ..req(&HGX_GPUS[..4])
    };
    let p = host.plan(&partial).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::PartialBaseboard)
        .expect("refused as a partial board");
    for missing in HGX_GPUS[4..].iter().chain(&HGX_NVSWITCHES) {
        assert!(r.message.contains(missing), "{}", r.message);
    }
    for asked in &HGX_GPUS[..4] {
        assert!(!r.message.contains(&format!("{asked} ")), "{}", r.message);
    }
    assert!(r.message.contains("--baseboard"), "{}", r.message);
    // All eight GPUs without the NVSwitches: the NVSwitches are what is missing.
    let no_switches = PlanRequest {
        fabric: FabricRequest {
            baseboard: None,
            nvlink: true,
        },
        ..req(&HGX_GPUS)
    };
    let r = host.plan(&no_switches).unwrap().refusals;
    let r = r
        .iter()
        .find(|r| r.reason == RefusalReason::PartialBaseboard)
        .expect("refused");
    assert!(
        r.message
            .contains(&format!("missing {}", HGX_NVSWITCHES.join(" "))),
        "{}",
        r.message
    );
    let err = host
        .attach(&AttachRequest {
            plan: partial,
            owner: Owner::new("vm-partial").unwrap(),
            initrd: None,
        })
        .unwrap_err();
    assert!(matches!(err, AttachError::Refused(_)), "{err:?}");
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
        assert_eq!(h.driver_override(d), None, "{d}");
    }
    assert!(h.journal_clean());
    // Without NVLink the same four GPUs are fine, and their guest runs with NVLink off.
    let spec = host
        .attach(&AttachRequest {
            plan: req(&HGX_GPUS[..4]),
            owner: Owner::new("vm-pcie").unwrap(),
            initrd: None,
        })
        .unwrap();
    assert!(
        spec.kernel_cmdline
            .contains(&gpu_passthrough::vmm::NVLINK_DISABLE.to_owned()),
        "{:?}",
        spec.kernel_cmdline
    );
}

#[test]
fn a_baseboard_through_a_device_on_no_board_is_refused() {
    let h = sysfs::gh200();
    let p = h
        .host()
        .plan(&PlanRequest {
            fabric: FabricRequest {
                baseboard: Some(a("0009:01:00.0")),
                nvlink: false,
            },
            ..Default::default()
        })
        .unwrap();
    assert_eq!(p.refusals.len(), 1, "{:?}", p.refusals);
    assert_eq!(p.refusals[0].reason, RefusalReason::NoBaseboard);
    assert!(p.refusals[0].message.contains("0009:01:00.0"));
}

// --- Point 3: shared-NVSwitch mode (the fabric manager on the host). ---

/// A health source that quarantines one device.
struct Sick(PciAddress);

impl gpu_passthrough::quarantine::QuarantineCheck for Sick {
    fn is_quarantined(&self, device: PciAddress) -> bool {
        device == self.0
    }
}

fn gpus(n: usize) -> PlanRequest {
    PlanRequest {
        gpus: Some(n),
        ..Default::default()
    }
}

#[test]
fn a_request_for_n_gpus_takes_a_free_partition_of_exactly_n_on_the_least_loaded_node() {
    let h = sysfs::hgx_shared_nvswitch();
    let host = h.host();
    assert!(host.shared_nvswitch());
    for (n, sizes) in [(1, 1), (2, 2), (4, 4), (8, 8)] {
        let p = host.plan(&gpus(n)).unwrap();
        assert!(p.refusals.is_empty(), "{n}: {:?}", p.refusals);
        let part = p.partition.expect("a partition");
        assert_eq!(part.gpus.len(), sizes);
        let mut requested = p.requested.clone();
        requested.sort();
        assert_eq!(requested, part.gpus);
        // NVSwitches stay with the host.
        assert!(p.devices.iter().all(|d| d.kind != DeviceKind::NvSwitch));
    }
    // Two GPUs on NUMA node 0 held: the next pair goes to node 1, the least loaded.
    let first = host
        .attach(&AttachRequest {
            plan: gpus(2),
            owner: Owner::new("vm-a").unwrap(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(first.devices.len(), 2);
    let j = h.journal().unwrap();
    assert_eq!(j["attachments"][0]["fabric_partitions"][0]["id"], 3);
    let next = host.plan(&gpus(2)).unwrap();
    assert_eq!(next.partition.unwrap().id, 5, "NUMA node 1's first pair");
    // A quarantined GPU's partitions are passed over.
    let sick = a(HGX_GPUS[4]);
    let host = h.host().with_quarantine(Box::new(Sick(sick)));
    let p = host.plan(&gpus(2)).unwrap();
    assert_eq!(p.partition.unwrap().id, 6);
    let p = host.plan(&gpus(4)).unwrap();
    assert!(
        p.refusals
            .iter()
            .any(|r| r.reason == RefusalReason::FabricPartition),
        "both 4-GPU partitions hold a GPU that is held or quarantined: {:?}",
        p.refusals
    );
}

#[test]
fn no_partition_of_n_is_refused_naming_the_sizes_there_are() {
    let h = sysfs::hgx_shared_nvswitch();
    let p = h.host().plan(&gpus(3)).unwrap();
    assert_eq!(p.refusals.len(), 1, "{:?}", p.refusals);
    let r = &p.refusals[0];
    assert_eq!(r.reason, RefusalReason::FabricPartition);
    assert!(r.message.contains("of 3 GPUs"), "{}", r.message);
    assert!(r.message.contains("have 1, 2, 4, 8 GPUs"), "{}", r.message);
    let err = h
        .host()
        .attach(&AttachRequest {
            plan: gpus(3),
            owner: Owner::new("vm-3").unwrap(),
            initrd: None,
        })
        .unwrap_err();
    assert!(matches!(err, AttachError::Refused(_)), "{err:?}");
    assert!(h.active_partitions().is_empty());
    assert!(h.journal_clean());
}

#[test]
fn gpus_that_span_partitions_are_refused_and_nvswitches_never_move() {
    let h = sysfs::hgx_shared_nvswitch();
    let host = h.host();
    // GPU 0 (NUMA 0) and GPU 4 (NUMA 1): only the 8-GPU partition holds both.
    let p = host.plan(&req(&[HGX_GPUS[0], HGX_GPUS[4]])).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::FabricPartition)
        .expect("refused");
    assert!(
        r.message.contains("span fabric partitions"),
        "{}",
        r.message
    );
    assert!(
        r.message.contains("partitions holding them: 0 ("),
        "{}",
        r.message
    );
    // GPU 1 and GPU 2 are in no pair together (pairs are 0-1, 2-3): they span partitions.
    let p = host.plan(&req(&[HGX_GPUS[1], HGX_GPUS[2]])).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::FabricPartition)
        .expect("refused");
    assert_eq!(r.device, Some(a(HGX_GPUS[1])));
    assert!(
        r.message.contains(" 3 (") && r.message.contains(" 4 ("),
        "{}",
        r.message
    );
    // Exactly one partition's GPUs by address: that partition.
    let p = host.plan(&req(&[HGX_GPUS[3], HGX_GPUS[2]])).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    assert_eq!(p.partition.unwrap().id, 4);
    // An NVSwitch is refused, and so is the whole board's switch set.
    let p = host.plan(&req(&[HGX_NVSWITCHES[0]])).unwrap();
    let r = p
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::NvSwitch)
        .expect("refused");
    assert!(r.message.contains("shared-NVSwitch mode"), "{}", r.message);
    // The baseboard in this mode is its GPUs: the 8-GPU partition.
    let p = host
        .plan(&PlanRequest {
            fabric: FabricRequest {
                baseboard: Some(a(HGX_NVSWITCHES[2])),
                nvlink: true,
            },
            ..Default::default()
        })
        .unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    assert_eq!(p.partition.unwrap().id, 0);
    assert_eq!(p.devices.len(), 8);
}

#[test]
fn attach_activates_the_partition_first_and_detach_deactivates_it() {
    let h = sysfs::hgx_shared_nvswitch();
    let host = h.host();
    let owner = Owner::new("vm-four").unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: gpus(4),
            owner: owner.clone(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(spec.devices.len(), 4);
    assert_eq!(h.active_partitions(), [1]);
    // NVLink through the host's NVSwitches: left on.
    assert!(!spec.kernel_cmdline.iter().any(|w| w.contains("NvLink")));
    let j = h.journal().unwrap();
    let part = &j["attachments"][0]["fabric_partitions"][0];
    assert_eq!(part["id"], 1);
    assert_eq!(part["activated"], true);
    assert_eq!(part["gpus"].as_array().unwrap().len(), 4);
    for d in &HGX_GPUS[..4] {
        assert_eq!(h.driver(d).as_deref(), Some("vfio-pci"), "{d}");
    }
    for d in HGX_NVSWITCHES {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
    }
    // The same GPUs again: their partition is active, and they are attached.
    let again = host.plan(&req(&HGX_GPUS[..4])).unwrap();
    assert!(
        again
            .refusals
            .iter()
            .any(|r| r.reason == RefusalReason::FabricPartition && r.message.contains("active"))
    );

    let report = host.detach(&owner).unwrap();
    assert_eq!(report.deactivated_partitions, [1]);
    assert!(h.active_partitions().is_empty());
    for d in &HGX_GPUS[..4] {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
    }
    assert!(h.journal_clean());

    // A one-GPU partition's guest runs with NVLink off.
    let spec = host
        .attach(&AttachRequest {
            plan: gpus(1),
            owner: Owner::new("vm-one").unwrap(),
            initrd: None,
        })
        .unwrap();
    assert!(
        spec.kernel_cmdline
            .contains(&gpu_passthrough::vmm::NVLINK_DISABLE.to_owned())
    );
}

#[test]
fn a_failed_bind_rolls_back_and_deactivates_the_partition() {
    let h = sysfs::hgx_shared_nvswitch();
    h.inject("fail-once drivers_probe after 1");
    let err = h
        .host()
        .attach(&AttachRequest {
            plan: gpus(2),
            owner: Owner::new("vm-two").unwrap(),
            initrd: None,
        })
        .unwrap_err();
    assert!(!matches!(err, AttachError::Refused(_)), "{err:?}");
    assert!(h.active_partitions().is_empty());
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
    }
    assert!(h.journal_clean());
}

/// The simulated fabric manager, whose activation fails.
struct ActivationFails(gpu_passthrough::fabric::PartitionFile);

impl gpu_passthrough::fabric::FabricManager for ActivationFails {
    fn partitions(
        &self,
    ) -> Result<Vec<gpu_passthrough::fabric::Partition>, gpu_passthrough::fabric::FabricError> {
        self.0.partitions()
    }
    fn activate(&self, id: u32) -> Result<(), gpu_passthrough::fabric::FabricError> {
        Err(gpu_passthrough::fabric::FabricError::NoSuchPartition { id })
    }
    fn deactivate(&self, id: u32) -> Result<(), gpu_passthrough::fabric::FabricError> {
        self.0.deactivate(id)
    }
}

#[test]
fn a_partition_that_does_not_activate_moves_nothing() {
    let h = sysfs::hgx_shared_nvswitch();
    let file = gpu_passthrough::fabric::PartitionFile::new(
        h.sys
            .join(gpu_passthrough::simulation::SIM_FABRIC_PARTITIONS),
    );
    let host = h
        .host()
        .with_fabric_manager(Box::new(ActivationFails(file)));
    let err = host
        .attach(&AttachRequest {
            plan: gpus(2),
            owner: Owner::new("vm-two").unwrap(),
            initrd: None,
        })
        .unwrap_err();
    assert!(
        matches!(err, AttachError::Fabric { partition: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("rolled back"), "{err}");
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
        assert_eq!(h.driver_override(d), None, "{d}");
    }
    assert!(h.journal_clean());
    // Named GPUs and a count together are refused: a VM's GPUs are one partition.
    let both = PlanRequest {
        gpus: Some(2),
        ..req(&[HGX_GPUS[7]])
    };
    let p = h.host().plan(&both).unwrap();
    assert!(
        p.refusals
            .iter()
            .any(|r| r.reason == RefusalReason::FabricPartition
                && r.message.contains("or ask for a number")),
        "{:?}",
        p.refusals
    );
}

/// Child half of the crash test below: attach with the failpoint armed (the parent passes the
/// tree's paths); it aborts after the partition is activated, before any bind.
#[test]
#[ignore = "child process of the crash test"]
fn child_attach_until_the_failpoint() {
    let Some(sys) = std::env::var_os("HGX_SYS") else {
        return;
    };
    gpu_passthrough::failpoint::arm_from_env().expect("a known failpoint");
    let host = gpu_passthrough::attach::Host::new(
        sys,
        std::env::var_os("HGX_STATE").unwrap(),
        Box::new(gpu_passthrough::attach::PidLiveness::default()),
    )
    .with_dev_dir(std::env::var_os("HGX_DEV").unwrap());
    let _ = host.attach(&AttachRequest {
        plan: gpus(2),
        owner: Owner::new("vm-crash").unwrap(),
        initrd: None,
    });
}

#[test]
fn a_crash_between_activation_and_bind_is_repaired_by_reconcile() {
    use std::os::unix::process::ExitStatusExt;
    let h = sysfs::hgx_shared_nvswitch();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_attach_until_the_failpoint", "--ignored"])
        .env(
            gpu_passthrough::failpoint::FAILPOINT_ENV,
            "after-partition-activate",
        )
        .env("HGX_SYS", &h.sys)
        .env("HGX_STATE", h.dir.path().join("state"))
        .env("HGX_DEV", &h.dev)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(nix::libc::SIGABRT), "{status:?}");
    // Activated, journaled, nothing bound.
    assert_eq!(h.active_partitions(), [3]);
    let j = h.journal().unwrap();
    assert_eq!(j["transactions"][0]["fabric_partition"]["id"], 3);
    assert_eq!(j["transactions"][0]["fabric_partition"]["activated"], true);
    for d in HGX_GPUS {
        assert_eq!(h.driver(d).as_deref(), Some("nvidia"), "{d}");
    }
    let r = h.host().reconcile().unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.rolled_back.len(), 2);
    assert!(h.active_partitions().is_empty());
    assert!(h.journal_clean());
}

/// The placement of `addr` in a plan or boot spec's `placement`.
fn placed<'a>(
    placement: &'a [gpu_passthrough::vmm::Placement],
    addr: &str,
) -> &'a gpu_passthrough::vmm::Placement {
    placement
        .iter()
        .find(|p| p.host == Some(a(addr)))
        .unwrap_or_else(|| panic!("{addr} placed: {placement:?}"))
}

#[test]
fn eight_gpus_sit_behind_one_expander_per_numa_node() {
    let h = sysfs::hgx_8gpu(false);
    let host = h.host();
    let p = host.plan(&req(&HGX_GPUS)).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    for (i, g) in HGX_GPUS.iter().enumerate() {
        let pl = placed(&p.placement, g);
        let node = u32::from(i >= 4);
        assert_eq!(pl.numa_node, Some(node), "{g}");
        assert_eq!(pl.guest_numa_node, Some(node), "{g}");
        assert_eq!(
            pl.expander.as_deref(),
            Some(["pxb0", "pxb1"][node as usize])
        );
        assert_eq!(pl.switch, None, "no NIC handed over: no guest switch");
    }
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["placement"][4]["expander"], "pxb1");
    let owner = Owner::new("vm-8").unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: req(&HGX_GPUS),
            owner: owner.clone(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(
        spec.placement, p.placement,
        "the plan showed what the spec does"
    );
    let q = &spec.qemu.args;
    let pxbs: Vec<&String> = q.iter().filter(|a| a.starts_with("pxb-pcie,")).collect();
    assert_eq!(pxbs.len(), 2, "{q:?}");
    assert!(pxbs[0].contains("numa_node=0") && pxbs[1].contains("numa_node=1"));
    for g in HGX_GPUS {
        let pl = placed(&spec.placement, g);
        let dev = format!(
            "vfio-pci,host={g},bus={},addr=0x00",
            pl.port.as_deref().unwrap()
        );
        let i = q.iter().position(|x| *x == dev).expect(&dev);
        // The port it is plugged into was declared before it, on its expander.
        let port = q
            .iter()
            .position(|x| x.contains(&format!("id={},", pl.port.as_deref().unwrap())))
            .unwrap();
        assert!(port < i && q[port].contains(&format!("bus={}", pl.expander.as_deref().unwrap())));
        // The guest map the journal keeps names QEMU's address and Cloud Hypervisor's.
        let ga = spec
            .guest_addresses
            .iter()
            .find(|x| x.host == Some(a(g)))
            .unwrap();
        assert_eq!(ga.guest, pl.guest);
        assert_eq!(ga.cloud_hypervisor, pl.cloud_hypervisor);
    }
    let mut buses: Vec<u8> = spec.placement.iter().map(|p| p.guest.bus).collect();
    buses.dedup();
    assert_eq!(buses.len(), 8, "a bus of its own each: {buses:?}");
    assert!(
        spec.warnings.iter().any(|w| w.contains("-numa node")),
        "{:?}",
        spec.warnings
    );
    assert!(
        spec.cloud_hypervisor
            .warnings
            .iter()
            .any(|w| w.contains("flat")),
        "{:?}",
        spec.cloud_hypervisor.warnings
    );
    let history = &h.journal().unwrap()["history"];
    let text = history.to_string();
    let first = placed(&spec.placement, HGX_GPUS[0]).guest.to_string();
    assert!(text.contains(&first), "{first} in {text}");
    host.detach(&owner).unwrap();
}

#[test]
fn a_gpu_and_its_nic_sit_behind_one_guest_switch() {
    let h = sysfs::hgx_8gpu(false);
    let (gpu, nic) = (HGX_GPUS[0], "0000:18:00.0");
    let host = h.host();
    let p = host.plan(&req(&[gpu, nic])).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    let (g, n) = (placed(&p.placement, gpu), placed(&p.placement, nic));
    assert!(g.switch.is_some());
    assert_eq!(g.switch, n.switch, "one guest switch");
    assert_ne!(g.port, n.port, "each on a downstream port of its own");
    assert_eq!(
        g.guest_numa_node, None,
        "one NUMA node: no numa_node to declare"
    );
    let spec = host
        .attach(&AttachRequest {
            plan: req(&[gpu, nic]),
            owner: Owner::new("vm-pair").unwrap(),
            initrd: None,
        })
        .unwrap();
    let q = &spec.qemu.args;
    let sw = g.switch.as_deref().unwrap();
    assert!(
        q.iter()
            .any(|x| x.starts_with("x3130-upstream,") && x.contains(&format!("id={sw},"))),
        "{q:?}"
    );
    assert_eq!(
        q.iter()
            .filter(|x| x.starts_with("xio3130-downstream,") && x.contains(&format!("bus={sw},")))
            .count(),
        2
    );
    assert!(!q.iter().any(|x| x.contains("numa_node")), "{q:?}");
    assert!(spec.warnings.is_empty(), "{:?}", spec.warnings);
}

#[test]
fn a_single_gpu_keeps_the_flat_layout() {
    let h = sysfs::hgx_8gpu(false);
    let p = h.host().plan(&req(&[HGX_GPUS[5]])).unwrap();
    let pl = placed(&p.placement, HGX_GPUS[5]);
    assert_eq!(pl.guest.to_string(), "0000:00:10.0");
    assert_eq!(pl.expander, None);
    let spec = h
        .host()
        .attach(&AttachRequest {
            plan: req(&[HGX_GPUS[5]]),
            owner: Owner::new("vm-1").unwrap(),
            initrd: None,
        })
        .unwrap();
    let dev = format!("vfio-pci,host={},bus=pcie.0,addr=0x10", HGX_GPUS[5]);
    assert!(spec.qemu.args.contains(&dev), "{:?}", spec.qemu.args);
    assert!(!spec.qemu.args.iter().any(|x| x.contains("pxb")));
}

#[test]
fn a_fault_at_an_expander_address_is_charged_to_its_gpu() {
    let h = sysfs::hgx_8gpu(false);
    let host = h.host();
    let owner = Owner::new("vm-nccl").unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: req(&HGX_GPUS),
            owner: owner.clone(),
            initrd: None,
        })
        .unwrap();
    host.detach(&owner).unwrap();
    // One fault at QEMU's address of GPU 5 (behind pxb1), one at Cloud Hypervisor's of GPU 1.
    let qemu = placed(&spec.placement, HGX_GPUS[5]).guest;
    let ch = placed(&spec.placement, HGX_GPUS[1])
        .cloud_hypervisor
        .unwrap();
    let short = |g: PciAddress| format!("{:04x}:{:02x}:{:02x}", g.domain, g.bus, g.device);
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("vm-nccl.log");
    std::fs::write(
        &console,
        format!(
            "[  9.0] NVRM: Xid (PCI:{}): 79, pid=9, GPU has fallen off the bus.\n\
             [  9.5] NVRM: Xid (PCI:{}): 79, pid=9, GPU has fallen off the bus.\n",
            short(qemu),
            short(ch)
        ),
    )
    .unwrap();
    let report = gpu_passthrough::attach::ingest_console(&h.state, &owner, &console).unwrap();
    let mut charged: Vec<PciAddress> = report.recorded.iter().map(|e| e.device).collect();
    charged.sort();
    assert_eq!(charged, [a(HGX_GPUS[1]), a(HGX_GPUS[5])], "{report:?}");
    assert_eq!(report.unmapped, 0, "{report:?}");
}

/// The simulated fabric manager, counting how often its partitions are asked for.
struct CountingLists(
    gpu_passthrough::fabric::PartitionFile,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

impl gpu_passthrough::fabric::FabricManager for CountingLists {
    fn partitions(
        &self,
    ) -> Result<Vec<gpu_passthrough::fabric::Partition>, gpu_passthrough::fabric::FabricError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.partitions()
    }
    fn activate(&self, id: u32) -> Result<(), gpu_passthrough::fabric::FabricError> {
        self.0.activate(id)
    }
    fn deactivate(&self, id: u32) -> Result<(), gpu_passthrough::fabric::FabricError> {
        self.0.deactivate(id)
    }
}

#[test]
fn listing_the_devices_asks_the_fabric_manager_once_not_once_per_gpu() {
    let h = sysfs::hgx_shared_nvswitch();
    let file = gpu_passthrough::fabric::PartitionFile::new(
        h.sys
            .join(gpu_passthrough::simulation::SIM_FABRIC_PARTITIONS),
    );
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let host = h
        .host()
        .with_fabric_manager(Box::new(CountingLists(file, asked.clone())));
    let listed = host.devices(false, None).unwrap();
    let gpus = listed
        .iter()
        .filter(|d| d.device.kind == DeviceKind::Display)
        .count();
    assert_eq!(gpus, HGX_GPUS.len());
    assert!(listed.iter().any(|d| d.ready), "{listed:?}");
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one partition list for the whole listing"
    );
}
