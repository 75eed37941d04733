//! `vgpu types`, `plan --vgpu` and `attach --vgpu`: a thin layer over the library's vGPU calls.

use std::process::ExitCode;

use gpu_passthrough::attach::Owner;
use gpu_passthrough::provision::VgpuVmRequest;
use gpu_passthrough::vgpu::PlaceRequest;

use crate::Global;
use crate::host::host;
use crate::output::emit_text;

/// vGPU commands.
#[derive(Debug, clap::Subcommand)]
pub enum VgpuCommand {
    /// Every vGPU profile the host can create now, across GPUs and both frameworks.
    Types,
}

/// `--vgpu PROFILE [--count N] [--numa N] [--pack]` (for `plan` and `attach`).
#[derive(Debug, Clone, clap::Args)]
pub struct VgpuArgs {
    /// vGPUs of this profile (`NVIDIA L40S-4Q` or `L40S-4Q`) instead of devices.
    #[arg(long, value_name = "PROFILE", conflicts_with_all = ["devices", "gpus", "mdev_type"])]
    pub vgpu: Option<String>,
    /// With --vgpu: how many.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "vgpu")]
    count: u32,
    /// With --vgpu: prefer this NUMA node on ties.
    #[arg(long, value_name = "N", requires = "vgpu")]
    numa: Option<u32>,
    /// With --vgpu: fill the most-loaded GPU that still fits instead of the least loaded.
    #[arg(long, requires = "vgpu")]
    pack: bool,
}

impl VgpuArgs {
    /// The library's request for `attach --vgpu`.
    pub fn vm_request(
        &self,
        profile: &str,
        owner: Owner,
        release: Option<String>,
        initrd: Option<std::path::PathBuf>,
    ) -> VgpuVmRequest {
        VgpuVmRequest {
            place: self.request(profile),
            owner,
            release,
            initrd,
        }
    }

    fn request(&self, profile: &str) -> PlaceRequest {
        PlaceRequest {
            profile: profile.to_owned(),
            count: self.count,
            numa: self.numa,
            pack: self.pack,
        }
    }
}

/// Run a vGPU command.
pub fn run(global: &Global, cmd: &VgpuCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VgpuCommand::Types => emit_text(global, &host(global, Vec::new()).vgpu_catalogue())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `plan --vgpu PROFILE`: where the instances would go; changes nothing.
pub fn plan(global: &Global, args: &VgpuArgs, profile: &str) -> anyhow::Result<ExitCode> {
    let placement = host(global, Vec::new()).plan_vgpu(&args.request(profile))?;
    emit_text(global, &placement)?;
    Ok(ExitCode::SUCCESS)
}
