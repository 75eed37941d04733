//! vGPU create and release through the library on fake trees whose simulated vGPU manager
//! reacts: tables that change with each type written, mdev instances that come and go, a read-back
//! that does not match, a VMM holding a VF at detach, quarantine, and the release's guest driver
//! against the host's vGPU manager.

use gpu_passthrough::outcome::{Classify, Outcome};
use std::fs;
use std::path::PathBuf;

use gpu_passthrough::attach::{AttachError, Liveness, Owner, OwnerLiveness, VgpuAttachRequest};
use gpu_passthrough::health::{Action, EventSource, Fault, FaultKind, HealthEvent, HealthStore};
use gpu_passthrough::provision::{ProvisionError, Provisioner, VgpuVmRequest};
use gpu_passthrough::registry::Registry;
use gpu_passthrough::vgpu::{PlaceRequest, VgpuError};
use gpu_passthrough::vmm::BootSpec;
use gpu_passthrough_tests::sysfs::{self, FakeHost};

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

fn req(profile: &str, count: u32, who: &str) -> VgpuAttachRequest {
    VgpuAttachRequest {
        place: PlaceRequest {
            profile: profile.into(),
            count,
            numa: None,
            pack: false,
        },
        owner: owner(who),
        initrd: None,
    }
}

fn attach(h: &FakeHost, profile: &str, count: u32, who: &str) -> BootSpec {
    h.host()
        .attach_vgpu(&req(profile, count, who))
        .unwrap_or_else(|e| panic!("attach {profile}: {e}"))
}

const ALL: [&str; 4] = ["1147", "1150", "1155", "1156"];

#[test]
fn a_type_written_to_a_vf_changes_what_it_and_its_siblings_offer() {
    let h = sysfs::l40s_host();
    let spec = attach(&h, "L40S-24Q", 1, "vm-1");
    // Least used: 61:00.0 (empty), its first VF.
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1155");
    assert!(
        h.creatable("0000:61:00.4").is_empty(),
        "a VF with a type lists nothing"
    );
    // 24 GiB left, homogeneous: only 24Q on the siblings.
    for vf in ["0000:61:00.5", "0000:61:00.6", "0000:61:00.7"] {
        assert_eq!(h.creatable(vf), ["1155"], "{vf}");
    }
    assert_eq!(
        spec.devices[0].address.map(|a| a.to_string()).as_deref(),
        Some("0000:61:00.4")
    );
    assert_eq!(
        spec.qemu.args,
        ["-device", "vfio-pci,host=0000:61:00.4,bus=pcie.0,addr=0x10"]
    );
    assert_eq!(
        spec.cloud_hypervisor.args[1],
        format!(
            "path={}/,id=gpt0,pci_segment=0,pci_device_id=16",
            h.sys.join("bus/pci/devices/0000:61:00.4").display()
        )
    );
    assert_eq!(spec.kernel_cmdline, ["HAS_GPU=1"]);
    // The second 24Q fills the GPU: header-only tables, and 24Q is gone from the catalogue.
    attach(&h, "L40S-24Q", 1, "vm-2");
    assert_eq!(h.vgpu_type("0000:61:00.5"), "1155");
    for vf in ["0000:61:00.6", "0000:61:00.7"] {
        assert!(h.creatable(vf).is_empty(), "{vf}");
    }
    let e = h
        .host()
        .plan_vgpu(&req("L40S-24Q", 1, "x").place)
        .unwrap_err();
    assert!(
        matches!(e, AttachError::Vgpu(VgpuError::NoSuchProfile { .. })),
        "{e}"
    );
    // Release: the VF goes back to 0 and every free VF offers what fits again.
    let r = h.host().detach(&owner("vm-2")).unwrap();
    assert_eq!(r.released_vgpus, ["NVIDIA L40S-24Q on 0000:61:00.5"]);
    assert!(r.restored.is_empty(), "a VF is never unbound or rebound");
    h.host().detach(&owner("vm-1")).unwrap();
    for vf in [
        "0000:61:00.4",
        "0000:61:00.5",
        "0000:61:00.6",
        "0000:61:00.7",
    ] {
        assert_eq!(h.vgpu_type(vf), "0");
        assert_eq!(h.creatable(vf), ALL, "{vf}");
        assert_eq!(h.driver(vf).as_deref(), Some("nvidia"), "{vf}");
    }
    assert!(h.journal_clean());
}

#[test]
fn mdev_instances_decrement_and_come_back_and_the_directory_comes_and_goes() {
    let h = sysfs::mixed_vgpu_host();
    let t4 = "0000:3b:00.0";
    let spec = attach(&h, "GRID T4-2Q", 1, "vm-1");
    assert_eq!(h.available_instances(t4, "nvidia-223"), 7);
    assert_eq!(
        h.available_instances(t4, "nvidia-222"),
        0,
        "homogeneous once in use"
    );
    let uuid = spec.devices[0].mdev_uuid.clone().expect("an mdev");
    assert_eq!(h.mdevs(), std::slice::from_ref(&uuid));
    let dir = h.sys.join("bus/mdev/devices").join(&uuid);
    assert_eq!(
        spec.qemu.args,
        [
            "-device".to_owned(),
            format!("vfio-pci,sysfsdev={},bus=pcie.0,addr=0x10", dir.display()),
            "-uuid".to_owned(),
            uuid.clone()
        ]
    );
    assert!(
        spec.cloud_hypervisor.warnings[0].contains("no -uuid"),
        "{:?}",
        spec.cloud_hypervisor.warnings
    );
    let r = h.host().detach(&owner("vm-1")).unwrap();
    assert_eq!(r.released_vgpus.len(), 1);
    assert!(h.mdevs().is_empty());
    assert_eq!(h.available_instances(t4, "nvidia-223"), 8);
    assert_eq!(h.available_instances(t4, "nvidia-222"), 16);
    assert!(h.journal_clean());
}

#[test]
fn a_t4_with_one_instance_used_offers_the_rest_and_gives_one_more() {
    let h = sysfs::t4_mdev_host();
    attach(&h, "T4-1B", 1, "vm-1");
    assert_eq!(h.available_instances("0000:3b:00.0", "nvidia-222"), 14);
    assert_eq!(h.mdevs().len(), 2);
    h.host().detach(&owner("vm-1")).unwrap();
    // Only ours is removed: the one someone else made stays.
    assert_eq!(h.mdevs(), ["aaaaaaaa-0000-0000-0000-000000000000"]);
    assert_eq!(h.available_instances("0000:3b:00.0", "nvidia-222"), 15);
}

#[test]
fn a_read_back_that_differs_rolls_back_and_leaves_nothing() {
    let h = sysfs::l40s_host();
    h.inject("vgpu-write-ignored");
    let e = h
        .host()
        .attach_vgpu(&req("L40S-4Q", 1, "vm-1"))
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AttachError::VgpuMismatch { .. }), "{msg}");
    assert!(
        msg.contains("current_vgpu_type") && msg.contains("1150"),
        "{msg}"
    );
    assert!(e.outcome() != Outcome::Refused);
    assert!(h.journal_clean());
    assert_eq!(h.vgpu_type("0000:61:00.4"), "0");
}

#[test]
fn a_failed_second_create_releases_the_first() {
    let h = sysfs::l40s_host();
    h.inject("fail-once current_vgpu_type after 1");
    let e = h
        .host()
        .attach_vgpu(&req("L40S-4Q", 2, "vm-1"))
        .unwrap_err();
    assert!(matches!(e, AttachError::Write { .. }), "{e}");
    for vf in ["0000:61:00.4", "0000:61:00.5"] {
        assert_eq!(h.vgpu_type(vf), "0", "{vf}");
        assert_eq!(h.creatable(vf), ALL, "{vf}");
    }
    assert!(h.journal_clean());
}

struct Gone(Vec<Owner>);
impl OwnerLiveness for Gone {
    fn is_alive(&self, o: &Owner) -> Liveness {
        if self.0.contains(o) {
            Liveness::Gone
        } else {
            Liveness::Unknown
        }
    }
}

#[test]
fn a_vf_held_open_by_a_vmm_is_not_released_until_the_vmm_is_gone() {
    let h = sysfs::l40s_host();
    let spec = attach(&h, "L40S-4Q", 1, "vm-1");
    let node = spec.devices[0].vfio_device.clone();
    assert!(node.exists(), "{}", node.display());
    let mut vmm = sysfs::fake_vmm(&node);
    let e = h.host().detach(&owner("vm-1")).unwrap_err();
    let msg = e.to_string();
    assert!(e.outcome() == Outcome::Refused, "{msg}");
    assert!(
        msg.contains(&format!("pid {}", vmm.id())) && msg.contains("SIGTERM"),
        "{msg}"
    );
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1150", "nothing released");
    assert!(!h.journal_clean());
    // reconcile of a gone owner: refused the same way, kept in the journal for the next run.
    let gone = h.host_with(Box::new(Gone(vec![owner("vm-1")])));
    let r = gone.reconcile().unwrap();
    assert!(r.released.is_empty());
    assert!(
        r.errors[0].contains(&vmm.id().to_string()),
        "{:?}",
        r.errors
    );
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1150");
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    let r = gone.reconcile().unwrap();
    assert_eq!(r.released[0].released_vgpus.len(), 1, "{r:?}");
    assert_eq!(h.vgpu_type("0000:61:00.4"), "0");
    assert!(h.journal_clean());
}

#[test]
fn a_failed_release_stays_in_the_journal_and_reconcile_retries_it() {
    let h = sysfs::t4_mdev_host();
    attach(&h, "T4-1B", 1, "vm-1");
    h.inject("fail-once remove");
    let e = h.host().detach(&owner("vm-1")).unwrap_err();
    // Nothing was rolled back: the message says what is left and what to do.
    let msg = e.to_string();
    assert!(
        !msg.contains("rolled back") && msg.contains("the journal keeps it"),
        "{msg}"
    );
    assert!(!h.journal_clean(), "the failed release is kept");
    let r = h
        .host_with(Box::new(Gone(vec![owner("vm-1")])))
        .reconcile()
        .unwrap();
    assert_eq!(r.released.len(), 1, "{r:?}");
    assert_eq!(h.mdevs().len(), 1, "only the other tool's mdev is left");
    assert!(h.journal_clean());
}

#[test]
fn quarantined_parents_are_skipped() {
    let h = sysfs::l40s_host();
    let parent = "0000:61:00.0".parse().unwrap();
    let fault = Fault {
        address: Some("0000:61:00.0".into()),
        kind: FaultKind::Xid,
        xid: Some(48),
        message: "DBE (double bit error)".into(),
        action: Action::ResetGpu,
    };
    let events: Vec<HealthEvent> = ["vm-a", "vm-b"]
        .iter()
        .map(|o| HealthEvent::now(parent, Some(owner(o)), EventSource::Console, fault.clone()))
        .collect();
    HealthStore::new(&h.state).record(&events).unwrap();
    let cat = h.host().vgpu_catalogue();
    assert!(
        cat.profiles
            .iter()
            .all(|p| p.parents.iter().all(|x| x.address != parent)),
        "{cat:?}"
    );
    let p = h.host().plan_vgpu(&req("L40S-4Q", 1, "x").place).unwrap();
    assert_eq!(p.parents[0].to_string(), "0000:41:00.0");
    // The 48Q only fitted on the quarantined GPU.
    assert!(h.host().plan_vgpu(&req("L40S-48Q", 1, "x").place).is_err());
}

fn registry(h: &FakeHost, body: &str) -> Registry {
    let path: PathBuf = h.dir.path().join("registry.toml");
    fs::write(&path, body).unwrap();
    Registry::load(&[path]).unwrap()
}

const VGPU_RELEASE: &str = r#"
[releases."grid-550"]
kernel_version = "6.12.8"
driver_version = "550.90.07"
vgpu_guest = true
vgpu_manager_branches = ["550"]

[releases."plain"]
kernel_version = "6.12.8"
"#;

fn vm(release: &str) -> VgpuVmRequest {
    VgpuVmRequest {
        place: req("L40S-4Q", 1, "vm-1").place,
        owner: owner("vm-1"),
        release: Some(release.into()),
        initrd: Some(PathBuf::from("/var/lib/vm-1/initrd")),
        disk: Default::default(),
    }
}

#[test]
fn the_release_guest_driver_must_match_the_host_vgpu_manager() {
    let h = sysfs::l40s_host();
    let reg = registry(&h, VGPU_RELEASE);
    let host = h.host();
    let p = Provisioner::new(&host, &reg, h.dir.path().join("cache"));
    let progress = gpu_passthrough::fetch::NoProgress;
    // No manager loaded, then the wrong branch: refused naming both, nothing created.
    for version in [None, Some("535.183.04")] {
        if let Some(v) = version {
            h.set_manager_version(v);
        }
        let e = p.attach_vgpu(&vm("grid-550"), &progress).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ProvisionError::VgpuManagerMismatch { .. }),
            "{msg}"
        );
        assert!(e.outcome() == Outcome::Refused);
        assert!(msg.contains("grid-550") && msg.contains("550"), "{msg}");
        if let Some(v) = version {
            assert!(msg.contains(v), "{msg}");
        }
        assert_eq!(h.vgpu_type("0000:61:00.4"), "0");
    }
    let e = p.attach_vgpu(&vm("plain"), &progress).unwrap_err();
    assert!(matches!(e, ProvisionError::NotVgpuGuest { .. }), "{e}");
    assert!(h.journal_clean());
    h.set_manager_version("550.90.05");
    let spec = p.attach_vgpu(&vm("grid-550"), &progress).unwrap();
    assert_eq!(spec.initrd, Some(PathBuf::from("/var/lib/vm-1/initrd")));
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1150");
}

#[test]
fn vgpu_registry_fields_are_validated_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    for (body, field) in [
        ("vgpu_guest = true\n", "vgpu_manager_branches"),
        ("vgpu_manager_branches = [\"550\"]\n", "vgpu_guest"),
        (
            "vgpu_guest = true\nvgpu_manager_branches = [\"r550\"]\n",
            "r550",
        ),
    ] {
        fs::write(
            &path,
            format!("[releases.\"v\"]\nkernel_version = \"6.12.8\"\n{body}"),
        )
        .unwrap();
        let e = Registry::load(std::slice::from_ref(&path))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{body}: {e}");
    }
    fs::write(
        &path,
        "[releases.\"v\"]\nkernel_version = \"6.12.8\"\nvgpu_guest = true\nvgpu_manager_branches = [\"550\", \"570\"]\n",
    )
    .unwrap();
    let reg = Registry::load(std::slice::from_ref(&path)).unwrap();
    let v = reg.release("v").unwrap().clone();
    let guest = v.vgpu.clone().expect("vgpu guest");
    assert!(guest.supports("570.124.03") && !guest.supports("535.1"));
    let out = dir.path().join("out.toml");
    gpu_passthrough::registry::write_release(&out, &v, false).unwrap();
    let again = Registry::load(&[out]).unwrap();
    assert_eq!(again.release("v").unwrap().vgpu, v.vgpu);
}

#[test]
fn a_vendor_vfio_vf_or_its_pf_is_never_moved_to_vfio_pci() {
    use gpu_passthrough::attach::{PlanRequest, RefusalReason};
    let h = sysfs::l40s_host();
    for addr in ["0000:61:00.4", "0000:61:00.0"] {
        let plan = h
            .host()
            .plan(&PlanRequest {
                devices: vec![addr.parse().unwrap()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(plan.refusals.len(), 1, "{addr}: {:?}", plan.refusals);
        assert_eq!(plan.refusals[0].reason, RefusalReason::VgpuFunction);
        assert!(plan.refusals[0].message.contains("vGPU profile"), "{addr}");
    }
    // Nor reset on demand (the vGPU manager owns it).
    for addr in ["0000:61:00.4", "0000:61:00.0"] {
        let e = h.host().reset(addr.parse().unwrap()).unwrap_err();
        assert!(matches!(e, AttachError::ResetRefused { .. }), "{addr}: {e}");
        assert!(e.to_string().contains("vGPU"), "{e}");
    }
    // Nor picked as a free GPU.
    let e = h
        .host()
        .plan(&PlanRequest {
            gpus: Some(1),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(e, AttachError::NotEnoughGpus { free: 0, .. }),
        "{e}"
    );
}

#[test]
fn a_vgpu_owner_is_remembered_with_its_vgpu_not_the_physical_gpu() {
    let h = sysfs::l40s_host();
    attach(&h, "L40S-4Q", 1, "vm-1");
    let j = h.journal().unwrap();
    let last = j["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["owner"], "vm-1");
    assert_eq!(last["gpus"], serde_json::json!([]), "{last}");
    assert_eq!(
        last["vgpus"],
        serde_json::json!([{"parent": "0000:61:00.0", "vf": "0000:61:00.4"}]),
        "{last}"
    );
    assert_eq!(j["attachments"][0]["vgpus"][0]["vf"], "0000:61:00.4");
    assert_eq!(j["attachments"][0]["vgpus"][0]["step"], "verified");
}

/// A console reporting the GPU fallen off the bus (a failure: it needs the host to act).
fn hostile_console(dir: &std::path::Path, who: &str) -> PathBuf {
    let console = dir.join(format!("{who}.log"));
    fs::write(
        &console,
        "[  9.0] NVRM: Xid (PCI:0000:00:10): 79, pid=9, GPU has fallen off the bus.\n",
    )
    .unwrap();
    console
}

/// Two tenants of one GPU each report failures: each fault stays with that tenant's vGPU (its
/// VF's record), the shared GPU stays in service, and the device plugin keeps serving the
/// other tenants' vGPUs.
#[test]
fn vgpu_faults_are_charged_to_the_vf_never_the_shared_parent() {
    let h = sysfs::l40s_host();
    let logs = tempfile::tempdir().unwrap();
    let parent: gpu_passthrough::pci::PciAddress = "0000:61:00.0".parse().unwrap();
    // Least loaded first: vm-1 and vm-2 on 61:00.0, vm-3 on 41:00.0, vm-4 on 61:00.0.
    for who in ["vm-1", "vm-2", "vm-3", "vm-4"] {
        attach(&h, "L40S-4Q", 1, who);
    }
    for (who, vf) in [("vm-1", "0000:61:00.4"), ("vm-2", "0000:61:00.5")] {
        let report = gpu_passthrough::attach::ingest_console(
            &h.state,
            &owner(who),
            &hostile_console(logs.path(), who),
        )
        .unwrap();
        assert_eq!(report.recorded.len(), 1, "{report:?}");
        assert_eq!(report.recorded[0].device.to_string(), vf);
        assert_eq!(report.recorded[0].owner, Some(owner(who)));
    }
    let store = HealthStore::new(&h.state);
    assert_eq!(store.quarantine(parent).unwrap(), None, "the shared GPU");
    let records = store.records().unwrap();
    assert!(records.iter().all(|r| r.device != parent), "{records:?}");
    for (who, vf) in [("vm-1", "0000:61:00.4"), ("vm-2", "0000:61:00.5")] {
        let r = records
            .iter()
            .find(|r| r.device.to_string() == vf)
            .expect("the VF's record");
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].owner, Some(owner(who)));
        assert_eq!(r.events[0].fault.xid, Some(79));
    }
    // The device plugin: vm-4's vGPU on the same GPU is still healthy.
    let j = h.host().journal().read().unwrap();
    let quarantine = gpu_passthrough::health::HealthRecords {
        state_dir: h.state.clone(),
    };
    let third = j
        .attachments
        .iter()
        .find(|a| a.owner == owner("vm-4"))
        .unwrap();
    assert_eq!(third.vgpus[0].parent, parent, "a tenant of the same GPU");
    let problems = gpu_passthrough_device_plugin::vgpu::problems(
        h.host().sysfs(),
        &h.dev,
        &third.vgpus[0],
        &quarantine,
    );
    assert!(problems.is_empty(), "{problems:?}");
}

/// A VF two tenants blamed is out of service (suspect) and skipped; its GPU's other VFs are
/// handed out.
#[test]
fn a_vf_its_tenants_blamed_is_skipped_not_its_gpu() {
    let h = sysfs::l40s_host();
    let logs = tempfile::tempdir().unwrap();
    for who in ["vm-1", "vm-2"] {
        let spec = attach(&h, "L40S-24Q", 1, who);
        assert_eq!(
            spec.devices[0].address.map(|a| a.to_string()).as_deref(),
            Some("0000:61:00.4")
        );
        h.host().detach(&owner(who)).unwrap();
        gpu_passthrough::attach::ingest_console(
            &h.state,
            &owner(who),
            &hostile_console(logs.path(), who),
        )
        .unwrap();
    }
    let spec = attach(&h, "L40S-24Q", 1, "vm-3");
    assert_eq!(
        spec.devices[0].address.map(|a| a.to_string()).as_deref(),
        Some("0000:61:00.5"),
        "the blamed VF is skipped, its GPU still serves"
    );
}

/// The mdev framework: two tenants' faults are kept on the parent's record marked with each
/// tenant's mdev, and never count towards the parent's quarantine.
#[test]
fn mdev_faults_stay_with_the_mdev_and_never_quarantine_the_parent() {
    let h = sysfs::vgpu_host();
    let logs = tempfile::tempdir().unwrap();
    let parent: gpu_passthrough::pci::PciAddress = "0000:3d:00.0".parse().unwrap();
    let mut uuids = Vec::new();
    for who in ["vm-a", "vm-b"] {
        let spec = attach(&h, "A16-4Q", 1, who);
        uuids.push(spec.devices[0].mdev_uuid.clone().expect("an mdev"));
        gpu_passthrough::attach::ingest_console(
            &h.state,
            &owner(who),
            &hostile_console(logs.path(), who),
        )
        .unwrap();
    }
    let store = HealthStore::new(&h.state);
    assert_eq!(store.quarantine(parent).unwrap(), None);
    let records = store.records().unwrap();
    let events = &records.iter().find(|r| r.device == parent).unwrap().events;
    assert_eq!(events.len(), 2, "{events:?}");
    for (e, (who, uuid)) in events.iter().zip(["vm-a", "vm-b"].iter().zip(&uuids)) {
        assert_eq!(e.owner, Some(owner(who)));
        assert_eq!(e.mdev.as_ref(), Some(uuid));
    }
}

#[test]
fn an_unreadable_proc_refuses_the_release_rather_than_guess() {
    let h = sysfs::l40s_host();
    attach(&h, "L40S-4Q", 1, "vm-1");
    let blind = h.host().with_proc_root(h.dir.path().join("no-proc"));
    let e = blind.detach(&owner("vm-1")).unwrap_err();
    assert!(matches!(e, AttachError::Blind(_)), "{e}");
    assert!(e.outcome() == Outcome::Refused);
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1150", "nothing released");
    h.host().detach(&owner("vm-1")).unwrap();
    assert_eq!(h.vgpu_type("0000:61:00.4"), "0");
}

#[test]
fn two_attaches_racing_for_the_last_48q_get_it_once() {
    let h = sysfs::l40s_host();
    let results: Vec<Result<BootSpec, AttachError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ["vm-a", "vm-b"]
            .into_iter()
            .map(|o| {
                let h = &h;
                s.spawn(move || h.host().attach_vgpu(&req("L40S-48Q", 1, o)))
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let e = results.into_iter().find_map(Result::err).unwrap();
    assert!(e.outcome() == Outcome::Refused, "{e}");
    assert_eq!(
        L40S_VFS_61
            .iter()
            .filter(|vf| h.vgpu_type(vf) == "1156")
            .count(),
        1
    );
}

const L40S_VFS_61: [&str; 4] = [
    "0000:61:00.4",
    "0000:61:00.5",
    "0000:61:00.6",
    "0000:61:00.7",
];

#[test]
fn an_mdev_held_open_by_a_vmm_is_not_removed() {
    let h = sysfs::t4_mdev_host();
    let spec = attach(&h, "T4-1B", 1, "vm-1");
    let mut vmm = sysfs::fake_vmm(&spec.devices[0].vfio_device);
    let e = h.host().detach(&owner("vm-1")).unwrap_err();
    assert!(e.to_string().contains(&format!("pid {}", vmm.id())), "{e}");
    assert_eq!(h.mdevs().len(), 2, "nothing removed");
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    h.host().detach(&owner("vm-1")).unwrap();
    assert_eq!(h.mdevs().len(), 1);
}

#[test]
fn an_mdev_parent_with_mdevs_is_not_moved_or_reset() {
    use gpu_passthrough::attach::{PlanRequest, RefusalReason};
    let h = sysfs::t4_mdev_host();
    let t4 = "0000:3b:00.0".parse().unwrap();
    let plan = h
        .host()
        .plan(&PlanRequest {
            devices: vec![t4],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(plan.refusals[0].reason, RefusalReason::VgpuFunction);
    assert!(
        plan.refusals[0].message.contains("1 mdev"),
        "{:?}",
        plan.refusals
    );
    assert!(matches!(
        h.host().reset(t4),
        Err(AttachError::ResetRefused { .. })
    ));
    // Creating more mdevs on it is still what it is for.
    attach(&h, "T4-1B", 1, "vm-1");
}

/// A host with iommufd and no legacy group nodes: the VF's own cdev is the node a VMM opens,
/// the attach waits for it (not for a group node that never comes), and the device plugin
/// serves the vGPU as healthy there; once released, the plugin sees the node gone.
#[test]
fn an_iommufd_only_host_attaches_a_vgpu_through_the_vfs_cdev_and_serves_it_healthy() {
    let h = sysfs::l40s_host();
    h.inject("iommufd-only");
    let spec = attach(&h, "L40S-24Q", 1, "vm-1");
    let vgpu = &spec.devices[0];
    assert!(
        vgpu.vfio_device.starts_with(h.dev.join("vfio/devices")),
        "{}",
        vgpu.vfio_device.display()
    );
    assert!(
        fs::read_dir(h.dev.join("vfio"))
            .unwrap()
            .flatten()
            .all(|e| e.file_name() == "devices" || e.file_name() == "vfio"),
        "a group node appeared on an iommufd-only host: {:?}",
        fs::read_dir(h.dev.join("vfio"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    let j = h.host().journal().read().unwrap();
    let rec = j.attachments[0].vgpus[0].clone();
    let healthy = gpu_passthrough_device_plugin::vgpu::problems(
        h.host().sysfs(),
        &h.dev,
        &rec,
        &gpu_passthrough::quarantine::NoQuarantine,
    );
    assert!(healthy.is_empty(), "{healthy:?}");
    // The cdev goes with the vGPU: the plugin reports the missing node.
    fs::remove_file(&vgpu.vfio_device).unwrap();
    let gone = gpu_passthrough_device_plugin::vgpu::problems(
        h.host().sysfs(),
        &h.dev,
        &rec,
        &gpu_passthrough::quarantine::NoQuarantine,
    );
    assert!(
        gone.iter().any(|p| p.to_string().contains("is missing")),
        "{gone:?}"
    );
}
