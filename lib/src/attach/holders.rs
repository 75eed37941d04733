//! Which processes hold a device open: the check before anything is taken from a running VM.
//!
//! A VMM that has a device passed through holds its VFIO node open (`/dev/vfio/<group>`, or
//! `/dev/vfio/devices/vfioX` on iommufd hosts); a CUDA process holds `/dev/nvidia*`. Releasing or
//! unbinding such a device hot-unplugs it from the VM or blocks in the kernel, so callers look
//! here first and refuse, naming the processes. The proc root is a parameter so tests can fake it
//! (a directory of `<pid>/fd/<n>` symlinks and `<pid>/comm` files).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A process holding one of the paths asked about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Its process ID.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`), or `?` when unreadable.
    pub command: String,
    /// The path it holds.
    pub path: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}) holds {}",
            self.pid,
            self.command,
            self.path.display()
        )
    }
}

/// Every process under `proc_root` with an open file descriptor on one of `paths`, in pid order.
///
/// Processes that vanish or whose descriptors cannot be read while scanning are skipped: the
/// caller must treat an unreadable `proc_root` itself as "cannot tell" (see
/// [`scan_readable`]).
pub fn holders(proc_root: &Path, paths: &[PathBuf]) -> Vec<Holder> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(held) = paths.iter().find(|p| **p == target) {
                let command = fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_else(|_| "?".into());
                found.push(Holder {
                    pid,
                    command,
                    path: held.clone(),
                });
                break;
            }
        }
    }
    found.sort_by_key(|h| h.pid);
    found
}

/// Whether `proc_root` can be scanned at all (it exists and lists at least this process's
/// kind of entries). A scan of an unreadable proc says nothing, so callers fail closed.
pub fn scan_readable(proc_root: &Path) -> bool {
    fs::read_dir(proc_root).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn process(proc_root: &Path, pid: u32, comm: &str, fds: &[&str]) {
        let dir = proc_root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        for (i, target) in fds.iter().enumerate() {
            symlink(target, dir.join("fd").join(i.to_string())).unwrap();
        }
    }

    #[test]
    fn finds_the_processes_holding_a_vfio_node_and_names_them() {
        let proc = tempfile::tempdir().unwrap();
        process(
            proc.path(),
            4242,
            "qemu-system-x86",
            &["/dev/null", "/dev/vfio/12"],
        );
        process(
            proc.path(),
            17,
            "cloud-hypervisor",
            &["/dev/vfio/devices/vfio0"],
        );
        process(proc.path(), 99, "bash", &["/dev/vfio/13", "/dev/pts/0"]);
        fs::create_dir_all(proc.path().join("self")).unwrap();
        let wanted = [
            PathBuf::from("/dev/vfio/12"),
            PathBuf::from("/dev/vfio/devices/vfio0"),
        ];
        let found = holders(proc.path(), &wanted);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].pid, 17);
        assert_eq!(found[0].command, "cloud-hypervisor");
        assert_eq!(
            found[1].to_string(),
            "pid 4242 (qemu-system-x86) holds /dev/vfio/12"
        );
    }

    #[test]
    fn nobody_holds_what_nobody_opened() {
        let proc = tempfile::tempdir().unwrap();
        process(proc.path(), 5, "sleep", &["/dev/null"]);
        assert!(holders(proc.path(), &[PathBuf::from("/dev/vfio/3")]).is_empty());
        assert!(scan_readable(proc.path()));
        assert!(!scan_readable(&proc.path().join("missing")));
    }

    #[test]
    fn finds_this_process_on_the_real_proc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held");
        let _file = fs::File::create(&path).unwrap();
        let found = holders(Path::new("/proc"), std::slice::from_ref(&path));
        assert!(
            found.iter().any(|h| h.pid == std::process::id()),
            "{found:?}"
        );
    }
}
