//! The GPU setup against fake /proc trees and temp roots, with real mknod, bind mounts and chroot
//! (tests run as root, in a private mount namespace per test).

mod common;

use common::{DRIVER, FakeKernel, Guest, Outcome, RootKind};
use gpu_passthrough_guest_contract::report::{
    FailureClass, LdconfigStatus, ModuleResult, NodeAction, Report, SetupErrorClass, Status,
};
use gpu_passthrough_init::setup;
use nix::errno::Errno;
use serde_json::Value;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

fn run(guest: &Guest, kernel: &FakeKernel) -> Report {
    setup::run(&guest.context(), kernel)
}

fn json(report: &Report) -> Value {
    let line = report.line();
    assert!(!line.contains('\n'), "the report must be one line");
    let body = line.strip_prefix("GPU-INIT ").expect("report line prefix");
    serde_json::from_str(body).unwrap()
}

fn results(report: &Report) -> Vec<(&str, ModuleResult, Option<FailureClass>)> {
    report
        .modules
        .iter()
        .map(|m| (m.name.as_str(), m.result, m.class))
        .collect()
}

fn assert_char_node(path: &Path, major: u64, minor: u64) {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.file_type().is_char_device(),
        "{} is not a char device",
        path.display()
    );
    assert_eq!(
        meta.rdev(),
        nix::sys::stat::makedev(major, minor),
        "{}",
        path.display()
    );
    assert_eq!(meta.mode() & 0o7777, 0o660, "{}", path.display());
    assert_eq!(meta.gid(), 44, "{}", path.display());
}

#[test]
fn all_modules_load_and_everything_is_in_place_for_two_gpus() {
    let guest = Guest::new(RootKind::Debian, 2);
    let kernel = FakeKernel::new(&guest);
    let report = run(&guest, &kernel);
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    assert_eq!(
        kernel.calls.borrow().clone(),
        [
            ("nvidia.ko".into(), "NVreg_DeviceFileMode=0660".into()),
            ("nvidia-uvm.ko".into(), String::new()),
            ("nvidia-modeset.ko".into(), String::new()),
            ("nvidia-drm.ko".into(), "modeset=1".into()),
        ]
    );
    assert!(
        report
            .modules
            .iter()
            .all(|m| m.result == ModuleResult::Loaded)
    );
    assert_eq!(report.gpus, 2);
    assert_eq!(report.driver_version.as_deref(), Some(DRIVER));

    // Nodes in /dev and in the root's /dev.
    for dev in [&guest.dev, &guest.root.join("dev")] {
        assert_char_node(&dev.join("nvidiactl"), 195, 255);
        assert_char_node(&dev.join("nvidia0"), 195, 0);
        assert_char_node(&dev.join("nvidia1"), 195, 1);
        assert_char_node(&dev.join("nvidia-modeset"), 195, 254);
        assert_char_node(&dev.join("nvidia-uvm"), 236, 0);
        assert_char_node(&dev.join("nvidia-uvm-tools"), 236, 1);
        assert!(!dev.join("nvidia2").exists());
    }
    assert_eq!(report.nodes.len(), 12);
    assert!(report.nodes.iter().all(|n| n.action == NodeAction::Created));

    // Libraries: soname links into the read-only layer mount, ldconfig's cache points at ours.
    let libdir = guest.root.join("usr/lib/x86_64-linux-gnu");
    assert_eq!(
        std::fs::read_link(libdir.join("libcuda.so.1")).unwrap(),
        Path::new("/usr/lib/gpu-passthrough/lib/libcuda.so.535.261.03")
    );
    assert_eq!(
        report.libraries.dir.as_deref(),
        Some("/usr/lib/x86_64-linux-gnu")
    );
    assert_eq!(
        report.libraries.injected,
        [
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
        ]
    );
    assert!(report.libraries.shadowed.is_empty());
    assert_eq!(report.libraries.ldconfig, LdconfigStatus::Ok);
    let cache = guest.in_root("/sbin/ldconfig", &["-p"]);
    assert!(
        cache
            .lines()
            .any(|l| l.contains("libcuda.so.1 ") && l.contains("=> /usr/lib/")),
        "ld.so.cache lacks libcuda.so.1:\n{cache}"
    );
    assert_eq!(
        std::fs::read_to_string(guest.root.join("etc/ld.so.conf.d/000-nvidia.conf")).unwrap(),
        "/usr/lib/gpu-passthrough/lib\n"
    );
    let mounted = guest.root.join("usr/lib/gpu-passthrough/lib/libcuda.so.1");
    assert_eq!(
        std::fs::metadata(&mounted).unwrap().len(),
        std::fs::metadata(common::real_libs().join("libcuda.so.535.261.03"))
            .unwrap()
            .len()
    );
    let write_err = std::fs::write(guest.root.join("usr/lib/gpu-passthrough/x"), b"x").unwrap_err();
    assert_eq!(
        write_err.raw_os_error(),
        Some(libc::EROFS),
        "the layer mount must be read-only"
    );

    // Programs, firmware path, CDI.
    assert_eq!(report.binaries, ["/usr/local/bin/nvidia-smi"]);
    assert_eq!(
        std::fs::read_link(guest.root.join("usr/local/bin/nvidia-smi")).unwrap(),
        Path::new("/usr/lib/gpu-passthrough/bin/nvidia-smi")
    );
    assert_eq!(
        std::fs::read_to_string(guest.sys_root.join("module/firmware_class/parameters/path"))
            .unwrap(),
        "/usr/lib/gpu-passthrough/firmware"
    );
    assert!(
        guest
            .root
            .join("usr/lib/gpu-passthrough/firmware/nvidia/535.261.03/gsp_ga10x.bin")
            .is_file(),
        "firmware must stay reachable from inside the root"
    );
    assert_eq!(report.cdi.as_deref(), Some("/etc/cdi/nvidia.json"));
    let cdi: Value =
        serde_json::from_slice(&std::fs::read(guest.root.join("etc/cdi/nvidia.json")).unwrap())
            .unwrap();
    assert_eq!(cdi["cdiVersion"], "0.6.0");
    assert_eq!(cdi["kind"], "nvidia.com/gpu");
    let names: Vec<&str> = cdi["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["0", "1", "all"]);
    assert_eq!(
        cdi["devices"][2]["containerEdits"]["deviceNodes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let common_nodes = cdi["containerEdits"]["deviceNodes"].to_string();
    for n in [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidia-modeset",
    ] {
        assert!(common_nodes.contains(n), "{n} missing from {common_nodes}");
    }
    assert!(cdi["containerEdits"]["mounts"].to_string().contains(
        r#""containerPath":"/usr/lib/x86_64-linux-gnu/libcuda.so.535.261.03","hostPath":"/usr/lib/gpu-passthrough/lib/libcuda.so.535.261.03""#
    ));

    // The report line is the documented JSON.
    let v = json(&report);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["gpus"], 2);
    assert_eq!(v["modules"][1]["result"], "loaded");
    assert_eq!(v["libraries"]["ldconfig"], "ok");
    for step in ["modules", "nodes", "libraries", "cdi", "total"] {
        assert!(v["timings_ms"][step].is_u64(), "timings_ms.{step} missing");
    }
}

#[test]
fn module_parameters_on_the_kernel_command_line_reach_the_module() {
    let guest = Guest::new(RootKind::Debian, 1);
    std::fs::write(
        guest.proc_root.join("cmdline"),
        format!(
            "console=ttyS0 HAS_GPU=1 {} nvidia-drm.fbdev=1\n",
            gpu_passthrough_guest_contract::NVLINK_DISABLE
        ),
    )
    .unwrap();
    let kernel = FakeKernel::new(&guest);
    let report = run(&guest, &kernel);
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    let calls = kernel.calls.borrow().clone();
    assert_eq!(
        calls[0],
        (
            "nvidia.ko".into(),
            "NVreg_DeviceFileMode=0660 NVreg_NvLinkDisable=1".into()
        )
    );
    assert_eq!(
        calls[3],
        ("nvidia-drm.ko".into(), "modeset=1 fbdev=1".into())
    );
    assert_eq!(calls[1], ("nvidia-uvm.ko".into(), String::new()));
}

#[test]
fn a_second_run_keeps_what_the_first_made() {
    let guest = Guest::new(RootKind::Debian, 1);
    let first = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(first.status, Status::Ok, "{}", first.line());
    let mounts = guest.mounts().len();
    let kernel = FakeKernel::new(&guest).with("nvidia.ko", Outcome::Fail(Errno::EEXIST));
    let second = run(&guest, &kernel);
    assert_eq!(second.status, Status::Ok, "{}", second.line());
    assert_eq!(second.modules[0].result, ModuleResult::AlreadyLoaded);
    assert!(second.nodes.iter().all(|n| n.action == NodeAction::Kept));
    assert_eq!(
        guest.mounts().len(),
        mounts,
        "no mount stacked on the first run's"
    );
    assert!(
        second.libraries.shadowed.is_empty(),
        "our own links are not the workload's files"
    );
}

#[test]
fn wrong_nodes_are_replaced_and_modes_fixed() {
    let guest = Guest::new(RootKind::Debian, 1);
    std::fs::write(guest.dev.join("nvidia0"), b"not a device").unwrap();
    nix::sys::stat::mknod(
        &guest.dev.join("nvidiactl"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(195, 7),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &guest.dev.join("nvidia-uvm"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(236, 0),
    )
    .unwrap();
    let report = run(&guest, &FakeKernel::new(&guest));
    let action = |p: &str| {
        report
            .nodes
            .iter()
            .find(|n| n.path == guest.dev.join(p).display().to_string())
            .unwrap()
            .action
    };
    assert_eq!(action("nvidia0"), NodeAction::Replaced);
    assert_eq!(action("nvidiactl"), NodeAction::Replaced);
    assert_eq!(action("nvidia-uvm"), NodeAction::Kept);
    assert_char_node(&guest.dev.join("nvidia0"), 195, 0);
    assert_char_node(&guest.dev.join("nvidiactl"), 195, 255);
    assert_char_node(&guest.dev.join("nvidia-uvm"), 236, 0);
}

#[test]
fn enodev_is_no_gpu_and_dependents_are_skipped_not_tried() {
    let guest = Guest::new(RootKind::Debian, 0);
    guest.unregister_driver();
    let kernel = FakeKernel::new(&guest).with(
        "nvidia.ko",
        Outcome::FailWithLog(Errno::ENODEV, "NVRM: No NVIDIA GPU found.".into()),
    );
    let report = run(&guest, &kernel);
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        kernel.loaded_files(),
        ["nvidia.ko"],
        "dependents of a failed module must not be tried"
    );
    assert_eq!(
        results(&report),
        [
            ("nvidia", ModuleResult::Failed, Some(FailureClass::NoGpu)),
            (
                "nvidia_uvm",
                ModuleResult::Skipped,
                Some(FailureClass::NoGpu)
            ),
            (
                "nvidia_modeset",
                ModuleResult::Skipped,
                Some(FailureClass::NoGpu)
            ),
            (
                "nvidia_drm",
                ModuleResult::Skipped,
                Some(FailureClass::NoGpu)
            ),
        ]
    );
    assert_eq!(report.modules[0].errno, Some(libc::ENODEV));
    let msg = report.modules[0].message.as_deref().unwrap();
    assert!(msg.contains("no NVIDIA GPU visible to this guest"), "{msg}");
    assert_eq!(report.modules[1].dependency.as_deref(), Some("nvidia"));
    assert_eq!(
        report.modules[3].dependency.as_deref(),
        Some("nvidia_modeset")
    );
    assert!(report.nodes.is_empty());
    assert_eq!(report.gpus, 0);
    assert_eq!(
        report.cdi, None,
        "no CDI spec for a driver that did not load"
    );
    assert!(!guest.root.join("etc/cdi/nvidia.json").exists());
    let v = json(&report);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["modules"][0]["class"], "no_gpu");
    assert_eq!(v["modules"][0]["errno"], 19);
    assert_eq!(v["modules"][2]["result"], "skipped");
    assert_eq!(v["modules"][2]["dependency"], "nvidia");
}

#[test]
fn enoexec_is_wrong_kernel_naming_both_versions() {
    let guest = Guest::new(RootKind::Debian, 1);
    guest.unregister_driver();
    let mut ctx = guest.context();
    ctx.kernel_release = "6.12.8-cloud".into();
    let kernel = FakeKernel::new(&guest).with("nvidia.ko", Outcome::Fail(Errno::ENOEXEC));
    let report = setup::run(&ctx, &kernel);
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.modules[0].class, Some(FailureClass::WrongKernel));
    let msg = report.modules[0].message.as_deref().unwrap();
    assert!(
        msg.contains("6.1.0-56-amd64 SMP preempt mod_unload modversions"),
        "{msg}"
    );
    assert!(msg.contains("running 6.12.8-cloud"), "{msg}");
    assert_eq!(report.kernel, "6.12.8-cloud");

    let einval = FakeKernel::new(&guest).with("nvidia.ko", Outcome::Fail(Errno::EINVAL));
    assert_eq!(
        setup::run(&ctx, &einval).modules[0].class,
        Some(FailureClass::WrongKernel)
    );
}

/// EKEYREJECTED with each record Linux 6.1 logs for it (kernel/module/signing.c), and without one
/// (a signature that does not verify).
#[test]
fn a_refused_signature_is_signature_rejected_with_the_kernels_reason_and_the_fix() {
    let guest = Guest::new(RootKind::Debian, 1);
    guest.unregister_driver();
    for (line, reason) in [
        ("Loading of unsigned module is rejected", "unsigned module"),
        (
            "Loading of module with unavailable key is rejected",
            "module with unavailable key",
        ),
        (
            "Loading of module with unsupported crypto is rejected",
            "module with unsupported crypto",
        ),
    ] {
        let kernel = FakeKernel::new(&guest).with(
            "nvidia.ko",
            Outcome::FailWithLog(Errno::EKEYREJECTED, line.into()),
        );
        let report = run(&guest, &kernel);
        assert_eq!(report.status, Status::Failed);
        let nvidia = &report.modules[0];
        assert_eq!(
            nvidia.class,
            Some(FailureClass::SignatureRejected),
            "{line}"
        );
        assert_eq!(nvidia.errno, Some(129));
        let msg = nvidia.message.as_deref().unwrap();
        assert!(msg.starts_with(&format!("nvidia: {reason}: ")), "{msg}");
        assert!(msg.contains(line), "{msg}");
        assert!(
            msg.contains("sign the modules with a key the guest kernel trusts"),
            "{msg}"
        );
        // The modules that depend on it are skipped with its class.
        assert_eq!(
            report.modules[1].class,
            Some(FailureClass::SignatureRejected)
        );
        assert_eq!(report.modules[1].result, ModuleResult::Skipped);
        assert_eq!(json(&report)["modules"][0]["class"], "signature_rejected");
    }
    let bad = FakeKernel::new(&guest).with("nvidia.ko", Outcome::Fail(Errno::EKEYREJECTED));
    let report = run(&guest, &bad);
    assert_eq!(
        report.modules[0].class,
        Some(FailureClass::SignatureRejected)
    );
    let msg = report.modules[0].message.as_deref().unwrap();
    assert!(msg.contains("changed after it was signed"), "{msg}");
    // A signature line next to another errno does not make it a signature failure.
    let other = FakeKernel::new(&guest).with(
        "nvidia.ko",
        Outcome::FailWithLog(Errno::EIO, "Loading of unsigned module is rejected".into()),
    );
    assert_eq!(
        run(&guest, &other).modules[0].class,
        Some(FailureClass::Other)
    );
}

#[test]
fn missing_firmware_names_the_file_from_the_kernel_log() {
    let guest = Guest::new(RootKind::Debian, 1);
    guest.unregister_driver();
    let fw = "nvidia/535.261.03/gsp_ga10x.bin";
    let kernel = FakeKernel::new(&guest).with(
        "nvidia.ko",
        Outcome::FailWithLog(
            Errno::ENOENT,
            format!("nvidia 0000:00:05.0: Direct firmware load for {fw} failed with error -2"),
        ),
    );
    let report = run(&guest, &kernel);
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.modules[0].class, Some(FailureClass::MissingFirmware));
    assert!(report.modules[0].message.as_deref().unwrap().contains(fw));
    assert_eq!(report.firmware.missing, [fw]);
    assert_eq!(json(&report)["modules"][0]["class"], "missing_firmware");
}

#[test]
fn rm_init_adapter_failure_is_init_failed_not_other() {
    let guest = Guest::new(RootKind::Debian, 1);
    guest.unregister_driver();
    // As in bryansteiner/gpu-passthrough-tutorial issue #39: the GPU did not come out of D3cold.
    let kernel = FakeKernel::new(&guest).with(
        "nvidia.ko",
        Outcome::FailWithLog(
            Errno::EIO,
            "NVRM: GPU 0000:00:05.0: RmInitAdapter failed! (0x22:0x56:667)".into(),
        ),
    );
    let report = run(&guest, &kernel);
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.modules[0].class, Some(FailureClass::InitFailed));
    let msg = report.modules[0].message.as_deref().unwrap();
    assert!(
        msg.contains("RmInitAdapter failed! (0x22:0x56:667)"),
        "{msg}"
    );
    assert_eq!(json(&report)["modules"][0]["class"], "init_failed");
    // Without the line the same errno stays `other`.
    let plain = FakeKernel::new(&guest).with("nvidia.ko", Outcome::Fail(Errno::EIO));
    assert_eq!(
        run(&guest, &plain).modules[0].class,
        Some(FailureClass::Other)
    );
}

#[test]
fn firmware_absent_from_the_layer_is_reported() {
    let guest = Guest::new(RootKind::Debian, 1);
    std::fs::remove_file(
        guest
            .layer
            .join("gpu/firmware/nvidia/535.261.03/gsp_tu10x.bin"),
    )
    .unwrap();
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.status, Status::Degraded);
    assert_eq!(
        report.firmware.missing,
        ["/gpu/firmware/nvidia/535.261.03/gsp_tu10x.bin"]
    );
    assert!(report.problems.iter().any(|p| p.contains("gsp_tu10x.bin")));
}

#[test]
fn unknown_symbol_is_other_with_the_kernel_line_and_only_its_dependents_skip() {
    let guest = Guest::new(RootKind::Debian, 1);
    let line = "nvidia_modeset: Unknown symbol nvKmsKapiGetFunctionsTable (err -2)";
    let kernel = FakeKernel::new(&guest).with(
        "nvidia-modeset.ko",
        Outcome::FailWithLog(Errno::ENOENT, line.into()),
    );
    let report = run(&guest, &kernel);
    assert_eq!(
        results(&report),
        [
            ("nvidia", ModuleResult::Loaded, None),
            ("nvidia_uvm", ModuleResult::Loaded, None),
            (
                "nvidia_modeset",
                ModuleResult::Failed,
                Some(FailureClass::Other)
            ),
            (
                "nvidia_drm",
                ModuleResult::Skipped,
                Some(FailureClass::Other)
            ),
        ]
    );
    assert_eq!(report.modules[2].errno, Some(libc::ENOENT));
    assert!(report.modules[2].message.as_deref().unwrap().contains(line));
    assert_eq!(report.status, Status::Failed);
}

#[test]
fn a_module_file_missing_from_the_layer_is_named() {
    let guest = Guest::new(RootKind::Debian, 1);
    std::fs::remove_file(guest.layer.join("gpu/modules/nvidia-drm.ko")).unwrap();
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.modules[3].result, ModuleResult::Failed);
    assert_eq!(report.modules[3].class, Some(FailureClass::MissingFile));
    assert_eq!(report.modules[3].errno, Some(libc::ENOENT));
    assert!(
        report.modules[3]
            .message
            .as_deref()
            .unwrap()
            .contains("nvidia-drm.ko")
    );
}

#[test]
fn zero_gpus_makes_control_nodes_only_and_is_degraded() {
    let guest = Guest::new(RootKind::Debian, 0);
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.gpus, 0);
    assert_eq!(report.status, Status::Degraded);
    assert!(report.problems.iter().any(|p| p.contains("sees no GPU")));
    assert!(guest.dev.join("nvidiactl").exists());
    assert!(!guest.dev.join("nvidia0").exists());
    let cdi: Value =
        serde_json::from_slice(&std::fs::read(guest.root.join("etc/cdi/nvidia.json")).unwrap())
            .unwrap();
    assert_eq!(cdi["devices"].as_array().unwrap().len(), 1, "only `all`");
}

#[test]
fn four_gpus_get_four_nodes_and_cdi_devices() {
    let guest = Guest::new(RootKind::Debian, 4);
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.gpus, 4);
    for i in 0..4 {
        assert_char_node(&guest.dev.join(format!("nvidia{i}")), 195, i);
    }
    let cdi: Value =
        serde_json::from_slice(&std::fs::read(guest.root.join("etc/cdi/nvidia.json")).unwrap())
            .unwrap();
    assert_eq!(cdi["devices"].as_array().unwrap().len(), 5);
}

#[test]
fn musl_root_without_glibc_ldconfig_is_reported_not_fatal() {
    let guest = Guest::new(RootKind::Musl, 1);
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.status, Status::Degraded, "{}", report.line());
    assert_eq!(report.libraries.ldconfig, LdconfigStatus::Missing);
    assert!(
        report
            .libraries
            .ldconfig_message
            .as_deref()
            .unwrap()
            .contains("no glibc ldconfig")
    );
    assert_eq!(report.libraries.dir.as_deref(), Some("/usr/lib"));
    assert_eq!(
        std::fs::read_link(guest.root.join("usr/lib/libcuda.so.1")).unwrap(),
        Path::new("/usr/lib/gpu-passthrough/lib/libcuda.so.535.261.03")
    );
    assert!(
        !guest.root.join("etc/ld.so.cache").exists(),
        "the shell-script ldconfig must not run"
    );
    assert_eq!(json(&report)["libraries"]["ldconfig"], "missing");
    assert!(report.cdi.is_some());
}

#[test]
fn the_drivers_libcuda_wins_over_the_workloads_own_which_is_kept() {
    let guest = Guest::new(RootKind::Debian, 1);
    let libdir = guest.root.join("usr/lib/x86_64-linux-gnu");
    let theirs = b"workload libcuda 470.57.02";
    std::fs::write(libdir.join("libcuda.so.470.57.02"), theirs).unwrap();
    std::os::unix::fs::symlink("libcuda.so.470.57.02", libdir.join("libcuda.so.1")).unwrap();
    // A second copy on the loader's default path, outside the chosen library dir.
    std::fs::create_dir_all(guest.root.join("usr/lib")).unwrap();
    std::fs::write(guest.root.join("usr/lib/libcuda.so.1"), b"another libcuda").unwrap();
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    assert_eq!(
        report.libraries.shadowed.len(),
        2,
        "{:?}",
        report.libraries.shadowed
    );
    assert_eq!(report.libraries.shadowed[1].file, "/usr/lib/libcuda.so.1");
    assert_eq!(report.libraries.shadowed[0].soname, "libcuda.so.1");
    assert_eq!(
        report.libraries.shadowed[0].file,
        "/usr/lib/x86_64-linux-gnu/libcuda.so.470.57.02"
    );
    let ours = std::fs::read(common::real_libs().join("libcuda.so.535.261.03")).unwrap();
    assert!(
        std::fs::read(libdir.join("libcuda.so.1")).unwrap() == ours,
        "the workload sees our libcuda"
    );
    let cache = guest.in_root("/sbin/ldconfig", &["-p"]);
    assert!(cache.contains("libcuda.so.1"), "{cache}");
    assert_eq!(
        json(&report)["libraries"]["shadowed"][0]["file"],
        "/usr/lib/x86_64-linux-gnu/libcuda.so.470.57.02"
    );
    assert!(std::fs::read(guest.root.join("usr/lib/libcuda.so.1")).unwrap() == ours);
    guest.unmount_all();
    assert_eq!(
        std::fs::read(guest.root.join("usr/lib/libcuda.so.1")).unwrap(),
        b"another libcuda"
    );
    assert_eq!(
        std::fs::read(libdir.join("libcuda.so.470.57.02")).unwrap(),
        theirs,
        "their file is untouched"
    );
}

#[test]
fn has_gpu_without_a_gpu_layer_is_a_classified_failure() {
    let guest = Guest::new(RootKind::Debian, 1);
    let mut ctx = guest.context();
    ctx.manifest = guest.layer.join("gpu/absent.json");
    let kernel = FakeKernel::new(&guest);
    let report = setup::run(&ctx, &kernel);
    assert_eq!(report.status, Status::Failed);
    let error = report.error.as_ref().unwrap();
    assert_eq!(error.class, SetupErrorClass::NoGpuLayer);
    assert_eq!(json(&report)["error"]["class"], "no_gpu_layer");
    assert!(error.message.contains("absent.json") && error.message.contains("HAS_GPU=1"));
    assert!(kernel.loaded_files().is_empty());

    std::fs::write(&ctx.manifest, r#"{"schema": 99}"#).unwrap();
    let report = setup::run(&ctx, &kernel);
    let error = report.error.as_ref().unwrap();
    assert_eq!(error.class, SetupErrorClass::BadManifest);
    assert!(error.message.contains("schema"), "{}", error.message);
    assert_eq!(json(&report)["error"]["class"], "bad_manifest");

    // The serde cause of a malformed manifest is in the message, not lost behind its source.
    std::fs::write(&ctx.manifest, "{not json").unwrap();
    let message = setup::run(&ctx, &kernel).error.unwrap().message;
    assert!(
        message.contains("malformed GPU manifest: key must be a string"),
        "{message}"
    );
}

#[test]
fn an_ldconfig_that_cannot_run_is_failed_and_degraded() {
    let guest = Guest::new(RootKind::Debian, 1);
    // A dynamically linked program cannot start in a root without its loader.
    let ldconfig = guest.root.join("usr/sbin/ldconfig");
    std::fs::remove_file(&ldconfig).unwrap();
    std::fs::copy("/bin/false", &ldconfig).unwrap();
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.libraries.ldconfig, LdconfigStatus::Failed);
    assert_eq!(report.status, Status::Degraded);
    assert!(
        report
            .libraries
            .ldconfig_message
            .as_deref()
            .unwrap()
            .contains("/sbin/ldconfig")
    );
    assert_eq!(json(&report)["libraries"]["ldconfig"], "failed");
}

#[test]
fn mig_capability_nodes_are_made_when_the_driver_registers_them() {
    let guest = Guest::new(RootKind::Debian, 1);
    std::fs::write(
        guest.proc_root.join("devices"),
        "Character devices:\n195 nvidia-frontend\n236 nvidia-uvm\n237 nvidia-caps\n\nBlock devices:\n",
    )
    .unwrap();
    let caps = guest.proc_root.join("driver/nvidia/capabilities/mig");
    std::fs::create_dir_all(&caps).unwrap();
    std::fs::write(
        caps.join("config"),
        "DeviceFileMinor: 1\nDeviceFileMode: 256\n",
    )
    .unwrap();
    std::fs::write(
        caps.join("monitor"),
        "DeviceFileMinor: 2\nDeviceFileMode: 292\n",
    )
    .unwrap();
    let report = run(&guest, &FakeKernel::new(&guest));
    assert_eq!(report.status, Status::Ok, "{}", report.line());
    // The driver's modes (DeviceFileMode 256 = 0400, 292 = 0444), root's group: not the 0660 of
    // the other nodes.
    for (cap, minor, mode) in [("nvidia-cap1", 1, 0o400), ("nvidia-cap2", 2, 0o444)] {
        let meta = std::fs::symlink_metadata(guest.dev.join("nvidia-caps").join(cap)).unwrap();
        assert!(meta.file_type().is_char_device(), "{cap}");
        assert_eq!(meta.rdev(), nix::sys::stat::makedev(237, minor), "{cap}");
        assert_eq!(meta.mode() & 0o7777, mode, "{cap}");
        assert_eq!(meta.gid(), 0, "{cap}");
    }
}

/// Records `firmware_class.path` at each module load, as the kernel would see it then.
struct FirmwarePathSpy<'a> {
    kernel: &'a FakeKernel,
    param: std::path::PathBuf,
    seen: std::cell::RefCell<Vec<String>>,
}

impl gpu_passthrough_init::modules::ModuleLoader for FirmwarePathSpy<'_> {
    fn load(
        &self,
        path: &Path,
        params: &str,
    ) -> Result<(), gpu_passthrough_init::modules::LoadError> {
        self.seen
            .borrow_mut()
            .push(std::fs::read_to_string(&self.param).unwrap());
        self.kernel.load(path, params)
    }
}

#[test]
fn firmware_class_path_is_the_layer_firmware_while_modules_load() {
    // The GPU layer keeps firmware in /gpu/firmware (nothing outside /gpu), so the kernel's
    // default /lib/firmware would not find it: the path must be set before the first module.
    let guest = Guest::new(RootKind::Debian, 1);
    let kernel = FakeKernel::new(&guest);
    let spy = FirmwarePathSpy {
        kernel: &kernel,
        param: guest.sys_root.join("module/firmware_class/parameters/path"),
        seen: Default::default(),
    };
    let report = setup::run(&guest.context(), &spy);
    let layer_fw = guest.layer.join("gpu/firmware").display().to_string();
    let seen = spy.seen.borrow();
    assert!(!seen.is_empty(), "no module was loaded");
    assert!(
        seen.iter().all(|p| *p == layer_fw),
        "firmware_class.path while loading: {seen:?}, want {layer_fw}"
    );
    assert!(report.firmware.missing.is_empty(), "{:?}", report.firmware);
}
