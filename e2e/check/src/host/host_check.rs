//! Run C, the host checks for itself (issue 23): consoles of two owners of the edu device forge
//! `GPU-XID` lines with no kernel fault behind them, mapped exactly through the guest address the
//! boot spec gave edu (a line at another address is dropped, one stamped before the attachment
//! not counted); the device becomes suspect, never quarantined, and attach refuses it; `health check` reads edu's identity register (BAR0
//! offset 0) through the real kernel's `resource0` and returns it to service with the evidence
//! recorded. See `host_check` in `e2e/host-guest-init.sh`.

use super::{RunC, rc_is, show};
use crate::checks::Checks;
use crate::cli_json::CliError;
use gpu_passthrough::attach::DeviceCheck;
use gpu_passthrough::health::{DeviceHealth, FaultKind, IngestReport, ScanReport};

/// QEMU edu's identification register (BAR0 offset 0): major 1, minor 0, `0xed`.
const EDU_ID: u32 = 0x0100_00ed;

pub fn checks(c: &mut Checks, run: &RunC) {
    let edu = run.device("edu");
    for label in [
        "edu-attach-1",
        "edu-detach-1",
        "edu-attach-2",
        "edu-detach-2",
    ] {
        rc_is(c, run, label, 0);
    }
    let spec: Result<serde_json::Value, _> = run.command("edu-attach-1").parse();
    c.check(
        "attach edu: the boot spec fixes its guest address 0000:00:10.0 (QEMU addr=0x10, Cloud Hypervisor pci_device_id=16)",
        spec.as_ref().is_ok_and(|s| {
            let qemu = format!("vfio-pci,host={},bus=pcie.0,addr=0x10", show(edu));
            s["guest_addresses"]
                == serde_json::json!([{"guest": "0000:00:10.0", "host": show(edu)}])
                && s["qemu"]["args"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|arg| arg.as_str() == Some(qemu.as_str())))
                && s["cloud_hypervisor"]["vm_config_devices"][0]["pci_device_id"] == 16
        }),
        || format!("{spec:?}"),
    );
    let scan = run.command("forged-scan").parse::<ScanReport>();
    c.check(
        "forged console: the GPU-XID line claiming a host-side kind is refused, the Xid 79s kept with the host's own action",
        scan.as_ref().is_ok_and(|s| {
            s.stats.guest_lines_refused == 1
                && s.faults.len() == 3
                && s.faults.iter().all(|f| {
                    f.fault.kind == FaultKind::Xid
                        && f.fault.xid == Some(79)
                        && f.fault.action.needs_host()
                })
        }),
        || format!("{scan:?}"),
    );
    let ingest = |label: &str| run.command(label).parse::<IngestReport>();
    let (i1, i2) = (ingest("forged-ingest-1"), ingest("forged-ingest-2"));
    c.check(
        "forged console of vm-e1: the fault at edu's guest address (00:10.0) recorded against edu, the one at 00:07.0 counted and dropped, the one stamped before the attachment not counted, nothing out of service",
        i1.as_ref().is_ok_and(|r| {
            r.recorded.len() == 1
                && Some(r.recorded[0].device) == edu
                && r.recorded[0].fault.message.starts_with("pid=7,")
                && r.unmapped == 1
                && r.scan.outside_lifetime == 1
                && r.quarantined.is_empty()
        }),
        || format!("{i1:?}"),
    );
    c.check(
        "forged console of a second owner (vm-e2): edu suspect, not quarantined (forged lines alone never quarantine)",
        i2.as_ref().is_ok_and(|r| {
            r.quarantined.len() == 1
                && Some(r.quarantined[0].device) == edu
                && r.quarantined[0].suspect
        }),
        || format!("{i2:?}"),
    );
    let record = |label: &str| {
        run.command(label)
            .parse::<Vec<DeviceHealth>>()
            .map(|l| l.into_iter().find(|d| Some(d.device) == edu))
    };
    let suspect = record("health-suspect");
    c.check(
        "health --json: edu SUSPECT by vm-e1 and vm-e2, no host check yet",
        suspect.as_ref().is_ok_and(|d| {
            d.as_ref().is_some_and(|d| {
                d.last_check.is_none()
                    && d.quarantine.as_ref().is_some_and(|q| {
                        q.suspect
                            && q.owners
                                .iter()
                                .map(|o| o.as_ref().map(|o| o.as_str()))
                                .eq([Some("vm-e1"), Some("vm-e2")])
                    })
            })
        }),
        || format!("{suspect:?}"),
    );
    let refused = run.command("attach-suspect");
    let err = refused.parse::<CliError>();
    c.check(
        "attach of the suspect edu refused (exit 4) naming it suspect and the host's check as the way back",
        refused.rc == Some(4)
            && err
                .as_ref()
                .is_ok_and(|e| e.error.contains("suspect") && e.error.contains("host's own check")),
        || format!("exit {:?}: {err:?}", refused.rc),
    );
    c.info(format!(
        "edu {} sysfs enable before the host check: {:?}",
        show(edu),
        run.facts.get("edu_enable_before")
    ));
    rc_is(c, run, "edu-check", 0);
    let check = run.command("edu-check").parse::<DeviceCheck>();
    if let Ok(k) = &check {
        c.info(format!(
            "health check edu: {}",
            k.verify.readings().join(" ")
        ));
        c.figure("run C health check edu (ms)", k.verify.ms);
    }
    c.check(
        format!("health check edu: the identity register reads {EDU_ID:#010x} through resource0"),
        check
            .as_ref()
            .is_ok_and(|k| k.verify.bar0 == Some(EDU_ID) && Some(k.verify.device) == edu),
        || format!("{check:?}"),
    );
    c.check(
        "health check edu: it was suspect, passed, and is back in service",
        check
            .as_ref()
            .is_ok_and(|k| k.was_suspect && k.verify.ok && k.quarantine.is_none()),
        || format!("{check:?}"),
    );
    let checked = record("health-checked");
    c.check(
        "health --json after the check: edu in service, its check recorded (passed, was suspect) and the guests' events kept",
        checked.as_ref().is_ok_and(|d| {
            d.as_ref().is_some_and(|d| {
                d.quarantine.is_none()
                    && !d.events.is_empty()
                    && d.last_check
                        .as_ref()
                        .is_some_and(|h| h.passed && h.was_suspect)
            })
        }),
        || format!("{checked:?}"),
    );
    rc_is(c, run, "edu-attach-checked", 0);
    rc_is(c, run, "edu-detach-checked", 0);
}
