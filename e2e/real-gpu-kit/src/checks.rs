//! The comparisons: our CLI's and guest init's answers against [`crate::facts`].

use crate::CheckResult;
use crate::facts::{DevNode, GpuFact};
use gpu_passthrough::vmm::{BootDevice, BootSpec};
use gpu_passthrough_init::dryrun::DryRun;
use serde_json::{Value, json};
use std::path::PathBuf;

/// `doctor --json`: it ran, it lists every GPU, and its IOMMU verdict agrees with sysfs.
pub fn doctor(doctor: &Value, gpus: &[GpuFact], iommu_groups: usize) -> CheckResult {
    let mut fail = Vec::new();
    let checks = doctor["checks"].as_array().cloned().unwrap_or_default();
    if checks.is_empty() {
        fail.push(format!("doctor --json has no checks: {doctor}"));
    }
    for g in gpus {
        if !checks
            .iter()
            .any(|c| c["name"].as_str().is_some_and(|n| n.contains(&g.address)))
        {
            fail.push(format!("doctor has no check for GPU {}", g.address));
        }
    }
    if let Some(iommu) = checks.iter().find(|c| c["name"] == "iommu") {
        let ok = iommu["status"] == "ok";
        if ok != (iommu_groups > 0) {
            fail.push(format!(
                "doctor says iommu {} but the kernel has {iommu_groups} IOMMU groups",
                iommu["status"]
            ));
        }
    } else {
        fail.push("doctor has no `iommu` check".into());
    }
    let notes = vec![format!(
        "{} checks, verdict {}",
        checks.len(),
        doctor["verdict"]
    )];
    CheckResult::from_findings("doctor", fail, notes, json!({ "doctor": doctor }))
}

/// `devices --json`: every GPU is found with a name (the driver's own `Model:` when we were given
/// the driver's `supported-gpus.json`, `driver_list`; else any, from `pci.ids`), its IOMMU group,
/// NUMA node, reset methods and BARs; and the MMIO window a boot spec would ask for holds its BARs.
pub fn devices(devices: &Value, gpus: &[GpuFact], driver_list: bool) -> CheckResult {
    let mut fail = Vec::new();
    let mut notes = Vec::new();
    let mut windows = Vec::new();
    // `devices --json` is a listing object; the library's bare row list is accepted too.
    let rows = devices.get("devices").unwrap_or(devices);
    let list = rows.as_array().cloned().unwrap_or_default();
    for g in gpus {
        let Some(d) = list.iter().find(|d| d["address"] == g.address.as_str()) else {
            fail.push(format!("devices does not list GPU {}", g.address));
            continue;
        };
        let mut differ = |what: &str, ours: Value, real: Value| {
            if ours != real {
                fail.push(format!(
                    "{} {what}: we say {ours}, the system says {real}",
                    g.address
                ));
            }
        };
        match (&g.model, d["device_name"].as_str()) {
            (Some(model), _) if driver_list => {
                differ("name", d["device_name"].clone(), json!(model))
            }
            (_, Some(_)) => {}
            (_, None) => differ("name", Value::Null, json!(g.model)),
        }
        differ(
            "IOMMU group",
            d["iommu_group"].clone(),
            json!(g.iommu_group),
        );
        differ("NUMA node", d["numa_node"].clone(), json!(g.numa_node));
        differ(
            "reset methods",
            d["reset_methods"].clone(),
            json!(g.reset_methods),
        );
        differ("driver", d["driver"].clone(), json!(g.driver));
        let ours: Vec<Value> = d["bars"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| json!({"index": b["index"], "size": b["size"], "is_64bit": b["is_64bit"]}))
            .collect();
        differ("BARs", json!(ours), json!(g.bars));
        let bar64: u64 = g.bars.iter().filter(|b| b.is_64bit).map(|b| b.size).sum();
        let spec = BootSpec::new(
            "real-gpu-kit",
            vec![BootDevice {
                address: g.address.parse().ok(),
                mdev_uuid: None,
                sysfs_path: PathBuf::from(format!("/sys/bus/pci/devices/{}", g.address)),
                iommu_group: g.iommu_group,
                vfio_device: PathBuf::new(),
                gpu: true,
                vgpu: false,
                bar64_bytes: bar64,
                vfio: None,
                numa_node: None,
                host_switch: None,
                nic: false,
            }],
            Vec::new(),
            None,
        );
        if spec.mmio.window_bytes < bar64 {
            fail.push(format!(
                "{}: the boot spec's MMIO window ({} bytes) is smaller than the GPU's 64-bit BARs ({bar64})",
                g.address, spec.mmio.window_bytes
            ));
        }
        notes.push(format!(
            "{} {}: group {:?}, numa {:?}, reset {:?}, 64-bit BARs {} MiB, MMIO window {} GiB",
            g.address,
            g.model.as_deref().unwrap_or("?"),
            g.iommu_group,
            g.numa_node,
            g.reset_methods,
            bar64 >> 20,
            spec.mmio.window_bytes >> 30
        ));
        windows.push(json!({"address": g.address, "bar64_bytes": bar64, "mmio": spec.mmio}));
    }
    CheckResult::from_findings(
        "devices",
        fail,
        notes,
        json!({ "gpus": gpus, "mmio": windows }),
    )
}

/// A fingerprint of what `plan` must not change: a directory listing with sizes, and sysfs
/// attributes.
pub fn fingerprint(paths: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for p in paths {
        match std::fs::read_dir(p) {
            Ok(entries) => {
                let mut names: Vec<String> = entries
                    .filter_map(Result::ok)
                    .map(|e| {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        format!("{}/{} {len}", p.display(), e.file_name().to_string_lossy())
                    })
                    .collect();
                names.sort();
                out.push(format!("{} dir", p.display()));
                out.extend(names);
            }
            Err(_) => out.push(match std::fs::read_link(p) {
                Ok(t) => format!("{} -> {}", p.display(), t.display()),
                Err(_) => format!("{} = {:?}", p.display(), std::fs::read_to_string(p).ok()),
            }),
        }
    }
    out
}

/// `plan ADDR --json`: it refuses (exit 4) with reasons, or explains a move off `nvidia`; and
/// nothing it must not touch changed.
pub fn plan(
    address: &str,
    code: Option<i32>,
    plan: &Value,
    before: &[String],
    after: &[String],
) -> CheckResult {
    let mut fail = Vec::new();
    let mut notes = Vec::new();
    let refusals = plan["refusals"].as_array().cloned().unwrap_or_default();
    match code {
        Some(4) if !refusals.is_empty() => notes.push(format!(
            "refused: {}",
            refusals
                .iter()
                .filter_map(|r| r["message"].as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        )),
        Some(0) => {
            let moves = plan["devices"].as_array().cloned().unwrap_or_default();
            match moves.iter().find(|d| d["address"] == address) {
                Some(d) if d["driver"] == "nvidia" => notes.push(format!(
                    "explains: {} moves nvidia -> vfio-pci with {} sysfs writes",
                    address,
                    plan["writes"].as_array().map_or(0, Vec::len)
                )),
                Some(d) => fail.push(format!(
                    "plan moves {address} from {} but it is on nvidia",
                    d["driver"]
                )),
                None => fail.push(format!("plan does not mention {address}: {plan}")),
            }
        }
        other => fail.push(format!(
            "plan exited {other:?} (want 0 with an explanation or 4 with refusals): {plan}"
        )),
    }
    if before != after {
        let changed: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
        let gone: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
        fail.push(format!(
            "plan changed what it must not: new {changed:?}, gone {gone:?}"
        ));
    }
    CheckResult::from_findings(
        "plan",
        fail,
        notes,
        json!({ "plan": plan, "exit_code": code }),
    )
}

/// The guest init's node dry run against the real device directory: every planned node exists
/// with that major and minor (capabilities also with the driver's mode), every real `nvidia*`
/// node is planned, and there is one `/dev/nvidiaN` per GPU.
pub fn nodes(dry: &DryRun, real: &[DevNode], gpus: usize) -> CheckResult {
    let mut fail: Vec<String> = dry
        .problems
        .iter()
        .map(|p| format!("dry run: {p}"))
        .collect();
    let mut notes = Vec::new();
    for n in &dry.nodes {
        match real.iter().find(|r| r.name == n.name) {
            Some(r) if (r.major, r.minor) != (n.major, n.minor) => fail.push(format!(
                "/dev/{} is {}:{} but we would make {}:{}",
                n.name, r.major, r.minor, n.major, n.minor
            )),
            Some(r) if n.driver_mode && n.mode != Some(r.mode) => fail.push(format!(
                "/dev/{} has mode {:o} but we would give it {:o}",
                n.name,
                r.mode,
                n.mode.unwrap_or(0)
            )),
            Some(_) => {}
            // Created on demand (nvidia-modprobe, udev): absent is a note, unless the GPU's own.
            None if is_gpu_node(&n.name) || n.name == "nvidiactl" => fail.push(format!(
                "we would make /dev/{} but the system has none",
                n.name
            )),
            None => notes.push(format!(
                "/dev/{} is not present here (made on demand)",
                n.name
            )),
        }
    }
    for r in real {
        if !dry.nodes.iter().any(|n| n.name == r.name)
            && (is_gpu_node(&r.name)
                || r.name == "nvidiactl"
                || r.name.starts_with("nvidia-uvm")
                || r.name.starts_with("nvidia-caps/")
                || r.name == "nvidia-modeset")
        {
            fail.push(format!(
                "/dev/{} ({}:{}) exists but we would not make it",
                r.name, r.major, r.minor
            ));
        }
    }
    let planned_gpus = dry.nodes.iter().filter(|n| is_gpu_node(&n.name)).count();
    if planned_gpus != gpus {
        fail.push(format!(
            "we would make {planned_gpus} /dev/nvidiaN nodes for {gpus} GPUs"
        ));
    }
    notes.insert(
        0,
        format!(
            "{} nodes planned, {} nvidia nodes in /dev",
            dry.nodes.len(),
            real.len()
        ),
    );
    CheckResult::from_findings("nodes", fail, notes, json!({ "dry_run": dry, "dev": real }))
}

/// `nvidiaN`.
pub fn is_gpu_node(name: &str) -> bool {
    name.strip_prefix("nvidia")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The `GPU-INIT` line of a setup: exactly one, it parses as the typed report
/// ([`gpu_passthrough_guest_contract::report::Report`]), status `ok`, the real driver version and GPU
/// count, every module already loaded (nothing was loaded).
pub fn report(output: &str, driver_version: &str, gpus: u32) -> CheckResult {
    use gpu_passthrough_guest_contract::report::{ModuleResult, Status, parse_report_line};
    let lines: Vec<_> = output.lines().filter_map(parse_report_line).collect();
    let mut fail = Vec::new();
    if lines.len() != 1 {
        fail.push(format!("{} GPU-INIT lines, want exactly 1", lines.len()));
    }
    let mut facts = json!({ "output": output });
    match lines.into_iter().next() {
        None => {}
        Some(Err(e)) => fail.push(format!(
            "the GPU-INIT line does not parse as the report: {e}"
        )),
        Some(Ok(r)) => {
            if r.status != Status::Ok {
                fail.push(format!(
                    "status {:?} (problems: {:?})",
                    r.status, r.problems
                ));
            }
            if r.driver_version.as_deref() != Some(driver_version) {
                fail.push(format!(
                    "driver_version {:?}, the loaded driver is {driver_version}",
                    r.driver_version
                ));
            }
            if r.gpus != gpus {
                fail.push(format!("gpus {}, the driver has {gpus}", r.gpus));
            }
            for m in r
                .modules
                .iter()
                .filter(|m| m.result != ModuleResult::AlreadyLoaded)
            {
                fail.push(format!(
                    "module {} is {:?}, want already_loaded",
                    m.name, m.result
                ));
            }
            facts = json!({ "report": r });
        }
    }
    CheckResult::from_findings("report", fail, vec![], facts)
}
