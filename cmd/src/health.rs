//! `health` (records, scan, ingest, clear) and `reset`: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use gpu_passthrough::attach::{HealthCheck, ResetOutcome};
use gpu_passthrough::health::{self, Fault, HealthEvent, HealthStore};
use gpu_passthrough::pci::PciAddress;

use crate::Global;
use crate::host::{attach_error, host, owner};
use crate::output::{emit, exit, fail};

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
    /// Remove a device's health record after a repair (ends its quarantine).
    Clear {
        /// The device, DDDD:BB:DD.F.
        #[arg(value_name = "DEVICE")]
        device: String,
    },
}

/// Arguments of `reset`.
#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The device, DDDD:BB:DD.F.
    #[arg(value_name = "DEVICE")]
    device: String,
}

fn address(s: &str) -> anyhow::Result<PciAddress> {
    s.parse().map_err(|e| fail(exit::REFUSED, e))
}

fn fault_line(f: &Fault) -> String {
    format!(
        "{}  {}{}  action {}  {}",
        f.address.as_deref().unwrap_or("-"),
        word(&f.kind),
        f.xid.map(|x| format!(" {x}")).unwrap_or_default(),
        word(&f.action),
        f.message
    )
}

fn event_line(e: &HealthEvent) -> String {
    format!(
        "  {} owner {}  {}",
        e.at,
        e.owner.as_ref().map_or("-".into(), |o| o.to_string()),
        fault_line(&e.fault)
    )
}

/// The snake_case name serde gives a unit variant.
fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Print a reset and verification for people.
pub fn print_check(device: PciAddress, c: &HealthCheck) {
    if let Some(r) = &c.reset {
        let what = match r.outcome {
            ResetOutcome::Done => format!("reset with {}", r.method.as_deref().unwrap_or("?")),
            ResetOutcome::ByVfio => "reset by VFIO on open/release".into(),
            ResetOutcome::NoMethod => "no reset method".into(),
            ResetOutcome::Refused | ResetOutcome::Failed => format!(
                "reset {}: {}",
                word(&r.outcome),
                r.detail.as_deref().unwrap_or("")
            ),
        };
        println!("{device}  {what} ({} ms)", r.ms);
    }
    let v = &c.verify;
    if v.ok {
        println!("{device}  verified ({} ms)", v.ms);
    } else {
        println!(
            "{device}  VERIFY FAILED ({} ms): {}",
            v.ms,
            v.problems.join("; ")
        );
    }
}

/// `health [scan|ingest|clear]`.
pub fn run(global: &Global, args: &HealthArgs) -> anyhow::Result<ExitCode> {
    let store = HealthStore::new(&global.state_dir);
    match &args.command {
        None => {
            let records = store.records()?;
            emit(global, &records, |list| {
                if list.is_empty() {
                    println!("no health events recorded");
                }
                for d in list {
                    let state = match &d.quarantine {
                        Some(q) => format!("QUARANTINED: {}", q.summary()),
                        None => "in service".into(),
                    };
                    println!("{}  {} events  {state}", d.device, d.events.len());
                    for e in &d.events {
                        println!("{}", event_line(e));
                    }
                }
            })?;
        }
        Some(HealthCommand::Scan { console }) => {
            let faults = health::scan_file(console)?;
            emit(global, &faults, |list| {
                for f in list {
                    println!("{}", fault_line(f));
                }
            })?;
        }
        Some(HealthCommand::Ingest { owner: o, console }) => {
            let o = owner(o)?;
            let report = health::ingest(&global.state_dir, &o, console)?;
            emit(global, &report, |r| {
                println!(
                    "{} faults in the log; {} recorded for owner {} (devices {})",
                    r.faults.len(),
                    r.recorded.len(),
                    r.owner,
                    r.devices
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                for e in &r.recorded {
                    println!("{}  {}", e.device, fault_line(&e.fault));
                }
                for q in &r.quarantined {
                    println!("QUARANTINED: {}", q.summary());
                }
            })?;
        }
        Some(HealthCommand::Clear { device }) => {
            let report = store.clear(address(device)?)?;
            emit(global, &report, |r| {
                println!(
                    "{}: {} events removed{}",
                    r.device,
                    r.removed,
                    if r.was_quarantined {
                        "; quarantine lifted"
                    } else {
                        ""
                    }
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `reset DEVICE`: reset on demand, then verify.
pub fn reset(global: &Global, args: &ResetArgs) -> anyhow::Result<ExitCode> {
    let device = address(&args.device)?;
    let check = host(global, Vec::new())
        .reset(device)
        .map_err(attach_error)?;
    emit(global, &check, |c| print_check(device, c))?;
    Ok(ExitCode::from(if check.verify.ok { 0 } else { exit::VERIFY }))
}
