//! Run C: a guest with an emulated IOMMU plays the host. Its `/init` (`e2e/host-guest-init.sh`)
//! prints `E2E-C check NAME PASS|FAIL` for its own sysfs checks, facts such as
//! `E2E-C devices vga=… edu=… nic=…`, and frames every CLI command as
//! `E2E-C begin L` stdout `E2E-C stderr L` stderr `E2E-C end L` `E2E-C rc L N`.

mod hardening;
mod health;
mod host_check;

use crate::checks::Checks;
use crate::cli_json::{
    BootSpec, CheckStatus, CliError, DetachReport, Device, DeviceKind, DoctorReport, Listing,
    PciAddress, Plan, ReconcileReport, RefusalReason,
};
use crate::console::Console;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::Path;

/// One framed command: its output, error output and exit code.
#[derive(Debug, Default, Clone)]
pub struct Framed {
    /// stdout lines.
    pub out: Vec<String>,
    /// stderr lines.
    pub err: Vec<String>,
    /// Exit code, when the guest printed one.
    pub rc: Option<i32>,
}

impl Framed {
    fn out(&self) -> String {
        self.out.join("\n")
    }
    fn err(&self) -> String {
        self.err.join("\n")
    }
    /// stdout as a `T`, or why not.
    fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.out()).map_err(|e| format!("{e}; stdout: {}", self.out()))
    }
}

/// What run C's console says.
#[derive(Debug, Default)]
pub struct RunC {
    /// Commands by label.
    pub commands: BTreeMap<String, Framed>,
    /// `E2E-C <fact> <value>` lines (first of each).
    pub facts: BTreeMap<String, String>,
    /// The guest's own checks: (name, passed).
    pub guest_checks: Vec<(String, bool)>,
}

const FACTS: [&str; 6] = [
    "devices",
    "edu_enable_before",
    "boot_vga",
    "kvm",
    "crash_left_driver",
    "nested_device",
];

impl RunC {
    /// Split the console into frames, facts and guest checks.
    pub fn parse(console: &Console) -> RunC {
        let mut run = RunC::default();
        let mut current: Option<(String, bool)> = None; // (label, in stderr part)
        for line in &console.lines {
            if let Some(rest) = line.find("E2E-C ").map(|at| &line[at + "E2E-C ".len()..]) {
                let words: Vec<&str> = rest.split_whitespace().collect();
                match words.as_slice() {
                    ["begin", label] => {
                        current = Some(((*label).to_owned(), false));
                        run.commands.entry((*label).to_owned()).or_default();
                        continue;
                    }
                    ["stderr", label] => {
                        current = Some(((*label).to_owned(), true));
                        continue;
                    }
                    ["end", _] => {
                        current = None;
                        continue;
                    }
                    ["rc", label, code] => {
                        let entry = run.commands.entry((*label).to_owned()).or_default();
                        entry.rc = code.parse().ok();
                        continue;
                    }
                    ["check", .., verdict] if words.len() >= 3 && current.is_none() => {
                        let name = rest["check ".len()..rest.len() - verdict.len()].trim();
                        run.guest_checks.push((name.to_owned(), *verdict == "PASS"));
                        continue;
                    }
                    // `reset_method ROLE METHODS`: one fact per role.
                    ["reset_method", role, ..] if current.is_none() => {
                        let key = format!("reset_method {role}");
                        let value = rest[key.len()..].trim().to_owned();
                        run.facts.entry(key).or_insert(value);
                        continue;
                    }
                    [fact, ..] if FACTS.contains(fact) && current.is_none() => {
                        let value = rest[fact.len()..].trim().to_owned();
                        run.facts.entry((*fact).to_owned()).or_insert(value);
                        continue;
                    }
                    _ => {}
                }
            }
            if let Some((label, in_err)) = &current {
                let entry = run.commands.entry(label.clone()).or_default();
                let part = if *in_err {
                    &mut entry.err
                } else {
                    &mut entry.out
                };
                part.push(line.clone());
            }
        }
        run
    }

    /// Write each command's output to `DIR/run-c-LABEL.out` and `.err`, for people reading logs.
    pub fn write_outputs(&self, dir: &Path) -> std::io::Result<()> {
        for (label, f) in &self.commands {
            std::fs::write(dir.join(format!("run-c-{label}.out")), f.out() + "\n")?;
            std::fs::write(dir.join(format!("run-c-{label}.err")), f.err() + "\n")?;
        }
        Ok(())
    }

    fn command(&self, label: &str) -> Framed {
        self.commands.get(label).cloned().unwrap_or_default()
    }

    /// The address the guest found for `vga`, `edu` or `nic`.
    fn device(&self, role: &str) -> Option<PciAddress> {
        self.facts
            .get("devices")?
            .split_whitespace()
            .find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == role).then(|| v.parse().ok()).flatten()
            })
    }
}

fn rc_is(c: &mut Checks, run: &RunC, label: &str, want: i32) {
    let f = run.command(label);
    c.check(
        format!("gpu-passthrough {label} exits {want}"),
        f.rc == Some(want),
        || format!("exit {:?}; stderr: {}", f.rc, f.err()),
    );
}

fn show(a: Option<PciAddress>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

/// Every run C check. `nested`: the nested VM part ran (`E2E_NESTED=1`).
pub fn checks(console: &Console, nested: bool) -> Checks {
    let mut c = Checks::default();
    let run = RunC::parse(console);
    c.check(
        "guest init reached the end",
        console.has("E2E-C done"),
        || format!("last lines: {}", console.tail(3)),
    );
    for (name, ok) in &run.guest_checks {
        c.check(name.clone(), *ok, || "the guest's own check failed".into());
    }
    let (vga, nic, edu) = (run.device("vga"), run.device("nic"), run.device("edu"));
    c.check(
        "the guest found the VGA, NIC and edu devices",
        vga.is_some() && nic.is_some() && edu.is_some(),
        || format!("devices: {:?}", run.facts.get("devices")),
    );

    // doctor: the IOMMU and VFIO checks pass in this guest; with a nested /dev/kvm the verdict too.
    let doctor = run.command("doctor").parse::<DoctorReport>();
    let statuses: BTreeMap<String, CheckStatus> = doctor
        .as_ref()
        .map(|d| {
            d.checks
                .iter()
                .map(|k| (k.name.clone(), k.status))
                .collect()
        })
        .unwrap_or_default();
    c.check(
        "doctor --json deserializes as a doctor report",
        doctor.is_ok(),
        || doctor.as_ref().err().cloned().unwrap_or_default(),
    );
    c.check(
        "doctor: iommu OK",
        statuses.get("iommu") == Some(&CheckStatus::Ok),
        || format!("checks: {statuses:?}"),
    );
    let vfio: Vec<_> = statuses
        .iter()
        .filter(|(n, _)| n.starts_with("vfio"))
        .collect();
    c.check(
        "doctor: every vfio check OK",
        !vfio.is_empty() && vfio.iter().all(|(_, s)| **s == CheckStatus::Ok),
        || format!("vfio checks: {vfio:?}"),
    );
    c.info(format!("doctor checks: {statuses:?}"));
    c.check(
        "doctor: host_processes OK (the guest's init runs in the initial PID namespace)",
        statuses.get("host_processes") == Some(&CheckStatus::Ok),
        || format!("checks: {statuses:?}"),
    );
    // Run under `unshare --pid --fork --mount-proc` (a pod without hostPID): blind, and it says so.
    let blind = run.command("blind-doctor").parse::<DoctorReport>();
    c.check(
        "blind: doctor in a PID namespace of its own fails host_processes, naming hostPID: true",
        blind.as_ref().is_ok_and(|d| {
            d.checks.iter().any(|k| {
                k.name == "host_processes"
                    && k.status == CheckStatus::Fail
                    && k.fix.contains("hostPID: true")
            })
        }),
        || format!("{blind:?}"),
    );
    if run.facts.get("kvm").map(String::as_str) == Some("present") {
        rc_is(&mut c, &run, "doctor", 0);
    } else {
        let rc = run.command("doctor").rc;
        c.check(
            "doctor exits 5 (not ready) without /dev/kvm",
            rc == Some(5),
            || format!("exit {rc:?}"),
        );
    }

    rc_is(&mut c, &run, "devices", 0);
    let listing = |label: &str| -> BTreeMap<PciAddress, Device> {
        run.command(label)
            .parse::<Listing>()
            .map(|l| l.devices.into_iter().map(|d| (d.address, d)).collect())
            .unwrap_or_default()
    };
    let candidates = listing("devices");
    let v = vga.and_then(|a| candidates.get(&a));
    c.check(
        "devices: the VGA device is a candidate, on bochs-drm, in its own IOMMU group, boot_vga",
        v.is_some_and(|v| {
            v.driver.as_deref() == Some("bochs-drm")
                && v.iommu_group.is_some()
                && v.boot_vga
                && v.kind == DeviceKind::Display
        }),
        || format!("{v:?}; stdout: {}", run.command("devices").out()),
    );
    c.check(
        "devices: the NIC is not offered as a GPU candidate",
        nic.is_some_and(|n| !candidates.contains_key(&n)),
        || format!("candidates: {:?}", candidates.keys().collect::<Vec<_>>()),
    );
    rc_is(&mut c, &run, "devices-all", 0);
    let every = listing("devices-all");
    c.check(
        "devices --all: the NIC on e1000e and edu with no driver",
        nic.and_then(|n| every.get(&n))
            .is_some_and(|d| d.driver.as_deref() == Some("e1000e"))
            && edu
                .and_then(|e| every.get(&e))
                .is_some_and(|d| d.driver.is_none()),
        || format!("devices: {:?}", every.values().collect::<Vec<_>>()),
    );

    if run.facts.get("boot_vga").map(String::as_str) == Some("1") {
        let f = run.command("plan-boot-vga");
        let plan = f.parse::<Plan>();
        c.check(
            "plan refuses the boot VGA device without --allow-boot-vga",
            f.rc.is_some_and(|rc| rc != 0)
                && plan.as_ref().is_ok_and(|p| {
                    p.refusals
                        .iter()
                        .any(|r| r.reason == RefusalReason::BootVga && r.device == vga)
                }),
            || format!("exit {:?}: {:?}", f.rc, plan.map(|p| p.refusals)),
        );
    }
    rc_is(&mut c, &run, "plan", 0);
    let plan = run.command("plan").parse::<Plan>();
    let writes_for = |dev: Option<PciAddress>| {
        plan.as_ref().is_ok_and(|p| {
            p.writes.iter().any(|w| {
                w.path.ends_with("driver_override")
                    && dev.is_some_and(|d| w.path.to_string_lossy().contains(&d.to_string()))
            })
        })
    };
    c.check(
        "plan lists the sysfs writes for both devices",
        writes_for(vga) && writes_for(nic),
        || format!("{:?}", plan.as_ref().map(|p| &p.writes)),
    );

    rc_is(&mut c, &run, "attach", 0);
    let spec = run.command("attach").parse::<BootSpec>();
    c.check(
        "attach: VFIO verification passed and the boot spec was printed (JSON)",
        spec.as_ref()
            .is_ok_and(|s| !s.devices.is_empty() && s.devices.iter().all(|d| d.vfio.is_some())),
        || format!("{:?}", spec.as_ref().map(|s| &s.devices)),
    );
    let qemu_has = |dev: Option<PciAddress>| {
        let want = format!("vfio-pci,host={}", show(dev));
        spec.as_ref()
            .is_ok_and(|s| s.qemu.args.iter().any(|a| a.contains(&want)))
    };
    c.check(
        format!(
            "attach: boot spec has -device vfio-pci,host={} and host={}",
            show(vga),
            show(nic)
        ),
        qemu_has(vga) && qemu_has(nic),
        || format!("qemu args: {:?}", spec.as_ref().map(|s| &s.qemu.args)),
    );
    c.check(
        "attach: boot spec has HAS_GPU=1 and /dev/vfio/N",
        spec.as_ref().is_ok_and(|s| {
            s.kernel_cmdline.iter().any(|w| w == "HAS_GPU=1")
                && s.devices
                    .iter()
                    .all(|d| d.vfio_device.starts_with("/dev/vfio/"))
        }),
        || {
            format!(
                "{:?}",
                spec.as_ref().map(|s| (&s.kernel_cmdline, &s.devices))
            )
        },
    );
    let again = run.command("attach-again");
    let refused = again.parse::<CliError>();
    c.check(
        "attach of a device owned by vm-1 is refused naming vm-1",
        again.rc.is_some_and(|rc| rc != 0)
            && refused
                .as_ref()
                .is_ok_and(|e| Some(e.exit_code) == again.rc && e.error.contains("vm-1")),
        || format!("exit {:?}: {refused:?}", again.rc),
    );
    rc_is(&mut c, &run, "detach", 0);
    let detach = run.command("detach").parse::<DetachReport>();
    let back_on = |dev: Option<PciAddress>, driver: &str| {
        detach.as_ref().is_ok_and(|d| {
            d.restored
                .iter()
                .any(|r| Some(r.device) == dev && r.driver.as_deref() == Some(driver))
        })
    };
    c.check(
        "detach: its report gives the VGA device back to bochs-drm and the NIC to e1000e",
        back_on(vga, "bochs-drm") && back_on(nic, "e1000e"),
        || format!("{detach:?}"),
    );
    let crash = run.command("crash");
    c.check(
        "attach with failpoint after-unbind aborted",
        crash.rc.is_some_and(|rc| rc != 0),
        || format!("exit {:?}", crash.rc),
    );
    let left = run.facts.get("crash_left_driver");
    c.check(
        "the crash left the VGA device without its driver (so reconcile has work)",
        left.is_some_and(|d| d != "bochs-drm"),
        || format!("driver after crash: {left:?}"),
    );
    rc_is(&mut c, &run, "reconcile", 0);
    let reconcile = run.command("reconcile").parse::<ReconcileReport>();
    c.check(
        "reconcile: its report rolled the VGA device back to bochs-drm, without errors",
        reconcile.as_ref().is_ok_and(|r| {
            r.errors.is_empty()
                && r.rolled_back
                    .iter()
                    .any(|d| Some(d.device) == vga && d.driver.as_deref() == Some("bochs-drm"))
        }),
        || format!("{reconcile:?}"),
    );
    rc_is(&mut c, &run, "reconcile-again", 0);
    rc_is(&mut c, &run, "attach-after-reconcile", 0);
    rc_is(&mut c, &run, "detach-after-reconcile", 0);
    health::checks(&mut c, &run);
    hardening::checks(&mut c, &run, console);
    host_check::checks(&mut c, &run);

    if nested {
        rc_is(&mut c, &run, "nested-attach", 0);
        let device = run.facts.get("nested_device");
        c.check(
            "nested: boot spec gave -device vfio-pci,host=<edu>,bus=pcie.0,addr=0x10",
            device
                .is_some_and(|d| *d == format!("vfio-pci,host={},bus=pcie.0,addr=0x10", show(edu))),
            || format!("nested_device: {device:?}, edu {}", show(edu)),
        );
        c.check(
            "nested: the nested guest's PCI list shows the edu device (0x1234:0x11e8) at 0000:00:10.0, the guest address the boot spec fixed",
            console
                .all_after("E2E-N pci ")
                .any(|l| l.starts_with("0000:00:10.0 0x1234:0x11e8")),
            || {
                format!(
                    "nested PCI list: {:?}",
                    console.all_after("E2E-N pci ").collect::<Vec<_>>()
                )
            },
        );
        rc_is(&mut c, &run, "nested-detach", 0);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
0.1 E2E-C devices vga=0000:00:02.0 edu=0000:00:04.0 nic=0000:00:03.0
0.2 E2E-C check iommu groups exist PASS
0.3 E2E-C check sysfs: 0000:00:02.0 on vfio-pci FAIL
0.4 E2E-C begin devices
0.5 {\"scanned\":9,\"all\":false,\"devices\":[
0.5 {\"address\":\"0000:00:02.0\",\"driver\":\"bochs-drm\",\"iommu_group\":1,\"boot_vga\":true,\"kind\":\"display\",\"vendor_id\":4660}
0.5 ]}
0.6 E2E-C stderr devices
0.6 some warning
0.7 E2E-C end devices
0.7 E2E-C rc devices 0
0.8 E2E-C done
";

    #[test]
    fn frames_facts_and_guest_checks_are_separated() {
        let run = RunC::parse(&Console::parse(LOG));
        let devices = &run.commands["devices"];
        assert_eq!(devices.rc, Some(0));
        assert_eq!(devices.err, ["some warning"]);
        let list: Listing = devices.parse().unwrap();
        assert_eq!(list.scanned, 9);
        assert_eq!(list.devices[0].kind, DeviceKind::Display);
        assert_eq!(
            run.guest_checks,
            [
                ("iommu groups exist".to_owned(), true),
                ("sysfs: 0000:00:02.0 on vfio-pci".to_owned(), false)
            ]
        );
        assert_eq!(run.device("nic").unwrap().to_string(), "0000:00:03.0");
    }

    #[test]
    fn missing_commands_fail_their_checks_instead_of_vanishing() {
        let c = checks(&Console::parse(LOG), true);
        let passed: Vec<_> = c.lines().iter().filter(|l| l.starts_with("PASS")).collect();
        // Only what the log shows: the end marker, one guest check, the devices found, devices'
        // exit code, the VGA candidate, the NIC not a candidate.
        assert_eq!(passed.len(), 6, "{passed:#?}");
        assert!(c.failed() >= 25, "{:#?}", c.lines());
        assert!(
            c.lines()
                .iter()
                .any(|l| l.starts_with("FAIL gpu-passthrough nested-attach exits 0"))
        );
    }
}
