//! `versions verify`: re-check every pinned artifact, from its mirrors or from the cache, and
//! the verdict the rows come to.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::{VersionsError, deep};
use crate::fetch::{FetchError, Fetcher, Progress};
use crate::outcome::{Outcome, ReportOutcome};
use crate::registry::{Arch, Artifact, ArtifactKind, Registry, Release};

/// Where [`verify`] reads the bytes it checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifySource {
    /// Download from every mirror again.
    Mirrors,
    /// Re-hash the cached files.
    Cache,
}

/// The state of one artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyStatus {
    /// The bytes match the pin.
    Ok,
    /// The bytes differ from the pin (digest or size).
    Mismatch,
    /// No digest to check against.
    Unpinned,
    /// Checking the cache, and the artifact is not in it.
    NotCached,
    /// It could not be checked (network, I/O); see `error`.
    Error,
}

impl VerifyStatus {
    /// The name used in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyStatus::Ok => "ok",
            VerifyStatus::Mismatch => "mismatch",
            VerifyStatus::Unpinned => "unpinned",
            VerifyStatus::NotCached => "not-cached",
            VerifyStatus::Error => "error",
        }
    }
}

/// One artifact's check.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyRow {
    /// Release.
    pub release: String,
    /// Architecture.
    pub arch: Arch,
    /// Kind.
    pub kind: ArtifactKind,
    /// The outcome.
    pub status: VerifyStatus,
    /// The pinned digest.
    pub expected_sha256: Option<String>,
    /// The digest found.
    pub actual_sha256: Option<String>,
    /// The pinned size.
    pub expected_size: Option<u64>,
    /// The size found.
    pub actual_size: Option<u64>,
    /// The mirror checked last (none for the cache).
    pub url: Option<String>,
    /// Why it could not be checked.
    pub error: Option<String>,
}

/// Every artifact checked by [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// One row per artifact.
    pub artifacts: Vec<VerifyRow>,
    /// With [`verify_deep`]: one row per unpacked tree and built layer in the cache.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache: Vec<deep::CacheRow>,
}

/// What a [`VerifyReport`] means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every pinned artifact checked out.
    Ok,
    /// At least one artifact's bytes differ from its pin.
    Mismatch(Vec<String>),
    /// No mismatch, but at least one artifact could not be checked.
    Error(Vec<String>),
    /// Everything checked matched, but some artifacts have no pin.
    Unpinned(usize),
}

/// A mismatch is a reviewer's matter, an artifact that could not be checked a failure on the
/// way, an unpinned one refused.
impl ReportOutcome for Verdict {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Verdict::Ok => None,
            Verdict::Mismatch(_) => Some(Outcome::VerificationFailed),
            Verdict::Error(_) => Some(Outcome::Failed),
            Verdict::Unpinned(_) => Some(Outcome::Refused),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Ok => f.write_str("every pinned artifact matches"),
            Verdict::Mismatch(bad) | Verdict::Error(bad) => write!(
                f,
                "{} artifact(s) failed verification: {}; if the change upstream is legitimate, \
                 re-add or re-pin the release",
                bad.len(),
                bad.join(", ")
            ),
            Verdict::Unpinned(n) => write!(
                f,
                "{n} artifact(s) are unpinned and cannot be verified; pin them first"
            ),
        }
    }
}

impl VerifyReport {
    /// The verdict: mismatches first, then errors, then (unless allowed) unpinned artifacts.
    pub fn verdict(&self, allow_unpinned: bool) -> Verdict {
        let bad = |s: VerifyStatus| -> Vec<String> {
            self.artifacts
                .iter()
                .filter(|r| r.status == s)
                .map(|r| format!("{} {} {} ({})", r.release, r.arch, r.kind, s.as_str()))
                .collect()
        };
        let cache_bad = |s: deep::CacheStatus| -> Vec<String> {
            self.cache
                .iter()
                .filter(|r| r.status == s)
                .map(|r| format!("{} ({})", r.path.display(), s.as_str()))
                .collect()
        };
        let (mut mismatches, mut errors) = (bad(VerifyStatus::Mismatch), bad(VerifyStatus::Error));
        mismatches.extend(cache_bad(deep::CacheStatus::Mismatch));
        errors.extend(cache_bad(deep::CacheStatus::Error));
        let unpinned = bad(VerifyStatus::Unpinned).len();
        if !mismatches.is_empty() {
            let mut all = mismatches;
            all.extend(errors);
            Verdict::Mismatch(all)
        } else if !errors.is_empty() {
            Verdict::Error(errors)
        } else if unpinned > 0 && !allow_unpinned {
            Verdict::Unpinned(unpinned)
        } else {
            Verdict::Ok
        }
    }
}

/// Check every pinned artifact of `release` (every release when `None`).
pub fn verify(
    fetcher: &Fetcher,
    registry: &Registry,
    release: Option<&str>,
    source: VerifySource,
    progress: &dyn Progress,
) -> Result<VerifyReport, VersionsError> {
    let releases: Vec<&Release> = match release {
        Some(n) => vec![registry.release(n)?],
        None => registry.releases().collect(),
    };
    let mut artifacts = Vec::new();
    for release in releases {
        for (arch, list) in &release.artifacts {
            for a in list {
                artifacts.push(verify_one(fetcher, progress, release, *arch, a, source));
            }
        }
    }
    Ok(VerifyReport {
        artifacts,
        cache: Vec::new(),
    })
}

/// [`verify`], and then re-check what the cache at `cache_dir` trusts by presence: every unpacked
/// artifact tree against what its cached archive unpacks to, every built layer against the
/// digests recorded when it was made; and
/// the module signatures of every unpacked `nvidia-modules` tree of a release that names a
/// signer (or forces signatures).
pub fn verify_deep(
    fetcher: &Fetcher,
    cache_dir: &Path,
    registry: &Registry,
    release: Option<&str>,
    source: VerifySource,
    progress: &dyn Progress,
) -> Result<VerifyReport, VersionsError> {
    let mut report = verify(fetcher, registry, release, source, progress)?;
    report.cache = deep::verify_cache(fetcher, cache_dir);
    let releases: Vec<&Release> = match release {
        Some(n) => vec![registry.release(n)?],
        None => registry.releases().collect(),
    };
    report
        .cache
        .extend(deep::verify_signatures(cache_dir, releases));
    Ok(report)
}

fn verify_one(
    fetcher: &Fetcher,
    progress: &dyn Progress,
    release: &Release,
    arch: Arch,
    a: &Artifact,
    source: VerifySource,
) -> VerifyRow {
    let mut row = VerifyRow {
        release: release.name.clone(),
        arch,
        kind: a.kind,
        status: VerifyStatus::Ok,
        expected_sha256: a.sha256.map(|d| d.to_hex()),
        actual_sha256: None,
        expected_size: a.size,
        actual_size: None,
        url: None,
        error: None,
    };
    let Some(expected) = a.sha256 else {
        row.status = VerifyStatus::Unpinned;
        return row;
    };
    let result = match source {
        VerifySource::Cache => match fetcher.rehash_cached(&expected) {
            Ok(None) => {
                row.status = VerifyStatus::NotCached;
                return row;
            }
            Ok(Some(got)) => Ok(got),
            Err(e) => Err(e),
        },
        VerifySource::Mirrors => {
            // Each mirror must still serve the pinned bytes.
            let mut last = None;
            for url in &a.urls {
                row.url = Some(url.clone());
                match fetcher.fetch_unpinned(std::slice::from_ref(url), a.size, progress) {
                    Ok(got) if got.sha256 == expected && a.size.is_none_or(|s| s == got.size) => {
                        last = Some(Ok(got));
                    }
                    other => {
                        last = Some(other);
                        break;
                    }
                }
            }
            last.unwrap_or(Err(FetchError::NoUrls))
        }
    };
    match result {
        Ok(got) => {
            row.actual_sha256 = Some(got.sha256.to_hex());
            row.actual_size = Some(got.size);
            if got.sha256 != expected || a.size.is_some_and(|s| s != got.size) {
                row.status = VerifyStatus::Mismatch;
            }
        }
        Err(FetchError::SizeCap { seen, .. }) => {
            row.status = VerifyStatus::Mismatch;
            row.actual_size = Some(seen);
        }
        Err(e) => {
            row.status = VerifyStatus::Error;
            row.error = Some(crate::error_chain(&e));
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: VerifyStatus) -> VerifyRow {
        VerifyRow {
            release: "r".into(),
            arch: Arch::X86_64,
            kind: ArtifactKind::Kernel,
            status,
            expected_sha256: None,
            actual_sha256: None,
            expected_size: None,
            actual_size: None,
            url: None,
            error: None,
        }
    }

    #[test]
    fn the_verdict_puts_mismatches_before_errors_before_unpinned() {
        let report = |s: &[VerifyStatus]| VerifyReport {
            artifacts: s.iter().map(|s| row(*s)).collect(),
            cache: Vec::new(),
        };
        use VerifyStatus::*;
        assert!(matches!(
            report(&[Ok, Error, Mismatch, Unpinned]).verdict(false),
            Verdict::Mismatch(v) if v.len() == 2
        ));
        assert!(matches!(
            report(&[Error, Unpinned]).verdict(false),
            Verdict::Error(_)
        ));
        assert_eq!(report(&[Ok, Unpinned]).verdict(false), Verdict::Unpinned(1));
        assert_eq!(report(&[Ok, Unpinned]).verdict(true), Verdict::Ok);
        assert_eq!(report(&[Ok, NotCached]).verdict(false), Verdict::Ok);
    }
}
