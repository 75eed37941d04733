//! Device nodes from the driver's procfs: GPU minors from `information`, MIG capability modes, the
//! `nodes --dry-run` mode, and `setup --no-load` (tests run as root, one mount namespace each).

mod common;

use common::{FakeKernel, Guest, RootKind, gpu_information};
use gpu_passthrough_init::dryrun::{DryRun, Would};
use gpu_passthrough_init::setup;
use gpu_passthrough_guest_contract::report::Status;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// Give the guest's GPUs these minors (in the order of their bus addresses).
fn set_minors(guest: &Guest, minors: &[u32]) {
    let dir = guest.proc_root.join("driver/nvidia/gpus");
    let mut buses: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    buses.sort();
    for (bus, minor) in buses.iter().zip(minors) {
        std::fs::write(bus.join("information"), gpu_information(*minor)).unwrap();
    }
}

fn rdev(path: &Path) -> Option<u64> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type().is_char_device().then(|| meta.rdev())
}

fn listing(dir: &Path) -> Vec<(String, u64, u32)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.rdev(),
                m.mode(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn setup_makes_gpu_nodes_at_the_minors_the_driver_reports() {
    let guest = Guest::new(RootKind::Debian, 2);
    set_minors(&guest, &[2, 5]);
    let report = setup::run(&guest.context(), &FakeKernel::new(&guest));
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    assert_eq!(report.gpus, 2);
    for dev in [&guest.dev, &guest.root.join("dev")] {
        assert_eq!(rdev(&dev.join("nvidia2")), Some(makedev(195, 2)));
        assert_eq!(rdev(&dev.join("nvidia5")), Some(makedev(195, 5)));
        assert!(!dev.join("nvidia0").exists(), "no node at a guessed minor");
        assert!(!dev.join("nvidia1").exists(), "no node at a guessed minor");
    }
    let paths: Vec<&str> = report.nodes.iter().map(|n| n.path.as_str()).collect();
    assert!(
        paths.iter().any(|p| p.ends_with("/dev/nvidia5")),
        "{paths:?}"
    );
}

#[test]
fn a_gpu_whose_minor_cannot_be_read_gets_no_node_and_the_setup_says_so() {
    let guest = Guest::new(RootKind::Debian, 2);
    set_minors(&guest, &[0, 1]);
    let second = guest
        .proc_root
        .join("driver/nvidia/gpus/0000:00:06.0/information");
    std::fs::write(&second, "Model: NVIDIA H100\n").unwrap();
    let report = setup::run(&guest.context(), &FakeKernel::new(&guest));
    assert_eq!(report.status, Status::Degraded, "{}", report.line());
    assert!(guest.dev.join("nvidia0").exists());
    assert!(!guest.dev.join("nvidia1").exists());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("0000:00:06.0/information") && p.contains("Device Minor")),
        "{:?}",
        report.problems
    );
}

fn gpu_init(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-init"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_dry_run_computes_the_nodes_and_creates_nothing() {
    let guest = Guest::new(RootKind::Debian, 2);
    set_minors(&guest, &[1, 3]);
    std::fs::write(
        guest.proc_root.join("devices"),
        "Character devices:\n195 nvidia-frontend\n236 nvidia-uvm\n237 nvidia-caps\n\nBlock devices:\n",
    )
    .unwrap();
    let mig = guest.proc_root.join("driver/nvidia/capabilities/mig");
    std::fs::create_dir_all(&mig).unwrap();
    std::fs::write(
        mig.join("config"),
        "DeviceFileMinor: 1\nDeviceFileMode: 256\n",
    )
    .unwrap();
    std::fs::write(
        mig.join("monitor"),
        "DeviceFileMinor: 2\nDeviceFileMode: 292\n",
    )
    .unwrap();
    // What is there already: a right node, a wrong one, a plain file.
    let node = |name: &str, major, minor| {
        mknod(
            &guest.dev.join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(major, minor),
        )
        .unwrap()
    };
    node("nvidia1", 195, 1);
    node("nvidiactl", 195, 7);
    std::fs::write(guest.dev.join("nvidia3"), b"not a device").unwrap();
    let before = listing(&guest.dev);

    let out = gpu_init(&[
        "nodes",
        "--dry-run",
        "--proc-root",
        guest.proc_root.to_str().unwrap(),
        "--dev-dir",
        guest.dev.to_str().unwrap(),
        "--manifest",
        guest.layer.join("gpu/manifest.json").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let dry: DryRun = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listing(&guest.dev),
        before,
        "the dry run changed the device dir"
    );
    assert!(!guest.dev.join("nvidia-caps").exists());
    assert_eq!(dry.gpus, 2);
    assert!(dry.problems.is_empty(), "{:?}", dry.problems);
    let got: Vec<(&str, u64, u64, Option<u32>, Would)> = dry
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.major, n.minor, n.mode, n.would))
        .collect();
    assert_eq!(
        got,
        [
            ("nvidiactl", 195, 255, Some(0o660), Would::Replace),
            ("nvidia1", 195, 1, Some(0o660), Would::Keep),
            ("nvidia3", 195, 3, Some(0o660), Would::Replace),
            ("nvidia-modeset", 195, 254, Some(0o660), Would::Create),
            ("nvidia-uvm", 236, 0, Some(0o660), Would::Create),
            ("nvidia-uvm-tools", 236, 1, Some(0o660), Would::Create),
            (
                "nvidia-caps/nvidia-cap1",
                237,
                1,
                Some(0o400),
                Would::Create
            ),
            (
                "nvidia-caps/nvidia-cap2",
                237,
                2,
                Some(0o444),
                Would::Create
            ),
        ]
    );
    assert!(dry.nodes[6].driver_mode && !dry.nodes[0].driver_mode);
    assert_eq!(dry.nodes[6].gid, Some(0));
    assert_eq!(dry.nodes[0].gid, Some(44));

    // For people: one line per node.
    let text = gpu_init(&[
        "nodes",
        "--dry-run",
        "--proc-root",
        guest.proc_root.to_str().unwrap(),
        "--dev-dir",
        guest.dev.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(text.contains("keep"), "{text}");
    assert!(text.contains("c 237:1  mode 0400 (driver's)"), "{text}");
}

#[test]
fn nodes_without_dry_run_is_a_usage_error() {
    let out = gpu_init(&["nodes", "--proc-root", "/proc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run"));
    let out = gpu_init(&["nodes", "--dry-run", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn setup_with_no_load_reports_loaded_modules_and_never_loads_the_others() {
    let guest = Guest::new(RootKind::Debian, 0);
    // A module this kernel has (any entry of /sys/module) and one it cannot have.
    let present = std::fs::read_dir("/sys/module")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !n.contains('-'))
        .expect("a module in /sys/module");
    let mut manifest = common::manifest();
    manifest.modules.truncate(1);
    manifest.modules[0].name = present.clone();
    manifest.modules[0].path = format!("/gpu/modules/{present}.ko");
    manifest.modules[0].depends.clear();
    let mut absent = manifest.modules[0].clone();
    absent.name = "gpu_passthrough_not_a_module".into();
    absent.path = "/gpu/modules/gpu-passthrough-not-a-module.ko".into();
    manifest.modules.push(absent);
    // A layer without firmware, so the run writes nothing to the real /sys.
    let layer = guest.tmp.path().join("bare-layer");
    common::write(
        &layer.join("gpu/manifest.json"),
        serde_json::to_string(&manifest).unwrap(),
    );
    let dev = guest.root.join("dev");
    let out = gpu_init(&[
        "setup",
        "--root",
        guest.root.to_str().unwrap(),
        "--manifest",
        layer.join("gpu/manifest.json").to_str().unwrap(),
        "--layer-root",
        layer.to_str().unwrap(),
        "--dev-dir",
        dev.to_str().unwrap(),
        "--no-load",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("GPU-INIT ")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line["GPU-INIT ".len()..]).unwrap();
    assert_eq!(v["modules"][0]["name"], present.as_str());
    assert_eq!(v["modules"][0]["result"], "already_loaded", "{line}");
    assert_eq!(v["modules"][1]["result"], "failed", "{line}");
    assert_eq!(v["modules"][1]["errno"], libc::EPERM, "{line}");
    assert_eq!(v["status"], "failed");
    assert!(
        !Path::new("/sys/module/gpu_passthrough_not_a_module").exists(),
        "nothing was loaded"
    );
}
