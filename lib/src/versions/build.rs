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

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::ArchiveError;
use crate::archive::tar::{Limits, extract_tar};
use crate::driver_build::sandbox::SandboxLimits;
use crate::driver_build::{self, DriverBuildError, Job, SigningKey, Stage, pack};
use crate::fetch::{FetchError, Fetched, Fetcher, Progress};
use crate::inspect::{Expectations, SigningRule, Trees, inspect};
use crate::outcome::{Classify, Outcome};
use crate::registry::{
    Arch, Artifact, ArtifactKind, BuildProvenance, ModuleFlavor, Registry, RegistryError, Release,
    Sha256Digest, Signer, write_release,
};
use crate::remedy::Remedy;

/// The builder recorded in a release's provenance.
pub const BUILDER: &str = concat!("gpu-passthrough ", env!("CARGO_PKG_VERSION"));

/// Bump when a change of the build recipe changes the modules it makes: old cache entries then
/// no longer match.
const RECIPE: &str = "1";

/// Errors of [`build`] and [`verify_rebuild`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The registry could not be read or written (boxed: its messages are large).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// A kernel or driver version string that cannot be a version (it becomes a path).
    #[error("the {field} {problem}")]
    BadVersion {
        /// `kernel version` or `driver version`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Modules for another architecture were asked for.
    #[error(
        "modules for {arch} cannot be built on this machine (no cross-compiling); build on an \
         {arch} machine"
    )]
    OtherArch {
        /// The architecture asked for.
        arch: Arch,
    },
    /// The base URL is not a URL artifacts can have.
    #[error("the base URL `{0}` is not an https, http or file URL")]
    BadBaseUrl(String),
    /// No module source among the inputs.
    #[error("an nvidia-kernel-source input is required: the module source to build")]
    NoSource,
    /// A release to rebuild was not made by `versions build`.
    #[error(
        "release `{release}` cannot be rebuilt: {what}; only releases made by `versions build` can"
    )]
    NotBuilt {
        /// The release.
        release: String,
        /// What it lacks.
        what: String,
    },
    /// The signing key or certificate cannot be read.
    #[error("cannot read the signing file {path}; pass a readable key and certificate")]
    SigningFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An input could not be downloaded or did not verify.
    #[error("the {what} input")]
    Fetch {
        /// Which input (`kernel-headers #2`).
        what: String,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// The modules could not be built (boxed: its messages are large).
    #[error(transparent)]
    Driver(Box<DriverBuildError>),
    /// The built modules failed the inspection `versions add` runs: nothing was published.
    #[error("the built modules were refused, nothing published")]
    Refused(#[source] crate::inspect::InspectError),
    /// An artifact could not be unpacked for inspection or comparison.
    #[error("cannot unpack {what}")]
    Unpack {
        /// Which artifact.
        what: String,
        /// Why.
        #[source]
        source: Box<ArchiveError>,
    },
    /// A file of the build could not be written (cache record, artifact, `--out`).
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl From<DriverBuildError> for BuildError {
    fn from(e: DriverBuildError) -> Self {
        BuildError::Driver(Box::new(e))
    }
}

impl From<RegistryError> for BuildError {
    fn from(e: RegistryError) -> Self {
        BuildError::Registry(Box::new(e))
    }
}

impl Classify for BuildError {
    fn outcome(&self) -> Outcome {
        match self {
            BuildError::Registry(e) => e.outcome(),
            BuildError::Driver(e) => e.outcome(),
            BuildError::Fetch { source, .. } => source.outcome(),
            BuildError::BadVersion { .. }
            | BuildError::OtherArch { .. }
            | BuildError::BadBaseUrl(_)
            | BuildError::NoSource
            | BuildError::NotBuilt { .. } => Outcome::Refused,
            // What was built or downloaded is not what the release says: a reviewer's matter.
            BuildError::Refused(_) | BuildError::Unpack { .. } => Outcome::VerificationFailed,
            BuildError::SigningFile { .. } | BuildError::Write { .. } => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            BuildError::Registry(e) => e.remedy(),
            BuildError::Driver(e) => e.remedy(),
            BuildError::Fetch { source, .. } => source.remedy(),
            BuildError::BadVersion { .. }
            | BuildError::OtherArch { .. }
            | BuildError::BadBaseUrl(_)
            | BuildError::NoSource
            | BuildError::NotBuilt { .. }
            | BuildError::Refused(_)
            | BuildError::Unpack { .. }
            | BuildError::SigningFile { .. }
            | BuildError::Write { .. } => None,
        }
    }
}

/// The inputs of a build, by URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildInputs {
    /// The module source (mirrors in order).
    pub source: Vec<String>,
    /// The kernel-headers archives, one URL each.
    pub headers: Vec<String>,
    /// Patches, in the order they are applied.
    pub patches: Vec<String>,
    /// The release's other artifacts (kernel, firmware, libraries...), inspected with the
    /// modules and pinned like `versions add` does.
    pub others: BTreeMap<ArtifactKind, Vec<String>>,
}

impl BuildInputs {
    /// `KIND=URL` pairs: `nvidia-kernel-source` once (again: a mirror), `kernel-headers` and
    /// `source-patch` once per archive or patch, in order; other kinds as `versions add` takes
    /// them. `nvidia-modules` is what the build makes and is refused.
    pub fn parse<S: AsRef<str>>(pairs: &[S]) -> Result<BuildInputs, String> {
        let mut inputs = BuildInputs::default();
        for pair in pairs {
            let pair = pair.as_ref();
            let (kind, url) = pair.split_once('=').ok_or_else(|| {
                format!(
                    "`{pair}`: expected KIND=URL, e.g. kernel-headers=https://example.com/h.deb"
                )
            })?;
            let kind: ArtifactKind = kind.parse().map_err(|e: String| format!("`{pair}`: {e}"))?;
            let url = url.to_string();
            match kind {
                ArtifactKind::NvidiaKernelSource => inputs.source.push(url),
                ArtifactKind::KernelHeaders => inputs.headers.push(url),
                ArtifactKind::SourcePatch => inputs.patches.push(url),
                ArtifactKind::NvidiaModules => {
                    return Err(format!(
                        "`{pair}`: nvidia-modules is what `versions build` makes; use `versions \
                         add` to add built modules"
                    ));
                }
                other => inputs.others.entry(other).or_default().push(url),
            }
        }
        if inputs.source.is_empty() {
            return Err("an nvidia-kernel-source=URL artifact is required".into());
        }
        if inputs.headers.is_empty() {
            return Err("at least one kernel-headers=URL artifact is required".into());
        }
        Ok(inputs)
    }
}

/// A release to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The registry file to write (created if missing).
    pub file: PathBuf,
    /// Name of the new release.
    pub release: String,
    /// The guest kernel's `uname -r`.
    pub kernel_version: String,
    /// The NVIDIA driver version the source must be.
    pub driver_version: String,
    /// The module flavor the source must be.
    pub flavor: ModuleFlavor,
    /// The architecture (this machine's: no cross-compiling).
    pub arch: Arch,
    /// What to build from.
    pub inputs: BuildInputs,
    /// Sign every module with this key.
    pub signing: Option<SigningKey>,
    /// Where the artifact will be published: its URL is this + its file name.
    pub base_url: Option<String>,
    /// A directory to copy the artifact into, for publishing.
    pub out_dir: Option<PathBuf>,
    /// Make it the default release.
    pub default: bool,
    /// Overwrite a release of the same name in the file.
    pub replace: bool,
    /// Whether the release ships GSP firmware (`false`: proprietary only).
    pub gsp: bool,
    /// Largest download accepted per input; `None`: the fetcher's default cap.
    pub max_download_bytes: Option<u64>,
    /// The sandbox's limits.
    pub limits: SandboxLimits,
    /// `make -j`; `None`: the cores available.
    pub jobs: Option<usize>,
}

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

/// What decides a build's output.
struct Spec<'a> {
    kernel_version: &'a str,
    driver_version: &'a str,
    flavor: ModuleFlavor,
    arch: Arch,
    signing: Option<&'a SigningKey>,
    gsp: bool,
    limits: SandboxLimits,
    jobs: Option<usize>,
}

struct Built {
    record: BuildRecord,
    digest: Sha256Digest,
    cached: PathBuf,
    cache_hit: bool,
    logs: PathBuf,
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
fn build_or_reuse(
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
    let root = |k: ArtifactKind| roots.get(&k).map(PathBuf::as_path);
    let trees = Trees {
        nvidia_modules: root(ArtifactKind::NvidiaModules),
        kernel_modules: root(ArtifactKind::KernelModules),
        firmware: root(ArtifactKind::NvidiaFirmware),
        driver_libs: root(ArtifactKind::NvidiaDriverLibs),
    };
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

fn check_request(req: &BuildRequest) -> Result<(), BuildError> {
    for (field, value) in [
        ("kernel version", &req.kernel_version),
        ("driver version", &req.driver_version),
    ] {
        if let Some(problem) = crate::registry::version_string_problem(value) {
            return Err(BuildError::BadVersion { field, problem });
        }
    }
    if Arch::host() != Some(req.arch) {
        return Err(BuildError::OtherArch { arch: req.arch });
    }
    let schemes = ["https://", "http://", "file://"];
    if let Some(base) = req
        .base_url
        .as_ref()
        .filter(|b| !schemes.iter().any(|s| b.starts_with(s)))
    {
        return Err(BuildError::BadBaseUrl(base.clone()));
    }
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
    Ok(())
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
