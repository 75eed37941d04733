//! `real-gpu`: run the kit (see `e2e/real-gpu`), or `real-gpu cuda-probe` inside the scratch root.

use gpu_passthrough_init::dryrun;
use gpu_passthrough_real_gpu::{CheckResult, Roots, Summary, checks, facts, inject, probe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "usage: real-gpu --cli PATH --gpu-init PATH [--out FILE] [--scratch DIR]
       real-gpu cuda-probe";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("cuda-probe") {
        let p = probe::run(c"libcuda.so.1");
        println!("{}", serde_json::to_string(&p).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let mut cli = None;
    let mut gpu_init = None;
    let mut out = std::env::var_os("GPU_PASSTHROUGH_REAL_GPU_OUT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("e2e/work/real-gpu.json"), PathBuf::from);
    let mut scratch = std::env::temp_dir().join(format!("real-gpu.{}", std::process::id()));
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let v = it.next().map(PathBuf::from);
        match (a.as_str(), v) {
            ("--cli", Some(p)) => cli = Some(p),
            ("--gpu-init", Some(p)) => gpu_init = Some(p),
            ("--out", Some(p)) => out = p,
            ("--scratch", Some(p)) => scratch = p,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(cli), Some(gpu_init)) = (cli, gpu_init) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    let mut summary = run(&cli, &gpu_init, &scratch);
    summary.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    if let Some(p) = out.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    if let Err(e) = std::fs::write(&out, text + "\n") {
        eprintln!("real-gpu: cannot write {}: {e}", out.display());
    }
    println!(
        "summary: {} (exit {}) -> {}",
        summary.status,
        summary.exit_code,
        out.display()
    );
    ExitCode::from(summary.exit_code as u8)
}

fn cli_json(cli: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    match Command::new(cli).arg("--json").args(args).output() {
        Ok(o) => (
            o.status.code(),
            serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
                serde_json::json!({"unparsed": String::from_utf8_lossy(&o.stdout), "stderr": String::from_utf8_lossy(&o.stderr)})
            }),
        ),
        Err(e) => (None, serde_json::json!({ "error": e.to_string() })),
    }
}

fn show(c: CheckResult) -> CheckResult {
    println!("{}", c.line());
    c
}

fn supported_gpus() -> Option<PathBuf> {
    std::env::var_os("GPU_PASSTHROUGH_SUPPORTED_GPUS")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/share/nvidia/supported-gpus/supported-gpus.json",
                "/usr/share/nvidia/supported-gpus.json",
                "/usr/share/doc/NVIDIA_GLX-1.0/supported-gpus/supported-gpus.json",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn run(cli: &Path, gpu_init: &Path, scratch: &Path) -> Summary {
    let roots = Roots::default();
    let (version, gpus) = match facts::detect(&roots) {
        Ok(found) => found,
        Err(reason) => {
            println!("NO-GPU  real-gpu: {reason}; nothing was checked");
            return Summary::no_gpu(reason);
        }
    };
    println!(
        "driver {version}, GPUs: {}",
        gpus.iter()
            .map(|g| g.address.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut results = Vec::new();
    let state = std::env::temp_dir().join(format!("real-gpu-state.{}", std::process::id()));
    let _ = std::fs::create_dir_all(&state);
    let common: Vec<String> = vec!["--state-dir".into(), state.display().to_string()];
    let mut base: Vec<&str> = common.iter().map(String::as_str).collect();
    let sg = supported_gpus().map(|p| p.display().to_string());

    // 1. doctor, devices, plan.
    let (_, doctor) = cli_json(cli, &[base.as_slice(), &["doctor"]].concat());
    let groups =
        std::fs::read_dir(roots.sysfs.join("kernel/iommu_groups")).map_or(0, |d| d.count());
    results.push(show(checks::doctor(&doctor, &gpus, groups)));
    let mut dev_args = vec!["devices"];
    if let Some(s) = &sg {
        dev_args.extend(["--supported-gpus", s.as_str()]);
    }
    let (_, devices) = cli_json(cli, &[base.as_slice(), &dev_args].concat());
    results.push(show(checks::devices(&devices, &gpus, sg.is_some())));
    for g in &gpus {
        let d = roots.sysfs.join("bus/pci/devices").join(&g.address);
        let watched = vec![
            state.clone(),
            d.join("driver"),
            d.join("driver_override"),
            d.join("reset_method"),
        ];
        let before = checks::fingerprint(&watched);
        base.truncate(common.len());
        let (code, plan) = cli_json(
            cli,
            &[base.as_slice(), &["plan", g.address.as_str()]].concat(),
        );
        let after = checks::fingerprint(&watched);
        results.push(show(checks::plan(&g.address, code, &plan, &before, &after)));
    }
    let _ = std::fs::remove_dir_all(&state);

    // 2. The guest init's nodes against /dev, through the shipped binary.
    let dry = Command::new(gpu_init)
        .args([
            "nodes",
            "--dry-run",
            "--proc-root",
            "/proc",
            "--dev-dir",
            "/dev",
            "--json",
        ])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<dryrun::DryRun>(&o.stdout).ok());
    match dry {
        Some(dry) => results.push(show(checks::nodes(
            &dry,
            &facts::nvidia_nodes(&roots.dev),
            gpus.len(),
        ))),
        None => results.push(show(CheckResult::from_findings(
            "nodes",
            vec![format!(
                "{} nodes --dry-run gave no JSON",
                gpu_init.display()
            )],
            vec![],
            serde_json::Value::Null,
        ))),
    }

    // 3 and 4. Library injection and the report, in a private tmpfs.
    let ldconfig = [
        "/sbin/ldconfig.real",
        "/usr/sbin/ldconfig.real",
        "/sbin/ldconfig",
        "/usr/sbin/ldconfig",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x7fELF")))
    .unwrap_or_else(|| PathBuf::from("/sbin/ldconfig"));
    let ldconfig_p = Command::new(&ldconfig)
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match inject::private_scratch(scratch) {
        Err(e) => results.push(show(CheckResult::from_findings(
            "libraries",
            vec![e],
            vec![],
            serde_json::Value::Null,
        ))),
        Ok(()) => {
            let inputs = inject::Inputs {
                driver_version: &version,
                gpus: &gpus,
                ldconfig_p: &ldconfig_p,
                nvidia_smi: which("nvidia-smi"),
                ldconfig,
                gpu_init: gpu_init.to_path_buf(),
                probe: std::env::current_exe().unwrap_or_default(),
                scratch: scratch.to_path_buf(),
            };
            let (check, setup_out) = inject::run(&inputs);
            results.push(show(check));
            results.push(show(checks::report(
                &setup_out,
                &version,
                gpus.len() as u32,
            )));
        }
    }
    Summary::of(
        version,
        gpus.iter().map(|g| g.address.clone()).collect(),
        results,
    )
}
