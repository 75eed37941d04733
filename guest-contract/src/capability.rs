//! Driver capabilities as the NVIDIA container toolkit names them (`NVIDIA_DRIVER_CAPABILITIES`):
//! the builder records which ones a layer carries and which file belongs to which, the guest init
//! selects by them. One definition for both sides, so a new capability is a compile error on both.

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

/// The driver's persistence daemon: started by the guest init when the layer carries it.
pub const PERSISTENCED: &str = "nvidia-persistenced";
/// The NVSwitch fabric manager: started by the guest init when the guest has NVSwitches.
pub const FABRIC_MANAGER: &str = "nv-fabricmanager";
/// Programs the guest init runs itself: always packed, never subject to capability selection.
pub const GUEST_DAEMONS: [&str; 2] = [PERSISTENCED, FABRIC_MANAGER];

#[cfg(test)]
mod tests {
    use super::*;

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
}
