//! `driver_build`: compile NVIDIA's kernel modules for one kernel, in a sandbox, reproducibly.
//!
//! [`prepare`] unpacks the inputs and refuses everything it can before a compiler runs (the
//! headers' kernel, the source's version and flavor, the compiler's major version, the tools,
//! module signing); [`compile`] applies the patches, runs NVIDIA's `make modules`, strips and
//! (optionally) signs each module, all inside [`sandbox::Sandbox`]. Packing, inspecting and
//! publishing are `versions::build`'s.
//!
//! - [`sandbox`]: bubblewrap, its mounts and limits;
//! - [`toolchain`]: the programs a build needs and the kernel's compiler;
//! - [`headers`]: the kernel's build tree among the headers archives;
//! - [`source`]: the module source, its version and flavor;
//! - [`signer`]: the signing certificate's subject and serial;
//! - [`pack`]: the deterministic `nvidia-modules` artifact;
//! - `error`: [`DriverBuildError`], what each failure means.

mod error;
pub mod headers;
pub mod pack;
pub mod sandbox;
pub mod signer;
pub mod source;
pub mod toolchain;

pub use error::DriverBuildError;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::archive::ArchiveError;
use crate::archive::tar::{Limits, extract_tar};
use crate::registry::ModuleFlavor;
use headers::BuildTree;
use sandbox::{Sandbox, SandboxError, SandboxLimits, WORK_DIR};
use source::ModuleSource;
use toolchain::Compiler;

/// The `SOURCE_DATE_EPOCH` every build runs with: a constant, so that time never reaches the
/// modules.
pub const SOURCE_DATE_EPOCH: u64 = 0;

/// Where the module source is built inside the sandbox: always the same path, so that no path
/// of the scratch directory reaches the modules.
pub const SOURCE_DIR: &str = "/build/src";

/// A stage of a build, for a progress callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Downloading (or finding in the cache) one input.
    Fetch {
        /// Its kind.
        kind: String,
        /// Its URL.
        url: String,
    },
    /// Unpacking the inputs and checking them against the request.
    Check,
    /// The same inputs were built before: no compile.
    CacheHit,
    /// Applying one source patch.
    Patch {
        /// The patch's name.
        patch: String,
    },
    /// Running NVIDIA's `make modules`.
    Compile {
        /// Parallel jobs.
        jobs: usize,
    },
    /// Stripping debug info (and signing) each module.
    Finish {
        /// Whether modules are signed.
        sign: bool,
    },
    /// Packing and inspecting the artifact.
    Inspect,
    /// Writing the artifact and the registry entry.
    Publish,
}

/// A signing key and its certificate, as `sign-file` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// The private key (PEM), or a PKCS#11 URI.
    pub key: PathBuf,
    /// The X.509 certificate (PEM or DER).
    pub cert: PathBuf,
}

/// What one build is asked to do.
#[derive(Debug, Clone)]
pub struct Job {
    /// The guest kernel's `uname -r`.
    pub kernel_version: String,
    /// The driver version the source must be.
    pub driver_version: String,
    /// The flavor the source must be.
    pub flavor: ModuleFlavor,
    /// The module source archive (tarball or `.deb`).
    pub source: PathBuf,
    /// The kernel-headers archives (tarballs or `.deb`s).
    pub headers: Vec<PathBuf>,
    /// Patches in order: a name for messages, the file.
    pub patches: Vec<(String, PathBuf)>,
    /// Sign every module with this key.
    pub signing: Option<SigningKey>,
    /// The sandbox's limits.
    pub limits: SandboxLimits,
    /// `make -j`.
    pub jobs: usize,
    /// Where the build logs go (kept after the build).
    pub log_dir: PathBuf,
}

/// A build whose inputs were unpacked and checked.
#[derive(Debug)]
pub struct Prepared {
    scratch: tempfile::TempDir,
    job: Job,
    /// The kernel's build tree.
    pub tree: BuildTree,
    /// The compiler that matches the kernel.
    pub compiler: Compiler,
    /// The module source.
    pub source: ModuleSource,
    /// Who signs, with `--sign-key`.
    pub signer: Option<crate::registry::Signer>,
    sandbox: Sandbox,
}

/// The modules a build made: file name → host path (inside the scratch directory, valid while
/// the [`Prepared`] lives), sorted by name.
pub type Modules = Vec<(String, PathBuf)>;

impl Prepared {
    /// The sandbox's settings in words.
    pub fn sandbox(&self) -> String {
        self.sandbox.describe()
    }

    /// A scratch directory for the caller's own files (packing, inspection).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

/// Unpack the inputs into a fresh scratch directory and refuse, before compiling, anything that
/// cannot give modules for the request.
pub fn prepare(job: &Job) -> Result<Prepared, DriverBuildError> {
    let mut tools = toolchain::BUILD_TOOLS.to_vec();
    if !job.patches.is_empty() {
        tools.push(toolchain::PATCH_TOOL);
    }
    if job.signing.is_some() {
        tools.push(toolchain::OPENSSL_TOOL);
    }
    toolchain::require(&tools)?;
    let scratch = scratch_dir()?;
    let root = scratch.path().to_path_buf();
    let scratch_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DriverBuildError::Scratch { path, source }
    };

    let unpacked = root.join("source");
    unpack(&job.source, &unpacked).map_err(|source| DriverBuildError::Unpack {
        what: "nvidia-kernel-source".into(),
        source,
    })?;
    let found = source::locate(&unpacked, &job.driver_version, job.flavor)?;
    let work = root.join("work");
    fs::create_dir(&work).map_err(scratch_err(&work))?;
    fs::create_dir(work.join("home")).map_err(scratch_err(&work))?;
    let src = work.join("src");
    fs::rename(&found.dir, &src).map_err(scratch_err(&src))?;
    let source = ModuleSource { dir: src, ..found };
    fs::remove_dir_all(&unpacked).map_err(scratch_err(&unpacked))?;

    let mut header_roots = Vec::new();
    for (i, archive) in job.headers.iter().enumerate() {
        let dest = root.join(format!("headers/{i}"));
        fs::create_dir_all(root.join("headers")).map_err(scratch_err(&dest))?;
        unpack(archive, &dest).map_err(|source| DriverBuildError::Unpack {
            what: format!("kernel-headers #{}", i + 1),
            source,
        })?;
        header_roots.push(dest);
    }
    let tree = headers::locate(&header_roots, &job.kernel_version)?;
    let cc_text = tree.config.cc_version_text.clone().unwrap_or_default();
    let compiler = toolchain::compiler_for(&cc_text)?;
    if tree.config.module_sig_force && job.signing.is_none() {
        return Err(DriverBuildError::UnsignedForced {
            kernel: tree.release.clone(),
        });
    }
    let signer = match &job.signing {
        Some(key) => {
            if tree.config.module_sig_hash.is_none() {
                return Err(DriverBuildError::NoSigHash {
                    kernel: tree.release.clone(),
                });
            }
            Some(signer::signer(&key.cert)?)
        }
        None => None,
    };

    let inputs = root.join("inputs");
    fs::create_dir(&inputs).map_err(scratch_err(&inputs))?;
    if sandbox::is_root() {
        give_to_nobody(&work).map_err(scratch_err(&work))?;
    }
    let env = build_env();
    let mut sandbox = Sandbox::new(&work, env, job.limits);
    for header_root in &header_roots {
        sandbox
            .add_tree(header_root)
            .map_err(scratch_err(header_root))?;
    }
    for (i, (_, patch)) in job.patches.iter().enumerate() {
        let copy = inputs.join(format!("{i:02}.patch"));
        fs::copy(patch, &copy).map_err(scratch_err(&copy))?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o644))
            .map_err(scratch_err(&copy))?;
        sandbox.add_file(&copy, &Path::new("/inputs").join(format!("{i:02}.patch")));
    }
    fs::create_dir_all(&job.log_dir).map_err(scratch_err(&job.log_dir))?;
    Ok(Prepared {
        scratch,
        job: job.clone(),
        tree,
        compiler,
        source,
        signer,
        sandbox,
    })
}

/// Patch, compile, strip and sign, in the sandbox; the modules it made.
pub fn compile(prepared: &Prepared, stage: &dyn Fn(Stage)) -> Result<Modules, DriverBuildError> {
    let job = &prepared.job;
    // One wall-clock limit for the whole build, its commands together.
    let deadline = Instant::now() + job.limits.wall;
    let log = |name: &str| job.log_dir.join(name);
    let src = Path::new(SOURCE_DIR);
    for (i, (name, _)) in job.patches.iter().enumerate() {
        stage(Stage::Patch {
            patch: name.clone(),
        });
        let patch_log = log(&format!("patch-{i:02}.log"));
        let argv = [
            "patch",
            "-p1",
            "--batch",
            "--forward",
            "--no-backup-if-mismatch",
            "-r",
            "-",
            "-i",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("/inputs/{i:02}.patch")])
        .collect::<Vec<_>>();
        match prepared.sandbox.run(&argv, src, &patch_log, deadline) {
            Ok(()) => {}
            Err(SandboxError::Failed { .. }) => {
                return Err(DriverBuildError::Patch {
                    patch: name.clone(),
                    version: prepared.source.version.clone(),
                    detail: patch_detail(&fs::read_to_string(&patch_log).unwrap_or_default()),
                    log: patch_log,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }

    stage(Stage::Compile { jobs: job.jobs });
    let make_log = log("make.log");
    let argv = vec![
        "make".to_string(),
        format!("-j{}", job.jobs.max(1)),
        "modules".into(),
        format!("SYSSRC={}", prepared.tree.syssrc.display()),
        format!("SYSOUT={}", prepared.tree.sysout.display()),
        format!("KERNEL_UNAME={}", prepared.tree.release),
        format!("CC={}", prepared.compiler.program),
    ];
    match prepared.sandbox.run(&argv, src, &make_log, deadline) {
        Ok(()) => {}
        Err(SandboxError::Failed { .. }) => {
            let text = fs::read_to_string(&make_log).unwrap_or_default();
            let (file, errors) = compile_errors(&text);
            return Err(DriverBuildError::Compile {
                file,
                errors,
                log: make_log,
            });
        }
        Err(e) => return Err(e.into()),
    }

    let host_src = &prepared.source.dir;
    let mut modules = Vec::new();
    find_modules(host_src, host_src, &mut modules).map_err(|source| DriverBuildError::Scratch {
        path: host_src.clone(),
        source,
    })?;
    modules.sort();
    modules.dedup_by(|a, b| a.0 == b.0);
    if modules.is_empty() {
        return Err(DriverBuildError::NoModules { log: make_log });
    }
    let inside: Vec<String> = modules
        .iter()
        .map(|(_, rel)| src.join(rel).display().to_string())
        .collect();

    stage(Stage::Finish {
        sign: job.signing.is_some(),
    });
    let mut argv = vec!["strip".to_string(), "--strip-debug".into()];
    argv.extend(inside.iter().cloned());
    prepared
        .sandbox
        .run(&argv, src, &log("strip.log"), deadline)?;
    if let Some(key) = &job.signing {
        sign(prepared, key, &inside, &log("sign.log"), deadline)?;
    }
    Ok(modules
        .into_iter()
        .map(|(name, rel)| (name, host_src.join(rel)))
        .collect())
}

/// Sign each module (stripped already: the signature must be the file's last bytes) with the
/// build tree's own `scripts/sign-file`, in a sandbox that sees the key (copied, read-only) and
/// nothing of the build's.
fn sign(
    prepared: &Prepared,
    key: &SigningKey,
    modules: &[String],
    log: &Path,
    deadline: Instant,
) -> Result<(), DriverBuildError> {
    let keys = prepared.scratch.path().join("keys");
    let scratch_err = |source| DriverBuildError::Scratch {
        path: keys.clone(),
        source,
    };
    fs::create_dir_all(&keys).map_err(scratch_err)?;
    let mut sandbox = prepared.sandbox.clone();
    for (name, file) in [("key", &key.key), ("cert", &key.cert)] {
        let copy = keys.join(name);
        fs::copy(file, &copy).map_err(scratch_err)?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o400)).map_err(scratch_err)?;
        if sandbox::is_root() {
            std::os::unix::fs::lchown(&copy, Some(sandbox::NOBODY), Some(sandbox::NOBODY))
                .map_err(scratch_err)?;
        }
        sandbox.add_file(&copy, &Path::new("/keys").join(name));
    }
    let hash = prepared
        .tree
        .config
        .module_sig_hash
        .clone()
        .unwrap_or_default();
    let sign_file = prepared.tree.sysout.join("scripts/sign-file");
    let mut argv = vec![
        "sh".to_string(),
        "-c".into(),
        "set -e; s=$1; h=$2; shift 2; for m; do \"$s\" \"$h\" /keys/key /keys/cert \"$m\"; done"
            .into(),
        "sign".into(),
        sign_file.display().to_string(),
        hash,
    ];
    argv.extend(modules.iter().cloned());
    let result = sandbox.run(&argv, Path::new(WORK_DIR), log, deadline);
    let _ = fs::remove_dir_all(&keys);
    result.map_err(Into::into)
}

/// The environment of every sandboxed command: fixed, so that nothing of the caller's reaches
/// the modules.
fn build_env() -> Vec<(String, String)> {
    [
        ("PATH", toolchain::SANDBOX_PATH.to_string()),
        ("HOME", format!("{WORK_DIR}/home")),
        ("TMPDIR", "/tmp".into()),
        ("LC_ALL", "C".into()),
        ("LANG", "C".into()),
        ("TZ", "UTC".into()),
        ("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string()),
        ("KBUILD_BUILD_TIMESTAMP", format!("@{SOURCE_DATE_EPOCH}")),
        ("KBUILD_BUILD_USER", "gpu-passthrough".into()),
        ("KBUILD_BUILD_HOST", "sandbox".into()),
        ("KBUILD_BUILD_VERSION", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A fresh scratch directory others may traverse (the sandbox may run as `nobody`).
fn scratch_dir() -> Result<tempfile::TempDir, DriverBuildError> {
    let base = std::env::temp_dir();
    let dir = tempfile::Builder::new()
        .prefix("gpu-passthrough-build-")
        .tempdir_in(&base)
        .map_err(|source| DriverBuildError::Scratch {
            path: base.clone(),
            source,
        })?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(|source| {
        DriverBuildError::Scratch {
            path: dir.path().to_path_buf(),
            source,
        }
    })?;
    Ok(dir)
}

/// Unpack a tarball or a `.deb` (told apart by content) into `dest`.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), ArchiveError> {
    if crate::archive::deb::is_deb(archive)? {
        crate::archive::deb::extract_deb(archive, dest, &Limits::default())?;
    } else {
        extract_tar(archive, dest, &Limits::default())?;
    }
    Ok(())
}

/// Hand the tree at `dir` to [`sandbox::NOBODY`], so the sandboxed build may write it.
fn give_to_nobody(dir: &Path) -> io::Result<()> {
    let id = Some(sandbox::NOBODY);
    std::os::unix::fs::lchown(dir, id, id)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            give_to_nobody(&entry.path())?;
        } else {
            std::os::unix::fs::lchown(entry.path(), id, id)?;
        }
    }
    Ok(())
}

/// Every `*.ko` regular file under `dir`: (file name, path relative to `base`).
fn find_modules(base: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            find_modules(base, &path, out)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "ko") {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = path.strip_prefix(base).unwrap_or(&path).to_path_buf();
            out.push((name, rel));
        }
    }
    Ok(())
}

/// patch's lines that say what failed (the file, the hunk).
fn patch_detail(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("FAILED")
                || l.contains("can't find file")
                || l.contains("No file to patch")
                || l.contains("patching file")
                || l.contains("Reversed")
                || l.contains("malformed")
                || l.contains("Only garbage")
        })
        .take(6)
        .collect();
    if lines.is_empty() {
        log.lines().take(4).collect::<Vec<_>>().join("; ")
    } else {
        lines.join("; ")
    }
}

/// The file that failed and the first compiler error lines of a make log.
fn compile_errors(log: &str) -> (String, String) {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("error:") || l.contains("Error:"))
        .take(5)
        .collect();
    let file = errors
        .first()
        .and_then(|l| l.split(':').next())
        .filter(|f| f.contains('.') && !f.contains(' '))
        .map(str::to_string)
        .or_else(|| {
            // make's own line: `make[2]: *** [scripts/Makefile.build:250: nvidia/nv.o] Error 1`
            log.lines()
                .find(|l| l.contains("***") && l.contains("Error"))
                .and_then(|l| l.split(": ").nth(2))
                .map(|f| f.trim_end_matches("] Error 1").to_string())
        })
        .unwrap_or_else(|| "make".into());
    let errors = if errors.is_empty() {
        log.lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        errors.join("\n")
    };
    (file, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compile_error_names_the_file_and_its_first_lines() {
        let log = "  CC [M]  /build/src/nvidia/nv-pci.o\n\
                   /build/src/nvidia/nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'\n\
                   make[2]: *** [scripts/Makefile.build:250: /build/src/nvidia/nv-pci.o] Error 1\n";
        let (file, errors) = compile_errors(log);
        assert_eq!(file, "/build/src/nvidia/nv-pci.c");
        assert!(errors.contains("too few arguments"), "{errors}");
    }

    #[test]
    fn a_failed_hunk_is_named() {
        let log = "patching file nvidia/nv-pci.c\nHunk #1 FAILED at 220.\n1 out of 1 hunk FAILED\n";
        let detail = patch_detail(log);
        assert!(
            detail.contains("nvidia/nv-pci.c") && detail.contains("Hunk #1 FAILED"),
            "{detail}"
        );
    }
}
