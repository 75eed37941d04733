//! Between tenants: reset a device, verify it, and keep it out of D3cold while attached.
//!
//! The reset follows libvirt: while a device is on vfio-pci, VFIO resets it when the VMM opens
//! and releases it, so nothing more is done. Otherwise the kernel resets it (`reset`, with the
//! methods `reset_method` lists: FLR, PM, bus, …), except that a bus reset is refused when
//! another device on the bus is in use by the host (it would be reset too). At detach the
//! device is unbound from vfio-pci first, so its original driver gets a freshly reset device.
//!
//! Verification after detach: config space readable and carrying the device's vendor/device ID
//! (not `0xffff`: fallen off the bus, stuck in D3cold), not in D3cold, on its original driver,
//! and an NVIDIA GPU given back to `nvidia` listed in `/proc/driver/nvidia/gpus/`. A failed
//! reset or check becomes health events of the owner ([`crate::health`]), returned to the
//! caller, which records them (`health_record.rs`).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::journal::{DeviceRecord, LockedJournal};
use super::{AttachError, Host};
use crate::health::{Action, EventSource, Fault, FaultKind, HealthEvent};
use crate::outcome::{Outcome, ReportOutcome};
use crate::owner::Owner;
use crate::pci::PciAddress;

/// What became of a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetOutcome {
    /// The kernel reset the device with [`ResetReport::method`].
    Done,
    /// On vfio-pci: VFIO resets it on open and release; nothing written.
    ByVfio,
    /// The device offers no reset method (no `reset_method`): verified without one.
    NoMethod,
    /// Only a bus reset was possible and another device on the bus is in use by the host.
    Refused,
    /// The kernel's reset failed (a health event).
    Failed,
}

/// A reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReport {
    /// The device.
    pub device: PciAddress,
    /// Methods the kernel offers, in its order.
    pub methods: Vec<String>,
    /// The method used (`vfio` when VFIO does it).
    pub method: Option<String>,
    /// What happened.
    pub outcome: ResetOutcome,
    /// Why it was refused or failed.
    pub detail: Option<String>,
    /// How long it took.
    pub ms: u64,
}

/// A check of a device after it went back to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The device.
    pub device: PciAddress,
    /// Every check passed.
    pub ok: bool,
    /// Vendor ID read from config space.
    pub vendor_id: Option<u16>,
    /// Device ID read from config space.
    pub device_id: Option<u16>,
    /// The driver it is on.
    pub driver: Option<String>,
    /// What failed, one sentence each.
    pub problems: Vec<String>,
    /// How long it took.
    pub ms: u64,
}

/// Reset and verification of one device at detach (or on demand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The reset (`None`: the device was only held for group viability, never given to a VM).
    pub reset: Option<ResetReport>,
    /// The verification.
    pub verify: Verification,
    /// Health events recorded for it.
    pub events: Vec<HealthEvent>,
}

/// A reset on demand: the device must verify afterwards.
impl ReportOutcome for HealthCheck {
    fn outcome(&self) -> Option<Outcome> {
        (!self.verify.ok).then_some(Outcome::VerificationFailed)
    }
}

/// Two lines for people: the reset (if any), then the verification, each with its time (each
/// line ends with a newline, like every report's text).
impl std::fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = &self.verify;
        if let Some(r) = &self.reset {
            let what = match r.outcome {
                ResetOutcome::Done => format!("reset with {}", r.method.as_deref().unwrap_or("?")),
                ResetOutcome::ByVfio => "reset by VFIO on open/release".into(),
                ResetOutcome::NoMethod => "no reset method".into(),
                ResetOutcome::Refused => {
                    format!("reset refused: {}", r.detail.as_deref().unwrap_or(""))
                }
                ResetOutcome::Failed => {
                    format!("reset failed: {}", r.detail.as_deref().unwrap_or(""))
                }
            };
            writeln!(f, "{}  {what} ({} ms)", v.device, r.ms)?;
        }
        if v.ok {
            writeln!(f, "{}  verified ({} ms)", v.device, v.ms)
        } else {
            writeln!(
                f,
                "{}  VERIFY FAILED ({} ms): {}",
                v.device,
                v.ms,
                v.problems.join("; ")
            )
        }
    }
}

fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Host {
    fn d3cold_path(&self, device: PciAddress) -> std::path::PathBuf {
        self.sysfs.device_dir(device).join("d3cold_allowed")
    }

    /// Record the device's `d3cold_allowed` in the transaction, then set it to 0: waking from
    /// D3cold is a known cause of `RmInitAdapter failed`. Saved before the write, like every step.
    pub(super) fn hold_d3cold(
        &self,
        j: &mut LockedJournal,
        t: usize,
        i: usize,
    ) -> Result<(), AttachError> {
        let device = j.state.transactions[t].devices[i].device;
        let Ok(orig) = std::fs::read_to_string(self.d3cold_path(device)) else {
            return Ok(()); // no power management attribute: nothing to hold
        };
        let orig = orig.trim().to_owned();
        j.state.transactions[t].devices[i].original_d3cold = Some(orig.clone());
        j.save()?;
        if orig != "0"
            && let Err(e) = self.write(&self.d3cold_path(device), "0")
        {
            tracing::warn!("{device}: cannot keep it out of D3cold: {e}");
        }
        Ok(())
    }

    /// Put `d3cold_allowed` back as it was before attach.
    pub(super) fn restore_d3cold(&self, rec: &DeviceRecord) {
        let Some(orig) = &rec.original_d3cold else {
            return;
        };
        let path = self.d3cold_path(rec.device);
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now.trim() != orig
            && let Err(e) = self.write(&path, orig)
        {
            tracing::warn!("{}: cannot restore d3cold_allowed={orig}: {e}", rec.device);
        }
    }

    /// Devices on the same bus as `device`, bound to a host driver (not vfio-pci).
    fn busy_bus_siblings(&self, device: PciAddress) -> Vec<(PciAddress, String)> {
        self.sysfs
            .addresses()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| *a != device && a.domain == device.domain && a.bus == device.bus)
            .filter_map(|a| {
                let d = self.sysfs.driver(a)?;
                (d != "vfio-pci").then_some((a, d))
            })
            .collect()
    }

    /// Have the kernel reset `device` with the first method it offers, leaving out a bus reset
    /// while another device on the bus is in use by the host.
    pub(super) fn kernel_reset(&self, device: PciAddress) -> ResetReport {
        let start = Instant::now();
        let dir = self.sysfs.device_dir(device);
        let methods: Vec<String> = std::fs::read_to_string(dir.join("reset_method"))
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut report = ResetReport {
            device,
            methods: methods.clone(),
            method: None,
            outcome: ResetOutcome::NoMethod,
            detail: None,
            ms: 0,
        };
        if methods.is_empty() {
            report.ms = ms(start);
            return report;
        }
        let busy = self.busy_bus_siblings(device);
        let allowed: Vec<String> = methods
            .iter()
            .filter(|m| *m != "bus" || busy.is_empty())
            .cloned()
            .collect();
        if allowed.is_empty() {
            report.outcome = ResetOutcome::Refused;
            report.detail = Some(format!(
                "only a bus reset is possible, and it would also reset {} in use by the host",
                busy.iter()
                    .map(|(a, d)| format!("{a} (on {d})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            report.ms = ms(start);
            return report;
        }
        let restrict = allowed.len() < methods.len();
        let result = (|| {
            if restrict {
                self.write(&dir.join("reset_method"), &allowed.join(" "))?;
            }
            let reset = self.write(&dir.join("reset"), "1");
            if restrict {
                self.write(&dir.join("reset_method"), &methods.join(" "))?;
            }
            reset
        })();
        report.method = allowed.first().cloned();
        match result {
            Ok(()) => report.outcome = ResetOutcome::Done,
            Err(e) => {
                report.outcome = ResetOutcome::Failed;
                // The write alone: a failed reset leaves nothing to roll back or reconcile.
                report.detail = Some(match &e {
                    AttachError::Write {
                        path,
                        value,
                        source,
                        ..
                    } => format!("writing `{value}` to {} failed: {source}", path.display()),
                    other => crate::error_chain(other),
                });
            }
        }
        report.ms = ms(start);
        report
    }

    /// Check `device` now that it is back with the host, expecting it on `expected_driver`.
    pub fn verify_device(&self, device: PciAddress, expected_driver: Option<&str>) -> Verification {
        let start = Instant::now();
        let dir = self.sysfs.device_dir(device);
        let mut problems = Vec::new();
        let ids = self
            .sysfs
            .device(device)
            .ok()
            .map(|d| (d.vendor_id, d.device_id));
        let (mut vendor_id, mut device_id) = (None, None);
        match std::fs::read(dir.join("config")) {
            Ok(cfg) if cfg.len() >= 4 => {
                let v = u16::from_le_bytes([cfg[0], cfg[1]]);
                let d = u16::from_le_bytes([cfg[2], cfg[3]]);
                (vendor_id, device_id) = (Some(v), Some(d));
                if v == 0xffff {
                    problems.push(
                        "config space reads 0xffff: the device does not answer (fallen off the bus or stuck in D3cold)".to_owned(),
                    );
                } else if let Some((ev, ed)) = ids
                    && (v, d) != (ev, ed)
                {
                    problems.push(format!(
                        "config space has ID {v:04x}:{d:04x}, the kernel enumerated {ev:04x}:{ed:04x}"
                    ));
                }
            }
            Ok(_) => problems.push("config space is shorter than 4 bytes".to_owned()),
            Err(e) => problems.push(format!("config space unreadable: {e}")),
        }
        if let Ok(state) = std::fs::read_to_string(dir.join("power_state"))
            && state.trim() == "D3cold"
        {
            problems.push("the device is in D3cold".to_owned());
        }
        let driver = self.sysfs.driver(device);
        if driver.as_deref() != expected_driver {
            problems.push(format!(
                "it is on {}, not its original driver {}",
                driver.as_deref().unwrap_or("no driver"),
                expected_driver.unwrap_or("(none)")
            ));
        }
        let nvidia_gpu = ids.is_some_and(|(v, _)| v == crate::pci::ids::NVIDIA_VENDOR_ID)
            && self
                .sysfs
                .device(device)
                .is_ok_and(|d| d.kind == crate::pci::DeviceKind::Display);
        if nvidia_gpu && expected_driver == Some("nvidia") {
            let entry = self.nvidia_gpus.join(device.to_string());
            if !entry.exists() {
                problems.push(format!(
                    "the nvidia driver did not take it ({} is missing)",
                    entry.display()
                ));
            }
        }
        Verification {
            device,
            ok: problems.is_empty(),
            vendor_id,
            device_id,
            driver,
            problems,
            ms: ms(start),
        }
    }

    /// Health events for a failed reset or check (not recorded yet).
    pub(super) fn events_for(
        owner: Option<&Owner>,
        source: EventSource,
        reset: Option<&ResetReport>,
        verify: &Verification,
    ) -> Vec<HealthEvent> {
        let mut out = Vec::new();
        let event = |kind, message: String| {
            HealthEvent::now(
                verify.device,
                owner.cloned(),
                source,
                Fault {
                    address: Some(verify.device.to_string()),
                    kind,
                    xid: None,
                    message,
                    action: Action::ResetGpu,
                },
            )
        };
        if let Some(r) = reset.filter(|r| r.outcome == ResetOutcome::Failed) {
            out.push(event(
                FaultKind::ResetFailed,
                format!(
                    "{} reset failed: {}",
                    r.method.as_deref().unwrap_or("?"),
                    r.detail.as_deref().unwrap_or("")
                ),
            ));
        }
        if !verify.ok {
            out.push(event(FaultKind::VerifyFailed, verify.problems.join("; ")));
        }
        out
    }
}
