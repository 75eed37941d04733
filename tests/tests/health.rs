//! Health between tenants on fake sysfs trees: reset methods, verification after detach, health
//! records, quarantine and placement (library API).

use std::fs;

use gpu_passthrough::attach::{
    self, AttachError, AttachRequest, Host, Owner, PlanRequest, RefusalReason, ResetOutcome,
};
use gpu_passthrough::health::{self, FaultKind, HealthError, HealthStore};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough::simulation::SIM_RESET_LOG;
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

const GPU1: &str = "0000:01:00.0";
const GPU2: &str = "0000:02:00.0";

/// Two NVIDIA GPUs on `nvidia`, each alone in its group and on its own bus.
fn two_gpus(reset1: &str) -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new(GPU1, 0x10de, 0x2684, 0x030000)
            .driver("nvidia")
            .group(1)
            .reset_method(reset1),
    )
    .add(
        FakeDevice::new(GPU2, 0x10de, 0x2684, 0x030000)
            .driver("nvidia")
            .group(2),
    );
    h
}

fn attach(host: &Host, devs: &[&str], who: &str) -> Result<(), AttachError> {
    host.attach(&AttachRequest {
        plan: PlanRequest {
            devices: devs.iter().map(|d| a(d)).collect(),
            ..Default::default()
        },
        owner: owner(who),
        initrd: None,
    })
    .map(|_| ())
}

fn attach_gpus(host: &Host, n: usize, who: &str) -> Result<Vec<PciAddress>, AttachError> {
    let spec = host.attach(&AttachRequest {
        plan: PlanRequest {
            gpus: Some(n),
            ..Default::default()
        },
        owner: owner(who),
        initrd: None,
    })?;
    Ok(spec.devices.iter().filter_map(|d| d.address).collect())
}

fn dev_file(h: &FakeHost, addr: &str, name: &str) -> std::path::PathBuf {
    h.sys.join("bus/pci/devices").join(addr).join(name)
}

/// Make the device answer config reads with 0xffff, as one that fell off the bus does.
fn fall_off_the_bus(h: &FakeHost, addr: &str) {
    fs::write(dev_file(h, addr, "config"), [0xffu8; 64]).unwrap();
}

fn back_on_the_bus(h: &FakeHost, addr: &str) {
    let mut cfg = vec![0u8; 64];
    cfg[..4].copy_from_slice(&[0xde, 0x10, 0x84, 0x26]);
    fs::write(dev_file(h, addr, "config"), cfg).unwrap();
}

#[test]
fn detach_resets_with_flr_verifies_and_restores_d3cold() {
    let h = two_gpus("flr bus");
    let host = h.host();
    attach(&host, &[GPU1], "vm-1").unwrap();
    assert_eq!(
        fs::read_to_string(dev_file(&h, GPU1, "d3cold_allowed")).unwrap(),
        "0\n",
        "kept out of D3cold while attached"
    );
    let report = host.detach(&owner("vm-1")).unwrap();
    let check = report.restored[0].health.as_ref().expect("health check");
    let reset = check.reset.as_ref().expect("a reset");
    assert_eq!(reset.outcome, ResetOutcome::Done);
    assert_eq!(reset.method.as_deref(), Some("flr"));
    assert_eq!(reset.methods, ["flr", "bus"]);
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    assert_eq!(
        (check.verify.vendor_id, check.verify.device_id),
        (Some(0x10de), Some(0x2684))
    );
    assert_eq!(check.verify.driver.as_deref(), Some("nvidia"));
    assert!(check.events.is_empty());
    assert_eq!(
        fs::read_to_string(dev_file(&h, GPU1, SIM_RESET_LOG)).unwrap(),
        "flr\n"
    );
    assert_eq!(
        fs::read_to_string(dev_file(&h, GPU1, "d3cold_allowed")).unwrap(),
        "1\n"
    );
    assert!(HealthStore::new(&h.state).records().unwrap().is_empty());
}

#[test]
fn a_device_without_reset_method_is_verified_without_one() {
    let h = two_gpus("");
    let host = h.host();
    attach(&host, &[GPU1], "vm-1").unwrap();
    let report = host.detach(&owner("vm-1")).unwrap();
    let check = report.restored[0].health.as_ref().unwrap();
    let reset = check.reset.as_ref().unwrap();
    assert_eq!(reset.outcome, ResetOutcome::NoMethod);
    assert_eq!(reset.method, None);
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    assert!(
        !dev_file(&h, GPU1, SIM_RESET_LOG).exists(),
        "no reset written"
    );
}

#[test]
fn bus_reset_is_refused_while_a_sibling_on_the_bus_is_in_use() {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:05:00.0", 0x10de, 0x1e04, 0x030000)
            .driver("nvidia")
            .group(5)
            .reset_method("bus"),
    )
    .add(
        FakeDevice::new("0000:05:00.1", 0x10de, 0x10f7, 0x040300)
            .driver("snd_hda_intel")
            .group(5),
    )
    .add(
        FakeDevice::new("0000:06:00.0", 0x10de, 0x1e04, 0x030000)
            .driver("nvidia")
            .group(6)
            .reset_method("bus"),
    )
    .add(
        FakeDevice::new("0000:06:00.1", 0x10de, 0x10f7, 0x040300)
            .driver("snd_hda_intel")
            .group(6),
    );
    let host = h.host();
    let err = host.reset(a("0000:05:00.0")).unwrap_err();
    assert!(matches!(err, AttachError::ResetRefused { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("0000:05:00.1") && msg.contains("snd_hda_intel"),
        "{msg}"
    );
    assert!(!dev_file(&h, "0000:05:00.0", SIM_RESET_LOG).exists());
    // With PM offered too, the bus is left out and PM used; the method list comes back.
    fs::write(dev_file(&h, "0000:06:00.0", "reset_method"), "bus pm\n").unwrap();
    let check = host.reset(a("0000:06:00.0")).unwrap();
    let reset = check.reset.unwrap();
    assert_eq!(reset.method.as_deref(), Some("pm"));
    assert_eq!(
        fs::read_to_string(dev_file(&h, "0000:06:00.0", SIM_RESET_LOG)).unwrap(),
        "pm\n"
    );
    assert_eq!(
        fs::read_to_string(dev_file(&h, "0000:06:00.0", "reset_method")).unwrap(),
        "bus pm\n"
    );
    assert!(check.verify.ok, "{:?}", check.verify.problems);
    // Once the sibling is off its host driver, the bus reset is allowed.
    fs::remove_file(dev_file(&h, "0000:05:00.1", "driver")).unwrap();
    let reset = host.reset(a("0000:05:00.0")).unwrap().reset.unwrap();
    assert_eq!(reset.method.as_deref(), Some("bus"));
}

#[test]
fn on_demand_reset_leaves_vfio_devices_to_vfio_and_refuses_attached_ones() {
    let h = two_gpus("flr");
    let host = h.host();
    attach(&host, &[GPU1], "vm-1").unwrap();
    let err = host.reset(a(GPU1)).unwrap_err().to_string();
    assert!(err.contains("vm-1") && err.contains("detach"), "{err}");
    host.detach(&owner("vm-1")).unwrap();
    // Unowned on vfio-pci (e.g. bound by hand): VFIO resets it on open/release.
    fs::remove_file(dev_file(&h, GPU2, "driver")).unwrap();
    std::os::unix::fs::symlink(
        h.sys.join("bus/pci/drivers/vfio-pci"),
        dev_file(&h, GPU2, "driver"),
    )
    .unwrap();
    let check = host.reset(a(GPU2)).unwrap();
    let reset = check.reset.unwrap();
    assert_eq!(reset.outcome, ResetOutcome::ByVfio);
    assert!(!dev_file(&h, GPU2, SIM_RESET_LOG).exists());
}

#[test]
fn a_failed_reset_is_a_health_event() {
    let h = two_gpus("flr");
    let host = h.host();
    attach(&host, &[GPU1], "vm-1").unwrap();
    h.inject("fail-once reset");
    let report = host.detach(&owner("vm-1")).unwrap();
    let check = report.restored[0].health.as_ref().unwrap();
    assert_eq!(check.reset.as_ref().unwrap().outcome, ResetOutcome::Failed);
    assert_eq!(check.events.len(), 1);
    assert_eq!(check.events[0].fault.kind, FaultKind::ResetFailed);
    assert_eq!(check.events[0].owner, Some(owner("vm-1")));
    assert_eq!(
        h.driver(GPU1).as_deref(),
        Some("nvidia"),
        "still given back"
    );
}

#[test]
fn verification_failure_after_detach_is_recorded_for_the_owner() {
    let h = two_gpus("flr");
    let host = h.host();
    attach(&host, &[GPU1], "vm-1").unwrap();
    fall_off_the_bus(&h, GPU1);
    let report = host.detach(&owner("vm-1")).unwrap();
    let check = report.restored[0].health.as_ref().unwrap();
    assert!(!check.verify.ok);
    assert_eq!(check.verify.vendor_id, Some(0xffff));
    assert!(
        check.verify.problems[0].contains("0xffff"),
        "{:?}",
        check.verify.problems
    );
    let records = HealthStore::new(&h.state).records().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].device, a(GPU1));
    assert_eq!(records[0].events[0].fault.kind, FaultKind::VerifyFailed);
    assert_eq!(records[0].events[0].owner, Some(owner("vm-1")));
    assert!(records[0].quarantine.is_none(), "one owner is not enough");

    // The nvidia driver not taking the GPU back is a failure too.
    back_on_the_bus(&h, GPU2);
    attach(&host, &[GPU2], "vm-2").unwrap();
    h.inject("nvidia-no-gpu");
    let report = host.detach(&owner("vm-2")).unwrap();
    let v = &report.restored[0].health.as_ref().unwrap().verify;
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("nvidia driver did not take it")),
        "{:?}",
        v.problems
    );
}

#[test]
fn two_owners_quarantine_a_device_and_attach_names_the_events_until_cleared() {
    let h = two_gpus("flr");
    let host = h.host();
    for who in ["vm-1", "vm-2"] {
        attach(&host, &[GPU1], who).unwrap();
        fall_off_the_bus(&h, GPU1);
        host.detach(&owner(who)).unwrap();
        back_on_the_bus(&h, GPU1);
    }
    let q = health::is_quarantined(&h.state, a(GPU1))
        .unwrap()
        .expect("quarantined");
    assert_eq!(q.owners, [Some(owner("vm-1")), Some(owner("vm-2"))]);
    let err = attach(&host, &[GPU1], "vm-3").unwrap_err();
    let AttachError::Refused(refusals) = &err else {
        panic!("{err}")
    };
    assert_eq!(refusals[0].reason, RefusalReason::Quarantined);
    let msg = err.to_string();
    assert!(
        msg.contains("quarantined") && msg.contains("vm-1: verify_failed") && msg.contains("vm-2"),
        "{msg}"
    );
    assert_eq!(h.driver(GPU1).as_deref(), Some("nvidia"), "nothing moved");
    let listed = host.devices(false, None).unwrap();
    let d = listed.iter().find(|d| d.device.address == a(GPU1)).unwrap();
    assert!(!d.ready && d.not_ready_because[0].contains("quarantined"));
    // After a repair, clearing the record puts it back in service.
    let cleared = HealthStore::new(&h.state).clear(a(GPU1)).unwrap();
    assert!(cleared.was_quarantined && cleared.removed == 2);
    attach(&host, &[GPU1], "vm-3").unwrap();
}

#[test]
fn ingested_consoles_quarantine_and_gpus_n_skips_the_device() {
    let h = two_gpus("flr");
    let host = h.host();
    let dir = tempfile::tempdir().unwrap();
    for who in ["vm-a", "vm-b"] {
        assert_eq!(attach_gpus(&host, 1, who).unwrap(), [a(GPU1)]);
        host.detach(&owner(who)).unwrap();
        // The guest sees its GPU where the boot spec put it (00:10.0): mapped to that GPU.
        let console = dir.path().join(format!("{who}.log"));
        fs::write(
            &console,
            "[  1.0] NVRM: Xid (PCI:0000:00:10): 13, pid=9, Graphics Exception\n\
             [  9.0] NVRM: Xid (PCI:0000:00:10): 79, pid=9, GPU has fallen off the bus.\n",
        )
        .unwrap();
        let report = attach::ingest_console(&h.state, &owner(who), &console).unwrap();
        assert_eq!(report.faults.len(), 2);
        assert_eq!(
            report.recorded.len(),
            1,
            "application faults are not recorded"
        );
        assert_eq!(report.recorded[0].device, a(GPU1));
        assert_eq!(report.recorded[0].fault.xid, Some(79));
        // Ingesting the same log again adds nothing.
        assert!(
            attach::ingest_console(&h.state, &owner(who), &console)
                .unwrap()
                .recorded
                .is_empty()
        );
    }
    assert!(health::is_quarantined(&h.state, a(GPU1)).unwrap().is_some());
    assert_eq!(attach_gpus(&host, 1, "vm-c").unwrap(), [a(GPU2)]);
    host.detach(&owner("vm-c")).unwrap();
    let err = attach_gpus(&host, 2, "vm-d").unwrap_err();
    assert!(
        matches!(err, AttachError::NotEnoughGpus { free: 1, .. }),
        "{err}"
    );
    // An owner that never held anything has no devices to map to.
    let e =
        attach::ingest_console(&h.state, &owner("vm-z"), &dir.path().join("vm-a.log")).unwrap_err();
    assert!(
        matches!(e, AttachError::Health(HealthError::NoHistory(_))),
        "{e}"
    );
}

#[test]
fn an_unreadable_health_record_fails_closed() {
    let h = two_gpus("flr");
    let host = h.host();
    fs::create_dir_all(&h.state).unwrap();
    fs::write(h.state.join("health.json"), "{ not json").unwrap();
    assert!(matches!(
        health::is_quarantined(&h.state, a(GPU1)),
        Err(HealthError::Corrupt { .. })
    ));
    let err = attach(&host, &[GPU1], "vm-1").unwrap_err();
    let AttachError::Refused(r) = &err else {
        panic!("{err}")
    };
    assert_eq!(r[0].reason, RefusalReason::HealthUnknown);
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(matches!(
        attach_gpus(&host, 1, "vm-1"),
        Err(AttachError::NotEnoughGpus { free: 0, .. })
    ));
    assert_eq!(h.driver(GPU1).as_deref(), Some("nvidia"));
    // A newer format is named as such.
    fs::write(
        h.state.join("health.json"),
        r#"{"version": 99, "devices": {}}"#,
    )
    .unwrap();
    let e = health::is_quarantined(&h.state, a(GPU1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("version 99"), "{e}");
}

#[test]
fn a_failure_that_cannot_be_recorded_keeps_the_device_out_of_service() {
    let h = two_gpus("flr");
    let host = h.host();
    attach(&host, &[GPU1], "vm-1").unwrap();
    fall_off_the_bus(&h, GPU1);
    // The record cannot be written (a directory where the file should be).
    fs::create_dir_all(h.state.join("health.json")).unwrap();
    let err = host.detach(&owner("vm-1")).unwrap_err();
    assert!(matches!(err, AttachError::Health(_)), "{err}");
    let journal = h.journal().unwrap();
    assert_eq!(
        journal["attachments"][0]["devices"][0]["device"], GPU1,
        "still held by its owner, so nobody is handed it"
    );
    // Fixed: detach again records the event and releases it.
    fs::remove_dir(h.state.join("health.json")).unwrap();
    let report = host.detach(&owner("vm-1")).unwrap();
    let check = report.restored[0].health.as_ref().unwrap();
    assert_eq!(check.events.len(), 1);
    assert!(h.journal_clean());
    // The rerun found it back on nvidia and did not reset it from under that driver.
    assert_eq!(
        check.reset.as_ref().unwrap().outcome,
        ResetOutcome::AlreadyReturned
    );
    assert_eq!(
        fs::read_to_string(dev_file(&h, GPU1, SIM_RESET_LOG)).unwrap(),
        "flr\n",
        "reset once, by the first detach"
    );
}

#[test]
fn vgpu_placement_refuses_a_quarantined_parent() {
    use gpu_passthrough::health::{Action, EventSource, Fault, HealthEvent};
    let h = gpu_passthrough_tests::sysfs::vgpu_host();
    let parent = a("0000:3d:00.0");
    let fault = Fault {
        address: Some(parent.to_string()),
        kind: FaultKind::Xid,
        xid: Some(48),
        message: "DBE (double bit error)".into(),
        action: Action::ResetGpu,
    };
    let events: Vec<HealthEvent> = ["vm-1", "vm-2"]
        .iter()
        .map(|o| HealthEvent::now(parent, Some(owner(o)), EventSource::Console, fault.clone()))
        .collect();
    HealthStore::new(&h.state).record(&events).unwrap();
    let err = h
        .host()
        .attach(&AttachRequest {
            plan: PlanRequest {
                devices: vec![parent],
                mdev_type: Some("nvidia-735".into()),
                ..Default::default()
            },
            owner: owner("vm-3"),
            initrd: None,
        })
        .unwrap_err();
    let AttachError::Refused(r) = &err else {
        panic!("{err}")
    };
    assert_eq!(r[0].reason, RefusalReason::Quarantined);
    assert!(err.to_string().contains("vm-2: xid 48"), "{err}");
}

#[test]
fn the_device_plugin_seam_reads_the_health_records_and_fails_closed() {
    use gpu_passthrough_device_plugin::{HealthRecords, Quarantine};
    let h = two_gpus("flr");
    let q = HealthRecords {
        state_dir: h.state.clone(),
    };
    assert!(!q.is_quarantined(a(GPU1)), "no record: in service");
    let host = h.host();
    for who in ["vm-1", "vm-2"] {
        attach(&host, &[GPU1], who).unwrap();
        fall_off_the_bus(&h, GPU1);
        host.detach(&owner(who)).unwrap();
        back_on_the_bus(&h, GPU1);
    }
    assert!(q.is_quarantined(a(GPU1)));
    assert!(!q.is_quarantined(a(GPU2)));
    fs::write(h.state.join("health.json"), "garbage").unwrap();
    assert!(
        q.is_quarantined(a(GPU2)),
        "an unreadable record fails closed"
    );
}

/// A control plane's own health source: attach asks it instead of the health records.
#[test]
fn attach_asks_the_hosts_quarantine_check() {
    struct Gpu1Broken;
    impl gpu_passthrough::quarantine::QuarantineCheck for Gpu1Broken {
        fn is_quarantined(&self, device: PciAddress) -> bool {
            device == a(GPU1)
        }
    }
    let h = two_gpus("flr");
    let host = h.host().with_quarantine(Box::new(Gpu1Broken));
    let err = attach(&host, &[GPU1], "vm-1").unwrap_err();
    let AttachError::Refused(r) = &err else {
        panic!("{err}")
    };
    assert_eq!(r[0].reason, RefusalReason::Quarantined, "{err}");
    assert_eq!(attach_gpus(&host, 1, "vm-2").unwrap(), [a(GPU2)]);
}
