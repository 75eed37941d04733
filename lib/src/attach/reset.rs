//! Between tenants: reset a device, verify it, and keep it out of D3cold while attached.
//!
//! The reset follows libvirt: while a device is on vfio-pci, VFIO resets it when the VMM opens
//! and releases it, so nothing more is done. Otherwise the kernel resets it (`reset`, with the
//! methods `reset_method` lists: FLR, PM, bus, …), except that a bus reset is left out when
//! another device on the bus is in use (it would be reset too): on a host driver, on vfio-pci
//! for another owner, or held open by a process. Leaving it out narrows `reset_method` for the
//! reset; the original is journaled first and reconcile puts it back after a crash. At detach
//! the device is unbound from vfio-pci first, so its original driver gets a freshly reset
//! device; a rerun detach finds it back on that driver and does not reset it again. An
//! on-demand reset is refused for the boot display and for a GPU a host process uses
//! (`health_record.rs`).
//!
//! Verification after detach is `host_check.rs`'s: config space readable and carrying the
//! device's vendor/device ID, not in D3cold, on its original driver, and an NVIDIA GPU given back
//! to `nvidia` listed in `/proc/driver/nvidia/gpus/`. A failed
//! reset or check becomes health events of the owner ([`crate::health`]), returned to the
//! caller, which records them (`health_record.rs`).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::guard::describe;
use super::host_check::Verification;
use super::journal::{DeviceRecord, JournalState, LockedJournal, ResetRestriction, SriovCycle};
use super::{AttachError, Host};
use crate::failpoint::Failpoint;
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
    /// Already back on its host driver (a detach rerun after a failure past the reset): a
    /// reset now would pull the device from under that driver, so none is done.
    AlreadyReturned,
}

/// The reset "method" of a PF's SR-IOV cycle ([`Host::sriov_cycle`]).
pub const SRIOV_CYCLE: &str = "sriov-cycle";
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
                ResetOutcome::AlreadyReturned => {
                    format!("not reset: {}", r.detail.as_deref().unwrap_or(""))
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

    /// Devices on the same bus as `device` that a bus reset would take from someone, each
    /// with why: bound to a host driver, on vfio-pci for an owner other than `owner` (whose
    /// devices are given back with this one), or on vfio-pci and held open by a process (a VM
    /// outside this tool). An unreadable proc tree counts as in use (fail closed).
    fn busy_bus_siblings(
        &self,
        state: &JournalState,
        device: PciAddress,
        owner: Option<&Owner>,
    ) -> Vec<(PciAddress, String)> {
        self.sysfs
            .addresses()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| *a != device && a.domain == device.domain && a.bus == device.bus)
            .filter_map(|a| {
                let driver = self.sysfs.driver(a)?;
                if !crate::pci::variant::is_vfio_driver(self.sysfs.root(), &driver) {
                    return Some((a, format!("on {driver}")));
                }
                if let Some(other) = state.owner_of(a).filter(|o| Some(*o) != owner) {
                    return Some((a, format!("on {driver} for owner {other}")));
                }
                let group = self.sysfs.device(a).ok().and_then(|d| d.iommu_group);
                match self.held_by(&self.vfio_nodes(a, group)) {
                    Ok(h) if h.is_empty() => None,
                    Ok(h) => Some((a, format!("on {driver}, {}", describe(&h)))),
                    Err(e) => Some((a, format!("on {driver}, and {e}"))),
                }
            })
            .collect()
    }

    /// Have the kernel reset `device` with the first method it offers, leaving out a bus reset
    /// while another device on the bus is in use ([`Host::busy_bus_siblings`]; `owner`'s own
    /// devices do not count). Leaving it out narrows `reset_method` for the reset: the
    /// original value is journaled before the narrowing is written and put back after the
    /// reset, or by reconcile after a crash ([`Host::undo_reset_restrictions`]).
    pub(super) fn kernel_reset(
        &self,
        j: &mut LockedJournal,
        device: PciAddress,
        owner: Option<&Owner>,
    ) -> Result<ResetReport, AttachError> {
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
            return Ok(report);
        }
        let busy = if methods.iter().any(|m| m == "bus") {
            self.busy_bus_siblings(&j.state, device, owner)
        } else {
            Vec::new()
        };
        let allowed: Vec<String> = methods
            .iter()
            .filter(|m| *m != "bus" || busy.is_empty())
            .cloned()
            .collect();
        if allowed.is_empty() {
            report.outcome = ResetOutcome::Refused;
            report.detail = Some(format!(
                "only a bus reset is possible, and it would also reset {} in use",
                busy.iter()
                    .map(|(a, why)| format!("{a} ({why})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            report.ms = ms(start);
            return Ok(report);
        }
        let restrict = allowed.len() < methods.len();
        let method_path = dir.join("reset_method");
        if restrict {
            j.state.reset_restrictions.retain(|r| r.device != device);
            j.state.reset_restrictions.push(ResetRestriction {
                device,
                original: methods.join(" "),
            });
            j.save()?;
        }
        let mut put_back = !restrict;
        let result = (|| {
            if restrict {
                self.write(&method_path, &allowed.join(" "))?;
                Failpoint::ResetRestricted.hit();
            }
            let reset = self.write(&dir.join("reset"), "1");
            if restrict {
                self.write(&method_path, &methods.join(" "))?;
                put_back = true;
            }
            reset
        })();
        if restrict && put_back {
            j.state.reset_restrictions.retain(|r| r.device != device);
            j.save()?;
        }
        report.method = allowed.first().cloned();
        match result {
            Ok(()) => report.outcome = ResetOutcome::Done,
            Err(e) => {
                report.outcome = ResetOutcome::Failed;
                // The write alone: a failed reset leaves nothing to roll back; a narrowing
                // not put back stays journaled for reconcile.
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
        Ok(report)
    }

    /// Put back every `reset_method` a crash left narrowed (see [`Host::kernel_reset`]);
    /// returns one sentence per device it could not put back (kept journaled for the next
    /// run). Reconcile calls it first.
    pub(super) fn undo_reset_restrictions(
        &self,
        j: &mut LockedJournal,
    ) -> Result<Vec<String>, AttachError> {
        if j.state.reset_restrictions.is_empty() {
            return Ok(Vec::new());
        }
        let mut errors = Vec::new();
        for r in std::mem::take(&mut j.state.reset_restrictions) {
            let path = self.sysfs.device_dir(r.device).join("reset_method");
            let Ok(now) = std::fs::read_to_string(&path) else {
                continue; // the device is gone: nothing to put back
            };
            if now.trim() == r.original {
                continue;
            }
            if let Err(e) = self.write(&path, &r.original) {
                errors.push(format!(
                    "putting back reset_method `{}` of {}: {}",
                    r.original,
                    r.device,
                    crate::error_chain(&e)
                ));
                j.state.reset_restrictions.push(r);
            } else {
                tracing::info!("{}: reset_method put back to `{}`", r.device, r.original);
            }
        }
        j.save()?;
        Ok(errors)
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

    /// Who holds a VF of `pf`, one phrase each: a VF attached here, a VF with a vGPU type
    /// (created by anyone), mdevs on a VF, a VF on vfio-pci (a VMM may use it). An SR-IOV cycle
    /// removes every VF, so any of these refuses it.
    pub(super) fn vf_holders(&self, state: &JournalState, pf: PciAddress) -> Vec<String> {
        let mut out = Vec::new();
        for vf in crate::vgpu::virtual_functions(&self.sysfs, pf) {
            let dir = self.sysfs.device_dir(vf);
            if let Some(owner) = state.owner_of(vf) {
                out.push(format!("{vf} is attached to owner {owner}"));
            }
            let vgpu_type = std::fs::read_to_string(dir.join("nvidia/current_vgpu_type"))
                .map(|t| t.trim().to_owned())
                .unwrap_or_default();
            if !vgpu_type.is_empty() && vgpu_type != "0" {
                out.push(format!("{vf} has vGPU type {vgpu_type}"));
            }
            let mdevs: usize = std::fs::read_dir(dir.join("mdev_supported_types"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| std::fs::read_dir(t.path().join("devices")).map_or(0, |d| d.count()))
                .sum();
            if mdevs > 0 {
                out.push(format!("{vf} has {mdevs} mdev(s)"));
            }
            if self.sysfs.on_vfio(vf) {
                out.push(format!(
                    "{vf} is on {}",
                    self.sysfs.driver(vf).unwrap_or_default()
                ));
            }
        }
        out
    }

    /// The SR-IOV cycle that recovers a wedged vGPU (a VF left half-initialised by a killed
    /// VM): `sriov_numvfs` to 0 and back to `numvfs`, journaled first so that reconcile puts
    /// the VFs back after a crash ([`Host::undo_sriov_cycles`]). The caller has checked that
    /// every VF is free ([`Host::vf_holders`]).
    pub(super) fn sriov_cycle(
        &self,
        j: &mut LockedJournal,
        pf: PciAddress,
        numvfs: u32,
    ) -> Result<ResetReport, AttachError> {
        let start = Instant::now();
        let path = self.sysfs.device_dir(pf).join("sriov_numvfs");
        j.state.sriov_cycles.retain(|c| c.pf != pf);
        j.state.sriov_cycles.push(SriovCycle { pf, numvfs });
        j.save()?;
        let result = self
            .write(&path, "0")
            .and_then(|()| self.write(&path, &numvfs.to_string()));
        let mut report = ResetReport {
            device: pf,
            methods: vec![SRIOV_CYCLE.to_owned()],
            method: Some(SRIOV_CYCLE.to_owned()),
            outcome: ResetOutcome::Done,
            detail: None,
            ms: 0,
        };
        match result {
            Ok(()) => {
                j.state.sriov_cycles.retain(|c| c.pf != pf);
                j.save()?;
            }
            Err(e) => {
                // Kept journaled: reconcile writes the VF count back.
                report.outcome = ResetOutcome::Failed;
                report.detail = Some(format!(
                    "{}; `gpu-passthrough reconcile` puts back sriov_numvfs {numvfs}",
                    crate::error_chain(&e)
                ));
            }
        }
        report.ms = ms(start);
        Ok(report)
    }

    /// Put back every `sriov_numvfs` a crash (or a failed write) left at 0 in an SR-IOV cycle
    /// ([`Host::sriov_cycle`]); one sentence per PF it could not put back (kept journaled).
    /// Reconcile calls it first.
    pub(super) fn undo_sriov_cycles(
        &self,
        j: &mut LockedJournal,
    ) -> Result<Vec<String>, AttachError> {
        if j.state.sriov_cycles.is_empty() {
            return Ok(Vec::new());
        }
        let mut errors = Vec::new();
        for c in std::mem::take(&mut j.state.sriov_cycles) {
            let path = self.sysfs.device_dir(c.pf).join("sriov_numvfs");
            let Ok(now) = std::fs::read_to_string(&path) else {
                continue; // the PF is gone: nothing to put back
            };
            if now.trim() != "0" {
                continue; // the VFs are back (or someone set another count: theirs)
            }
            if let Err(e) = self.write(&path, &c.numvfs.to_string()) {
                errors.push(format!(
                    "putting back sriov_numvfs {} of {}: {}",
                    c.numvfs,
                    c.pf,
                    crate::error_chain(&e)
                ));
                j.state.sriov_cycles.push(c);
            } else {
                tracing::info!("{}: sriov_numvfs put back to {}", c.pf, c.numvfs);
            }
        }
        j.save()?;
        Ok(errors)
    }
}
