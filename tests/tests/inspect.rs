//! Build-time checks over the real fixtures: the clean artifacts pass with the modules in load
//! order; each doctored copy fails with its own message naming the file and the fix.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use gpu_passthrough::archive::tar::{Limits, extract_tar};
use gpu_passthrough::inspect::{Expectations, Inventory, Problem, SigningRule, Trees, inspect};
use gpu_passthrough::registry::{Arch, ModuleFlavor};

const KVER: &str = "6.1.0-56-amd64";
const DRIVER: &str = "535.261.03";

/// The shared fixtures directory, through the one lookup every test uses.
fn fixtures() -> PathBuf {
    gpu_passthrough_tests::fixtures::dir()
}

/// The four artifact tars, extracted once per test binary (read-only from then on).
struct Extracted {
    nvidia: PathBuf,
    kernel: PathBuf,
    firmware: PathBuf,
    libs: PathBuf,
}

fn extracted() -> &'static Extracted {
    static EXTRACTED: OnceLock<Extracted> = OnceLock::new();
    EXTRACTED.get_or_init(|| {
        let tmp = gpu_passthrough_tests::fixtures::process_scratch(
            env!("CARGO_TARGET_TMPDIR"),
            "inspect-real",
        );
        let fx = fixtures();
        let get = |rel: &str, name: &str| {
            let dest = tmp.join(name);
            extract_tar(&fx.join(rel), &dest, &Limits::default()).unwrap();
            dest
        };
        Extracted {
            nvidia: get(
                &format!("nvidia-{DRIVER}/nvidia-open-modules-{DRIVER}-{KVER}-x86_64.tar.gz"),
                "nvidia",
            ),
            kernel: get(
                &format!("linux-{KVER}/kernel-modules-{KVER}-x86_64.tar.gz"),
                "kernel",
            ),
            firmware: get(
                &format!("nvidia-{DRIVER}/nvidia-gsp-firmware-{DRIVER}.tar.gz"),
                "firmware",
            ),
            libs: get(
                &format!("nvidia-{DRIVER}/nvidia-driver-libs-{DRIVER}-x86_64.tar.gz"),
                "libs",
            ),
        }
    })
}

fn expect() -> Expectations<'static> {
    Expectations {
        kernel_version: KVER,
        driver_version: DRIVER,
        arch: Arch::X86_64,
        flavor: Some(ModuleFlavor::Open),
        gsp: true,
        signing: SigningRule::default(),
    }
}

fn real_trees(x: &Extracted) -> Trees<'_> {
    Trees {
        nvidia_modules: Some(&x.nvidia),
        kernel_modules: Some(&x.kernel),
        firmware: Some(&x.firmware),
        driver_libs: Some(&x.libs),
    }
}

/// Mirror `src` into `dst` with hard links (cheap), leaving out paths `skip` says.
fn link_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let from = entry.path();
        if skip(&from) {
            continue;
        }
        let to = dst.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            link_tree(&from, &to, skip);
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from).unwrap(), &to).unwrap();
        } else {
            fs::hard_link(&from, &to).unwrap();
        }
    }
}

/// Replace a hard-linked file by a patched copy: `from` → `to` (same length) in its bytes.
fn patch(file: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(file).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{file:?} lacks the bytes to patch"));
    bytes[at..at + to.len()].copy_from_slice(to);
    fs::remove_file(file).unwrap();
    fs::write(file, bytes).unwrap();
}

fn gpu_dir(root: &Path) -> PathBuf {
    root.join(format!("lib/modules/{KVER}/kernel/drivers/gpu"))
}

fn problems_of(trees: &Trees) -> Vec<Problem> {
    let err = inspect(&expect(), trees).expect_err("doctored artifacts must be refused");
    let message = err.to_string();
    for problem in err.problems() {
        assert!(
            message.contains(&problem.to_string()),
            "the error lists every problem"
        );
    }
    err.problems().to_vec()
}

fn names(inventory: &Inventory) -> Vec<&str> {
    inventory.modules.iter().map(|m| m.name.as_str()).collect()
}

fn position(order: &[&str], name: &str) -> usize {
    order
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("{name} not in load order {order:?}"))
}

#[test]
fn real_artifacts_pass_with_modules_in_load_order() {
    let x = extracted();
    let inventory = inspect(&expect(), &real_trees(x)).unwrap();
    let order = names(&inventory);
    // Exactly the NVIDIA modules plus the kernel modules they need, each once.
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            "drm",
            "drm_kms_helper",
            "nvidia",
            "nvidia_drm",
            "nvidia_modeset",
            "nvidia_peermem",
            "nvidia_uvm",
            "video",
            "wmi"
        ]
    );
    for (before, after) in [
        ("drm", "nvidia"),
        ("drm", "drm_kms_helper"),
        ("nvidia", "nvidia_uvm"),
        ("nvidia", "nvidia_modeset"),
        ("wmi", "video"),
        ("video", "nvidia_modeset"),
        ("nvidia_modeset", "nvidia_drm"),
        ("drm_kms_helper", "nvidia_drm"),
    ] {
        assert!(
            position(&order, before) < position(&order, after),
            "{before} must load before {after}: {order:?}"
        );
    }
    for module in &inventory.modules {
        assert_eq!(
            module.nvidia,
            module.name.starts_with("nvidia"),
            "{}",
            module.name
        );
        assert!(module.source.is_file());
    }
    assert!(inventory.external_dependencies.is_empty());

    let firmware: Vec<_> = inventory
        .firmware
        .iter()
        .map(|f| f.rel.to_str().unwrap())
        .collect();
    assert_eq!(
        firmware,
        vec![
            "nvidia/535.261.03/gsp_ga10x.bin",
            "nvidia/535.261.03/gsp_tu10x.bin"
        ]
    );
    for f in &inventory.firmware {
        assert!(f.source.starts_with(&x.firmware) && f.source.is_file());
    }

    let soname = |real: &str| {
        inventory
            .libraries
            .iter()
            .find(|l| l.real_name == real)
            .unwrap_or_else(|| panic!("{real} missing"))
            .soname
            .clone()
    };
    assert_eq!(
        soname("libcuda.so.535.261.03").as_deref(),
        Some("libcuda.so.1")
    );
    assert_eq!(
        soname("libnvidia-nvvm.so.535.261.03").as_deref(),
        Some("libnvidia-nvvm.so.4")
    );
    assert_eq!(
        soname("libnvidia-ml.so.535.261.03").as_deref(),
        Some("libnvidia-ml.so.1")
    );
    assert_eq!(inventory.libraries.len(), 5, "symlinks are not libraries");
    let binaries: Vec<_> = inventory
        .binaries
        .iter()
        .map(|b| b.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(binaries, vec!["nvidia-modprobe", "nvidia-smi"]);
    assert_eq!(
        inventory.supported_gpus,
        Some(x.libs.join("usr/share/nvidia/supported-gpus.json"))
    );

    // Deterministic: the same trees give the same order.
    let again = inspect(&expect(), &real_trees(x)).unwrap();
    assert_eq!(names(&again), order);
}

#[test]
fn wrong_vermagic_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let nvidia = tmp.path().join("nvidia");
    link_tree(&x.nvidia, &nvidia, &|_| false);
    let uvm = gpu_dir(&nvidia).join("nvidia-uvm.ko");
    patch(&uvm, b"vermagic=6.1.0-56-amd64", b"vermagic=6.1.0-99-amd64");
    let problems = problems_of(&Trees {
        nvidia_modules: Some(&nvidia),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    let message = problems[0].to_string();
    assert!(matches!(&problems[0], Problem::WrongKernel { file, .. } if *file == uvm));
    assert!(
        message.contains("built for kernel 6.1.0-99-amd64, release says 6.1.0-56-amd64: rebuild the modules for 6.1.0-56-amd64 or fix kernel_version"),
        "{message}"
    );
}

#[test]
fn wrong_module_version_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let nvidia = tmp.path().join("nvidia");
    link_tree(&x.nvidia, &nvidia, &|_| false);
    let drm = gpu_dir(&nvidia).join("nvidia-drm.ko");
    patch(&drm, b"version=535.261.03", b"version=535.261.04");
    let problems = problems_of(&Trees {
        nvidia_modules: Some(&nvidia),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        matches!(&problems[0], Problem::WrongDriverVersion { file, found, .. } if *file == drm && found == "535.261.04")
    );
    assert!(
        problems[0].to_string().contains(
            "nvidia-drm.ko: module version is 535.261.04, release says driver 535.261.03"
        )
    );
}

#[test]
fn foreign_architecture_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let nvidia = tmp.path().join("nvidia");
    link_tree(&x.nvidia, &nvidia, &|_| false);
    let peermem = gpu_dir(&nvidia).join("nvidia-peermem.ko");
    // e_machine lives at offset 18: EM_X86_64 (62) → EM_AARCH64 (183).
    let mut bytes = fs::read(&peermem).unwrap();
    assert_eq!(&bytes[18..20], &62u16.to_le_bytes());
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
    fs::remove_file(&peermem).unwrap();
    fs::write(&peermem, bytes).unwrap();
    let problems = problems_of(&Trees {
        nvidia_modules: Some(&nvidia),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        matches!(&problems[0], Problem::WrongArch { file, machine: 183, expected: 62, .. } if *file == peermem)
    );
    assert!(problems[0].to_string().contains("use the x86_64 build"));
}

#[test]
fn missing_firmware_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let firmware = tmp.path().join("firmware");
    link_tree(&x.firmware, &firmware, &|p| p.ends_with("gsp_ga10x.bin"));
    let problems = problems_of(&Trees {
        firmware: Some(&firmware),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        matches!(&problems[0], Problem::MissingFirmware { firmware, file } if firmware == "nvidia/535.261.03/gsp_ga10x.bin" && file.ends_with("nvidia.ko"))
    );
    assert!(
        problems[0]
            .to_string()
            .contains("add the firmware artifact")
    );

    // No firmware tree at all: both files are missing.
    let problems = problems_of(&Trees {
        firmware: None,
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn missing_dependency_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("kernel");
    link_tree(&x.kernel, &kernel, &|p| p.ends_with("video.ko"));
    let problems = problems_of(&Trees {
        kernel_modules: Some(&kernel),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        matches!(&problems[0], Problem::UnresolvedDependency { module, dependency, .. } if module == "nvidia_modeset" && dependency == "video")
    );
    assert!(
        problems[0]
            .to_string()
            .contains("add video.ko to the kernel-modules artifact")
    );
}

#[test]
fn builtin_dependencies_need_no_module_file() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("kernel");
    link_tree(&x.kernel, &kernel, &|p| {
        p.ends_with("video.ko") || p.ends_with("modules.builtin")
    });
    let builtin = kernel.join(format!("lib/modules/{KVER}/modules.builtin"));
    let mut text =
        fs::read_to_string(x.kernel.join(format!("lib/modules/{KVER}/modules.builtin"))).unwrap();
    text.push_str("kernel/drivers/acpi/video.ko\n");
    fs::write(&builtin, text).unwrap();
    let inventory = inspect(
        &expect(),
        &Trees {
            kernel_modules: Some(&kernel),
            ..real_trees(x)
        },
    )
    .unwrap();
    let order = names(&inventory);
    assert!(
        !order.contains(&"video") && !order.contains(&"wmi"),
        "{order:?}"
    );
}

#[test]
fn without_kernel_modules_foreign_dependencies_are_listed() {
    let x = extracted();
    let inventory = inspect(
        &expect(),
        &Trees {
            kernel_modules: None,
            ..real_trees(x)
        },
    )
    .unwrap();
    assert_eq!(
        inventory.external_dependencies,
        vec!["drm", "drm_kms_helper", "video"]
    );
    let order = names(&inventory);
    assert_eq!(order.len(), 5, "{order:?}");
    assert!(position(&order, "nvidia") < position(&order, "nvidia_modeset"));
    assert!(position(&order, "nvidia_modeset") < position(&order, "nvidia_drm"));
}

#[test]
fn library_of_another_version_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let libs = tmp.path().join("libs");
    link_tree(&x.libs, &libs, &|p| {
        p.ends_with("libnvidia-cfg.so.535.261.03")
    });
    let dir = libs.join("usr/lib/nvidia");
    fs::hard_link(
        x.libs.join("usr/lib/nvidia/libnvidia-cfg.so.535.261.03"),
        dir.join("libnvidia-cfg.so.535.230.02"),
    )
    .unwrap();
    let problems = problems_of(&Trees {
        driver_libs: Some(&libs),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        matches!(&problems[0], Problem::LibraryVersion { real_name, .. } if real_name == "libnvidia-cfg.so.535.230.02")
    );
    assert!(
        problems[0]
            .to_string()
            .contains("use the libraries of driver 535.261.03")
    );
}

#[test]
fn duplicate_modules_are_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let nvidia = tmp.path().join("nvidia");
    link_tree(&x.nvidia, &nvidia, &|_| false);
    let extra = nvidia.join(format!("lib/modules/{KVER}/updates"));
    fs::create_dir_all(&extra).unwrap();
    fs::hard_link(
        gpu_dir(&nvidia).join("nvidia-uvm.ko"),
        extra.join("nvidia_uvm.ko"),
    )
    .unwrap();
    let problems = problems_of(&Trees {
        nvidia_modules: Some(&nvidia),
        ..real_trees(x)
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(matches!(&problems[0], Problem::DuplicateModule { name, .. } if name == "nvidia_uvm"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let nvidia = tmp.path().join("nvidia");
    link_tree(&x.nvidia, &nvidia, &|_| false);
    patch(
        &gpu_dir(&nvidia).join("nvidia.ko"),
        b"vermagic=6.1.0-56-amd64",
        b"vermagic=6.1.0-99-amd64",
    );
    patch(
        &gpu_dir(&nvidia).join("nvidia-uvm.ko"),
        b"version=535.261.03",
        b"version=535.999.03",
    );
    let kernel = tmp.path().join("kernel");
    link_tree(&x.kernel, &kernel, &|p| p.ends_with("drm_kms_helper.ko"));
    let firmware = tmp.path().join("firmware");
    link_tree(&x.firmware, &firmware, &|p| p.ends_with("gsp_tu10x.bin"));
    let problems = problems_of(&Trees {
        nvidia_modules: Some(&nvidia),
        kernel_modules: Some(&kernel),
        firmware: Some(&firmware),
        driver_libs: None,
    });
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::WrongKernel { .. }))
    );
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::WrongDriverVersion { .. }))
    );
    assert!(problems.iter().any(|p| matches!(p, Problem::UnresolvedDependency { dependency, .. } if dependency == "drm_kms_helper")));
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::MissingFirmware { .. }))
    );
}

#[test]
fn an_empty_nvidia_tree_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let problems = problems_of(&Trees {
        nvidia_modules: Some(tmp.path()),
        ..real_trees(x)
    });
    assert!(
        matches!(problems.as_slice(), [Problem::NoNvidiaModules { .. }]),
        "{problems:?}"
    );
}

/// The capability table knows every library and program of both real drivers.
#[test]
fn the_capability_table_covers_both_real_drivers() {
    use gpu_passthrough::capabilities::{self, Capability};
    let mut seen = std::collections::BTreeSet::new();
    for rel in [
        "nvidia-535.261.03/nvidia-driver-libs-535.261.03-x86_64.tar.gz",
        "nvidia-535.309.01/nvidia-driver-libs-535.309.01-x86_64.tar.gz",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        extract_tar(&fixtures().join(rel), tmp.path(), &Limits::default()).unwrap();
        for dir in ["usr/lib/nvidia", "usr/bin"] {
            for entry in fs::read_dir(tmp.path().join(dir)).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                let cap = if dir == "usr/bin" {
                    capabilities::of_program(&name)
                } else if name.contains(".so") {
                    capabilities::of_library(&name)
                } else {
                    continue; // `version`
                };
                let cap = cap.unwrap_or_else(|| panic!("{rel}: {name} is in no capability"));
                seen.insert(cap);
            }
        }
    }
    assert!(seen.contains(&Capability::Compute));
    assert!(seen.contains(&Capability::Utility));
    assert!(
        seen.contains(&Capability::Video),
        "535.309.01 has NVDEC/NVENC"
    );
}

/// The proprietary 535.309.01 modules and libraries, extracted once.
fn proprietary() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIR: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = gpu_passthrough_tests::fixtures::process_scratch(
            env!("CARGO_TARGET_TMPDIR"),
            "inspect-proprietary",
        );
        let (modules, libs) = (tmp.join("modules"), tmp.join("libs"));
        let fx = fixtures();
        extract_tar(
            &fx.join("nvidia-535.309.01/nvidia-modules-535.309.01-6.1.0-56-amd64-x86_64.tar.gz"),
            &modules,
            &Limits::default(),
        )
        .unwrap();
        extract_tar(
            &fx.join("nvidia-535.309.01/nvidia-driver-libs-535.309.01-x86_64.tar.gz"),
            &libs,
            &Limits::default(),
        )
        .unwrap();
        (tmp, modules, libs)
    })
}

fn proprietary_expect(flavor: ModuleFlavor, gsp: bool) -> Expectations<'static> {
    Expectations {
        driver_version: "535.309.01",
        flavor: Some(flavor),
        gsp,
        ..expect()
    }
}

#[test]
fn a_proprietary_release_without_gsp_passes_with_no_firmware() {
    let (_, modules, libs) = proprietary();
    let x = extracted();
    let trees = Trees {
        nvidia_modules: Some(modules),
        kernel_modules: Some(&x.kernel),
        firmware: None,
        driver_libs: Some(libs),
    };
    let inv = inspect(
        &proprietary_expect(ModuleFlavor::Proprietary, false),
        &trees,
    )
    .unwrap();
    assert!(inv.firmware.is_empty());
    assert!(names(&inv).contains(&"nvidia"));
    // With GSP expected, the firmware its modules name is missing.
    let err = inspect(&proprietary_expect(ModuleFlavor::Proprietary, true), &trees).unwrap_err();
    assert!(
        err.problems()
            .iter()
            .all(|p| matches!(p, Problem::MissingFirmware { .. })),
        "{err}"
    );
}

#[test]
fn the_flavor_is_told_from_the_modules_license_both_ways() {
    // Proprietary modules claimed as open.
    let (_, modules, libs) = proprietary();
    let x = extracted();
    let trees = Trees {
        nvidia_modules: Some(modules),
        kernel_modules: Some(&x.kernel),
        firmware: Some(&x.firmware),
        driver_libs: Some(libs),
    };
    let err = inspect(&proprietary_expect(ModuleFlavor::Open, true), &trees).unwrap_err();
    let wrong: Vec<&Problem> = err
        .problems()
        .iter()
        .filter(|p| matches!(p, Problem::WrongFlavor { .. }))
        .collect();
    assert_eq!(wrong.len(), 2, "nvidia and nvidia_modeset: {err}");
    let msg = wrong
        .iter()
        .map(|p| p.to_string())
        .find(|m| m.contains("/nvidia.ko"))
        .expect("nvidia.ko named");
    assert!(
        msg.contains("`NVIDIA`") && msg.contains("proprietary build"),
        "{msg}"
    );
    // Open modules claimed as proprietary.
    let err = problems_of_with(
        &Expectations {
            flavor: Some(ModuleFlavor::Proprietary),
            ..expect()
        },
        &real_trees(x),
    );
    let msg = err
        .iter()
        .find(|p| matches!(p, Problem::WrongFlavor { module, .. } if module == "nvidia"))
        .expect("nvidia refused")
        .to_string();
    assert!(
        msg.contains("Dual MIT/GPL") && msg.contains("open build"),
        "{msg}"
    );
}

#[test]
fn open_modules_without_gsp_firmware_are_refused() {
    let x = extracted();
    let problems = problems_of_with(
        &Expectations {
            gsp: false,
            ..expect()
        },
        &real_trees(x),
    );
    assert!(problems.contains(&Problem::OpenWithoutGsp), "{problems:?}");
}

fn problems_of_with(expect: &Expectations, trees: &Trees) -> Vec<Problem> {
    match inspect(expect, trees) {
        Ok(_) => panic!("expected a refusal"),
        Err(e) => e.problems().to_vec(),
    }
}

#[test]
fn duplicate_library_names_are_refused() {
    // Two files of one name (and so one soname) in one layer.
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let libs = tmp.path().join("libs");
    link_tree(&x.libs, &libs, &|_| false);
    let other = libs.join("usr/lib/nvidia/other");
    fs::create_dir_all(&other).unwrap();
    fs::hard_link(
        x.libs.join("usr/lib/nvidia/libnvidia-cfg.so.535.261.03"),
        other.join("libnvidia-cfg.so.535.261.03"),
    )
    .unwrap();
    let problems = problems_of(&Trees {
        driver_libs: Some(&libs),
        ..real_trees(x)
    });
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::DuplicateLibrary { name, .. } if name == "libnvidia-cfg.so.535.261.03")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(
            |p| matches!(p, Problem::DuplicateLibrary { name, .. } if name == "libnvidia-cfg.so.1")
        ),
        "{problems:?}"
    );
}

#[test]
fn a_soname_that_is_a_path_is_refused() {
    let x = extracted();
    let tmp = tempfile::tempdir().unwrap();
    let libs = tmp.path().join("libs");
    link_tree(&x.libs, &libs, &|_| false);
    let lib = libs.join("usr/lib/nvidia/libnvidia-cfg.so.535.261.03");
    patch(&lib, b"libnvidia-cfg.so.1\0", b"../../../../cfg.so\0");
    let problems = problems_of(&Trees {
        driver_libs: Some(&libs),
        ..real_trees(x)
    });
    assert!(
        problems.iter().any(
            |p| matches!(p, Problem::BadSoname { soname, .. } if soname == "../../../../cfg.so")
        ),
        "{problems:?}"
    );
}
