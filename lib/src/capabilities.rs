//! `capabilities`: which driver capability each NVIDIA userspace library and program belongs
//! to, named as the NVIDIA container toolkit names them (`NVIDIA_DRIVER_CAPABILITIES`), so a
//! workload asks for `compute,utility` or `video` and gets exactly those files.
//!
//! One table, keyed by the library's stem (the file name before `.so`), tested against the real
//! driver fixtures: a library the table does not know is a gap to fill here, never guessed.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A driver capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// CUDA and OpenCL: `libcuda`, the PTX JIT, NVVM.
    Compute,
    /// Management: `libnvidia-ml`, `libnvidia-cfg`, `nvidia-smi`.
    Utility,
    /// Video decode and encode: NVDEC (`libnvcuvid`), NVENC (`libnvidia-encode`), optical flow.
    Video,
    /// OpenGL, EGL, Vulkan, OptiX.
    Graphics,
    /// The X server driver.
    Display,
    /// NVIDIA NGX (DLSS).
    Ngx,
}

impl Capability {
    /// Every capability, in the order they are listed.
    pub const ALL: [Capability; 6] = [
        Capability::Compute,
        Capability::Utility,
        Capability::Video,
        Capability::Graphics,
        Capability::Display,
        Capability::Ngx,
    ];

    /// The name `NVIDIA_DRIVER_CAPABILITIES` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Compute => "compute",
            Capability::Utility => "utility",
            Capability::Video => "video",
            Capability::Graphics => "graphics",
            Capability::Display => "display",
            Capability::Ngx => "ngx",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown driver capability `{s}`: use {} or all",
                    Capability::ALL.map(Capability::as_str).join(", ")
                )
            })
    }
}

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

/// A set of capabilities, as `NVIDIA_DRIVER_CAPABILITIES` writes it: `compute,utility`, or `all`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapabilitySet(pub BTreeSet<Capability>);

impl CapabilitySet {
    /// Every capability.
    pub fn all() -> Self {
        CapabilitySet(Capability::ALL.into_iter().collect())
    }

    /// The container toolkit's default when nothing is asked for: `compute,utility`.
    pub fn toolkit_default() -> Self {
        CapabilitySet([Capability::Compute, Capability::Utility].into())
    }

    /// Whether `c` is in the set.
    pub fn contains(&self, c: Capability) -> bool {
        self.0.contains(&c)
    }
}

impl FromStr for CapabilitySet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        if words.contains(&"all") {
            return Ok(CapabilitySet::all());
        }
        words
            .into_iter()
            .map(str::parse)
            .collect::<Result<BTreeSet<_>, _>>()
            .map(CapabilitySet)
    }
}

impl fmt::Display for CapabilitySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|c| c.as_str()).collect();
        f.write_str(&names.join(","))
    }
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
    fn sets_parse_as_the_toolkit_writes_them() {
        let s: CapabilitySet = "compute, utility".parse().unwrap();
        assert_eq!(s, CapabilitySet::toolkit_default());
        assert_eq!(s.to_string(), "compute,utility");
        assert_eq!(
            "all".parse::<CapabilitySet>().unwrap(),
            CapabilitySet::all()
        );
        let err = "compute,vidoe".parse::<CapabilitySet>().unwrap_err();
        assert!(err.contains("vidoe") && err.contains("video"), "{err}");
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
