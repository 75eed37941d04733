//! `gpu-passthrough initrd build | ensure | inspect`.

use std::path::PathBuf;

use gpu_passthrough::initrd::listing;
use gpu_passthrough::provision::{self, Freshness, LayerRequest};
use gpu_passthrough::text::ListingText;

use crate::Global;
use crate::output::{CmdResult, DownloadBar, emit_text};

/// Initrd commands.
#[derive(Debug, clap::Subcommand)]
pub enum InitrdCommand {
    /// Fetch and verify a release's artifacts and write the base, gpu and combined layers.
    Build(LayerRequest),
    /// Like build, but return at once when up-to-date layers are cached.
    Ensure(LayerRequest),
    /// List the entries of an initrd (every layer, any compression) or of a GPU disk image.
    Inspect {
        /// The initrd file or disk image.
        file: PathBuf,
    },
}

/// Run an `initrd` command.
pub fn run(global: &Global, cmd: &InitrdCommand) -> CmdResult {
    let (request, freshness) = match cmd {
        InitrdCommand::Build(r) => (r, Freshness::Rebuild),
        InitrdCommand::Ensure(r) => (r, Freshness::Ensure),
        InitrdCommand::Inspect { file } => {
            return emit_text(global, &ListingText(&listing::list(file)?));
        }
    };
    let bar = DownloadBar::new(global);
    emit_text(
        global,
        &provision::layers(&global.at, request, freshness, &bar)?,
    )
}
