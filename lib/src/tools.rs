//! The host programs the library runs (`mkfs.erofs`, `bwrap`, `openssl`), found at a fixed,
//! checked path instead of through `PATH`.
//!
//! The builder runs as root, often from a service whose environment someone else wrote: a
//! `PATH` with a user-writable directory first would let that user's `mkfs.erofs` write the
//! driver disk every VM loads its modules from. So a tool is looked for only in the system's
//! directories ([`SYSTEM_DIRS`]), and the file found, and every directory above it, must be
//! owned by root and writable by nobody else (a sticky directory such as `/tmp` excepted, where
//! nobody may rename another's entry).
//!
//! Every program the library runs runs through [`run_bounded`]: a hung program (a wedged
//! GPU's `nvidia-smi`, a stuck `mkfs.erofs` on a full disk) is killed at its limit, never waited
//! on forever while a lock or a caller is held.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use thiserror::Error;
use wait_timeout::ChildExt;

use crate::outcome::{Classify, Outcome};

/// Where system programs are installed, searched in this order.
pub const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// A program the library runs, and the package that ships it (named in the fix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The program's file name.
    pub program: &'static str,
    /// The Debian package that ships it.
    pub package: &'static str,
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program)
    }
}

/// A tool that cannot be run safely, or is not installed.
#[derive(Debug, Error)]
pub enum ToolError {
    /// No directory searched holds the program.
    #[error(
        "`{tool}` is not installed (looked in {}): install the `{}` package",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
        tool.package
    )]
    Missing {
        /// The tool.
        tool: Tool,
        /// The directories searched.
        dirs: Vec<PathBuf>,
    },
    /// The program, or a directory above it, could be replaced by someone other than root.
    #[error(
        "`{tool}` at {path} is not trusted: {why}; reinstall the `{}` package or fix the \
         ownership and mode ({path} must be owned by root and writable by root only)",
        tool.package
    )]
    Untrusted {
        /// The tool.
        tool: Tool,
        /// The file or directory that fails the check.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The program's path could not be examined.
    #[error("cannot examine {path} (looking for `{tool}`)")]
    Io {
        /// The tool.
        tool: Tool,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl Classify for ToolError {
    fn outcome(&self) -> Outcome {
        match self {
            ToolError::Untrusted { .. } => Outcome::Refused,
            ToolError::Missing { .. } | ToolError::Io { .. } => Outcome::Failed,
        }
    }
}

impl Tool {
    /// The checked path of this tool in the system's directories.
    pub fn find(self) -> Result<PathBuf, ToolError> {
        let dirs: Vec<PathBuf> = SYSTEM_DIRS.iter().map(PathBuf::from).collect();
        self.find_in(&dirs)
    }

    /// The checked path of this tool in the first of `dirs` that holds it. A candidate that
    /// fails the check is refused, never skipped for a later one: an untrusted copy first in
    /// line is something the operator must know about.
    pub fn find_in(self, dirs: &[PathBuf]) -> Result<PathBuf, ToolError> {
        for dir in dirs {
            let candidate = dir.join(self.program);
            match std::fs::symlink_metadata(&candidate) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ToolError::Io {
                        tool: self,
                        path: candidate,
                        source,
                    });
                }
                Ok(_) => return self.checked(&candidate),
            }
        }
        Err(ToolError::Missing {
            tool: self,
            dirs: dirs.to_vec(),
        })
    }

    /// `path`, resolved through its links, if it and every directory above it pass the check.
    fn checked(self, path: &Path) -> Result<PathBuf, ToolError> {
        let resolved = std::fs::canonicalize(path).map_err(|source| ToolError::Io {
            tool: self,
            path: path.to_path_buf(),
            source,
        })?;
        let untrusted = |path: &Path, why: String| ToolError::Untrusted {
            tool: self,
            path: path.to_path_buf(),
            why,
        };
        let meta = self.metadata(&resolved)?;
        if !meta.is_file() {
            return Err(untrusted(&resolved, "it is not a regular file".into()));
        }
        if meta.mode() & 0o111 == 0 {
            return Err(untrusted(&resolved, "it is not executable".into()));
        }
        check_owner_and_mode(&meta).map_err(|why| untrusted(&resolved, why))?;
        for dir in resolved.ancestors().skip(1) {
            let meta = self.metadata(dir)?;
            let sticky = meta.mode() & 0o1000 != 0;
            if !sticky {
                check_owner_and_mode(&meta).map_err(|why| untrusted(dir, why))?;
            } else if meta.uid() != 0 {
                return Err(untrusted(dir, format!("it is owned by uid {}", meta.uid())));
            }
        }
        Ok(resolved)
    }

    fn metadata(self, path: &Path) -> Result<std::fs::Metadata, ToolError> {
        std::fs::metadata(path).map_err(|source| ToolError::Io {
            tool: self,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// How long a program asked only for its version or to print a certificate may take: it
/// answers at once, so anything longer is a hang.
pub const PROBE_LIMIT: Duration = Duration::from_secs(30);

/// A program run through [`run_bounded`] that did not give its output.
#[derive(Debug, Error)]
pub enum RunError {
    /// The program could not be started.
    #[error("cannot run {program}")]
    Start {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The program ran past its limit: it and everything it started were killed.
    #[error("{program} did not finish within {}s and was killed", after.as_secs_f64())]
    TimedOut {
        /// The program.
        program: String,
        /// Its limit.
        after: Duration,
    },
}

impl Classify for RunError {
    fn outcome(&self) -> Outcome {
        Outcome::Failed
    }
}

/// Run `command` to its end with stdin empty and its stdout and stderr collected, or kill it
/// (and its process group, so a child it started cannot keep the pipes open) once `limit`
/// passes. A non-zero exit is not an error here: the caller reads `Output::status`.
pub fn run_bounded(command: &mut Command, limit: Duration) -> Result<Output, RunError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Start {
            program: program.clone(),
            source,
        })?;
    // Both pipes are drained while waiting, so a chatty program never blocks on a full pipe.
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    std::thread::scope(|scope| {
        let out = scope.spawn(move || drain(stdout.as_mut()));
        let err = scope.spawn(move || drain(stderr.as_mut()));
        let status = match child.wait_timeout(limit) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => {
                kill_group(&mut child);
                Err(RunError::TimedOut {
                    program: program.clone(),
                    after: limit,
                })
            }
            Err(source) => {
                kill_group(&mut child);
                Err(RunError::Start {
                    program: program.clone(),
                    source,
                })
            }
        };
        let (stdout, stderr) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        status.map(|status| Output {
            status,
            stdout,
            stderr,
        })
    })
}

fn drain(pipe: Option<&mut impl Read>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.read_to_end(&mut bytes);
    }
    bytes
}

/// Kill `child`'s process group and reap `child`, so no zombie outlives the call.
fn kill_group(child: &mut Child) {
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

fn check_owner_and_mode(meta: &std::fs::Metadata) -> Result<(), String> {
    if meta.uid() != 0 {
        return Err(format!("it is owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "its mode {:o} lets group or others write it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const TOOL: Tool = Tool {
        program: "mkfs.test",
        package: "test-utils",
    };

    fn installed(mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOOL.program);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_bounded_run_collects_both_streams_without_blocking_on_a_full_pipe() {
        // 1 MiB on stdout is far past a pipe's buffer: undrained, the child would never exit.
        let out = run_bounded(
            Command::new("/bin/sh")
                .arg("-c")
                .arg("head -c 1048576 /dev/zero; echo oops >&2; exit 3"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(out.stdout.len(), 1 << 20);
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn a_run_past_its_limit_is_killed_with_what_it_started() {
        let start = std::time::Instant::now();
        // The grandchild `sleep` holds the pipes too: only killing the group ends the wait.
        let err = run_bounded(
            Command::new("/bin/sh").arg("-c").arg("sleep 30 & sleep 30"),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(err, RunError::TimedOut { .. }), "{err:?}");
        assert!(err.to_string().contains("/bin/sh"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        let missing = run_bounded(
            &mut Command::new("/nonexistent/tool"),
            Duration::from_secs(1),
        );
        assert!(matches!(missing, Err(RunError::Start { .. })));
    }

    #[test]
    fn a_root_owned_tool_writable_by_root_only_is_found_through_its_link() {
        let (dir, path) = installed(0o755);
        let links = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&path, links.path().join(TOOL.program)).unwrap();
        let found = TOOL.find_in(&[links.path().to_path_buf()]);
        if is_root() {
            assert_eq!(found.unwrap(), std::fs::canonicalize(&path).unwrap());
        } else {
            // What a test makes is its user's: the same file is refused for its owner.
            let err = found.unwrap_err().to_string();
            assert!(err.contains("owned by uid"), "{err}");
        }
        drop(dir);
    }

    #[test]
    fn a_tool_others_may_write_is_refused_naming_the_file_and_the_fix() {
        let (dir, path) = installed(0o757);
        let err = TOOL.find_in(&[dir.path().to_path_buf()]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ToolError::Untrusted { .. }), "{err:?}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("test-utils"), "{text}");
        assert_eq!(err.outcome(), Outcome::Refused);
    }

    #[test]
    fn a_tool_in_a_directory_others_may_write_is_refused_even_before_a_trusted_one() {
        let (dir, _path) = installed(0o755);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let (trusted, _) = installed(0o755);
        let err = TOOL
            .find_in(&[dir.path().to_path_buf(), trusted.path().to_path_buf()])
            .unwrap_err();
        match &err {
            ToolError::Untrusted { path, .. } if is_root() => {
                assert_eq!(path, &std::fs::canonicalize(dir.path()).unwrap())
            }
            ToolError::Untrusted { .. } => {} // not root: the file itself is refused first
            other => panic!("expected Untrusted, got {other:?}"),
        }
    }

    #[test]
    fn a_tool_owned_by_another_user_is_refused() {
        let (dir, path) = installed(0o755);
        if is_root() {
            std::os::unix::fs::chown(&path, Some(1000), None).unwrap();
        } // else the file is already another user's than root
        let err = TOOL.find_in(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");
    }

    #[test]
    fn a_directory_or_a_non_executable_file_is_no_tool() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(TOOL.program)).unwrap();
        let err = TOOL.find_in(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let (plain, _) = installed(0o644);
        let err = TOOL.find_in(&[plain.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("not executable"), "{err}");
    }

    #[test]
    fn a_missing_tool_names_its_package_and_where_it_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let err = TOOL.find_in(&[dir.path().to_path_buf()]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`test-utils`"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert_eq!(err.outcome(), Outcome::Failed);
    }
}
