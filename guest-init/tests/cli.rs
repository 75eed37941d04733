//! `gpu-init` as another init calls it.

use gpu_passthrough_guest_contract::report::{SetupErrorClass, Status, find_report};
use std::process::Command;

fn gpu_init(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-init"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn without_pid_1_or_a_command_it_prints_usage_and_exits_2() {
    let out = gpu_init(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: gpu-init setup --root DIR"));
}

#[test]
fn setup_requires_an_existing_root() {
    let out = gpu_init(&["setup"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--root DIR is required"));
    let out = gpu_init(&["setup", "--root", "/nonexistent/root"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/root is not a directory"));
}

#[test]
fn a_missing_gpu_layer_is_reported_and_fails_only_with_strict() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path().to_str().unwrap();
    let manifest = "/nonexistent/gpu/manifest.json";
    let relaxed = gpu_init(&["setup", "--root", root, "--manifest", manifest]);
    assert_eq!(relaxed.status.code(), Some(0), "{relaxed:?}");
    let stdout = String::from_utf8_lossy(&relaxed.stdout);
    let report = find_report(&stdout)
        .expect("report line")
        .expect("the contract's Report");
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.error.unwrap().class, SetupErrorClass::NoGpuLayer);
    assert_eq!(stdout.lines().count(), 1, "exactly one line on stdout");

    let strict = gpu_init(&["setup", "--root", root, "--manifest", manifest, "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
}
