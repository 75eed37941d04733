//! `registry`: guest kernel release → NVIDIA driver → pinned artifacts. To be written; the shared
//! vocabulary types below are fixed so that other modules can use them meanwhile.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A CPU architecture a release has artifacts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// 64-bit x86.
    #[serde(rename = "x86_64")]
    X86_64,
    /// 64-bit Arm.
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The name used in the registry and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The ELF `e_machine` value of this architecture's binaries and kernel modules.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,   // EM_X86_64
            Arch::Aarch64 => 183, // EM_AARCH64
        }
    }

    /// The architecture this program was built for.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(format!(
                "unknown architecture `{other}`: use x86_64 or aarch64"
            )),
        }
    }
}

/// What an artifact holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// The guest kernel image.
    Kernel,
    /// A tar of the guest kernel's own modules (`lib/modules/<release>/...`).
    KernelModules,
    /// A tar of the NVIDIA kernel modules built for the guest kernel.
    NvidiaModules,
    /// A tar of the GPU firmware (`lib/firmware/nvidia/<version>/...`).
    NvidiaFirmware,
    /// A tar of the NVIDIA userspace libraries and tools.
    NvidiaDriverLibs,
}

impl ArtifactKind {
    /// Every kind, in registry order.
    pub const ALL: [ArtifactKind; 5] = [
        ArtifactKind::Kernel,
        ArtifactKind::KernelModules,
        ArtifactKind::NvidiaModules,
        ArtifactKind::NvidiaFirmware,
        ArtifactKind::NvidiaDriverLibs,
    ];

    /// The name used in the registry and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Kernel => "kernel",
            ArtifactKind::KernelModules => "kernel-modules",
            ArtifactKind::NvidiaModules => "nvidia-modules",
            ArtifactKind::NvidiaFirmware => "nvidia-firmware",
            ArtifactKind::NvidiaDriverLibs => "nvidia-driver-libs",
        }
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArtifactKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ArtifactKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown artifact kind `{s}`: use one of kernel, kernel-modules, \
                     nvidia-modules, nvidia-firmware, nvidia-driver-libs"
                )
            })
    }
}

/// Which NVIDIA kernel modules a release carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleFlavor {
    /// The open GPU kernel modules (Turing and newer; needs GSP firmware).
    Open,
    /// The proprietary modules.
    Proprietary,
}

impl ModuleFlavor {
    /// The name used in the registry and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleFlavor::Open => "open",
            ModuleFlavor::Proprietary => "proprietary",
        }
    }
}

impl fmt::Display for ModuleFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModuleFlavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(ModuleFlavor::Open),
            "proprietary" => Ok(ModuleFlavor::Proprietary),
            other => Err(format!(
                "unknown module flavor `{other}`: use open or proprietary"
            )),
        }
    }
}
