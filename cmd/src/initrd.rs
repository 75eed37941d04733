//! `gpu-passthrough initrd build | ensure | inspect`.

use std::path::PathBuf;

use gpu_passthrough::initrd::{LayerCompression, LayerForm, listing};
use gpu_passthrough::provision::{self, Freshness};
use gpu_passthrough::registry::Arch;
use gpu_passthrough::text::ListingText;

use crate::Global;
use crate::output::{CmdResult, DownloadBar, emit_text};

/// Initrd commands.
#[derive(Debug, clap::Subcommand)]
pub enum InitrdCommand {
    /// Fetch and verify a release's artifacts and write the base, gpu and combined layers.
    Build(BuildArgs),
    /// Like build, but return at once when up-to-date layers are cached.
    Ensure(BuildArgs),
    /// List the entries of an initrd (every layer, any compression) or of a GPU disk image.
    Inspect {
        /// The initrd file or disk image.
        file: PathBuf,
    },
}

/// Arguments of `initrd build` and `initrd ensure`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Registry release [default: the registry's default release].
    #[arg(long)]
    release: Option<String>,
    /// Guest architecture [default: this machine's].
    #[arg(long)]
    arch: Option<Arch>,
    /// Compression of the GPU layer (the base layer is always plain cpio).
    #[arg(long, default_value = "zstd")]
    compression: LayerCompression,
    /// How the GPU payload reaches the guest: `initrd` (a layer), `disk` (an erofs image for
    /// virtio-pmem or virtio-blk, with its mount modules in the base layer) or `both`.
    #[arg(long, default_value = "initrd")]
    form: LayerForm,
    /// Also copy the layers and manifest.json into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The static guest-init binary [default: `gpu-init` beside this program].
    #[arg(long, value_name = "PATH", env = "GPU_PASSTHROUGH_GUEST_INIT")]
    guest_init: Option<PathBuf>,
    /// NVIDIA modules to load in the guest (repeatable) [default: nvidia, nvidia_uvm,
    /// nvidia_modeset, nvidia_drm].
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,
    /// Driver capabilities to pack, e.g. `compute,utility,video` or `all` [default: every
    /// capability the driver libraries have].
    #[arg(long, value_name = "LIST")]
    capabilities: Option<gpu_passthrough::capabilities::CapabilitySet>,
}

/// Run an `initrd` command.
pub fn run(global: &Global, cmd: &InitrdCommand) -> CmdResult {
    match cmd {
        InitrdCommand::Build(args) => build(global, args, Freshness::Rebuild),
        InitrdCommand::Ensure(args) => build(global, args, Freshness::Ensure),
        InitrdCommand::Inspect { file } => emit_text(global, &ListingText(&listing::list(file)?)),
    }
}

fn build(global: &Global, args: &BuildArgs, freshness: Freshness) -> CmdResult {
    let registry = global.registry()?;
    let release = registry.resolve(args.release.as_deref())?;
    let arch = args.arch.map_or_else(provision::host_arch, Ok)?;
    let mut options = provision::default_build_options(arch, args.guest_init.as_deref())?;
    options.compression = args.compression;
    options.form = args.form;
    if !args.modules.is_empty() {
        options.modules = args.modules.clone();
    }
    options.capabilities = args.capabilities.clone();
    let progress = DownloadBar::new(global);
    let mut layers =
        provision::release_layers(&global.cache_dir(), release, &options, freshness, &progress)?;
    if let Some(out) = &args.out {
        layers.copy_to(out)?;
    }
    emit_text(global, &layers)
}
