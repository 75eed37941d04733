//! The host's own check of a device, trusting nothing a guest said: config space answers with
//! the device's vendor and device ID (not `0xffff`), the first register of BAR0 read through
//! sysfs `resource0` where it is an identity register (NVIDIA's `PMC_BOOT_0`, QEMU edu's ID) is not
//! all-ones, the link is as wide as at attach, and the AER counters did not move since the
//! baseline taken at attach. Used after every reset and at detach, and on demand
//! (`Host::check_device`).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Host;
use super::journal::HostBaseline;
use crate::pci::PciAddress;

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
    /// BAR0's first register read through sysfs `resource0` (an NVIDIA GPU's `PMC_BOOT_0`,
    /// its chip identity): all-ones is a device fallen off the bus. `None`: not read (no
    /// `resource0`, memory decoding off, or not mappable here).
    #[serde(default)]
    pub bar0: Option<u32>,
    /// Link width now and at most (`current_link_width`, `max_link_width`).
    #[serde(default)]
    pub link_width: Option<(u32, u32)>,
    /// AER counters now (`TOTAL_ERR_FATAL`, `TOTAL_ERR_NONFATAL`).
    #[serde(default)]
    pub aer: Option<(u64, u64)>,
}

impl Verification {
    /// What was read, one `name=value` each, for the health record.
    pub fn readings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (Some(v), Some(d)) = (self.vendor_id, self.device_id) {
            out.push(format!("id={v:04x}:{d:04x}"));
        }
        if let Some(b) = self.bar0 {
            out.push(format!("bar0={b:#010x}"));
        }
        if let Some((now, max)) = self.link_width {
            out.push(format!("link=x{now}/x{max}"));
        }
        if let Some((f, n)) = self.aer {
            out.push(format!("aer_fatal={f} aer_nonfatal={n}"));
        }
        out
    }
}

/// The `TOTAL_ERR_*` line of an AER counter file (`aer_dev_fatal`, `aer_dev_nonfatal`).
fn aer_total(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("TOTAL_ERR_")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
}

fn read_u32(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Devices whose BAR0 starts with an identity register, read by the host check: every NVIDIA
/// device (`PMC_BOOT_0`, the chip's identity) and QEMU's `edu` device (`0x010000ed`, the e2e
/// stand-in). (vendor, device: `None` for any).
const IDENTITY_AT_BAR0: &[(u16, Option<u16>)] = &[
    (crate::pci::ids::NVIDIA_VENDOR_ID, None),
    (0x1234, Some(0x11e8)),
];

/// The first 32-bit register of BAR0, through sysfs `resource0`. A memory BAR's `resourceN`
/// only supports mmap (read(2) is for I/O BARs), so it is mapped, one page, read-only.
#[allow(unsafe_code)]
fn bar0_register(dir: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // Memory decoding off (a device on no driver, or on vfio-pci unopened): reads would be
    // all-ones without saying anything about the device.
    if std::fs::read_to_string(dir.join("enable")).is_ok_and(|e| e.trim() == "0") {
        return None;
    }
    // Asleep (runtime-suspended, or in a D3 state): reads say nothing either; D3cold itself
    // is a problem of its own above.
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    if read("power/runtime_status").trim() == "suspended" || read("power_state").starts_with("D3") {
        return None;
    }
    let file = std::fs::File::open(dir.join("resource0")).ok()?;
    if file.metadata().ok()?.len() < 4 {
        return None;
    }
    // SAFETY: a fresh read-only shared mapping of one page of an open file, not aliased by
    // any Rust reference; it is read once (volatile: it is device memory) and unmapped before
    // the file is closed.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if page == libc::MAP_FAILED {
            return None;
        }
        let value = std::ptr::read_volatile(page.cast::<u32>());
        libc::munmap(page, 4096);
        Some(u32::from_le(value))
    }
}

impl Host {
    /// What the host reads of `device` at attach, for the check at detach.
    pub(super) fn host_baseline(&self, device: PciAddress) -> HostBaseline {
        let dir = self.sysfs.device_dir(device);
        HostBaseline {
            aer_fatal: aer_total(&dir, "aer_dev_fatal"),
            aer_nonfatal: aer_total(&dir, "aer_dev_nonfatal"),
            link_width: read_u32(&dir.join("current_link_width")),
        }
    }

    /// Check `device` now that it is back with the host, expecting it on `expected_driver`.
    pub fn verify_device(&self, device: PciAddress, expected_driver: Option<&str>) -> Verification {
        self.check_device_against(device, expected_driver, None)
    }

    /// The host's own check of `device`: [`Host::verify_device`], and with `baseline` (read at
    /// attach) also the AER counters unchanged and the link no narrower than then.
    pub(super) fn check_device_against(
        &self,
        device: PciAddress,
        expected_driver: Option<&str>,
        baseline: Option<&HostBaseline>,
    ) -> Verification {
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
        // Only where BAR0's first register is an identity register: elsewhere it may be a
        // framebuffer (all-ones is a white pixel) or a register that a read changes.
        let bar0 = ids
            .filter(|(v, d)| {
                IDENTITY_AT_BAR0
                    .iter()
                    .any(|(iv, id)| iv == v && id.is_none_or(|id| id == *d))
            })
            .and_then(|_| bar0_register(&dir));
        if bar0 == Some(u32::MAX) {
            problems.push(
                "BAR0's first register reads all-ones through resource0: the device does not answer (fallen off the bus)".to_owned(),
            );
        }
        let link_width =
            read_u32(&dir.join("current_link_width")).zip(read_u32(&dir.join("max_link_width")));
        // Only against attach: a slot may be wired narrower than the device's maximum, and
        // speed is not judged at all (GPUs lower it themselves when idle; width they keep).
        if let (Some((now, max)), Some(before)) = (link_width, baseline.and_then(|b| b.link_width))
            && now < before
        {
            problems.push(format!(
                "the link trained to x{now} of x{max} (x{before} at attach)"
            ));
        }
        let (fatal, nonfatal) = (
            aer_total(&dir, "aer_dev_fatal"),
            aer_total(&dir, "aer_dev_nonfatal"),
        );
        if let Some(b) = baseline {
            for (what, then, now) in [
                ("fatal", b.aer_fatal, fatal),
                ("non-fatal", b.aer_nonfatal, nonfatal),
            ] {
                if let (Some(then), Some(now)) = (then, now)
                    && now > then
                {
                    problems.push(format!(
                        "{} {what} AER errors during the attachment ({then} at attach, {now} now)",
                        now - then
                    ));
                }
            }
        }
        Verification {
            device,
            ok: problems.is_empty(),
            vendor_id,
            device_id,
            driver,
            problems,
            ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            bar0,
            link_width,
            aer: fatal.zip(nonfatal),
        }
    }
}
