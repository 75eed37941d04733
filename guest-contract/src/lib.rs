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

/// The kernel command-line word that turns NVLink off in the guest's `nvidia` module: for a
/// GPU of an NVLink baseboard whose VM has no NVSwitch (or a one-GPU fabric partition), whose
/// links cannot train. The guest init passes it to the module as modprobe would.
pub const NVLINK_DISABLE: &str = "nvidia.NVreg_NvLinkDisable=1";

/// The parameters the kernel command line gives module `module` (`module.key=value` words),
/// the way modprobe reads `/proc/cmdline`: the kernel itself applies such words only to
/// built-in modules, and the guest init loads with `finit_module`, not modprobe. `-` and `_`
/// compare alike in the module name; quoted values with spaces are not supported.
pub fn cmdline_module_params(cmdline: &str, module: &str) -> Vec<String> {
    let module = normalize_module_name(module);
    cmdline
        .split_whitespace()
        .filter_map(|word| {
            let (name, param) = word.split_once('.')?;
            (normalize_module_name(name) == module
                && param.contains('=')
                && !param.starts_with('='))
            .then(|| param.to_owned())
        })
        .collect()
}

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

    #[test]
    fn module_parameters_are_read_from_the_command_line_as_modprobe_does() {
        let cmdline = "console=ttyS0 HAS_GPU=1 nvidia.NVreg_NvLinkDisable=1 nvidia-drm.modeset=1 nvidia_uvm.x nvidia.=1\n";
        assert_eq!(
            cmdline_module_params(cmdline, "nvidia"),
            ["NVreg_NvLinkDisable=1"]
        );
        assert_eq!(cmdline_module_params(cmdline, "nvidia_drm"), ["modeset=1"]);
        assert!(cmdline_module_params(cmdline, "nvidia-uvm").is_empty());
        assert_eq!(
            NVLINK_DISABLE.split_once('.').map(|(m, _)| m),
            Some("nvidia")
        );
    }
}
