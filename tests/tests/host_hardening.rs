//! Never take a device from a running VM or from the host. Each test fails without the guard it
//! is named after. Processes are a fake proc root: `<pid>/comm`, `<pid>/fd/<n>`
//! links to the nodes they hold, `<pid>/stat` and `<pid>/ns/pid` for owner identity.

use gpu_passthrough::outcome::{Classify, Outcome};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use gpu_passthrough::attach::journal::{Step, Transaction};
use gpu_passthrough::attach::{
    AttachError, AttachRequest, Host, Liveness, Owner, PidLiveness, PlanRequest, PlanRole,
    RefusalReason,
};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough_tests::sysfs::{self, FakeDevice, FakeHost, FixedLiveness};

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

fn attach(
    host: &Host,
    devs: &[&str],
    who: &str,
) -> Result<gpu_passthrough::vmm::BootSpec, AttachError> {
    host.attach(&AttachRequest {
        plan: req(devs),
        owner: owner(who),
        initrd: None,
    })
}

/// A fake proc root (in the fake host's temp dir).
struct FakeProc(PathBuf);

impl FakeProc {
    fn new(h: &FakeHost, name: &str) -> FakeProc {
        FakeProc::in_namespace(h, name, gpu_passthrough::pidns::INITIAL_PID_NS)
    }

    /// A proc root whose `self/ns/pid` reads `ns`: the host's, or a container's.
    fn in_namespace(h: &FakeHost, name: &str, ns: &str) -> FakeProc {
        let root = h.dir.path().join(name);
        fs::create_dir_all(root.join("self/ns")).unwrap();
        symlink(ns, root.join("self/ns/pid")).unwrap();
        FakeProc(root)
    }

    /// Process `pid` named `comm` holding `paths` open.
    fn holder(&self, pid: u32, comm: &str, paths: &[&Path]) -> &Self {
        let dir = self.0.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        for (i, p) in paths.iter().enumerate() {
            symlink(p, dir.join("fd").join((i + 3).to_string())).unwrap();
        }
        self
    }

    /// `/proc/<pid>/stat` with state `state` and start time `start`, and its PID namespace.
    fn process(&self, pid: &str, state: &str, start: u64, ns: &str) -> &Self {
        let dir = self.0.join(pid);
        fs::create_dir_all(dir.join("ns")).unwrap();
        let mut fields = vec![state.to_owned()];
        fields.extend((4..22).map(|i| i.to_string()));
        fields.push(start.to_string());
        fs::write(
            dir.join("stat"),
            format!("{pid} (qemu-system-x86) {}\n", fields.join(" ")),
        )
        .unwrap();
        let _ = fs::remove_file(dir.join("ns/pid"));
        symlink(ns, dir.join("ns/pid")).unwrap();
        self
    }

    fn remove(&self, pid: u32) {
        fs::remove_dir_all(self.0.join(pid.to_string())).unwrap();
    }
}

fn held_by(e: &AttachError) -> Vec<(u32, String)> {
    match e {
        AttachError::DeviceHeld { holders, .. } => {
            holders.iter().map(|h| (h.pid, h.command.clone())).collect()
        }
        _ => Vec::new(),
    }
}

/// A device of nobody's on vfio-pci (group 3, node present), as another VMM's device looks.
fn foreign_vfio_device() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:05:00.0", 0x10de, 0x2684, 0x030000)
            .driver("vfio-pci")
            .group(3),
    );
    fs::write(h.dev.join("vfio/3"), "").unwrap();
    h
}

// ---------------------------------------------------------------- 1. adopted devices

#[test]
fn an_adopted_device_stays_on_vfio_when_the_vfio_check_fails() {
    let h = foreign_vfio_device();
    // EBUSY from VFIO: another VMM has the group open (the simulation's injected failure).
    h.inject("fail-once verify");
    let err = attach(&h.host(), &["0000:05:00.0"], "vm").unwrap_err();
    assert!(matches!(err, AttachError::Vfio { .. }), "{err}");
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("vfio-pci"));
    assert!(
        h.dev.join("vfio/3").exists(),
        "the VM's node is still there"
    );
    assert!(h.journal_clean());
}

#[test]
fn an_adopted_device_stays_on_vfio_at_detach_and_at_reconcile() {
    let h = foreign_vfio_device();
    attach(&h.host(), &["0000:05:00.0"], "vm-a").unwrap();
    h.host().detach(&owner("vm-a")).unwrap();
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("vfio-pci"));
    assert!(h.journal_clean());

    attach(&h.host(), &["0000:05:00.0"], "vm-b").unwrap();
    let r = h
        .host_with(Box::new(FixedLiveness(vec![(
            "vm-b".into(),
            Liveness::Gone,
        )])))
        .reconcile()
        .unwrap();
    assert_eq!(r.released.len(), 1, "{r:?}");
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("vfio-pci"));
    assert!(h.journal_clean());
}

#[test]
fn adoption_is_refused_while_another_process_holds_the_group_node() {
    let h = foreign_vfio_device();
    let proc = FakeProc::new(&h, "proc");
    proc.holder(4242, "qemu-system-x86", &[&h.dev.join("vfio/3")]);
    let host = h.host().with_proc_root(&proc.0);
    let plan = host.plan(&req(&["0000:05:00.0"])).unwrap();
    let r = plan
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::HeldOpen)
        .unwrap_or_else(|| panic!("{:?}", plan.refusals));
    assert!(
        r.message.contains("pid 4242 (qemu-system-x86)"),
        "{}",
        r.message
    );
    let err = attach(&host, &["0000:05:00.0"], "vm").unwrap_err();
    assert!(err.outcome() == Outcome::Refused);
    assert!(
        err.to_string().contains("pid 4242 (qemu-system-x86)"),
        "{err}"
    );
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("vfio-pci"));
    assert!(h.journal_clean());
}

// ---------------------------------------------------------------- 2. live-VMM guard

#[test]
fn detach_is_refused_while_a_vmm_holds_the_group_node_and_works_once_it_is_gone() {
    let h = sysfs::workstation();
    let proc = FakeProc::new(&h, "proc");
    let host = h.host().with_proc_root(&proc.0);
    attach(&host, &["0000:01:00.0"], "vm-1").unwrap();
    proc.holder(777, "cloud-hypervisor", &[&h.dev.join("vfio/12")]);
    let err = host.detach(&owner("vm-1")).unwrap_err();
    assert!(err.outcome() == Outcome::Refused, "{err}");
    assert_eq!(held_by(&err), [(777, "cloud-hypervisor".to_owned())]);
    assert!(
        err.to_string().contains("pid 777 (cloud-hypervisor) holds"),
        "{err}"
    );
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert!(!h.journal_clean(), "still vm-1's");
    proc.remove(777);
    h.host().detach(&owner("vm-1")).unwrap();
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
}

#[test]
fn reconcile_keeps_a_gone_owners_devices_while_a_process_holds_them() {
    let h = sysfs::workstation();
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    let proc = FakeProc::new(&h, "proc");
    proc.holder(31, "qemu-system-x86", &[&h.dev.join("vfio/12")]);
    let r = h
        .host_with(Box::new(FixedLiveness(vec![(
            "vm-1".into(),
            Liveness::Gone,
        )])))
        .with_proc_root(&proc.0)
        .reconcile()
        .unwrap();
    assert!(r.released.is_empty(), "{r:?}");
    assert_eq!(r.kept_in_use.len(), 1, "{r:?}");
    assert_eq!(r.kept_in_use[0].owner, owner("vm-1"));
    assert_eq!(r.kept_in_use[0].holders[0].pid, 31);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert!(r.to_string().contains("pid 31 (qemu-system-x86)"), "{r}");
}

#[test]
fn reconcile_does_not_roll_back_an_abandoned_transaction_whose_device_is_held() {
    let h = sysfs::workstation();
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    // Make it a transaction a crash left before verification (so reconcile would roll back).
    {
        let mut j = h.host().journal().lock().unwrap();
        let att = j.state.attachments.remove(0);
        let mut devices = att.devices;
        for d in &mut devices {
            d.step = Step::NodeReady;
        }
        j.state.transactions.push(Transaction {
            owner: att.owner,
            pid: 1,
            owner_process: None,
            devices,
            vgpus: Vec::new(),
            boot_id: att.boot_id,
            fabric_partition: None,
        });
        j.save().unwrap();
    }
    let proc = FakeProc::new(&h, "proc");
    proc.holder(99, "qemu-system-x86", &[&h.dev.join("vfio/12")]);
    let r = h.host().with_proc_root(&proc.0).reconcile().unwrap();
    assert!(r.rolled_back.is_empty(), "{r:?}");
    assert_eq!(r.kept_in_use.len(), 1, "{r:?}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(
        h.journal().unwrap()["transactions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    proc.remove(99);
    let r = h.host().with_proc_root(&proc.0).reconcile().unwrap();
    assert_eq!(r.rolled_back.len(), 2, "{r:?}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

#[test]
fn an_unreadable_proc_root_fails_closed() {
    let h = sysfs::workstation();
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    let err = h
        .host()
        .with_proc_root(h.dir.path().join("no-proc"))
        .detach(&owner("vm-1"))
        .unwrap_err();
    assert!(matches!(err, AttachError::Blind(_)), "{err}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

// ---------------------------------------------------------------- blind: another PID namespace

/// A container's PID namespace (a pod without `hostPID`): its proc shows none of the host's
/// processes, so a holder check would find nobody.
const CONTAINER_NS: &str = "pid:[4026532611]";

fn assert_blind(e: &AttachError) {
    assert!(matches!(e, AttachError::Blind(_)), "{e}");
    assert_eq!(e.outcome(), Outcome::Refused);
    let text = e.to_string();
    assert!(
        text.contains("hostPID: true") && text.contains(CONTAINER_NS),
        "{text}"
    );
}

#[test]
fn a_blind_process_moves_and_releases_nothing() {
    let h = sysfs::workstation();
    let container = FakeProc::in_namespace(&h, "proc-container", CONTAINER_NS);
    let blind = h.host().with_proc_root(&container.0);
    // Attach: refused before anything is recorded or written.
    assert_blind(&attach(&blind, &["0000:01:00.0"], "vm-1").unwrap_err());
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
    // Attached from the host; then detach, reset and reconcile from the container refuse.
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    assert_blind(&blind.detach(&owner("vm-1")).unwrap_err());
    assert_blind(&blind.reset(a("0000:03:00.0")).unwrap_err());
    assert_blind(&blind.reconcile().unwrap_err());
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:03:00.0").as_deref(), Some("nvme"));
    assert_eq!(h.journal().unwrap()["attachments"][0]["owner"], "vm-1");
    h.host().detach(&owner("vm-1")).unwrap();
}

#[test]
fn read_only_commands_work_blind_and_say_so() {
    let h = sysfs::workstation();
    let container = FakeProc::in_namespace(&h, "proc-container", CONTAINER_NS);
    let blind = h.host().with_proc_root(&container.0);
    let plan = blind.plan(&req(&["0000:01:00.0"])).unwrap();
    assert!(
        plan.refusals
            .iter()
            .any(|r| r.reason == RefusalReason::Blind && r.message.contains("hostPID")),
        "{:?}",
        plan.refusals
    );
    let listing = blind.listing(false, None).unwrap();
    let gpu = listing
        .devices
        .iter()
        .find(|d| d.device.address == a("0000:01:00.0"))
        .unwrap();
    assert!(!gpu.ready);
    assert!(
        gpu.not_ready_because.iter().any(|w| w.contains("hostPID")),
        "{:?}",
        gpu.not_ready_because
    );
    let doctor = blind.doctor(None).unwrap();
    let finding = doctor
        .checks
        .iter()
        .find(|c| c.name == "host_processes")
        .unwrap();
    assert_eq!(finding.status, gpu_passthrough::attach::CheckStatus::Fail);
    assert!(finding.fix.contains("hostPID: true"), "{finding:?}");
    // From the host's namespace the same checks pass.
    let seeing = FakeProc::new(&h, "proc-host");
    let host = h.host().with_proc_root(&seeing.0);
    assert!(
        host.plan(&req(&["0000:01:00.0"]))
            .unwrap()
            .refusals
            .is_empty()
    );
    let doctor = host.doctor(None).unwrap();
    let finding = doctor.checks.iter().find(|c| c.name == "host_processes");
    assert_eq!(
        finding.map(|c| c.status),
        Some(gpu_passthrough::attach::CheckStatus::Ok)
    );
}

#[test]
fn an_iommufd_cdev_held_open_blocks_detach_too() {
    let h = sysfs::workstation();
    h.inject("iommufd-only");
    let proc = FakeProc::new(&h, "proc");
    let host = h.host().with_proc_root(&proc.0);
    attach(&host, &["0000:01:00.0"], "vm-1").unwrap();
    assert!(!h.dev.join("vfio/12").exists());
    let cdev = h.dev.join("vfio/devices/vfio0");
    assert!(cdev.exists());
    proc.holder(5, "qemu-system-x86", &[&cdev]);
    let err = host.detach(&owner("vm-1")).unwrap_err();
    assert_eq!(held_by(&err), [(5, "qemu-system-x86".to_owned())]);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

// ---------------------------------------------------------------- 3. pid owner identity

/// A `pid:4242` owner attached while its process (start time 900, PID namespace `pid:[1]`)
/// was visible; returns the host.
fn pid_owner_attached() -> (FakeHost, FakeProc) {
    let h = sysfs::workstation();
    let at_attach = FakeProc::new(&h, "proc-attach");
    at_attach.process("4242", "S", 900, "pid:[1]");
    attach(
        &h.host().with_proc_root(&at_attach.0),
        &["0000:01:00.0"],
        "pid:4242",
    )
    .unwrap();
    let rec = &h.journal().unwrap()["attachments"][0]["owner_process"];
    assert_eq!(rec["start_time"], 900);
    assert_eq!(rec["pid_ns"], "pid:[1]");
    (h, at_attach)
}

fn reconcile_seeing(h: &FakeHost, proc: &FakeProc) -> gpu_passthrough::attach::ReconcileReport {
    h.host_with(Box::new(PidLiveness {
        proc_root: proc.0.clone(),
        gone: Vec::new(),
    }))
    .reconcile()
    .unwrap()
}

#[test]
fn a_reconcile_in_another_pid_namespace_does_not_release_a_running_vm() {
    let (h, _) = pid_owner_attached();
    // A container's /proc: its own namespace, no 4242 in it.
    let container = FakeProc::new(&h, "proc-container");
    container.process("self", "R", 5, "pid:[2]");
    let r = reconcile_seeing(&h, &container);
    assert!(r.released.is_empty(), "{r:?}");
    assert_eq!(r.kept_unknown, [owner("pid:4242")]);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn a_reused_pid_is_unknown_and_a_vanished_one_in_our_namespace_is_gone() {
    let (h, _) = pid_owner_attached();
    let host_proc = FakeProc::new(&h, "proc-host");
    host_proc.process("self", "R", 5, "pid:[1]");
    // Another process got 4242 since: not ours to judge.
    host_proc.process("4242", "S", 1234, "pid:[1]");
    let r = reconcile_seeing(&h, &host_proc);
    assert_eq!(r.kept_unknown, [owner("pid:4242")], "{r:?}");
    // The same process, still running: alive.
    host_proc.process("4242", "S", 900, "pid:[1]");
    assert_eq!(
        reconcile_seeing(&h, &host_proc).kept_alive,
        [owner("pid:4242")]
    );
    // Gone from our own namespace: released.
    fs::remove_dir_all(host_proc.0.join("4242")).unwrap();
    let r = reconcile_seeing(&h, &host_proc);
    assert_eq!(r.released.len(), 1, "{r:?}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
}

#[test]
fn an_owner_recorded_without_identity_is_never_released_on_a_missing_pid() {
    let h = sysfs::workstation();
    // At attach the process could not be seen: no identity recorded.
    let empty = FakeProc::new(&h, "proc-empty");
    attach(
        &h.host().with_proc_root(&empty.0),
        &["0000:01:00.0"],
        "pid:4242",
    )
    .unwrap();
    assert!(h.journal().unwrap()["attachments"][0]["owner_process"].is_null());
    let host_proc = FakeProc::new(&h, "proc-host");
    host_proc.process("self", "R", 5, "pid:[1]");
    let r = reconcile_seeing(&h, &host_proc);
    assert_eq!(r.kept_unknown, [owner("pid:4242")], "{r:?}");
}

// ---------------------------------------------------------------- 4. SR-IOV

/// An SR-IOV GPU: PF 0000:3b:00.0 with VFs 0000:3b:00.4 and 0000:3b:00.5 enabled, each VF in
/// its own group.
fn sriov_host() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:3b:00.0", 0x10de, 0x20b5, 0x030200)
            .driver("nvidia")
            .group(60),
    );
    let pf = h.sys.join("bus/pci/devices/0000:3b:00.0");
    fs::write(pf.join("sriov_totalvfs"), "16\n").unwrap();
    fs::write(pf.join("sriov_numvfs"), "2\n").unwrap();
    for (i, vf) in ["0000:3b:00.4", "0000:3b:00.5"].iter().enumerate() {
        h.add(FakeDevice::new(vf, 0x10de, 0x20b5, 0x030200).group(61 + i as u32));
        let dir = h.sys.join("bus/pci/devices").join(vf);
        symlink(fs::canonicalize(&pf).unwrap(), dir.join("physfn")).unwrap();
        symlink(
            fs::canonicalize(&dir).unwrap(),
            pf.join(format!("virtfn{i}")),
        )
        .unwrap();
    }
    h
}

#[test]
fn a_virtual_function_moves_alone() {
    let h = sriov_host();
    let plan = h.host().plan(&req(&["0000:3b:00.4"])).unwrap();
    let moved: Vec<_> = plan.devices.iter().map(|p| p.address).collect();
    assert_eq!(
        moved,
        [a("0000:3b:00.4")],
        "neither its PF nor its sibling VF"
    );
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    attach(&h.host(), &["0000:3b:00.4"], "vm").unwrap();
    assert_eq!(h.driver("0000:3b:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver("0000:3b:00.5"), None);
    let list = h.host().devices(false, None).unwrap();
    let vf = list
        .iter()
        .find(|d| d.device.address == a("0000:3b:00.5"))
        .unwrap();
    assert!(vf.companions.is_empty(), "{:?}", vf.companions);
    assert_eq!(vf.device.physfn, Some(a("0000:3b:00.0")));
}

#[test]
fn a_physical_function_with_vfs_enabled_is_refused_with_the_fix() {
    let h = sriov_host();
    let plan = h.host().plan(&req(&["0000:3b:00.0"])).unwrap();
    let r = plan
        .refusals
        .iter()
        .find(|r| r.reason == RefusalReason::SriovEnabled)
        .unwrap_or_else(|| panic!("{:?}", plan.refusals));
    assert_eq!(r.device, Some(a("0000:3b:00.0")));
    assert!(
        r.message.contains("2 virtual functions enabled"),
        "{}",
        r.message
    );
    assert!(r.message.contains("sriov_numvfs"), "{}", r.message);
    assert!(
        attach(&h.host(), &["0000:3b:00.0"], "vm")
            .unwrap_err()
            .outcome()
            == Outcome::Refused
    );
    assert_eq!(h.driver("0000:3b:00.0").as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

// ---------------------------------------------------------------- 5. host devices in the group

/// A Turing card (VGA, audio, USB-C, UCSI) in group 7 with chipset functions (no ACS): an xHCI
/// controller, an ISA/LPC bridge, an SMBus controller, plus a member parked on pci-stub.
fn chipset_group() -> FakeHost {
    let h = FakeHost::new(true);
    for (addr, device, class, driver) in [
        ("0000:02:00.0", 0x1e84, 0x030000, Some("nvidia")),
        ("0000:02:00.1", 0x10f8, 0x040300, Some("snd_hda_intel")),
        ("0000:02:00.2", 0x1ad8, 0x0c0330, Some("xhci_hcd")),
        ("0000:02:00.3", 0x1ad9, 0x0c8000, Some("nvidia-gpu")),
    ] {
        let mut d = FakeDevice::new(addr, 0x10de, device, class).group(7);
        if let Some(drv) = driver {
            d = d.driver(drv);
        }
        h.add(d);
    }
    h.add(
        FakeDevice::new("0000:00:14.0", 0x8086, 0xa36d, 0x0c0330)
            .driver("xhci_hcd")
            .group(7),
    )
    .add(
        FakeDevice::new("0000:00:1f.0", 0x8086, 0xa306, 0x060100)
            .driver("lpc_ich")
            .group(7),
    )
    .add(
        FakeDevice::new("0000:00:1f.4", 0x8086, 0xa323, 0x0c0500)
            .driver("i801_smbus")
            .group(7),
    )
    .add(
        FakeDevice::new("0000:00:16.0", 0x8086, 0xa360, 0x078000)
            .driver("pci-stub")
            .group(7),
    );
    h
}

#[test]
fn chipset_functions_in_the_gpus_group_are_refused_unless_named() {
    let h = chipset_group();
    let plan = h.host().plan(&req(&["0000:02:00.0"])).unwrap();
    let mut refused: Vec<_> = plan
        .refusals
        .iter()
        .filter(|r| r.reason == RefusalReason::HostDeviceInUse)
        .filter_map(|r| r.device)
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        [a("0000:00:14.0"), a("0000:00:1f.0"), a("0000:00:1f.4")],
        "{:?}",
        plan.refusals
    );
    let lpc = plan
        .refusals
        .iter()
        .find(|r| r.device == Some(a("0000:00:1f.0")))
        .unwrap();
    assert!(
        lpc.message.contains("class 060100 on lpc_ich"),
        "{}",
        lpc.message
    );
    assert!(
        lpc.message.contains("name it explicitly"),
        "{}",
        lpc.message
    );
    assert!(
        attach(&h.host(), &["0000:02:00.0"], "vm")
            .unwrap_err()
            .outcome()
            == Outcome::Refused
    );
    assert_eq!(h.driver("0000:00:14.0").as_deref(), Some("xhci_hcd"));
    assert_eq!(h.driver("0000:02:00.0").as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

#[test]
fn the_gpus_own_functions_move_with_it_and_named_members_too() {
    let h = chipset_group();
    let all = [
        "0000:02:00.0",
        "0000:00:14.0",
        "0000:00:1f.0",
        "0000:00:1f.4",
    ];
    let plan = h.host().plan(&req(&all)).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    let role = |d: &str| {
        plan.devices
            .iter()
            .find(|p| p.address == a(d))
            .unwrap()
            .role
    };
    for companion in ["0000:02:00.1", "0000:02:00.2", "0000:02:00.3"] {
        assert_eq!(role(companion), PlanRole::Companion, "{companion}");
    }
    assert_eq!(
        role("0000:00:16.0"),
        PlanRole::GroupMember,
        "pci-stub: not refused"
    );
    attach(&h.host(), &all, "vm").unwrap();
    for d in [
        "0000:02:00.2",
        "0000:02:00.3",
        "0000:00:14.0",
        "0000:00:16.0",
    ] {
        assert_eq!(h.driver(d).as_deref(), Some("vfio-pci"), "{d}");
    }
}

// ---------------------------------------------------------------- 6. GPU clients

/// The driver's `gpus/<addr>/information` under the fake proc, with `Device Minor: minor`.
fn nvidia_minor(proc: &FakeProc, addr: &str, minor: u32) {
    let dir = proc.0.join("driver/nvidia/gpus").join(addr);
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("information"),
        format!("Model:           NVIDIA GeForce RTX 4090\nIRQ:             130\nDevice Minor:    {minor}\n"),
    )
    .unwrap();
}

#[test]
fn a_gpu_in_use_by_a_program_is_refused_with_the_list_before_any_write() {
    let h = sysfs::workstation();
    let proc = FakeProc::new(&h, "proc");
    nvidia_minor(&proc, "0000:01:00.0", 3);
    proc.holder(300, "python3", &[&h.dev.join("nvidia3")])
        .holder(301, "nvidia-smi", &[&h.dev.join("nvidia0")]);
    let host = h.host().with_proc_root(&proc.0);
    let plan = host.plan(&req(&["0000:01:00.0"])).unwrap();
    let held: Vec<_> = plan
        .refusals
        .iter()
        .filter(|r| r.reason == RefusalReason::HeldOpen)
        .collect();
    assert_eq!(held.len(), 1, "{:?}", plan.refusals);
    assert!(
        held[0].message.contains("pid 300 (python3)"),
        "{}",
        held[0].message
    );
    assert!(
        !held[0].message.contains("nvidia-smi"),
        "another GPU's client"
    );
    let err = attach(&host, &["0000:01:00.0"], "vm").unwrap_err();
    assert!(err.outcome() == Outcome::Refused);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver_override("0000:01:00.0"), None, "nothing written");
}

#[test]
fn persistenced_holding_the_gpu_is_refused_instead_of_a_blocked_unbind() {
    let h = sysfs::workstation();
    let proc = FakeProc::new(&h, "proc");
    nvidia_minor(&proc, "0000:01:00.0", 0);
    proc.holder(55, "nvidia-persiste", &[&h.dev.join("nvidia0")]);
    let host = h.host().with_proc_root(&proc.0);
    // Persistence is turned off first, so the plan does not count it ...
    let plan = host.plan(&req(&["0000:01:00.0"])).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    // ... but when it still holds the GPU (here: nvidia-smi cannot run), no unbind is tried.
    let err = attach(&host, &["0000:01:00.0"], "vm").unwrap_err();
    assert_eq!(held_by(&err), [(55, "nvidia-persiste".to_owned())], "{err}");
    assert!(err.outcome() == Outcome::Refused);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver_override("0000:01:00.0"), None);
    assert!(h.journal_clean());
}

#[test]
fn without_the_gpus_minor_holders_of_nvidiactl_count() {
    let h = sysfs::workstation();
    let proc = FakeProc::new(&h, "proc");
    proc.holder(8, "cuda-app", &[&h.dev.join("nvidiactl")]);
    let plan = h
        .host()
        .with_proc_root(&proc.0)
        .plan(&req(&["0000:01:00.0"]))
        .unwrap();
    assert!(
        plan.refusals
            .iter()
            .any(|r| r.reason == RefusalReason::HeldOpen && r.message.contains("pid 8 (cuda-app)")),
        "{:?}",
        plan.refusals
    );
}

// ---------------------------------------------------------------- 7. restore by bind

#[test]
fn restore_binds_the_original_driver_even_when_probing_would_pick_another() {
    for probe_picks in ["nouveau", "vfio-pci"] {
        let h = sysfs::workstation();
        let nouveau = h.sys.join("bus/pci/drivers/nouveau");
        fs::create_dir_all(&nouveau).unwrap();
        fs::write(nouveau.join("bind"), "").unwrap();
        fs::write(nouveau.join("unbind"), "").unwrap();
        attach(&h.host(), &["0000:01:00.0"], "vm").unwrap();
        // What drivers_probe would bind now (ID match: nouveau, or vfio-pci through `ids=`).
        fs::write(
            h.sys
                .join("bus/pci/devices/0000:01:00.0")
                .join(gpu_passthrough::simulation::SIM_DEFAULT_DRIVER),
            format!("{probe_picks}\n"),
        )
        .unwrap();
        h.host().detach(&owner("vm")).unwrap();
        assert_eq!(
            h.driver("0000:01:00.0").as_deref(),
            Some("nvidia"),
            "{probe_picks}"
        );
        assert_eq!(h.driver_override("0000:01:00.0"), None);
        assert!(h.journal_clean());
    }
}

// ---------------------------------------------------------------- 8. iommufd, P2P clique

#[test]
fn an_iommufd_only_host_attaches_through_the_device_cdev() {
    let h = sysfs::workstation();
    h.inject("iommufd-only");
    let spec = attach(&h.host(), &["0000:01:00.0"], "vm").unwrap();
    let gpu = spec.devices.iter().find(|d| d.gpu).unwrap();
    assert!(
        gpu.vfio_device.starts_with(h.dev.join("vfio/devices")),
        "{}",
        gpu.vfio_device.display()
    );
    assert!(gpu.is_iommufd_cdev());
    assert!(
        spec.qemu.args.iter().any(|a| a == "iommufd,id=iommufd0"),
        "{:?}",
        spec.qemu.args
    );
    assert!(
        spec.qemu.args.iter().any(
            |a| a.starts_with("vfio-pci,host=0000:01:00.0,") && a.contains(",iommufd=iommufd0")
        ),
        "{:?}",
        spec.qemu.args
    );
    assert!(
        spec.cloud_hypervisor
            .args
            .windows(2)
            .any(|w| w == ["--platform", "iommufd=on"]),
        "{:?}",
        spec.cloud_hypervisor.args
    );
    h.host().detach(&owner("vm")).unwrap();
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert!(!h.dev.join("vfio/devices/vfio0").exists());
}

/// Two H100s behind one PCIe switch (upstream port 0000:10:00.0) and one on its own root port.
fn switch_host() -> FakeHost {
    let h = FakeHost::new(true);
    let sw = "pci0000:00/0000:00:01.0/0000:10:00.0";
    h.add(
        FakeDevice::new("0000:00:01.0", 0x8086, 0x1, 0x060400)
            .driver("pcieport")
            .group(1),
    );
    for (addr, down, g) in [
        ("0000:12:00.0", "0000:11:00.0", 20),
        ("0000:14:00.0", "0000:11:01.0", 21),
    ] {
        h.add(
            FakeDevice::new(addr, 0x10de, 0x2330, 0x030200)
                .driver("nvidia")
                .group(g)
                .bar64(1 << 30)
                .under(&format!("{sw}/{down}")),
        );
    }
    h.add(
        FakeDevice::new("0000:40:00.0", 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .group(22)
            .bar64(1 << 30)
            .under("pci0000:00/0000:00:02.0"),
    );
    h
}

fn has_clique(spec: &gpu_passthrough::vmm::BootSpec) -> bool {
    spec.qemu
        .args
        .iter()
        .any(|a| a.contains("x-nv-gpudirect-clique"))
        && spec
            .cloud_hypervisor
            .args
            .iter()
            .any(|a| a.contains("x_nv_gpudirect_clique"))
}

#[test]
fn gpus_get_a_p2p_clique_only_behind_one_switch_or_when_asked() {
    let h = switch_host();
    let host = h.host();
    let behind = attach(&host, &["0000:12:00.0", "0000:14:00.0"], "vm-a").unwrap();
    assert!(has_clique(&behind), "{:?}", behind.qemu.args);
    host.detach(&owner("vm-a")).unwrap();
    let apart = attach(&host, &["0000:12:00.0", "0000:40:00.0"], "vm-b").unwrap();
    assert!(!has_clique(&apart), "{:?}", apart.qemu.args);
    host.detach(&owner("vm-b")).unwrap();
    let asked = host
        .attach(&AttachRequest {
            plan: PlanRequest {
                p2p_clique: true,
                ..req(&["0000:12:00.0", "0000:40:00.0"])
            },
            owner: owner("vm-c"),
            initrd: None,
        })
        .unwrap();
    assert!(has_clique(&asked), "{:?}", asked.qemu.args);
}

// ---------------------------------------------------------------- 9. devices without candidates

#[test]
fn a_host_without_candidates_says_so_and_how_many_devices_it_looked_at() {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:00:17.0", 0x8086, 0x7ae2, 0x010601)
            .driver("ahci")
            .group(5),
    )
    .add(
        FakeDevice::new("0000:03:00.0", 0x8086, 0x1533, 0x020000)
            .driver("igb")
            .group(6),
    );
    let l = h.host().listing(false, None).unwrap();
    assert!(l.devices.is_empty());
    assert_eq!(l.scanned, 2);
    let note = l.note.clone().unwrap();
    assert!(
        note.contains("no passthrough candidates among the 2 PCI devices"),
        "{note}"
    );
    assert!(l.to_string().contains(&note));
    let every = h.host().listing(true, None).unwrap();
    assert_eq!(
        (every.scanned, every.devices.len(), every.note),
        (2, 2, None)
    );
    let empty = FakeHost::new(true);
    let l = empty.host().listing(false, None).unwrap();
    assert_eq!(l.scanned, 0);
    assert!(l.note.unwrap().starts_with("no PCI devices in "));
}
