//! The build itself behind its cache: the key over every input, the record kept under it, and
//! on a miss the sandboxed compile, pack and inspection.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{BuildError, Input, file_url, url_name};
use crate::archive::tar::{Limits, extract_tar};
use crate::driver_build::sandbox::SandboxLimits;
use crate::driver_build::{self, Job, SigningKey, Stage, pack};
use crate::fetch::Fetcher;
use crate::inspect::{Expectations, SigningRule, Trees, inspect};
use crate::registry::{Arch, ArtifactKind, ModuleFlavor, Sha256Digest, Signer};

/// The builder recorded in a release's provenance.
pub const BUILDER: &str = concat!("gpu-passthrough ", env!("CARGO_PKG_VERSION"));

/// Bump when a change of the build recipe changes the modules it makes: old cache entries then
/// no longer match.
pub(super) const RECIPE: &str = "1";

/// One built module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltModule {
    /// Its file name (`nvidia.ko`).
    pub name: String,
    /// Its digest (hex).
    pub sha256: String,
    /// Its size.
    pub size: u64,
}

/// What a build made, as recorded in the cache under its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// The artifact's file name.
    pub file_name: String,
    /// The artifact's digest (hex).
    pub sha256: String,
    /// The artifact's size.
    pub size: u64,
    /// The modules in it.
    pub modules: Vec<BuiltModule>,
    /// The compiler's version line.
    pub compiler: String,
    /// The sandbox's settings.
    pub sandbox: String,
    /// Who signed.
    pub signer: Option<Signer>,
    /// The kernel's CONFIG_MODULE_SIG_FORCE.
    pub module_sig_force: bool,
}

/// What decides a build's output.
pub(super) struct Spec<'a> {
    pub(super) kernel_version: &'a str,
    pub(super) driver_version: &'a str,
    pub(super) flavor: ModuleFlavor,
    pub(super) arch: Arch,
    pub(super) signing: Option<&'a SigningKey>,
    pub(super) gsp: bool,
    pub(super) limits: SandboxLimits,
    pub(super) jobs: Option<usize>,
}

/// A build's artifact: made now or found in the cache.
pub(super) struct Built {
    pub(super) record: BuildRecord,
    pub(super) digest: Sha256Digest,
    pub(super) cached: PathBuf,
    pub(super) cache_hit: bool,
    pub(super) logs: PathBuf,
}

/// The cache key: every input's digest and everything of the request that reaches the modules.
fn cache_key(spec: &Spec, inputs: &[Input]) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &str| {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(value.as_bytes());
        h.update([0]);
    };
    field("recipe", RECIPE);
    field("builder", BUILDER);
    field("kernel_version", spec.kernel_version);
    field("driver_version", spec.driver_version);
    field("flavor", spec.flavor.as_str());
    field("arch", spec.arch.as_str());
    field(
        "source_date_epoch",
        &driver_build::SOURCE_DATE_EPOCH.to_string(),
    );
    for input in inputs.iter().filter(|i| i.kind.is_build_input()) {
        field(input.kind.as_str(), &input.got.sha256.to_hex());
    }
    if let Some(key) = spec.signing {
        for (name, path) in [("sign_key", &key.key), ("sign_cert", &key.cert)] {
            let bytes = fs::read(path).map_err(|source| BuildError::SigningFile {
                path: path.clone(),
                source,
            })?;
            field(name, &hex::encode(Sha256::digest(&bytes)));
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The build's cache entry when the same inputs were built before and the artifact is still in
/// the cache; else compile, pack, inspect and record.
pub(super) fn build_or_reuse(
    fetcher: &Fetcher,
    cache_dir: &Path,
    spec: &Spec,
    inputs: &[Input],
    use_cache: bool,
    stage: &dyn Fn(Stage),
) -> Result<Built, BuildError> {
    let key = cache_key(spec, inputs)?;
    let builds = cache_dir.join("builds");
    let record_path = builds.join(format!("{key}.json"));
    let logs = builds.join("logs").join(&key);
    if use_cache {
        let record: Option<BuildRecord> = fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(record) = record {
            // A damaged record, or an artifact gone from the cache, is a miss.
            let digest: Option<Sha256Digest> = record.sha256.parse().ok();
            let cached = digest.and_then(|d| Some((d, fetcher.cached(&d)?)));
            if let Some((digest, cached)) = cached {
                stage(Stage::CacheHit);
                let others: Vec<&Input> =
                    inputs.iter().filter(|i| !i.kind.is_build_input()).collect();
                if !others.is_empty() {
                    let rule = SigningRule {
                        signer: record.signer.as_ref(),
                        module_sig_force: record.module_sig_force,
                    };
                    inspect_built(spec, &cached, &others, rule)?;
                }
                return Ok(Built {
                    record,
                    digest,
                    cached,
                    cache_hit: true,
                    logs,
                });
            }
        }
    }

    stage(Stage::Check);
    let by_kind = |k: ArtifactKind| inputs.iter().filter(move |i| i.kind == k);
    let job = Job {
        kernel_version: spec.kernel_version.to_string(),
        driver_version: spec.driver_version.to_string(),
        flavor: spec.flavor,
        source: by_kind(ArtifactKind::NvidiaKernelSource)
            .map(|i| i.got.path.clone())
            .next()
            .ok_or(BuildError::NoSource)?,
        headers: by_kind(ArtifactKind::KernelHeaders)
            .map(|i| i.got.path.clone())
            .collect(),
        patches: by_kind(ArtifactKind::SourcePatch)
            .map(|i| (url_name(&i.urls[0]), i.got.path.clone()))
            .collect(),
        signing: spec.signing.cloned(),
        limits: spec.limits,
        jobs: spec
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        log_dir: logs.clone(),
    };
    let prepared = driver_build::prepare(&job)?;
    let modules = driver_build::compile(&prepared, stage)?;

    stage(Stage::Inspect);
    let file_name = pack::file_name(
        spec.flavor,
        spec.driver_version,
        spec.kernel_version,
        spec.arch,
        spec.signing.is_some(),
    );
    let out = prepared.scratch().join("out");
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Write { path, source }
    };
    fs::create_dir_all(&out).map_err(write_err(&out))?;
    let packed = out.join(&file_name);
    pack::pack(spec.kernel_version, &modules, &packed).map_err(write_err(&packed))?;
    let mut built_modules = Vec::new();
    for (name, path) in &modules {
        let bytes = fs::read(path).map_err(write_err(path))?;
        built_modules.push(BuiltModule {
            name: name.clone(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        });
    }
    let others: Vec<&Input> = inputs.iter().filter(|i| !i.kind.is_build_input()).collect();
    let rule = SigningRule {
        signer: prepared.signer.as_ref(),
        module_sig_force: prepared.tree.config.module_sig_force,
    };
    inspect_built(spec, &packed, &others, rule)?;

    // Into the content-addressed cache, verified like any download.
    let got = fetcher
        .fetch_unpinned(&[file_url(&packed)], None, &crate::fetch::NoProgress)
        .map_err(|source| BuildError::Fetch {
            what: "built nvidia-modules".into(),
            source,
        })?;
    let record = BuildRecord {
        file_name,
        sha256: got.sha256.to_hex(),
        size: got.size,
        modules: built_modules,
        compiler: prepared.compiler.version.clone(),
        sandbox: prepared.sandbox(),
        signer: prepared.signer.clone(),
        module_sig_force: prepared.tree.config.module_sig_force,
    };
    if use_cache {
        fs::create_dir_all(&builds).map_err(write_err(&builds))?;
        let json = serde_json::to_vec_pretty(&record).map_err(|e| BuildError::Write {
            path: record_path.clone(),
            source: io::Error::other(e),
        })?;
        crate::fsutil::write_atomic(&record_path, &json).map_err(write_err(&record_path))?;
    }
    Ok(Built {
        record,
        digest: got.sha256,
        cached: got.path,
        cache_hit: false,
        logs,
    })
}

/// Inspect the packed modules (with the release's other artifacts) as `versions add` would.
fn inspect_built(
    spec: &Spec,
    packed: &Path,
    others: &[&Input],
    signing: SigningRule,
) -> Result<(), BuildError> {
    let scratch = tempfile::tempdir().map_err(|source| BuildError::Write {
        path: std::env::temp_dir(),
        source,
    })?;
    let mut roots: BTreeMap<ArtifactKind, PathBuf> = BTreeMap::new();
    let modules = scratch.path().join("nvidia-modules");
    extract_tar(packed, &modules, &Limits::default()).map_err(|source| BuildError::Unpack {
        what: "the built nvidia-modules".into(),
        source: Box::new(source),
    })?;
    roots.insert(ArtifactKind::NvidiaModules, modules);
    for input in others.iter().filter(|i| i.kind != ArtifactKind::Kernel) {
        let dest = scratch.path().join(input.kind.as_str());
        extract_tar(&input.got.path, &dest, &Limits::default()).map_err(|source| {
            BuildError::Unpack {
                what: format!("the {} artifact", input.kind),
                source: Box::new(source),
            }
        })?;
        roots.insert(input.kind, dest);
    }
    let trees = Trees::from_roots(&roots);
    let expect = Expectations {
        kernel_version: spec.kernel_version,
        driver_version: spec.driver_version,
        arch: spec.arch,
        flavor: Some(spec.flavor),
        gsp: spec.gsp,
        signing,
    };
    // Paths are inside the scratch directory, which is gone once we return.
    inspect(&expect, &trees).map_err(|e| BuildError::Refused(e.relative_to(scratch.path())))?;
    Ok(())
}
