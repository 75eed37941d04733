//! The CDI spec's container hooks, with the arguments `nvidia-ctk` emits: `create-symlinks
//! --link TARGET::LINK...` and `update-ldcache --folder DIR...`. A container runtime runs them
//! (as `gpu-init` with argv[0] `nvidia-cdi-hook`) on a container's root before it starts, so an
//! image whose library layout differs from the guest's still finds `libcuda.so.1`.
//!
//! The container root is as untrusted as a workload root: everything goes through [`RootDir`]
//! and the container's `ldconfig` runs unprivileged.

use crate::inroot::{RootDir, RootError};
use crate::libraries::run_ldconfig;
use std::path::{Path, PathBuf};

/// The program name the spec's hooks use as argv[0] (the one `nvidia-ctk` spec files use).
pub const HOOK_NAME: &str = "nvidia-cdi-hook";
/// The `ld.so.conf.d` entry `update-ldcache` writes in the container.
pub const CONTAINER_LD_CONF: &str = "/etc/ld.so.conf.d/000-gpu-passthrough-cdi.conf";

/// Why a hook could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The OCI state on standard input is not readable JSON with a bundle.
    #[error("the container state on standard input is not OCI state JSON with a bundle")]
    BadState(#[source] serde_json::Error),
    /// The bundle's config.json is unreadable or has no root path.
    #[error("cannot find the container root in {path}")]
    Config {
        /// The bundle's config.json.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The container root cannot be opened.
    #[error(transparent)]
    Root(#[from] RootError),
    /// Not a hook this program implements, or a malformed argument.
    #[error(
        "unsupported hook arguments {0:?}: expected create-symlinks --link T::L or update-ldcache --folder DIR"
    )]
    Usage(Vec<String>),
}

#[derive(serde::Deserialize)]
struct State {
    bundle: PathBuf,
}

/// The container's root directory, from the OCI state JSON a runtime gives a hook.
pub fn container_root(state: &str) -> Result<PathBuf, HookError> {
    let state: State = serde_json::from_str(state).map_err(HookError::BadState)?;
    let config = state.bundle.join("config.json");
    let config_err = |source| HookError::Config {
        path: config.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(&config).map_err(config_err)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| config_err(std::io::Error::other(e.to_string())))?;
    let root = value["root"]["path"]
        .as_str()
        .ok_or_else(|| config_err(std::io::Error::other("no root.path")))?;
    // root.path is relative to the bundle unless absolute.
    Ok(state.bundle.join(root))
}

/// Run the hook `args` (without argv[0]) for the container described by `state`.
/// Returns the problems met (each link or step on its own); an `Err` only when nothing could run.
pub fn run(args: &[String], state: &str) -> Result<Vec<String>, HookError> {
    let (command, values) = parse(args)?;
    let root = RootDir::open(&container_root(state)?)?;
    let mut problems = Vec::new();
    match command {
        "create-symlinks" => {
            for link in values {
                let Some((target, path)) = link.split_once("::") else {
                    return Err(HookError::Usage(args.to_vec()));
                };
                match root.lstat(path) {
                    Ok(Some(_)) => {} // the image's own file or link wins, as with nvidia-ctk
                    Ok(None) => {
                        if let Err(e) = root.symlink(target, path) {
                            problems.push(format!("cannot link {path} -> {target}: {e}"));
                        }
                    }
                    Err(e) => problems.push(format!("cannot inspect {path}: {e}")),
                }
            }
        }
        _ => {
            let mut conf = String::new();
            for folder in values {
                conf.push_str(folder);
                conf.push('\n');
            }
            if let Err(e) = root.write_file(CONTAINER_LD_CONF, conf.as_bytes()) {
                problems.push(format!("cannot write {CONTAINER_LD_CONF}: {e}"));
            }
            // An image without glibc ldconfig keeps only the links, as with nvidia-ctk.
            // A FIFO where ldconfig or its cache should be, or an ldconfig past its
            // deadline, is a problem too: the hook never blocks the container's start.
            if let (status, Some(message)) = run_ldconfig(&root)
                && status.is_error()
            {
                problems.push(message);
            }
        }
    }
    Ok(problems)
}

fn parse(args: &[String]) -> Result<(&'static str, Vec<&str>), HookError> {
    let usage = || HookError::Usage(args.to_vec());
    let (command, flag) = match args.first().map(String::as_str) {
        Some("create-symlinks") => ("create-symlinks", "--link"),
        Some("update-ldcache") => ("update-ldcache", "--folder"),
        _ => return Err(usage()),
    };
    let mut values = Vec::new();
    let mut it = args[1..].iter();
    while let Some(arg) = it.next() {
        if arg == flag {
            values.push(it.next().ok_or_else(usage)?.as_str());
        } else if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            values.push(v);
        } else {
            return Err(usage());
        }
    }
    Ok((command, values))
}

/// True when argv[0] asks for the hook.
pub fn invoked_as_hook(argv0: &str) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == HOOK_NAME)
}
