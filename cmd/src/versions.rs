//! `gpu-passthrough versions ...`: to be written.
use std::process::ExitCode;

use crate::Global;

/// Registry commands.
#[derive(Debug, clap::Subcommand)]
pub enum VersionsCommand {
    /// List releases.
    List,
}

/// Run a `versions` command.
pub fn run(_global: &Global, _cmd: &VersionsCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
