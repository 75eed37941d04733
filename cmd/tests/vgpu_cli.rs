//! vGPU catalogue and placement on fake trees: an L40S host (vendor VFIO, one GPU full), a T4
//! on mdev, both frameworks together, and a profile that does not exist.

use std::process::Command;

use gpu_passthrough::pci::Sysfs;
use gpu_passthrough::vgpu::{self, Framework, NoQuarantine};
use gpu_passthrough_tests::sysfs::{self, FakeHost};

fn cli(h: &FakeHost, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-passthrough"))
        .args(h.cli_args())
        .args(args)
        .output()
        .expect("run the CLI")
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
    let out = cli(&h, &["--json", "vgpu", "types"]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
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
