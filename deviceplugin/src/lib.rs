//! `gpu-passthrough-device-plugin`: a kubelet device plugin (API v1beta1) that hands KubeVirt
//! the GPUs of a node, built on the `gpu-passthrough` library so a cluster gets the same
//! journaled binds, group checks and health as a single host.
//!
//! A separate crate rather than a library module: gRPC brings an async runtime (tokio, tonic,
//! hyper) that nothing else in the library needs, and keeping it here leaves the library's
//! build and dependency tree unchanged.
//!
//! - [`naming`]: resource names (kubevirt-gpu-device-plugin's convention) and KubeVirt's
//!   environment variables.
//! - [`inventory`]: the served GPUs, read from the journal, with health from sysfs; the
//!   start-up pass that adopts or prepares GPUs.
//! - [`allocate`]: the group re-check and the journal record of an allocation.
//! - [`events`]: the kernel events (uevents, inotify) that wake a health scan.
//! - [`metrics`]: the Prometheus metrics `--metrics-addr` serves.
//! - [`preferred`]: GetPreferredAllocation's choice (one NUMA node, then one PCIe switch).
//! - [`served`]: a served device and its problems, as `inventory` and `vgpu` both report them.
//! - [`vgpu`]: the vGPUs the library created for the plugin's pool, on both NVIDIA frameworks.
//! - `authority`: the relay that lets clients naming the socket as `:authority` be served.
//! - [`api`]: the generated v1beta1 messages, servers and clients.
//!
//! The plugin holds no device state of its own: each scan and each Allocate reads the journal
//! and sysfs again.
#![deny(missing_docs)]

pub mod allocate;
mod authority;
pub mod events;
pub mod inventory;
pub mod metrics;
pub mod naming;
pub mod preferred;
pub mod served;
mod server;
pub mod vgpu;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpu_passthrough::attach::{AttachError, Host, JournalError, PidLiveness};
use gpu_passthrough::paths;
use gpu_passthrough::pci::ids::{PciIds, SupportedGpus};
use gpu_passthrough::provision::Locations;

pub use inventory::Prepare;
pub use server::run;

/// The kubelet device plugin API (v1beta1), compiled from `proto/v1beta1.proto` at build time.
#[allow(missing_docs, clippy::all)]
pub mod api {
    tonic::include_proto!("v1beta1");
}

/// The API version this plugin speaks.
pub const API_VERSION: &str = "v1beta1";

/// The quarantine seam (from the library): a quarantined device is reported `Unhealthy` and
/// never allocated.
pub use gpu_passthrough::health::HealthRecords;
pub use gpu_passthrough::quarantine::{NoQuarantine, QuarantineCheck as Quarantine};

/// Errors of the plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A host operation failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The journal could not be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The supported-gpus table or pci.ids could not be read.
    #[error(transparent)]
    Ids(#[from] gpu_passthrough::pci::ids::IdsError),
    /// A task of the plugin panicked; the plugin goes on without its result.
    #[error(
        "the {task} panicked ({message}); this is a bug in the device plugin: please report it"
    )]
    Panicked {
        /// What was running.
        task: &'static str,
        /// The panic's message.
        message: String,
    },
    /// The metrics address cannot be listened on.
    #[error("cannot serve metrics on {addr}; choose a free address for --metrics-addr")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file or socket operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What an operator chooses when starting the plugin: the CLI's `device-plugin` flags (derived
/// with the `cli` feature), turned into a [`Config`] by [`Config::from_options`].
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ServeOptions {
    /// The kubelet's directory; sockets go in its `device-plugins/`.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "DIR", default_value = "/var/lib/kubelet")
    )]
    pub kubelet_dir: PathBuf,
    /// Also move this many free GPUs (or `all`) to vfio-pci at start (owner `device-plugin`).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N|all"))]
    pub prepare: Option<Prepare>,
    /// How often health, the sockets and the kubelet are checked when no kernel event woke the
    /// plugin sooner, in milliseconds.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "MS", default_value_t = 30_000)
    )]
    pub poll_ms: u64,
    /// pci.ids for resource names [default: the system's].
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub pci_ids: Option<PathBuf>,
    /// The NVIDIA driver's supported-gpus.json: names for GPUs pci.ids does not know.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "FILE", env = "GPU_PASSTHROUGH_SUPPORTED_GPUS")
    )]
    pub supported_gpus: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9400) [default: none].
    #[cfg_attr(feature = "cli", arg(long, value_name = "ADDR"))]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How the plugin runs.
#[derive(Clone)]
pub struct Config {
    /// The kubelet's directory (`/var/lib/kubelet`); sockets live in its `device-plugins/`.
    pub kubelet_dir: PathBuf,
    /// The sysfs root (`/sys`).
    pub sysfs_root: PathBuf,
    /// The state dir holding the journal.
    pub state_dir: PathBuf,
    /// The devices directory (`/dev`), where `vfio/<group>` nodes are.
    pub dev_dir: PathBuf,
    /// The proc filesystem (`/proc`): who holds a device, and whether the host's processes
    /// are visible at all (see `gpu_passthrough::pidns`).
    pub proc_root: PathBuf,
    /// `pci.ids` for resource names (default: the system's).
    pub pci_ids: Option<PathBuf>,
    /// The NVIDIA driver's `supported-gpus.json`: names when `pci.ids` has none.
    pub supported_gpus: Option<PathBuf>,
    /// GPUs to move to vfio-pci at start.
    pub prepare: Prepare,
    /// How often health, sockets and the kubelet are checked when no kernel event (a uevent,
    /// a change in `/dev/vfio` or the plugin directory) asked sooner: the safety net.
    pub poll_interval: Duration,
    /// The quarantine seam; `None` means the health records in `state_dir` (fail closed).
    pub quarantine: Option<Arc<dyn Quarantine>>,
    /// Whether kernel events (uevents, inotify) wake a health scan; without them health is
    /// seen at the poll only.
    pub kernel_events: bool,
    /// Where to serve Prometheus metrics over HTTP; `None` serves none.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("kubelet_dir", &self.kubelet_dir)
            .field("sysfs_root", &self.sysfs_root)
            .field("state_dir", &self.state_dir)
            .field("dev_dir", &self.dev_dir)
            .field("proc_root", &self.proc_root)
            .field("prepare", &self.prepare)
            .field("poll_interval", &self.poll_interval)
            .field("kernel_events", &self.kernel_events)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

impl Config {
    /// Defaults for a real node: `/var/lib/kubelet`, `/sys`, `/var/lib/gpu-passthrough`, `/dev`,
    /// kernel events and a 30-second safety-net poll, no preparation, quarantine by the state dir's health records, no
    /// metrics.
    pub fn new() -> Self {
        Config {
            kubelet_dir: PathBuf::from("/var/lib/kubelet"),
            sysfs_root: PathBuf::from(paths::SYSFS_ROOT),
            state_dir: PathBuf::from(paths::STATE_DIR),
            dev_dir: PathBuf::from(paths::DEV_DIR),
            proc_root: PathBuf::from("/proc"),
            pci_ids: None,
            supported_gpus: None,
            prepare: Prepare::None,
            poll_interval: Duration::from_secs(30),
            quarantine: None,
            kernel_events: true,
            metrics_addr: None,
        }
    }

    /// The configuration an operator's [`ServeOptions`] ask for, on the host `at` names. The
    /// poll is at least 10 ms, so a typo cannot make the plugin spin.
    pub fn from_options(at: &Locations, options: &ServeOptions) -> Self {
        Config {
            kubelet_dir: options.kubelet_dir.clone(),
            sysfs_root: at.sysfs_root.clone(),
            state_dir: at.state_dir.clone(),
            dev_dir: at.dev_dir.clone(),
            pci_ids: options.pci_ids.clone(),
            supported_gpus: options.supported_gpus.clone(),
            prepare: options.prepare.unwrap_or(Prepare::None),
            poll_interval: Duration::from_millis(options.poll_ms.max(10)),
            metrics_addr: options.metrics_addr,
            ..Config::new()
        }
    }

    /// The quarantine in force: the one given, else the health records of the state dir, so
    /// a device the host quarantined is never handed to a pod.
    pub fn quarantine(&self) -> Arc<dyn Quarantine> {
        self.quarantine.clone().unwrap_or_else(|| {
            Arc::new(HealthRecords {
                state_dir: self.state_dir.clone(),
            })
        })
    }

    /// `<kubelet-dir>/device-plugins`.
    pub fn plugin_dir(&self) -> PathBuf {
        self.kubelet_dir.join("device-plugins")
    }

    /// The kubelet's registration socket.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.plugin_dir().join("kubelet.sock")
    }

    /// A library host over this node.
    pub fn host(&self) -> Host {
        Host::new(
            &self.sysfs_root,
            &self.state_dir,
            Box::new(PidLiveness {
                proc_root: self.proc_root.clone(),
                gone: Vec::new(),
            }),
        )
        // Before the devices directory, which picks the simulated kernel's driver listing.
        .with_proc_root(&self.proc_root)
        .with_dev_dir(&self.dev_dir)
    }

    /// The resource namer from `pci.ids` and `supported-gpus.json`.
    pub fn namer(&self) -> Result<naming::Namer, PluginError> {
        let ids = match &self.pci_ids {
            Some(p) => PciIds::parse(&read(p)?),
            None => PciIds::system(),
        };
        let gpus = match &self.supported_gpus {
            Some(p) => Some(SupportedGpus::load(p)?),
            None => None,
        };
        Ok(naming::Namer::new(ids, gpus))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

fn read(p: &Path) -> Result<String, PluginError> {
    std::fs::read_to_string(p).map_err(|source| PluginError::Io {
        action: "read",
        path: p.to_owned(),
        source,
    })
}

/// A panic's message, for the error that reports it.
pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned()),
        Err(e) => e.to_string(),
    }
}

/// Run until SIGTERM or SIGINT, then remove the sockets and return.
pub fn run_until_signal(config: Config) -> Result<inventory::PrepareReport, PluginError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| PluginError::Io {
            action: "start the runtime for",
            path: config.plugin_dir(),
            source,
        })?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|source| PluginError::Io {
            action: "handle SIGTERM for",
            path: config.plugin_dir(),
            source,
        })?;
        let mut int = signal(SignalKind::interrupt()).map_err(|source| PluginError::Io {
            action: "handle SIGINT for",
            path: config.plugin_dir(),
            source,
        })?;
        run(config, async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
        .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_a_config_on_the_named_host_with_a_floor_on_the_poll() {
        let at = Locations {
            registries: Vec::new(),
            cache_dir: None,
            sysfs_root: PathBuf::from("/fake/sys"),
            state_dir: PathBuf::from("/fake/state"),
            dev_dir: PathBuf::from("/fake/dev"),
            fmpm: None,
        };
        let options = ServeOptions {
            kubelet_dir: PathBuf::from("/fake/kubelet"),
            prepare: None,
            poll_ms: 0,
            pci_ids: None,
            supported_gpus: None,
            metrics_addr: None,
        };
        let config = Config::from_options(&at, &options);
        assert_eq!(config.sysfs_root, at.sysfs_root);
        assert_eq!(config.state_dir, at.state_dir);
        assert_eq!(config.dev_dir, at.dev_dir);
        assert_eq!(config.kubelet_dir, options.kubelet_dir);
        assert_eq!(config.prepare, Prepare::None);
        assert_eq!(config.poll_interval, Duration::from_millis(10));
        assert!(config.kernel_events, "kernel events stay on by default");
    }
}
