//! The workload contract of the kernel command line over fake guests: `NVIDIA_DRIVER_CAPABILITIES`
//! selects what is injected and listed in the CDI spec, `NVIDIA_VISIBLE_DEVICES` which GPU nodes
//! and CDI devices exist (by the driver's real minors), the guest daemons and the module lock.

mod common;

use common::{FakeKernel, Guest, Outcome, RootKind, write};
use gpu_passthrough_init::env::GuestEnv;
use gpu_passthrough_init::setup;
use gpu_passthrough_guest_contract::Manifest;
use gpu_passthrough_guest_contract::capability::Capability;
use gpu_passthrough_guest_contract::report::{DaemonResult, Report, Status};
use nix::errno::Errno;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

fn env(vars: &[(&str, &str)]) -> GuestEnv {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    GuestEnv::parse(|k| vars.get(k).cloned())
}

fn run(guest: &Guest, kernel: &FakeKernel, vars: &[(&str, &str)]) -> Report {
    let mut ctx = guest.context();
    ctx.env = env(vars);
    setup::run(&ctx, kernel)
}

/// Rewrite the layer's manifest.
fn set_manifest(guest: &Guest, m: &Manifest) {
    write(
        &guest.layer.join("gpu/manifest.json"),
        serde_json::to_string(m).unwrap(),
    );
}

/// The common manifest, recording libcuda as compute and libnvidia-ml and nvidia-smi as utility.
fn with_capabilities(guest: &Guest) -> Manifest {
    let mut m = guest.manifest.clone();
    let lib = |stem: &str| {
        m.libraries
            .iter()
            .find(|l| l.path.contains(stem))
            .unwrap()
            .path
            .clone()
    };
    m.capabilities = BTreeMap::from([
        (Capability::Compute, vec![lib("libcuda")]),
        (
            Capability::Utility,
            vec![lib("libnvidia-ml"), "/gpu/bin/nvidia-smi".into()],
        ),
    ]);
    set_manifest(guest, &m);
    m
}

fn cdi(guest: &Guest) -> Value {
    serde_json::from_slice(&std::fs::read(guest.root.join("etc/cdi/nvidia.json")).unwrap()).unwrap()
}

#[test]
fn only_the_asked_capabilities_are_injected_and_in_the_cdi_spec() {
    let guest = Guest::new(RootKind::Debian, 1);
    with_capabilities(&guest);
    let kernel = FakeKernel::new(&guest);
    let report = run(
        &guest,
        &kernel,
        &[("NVIDIA_DRIVER_CAPABILITIES", "compute")],
    );
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    assert_eq!(report.capabilities, [Capability::Compute]);
    assert_eq!(report.environment["NVIDIA_DRIVER_CAPABILITIES"], "compute");
    let injected = report.libraries.injected.join(" ");
    assert!(injected.contains("libcuda.so.1"), "{injected}");
    assert!(!injected.contains("libnvidia-ml"), "{injected}");
    assert!(
        report.binaries.is_empty(),
        "nvidia-smi is utility: {:?}",
        report.binaries
    );
    let ld = guest.in_root("/usr/sbin/ldconfig", &["-p"]);
    assert!(
        ld.contains("libcuda.so.1") && !ld.contains("libnvidia-ml.so.1"),
        "{ld}"
    );
    let mounts = cdi(&guest)["containerEdits"]["mounts"].to_string();
    assert!(
        mounts.contains("libcuda.so.") && !mounts.contains("libnvidia-ml"),
        "{mounts}"
    );
    assert!(!mounts.contains("nvidia-smi"), "{mounts}");
}

#[test]
fn the_default_is_compute_and_utility_and_all_takes_everything() {
    let guest = Guest::new(RootKind::Debian, 1);
    with_capabilities(&guest);
    let report = run(&guest, &FakeKernel::new(&guest), &[]);
    assert_eq!(
        report.capabilities,
        [Capability::Compute, Capability::Utility]
    );
    assert_eq!(
        report.environment["NVIDIA_DRIVER_CAPABILITIES"],
        "compute,utility"
    );
    assert_eq!(report.binaries.len(), 1, "{:?}", report.binaries);
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    let guest = Guest::new(RootKind::Debian, 1);
    with_capabilities(&guest);
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[("NVIDIA_DRIVER_CAPABILITIES", "all")],
    );
    assert_eq!(
        report.status,
        Status::Ok,
        "`all` lacks nothing: {:?}",
        report.problems
    );
    assert_eq!(report.libraries.injected.len(), 2);
}

#[test]
fn a_capability_the_layer_lacks_is_a_problem_not_a_silent_skip() {
    let guest = Guest::new(RootKind::Debian, 1);
    with_capabilities(&guest);
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[("NVIDIA_DRIVER_CAPABILITIES", "compute,video")],
    );
    assert_eq!(report.status, Status::Degraded);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("video") && p.contains("carries only compute,utility")),
        "{:?}",
        report.problems
    );
    // What the layer has of the request is still injected.
    assert_eq!(report.capabilities, [Capability::Compute]);
    assert!(report.libraries.injected.join(" ").contains("libcuda.so.1"));
}

/// The driver's minors need not be 0..N-1: nodes and CDI devices use the real ones, and
/// `NVIDIA_VISIBLE_DEVICES` picks GPUs by bus order.
#[test]
fn visible_devices_pick_gpus_by_index_with_their_real_minors() {
    let guest = Guest::new(RootKind::Debian, 3);
    // Bus order 05, 06, 07 → minors 4, 1, 9.
    for (slot, minor) in [(5, 4), (6, 1), (7, 9)] {
        write(
            &guest.proc_root.join(format!(
                "driver/nvidia/gpus/0000:00:{slot:02x}.0/information"
            )),
            common::gpu_information(minor),
        );
    }
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[
            ("NVIDIA_VISIBLE_DEVICES", "0,2"),
            ("CUDA_VISIBLE_DEVICES", "1"),
        ],
    );
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    for dev in [&guest.dev, &guest.root.join("dev")] {
        assert!(dev.join("nvidia4").exists() && dev.join("nvidia9").exists());
        assert!(!dev.join("nvidia1").exists(), "GPU 1 is hidden");
        assert!(dev.join("nvidiactl").exists() && dev.join("nvidia-uvm").exists());
    }
    let spec = cdi(&guest);
    let devices: Vec<(String, String)> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["containerEdits"]["deviceNodes"].to_string(),
            )
        })
        .collect();
    assert_eq!(devices.len(), 3, "{devices:?}");
    assert_eq!(devices[0].0, "0");
    assert!(devices[0].1.contains("/dev/nvidia4"), "{devices:?}");
    assert_eq!(devices[1].0, "2");
    assert!(devices[1].1.contains("/dev/nvidia9"), "{devices:?}");
    assert_eq!(devices[2].0, "all");
    assert!(devices[2].1.contains("nvidia4") && devices[2].1.contains("nvidia9"));
    assert!(!devices[2].1.contains("/dev/nvidia1\""), "{devices:?}");
    assert!(
        !spec["containerEdits"]["deviceNodes"]
            .to_string()
            .contains("/dev/nvidia4")
    );
    assert_eq!(report.environment["NVIDIA_VISIBLE_DEVICES"], "0,2");
    assert_eq!(report.environment["CUDA_VISIBLE_DEVICES"], "1");
}

#[test]
fn all_gpus_get_their_real_minor_in_the_cdi_spec() {
    let guest = Guest::new(RootKind::Debian, 2);
    for (slot, minor) in [(5, 3), (6, 0)] {
        write(
            &guest.proc_root.join(format!(
                "driver/nvidia/gpus/0000:00:{slot:02x}.0/information"
            )),
            common::gpu_information(minor),
        );
    }
    let report = run(&guest, &FakeKernel::new(&guest), &[]);
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    let devices = cdi(&guest)["devices"].to_string();
    assert!(
        devices
            .contains(r#"{"containerEdits":{"deviceNodes":[{"path":"/dev/nvidia3"}]},"name":"0"}"#),
        "{devices}"
    );
    assert!(
        devices
            .contains(r#"{"containerEdits":{"deviceNodes":[{"path":"/dev/nvidia0"}]},"name":"1"}"#),
        "{devices}"
    );
    assert!(!guest.dev.join("nvidia1").exists());
    assert_eq!(report.environment["NVIDIA_VISIBLE_DEVICES"], "all");
}

#[test]
fn none_hides_every_gpu_node_but_keeps_the_libraries() {
    let guest = Guest::new(RootKind::Debian, 2);
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[("NVIDIA_VISIBLE_DEVICES", "none")],
    );
    assert!(!guest.dev.join("nvidia0").exists() && !guest.dev.join("nvidia1").exists());
    assert!(guest.dev.join("nvidiactl").exists());
    assert_eq!(report.libraries.injected.len(), 2);
    let devices = cdi(&guest)["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 1, "only `all`, empty: {devices:?}");
}

/// A shell script standing in for a daemon: it records its arguments.
fn fake_daemon(guest: &Guest, name: &str) -> std::path::PathBuf {
    let out = guest.tmp.path().join(format!("{name}.args"));
    let script = guest.layer.join(format!("gpu/bin/{name}"));
    write(
        &script,
        format!("#!/bin/sh\necho \"$@\" > {}\n", out.display()),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    out
}

fn with_binaries(guest: &Guest, names: &[&str]) {
    let mut m = guest.manifest.clone();
    for n in names {
        m.binaries.push(format!("/gpu/bin/{n}"));
    }
    set_manifest(guest, &m);
}

/// Wait (bounded) for a spawned script to have written its file; no timing is asserted.
fn read_eventually(path: &Path) -> String {
    for _ in 0..200 {
        if let Ok(t) = std::fs::read_to_string(path)
            && t.ends_with('\n')
        {
            return t;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{} never written", path.display());
}

fn nvswitch(guest: &Guest, addr: &str) {
    let dir = guest.sys_root.join("bus/pci/devices").join(addr);
    write(&dir.join("vendor"), "0x10de\n");
    write(&dir.join("class"), "0x068000\n");
}

#[test]
fn persistenced_starts_with_uvm_persistence_when_asked() {
    let guest = Guest::new(RootKind::Debian, 1);
    let args = fake_daemon(&guest, "nvidia-persistenced");
    with_binaries(&guest, &["nvidia-persistenced"]);
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[("GPU_INIT_PERSISTENCED", "uvm")],
    );
    let p = &report.daemons[0];
    assert_eq!(
        (p.name.as_str(), p.result),
        ("nvidia-persistenced", DaemonResult::Started)
    );
    assert!(p.pid.is_some());
    assert_eq!(p.args, ["--uvm-persistence-mode"]);
    assert_eq!(read_eventually(&args).trim(), "--uvm-persistence-mode");
    let fm = &report.daemons[1];
    assert_eq!(
        (fm.name.as_str(), fm.result),
        ("nv-fabricmanager", DaemonResult::NotNeeded)
    );
    assert_eq!(report.status, Status::Ok, "{:?}", report.problems);
}

#[test]
fn on_a_gpu_less_guest_the_daemons_are_classified_skipped() {
    let guest = Guest::new(RootKind::Debian, 0);
    let args = fake_daemon(&guest, "nvidia-persistenced");
    with_binaries(&guest, &["nvidia-persistenced"]);
    guest.unregister_driver();
    let kernel = FakeKernel::new(&guest).with("nvidia.ko", Outcome::Fail(Errno::ENODEV));
    let report = run(&guest, &kernel, &[]);
    let p = &report.daemons[0];
    assert_eq!(p.result, DaemonResult::Skipped);
    assert!(
        p.message.as_deref().unwrap().contains("nvidia: no_gpu"),
        "{p:?}"
    );
    assert!(!args.exists(), "not started");
    assert_eq!(report.daemons[1].result, DaemonResult::NotNeeded);
}

#[test]
fn an_nvswitch_without_fabric_manager_is_a_problem_and_with_it_starts() {
    let guest = Guest::new(RootKind::Debian, 2);
    nvswitch(&guest, "0000:00:10.0");
    // An NVIDIA GPU (class 0x0302) is no switch.
    write(
        &guest.sys_root.join("bus/pci/devices/0000:00:05.0/vendor"),
        "0x10de\n",
    );
    write(
        &guest.sys_root.join("bus/pci/devices/0000:00:05.0/class"),
        "0x030200\n",
    );
    let report = run(&guest, &FakeKernel::new(&guest), &[]);
    assert_eq!(
        report.daemons[0].result,
        DaemonResult::Absent,
        "no persistenced in this layer"
    );
    let fm = &report.daemons[1];
    assert_eq!(fm.result, DaemonResult::Absent);
    assert_eq!(report.status, Status::Degraded);
    assert!(
        report.problems.iter().any(|p| p.contains("1 NVSwitch")
            && p.contains("0000:00:10.0")
            && p.contains("nv-fabricmanager")),
        "{:?}",
        report.problems
    );

    let guest = Guest::new(RootKind::Debian, 2);
    nvswitch(&guest, "0000:00:10.0");
    let args = fake_daemon(&guest, "nv-fabricmanager");
    with_binaries(&guest, &["nv-fabricmanager"]);
    let report = run(&guest, &FakeKernel::new(&guest), &[]);
    assert_eq!(
        report.daemons[1].result,
        DaemonResult::Started,
        "{:?}",
        report.daemons
    );
    assert_eq!(read_eventually(&args), "\n");
    assert_eq!(report.status, Status::Ok, "{:?}", report.problems);
}

#[test]
fn lock_modules_writes_modules_disabled_after_the_setup() {
    let guest = Guest::new(RootKind::Debian, 1);
    let knob = guest.proc_root.join("sys/kernel/modules_disabled");
    write(&knob, "0\n");
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[("GPU_INIT_LOCK_MODULES", "1")],
    );
    assert!(report.modules_locked);
    assert_eq!(std::fs::read_to_string(&knob).unwrap(), "1\n");
    assert!(report.line().contains(r#""modules_locked":true"#));

    // Not asked: untouched, and the field is absent from the line.
    let guest = Guest::new(RootKind::Debian, 1);
    let knob = guest.proc_root.join("sys/kernel/modules_disabled");
    write(&knob, "0\n");
    let report = run(&guest, &FakeKernel::new(&guest), &[]);
    assert!(!report.modules_locked && !report.line().contains("modules_locked"));
    assert_eq!(std::fs::read_to_string(&knob).unwrap(), "0\n");

    // Asked but impossible: a problem, not a silent pass.
    let guest = Guest::new(RootKind::Debian, 1);
    let report = run(
        &guest,
        &FakeKernel::new(&guest),
        &[("GPU_INIT_LOCK_MODULES", "1")],
    );
    assert!(!report.modules_locked);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("modules_disabled")),
        "{:?}",
        report.problems
    );
}
