//! `versions add`: download a new release's artifacts, unpack and inspect them against the
//! release, and only then write a pinned entry into a registry file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::VersionsError;
use crate::archive::tar::{Limits, extract_tar};
use crate::fetch::{Fetched, Fetcher, Progress};
use crate::inspect::{Expectations, Inventory, SigningRule, Trees, inspect};
use crate::registry::{
    Arch, Artifact, ArtifactKind, ModuleFlavor, Registry, Release, Signer, write_release,
};

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
    if !req.replace {
        Registry::refuse_existing(&req.file, &req.release)?;
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
    let trees = Trees::from_roots(&roots);
    // Paths are inside the scratch directory, which is gone once we return: name them relative
    // to it (`nvidia-modules/lib/modules/.../nvidia.ko`).
    inspect(expect, &trees).map_err(|e| VersionsError::Refused(e.relative_to(scratch.path())))
}
