//! Run E: the driver upgrade to the proprietary 535.309.01 (no GSP firmware), booted like run A,
//! with `NVIDIA_DRIVER_CAPABILITIES`, `NVIDIA_VISIBLE_DEVICES` and `CUDA_VISIBLE_DEVICES` on the
//! kernel command line and `GPU_INIT_LOCK_MODULES=1`; and `versions diff` of the two releases.

use crate::checks::{Checks, json};
use crate::console::Console;
use gpu_passthrough_guest_contract::capability::Capability;
use gpu_passthrough_guest_contract::report::{
    DaemonResult, FailureClass, ModuleResult, Report, find_report,
};
use serde_json::Value;
use std::path::Path;

/// What the boot was given on its kernel command line.
pub struct Asked<'a> {
    /// `NVIDIA_DRIVER_CAPABILITIES` included `video`.
    pub video: bool,
    /// `NVIDIA_VISIBLE_DEVICES`.
    pub visible: &'a str,
    /// `CUDA_VISIBLE_DEVICES`.
    pub cuda: &'a str,
}

/// The `E2E-E` guest: report and workload.
pub fn upgrade_guest(
    console: &Console,
    driver: &str,
    kernel: &str,
    boot_rc: i32,
    asked: &Asked,
) -> Checks {
    let mut c = Checks::default();
    let found = find_report(&console.text);
    c.check(
        "a GPU-INIT report line that deserializes as the contract's Report",
        matches!(found, Some(Ok(_))),
        || {
            format!(
                "{:?}; last lines: {}",
                found
                    .as_ref()
                    .map(|r| r.as_ref().err().map(|e| e.to_string())),
                console.tail(5)
            )
        },
    );
    if let Some(Ok(r)) = found {
        report_checks(&mut c, &r, driver, kernel, asked);
    }
    workload_checks(&mut c, console, driver, asked);
    c.check("guest powered off by itself", boot_rc == 0, || {
        format!("QEMU exit {boot_rc}")
    });
    c
}

fn report_checks(c: &mut Checks, r: &Report, driver: &str, kernel: &str, asked: &Asked) {
    crate::guest::driver_reached_the_kernel(
        c,
        r,
        driver,
        kernel,
        "proprietary nvidia.ko passed the kernel's checks and failed with ENODEV, class no_gpu",
    );
    c.check(
        "nvidia_uvm skipped because nvidia failed (class no_gpu)",
        r.module("nvidia_uvm").is_some_and(|m| {
            m.result == ModuleResult::Skipped && m.class == Some(FailureClass::NoGpu)
        }),
        || format!("got {}", json(&r.module("nvidia_uvm"))),
    );
    c.check(
        "no GSP firmware asked for or missing (a no-GSP release)",
        r.firmware.missing.is_empty() && r.firmware.path.is_none(),
        || format!("firmware: {}", json(&r.firmware)),
    );
    let mut want = vec![Capability::Compute, Capability::Utility];
    if asked.video {
        want.push(Capability::Video);
    }
    c.check(
        format!(
            "capabilities injected: {}",
            want.iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ),
        r.capabilities == want,
        || format!("got {:?}", r.capabilities),
    );
    let env = |k: &str| r.environment.get(k).map(String::as_str);
    c.check(
        format!(
            "the workload is given NVIDIA_VISIBLE_DEVICES={}",
            asked.visible
        ),
        env("NVIDIA_VISIBLE_DEVICES") == Some(asked.visible),
        || format!("environment: {}", json(&r.environment)),
    );
    c.check(
        format!("the workload is given CUDA_VISIBLE_DEVICES={}", asked.cuda),
        env("CUDA_VISIBLE_DEVICES") == Some(asked.cuda),
        || format!("environment: {}", json(&r.environment)),
    );
    let injected = |soname: &str| r.libraries.injects(soname);
    c.check(
        "libcuda.so.1 and libnvidia-ml.so.1 injected",
        injected("libcuda.so.1") && injected("libnvidia-ml.so.1"),
        || format!("libraries: {}", json(&r.libraries)),
    );
    c.check(
        format!(
            "NVDEC/NVENC (libnvcuvid.so.1, libnvidia-encode.so.1) injected only when asked (asked: {})",
            asked.video
        ),
        injected("libnvcuvid.so.1") == asked.video && injected("libnvidia-encode.so.1") == asked.video,
        || format!("libraries: {}", json(&r.libraries.injected)),
    );
    let daemon = |name: &str| r.daemons.iter().find(|d| d.name == name);
    c.check(
        "nvidia-persistenced classified (absent from this driver's libraries)",
        daemon("nvidia-persistenced").is_some_and(|d| d.result == DaemonResult::Absent),
        || format!("daemons: {}", json(&r.daemons)),
    );
    c.check(
        "nv-fabricmanager classified not_needed (no NVSwitch on the guest's bus)",
        daemon("nv-fabricmanager").is_some_and(|d| d.result == DaemonResult::NotNeeded),
        || format!("daemons: {}", json(&r.daemons)),
    );
    c.check(
        "GPU_INIT_LOCK_MODULES=1: kernel.modules_disabled written",
        r.modules_locked,
        || format!("problems: {:?}", r.problems),
    );
}

fn workload_checks(c: &mut Checks, console: &Console, driver: &str, asked: &Asked) {
    c.check(
        format!("ldconfig -p resolves libcuda.so.1 to libcuda.so.{driver}"),
        console.all_after("E2E-E libcuda_real ").any(|rest| {
            rest.split_once(" -> ")
                .is_some_and(|(_, real)| real.ends_with(&format!("/libcuda.so.{driver}")))
        }),
        || format!("libcuda_real: {:?}", console.after("E2E-E libcuda_real ")),
    );
    if let Some(line) = console.after("E2E-E libcuda_real ") {
        c.info(format!("libcuda_real {line}"));
    }
    let cached = |soname: &str| {
        console
            .all_after("E2E-E ldconfig ")
            .any(|l| l.trim_start().starts_with(&format!("{soname} ")))
    };
    c.check(
        format!(
            "the workload's ld cache has libnvcuvid.so.1 exactly when video was asked (asked: {})",
            asked.video
        ),
        cached("libnvcuvid.so.1") == asked.video && cached("libcuda.so.1"),
        || {
            format!(
                "ldconfig lines: {:?}",
                console.all_after("E2E-E ldconfig ").collect::<Vec<_>>()
            )
        },
    );
    for (var, want) in [
        ("NVIDIA_VISIBLE_DEVICES", asked.visible),
        ("CUDA_VISIBLE_DEVICES", asked.cuda),
    ] {
        c.check(
            format!("{var}={want} in the workload's environment"),
            console.after(&format!("E2E-E env {var}=")) == Some(want),
            || {
                format!(
                    "env: {:?}",
                    console.all_after("E2E-E env ").collect::<Vec<_>>()
                )
            },
        );
    }
    c.check(
        format!("nvidia-smi on PATH is the {driver} build"),
        console
            .after("E2E-E smi_version_strings ")
            .and_then(|n| n.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0),
        || {
            format!(
                "smi_version_strings: {:?}",
                console.after("E2E-E smi_version_strings ")
            )
        },
    );
    c.check(
        "nvidia-smi exits 9 (no driver to talk to)",
        console.after("E2E-E nvidia_smi_rc ") == Some("9"),
        || format!("nvidia_smi_rc: {:?}", console.after("E2E-E nvidia_smi_rc ")),
    );
    c.check(
        "the workload cannot load a module (modules_disabled is 1)",
        console.after("E2E-E modules_disabled ") == Some("1"),
        || {
            format!(
                "modules_disabled: {:?}",
                console.after("E2E-E modules_disabled ")
            )
        },
    );
}

/// `versions diff FROM TO --json`: the upgrade a reviewer reads.
pub fn version_diff(path: &Path, from_driver: &str, to_driver: &str) -> anyhow::Result<Checks> {
    let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let mut c = Checks::default();
    c.check(
        format!("driver_version {from_driver} → {to_driver}"),
        v["driver_version"]["from"] == from_driver && v["driver_version"]["to"] == to_driver,
        || format!("driver_version: {}", v["driver_version"]),
    );
    c.check(
        "module_flavor open → proprietary",
        v["module_flavor"]["from"] == "open" && v["module_flavor"]["to"] == "proprietary",
        || format!("module_flavor: {}", v["module_flavor"]),
    );
    c.check(
        "gsp true → false",
        v["gsp"]["from"] == true && v["gsp"]["to"] == false,
        || format!("gsp: {}", v["gsp"]),
    );
    let added = v["libraries"]["added"].to_string();
    c.check(
        format!("libraries added: libnvcuvid.so.{to_driver} and libnvidia-encode.so.{to_driver}"),
        added.contains(&format!("libnvcuvid.so.{to_driver}"))
            && added.contains(&format!("libnvidia-encode.so.{to_driver}")),
        || format!("libraries: {}", v["libraries"]),
    );
    let changed = v["libraries"]["changed"].to_string();
    c.check(
        format!("libcuda.so.1 real name changes to libcuda.so.{to_driver}"),
        changed.contains(&format!("libcuda.so.{to_driver}")),
        || format!("changed: {changed}"),
    );
    c.check(
        "firmware removed (no GSP firmware in the new release)",
        v["firmware"]["removed"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
            && v["firmware"]["added"]
                .as_array()
                .is_some_and(|a| a.is_empty()),
        || format!("firmware: {}", v["firmware"]),
    );
    c.check(
        "no GPU gained or lost (supported-gpus.json identical)",
        v["gpus_gained"].as_array().is_some_and(|a| a.is_empty())
            && v["gpus_lost"].as_array().is_some_and(|a| a.is_empty()),
        || format!("gained {} lost {}", v["gpus_gained"], v["gpus_lost"]),
    );
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_passthrough_guest_contract::report::{DaemonReport, ModuleReport};

    fn report(video: bool) -> Report {
        let mut r = Report::new("6.1.0-56-amd64".into());
        r.driver_version = Some("535.309.01".into());
        r.modules = vec![
            ModuleReport {
                name: "nvidia".into(),
                result: ModuleResult::Failed,
                class: Some(FailureClass::NoGpu),
                errno: Some(19),
                dependency: None,
                message: None,
            },
            ModuleReport {
                name: "nvidia_uvm".into(),
                result: ModuleResult::Skipped,
                class: Some(FailureClass::NoGpu),
                errno: None,
                dependency: Some("nvidia".into()),
                message: None,
            },
        ];
        r.capabilities = vec![Capability::Compute, Capability::Utility];
        let mut libs = vec![
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        ];
        if video {
            r.capabilities.push(Capability::Video);
            libs.extend([
                "/usr/lib/x86_64-linux-gnu/libnvcuvid.so.1",
                "/usr/lib/x86_64-linux-gnu/libnvidia-encode.so.1",
            ]);
        }
        r.libraries.injected = libs.into_iter().map(String::from).collect();
        r.environment = [
            ("NVIDIA_VISIBLE_DEVICES", "0"),
            ("CUDA_VISIBLE_DEVICES", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        r.daemons = vec![
            DaemonReport {
                name: "nvidia-persistenced".into(),
                result: DaemonResult::Absent,
                pid: None,
                args: vec![],
                message: None,
            },
            DaemonReport {
                name: "nv-fabricmanager".into(),
                result: DaemonResult::NotNeeded,
                pid: None,
                args: vec![],
                message: None,
            },
        ];
        r.modules_locked = true;
        r
    }

    fn console(r: &Report, video: bool) -> Console {
        let mut log = format!("4.00 {}\n", r.line());
        log += "5.00 E2E-E ldconfig \tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n";
        if video {
            log += "5.01 E2E-E ldconfig \tlibnvcuvid.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvcuvid.so.1\n";
        }
        log += "5.1 E2E-E libcuda_real /usr/lib/x86_64-linux-gnu/libcuda.so.1 -> /usr/lib/gpu-passthrough/lib/libcuda.so.535.309.01\n";
        log += "5.2 E2E-E env NVIDIA_VISIBLE_DEVICES=0\n5.3 E2E-E env CUDA_VISIBLE_DEVICES=0\n";
        log += "5.4 E2E-E smi_version_strings 3\n5.5 E2E-E nvidia_smi_rc 9\n5.6 E2E-E modules_disabled 1\n";
        Console::parse(&log)
    }

    #[test]
    fn a_good_boot_passes_and_a_leaked_video_library_fails() {
        let asked = Asked {
            video: false,
            visible: "0",
            cuda: "0",
        };
        let good = upgrade_guest(
            &console(&report(false), false),
            "535.309.01",
            "6.1.0-56-amd64",
            0,
            &asked,
        );
        assert_eq!(good.failed(), 0, "{:?}", good.lines());
        // Video libraries in a boot that did not ask for them: two checks fail.
        let leaked = upgrade_guest(
            &console(&report(true), true),
            "535.309.01",
            "6.1.0-56-amd64",
            0,
            &asked,
        );
        assert!(leaked.failed() >= 2, "{:?}", leaked.lines());
        let with_video = Asked {
            video: true,
            ..asked
        };
        let video = upgrade_guest(
            &console(&report(true), true),
            "535.309.01",
            "6.1.0-56-amd64",
            0,
            &with_video,
        );
        assert_eq!(video.failed(), 0, "{:?}", video.lines());
    }
}
