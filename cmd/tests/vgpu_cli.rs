//! vGPU catalogue, placement, attach and detach through the CLI on fake trees: an L40S host
//! (vendor VFIO, one GPU full), a T4 on mdev, both frameworks together, a profile that does not
//! exist, a VMM holding a vGPU at detach, a release for another vGPU manager branch, and the CLI
//! aborted at every vGPU failpoint on both frameworks.

use std::process::Command;

use gpu_passthrough::failpoint::{Failpoint, Stage};
use gpu_passthrough::health::NoQuarantine;
use gpu_passthrough::pci::Sysfs;
use gpu_passthrough::vgpu::{self, Framework};
use gpu_passthrough_tests::sysfs::{self, FakeHost};

fn cli(h: &FakeHost, args: &[&str]) -> std::process::Output {
    cli_at(h, args, None)
}

fn cli_at(h: &FakeHost, args: &[&str], failpoint: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpu-passthrough"));
    cmd.args(h.cli_args())
        .args(["--dev-dir", h.dev.to_str().unwrap()])
        .args(args)
        .env_remove("GPU_PASSTHROUGH_FAILPOINT");
    if let Some(f) = failpoint {
        cmd.env("GPU_PASSTHROUGH_FAILPOINT", f);
    }
    cmd.output().expect("run the CLI")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn l40s_catalogue_counts_free_vfs_capped_by_framebuffer_and_skips_the_full_gpu() {
    let h = sysfs::l40s_host();
    let text = cli(&h, &["vgpu", "types"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.starts_with("PROFILE"), "{text}");
    assert!(!text.contains("0000:a1:00.0"), "{text}");
    let out = cli(&h, &["--json", "vgpu", "types"]);
    if std::env::var_os("VGPU_SHOW").is_some() {
        eprintln!("{text}{}", String::from_utf8_lossy(&out.stdout));
    }
    let v = json(&out);
    let p = |name: &str| {
        v["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {v}"))
    };
    let q4 = p("NVIDIA L40S-4Q");
    assert_eq!(q4["framework"], "vendor-vfio");
    assert_eq!(q4["type_id"], "1150");
    assert_eq!(q4["framebuffer_mib"], 4096);
    assert_eq!(q4["available"], 6);
    assert_eq!(q4["parents"][0]["address"], "0000:41:00.0");
    assert_eq!(q4["parents"][0]["available"], 2);
    assert_eq!(q4["parents"][0]["used_framebuffer_mib"], 8192);
    assert_eq!(q4["parents"][0]["numa_node"], 0);
    assert_eq!(q4["parents"][1]["available"], 4);
    // 24Q: four free VFs but 48 GiB holds two; 48Q: one.
    assert_eq!(p("NVIDIA L40S-24Q")["available"], 2);
    assert_eq!(p("NVIDIA L40S-48Q")["available"], 1);
    // The full GPU (header-only tables) offers nothing and is not an error.
    assert!(!v.to_string().contains("0000:a1:00.0"), "{v}");
}

#[test]
fn plan_vgpu_places_on_the_least_used_gpu_or_packs() {
    let h = sysfs::l40s_host();
    let v = json(&cli(
        &h,
        &["--json", "plan", "--vgpu", "L40S-4Q", "--count", "2"],
    ));
    assert_eq!(
        v["parents"],
        serde_json::json!(["0000:61:00.0", "0000:61:00.0"])
    );
    let v = json(&cli(
        &h,
        &["--json", "plan", "--vgpu", "NVIDIA L40S-4Q", "--pack"],
    ));
    assert_eq!(v["parents"], serde_json::json!(["0000:41:00.0"]));
    let out = cli(&h, &["plan", "--vgpu", "L40S-4Q"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "create NVIDIA L40S-4Q (vendor-vfio, type 1150, 4096 MiB) on 0000:61:00.0\n"
    );
    assert!(h.journal().is_none(), "plan writes nothing");
    let out = cli(&h, &["plan", "--vgpu", "L40S-4Q", "--count", "7"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only 6"));
}

#[test]
fn a_profile_that_does_not_exist_lists_the_available_ones() {
    let h = sysfs::l40s_host();
    let out = cli(&h, &["plan", "--vgpu", "L40S-5Q"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`L40S-5Q`"), "{err}");
    for name in [
        "NVIDIA L40S-1Q",
        "NVIDIA L40S-4Q",
        "NVIDIA L40S-24Q",
        "NVIDIA L40S-48Q",
    ] {
        assert!(err.contains(name), "{name} not listed: {err}");
    }
}

#[test]
fn t4_on_mdev_reports_available_instances_and_used_framebuffer() {
    let h = sysfs::t4_mdev_host();
    let cat = vgpu::catalogue(&Sysfs::new(&h.sys), &NoQuarantine);
    let b = cat.find("T4-1B").unwrap();
    assert_eq!(b.framework, Framework::Mdev);
    assert_eq!(
        (b.type_id.as_str(), b.framebuffer_mib, b.available),
        ("nvidia-222", 1024, 15)
    );
    assert_eq!(b.parents[0].used_framebuffer_mib, 1024);
    assert_eq!(cat.find("GRID T4-2Q").unwrap().available, 0);
}

#[test]
fn a_host_with_both_frameworks_lists_both() {
    let h = sysfs::mixed_vgpu_host();
    let cat = vgpu::catalogue(&Sysfs::new(&h.sys), &NoQuarantine);
    let kinds: Vec<(Framework, &str, u32)> = cat
        .profiles
        .iter()
        .map(|p| (p.framework, p.name.as_str(), p.available))
        .collect();
    assert_eq!(
        kinds,
        [
            (Framework::VendorVfio, "NVIDIA L40S-4Q", 2),
            (Framework::VendorVfio, "NVIDIA L40S-48Q", 1),
            (Framework::Mdev, "GRID T4-1B", 16),
            (Framework::Mdev, "GRID T4-2Q", 8),
        ]
    );
    let placed = vgpu::place(
        &cat,
        &vgpu::PlaceRequest {
            profile: "T4-2Q".into(),
            count: 1,
            numa: None,
            pack: false,
        },
    )
    .unwrap();
    assert_eq!(placed.parents[0].to_string(), "0000:3b:00.0");
}

const ALL_L40S: [&str; 4] = ["1147", "1150", "1155", "1156"];
const L40S_VFS: [&str; 4] = [
    "0000:61:00.4",
    "0000:61:00.5",
    "0000:61:00.6",
    "0000:61:00.7",
];

#[test]
fn attach_vgpu_prints_the_boot_spec_and_detach_releases_it() {
    let h = sysfs::l40s_host();
    let v = json(&cli(
        &h,
        &[
            "--json", "attach", "--vgpu", "L40S-4Q", "--count", "2", "--owner", "vm-1",
        ],
    ));
    assert_eq!(
        v["qemu"]["args"],
        serde_json::json!([
            "-device",
            "vfio-pci,host=0000:61:00.4,bus=pcie.0,addr=0x10",
            "-device",
            "vfio-pci,host=0000:61:00.5,bus=pcie.0,addr=0x11"
        ])
    );
    assert_eq!(v["kernel_cmdline"][0], "HAS_GPU=1");
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1150");
    // The catalogue follows: 61:00.0 now has 8 GiB used and two free VFs listing only 4Q.
    let t = json(&cli(&h, &["--json", "vgpu", "types"]));
    let q4 = t["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "NVIDIA L40S-4Q")
        .unwrap()
        .clone();
    assert_eq!(q4["available"], 4, "{q4}");
    assert_eq!(q4["parents"][1]["used_framebuffer_mib"], 8192, "{q4}");
    let out = cli(&h, &["detach", "--owner", "vm-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("released vGPU NVIDIA L40S-4Q on 0000:61:00.5"),
        "{text}"
    );
    for vf in L40S_VFS {
        assert_eq!(h.vgpu_type(vf), "0");
        assert_eq!(h.creatable(vf), ALL_L40S);
    }
    assert!(h.journal_clean());
}

#[test]
fn attach_vgpu_on_mdev_gives_qemu_the_uuid_and_warns_cloud_hypervisor() {
    let h = sysfs::t4_mdev_host();
    let out = cli(
        &h,
        &[
            "attach", "--vgpu", "T4-1B", "--owner", "vm-1", "--vmm", "qemu",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vfio-pci,sysfsdev=") && text.contains("-uuid"),
        "{text}"
    );
    assert_eq!(h.available_instances("0000:3b:00.0", "nvidia-222"), 14);
    let out = cli(&h, &["attach", "--vgpu", "T4-1B", "--owner", "vm-2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: Cloud Hypervisor has no -uuid"),
        "{text}"
    );
    assert_eq!(h.mdevs().len(), 3);
    for o in ["vm-1", "vm-2"] {
        assert!(cli(&h, &["detach", "--owner", o]).status.success());
    }
    assert_eq!(
        h.mdevs().len(),
        1,
        "the mdev this tool did not create stays"
    );
    assert_eq!(h.available_instances("0000:3b:00.0", "nvidia-222"), 15);
}

#[test]
fn detach_refuses_while_a_vmm_holds_the_vf_and_names_the_pid() {
    let h = sysfs::l40s_host();
    let v = json(&cli(
        &h,
        &["--json", "attach", "--vgpu", "L40S-48Q", "--owner", "vm-1"],
    ));
    let node = std::path::PathBuf::from(v["devices"][0]["vfio_device"].as_str().unwrap());
    let mut vmm = sysfs::fake_vmm(&node);
    let out = cli(&h, &["detach", "--owner", "vm-1"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {} (sleep)", vmm.id())), "{err}");
    assert_eq!(h.vgpu_type("0000:61:00.4"), "1156");
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    assert!(cli(&h, &["detach", "--owner", "vm-1"]).status.success());
    assert_eq!(h.vgpu_type("0000:61:00.4"), "0");
}

#[test]
fn attach_vgpu_refuses_a_release_for_another_manager_branch_naming_both() {
    let h = sysfs::l40s_host();
    h.set_manager_version("535.183.04");
    let reg = h.dir.path().join("registry.toml");
    std::fs::write(
        &reg,
        "[releases.\"grid-550\"]\nkernel_version = \"6.12.8\"\nvgpu_guest = true\nvgpu_manager_branches = [\"550\"]\n",
    )
    .unwrap();
    let args = [
        "--registry",
        reg.to_str().unwrap(),
        "attach",
        "--vgpu",
        "L40S-4Q",
        "--owner",
        "vm-1",
        "--release",
        "grid-550",
    ];
    let out = cli(&h, &args);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("550") && err.contains("535.183.04"), "{err}");
    assert!(h.journal_clean());
    assert_eq!(h.vgpu_type("0000:61:00.4"), "0");
}

/// What each framework's host looks like before anything is attached.
fn assert_untouched(h: &FakeHost, mdev: bool, case: &str) {
    if mdev {
        assert_eq!(h.mdevs().len(), 1, "{case}");
        assert_eq!(
            h.available_instances("0000:3b:00.0", "nvidia-222"),
            15,
            "{case}"
        );
    } else {
        for vf in L40S_VFS {
            assert_eq!(h.vgpu_type(vf), "0", "{case}: {vf}");
            assert_eq!(h.creatable(vf), ALL_L40S, "{case}: {vf}");
            assert_eq!(h.driver(vf).as_deref(), Some("nvidia"), "{case}: {vf}");
        }
    }
    assert!(h.journal_clean(), "{case}: {:?}", h.journal());
}

fn ok(out: &std::process::Output, case: &str) {
    assert!(
        out.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vgpu_crash_case(fp: Failpoint, mdev: bool) {
    let case = format!(
        "{} on {}",
        fp.name(),
        if mdev { "mdev" } else { "vendor-vfio" }
    );
    let h = if mdev {
        sysfs::t4_mdev_host()
    } else {
        sysfs::l40s_host()
    };
    let profile = if mdev { "T4-1B" } else { "L40S-4Q" };
    let attach = [
        "attach", "--vgpu", profile, "--count", "2", "--owner", "vm-c",
    ];
    if fp == Failpoint::VgpuMidRelease {
        ok(&cli(&h, &attach), &case);
        let out = cli_at(&h, &["detach", "--owner", "vm-c"], Some(fp.name()));
        assert_eq!(out.status.code(), None, "{case}: detach must be killed");
        assert!(!h.journal_clean(), "{case}: the rest is still recorded");
        ok(&cli(&h, &["detach", "--owner", "vm-c"]), &case);
        return assert_untouched(&h, mdev, &case);
    }
    let out = cli_at(&h, &attach, Some(fp.name()));
    assert_eq!(
        out.status.code(),
        None,
        "{case}: the CLI must be killed, got {:?}",
        out.status
    );
    let out = cli(&h, &["--json", "reconcile"]);
    ok(&out, &case);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if matches!(fp, Failpoint::VgpuAfterVerify | Failpoint::VgpuAfterCommit) {
        if fp == Failpoint::VgpuAfterVerify {
            assert_eq!(report["finished"][0], "vm-c", "{case}: {report}");
        }
        assert_eq!(report["kept_unknown"][0], "vm-c", "{case}: {report}");
        ok(&cli(&h, &["detach", "--owner", "vm-c"]), &case);
    } else {
        assert!(
            report["finished"].as_array().unwrap().is_empty(),
            "{case}: {report}"
        );
    }
    assert_untouched(&h, mdev, &case);
}

/// The CLI aborted at every vGPU failpoint, on both frameworks: reconcile (then detach, past the
/// point of no return; detach again, for a release cut short) leaves the host as it was.
#[test]
fn a_crash_at_every_vgpu_failpoint_is_repaired() {
    let mut cases = 0;
    std::thread::scope(|s| {
        let handles: Vec<_> = Failpoint::of(Stage::Vgpu)
            .flat_map(|fp| [(fp, false), (fp, true)])
            .map(|(fp, mdev)| s.spawn(move || vgpu_crash_case(fp, mdev)))
            .collect();
        for h in handles {
            h.join().expect("crash case passed");
            cases += 1;
        }
    });
    assert_eq!(cases, 2 * Failpoint::of(Stage::Vgpu).count());
    assert_eq!(cases, 10);
}

#[test]
fn a_mixed_host_attaches_on_both_frameworks_and_the_catalogue_follows() {
    let h = sysfs::mixed_vgpu_host();
    let a = json(&cli(
        &h,
        &["--json", "attach", "--vgpu", "L40S-48Q", "--owner", "vm-a"],
    ));
    assert_eq!(a["devices"][0]["address"], "0000:41:00.4");
    assert_eq!(a["devices"][0]["vgpu"], true);
    let b = json(&cli(
        &h,
        &[
            "--json",
            "attach",
            "--vgpu",
            "GRID T4-2Q",
            "--owner",
            "vm-b",
        ],
    ));
    assert!(b["devices"][0]["mdev_uuid"].is_string(), "{b}");
    let t = json(&cli(&h, &["--json", "vgpu", "types"]));
    let names: Vec<(&str, u64)> = t["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["available"].as_u64().unwrap(),
            )
        })
        .collect();
    // The L40S is full (header-only tables); the T4 offers only 2Q now, one fewer.
    assert_eq!(names, [("GRID T4-1B", 0), ("GRID T4-2Q", 7)], "{t}");
    for o in ["vm-a", "vm-b"] {
        assert!(cli(&h, &["detach", "--owner", o]).status.success());
    }
    let t = json(&cli(&h, &["--json", "vgpu", "types"]));
    assert_eq!(t["profiles"].as_array().unwrap().len(), 6, "{t}");
    assert!(h.journal_clean());
}
