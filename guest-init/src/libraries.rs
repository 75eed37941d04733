//! Making the driver's libraries and programs visible in the workload root without copying them.
//!
//! The GPU layer (`/gpu`) is bind-mounted read-only at [`GPU_MOUNT`] inside the root; the root's
//! library directory gets soname symlinks into it; `ld.so.conf.d` names it; the root's own
//! `ldconfig` runs chrooted. A workload file with the same soname is hidden by a bind mount of the
//! driver's file over it, never deleted.

use crate::context::{SetupContext, in_root};
use crate::inroot::{self, RootDir};
use crate::sys;
use gpu_passthrough_guest_contract::Manifest;
use gpu_passthrough_guest_contract::report::{LdconfigStatus, LibrariesReport, Shadowed};
use rustix::fs::{FileType, OFlags, ResolveFlags};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where the GPU layer appears inside the workload root.
pub const GPU_MOUNT: &str = "/usr/lib/gpu-passthrough";
/// The `ld.so.conf.d` entry written into the root.
pub const LD_SO_CONF: &str = "/etc/ld.so.conf.d/000-nvidia.conf";
/// Where programs are linked inside the root (on the default PATH of common distributions).
pub const BIN_DIR: &str = "/usr/local/bin";

/// Why the libraries could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A file operation inside the root failed.
    #[error("cannot {action} {path} in the workload root: {source}: is the root writable?")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// Path inside the root.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A mount failed.
    #[error(
        "cannot bind-mount {src} on {dst}: {errno}: gpu-init needs CAP_SYS_ADMIN (run it as root)"
    )]
    Mount {
        /// Source.
        src: String,
        /// Target.
        dst: String,
        /// The errno.
        errno: nix::errno::Errno,
    },
    /// A workload file carrying a driver soname cannot be hidden by the driver's copy.
    #[error(
        "the workload's {link} cannot be hidden by the driver's {soname}: {reason}; the driver's \
         copy is still found through the ld cache ({GPU_MOUNT}/lib)"
    )]
    Unshadowable {
        /// The workload's path (inside the root).
        link: String,
        /// The soname.
        soname: String,
        /// Why: dangling, not a file, or leading out of the root.
        reason: std::io::Error,
    },
    /// A manifest path is not under `/gpu/`.
    #[error("manifest path {0} is not under /gpu/: rebuild the GPU layer")]
    OutsideLayer(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InjectError + 'a {
    move |source| InjectError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// The path inside the root where a `/gpu/...` manifest path appears after the bind mount.
pub fn mounted_path(guest_path: &str) -> Result<String, InjectError> {
    guest_path
        .strip_prefix("/gpu/")
        .map(|rest| format!("{GPU_MOUNT}/{rest}"))
        .ok_or_else(|| InjectError::OutsideLayer(guest_path.to_string()))
}

/// Debian multiarch triple for the manifest's architecture.
fn multiarch(arch: &str) -> String {
    format!("{arch}-linux-gnu")
}

/// The root's library directories that exist, as paths inside the root, preferred first.
/// A directory reached through a symlink (usrmerge `/lib -> usr/lib`) is left out: its target is
/// listed.
pub fn library_dirs(root: &RootDir, arch: &str) -> Vec<String> {
    let triple = multiarch(arch);
    [
        format!("/usr/lib/{triple}"),
        format!("/lib/{triple}"),
        "/usr/lib64".to_string(),
        "/lib64".to_string(),
        "/usr/lib".to_string(),
        "/lib".to_string(),
    ]
    .into_iter()
    .filter(|d| root.is_plain_dir(d))
    .collect()
}

/// The root's library directory, as a path inside the root.
pub fn library_dir(root: &RootDir, arch: &str) -> Option<String> {
    library_dirs(root, arch).into_iter().next()
}

/// Follow symlinks of the last component of `path` (inside `root`) as if `root` were `/`.
/// Only for display: file operations go through [`RootDir`].
pub fn resolve_in_root(root: &Path, path: &str) -> String {
    let mut current = PathBuf::from(path);
    for _ in 0..40 {
        let host = in_root(root, &current.to_string_lossy());
        let Ok(target) = std::fs::read_link(&host) else {
            break;
        };
        let joined = if target.is_absolute() {
            target
        } else {
            current.parent().unwrap_or(Path::new("/")).join(target)
        };
        current = normalize(&joined);
    }
    current.to_string_lossy().into_owned()
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p),
            _ => {}
        }
    }
    out
}

/// Bind-mount the GPU layer into the root (read-only), unless it is already there.
pub fn mount_layer(ctx: &SetupContext, root: &RootDir) -> Result<(), InjectError> {
    let gpu_dir = ctx.layer_path("/gpu");
    let mount_point = root
        .create_dir_all(GPU_MOUNT)
        .map_err(io("create", Path::new(GPU_MOUNT)))?;
    if inroot::same_inode(mount_point.as_fd(), &gpu_dir) {
        return Ok(());
    }
    sys::bind_read_only_at(&gpu_dir, mount_point.as_fd()).map_err(|errno| InjectError::Mount {
        src: gpu_dir.display().to_string(),
        dst: GPU_MOUNT.to_string(),
        errno,
    })
}

/// Soname links, shadowing, `ld.so.conf.d` and `ldconfig`. Each library is handled on its own:
/// what goes wrong with one is appended to `problems` and the rest still happens.
pub fn inject_libraries(
    root: &RootDir,
    manifest: &Manifest,
    ctx: &SetupContext,
    problems: &mut Vec<String>,
) -> Result<LibrariesReport, InjectError> {
    let mut report = LibrariesReport {
        mount: Some(GPU_MOUNT.to_string()),
        ..LibrariesReport::default()
    };
    let dir = match library_dir(root, &manifest.arch) {
        Some(d) => d,
        None => {
            let d = "/usr/lib".to_string();
            root.create_dir_all(&d)
                .map_err(io("create", Path::new("/usr/lib")))?;
            d
        }
    };
    let others: Vec<String> = library_dirs(root, &manifest.arch)
        .into_iter()
        .filter(|d| *d != dir)
        .collect();
    for lib in &manifest.libraries {
        match inject_one(root, ctx, lib, &dir, &others, &mut report, problems) {
            Ok(link) => report.injected.push(link),
            Err(e) => problems.push(e.to_string()),
        }
    }
    report.dir = Some(dir);

    // ld.so.conf.d is only read through an `include` in ld.so.conf; a root without one gets
    // Debian's default. Whatever is there (even a dangling link) is the workload's and is kept.
    if let Err(e) = root.create_new("/etc/ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n") {
        problems.push(io("write", Path::new("/etc/ld.so.conf"))(e).to_string());
    }
    // A layer that records capabilities is selected from: naming its whole library directory
    // would put every capability in the cache, so the soname links above carry the selection.
    let conf = if manifest.capabilities.is_empty() {
        format!("{GPU_MOUNT}/lib\n")
    } else {
        "# gpu-passthrough: driver libraries are linked into the root's library directory, by \
         NVIDIA_DRIVER_CAPABILITIES\n"
            .to_string()
    };
    if let Err(e) = root.write_file(LD_SO_CONF, conf.as_bytes()) {
        problems.push(io("write", Path::new(LD_SO_CONF))(e).to_string());
    }

    let (status, message) = run_ldconfig(root);
    report.ldconfig = status;
    if let Some(m) = &message {
        problems.push(m.clone());
    }
    report.ldconfig_message = message;
    Ok(report)
}

/// One library: its soname link in `dir`, and the workload's copies of that soname hidden.
/// Returns the link. A workload copy that cannot be hidden is a problem, not a failure.
fn inject_one(
    root: &RootDir,
    ctx: &SetupContext,
    lib: &gpu_passthrough_guest_contract::Library,
    dir: &str,
    others: &[String],
    report: &mut LibrariesReport,
    problems: &mut Vec<String>,
) -> Result<String, InjectError> {
    let real = mounted_path(&lib.path)?;
    let file_name = Path::new(&lib.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| InjectError::OutsideLayer(lib.path.clone()))?;
    let link_name = lib.soname.clone().unwrap_or(file_name);
    let link = format!("{dir}/{link_name}");
    match root.lstat(&link).map_err(io("inspect", Path::new(&link)))? {
        None => root
            .symlink(&real, &link)
            .map_err(io("link", Path::new(&link)))?,
        Some(t)
            if t == FileType::Symlink
                && root.read_link(&link).is_ok_and(|t| t == Path::new(&real)) => {}
        Some(_) => shadow(root, ctx, &lib.path, &link, &link_name, report)?,
    }
    // The same soname elsewhere on the loader's default path would also be found: hide those.
    for other in others {
        let candidate = format!("{other}/{link_name}");
        if matches!(root.lstat(&candidate), Ok(Some(_)))
            && let Err(e) = shadow(root, ctx, &lib.path, &candidate, &link_name, report)
        {
            problems.push(e.to_string());
        }
    }
    Ok(link)
}

/// Bind-mount the driver's `lib_path` over the file `link` (inside the root) resolves to: the
/// workload keeps its bytes but loads ours. Records it in `shadowed`.
fn shadow(
    root: &RootDir,
    ctx: &SetupContext,
    lib_path: &str,
    link: &str,
    soname: &str,
    report: &mut LibrariesReport,
) -> Result<(), InjectError> {
    let target = root
        .open_target(link)
        .map_err(|reason| InjectError::Unshadowable {
            link: link.to_string(),
            soname: soname.to_string(),
            reason,
        })?;
    let kind = inroot::file_type(target.as_fd()).map_err(io("inspect", Path::new(link)))?;
    if kind != FileType::RegularFile {
        return Err(InjectError::Unshadowable {
            link: link.to_string(),
            soname: soname.to_string(),
            reason: std::io::Error::other(format!("it is a {kind:?}, not a file")),
        });
    }
    let theirs = root
        .path_of(target.as_fd())
        .unwrap_or_else(|| resolve_in_root(root.host_path(), link));
    let ours = ctx.layer_path(lib_path);
    if !inroot::same_inode(target.as_fd(), &ours) {
        sys::bind_read_only_at(&ours, target.as_fd()).map_err(|errno| InjectError::Mount {
            src: ours.display().to_string(),
            dst: theirs.clone(),
            errno,
        })?;
    }
    if !report.shadowed.iter().any(|s| s.file == theirs) {
        report.shadowed.push(Shadowed {
            soname: soname.to_string(),
            file: theirs,
        });
    }
    Ok(())
}

/// How long the root's `ldconfig` may run: it is the workload's program, and PID 1 waits for
/// it before its report.
pub const LDCONFIG_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the root's `ldconfig` writes its cache.
const LD_SO_CACHE: &str = "/etc/ld.so.cache";

/// The root's glibc `ldconfig` (an ELF program; Alpine's is a no-op shell script), inside the
/// root. Each candidate is looked at without opening it for reading first (a FIFO there would
/// block PID 1 before its report); one that is there but is not a regular file (a FIFO, a
/// device, a directory) is an error naming it.
pub fn find_ldconfig(root: &RootDir) -> Result<Option<&'static str>, String> {
    for p in [
        "/sbin/ldconfig.real",
        "/usr/sbin/ldconfig.real",
        "/sbin/ldconfig",
        "/usr/sbin/ldconfig",
        "/usr/bin/ldconfig",
    ] {
        // O_PATH opens nothing: a FIFO or a device is not touched.
        let Ok(handle) = root.open_path(p, OFlags::PATH, ResolveFlags::empty()) else {
            continue;
        };
        let kind = rustix::fs::fstat(&handle).map(|st| FileType::from_raw_mode(st.st_mode));
        if kind != Ok(FileType::RegularFile) {
            return Err(format!(
                "{p} in the workload root is not a regular file ({}): refusing to run or read it",
                kind.map_or_else(|e| e.to_string(), |k| format!("{k:?}"))
            ));
        }
        let mut magic = [0u8; 4];
        let elf = root
            .open_path(p, OFlags::RDONLY | OFlags::NONBLOCK, ResolveFlags::empty())
            .map(std::fs::File::from)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x7fELF";
        if elf {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Run the root's own `ldconfig`, chrooted and without any privilege (see
/// [`sys::unprivileged_in_root`]): it is the workload's program, so it gets only what rewriting
/// the root's own `/etc/ld.so.cache` needs. The root's ldconfig, not one of ours, because the
/// cache format must match the root's glibc. It runs for at most [`LDCONFIG_TIMEOUT`]; a
/// non-regular file where it or its cache should be is an error, and nothing is run.
pub fn run_ldconfig(root: &RootDir) -> (LdconfigStatus, Option<String>) {
    run_ldconfig_within(root, LDCONFIG_TIMEOUT)
}

fn run_ldconfig_within(root: &RootDir, limit: Duration) -> (LdconfigStatus, Option<String>) {
    let ldconfig = match find_ldconfig(root) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return (
                LdconfigStatus::Missing,
                Some(format!(
                    "the workload root has no glibc ldconfig (musl or distroless?): the driver libraries \
                     are reachable only through the soname links and {GPU_MOUNT}/lib; the NVIDIA \
                     libraries need a glibc root to run"
                )),
            );
        }
        Err(message) => return (LdconfigStatus::NotAFile, Some(message)),
    };
    match root.lstat(LD_SO_CACHE) {
        Ok(None | Some(FileType::RegularFile | FileType::Symlink)) => {}
        Ok(Some(kind)) => {
            return (
                LdconfigStatus::NotAFile,
                Some(format!(
                    "{LD_SO_CACHE} in the workload root is not a regular file ({kind:?}): \
                     {ldconfig} not run; replace it with a file or remove it"
                )),
            );
        }
        Err(e) => {
            return (
                LdconfigStatus::Failed,
                Some(format!(
                    "cannot look at {LD_SO_CACHE} in the workload root: {e}"
                )),
            );
        }
    }
    let mut cmd = Command::new(ldconfig);
    cmd.env_clear();
    sys::unprivileged_in_root(&mut cmd, root.fd());
    match run_bounded(&mut cmd, limit) {
        Ok(Some((status, _))) if status.success() => (LdconfigStatus::Ok, None),
        Ok(Some((status, stderr))) => (
            LdconfigStatus::Failed,
            Some(format!(
                "{ldconfig} in the workload root failed ({status}): {}",
                stderr.trim()
            )),
        ),
        Ok(None) => (
            LdconfigStatus::TimedOut,
            Some(format!(
                "{ldconfig} in the workload root ran longer than {}s and was killed; the driver \
                 libraries are reachable only through the soname links and {GPU_MOUNT}/lib",
                limit.as_secs_f32()
            )),
        ),
        Err(e) => (
            LdconfigStatus::Failed,
            Some(format!(
                "cannot run {ldconfig} chrooted and unprivileged in the workload root: {e}"
            )),
        ),
    }
}

/// Bytes of a program's standard error kept for the report.
const STDERR_KEPT: usize = 4096;

/// Run `cmd` (no input, output dropped) for at most `limit`: its exit status and the start of
/// its standard error, or `None` when it was killed at the deadline.
fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
) -> std::io::Result<Option<(ExitStatus, String)>> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // Drained on a thread of its own so a chatty program never blocks on a full pipe.
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut buf) {
                if n == 0 {
                    break;
                }
                let room = STDERR_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            String::from_utf8_lossy(&kept).into_owned()
        })
    });
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            let text = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
            return Ok(Some((status, text)));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Link the manifest's programs into [`BIN_DIR`] of the root. Returns the paths inside the root.
pub fn link_binaries(
    root: &RootDir,
    manifest: &Manifest,
    problems: &mut Vec<String>,
) -> Result<Vec<String>, InjectError> {
    // A bin dir that cannot be made costs the programs, not the libraries.
    if let Err(e) = root.create_dir_all(BIN_DIR) {
        problems.push(io("create", Path::new(BIN_DIR))(e).to_string());
        return Ok(Vec::new());
    }
    let mut linked = Vec::new();
    for bin in &manifest.binaries {
        let real = mounted_path(bin)?;
        let Some(name) = Path::new(bin).file_name() else {
            return Err(InjectError::OutsideLayer(bin.clone()));
        };
        let link = format!("{BIN_DIR}/{}", name.to_string_lossy());
        match root.lstat(&link) {
            Ok(Some(_)) if root.read_link(&link).is_ok_and(|t| t == Path::new(&real)) => {}
            Ok(Some(_)) => {
                problems.push(format!(
                    "the workload has its own {link}; the driver's is at {real}"
                ));
                continue;
            }
            Ok(None) => {
                if let Err(e) = root.symlink(&real, &link) {
                    problems.push(io("link", Path::new(&link))(e).to_string());
                    continue;
                }
            }
            Err(e) => {
                problems.push(io("inspect", Path::new(&link))(e).to_string());
                continue;
            }
        }
        linked.push(link);
    }
    Ok(linked)
}

/// Point the kernel's firmware loader at the layer's firmware as seen from inside the root (the
/// layer is bind-mounted at [`GPU_MOUNT`]), so a firmware request after the switch into the root
/// still finds the files. Returns the path written.
pub fn expose_firmware(ctx: &SetupContext) -> Result<String, InjectError> {
    set_firmware_path(ctx, &format!("{GPU_MOUNT}/firmware"))
}

/// Write `path` to `firmware_class.path`, the directory the kernel searches before its defaults.
pub fn set_firmware_path(ctx: &SetupContext, path: &str) -> Result<String, InjectError> {
    let param = ctx.sys_root.join("module/firmware_class/parameters/path");
    std::fs::write(&param, path).map_err(io("write", &param))?;
    Ok(path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_links_inside_the_root_not_the_host() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        let d = r.join("usr/lib/x86_64-linux-gnu");
        std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/libcuda.so.470",
            d.join("libcuda.so.1"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../x86_64-linux-gnu/./libcuda.so.470.1",
            d.join("libcuda.so.470"),
        )
        .unwrap();
        assert_eq!(
            resolve_in_root(r, "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
            "/usr/lib/x86_64-linux-gnu/libcuda.so.470.1"
        );
        assert_eq!(resolve_in_root(r, "/usr/lib/none"), "/usr/lib/none");
        // /lib is a symlink to usr/lib: listed once, through its target.
        assert_eq!(
            library_dirs(&RootDir::open(r).unwrap(), "x86_64"),
            ["/usr/lib/x86_64-linux-gnu", "/usr/lib"]
        );
        assert_eq!(
            mounted_path("/gpu/lib/libcuda.so.1").unwrap(),
            "/usr/lib/gpu-passthrough/lib/libcuda.so.1"
        );
        assert!(mounted_path("/usr/lib/libcuda.so.1").is_err());
        // Without usrmerge both trees count.
        let split = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(split.path().join("lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(split.path().join("usr/lib")).unwrap();
        assert_eq!(
            library_dirs(&RootDir::open(split.path()).unwrap(), "x86_64"),
            ["/lib/x86_64-linux-gnu", "/usr/lib", "/lib"]
        );
    }

    /// Make a FIFO at `path`.
    fn fifo(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }

    /// `f` on a thread, failing after a few seconds instead of hanging the suite.
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("blocked: a FIFO was opened for reading")
    }

    #[test]
    fn a_fifo_where_ldconfig_should_be_is_an_error_not_a_hang() {
        let root = tempfile::tempdir().unwrap();
        fifo(&root.path().join("sbin/ldconfig"));
        let path = root.path().to_owned();
        let (status, message) =
            within_seconds(move || run_ldconfig(&RootDir::open(&path).unwrap()));
        assert_eq!(status, LdconfigStatus::NotAFile);
        let message = message.unwrap();
        assert!(
            message.contains("/sbin/ldconfig") && message.contains("Fifo"),
            "{message}"
        );
    }

    #[test]
    fn a_fifo_where_the_cache_should_be_is_an_error_and_nothing_runs() {
        let root = tempfile::tempdir().unwrap();
        let ldconfig = root.path().join("sbin/ldconfig");
        std::fs::create_dir_all(ldconfig.parent().unwrap()).unwrap();
        std::fs::write(&ldconfig, b"\x7fELF not really").unwrap();
        fifo(&root.path().join("etc/ld.so.cache"));
        let path = root.path().to_owned();
        let (status, message) =
            within_seconds(move || run_ldconfig(&RootDir::open(&path).unwrap()));
        assert_eq!(status, LdconfigStatus::NotAFile);
        assert!(message.unwrap().contains("/etc/ld.so.cache"));
    }

    #[test]
    fn a_program_past_its_deadline_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let outcome = run_bounded(&mut cmd, Duration::from_millis(200)).unwrap();
        assert!(outcome.is_none(), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        let (status, stderr) = run_bounded(&mut cmd, Duration::from_secs(20))
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(stderr.trim(), "oops");
    }
}
