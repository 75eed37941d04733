//! The installed layout of `scripts/install`: `initrd build` finds the guest init in
//! `<prefix>/libexec/gpu-passthrough/` relative to the CLI, with no flag.

use std::fs;
use std::process::Command;

use gpu_passthrough_tests::fixtures;

#[test]
fn initrd_build_finds_the_installed_guest_init_without_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("prefix/bin");
    fs::create_dir_all(&bin).unwrap();
    let cli = bin.join("gpu-passthrough");
    fs::copy(env!("CARGO_BIN_EXE_gpu-passthrough"), &cli).unwrap();
    // Unpinned: the build stops at the refusal, after the guest init was looked up.
    let registry = fixtures::write_registry(
        dir.path(),
        "fx",
        fixtures::KERNEL_VERSION,
        &fixtures::gpu_artifacts(),
        false,
    );
    let build = || {
        Command::new(&cli)
            .arg("--registry")
            .arg(&registry)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .args(["initrd", "build", "--release", "fx"])
            .env_remove("GPU_PASSTHROUGH_GUEST_INIT")
            .output()
            .unwrap()
    };

    let out = build();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no guest init found"), "{stderr}");
    assert!(
        stderr.contains("libexec/gpu-passthrough/gpu-init"),
        "the message names where it looked: {stderr}"
    );

    let libexec = dir.path().join("prefix/libexec/gpu-passthrough");
    fs::create_dir_all(&libexec).unwrap();
    fixtures::guest_init_stand_in(&libexec); // writes libexec/gpu-passthrough/gpu-init
    let out = build();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("no guest init found"), "{stderr}");
    assert_eq!(out.status.code(), Some(4), "refused as unpinned: {stderr}");
}
