//! The journal across releases and reboots: an older format migrates forward, a newer one is
//! refused untouched, and an earlier boot's attachments are ended, never trusted.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use gpu_passthrough::attach::journal::{JOURNAL_VERSION, JournalError};
use gpu_passthrough::attach::{AttachError, AttachRequest, Host, Liveness, Owner, PlanRequest};
use gpu_passthrough::outcome::{Classify, Outcome};
use gpu_passthrough_tests::sysfs::{self, FakeHost, FixedLiveness};

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

fn attach(host: &Host, devs: &[&str], who: &str) -> Result<(), AttachError> {
    host.attach(&AttachRequest {
        plan: PlanRequest {
            devices: devs.iter().map(|d| d.parse().unwrap()).collect(),
            ..Default::default()
        },
        owner: owner(who),
        initrd: None,
    })
    .map(|_| ())
}

fn journal_path(h: &FakeHost) -> PathBuf {
    h.state.join("journal.json")
}

/// The journal as the release before boot IDs (format version 1) wrote it for `vm-1` holding
/// the workstation's RTX 4090 and its audio function.
const VERSION_1: &str = r#"{
  "version": 1,
  "transactions": [],
  "attachments": [
    {
      "owner": "vm-1",
      "devices": [
        {
          "device": "0000:01:00.0",
          "original_driver": "nvidia",
          "original_override": null,
          "adopted": false,
          "iommu_group": 12,
          "passed": true,
          "persistence_disabled": false,
          "original_d3cold": "1",
          "step": "verified"
        },
        {
          "device": "0000:01:00.1",
          "original_driver": "snd_hda_intel",
          "original_override": null,
          "adopted": false,
          "iommu_group": 12,
          "passed": true,
          "persistence_disabled": false,
          "original_d3cold": "1",
          "step": "verified"
        }
      ],
      "vgpus": []
    }
  ],
  "history": [
    {
      "owner": "vm-1",
      "devices": ["0000:01:00.0", "0000:01:00.1"],
      "gpus": ["0000:01:00.0"],
      "since": 1760000000,
      "until": null
    }
  ]
}
"#;

#[test]
fn a_version_1_journal_is_migrated_forward_keeping_every_record() {
    let h = sysfs::workstation();
    // The devices where version 1's attach left them, then its journal in place of ours.
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    fs::write(journal_path(&h), VERSION_1).unwrap();
    let state = h.host().journal().read().unwrap();
    assert_eq!(state.version, JOURNAL_VERSION);
    assert_eq!(state.attachments[0].boot_id, None, "its boot is unknown");
    // Saving (reconcile, which keeps the unknown owner) writes version 2 with nothing lost.
    let r = h.host().reconcile().unwrap();
    assert_eq!(r.kept_unknown, [owner("vm-1")], "{r:?}");
    assert!(
        r.ended_by_reboot.is_empty(),
        "an unknown boot is never ended"
    );
    let j = h.journal().unwrap();
    assert_eq!(j["version"], 2);
    let dev = &j["attachments"][0]["devices"][0];
    assert_eq!(dev["original_driver"], "nvidia");
    assert_eq!(dev["original_d3cold"], "1");
    assert_eq!(j["history"][0]["since"], 1760000000u64);
    // And the migrated record still gives the devices back.
    h.host().detach(&owner("vm-1")).unwrap();
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn a_newer_journal_is_refused_naming_both_versions_and_left_as_it_is() {
    let h = sysfs::workstation();
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    let mut newer: serde_json::Value = serde_json::from_str(VERSION_1).unwrap();
    newer["version"] = 99.into();
    newer["attachments"][0]["field_from_the_future"] = "kept".into();
    let bytes = serde_json::to_vec_pretty(&newer).unwrap();
    fs::write(journal_path(&h), &bytes).unwrap();
    let host = h.host();
    let e = host.reconcile().unwrap_err();
    assert!(
        matches!(
            e,
            AttachError::Journal(JournalError::Newer { found: 99, .. })
        ),
        "{e}"
    );
    assert_eq!(e.outcome(), Outcome::Refused);
    let text = e.to_string();
    assert!(
        text.contains("version 99") && text.contains("version 2") && text.contains("upgrade"),
        "{text}"
    );
    assert!(matches!(
        host.detach(&owner("vm-1")).unwrap_err(),
        AttachError::Journal(JournalError::Newer { .. })
    ));
    assert!(attach(&host, &["0000:03:00.0"], "vm-2").is_err());
    assert!(host.journal().read().is_err(), "not read either");
    assert_eq!(
        fs::read(journal_path(&h)).unwrap(),
        bytes,
        "nothing written"
    );
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

// ---------------------------------------------------------------- reboots

/// A proc root seeing the host, with this boot's ID.
fn proc_booted(h: &FakeHost, boot: &str) -> PathBuf {
    let root = h.dir.path().join("proc");
    fs::create_dir_all(root.join("self/ns")).unwrap();
    let _ = symlink(
        gpu_passthrough::pidns::INITIAL_PID_NS,
        root.join("self/ns/pid"),
    );
    fs::create_dir_all(root.join("sys/kernel/random")).unwrap();
    fs::write(root.join("sys/kernel/random/boot_id"), format!("{boot}\n")).unwrap();
    root
}

/// What a reboot does to `addr`: our binds and overrides are gone; the boot binds `driver`.
fn rebooted_onto(h: &FakeHost, addr: &str, driver: &str) {
    let dev = h.sys.join("bus/pci/devices").join(addr);
    let real = fs::canonicalize(&dev).unwrap();
    if let Ok(old) = fs::read_link(real.join("driver")) {
        let _ = fs::remove_file(old.join(addr));
        fs::remove_file(real.join("driver")).unwrap();
    }
    let ddir = h.sys.join("bus/pci/drivers").join(driver);
    symlink(&ddir, real.join("driver")).unwrap();
    let _ = symlink(&real, ddir.join(addr));
    fs::write(real.join("driver_override"), "(null)\n").unwrap();
}

fn alive(who: &str) -> Box<FixedLiveness> {
    Box::new(FixedLiveness(vec![(who.to_owned(), Liveness::Alive)]))
}

#[test]
fn after_a_reboot_reconcile_ends_the_earlier_boots_attachments_without_trusting_them() {
    let h = sysfs::workstation();
    let proc = proc_booted(&h, "boot-a");
    let host = |p: &Path| h.host_with(alive("vm-1")).with_proc_root(p);
    attach(&host(&proc), &["0000:01:00.0"], "vm-1").unwrap();
    assert_eq!(h.journal().unwrap()["attachments"][0]["boot_id"], "boot-a");
    // The same boot: an attachment whose owner is alive is kept.
    let r = host(&proc).reconcile().unwrap();
    assert!(
        r.ended_by_reboot.is_empty() && r.kept_alive == [owner("vm-1")],
        "{r:?}"
    );

    // Reboot: the GPU came back on nvidia; its audio function stayed on vfio-pci, as
    // `vfio-pci.ids=` would leave it. Its owner's name still answers "alive" (a new VM by the
    // same name, say): the boot alone ends the attachment.
    rebooted_onto(&h, "0000:01:00.0", "nvidia");
    let proc = proc_booted(&h, "boot-b");
    let r = host(&proc).reconcile().unwrap();
    assert_eq!(r.ended_by_reboot.len(), 1, "{r:?}");
    let ended = &r.ended_by_reboot[0];
    assert_eq!(ended.owner, owner("vm-1"));
    assert_eq!(ended.boot_id, "boot-a");
    let now: Vec<(String, Option<String>)> = ended
        .devices
        .iter()
        .map(|d| (d.device.to_string(), d.driver.clone()))
        .collect();
    assert_eq!(
        now,
        [
            ("0000:01:00.0".to_owned(), Some("nvidia".to_owned())),
            ("0000:01:00.1".to_owned(), Some("vfio-pci".to_owned())),
        ]
    );
    assert!(r.kept_alive.is_empty() && r.released.is_empty(), "{r:?}");
    // Nothing written on the old record's say-so: the audio function was not "restored" to
    // snd_hda_intel, and nothing is in the journal any more.
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
    assert!(!h.journal().unwrap()["history"][0]["until"].is_null());
    assert!(
        r.to_string().contains("boot-a"),
        "the text report names the boot: {r}"
    );
    // The GPU is free again for this boot.
    attach(&host(&proc), &["0000:01:00.0"], "vm-2").unwrap();
    assert_eq!(h.journal().unwrap()["attachments"][0]["boot_id"], "boot-b");
}

#[test]
fn an_interrupted_attach_of_an_earlier_boot_is_never_finished() {
    let h = sysfs::workstation();
    let proc = proc_booted(&h, "boot-a");
    let host = |p: &Path| h.host_with(alive("vm-1")).with_proc_root(p);
    attach(&host(&proc), &["0000:01:00.0"], "vm-1").unwrap();
    // Make it a verified transaction a crash left (reconcile would finish it in this boot).
    {
        let mut j = h.host().journal().lock().unwrap();
        let att = j.state.attachments.remove(0);
        j.state
            .transactions
            .push(gpu_passthrough::attach::journal::Transaction {
                owner: att.owner,
                pid: 1,
                owner_process: None,
                devices: att.devices,
                vgpus: Vec::new(),
                boot_id: att.boot_id,
                fabric_partition: None,
            });
        j.save().unwrap();
    }
    // After the reboot the devices are on vfio-pci by the host's own configuration.
    let proc = proc_booted(&h, "boot-b");
    let r = host(&proc).reconcile().unwrap();
    assert!(r.finished.is_empty(), "{r:?}");
    assert!(r.ended_by_reboot[0].transaction, "{r:?}");
    assert!(h.journal_clean());
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

// ---------------------------------------------------------------- the state dir

#[test]
fn the_state_dir_is_private_and_one_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let h = sysfs::workstation();
    attach(&h.host(), &["0000:01:00.0"], "vm-1").unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&h.state), 0o700, "created private");
    assert_eq!(mode(&journal_path(&h)), 0o600);
    assert_eq!(mode(&h.state.join("lock")), 0o600);
    // Someone made it world-writable: nothing is read or written until it is fixed.
    fs::set_permissions(&h.state, fs::Permissions::from_mode(0o777)).unwrap();
    let before = fs::read(journal_path(&h)).unwrap();
    let e = h.host().detach(&owner("vm-1")).unwrap_err();
    assert!(
        matches!(e, AttachError::Journal(JournalError::UnsafeStateDir { .. })),
        "{e}"
    );
    assert_eq!(e.outcome(), Outcome::Refused);
    assert!(e.to_string().contains("chmod 700"), "{e}");
    assert_eq!(fs::read(journal_path(&h)).unwrap(), before);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    fs::set_permissions(&h.state, fs::Permissions::from_mode(0o700)).unwrap();
    h.host().detach(&owner("vm-1")).unwrap();
}

#[test]
fn after_a_reboot_detach_never_releases_on_the_earlier_boots_record() {
    let h = sysfs::workstation();
    let proc = proc_booted(&h, "boot-a");
    attach(&h.host().with_proc_root(&proc), &["0000:01:00.0"], "vm-1").unwrap();
    // Rebooted with both functions on vfio-pci by `vfio-pci.ids=`; detach before any reconcile.
    let proc = proc_booted(&h, "boot-b");
    let e = h
        .host()
        .with_proc_root(&proc)
        .detach(&owner("vm-1"))
        .unwrap_err();
    assert!(matches!(e, AttachError::NotAttached(_)), "{e}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert!(h.journal_clean());
}
