//! The build sandbox: bubblewrap (`bwrap`) with every namespace of its own.
//!
//! - no network: a network namespace of its own (only its own loopback);
//! - a private mount namespace on an empty root: the host's system directories (`/usr` and the
//!   `/bin`, `/lib*` links, `/etc/ld.so.cache`, `/etc/alternatives`) read-only, each input tree
//!   read-only at its own absolute paths (Debian's headers only work there), a private `/tmp`,
//!   and one writable directory, the scratch build directory at [`WORK_DIR`]; the root itself
//!   is read-only;
//! - not root in the host's eyes: a user namespace, and when we run as root, bwrap itself runs as
//!   `nobody` first, so files the build writes are `nobody`'s; no capabilities, `no_new_privs`
//!   (bwrap sets it), its own PID namespace and session;
//! - limits: a wall-clock deadline (the whole PID namespace is killed past it) and an address
//!   space cap per process (`prlimit --as`);
//! - a fixed environment ([`Sandbox::new`]'s `env`) and umask 022.
//!
//! bubblewrap rather than our own namespace code: it is the standard, audited tool for exactly
//! this (Flatpak's), it needs no `unsafe` here, and its mount set-up is ordered arguments we can
//! record in the release's provenance.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::toolchain::BWRAP;
use crate::outcome::{Classify, Outcome};
use crate::tools::{PROBE_LIMIT, ToolError, run_bounded};

/// Where the writable scratch directory appears inside the sandbox.
pub const WORK_DIR: &str = "/build";

/// The uid and gid the sandbox runs as when we are root (`nobody` on Debian).
pub const NOBODY: u32 = 65534;

/// Host top-level entries the sandbox sees (read-only): the toolchain and its libraries.
const SYSTEM_TOP: [&str; 8] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
];

/// Host files under `/etc` the toolchain reads: the loader cache and the alternatives (`cc`,
/// `awk`).
const ETC: [&str; 2] = ["/etc/ld.so.cache", "/etc/alternatives"];

/// Input paths at this depth or deeper are mounted whole (`/usr/src/linux-headers-K`); shallower
/// directories that the host has (`/usr`, `/usr/src`) are merged with the host's.
const MERGE_DEPTH: usize = 2;

/// Wall-clock and memory limits of one sandboxed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Longest the command may run; past it the sandbox is killed.
    pub wall: Duration,
    /// Largest address space of each process inside, in bytes.
    pub memory_bytes: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            wall: Duration::from_secs(3 * 3600),
            memory_bytes: 8 << 30,
        }
    }
}

/// Why a sandboxed command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// bwrap is not installed where the system keeps programs, or could be replaced by someone
    /// other than root (it runs as root).
    #[error(transparent)]
    Bwrap(#[from] ToolError),
    /// bwrap (or the scratch directory it needs) could not be set up.
    #[error("cannot start the build sandbox ({what})")]
    Start {
        /// What failed.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The command ran past its wall-clock limit and was killed with everything it started.
    #[error(
        "the build ran past its time limit of {} s and was killed with every process it \
         started; nothing was published (raise the limit if the machine is slow; the log is {log})",
        limit.as_secs()
    )]
    TimedOut {
        /// The limit.
        limit: Duration,
        /// The command's log.
        log: PathBuf,
    },
    /// bwrap itself refused to set the sandbox up (before the command ran).
    #[error(
        "the build sandbox could not be set up (bwrap: {message}); when that is about \
         namespaces or the uid map, bubblewrap needs user namespaces \
         (sysctl user.max_user_namespaces > 0; on Ubuntu also \
         kernel.apparmor_restrict_unprivileged_userns=0)"
    )]
    Refused {
        /// bwrap's own message.
        message: String,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` failed in the build sandbox ({status}); the log is {log}")]
    Failed {
        /// The command, as run.
        command: String,
        /// Its exit status.
        status: String,
        /// The command's log.
        log: PathBuf,
    },
}

/// The sandbox failing or a build past its limits is a failure on the way.
impl Classify for SandboxError {
    fn outcome(&self) -> Outcome {
        match self {
            SandboxError::Bwrap(e) => e.outcome(),
            SandboxError::Start { .. }
            | SandboxError::TimedOut { .. }
            | SandboxError::Refused { .. }
            | SandboxError::Failed { .. } => Outcome::Failed,
        }
    }
}

/// One sandbox configuration: mounts, environment, limits.
#[derive(Debug, Clone)]
pub struct Sandbox {
    work: PathBuf,
    env: Vec<(String, String)>,
    limits: SandboxLimits,
    /// The input trees, planned together (two may share a directory).
    trees: Vec<PathBuf>,
    /// Single files and directories: inside path → host path.
    files: BTreeMap<PathBuf, PathBuf>,
    /// The mount plan: inside path → host path, mounted whole and read-only.
    units: BTreeMap<PathBuf, PathBuf>,
    /// Host directories whose contents are merged with input trees (a tmpfs holding the host's
    /// entries and the inputs' mount points).
    opened: BTreeSet<PathBuf>,
    /// Host directories several inputs share below [`MERGE_DEPTH`]: hidden by a tmpfs holding
    /// only the inputs' entries.
    shadowed: BTreeSet<PathBuf>,
}

impl Sandbox {
    /// A sandbox whose writable scratch directory is `work` (shown at [`WORK_DIR`]), with
    /// exactly `env` as its environment.
    pub fn new(work: &Path, env: Vec<(String, String)>, limits: SandboxLimits) -> Sandbox {
        Sandbox {
            work: work.to_path_buf(),
            env,
            limits,
            trees: Vec::new(),
            files: BTreeMap::new(),
            units: BTreeMap::new(),
            opened: BTreeSet::new(),
            shadowed: BTreeSet::new(),
        }
    }

    /// Show the tree at `root` (an unpacked package: its paths are absolute paths) read-only at
    /// its own absolute paths, merged with the host's system directories and the other trees.
    pub fn add_tree(&mut self, root: &Path) -> std::io::Result<()> {
        self.trees.push(root.to_path_buf());
        self.units.clear();
        self.opened.clear();
        self.shadowed.clear();
        let trees = self.trees.clone();
        self.place(Path::new("/"), &trees, true)?;
        self.units.extend(self.files.clone());
        Ok(())
    }

    /// Show one host file or directory read-only at `inside`.
    pub fn add_file(&mut self, host: &Path, inside: &Path) {
        self.files.insert(inside.to_path_buf(), host.to_path_buf());
        self.units.insert(inside.to_path_buf(), host.to_path_buf());
    }

    /// The limits.
    pub fn limits(&self) -> SandboxLimits {
        self.limits
    }

    /// The sandbox's settings in words, for the release's provenance.
    pub fn describe(&self) -> String {
        let (uid, gid) = ids();
        format!(
            "bubblewrap {}: user, pid, ipc, uts, cgroup and network namespaces (no network); \
             read-only system and inputs, writable {WORK_DIR} only; uid {uid} gid {gid} in a \
             user namespace; no capabilities; no_new_privs; wall {} s; address space {} MiB per \
             process; umask 022",
            bwrap_version().unwrap_or_else(|| "(version unknown)".into()),
            self.limits.wall.as_secs(),
            self.limits.memory_bytes >> 20,
        )
    }

    /// Mount-plan one directory level: `sources` are the input directories that appear at
    /// `inside`; `host_backed` says whether the sandbox shows the host's `inside` there.
    fn place(
        &mut self,
        inside: &Path,
        sources: &[PathBuf],
        host_backed: bool,
    ) -> std::io::Result<()> {
        let mut names = BTreeSet::new();
        for source in sources {
            for entry in fs::read_dir(source)? {
                names.insert(entry?.file_name());
            }
        }
        let depth = inside.components().count(); // `/` counts as one
        for name in names {
            let child_inside = inside.join(&name);
            let providers: Vec<PathBuf> = sources
                .iter()
                .map(|s| s.join(&name))
                .filter(|p| fs::symlink_metadata(p).is_ok())
                .collect();
            let all_dirs = providers
                .iter()
                .all(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()));
            let system = depth > 1 || SYSTEM_TOP.contains(&name.to_string_lossy().as_ref());
            let host = (host_backed && system)
                .then(|| fs::symlink_metadata(&child_inside).ok())
                .flatten();
            match &host {
                // `/lib` → `usr/lib` on merged-/usr hosts: the tree's `lib/...` goes there.
                Some(meta) if meta.file_type().is_symlink() && all_dirs => {
                    let resolved = fs::canonicalize(&child_inside)?;
                    if resolved.is_dir() {
                        self.place(&resolved, &providers, true)?;
                        continue;
                    }
                }
                Some(meta) if meta.is_dir() && all_dirs && depth <= MERGE_DEPTH => {
                    self.place(&child_inside, &providers, true)?;
                    continue;
                }
                _ => {}
            }
            if host_backed && system && host.is_none() && inside != Path::new("/") {
                // A new entry in a directory the host provides needs a writable place for its
                // mount point.
                self.opened.insert(inside.to_path_buf());
            }
            if all_dirs && providers.len() > 1 {
                // Several inputs share the directory: merge them in it; the host's own entries
                // there (a kernel's own headers, say) are hidden, as a single input's would be.
                if host.as_ref().is_some_and(|m| m.is_dir()) {
                    self.shadowed.insert(child_inside.clone());
                }
                self.place(&child_inside, &providers, false)?;
                continue;
            }
            if let Some(last) = providers.last() {
                self.units.insert(child_inside, last.clone());
            }
        }
        Ok(())
    }

    /// bwrap's arguments, in order.
    fn bwrap_args(&self, cwd: &Path) -> std::io::Result<Vec<String>> {
        let mut a: Vec<String> = [
            "--unshare-all",
            "--unshare-user",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
        ]
        .map(String::from)
        .to_vec();
        let (uid, gid) = ids();
        a.extend([
            "--uid".into(),
            uid.to_string(),
            "--gid".into(),
            gid.to_string(),
        ]);
        let s = |p: &Path| p.to_string_lossy().into_owned();
        for top in SYSTEM_TOP {
            let host = Path::new("/").join(top);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    a.extend(["--symlink".into(), s(&fs::read_link(&host)?), s(&host)]);
                }
                Ok(m) if m.is_dir() => a.extend(["--ro-bind".into(), s(&host), s(&host)]),
                _ => {}
            }
        }
        for etc in ETC {
            a.extend(["--ro-bind-try".into(), etc.into(), etc.into()]);
        }
        // Directories merged with inputs, parents first: a tmpfs with the host's entries again.
        for dir in &self.opened {
            a.extend(["--tmpfs".into(), s(dir)]);
            let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let path = entry.path();
                if self.units.contains_key(&path) {
                    continue;
                }
                let meta = fs::symlink_metadata(&path)?;
                if meta.file_type().is_symlink() {
                    a.extend(["--symlink".into(), s(&fs::read_link(&path)?), s(&path)]);
                } else if meta.is_dir() || meta.is_file() {
                    a.extend(["--ro-bind".into(), s(&path), s(&path)]);
                }
            }
        }
        for dir in &self.shadowed {
            a.extend(["--tmpfs".into(), s(dir)]);
        }
        for (inside, host) in &self.units {
            a.extend(["--ro-bind".into(), s(host), s(inside)]);
        }
        for dir in self.opened.iter().chain(&self.shadowed) {
            a.extend(["--remount-ro".into(), s(dir)]);
        }
        a.extend([
            "--proc".into(),
            "/proc".into(),
            "--dev".into(),
            "/dev".into(),
        ]);
        a.extend(["--tmpfs".into(), "/tmp".into()]);
        a.extend(["--bind".into(), s(&self.work), WORK_DIR.into()]);
        a.extend(["--remount-ro".into(), "/".into()]);
        for (k, v) in &self.env {
            a.extend(["--setenv".into(), k.clone(), v.clone()]);
        }
        a.extend(["--chdir".into(), s(cwd)]);
        Ok(a)
    }

    /// Run `argv` inside the sandbox with `cwd` (an inside path) as its directory; its stdout
    /// and stderr go to `log` (a host path). Returns when it exited successfully; killed at
    /// `deadline` (the build's, shared by its commands).
    pub fn run(
        &self,
        argv: &[String],
        cwd: &Path,
        log: &Path,
        deadline: Instant,
    ) -> Result<(), SandboxError> {
        let start_err = |what: &str| {
            let what = what.to_string();
            move |source| SandboxError::Start { what, source }
        };
        let mut args = self
            .bwrap_args(cwd)
            .map_err(start_err("reading the mount plan"))?;
        args.push("--".into());
        args.extend([
            "prlimit".into(),
            format!("--as={}", self.limits.memory_bytes),
            "--".into(),
            "sh".into(),
            "-c".into(),
            "umask 022 && exec \"$@\"".into(),
            "sh".into(),
        ]);
        args.extend(argv.iter().cloned());
        let out = File::create(log).map_err(start_err("creating the build log"))?;
        let err = out
            .try_clone()
            .map_err(start_err("creating the build log"))?;
        let mut command = Command::new(BWRAP.find()?);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_clear()
            .process_group(0);
        if is_root() {
            // bwrap then makes its user namespace as `nobody`: not root in the host's eyes.
            command.uid(NOBODY).gid(NOBODY);
        }
        let mut child = command.spawn().map_err(start_err("running bwrap"))?;
        let status = loop {
            match child.try_wait().map_err(start_err("waiting for bwrap"))? {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    // bwrap is the PID namespace's parent: killing its group ends the whole
                    // namespace (--die-with-parent), so nothing the build started survives.
                    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    return Err(SandboxError::TimedOut {
                        limit: self.limits.wall,
                        log: log.to_path_buf(),
                    });
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        if status.success() {
            return Ok(());
        }
        // bwrap's own failures come before the command's first output line.
        let first = fs::read_to_string(log).unwrap_or_default();
        if let Some(message) = first.lines().next().and_then(|l| l.strip_prefix("bwrap: ")) {
            Err(SandboxError::Refused {
                message: message.to_string(),
            })
        } else {
            Err(SandboxError::Failed {
                command: argv.join(" "),
                status: status.to_string(),
                log: log.to_path_buf(),
            })
        }
    }
}

/// The uid and gid the build runs as: [`NOBODY`] when we are root, else our own.
fn ids() -> (u32, u32) {
    if is_root() {
        (NOBODY, NOBODY)
    } else {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }
}

/// Whether we run as root (then the sandbox drops to [`NOBODY`]).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `bwrap --version`'s version, if bwrap runs.
pub fn bwrap_version() -> Option<String> {
    let out = run_bounded(
        Command::new(BWRAP.find().ok()?).arg("--version"),
        PROBE_LIMIT,
    )
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_string)
}
