//! `vgpu types`, and the `--vgpu` arguments `plan` and `attach` turn into the library's
//! placement request.

use std::process::ExitCode;

use gpu_passthrough::vgpu::PlaceRequest;

use crate::Global;
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
    vgpu: Option<String>,
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
    /// The placement asked for, when `--vgpu` names a profile.
    pub fn place(&self) -> Option<PlaceRequest> {
        Some(PlaceRequest {
            profile: self.vgpu.clone()?,
            count: self.count,
            numa: self.numa,
            pack: self.pack,
        })
    }
}

/// Run a vGPU command.
pub fn run(global: &Global, cmd: &VgpuCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VgpuCommand::Types => emit_text(global, &global.host(Vec::new()).vgpu_catalogue()),
    }
}
