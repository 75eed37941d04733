//! `versions`: the driver-upgrade workflow over the registry.
//!
//! - [`add`]: download a new release's artifacts, unpack and inspect them against the release
//!   (vermagic, driver version, dependencies, firmware, libraries), and only then write a pinned
//!   entry into a registry file: the diff a reviewer reads.
//! - [`pin`]: fill in the digests and sizes a release lacks, by downloading.
//! - [`verify`]: re-check every pinned artifact, from its mirrors or from the cache, and decide
//!   the verdict ([`VerifyReport::verdict`]).
//!
//! - [`diff`]: what changes from one release to another, for the reviewer of an upgrade.
//!
//! Nothing is written to a registry file unless every check passed.

pub mod build;
pub mod deep;
pub mod diff;
pub mod provenance;

pub use diff::{DiffError, ReleaseDiff, compare, diff};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::archive::ArchiveError;
use crate::archive::tar::{Limits, extract_tar};
use crate::fetch::{FetchError, Fetched, Fetcher, Progress};
use crate::inspect::{Expectations, Inventory, SigningRule, Trees, inspect};
use crate::registry::{
    Arch, Artifact, ArtifactKind, ArtifactPin, ModuleFlavor, Registry, RegistryError, Release,
    Signer, pin_artifacts, write_release,
};

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
    /// The artifacts do not fit the release; the message names each file.
    #[error("release refused, registry unchanged: {0}")]
    Refused(String),
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

impl VersionsError {
    /// Whether this is a verification failure (a digest, a size cap, an inspection): a
    /// reviewer's matter, not a passing fault.
    pub fn is_verification_failure(&self) -> bool {
        match self {
            VersionsError::Fetch { source, .. } => matches!(
                source,
                FetchError::DigestMismatch { .. }
                    | FetchError::SizeCap { .. }
                    | FetchError::UnpinnedCap { .. }
            ),
            VersionsError::Unpack { .. } | VersionsError::Refused(_) => true,
            _ => false,
        }
    }

    /// Whether a safety rule refused the request (an unpinned artifact).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            VersionsError::Fetch {
                source: FetchError::Unpinned { .. },
                ..
            }
        )
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

/// A new release to add.
#[derive(Debug, Clone)]
pub struct AddRequest {
    /// The registry file to write (created if missing).
    pub file: PathBuf,
    /// Name of the new release.
    pub release: String,
    /// The guest kernel's `uname -r`.
    pub kernel_version: String,
    /// The NVIDIA driver version (required with NVIDIA artifacts).
    pub driver_version: Option<String>,
    /// NVIDIA kernel module flavor, checked against the modules' `license` fields.
    pub flavor: Option<ModuleFlavor>,
    /// Whether the release ships GSP firmware (`false`: proprietary only, no firmware needed).
    pub gsp: bool,
    /// Architecture of the artifacts.
    pub arch: Arch,
    /// Kind → URLs (the first is the primary, the rest mirrors).
    pub artifacts: BTreeMap<ArtifactKind, Vec<String>>,
    /// Make it the default release.
    pub default: bool,
    /// Overwrite a release of the same name in the file.
    pub replace: bool,
    /// Largest download accepted per artifact; `None` takes the fetcher's default cap for
    /// downloads without a pinned size.
    pub max_download_bytes: Option<u64>,
    /// Who signed the NVIDIA modules: each must carry that signature, and the release records
    /// it. `None`: no signature is required.
    pub signer: Option<Signer>,
    /// The guest kernel refuses unsigned modules (`CONFIG_MODULE_SIG_FORCE=y`): every module must
    /// be signed and a signer named; the release records it.
    pub module_sig_force: bool,
}

/// The fetcher the registry workflows use: the artifact cache in `cache_dir`, default limits.
pub fn fetcher(cache_dir: &Path) -> Result<Fetcher, FetchError> {
    Fetcher::new(cache_dir, crate::fetch::FetchOptions::default())
}

/// `KIND=URL` pairs → kind → URLs in the order given: the first URL of a kind is the primary,
/// the same kind again adds a mirror. The error names the pair and the expected form.
pub fn artifact_urls<S: AsRef<str>>(
    pairs: &[S],
) -> Result<BTreeMap<ArtifactKind, Vec<String>>, String> {
    let mut out: BTreeMap<ArtifactKind, Vec<String>> = BTreeMap::new();
    for pair in pairs {
        let pair = pair.as_ref();
        let (kind, url) = pair.split_once('=').ok_or_else(|| {
            format!("`{pair}`: expected KIND=URL, e.g. kernel=https://example.com/vmlinuz")
        })?;
        let kind: ArtifactKind = kind.parse().map_err(|e: String| format!("`{pair}`: {e}"))?;
        out.entry(kind).or_default().push(url.to_string());
    }
    Ok(out)
}

/// What [`add`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct AddReport {
    /// The release as written.
    pub release: Release,
    /// The registry file.
    pub registry: String,
    /// What the inspection found (none for a kernel-only release).
    pub inspected: Option<InspectionSummary>,
}

/// The inspected contents of a release's NVIDIA artifacts.
#[derive(Debug, Clone, Serialize)]
pub struct InspectionSummary {
    /// Modules in load order.
    pub modules: Vec<String>,
    /// Firmware files, relative to the firmware directory.
    pub firmware: Vec<String>,
    /// Libraries by real file name.
    pub libraries: Vec<String>,
}

impl From<&Inventory> for InspectionSummary {
    fn from(inv: &Inventory) -> Self {
        InspectionSummary {
            modules: inv.modules.iter().map(|m| m.name.clone()).collect(),
            firmware: inv
                .firmware
                .iter()
                .map(|f| f.rel.display().to_string())
                .collect(),
            libraries: inv.libraries.iter().map(|l| l.real_name.clone()).collect(),
        }
    }
}

/// Download, inspect and write a new pinned release into `req.file`.
///
/// Refused before any download: an existing release of that name (unless `replace`), NVIDIA
/// artifacts without a driver version. After the downloads, the artifacts are inspected against
/// the release; the file is written only if every check passed.
pub fn add(
    fetcher: &Fetcher,
    req: &AddRequest,
    progress: &dyn Progress,
) -> Result<AddReport, VersionsError> {
    if !req.replace && req.file.exists() {
        let existing = Registry::read(&req.file)?;
        if existing.release(&req.release).is_ok() {
            return Err(RegistryError::Exists {
                file: req.file.display().to_string(),
                release: req.release.clone(),
            }
            .into());
        }
    }
    let versions = [
        ("kernel_version", Some(&req.kernel_version)),
        ("driver_version", req.driver_version.as_ref()),
    ];
    for (field, value) in versions {
        if let Some(problem) = value.and_then(|v| crate::registry::version_string_problem(v)) {
            return Err(VersionsError::BadVersion { field, problem });
        }
    }
    let has_driver_artifacts = req.artifacts.keys().any(|k| *k != ArtifactKind::Kernel);
    if has_driver_artifacts && req.driver_version.is_none() {
        return Err(VersionsError::NoDriverVersion);
    }

    let mut fetched: BTreeMap<ArtifactKind, (Vec<String>, Fetched)> = BTreeMap::new();
    for (kind, urls) in &req.artifacts {
        tracing::info!("downloading {kind}");
        let got = fetcher
            .fetch_unpinned(urls, req.max_download_bytes, progress)
            .map_err(|source| VersionsError::Fetch {
                what: kind.to_string(),
                source,
            })?;
        fetched.insert(*kind, (urls.clone(), got));
    }

    let inventory = match &req.driver_version {
        Some(driver_version) if has_driver_artifacts => Some(inspect_artifacts(
            &fetched,
            &Expectations {
                kernel_version: &req.kernel_version,
                driver_version,
                arch: req.arch,
                flavor: req.flavor,
                gsp: req.gsp,
                signing: SigningRule {
                    signer: req.signer.as_ref(),
                    module_sig_force: req.module_sig_force,
                },
            },
        )?),
        _ => None,
    };

    let artifacts = fetched
        .iter()
        .map(|(kind, (urls, got))| Artifact {
            kind: *kind,
            urls: urls.clone(),
            sha256: Some(got.sha256),
            size: Some(got.size),
        })
        .collect();
    let release = Release {
        name: req.release.clone(),
        kernel_version: req.kernel_version.clone(),
        driver_version: req.driver_version.clone(),
        module_flavor: req.flavor,
        gsp: req.gsp,
        vgpu: None,
        signer: req.signer.clone(),
        module_sig_force: req.module_sig_force,
        build: None,
        default: req.default,
        artifacts: BTreeMap::from([(req.arch, artifacts)]),
        source: req.file.display().to_string(),
    };
    write_release(&req.file, &release, req.replace)?;
    Ok(AddReport {
        release,
        registry: req.file.display().to_string(),
        inspected: inventory.as_ref().map(InspectionSummary::from),
    })
}

/// Extract every tar artifact into a scratch directory and run the module, firmware and library
/// checks against the release.
fn inspect_artifacts(
    fetched: &BTreeMap<ArtifactKind, (Vec<String>, Fetched)>,
    expect: &Expectations,
) -> Result<Inventory, VersionsError> {
    let scratch = tempfile::tempdir().map_err(VersionsError::Scratch)?;
    let mut roots: BTreeMap<ArtifactKind, PathBuf> = BTreeMap::new();
    for (kind, (urls, got)) in fetched {
        if *kind == ArtifactKind::Kernel {
            continue;
        }
        let dest = scratch.path().join(kind.as_str());
        extract_tar(&got.path, &dest, &Limits::default()).map_err(|source| {
            VersionsError::Unpack {
                kind: *kind,
                url: urls[0].clone(),
                source,
            }
        })?;
        roots.insert(*kind, dest);
    }
    let root = |k: ArtifactKind| roots.get(&k).map(PathBuf::as_path);
    let trees = Trees {
        nvidia_modules: root(ArtifactKind::NvidiaModules),
        kernel_modules: root(ArtifactKind::KernelModules),
        firmware: root(ArtifactKind::NvidiaFirmware),
        driver_libs: root(ArtifactKind::NvidiaDriverLibs),
    };
    inspect(expect, &trees)
        .map_err(|e| VersionsError::Refused(relative_to(&e.to_string(), scratch.path())))
}

/// Paths in messages are inside the scratch directory, which is gone once we return: show them
/// relative to the artifact (`nvidia-modules/lib/modules/.../nvidia.ko`).
fn relative_to(message: &str, scratch: &Path) -> String {
    message.replace(&format!("{}/", scratch.display()), "")
}

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

/// [`verify`], and then re-hash what the cache at `cache_dir` trusts by presence: every unpacked
/// artifact tree and every built layer, against the digests recorded when they were made; and
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
    report.cache = deep::verify_cache(cache_dir);
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
