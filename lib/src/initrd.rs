//! `initrd`: build the base, GPU and combined initrd layers of a registry release.
//!
//! - **base**: `/init` (the static guest init), `/dev/console`, `/dev/null` and the directories
//!   init needs. Plain cpio: it is small, and a plain archive can be followed by any other.
//! - **gpu**: everything under `/gpu/` plus the firmware under `/lib/firmware/`, compressed as
//!   asked. It is self-contained, so a platform can append it to its own initrd.
//! - **combined**: base followed by gpu, one file for GPU VMs.
//!
//! Layers are cached under `<cache>/layers/<key>/`, where the key is a hash over everything that
//! determines their bytes (artifact digests, guest-init digest, options, builder version). A
//! build writes into a temporary directory and renames it into place, so a reader sees either
//! nothing or a complete result; an interrupted build leaves only a temporary directory that the
//! next build of the same key removes. (`GPU_PASSTHROUGH_FAILPOINT=initrd-midway` aborts a build
//! half-way through the GPU layer, for tests of exactly that.)

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use gpu_passthrough_manifest as manifest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::archive::ArchiveError;
use crate::archive::compress::{LayerCompression, compressing_writer};
use crate::archive::cpio::{CpioError, CpioWriter};
use crate::archive::tar::{Limits, extract_tar};
use crate::failpoint::Failpoint;
use crate::fetch::{FetchError, Fetcher, Progress};
use crate::fsutil::{self, sha256_file};
use crate::inspect::{Expectations, InspectError, Inventory, Trees, inspect};
use crate::registry::{Arch, ArtifactKind, Release};

/// Bumped whenever the builder's output changes for the same inputs, so old cache entries are
/// never mistaken for new ones.
const BUILDER_VERSION: u32 = 1;

/// The NVIDIA modules loaded by default. `nvidia_peermem` (GPUDirect RDMA) is left out: it needs
/// an InfiniBand stack the guest rarely has; ask for it with [`BuildOptions::modules`].
pub const DEFAULT_MODULES: [&str; 4] = ["nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"];

/// Errors building initrd layers. Each names the culprit and the fix.
#[derive(Debug, Error)]
pub enum InitrdError {
    /// The release lacks something the build needs.
    #[error("release `{release}` ({arch}): {what}")]
    Release {
        /// Release name.
        release: String,
        /// Architecture.
        arch: Arch,
        /// What is missing, and the fix.
        what: String,
    },
    /// The guest init binary could not be read.
    #[error(
        "guest init `{path}`: {source}; build it with `RUSTFLAGS='-C target-feature=+crt-static' \
         cargo build --release -p gpu-passthrough-init --target x86_64-unknown-linux-gnu` and pass \
         its path with --guest-init"
    )]
    GuestInit {
        /// The path given.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// The guest init is not a static binary for the guest's architecture: it would fail as
    /// `/init` before printing anything.
    #[error("guest init `{path}`: {why}")]
    GuestInitUnfit {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it, and the fix.
        why: String,
    },
    /// A requested module is not in the release's NVIDIA modules.
    #[error(
        "module `{module}` is not among the NVIDIA modules of release `{release}` (they are: \
         {available}); fix the module list"
    )]
    UnknownModule {
        /// The requested module.
        module: String,
        /// Release name.
        release: String,
        /// Modules that exist.
        available: String,
    },
    /// Downloading or verifying an artifact failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// An artifact could not be unpacked safely.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The artifacts do not fit the release (wrong kernel, driver version, missing files).
    #[error(transparent)]
    Inspect(#[from] InspectError),
    /// Writing a layer failed.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> InitrdError {
    let context = context.into();
    move |source| InitrdError::Io { context, source }
}

/// What to build, beyond the release itself.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Architecture of the guest.
    pub arch: Arch,
    /// Compression of the GPU layer (the base layer is always plain).
    pub compression: LayerCompression,
    /// The static guest-init binary, installed as `/init` and `/gpu/bin/gpu-init`.
    pub guest_init: PathBuf,
    /// NVIDIA modules to load (kernel names, underscores); their dependencies are added.
    pub modules: Vec<String>,
    /// Module parameters by module name.
    pub module_params: BTreeMap<String, String>,
    /// Mode and group of `/dev/nvidia*` in the guest.
    pub device_nodes: manifest::DeviceNodes,
}

impl BuildOptions {
    /// Defaults: zstd (see `e2e/README.md` for the boot-time measurements behind it), the four
    /// standard modules, `nvidia_drm modeset=1`, device nodes `0660` owned by group 0.
    pub fn new(arch: Arch, guest_init: impl Into<PathBuf>) -> Self {
        BuildOptions {
            arch,
            compression: LayerCompression::Zstd,
            guest_init: guest_init.into(),
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
            module_params: BTreeMap::from([("nvidia_drm".to_string(), "modeset=1".to_string())]),
            device_nodes: manifest::DeviceNodes {
                mode: 0o660,
                gid: 0,
            },
        }
    }
}

/// One layer file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of its bytes.
    pub sha256: String,
}

/// The result of a build: three layer files and the manifest inside the GPU layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layers {
    /// Cache key (hex) the layers are stored under.
    pub key: String,
    /// Release they were built from.
    pub release: String,
    /// GPU layer compression.
    pub compression: LayerCompression,
    /// `/init` and the directories init needs; no GPU bytes.
    pub base: LayerFile,
    /// Everything under `/gpu/` and the firmware.
    pub gpu: LayerFile,
    /// base followed by gpu.
    pub combined: LayerFile,
    /// The manifest written to `/gpu/manifest.json`.
    pub manifest: manifest::Manifest,
    /// The driver's `supported-gpus.json`, kept beside the layers (not in them) so that attach
    /// can check a GPU against the very driver the guest will load.
    #[serde(default)]
    pub supported_gpus: Option<PathBuf>,
    /// True when an existing cached result was returned without building.
    #[serde(default)]
    pub reused: bool,
}

/// Name of the record that marks a complete cache entry.
const RECORD: &str = "layers.json";
/// Name of the driver's GPU list beside the layers.
const SUPPORTED_GPUS: &str = "supported-gpus.json";

/// Builds layers into a cache directory.
pub struct InitrdBuilder<'a> {
    cache_dir: PathBuf,
    fetcher: &'a Fetcher,
}

impl<'a> InitrdBuilder<'a> {
    /// A builder that keeps layers and unpacked artifacts under `cache_dir` and downloads
    /// through `fetcher`.
    pub fn new(cache_dir: impl Into<PathBuf>, fetcher: &'a Fetcher) -> Self {
        InitrdBuilder {
            cache_dir: cache_dir.into(),
            fetcher,
        }
    }

    /// Return the cached layers for `release` and `options` when they exist and are intact,
    /// otherwise build them. A warm call costs a hash of the guest init and a few stats.
    pub fn ensure(
        &self,
        release: &Release,
        options: &BuildOptions,
        progress: &dyn Progress,
    ) -> Result<Layers, InitrdError> {
        let key = self.key(release, options)?;
        if let Some(layers) = self.cached(&key) {
            return Ok(layers);
        }
        self.build_key(release, options, &key, true, progress)
    }

    /// Build the layers even when a cached result exists (artifacts still come from the cache),
    /// and replace the cached result.
    pub fn build(
        &self,
        release: &Release,
        options: &BuildOptions,
        progress: &dyn Progress,
    ) -> Result<Layers, InitrdError> {
        let key = self.key(release, options)?;
        self.build_key(release, options, &key, false, progress)
    }

    fn layers_dir(&self) -> PathBuf {
        self.cache_dir.join("layers")
    }

    /// The cache key: a hash over every input that determines the layers' bytes.
    pub fn key(&self, release: &Release, options: &BuildOptions) -> Result<String, InitrdError> {
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &str| {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(value.as_bytes());
            h.update([0]);
        };
        field("builder", &BUILDER_VERSION.to_string());
        field("release", &release.name);
        field("kernel_version", &release.kernel_version);
        field(
            "driver_version",
            release.driver_version.as_deref().unwrap_or(""),
        );
        field("flavor", release.module_flavor.map_or("", |f| f.as_str()));
        field("arch", options.arch.as_str());
        for kind in ArtifactKind::ALL {
            if let Some(a) = release.artifact(options.arch, kind) {
                let digest = a.sha256.as_ref().map(|d| d.to_string()).unwrap_or_default();
                field(kind.as_str(), &digest);
            }
        }
        field("compression", options.compression.as_str());
        field("modules", &options.modules.join(","));
        for (m, p) in &options.module_params {
            field(&format!("param:{m}"), p);
        }
        field("device_mode", &options.device_nodes.mode.to_string());
        field("device_gid", &options.device_nodes.gid.to_string());
        field(
            "guest_init",
            &sha256_file(&options.guest_init).map_err(|source| InitrdError::GuestInit {
                path: options.guest_init.clone(),
                source,
            })?,
        );
        Ok(hex::encode(h.finalize()))
    }

    /// A complete cache entry for `key`, if there is one whose files still have their sizes.
    fn cached(&self, key: &str) -> Option<Layers> {
        let dir = self.layers_dir().join(key);
        let text = fs::read_to_string(dir.join(RECORD)).ok()?;
        let mut layers: Layers = serde_json::from_str(&text).ok()?;
        for layer in [&mut layers.base, &mut layers.gpu, &mut layers.combined] {
            // Stored relative so the cache can move; resolved here.
            layer.path = dir.join(&layer.path);
            if fs::metadata(&layer.path).ok()?.len() != layer.size {
                return None;
            }
        }
        layers.supported_gpus = layers.supported_gpus.map(|p| dir.join(p));
        layers.reused = true;
        Some(layers)
    }

    fn build_key(
        &self,
        release: &Release,
        options: &BuildOptions,
        key: &str,
        reuse: bool,
        progress: &dyn Progress,
    ) -> Result<Layers, InitrdError> {
        let layers_dir = self.layers_dir();
        fs::create_dir_all(&layers_dir)
            .map_err(io_err(format!("creating {}", layers_dir.display())))?;
        // One builder per key at a time; the others wait and then find the result.
        let lock = lock_file(&layers_dir.join(format!("{key}.lock")))?;
        if reuse {
            // Someone else may have built it while we waited for the lock.
            if let Some(layers) = self.cached(key) {
                return Ok(layers);
            }
        }
        let tmp = layers_dir.join(format!("tmp-{key}"));
        if tmp.exists() {
            // Left by a build that was killed: we hold the key's lock, so nobody else owns it.
            fs::remove_dir_all(&tmp)
                .map_err(io_err(format!("removing stale {}", tmp.display())))?;
        }
        fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let result = self.write_layers(release, options, key, &tmp, progress);
        let layers = match result {
            Ok(layers) => layers,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let dest = layers_dir.join(key);
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io_err(format!("replacing {}", dest.display())))?;
        }
        fs::rename(&tmp, &dest)
            .map_err(io_err(format!("moving the layers into {}", dest.display())))?;
        sync_dir(&layers_dir)?;
        drop(lock);
        let mut layers = layers;
        for layer in [&mut layers.base, &mut layers.gpu, &mut layers.combined] {
            layer.path = dest.join(&layer.path);
        }
        layers.supported_gpus = layers.supported_gpus.map(|p| dest.join(p));
        Ok(layers)
    }

    /// Fetch, unpack, inspect, and write the three layers and the record into `dir`.
    fn write_layers(
        &self,
        release: &Release,
        options: &BuildOptions,
        key: &str,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<Layers, InitrdError> {
        let arch = options.arch;
        let missing = |what: String| InitrdError::Release {
            release: release.name.clone(),
            arch,
            what,
        };
        let driver_version = release.driver_version.clone().ok_or_else(|| {
            missing("has no driver_version: it is a kernel-only release; pick a release with NVIDIA artifacts".into())
        })?;
        let mut trees: BTreeMap<ArtifactKind, PathBuf> = BTreeMap::new();
        let mut inputs = Vec::new();
        for kind in [
            ArtifactKind::KernelModules,
            ArtifactKind::NvidiaModules,
            ArtifactKind::NvidiaFirmware,
            ArtifactKind::NvidiaDriverLibs,
        ] {
            let Some(artifact) = release.artifact(arch, kind) else {
                if matches!(
                    kind,
                    ArtifactKind::NvidiaModules | ArtifactKind::NvidiaDriverLibs
                ) {
                    return Err(missing(format!(
                        "has no `{kind}` artifact; add one with `gpu-passthrough versions add`"
                    )));
                }
                continue;
            };
            let fetched = self.fetcher.fetch(release, arch, artifact, progress)?;
            trees.insert(
                kind,
                self.unpacked(&fetched.path, &fetched.sha256.to_string())?,
            );
            inputs.push(manifest::Input {
                kind: kind.as_str().to_string(),
                sha256: fetched.sha256.to_string(),
            });
        }
        let tree = |k| trees.get(&k).map(PathBuf::as_path);
        let inventory = inspect(
            &Expectations {
                kernel_version: &release.kernel_version,
                driver_version: &driver_version,
                arch,
            },
            &Trees {
                nvidia_modules: tree(ArtifactKind::NvidiaModules),
                kernel_modules: tree(ArtifactKind::KernelModules),
                firmware: tree(ArtifactKind::NvidiaFirmware),
                driver_libs: tree(ArtifactKind::NvidiaDriverLibs),
            },
        )?;
        let plan = GpuLayerPlan::new(release, options, &driver_version, &inventory, inputs)?;

        let guest_init =
            fs::read(&options.guest_init).map_err(|source| InitrdError::GuestInit {
                path: options.guest_init.clone(),
                source,
            })?;
        check_guest_init(&guest_init, arch).map_err(|why| InitrdError::GuestInitUnfit {
            path: options.guest_init.clone(),
            why,
        })?;
        let base_name = PathBuf::from("base.cpio");
        let gpu_name = PathBuf::from(format!("gpu.{}", options.compression.suffix()));
        let combined_name = PathBuf::from(format!("combined.{}", options.compression.suffix()));

        // The base layer, then the GPU layer written once and teed into both the gpu file and
        // the combined file (which starts with a copy of the base), hashing as it goes.
        let base_bytes = base_layer(&guest_init)?;
        let base = LayerFile {
            path: base_name.clone(),
            size: base_bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&base_bytes)),
        };
        write_synced(&dir.join(&base_name), &base_bytes)?;

        let gpu_file = HashingFile::create(&dir.join(&gpu_name))?;
        let mut combined_file = HashingFile::create(&dir.join(&combined_name))?;
        combined_file
            .write_all(&base_bytes)
            .map_err(io_err("writing the combined layer"))?;
        let tee = Tee {
            a: BufWriter::with_capacity(1 << 20, gpu_file),
            b: BufWriter::with_capacity(1 << 20, combined_file),
        };
        let encoder = compressing_writer(options.compression, tee)
            .map_err(io_err("starting the compressor"))?;
        let mut cpio = CpioWriter::new(encoder);
        plan.write(&mut cpio, &guest_init)?;
        let encoder = cpio.finish()?;
        // No padding after the layer: `zstd -dc`/`gzip -dc` reject trailing zeros, and the
        // kernel needs alignment only before a plain cpio, which whoever appends one must pad.
        let tee = encoder
            .finish()
            .map_err(io_err("finishing the compressed GPU layer"))?;
        let (gpu_file, combined_file) = tee.into_inner()?;
        let gpu = gpu_file.finish(gpu_name)?;
        let combined = combined_file.finish(combined_name)?;

        let manifest_json = plan.manifest_json()?;
        write_synced(&dir.join("manifest.json"), &manifest_json)?;
        let supported_gpus = match &inventory.supported_gpus {
            Some(src) => {
                let bytes = fs::read(src).map_err(io_err(format!("reading {}", src.display())))?;
                write_synced(&dir.join(SUPPORTED_GPUS), &bytes)?;
                Some(PathBuf::from(SUPPORTED_GPUS))
            }
            None => None,
        };
        let layers = Layers {
            key: key.to_string(),
            release: release.name.clone(),
            compression: options.compression,
            base,
            gpu,
            combined,
            manifest: plan.manifest,
            supported_gpus,
            reused: false,
        };
        let record = serde_json::to_vec_pretty(&layers)
            .map_err(|e| io_err("writing the layer record")(io::Error::other(e)))?;
        write_synced(&dir.join(RECORD), &record)?;
        Ok(layers)
    }

    /// The unpacked tree of a verified artifact, extracted once and kept by digest.
    fn unpacked(&self, archive: &Path, sha256: &str) -> Result<PathBuf, InitrdError> {
        let root = self.cache_dir.join("unpacked");
        let dest = root.join(sha256);
        if dest.is_dir() {
            return Ok(dest);
        }
        fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
        let _lock = lock_file(&root.join(format!("{sha256}.lock")))?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = root.join(format!("tmp-{sha256}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .map_err(io_err(format!("removing stale {}", tmp.display())))?;
        }
        extract_tar(archive, &tmp, &Limits::default())?;
        fs::rename(&tmp, &dest).map_err(io_err(format!("moving {} into place", dest.display())))?;
        Ok(dest)
    }
}

/// The base layer: small, so built in memory.
fn base_layer(guest_init: &[u8]) -> Result<Vec<u8>, InitrdError> {
    let mut w = CpioWriter::new(Vec::new());
    for dir in ["dev", "lib", "mnt", "newroot", "proc", "run", "sys", "tmp"] {
        w.directory(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, guest_init.len() as u64, &mut &guest_init[..])?;
    let mut bytes = w.finish()?;
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    Ok(bytes)
}

/// The guest init runs before anything else exists in the guest: it must be a static ELF
/// executable for the guest's architecture.
fn check_guest_init(bytes: &[u8], arch: Arch) -> Result<(), String> {
    use object::read::elf::{FileHeader, ProgramHeader};
    const FIX: &str = "build it with `RUSTFLAGS='-C target-feature=+crt-static' cargo build \
                       --release -p gpu-passthrough-init --target x86_64-unknown-linux-gnu`";
    let header = object::elf::FileHeader64::<object::Endianness>::parse(bytes)
        .map_err(|e| format!("not a 64-bit ELF executable ({e}); {FIX}"))?;
    let endian = header
        .endian()
        .map_err(|e| format!("unreadable ELF header ({e}); {FIX}"))?;
    let machine = header.e_machine(endian).0;
    if machine != arch.elf_machine() {
        return Err(format!(
            "built for ELF machine {machine}, the guest is {arch} ({}); {FIX}",
            arch.elf_machine()
        ));
    }
    let phdrs = header
        .program_headers(endian, bytes)
        .map_err(|e| format!("unreadable program headers ({e}); {FIX}"))?;
    if phdrs
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP)
    {
        return Err(format!(
            "dynamically linked (it names an ELF interpreter), but the initramfs has no libc; {FIX}"
        ));
    }
    Ok(())
}

/// What goes into the GPU layer, decided before a byte is written.
struct GpuLayerPlan {
    /// Archive path → what to put there, sorted by path (parents before children).
    entries: BTreeMap<String, Source>,
    manifest: manifest::Manifest,
}

enum Source {
    Dir,
    File { from: PathBuf, mode: u32 },
    GuestInit,
    Manifest,
    Symlink(String),
}

impl GpuLayerPlan {
    fn new(
        release: &Release,
        options: &BuildOptions,
        driver_version: &str,
        inv: &Inventory,
        inputs: Vec<manifest::Input>,
    ) -> Result<Self, InitrdError> {
        let mut entries = BTreeMap::new();
        let modules = select_modules(release, options, inv)?;
        let mut manifest_modules = Vec::new();
        for m in &modules {
            let file = m
                .source
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{}.ko", m.name));
            let path = format!("gpu/modules/{file}");
            entries.insert(
                path.clone(),
                Source::File {
                    from: m.source.clone(),
                    mode: 0o644,
                },
            );
            manifest_modules.push(manifest::Module {
                name: m.name.clone(),
                path: format!("/{path}"),
                params: options
                    .module_params
                    .get(&m.name)
                    .cloned()
                    .unwrap_or_default(),
                depends: m
                    .info
                    .depends()
                    .iter()
                    .map(|d| d.replace('-', "_"))
                    .collect(),
                vermagic: m.info.vermagic().unwrap_or_default().to_string(),
                nvidia: m.nvidia,
            });
        }
        let mut firmware = Vec::new();
        for fw in &inv.firmware {
            let path = format!("lib/firmware/{}", fw.rel.display());
            entries.insert(
                path.clone(),
                Source::File {
                    from: fw.source.clone(),
                    mode: 0o644,
                },
            );
            firmware.push(format!("/{path}"));
        }
        let mut libraries = Vec::new();
        for lib in &inv.libraries {
            let path = format!("gpu/lib/{}", lib.real_name);
            entries.insert(
                path.clone(),
                Source::File {
                    from: lib.source.clone(),
                    mode: 0o755,
                },
            );
            if let Some(soname) = lib.soname.as_ref().filter(|s| **s != lib.real_name) {
                entries.insert(
                    format!("gpu/lib/{soname}"),
                    Source::Symlink(lib.real_name.clone()),
                );
            }
            libraries.push(manifest::Library {
                path: format!("/{path}"),
                soname: lib.soname.clone(),
            });
        }
        // gpu-init is in the layer for other inits to call, but is not the workload's program:
        // it stays out of `binaries`, which the guest puts on the workload's PATH.
        let mut binaries = Vec::new();
        entries.insert("gpu/bin/gpu-init".into(), Source::GuestInit);
        for bin in &inv.binaries {
            let Some(name) = bin.file_name() else {
                continue;
            };
            let path = format!("gpu/bin/{}", name.to_string_lossy());
            entries.insert(
                path.clone(),
                Source::File {
                    from: bin.clone(),
                    mode: 0o755,
                },
            );
            binaries.push(format!("/{path}"));
        }
        binaries.sort();
        entries.insert("gpu/manifest.json".into(), Source::Manifest);
        // The kernel's unpacker does not create missing parents: add every one.
        let parents: BTreeSet<String> = entries.keys().flat_map(|p| parents_of(p)).collect();
        for p in parents {
            entries.entry(p).or_insert(Source::Dir);
        }
        let manifest = manifest::Manifest {
            schema: manifest::SCHEMA,
            release: release.name.clone(),
            arch: options.arch.as_str().to_string(),
            kernel_version: release.kernel_version.clone(),
            driver_version: driver_version.to_string(),
            module_flavor: release
                .module_flavor
                .map_or("open", |f| f.as_str())
                .to_string(),
            modules: manifest_modules,
            firmware,
            libraries,
            binaries,
            device_nodes: options.device_nodes,
            inputs,
        };
        Ok(GpuLayerPlan { entries, manifest })
    }

    fn manifest_json(&self) -> Result<Vec<u8>, InitrdError> {
        let mut v = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| io_err("serializing the manifest")(io::Error::other(e)))?;
        v.push(b'\n');
        Ok(v)
    }

    fn write<W: Write>(
        &self,
        cpio: &mut CpioWriter<W>,
        guest_init: &[u8],
    ) -> Result<(), InitrdError> {
        let manifest = self.manifest_json()?;
        let midway = self.entries.len() / 2;
        for (i, (path, source)) in self.entries.iter().enumerate() {
            if i == midway {
                Failpoint::InitrdMidway.hit();
            }
            match source {
                Source::Dir => cpio.directory(path, 0o755)?,
                Source::Symlink(target) => cpio.symlink(path, target)?,
                Source::GuestInit => {
                    cpio.file(path, 0o755, guest_init.len() as u64, &mut &guest_init[..])?
                }
                Source::Manifest => {
                    cpio.file(path, 0o644, manifest.len() as u64, &mut &manifest[..])?
                }
                Source::File { from, mode } => {
                    let mut f =
                        File::open(from).map_err(io_err(format!("reading {}", from.display())))?;
                    let size = f
                        .metadata()
                        .map_err(io_err(format!("reading {}", from.display())))?
                        .len();
                    cpio.file(path, *mode, size, &mut f)?;
                }
            }
        }
        Ok(())
    }
}

/// The requested NVIDIA modules and everything they depend on, in the inventory's load order.
fn select_modules<'i>(
    release: &Release,
    options: &BuildOptions,
    inv: &'i Inventory,
) -> Result<Vec<&'i crate::inspect::InspectedModule>, InitrdError> {
    let by_name: BTreeMap<&str, &crate::inspect::InspectedModule> =
        inv.modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut wanted = BTreeSet::new();
    let mut stack: Vec<String> = Vec::new();
    for m in &options.modules {
        let m = m.replace('-', "_");
        if !by_name.get(m.as_str()).is_some_and(|x| x.nvidia) {
            let available = inv
                .modules
                .iter()
                .filter(|x| x.nvidia)
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(InitrdError::UnknownModule {
                module: m,
                release: release.name.clone(),
                available,
            });
        }
        stack.push(m);
    }
    while let Some(name) = stack.pop() {
        if !wanted.insert(name.clone()) {
            continue;
        }
        if let Some(m) = by_name.get(name.as_str()) {
            stack.extend(m.info.depends().iter().map(|d| d.replace('-', "_")));
        }
        // A dependency the inventory does not list is built into the kernel (inspect checked).
    }
    Ok(inv
        .modules
        .iter()
        .filter(|m| wanted.contains(&m.name))
        .collect())
}

fn parents_of(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = path;
    while let Some(i) = cur.rfind('/') {
        cur = &cur[..i];
        out.push(cur.to_string());
    }
    out
}

/// Writes to two writers at once.
struct Tee<A, B> {
    a: A,
    b: B,
}

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.a.write_all(buf)?;
        self.b.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.a.flush()?;
        self.b.flush()
    }
}

impl Tee<BufWriter<HashingFile>, BufWriter<HashingFile>> {
    fn into_inner(self) -> Result<(HashingFile, HashingFile), InitrdError> {
        let a = self
            .a
            .into_inner()
            .map_err(|e| io_err("writing the GPU layer")(e.into_error()))?;
        let b = self
            .b
            .into_inner()
            .map_err(|e| io_err("writing the combined layer")(e.into_error()))?;
        Ok((a, b))
    }
}

/// A file being written, hashed and measured as it goes.
struct HashingFile {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    len: u64,
}

impl HashingFile {
    fn create(path: &Path) -> Result<Self, InitrdError> {
        let file = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(HashingFile {
            file,
            path: path.to_path_buf(),
            hasher: Sha256::new(),
            len: 0,
        })
    }

    fn finish(self, name: PathBuf) -> Result<LayerFile, InitrdError> {
        self.file
            .sync_all()
            .map_err(io_err(format!("syncing {}", self.path.display())))?;
        Ok(LayerFile {
            path: name,
            size: self.len,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), InitrdError> {
    fsutil::write_synced(path, bytes).map_err(io_err(format!("writing {}", path.display())))
}

fn sync_dir(dir: &Path) -> Result<(), InitrdError> {
    fsutil::sync_dir(dir).map_err(io_err(format!("syncing {}", dir.display())))
}

/// An exclusive lock held until the returned value is dropped.
fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<File>, InitrdError> {
    fsutil::lock_exclusive(path).map_err(io_err(format!("locking {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal static x86_64 ELF header: no program headers, so no interpreter.
    fn static_elf(machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // 64-bit
        h[5] = 1; // little-endian
        h[6] = 1; // version
        h[16] = 2; // ET_EXEC
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[20] = 1;
        h[52] = 64; // e_ehsize
        h
    }

    #[test]
    fn guest_init_must_be_static_and_for_the_guest_arch() {
        assert!(check_guest_init(&static_elf(62), Arch::X86_64).is_ok());
        let err = check_guest_init(&static_elf(183), Arch::X86_64).unwrap_err();
        assert!(err.contains("machine 183"), "{err}");
        assert!(
            check_guest_init(b"#!/bin/sh\n", Arch::X86_64)
                .unwrap_err()
                .contains("not a 64-bit ELF")
        );
        // This test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(
            check_guest_init(&me, Arch::X86_64)
                .unwrap_err()
                .contains("dynamically linked")
        );
    }

    #[test]
    fn parents_are_listed_deepest_first() {
        assert_eq!(parents_of("gpu/lib/libcuda.so.1"), ["gpu/lib", "gpu"]);
        assert!(parents_of("init").is_empty());
    }

    #[test]
    fn base_layer_is_deterministic_and_carries_no_gpu_bytes() {
        let a = base_layer(b"#!init").unwrap();
        assert_eq!(a, base_layer(b"#!init").unwrap());
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init") && text.contains("dev/console"));
        assert!(!text.contains("gpu"), "base layer must not mention /gpu");
    }
}
