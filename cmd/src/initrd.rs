//! `gpu-passthrough initrd build | ensure | inspect`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gpu_passthrough::archive::compress::LayerCompression;
use gpu_passthrough::archive::cpio::read_initrd;
use gpu_passthrough::fetch::{FetchError, FetchOptions, Fetcher};
use gpu_passthrough::initrd::{BuildOptions, InitrdBuilder, InitrdError, LayerFile, Layers};
use gpu_passthrough::registry::{Arch, Registry, Release};

use crate::Global;
use crate::output::{self, exit};
use crate::progress::DownloadBar;

/// Initrd commands.
#[derive(Debug, clap::Subcommand)]
pub enum InitrdCommand {
    /// Fetch and verify a release's artifacts and write the base, gpu and combined layers.
    Build(BuildArgs),
    /// Like build, but return at once when up-to-date layers are cached.
    Ensure(BuildArgs),
    /// List the layers and entries of any initrd file (concatenated, any compression).
    Inspect(InspectArgs),
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
}

/// Arguments of `initrd inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The initrd file.
    file: PathBuf,
}

/// Run an `initrd` command.
pub fn run(global: &Global, cmd: &InitrdCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InitrdCommand::Build(args) => build(global, args, false),
        InitrdCommand::Ensure(args) => build(global, args, true),
        InitrdCommand::Inspect(args) => inspect(global, args),
    }
}

fn build(global: &Global, args: &BuildArgs, reuse: bool) -> anyhow::Result<ExitCode> {
    let registry = Registry::load(&global.registries)?;
    let release = registry.resolve(args.release.as_deref())?;
    let mut layers = build_layers(global, release, args, reuse)?;
    if let Some(out) = &args.out {
        copy_out(&mut layers, out)?;
    }
    output::emit(global, &layers, print_layers)?;
    Ok(ExitCode::SUCCESS)
}

/// The layers of `release` for a guest of this machine's architecture, built when not cached:
/// `attach --release` hands the VMM their combined file.
pub fn ensure_layers(
    global: &Global,
    release: &Release,
    guest_init: Option<PathBuf>,
) -> anyhow::Result<Layers> {
    let args = BuildArgs {
        release: None,
        arch: None,
        compression: LayerCompression::Zstd,
        out: None,
        guest_init,
        modules: Vec::new(),
    };
    build_layers(global, release, &args, true)
}

fn build_layers(
    global: &Global,
    release: &Release,
    args: &BuildArgs,
    reuse: bool,
) -> anyhow::Result<Layers> {
    let arch = match args.arch {
        Some(a) => a,
        None => Arch::host().context("cannot tell this machine's architecture: pass --arch")?,
    };
    let guest_init = match &args.guest_init {
        Some(p) => p.clone(),
        None => default_guest_init()?,
    };
    let mut options = BuildOptions::new(arch, guest_init);
    options.compression = args.compression;
    if !args.modules.is_empty() {
        options.modules = args.modules.clone();
    }
    let cache = global.cache_dir();
    let fetcher = Fetcher::new(&cache, FetchOptions::default())?;
    let builder = InitrdBuilder::new(&cache, &fetcher);
    let progress = DownloadBar::new(global);
    let result = if reuse {
        builder.ensure(release, &options, &progress)
    } else {
        builder.build(release, &options, &progress)
    };
    result.map_err(|e| {
        let code = match &e {
            InitrdError::Inspect(_) => exit::VERIFY,
            InitrdError::Fetch(FetchError::Unpinned { .. }) => exit::REFUSED,
            _ => exit::FAILURE,
        };
        output::fail(code, e)
    })
}

/// `gpu-init` next to this program (as cargo and packages install them), else a system path.
fn default_guest_init() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("gpu-init"));
        }
    }
    candidates.push(PathBuf::from("/usr/libexec/gpu-passthrough/gpu-init"));
    candidates.push(PathBuf::from("/usr/lib/gpu-passthrough/gpu-init"));
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "no guest init found (looked in {}): build it with `RUSTFLAGS='-C \
             target-feature=+crt-static' cargo build --release -p gpu-passthrough-init --target \
             x86_64-unknown-linux-gnu` and pass --guest-init target/x86_64-unknown-linux-gnu/release/gpu-init",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// Copy the layers and the manifest into `out`, and point the result at the copies.
fn copy_out(layers: &mut Layers, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cache_dir = layers.base.path.parent().map(Path::to_path_buf);
    for layer in [&mut layers.base, &mut layers.gpu, &mut layers.combined] {
        let name = layer
            .path
            .file_name()
            .context("layer path has no file name")?;
        let dest = out.join(name);
        copy_atomically(&layer.path, &dest)?;
        layer.path = dest;
    }
    if let Some(dir) = cache_dir {
        copy_atomically(&dir.join("manifest.json"), &out.join("manifest.json"))?;
    }
    Ok(())
}

fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("moving {} into place", to.display()))?;
    Ok(())
}

fn print_layer(name: &str, l: &LayerFile) {
    println!(
        "{name:<9} {:>12} bytes  sha256:{}  {}",
        l.size,
        l.sha256,
        l.path.display()
    );
}

fn print_layers(layers: &Layers) {
    let m = &layers.manifest;
    println!(
        "release {} (kernel {}, driver {} {}, {}){}",
        layers.release,
        m.kernel_version,
        m.driver_version,
        m.module_flavor,
        m.arch,
        if layers.reused {
            ": up to date, nothing built"
        } else {
            ""
        }
    );
    print_layer("base", &layers.base);
    print_layer("gpu", &layers.gpu);
    print_layer("combined", &layers.combined);
    let order: Vec<_> = m.modules.iter().map(|m| m.name.as_str()).collect();
    println!("modules   {}", order.join(" → "));
    println!("firmware  {}", m.firmware.len());
    println!("libraries {}", m.libraries.len());
}

fn inspect(global: &Global, args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let layers = read_initrd(&args.file).map_err(|e| output::fail(exit::FAILURE, e))?;
    output::emit(global, &layers, |layers| {
        for (i, l) in layers.iter().enumerate() {
            println!(
                "layer {i}: byte {} · {} · {} entries · {} bytes of files",
                l.offset,
                l.compression,
                l.entries.len(),
                l.content_bytes
            );
            for e in &l.entries {
                let extra = match (&e.target, e.rdev) {
                    (Some(t), _) => format!(" -> {t}"),
                    (_, Some((ma, mi))) => format!(" ({ma},{mi})"),
                    _ => String::new(),
                };
                println!(
                    "  {:<7} {:04o} {:>11}  {}{extra}",
                    e.kind, e.mode, e.size, e.path
                );
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
