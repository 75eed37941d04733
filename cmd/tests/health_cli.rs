//! `health` and `reset` as a user runs them: JSON field names, exit codes, placement.

mod common;

use std::process::{Command, Output};

use common::{cli_binary, json};
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};

/// The CLI against `h`'s sysfs and state; the tests that need the fake `/dev` pass `--dev-dir`.
fn run(h: &FakeHost, args: &[&str]) -> Output {
    Command::new(cli_binary())
        .args(h.cli_args())
        .args(args)
        .env_remove("GPU_PASSTHROUGH_FAILPOINT")
        .output()
        .expect("run the CLI")
}

/// The display device of run C (no reset method) and a second GPU.
fn host() -> FakeHost {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:00:02.0", 0x1234, 0x1111, 0x030000)
            .driver("bochs-drm")
            .group(2)
            .reset_method(""),
    )
    .add(
        FakeDevice::new("0000:00:04.0", 0x1234, 0x1111, 0x030000)
            .driver("bochs-drm")
            .group(4),
    );
    h
}

fn dev_dir(h: &FakeHost) -> [&str; 2] {
    ["--dev-dir", h.dev.to_str().unwrap()]
}

#[test]
fn scan_prints_one_event_per_fault_with_stable_fields() {
    let h = host();
    let log = h.dir.path().join("console.log");
    std::fs::write(
        &log,
        "[ 3.1] NVRM: GPU 0000:01:00.0: RmInitAdapter failed! (0x22:0x56:667)\n\
         [ 3.2] NVRM: GPU 0000:01:00.0: rm_init_adapter failed, device minor number 0\n\
         [ 9.9] NVRM: Xid (PCI:0000:02:00): 79, pid=1, GPU has fallen off the bus.\n\
         hello from the workload\n",
    )
    .unwrap();
    let out = run(
        &h,
        &[
            "health",
            "scan",
            "--console",
            log.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["stats"]["lines"], 4, "{report}");
    let v = &report["faults"];
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v[0]["count"], 1);
    assert_eq!(v[0]["kind"], "init_failed");
    assert_eq!(v[0]["address"], "0000:01:00.0");
    assert_eq!(v[1]["kind"], "xid");
    assert_eq!(v[1]["xid"], 79);
    assert_eq!(v[1]["address"], "0000:02:00.0");
    assert_eq!(v[1]["action"], "reset_gpu");
    let missing = run(&h, &["health", "scan", "--console", "/nonexistent/log"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/log"));
}

#[test]
fn guest_text_reaches_the_terminal_escaped() {
    let h = host();
    let log = h.dir.path().join("console.log");
    // JSON-escaped control characters in a forged GPU-XID line: ESC sequences that would clear
    // the screen and retitle the terminal.
    std::fs::write(
        &log,
        r#"GPU-XID {"address":"0000:00:05.0","kind":"xid","xid":79,"message":"\u001b[2J\u001b]0;owned\u0007 \u009b31m","action":"reboot_host"}"#,
    )
    .unwrap();
    let out = run(&h, &["health", "scan", "--console", log.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(
        text.contains("\\x1b[2J\\x1b]0;owned\\x07 \\u{9b}31m"),
        "{text}"
    );
    // The guest's "reboot_host" is not what the host says about an Xid 79.
    assert!(text.contains("action reset_gpu"), "{text}");
}

#[test]
fn ingest_for_two_owners_quarantines_and_gpus_1_picks_another_device() {
    let h = host();
    let log = h.dir.path().join("console.log");
    std::fs::write(
        &log,
        // At the guest address the boot spec gives the VM's first device (00:10.0).
        "NVRM: Xid (PCI:0000:00:10): 79, pid=1, GPU has fallen off the bus.\n",
    )
    .unwrap();
    for who in ["vm-1", "vm-2"] {
        let mut args = vec!["attach", "0000:00:02.0", "--owner", who, "--json"];
        args.extend(dev_dir(&h));
        let out = run(&h, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut args = vec!["detach", "--owner", who, "--json"];
        args.extend(dev_dir(&h));
        let out = run(&h, &args);
        let d = json(&out);
        assert_eq!(d["restored"][0]["health"]["reset"]["outcome"], "no_method");
        assert_eq!(d["restored"][0]["health"]["verify"]["ok"], true);
        let out = run(
            &h,
            &[
                "health",
                "ingest",
                "--owner",
                who,
                "--console",
                log.to_str().unwrap(),
                "--json",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json(&out)["recorded"][0]["device"], "0000:00:02.0");
    }
    let listed = json(&run(&h, &["health", "--json"]));
    assert_eq!(listed[0]["device"], "0000:00:02.0");
    assert_eq!(
        listed[0]["quarantine"]["owners"],
        serde_json::json!(["vm-1", "vm-2"])
    );
    let mut args = vec!["attach", "0000:00:02.0", "--owner", "vm-3"];
    args.extend(dev_dir(&h));
    let out = run(&h, &args);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("quarantined") && err.contains("vm-1: xid 79"),
        "{err}"
    );
    let mut args = vec!["attach", "--gpus", "1", "--owner", "vm-3", "--json"];
    args.extend(dev_dir(&h));
    let out = run(&h, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["devices"][0]["address"], "0000:00:04.0");
    let out = run(&h, &["health", "clear", "0000:00:02.0", "--json"]);
    assert_eq!(json(&out)["was_quarantined"], true);
}

#[test]
fn reset_of_an_attached_device_is_refused() {
    let h = host();
    let mut args = vec!["attach", "0000:00:04.0", "--owner", "vm-1"];
    args.extend(dev_dir(&h));
    assert!(run(&h, &args).status.success());
    let mut args = vec!["reset", "0000:00:04.0"];
    args.extend(dev_dir(&h));
    let out = run(&h, &args);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("attached to owner vm-1"));
    let mut args = vec!["reset", "0000:00:02.0", "--json"];
    args.extend(dev_dir(&h));
    let out = run(&h, &args);
    assert!(out.status.success());
    assert_eq!(json(&out)["reset"]["outcome"], "no_method");
}

/// `health check`: the host's own check of a free device; a BAR0 reading all-ones fails it
/// (exit 3) and quarantines the device.
#[test]
fn health_check_reads_the_device_and_quarantines_on_failure() {
    let h = FakeHost::new(true);
    // QEMU's edu device: BAR0 starts with its identification register.
    h.add(FakeDevice::new("0000:00:04.0", 0x1234, 0x11e8, 0x00ff00).group(4));
    let dev = h.sys.join("bus/pci/devices/0000:00:04.0");
    let mut page = vec![0u8; 4096];
    page[..4].copy_from_slice(&0x010000edu32.to_le_bytes());
    std::fs::write(dev.join("resource0"), &page).unwrap();
    let out = run(&h, &["--json", "health", "check", "0000:00:04.0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    assert_eq!(report["verify"]["bar0"], 0x010000ed, "{report}");
    assert!(report["quarantine"].is_null(), "{report}");
    std::fs::write(dev.join("resource0"), [0xffu8; 4096]).unwrap();
    let out = run(&h, &["health", "check", "0000:00:04.0"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("HOST CHECK FAILED") && text.contains("is quarantined"),
        "{text}"
    );
}
