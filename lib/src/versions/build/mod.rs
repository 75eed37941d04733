//! `versions build`: make a release's `nvidia-modules` artifact from NVIDIA's module source and
//! the kernel's headers, in a sandbox, reproducibly; inspect it as `versions add` would; put it
//! in the cache (and `--out DIR`); write the pinned release with its inputs and provenance.
//! [`verify_rebuild`] builds a release again from its pinned inputs and compares.
//!
//! Refused before compiling (naming the culprit and the fix): an existing release (without
//! `replace`), headers of another kernel, a source of another driver version or flavor, a
//! compiler of another major version than the kernel's, a missing tool, a kernel that loads
//! signed modules only when no key is given. The same inputs again are a cache hit: the
//! artifact recorded under the key over every input's digest, no compile.

mod cache;
mod error;
mod rebuild;
mod request;

pub use cache::{BUILDER, BuildRecord, BuiltModule};
pub use error::BuildError;
pub use rebuild::{RebuildReport, RebuildRequest, verify_rebuild};
pub use request::{BuildInputs, BuildRequest};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::driver_build::{self, Stage};
use crate::fetch::{Fetched, Fetcher, Progress};
use crate::registry::{Artifact, ArtifactKind, BuildProvenance, Release, write_release};
use cache::{Spec, build_or_reuse};
use request::check_request;

/// What [`build`] did.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The release as written.
    pub release: Release,
    /// The registry file.
    pub registry: String,
    /// The artifact's file name.
    pub file_name: String,
    /// The artifact in the content-addressed cache.
    pub cached: PathBuf,
    /// Its copy in `--out DIR`.
    pub published: Option<PathBuf>,
    /// Its digest (hex).
    pub sha256: String,
    /// Its size.
    pub size: u64,
    /// The modules.
    pub modules: Vec<BuiltModule>,
    /// No compile: the same inputs were built before.
    pub cache_hit: bool,
    /// Where the build's logs are.
    pub logs: PathBuf,
    /// Seconds the whole command took.
    pub seconds: f64,
}

/// One fetched input.
struct Input {
    kind: ArtifactKind,
    urls: Vec<String>,
    got: Fetched,
}

/// Build, inspect, cache and publish the modules `req` describes, and write the pinned release.
/// `progress` sees the downloads, `stage` each step.
pub fn build(
    fetcher: &Fetcher,
    cache_dir: &Path,
    req: &BuildRequest,
    progress: &dyn Progress,
    stage: &dyn Fn(Stage),
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    check_request(req)?;
    let mut inputs = Vec::new();
    let mut fetch = |kind: ArtifactKind, what: String, urls: &[String]| {
        stage(Stage::Fetch {
            kind: kind.to_string(),
            url: urls[0].clone(),
        });
        let got = fetcher
            .fetch_unpinned(urls, req.max_download_bytes, progress)
            .map_err(|source| BuildError::Fetch { what, source })?;
        inputs.push(Input {
            kind,
            urls: urls.to_vec(),
            got,
        });
        Ok::<(), BuildError>(())
    };
    let i = &req.inputs;
    fetch(
        ArtifactKind::NvidiaKernelSource,
        "nvidia-kernel-source".into(),
        &i.source,
    )?;
    for (n, url) in i.headers.iter().enumerate() {
        fetch(
            ArtifactKind::KernelHeaders,
            format!("kernel-headers #{}", n + 1),
            std::slice::from_ref(url),
        )?;
    }
    for (n, url) in i.patches.iter().enumerate() {
        fetch(
            ArtifactKind::SourcePatch,
            format!("source-patch #{}", n + 1),
            std::slice::from_ref(url),
        )?;
    }
    for (kind, urls) in &i.others {
        fetch(*kind, kind.to_string(), urls)?;
    }

    let spec = Spec {
        kernel_version: &req.kernel_version,
        driver_version: &req.driver_version,
        flavor: req.flavor,
        arch: req.arch,
        signing: req.signing.as_ref(),
        gsp: req.gsp,
        limits: req.limits,
        jobs: req.jobs,
    };
    let built = build_or_reuse(fetcher, cache_dir, &spec, &inputs, true, stage)?;

    stage(Stage::Publish);
    let published = match &req.out_dir {
        Some(dir) => Some(publish(&built.cached, dir, &built.record.file_name)?),
        None => None,
    };
    let url = match (&req.base_url, &published) {
        (Some(base), _) => format!("{}/{}", base.trim_end_matches('/'), built.record.file_name),
        (None, Some(path)) => file_url(path),
        (None, None) => file_url(&built.cached),
    };
    let mut artifacts = vec![Artifact {
        kind: ArtifactKind::NvidiaModules,
        urls: vec![url],
        sha256: Some(built.digest),
        size: Some(built.record.size),
    }];
    artifacts.extend(inputs.iter().map(|input| Artifact {
        kind: input.kind,
        urls: input.urls.clone(),
        sha256: Some(input.got.sha256),
        size: Some(input.got.size),
    }));
    // Registry order: by kind, inputs of a kind in the order given.
    artifacts.sort_by_key(|a| ArtifactKind::ALL.iter().position(|k| *k == a.kind));
    let release = Release {
        name: req.release.clone(),
        kernel_version: req.kernel_version.clone(),
        driver_version: Some(req.driver_version.clone()),
        module_flavor: Some(req.flavor),
        gsp: req.gsp,
        vgpu: None,
        default: req.default,
        signer: built.record.signer.clone(),
        module_sig_force: built.record.module_sig_force,
        build: Some(BuildProvenance {
            builder: BUILDER.into(),
            compiler: built.record.compiler.clone(),
            sandbox: built.record.sandbox.clone(),
            source_date_epoch: driver_build::SOURCE_DATE_EPOCH,
        }),
        artifacts: BTreeMap::from([(req.arch, artifacts)]),
        source: req.file.display().to_string(),
    };
    write_release(&req.file, &release, req.replace)?;
    Ok(BuildReport {
        release,
        registry: req.file.display().to_string(),
        file_name: built.record.file_name.clone(),
        cached: built.cached,
        published,
        sha256: built.record.sha256.clone(),
        size: built.record.size,
        modules: built.record.modules.clone(),
        cache_hit: built.cache_hit,
        logs: built.logs,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copy `file` into `dir` as `name`, atomically.
fn publish(file: &Path, dir: &Path, name: &str) -> Result<PathBuf, BuildError> {
    let dest = dir.join(name);
    let err = |source| BuildError::Write {
        path: dest.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let bytes = fs::read(file).map_err(err)?;
    crate::fsutil::write_atomic(&dest, &bytes).map_err(err)?;
    Ok(dest)
}

fn file_url(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("file://{}", absolute.display())
}

/// A URL's last path segment, for messages (`nv-pci-exclude-bars.patch`).
fn url_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or(url).to_string()
}
