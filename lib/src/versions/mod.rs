//! `versions`: the driver-upgrade workflow over the registry.
//!
//! - [`add`]: download a new release's artifacts, unpack and inspect them against the release
//!   (vermagic, driver version, dependencies, firmware, libraries), and only then write a pinned
//!   entry into a registry file: the diff a reviewer reads.
//! - [`pin`]: fill in the digests and sizes a release lacks, by downloading.
//! - [`verify`]: re-check every pinned artifact, from its mirrors or from the cache, and decide
//!   the verdict ([`VerifyReport::verdict`]).
//!
//! - [`diff()`]: what changes from one release to another, for the reviewer of an upgrade.
//!
//! Nothing is written to a registry file unless every check passed.
//!
//! One workflow a file: `add.rs`, `pin.rs`, `verify.rs` (with `deep.rs` for the cache's own
//! records) and `diff.rs`, each with its request and report types; this file holds the error
//! they share and the release summaries of `versions list`.

mod add;
pub mod build;
pub mod deep;
pub mod diff;
mod pin;
pub mod provenance;
mod verify;

pub use add::{AddReport, AddRequest, InspectionSummary, add, artifact_urls};
pub use diff::{DiffError, ReleaseDiff, compare, diff};
pub use pin::{PinReport, PinRow, pin};
pub use verify::{
    Verdict, VerifyReport, VerifyRow, VerifySource, VerifyStatus, verify, verify_deep,
};

use std::path::Path;

use serde::Serialize;

use crate::archive::ArchiveError;
use crate::fetch::{FetchError, Fetcher};
use crate::inspect::InspectError;
use crate::outcome::{Classify, Outcome};
use crate::registry::{Arch, ArtifactKind, ModuleFlavor, Registry, RegistryError};
use crate::remedy::Remedy;

/// Errors of the upgrade workflow. Each names the artifact or release and the fix.
#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The release has NVIDIA artifacts but no driver version to check them against.
    #[error(
        "NVIDIA artifacts need a driver version: the modules and libraries are checked against it"
    )]
    NoDriverVersion,
    /// Downloading an artifact failed or its bytes did not verify.
    #[error("the {what} artifact")]
    Fetch {
        /// Which artifact (`nvidia-modules`, `x86_64 kernel`).
        what: String,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// An artifact could not be unpacked safely.
    #[error("the {kind} artifact from {url} cannot be unpacked; registry unchanged")]
    Unpack {
        /// Which artifact.
        kind: ArtifactKind,
        /// Where it came from.
        url: String,
        /// Why.
        #[source]
        source: ArchiveError,
    },
    /// The artifacts do not fit the release; the inspection names each file (relative to its
    /// artifact: the scratch tree is gone).
    #[error("release refused, registry unchanged")]
    Refused(#[source] InspectError),
    /// A kernel or driver version string that cannot be a version (it becomes a path).
    #[error("the {field} {problem}")]
    BadVersion {
        /// `kernel_version` or `driver_version`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// No scratch directory for the inspection.
    #[error("cannot create a scratch directory for inspection")]
    Scratch(#[source] std::io::Error),
}

impl Classify for VersionsError {
    fn outcome(&self) -> Outcome {
        match self {
            VersionsError::Registry(e) => e.outcome(),
            VersionsError::Fetch { source, .. } => source.outcome(),
            // A reviewer's matter: what was downloaded is not what the release says.
            VersionsError::Unpack { .. } | VersionsError::Refused { .. } => {
                Outcome::VerificationFailed
            }
            VersionsError::NoDriverVersion
            | VersionsError::BadVersion { .. }
            | VersionsError::Scratch(_) => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            VersionsError::Registry(e) => e.remedy(),
            VersionsError::Fetch { source, .. } => source.remedy(),
            VersionsError::Unpack { .. }
            | VersionsError::Refused { .. }
            | VersionsError::NoDriverVersion
            | VersionsError::BadVersion { .. }
            | VersionsError::Scratch(_) => None,
        }
    }
}

/// One release as `versions list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseSummary {
    /// Release name.
    pub name: String,
    /// The guest kernel's `uname -r`.
    pub kernel_version: String,
    /// The NVIDIA driver version.
    pub driver_version: Option<String>,
    /// The module flavor.
    pub module_flavor: Option<ModuleFlavor>,
    /// The default release.
    pub default: bool,
    /// Architectures with artifacts.
    pub arches: Vec<Arch>,
    /// Artifacts over all architectures.
    pub artifacts: usize,
    /// Of which unpinned (refused by every consumer).
    pub unpinned: usize,
    /// The file (or `embedded`) it came from.
    pub source: String,
}

/// Every release of `registry`, summarised.
pub fn summaries(registry: &Registry) -> Vec<ReleaseSummary> {
    registry
        .releases()
        .map(|r| ReleaseSummary {
            name: r.name.clone(),
            kernel_version: r.kernel_version.clone(),
            driver_version: r.driver_version.clone(),
            module_flavor: r.module_flavor,
            default: r.default,
            arches: r.artifacts.keys().copied().collect(),
            artifacts: r.artifacts.values().map(Vec::len).sum(),
            unpinned: r
                .artifacts
                .values()
                .flatten()
                .filter(|a| !a.is_pinned())
                .count(),
            source: r.source.clone(),
        })
        .collect()
}

/// The fetcher the registry workflows use: the artifact cache in `cache_dir`, default limits.
pub fn fetcher(cache_dir: &Path) -> Result<Fetcher, FetchError> {
    Fetcher::new(cache_dir, crate::fetch::FetchOptions::default())
}
