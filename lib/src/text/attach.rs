//! The text of the host's reports: doctor, devices, plan, boot spec, detach, reconcile.

use std::fmt::{self, Display, Formatter};

use crate::attach::{
    CheckStatus, DetachReport, DeviceListing, DeviceReport, DoctorReport, Plan, ReconcileReport,
};
use crate::pci::PciAddress;
use crate::vmm::{BootSpec, Vmm};

use super::or_dash;

fn join(list: &[PciAddress]) -> String {
    list.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Display for CheckStatus {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckStatus::Ok => "OK",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        })
    }
}

impl Display for DoctorReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{:<5} {:<22} {}", c.status.to_string(), c.name, c.detail)?;
            if !c.fix.is_empty() {
                writeln!(f, "      {:<22} fix: {}", "", c.fix)?;
            }
        }
        writeln!(f, "verdict: {}", self.verdict)
    }
}

impl Display for DeviceListing {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for d in &self.devices {
            write!(f, "{d}")?;
        }
        if let Some(note) = &self.note {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

impl Display for DeviceReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let dev = &self.device;
        let name = dev
            .device_name
            .clone()
            .unwrap_or_else(|| format!("{:04x}:{:04x}", dev.vendor_id, dev.device_id));
        let verdict = match (&self.owner, self.ready) {
            (Some(o), _) => format!("attached to {o}"),
            (None, true) => "ready".to_owned(),
            (None, false) => format!("not ready: {}", self.not_ready_because.join("; ")),
        };
        let reset = if dev.reset_methods.is_empty() {
            "-".to_owned()
        } else {
            dev.reset_methods.join(",")
        };
        writeln!(
            f,
            "{}  [{:04x}:{:04x}] class {:06x}  {name}",
            dev.address, dev.vendor_id, dev.device_id, dev.class
        )?;
        writeln!(
            f,
            "    driver {}  group {}  numa {}  boot_vga {}  reset {reset}  {verdict}",
            dev.driver.as_deref().unwrap_or("-"),
            or_dash(dev.iommu_group),
            or_dash(dev.numa_node),
            u8::from(dev.boot_vga),
        )?;
        if let Some(board) = &self.baseboard {
            writeln!(f, "    NVLink baseboard {board}")?;
        }
        if !self.companions.is_empty() {
            writeln!(f, "    companions: {}", join(&self.companions))?;
        }
        if !self.iommu_group_members.is_empty() {
            writeln!(f, "    group members: {}", join(&self.iommu_group_members))?;
        }
        if let Some(total) = dev.sriov_total_vfs {
            writeln!(
                f,
                "    SR-IOV: {} of {total} virtual functions enabled",
                dev.sriov_num_vfs.unwrap_or(0)
            )?;
        }
        for m in &dev.mdev_types {
            writeln!(
                f,
                "    mdev type {} ({}): {} available",
                m.id,
                m.name.as_deref().unwrap_or("-"),
                m.available_instances
            )?;
        }
        Ok(())
    }
}

impl Display for Plan {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for d in &self.devices {
            writeln!(
                f,
                "move {}  {:?} of {}  group {}  {} -> vfio-pci{}",
                d.address,
                d.role,
                d.of,
                or_dash(d.iommu_group),
                d.driver.as_deref().unwrap_or("no driver"),
                if d.adopt {
                    " (already there: adopt)"
                } else {
                    ""
                }
            )?;
        }
        for (parent, t) in &self.mdevs {
            writeln!(f, "create mdev of type {t} on {parent}")?;
        }
        if let Some(p) = &self.partition {
            let gpus: Vec<String> = p.gpus.iter().map(|g| g.to_string()).collect();
            writeln!(
                f,
                "activate fabric partition {} ({}) before the first bind",
                p.id,
                gpus.join(" ")
            )?;
        }
        for w in &self.writes {
            writeln!(f, "write {:?} > {}", w.value, w.path.display())?;
        }
        if let Some(m) = &self.mmio {
            writeln!(
                f,
                "64-bit MMIO window {} GiB ({} bytes) for {} GiB of BARs: {} guest physical address bits (host: {})",
                m.window_gib(),
                m.window_bytes,
                m.bar_bytes >> 30,
                m.guest_phys_bits,
                or_dash(self.host_phys_bits)
            )?;
        }
        for r in &self.refusals {
            writeln!(f, "REFUSED: {}", r.message)?;
        }
        Ok(())
    }
}

/// A boot spec as text, with the arguments of one VMM; its JSON is the whole spec (both VMMs'
/// arguments), so a front end prints either form from the one value.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(transparent)]
pub struct BootSpecText<'a> {
    /// The spec.
    pub spec: &'a BootSpec,
    /// Whose arguments to show.
    #[serde(skip)]
    pub vmm: Vmm,
}

impl BootSpec {
    /// This spec as text with `vmm`'s arguments.
    pub fn text(&self, vmm: Vmm) -> BootSpecText<'_> {
        BootSpecText { spec: self, vmm }
    }
}

impl Display for BootSpecText<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let s = self.spec;
        for d in &s.devices {
            writeln!(
                f,
                "{}  group {}  {}",
                d.sysfs_path.display(),
                or_dash(d.iommu_group),
                d.vfio_device.display()
            )?;
        }
        if !s.held_devices.is_empty() {
            writeln!(
                f,
                "held for group viability (not given to the VM): {}",
                join(&s.held_devices)
            )?;
        }
        if s.kernel_cmdline.is_empty() {
            writeln!(
                f,
                "kernel command line: (nothing to add: no GPU among the devices)"
            )?;
        } else {
            writeln!(f, "kernel command line: {}", s.kernel_cmdline.join(" "))?;
        }
        if let Some(i) = &s.initrd {
            writeln!(f, "initrd: {}", i.display())?;
        }
        writeln!(f, "vmm args: {}", s.args(self.vmm).join(" "))?;
        for w in &s.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if self.vmm == Vmm::CloudHypervisor {
            for w in &s.cloud_hypervisor.warnings {
                writeln!(f, "warning: {w}")?;
            }
        }
        if let Some(h) = &s.mmio.hint {
            writeln!(f, "note: {h}")?;
        }
        Ok(())
    }
}

impl Display for DetachReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for d in &self.restored {
            writeln!(
                f,
                "{} -> {}",
                d.device,
                d.driver.as_deref().unwrap_or("no driver")
            )?;
            if let Some(c) = &d.health {
                write!(f, "{c}")?;
            }
        }
        for v in &self.released_vgpus {
            writeln!(f, "released vGPU {v}")?;
        }
        for p in &self.deactivated_partitions {
            writeln!(f, "deactivated fabric partition {p}")?;
        }
        Ok(())
    }
}

impl Display for ReconcileReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for e in &self.ended_by_reboot {
            let now: Vec<String> = e
                .devices
                .iter()
                .map(|d| {
                    format!(
                        "{} on {}",
                        d.device,
                        d.driver.as_deref().unwrap_or("no driver")
                    )
                })
                .collect();
            writeln!(
                f,
                "ended {} of {}: recorded in boot {}, before the last reboot (now: {})",
                if e.transaction {
                    "an interrupted attach"
                } else {
                    "the attachment"
                },
                e.owner,
                e.boot_id,
                if now.is_empty() {
                    "no devices".to_owned()
                } else {
                    now.join(", ")
                }
            )?;
        }
        for o in &self.finished {
            writeln!(f, "finished an interrupted attach for {o}")?;
        }
        for d in &self.rolled_back {
            writeln!(
                f,
                "rolled back {} -> {}",
                d.device,
                d.driver.as_deref().unwrap_or("no driver")
            )?;
        }
        for d in &self.released {
            writeln!(f, "released {} ({} devices)", d.owner, d.restored.len())?;
        }
        for o in &self.kept_alive {
            writeln!(f, "kept {o}: still exists")?;
        }
        for h in &self.kept_in_use {
            let who: Vec<String> = h.holders.iter().map(ToString::to_string).collect();
            writeln!(
                f,
                "kept {}: {} is in use ({})",
                h.owner,
                h.device,
                who.join(", ")
            )?;
        }
        for o in &self.kept_unknown {
            writeln!(
                f,
                "kept {o}: cannot tell whether it is gone (declare it gone to release it)"
            )?;
        }
        for e in &self.errors {
            writeln!(f, "ERROR: {e}")?;
        }
        Ok(())
    }
}
