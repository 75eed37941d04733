//! `gpu-passthrough initrd ...`: to be written.
use std::process::ExitCode;

use crate::Global;

/// Initrd commands.
#[derive(Debug, clap::Subcommand)]
pub enum InitrdCommand {
    /// Build the layers.
    Build,
}

/// Run an `initrd` command.
pub fn run(_global: &Global, _cmd: &InitrdCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
