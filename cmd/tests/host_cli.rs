//! The host commands as a user runs them: exit codes, JSON field names, messages.

mod common;

use std::process::{Command, Output};

use common::{cli_binary, json, run};
use gpu_passthrough_tests::fixtures;
use gpu_passthrough_tests::sysfs::{self, FakeHost};

#[test]
fn malformed_addresses_are_refused_before_touching_anything() {
    let h = sysfs::workstation();
    for bad in [
        "../../../etc/passwd",
        "0000:01:00.8",
        "1:0.0",
        "0000:01:00.0/x",
    ] {
        let out = run(&h, &["plan", bad]);
        assert_eq!(out.status.code(), Some(4), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is not a PCI address") && err.contains("DDDD:BB:DD.F"),
            "{err}"
        );
    }
    let out = run(&h, &["attach", "0000:01:00.0", "--owner", "../x"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid owner"));
    assert!(h.journal().is_none(), "nothing was written");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
}

#[test]
fn a_gpu_disk_needs_a_release_and_a_valid_attachment() {
    let h = sysfs::workstation();
    let out = run(
        &h,
        &[
            "attach",
            "0000:01:00.0",
            "--owner",
            "vm-1",
            "--gpu-disk",
            "pmem",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "refused, not failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a GPU disk is built from a release's layers"),
        "{err}"
    );
    assert!(h.journal().is_none(), "nothing was written");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    let out = run(
        &h,
        &[
            "attach",
            "0000:01:00.0",
            "--owner",
            "vm-1",
            "--gpu-disk",
            "vdb",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed value is a usage error"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a disk attachment") && err.contains("/dev/vdb"),
        "{err}"
    );
    // A private copy of no disk is a usage error naming the flag it needs.
    let args = ["attach", "0000:01:00.0", "--owner", "vm-1"];
    let out = run(&h, &[&args[..], &["--gpu-disk-private", "/tmp"]].concat());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gpu-disk <pmem|/dev/vdX>"), "{err}");
}

#[test]
fn devices_json_has_stable_fields() {
    let h = sysfs::workstation();
    let gpus = fixtures::path(fixtures::SUPPORTED_GPUS);
    let out = run(
        &h,
        &[
            "--json",
            "devices",
            "--supported-gpus",
            gpus.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let listing = json(&out);
    assert_eq!(listing["scanned"], 7);
    let list = &listing["devices"];
    let gpu = &list[1];
    assert_eq!(gpu["address"], "0000:01:00.0");
    assert_eq!(gpu["vendor_id"], 0x10de);
    assert_eq!(gpu["device_name"], "NVIDIA GeForce RTX 4090");
    assert_eq!(gpu["driver"], "nvidia");
    assert_eq!(gpu["iommu_group"], 12);
    assert_eq!(gpu["numa_node"], 0);
    assert_eq!(gpu["boot_vga"], false);
    assert_eq!(gpu["reset_methods"], serde_json::json!(["flr", "bus"]));
    assert_eq!(gpu["companions"], serde_json::json!(["0000:01:00.1"]));
    assert_eq!(gpu["ready"], true);
    assert_eq!(list[0]["ready"], false);
    let human = run(&h, &["devices"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("0000:01:00.0") && text.contains("ready"),
        "{text}"
    );
    assert!(
        text.contains("not ready: 0000:00:02.0 is the boot display"),
        "{text}"
    );
}

#[test]
fn plan_prints_writes_and_exits_4_on_refusal() {
    let h = sysfs::shared_group();
    let out = run(&h, &["plan", "0000:02:00.0"]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("REFUSED: 0000:03:00.0"), "{text}");
    assert!(text.contains("bus/pci/drivers/igb/unbind"), "{text}");
    let ok = run(&h, &["--json", "plan", "0000:02:00.0", "0000:03:00.0"]);
    assert_eq!(ok.status.code(), Some(0));
    let plan = json(&ok);
    assert_eq!(plan["devices"].as_array().unwrap().len(), 3);
    assert_eq!(plan["writes"].as_array().unwrap().len(), 9);
    assert_eq!(plan["refusals"], serde_json::json!([]));
}

#[test]
fn attach_prints_the_boot_spec_and_detach_restores() {
    let h = sysfs::workstation();
    let out = run(
        &h,
        &[
            "attach",
            "0000:01:00.0",
            "--owner",
            "vm-7",
            "--vmm",
            "qemu",
            "--initrd",
            "/c/i.img",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kernel command line: HAS_GPU=1"), "{text}");
    assert!(
        text.contains(
            "-device vfio-pci,host=0000:01:00.0,bus=pcie.0,addr=0x10 \
             -device vfio-pci,host=0000:01:00.1,bus=pcie.0,addr=0x11"
        ),
        "{text}"
    );
    assert!(text.contains("initrd: /c/i.img"));
    let again = run(&h, &["--json", "attach", "0000:01:00.0", "--owner", "vm-8"]);
    assert_eq!(again.status.code(), Some(4));
    assert!(json(&again)["error"].as_str().unwrap().contains("vm-7"));
    let out = run(&h, &["--json", "detach", "--owner", "vm-7"]);
    assert!(out.status.success());
    let r = json(&out);
    assert_eq!(r["restored"][0]["device"], "0000:01:00.1");
    assert_eq!(r["restored"][1]["driver"], "nvidia");
    assert!(h.journal_clean());
    let out = run(&h, &["detach", "--owner", "vm-7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vm-7 has no attached devices"));
}

#[test]
fn attach_json_has_both_vmm_configs() {
    let h = sysfs::server_8gpu();
    let out = run(
        &h,
        &[
            "--json",
            "attach",
            "--gpus",
            "2",
            "--owner",
            "vm-9",
            "--p2p-clique",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = json(&out);
    assert_eq!(spec["devices"].as_array().unwrap().len(), 2);
    assert_eq!(spec["devices"][0]["iommu_group"], 20);
    let ch = &spec["cloud_hypervisor"]["vm_config_devices"];
    assert_eq!(ch[0]["x_nv_gpudirect_clique"], 0);
    assert!(
        ch[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("/bus/pci/devices/0000:18:00.0/")
    );
    assert!(
        spec["qemu"]["args"][1]
            .as_str()
            .unwrap()
            .contains(",x-nv-gpudirect-clique=0")
    );
    assert!(spec["mmio"]["bar64_bytes"].as_u64().unwrap() > 256 << 30);
    // Two GPUs of an NVSwitch board without its NVSwitches: their NVLinks cannot train in the
    // guest, so the spec turns NVLink off for `nvidia` there.
    assert_eq!(
        spec["kernel_cmdline"],
        serde_json::json!(["HAS_GPU=1", "nvidia.NVreg_NvLinkDisable=1"])
    );
}

#[test]
fn doctor_reports_each_check_and_fails_without_iommu() {
    let h = sysfs::iommu_off();
    let out = run(&h, &["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(5));
    let r = json(&out);
    let by_name = |n: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no check {n}: {r}"))
    };
    assert_eq!(by_name("iommu")["status"], "fail");
    assert!(
        by_name("iommu")["fix"]
            .as_str()
            .unwrap()
            .contains("intel_iommu=on")
    );
    assert_eq!(by_name("vfio_pci")["status"], "ok");
    assert_eq!(by_name("vfio_container")["status"], "ok");
    assert_eq!(
        by_name("kvm")["status"],
        "fail",
        "the fake dev dir has no kvm"
    );
    assert_eq!(by_name("gpu 0000:01:00.0")["status"], "warn");
    assert_eq!(r["verdict"], "fail");
}

/// `attach 0000:01:00.0 --owner OWNER --release fx` over a registry of `artifacts` in `dir`
/// (pinned or not) with a stand-in guest init and `dir/cache`; `extra` goes last.
fn attach_release(
    h: &FakeHost,
    dir: &std::path::Path,
    artifacts: &[(&str, std::path::PathBuf)],
    pinned: bool,
    owner: &str,
    extra: &[&str],
) -> Output {
    let registry = fixtures::write_registry(dir, "fx", fixtures::KERNEL_VERSION, artifacts, pinned);
    let init = fixtures::guest_init_stand_in(dir);
    let cache = dir.join("cache");
    let mut args = vec![
        "--registry",
        registry.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "attach",
        "0000:01:00.0",
        "--owner",
        owner,
        "--release",
        "fx",
        "--guest-init",
        init.to_str().unwrap(),
    ];
    args.extend(extra);
    run(h, &args)
}

#[test]
fn attach_with_a_release_that_cannot_be_built_moves_nothing() {
    let h = sysfs::workstation();
    let dir = tempfile::tempdir().unwrap();
    // Unpinned artifacts.
    let out = attach_release(
        &h,
        dir.path(),
        &fixtures::gpu_artifacts(),
        false,
        "vm-1",
        &[],
    );
    assert_eq!(out.status.code(), Some(4), "unpinned is a refusal");
    assert!(String::from_utf8_lossy(&out.stderr).contains("versions pin fx"));
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert!(
        h.journal().is_none_or(|_| h.journal_clean()),
        "nothing journaled"
    );
}

#[test]
fn attach_with_a_release_names_its_ensured_combined_initrd() {
    // No --supported-gpus: the open-module check must use the release driver's own list
    // (without one, attach refuses an RTX 4090 it cannot vouch for).
    let h = sysfs::workstation();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = attach_release(
        &h,
        dir.path(),
        &fixtures::gpu_artifacts(),
        true,
        "vm-2",
        &["--json"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = json(&out);
    let initrd =
        std::path::PathBuf::from(spec["initrd"].as_str().expect("initrd in the boot spec"));
    assert!(
        initrd.starts_with(&cache) && initrd.is_file(),
        "{}",
        initrd.display()
    );
    assert!(initrd.to_string_lossy().ends_with("combined.cpio.zst"));
    assert!(spec.to_string().contains("HAS_GPU=1"));
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn attach_with_a_gpu_disk_boots_the_base_layer_and_names_the_image() {
    let h = sysfs::workstation();
    let dir = tempfile::tempdir().unwrap();
    let mut artifacts = fixtures::gpu_artifacts();
    for (kind, file) in &mut artifacts {
        if *kind == "kernel-modules" {
            *file = fixtures::path(fixtures::KERNEL_MODULES_PMEM);
        }
    }
    let cache = dir.path().join("cache");
    let extra = ["--json", "--gpu-disk", "pmem"];
    let out = attach_release(&h, dir.path(), &artifacts, true, "vm-3", &extra);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = json(&out);
    assert!(
        spec["initrd"].as_str().unwrap().ends_with("base.cpio"),
        "{spec}"
    );
    let image = std::path::PathBuf::from(spec["disk"]["image"].as_str().unwrap());
    assert!(
        image.starts_with(&cache) && image.is_file(),
        "{}",
        image.display()
    );
    assert_eq!(spec["disk"]["attach"]["kind"], "pmem");
    let cmdline: Vec<&str> = spec["kernel_cmdline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    assert_eq!(cmdline, ["HAS_GPU=1", "GPU_DISK=pmem"]);
    assert!(spec["qemu"]["args"].to_string().contains("virtio-pmem-pci"));
    assert!(
        spec["cloud_hypervisor"]["args"]
            .to_string()
            .contains("--pmem")
    );
    assert_eq!(spec["disk"]["isolation"], "shared");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    // The platform's choice of isolation: a private copy in the VM's directory.
    assert!(run(&h, &["detach", "--owner", "vm-3"]).status.success());
    let vm_dir = dir.path().join("vm-4");
    std::fs::create_dir(&vm_dir).unwrap();
    let private = ["--json", "--gpu-disk", "/dev/vdb", "--gpu-disk-private"];
    let extra = [&private[..], &[vm_dir.to_str().unwrap()]].concat();
    let out = attach_release(&h, dir.path(), &artifacts, true, "vm-4", &extra);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = json(&out);
    assert_eq!(spec["disk"]["isolation"], "private");
    let copy = std::path::PathBuf::from(spec["disk"]["image"].as_str().unwrap());
    assert!(copy.starts_with(&vm_dir), "{}", copy.display());
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&image).unwrap()
    );
    assert!(
        spec["qemu"]["args"]
            .to_string()
            .contains(copy.to_str().unwrap())
    );
}

#[test]
fn an_error_prints_its_cause_once_with_the_flag_that_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-sysfs");
    let out = Command::new(cli_binary())
        .arg("--sysfs-root")
        .arg(&missing)
        .args(["--state-dir", dir.path().to_str().unwrap(), "devices"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("--sysfs-root"), "{stderr}");
}

#[test]
fn a_baseboard_and_nvlink_are_flags_of_plan_and_attach() {
    let h = sysfs::hgx_8gpu(false);
    let out = run(
        &h,
        &["plan", "--json", "--baseboard", "0000:c3:00.0", "--nvlink"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)["requested"].as_array().unwrap().len(), 12);
    let out = run(&h, &["plan", "--json", "0000:1b:00.0", "--nvlink"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let plan = json(&out);
    let reasons: Vec<&str> = plan["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["partial_baseboard"]);
    let out = run(&h, &["plan", "--baseboard", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2), "a usage error: {out:?}");
}

#[test]
fn shared_nvswitch_mode_shows_the_partition_and_its_release() {
    let h = sysfs::hgx_shared_nvswitch();
    let out = run(&h, &["plan", "--json", "--gpus", "2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)["partition"]["id"], 3);
    let out = run(&h, &["attach", "--gpus", "2", "--owner", "vm-pair"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(h.active_partitions(), [3]);
    let out = run(&h, &["detach", "--owner", "vm-pair"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("deactivated fabric partition 3"));
    assert!(h.active_partitions().is_empty());
    // The real partition tool, by path: one that cannot run refuses the plan, naming it.
    let w = sysfs::workstation();
    let out = run(&w, &["plan", "0000:01:00.0", "--fmpm", "/nonexistent/fmpm"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("/nonexistent/fmpm") && stdout.contains("partitions cannot be read"),
        "{stdout}"
    );
}

#[test]
fn vfio_driver_names_the_driver_and_an_unknown_one_is_refused() {
    let h = sysfs::gh200();
    h.set_modules_alias("alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n")
        .load_vfio_variant("nvgrace_gpu_vfio_pci", "nvgrace-gpu-vfio-pci");
    let gpu = "0009:01:00.0";
    let plan = json(&run(&h, &["--json", "plan", gpu]));
    assert_eq!(plan["devices"][0]["vfio"]["driver"], "nvgrace-gpu-vfio-pci");
    assert_eq!(plan["devices"][0]["vfio"]["source"], "modules_alias");
    let plan = json(&run(
        &h,
        &["--json", "plan", gpu, "--vfio-driver", "vfio-pci"],
    ));
    assert_eq!(plan["devices"][0]["vfio"]["driver"], "vfio-pci");
    assert_eq!(plan["devices"][0]["vfio"]["source"], "override");
    let out = run(
        &h,
        &[
            "attach",
            gpu,
            "--owner",
            "vm-x",
            "--vfio-driver",
            "no-such-vfio",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-vfio"), "{err}");
    assert_eq!(h.driver(gpu).as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}
