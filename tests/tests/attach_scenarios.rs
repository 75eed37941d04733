//! `devices`, `plan` and attach/detach on the fake sysfs scenarios (library API).

use gpu_passthrough::attach::{
    AttachError, AttachRequest, Liveness, Owner, PlanRequest, PlanRole, RefusalReason,
};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough::registry::ModuleFlavor;
use gpu_passthrough_tests::fixtures;
use gpu_passthrough_tests::sysfs::{self, FixedLiveness};

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn req(devs: &[&str]) -> PlanRequest {
    PlanRequest {
        devices: devs.iter().map(|d| a(d)).collect(),
        ..Default::default()
    }
}

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

fn reasons(p: &gpu_passthrough::attach::Plan) -> Vec<RefusalReason> {
    p.refusals.iter().map(|r| r.reason).collect()
}

#[test]
fn workstation_devices_lists_gpus_with_verdicts() {
    let h = sysfs::workstation();
    let gpus = fixtures::path(fixtures::SUPPORTED_GPUS);
    let list = h.host().devices(false, Some(&gpus)).unwrap();
    let addrs: Vec<String> = list.iter().map(|d| d.device.address.to_string()).collect();
    assert_eq!(addrs, ["0000:00:02.0", "0000:01:00.0"]);
    let igpu = &list[0];
    assert!(igpu.device.boot_vga);
    assert!(!igpu.ready);
    assert!(igpu.not_ready_because[0].contains("boot display"));
    let gpu = &list[1];
    assert!(gpu.ready, "{:?}", gpu.not_ready_because);
    assert_eq!(
        gpu.device.device_name.as_deref(),
        Some("NVIDIA GeForce RTX 4090")
    );
    assert_eq!(gpu.open_modules_supported, Some(true));
    assert_eq!(gpu.companions, [a("0000:01:00.1")]);
    assert_eq!(gpu.iommu_group_members, [a("0000:01:00.1")]);
    assert_eq!(gpu.device.numa_node, Some(0));
    assert_eq!(gpu.device.bar64_bytes(), 32 << 30);
    let all = h.host().devices(true, None).unwrap();
    assert_eq!(all.len(), 7);
    let bridge = all
        .iter()
        .find(|d| d.device.address == a("0000:00:01.0"))
        .unwrap();
    assert!(!bridge.ready);
}

#[test]
fn workstation_plan_moves_gpu_with_its_audio_and_refuses_boot_vga() {
    let h = sysfs::workstation();
    let p = h.host().plan(&req(&["0000:01:00.0"])).unwrap();
    assert!(p.refusals.is_empty(), "{:?}", p.refusals);
    let moved: Vec<(String, PlanRole)> = p
        .devices
        .iter()
        .map(|d| (d.address.to_string(), d.role))
        .collect();
    assert_eq!(
        moved,
        [
            ("0000:01:00.0".to_owned(), PlanRole::Requested),
            ("0000:01:00.1".to_owned(), PlanRole::Companion)
        ]
    );
    assert_eq!(p.iommu_groups, [12]);
    let writes: Vec<String> = p
        .writes
        .iter()
        .map(|w| {
            format!(
                "{} {}",
                w.path.strip_prefix(&h.sys).unwrap().display(),
                w.value
            )
        })
        .collect();
    assert_eq!(
        writes,
        [
            "bus/pci/devices/0000:01:00.0/driver_override vfio-pci",
            "bus/pci/drivers/nvidia/unbind 0000:01:00.0",
            "bus/pci/drivers_probe 0000:01:00.0",
            "bus/pci/devices/0000:01:00.1/driver_override vfio-pci",
            "bus/pci/drivers/snd_hda_intel/unbind 0000:01:00.1",
            "bus/pci/drivers_probe 0000:01:00.1",
        ]
    );
    let vga = h.host().plan(&req(&["0000:00:02.0"])).unwrap();
    assert_eq!(reasons(&vga), [RefusalReason::BootVga]);
    let allowed = h
        .host()
        .plan(&PlanRequest {
            allow_boot_vga: true,
            ..req(&["0000:00:02.0"])
        })
        .unwrap();
    assert!(allowed.refusals.is_empty());
    let bridge = h.host().plan(&req(&["0000:00:01.0"])).unwrap();
    assert_eq!(reasons(&bridge), [RefusalReason::Bridge]);
    let missing = h.host().plan(&req(&["0000:09:00.0"])).unwrap();
    assert_eq!(reasons(&missing), [RefusalReason::NoSuchDevice]);
}

#[test]
fn workstation_attach_then_detach_restores_both_functions() {
    let h = sysfs::workstation();
    let host = h.host();
    let spec = host
        .attach(&AttachRequest {
            plan: req(&["0000:01:00.0"]),
            owner: owner("vm-1"),
            initrd: Some("/cache/combined.img".into()),
        })
        .unwrap();
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert!(h.dev.join("vfio/12").exists());
    assert_eq!(spec.kernel_cmdline, ["HAS_GPU=1"]);
    assert_eq!(spec.devices.len(), 2);
    assert!(spec.devices[0].gpu);
    assert_eq!(spec.devices[0].vfio_device, h.dev.join("vfio/12"));
    assert_eq!(
        spec.cloud_hypervisor.args[1],
        format!(
            "path={}/bus/pci/devices/0000:01:00.0/,id=gpt0,pci_segment=0,pci_device_id=16",
            h.sys.display()
        )
    );
    // The GPU first, on root-bus slot 0x10; its audio function next, on 0x11.
    assert_eq!(
        spec.qemu.args[1],
        "vfio-pci,host=0000:01:00.0,bus=pcie.0,addr=0x10"
    );
    assert!(
        spec.qemu.args[3].ends_with(",bus=pcie.0,addr=0x11"),
        "{:?}",
        spec.qemu.args
    );
    assert_eq!(
        spec.initrd.as_deref(),
        Some(std::path::Path::new("/cache/combined.img"))
    );
    // A second attach of the same device names the owner.
    let err = host
        .attach(&AttachRequest {
            plan: req(&["0000:01:00.0"]),
            owner: owner("vm-2"),
            initrd: None,
        })
        .unwrap_err();
    let AttachError::Refused(r) = &err else {
        panic!("{err}")
    };
    assert_eq!(r[0].reason, RefusalReason::AttachedToOwner);
    assert_eq!(r[0].owner.as_ref().map(Owner::as_str), Some("vm-1"));
    assert!(err.to_string().contains("vm-1"));
    let report = host.detach(&owner("vm-1")).unwrap();
    assert_eq!(report.restored.len(), 2);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(h.driver_override("0000:01:00.0"), None);
    assert!(!h.dev.join("vfio/12").exists());
    assert!(h.journal_clean());
    assert!(matches!(
        host.detach(&owner("vm-1")),
        Err(AttachError::NotAttached(_))
    ));
}

#[test]
fn server_plans_one_gpu_alone_and_picks_gpus_on_one_numa_node() {
    let h = sysfs::server_8gpu();
    let host = h.host();
    let list = host.devices(false, None).unwrap();
    // NVSwitches are listed as devices of their own (#25), never ready alone; NICs are not.
    assert_eq!(list.len(), 12, "8 GPUs and 4 NVSwitches, no NIC");
    let (switches, gpus): (Vec<_>, Vec<_>) = list
        .iter()
        .partition(|d| d.device.kind == gpu_passthrough::pci::DeviceKind::NvSwitch);
    assert_eq!(switches.len(), 4);
    assert!(switches.iter().all(|d| !d.ready));
    assert_eq!(gpus.len(), 8);
    assert!(gpus.iter().all(|d| d.ready && d.companions.is_empty()));
    let p = host.plan(&req(&["0000:18:00.0"])).unwrap();
    assert_eq!(p.devices.len(), 1);
    assert!(p.refusals.is_empty());
    let four = host
        .plan(&PlanRequest {
            gpus: Some(4),
            ..Default::default()
        })
        .unwrap();
    let numa0: Vec<PciAddress> = [
        "0000:18:00.0",
        "0000:2a:00.0",
        "0000:3a:00.0",
        "0000:5d:00.0",
    ]
    .map(a)
    .to_vec();
    assert_eq!(four.requested, numa0);
    // Take two from node 0: a request for 4 must come from node 1.
    host.attach(&AttachRequest {
        plan: req(&["0000:18:00.0", "0000:2a:00.0"]),
        owner: owner("vm-a"),
        initrd: None,
    })
    .unwrap();
    let spec = host
        .attach(&AttachRequest {
            plan: PlanRequest {
                gpus: Some(4),
                p2p_clique: true,
                ..Default::default()
            },
            owner: owner("vm-b"),
            initrd: None,
        })
        .unwrap();
    let got: Vec<String> = spec
        .devices
        .iter()
        .map(|d| d.address.unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        [
            "0000:9a:00.0",
            "0000:ab:00.0",
            "0000:ba:00.0",
            "0000:db:00.0"
        ]
    );
    assert!(spec.cloud_hypervisor.args[1].ends_with("x_nv_gpudirect_clique=0"));
    assert!(
        spec.mmio.hint.is_some(),
        "4 × 128 GiB BARs need a bigger window"
    );
    let err = host
        .attach(&AttachRequest {
            plan: PlanRequest {
                gpus: Some(3),
                ..Default::default()
            },
            owner: owner("vm-c"),
            initrd: None,
        })
        .unwrap_err();
    assert!(
        matches!(err, AttachError::NotEnoughGpus { wanted: 3, free: 2 }),
        "{err}"
    );
    host.detach(&owner("vm-a")).unwrap();
    host.detach(&owner("vm-b")).unwrap();
    assert!(h.journal_clean());
    assert_eq!(h.driver("0000:db:00.0").as_deref(), Some("nvidia"));
}

#[test]
fn iommu_off_refuses_everything() {
    let h = sysfs::iommu_off();
    let list = h.host().devices(false, None).unwrap();
    assert_eq!(list.len(), 1);
    assert!(!list[0].ready);
    assert!(list[0].not_ready_because[0].contains("intel_iommu=on"));
    assert_eq!(list[0].device.iommu_group, None);
    let p = h.host().plan(&req(&["0000:01:00.0"])).unwrap();
    assert_eq!(reasons(&p)[0], RefusalReason::IommuOff);
    let err = h
        .host()
        .attach(&AttachRequest {
            plan: req(&["0000:01:00.0"]),
            owner: owner("vm"),
            initrd: None,
        })
        .unwrap_err();
    assert!(matches!(err, AttachError::Refused(_)));
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    let doctor = h.host().doctor(None).unwrap();
    let iommu = doctor.checks.iter().find(|c| c.name == "iommu").unwrap();
    assert_eq!(iommu.status, gpu_passthrough::attach::CheckStatus::Fail);
    assert_eq!(doctor.verdict, gpu_passthrough::attach::CheckStatus::Fail);
}

#[test]
fn shared_group_refuses_the_in_use_nic_unless_named() {
    let h = sysfs::shared_group();
    let p = h.host().plan(&req(&["0000:02:00.0"])).unwrap();
    let moved: Vec<String> = p.devices.iter().map(|d| d.address.to_string()).collect();
    // The bridge stays; audio is a companion; the NIC must move and is refused.
    assert_eq!(moved, ["0000:02:00.0", "0000:02:00.1", "0000:03:00.0"]);
    assert_eq!(p.devices[2].role, PlanRole::GroupMember);
    assert!(!p.devices[2].passed);
    assert_eq!(reasons(&p), [RefusalReason::HostDeviceInUse]);
    assert_eq!(p.refusals[0].device, Some(a("0000:03:00.0")));
    assert!(p.refusals[0].message.contains("igb"));
    let named = h
        .host()
        .plan(&req(&["0000:02:00.0", "0000:03:00.0"]))
        .unwrap();
    assert!(named.refusals.is_empty(), "{:?}", named.refusals);
    let list = h.host().devices(false, None).unwrap();
    let gpu = list
        .iter()
        .find(|d| d.device.address == a("0000:02:00.0"))
        .unwrap();
    assert!(!gpu.ready);
    assert_eq!(
        gpu.iommu_group_members,
        ["0000:00:1c.0", "0000:02:00.1", "0000:03:00.0"].map(a)
    );
}

#[test]
fn open_flavor_refuses_a_gpu_without_kernelopen() {
    let h = sysfs::shared_group();
    let gpus = fixtures::path(fixtures::SUPPORTED_GPUS);
    let open = |dev: &str| PlanRequest {
        flavor: Some(ModuleFlavor::Open),
        supported_gpus: Some(gpus.clone()),
        ..req(&[dev])
    };
    let v100 = h.host().plan(&open("0000:04:00.0")).unwrap();
    assert_eq!(reasons(&v100), [RefusalReason::NeedsProprietaryModules]);
    assert!(
        v100.refusals[0]
            .message
            .contains("needs the proprietary modules")
    );
    assert!(v100.refusals[0].message.contains("Tesla V100-PCIE-16GB"));
    let prop = h
        .host()
        .plan(&PlanRequest {
            flavor: Some(ModuleFlavor::Proprietary),
            ..open("0000:04:00.0")
        })
        .unwrap();
    assert!(prop.refusals.is_empty());
    let unknown = h
        .host()
        .plan(&PlanRequest {
            supported_gpus: None,
            ..open("0000:04:00.0")
        })
        .unwrap();
    assert_eq!(reasons(&unknown), [RefusalReason::OpenSupportUnknown]);
    // The RTX 2080 Ti has kernelopen: only the NIC refusal remains.
    let turing = h.host().plan(&open("0000:02:00.0")).unwrap();
    assert_eq!(reasons(&turing), [RefusalReason::HostDeviceInUse]);
}

#[test]
fn vgpu_host_creates_and_removes_only_its_mdev() {
    let h = sysfs::vgpu_host();
    let list = h.host().devices(false, None).unwrap();
    assert_eq!(list[0].device.mdev_types.len(), 2);
    assert_eq!(list[0].device.mdev_types[0].available_instances, 4);
    let mreq = |t: &str| PlanRequest {
        mdev_type: Some(t.into()),
        ..req(&["0000:3d:00.0"])
    };
    let p = h.host().plan(&mreq("nvidia-735")).unwrap();
    assert!(p.refusals.is_empty());
    assert!(p.devices.is_empty(), "the parent GPU stays on its driver");
    assert_eq!(p.mdevs, [(a("0000:3d:00.0"), "nvidia-735".to_owned())]);
    assert_eq!(
        reasons(&h.host().plan(&mreq("nvidia-736")).unwrap()),
        [RefusalReason::MdevUnavailable]
    );
    assert_eq!(
        reasons(&h.host().plan(&mreq("../x")).unwrap()),
        [RefusalReason::MdevUnavailable]
    );
    // An mdev someone else created is never touched.
    let foreign = h
        .sys
        .join("bus/mdev/devices/11111111-1111-1111-1111-111111111111");
    std::fs::create_dir_all(&foreign).unwrap();
    let host = h.host();
    let spec = host
        .attach(&AttachRequest {
            plan: mreq("nvidia-735"),
            owner: owner("vm-v"),
            initrd: None,
        })
        .unwrap();
    let uuid = spec.devices[0].mdev_uuid.clone().unwrap();
    assert_eq!(h.driver("0000:3d:00.0").as_deref(), Some("nvidia"));
    assert!(spec.qemu.args[1].starts_with("vfio-pci,sysfsdev="));
    assert!(spec.cloud_hypervisor.args[1].contains(&format!("bus/mdev/devices/{uuid}/")));
    let avail = h
        .sys
        .join("bus/pci/devices/0000:3d:00.0/mdev_supported_types/nvidia-735/available_instances");
    assert_eq!(std::fs::read_to_string(&avail).unwrap().trim(), "3");
    let r = host.detach(&owner("vm-v")).unwrap();
    // One record type for every mdev: `--mdev-type` is released like `--vgpu`.
    assert_eq!(r.released_vgpus.len(), 1);
    assert!(r.released_vgpus[0].contains(&uuid), "{r:?}");
    assert!(!h.sys.join("bus/mdev/devices").join(&uuid).exists());
    assert!(foreign.exists());
    assert_eq!(std::fs::read_to_string(&avail).unwrap().trim(), "4");
    assert!(h.journal_clean());
}

#[test]
fn adopting_a_device_already_on_vfio_records_no_other_driver() {
    let h = sysfs::FakeHost::new(true);
    h.add(
        sysfs::FakeDevice::new("0000:05:00.0", 0x1234, 0x1111, 0x030000)
            .driver("vfio-pci")
            .group(3),
    );
    std::fs::write(h.dev.join("vfio/3"), "").unwrap();
    let p = h.host().plan(&req(&["0000:05:00.0"])).unwrap();
    assert!(p.devices[0].adopt);
    assert!(p.writes.is_empty());
    h.host()
        .attach(&AttachRequest {
            plan: req(&["0000:05:00.0"]),
            owner: owner("vm"),
            initrd: None,
        })
        .unwrap();
    let j = h.journal().unwrap();
    assert_eq!(j["attachments"][0]["devices"][0]["adopted"], true);
    assert!(j["attachments"][0]["devices"][0]["original_driver"].is_null());
    h.host().detach(&owner("vm")).unwrap();
    // Adopted: it may belong to a VM this tool does not know, so it stays where it was found.
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn reconcile_releases_only_gone_owners() {
    let h = sysfs::server_8gpu();
    for (o, d) in [
        ("gone-vm", "0000:18:00.0"),
        ("live-vm", "0000:2a:00.0"),
        ("who-knows", "0000:3a:00.0"),
    ] {
        h.host()
            .attach(&AttachRequest {
                plan: req(&[d]),
                owner: owner(o),
                initrd: None,
            })
            .unwrap();
    }
    let host = h.host_with(Box::new(FixedLiveness(vec![
        ("gone-vm".into(), Liveness::Gone),
        ("live-vm".into(), Liveness::Alive),
    ])));
    let r = host.reconcile().unwrap();
    assert_eq!(r.released.len(), 1);
    assert_eq!(r.released[0].owner.as_str(), "gone-vm");
    assert_eq!(r.kept_alive, [owner("live-vm")]);
    assert_eq!(r.kept_unknown, [owner("who-knows")]);
    assert_eq!(h.driver("0000:18:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver("0000:2a:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:3a:00.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn owners_are_validated() {
    for bad in ["", "../etc", "a/b", "x".repeat(129).as_str(), "vm 1", ".."] {
        assert!(Owner::new(bad).is_err(), "{bad:?}");
    }
    assert_eq!(owner("pid:42").pid(), Some(42));
    assert_eq!(owner("vm-1@host").pid(), None);
}

#[test]
fn a_named_group_member_moves_and_other_members_are_held_not_passed() {
    let h = sysfs::shared_group();
    // An unused USB controller in the GPU's group: moved for viability, not given to the VM.
    h.add(sysfs::FakeDevice::new("0000:05:00.0", 0x1b21, 0x2142, 0x0c0330).group(7));
    let spec = h
        .host()
        .attach(&AttachRequest {
            plan: req(&["0000:02:00.0", "0000:03:00.0"]),
            owner: owner("vm-g"),
            initrd: None,
        })
        .unwrap();
    let passed: Vec<String> = spec
        .devices
        .iter()
        .map(|d| d.address.unwrap().to_string())
        .collect();
    // GPUs first, then the other requested devices, then companions.
    assert_eq!(passed, ["0000:02:00.0", "0000:03:00.0", "0000:02:00.1"]);
    assert_eq!(spec.held_devices, [a("0000:05:00.0")]);
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(
        h.driver("0000:00:1c.0").as_deref(),
        Some("pcieport"),
        "bridges stay"
    );
    h.host().detach(&owner("vm-g")).unwrap();
    assert_eq!(h.driver("0000:05:00.0"), None, "it had no driver");
    assert_eq!(h.driver("0000:03:00.0").as_deref(), Some("igb"));
    assert!(h.journal_clean());
}

/// A journal written by a release that kept `attach --mdev-type` mdevs in their own `mdevs`
/// lists still releases them: detach removes the committed one, reconcile the one an abandoned
/// transaction created.
#[test]
fn a_journal_with_mdev_records_of_an_earlier_release_is_released() {
    let h = sysfs::vgpu_host();
    let host = h.host();
    let mreq = PlanRequest {
        mdev_type: Some("nvidia-735".into()),
        ..req(&["0000:3d:00.0"])
    };
    let mut uuids = Vec::new();
    for who in ["vm-old", "vm-crashed"] {
        let spec = host
            .attach(&AttachRequest {
                plan: mreq.clone(),
                owner: owner(who),
                initrd: None,
            })
            .unwrap();
        uuids.push(spec.devices[0].mdev_uuid.clone().unwrap());
    }
    let group = |u: &str| {
        std::fs::read_link(h.sys.join("bus/mdev/devices").join(u).join("iommu_group"))
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    // The shape that release wrote: no `vgpus`, the mdev in `mdevs`.
    let mdev = |u: &str, verified: bool| {
        serde_json::json!({
            "parent": "0000:3d:00.0", "mdev_type": "nvidia-735", "uuid": u,
            "iommu_group": group(u), "verified": verified,
        })
    };
    let old = serde_json::json!({
        "version": 1,
        "transactions": [{
            "owner": "vm-crashed", "pid": 1, "devices": [], "mdevs": [mdev(&uuids[1], false)],
        }],
        "attachments": [{
            "owner": "vm-old", "devices": [], "mdevs": [mdev(&uuids[0], true)],
        }],
    });
    std::fs::write(
        h.state.join("journal.json"),
        serde_json::to_vec_pretty(&old).unwrap(),
    )
    .unwrap();
    let r = host.detach(&owner("vm-old")).unwrap();
    assert_eq!(r.released_vgpus.len(), 1, "{r:?}");
    assert!(!h.sys.join("bus/mdev/devices").join(&uuids[0]).exists());
    let r = host.reconcile().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(!h.sys.join("bus/mdev/devices").join(&uuids[1]).exists());
    assert!(h.journal_clean());
    assert_eq!(h.mdevs().len(), 0);
}

/// `attach --mdev-type T A B A` asks for one mdev on A, not two: duplicates are dropped
/// wherever they stand, not only when adjacent.
#[test]
fn a_device_named_twice_apart_is_taken_once() {
    let h = sysfs::vgpu_host();
    h.add(
        sysfs::FakeDevice::new("0000:3e:00.0", 0x10de, 0x25b6, 0x030200)
            .driver("nvidia")
            .group(31)
            .mdev("nvidia-735", "NVIDIA A16-4Q", 4),
    );
    let mreq = PlanRequest {
        mdev_type: Some("nvidia-735".into()),
        ..req(&["0000:3d:00.0", "0000:3e:00.0", "0000:3d:00.0"])
    };
    let p = h.host().plan(&mreq).unwrap();
    assert_eq!(p.requested, [a("0000:3d:00.0"), a("0000:3e:00.0")]);
    assert_eq!(p.mdevs.len(), 2, "{:?}", p.mdevs);
    let spec = h
        .host()
        .attach(&AttachRequest {
            plan: mreq,
            owner: owner("vm-v"),
            initrd: None,
        })
        .unwrap();
    assert_eq!(spec.devices.len(), 2);
    let avail = |d: &str| {
        std::fs::read_to_string(h.sys.join(format!(
            "bus/pci/devices/{d}/mdev_supported_types/nvidia-735/available_instances"
        )))
        .unwrap()
        .trim()
        .to_owned()
    };
    assert_eq!(avail("0000:3d:00.0"), "3", "one mdev on A, not two");
    assert_eq!(avail("0000:3e:00.0"), "3");
    // Bound devices too: the same address twice, apart, is one device.
    let w = sysfs::workstation();
    let p = w
        .host()
        .plan(&req(&["0000:01:00.0", "0000:03:00.0", "0000:01:00.0"]))
        .unwrap();
    assert_eq!(p.requested, [a("0000:01:00.0"), a("0000:03:00.0")]);
}
