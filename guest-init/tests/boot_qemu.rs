//! gpu-init as PID 1 of a real guest: the Debian 6.1 kernel under QEMU (TCG) with the real
//! 535.261.03 open modules and no GPU passed through. Checks the real `finit_module`
//! classification, the switch into a directory root, the workload run and the power-off.
//! Then the same payload as a read-only erofs image on virtio-pmem (`GPU_DISK=pmem`): the mount
//! modules from the base layer, the DAX mount, the same setup. Last, `module.sig_enforce=1`: the
//! unsigned NVIDIA modules are `signature_rejected`, Debian's signed ones load. Three boots, about
//! 10 s each. Needs `qemu-system-x86_64` (`apt-get install qemu-system-x86`) and `mkfs.erofs`
//! (`erofs-utils`).

mod common;

use gpu_passthrough_guest_contract::report::{
    FailureClass, ModuleResult, PayloadSource, Report, Status, parse_report_line,
};
use gpu_passthrough_guest_contract::{DeviceNodes, Manifest, Module, SCHEMA};
use gpu_passthrough_tests::fixtures;
use std::path::Path;
use std::process::Command;

const KDIR: &str = "lib/modules/6.1.0-56-amd64/kernel";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (name, file inside the tars, depends) in load order.
const MODULES: [(&str, &str, &[&str]); 8] = [
    ("drm", "drivers/gpu/drm/drm.ko", &[]),
    (
        "drm_kms_helper",
        "drivers/gpu/drm/drm_kms_helper.ko",
        &["drm"],
    ),
    ("wmi", "drivers/platform/x86/wmi.ko", &[]),
    ("video", "drivers/acpi/video.ko", &["wmi"]),
    ("nvidia", "drivers/gpu/nvidia.ko", &["drm"]),
    ("nvidia_uvm", "drivers/gpu/nvidia-uvm.ko", &["nvidia"]),
    (
        "nvidia_modeset",
        "drivers/gpu/nvidia-modeset.ko",
        &["nvidia", "video"],
    ),
    (
        "nvidia_drm",
        "drivers/gpu/nvidia-drm.ko",
        &["drm", "drm_kms_helper", "nvidia_modeset"],
    ),
];

/// The pmem mount closure in load order (each `depends=` first), under `kernel/` of the pmem
/// fixture's tarball.
const MOUNT_MODULES: [&str; 13] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "crypto/crc32c_generic.ko",
    "lib/libcrc32c.ko",
    "drivers/nvdimm/libnvdimm.ko",
    "drivers/nvdimm/nd_btt.ko",
    "drivers/nvdimm/nd_virtio.ko",
    "drivers/nvdimm/virtio_pmem.ko",
    "drivers/nvdimm/nd_pmem.ko",
    "fs/erofs/erofs.ko",
];

/// Move the tree's `/gpu` into an erofs image padded to 2 MiB and give the tree the mount
/// modules under `/gpu-disk`, as `initrd build --form disk` lays them out.
fn split_disk(dir: &Path, tree: &Path) -> std::path::PathBuf {
    let image = dir.join("gpu.erofs");
    run(Command::new("mkfs.erofs")
        .args(["-Enoinline_data", "--all-root", "-T0", "--quiet"])
        .arg(&image)
        .arg(tree.join("gpu")));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len.div_ceil(2 << 20) * (2 << 20)).unwrap();
    std::fs::remove_dir_all(tree.join("gpu")).unwrap();
    let x = dir.join("x-pmem");
    std::fs::create_dir_all(&x).unwrap();
    run(Command::new("tar")
        .arg("xzf")
        .arg(fixtures::path(fixtures::KERNEL_MODULES_PMEM))
        .arg("-C")
        .arg(&x)
        .args(MOUNT_MODULES.map(|m| format!("{KDIR}/{m}"))));
    let modules = tree.join("gpu-disk");
    std::fs::create_dir_all(&modules).unwrap();
    let mut order = String::new();
    for m in MOUNT_MODULES {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::copy(x.join(KDIR).join(m), modules.join(&name)).unwrap();
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(modules.join("order"), order).unwrap();
    image
}

fn pack(dir: &Path, tree: &Path) -> std::path::PathBuf {
    let initrd = dir.join("initrd.cpio");
    run(Command::new("sh").current_dir(tree).arg("-c").arg(format!(
        "find . | sort | cpio -o -H newc --quiet > {}",
        initrd.display()
    )));
    initrd
}

/// Boot the fixture kernel with `initrd`; returns the console and its one report.
fn boot(initrd: &Path, words: &str, qemu: &[String]) -> (String, Report) {
    let out = Command::new("timeout")
        .arg("180")
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-smp", "1", "-nographic", "-no-reboot"])
        .args(qemu)
        .arg("-kernel")
        .arg(fixtures::path(fixtures::KERNEL))
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet HAS_GPU=1 {words} GPU_INIT_ROOT=/workload -- /bin/gpu-init --help"
        ))
        .output()
        .expect("qemu-system-x86_64 must be installed: apt-get install qemu-system-x86");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "QEMU did not power off cleanly ({}):\n{console}",
        out.status
    );
    // The host reads the console through the contract's own parser and types.
    let mut reports: Vec<Report> = console
        .lines()
        .filter_map(parse_report_line)
        .map(|r| r.expect("the GPU-INIT line deserializes as the contract's Report"))
        .collect();
    assert_eq!(reports.len(), 1, "exactly one report line:\n{console}");
    (console, reports.remove(0))
}

/// What both boots must show: the real modules' outcomes on a GPU-less guest, the workload run
/// inside the new root (its copy of gpu-init printed the usage) and the power-off.
fn assert_gpu_less_setup(console: &str, report: &Report) {
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.kernel, "6.1.0-56-amd64");
    let module = |name: &str| {
        report
            .module(name)
            .unwrap_or_else(|| panic!("{name} not in the report"))
    };
    for loaded in ["drm", "drm_kms_helper", "wmi", "video"] {
        assert_eq!(
            module(loaded).result,
            ModuleResult::Loaded,
            "{loaded}: {report:?}"
        );
    }
    let nvidia = module("nvidia");
    assert_eq!(nvidia.result, ModuleResult::Failed);
    assert_eq!(nvidia.class, Some(FailureClass::NoGpu));
    assert_eq!(nvidia.errno, Some(19));
    assert_eq!(module("nvidia_uvm").result, ModuleResult::Skipped);
    assert_eq!(
        module("nvidia_drm").dependency.as_deref(),
        Some("nvidia_modeset")
    );
    assert_eq!(report.gpus, 0);
    assert!(
        console.contains("usage: gpu-init setup --root DIR"),
        "{console}"
    );
    assert!(
        console.contains("gpu-init: workload exited with status 0; powering off"),
        "{console}"
    );
}

fn build_tree(dir: &Path, gpu_init: &Path) -> std::path::PathBuf {
    let x = dir.join("x");
    std::fs::create_dir_all(&x).unwrap();
    for (tar, nvidia) in [
        (fixtures::KERNEL_MODULES, false),
        (fixtures::NVIDIA_MODULES, true),
    ] {
        let members: Vec<String> = MODULES
            .iter()
            .filter(|(n, _, _)| n.starts_with("nvidia") == nvidia)
            .map(|(_, f, _)| format!("{KDIR}/{f}"))
            .collect();
        run(Command::new("tar")
            .arg("xzf")
            .arg(fixtures::path(tar))
            .arg("-C")
            .arg(&x)
            .args(&members));
    }
    let t = dir.join("tree");
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "newroot",
        "gpu/modules",
        "gpu/bin",
    ] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "etc",
        "usr/lib/x86_64-linux-gnu",
    ] {
        std::fs::create_dir_all(t.join("workload").join(d)).unwrap();
    }
    std::fs::copy(gpu_init, t.join("init")).unwrap();
    std::fs::copy(gpu_init, t.join("gpu/bin/gpu-init")).unwrap();
    std::fs::copy(gpu_init, t.join("workload/bin/gpu-init")).unwrap();
    let char_dev = |p: &str, major, minor| {
        nix::sys::stat::mknod(
            &t.join(p),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(major, minor),
        )
        .unwrap();
    };
    char_dev("dev/console", 5, 1);
    char_dev("dev/null", 1, 3);
    let mut modules = Vec::new();
    for (name, file, depends) in MODULES {
        let base = Path::new(file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::copy(x.join(KDIR).join(file), t.join("gpu/modules").join(&base)).unwrap();
        modules.push(Module {
            name: name.into(),
            path: format!("/gpu/modules/{base}"),
            params: String::new(),
            depends: depends.iter().map(|d| d.to_string()).collect(),
            vermagic: common::VERMAGIC.into(),
            nvidia: name.starts_with("nvidia"),
        });
    }
    let manifest = Manifest {
        schema: SCHEMA,
        release: "qemu-test".into(),
        arch: "x86_64".into(),
        kernel_version: "6.1.0-56-amd64".into(),
        driver_version: common::DRIVER.into(),
        module_flavor: "open".into(),
        modules,
        firmware: vec![],
        libraries: vec![],
        binaries: vec!["/gpu/bin/gpu-init".into()],
        device_nodes: DeviceNodes {
            mode: 0o660,
            gid: 0,
        },
        inputs: vec![],
        capabilities: Default::default(),
    };
    std::fs::write(
        t.join("gpu/manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    t
}

#[test]
fn pid1_classifies_real_module_failures_switches_root_runs_the_workload_and_powers_off() {
    let gpu_init = common::build_static();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tree = build_tree(dir.path(), &gpu_init);
    let initrd = pack(dir.path(), &tree);
    let (console, report) = boot(&initrd, "", &["-m".into(), "768".into()]);
    assert_gpu_less_setup(&console, &report);
    assert_eq!(
        report.payload.as_ref().map(|p| p.source),
        Some(PayloadSource::Initramfs)
    );
}

/// `module.sig_enforce=1`: the kernel takes only modules signed by a key it trusts. Debian's own
/// modules (signed at the kernel's build) still load; the fixture NVIDIA modules carry no
/// signature, so the kernel refuses nvidia with EKEYREJECTED and logs why.
#[test]
fn pid1_reports_unsigned_modules_refused_under_sig_enforce_as_signature_rejected() {
    let gpu_init = common::build_static();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tree = build_tree(dir.path(), &gpu_init);
    let initrd = pack(dir.path(), &tree);
    let (console, report) = boot(
        &initrd,
        "module.sig_enforce=1",
        &["-m".into(), "768".into()],
    );
    assert_eq!(report.status, Status::Failed, "{console}");
    for signed in ["drm", "drm_kms_helper", "wmi", "video"] {
        let module = report.module(signed).unwrap();
        assert_eq!(module.result, ModuleResult::Loaded, "{signed}: {module:?}");
    }
    let nvidia = report.module("nvidia").unwrap();
    assert_eq!(nvidia.result, ModuleResult::Failed);
    assert_eq!(
        nvidia.class,
        Some(FailureClass::SignatureRejected),
        "{nvidia:?}"
    );
    assert_eq!(nvidia.errno, Some(129));
    let message = nvidia.message.as_deref().unwrap();
    assert!(
        message.starts_with("nvidia: unsigned module: ")
            && message.contains("Loading of unsigned module is rejected")
            && message.contains("a key the guest kernel trusts"),
        "{message}"
    );
    for dependent in ["nvidia_uvm", "nvidia_modeset", "nvidia_drm"] {
        let module = report.module(dependent).unwrap();
        assert_eq!(module.result, ModuleResult::Skipped, "{dependent}");
        assert_eq!(module.class, Some(FailureClass::SignatureRejected));
    }
    assert!(
        console.contains("gpu-init: workload exited with status 0; powering off"),
        "{console}"
    );
}

#[test]
fn pid1_mounts_the_payload_image_from_virtio_pmem_with_dax_and_runs_the_same_setup() {
    let gpu_init = common::build_static();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tree = build_tree(dir.path(), &gpu_init);
    let image = split_disk(dir.path(), &tree);
    let initrd = pack(dir.path(), &tree);
    let size = std::fs::metadata(&image).unwrap().len();
    let qemu = [
        "-m".to_string(),
        format!("768M,slots=2,maxmem={}M", 768 + (size >> 20)),
        "-object".into(),
        format!(
            "memory-backend-file,id=gpu0,share=on,readonly=on,mem-path={},size={size}",
            image.display()
        ),
        "-device".into(),
        "virtio-pmem-pci,memdev=gpu0".into(),
    ];
    let (console, report) = boot(&initrd, "GPU_DISK=pmem", &qemu);
    assert_gpu_less_setup(&console, &report);
    let payload = report
        .payload
        .as_ref()
        .expect("the report says where /gpu came from");
    assert_eq!(payload.source, PayloadSource::Pmem);
    assert_eq!(payload.device.as_deref(), Some("/dev/pmem0"));
    assert!(payload.dax, "mounted with DAX: {payload:?}");
    assert_eq!(payload.mount_modules.len(), MOUNT_MODULES.len());
    assert!(payload.mount_ms.is_some());
}
