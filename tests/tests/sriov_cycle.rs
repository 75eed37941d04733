//! The SR-IOV cycle (issue 23, point 5): `reset` of a PF with VFs recovers a wedged vGPU by
//! writing `sriov_numvfs` 0 and back, journaled first, only while every VF is free; otherwise
//! it is refused naming each VF's holder. A cycle cut short is finished by reconcile.

use std::fs;
use std::path::PathBuf;

use gpu_passthrough::attach::{AttachError, ResetOutcome};
use gpu_passthrough::simulation::SIM_SRIOV_LOG;
use gpu_passthrough_tests::sysfs::{self, FakeHost};

/// L40S PFs of `sysfs::l40s_host`: 61:00.0's four VFs are free, 41:00.0's first two carry
/// vGPU type 1150 (made by someone).
const FREE_PF: &str = "0000:61:00.0";
const BUSY_PF: &str = "0000:41:00.0";

fn pf_file(h: &FakeHost, pf: &str, name: &str) -> PathBuf {
    h.sys.join("bus/pci/devices").join(pf).join(name)
}

/// `sysfs::l40s_host` with each PF's `sriov_numvfs` as the kernel shows it (4 VFs).
fn host() -> FakeHost {
    let h = sysfs::l40s_host();
    for pf in [FREE_PF, BUSY_PF] {
        fs::write(pf_file(&h, pf, "sriov_numvfs"), "4\n").unwrap();
    }
    h
}

fn numvfs(h: &FakeHost, pf: &str) -> String {
    fs::read_to_string(pf_file(h, pf, "sriov_numvfs"))
        .unwrap()
        .trim()
        .to_owned()
}

fn writes(h: &FakeHost, pf: &str) -> String {
    fs::read_to_string(pf_file(h, pf, SIM_SRIOV_LOG)).unwrap_or_default()
}

#[test]
fn a_pf_whose_vfs_are_all_free_is_sriov_cycled_and_verified() {
    let h = host();
    let report = h.host().reset(FREE_PF.parse().unwrap()).unwrap();
    let reset = report.reset.as_ref().unwrap();
    assert_eq!(reset.method.as_deref(), Some("sriov-cycle"), "{report:?}");
    assert_eq!(reset.outcome, ResetOutcome::Done, "{report:?}");
    assert_eq!(writes(&h, FREE_PF), "0\n4\n", "to 0, then back");
    assert_eq!(numvfs(&h, FREE_PF), "4");
    assert!(report.events.is_empty(), "{report:?}");
    let journal = h.journal().unwrap();
    assert!(journal.get("sriov_cycles").is_none(), "{journal}");
}

#[test]
fn a_pf_cycle_is_refused_naming_every_vf_holder() {
    let h = host();
    let err = h.host().reset(BUSY_PF.parse().unwrap()).unwrap_err();
    let AttachError::ResetRefused { reason, .. } = &err else {
        panic!("{err}");
    };
    for holder in [
        "0000:41:00.4 has vGPU type 1150",
        "0000:41:00.5 has vGPU type 1150",
    ] {
        assert!(reason.contains(holder), "{reason}");
    }
    assert_eq!(writes(&h, BUSY_PF), "", "nothing written");
    // A VF attached here is named with its owner; its PF counts as held too.
    let h = host();
    let spec = h
        .host()
        .attach_vgpu(&gpu_passthrough::attach::VgpuAttachRequest {
            place: gpu_passthrough::vgpu::PlaceRequest {
                profile: "L40S-24Q".into(),
                count: 1,
                numa: None,
                pack: false,
            },
            owner: gpu_passthrough::attach::Owner::new("vm-1").unwrap(),
            initrd: None,
        })
        .unwrap();
    assert_eq!(
        spec.devices[0].address.map(|a| a.to_string()).as_deref(),
        Some("0000:61:00.4")
    );
    let err = h.host().reset(FREE_PF.parse().unwrap()).unwrap_err();
    assert!(err.to_string().contains("vm-1"), "{err}");
    assert_eq!(writes(&h, FREE_PF), "", "nothing written");
}

#[test]
fn a_cycle_cut_short_is_journaled_and_put_back_by_reconcile() {
    let h = host();
    // The write of 0 passes, the write back fails.
    h.inject("fail-once sriov_numvfs after 1");
    let report = h.host().reset(FREE_PF.parse().unwrap()).unwrap();
    let reset = report.reset.as_ref().unwrap();
    assert_eq!(reset.outcome, ResetOutcome::Failed, "{report:?}");
    assert!(
        reset
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("reconcile"),
        "{report:?}"
    );
    assert_eq!(numvfs(&h, FREE_PF), "0");
    let journal = h.journal().unwrap();
    assert_eq!(
        journal["sriov_cycles"],
        serde_json::json!([{"pf": FREE_PF, "numvfs": 4}]),
        "{journal}"
    );
    let r = h.host().reconcile().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(numvfs(&h, FREE_PF), "4");
    assert!(h.journal().unwrap().get("sriov_cycles").is_none());
}
