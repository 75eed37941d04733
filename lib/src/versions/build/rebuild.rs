//! `versions verify --rebuild`: a release built again from its pinned inputs, and the modules
//! that differ from the pinned ones.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::cache::{Spec, build_or_reuse};
use super::{BuildError, Input};
use crate::archive::ArchiveError;
use crate::archive::tar::Limits;
use crate::driver_build::sandbox::SandboxLimits;
use crate::driver_build::{SigningKey, Stage};
use crate::fetch::{Fetcher, Progress};
use crate::registry::{Arch, ArtifactKind, Registry};

/// What [`verify_rebuild`] found.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// The release.
    pub release: String,
    /// The architecture rebuilt.
    pub arch: Arch,
    /// The pinned `nvidia-modules` digest (hex).
    pub expected_sha256: String,
    /// The rebuilt artifact's digest (hex).
    pub actual_sha256: String,
    /// Modules whose bytes differ, or that only one side has.
    pub differing: Vec<String>,
    /// The release's modules are signed and no key was given: modules were compared with their
    /// appended signatures removed.
    pub without_signatures: bool,
    /// Where the rebuild's logs are.
    pub logs: PathBuf,
}

impl RebuildReport {
    /// Whether the rebuild gave the pinned modules.
    pub fn matches(&self) -> bool {
        self.differing.is_empty()
            && (self.without_signatures || self.expected_sha256 == self.actual_sha256)
    }
}

impl crate::outcome::ReportOutcome for RebuildReport {
    fn outcome(&self) -> Option<crate::outcome::Outcome> {
        (!self.matches()).then_some(crate::outcome::Outcome::VerificationFailed)
    }
}

/// A release to rebuild.
#[derive(Debug, Clone)]
pub struct RebuildRequest {
    /// The release.
    pub release: String,
    /// Its architecture to rebuild (this machine's).
    pub arch: Arch,
    /// The key its modules were signed with, if they were and it is at hand.
    pub signing: Option<SigningKey>,
}

/// Build `release`'s modules for `arch` again from its pinned inputs, in a fresh sandbox and
/// without the build cache, and compare with its pinned `nvidia-modules`. A release whose
/// modules are signed is rebuilt with `signing` when given; without it, the modules are
/// compared with their signatures removed.
pub fn verify_rebuild(
    fetcher: &Fetcher,
    cache_dir: &Path,
    registry: &Registry,
    req: &RebuildRequest,
    progress: &dyn Progress,
    stage: &dyn Fn(Stage),
) -> Result<RebuildReport, BuildError> {
    let (release, arch, signing) = (req.release.as_str(), req.arch, req.signing.as_ref());
    let found = registry.release(release)?;
    let not_built = |what: &str| BuildError::NotBuilt {
        release: release.to_string(),
        what: what.to_string(),
    };
    let pinned = found
        .artifact(arch, ArtifactKind::NvidiaModules)
        .ok_or_else(|| not_built(&format!("it has no {arch} nvidia-modules artifact")))?;
    let expected = pinned
        .sha256
        .ok_or_else(|| not_built("its nvidia-modules artifact is unpinned"))?;
    let (Some(driver_version), Some(flavor)) = (&found.driver_version, found.module_flavor) else {
        return Err(not_built("it has no driver_version or module_flavor"));
    };
    let mut inputs = Vec::new();
    for (n, a) in found
        .artifacts
        .get(&arch)
        .into_iter()
        .flatten()
        .filter(|a| a.kind.is_build_input())
        .enumerate()
    {
        stage(Stage::Fetch {
            kind: a.kind.to_string(),
            url: a.urls.first().cloned().unwrap_or_default(),
        });
        let got = fetcher
            .fetch(found, arch, a, progress)
            .map_err(|source| BuildError::Fetch {
                what: format!("{} #{}", a.kind, n + 1),
                source,
            })?;
        inputs.push(Input {
            kind: a.kind,
            urls: a.urls.clone(),
            got,
        });
    }
    if !inputs
        .iter()
        .any(|i| i.kind == ArtifactKind::NvidiaKernelSource)
    {
        return Err(not_built("it has no pinned nvidia-kernel-source input"));
    }
    if Arch::host() != Some(arch) {
        return Err(BuildError::OtherArch { arch });
    }
    let without_signatures = found.signer.is_some() && signing.is_none();
    let spec = Spec {
        kernel_version: &found.kernel_version,
        driver_version,
        flavor,
        arch,
        signing: if found.signer.is_some() {
            signing
        } else {
            None
        },
        gsp: found.gsp,
        limits: SandboxLimits::default(),
        jobs: None,
    };
    let built = build_or_reuse(fetcher, cache_dir, &spec, &inputs, false, stage)?;
    let mut report = RebuildReport {
        release: release.to_string(),
        arch,
        expected_sha256: expected.to_hex(),
        actual_sha256: built.record.sha256.clone(),
        differing: Vec::new(),
        without_signatures,
        logs: built.logs.clone(),
    };
    if report.expected_sha256 != report.actual_sha256 {
        let pinned_file = fetcher
            .fetch(found, arch, pinned, progress)
            .map_err(|source| BuildError::Fetch {
                what: "pinned nvidia-modules".into(),
                source,
            })?;
        report.differing = differing_modules(&pinned_file.path, &built.cached, without_signatures)?;
        if report.differing.is_empty() && !without_signatures {
            // Same modules, other packing: name the artifact itself.
            report.differing.push(built.record.file_name.clone());
        }
    }
    Ok(report)
}

/// Module file names whose bytes differ between two `nvidia-modules` artifacts (or that one
/// lacks); with `unsign`, the first one's appended signatures are removed before comparing.
fn differing_modules(
    pinned: &Path,
    rebuilt: &Path,
    unsign: bool,
) -> Result<Vec<String>, BuildError> {
    let read = |artifact: &Path, what: &str| -> Result<BTreeMap<String, Vec<u8>>, BuildError> {
        let mut out = BTreeMap::new();
        crate::archive::tar::walk_tar(artifact, &Limits::default(), &mut |entry, contents| {
            if matches!(entry.kind, crate::archive::tar::EntryKind::File { .. })
                && entry.path.extension().is_some_and(|e| e == "ko")
            {
                let mut bytes = Vec::new();
                io::Read::read_to_end(contents, &mut bytes).map_err(|source| ArchiveError::Io {
                    archive: artifact.to_path_buf(),
                    source,
                })?;
                let name = entry
                    .path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                out.insert(name, bytes);
            }
            Ok(())
        })
        .map_err(|source| BuildError::Unpack {
            what: what.to_string(),
            source: Box::new(source),
        })?;
        Ok(out)
    };
    let a = read(pinned, "the pinned nvidia-modules")?;
    let b = read(rebuilt, "the rebuilt nvidia-modules")?;
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    Ok(names
        .into_iter()
        .filter(|n| {
            let pinned = a.get(*n).map(|m| {
                if unsign {
                    strip_signature(m)
                } else {
                    m.as_slice()
                }
            });
            pinned != b.get(*n).map(Vec::as_slice)
        })
        .cloned()
        .collect())
}

/// The marker at the end of a module with an appended signature.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// A module without its appended signature (`struct module_signature`, 12 bytes ending in the
/// big-endian signature length, then the marker); unsigned modules as they are.
fn strip_signature(module: &[u8]) -> &[u8] {
    let Some(rest) = module.strip_suffix(SIGNATURE_MARKER) else {
        return module;
    };
    let Some(info_start) = rest.len().checked_sub(12) else {
        return module;
    };
    let len_bytes: [u8; 4] = rest[rest.len() - 4..].try_into().unwrap_or_default();
    let sig_len = u32::from_be_bytes(len_bytes) as usize;
    match info_start.checked_sub(sig_len) {
        Some(end) => &module[..end],
        None => module,
    }
}
