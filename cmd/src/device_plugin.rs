//! `device-plugin`: serve the node's GPUs to the kubelet until SIGTERM (a thin layer over
//! `gpu_passthrough_device_plugin`).

use std::path::PathBuf;
use std::time::Duration;

use gpu_passthrough::outcome::Classified;
use gpu_passthrough_device_plugin::{Config, Prepare, run_until_signal};

use crate::Global;
use crate::output::{CmdResult, emit_text, report_error};

/// Arguments of `device-plugin`.
#[derive(Debug, clap::Args)]
pub struct DevicePluginArgs {
    /// The kubelet's directory; sockets go in its `device-plugins/`.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Also move this many free GPUs (or `all`) to vfio-pci at start (owner `device-plugin`).
    #[arg(long, value_name = "N|all")]
    prepare: Option<Prepare>,
    /// How often health, the sockets and the kubelet are checked when no kernel event woke the
    /// plugin sooner, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    poll_ms: u64,
    /// pci.ids for resource names [default: the system's].
    #[arg(long, value_name = "FILE")]
    pci_ids: Option<PathBuf>,
    /// The NVIDIA driver's supported-gpus.json: names for GPUs pci.ids does not know.
    #[arg(long, value_name = "FILE", env = "GPU_PASSTHROUGH_SUPPORTED_GPUS")]
    supported_gpus: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9400) [default: none].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Run the plugin; after SIGTERM print what the start-up pass did. A plugin that stopped on an
/// error failed, whatever the error's kind.
pub fn run(global: &Global, args: &DevicePluginArgs) -> CmdResult {
    let config = Config {
        kubelet_dir: args.kubelet_dir.clone(),
        sysfs_root: global.at.sysfs_root.clone(),
        state_dir: global.at.state_dir.clone(),
        dev_dir: global.at.dev_dir.clone(),
        pci_ids: args.pci_ids.clone(),
        supported_gpus: args.supported_gpus.clone(),
        prepare: args.prepare.unwrap_or(Prepare::None),
        poll_interval: Duration::from_millis(args.poll_ms.max(10)),
        metrics_addr: args.metrics_addr,
        ..Config::new()
    };
    match run_until_signal(config) {
        Ok(report) => emit_text(global, &report),
        Err(e) => Ok(report_error(global, &Classified::failed(e))),
    }
}
