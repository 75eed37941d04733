//! The contract between the host and the guest init, both directions:
//!
//! - [`Manifest`] (`/gpu/manifest.json`): what the initrd builder on the host tells `gpu-init`;
//! - [`report::Report`] (the `GPU-INIT {json}` console line): what `gpu-init` tells the host, the
//!   platform and the end-to-end harness;
//! - [`capability`]: the driver capabilities (`compute`, `video`, ...) both sides select by;
//! - [`normalize_module_name`]: the one rule both sides use to compare kernel module names;
//! - [`xid`]: the NVIDIA fault classifier (kernel-log lines → faults and host actions) that the
//!   host's `health` and the guest init's `GPU-XID {json}` lines share;
//! - [`printable`]: guest-derived text escaped for a terminal.
//!
//! Both types serialize and deserialize, so a field renamed here is a compile error in every
//! producer and consumer. The crate is small on purpose: the static guest init must not pull in
//! the host library's dependencies.
#![deny(missing_docs)]

pub mod capability;
pub mod disk;
mod manifest;
pub mod printable;
pub mod report;
pub mod xid;

pub use manifest::{
    DeviceNodes, FIRMWARE_DIR, Input, Library, MANIFEST_PATH, Manifest, ManifestError, Module,
    SCHEMA,
};

/// A kernel module name as the kernel compares it: file names and `depends=` may use `-`
/// (`nvidia-uvm`), the kernel's own name uses `_` (`nvidia_uvm`).
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_compare_with_underscores() {
        assert_eq!(normalize_module_name("nvidia-uvm"), "nvidia_uvm");
        assert_eq!(normalize_module_name("nvidia_drm"), "nvidia_drm");
        assert_eq!(normalize_module_name("drm-kms-helper"), "drm_kms_helper");
    }
}
