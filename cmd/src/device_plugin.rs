//! `device-plugin`: serve the node's GPUs to the kubelet until SIGTERM (a thin layer over
//! `gpu_passthrough_device_plugin`).

use gpu_passthrough::outcome::Classified;
use gpu_passthrough_device_plugin::{Config, ServeOptions, run_until_signal};

use crate::Global;
use crate::output::{CmdResult, emit_text, report_error};

/// Run the plugin; after SIGTERM print what the start-up pass did. A plugin that stopped on an
/// error failed, whatever the error's kind.
pub fn run(global: &Global, options: &ServeOptions) -> CmdResult {
    match run_until_signal(Config::from_options(&global.at, options)) {
        Ok(report) => emit_text(global, &report),
        Err(e) => Ok(report_error(global, &Classified::failed(e))),
    }
}
