//! Host-side commands: doctor, devices, vgpu types, plan, attach, detach, reconcile.
//!
//! A thin layer over `gpu_passthrough::attach::Host`: parse, call, print.

use std::path::PathBuf;

use gpu_passthrough::attach::{FabricRequest, Owner, PlanRequest};
use gpu_passthrough::outcome::Classified;
use gpu_passthrough::pci::AddressError;
use gpu_passthrough::provision::{Provisioner, VmDevices, VmRequest};
use gpu_passthrough::registry::{ModuleFlavor, Registry};
use gpu_passthrough::vgpu::PlaceRequest;
use gpu_passthrough::vmm::{DiskRequest, Vmm};

use crate::Global;
use crate::output::{CmdResult, DownloadBar, emit_judged, emit_text};

/// Options shared by the host commands.
#[derive(Debug, Clone, clap::Args)]
pub struct HostOpts {
    /// The NVIDIA driver's supported-gpus.json: GPU names and open-module support.
    #[arg(long, value_name = "FILE", env = "GPU_PASSTHROUGH_SUPPORTED_GPUS")]
    pub supported_gpus: Option<PathBuf>,
}

/// Arguments of `devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Every PCI device, not only passthrough candidates.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    host: HostOpts,
}

/// vGPU commands.
#[derive(Debug, clap::Subcommand)]
pub enum VgpuCommand {
    /// Every vGPU profile the host can create now, across GPUs and both frameworks.
    Types,
}

/// What to move (shared by `plan` and `attach`).
#[derive(Debug, Clone, clap::Args)]
pub struct Selection {
    /// Devices by address, DDDD:BB:DD.F (BB:DD.F means domain 0000).
    #[arg(value_name = "DEVICE")]
    devices: Vec<String>,
    /// Pick this many free GPUs, preferring one NUMA node.
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
    /// The guest release the VM boots (its module flavor decides open-module checks).
    #[arg(long, value_name = "RELEASE")]
    release: Option<String>,
    /// The release's module flavor (until --release is resolved through the registry).
    #[arg(long, value_name = "open|proprietary")]
    flavor: Option<ModuleFlavor>,
    /// Allow moving the host's boot display.
    #[arg(long)]
    allow_boot_vga: bool,
    /// vGPU: create an mdev of this type on each device instead of binding it (journaled and
    /// released like --vgpu).
    #[arg(long, value_name = "TYPE")]
    mdev_type: Option<String>,
    /// Put the GPUs in one P2P clique even when they are not behind one PCIe switch.
    #[arg(long)]
    p2p_clique: bool,
    /// VFIO driver for the named devices [default: the kernel's modules.alias, else vfio-pci].
    #[arg(long, value_name = "NAME")]
    vfio_driver: Option<String>,
    #[command(flatten)]
    fabric: FabricRequest,
    #[command(flatten)]
    host: HostOpts,
}

/// Arguments of `plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    sel: Selection,
    /// The owner asking (its own devices show as already attached).
    #[arg(long, value_name = "ID")]
    owner: Option<String>,
    #[command(flatten)]
    vgpu: Option<PlaceRequest>,
}

/// Arguments of `attach`.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    #[command(flatten)]
    sel: Selection,
    /// Who holds the devices (`pid:N` is released by reconcile once process N is gone).
    #[arg(long, value_name = "ID")]
    owner: String,
    /// Print the arguments of this VMM (both are in the JSON).
    #[arg(
        long,
        value_name = "cloud-hypervisor|qemu",
        default_value = "cloud-hypervisor"
    )]
    vmm: Vmm,
    /// The initrd to boot [default: with --release, that release's combined layer, built
    /// and cached by `initrd ensure` before any device is touched].
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// The static guest init for the ensured initrd [default: `gpu-init` beside this program].
    #[arg(long, value_name = "PATH", env = "GPU_PASSTHROUGH_GUEST_INIT")]
    guest_init: Option<PathBuf>,
    #[command(flatten)]
    disk: DiskRequest,
    #[command(flatten)]
    vgpu: Option<PlaceRequest>,
}

/// Arguments of `detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The owner whose devices go back.
    #[arg(long, value_name = "ID")]
    owner: String,
    #[command(flatten)]
    host: HostOpts,
}

/// Arguments of `reconcile`.
#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Declare an owner gone (repeatable): its devices are released. `pid:N` owners are
    /// checked automatically; other owners are never released without this.
    #[arg(long, value_name = "ID")]
    gone: Vec<String>,
    #[command(flatten)]
    host: HostOpts,
}

/// The request as parsed; bad input is refused before anything is built or fetched.
fn plan_request(sel: &Selection, owner: Option<Owner>) -> Result<PlanRequest, AddressError> {
    Ok(PlanRequest {
        devices: sel
            .devices
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?,
        gpus: sel.gpus,
        owner,
        flavor: sel.flavor,
        supported_gpus: sel.host.supported_gpus.clone(),
        allow_boot_vga: sel.allow_boot_vga,
        mdev_type: sel.mdev_type.clone(),
        p2p_clique: sel.p2p_clique,
        vfio_driver: sel.vfio_driver.clone(),
        fabric: sel.fabric.clone(),
    })
}

/// `doctor`: host readiness.
pub fn doctor(global: &Global, opts: &HostOpts) -> CmdResult {
    let h = global.at.host(Vec::new());
    emit_judged(global, &h.doctor(opts.supported_gpus.as_deref())?)
}

/// `devices`: passthrough candidates or every device.
pub fn devices(global: &Global, args: &DevicesArgs) -> CmdResult {
    let h = global.at.host(Vec::new());
    let listing = h.listing(args.all, args.host.supported_gpus.as_deref())?;
    emit_text(global, &listing)
}

/// `vgpu types`: every profile the host can create now.
pub fn vgpu(global: &Global, cmd: &VgpuCommand) -> CmdResult {
    match cmd {
        VgpuCommand::Types => emit_text(global, &global.at.host(Vec::new()).vgpu_catalogue()),
    }
}

/// `plan`: what attach would do (`--vgpu`: where the vGPUs would go).
pub fn plan(global: &Global, args: &PlanArgs) -> CmdResult {
    if let Some(place) = &args.vgpu {
        return emit_text(global, &global.at.host(Vec::new()).plan_vgpu(place)?);
    }
    let owner = args.owner.as_deref().map(Owner::new).transpose()?;
    let req = plan_request(&args.sel, owner)?;
    let registry = Registry::for_request(&global.at.registries, args.sel.release.as_deref())?;
    let h = global.at.host(Vec::new());
    let plan = Provisioner::new(&h, &registry, global.at.cache_dir())
        .plan(&req, args.sel.release.as_deref())?;
    emit_judged(global, &plan)
}

/// `attach`: ensure the release's layers, bind (or create vGPUs), verify, print the boot spec.
pub fn attach(global: &Global, args: &AttachArgs) -> CmdResult {
    let owner = Owner::new(&args.owner)?;
    let devices = match &args.vgpu {
        Some(place) => VmDevices::Vgpus(place.clone()),
        None => VmDevices::Gpus(plan_request(&args.sel, Some(owner.clone()))?),
    };
    let registry = Registry::for_request(&global.at.registries, args.sel.release.as_deref())?;
    let h = global.at.host(Vec::new());
    let mut provisioner = Provisioner::new(&h, &registry, global.at.cache_dir());
    if let Some(init) = &args.guest_init {
        provisioner = provisioner.with_guest_init(init);
    }
    let request = VmRequest {
        devices,
        owner,
        release: args.sel.release.clone(),
        initrd: args.initrd.clone(),
        disk: args.disk.clone(),
    };
    let spec = provisioner.attach_vm(request, &DownloadBar::new(global))?;
    emit_text(global, &spec.text(args.vmm))
}

/// `detach`: devices back to their original drivers.
pub fn detach(global: &Global, args: &DetachArgs) -> CmdResult {
    let owner = Owner::new(&args.owner)?;
    emit_text(global, &global.at.host(Vec::new()).detach(&owner)?)
}

/// `reconcile`: repair what crashes left behind.
pub fn reconcile(global: &Global, args: &ReconcileArgs) -> CmdResult {
    let gone = args
        .gone
        .iter()
        .map(|o| Owner::new(o))
        .collect::<Result<_, _>>()?;
    let report = global
        .at
        .host(gone)
        .reconcile()
        .map_err(|e| Classified::from(e).context("reconcile"))?;
    emit_judged(global, &report)
}
