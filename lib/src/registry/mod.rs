//! `registry`: guest kernel release → NVIDIA driver → pinned artifacts.
//!
//! A registry is plain TOML (format in `versions/README.md`). The default one is embedded in the
//! binary; files given by the caller are merged over it, later files adding or replacing whole
//! releases. Every validation error names the file, the release and the field, and says the fix.

mod digest;
mod duplicates;
mod edit;
mod error;
mod parse;
mod version_string;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use digest::{DigestError, Sha256Digest};
pub use edit::{ArtifactPin, pin_artifacts, write_release};
pub use error::RegistryError;
pub use version_string::version_string_problem;

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
    /// NVIDIA's kernel module source (open or proprietary), a tarball or a `.deb`: an input of
    /// `versions build`.
    NvidiaKernelSource,
    /// One archive (tarball or `.deb`) of the kernel's build tree; several together make it.
    KernelHeaders,
    /// A patch applied to the module source before building, in registry order.
    SourcePatch,
}

impl ArtifactKind {
    /// Every kind, in registry order.
    pub const ALL: [ArtifactKind; 8] = [
        ArtifactKind::Kernel,
        ArtifactKind::KernelModules,
        ArtifactKind::NvidiaModules,
        ArtifactKind::NvidiaFirmware,
        ArtifactKind::NvidiaDriverLibs,
        ArtifactKind::NvidiaKernelSource,
        ArtifactKind::KernelHeaders,
        ArtifactKind::SourcePatch,
    ];

    /// The name used in the registry and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Kernel => "kernel",
            ArtifactKind::KernelModules => "kernel-modules",
            ArtifactKind::NvidiaModules => "nvidia-modules",
            ArtifactKind::NvidiaFirmware => "nvidia-firmware",
            ArtifactKind::NvidiaDriverLibs => "nvidia-driver-libs",
            ArtifactKind::NvidiaKernelSource => "nvidia-kernel-source",
            ArtifactKind::KernelHeaders => "kernel-headers",
            ArtifactKind::SourcePatch => "source-patch",
        }
    }

    /// Whether the kind is an input of `versions build` (what the modules were built from)
    /// rather than something a guest's layers carry.
    pub fn is_build_input(self) -> bool {
        matches!(
            self,
            ArtifactKind::NvidiaKernelSource
                | ArtifactKind::KernelHeaders
                | ArtifactKind::SourcePatch
        )
    }

    /// Whether one architecture may list several artifacts of this kind (the archives of one
    /// build tree, patches in order); every other kind appears once, mirrors in `urls`.
    pub fn allows_several(self) -> bool {
        matches!(
            self,
            ArtifactKind::KernelHeaders | ArtifactKind::SourcePatch
        )
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
                     nvidia-modules, nvidia-firmware, nvidia-driver-libs, nvidia-kernel-source, \
                     kernel-headers, source-patch"
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

/// The registry compiled into the binary (`versions/registry.toml`).
pub const EMBEDDED_TOML: &str = include_str!("../../../versions/registry.toml");

/// The `source` of releases that come from the embedded registry.
pub const EMBEDDED_SOURCE: &str = "embedded";

/// One downloadable artifact of a release, for one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// What the artifact holds.
    pub kind: ArtifactKind,
    /// Where to download it, mirrors in the order they are tried.
    pub urls: Vec<String>,
    /// The pinned digest; `None` means unpinned, which every consumer refuses.
    pub sha256: Option<Sha256Digest>,
    /// The pinned size in bytes; also the download size cap.
    pub size: Option<u64>,
}

impl Artifact {
    /// Whether the artifact has a digest every download is checked against.
    pub fn is_pinned(&self) -> bool {
        self.sha256.is_some()
    }
}

/// A guest kernel release, the NVIDIA driver that goes with it, and their artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Release {
    /// The release name, e.g. `ch-6.12.8-kernel-1.2-20251213`.
    pub name: String,
    /// The guest kernel's `uname -r`, checked against each module's vermagic.
    pub kernel_version: String,
    /// The NVIDIA driver version, when the release carries a driver.
    pub driver_version: Option<String>,
    /// Which NVIDIA kernel modules the release carries.
    pub module_flavor: Option<ModuleFlavor>,
    /// Whether the release ships (and the guest loads) GSP firmware. `false` is for proprietary
    /// releases only (GPUs without GSP, such as Pascal): the layer then carries no firmware and
    /// `nvidia` gets `NVreg_EnableGpuFirmware=0`.
    pub gsp: bool,
    /// The release's guest driver is NVIDIA's vGPU (GRID) guest driver, for these host vGPU
    /// manager branches (`vgpu_guest = true`, `vgpu_manager_branches = ["550"]`).
    pub vgpu: Option<VgpuGuest>,
    /// Whether this is the release used when none is named.
    pub default: bool,
    /// Who signed the release's modules (`signer = { subject = "...", key_id = "..." }`);
    /// `None`: unsigned modules.
    pub signer: Option<Signer>,
    /// The guest kernel refuses unsigned modules (`CONFIG_MODULE_SIG_FORCE=y`), as read from its
    /// headers when the modules were built (`module_sig_force = true`).
    pub module_sig_force: bool,
    /// How the modules were built, for a release made by `versions build` (`[releases.R.build]`);
    /// the inputs' digests are its pinned input artifacts.
    pub build: Option<BuildProvenance>,
    /// Artifacts per architecture.
    pub artifacts: BTreeMap<Arch, Vec<Artifact>>,
    /// Where the release was defined: `"embedded"` or the registry file's path.
    pub source: String,
}

/// The signer of a release's modules, as kmod's `modinfo` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signer {
    /// The CN of the signing certificate's issuer, which is what a module's signature names
    /// (`sign-file` identifies the key by issuer and serial; `modinfo`'s `signer:`). For the
    /// usual self-signed module-signing key it is the certificate's own subject.
    pub subject: String,
    /// The certificate's serial number as uppercase hex bytes joined by `:` (`modinfo`'s
    /// `sig_key:`; `sign-file` names the key by issuer and serial).
    pub key_id: String,
}

/// What a built release's modules were made with, besides its pinned inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildProvenance {
    /// The builder: this program's name and version.
    pub builder: String,
    /// The compiler's version string (`gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`).
    pub compiler: String,
    /// The sandbox's settings (tool, namespaces, limits), in words.
    pub sandbox: String,
    /// The `SOURCE_DATE_EPOCH` the build ran with.
    pub source_date_epoch: u64,
}

/// A vGPU guest release's compatibility with host vGPU managers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VgpuGuest {
    /// The host vGPU manager branches (driver major versions, e.g. `550`) it works with.
    pub manager_branches: Vec<String>,
}

impl VgpuGuest {
    /// Whether a host vGPU manager of `version` (`550.90.05`) is one of the branches.
    pub fn supports(&self, version: &str) -> bool {
        let branch = version.trim().split('.').next().unwrap_or_default();
        self.manager_branches.iter().any(|b| b == branch)
    }
}

impl Release {
    /// The artifact of `kind` for `arch`, if the release has one.
    pub fn artifact(&self, arch: Arch, kind: ArtifactKind) -> Option<&Artifact> {
        self.artifacts.get(&arch)?.iter().find(|a| a.kind == kind)
    }

    /// Whether any artifact (any arch) lacks a digest.
    pub fn has_unpinned(&self) -> bool {
        self.artifacts.values().flatten().any(|a| !a.is_pinned())
    }
}

/// Merged releases from the embedded registry and any files over it.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    releases: BTreeMap<String, Release>,
    default: Option<String>,
}

impl Registry {
    /// Refuse to add `release` to `file` when the file already defines it: `versions add` and
    /// `versions build` overwrite a release only when asked to replace it.
    pub fn refuse_existing(file: &Path, release: &str) -> Result<(), RegistryError> {
        if file.exists() && Registry::read(file)?.release(release).is_ok() {
            return Err(RegistryError::Exists {
                file: file.display().to_string(),
                release: release.to_owned(),
            });
        }
        Ok(())
    }

    /// The registry embedded in the binary.
    pub fn embedded() -> Result<Registry, RegistryError> {
        Registry::parse(EMBEDDED_TOML, EMBEDDED_SOURCE)
    }

    /// The embedded registry with each file merged over it, in order.
    pub fn load(files: &[PathBuf]) -> Result<Registry, RegistryError> {
        let mut registry = Registry::embedded()?;
        for file in files {
            registry.merge(Registry::read(file)?);
        }
        Ok(registry)
    }

    /// The registry a request needs: with a `release` named, [`Registry::load`] of `files`;
    /// without one, the embedded default alone, so that a broken registry file does not stop a
    /// request that uses no release (a plain attach).
    pub fn for_request(
        files: &[PathBuf],
        release: Option<&str>,
    ) -> Result<Registry, RegistryError> {
        match release {
            Some(_) => Registry::load(files),
            None => Registry::embedded(),
        }
    }

    /// Read and validate one registry file on its own (no embedded default).
    pub fn read(file: &Path) -> Result<Registry, RegistryError> {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|source| RegistryError::Read {
            file: name.clone(),
            source,
        })?;
        Registry::parse(&text, &name)
    }

    /// Parse and validate registry TOML; `source` names it in errors and in each release.
    pub fn parse(text: &str, source: &str) -> Result<Registry, RegistryError> {
        let releases = parse::parse(text, source)?;
        let mut registry = Registry::default();
        for release in releases {
            if release.default {
                registry.default = Some(release.name.clone());
            }
            registry.releases.insert(release.name.clone(), release);
        }
        Ok(registry)
    }

    /// Merge `later` over `self`: its releases add to or replace ours; its default, if any,
    /// becomes the default.
    pub fn merge(&mut self, later: Registry) {
        if let Some(new_default) = &later.default {
            for release in self.releases.values_mut() {
                release.default = false;
            }
            self.default = Some(new_default.clone());
        }
        for (name, mut release) in later.releases {
            // Replacing the default release without `default = true` keeps it the default.
            if self.default.as_deref() == Some(name.as_str()) {
                release.default = true;
            }
            self.releases.insert(name, release);
        }
    }

    /// The release called `name`.
    pub fn release(&self, name: &str) -> Result<&Release, RegistryError> {
        self.releases
            .get(name)
            .ok_or_else(|| RegistryError::UnknownRelease {
                name: name.to_string(),
                known: self.names(),
            })
    }

    /// The named release, or the default one when `name` is `None`.
    pub fn resolve(&self, name: Option<&str>) -> Result<&Release, RegistryError> {
        match name {
            Some(name) => self.release(name),
            None => match &self.default {
                Some(name) => self.release(name),
                None => Err(RegistryError::NoDefault {
                    known: self.names(),
                }),
            },
        }
    }

    /// Every release, sorted by name.
    pub fn releases(&self) -> impl Iterator<Item = &Release> {
        self.releases.values()
    }

    /// The default release's name, if any.
    pub fn default_name(&self) -> Option<&str> {
        self.default.as_deref()
    }

    /// The registry as TOML in the documented format (sources are not written).
    pub fn to_toml(&self) -> String {
        let mut doc = toml_edit::DocumentMut::new();
        for release in self.releases.values() {
            edit::insert_release(&mut doc, release);
        }
        doc.to_string()
    }

    fn names(&self) -> Vec<String> {
        self.releases.keys().cloned().collect()
    }
}
