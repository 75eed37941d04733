//! Where the setup looks for things. Every path is injectable so tests run on fake trees.

use std::path::{Path, PathBuf};

/// Paths the GPU setup reads and writes. [`SetupContext::system`] gives the real ones.
#[derive(Debug, Clone)]
pub struct SetupContext {
    /// The manifest file, normally `/gpu/manifest.json`.
    pub manifest: PathBuf,
    /// Directory that absolute paths in the manifest (`/gpu/...`, `/lib/firmware/...`) are relative
    /// to; `/` in the guest.
    pub layer_root: PathBuf,
    /// procfs mount, normally `/proc`.
    pub proc_root: PathBuf,
    /// sysfs mount, normally `/sys`.
    pub sys_root: PathBuf,
    /// Device directory where nodes are made, normally `/dev`.
    pub dev_dir: PathBuf,
    /// The kernel log device, normally `/dev/kmsg`.
    pub kmsg: PathBuf,
    /// The workload root that receives libraries, binaries and the CDI spec; `None` skips those.
    pub root: Option<PathBuf>,
    /// The running kernel release (`uname -r`).
    pub kernel_release: String,
    /// The workload settings of the kernel command line (`NVIDIA_DRIVER_CAPABILITIES`, ...).
    pub env: crate::env::GuestEnv,
}

impl SetupContext {
    /// The real guest paths, with `root` as the workload root.
    pub fn system(manifest: PathBuf, root: Option<PathBuf>) -> Self {
        Self {
            manifest,
            layer_root: PathBuf::from("/"),
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            dev_dir: PathBuf::from("/dev"),
            kmsg: PathBuf::from("/dev/kmsg"),
            root,
            kernel_release: running_kernel(),
            env: crate::env::GuestEnv::parse(|k| std::env::var(k).ok()),
        }
    }

    /// Resolve an absolute guest path from the manifest inside [`SetupContext::layer_root`].
    pub fn layer_path(&self, guest_path: &str) -> PathBuf {
        in_root(&self.layer_root, guest_path)
    }
}

/// `root` joined with an absolute path, treating the path as relative to `root`.
pub fn in_root(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// `uname -r`, or `unknown` when the syscall fails.
pub fn running_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_string())
}
