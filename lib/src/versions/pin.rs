//! `versions pin`: fill in the digests and sizes a release lacks, by downloading.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::VersionsError;
use crate::fetch::{Fetcher, Progress};
use crate::registry::{Arch, ArtifactKind, ArtifactPin, Registry, pin_artifacts};

/// One artifact [`pin`] filled in.
#[derive(Debug, Clone, Serialize)]
pub struct PinRow {
    /// Architecture.
    pub arch: Arch,
    /// Kind.
    pub kind: ArtifactKind,
    /// The digest now pinned (hex).
    pub sha256: String,
    /// The size now pinned.
    pub size: u64,
}

/// What [`pin`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PinReport {
    /// The release.
    pub release: String,
    /// The registry file written (unchanged when nothing needed pinning).
    pub registry: String,
    /// The artifacts pinned.
    pub pinned: Vec<PinRow>,
}

/// Download the artifacts of `release` that lack a digest (only `only`'s, when given) and write
/// their digests and sizes into `file`. `registries` are the files to read the release from;
/// `file` may be among them and may not exist yet (pinning an embedded release creates it).
pub fn pin(
    fetcher: &Fetcher,
    registries: &[PathBuf],
    file: &Path,
    release: &str,
    only: Option<Arch>,
    progress: &dyn Progress,
) -> Result<PinReport, VersionsError> {
    let readable: Vec<PathBuf> = registries
        .iter()
        .filter(|p| p.as_path() != file || p.exists())
        .cloned()
        .collect();
    let registry = Registry::load(&readable)?;
    let found = registry.release(release)?;
    let mut pins = Vec::new();
    for (arch, list) in &found.artifacts {
        if only.is_some_and(|a| a != *arch) {
            continue;
        }
        for a in list.iter().filter(|a| !a.is_pinned()) {
            let got = fetcher
                .fetch_unpinned(&a.urls, a.size, progress)
                .map_err(|source| VersionsError::Fetch {
                    what: format!("{arch} {}", a.kind),
                    source,
                })?;
            pins.push(ArtifactPin {
                arch: *arch,
                kind: a.kind,
                sha256: got.sha256,
                size: got.size,
            });
        }
    }
    if !pins.is_empty() {
        pin_artifacts(file, found, &pins)?;
    }
    Ok(PinReport {
        release: release.to_string(),
        registry: file.display().to_string(),
        pinned: pins
            .iter()
            .map(|p| PinRow {
                arch: p.arch,
                kind: p.kind,
                sha256: p.sha256.to_hex(),
                size: p.size,
            })
            .collect(),
    })
}
