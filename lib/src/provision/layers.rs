//! A release's layers as a caller asks for them (`initrd build|ensure`): resolved against the
//! registry, built or taken from the cache, copied out.

use std::path::{Path, PathBuf};

use super::{Locations, ProvisionError};
use crate::capabilities::CapabilitySet;
use crate::fetch::{FetchOptions, Fetcher, Progress};
use crate::initrd::{
    BuildOptions, InitrdBuilder, InitrdError, LayerCompression, LayerForm, Layers, guest_init,
};
use crate::registry::{Arch, Release};

/// A release's layers to build (`initrd build|ensure` on the CLI).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct LayerRequest {
    /// Registry release [default: the registry's default release].
    #[cfg_attr(feature = "cli", arg(long))]
    pub release: Option<String>,
    /// Guest architecture [default: this machine's].
    #[cfg_attr(feature = "cli", arg(long))]
    pub arch: Option<Arch>,
    /// Compression of the GPU layer (the base layer is always plain cpio).
    #[cfg_attr(feature = "cli", arg(long, default_value = "zstd"))]
    pub compression: LayerCompression,
    /// How the GPU payload reaches the guest: `initrd` (a layer), `disk` (an erofs image for
    /// virtio-pmem or virtio-blk, with its mount modules in the base layer) or `both`.
    #[cfg_attr(feature = "cli", arg(long, default_value = "initrd"))]
    pub form: LayerForm,
    /// Append a dm-verity hash tree to the disk image (with `--form disk` or `both`): the root
    /// hash goes into the record and the boot's kernel command line, and the guest opens the
    /// image only through dm-verity. Serve such a disk over virtio-blk: DAX does not pass
    /// through dm-verity.
    #[cfg_attr(feature = "cli", arg(long))]
    pub verity: bool,
    /// Also copy the layers and manifest.json into this directory.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR"))]
    pub out: Option<PathBuf>,
    /// The static guest-init binary [default: `gpu-init` beside this program].
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "PATH", env = "GPU_PASSTHROUGH_GUEST_INIT")
    )]
    pub guest_init: Option<PathBuf>,
    /// NVIDIA modules to load in the guest (repeatable) [default: nvidia, nvidia_uvm,
    /// nvidia_modeset, nvidia_drm].
    #[cfg_attr(feature = "cli", arg(long = "module", value_name = "NAME"))]
    pub modules: Vec<String>,
    /// Driver capabilities to pack, e.g. `compute,utility,video` or `all` [default: every
    /// capability the driver libraries have].
    #[cfg_attr(feature = "cli", arg(long, value_name = "LIST"))]
    pub capabilities: Option<CapabilitySet>,
}

/// The layers `req` asks for, built (and cached) when needed, then copied to `req.out`.
pub fn layers(
    at: &Locations,
    req: &LayerRequest,
    freshness: Freshness,
    progress: &dyn Progress,
) -> Result<Layers, ProvisionError> {
    let registry = at.registry()?;
    let release = registry.resolve(req.release.as_deref())?;
    let arch = req.arch.map_or_else(host_arch, Ok)?;
    let mut options = default_build_options(arch, req.guest_init.as_deref())?;
    options.compression = req.compression;
    options.form = req.form;
    options.verity = req.verity;
    if !req.modules.is_empty() {
        options.modules = req.modules.clone();
    }
    options.capabilities = req.capabilities.clone();
    let mut layers = release_layers(&at.cache_dir(), release, &options, freshness, progress)?;
    if let Some(out) = &req.out {
        layers.copy_to(out)?;
    }
    Ok(layers)
}

/// The architecture of guests built on this machine unless the caller says otherwise.
pub fn host_arch() -> Result<Arch, ProvisionError> {
    Arch::host().ok_or(ProvisionError::UnsupportedArch(std::env::consts::ARCH))
}

/// Build options for `release`'s guests: the defaults, with the given guest init or the
/// installed one.
pub fn default_build_options(
    arch: Arch,
    guest_init: Option<&Path>,
) -> Result<BuildOptions, InitrdError> {
    let guest_init = match guest_init {
        Some(p) => p.to_owned(),
        None => guest_init::find_installed()?,
    };
    Ok(BuildOptions::new(arch, guest_init))
}

/// Whether [`release_layers`] may return a cached result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Return intact cached layers at once (a warm call costs milliseconds).
    Ensure,
    /// Build again and replace the cached result.
    Rebuild,
}

/// The layers of `release`, built (and cached under `cache_dir`) when needed.
pub fn release_layers(
    cache_dir: &Path,
    release: &Release,
    options: &BuildOptions,
    freshness: Freshness,
    progress: &dyn Progress,
) -> Result<Layers, InitrdError> {
    let fetcher = Fetcher::new(cache_dir, FetchOptions::default())?;
    let builder = InitrdBuilder::new(cache_dir, &fetcher);
    match freshness {
        Freshness::Ensure => builder.ensure(release, options, progress),
        Freshness::Rebuild => builder.build(release, options, progress),
    }
}
