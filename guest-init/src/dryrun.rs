//! `gpu-init nodes --dry-run`: the device nodes the setup would make, computed from a procfs and
//! a device directory without creating, changing or loading anything. A host or guest that already
//! runs the NVIDIA driver compares it with its real `/dev/nvidia*` (see `e2e/real-gpu`).

use crate::nodes::{self, NodeSpec};
use gpu_passthrough_guest_contract::report::NodeAction;
use gpu_passthrough_guest_contract::{MANIFEST_PATH, Manifest};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Usage of the `nodes` command.
pub const USAGE: &str =
    "usage: gpu-init nodes --dry-run [--proc-root DIR] [--dev-dir DIR] [--manifest PATH] [--json]";

/// Parsed arguments of `gpu-init nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunArgs {
    /// The procfs to read (`/proc`).
    pub proc_root: PathBuf,
    /// The device directory to compare with (`/dev`).
    pub dev_dir: PathBuf,
    /// The manifest giving the generic node mode and group; `None`: leave them unset.
    pub manifest: Option<PathBuf>,
    /// Print JSON instead of one line per node.
    pub json: bool,
}

impl DryRunArgs {
    /// Parse the words after `nodes`. `--dry-run` is required: the nodes are made by `setup`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut out = DryRunArgs {
            proc_root: PathBuf::from("/proc"),
            dev_dir: PathBuf::from("/dev"),
            manifest: None,
            json: false,
        };
        let mut dry_run = false;
        let mut explicit_manifest = false;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{flag} needs a path"))
            };
            match arg.as_str() {
                "--dry-run" => dry_run = true,
                "--json" => out.json = true,
                "--proc-root" => out.proc_root = value("--proc-root")?,
                "--dev-dir" | "--dev-root" => out.dev_dir = value("--dev-dir")?,
                "--manifest" => {
                    out.manifest = Some(value("--manifest")?);
                    explicit_manifest = true;
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if !dry_run {
            return Err(
                "nodes only computes (--dry-run); `gpu-init setup` makes the nodes".to_string(),
            );
        }
        if !explicit_manifest && Path::new(MANIFEST_PATH).is_file() {
            out.manifest = Some(PathBuf::from(MANIFEST_PATH));
        }
        Ok(out)
    }
}

/// What the setup would do with one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Would {
    /// Nothing is at the path: it would be made.
    Create,
    /// A character device with this major and minor is there: kept (mode and group set).
    Keep,
    /// Something else is at the path: it would be replaced.
    Replace,
    /// The path could not be inspected (see `problems`).
    Unknown,
}

/// One planned node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNode {
    /// Path relative to the device directory, e.g. `nvidia1`, `nvidia-caps/nvidia-cap2`.
    pub name: String,
    /// Character major.
    pub major: u64,
    /// Character minor.
    pub minor: u64,
    /// Mode it would get: the driver's own (capabilities) or the manifest's; `None` without a
    /// manifest.
    pub mode: Option<u32>,
    /// Group it would get, likewise.
    pub gid: Option<u32>,
    /// True when mode and group are the driver's own (MIG and fabric capabilities).
    pub driver_mode: bool,
    /// What the setup would do, judged against the device directory.
    pub would: Would,
}

/// The whole dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRun {
    /// The procfs read.
    pub proc_root: String,
    /// The device directory compared with.
    pub dev_dir: String,
    /// The manifest that gave the generic mode and group, if any.
    pub manifest: Option<String>,
    /// GPUs the driver registered.
    pub gpus: u32,
    /// The nodes, control nodes first, GPUs and capabilities by minor.
    pub nodes: Vec<PlannedNode>,
    /// GPUs or capabilities that get no node, and paths that could not be inspected.
    pub problems: Vec<String>,
}

/// Compute the dry run. Reads `proc_root`, `dev_dir` and the manifest; writes nothing.
pub fn run(args: &DryRunArgs) -> Result<DryRun, String> {
    let generic = match &args.manifest {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let m = Manifest::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(m.device_nodes)
        }
        None => None,
    };
    let plan = nodes::plan_from_proc(&args.proc_root);
    let mut problems = plan.problems;
    let planned = plan
        .nodes
        .iter()
        .map(|spec| planned(spec, generic, &args.dev_dir, &mut problems))
        .collect();
    Ok(DryRun {
        proc_root: args.proc_root.display().to_string(),
        dev_dir: args.dev_dir.display().to_string(),
        manifest: args.manifest.as_ref().map(|m| m.display().to_string()),
        gpus: plan.gpus,
        nodes: planned,
        problems,
    })
}

fn planned(
    spec: &NodeSpec,
    generic: Option<gpu_passthrough_guest_contract::DeviceNodes>,
    dev_dir: &Path,
    problems: &mut Vec<String>,
) -> PlannedNode {
    let would = match nodes::pending_action(dev_dir, spec) {
        Ok(NodeAction::Created) => Would::Create,
        Ok(NodeAction::Kept) => Would::Keep,
        Ok(NodeAction::Replaced) => Would::Replace,
        Err(e) => {
            problems.push(format!(
                "cannot inspect {}: {e}",
                dev_dir.join(&spec.name).display()
            ));
            Would::Unknown
        }
    };
    PlannedNode {
        name: spec.name.clone(),
        major: spec.major,
        minor: spec.minor,
        mode: spec.mode.or(generic.map(|g| g.mode)),
        gid: spec.gid.or(generic.map(|g| g.gid)),
        driver_mode: spec.mode.is_some(),
        would,
    }
}

/// One line per node and per problem, for people.
pub fn human(dry: &DryRun) -> String {
    let mut out = String::new();
    for n in &dry.nodes {
        let mode = n.mode.map_or("-".to_string(), |m| format!("{m:04o}"));
        out.push_str(&format!(
            "{:<8} {}/{}  c {}:{}  mode {mode}{}\n",
            format!("{:?}", n.would).to_lowercase(),
            dry.dev_dir.trim_end_matches('/'),
            n.name,
            n.major,
            n.minor,
            if n.driver_mode { " (driver's)" } else { "" }
        ));
    }
    for p in &dry.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}
