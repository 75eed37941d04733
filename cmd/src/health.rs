//! `health` (records, scan, ingest, check, clear) and `reset`: parse, call the library, print.

use std::path::PathBuf;

use gpu_passthrough::attach::{Owner, ingest_console};
use gpu_passthrough::health::{self, HealthStore};

use crate::Global;
use crate::output::{CmdResult, emit_judged, emit_lines, emit_text};

/// Arguments of `health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    #[command(subcommand)]
    command: Option<HealthCommand>,
}

/// `health` subcommands; without one, the records are listed.
#[derive(Debug, clap::Subcommand)]
pub enum HealthCommand {
    /// Classify the NVIDIA faults in a VM console or kernel log (nothing is recorded).
    Scan {
        /// The log file.
        #[arg(long, value_name = "FILE")]
        console: PathBuf,
    },
    /// Record the faults of an owner's VM console against the devices that owner held.
    Ingest {
        /// The owner whose VM wrote the log.
        #[arg(long, value_name = "ID")]
        owner: String,
        /// The log file.
        #[arg(long, value_name = "FILE")]
        console: PathBuf,
    },
    /// The host's own check of a free device: back to service if suspect, or quarantined.
    Check(DeviceArg),
    /// Remove a device's health record after a repair (ends its quarantine).
    Clear(DeviceArg),
}

/// The one device of `health check`, `health clear` and `reset`.
#[derive(Debug, clap::Args)]
pub struct DeviceArg {
    /// The device, DDDD:BB:DD.F.
    device: String,
}

/// `health [scan|ingest|check|clear]`.
pub fn run(global: &Global, args: &HealthArgs) -> CmdResult {
    let store = HealthStore::new(&global.at.state_dir);
    match &args.command {
        None => emit_lines(global, &store.records()?),
        Some(HealthCommand::Scan { console }) => emit_text(global, &health::scan_file(console)?),
        Some(HealthCommand::Ingest { owner: o, console }) => emit_text(
            global,
            &ingest_console(&global.at.state_dir, &Owner::new(o)?, console)?,
        ),
        Some(HealthCommand::Check(arg)) => emit_judged(
            global,
            &global
                .at
                .host(Vec::new())
                .check_device(arg.device.parse()?)?,
        ),
        Some(HealthCommand::Clear(arg)) => emit_text(global, &store.clear(arg.device.parse()?)?),
    }
}

/// `reset DEVICE`: reset on demand, then verify.
pub fn reset(global: &Global, arg: &DeviceArg) -> CmdResult {
    emit_judged(
        global,
        &global.at.host(Vec::new()).reset(arg.device.parse()?)?,
    )
}
