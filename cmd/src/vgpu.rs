//! `vgpu types` and `plan --vgpu`: a thin layer over `gpu_passthrough::vgpu`.

use std::process::ExitCode;

use gpu_passthrough::pci::Sysfs;
use gpu_passthrough::vgpu::{self, NoQuarantine, PlaceRequest, VgpuError};

use crate::Global;
use crate::output::{emit, exit, fail};

/// vGPU commands.
#[derive(Debug, clap::Subcommand)]
pub enum VgpuCommand {
    /// Every vGPU profile the host can create now, across GPUs and both frameworks.
    Types,
}

fn vgpu_error(e: VgpuError) -> anyhow::Error {
    let code = match e {
        VgpuError::NoSuchProfile { .. } | VgpuError::NotEnough { .. } => exit::REFUSED,
        VgpuError::Read { .. } => exit::FAILURE,
    };
    fail(code, e)
}

/// Run a vGPU command.
pub fn run(global: &Global, cmd: &VgpuCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VgpuCommand::Types => {
            let cat = vgpu::catalogue(&Sysfs::new(&global.sysfs_root), &NoQuarantine);
            emit(global, &cat, |c| {
                for p in &c.profiles {
                    let parents: Vec<String> = p
                        .parents
                        .iter()
                        .map(|x| {
                            format!(
                                "{} ({} free, {} MiB used)",
                                x.address, x.available, x.used_framebuffer_mib
                            )
                        })
                        .collect();
                    println!(
                        "{:<20} {:<11} type {:<10} {:>6} MiB  {} available  on {}",
                        p.name,
                        serde_json::to_value(p.framework)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        p.type_id,
                        p.framebuffer_mib,
                        p.available,
                        parents.join(", ")
                    );
                }
                if c.profiles.is_empty() {
                    println!("no vGPU profiles: no GPU offers vendor-VFIO types or mdev types");
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `plan --vgpu PROFILE`: where the instances would go; changes nothing.
pub fn plan(global: &Global, req: &PlaceRequest) -> anyhow::Result<ExitCode> {
    let cat = vgpu::catalogue(&Sysfs::new(&global.sysfs_root), &NoQuarantine);
    let placement = vgpu::place(&cat, req).map_err(vgpu_error)?;
    emit(global, &placement, |p| {
        for parent in &p.parents {
            println!(
                "create {} ({} MiB) on {parent}",
                p.profile, p.framebuffer_mib
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
