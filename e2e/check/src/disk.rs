//! Run D: the GPU payload as a read-only disk image (virtio-pmem with DAX, virtio-blk) against
//! the initramfs layer: the guests' reports and workloads, the QEMU arguments the library
//! renders, and the memory figures.
//!
//! The workload (`e2e/workload-d.sh`) prints `E2E-D mem <when> <field>: <kB> kB` from
//! `/proc/meminfo` right after GPU-INIT (`after_init`) and after reading every injected library
//! once (`after_read`), with `E2E-D read_bytes N` between them.

use crate::checks::{Checks, json};
use crate::console::Console;
use crate::guest;
use gpu_passthrough::vmm::{DiskAttach, GpuDisk};
use gpu_passthrough_guest_contract::disk::PMEM;
use gpu_passthrough_guest_contract::report::{PayloadSource, SetupErrorClass, Status, find_report};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Page cache growth (kB) under which a read of every library counts as served by DAX: the
/// libraries are about 141 MB, so anything read through the page cache is far above it.
const DAX_CACHE_SLACK_KB: u64 = 16 * 1024;

/// The QEMU arguments for the image, one per line, from the library's renderer, then the
/// kernel word: what `e2e/run` boots with.
pub fn qemu_args(image: &Path, attach: &str, memory_mib: u64) -> anyhow::Result<Vec<String>> {
    let size = std::fs::metadata(image)?.len();
    let attach = if attach == PMEM {
        DiskAttach::Pmem
    } else {
        DiskAttach::Blk {
            device: attach.to_string(),
        }
    };
    let disk = GpuDisk {
        image: PathBuf::from(image),
        size,
        attach,
        verity: None,
        isolation: Default::default(),
    };
    let mut out = disk.qemu_args(memory_mib);
    out.push(disk.kernel_word());
    Ok(out)
}

/// The image as built: `fsck.erofs` accepts it, it is padded for virtio-pmem, and the CLI's
/// `initrd inspect --json` lists the payload in it.
pub fn disk_image(image: &Path, cli: &Path) -> Checks {
    let mut c = Checks::default();
    let fsck = std::process::Command::new("fsck.erofs").arg(image).output();
    c.check(
        "fsck.erofs accepts the image",
        fsck.as_ref().is_ok_and(|o| o.status.success()),
        || match &fsck {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => format!("fsck.erofs: {e}"),
        },
    );
    let size = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
    c.check(
        "the image is padded to a multiple of 2 MiB (virtio-pmem maps it so)",
        size > 0 && size.is_multiple_of(2 << 20),
        || format!("{size} bytes"),
    );
    let out = std::process::Command::new(cli)
        .args(["initrd", "inspect", "--json"])
        .arg(image)
        .output();
    let listing: Option<serde_json::Value> = out
        .as_ref()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let entry = |path: &str| {
        listing
            .as_ref()
            .and_then(|l| l["entries"].as_array())
            .and_then(|e| e.iter().find(|x| x["path"] == path).cloned())
    };
    c.check(
        "`initrd inspect` lists the image: manifest.json, the guest init, nvidia.ko",
        ["manifest.json", "bin/gpu-init"]
            .iter()
            .all(|p| entry(p).is_some_and(|e| e["kind"] == "file"))
            && listing.as_ref().is_some_and(|l| {
                l["entries"].as_array().is_some_and(|e| {
                    e.iter().any(|x| {
                        x["path"]
                            .as_str()
                            .is_some_and(|p| p.ends_with("/nvidia.ko"))
                    })
                })
            }),
        || match &out {
            Ok(o) => format!(
                "exit {:?}: {}",
                o.status.code(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("{e}"),
        },
    );
    c.check(
        "`initrd inspect` shows the soname links with their targets",
        entry("lib/libcuda.so.1")
            .is_some_and(|e| e["kind"] == "symlink" && e["target"].is_string()),
        || format!("lib/libcuda.so.1: {:?}", entry("lib/libcuda.so.1")),
    );
    c
}

/// One `/proc/meminfo` field the workload printed at `when` (kB).
fn mem(console: &Console, when: &str, field: &str) -> Option<u64> {
    console
        .after(&format!("E2E-D mem {when} {field}: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A guest booted with `GPU_DISK`: everything run A checks, plus where the payload came from.
pub fn disk_guest(
    console: &Console,
    driver: &str,
    kernel: &str,
    boot_rc: i32,
    source: PayloadSource,
) -> Checks {
    let mut c = guest::gpu_guest(console, driver, kernel, boot_rc);
    let name = json(&source);
    let report = find_report(&console.text).and_then(Result::ok);
    let payload = report.as_ref().and_then(|r| r.payload.as_ref());
    c.check(
        format!("the report says the payload came from {name}"),
        payload.is_some_and(|p| p.source == source && p.device.is_some() && p.mount_ms.is_some()),
        || format!("payload: {}", json(&payload)),
    );
    let pmem = source == PayloadSource::Pmem;
    c.check(
        format!(
            "the image is mounted {}",
            if pmem { "with DAX" } else { "without DAX" }
        ),
        payload.is_some_and(|p| p.dax == pmem),
        || format!("payload: {}", json(&payload)),
    );
    c.check(
        "the mount modules came from the base layer (virtio_pci ... erofs)",
        payload.is_some_and(|p| {
            ["virtio_pci", "erofs"]
                .iter()
                .all(|m| p.mount_modules.iter().any(|x| x == m))
        }),
        || format!("payload: {}", json(&payload)),
    );
    if let Some(ms) = payload.and_then(|p| p.mount_ms) {
        c.figure(format!("run D payload mount, {name} (ms)"), ms);
    }
    if let Some(kb) = payload.and_then(|p| p.mount_mem_kb) {
        c.figure(
            format!(
                "run D payload guest RAM: what the mount took (modules, device, mount), {name} (MB)"
            ),
            format!("{:.1}", kb as f64 / 1024.0),
        );
    }
    let cached = (
        mem(console, "after_init", "Cached"),
        mem(console, "after_read", "Cached"),
    );
    let read = console
        .after("E2E-D read_bytes ")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    c.check(
        "the workload read every injected library (over 100 MB)",
        read > 100 << 20,
        || format!("read_bytes {read}; last lines: {}", console.tail(4)),
    );
    if let (Some(before), Some(after)) = cached {
        let grown = after.saturating_sub(before);
        c.figure(
            format!("run D guest page cache growth on reading the libraries, {name} (MB)"),
            grown / 1024,
        );
        if pmem {
            c.check(
                format!(
                    "DAX: reading {} MB of libraries grew the guest page cache by under {} MB",
                    read >> 20,
                    DAX_CACHE_SLACK_KB / 1024
                ),
                // Nothing read proves nothing: the read itself is its own check above.
                grown < DAX_CACHE_SLACK_KB && read > 100 << 20,
                || format!("Cached grew by {grown} kB"),
            );
        }
    } else {
        c.check("the workload printed its meminfo lines", false, || {
            format!("last lines: {}", console.tail(4))
        });
    }
    c
}

/// A verity image that cannot be proven intact (a byte flipped, no root hash): the report's
/// `gpu_disk_integrity` naming the device, no module loaded, and the workload still runs.
pub fn disk_integrity_guest(console: &Console, device: &str) -> Checks {
    let mut c = Checks::default();
    let report = find_report(&console.text).and_then(Result::ok);
    let error = report.as_ref().and_then(|r| r.error.as_ref());
    c.check(
        "the image is refused with gpu_disk_integrity, status failed",
        error.is_some_and(|e| e.class == SetupErrorClass::GpuDiskIntegrity)
            && report.as_ref().is_some_and(|r| r.status == Status::Failed),
        || format!("report: {}", json(&report)),
    );
    c.check(
        "the error names the device and the fix",
        error.is_some_and(|e| e.message.contains(device) && e.message.contains("verity")),
        || format!("error: {}", json(&error)),
    );
    c.check(
        "no GPU module was loaded from the image",
        report.as_ref().is_some_and(|r| r.modules.is_empty()),
        || format!("report: {}", json(&report)),
    );
    c.check(
        "the workload still ran",
        console.text.contains("E2E-D"),
        || format!("last lines: {}", console.tail(4)),
    );
    c
}

/// `GPU_DISK=pmem` with no image attached: the report's classified error, and the workload
/// still runs (a failed GPU setup is not fatal unless `GPU_INIT_STRICT=1`).
pub fn disk_missing_guest(console: &Console) -> Checks {
    let mut c = Checks::default();
    let report = find_report(&console.text).and_then(Result::ok);
    let error = report.as_ref().and_then(|r| r.error.as_ref());
    c.check(
        "GPU_DISK pointing at nothing is the report's gpu_disk error, status failed",
        error.is_some_and(|e| e.class == SetupErrorClass::GpuDisk)
            && report.as_ref().is_some_and(|r| r.status == Status::Failed),
        || format!("report: {}", json(&report)),
    );
    c.check(
        "the error names the device and how to attach the image",
        error
            .is_some_and(|e| e.message.contains("/dev/pmem0") && e.message.contains("virtio-pmem")),
        || format!("error: {}", json(&error)),
    );
    c.check(
        "no GPU module was loaded without the payload",
        report.as_ref().is_some_and(|r| r.modules.is_empty()),
        || format!("report: {}", json(&report)),
    );
    c.check(
        "the workload still ran",
        console.has("E2E-A workload done"),
        || format!("last lines: {}", console.tail(5)),
    );
    c
}

/// Guest memory figures: `MemAvailable` after GPU-INIT and after the library reads, for each
/// labelled boot, against the first (the base-only boot).
pub fn guest_memory(boots: &[(String, Console)]) -> Checks {
    let mut c = Checks::default();
    let mut base: Option<(u64, u64)> = None;
    for (label, console) in boots {
        let init = mem(console, "after_init", "MemAvailable");
        let read = mem(console, "after_read", "MemAvailable");
        c.check(
            format!("{label}: the workload printed MemAvailable after GPU-INIT and after reading"),
            init.is_some() && read.is_some(),
            || format!("last lines: {}", console.tail(4)),
        );
        let (Some(init), Some(read)) = (init, read) else {
            continue;
        };
        c.figure(
            format!("run D guest MemAvailable after GPU-INIT, {label} (MB)"),
            init / 1024,
        );
        match base {
            None => base = Some((init, read)),
            Some((b_init, b_read)) => {
                let cost = |b: u64, x: u64| b.saturating_sub(x) as f64 / 1024.0;
                c.figure(
                    format!("run D guest RAM of the GPU boot (payload + driver setup), {label} vs base-only (MB)"),
                    format!("{:.1}", cost(b_init, init)),
                );
                c.figure(
                    format!("run D guest RAM of the GPU boot after reading every library, {label} vs base-only (MB)"),
                    format!("{:.1}", cost(b_read, read)),
                );
            }
        }
    }
    c
}

/// Sums of `/proc/PID/smaps_rollup` fields (kB) over `pids`.
pub fn pss(pids: &[u32]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut sums = BTreeMap::new();
    for pid in pids {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text =
            std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            if let Some(kb) = value
                .trim()
                .strip_suffix(" kB")
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                *sums.entry(key.to_string()).or_default() += kb;
            }
        }
    }
    Ok(sums)
}

/// Host memory of three pmem guests against three initramfs guests, from saved [`pss`] sums.
pub fn host_memory(
    initramfs: &BTreeMap<String, u64>,
    pmem: &BTreeMap<String, u64>,
    guests: usize,
    image_bytes: u64,
    image_resident_bytes: u64,
) -> Checks {
    let mut c = Checks::default();
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    c.check(
        format!("PSS read for {guests} initramfs and {guests} pmem guests"),
        get(initramfs, "Pss") > 0 && get(pmem, "Pss") > 0,
        || format!("initramfs {initramfs:?}, pmem {pmem:?}"),
    );
    let mb = |kb: u64| kb / 1024;
    for (label, m) in [("initramfs", initramfs), ("pmem", pmem)] {
        c.figure(
            format!("run D host PSS of {guests} {label} guests (MB)"),
            mb(get(m, "Pss")),
        );
        c.figure(
            format!("run D host PSS of {guests} {label} guests: anonymous / file (MB)"),
            format!("{} / {}", mb(get(m, "Pss_Anon")), mb(get(m, "Pss_File"))),
        );
    }
    if get(initramfs, "Pss") > 0 {
        c.figure(
            format!("run D host PSS, {guests} pmem / {guests} initramfs guests (ratio)"),
            format!(
                "{:.2}",
                get(pmem, "Pss") as f64 / get(initramfs, "Pss") as f64
            ),
        );
    }
    c.figure(
        "run D image in the host page cache / image size (copies)",
        format!(
            "{:.2}",
            image_resident_bytes as f64 / image_bytes.max(1) as f64
        ),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_payload(source: PayloadSource, dax: bool, cache_growth_kb: u64) -> Console {
        let mut r = gpu_passthrough_guest_contract::report::Report::new("k".into());
        r.payload = Some(gpu_passthrough_guest_contract::report::PayloadReport {
            source,
            device: Some("/dev/pmem0".into()),
            dax,
            mount_modules: vec!["virtio_pci".into(), "erofs".into()],
            mount_ms: Some(40),
            mount_mem_kb: Some(4300),
        });
        Console::parse(&format!(
            "{}\nE2E-D mem after_init Cached: 1000 kB\nE2E-D read_bytes 150000000\n\
             E2E-D mem after_read Cached: {} kB\n",
            r.line(),
            1000 + cache_growth_kb
        ))
    }

    fn verdict(c: &Checks, what: &str) -> Option<bool> {
        c.lines()
            .iter()
            .find(|l| l.contains(what))
            .map(|l| l.starts_with("PASS"))
    }

    #[test]
    fn pmem_guests_pass_with_dax_and_fail_when_reads_fill_the_page_cache() {
        let good = disk_guest(
            &with_payload(PayloadSource::Pmem, true, 100),
            "d",
            "k",
            0,
            PayloadSource::Pmem,
        );
        assert_eq!(verdict(&good, "payload came from"), Some(true));
        assert_eq!(verdict(&good, "mounted with DAX"), Some(true));
        assert_eq!(verdict(&good, "DAX: reading"), Some(true));
        assert_eq!(verdict(&good, "read every injected library"), Some(true));
        let cached = disk_guest(
            &with_payload(PayloadSource::Pmem, true, 140_000),
            "d",
            "k",
            0,
            PayloadSource::Pmem,
        );
        assert_eq!(verdict(&cached, "DAX: reading"), Some(false));
        let unread = with_payload(PayloadSource::Pmem, true, 0);
        let unread = Console::parse(&unread.text.replace("E2E-D read_bytes 150000000", ""));
        let c = disk_guest(&unread, "d", "k", 0, PayloadSource::Pmem);
        assert_eq!(
            verdict(&c, "DAX: reading"),
            Some(false),
            "nothing read proves nothing"
        );
        let no_dax = disk_guest(
            &with_payload(PayloadSource::Pmem, false, 100),
            "d",
            "k",
            0,
            PayloadSource::Pmem,
        );
        assert_eq!(verdict(&no_dax, "mounted with DAX"), Some(false));
        let wrong = disk_guest(
            &with_payload(PayloadSource::Initramfs, false, 100),
            "d",
            "k",
            0,
            PayloadSource::VirtioBlk,
        );
        assert_eq!(verdict(&wrong, "payload came from"), Some(false));
    }

    #[test]
    fn a_missing_disk_passes_only_with_the_classified_error() {
        let mut r = gpu_passthrough_guest_contract::report::Report::new("k".into());
        r.status = Status::Failed;
        r.error = Some(gpu_passthrough_guest_contract::report::ReportError {
            class: SetupErrorClass::GpuDisk,
            message: "GPU_DISK=pmem: /dev/pmem0 did not appear within 10s: attach the image (QEMU: memory-backend-file + virtio-pmem-pci ...".into(),
        });
        let good = Console::parse(&format!("{}\nE2E-A workload done\n", r.line()));
        assert!(
            disk_missing_guest(&good)
                .lines()
                .iter()
                .all(|l| l.starts_with("PASS"))
        );
        r.error.as_mut().unwrap().class = SetupErrorClass::NoGpuLayer;
        let bad = Console::parse(&format!("{}\nE2E-A workload done\n", r.line()));
        assert_eq!(
            verdict(&disk_missing_guest(&bad), "gpu_disk error"),
            Some(false)
        );
    }

    #[test]
    fn memory_figures_are_against_the_first_boot() {
        let boot = |avail: u64| {
            Console::parse(&format!(
                "E2E-D mem after_init MemAvailable: {avail} kB\nE2E-D mem after_read MemAvailable: {} kB\n",
                avail - 2048
            ))
        };
        let c = guest_memory(&[
            ("base-only".into(), boot(900_000)),
            ("pmem".into(), boot(897_952)),
        ]);
        assert!(
            c.lines().iter().any(|l| l
                == "FIGURE run D guest RAM of the GPU boot (payload + driver setup), pmem vs base-only (MB)|2.0"),
            "{:#?}",
            c.lines()
        );
        let missing = guest_memory(&[("base-only".into(), Console::parse("nothing\n"))]);
        assert_eq!(missing.failed(), 1);
    }

    #[test]
    fn pss_sums_this_process() {
        let sums = pss(&[std::process::id()]).unwrap();
        assert!(sums["Pss"] > 0 && sums.contains_key("Rss"), "{sums:?}");
        assert!(pss(&[u32::MAX]).is_err());
    }
}
