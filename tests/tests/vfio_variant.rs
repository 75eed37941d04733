//! VFIO variant drivers (#25 point 6) on fake trees: the driver a device binds to comes from
//! the running kernel's `modules.alias` (lines in the kernel's own format), its registered
//! name from sysfs; `vfio_driver` overrides; the journal records it and detach and reconcile
//! honour it.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use gpu_passthrough::attach::{AttachError, AttachRequest, Host, Owner, PidLiveness, PlanRequest};
use gpu_passthrough::failpoint::{FAILPOINT_ENV, Failpoint, arm_from_env};
use gpu_passthrough::pci::variant::DriverSource;
use gpu_passthrough_tests::sysfs::{self, FakeHost, FixedLiveness, HGX_GPUS};

const GH200: &str = "0009:01:00.0";
const NVGRACE: &str = "nvgrace-gpu-vfio-pci";
/// The alias lines a kernel with `nvgrace_gpu_vfio_pci` has for the GH200 (its ID table),
/// among others that do not match it.
const ALIASES: &str = "\
alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia
alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000010DEd00002345sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
";

fn gh200_with_variant() -> FakeHost {
    let h = sysfs::gh200();
    h.set_modules_alias(ALIASES)
        .load_vfio_variant("nvgrace_gpu_vfio_pci", NVGRACE);
    h
}

fn attach_req(devs: &[&str], vfio_driver: Option<&str>) -> AttachRequest {
    AttachRequest {
        plan: PlanRequest {
            devices: devs.iter().map(|d| d.parse().unwrap()).collect(),
            vfio_driver: vfio_driver.map(str::to_owned),
            ..Default::default()
        },
        owner: Owner::new("vm-grace").unwrap(),
        initrd: None,
    }
}

#[test]
fn a_gh200_binds_to_the_variant_driver_and_detach_returns_it_to_nvidia() {
    let h = gh200_with_variant();
    let host = h.host();
    let req = attach_req(&[GH200], None);
    let plan = host.plan(&req.plan).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    let v = &plan.devices[0].vfio;
    assert_eq!(v.module, "nvgrace_gpu_vfio_pci");
    assert_eq!(v.driver.as_deref(), Some(NVGRACE), "the registered name");
    assert_eq!(v.source, DriverSource::ModulesAlias);
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["devices"][0]["vfio"]["driver"], NVGRACE);
    assert!(
        plan.writes
            .iter()
            .any(|w| w.path.ends_with("driver_override") && w.value == NVGRACE),
        "{:?}",
        plan.writes
    );

    let spec = host.attach(&req).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some(NVGRACE));
    assert_eq!(h.driver_override(GH200).as_deref(), Some(NVGRACE));
    // QEMU's device is vfio-pci whichever host driver binds it.
    assert!(
        spec.qemu
            .args
            .iter()
            .any(|a| a.starts_with(&format!("vfio-pci,host={GH200}"))),
        "{:?}",
        spec.qemu.args
    );
    let j = h.journal().unwrap();
    assert_eq!(
        j["attachments"][0]["devices"][0]["vfio_driver"], NVGRACE,
        "{j}"
    );

    host.detach(&req.owner).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));
    assert_eq!(h.driver_override(GH200), None);
    assert!(h.journal_clean());
}

#[test]
fn without_a_matching_alias_the_device_goes_to_vfio_pci() {
    // A kernel without the variant: no alias names the GH200.
    let h = sysfs::gh200();
    h.set_modules_alias(&ALIASES.replace("d00002342", "d00002999"));
    let host = h.host();
    let req = attach_req(&[GH200], None);
    let plan = host.plan(&req.plan).unwrap();
    assert_eq!(plan.devices[0].vfio.source, DriverSource::Default);
    assert_eq!(plan.devices[0].vfio.driver.as_deref(), Some("vfio-pci"));
    host.attach(&req).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some("vfio-pci"));
    let j = h.journal().unwrap();
    assert_eq!(j["attachments"][0]["devices"][0]["vfio_driver"], "vfio-pci");
    host.detach(&req.owner).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));
}

#[test]
fn the_override_wins_over_the_alias_and_over_vfio_pci() {
    // vfio-pci asked for a GH200 whose kernel offers the variant.
    let h = gh200_with_variant();
    let host = h.host();
    let req = attach_req(&[GH200], Some("vfio-pci"));
    let plan = host.plan(&req.plan).unwrap();
    assert_eq!(plan.devices[0].vfio.source, DriverSource::Override);
    host.attach(&req).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some("vfio-pci"));
    host.detach(&req.owner).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));

    // A variant asked for by its module name, for a GPU no alias names: the registered name
    // is found and bound.
    let hgx = sysfs::hgx_8gpu(false);
    hgx.load_vfio_variant("nvgrace_gpu_vfio_pci", NVGRACE);
    let req = attach_req(&[HGX_GPUS[0]], Some("nvgrace_gpu_vfio_pci"));
    hgx.host().attach(&req).unwrap();
    assert_eq!(hgx.driver(HGX_GPUS[0]).as_deref(), Some(NVGRACE));
    let j = hgx.journal().unwrap();
    assert_eq!(j["attachments"][0]["devices"][0]["vfio_driver"], NVGRACE);
    hgx.host().detach(&req.owner).unwrap();
    assert_eq!(hgx.driver(HGX_GPUS[0]).as_deref(), Some("nvidia"));
}

#[test]
fn an_unusable_vfio_driver_is_refused_with_nothing_moved() {
    let h = gh200_with_variant();
    let host = h.host();
    for (name, why) in [
        ("no-such-vfio", "does not load"),
        // Registered, but a host driver.
        ("nvidia", "not a VFIO driver"),
    ] {
        let err = host.attach(&attach_req(&[GH200], Some(name))).unwrap_err();
        let AttachError::VfioDriver { name: n, .. } = &err else {
            panic!("{name}: {err:?}");
        };
        assert_eq!(n, name);
        let text = err.to_string();
        assert!(text.contains(name) && text.contains(why), "{text}");
        assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"), "{name}");
        assert_eq!(h.driver_override(GH200), None, "{name}");
        assert!(h.journal_clean(), "{name}");
    }
    // The alias names a variant the kernel cannot load: refused the same way.
    let h = sysfs::gh200();
    h.set_modules_alias(ALIASES);
    let err = h.host().attach(&attach_req(&[GH200], None)).unwrap_err();
    assert!(
        matches!(&err, AttachError::VfioDriver { name, .. } if name == "nvgrace_gpu_vfio_pci"),
        "{err:?}"
    );
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

#[test]
fn a_journal_without_the_driver_reads_as_vfio_pci() {
    let h = sysfs::gh200();
    let host = h.host();
    let req = attach_req(&[GH200], None);
    host.attach(&req).unwrap();
    // As a journal of an earlier release wrote it: no vfio_driver.
    let path = h.state.join("journal.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    j["attachments"][0]["devices"][0]
        .as_object_mut()
        .unwrap()
        .remove("vfio_driver")
        .expect("recorded");
    std::fs::write(&path, serde_json::to_string(&j).unwrap()).unwrap();
    let r = host.detach(&req.owner).unwrap();
    assert_eq!(r.restored[0].driver.as_deref(), Some("nvidia"));
    let reset = r.restored[0]
        .health
        .as_ref()
        .unwrap()
        .reset
        .as_ref()
        .unwrap();
    assert_ne!(
        reset.outcome,
        gpu_passthrough::attach::ResetOutcome::AlreadyReturned,
        "taken off vfio-pci and reset, as before"
    );
}

/// The attach the crash test kills at a failpoint (run as a child process).
#[test]
#[ignore = "child process of the crash tests"]
fn child_attaches_with_the_failpoint_armed() {
    let Some(root) = std::env::var_os("VARIANT_CHILD_ROOT").map(PathBuf::from) else {
        return;
    };
    arm_from_env().expect("a known failpoint");
    let host = Host::new(
        root.join("sys"),
        root.join("state"),
        Box::new(PidLiveness::default()),
    )
    .with_dev_dir(root.join("dev"));
    let _ = host.attach(&attach_req(&[GH200], None));
}

fn crash_at(h: &FakeHost, fp: Failpoint) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_attaches_with_the_failpoint_armed"])
        .args(["--ignored", "--test-threads=1"])
        .env("VARIANT_CHILD_ROOT", h.dir.path())
        .env(FAILPOINT_ENV, fp.name())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(out.signal(), Some(6), "aborted at {}: {out:?}", fp.name());
}

#[test]
fn reconcile_after_a_crash_honours_the_variant_driver() {
    // Killed after the probe: rolled back, off the variant and back to nvidia.
    let h = gh200_with_variant();
    crash_at(&h, Failpoint::AfterProbe);
    assert_eq!(h.driver(GH200).as_deref(), Some(NVGRACE));
    let j = h.journal().unwrap();
    assert_eq!(j["transactions"][0]["devices"][0]["vfio_driver"], NVGRACE);
    let r = h.host().reconcile().unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.rolled_back.len(), 1, "{r:?}");
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));
    assert_eq!(h.driver_override(GH200), None);
    assert!(h.journal_clean());

    // Killed once verified: on its recorded variant driver it is finished, not rolled back
    // (a check for the literal "vfio-pci" would roll it back); its owner gone, released.
    let h = gh200_with_variant();
    crash_at(&h, Failpoint::AfterVerify);
    let r = h.host().reconcile().unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.finished.len(), 1, "{r:?}");
    assert!(r.rolled_back.is_empty(), "{r:?}");
    assert_eq!(h.driver(GH200).as_deref(), Some(NVGRACE));
    let gone = FixedLiveness(vec![(
        "vm-grace".into(),
        gpu_passthrough::attach::Liveness::Gone,
    )]);
    let r = h.host_with(Box::new(gone)).reconcile().unwrap();
    assert_eq!(r.released.len(), 1, "{r:?}");
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

#[test]
fn attach_loads_the_variant_module_and_binds_the_name_it_registers() {
    let h = sysfs::gh200();
    h.set_modules_alias(ALIASES)
        .install_vfio_variant("nvgrace_gpu_vfio_pci", NVGRACE);
    let host = h.host();
    let req = attach_req(&[GH200], None);
    let plan = host.plan(&req.plan).unwrap();
    let v = &plan.devices[0].vfio;
    assert_eq!(v.module, "nvgrace_gpu_vfio_pci");
    assert_eq!(v.driver, None, "not loaded yet: planning loads nothing");
    assert!(!h.sys.join("bus/pci/drivers").join(NVGRACE).exists());
    host.attach(&req).unwrap();
    assert_eq!(
        h.driver(GH200).as_deref(),
        Some(NVGRACE),
        "the registered name"
    );
    let j = h.journal().unwrap();
    assert_eq!(j["attachments"][0]["devices"][0]["vfio_driver"], NVGRACE);
    host.detach(&req.owner).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some("nvidia"));
}

#[test]
fn the_device_plugin_takes_a_gpu_on_its_variant_driver_as_on_vfio() {
    use gpu_passthrough_device_plugin::{NoQuarantine, inventory::problems};
    let h = gh200_with_variant();
    h.host().attach(&attach_req(&[GH200], None)).unwrap();
    assert_eq!(h.driver(GH200).as_deref(), Some(NVGRACE));
    let sysfs = gpu_passthrough::pci::Sysfs::new(&h.sys);
    let found = problems(
        &sysfs,
        &h.dev,
        GH200.parse().unwrap(),
        Some(9),
        &NoQuarantine,
    );
    assert!(found.is_empty(), "{found:?}");
}
