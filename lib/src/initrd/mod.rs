//! `initrd`: build the base, GPU and combined initrd layers of a registry release.
//!
//! - **base**: `/init` (the static guest init), `/dev/console`, `/dev/null` and the directories
//!   init needs. Plain cpio: it is small, and a plain archive can be followed by any other.
//! - **gpu**: everything under `/gpu/` (firmware too, in `/gpu/firmware`, which the guest init
//!   gives the kernel as `firmware_class.path`) and nothing outside it, compressed as asked. It is
//!   self-contained, so a platform can append it to its own initrd, even one whose `/lib` is a
//!   symlink: an entry for `lib` would make the kernel's unpacker replace that link.
//! - **combined**: base followed by gpu, one file for GPU VMs.
//!
//! Layers are cached under `<cache>/layers/<key>/`, where the key is a hash over everything that
//! determines their bytes (artifact digests, guest-init digest, options, builder version). A
//! build writes into a temporary directory and renames it into place, so a reader sees either
//! nothing or a complete result; an interrupted build leaves only a temporary directory that the
//! next build of the same key removes ([`crate::failpoint::Failpoint::InitrdMidway`] aborts a
//! build half-way through the GPU layer, for tests of exactly that).
//!
//! One concern a file: [`cache`] (the key and the atomic publish), `plan` (what goes into the
//! GPU layer, decided before a byte is written), [`guest_init`] (finding the static guest init
//! and checking it), `write` (streaming the layers to disk, hashed as they go).

mod cache;
pub mod disk;
pub use disk::{DiskError, LayerForm};
pub mod guest_init;
pub mod listing;
mod plan;
pub use plan::module_params;
mod select;
pub(crate) mod tree;
mod write;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gpu_passthrough_guest_contract as manifest;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::archive::ArchiveError;
pub use crate::archive::compress::LayerCompression;
use crate::archive::cpio::CpioError;
pub use crate::archive::cpio::{InitrdLayer, read_initrd};
use crate::fetch::{FetchError, Fetcher, Progress};
use crate::inspect::{
    self, Expectations, InspectError, Inventory, SigningRule, Trees, inspect_for,
};
use crate::outcome::{Classify, Outcome};
use crate::registry::{Arch, ArtifactKind, Release};
use crate::remedy::Remedy;

/// Bumped whenever the builder's output changes for the same inputs, so old cache entries are
/// never mistaken for new ones.
const BUILDER_VERSION: u32 = 6;

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
    #[error("cannot read the guest init `{path}`; {}", guest_init::BUILD_HINT)]
    GuestInit {
        /// The path given.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// No guest init was given and none is installed.
    #[error(
        "no guest init found (looked in {looked_in}); {}",
        guest_init::BUILD_HINT
    )]
    NoGuestInit {
        /// The places looked in.
        looked_in: String,
    },
    /// The guest init is not a static binary for the guest's architecture: it would fail as
    /// `/init` before printing anything.
    #[error(
        "guest init `{path}` cannot be the guest's /init; {}",
        guest_init::BUILD_HINT
    )]
    GuestInitUnfit {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        why: guest_init::Unfit,
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
    /// Capabilities were asked for and the artifact has a file the capability table does not
    /// classify: packing or dropping it would be a guess.
    #[error(
        "release `{release}`: {file} belongs to no known driver capability, so a capability \
         selection cannot tell whether to pack it; build with every capability, or add it to the \
         capability table"
    )]
    UnclassifiedFile {
        /// Release name.
        release: String,
        /// The library or program.
        file: String,
    },
    /// A capability was asked for that the release's libraries do not carry.
    #[error(
        "release `{release}` carries no `{capability}` libraries (it has: {carried}); ask for \
         those, or pick a release whose driver libraries have them"
    )]
    CapabilityNotCarried {
        /// Release name.
        release: String,
        /// The capability asked for.
        capability: crate::capabilities::Capability,
        /// What the artifact has.
        carried: String,
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
    /// Making the GPU disk image or resolving its mount modules failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A file-system operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl Classify for InitrdError {
    fn outcome(&self) -> Outcome {
        match self {
            InitrdError::Fetch(e) => e.outcome(),
            InitrdError::Archive(e) => e.outcome(),
            InitrdError::Inspect(e) => e.outcome(),
            InitrdError::Cpio(e) => e.outcome(),
            InitrdError::Disk(e) => e.outcome(),
            InitrdError::Release { .. }
            | InitrdError::GuestInit { .. }
            | InitrdError::NoGuestInit { .. }
            | InitrdError::GuestInitUnfit { .. }
            | InitrdError::UnknownModule { .. }
            | InitrdError::UnclassifiedFile { .. }
            | InitrdError::CapabilityNotCarried { .. }
            | InitrdError::Io { .. } => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            InitrdError::Fetch(e) => e.remedy(),
            InitrdError::Archive(e) => e.remedy(),
            InitrdError::Inspect(e) => e.remedy(),
            InitrdError::Cpio(e) => e.remedy(),
            InitrdError::Disk(e) => e.remedy(),
            InitrdError::GuestInit { .. } | InitrdError::NoGuestInit { .. } => {
                Some(Remedy::GuestInit)
            }
            InitrdError::Release { .. }
            | InitrdError::GuestInitUnfit { .. }
            | InitrdError::UnknownModule { .. }
            | InitrdError::UnclassifiedFile { .. }
            | InitrdError::CapabilityNotCarried { .. }
            | InitrdError::Io { .. } => None,
        }
    }
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
    /// How the payload reaches the guest: initramfs layer, disk image, or both.
    pub form: LayerForm,
    /// Append a dm-verity hash tree to the disk image (forms `disk` and `both`); the guest then
    /// opens it only through dm-verity with the recorded root hash.
    pub verity: bool,
    /// Driver capabilities whose libraries and programs go into the layer; `None`: every
    /// capability the artifact has.
    pub capabilities: Option<crate::capabilities::CapabilitySet>,
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
            form: LayerForm::Initrd,
            verity: false,
            capabilities: None,
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
    /// The erofs image of `/gpu` (forms `disk` and `both`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<LayerFile>,
    /// The disk image's dm-verity root hash and parameters (built with `verity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<disk::Verity>,
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

impl Layers {
    /// Copy the three layers and `manifest.json` into `out` (created if missing), each by an
    /// atomic rename of a complete copy, and point the result at the copies.
    pub fn copy_to(&mut self, out: &Path) -> Result<(), InitrdError> {
        fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
        let cache_dir = self.base.path.parent().map(Path::to_path_buf);
        for layer in [&mut self.base, &mut self.gpu, &mut self.combined]
            .into_iter()
            .chain(self.disk.as_mut())
        {
            let name = layer.path.file_name().map(PathBuf::from).ok_or_else(|| {
                io_err("copying a layer")(io::Error::other("layer path has no file name"))
            })?;
            let dest = out.join(name);
            copy_atomically(&layer.path, &dest)?;
            layer.path = dest;
        }
        if let Some(dir) = cache_dir {
            copy_atomically(&dir.join("manifest.json"), &out.join("manifest.json"))?;
        }
        Ok(())
    }
}

fn copy_atomically(from: &Path, to: &Path) -> Result<(), InitrdError> {
    let tmp = to.with_extension("partial");
    fs::copy(from, &tmp).map_err(io_err(format!(
        "copying {} to {}",
        from.display(),
        tmp.display()
    )))?;
    crate::fsutil::rename_durable(&tmp, to)
        .map_err(io_err(format!("moving {} into place", to.display())))
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

    /// Fetch (verified), unpack once per digest, and inspect the release's NVIDIA artifacts:
    /// what a layer of this release would carry, and the digests it was made from.
    pub fn inventory(
        &self,
        release: &Release,
        arch: Arch,
        progress: &dyn Progress,
    ) -> Result<(Inventory, Vec<manifest::Input>), InitrdError> {
        let fetched = self.fetch_all(release, arch, progress)?;
        self.with_unpacked(&fetched.archives(), |arrivals| {
            let trees = fetched.take_trees(arrivals)?;
            let expect = expectations(release, arch, &fetched.driver_version);
            let inventory = inspect_for(&expect, &trees.all(), None)?;
            Ok((inventory, fetched.inputs.clone()))
        })
    }

    /// Fetch every artifact of the release the layers are made from, verified.
    fn fetch_all(
        &self,
        release: &Release,
        arch: Arch,
        progress: &dyn Progress,
    ) -> Result<Fetched, InitrdError> {
        let missing = |what: String| InitrdError::Release {
            release: release.name.clone(),
            arch,
            what,
        };
        let driver_version = release.driver_version.clone().ok_or_else(|| {
            missing("has no driver_version: it is a kernel-only release; pick a release with NVIDIA artifacts".into())
        })?;
        let mut fetched = Fetched {
            driver_version,
            artifacts: Vec::new(),
            inputs: Vec::new(),
        };
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
                        "has no `{kind}` artifact; add a release that has one"
                    )));
                }
                continue;
            };
            let got = self.fetcher.fetch(release, arch, artifact, progress)?;
            fetched.inputs.push(manifest::Input {
                kind: kind.as_str().to_string(),
                sha256: got.sha256.to_string(),
            });
            fetched
                .artifacts
                .push((kind, got.path, got.sha256.to_string()));
        }
        Ok(fetched)
    }

    /// Fetch, unpack, inspect, and write the three layers and the record into `dir`.
    ///
    /// The plain initramfs form is written while the driver libraries (the largest artifact)
    /// are still being unpacked: the GPU layer's kernel side (modules and firmware) goes first,
    /// its userspace side once the libraries are inspected. The other forms need the whole plan
    /// before the GPU layer (the image comes first, and the base layer names it); the bytes of
    /// the GPU layer are the same either way.
    fn write_layers(
        &self,
        release: &Release,
        options: &BuildOptions,
        key: &str,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<Layers, InitrdError> {
        let arch = options.arch;
        let fetched = self.fetch_all(release, arch, progress)?;
        let guest_init = guest_init::read_checked(&options.guest_init, arch)?;
        self.with_unpacked(&fetched.archives(), |arrivals| {
            let trees = fetched.take_kernel_side(arrivals)?;
            let expect = expectations(release, arch, &fetched.driver_version);
            // Only the modules this layer carries have their dependencies resolved.
            let kernel_side =
                inspect::inspect_kernel_side(&expect, &trees.all(), Some(&options.modules));
            // The driver libraries last: the largest archive, possibly still inflating.
            let with_libraries = |kernel_side| {
                let tree = fetched.take_driver_libs(arrivals)?;
                inspect::with_driver_libs(kernel_side, &expect, tree.as_deref())
                    .map_err(InitrdError::from)
            };
            let plan_of = |inventory: &Inventory| {
                plan::GpuLayerPlan::new(
                    release,
                    options,
                    &fetched.driver_version,
                    inventory,
                    fetched.inputs.clone(),
                )
            };
            let (inventory, plan, base, gpu, combined, disk, verity) = match kernel_side {
                Ok(kernel_side) if options.form == LayerForm::Initrd => {
                    let written = plan::KernelSide::new(release, options, &kernel_side)?;
                    let (base, base_bytes) = write::base_file(dir, &guest_init, &[])?;
                    let (gpu, combined, (inventory, plan)) =
                        write::gpu_files(dir, options.compression, &base_bytes, |cpio| {
                            written.write(cpio)?;
                            let inventory = with_libraries(Ok(kernel_side))?;
                            let plan = plan_of(&inventory)?;
                            plan.write_userspace(cpio, &guest_init, &written)?;
                            Ok((inventory, plan))
                        })?;
                    (inventory, plan, base, gpu, combined, None, None)
                }
                kernel_side => {
                    let inventory = with_libraries(kernel_side)?;
                    let plan = plan_of(&inventory)?;
                    let image = match options.form.image() {
                        true => Some(disk_image(
                            release,
                            options,
                            key,
                            dir,
                            &plan,
                            &guest_init,
                            &expect,
                            trees.kernel_modules.as_deref(),
                        )?),
                        false => None,
                    };
                    let base_extra = image.as_ref().map_or(&[][..], |i| &i.base_files);
                    let (base, base_bytes) = write::base_file(dir, &guest_init, base_extra)?;
                    let (gpu, combined) = if options.form.initramfs() {
                        let (gpu, combined, ()) =
                            write::gpu_files(dir, options.compression, &base_bytes, |cpio| {
                                plan.write(cpio, &guest_init)
                            })?;
                        (gpu, combined)
                    } else {
                        // The disk form: the base layer is the whole initrd such a VM boots.
                        (base.clone(), base.clone())
                    };
                    let (disk, verity) = match image {
                        Some(i) => (Some(i.image), i.verity),
                        None => (None, None),
                    };
                    (inventory, plan, base, gpu, combined, disk, verity)
                }
            };

            let manifest_json = plan.manifest_json()?;
            write::synced(&dir.join("manifest.json"), &manifest_json)?;
            let supported_gpus = match &inventory.supported_gpus {
                Some(src) => {
                    let bytes =
                        fs::read(src).map_err(io_err(format!("reading {}", src.display())))?;
                    write::synced(&dir.join(SUPPORTED_GPUS), &bytes)?;
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
                disk,
                verity,
                manifest: plan.manifest,
                supported_gpus,
                reused: false,
            };
            let record = serde_json::to_vec_pretty(&layers)
                .map_err(|e| io_err("writing the layer record")(io::Error::other(e)))?;
            write::synced(&dir.join(RECORD), &record)?;
            Ok(layers)
        })
    }
}

/// The disk forms' image and the base layer's files that mount it.
struct DiskImage {
    image: LayerFile,
    verity: Option<disk::Verity>,
    /// The mount modules (from the kernel-modules tree) and the binding to this image.
    base_files: Vec<(String, Vec<u8>)>,
}

/// Make the disk forms' image of `plan` in `dir` (before the base layer, which names it).
#[allow(clippy::too_many_arguments)]
fn disk_image(
    release: &Release,
    options: &BuildOptions,
    key: &str,
    dir: &Path,
    plan: &plan::GpuLayerPlan,
    guest_init: &[u8],
    expect: &Expectations,
    kernel_tree: Option<&Path>,
) -> Result<DiskImage, InitrdError> {
    let uuid = disk::uuid_from_key(key);
    let tree = dir.join("disk-tree");
    plan.materialize(&tree, guest_init)?;
    let salt = options.verity.then(|| disk::salt_from_key(key));
    let image = disk::make_image(&tree, dir, &uuid, salt.as_deref());
    let _ = fs::remove_dir_all(&tree);
    let (image, verity) = image?;
    let modules = disk::mount_modules(&release.name, expect, kernel_tree, options.verity)?;
    let binding = disk::ImageBinding {
        uuid,
        verity_root: verity.as_ref().map(|v| v.root_hash.clone()),
    };
    Ok(DiskImage {
        image,
        verity,
        base_files: disk::base_files(&modules, &binding)?,
    })
}

/// What a release's layers are made from: its artifacts, fetched and verified, in the order
/// [`InitrdBuilder::with_unpacked`] unpacks them (the driver libraries last).
struct Fetched {
    driver_version: String,
    /// Kind, archive, SHA-256.
    artifacts: Vec<(ArtifactKind, PathBuf, String)>,
    /// What the manifest records of them.
    inputs: Vec<manifest::Input>,
}

/// The unpacked trees, by kind.
#[derive(Default)]
struct UnpackedTrees {
    kernel_modules: Option<PathBuf>,
    nvidia_modules: Option<PathBuf>,
    firmware: Option<PathBuf>,
    driver_libs: Option<PathBuf>,
}

impl UnpackedTrees {
    fn all(&self) -> Trees<'_> {
        Trees {
            nvidia_modules: self.nvidia_modules.as_deref(),
            kernel_modules: self.kernel_modules.as_deref(),
            firmware: self.firmware.as_deref(),
            driver_libs: self.driver_libs.as_deref(),
        }
    }
}

impl Fetched {
    fn archives(&self) -> Vec<(&Path, &str)> {
        self.artifacts
            .iter()
            .map(|(_, path, sha256)| (path.as_path(), sha256.as_str()))
            .collect()
    }

    /// Every tree but the driver libraries', waiting for each.
    fn take_kernel_side(&self, arrivals: &cache::Arrivals) -> Result<UnpackedTrees, InitrdError> {
        let mut trees = UnpackedTrees::default();
        for (i, (kind, ..)) in self.artifacts.iter().enumerate() {
            let slot = match kind {
                ArtifactKind::KernelModules => &mut trees.kernel_modules,
                ArtifactKind::NvidiaModules => &mut trees.nvidia_modules,
                ArtifactKind::NvidiaFirmware => &mut trees.firmware,
                _ => continue,
            };
            *slot = Some(arrivals.take(i)?);
        }
        Ok(trees)
    }

    /// The driver libraries' tree, waiting for it.
    fn take_driver_libs(&self, arrivals: &cache::Arrivals) -> Result<Option<PathBuf>, InitrdError> {
        let i = self
            .artifacts
            .iter()
            .position(|(kind, ..)| *kind == ArtifactKind::NvidiaDriverLibs);
        i.map(|i| arrivals.take(i)).transpose()
    }

    /// Every tree, waiting for each.
    fn take_trees(&self, arrivals: &cache::Arrivals) -> Result<UnpackedTrees, InitrdError> {
        let mut trees = self.take_kernel_side(arrivals)?;
        trees.driver_libs = self.take_driver_libs(arrivals)?;
        Ok(trees)
    }
}

/// What the release says its artifacts must be.
fn expectations<'r>(release: &'r Release, arch: Arch, driver_version: &'r str) -> Expectations<'r> {
    Expectations {
        kernel_version: &release.kernel_version,
        driver_version,
        arch,
        flavor: release.module_flavor,
        gsp: release.gsp,
        signing: SigningRule::of(release),
    }
}
