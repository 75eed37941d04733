//! Which processes hold a device node open: a scan of `<proc>/*/fd`.
//!
//! Used before releasing a vGPU (and reusable as the live-VMM guard for detach, rollback and
//! reconcile): a VMM holding `/dev/vfio/<group>` or `/dev/vfio/devices/vfioX` must never have the
//! device pulled from under it. The proc root is a parameter so tests can use a fake one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A process holding one of the scanned paths open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Its process ID.
    pub pid: u32,
    /// Its command name (`<proc>/PID/comm`), empty when unreadable.
    pub comm: String,
    /// The path it holds.
    pub path: PathBuf,
}

/// Every process under `proc_root` with an open descriptor on one of `paths`, by pid.
///
/// Processes that vanish or whose `fd` directory cannot be read (another user's, without root)
/// are skipped; run as root for a complete answer.
pub fn holders(proc_root: &Path, paths: &[PathBuf]) -> Vec<Holder> {
    // Compare canonical paths: a link target is absolute, a caller's path may not be.
    let wanted: Vec<PathBuf> = paths
        .iter()
        .map(|p| fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(path) = wanted.iter().find(|w| **w == target) {
                let comm = fs::read_to_string(e.path().join("comm"))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default();
                out.push(Holder {
                    pid,
                    comm,
                    path: path.clone(),
                });
                break;
            }
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn finds_the_process_holding_a_node_and_ignores_others() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("vfio0");
        let other = dir.path().join("other");
        fs::write(&node, "").unwrap();
        fs::write(&other, "").unwrap();
        let proc_root = dir.path().join("proc");
        for (pid, comm, target) in [(41, "qemu-system-x86", &node), (7, "bash", &other)] {
            let fd = proc_root.join(pid.to_string()).join("fd");
            fs::create_dir_all(&fd).unwrap();
            symlink(target, fd.join("3")).unwrap();
            fs::write(proc_root.join(pid.to_string()).join("comm"), format!("{comm}\n")).unwrap();
        }
        fs::create_dir_all(proc_root.join("self-not-a-pid")).unwrap();
        let found = holders(&proc_root, std::slice::from_ref(&node));
        assert_eq!(
            found,
            [Holder {
                pid: 41,
                comm: "qemu-system-x86".into(),
                path: node.clone()
            }]
        );
        assert!(holders(&proc_root, &[dir.path().join("absent")]).is_empty());
    }

    #[test]
    fn a_real_child_process_holding_a_file_is_found_in_proc() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("vfio7");
        fs::write(&node, "").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(fs::File::open(&node).unwrap())
            .spawn()
            .unwrap();
        let found = holders(Path::new("/proc"), std::slice::from_ref(&node));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            found.iter().any(|h| h.pid == child.id() && h.comm == "sleep"),
            "{found:?}"
        );
    }
}
