//! `/dev/nvidia*` character device nodes: majors from `/proc/devices`, one node per GPU.

use gpu_passthrough_manifest::report::{NodeAction, NodeReport};
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

/// One node to make: path relative to the device directory, major, minor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Relative path, e.g. `nvidia0` or `nvidia-caps/nvidia-cap1`.
    pub name: String,
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
}

/// The nodes the registered majors call for. Empty when the NVIDIA driver is not registered.
pub fn plan(majors: &HashMap<String, u64>, gpus: u32, proc_root: &Path) -> Vec<NodeSpec> {
    let node = |name: String, major, minor| NodeSpec { name, major, minor };
    let mut out = Vec::new();
    let nvidia = ["nvidia-frontend", "nvidia", "nvidiactl"]
        .iter()
        .find_map(|n| majors.get(*n).copied());
    if let Some(major) = nvidia {
        out.push(node("nvidiactl".into(), major, 255));
        for i in 0..gpus {
            out.push(node(format!("nvidia{i}"), major, u64::from(i)));
        }
        if majors.contains_key("nvidia-modeset") || major == NVIDIA_MAJOR {
            out.push(node("nvidia-modeset".into(), major, 254));
        }
    }
    if let Some(&uvm) = majors.get("nvidia-uvm") {
        out.push(node("nvidia-uvm".into(), uvm, 0));
        out.push(node("nvidia-uvm-tools".into(), uvm, 1));
    }
    if let Some(&caps) = majors.get("nvidia-caps") {
        // MIG capability nodes: their minors are published by the driver in procfs.
        for cap in ["mig/config", "mig/monitor"] {
            let file = proc_root.join("driver/nvidia/capabilities").join(cap);
            let minor = std::fs::read_to_string(file).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("DeviceFileMinor:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            if let Some(minor) = minor {
                out.push(node(format!("nvidia-caps/nvidia-cap{minor}"), caps, minor));
            }
        }
    }
    out
}

/// Make (or keep, or fix) one character node with the given mode and group.
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
    let action = match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_char_device() && meta.rdev() == rdev => NodeAction::Kept,
        Ok(meta) => {
            if meta.is_dir() {
                std::fs::remove_dir_all(&path).map_err(|e| io("remove", e))?;
            } else {
                std::fs::remove_file(&path).map_err(|e| io("remove", e))?;
            }
            NodeAction::Replaced
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NodeAction::Created,
        Err(e) => return Err(io("inspect", e)),
    };
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

    #[test]
    fn plans_one_node_per_gpu_plus_control_nodes() {
        let none = Path::new("/nonexistent");
        let names = |gpus| -> Vec<String> {
            plan(&char_majors(DEVICES), gpus, none)
                .into_iter()
                .map(|n| n.name)
                .collect()
        };
        assert_eq!(
            names(0),
            [
                "nvidiactl",
                "nvidia-modeset",
                "nvidia-uvm",
                "nvidia-uvm-tools"
            ]
        );
        let three = plan(&char_majors(DEVICES), 3, none);
        assert!(three.contains(&NodeSpec {
            name: "nvidia2".into(),
            major: 195,
            minor: 2
        }));
        assert!(three.contains(&NodeSpec {
            name: "nvidia-uvm-tools".into(),
            major: 236,
            minor: 1
        }));
        assert!(plan(&char_majors("Character devices:\n  1 mem\n"), 2, none).is_empty());
    }
}
