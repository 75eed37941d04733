//! Failure at every step (in process) and a crash at every step (the CLI killed at a
//! failpoint): every case must end with every device on its original driver and a clean journal,
//! after the rollback or after `reconcile`.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use common::cli_binary;
use gpu_passthrough::attach::{AttachError, AttachRequest, Owner, PlanRequest};
use gpu_passthrough::failpoint::{Failpoint, Stage};
use gpu_passthrough_tests::sysfs::{self, FakeHost};

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";

fn request() -> AttachRequest {
    AttachRequest {
        plan: PlanRequest {
            devices: vec![GPU.parse().unwrap()],
            ..Default::default()
        },
        owner: Owner::new("vm-fail").unwrap(),
        initrd: None,
    }
}

fn assert_original(h: &FakeHost, case: &str) {
    assert_eq!(
        h.driver(GPU).as_deref(),
        Some("nvidia"),
        "{case}: GPU driver"
    );
    assert_eq!(
        h.driver(AUDIO).as_deref(),
        Some("snd_hda_intel"),
        "{case}: audio driver"
    );
    assert_eq!(h.driver_override(GPU), None, "{case}: GPU override");
    assert_eq!(h.driver_override(AUDIO), None, "{case}: audio override");
    assert!(!h.dev.join("vfio/12").exists(), "{case}: vfio node left");
    assert!(h.journal_clean(), "{case}: journal {:?}", h.journal());
}

/// Each forward step failing, on the GPU (first device) and on its audio function (second).
#[test]
fn a_failure_at_every_step_rolls_back_to_the_original_drivers() {
    let mut cases = 0;
    let faults: Vec<String> = ["driver_override", "unbind", "drivers_probe", "verify"]
        .iter()
        .flat_map(|attr| {
            [
                format!("fail-once {attr}"),
                format!("fail-once {attr} after 1"),
            ]
        })
        .chain(["no-vfio-node".to_owned()])
        .collect();
    for fault in &faults {
        let h = sysfs::workstation();
        h.inject(fault);
        let err = h.host().attach(&request()).unwrap_err();
        match (fault.as_str(), &err) {
            ("no-vfio-node", AttachError::NoVfioNode { group: 12, .. }) => {}
            (f, AttachError::Vfio { .. }) if f.contains("verify") => {}
            (f, AttachError::Write { path, .. }) => {
                let attr = f.split_whitespace().nth(1).unwrap();
                assert!(path.ends_with(attr), "{f}: failed on {}", path.display());
            }
            (f, e) => panic!("{f}: unexpected error {e}"),
        }
        assert!(err.to_string().contains("rolled back"), "{fault}: {err}");
        h.clear_faults();
        assert_original(&h, fault);
        cases += 1;
    }
    assert_eq!(cases, 9);
}

/// The rollback itself fails: the journal keeps the transaction and reconcile finishes the job.
#[test]
fn a_failed_rollback_is_repaired_by_reconcile() {
    let h = sysfs::workstation();
    // Verify fails; then the first rollback unbind (of the audio from vfio-pci) fails too.
    h.inject("fail-once verify");
    h.inject("fail-once unbind after 2");
    let err = h.host().attach(&request()).unwrap_err();
    assert!(matches!(err, AttachError::RollbackFailed { .. }), "{err}");
    assert!(err.to_string().contains("reconcile"));
    // The cause stays typed, and nothing in the chain claims a rollback.
    let cause = std::error::Error::source(&err).expect("the cause is the source");
    assert!(
        matches!(
            cause.downcast_ref::<Box<AttachError>>().map(|b| b.as_ref()),
            Some(AttachError::Vfio { .. })
        ),
        "{cause}"
    );
    let chain = gpu_passthrough::error_chain(&err);
    assert!(!chain.contains("was rolled back"), "{chain}");
    let j = h.journal().unwrap();
    assert_eq!(j["transactions"].as_array().unwrap().len(), 1);
    let r = h.host().reconcile().unwrap();
    assert_eq!(r.rolled_back.len(), 2);
    assert_original(&h, "failed rollback");
}

fn cli(h: &FakeHost, args: &[&str], failpoint: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(cli_binary());
    cmd.args(h.cli_args())
        .args(args)
        .args(["--dev-dir", h.dev.to_str().unwrap()]);
    cmd.env_remove("GPU_PASSTHROUGH_FAILPOINT");
    if let Some(f) = failpoint {
        cmd.env("GPU_PASSTHROUGH_FAILPOINT", f);
    }
    cmd.output().expect("run the CLI")
}

/// The failpoint a killed CLI said it aborted at (its last words on stderr). Panics unless the
/// process died of SIGABRT (6) after saying so: a panic or an error exit is not a crash case.
fn aborted_at(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(6), "not aborted: {err}");
    err.lines()
        .find_map(|line| line.split_once("failpoint ")?.1.split_once(": aborting"))
        .map(|(name, _)| name.to_owned())
        .unwrap_or_else(|| panic!("aborted, but not at a failpoint: {err}"))
}

/// One crash case on its own fake tree (cases run in parallel threads); returns the failpoint
/// the CLI aborted at.
fn crash_case(fp: &str) -> String {
    let h = sysfs::workstation();
    let attach = ["attach", GPU, "--owner", "vm-crash"];
    if fp == "mid-rollback" {
        h.inject("fail-once verify");
    }
    if fp == "mid-detach" {
        let out = cli(&h, &attach, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cli(&h, &["detach", "--owner", "vm-crash"], Some(fp));
        let reached = aborted_at(&out);
        // Half detached: the attachment is still recorded, detach again finishes.
        let out = cli(&h, &["detach", "--owner", "vm-crash"], None);
        assert!(
            out.status.success(),
            "{fp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_original(&h, fp);
        return reached;
    }
    let out = cli(&h, &attach, Some(fp));
    let reached = aborted_at(&out);
    h.clear_faults();
    if fp == "after-unbind" {
        // Until reconcile runs, the half-done device is refused with the fix.
        let out = cli(&h, &["attach", GPU, "--owner", "vm-other"], None);
        assert_eq!(out.status.code(), Some(4));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("did not finish") && err.contains("reconcile"),
            "{err}"
        );
    }
    let out = cli(&h, &["--json", "reconcile"], None);
    assert!(
        out.status.success(),
        "{fp}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let past_point_of_no_return = matches!(fp, "after-verify" | "after-commit");
    if past_point_of_no_return {
        if fp == "after-verify" {
            assert_eq!(report["finished"][0], "vm-crash", "{fp}: {report}");
        }
        assert_eq!(h.driver(GPU).as_deref(), Some("vfio-pci"), "{fp}");
        assert_eq!(report["kept_unknown"][0], "vm-crash", "{fp}: {report}");
        let out = cli(&h, &["detach", "--owner", "vm-crash"], None);
        assert!(
            out.status.success(),
            "{fp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(
            report["finished"].as_array().unwrap().is_empty(),
            "{fp}: {report}"
        );
    }
    assert_original(&h, fp);
    reached
}

/// The CLI process aborted at every failpoint of attach (and of a rollback and a detach);
/// reconcile (then detach, for the cases past the point of no return) restores everything.
#[test]
fn a_crash_at_every_step_is_repaired_by_reconcile() {
    let mut reached: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = Failpoint::of(Stage::Attach)
            .filter(|fp| *fp != Failpoint::AfterMdevCreate) // the vGPU case below
            .map(|fp| s.spawn(move || crash_case(fp.name())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("crash case passed"))
            .collect()
    });
    // vGPU: killed right after the mdev was created; reconcile removes it.
    let h = sysfs::vgpu_host();
    let out = cli(
        &h,
        &[
            "attach",
            "0000:3d:00.0",
            "--mdev-type",
            "nvidia-735",
            "--owner",
            "vm-v",
        ],
        Some("after-mdev-create"),
    );
    reached.push(aborted_at(&out));
    let mdevs = h.sys.join("bus/mdev/devices");
    assert_eq!(std::fs::read_dir(&mdevs).unwrap().count(), 1);
    let out = cli(&h, &["reconcile"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&mdevs).unwrap().count(), 0);
    assert!(h.journal_clean());
    assert_eq!(h.driver("0000:3d:00.0").as_deref(), Some("nvidia"));
    // Each attach failpoint was reached by the CLI itself, as its own words say.
    reached.sort();
    let mut expected: Vec<&str> = Failpoint::of(Stage::Attach).map(Failpoint::name).collect();
    expected.sort_unstable();
    assert_eq!(reached, expected);
}

/// A failpoint name the CLI does not know is refused before anything runs, never silently
/// ignored (a crash test with a typo would otherwise pass without crashing anything).
#[test]
fn an_unknown_failpoint_is_refused() {
    let h = sysfs::workstation();
    let out = cli(
        &h,
        &["attach", GPU, "--owner", "vm-typo"],
        Some("after-unbinds"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("after-unbinds") && err.contains("after-unbind,"),
        "{err}"
    );
    assert_eq!(h.driver(GPU).as_deref(), Some("nvidia"));
}

/// A `pid:N` owner: kept while the process exists (even stopped), released once it is gone.
#[test]
fn pid_owners_are_released_only_when_the_process_is_gone() {
    let h = sysfs::workstation();
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let owner = format!("pid:{}", child.id());
    let out = cli(&h, &["attach", GPU, "--owner", &owner], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stop = Command::new("kill")
        .args(["-STOP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    let out = cli(&h, &["--json", "reconcile"], None);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kept_alive"][0], owner.as_str(), "{report}");
    assert_eq!(h.driver(GPU).as_deref(), Some("vfio-pci"));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = cli(&h, &["--json", "reconcile"], None);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["released"][0]["owner"], owner.as_str(), "{report}");
    assert_original(&h, "pid owner");
}
