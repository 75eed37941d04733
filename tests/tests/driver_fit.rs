//! `plan`/`attach --release R` with a proprietary release: a no-GSP release is refused for a GPU
//! the driver's supported-gpus.json says the proprietary modules drive only through GSP, and any
//! proprietary release for a GPU only the open modules support; the real 535 list (which has no
//! such marks) refuses nothing. Refused before anything moves.

use gpu_passthrough::outcome::{Classify, Outcome};
use std::path::Path;

use gpu_passthrough::attach::{AttachError, PlanRequest, RefusalReason};
use gpu_passthrough::fetch::NoProgress;
use gpu_passthrough::provision::{GpuVmRequest, ProvisionError, Provisioner};
use gpu_passthrough::registry::Registry;
use gpu_passthrough_tests::fixtures;
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};

/// A newer driver's list: Ada marked for the proprietary modules through GSP, Blackwell open
/// only, Pascal without `kernelopen`.
const NEWER: &str = r#"{"chips":[
 {"devid":"0x2684","name":"NVIDIA GeForce RTX 4090","features":["kernelopen","gsp_proprietary_supported"]},
 {"devid":"0x2B85","name":"NVIDIA GeForce RTX 5090","features":["kernelopen"]},
 {"devid":"0x1B80","name":"NVIDIA GeForce GTX 1080","features":[]}
]}"#;

fn host() -> FakeHost {
    let h = FakeHost::new(true);
    for (i, dev) in [0x2684u16, 0x2b85, 0x1b80].into_iter().enumerate() {
        h.add(
            FakeDevice::new(&format!("0000:0{}:00.0", i + 1), 0x10de, dev, 0x030000)
                .group(i as u32 + 1),
        );
    }
    h
}

fn registry(dir: &Path, gsp: bool) -> Registry {
    let header = format!(
        "kernel_version = \"{}\"\ndriver_version = \"{}\"\nmodule_flavor = \"proprietary\"\ngsp = {gsp}\n",
        fixtures::KERNEL_VERSION,
        fixtures::PROPRIETARY_DRIVER_VERSION
    );
    let path = fixtures::write_registry_with(
        dir,
        "prop",
        &header,
        &fixtures::proprietary_artifacts(),
        false,
    );
    Registry::load(&[path]).unwrap()
}

fn plan_reasons(h: &FakeHost, registry: &Registry, gpus: &Path, dev: &str) -> Vec<RefusalReason> {
    let host = h.host();
    let p = Provisioner::new(&host, registry, h.state.join("cache"));
    let req = PlanRequest {
        devices: vec![dev.parse().unwrap()],
        supported_gpus: Some(gpus.to_path_buf()),
        ..Default::default()
    };
    p.plan(&req, Some("prop"))
        .unwrap()
        .refusals
        .iter()
        .map(|r| r.reason)
        .collect()
}

#[test]
fn a_no_gsp_release_is_refused_for_a_gpu_marked_gsp_proprietary() {
    let dir = tempfile::tempdir().unwrap();
    let gpus = dir.path().join("supported-gpus.json");
    std::fs::write(&gpus, NEWER).unwrap();
    let h = host();
    let no_gsp = registry(dir.path(), false);
    assert_eq!(
        plan_reasons(&h, &no_gsp, &gpus, "0000:01:00.0"),
        [RefusalReason::NeedsGspFirmware]
    );
    assert_eq!(
        plan_reasons(&h, &no_gsp, &gpus, "0000:02:00.0"),
        [RefusalReason::NeedsOpenModules]
    );
    assert!(
        plan_reasons(&h, &no_gsp, &gpus, "0000:03:00.0").is_empty(),
        "Pascal: no GSP, fine"
    );

    let gsp = registry(dir.path(), true);
    assert!(plan_reasons(&h, &gsp, &gpus, "0000:01:00.0").is_empty());
    assert_eq!(
        plan_reasons(&h, &gsp, &gpus, "0000:02:00.0"),
        [RefusalReason::NeedsOpenModules]
    );
}

#[test]
fn the_535_list_marks_nothing_so_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = host();
    let real = fixtures::path(fixtures::SUPPORTED_GPUS);
    let no_gsp = registry(dir.path(), false);
    // The RTX 4090 has `kernelopen` in 535 too, but 535 has no `gsp_proprietary_supported`.
    assert!(plan_reasons(&h, &no_gsp, &real, "0000:01:00.0").is_empty());
}

#[test]
fn attach_refuses_before_any_device_moves() {
    let dir = tempfile::tempdir().unwrap();
    let gpus = dir.path().join("supported-gpus.json");
    std::fs::write(&gpus, NEWER).unwrap();
    let h = host();
    let registry = registry(dir.path(), false);
    let host = h.host();
    let p = Provisioner::new(&host, &registry, h.state.join("cache"));
    let err = p
        .attach(
            &GpuVmRequest {
                plan: PlanRequest {
                    devices: vec!["0000:01:00.0".parse().unwrap()],
                    supported_gpus: Some(gpus),
                    ..Default::default()
                },
                owner: gpu_passthrough::attach::Owner::new("vm-1").unwrap(),
                release: Some("prop".into()),
                initrd: Some(dir.path().join("given.img")),
                disk: Default::default(),
            },
            &NoProgress,
        )
        .unwrap_err();
    let ProvisionError::Attach(AttachError::Refused(refusals)) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(refusals[0].reason, RefusalReason::NeedsGspFirmware);
    let msg = err.to_string();
    assert!(
        msg.contains("0000:01:00.0")
            && msg.contains("RTX 4090")
            && msg.contains("use a release with GSP firmware"),
        "{msg}"
    );
    assert_eq!(err.outcome(), Outcome::Refused);
    assert_eq!(h.driver_override("0000:01:00.0"), None, "nothing moved");
    assert!(h.journal_clean());
}
