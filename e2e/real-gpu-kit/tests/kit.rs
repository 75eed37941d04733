//! The kit's comparisons against fake `/sys`, `/proc` and `/dev` trees (tests run as root for
//! mknod), with our library and guest init producing the answers, so a wrong comparison is caught
//! before a run on real hardware.

use gpu_passthrough::attach::PlanRequest;
use gpu_passthrough_init::dryrun::{self, DryRunArgs};
use gpu_passthrough_guest_contract::report::{ModuleReport, ModuleResult, Report, Status};
use gpu_passthrough_real_gpu::{Outcome, Roots, Summary, checks, facts, inject};
use gpu_passthrough_tests::sysfs::{FakeHost, workstation};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use std::path::{Path, PathBuf};

/// The real 535 supported-gpus.json, found through the one fixtures lookup.
fn supported_gpus() -> PathBuf {
    gpu_passthrough_tests::fixtures::path("nvidia-535.261.03/supported-gpus.json")
}
/// What 535's supported-gpus.json calls 10de:2684 (the workstation's GPU).
const RTX_4090: &str = "NVIDIA GeForce RTX 4090";

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn information(model: &str, minor: u32) -> String {
    format!("Model: \t\t {model}\nIRQ:   \t\t 42\nBus Type: \t PCIe\nDevice Minor: \t {minor}\n")
}

/// The workstation fake host with a loaded driver: module version and the GPU's procfs entry.
fn live_host() -> (FakeHost, Roots) {
    let host = workstation();
    write(&host.sys.join("module/nvidia/version"), "580.65.06\n");
    let proc = host.dir.path().join("proc");
    write(
        &proc.join("driver/nvidia/gpus/0000:01:00.0/information"),
        &information(RTX_4090, 0),
    );
    write(
        &proc.join("devices"),
        "Character devices:\n  1 mem\n195 nvidia\n236 nvidia-uvm\n\nBlock devices:\n  8 sd\n",
    );
    let roots = Roots {
        sysfs: host.sys.clone(),
        proc,
        dev: host.dev.clone(),
    };
    (host, roots)
}

#[test]
fn no_driver_or_no_gpu_on_it_is_the_exit_3_case_with_the_reason() {
    let host = workstation();
    let roots = Roots {
        sysfs: host.sys.clone(),
        proc: host.dir.path().join("proc"),
        dev: host.dev.clone(),
    };
    let reason = facts::detect(&roots).unwrap_err();
    assert!(
        reason.contains("no NVIDIA GPU or driver is present"),
        "{reason}"
    );
    assert!(reason.contains("module/nvidia/version"), "{reason}");
    let summary = Summary::no_gpu(reason);
    assert_eq!(summary.exit_code, 3);
    assert_eq!(serde_json::to_value(&summary).unwrap()["status"], "no_gpu");
    // A driver with no GPU bound to it is the same case.
    let bare = FakeHost::new(true);
    write(&bare.sys.join("module/nvidia/version"), "580.65.06\n");
    let roots = Roots {
        sysfs: bare.sys.clone(),
        ..roots
    };
    assert!(
        facts::detect(&roots)
            .unwrap_err()
            .contains("no NVIDIA GPU is bound")
    );
}

#[test]
fn facts_come_from_sysfs_and_the_drivers_procfs() {
    let (_host, roots) = live_host();
    let (version, gpus) = facts::detect(&roots).unwrap();
    assert_eq!(version, "580.65.06");
    assert_eq!(gpus.len(), 1);
    let g = &gpus[0];
    assert_eq!(g.address, "0000:01:00.0");
    assert_eq!(g.iommu_group, Some(12));
    assert_eq!(g.numa_node, Some(0));
    assert_eq!(g.reset_methods, ["flr", "bus"]);
    assert_eq!(g.model.as_deref(), Some(RTX_4090));
    assert_eq!(g.minor, Some(0));
    let bar64: Vec<u64> = g
        .bars
        .iter()
        .filter(|b| b.is_64bit)
        .map(|b| b.size)
        .collect();
    assert_eq!(bar64, [32 << 30]);
    assert_eq!(g.bars[0].size, 16 << 20);
    assert!(!g.bars[0].is_64bit);
}

#[test]
fn devices_and_doctor_hold_when_our_cli_agrees_and_fail_naming_what_differs() {
    let (host, roots) = live_host();
    let (_, gpus) = facts::detect(&roots).unwrap();
    let h = host.host();
    // What `devices --json` prints: the library's reports, serialized.
    let list = h.devices(false, Some(&supported_gpus())).unwrap();
    let json = serde_json::to_value(&list).unwrap();
    let held = checks::devices(&json, &gpus, true);
    assert_eq!(held.outcome, Outcome::Held, "{:?}", held.detail);
    assert!(
        held.detail[0].contains("MMIO window 64 GiB"),
        "{:?}",
        held.detail
    );

    let mut wrong = json.clone();
    let gpu = wrong
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|d| d["address"] == "0000:01:00.0")
        .unwrap();
    gpu["numa_node"] = serde_json::json!(1);
    gpu["bars"][1]["size"] = serde_json::json!(1u64 << 30);
    let failed = checks::devices(&wrong, &gpus, true);
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(
        failed.detail.iter().any(|d| d.contains("NUMA node")),
        "{:?}",
        failed.detail
    );
    assert!(
        failed.detail.iter().any(|d| d.contains("BARs")),
        "{:?}",
        failed.detail
    );
    // Without the driver's GPU list our name is not the driver's.
    let unnamed = serde_json::to_value(h.devices(false, None).unwrap()).unwrap();
    let failed = checks::devices(&unnamed, &gpus, true);
    assert!(
        failed.detail.iter().any(|d| d.contains("name")),
        "{:?}",
        failed.detail
    );
    // Named from pci.ids instead (no driver list given): any name will do, none will not.
    let mut pci_ids = json.clone();
    let idx = pci_ids
        .as_array()
        .unwrap()
        .iter()
        .position(|d| d["address"] == "0000:01:00.0")
        .unwrap();
    pci_ids[idx]["device_name"] = serde_json::json!("AD102 [GeForce RTX 4090]");
    assert_eq!(
        checks::devices(&pci_ids, &gpus, false).outcome,
        Outcome::Held
    );
    pci_ids[idx]["device_name"] = serde_json::Value::Null;
    assert_eq!(
        checks::devices(&pci_ids, &gpus, false).outcome,
        Outcome::Failed
    );

    let doctor = serde_json::to_value(h.doctor(None).unwrap()).unwrap();
    let groups = std::fs::read_dir(host.sys.join("kernel/iommu_groups"))
        .unwrap()
        .count();
    let ok = checks::doctor(&doctor, &gpus, groups);
    assert_eq!(ok.outcome, Outcome::Held, "{:?}", ok.detail);
    let failed = checks::doctor(&doctor, &gpus, 0);
    assert_eq!(
        failed.outcome,
        Outcome::Failed,
        "an IOMMU verdict that contradicts sysfs"
    );
}

#[test]
fn plan_holds_when_it_explains_or_refuses_and_fails_when_anything_changed() {
    let (host, _roots) = live_host();
    let h = host.host();
    std::fs::create_dir_all(&host.state).unwrap();
    let dev = host.sys.join("bus/pci/devices/0000:01:00.0");
    let watched = vec![
        host.state.clone(),
        dev.join("driver"),
        dev.join("driver_override"),
    ];
    let before = checks::fingerprint(&watched);
    let plan = h
        .plan(&PlanRequest {
            devices: vec!["0000:01:00.0".parse().unwrap()],
            ..PlanRequest::default()
        })
        .unwrap();
    let code = if plan.refusals.is_empty() { 0 } else { 4 };
    let json = serde_json::to_value(&plan).unwrap();
    let after = checks::fingerprint(&watched);
    let held = checks::plan("0000:01:00.0", Some(code), &json, &before, &after);
    assert_eq!(held.outcome, Outcome::Held, "{:?}", held.detail);

    // A plan that wrote a state file, or changed driver_override, fails.
    std::fs::write(host.state.join("journal.json"), "{}").unwrap();
    std::fs::write(dev.join("driver_override"), "vfio-pci\n").unwrap();
    let changed = checks::fingerprint(&watched);
    let failed = checks::plan("0000:01:00.0", Some(code), &json, &before, &changed);
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(
        failed.detail[0].contains("journal.json"),
        "{:?}",
        failed.detail
    );
    assert!(
        failed.detail[0].contains("driver_override"),
        "{:?}",
        failed.detail
    );
    // Exit 4 without refusals, or a crash, is not an answer.
    let failed = checks::plan(
        "0000:01:00.0",
        Some(4),
        &serde_json::json!({}),
        &before,
        &before,
    );
    assert_eq!(failed.outcome, Outcome::Failed);
}

fn node(dev: &Path, name: &str, major: u64, minor: u64, mode: u32) {
    let p = dev.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    mknod(
        &p,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

#[test]
fn nodes_hold_against_a_matching_dev_and_fail_on_each_kind_of_difference() {
    let dir = tempfile::tempdir().unwrap();
    let proc = dir.path().join("proc");
    let dev = dir.path().join("dev");
    write(
        &proc.join("devices"),
        "Character devices:\n195 nvidia-frontend\n236 nvidia-uvm\n237 nvidia-caps\n\nBlock devices:\n",
    );
    // Non-contiguous minors, as on a host where one GPU went to a VM.
    write(
        &proc.join("driver/nvidia/gpus/0000:41:00.0/information"),
        &information("NVIDIA H100 80GB HBM3", 1),
    );
    write(
        &proc.join("driver/nvidia/gpus/0000:c1:00.0/information"),
        &information("NVIDIA H100 80GB HBM3", 3),
    );
    write(
        &proc.join("driver/nvidia/capabilities/mig/config"),
        "DeviceFileMinor: 1\nDeviceFileMode: 256\n",
    );
    write(
        &proc.join("driver/nvidia/capabilities/mig/monitor"),
        "DeviceFileMinor: 2\nDeviceFileMode: 292\n",
    );
    std::fs::create_dir_all(&dev).unwrap();
    node(&dev, "nvidiactl", 195, 255, 0o666);
    node(&dev, "nvidia1", 195, 1, 0o666);
    node(&dev, "nvidia3", 195, 3, 0o666);
    node(&dev, "nvidia-uvm", 236, 0, 0o666);
    node(&dev, "nvidia-uvm-tools", 236, 1, 0o666);
    node(&dev, "nvidia-caps/nvidia-cap1", 237, 1, 0o400);
    node(&dev, "nvidia-caps/nvidia-cap2", 237, 2, 0o444);
    let dry = || {
        dryrun::run(&DryRunArgs {
            proc_root: proc.clone(),
            dev_dir: dev.clone(),
            manifest: None,
            json: true,
        })
        .unwrap()
    };
    let held = checks::nodes(&dry(), &facts::nvidia_nodes(&dev), 2);
    assert_eq!(held.outcome, Outcome::Held, "{:?}", held.detail);
    assert!(
        held.detail
            .iter()
            .any(|d| d.contains("nvidia-modeset is not present")),
        "{:?}",
        held.detail
    );

    // The GPU count must match.
    assert_eq!(
        checks::nodes(&dry(), &facts::nvidia_nodes(&dev), 3).outcome,
        Outcome::Failed
    );
    // A capability with another mode than the driver's.
    std::fs::set_permissions(
        dev.join("nvidia-caps/nvidia-cap1"),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let failed = checks::nodes(&dry(), &facts::nvidia_nodes(&dev), 2);
    assert!(
        failed
            .detail
            .iter()
            .any(|d| d.contains("nvidia-cap1 has mode 666")),
        "{:?}",
        failed.detail
    );
    std::fs::set_permissions(
        dev.join("nvidia-caps/nvidia-cap1"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .unwrap();
    // A real node at another minor, a real node we would not make, a GPU node missing.
    std::fs::remove_file(dev.join("nvidia3")).unwrap();
    node(&dev, "nvidia3", 195, 2, 0o666);
    node(&dev, "nvidia7", 195, 7, 0o666);
    let failed = checks::nodes(&dry(), &facts::nvidia_nodes(&dev), 2);
    assert_eq!(failed.outcome, Outcome::Failed);
    let d = failed.detail.join("\n");
    assert!(
        d.contains("/dev/nvidia3 is 195:2 but we would make 195:3"),
        "{d}"
    );
    assert!(
        d.contains("/dev/nvidia7 (195:7) exists but we would not make it"),
        "{d}"
    );
    std::fs::remove_file(dev.join("nvidia1")).unwrap();
    let failed = checks::nodes(&dry(), &facts::nvidia_nodes(&dev), 2);
    assert!(
        failed
            .detail
            .join("\n")
            .contains("we would make /dev/nvidia1 but the system has none")
    );
}

fn report_line(status: Status, version: &str, gpus: u32, module: ModuleResult) -> String {
    let mut r = Report::new("6.8.0".into());
    r.status = status;
    r.driver_version = Some(version.into());
    r.gpus = gpus;
    r.modules.push(ModuleReport {
        name: "nvidia".into(),
        result: module,
        class: None,
        errno: None,
        dependency: None,
        message: None,
    });
    format!("some other output\n{}\n", r.line())
}

#[test]
fn the_report_check_wants_ok_the_real_version_and_count_and_nothing_loaded() {
    let ok = report_line(Status::Ok, "580.65.06", 2, ModuleResult::AlreadyLoaded);
    assert_eq!(checks::report(&ok, "580.65.06", 2).outcome, Outcome::Held);
    for (out, what) in [
        (
            report_line(
                Status::Degraded,
                "580.65.06",
                2,
                ModuleResult::AlreadyLoaded,
            ),
            "status",
        ),
        (
            report_line(Status::Ok, "535.261.03", 2, ModuleResult::AlreadyLoaded),
            "driver_version",
        ),
        (
            report_line(Status::Ok, "580.65.06", 1, ModuleResult::AlreadyLoaded),
            "gpus 1",
        ),
        (
            report_line(Status::Ok, "580.65.06", 2, ModuleResult::Loaded),
            "want already_loaded",
        ),
        ("no report here\n".to_string(), "0 GPU-INIT lines"),
        ("GPU-INIT {\"status\":1}\n".to_string(), "does not parse"),
    ] {
        let c = checks::report(&out, "580.65.06", 2);
        assert_eq!(c.outcome, Outcome::Failed, "{what}");
        assert!(c.detail.join(" ").contains(what), "{what}: {:?}", c.detail);
    }
}

#[test]
fn loader_cache_and_nvidia_smi_output_parse() {
    let cache = "1234 libs found in cache `/etc/ld.so.cache'\n\
        \tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1\n\
        \tlibcuda.so.1 (libc6) => /lib/i386-linux-gnu/libcuda.so.1\n\
        \tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6\n";
    let e = inject::ldconfig_entries(cache);
    assert_eq!(
        e,
        [
            (
                "libcuda.so.1".to_string(),
                PathBuf::from("/lib/x86_64-linux-gnu/libcuda.so.1")
            ),
            (
                "libc.so.6".to_string(),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
            ),
        ]
    );
    let smi = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-4a7e0d5c-0000-0000-0000-000000000000)\n\
        GPU 1: NVIDIA H200 (UUID: GPU-1)\n";
    assert_eq!(
        inject::smi_names(smi),
        ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    );

    // Links resolved as the chrooted loader would: absolute targets stay inside the root.
    let root = tempfile::tempdir().unwrap();
    let lib = root.path().join("usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib).unwrap();
    std::os::unix::fs::symlink(
        "/usr/lib/gpu-passthrough/lib/libcuda.so.580.65.06",
        lib.join("libcuda.so.1"),
    )
    .unwrap();
    assert_eq!(
        inject::resolve_in_root(
            root.path(),
            Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1")
        ),
        Path::new("/usr/lib/gpu-passthrough/lib/libcuda.so.580.65.06")
    );
}

#[test]
fn the_cuda_probe_reports_a_missing_libcuda_instead_of_crashing() {
    let p = gpu_passthrough_real_gpu::probe::run(c"libgpu-passthrough-no-such-cuda.so.1");
    assert_eq!(p.init, None);
    assert_eq!(p.count, 0);
    assert!(
        p.error
            .unwrap()
            .contains("libgpu-passthrough-no-such-cuda.so.1")
    );
}

fn libs_tar() -> PathBuf {
    gpu_passthrough_tests::fixtures::path(
        "nvidia-535.261.03/nvidia-driver-libs-535.261.03-x86_64.tar.gz",
    )
}

/// The shipped guest init, built by cargo like the user's build.
fn gpu_init() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "gpu-passthrough-init",
            "--bin",
            "gpu-init",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/gpu-init")
}

#[test]
fn injection_of_an_installed_driver_reaches_the_roots_loader_and_libcuda_loads_there() {
    // An "installed driver": the real 535.261.03 libraries, as the loader cache would list them.
    let installed = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(libs_tar())
        .arg("-C")
        .arg(installed.path())
        .status()
        .unwrap();
    assert!(status.success());
    let lib = installed.path().join("usr/lib/nvidia");
    let host_cache = String::from_utf8(
        std::process::Command::new("/sbin/ldconfig")
            .arg("-p")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let libc_line = host_cache
        .lines()
        .find(|l| l.trim_start().starts_with("libc.so.6 (libc6,x86-64"))
        .expect("the host's libc in its loader cache");
    let cache = format!(
        "\tlibcuda.so.1 (libc6,x86-64) => {}\n\tlibnvidia-ml.so.1 (libc6,x86-64) => {}\n{libc_line}\n",
        lib.join("libcuda.so.1").display(),
        lib.join("libnvidia-ml.so.1").display()
    );
    let gpu_init = gpu_init();
    let scratch = installed.path().join("scratch");
    inject::private_scratch(&scratch).unwrap();
    let inputs = inject::Inputs {
        driver_version: "535.261.03",
        gpus: &[],
        ldconfig_p: &cache,
        nvidia_smi: None,
        ldconfig: PathBuf::from("/sbin/ldconfig"),
        gpu_init,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_real-gpu")),
        scratch: scratch.clone(),
    };
    let (check, setup) = inject::run(&inputs);
    // No GPU here: nvidia-smi is absent and cuInit fails, so the check fails...
    assert_eq!(check.outcome, Outcome::Failed);
    // ...but the root's own ldconfig resolves libcuda.so.1 to the injected driver,
    assert!(
        check
            .detail
            .iter()
            .any(|d| d.starts_with("ldconfig -p: libcuda.so.1 =>")
                && d.contains("libcuda.so.535.261.03")),
        "{:?}",
        check.detail
    );
    // the probe found and loaded libcuda.so.1 through it (cuInit ran and said no device),
    let cuda = &check.facts["cuda"];
    assert!(cuda["init"].as_i64().is_some_and(|rc| rc != 0), "{cuda}");
    assert!(
        check.detail.iter().any(|d| d.contains("nvidia-smi")),
        "{:?}",
        check.detail
    );
    // and the setup reported once, with the driver's version, having loaded nothing.
    let report = checks::report(&setup, "535.261.03", 0);
    assert!(
        !report.detail.iter().any(|d| d.contains("GPU-INIT lines")
            || d.contains("driver_version")
            || d.contains("parse")),
        "{:?}",
        report.detail
    );
    // A library that is not the loaded driver's version is refused before anything is built.
    let scratch2 = installed.path().join("scratch2");
    std::fs::create_dir_all(&scratch2).unwrap();
    let (check, _) = inject::run(&inject::Inputs {
        driver_version: "580.65.06",
        scratch: scratch2,
        ..inputs
    });
    assert!(
        check.detail[0].contains("not the loaded driver 580.65.06"),
        "{:?}",
        check.detail
    );
    inject::drop_scratch(&scratch);
    inject::drop_scratch(&installed.path().join("scratch2"));
}
