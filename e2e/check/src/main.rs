//! `e2e-check`: the checks and helpers of `e2e/run`, over the project's real types.
//!
//! Guest subcommands read a console log and print one verdict per line (see [`checks`]); a
//! renamed field in the guest report, the manifest or the library's output types is a compile
//! error here rather than a check that quietly stops looking. `e2e/run` keeps provisioning and
//! booting.

mod builder;
mod checks;
mod cli_json;
mod console;
mod disk;
mod drivers;
mod guest;
mod host;
mod layers;
mod mmio;
mod modules;
mod serve;
mod signing;

use clap::{Parser, Subcommand};
use console::Console;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Checks and helpers for e2e/run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A GPU guest's console and what it booted: shared by the guest checks of runs A, D and E.
#[derive(clap::Args)]
struct GuestBoot {
    /// The console log.
    log: PathBuf,
    /// Expected NVIDIA driver version.
    #[arg(long)]
    driver: String,
    /// The guest's running kernel release.
    #[arg(long)]
    kernel: String,
    /// QEMU's exit code.
    #[arg(long, allow_hyphen_values = true)]
    boot_rc: i32,
}

#[derive(Subcommand)]
enum Command {
    /// Run M: the guest address bits and the QEMU arguments of the window for these BARs.
    MmioArgs {
        /// BAR sizes in bytes.
        #[arg(required = true)]
        bars: Vec<u64>,
    },
    /// Run M: the guest booted with the window shows it on its root bus.
    MmioGuest {
        /// The console log.
        log: PathBuf,
        /// The window the library computed, bytes.
        #[arg(long)]
        window_bytes: u64,
        /// QEMU's exit code.
        #[arg(long, allow_hyphen_values = true)]
        boot_rc: i32,
    },
    /// Run M: the arguments of an HGX-like VM (one GPU per BAR size, two NUMA nodes, a NIC
    /// beside the first), stand-ins for its devices.
    PlacementArgs {
        /// BAR sizes in bytes.
        #[arg(required = true)]
        bars: Vec<u64>,
    },
    /// Run M: the guest shows each device where the boot spec placed it.
    MmioPlacement {
        /// The console log.
        log: PathBuf,
        /// The BAR sizes `mmio-args` was given, bytes.
        #[arg(required = true)]
        bars: Vec<u64>,
    },
    /// Run A: a HAS_GPU=1 guest without a GPU (GPU-INIT report and workload).
    GpuGuest {
        #[command(flatten)]
        boot: GuestBoot,
    },
    /// Run A': nvidia.ko doctored as built for another kernel.
    WrongKernelGuest {
        /// The console log.
        log: PathBuf,
        /// The kernel release the doctored module claims.
        #[arg(long)]
        module_kernel: String,
    },
    /// Run B: the combined initrd booted with HAS_GPU=0.
    NoGpuGuest {
        /// The console log.
        log: PathBuf,
    },
    /// Run B: the base layer alone.
    BaseOnlyGuest {
        /// The console log.
        log: PathBuf,
    },
    /// Run C: the guest that plays the host (sysfs cycle and the CLI).
    Host {
        /// The console log.
        log: PathBuf,
        /// Write each command's stdout/stderr here as run-c-LABEL.out/.err.
        #[arg(long)]
        out_dir: PathBuf,
        /// The nested VM part ran.
        #[arg(long)]
        nested: bool,
    },
    /// Run E: the 535.309.01 upgrade booted with capabilities and device selection.
    UpgradeGuest {
        #[command(flatten)]
        boot: GuestBoot,
        /// NVIDIA_DRIVER_CAPABILITIES included video.
        #[arg(long)]
        video: bool,
        /// NVIDIA_VISIBLE_DEVICES given.
        #[arg(long)]
        visible: String,
        /// CUDA_VISIBLE_DEVICES given.
        #[arg(long)]
        cuda: String,
    },
    /// Run E: `versions diff --json` of the two releases.
    VersionDiff {
        /// The saved JSON.
        json: PathBuf,
        /// Driver version upgraded from.
        #[arg(long)]
        from: String,
        /// Driver version upgraded to.
        #[arg(long)]
        to: String,
    },
    /// Run A: what cpio -t lists in a GPU layer.
    GpuLayer {
        /// The layer file.
        layer: PathBuf,
        /// Its compression, for the check names.
        #[arg(long)]
        compression: String,
    },
    /// Run B: what cpio -t lists in the base layer.
    BaseLayer {
        /// The layer file.
        layer: PathBuf,
    },
    /// Run BH: the GPU layer of the release whose modules were `.ko.xz`.
    XzGpuLayer {
        /// The layer file.
        layer: PathBuf,
    },
    /// Run BH: xz modules loaded and the usrmerge `/lib` kept, after our layers were appended.
    AppendedGuest {
        /// The console log.
        log: PathBuf,
        /// Expected NVIDIA driver version.
        #[arg(long)]
        driver: String,
    },
    /// Print the base, GPU and combined layer paths of `initrd build --json` output.
    Layers {
        /// The saved JSON.
        build_json: PathBuf,
        /// Print the disk image's path instead (forms `disk` and `both`).
        #[arg(long)]
        disk: bool,
        /// Print the `GPU_DISK_VERITY=` word instead (built with `--verity`).
        #[arg(long, conflicts_with = "disk")]
        verity: bool,
    },
    /// Run D: the library's QEMU arguments for the image, one per line, then the kernel word.
    DiskArgs {
        /// The image.
        image: PathBuf,
        /// `pmem` or the virtio-blk device the guest will see (`/dev/vda`).
        #[arg(long)]
        attach: String,
        /// The VM's RAM.
        #[arg(long)]
        memory_mib: u64,
    },
    /// Run D: the image as built (fsck.erofs, padding, `initrd inspect`).
    DiskImage {
        /// The image.
        image: PathBuf,
        /// The gpu-passthrough CLI.
        #[arg(long)]
        cli: PathBuf,
    },
    /// Run D: a guest booted with the image (run A's checks plus the payload's).
    DiskGuest {
        #[command(flatten)]
        boot: GuestBoot,
        /// `pmem` or `virtio_blk`.
        #[arg(long)]
        source: String,
    },
    /// Run D: a verity image with a byte flipped, or booted without its root hash.
    DiskIntegrityGuest {
        /// The console log.
        log: PathBuf,
        /// The device the error must name.
        #[arg(long)]
        device: String,
    },
    /// Run D: GPU_DISK=pmem with no image attached.
    DiskMissingGuest {
        /// The console log.
        log: PathBuf,
    },
    /// Run D: guest memory figures, LABEL=LOG each, the base-only boot first.
    GuestMemory {
        /// LABEL=LOG.
        #[arg(required = true)]
        boots: Vec<String>,
    },
    /// Run D: write the summed smaps_rollup of these processes as JSON.
    Pss {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Process ids.
        #[arg(required = true)]
        pids: Vec<u32>,
    },
    /// Run D: host memory figures from two saved `pss` files.
    HostMemory {
        /// The initramfs guests' sums.
        #[arg(long)]
        initramfs: PathBuf,
        /// The pmem guests' sums.
        #[arg(long)]
        pmem: PathBuf,
        /// Guests per group.
        #[arg(long)]
        guests: usize,
        /// The image file.
        #[arg(long)]
        image: PathBuf,
        /// Bytes of the image resident in the host's page cache (`fincore`).
        #[arg(long)]
        image_resident_bytes: u64,
    },
    /// Run F: the modules `versions build` made (unpacked) against the prebuilt fixture modules.
    BuiltModules {
        /// The unpacked built artifact.
        built: PathBuf,
        /// The unpacked prebuilt modules.
        prebuilt: PathBuf,
        /// The signing certificate's common name (absent: the modules must be unsigned).
        #[arg(long, requires = "key_id")]
        signer: Option<String>,
        /// Its serial as `AA:BB:...`.
        #[arg(long, requires = "signer")]
        key_id: Option<String>,
    },
    /// Run F: `versions build --json` output, a compile or a cache hit; its time as a figure.
    BuildReport {
        /// The saved JSON.
        json: PathBuf,
        /// Names the build in check and figure names.
        #[arg(long)]
        label: String,
        /// The build must have been a cache hit.
        #[arg(long)]
        cache_hit: bool,
    },
    /// Run F: two builds' module digests must be equal.
    Reproducible {
        /// The first build's JSON.
        first: PathBuf,
        /// The second build's JSON.
        second: PathBuf,
    },
    /// Run F: a guest booted with `module.sig_enforce=1`.
    SignatureGuest {
        /// The console log.
        log: PathBuf,
        /// The kernel's reason the report must carry (`unsigned module`, `unavailable key`).
        #[arg(long)]
        reason: String,
        /// QEMU's exit code.
        #[arg(long, allow_hyphen_values = true)]
        boot_rc: i32,
    },
    /// Print the .ko files needed for the named modules, dependencies first.
    Modorder {
        /// A directory tree of .ko files.
        tree: PathBuf,
        /// Module names (`-` or `_`).
        #[arg(required = true)]
        modules: Vec<String>,
    },
    /// Serve a directory on 127.0.0.1 (a free port) until killed: the artifact mirror.
    Serve {
        /// The directory.
        dir: PathBuf,
        /// Written with the port once listening.
        #[arg(long)]
        port_file: PathBuf,
    },
    /// Make a module look built for another kernel release, in place.
    DoctorModule {
        /// The .ko file.
        module: PathBuf,
        /// The release it was built for.
        old: String,
        /// The release it should claim (same length).
        new: String,
        /// Change only vermagic's release, keep the CRCs (the module still loads).
        #[arg(long)]
        release_only: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e-check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    let verdicts = match command {
        Command::MmioArgs { bars } => return mmio::args(&bars),
        Command::PlacementArgs { bars } => return mmio::placement_args(&bars),
        Command::MmioGuest {
            log,
            window_bytes,
            boot_rc,
        } => mmio::guest(&Console::read(&log)?, window_bytes, boot_rc),
        Command::MmioPlacement { log, bars } => mmio::placement(&Console::read(&log)?, &bars)?,
        Command::GpuGuest { boot } => guest::gpu_guest(
            &Console::read(&boot.log)?,
            &boot.driver,
            &boot.kernel,
            boot.boot_rc,
        ),
        Command::WrongKernelGuest { log, module_kernel } => {
            guest::wrong_kernel_guest(&Console::read(&log)?, &module_kernel)
        }
        Command::NoGpuGuest { log } => guest::no_gpu_guest(&Console::read(&log)?),
        Command::BaseOnlyGuest { log } => guest::base_only_guest(&Console::read(&log)?),
        Command::Host {
            log,
            out_dir,
            nested,
        } => {
            let console = Console::read(&log)?;
            host::RunC::parse(&console).write_outputs(&out_dir)?;
            host::checks(&console, nested)
        }
        Command::UpgradeGuest {
            boot,
            video,
            visible,
            cuda,
        } => drivers::upgrade_guest(
            &Console::read(&boot.log)?,
            &boot.driver,
            &boot.kernel,
            boot.boot_rc,
            &drivers::Asked {
                video,
                visible: &visible,
                cuda: &cuda,
            },
        ),
        Command::VersionDiff { json, from, to } => drivers::version_diff(&json, &from, &to)?,
        Command::GpuLayer { layer, compression } => layers::gpu_layer(&layer, &compression),
        Command::BaseLayer { layer } => layers::base_layer(&layer),
        Command::XzGpuLayer { layer } => builder::xz_gpu_layer(&layer),
        Command::AppendedGuest { log, driver } => {
            builder::appended_guest(&Console::read(&log)?, &driver)
        }
        Command::Layers {
            build_json,
            disk,
            verity,
        } => {
            match (disk, verity) {
                (true, _) => println!("{}", layers::disk_path(&build_json)?),
                (_, true) => println!("{}", layers::verity_word(&build_json)?),
                _ => println!("{}", layers::paths(&build_json)?.join(" ")),
            }
            return Ok(());
        }
        Command::DiskArgs {
            image,
            attach,
            memory_mib,
        } => {
            for arg in disk::qemu_args(&image, &attach, memory_mib)? {
                println!("{arg}");
            }
            return Ok(());
        }
        Command::DiskGuest { boot, source } => {
            let source = serde_json::from_value(serde_json::Value::String(source))?;
            let console = Console::read(&boot.log)?;
            disk::disk_guest(&console, &boot.driver, &boot.kernel, boot.boot_rc, source)
        }
        Command::DiskImage { image, cli } => disk::disk_image(&image, &cli),
        Command::DiskIntegrityGuest { log, device } => {
            disk::disk_integrity_guest(&Console::read(&log)?, &device)
        }
        Command::DiskMissingGuest { log } => disk::disk_missing_guest(&Console::read(&log)?),
        Command::GuestMemory { boots } => {
            let mut read = Vec::new();
            for b in boots {
                let (label, log) = b
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("{b}: expected LABEL=LOG"))?;
                read.push((label.to_string(), Console::read(std::path::Path::new(log))?));
            }
            disk::guest_memory(&read)
        }
        Command::Pss { out, pids } => {
            std::fs::write(&out, serde_json::to_string(&disk::pss(&pids)?)?)?;
            return Ok(());
        }
        Command::HostMemory {
            initramfs,
            pmem,
            guests,
            image,
            image_resident_bytes,
        } => {
            let load = |p: &PathBuf| -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
                Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
            };
            disk::host_memory(
                &load(&initramfs)?,
                &load(&pmem)?,
                guests,
                std::fs::metadata(&image)?.len(),
                image_resident_bytes,
            )
        }
        Command::Modorder { tree, modules } => {
            for ko in modules::load_order(&tree, &modules)? {
                println!("{}", ko.display());
            }
            return Ok(());
        }
        Command::BuiltModules {
            built,
            prebuilt,
            signer,
            key_id,
        } => {
            let expected = signer
                .as_deref()
                .zip(key_id.as_deref())
                .map(|(signer, key_id)| signing::Expected { signer, key_id });
            signing::built_modules(&built, &prebuilt, expected.as_ref())
        }
        Command::BuildReport {
            json,
            label,
            cache_hit,
        } => signing::build_report(&json, &label, cache_hit)?,
        Command::Reproducible { first, second } => signing::reproducible(&first, &second)?,
        Command::SignatureGuest {
            log,
            reason,
            boot_rc,
        } => signing::signature_guest(&Console::read(&log)?, &reason, boot_rc),
        Command::Serve { dir, port_file } => return serve::serve(&dir, &port_file),
        Command::DoctorModule {
            module,
            old,
            new,
            release_only,
        } => {
            return modules::doctor_file(&module, &old, &new, release_only);
        }
    };
    verdicts.print();
    Ok(())
}
