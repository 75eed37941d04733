//! Owner liveness for `pid:N` owners, checked against the identity recorded at attach.
//!
//! A bare `/proc/N` test is wrong twice: a PID is reused after the process dies, and a
//! reconcile run in another PID namespace (a container) sees no `/proc/N` for a VM that is
//! running. So attach records the process's start time (field 22 of `/proc/N/stat`) and its
//! PID namespace (the `/proc/N/ns/pid` link), and "gone" needs both to be checkable: same
//! namespace as ours and `/proc/N` absent or a zombie. Anything else that is not plainly the
//! same live process is [`Liveness::Unknown`], which never releases.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Liveness, Owner, OwnerLiveness};

/// Which process a `pid:N` owner was when it attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Start time in clock ticks since boot (field 22 of `/proc/N/stat`).
    pub start_time: u64,
    /// The PID namespace, as the `/proc/N/ns/pid` link reads (`pid:[4026531836]`).
    pub pid_ns: String,
}

/// What `/proc/N/stat` says: the state letter and the start time.
fn stat(proc_root: &Path, pid: &str) -> std::io::Result<Option<(String, u64)>> {
    let text = fs::read_to_string(proc_root.join(pid).join("stat"))?;
    // The command name may hold spaces and `)`: fields count from the last `)`.
    let Some((_, rest)) = text.rsplit_once(')') else {
        return Ok(None);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    let state = fields.first().map(|s| (*s).to_owned());
    let start = fields.get(19).and_then(|s| s.parse().ok());
    Ok(state.zip(start))
}

fn pid_ns(proc_root: &Path, pid: &str) -> Option<String> {
    let link = fs::read_link(proc_root.join(pid).join("ns/pid")).ok()?;
    Some(link.to_str()?.to_owned())
}

/// The identity of process `pid` as `proc_root` shows it, if it can be read.
pub fn process_identity(proc_root: &Path, pid: u32) -> Option<ProcessIdentity> {
    let p = pid.to_string();
    let (_, start_time) = stat(proc_root, &p).ok()??;
    Some(ProcessIdentity {
        start_time,
        pid_ns: pid_ns(proc_root, &p)?,
    })
}

/// Liveness for `pid:N` owners, judged against the [`ProcessIdentity`] recorded at attach.
/// Owners listed in `gone` are gone; any other owner is [`Liveness::Unknown`].
#[derive(Debug, Clone)]
pub struct PidLiveness {
    /// The proc filesystem (`/proc`).
    pub proc_root: PathBuf,
    /// Owners the caller declares gone.
    pub gone: Vec<Owner>,
}

impl Default for PidLiveness {
    fn default() -> Self {
        PidLiveness {
            proc_root: PathBuf::from("/proc"),
            gone: Vec::new(),
        }
    }
}

impl PidLiveness {
    fn judge(&self, pid: u32, recorded: Option<&ProcessIdentity>) -> Liveness {
        let p = pid.to_string();
        let now = match stat(&self.proc_root, &p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => return Liveness::Unknown,
        };
        let Some(recorded) = recorded else {
            // An old record: only "plainly alive" can be said.
            return match now {
                Some((state, _)) if state != "Z" && state != "X" => Liveness::Alive,
                _ => Liveness::Unknown,
            };
        };
        // Gone-ness is only visible from the owner's own PID namespace.
        let ours = pid_ns(&self.proc_root, "self");
        if ours.as_deref() != Some(recorded.pid_ns.as_str()) {
            return Liveness::Unknown;
        }
        match now {
            None if !self.proc_root.join(&p).exists() => Liveness::Gone,
            None => Liveness::Unknown,
            Some((state, start)) if start == recorded.start_time => {
                if state == "Z" || state == "X" {
                    Liveness::Gone
                } else {
                    Liveness::Alive
                }
            }
            // The PID was reused, or the record is wrong: cannot tell.
            Some(_) => Liveness::Unknown,
        }
    }
}

impl OwnerLiveness for PidLiveness {
    fn is_alive(&self, owner: &Owner) -> Liveness {
        self.is_alive_as(owner, None)
    }

    fn is_alive_as(&self, owner: &Owner, recorded: Option<&ProcessIdentity>) -> Liveness {
        if self.gone.contains(owner) {
            return Liveness::Gone;
        }
        match owner.pid() {
            Some(pid) => self.judge(pid, recorded),
            None => Liveness::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn proc_entry(root: &Path, pid: &str, state: &str, start: u64, ns: &str) {
        let dir = root.join(pid);
        fs::create_dir_all(dir.join("ns")).unwrap();
        let mut fields = vec![state.to_owned()];
        fields.extend((4..22).map(|i| i.to_string()));
        fields.push(start.to_string());
        fields.push("0".into());
        fs::write(
            dir.join("stat"),
            format!("{pid} (qemu) x) {}\n", fields.join(" ")),
        )
        .unwrap();
        symlink(ns, dir.join("ns/pid")).unwrap();
    }

    fn owner(s: &str) -> Owner {
        Owner::new(s).unwrap()
    }

    #[test]
    fn identity_reads_field_22_and_the_namespace() {
        let proc = tempfile::tempdir().unwrap();
        proc_entry(proc.path(), "77", "S", 123456, "pid:[1]");
        let id = process_identity(proc.path(), 77).unwrap();
        assert_eq!(id.start_time, 123456);
        assert_eq!(id.pid_ns, "pid:[1]");
        let real = process_identity(Path::new("/proc"), std::process::id()).unwrap();
        assert!(real.pid_ns.starts_with("pid:["), "{real:?}");
    }

    #[test]
    fn a_missing_pid_in_another_namespace_is_unknown_not_gone() {
        let proc = tempfile::tempdir().unwrap();
        proc_entry(proc.path(), "self", "R", 1, "pid:[2]");
        let l = PidLiveness {
            proc_root: proc.path().to_owned(),
            gone: Vec::new(),
        };
        let recorded = ProcessIdentity {
            start_time: 500,
            pid_ns: "pid:[1]".into(),
        };
        let o = owner("pid:4242");
        assert_eq!(l.is_alive_as(&o, Some(&recorded)), Liveness::Unknown);
        // Same namespace: gone.
        let same = ProcessIdentity {
            pid_ns: "pid:[2]".into(),
            ..recorded.clone()
        };
        assert_eq!(l.is_alive_as(&o, Some(&same)), Liveness::Gone);
        // An old record without identity never releases on a missing /proc/N.
        assert_eq!(l.is_alive_as(&o, None), Liveness::Unknown);
    }

    #[test]
    fn a_reused_pid_is_unknown_and_the_same_process_alive() {
        let proc = tempfile::tempdir().unwrap();
        proc_entry(proc.path(), "self", "R", 1, "pid:[2]");
        proc_entry(proc.path(), "4242", "S", 900, "pid:[2]");
        let l = PidLiveness {
            proc_root: proc.path().to_owned(),
            gone: Vec::new(),
        };
        let o = owner("pid:4242");
        let at_attach = |start| ProcessIdentity {
            start_time: start,
            pid_ns: "pid:[2]".into(),
        };
        assert_eq!(l.is_alive_as(&o, Some(&at_attach(900))), Liveness::Alive);
        assert_eq!(l.is_alive_as(&o, Some(&at_attach(500))), Liveness::Unknown);
        assert_eq!(l.is_alive_as(&o, None), Liveness::Alive);
        proc_entry(proc.path(), "99", "Z", 900, "pid:[2]");
        assert_eq!(
            l.is_alive_as(&owner("pid:99"), Some(&at_attach(900))),
            Liveness::Gone
        );
        assert_eq!(l.is_alive_as(&owner("pid:99"), None), Liveness::Unknown);
    }
}
