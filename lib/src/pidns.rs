//! Whether this process sees the host's processes: the question asked before any device is
//! moved or released.
//!
//! Every "who holds this device?" check reads `<proc>/*/fd`. In a container with its own PID
//! namespace (a pod without `hostPID: true`) that lists only the container's processes, so the
//! check finds nobody and passes: a GPU that `nvidia-persistenced`, a CUDA job or another VMM
//! on the host holds would be taken. The initial PID namespace has a fixed inode
//! (`PROC_PID_INIT_INO`), so `<proc>/self/ns/pid` reading anything but [`INITIAL_PID_NS`]
//! means blind. A `<proc>` mounted from another namespace has no `self` for us, or names
//! that namespace: blind too. The proc root is a parameter so tests fake the link.

use std::fs;
use std::path::{Path, PathBuf};

use crate::outcome::{Classify, Outcome};

/// The link `/proc/self/ns/pid` reads in the host's (initial) PID namespace.
pub const INITIAL_PID_NS: &str = "pid:[4026531836]";

/// The fix, as every blind refusal names it.
pub const FIX: &str = "run it on the host, or in a pod with `hostPID: true`";

/// This process cannot see the host's processes through the proc root it reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot see the host's processes: {link} reads `{seen}`, not the host's PID namespace `{INITIAL_PID_NS}`, so a process holding a device would go unseen; nothing was moved or released. Fix: {FIX}"
)]
pub struct Blind {
    /// The link read (`<proc>/self/ns/pid`).
    pub link: PathBuf,
    /// What it read, or why it could not be read.
    pub seen: String,
}

/// Blindness is a safety rule saying no: nothing was changed.
impl Classify for Blind {
    fn outcome(&self) -> Outcome {
        Outcome::Refused
    }
}

/// `Ok` when `proc_root` shows the host's processes to this process; otherwise what it shows.
pub fn sees_host(proc_root: &Path) -> Result<(), Blind> {
    let link = proc_root.join("self/ns/pid");
    let seen = match fs::read_link(&link) {
        Ok(target) if target.as_os_str() == INITIAL_PID_NS => return Ok(()),
        Ok(target) => target.to_string_lossy().into_owned(),
        Err(e) => format!("unreadable: {e}"),
    };
    Err(Blind { link, seen })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn proc_in(ns: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("self/ns")).unwrap();
        symlink(ns, dir.path().join("self/ns/pid")).unwrap();
        dir
    }

    #[test]
    fn the_initial_namespace_sees_and_any_other_is_blind() {
        assert_eq!(sees_host(proc_in(INITIAL_PID_NS).path()), Ok(()));
        let container = proc_in("pid:[4026532101]");
        let blind = sees_host(container.path()).unwrap_err();
        assert_eq!(blind.seen, "pid:[4026532101]");
        let text = blind.to_string();
        assert!(text.contains("hostPID: true"), "{text}");
        assert!(text.contains("pid:[4026532101]"), "{text}");
        assert_eq!(blind.outcome(), Outcome::Refused);
    }

    #[test]
    fn a_proc_without_the_link_is_blind() {
        let empty = tempfile::tempdir().unwrap();
        let blind = sees_host(empty.path()).unwrap_err();
        assert!(blind.seen.starts_with("unreadable"), "{}", blind.seen);
    }
}
