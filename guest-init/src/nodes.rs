//! `/dev/nvidia*` character device nodes: majors from `/proc/devices`, one node per GPU.

use gpu_passthrough_guest_contract::report::{NodeAction, NodeReport};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The NVIDIA driver's fixed character major.
pub const NVIDIA_MAJOR: u64 = 195;

/// Why a node could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// mknod, chmod, chown or unlink failed.
    #[error("cannot {action} {path}: {source}: is {dir} a writable devtmpfs or tmpfs?", dir = dir.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The node path.
        path: String,
        /// The directory it is in.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Character device majors by name from the text of `/proc/devices`.
pub fn char_majors(proc_devices: &str) -> HashMap<String, u64> {
    let mut majors = HashMap::new();
    let mut in_char = false;
    for line in proc_devices.lines() {
        let line = line.trim();
        if line.starts_with("Character devices") {
            in_char = true;
            continue;
        }
        if line.starts_with("Block devices") {
            in_char = false;
            continue;
        }
        if !in_char {
            continue;
        }
        if let Some((num, name)) = line.split_once(char::is_whitespace)
            && let Ok(major) = num.trim().parse::<u64>()
        {
            majors.insert(name.trim().to_string(), major);
        }
    }
    majors
}

/// Number of GPUs the driver registered: entries of `<proc>/driver/nvidia/gpus/`.
pub fn gpu_count(proc_root: &Path) -> u32 {
    std::fs::read_dir(proc_root.join("driver/nvidia/gpus"))
        .map(|dir| dir.filter_map(Result::ok).count() as u32)
        .unwrap_or(0)
}

/// One node to make: path relative to the device directory, major, minor, and the mode and group
/// the driver itself asks for (MIG capabilities), if any.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSpec {
    /// Relative path, e.g. `nvidia0` or `nvidia-caps/nvidia-cap1`.
    pub name: String,
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// The driver's own mode for this node; `None`: the manifest's node mode.
    pub mode: Option<u32>,
    /// The driver's own group for this node; `None`: the manifest's node group.
    pub gid: Option<u32>,
}

impl NodeSpec {
    fn generic(name: String, major: u64, minor: u64) -> Self {
        Self {
            name,
            major,
            minor,
            mode: None,
            gid: None,
        }
    }
}

/// The nodes the driver's procfs calls for, and why any GPU or capability got none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlan {
    /// Nodes to make, control nodes first, GPUs by minor, capabilities by minor.
    pub nodes: Vec<NodeSpec>,
    /// GPUs the driver registered (entries of `/proc/driver/nvidia/gpus/`).
    pub gpus: u32,
    /// One sentence per GPU or capability whose node could not be planned.
    pub problems: Vec<String>,
    /// `(bus address, minor)` of every GPU with a node, in bus order: index `i` of
    /// `NVIDIA_VISIBLE_DEVICES` and of the CDI devices is the `i`-th.
    pub gpus_by_bus: Vec<(String, u64)>,
}

/// Deepest level of `/proc/driver/nvidia/capabilities` that holds capability files
/// (`gpuN/mig/giX/ciY/access`); the walk stops there.
const CAPS_DEPTH: usize = 5;

/// Plan every node from `<proc_root>/devices` and the driver's procfs: `/dev/nvidiaN` minors from
/// each GPU's `information` ("Device Minor:"), capability minors and modes from
/// `driver/nvidia/capabilities/**` ("DeviceFileMinor:", "DeviceFileMode:").
pub fn plan_from_proc(proc_root: &Path) -> NodePlan {
    let majors = std::fs::read_to_string(proc_root.join("devices"))
        .map(|t| char_majors(&t))
        .unwrap_or_default();
    let mut plan = NodePlan {
        gpus: gpu_count(proc_root),
        ..NodePlan::default()
    };
    let nvidia = ["nvidia-frontend", "nvidia", "nvidiactl"]
        .iter()
        .find_map(|n| majors.get(*n).copied());
    if let Some(major) = nvidia {
        plan.nodes
            .push(NodeSpec::generic("nvidiactl".into(), major, 255));
        let (minors, problems) = gpu_minors(proc_root);
        plan.problems.extend(problems);
        plan.gpus_by_bus = minors.clone();
        plan.gpus_by_bus.sort();
        for (_, minor) in minors {
            plan.nodes
                .push(NodeSpec::generic(format!("nvidia{minor}"), major, minor));
        }
        if majors.contains_key("nvidia-modeset") || major == NVIDIA_MAJOR {
            plan.nodes
                .push(NodeSpec::generic("nvidia-modeset".into(), major, 254));
        }
    }
    if let Some(&uvm) = majors.get("nvidia-uvm") {
        plan.nodes
            .push(NodeSpec::generic("nvidia-uvm".into(), uvm, 0));
        plan.nodes
            .push(NodeSpec::generic("nvidia-uvm-tools".into(), uvm, 1));
    }
    let caps_dir = proc_root.join("driver/nvidia/capabilities");
    let mut caps = Vec::new();
    walk_caps(&caps_dir, &caps_dir, 0, &mut caps, &mut plan.problems);
    caps.sort_by_key(|(_, minor, _)| *minor);
    match majors.get("nvidia-caps") {
        Some(&major) => {
            let mut seen = std::collections::BTreeMap::new();
            for (cap, minor, mode) in caps {
                if let Some(first) = seen.insert(minor, cap.clone()) {
                    plan.problems.push(format!(
                        "capabilities {first} and {cap} both claim minor {minor}: \
                         nvidia-caps/nvidia-cap{minor} made once, for {first}"
                    ));
                    seen.insert(minor, first);
                    continue;
                }
                plan.nodes.push(NodeSpec {
                    name: format!("nvidia-caps/nvidia-cap{minor}"),
                    major,
                    minor,
                    mode: Some(mode),
                    gid: Some(0),
                });
            }
        }
        None if !caps.is_empty() => plan.problems.push(format!(
            "{} lists {} capabilities but {} has no nvidia-caps major: no /dev/nvidia-caps nodes made",
            caps_dir.display(),
            caps.len(),
            proc_root.join("devices").display()
        )),
        None => {}
    }
    plan
}

/// `(bus address, minor)` of every GPU, sorted by minor, and a sentence for each GPU whose minor
/// is unreadable or taken.
fn gpu_minors(proc_root: &Path) -> (Vec<(String, u64)>, Vec<String>) {
    let dir = proc_root.join("driver/nvidia/gpus");
    let mut entries: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let mut minors: Vec<(String, u64)> = Vec::new();
    let mut problems = Vec::new();
    for bus in entries {
        let info = dir.join(&bus).join("information");
        let minor = std::fs::read_to_string(&info)
            .ok()
            .and_then(|t| field(&t, "Device Minor:"));
        match minor {
            // 254 and 255 are the modeset and control nodes.
            Some(m) if m < 254 => {
                if let Some((other, _)) = minors.iter().find(|(_, o)| *o == m) {
                    problems.push(format!(
                        "GPUs {other} and {bus} both report device minor {m} in their \
                         information files: /dev/nvidia{m} made once, for {other}"
                    ));
                } else {
                    minors.push((bus, m));
                }
            }
            Some(m) => problems.push(format!(
                "GPU {bus} reports device minor {m} in {}, which is the control or modeset \
                 node's: no /dev/nvidiaN made for it",
                info.display()
            )),
            None => problems.push(format!(
                "cannot read a \"Device Minor:\" line from {}: no /dev/nvidiaN made for GPU {bus} \
                 (a guessed minor could open another GPU)",
                info.display()
            )),
        }
    }
    minors.sort_by_key(|(_, m)| *m);
    (minors, problems)
}

/// The number after `key` on the first line that starts with it.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The mode the driver gives a capability whose file names none: read-only for the monitor and
/// the instance access capabilities, owner-only for everything else (config, fabric management).
fn default_cap_mode(cap: &str) -> u32 {
    if cap.ends_with("monitor") || cap.ends_with("access") {
        0o444
    } else {
        0o400
    }
}

/// Collect `(capability, minor, mode)` from every file under the capabilities directory.
fn walk_caps(
    base: &Path,
    dir: &Path,
    depth: usize,
    out: &mut Vec<(String, u64, u32)>,
    problems: &mut Vec<String>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if depth < CAPS_DEPTH {
                walk_caps(base, &path, depth + 1, out, problems);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let cap = path
            .strip_prefix(base)
            .unwrap_or(&path)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match field(&text, "DeviceFileMinor:") {
            Some(minor) => {
                // The driver writes the mode in decimal (256 = 0400).
                let mode = field(&text, "DeviceFileMode:")
                    .and_then(|m| u32::try_from(m & 0o777).ok())
                    .unwrap_or_else(|| default_cap_mode(&cap));
                out.push((cap, minor, mode));
            }
            None => problems.push(format!(
                "cannot read a \"DeviceFileMinor:\" line from {}: no /dev/nvidia-caps node made \
                 for capability {cap}",
                path.display()
            )),
        }
    }
}

/// What [`ensure`] would do with a node, judged from what is at its path now.
pub fn pending_action(dev_dir: &Path, spec: &NodeSpec) -> std::io::Result<NodeAction> {
    match std::fs::symlink_metadata(dev_dir.join(&spec.name)) {
        Ok(meta)
            if meta.file_type().is_char_device()
                && meta.rdev() == makedev(spec.major, spec.minor) =>
        {
            Ok(NodeAction::Kept)
        }
        Ok(_) => Ok(NodeAction::Replaced),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeAction::Created),
        Err(e) => Err(e),
    }
}

/// Make (or keep, or fix) one character node with the given mode and group (unless the node
/// carries the driver's own).
pub fn ensure(
    dev_dir: &Path,
    spec: &NodeSpec,
    mode: u32,
    gid: u32,
) -> Result<NodeReport, NodeError> {
    let path = dev_dir.join(&spec.name);
    let shown = path.display().to_string();
    let io = |action, source| NodeError::Io {
        action,
        path: shown.clone(),
        dir: dev_dir.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create the directory of", e))?;
    }
    let rdev = makedev(spec.major, spec.minor);
    let action = pending_action(dev_dir, spec).map_err(|e| io("inspect", e))?;
    if action == NodeAction::Replaced {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io("inspect", e))?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| io("remove", e))?;
        } else {
            std::fs::remove_file(&path).map_err(|e| io("remove", e))?;
        }
    }
    // The driver's own mode and group (capabilities) win over the manifest's.
    let mode = spec.mode.unwrap_or(mode);
    let gid = spec.gid.unwrap_or(gid);
    if action != NodeAction::Kept {
        mknod(&path, SFlag::S_IFCHR, Mode::from_bits_truncate(mode), rdev)
            .map_err(|e| io("mknod", e.into()))?;
    }
    // The umask trims mknod's mode, and a kept node may have the wrong one: always set both.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| io("chmod", e))?;
    std::os::unix::fs::lchown(&path, None, Some(gid)).map_err(|e| io("chown", e))?;
    Ok(NodeReport {
        path: shown,
        major: spec.major,
        minor: spec.minor,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICES: &str = "Character devices:\n  1 mem\n195 nvidia-frontend\n236 nvidia-uvm\n237 nvidia-caps\n\nBlock devices:\n  8 sd\n254 virtblk\n";

    #[test]
    fn reads_only_character_majors() {
        let majors = char_majors(DEVICES);
        assert_eq!(majors.get("nvidia-frontend"), Some(&195));
        assert_eq!(majors.get("nvidia-uvm"), Some(&236));
        assert_eq!(majors.get("sd"), None);
        assert_eq!(majors.get("virtblk"), None);
    }

    /// A fake procfs: `/proc/devices` and one `information` file per `(bus, minor)`.
    fn fake_proc(devices: &str, gpus: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("devices"), devices).unwrap();
        for (bus, info) in gpus {
            let gpu = dir.path().join("driver/nvidia/gpus").join(bus);
            std::fs::create_dir_all(&gpu).unwrap();
            std::fs::write(gpu.join("information"), info).unwrap();
        }
        dir
    }

    fn info(minor: u32) -> String {
        format!(
            "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\nBus Type: \t PCIe\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n"
        )
    }

    fn names(plan: &NodePlan) -> Vec<&str> {
        plan.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn control_nodes_without_gpus_and_nothing_without_the_driver() {
        let proc = fake_proc(DEVICES, &[]);
        let plan = plan_from_proc(proc.path());
        assert_eq!(
            names(&plan),
            [
                "nvidiactl",
                "nvidia-modeset",
                "nvidia-uvm",
                "nvidia-uvm-tools"
            ]
        );
        assert_eq!(plan.gpus, 0);
        let uvm_tools = plan.nodes.last().unwrap();
        assert_eq!((uvm_tools.major, uvm_tools.minor), (236, 1));
        let bare = fake_proc(
            "Character devices:\n  1 mem\n",
            &[("0000:00:05.0", &info(0))],
        );
        assert!(plan_from_proc(bare.path()).nodes.is_empty());
    }

    #[test]
    fn gpu_minors_come_from_the_information_files_not_the_count() {
        // Two GPUs whose minors are 1 and 3 (minor 0 went to a GPU excluded or hidden from us),
        // listed in an order that differs from their minors.
        let i3 = info(3);
        let i1 = info(1);
        let proc = fake_proc(DEVICES, &[("0000:00:05.0", &i3), ("0000:00:06.0", &i1)]);
        let plan = plan_from_proc(proc.path());
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert_eq!(plan.gpus, 2);
        let gpus: Vec<(&str, u64, u64)> = plan
            .nodes
            .iter()
            .filter(|n| n.name.starts_with("nvidia") && n.name[6..].parse::<u32>().is_ok())
            .map(|n| (n.name.as_str(), n.major, n.minor))
            .collect();
        assert_eq!(gpus, [("nvidia1", 195, 1), ("nvidia3", 195, 3)]);
        assert!(!names(&plan).contains(&"nvidia0"));
        assert!(plan.nodes.iter().all(|n| n.mode.is_none()));
    }

    #[test]
    fn an_unreadable_or_clashing_minor_makes_no_node_and_says_why() {
        let i0 = info(0);
        let proc = fake_proc(
            DEVICES,
            &[
                ("0000:00:05.0", &i0),
                ("0000:00:06.0", "Model: NVIDIA H100\n"),
                ("0000:00:07.0", &i0),
                ("0000:00:08.0", &info(255)),
            ],
        );
        let plan = plan_from_proc(proc.path());
        let gpu_nodes: Vec<&str> = names(&plan)
            .into_iter()
            .filter(|n| n.starts_with("nvidia") && n[6..].parse::<u32>().is_ok())
            .collect();
        assert_eq!(gpu_nodes, ["nvidia0"]);
        assert_eq!(plan.problems.len(), 3, "{:?}", plan.problems);
        assert!(plan.problems[0].contains("0000:00:06.0/information"));
        assert!(plan.problems[0].contains("Device Minor"));
        assert!(plan.problems[1].contains("0000:00:05.0 and 0000:00:07.0"));
        assert!(plan.problems[2].contains("0000:00:08.0"));
    }

    #[test]
    fn mig_capabilities_get_the_drivers_minors_and_modes() {
        let proc = fake_proc(DEVICES, &[("0000:00:05.0", &info(0))]);
        let caps = proc.path().join("driver/nvidia/capabilities");
        let write = |rel: &str, text: &str| {
            let p = caps.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write(
            "mig/config",
            "DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n",
        );
        write(
            "mig/monitor",
            "DeviceFileMinor: 2\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
        );
        // An instance whose file gives no mode: read-only, as the driver makes access caps.
        write("gpu0/mig/gi1/access", "DeviceFileMinor: 12\n");
        write(
            "gpu0/mig/gi1/ci0/access",
            "DeviceFileMinor: 13\nDeviceFileMode: 292\n",
        );
        let plan = plan_from_proc(proc.path());
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        type Cap<'a> = (&'a str, u64, u64, Option<u32>, Option<u32>);
        let caps: Vec<Cap> = plan
            .nodes
            .iter()
            .filter(|n| n.name.starts_with("nvidia-caps/"))
            .map(|n| (n.name.as_str(), n.major, n.minor, n.mode, n.gid))
            .collect();
        assert_eq!(
            caps,
            [
                ("nvidia-caps/nvidia-cap1", 237, 1, Some(0o400), Some(0)),
                ("nvidia-caps/nvidia-cap2", 237, 2, Some(0o444), Some(0)),
                ("nvidia-caps/nvidia-cap12", 237, 12, Some(0o444), Some(0)),
                ("nvidia-caps/nvidia-cap13", 237, 13, Some(0o444), Some(0)),
            ]
        );
        // Without the nvidia-caps major the capabilities are named as a problem, not guessed.
        std::fs::write(
            proc.path().join("devices"),
            "Character devices:\n195 nvidia-frontend\n",
        )
        .unwrap();
        let plan = plan_from_proc(proc.path());
        assert!(!names(&plan).iter().any(|n| n.starts_with("nvidia-caps")));
        assert!(
            plan.problems[0].contains("no nvidia-caps major"),
            "{:?}",
            plan.problems
        );
    }

    #[test]
    fn the_pending_action_matches_what_is_at_the_path() {
        let dev = tempfile::tempdir().unwrap();
        let spec = NodeSpec::generic("nvidia0".into(), 195, 0);
        assert_eq!(
            pending_action(dev.path(), &spec).unwrap(),
            NodeAction::Created
        );
        std::fs::write(dev.path().join("nvidia0"), b"x").unwrap();
        assert_eq!(
            pending_action(dev.path(), &spec).unwrap(),
            NodeAction::Replaced
        );
    }
}
