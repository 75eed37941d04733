//! The driver's guest daemons and the module lock, decided over the guest's own trees:
//! `nvidia-persistenced` when the layer carries it (UVM persistence with
//! `GPU_INIT_PERSISTENCED=uvm`), `nv-fabricmanager` when the guest's PCI bus shows NVSwitches
//! (class 0x0680, NVIDIA vendor), and `kernel.modules_disabled=1` with `GPU_INIT_LOCK_MODULES=1`.
//!
//! Every daemon gets a classified report entry, whatever happens (started, failed, skipped
//! because the driver is down, absent from the layer, not needed): nothing is silent.

use crate::context::SetupContext;
use crate::env::{GuestEnv, Persistenced};
use gpu_passthrough_guest_contract::Manifest;
use gpu_passthrough_guest_contract::capability::{FABRIC_MANAGER, PERSISTENCED};
use gpu_passthrough_guest_contract::report::{DaemonReport, DaemonResult};
use std::path::{Path, PathBuf};
use std::process::Command;

/// NVIDIA's PCI vendor ID as sysfs writes it.
const NVIDIA_VENDOR: &str = "0x10de";
/// PCI class "bridge, other" (0x0680xx): how an NVSwitch shows on the bus.
const NVSWITCH_CLASS: &str = "0x0680";

/// What to do about one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start `program` with `args`.
    Start {
        /// Daemon name.
        name: &'static str,
        /// Its file (host path of `/gpu/bin/<name>`).
        program: PathBuf,
        /// Arguments.
        args: Vec<String>,
    },
    /// Do not start it; report this.
    Report {
        /// Daemon name.
        name: &'static str,
        /// The classified outcome.
        result: DaemonResult,
        /// Why.
        message: String,
        /// A `problems` sentence, when it makes the setup degraded.
        problem: Option<String>,
    },
}

/// PCI addresses of the NVSwitches on the guest's bus (`<sys>/bus/pci/devices/*`).
pub fn nvswitches(sys_root: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(sys_root.join("bus/pci/devices")) else {
        return Vec::new();
    };
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let mut out: Vec<String> = dir
        .filter_map(Result::ok)
        .filter(|e| {
            let p = e.path();
            read(p.join("vendor")).trim() == NVIDIA_VENDOR
                && read(p.join("class")).trim().starts_with(NVSWITCH_CLASS)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The layer's program of that name, if the manifest lists it and the file is there.
fn program(ctx: &SetupContext, manifest: &Manifest, name: &str) -> Option<PathBuf> {
    manifest
        .binaries
        .iter()
        .find(|b| Path::new(b).file_name().is_some_and(|f| f == name))
        .map(|b| ctx.layer_path(b))
        .filter(|p| p.is_file())
}

/// Decide both daemons. `driver_down` names why the driver did not load, when it did not.
pub fn decide(
    ctx: &SetupContext,
    manifest: &Manifest,
    env: &GuestEnv,
    driver_down: Option<&str>,
) -> Vec<Decision> {
    let mut out = Vec::new();
    let skipped = |name: &'static str, why: &str| Decision::Report {
        name,
        result: DaemonResult::Skipped,
        message: format!("not started: the NVIDIA driver did not load ({why})"),
        problem: None,
    };
    match (program(ctx, manifest, PERSISTENCED), env.persistenced) {
        (_, Persistenced::Off) => out.push(Decision::Report {
            name: PERSISTENCED,
            result: DaemonResult::NotNeeded,
            message: "not started: GPU_INIT_PERSISTENCED=0".into(),
            problem: None,
        }),
        (None, asked) => out.push(Decision::Report {
            name: PERSISTENCED,
            result: DaemonResult::Absent,
            message: format!("the GPU layer has no {PERSISTENCED}"),
            problem: (asked == Persistenced::Uvm).then(|| {
                format!(
                    "GPU_INIT_PERSISTENCED=uvm but the GPU layer has no {PERSISTENCED}: add it \
                     to the driver libraries artifact"
                )
            }),
        }),
        (Some(_), _) if driver_down.is_some() => {
            out.push(skipped(PERSISTENCED, driver_down.unwrap_or_default()))
        }
        (Some(program), asked) => out.push(Decision::Start {
            name: PERSISTENCED,
            program,
            args: if asked == Persistenced::Uvm {
                vec!["--uvm-persistence-mode".into()]
            } else {
                Vec::new()
            },
        }),
    }
    let switches = nvswitches(&ctx.sys_root);
    match program(ctx, manifest, FABRIC_MANAGER) {
        _ if switches.is_empty() => out.push(Decision::Report {
            name: FABRIC_MANAGER,
            result: DaemonResult::NotNeeded,
            message: "no NVSwitch on this guest's PCI bus".into(),
            problem: None,
        }),
        None => out.push(Decision::Report {
            name: FABRIC_MANAGER,
            result: DaemonResult::Absent,
            message: format!("the GPU layer has no {FABRIC_MANAGER}"),
            problem: Some(format!(
                "this guest has {} NVSwitch(es) ({}): a multi-GPU NVSwitch VM needs \
                 {FABRIC_MANAGER} to set up the fabric, and the GPU layer has none; add it to the \
                 driver libraries artifact (CUDA fails until the fabric is up)",
                switches.len(),
                switches.join(", ")
            )),
        }),
        Some(_) if driver_down.is_some() => {
            out.push(skipped(FABRIC_MANAGER, driver_down.unwrap_or_default()))
        }
        Some(program) => out.push(Decision::Start {
            name: FABRIC_MANAGER,
            program,
            args: Vec::new(),
        }),
    }
    out
}

/// Carry the decisions out: start what is to be started. Returns the report entries and the
/// problems.
pub fn run(ctx: &SetupContext, decisions: Vec<Decision>) -> (Vec<DaemonReport>, Vec<String>) {
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    for d in decisions {
        match d {
            Decision::Report {
                name,
                result,
                message,
                problem,
            } => {
                reports.push(DaemonReport {
                    name: name.into(),
                    result,
                    pid: None,
                    args: Vec::new(),
                    message: Some(message),
                });
                problems.extend(problem);
            }
            Decision::Start {
                name,
                program,
                args,
            } => {
                if name == PERSISTENCED {
                    // Its pid file and socket; an initramfs has no /var/run of its own.
                    let _ = std::fs::create_dir_all(ctx.layer_path("/var/run/nvidia-persistenced"));
                }
                match Command::new(&program).args(&args).spawn() {
                    Ok(child) => reports.push(DaemonReport {
                        name: name.into(),
                        result: DaemonResult::Started,
                        pid: Some(child.id()),
                        args,
                        message: None,
                    }),
                    Err(e) => {
                        let message = format!("cannot start {}: {e}", program.display());
                        problems.push(format!("{name}: {message}"));
                        reports.push(DaemonReport {
                            name: name.into(),
                            result: DaemonResult::Failed,
                            pid: None,
                            args,
                            message: Some(message),
                        });
                    }
                }
            }
        }
    }
    (reports, problems)
}

/// `kernel.modules_disabled=1`: no module can be loaded in this guest from now on (one-way until
/// reboot).
pub fn lock_modules(proc_root: &Path) -> Result<(), String> {
    let path = proc_root.join("sys/kernel/modules_disabled");
    std::fs::write(&path, "1\n").map_err(|e| {
        format!(
            "GPU_INIT_LOCK_MODULES=1 but {} cannot be written: {e}; module loading stays enabled",
            path.display()
        )
    })
}
