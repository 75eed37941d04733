//! Run C, host hardening: a process holding a device's VFIO node keeps
//! the device. The guest holds the NIC's `/dev/vfio/N` with `sleep` after binding it to vfio-pci
//! by hand (`E2E-C holder nic PID`), and later the node of the edu device attached for `vm-h`
//! (`E2E-C holder edu PID`); see `hardening_holders` in `e2e/host-guest-init.sh`.

use super::{RunC, rc_is, show};
use crate::checks::Checks;
use crate::cli_json::{CliError, DetachReport, Listing, ReconcileReport};
use crate::console::Console;

/// The pid the guest printed for `role`'s holder.
fn holder(console: &Console, role: &str) -> Option<u32> {
    console
        .after(&format!("E2E-C holder {role} "))?
        .trim()
        .parse()
        .ok()
}

/// `pid N (sleep)`, as the refusals name a holder.
fn named(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid ? (sleep)".into(), |p| format!("pid {p} (sleep)"))
}

pub fn checks(c: &mut Checks, run: &RunC, console: &Console) {
    // The listing says how many PCI devices it looked at (all of them, as --all shows).
    let (some, every) = (
        run.command("devices").parse::<Listing>(),
        run.command("devices-all").parse::<Listing>(),
    );
    c.check(
        "devices --json: scanned counts every PCI device, no note while candidates exist",
        match (&some, &every) {
            (Ok(s), Ok(e)) => {
                s.scanned == e.devices.len() && !s.devices.is_empty() && s.note.is_none()
            }
            _ => false,
        },
        || format!("devices: {some:?}; devices --all: {every:?}"),
    );
    let (nic, edu) = (run.device("nic"), run.device("edu"));
    let (nic_holder, edu_holder) = (holder(console, "nic"), holder(console, "edu"));
    c.check(
        "held: the guest started a holder of each VFIO node",
        nic_holder.is_some() && edu_holder.is_some(),
        || "no `E2E-C holder nic|edu PID` line".into(),
    );

    let f = run.command("held-attach");
    let err = f.parse::<CliError>();
    c.check(
        format!(
            "held: attach of {} (on vfio-pci, no owner, node held) refused (exit 4) naming {}",
            show(nic),
            named(nic_holder)
        ),
        f.rc == Some(4)
            && err.as_ref().is_ok_and(|e| {
                e.exit_code == 4
                    && e.error.contains(&named(nic_holder))
                    && e.error.contains(&show(nic))
            }),
        || format!("exit {:?}: {err:?}", f.rc),
    );

    rc_is(c, run, "held-edu-attach", 0);
    let f = run.command("held-detach");
    let err = f.parse::<CliError>();
    c.check(
        format!(
            "held: detach of vm-h refused (exit 4) while {} holds the edu node",
            named(edu_holder)
        ),
        f.rc == Some(4)
            && err
                .as_ref()
                .is_ok_and(|e| e.error.contains(&named(edu_holder)) && e.error.contains("in use")),
        || format!("exit {:?}: {err:?}", f.rc),
    );
    rc_is(c, run, "held-reconcile", 0);
    let r = run.command("held-reconcile").parse::<ReconcileReport>();
    c.check(
        "held: reconcile --gone vm-h keeps the edu device in use, naming its holder, releases nothing",
        r.as_ref().is_ok_and(|r| {
            r.released.is_empty()
                && r.kept_in_use.iter().any(|k| {
                    k.owner.as_str() == "vm-h"
                        && Some(k.device) == edu
                        && k.holders
                            .iter()
                            .any(|h| Some(h.pid) == edu_holder && h.command == "sleep")
                })
        }),
        || format!("{r:?}"),
    );
    rc_is(c, run, "held-detach-after", 0);
    let d = run.command("held-detach-after").parse::<DetachReport>();
    c.check(
        "held: once the holder exited, detach gives the edu device back (no driver)",
        d.as_ref().is_ok_and(|d| {
            d.restored
                .iter()
                .any(|r| Some(r.device) == edu && r.driver.is_none())
        }),
        || format!("{d:?}"),
    );
}
