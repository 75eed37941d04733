//! The guest's word starts a check, the host's check decides (issue #23, point 4): consoles
//! make a device suspect; the host's own check (config space, BAR0 through `resource0`, link
//! width, AER counters against attach) returns it to service or quarantines it. Fake sysfs.

use std::fs;
use std::path::PathBuf;

use gpu_passthrough::attach::{self, AttachError, AttachRequest, Host, Owner, PlanRequest};
use gpu_passthrough::health::{self, HealthStore};
use gpu_passthrough::outcome::{Outcome, ReportOutcome};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};

const GPU: &str = "0000:01:00.0";
/// An AD102's `PMC_BOOT_0`, as BAR0's first register reads.
const BOOT_0: u32 = 0x192000a1;

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

fn file(h: &FakeHost, name: &str) -> PathBuf {
    h.sys.join("bus/pci/devices").join(GPU).join(name)
}

fn aer(h: &FakeHost, fatal: u64, nonfatal: u64) {
    fs::write(
        file(h, "aer_dev_fatal"),
        format!("Undefined 0\nDLP 0\nSDES 0\nTOTAL_ERR_FATAL {fatal}\n"),
    )
    .unwrap();
    fs::write(
        file(h, "aer_dev_nonfatal"),
        format!("Undefined 0\nCmpltTO {nonfatal}\nTOTAL_ERR_NONFATAL {nonfatal}\n"),
    )
    .unwrap();
}

fn bar0(h: &FakeHost, value: u32) {
    let mut page = vec![0u8; 4096];
    page[..4].copy_from_slice(&value.to_le_bytes());
    fs::write(file(h, "resource0"), page).unwrap();
}

/// One healthy GPU on `nvidia` with what the host check reads.
fn gpu() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new(GPU, 0x10de, 0x2684, 0x030000)
            .driver("nvidia")
            .group(1)
            .reset_method("flr"),
    );
    bar0(&h, BOOT_0);
    aer(&h, 0, 0);
    fs::write(file(&h, "current_link_width"), "16\n").unwrap();
    fs::write(file(&h, "max_link_width"), "16\n").unwrap();
    h
}

fn attach(host: &Host, who: &str) -> Result<(), AttachError> {
    host.attach(&AttachRequest {
        plan: PlanRequest {
            devices: vec![a(GPU)],
            ..Default::default()
        },
        owner: owner(who),
        initrd: None,
    })
    .map(|_| ())
}

/// `who`'s console reports the GPU fallen off the bus.
fn ingest(h: &FakeHost, who: &str) {
    let console = h.dir.path().join(format!("{who}.log"));
    fs::write(
        &console,
        "[  9.0] NVRM: Xid (PCI:0000:00:10): 79, pid=9, GPU has fallen off the bus.\n",
    )
    .unwrap();
    attach::ingest_console(&h.state, &owner(who), &console).unwrap();
}

/// Two tenants' consoles blamed the GPU: suspect, out of service.
fn suspect(h: &FakeHost) -> Host {
    let host = h.host();
    for who in ["vm-a", "vm-b"] {
        attach(&host, who).unwrap();
        host.detach(&owner(who)).unwrap();
        ingest(h, who);
    }
    let q = health::is_quarantined(&h.state, a(GPU))
        .unwrap()
        .expect("out of service");
    assert!(q.suspect, "guests alone make it suspect: {q:?}");
    let err = attach(&host, "vm-c").unwrap_err().to_string();
    assert!(err.contains("suspect"), "{err}");
    host
}

#[test]
fn a_suspect_device_that_passes_the_host_check_returns_to_service_with_the_evidence() {
    let h = gpu();
    let host = suspect(&h);
    let check = host.check_device(a(GPU)).unwrap();
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    assert_eq!(check.verify.bar0, Some(BOOT_0), "read through resource0");
    assert_eq!(check.verify.link_width, Some((16, 16)));
    assert!(check.was_suspect && check.quarantine.is_none(), "{check:?}");
    assert_eq!(check.outcome(), None);
    assert!(check.to_string().contains("back in service"), "{check}");
    assert_eq!(health::is_quarantined(&h.state, a(GPU)).unwrap(), None);
    // The evidence stays: the guests' events, marked checked, and the check's readings.
    let record = HealthStore::new(&h.state).records().unwrap().remove(0);
    assert_eq!(record.events.len(), 2);
    assert!(record.events.iter().all(|e| e.checked.is_some()));
    let last = record.last_check.clone().expect("the check is recorded");
    assert!(last.passed && last.was_suspect);
    assert!(
        last.readings.iter().any(|r| r == "bar0=0x192000a1"),
        "{:?}",
        last.readings
    );
    let listed = record.to_string();
    assert!(
        listed.contains("host check passed: id=10de:2684 bar0=0x192000a1 link=x16/x16"),
        "{listed}"
    );
    attach(&host, "vm-c").unwrap();
}

#[test]
fn a_suspect_device_whose_bar0_reads_all_ones_is_quarantined() {
    let h = gpu();
    let host = suspect(&h);
    bar0(&h, u32::MAX);
    let check = host.check_device(a(GPU)).unwrap();
    assert!(!check.verify.ok);
    assert!(
        check.verify.problems[0].contains("BAR0") && check.verify.problems[0].contains("all-ones"),
        "{:?}",
        check.verify.problems
    );
    assert_eq!(check.outcome(), Some(Outcome::VerificationFailed));
    let q = check.quarantine.clone().expect("quarantined");
    assert!(!q.suspect, "the host's own evidence quarantines");
    assert!(check.to_string().contains("HOST CHECK FAILED"), "{check}");
    // A later pass does not lift a quarantine: only clearing the record after a repair does.
    bar0(&h, BOOT_0);
    assert!(host.check_device(a(GPU)).unwrap().quarantine.is_some());
    assert!(health::is_quarantined(&h.state, a(GPU)).unwrap().is_some());
    HealthStore::new(&h.state).clear(a(GPU)).unwrap();
    attach(&host, "vm-c").unwrap();
    // An attached device is its VM's: the check waits for detach.
    let err = host.check_device(a(GPU)).unwrap_err();
    assert!(matches!(err, AttachError::CheckRefused { .. }), "{err}");
}

#[test]
fn the_check_at_detach_decides_a_suspect_device() {
    let h = gpu();
    let host = h.host();
    attach(&host, "vm-a").unwrap();
    host.detach(&owner("vm-a")).unwrap();
    ingest(&h, "vm-a");
    attach(&host, "vm-b").unwrap();
    // Its console is read while it runs: the second owner's word makes the GPU suspect.
    ingest(&h, "vm-b");
    assert!(
        health::is_quarantined(&h.state, a(GPU))
            .unwrap()
            .is_some_and(|q| q.suspect)
    );
    let report = host.detach(&owner("vm-b")).unwrap();
    assert!(report.restored[0].health.as_ref().unwrap().verify.ok);
    assert_eq!(health::is_quarantined(&h.state, a(GPU)).unwrap(), None);
    let record = HealthStore::new(&h.state).records().unwrap().remove(0);
    assert!(record.last_check.unwrap().was_suspect);
}

#[test]
fn detach_fails_the_check_when_aer_counters_moved_or_the_link_narrowed() {
    let h = gpu();
    let host = h.host();
    attach(&host, "vm-1").unwrap();
    aer(&h, 0, 2);
    fs::write(file(&h, "current_link_width"), "8\n").unwrap();
    let report = host.detach(&owner("vm-1")).unwrap();
    let v = &report.restored[0].health.as_ref().unwrap().verify;
    assert!(!v.ok);
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("2 non-fatal AER errors during the attachment")),
        "{:?}",
        v.problems
    );
    assert!(
        v.problems.iter().any(|p| p.contains("x8 of x16")),
        "{:?}",
        v.problems
    );
    assert_eq!(v.aer, Some((0, 2)));
}

/// BAR0 is read only where its first register is an identity register: a display whose BAR0
/// is its framebuffer (white pixels read all-ones) is not judged by it.
#[test]
fn bar0_is_read_only_where_it_starts_with_an_identity_register() {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:00:02.0", 0x1234, 0x1111, 0x030000)
            .driver("bochs-drm")
            .group(2),
    );
    let fb = h.sys.join("bus/pci/devices/0000:00:02.0/resource0");
    fs::write(&fb, [0xffu8; 4096]).unwrap();
    let check = h.host().check_device(a("0000:00:02.0")).unwrap();
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    assert_eq!(check.verify.bar0, None, "not read");
}

/// Without a baseline from attach, a link narrower than the device's maximum (a slot wired x8)
/// is read, not judged.
#[test]
fn a_link_narrower_than_its_maximum_is_judged_only_against_attach() {
    let h = gpu();
    fs::write(file(&h, "current_link_width"), "8\n").unwrap();
    let check = h.host().check_device(a(GPU)).unwrap();
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    assert_eq!(check.verify.link_width, Some((8, 16)));
}

/// A GPU asleep (runtime-suspended) reads all-ones without being broken: BAR0 is not read.
#[test]
fn bar0_is_not_read_while_the_device_sleeps() {
    let h = gpu();
    bar0(&h, u32::MAX);
    fs::create_dir_all(file(&h, "power")).unwrap();
    fs::write(file(&h, "power/runtime_status"), "suspended\n").unwrap();
    let check = h.host().check_device(a(GPU)).unwrap();
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    assert_eq!(check.verify.bar0, None);
    fs::write(file(&h, "power/runtime_status"), "active\n").unwrap();
    assert!(
        !h.host().check_device(a(GPU)).unwrap().verify.ok,
        "awake: read and judged"
    );
}
