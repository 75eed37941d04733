//! `paths`: where things live when the caller does not say: the artifact and layer cache, the
//! state dir, the sysfs and devices roots. One place, so the CLI and an embedding control plane
//! agree.

use std::path::PathBuf;

/// The host's sysfs.
pub const SYSFS_ROOT: &str = "/sys";
/// The host's devices directory (where `vfio/<group>` nodes appear).
pub const DEV_DIR: &str = "/dev";
/// Where attachments and the bind journal are kept.
pub const STATE_DIR: &str = "/var/lib/gpu-passthrough";
/// The system-wide cache, used by root.
pub const SYSTEM_CACHE_DIR: &str = "/var/cache/gpu-passthrough";

/// The artifact and layer cache: [`SYSTEM_CACHE_DIR`] for root, else
/// `$XDG_CACHE_HOME/gpu-passthrough`, else `~/.cache/gpu-passthrough`.
pub fn default_cache_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from(SYSTEM_CACHE_DIR);
    }
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x).join("gpu-passthrough"),
        _ => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/gpu-passthrough"),
            None => PathBuf::from(SYSTEM_CACHE_DIR),
        },
    }
}
