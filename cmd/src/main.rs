//! `gpu-passthrough`: a thin command-line layer over the `gpu-passthrough` library.
//!
//! Each command group lives in its own module; this file holds the global flags and dispatch.

mod device_plugin;
mod health;
mod host;
mod initrd;
mod output;
mod versions;

use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};
use gpu_passthrough::provision::Locations;

/// Flags every command honours.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Machine-readable JSON output with stable field names.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output: errors only.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Where the host's files are.
    #[command(flatten)]
    pub at: Locations,
}

#[derive(Debug, Parser)]
#[command(
    name = "gpu-passthrough",
    version,
    about = "Give virtual machines NVIDIA GPUs, safely"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The version registry: guest kernel releases and their pinned NVIDIA artifacts.
    #[command(subcommand)]
    Versions(versions::VersionsCommand),
    /// Build, ensure and inspect initrd layers.
    #[command(subcommand)]
    Initrd(initrd::InitrdCommand),
    /// vGPU profiles on both NVIDIA frameworks (vendor VFIO on SR-IOV VFs, mdev).
    #[command(subcommand)]
    Vgpu(host::VgpuCommand),
    /// Host readiness for GPU passthrough, with the fix for each failed check.
    Doctor(host::HostOpts),
    /// PCI devices that can be passed through (or all of them).
    Devices(host::DevicesArgs),
    /// What attach would do, without doing it.
    Plan(host::PlanArgs),
    /// Bind devices to vfio-pci for an owner and print the VM's boot spec.
    Attach(host::AttachArgs),
    /// Give every device of an owner back to its original driver.
    Detach(host::DetachArgs),
    /// Repair what a crash left behind: half-done binds and attachments whose owner is gone.
    Reconcile(host::ReconcileArgs),
    /// Device health: recorded faults and quarantine; `scan`, `ingest` and `clear` a record.
    Health(health::HealthArgs),
    /// Reset a device (not attached to anyone) and verify it.
    Reset(health::DeviceArg),
    /// Serve the node's GPUs to the kubelet (a KubeVirt device plugin) until SIGTERM.
    DevicePlugin(gpu_passthrough_device_plugin::ServeOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    output::init_logging(&cli.global);
    // The CLI is the binary crash tests kill: it alone opts in to the failpoint variable.
    if let Err(err) = gpu_passthrough::failpoint::arm_from_env() {
        return output::report_error(&cli.global, &err.into());
    }
    let result = match &cli.command {
        Command::Versions(c) => versions::run(&cli.global, c),
        Command::Initrd(c) => initrd::run(&cli.global, c),
        Command::Vgpu(c) => host::vgpu(&cli.global, c),
        Command::Doctor(a) => host::doctor(&cli.global, a),
        Command::Devices(a) => host::devices(&cli.global, a),
        Command::Plan(a) => host::plan(&cli.global, a),
        Command::Attach(a) => host::attach(&cli.global, a),
        Command::Detach(a) => host::detach(&cli.global, a),
        Command::Reconcile(a) => host::reconcile(&cli.global, a),
        Command::Health(a) => health::run(&cli.global, a),
        Command::Reset(a) => health::reset(&cli.global, a),
        Command::DevicePlugin(a) => device_plugin::run(&cli.global, a),
    };
    result.unwrap_or_else(|failure| output::report_error(&cli.global, &failure))
}
