//! Run C, health between tenants: the reset and verification at detach (NIC: the kernel's first
//! method, `pm` on QEMU 7.2's e1000e, which has no FLR; NVMe: FLR; VGA: no method), the doctored
//! console ingested for the VGA's two owners, the quarantine refusal and `--gpus 1` picking the
//! other display.

use super::{RunC, rc_is, show};
use crate::checks::Checks;
use crate::cli_json::{CliError, PciAddress};
use gpu_passthrough::attach::{HealthCheck, ResetOutcome};
use gpu_passthrough::health::{
    Action, ClearReport, DeviceHealth, FaultKind, IngestReport, ScanReport,
};
use gpu_passthrough::vmm::BootSpec;

/// The health check of `dev` in the detach report of command `label`.
fn check_of(run: &RunC, label: &str, dev: Option<PciAddress>) -> Option<HealthCheck> {
    let v: serde_json::Value = run.command(label).parse().ok()?;
    let entry = v["restored"]
        .as_array()?
        .iter()
        .find(|r| r["device"].as_str() == dev.map(|d| d.to_string()).as_deref())?;
    serde_json::from_value(entry["health"].clone()).ok()
}

/// `E2E-C reset_method ROLE METHODS...` (what sysfs offered), as a list.
fn offered(run: &RunC, role: &str) -> Vec<String> {
    run.facts
        .get(&format!("reset_method {role}"))
        .map(|m| {
            m.split_whitespace()
                .map(str::to_owned)
                .filter(|m| m != "none")
                .collect()
        })
        .unwrap_or_default()
}

pub fn checks(c: &mut Checks, run: &RunC) {
    let (vga, nic, nvme, disp2) = (
        run.device("vga"),
        run.device("nic"),
        run.device("nvme"),
        run.device("disp2"),
    );
    rc_is(c, run, "attach-nvme", 0);
    rc_is(c, run, "detach-nvme", 0);
    let checks = [
        ("NIC", "detach", nic),
        ("VGA", "detach", vga),
        ("NVMe", "detach-nvme", nvme),
    ]
    .map(|(name, label, dev)| (name, dev, check_of(run, label, dev)));
    for (name, dev, h) in &checks {
        if let Some(h) = h {
            c.info(format!(
                "detach {name} {}: {}",
                show(*dev),
                h.to_string().replace('\n', "; ")
            ));
            if let Some(r) = &h.reset {
                c.figure(
                    format!(
                        "run C detach {name}: reset {} (ms)",
                        r.method.as_deref().unwrap_or("none")
                    ),
                    r.ms,
                );
            }
            c.figure(format!("run C detach {name}: verify (ms)"), h.verify.ms);
        }
    }
    let [(_, _, nic_h), (_, _, vga_h), (_, _, nvme_h)] = &checks;
    let nic_offered = offered(run, "nic");
    c.check(
        format!("detach: the NIC was reset with the first method the kernel offers ({nic_offered:?}) and verified"),
        nic_h.as_ref().is_some_and(|h| {
            h.reset.as_ref().is_some_and(|r| {
                r.outcome == ResetOutcome::Done && r.method.as_ref() == nic_offered.first()
            }) && h.verify.ok
        }),
        || format!("{nic_h:?}"),
    );
    c.check(
        "detach: the NVMe controller was reset with FLR and verified",
        nvme_h.as_ref().is_some_and(|h| {
            h.reset.as_ref().is_some_and(|r| {
                r.outcome == ResetOutcome::Done && r.method.as_deref() == Some("flr")
            }) && h.verify.ok
        }),
        || format!("offered {:?}: {nvme_h:?}", offered(run, "nvme")),
    );
    c.check(
        "detach: the VGA device (no reset method) verified without a reset",
        vga_h.as_ref().is_some_and(|h| {
            h.reset
                .as_ref()
                .is_some_and(|r| r.outcome == ResetOutcome::NoMethod)
                && h.verify.ok
        }),
        || format!("{vga_h:?}"),
    );

    let scan = run.command("health-scan").parse::<ScanReport>();
    let got: Vec<(FaultKind, Option<u32>, Action)> = scan
        .as_ref()
        .map(|s| {
            s.faults
                .iter()
                .map(|f| (f.fault.kind, f.fault.xid, f.fault.action))
                .collect()
        })
        .unwrap_or_default();
    c.check(
        "health scan: Xid 13 (none), Xid 79 (reset_gpu, its GPU-XID line not counted twice), D3cold",
        got == [
            (FaultKind::Xid, Some(13), Action::None),
            (FaultKind::Xid, Some(79), Action::ResetGpu),
            (FaultKind::PowerState, None, Action::ResetGpu),
        ],
        || format!("{scan:?}"),
    );
    for f in scan.iter().flat_map(|s| &s.faults) {
        c.info(format!("health scan: {f}"));
    }
    let i1 = run.command("ingest-vm-1").parse::<IngestReport>();
    c.check(
        "health ingest vm-1: the faults at the guest's address recorded against the VGA device",
        i1.as_ref().is_ok_and(|r| {
            r.recorded.len() == 2
                && r.recorded.iter().all(|e| Some(e.device) == vga)
                && r.quarantined.is_empty()
        }),
        || format!("{i1:?}"),
    );
    let i3 = run.command("ingest-vm-3").parse::<IngestReport>();
    c.check(
        "health ingest vm-3 (the VGA's second owner): quarantined",
        i3.as_ref()
            .is_ok_and(|r| r.quarantined.iter().map(|q| Some(q.device)).eq([vga])),
        || format!("{i3:?}"),
    );
    let records = run.command("health").parse::<Vec<DeviceHealth>>();
    c.check(
        "health --json: the VGA device quarantined by vm-1 and vm-3",
        records.as_ref().is_ok_and(|l| {
            l.iter().any(|d| {
                Some(d.device) == vga
                    && d.quarantine.as_ref().is_some_and(|q| {
                        q.owners
                            .iter()
                            .map(|o| o.as_ref().map(|o| o.as_str()))
                            .eq([Some("vm-1"), Some("vm-3")])
                    })
            })
        }),
        || format!("{records:?}"),
    );
    let listed: Result<serde_json::Value, _> = run.command("devices-quarantined").parse();
    c.check(
        "devices: the VGA device not ready, quarantined",
        listed.as_ref().is_ok_and(|l| {
            l["devices"].as_array().into_iter().flatten().any(|d| {
                d["address"].as_str() == vga.map(|v| v.to_string()).as_deref()
                    && d["ready"] == false
                    && d["not_ready_because"].to_string().contains("quarantined")
            })
        }),
        || format!("{listed:?}"),
    );
    let refused = run.command("attach-quarantined");
    let err = refused.parse::<CliError>();
    c.check(
        "attach of the quarantined VGA refused (exit 4) naming the events",
        refused.rc == Some(4)
            && err.as_ref().is_ok_and(|e| {
                e.error.contains("quarantined")
                    && e.error.contains("vm-1: xid 79")
                    && e.error.contains("vm-3")
            }),
        || format!("exit {:?}: {err:?}", refused.rc),
    );
    let before: Result<serde_json::Value, _> = run.command("plan-gpus-before").parse();
    c.check(
        "plan --gpus 1 before the quarantine picks the VGA device",
        before
            .as_ref()
            .is_ok_and(|p| p["requested"] == serde_json::json!([show(vga)])),
        || format!("{before:?}"),
    );
    rc_is(c, run, "attach-gpus", 0);
    let spec = run.command("attach-gpus").parse::<BootSpec>();
    c.check(
        format!(
            "attach --gpus 1 after the quarantine picks the other display {}",
            show(disp2)
        ),
        spec.as_ref()
            .is_ok_and(|s| s.devices.iter().map(|d| d.address).eq([disp2])),
        || format!("{spec:?}"),
    );
    rc_is(c, run, "detach-gpus", 0);
    let clear = run.command("health-clear").parse::<ClearReport>();
    c.check(
        "health clear lifts the quarantine",
        clear.as_ref().is_ok_and(|r| r.was_quarantined),
        || format!("{clear:?}"),
    );
}
