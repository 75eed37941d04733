//! Host-side commands: doctor, devices, plan, attach, detach, reconcile.
//!
//! A thin layer over `gpu_passthrough::attach::Host`: parse, call, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gpu_passthrough::attach::{
    AttachError, CheckStatus, Host, Owner, PidLiveness, Plan, PlanRequest,
};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough::provision::{GpuVmRequest, ProvisionError, Provisioner};
use gpu_passthrough::registry::{ModuleFlavor, Registry};

use crate::Global;
use crate::output::{emit, exit, fail};
use crate::progress::DownloadBar;

/// Exit code of success.
const SUCCESS: u8 = 0;

/// Options shared by the host commands.
#[derive(Debug, Clone, clap::Args)]
pub struct HostOpts {
    /// The NVIDIA driver's supported-gpus.json: GPU names and open-module support.
    #[arg(long, value_name = "FILE", env = "GPU_PASSTHROUGH_SUPPORTED_GPUS")]
    pub supported_gpus: Option<PathBuf>,
}

/// Arguments of `doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    host: HostOpts,
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
    /// vGPU: create an mdev of this type on each device instead of binding it.
    #[arg(long, value_name = "TYPE")]
    mdev_type: Option<String>,
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
}

/// Which VMM's arguments to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Vmm {
    /// Cloud Hypervisor.
    CloudHypervisor,
    /// QEMU.
    Qemu,
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
    #[arg(long, value_enum, default_value = "cloud-hypervisor")]
    vmm: Vmm,
    /// The initrd to boot [default: with --release, that release's combined layer, built
    /// and cached by `initrd ensure` before any device is touched].
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// The static guest init for the ensured initrd [default: `gpu-init` beside this program].
    #[arg(long, value_name = "PATH", env = "GPU_PASSTHROUGH_GUEST_INIT")]
    guest_init: Option<PathBuf>,
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

pub(crate) fn host(global: &Global, gone: Vec<Owner>) -> Host {
    Host::new(
        &global.sysfs_root,
        &global.state_dir,
        Box::new(PidLiveness {
            gone,
            ..Default::default()
        }),
    )
    .with_dev_dir(&global.dev_dir)
}

pub(crate) fn owner(s: &str) -> anyhow::Result<Owner> {
    Owner::new(s).map_err(|e| fail(exit::REFUSED, e))
}

fn addresses(list: &[String]) -> anyhow::Result<Vec<PciAddress>> {
    list.iter()
        .map(|s| s.parse::<PciAddress>().map_err(|e| fail(exit::REFUSED, e)))
        .collect()
}

/// The request as parsed; bad input is refused before anything is built or fetched.
fn plan_request(sel: &Selection, owner: Option<Owner>) -> anyhow::Result<PlanRequest> {
    Ok(PlanRequest {
        devices: addresses(&sel.devices)?,
        gpus: sel.gpus,
        owner,
        flavor: sel.flavor,
        supported_gpus: sel.host.supported_gpus.clone(),
        allow_boot_vga: sel.allow_boot_vga,
        mdev_type: sel.mdev_type.clone(),
    })
}

/// The registry, read only when a release is named (a broken registry file must not stop a
/// plain attach).
fn registry_for(global: &Global, sel: &Selection) -> anyhow::Result<Registry> {
    Ok(if sel.release.is_some() {
        Registry::load(&global.registries)?
    } else {
        Registry::embedded()?
    })
}

fn provision_error(e: ProvisionError) -> anyhow::Error {
    match e {
        ProvisionError::Attach(e) => attach_error(e),
        ProvisionError::Layers { release, source } => crate::initrd::initrd_failure(source)
            .context(format!(
                "the layers of release `{release}` could not be ensured; no device was moved"
            )),
        e => fail(exit::FAILURE, e),
    }
}

pub(crate) fn attach_error(e: AttachError) -> anyhow::Error {
    let code = match e {
        AttachError::Refused(_)
        | AttachError::NotEnoughGpus { .. }
        | AttachError::NoSuchMdevType { .. }
        | AttachError::NothingRequested
        | AttachError::ResetRefused { .. } => exit::REFUSED,
        _ => exit::FAILURE,
    };
    fail(code, e)
}

fn status_word(s: CheckStatus) -> &'static str {
    match s {
        CheckStatus::Ok => "OK",
        CheckStatus::Warn => "WARN",
        CheckStatus::Fail => "FAIL",
    }
}

/// `doctor`: host readiness.
pub fn doctor(global: &Global, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let h = host(global, Vec::new());
    let report = h
        .doctor(args.host.supported_gpus.as_deref())
        .map_err(attach_error)?;
    emit(global, &report, |r| {
        for c in &r.checks {
            println!("{:<5} {:<22} {}", status_word(c.status), c.name, c.detail);
            if !c.fix.is_empty() {
                println!("      {:<22} fix: {}", "", c.fix);
            }
        }
        println!("verdict: {}", status_word(r.verdict));
    })?;
    Ok(ExitCode::from(if report.verdict == CheckStatus::Fail {
        exit::NOT_READY
    } else {
        SUCCESS
    }))
}

/// `devices`: passthrough candidates or every device.
pub fn devices(global: &Global, args: &DevicesArgs) -> anyhow::Result<ExitCode> {
    let h = host(global, Vec::new());
    let list = h
        .devices(args.all, args.host.supported_gpus.as_deref())
        .map_err(attach_error)?;
    emit(global, &list, |list| {
        for d in list {
            let dev = &d.device;
            let name = dev
                .device_name
                .clone()
                .unwrap_or_else(|| format!("{:04x}:{:04x}", dev.vendor_id, dev.device_id));
            let group = dev.iommu_group.map_or("-".to_owned(), |g| g.to_string());
            let verdict = match (&d.owner, d.ready) {
                (Some(o), _) => format!("attached to {o}"),
                (None, true) => "ready".to_owned(),
                (None, false) => format!("not ready: {}", d.not_ready_because.join("; ")),
            };
            println!(
                "{}  [{:04x}:{:04x}] class {:06x}  {name}\n    driver {}  group {group}  numa {}  boot_vga {}  reset {}  {verdict}",
                dev.address,
                dev.vendor_id,
                dev.device_id,
                dev.class,
                dev.driver.as_deref().unwrap_or("-"),
                dev.numa_node.map_or("-".to_owned(), |n| n.to_string()),
                u8::from(dev.boot_vga),
                if dev.reset_methods.is_empty() {
                    "-".to_owned()
                } else {
                    dev.reset_methods.join(",")
                },
            );
            if !d.companions.is_empty() {
                println!("    companions: {}", join(&d.companions));
            }
            if !d.iommu_group_members.is_empty() {
                println!("    group members: {}", join(&d.iommu_group_members));
            }
            if let Some(total) = dev.sriov_total_vfs {
                println!(
                    "    SR-IOV: {} of {total} virtual functions enabled",
                    dev.sriov_num_vfs.unwrap_or(0)
                );
            }
            for m in &dev.mdev_types {
                println!(
                    "    mdev type {} ({}): {} available",
                    m.id,
                    m.name.as_deref().unwrap_or("-"),
                    m.available_instances
                );
            }
        }
    })?;
    Ok(ExitCode::from(SUCCESS))
}

fn join(list: &[PciAddress]) -> String {
    list.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_plan(plan: &Plan) {
    for d in &plan.devices {
        println!(
            "move {}  {:?} of {}  group {}  {} -> vfio-pci{}",
            d.address,
            d.role,
            d.of,
            d.iommu_group.map_or("-".to_owned(), |g| g.to_string()),
            d.driver.as_deref().unwrap_or("no driver"),
            if d.adopt {
                " (already there: adopt)"
            } else {
                ""
            }
        );
    }
    for (parent, t) in &plan.mdevs {
        println!("create mdev of type {t} on {parent}");
    }
    for w in &plan.writes {
        println!("write {:?} > {}", w.value, w.path.display());
    }
    for r in &plan.refusals {
        println!("REFUSED: {}", r.message);
    }
}

/// `plan`: what attach would do.
pub fn plan(global: &Global, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let owner = args.owner.as_deref().map(owner).transpose()?;
    let req = plan_request(&args.sel, owner)?;
    let registry = registry_for(global, &args.sel)?;
    let h = host(global, Vec::new());
    let plan = Provisioner::new(&h, &registry, global.cache_dir())
        .plan(&req, args.sel.release.as_deref())
        .map_err(provision_error)?;
    emit(global, &plan, print_plan)?;
    Ok(ExitCode::from(if plan.refusals.is_empty() {
        SUCCESS
    } else {
        exit::REFUSED
    }))
}

/// `attach`: ensure the release's layers, bind, verify, print the boot spec.
pub fn attach(global: &Global, args: &AttachArgs) -> anyhow::Result<ExitCode> {
    let owner = owner(&args.owner)?;
    let request = GpuVmRequest {
        plan: plan_request(&args.sel, Some(owner.clone()))?,
        owner,
        release: args.sel.release.clone(),
        initrd: args.initrd.clone(),
    };
    let registry = registry_for(global, &args.sel)?;
    let h = host(global, Vec::new());
    let mut provisioner = Provisioner::new(&h, &registry, global.cache_dir());
    if let Some(init) = &args.guest_init {
        provisioner = provisioner.with_guest_init(init);
    }
    let spec = provisioner
        .attach(&request, &DownloadBar::new(global))
        .map_err(provision_error)?;
    emit(global, &spec, |s| {
        for d in &s.devices {
            println!(
                "{}  group {}  {}",
                d.sysfs_path.display(),
                d.iommu_group.map_or("-".to_owned(), |g| g.to_string()),
                d.vfio_device.display()
            );
        }
        if !s.held_devices.is_empty() {
            let held: Vec<String> = s.held_devices.iter().map(|a| a.to_string()).collect();
            println!(
                "held for group viability (not given to the VM): {}",
                held.join(" ")
            );
        }
        if s.kernel_cmdline.is_empty() {
            println!("kernel command line: (nothing to add: no GPU among the devices)");
        } else {
            println!("kernel command line: {}", s.kernel_cmdline.join(" "));
        }
        if let Some(i) = &s.initrd {
            println!("initrd: {}", i.display());
        }
        let argv = match args.vmm {
            Vmm::CloudHypervisor => &s.cloud_hypervisor.args,
            Vmm::Qemu => &s.qemu.args,
        };
        println!("vmm args: {}", argv.join(" "));
        if let Some(h) = &s.mmio.hint {
            println!("note: {h}");
        }
    })?;
    Ok(ExitCode::from(SUCCESS))
}

/// `detach`: devices back to their original drivers.
pub fn detach(global: &Global, args: &DetachArgs) -> anyhow::Result<ExitCode> {
    let owner = owner(&args.owner)?;
    let h = host(global, Vec::new());
    let report = h.detach(&owner).map_err(attach_error)?;
    emit(global, &report, |r| {
        for d in &r.restored {
            println!(
                "{} -> {}",
                d.device,
                d.driver.as_deref().unwrap_or("no driver")
            );
            if let Some(c) = &d.health {
                println!("{c}");
            }
        }
        for m in &r.removed_mdevs {
            println!("removed mdev {m}");
        }
    })?;
    Ok(ExitCode::from(SUCCESS))
}

/// `reconcile`: repair what crashes left behind.
pub fn reconcile(global: &Global, args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let gone = args
        .gone
        .iter()
        .map(|s| owner(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let h = host(global, gone);
    let report = h.reconcile().context("reconcile")?;
    emit(global, &report, |r| {
        for o in &r.finished {
            println!("finished an interrupted attach for {o}");
        }
        for d in &r.rolled_back {
            println!(
                "rolled back {} -> {}",
                d.device,
                d.driver.as_deref().unwrap_or("no driver")
            );
        }
        for d in &r.released {
            println!("released {} ({} devices)", d.owner, d.restored.len());
        }
        for o in &r.kept_alive {
            println!("kept {o}: still exists");
        }
        for o in &r.kept_unknown {
            println!("kept {o}: cannot tell whether it is gone (use --gone {o})");
        }
        for e in &r.errors {
            println!("ERROR: {e}");
        }
    })?;
    Ok(ExitCode::from(if report.errors.is_empty() {
        SUCCESS
    } else {
        exit::FAILURE
    }))
}
