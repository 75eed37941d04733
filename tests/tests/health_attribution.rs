//! Exact attribution of a VM's console faults (issue 23, point 2): the boot spec fixes where the
//! VM sees each device, the journal keeps that guest→host map per attachment, and `ingest` maps
//! through it: a fault at an address the VM did not have is counted and dropped, never spread
//! over its devices, and a fault stamped outside the attachment's lifetime does not count.
//! Whole GPUs, vendor-VFIO vGPUs (VFs) and mdev vGPUs alike.

use std::fs;
use std::path::{Path, PathBuf};

use gpu_passthrough::attach::{self, AttachRequest, Host, Owner, PlanRequest, VgpuAttachRequest};
use gpu_passthrough::health::{HealthStore, IngestReport};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough::vgpu::PlaceRequest;
use gpu_passthrough::vmm::BootSpec;
use gpu_passthrough_tests::sysfs::{self, FakeDevice, FakeHost};

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

const GPU1: &str = "0000:01:00.0";
const GPU2: &str = "0000:02:00.0";

fn two_gpus() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new(GPU1, 0x10de, 0x2684, 0x030000)
            .driver("nvidia")
            .group(1),
    )
    .add(
        FakeDevice::new(GPU2, 0x10de, 0x2684, 0x030000)
            .driver("nvidia")
            .group(2),
    );
    h
}

fn attach(host: &Host, devs: &[&str], who: &str) -> BootSpec {
    host.attach(&AttachRequest {
        plan: PlanRequest {
            devices: devs.iter().map(|d| a(d)).collect(),
            ..Default::default()
        },
        owner: owner(who),
        initrd: None,
    })
    .unwrap()
}

fn ingest(h: &FakeHost, dir: &Path, who: &str, console: &str) -> IngestReport {
    let path: PathBuf = dir.join(format!("{who}.log"));
    fs::write(&path, console).unwrap();
    attach::ingest_console(&h.state, &owner(who), &path).unwrap()
}

#[test]
fn the_boot_spec_fixes_guest_addresses_and_the_journal_keeps_the_map() {
    let h = two_gpus();
    let spec = attach(&h.host(), &[GPU1, GPU2], "vm-a");
    let map: Vec<(String, Option<String>)> = spec
        .guest_addresses
        .iter()
        .map(|g| (g.guest.to_string(), g.host.map(|h| h.to_string())))
        .collect();
    assert_eq!(
        map,
        [
            ("0000:00:10.0".to_owned(), Some(GPU1.to_owned())),
            ("0000:00:11.0".to_owned(), Some(GPU2.to_owned())),
        ]
    );
    assert!(
        spec.qemu
            .args
            .contains(&format!("vfio-pci,host={GPU2},bus=pcie.0,addr=0x11")),
        "{:?}",
        spec.qemu.args
    );
    assert!(
        spec.cloud_hypervisor
            .args
            .iter()
            .any(|arg| arg.contains(GPU2)
                && arg.ends_with("/,id=gpt1,pci_segment=0,pci_device_id=17")),
        "{:?}",
        spec.cloud_hypervisor.args
    );
    assert_eq!(
        spec.cloud_hypervisor.vm_config_devices[0].pci_device_id,
        Some(0x10)
    );
    let journal = h.journal().unwrap();
    let last = &journal["history"].as_array().unwrap().last().unwrap()["guest"];
    assert_eq!(
        *last,
        serde_json::json!([
            {"guest": "0000:00:10.0", "host": GPU1},
            {"guest": "0000:00:11.0", "host": GPU2}
        ]),
        "{journal}"
    );
}

#[test]
fn a_fault_is_charged_to_exactly_the_device_at_its_guest_address() {
    let h = two_gpus();
    let host = h.host();
    attach(&host, &[GPU1, GPU2], "vm-a");
    host.detach(&owner("vm-a")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = ingest(
        &h,
        dir.path(),
        "vm-a",
        "[  9.0] NVRM: Xid (PCI:0000:00:11): 79, pid=9, GPU has fallen off the bus.\n\
         [  9.5] NVRM: Xid (PCI:0000:00:07): 79, pid=9, GPU has fallen off the bus.\n\
         GPU-XID {\"address\":\"0000:00:12.0\",\"kind\":\"xid\",\"xid\":48,\"message\":\"DBE\",\"action\":\"reset_gpu\"}\n",
    );
    let charged: Vec<PciAddress> = report.recorded.iter().map(|e| e.device).collect();
    assert_eq!(charged, [a(GPU2)], "{report:?}");
    assert_eq!(report.unmapped, 2, "00:07 and 00:12 are not the VM's");
    let records = HealthStore::new(&h.state).records().unwrap();
    assert!(records.iter().all(|r| r.device != a(GPU1)), "{records:?}");
}

/// `SECS` (Unix) as RFC 3339 UTC, as `dmesg --time-format iso` stamps a line.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02},000000+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn faults_stamped_outside_the_attachment_do_not_count() {
    let h = two_gpus();
    let host = h.host();
    attach(&host, &[GPU1], "vm-a");
    host.detach(&owner("vm-a")).unwrap();
    let journal = h.journal().unwrap();
    let hold = journal["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let (since, until) = (
        hold["since"].as_u64().unwrap(),
        hold["until"].as_u64().unwrap(),
    );
    let line = |stamp: String, pid: u32| {
        format!("{stamp} NVRM: Xid (PCI:0000:00:10): 79, pid={pid}, GPU has fallen off the bus.\n")
    };
    let console = [
        line(rfc3339(since - 3600), 1),
        line(rfc3339(since), 2),
        line(rfc3339(until), 3),
        line(rfc3339(until + 3600), 4),
        line("[  9.0]".into(), 5),
    ]
    .concat();
    let report = ingest(&h, tempfile::tempdir().unwrap().path(), "vm-a", &console);
    let mut pids: Vec<String> = report
        .recorded
        .iter()
        .map(|e| e.fault.message.split(',').next().unwrap().to_owned())
        .collect();
    pids.sort();
    assert_eq!(pids, ["pid=2", "pid=3", "pid=5"], "{report:?}");
    assert_eq!(report.scan.outside_lifetime, 2, "{:?}", report.scan);
}

fn attach_vgpu(h: &FakeHost, profile: &str, who: &str) -> BootSpec {
    h.host()
        .attach_vgpu(&VgpuAttachRequest {
            place: PlaceRequest {
                profile: profile.into(),
                count: 1,
                numa: None,
                pack: false,
            },
            owner: owner(who),
            initrd: None,
        })
        .unwrap()
}

const WRONG_AND_RIGHT: &str = "[  8.0] NVRM: Xid (PCI:0000:00:07): 79, pid=8, GPU has fallen off the bus.\n\
     [  9.0] NVRM: Xid (PCI:0000:00:10): 79, pid=9, GPU has fallen off the bus.\n";

#[test]
fn a_vf_vgpu_gets_only_the_faults_at_its_guest_address() {
    let h = sysfs::l40s_host();
    let spec = attach_vgpu(&h, "L40S-24Q", "vm-1");
    let vf = spec.devices[0].address.unwrap();
    assert_eq!(spec.guest_addresses[0].host, Some(vf));
    let report = ingest(
        &h,
        tempfile::tempdir().unwrap().path(),
        "vm-1",
        WRONG_AND_RIGHT,
    );
    let charged: Vec<(PciAddress, Option<String>)> = report
        .recorded
        .iter()
        .map(|e| (e.device, e.mdev.clone()))
        .collect();
    assert_eq!(charged, [(vf, None)], "{report:?}");
    assert_eq!(report.unmapped, 1);
}

#[test]
fn an_mdev_vgpu_gets_only_the_faults_at_its_guest_address() {
    let h = sysfs::vgpu_host();
    let spec = attach_vgpu(&h, "A16-4Q", "vm-a");
    let uuid = spec.devices[0].mdev_uuid.clone().unwrap();
    assert_eq!(spec.guest_addresses[0].mdev.as_ref(), Some(&uuid));
    let report = ingest(
        &h,
        tempfile::tempdir().unwrap().path(),
        "vm-a",
        WRONG_AND_RIGHT,
    );
    let charged: Vec<(PciAddress, Option<String>)> = report
        .recorded
        .iter()
        .map(|e| (e.device, e.mdev.clone()))
        .collect();
    assert_eq!(charged, [(a("0000:3d:00.0"), Some(uuid))], "{report:?}");
    assert_eq!(report.unmapped, 1);
}
