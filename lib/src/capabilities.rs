//! `capabilities`: which driver capability each NVIDIA userspace library and program belongs
//! to, named as the NVIDIA container toolkit names them (`NVIDIA_DRIVER_CAPABILITIES`), so a
//! workload asks for `compute,utility` or `video` and gets exactly those files.
//!
//! One table, keyed by the library's stem (the file name before `.so`), tested against the real
//! driver fixtures: a library the table does not know is a gap to fill here, never guessed.

pub use gpu_passthrough_guest_contract::capability::{Capability, CapabilitySet};

/// Library stems (file name before `.so`) per capability.
const LIBRARIES: &[(Capability, &[&str])] = &[
    (
        Capability::Compute,
        &[
            "libcuda",
            "libcudadebugger",
            "libnvidia-allocator",
            "libnvidia-compiler",
            "libnvidia-fatbinaryloader",
            "libnvidia-gpucomp",
            "libnvidia-nvvm",
            "libnvidia-opencl",
            "libnvidia-pkcs11",
            "libnvidia-pkcs11-openssl3",
            "libnvidia-ptxjitcompiler",
        ],
    ),
    (Capability::Utility, &["libnvidia-cfg", "libnvidia-ml"]),
    (
        Capability::Video,
        &[
            "libnvcuvid",
            "libnvidia-encode",
            "libnvidia-opticalflow",
            "libvdpau_nvidia",
        ],
    ),
    (
        Capability::Graphics,
        &[
            "libEGL_nvidia",
            "libGLESv1_CM_nvidia",
            "libGLESv2_nvidia",
            "libGLX_nvidia",
            "libnvidia-cbl",
            "libnvidia-eglcore",
            "libnvidia-egl-gbm",
            "libnvidia-egl-wayland",
            "libnvidia-fbc",
            "libnvidia-glcore",
            "libnvidia-glsi",
            "libnvidia-glvkspirv",
            "libnvidia-rtcore",
            "libnvidia-tls",
            "libnvidia-vulkan-producer",
            "libnvoptix",
        ],
    ),
    (Capability::Display, &["libglxserver_nvidia", "nvidia_drv"]),
    (Capability::Ngx, &["libnvidia-ngx"]),
];

/// Programs per capability.
const PROGRAMS: &[(Capability, &[&str])] = &[
    (
        Capability::Utility,
        &[
            "nvidia-smi",
            "nvidia-debugdump",
            "nvidia-persistenced",
            "nvidia-modprobe",
        ],
    ),
    (
        Capability::Compute,
        &["nvidia-cuda-mps-control", "nvidia-cuda-mps-server"],
    ),
];

/// The capability of a library, from its file name (`libcuda.so.535.261.03`,
/// `libnvidia-encode.so.1`); `None` for a library the table does not know.
pub fn of_library(file_name: &str) -> Option<Capability> {
    let stem = file_name.split(".so").next()?;
    LIBRARIES
        .iter()
        .find(|(_, stems)| stems.contains(&stem))
        .map(|(c, _)| *c)
}

/// The capability of a program (`nvidia-smi`); `None` when the table does not know it.
pub fn of_program(name: &str) -> Option<Capability> {
    PROGRAMS
        .iter()
        .find(|(_, names)| names.contains(&name))
        .map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_classified_by_stem_whatever_the_version_suffix() {
        assert_eq!(
            of_library("libcuda.so.535.261.03"),
            Some(Capability::Compute)
        );
        assert_eq!(of_library("libcuda.so.1"), Some(Capability::Compute));
        assert_eq!(
            of_library("libnvcuvid.so.535.309.01"),
            Some(Capability::Video)
        );
        assert_eq!(of_library("libnvidia-encode.so.1"), Some(Capability::Video));
        assert_eq!(
            of_library("libnvidia-ml.so.535.309.01"),
            Some(Capability::Utility)
        );
        assert_eq!(of_library("libEGL_nvidia.so.0"), Some(Capability::Graphics));
        assert_eq!(of_library("libfoo.so.1"), None);
        assert_eq!(of_program("nvidia-smi"), Some(Capability::Utility));
        assert_eq!(of_program("bash"), None);
    }

    #[test]
    fn every_stem_is_listed_once() {
        let mut stems: Vec<&str> = LIBRARIES
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        let n = stems.len();
        stems.sort_unstable();
        stems.dedup();
        assert_eq!(stems.len(), n);
    }
}
