//! Prometheus metrics (`--metrics-addr`): what the plugin serves and how healthy it is, what it
//! handed out, what the host's health records hold, the errors of its own operations and the
//! boot it runs in, in the OpenMetrics text format over plain HTTP.
//!
//! Counters are kept as things happen; gauges are set from the last scan, the health records
//! and the boot ID when a scrape asks, so they never go stale.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use gpu_passthrough::health::HealthStore;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::inventory::Inventory;
use crate::served::Problem;

/// Where the running kernel's boot ID is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceHealth {
    resource: String,
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabel {
    resource: String,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllocationLabel {
    resource: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabel {
    device: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BootLabel {
    boot_id: String,
}

/// How an Allocate ended.
#[derive(Debug, Clone, Copy)]
pub enum AllocationResult {
    /// Devices handed out.
    Granted,
    /// Refused: a device unfit, unknown, held by another owner, asked twice...
    Refused,
    /// The plugin failed (journal, sysfs, a panic).
    Failed,
}

/// An operation of the plugin whose errors are counted.
#[derive(Debug, Clone, Copy)]
pub enum Operation {
    /// The start-up pass's attach of a GPU to vfio-pci.
    Attach,
    /// A health scan of the journal and sysfs.
    Scan,
    /// Serving a resource on its socket.
    Serve,
    /// Registering a resource with the kubelet.
    Register,
}

impl Operation {
    const ALL: [Operation; 4] = [
        Operation::Attach,
        Operation::Scan,
        Operation::Serve,
        Operation::Register,
    ];

    fn label(self) -> OperationLabel {
        let name = match self {
            Operation::Attach => "attach",
            Operation::Scan => "scan",
            Operation::Serve => "serve",
            Operation::Register => "register",
        };
        OperationLabel {
            operation: name.to_owned(),
        }
    }
}

/// The plugin's metrics.
pub struct Metrics {
    registry: Registry,
    devices: Family<ResourceHealth, Gauge>,
    device_healthy: Family<ServedLabel, Gauge>,
    allocations: Family<AllocationLabel, Counter>,
    quarantined: Gauge,
    faults: Family<FaultLabel, Gauge>,
    errors: Family<OperationLabel, Counter>,
    boot: Family<BootLabel, Gauge>,
    scans: Family<SourceLabel, Counter>,
    kernel_events: Family<SourceLabel, Counter>,
    state_dir: PathBuf,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics over the health records in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        let mut registry = Registry::with_prefix("gpu_passthrough_plugin");
        let m = Metrics {
            registry: Registry::default(),
            devices: Family::default(),
            device_healthy: Family::default(),
            allocations: Family::default(),
            quarantined: Gauge::default(),
            faults: Family::default(),
            errors: Family::default(),
            boot: Family::default(),
            scans: Family::default(),
            kernel_events: Family::default(),
            state_dir: state_dir.to_owned(),
        };
        registry.register(
            "devices",
            "Devices served, by resource and health",
            m.devices.clone(),
        );
        registry.register(
            "device_healthy",
            "1 when a served device is healthy, 0 when not",
            m.device_healthy.clone(),
        );
        registry.register(
            "allocations",
            "Allocate requests, by resource and result (granted, refused, failed)",
            m.allocations.clone(),
        );
        registry.register(
            "quarantined_devices",
            "Devices the host's health records quarantine",
            m.quarantined.clone(),
        );
        registry.register(
            "faults",
            "Faults recorded in the host's health records, by device and class",
            m.faults.clone(),
        );
        registry.register(
            "errors",
            "Errors of the plugin's operations (attach, scan, serve, register)",
            m.errors.clone(),
        );
        registry.register(
            "boot",
            "The boot the plugin runs in (its boot_id), always 1",
            m.boot.clone(),
        );
        registry.register(
            "scans",
            "Health scans, by what started them: a kernel event (uevent, inotify) or the poll",
            m.scans.clone(),
        );
        registry.register(
            "kernel_events",
            "Relevant kernel events seen, by source (uevent, inotify)",
            m.kernel_events.clone(),
        );
        for op in Operation::ALL {
            m.errors.get_or_create(&op.label()).inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// Count an Allocate's result.
    pub fn allocation(&self, resource: &str, result: AllocationResult) {
        let result = match result {
            AllocationResult::Granted => "granted",
            AllocationResult::Refused => "refused",
            AllocationResult::Failed => "failed",
        };
        self.allocations
            .get_or_create(&AllocationLabel {
                resource: resource.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Count a health scan started by `source` (`uevent`, `inotify` or `poll`).
    pub fn scan(&self, source: &str) {
        count(&self.scans, source);
    }

    /// Count a relevant kernel event from `source` (`uevent` or `inotify`).
    pub fn kernel_event(&self, source: &str) {
        count(&self.kernel_events, source);
    }

    /// Count `n` errors of `op`.
    pub fn errors(&self, op: Operation, n: u64) {
        self.errors.get_or_create(&op.label()).inc_by(n);
    }

    /// The text a scrape gets: gauges from `inventory`, the health records and the boot ID
    /// now, with the counters.
    pub fn render(&self, inventory: &Inventory) -> String {
        self.devices.clear();
        self.device_healthy.clear();
        for (resource, list) in &inventory.resources {
            for health in ["Healthy", "Unhealthy"] {
                let n = list
                    .iter()
                    .filter(|d| d.healthy() == (health == "Healthy"))
                    .count();
                self.devices
                    .get_or_create(&ResourceHealth {
                        resource: resource.clone(),
                        health: health.to_owned(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            for d in list {
                self.device_healthy
                    .get_or_create(&ServedLabel {
                        resource: resource.clone(),
                        device: d.id.clone(),
                    })
                    .set(i64::from(d.healthy()));
            }
        }
        self.health_records(inventory);
        self.boot.clear();
        if let Ok(id) = std::fs::read_to_string(BOOT_ID) {
            self.boot
                .get_or_create(&BootLabel {
                    boot_id: id.trim().to_owned(),
                })
                .set(1);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// Faults and quarantines from the health records. Unreadable records count the served
    /// devices the last scan found quarantined, and a scan error.
    fn health_records(&self, inventory: &Inventory) {
        self.faults.clear();
        match HealthStore::new(&self.state_dir).records() {
            Ok(records) => {
                let quarantined = records.iter().filter(|r| r.quarantine.is_some()).count();
                self.quarantined
                    .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
                for r in records {
                    for e in &r.events {
                        self.faults
                            .get_or_create(&FaultLabel {
                                device: r.device.to_string(),
                                class: e.fault.kind.to_string(),
                            })
                            .inc();
                    }
                }
            }
            Err(e) => {
                tracing::warn!("metrics: {e}");
                self.errors(Operation::Scan, 1);
                let quarantined = inventory
                    .resources
                    .values()
                    .flatten()
                    .filter(|d| d.problems.contains(&Problem::Quarantined))
                    .count();
                self.quarantined
                    .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Serve `metrics` on `listener` (any path answers) until the task is dropped, gauges from
/// the latest `inventory`.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    inventory: watch::Receiver<Arc<Inventory>>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accepting a scrape: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let inventory = inventory.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let text = metrics.render(&inventory.borrow().clone());
                async move {
                    hyper::Response::builder()
                        .header(
                            hyper::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(text)))
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("metrics: a scrape's connection: {e}");
            }
        });
    }
}

/// Bind the metrics address.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::PluginError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::PluginError::Metrics { addr, source })
}

/// One more in `family`'s counter for `source`.
fn count(family: &Family<SourceLabel, Counter>, source: &str) {
    family
        .get_or_create(&SourceLabel {
            source: source.to_owned(),
        })
        .inc();
}
