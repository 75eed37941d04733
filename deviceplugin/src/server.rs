//! The gRPC side: one DevicePlugin server per resource on its own socket, registration with
//! the kubelet (again after it restarts), health scans on kernel events and a slow poll, and
//! shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

use crate::allocate::{AllocateError, allocate};
use crate::api::device_plugin_server::{DevicePlugin, DevicePluginServer};
use crate::api::registration_client::RegistrationClient;
use crate::api::{self, Empty};
use crate::inventory::{self, Inventory, PrepareReport};
use crate::metrics::{self, AllocationResult, Metrics, Operation};
use crate::naming::{Namer, socket_name};
use crate::preferred::{Candidate, preferred};
use crate::{API_VERSION, Config, PluginError};
use crate::{authority, events};

struct Shared {
    config: Config,
    namer: Namer,
    inventory: watch::Receiver<Arc<Inventory>>,
    metrics: Arc<Metrics>,
}

fn devices_of(inv: &Inventory, resource: &str) -> Vec<api::Device> {
    inv.resources
        .get(resource)
        .map(|list| {
            list.iter()
                .map(|d| api::Device {
                    id: d.id.clone(),
                    health: if d.healthy() { "Healthy" } else { "Unhealthy" }.into(),
                    topology: d.numa.map(|n| api::TopologyInfo {
                        nodes: vec![api::NumaNode { id: i64::from(n) }],
                    }),
                })
                .collect()
        })
        .unwrap_or_default()
}

struct PluginService {
    resource: String,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(api::DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }))
    }

    type ListAndWatchStream = ReceiverStream<Result<api::ListAndWatchResponse, Status>>;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut inv = self.shared.inventory.clone();
        let stop = self.stop.clone();
        let resource = self.resource.clone();
        tokio::spawn(async move {
            let mut last: Option<Vec<api::Device>> = None;
            loop {
                let list = devices_of(&inv.borrow_and_update(), &resource);
                if last.as_ref() != Some(&list) {
                    let msg = api::ListAndWatchResponse {
                        devices: list.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                    last = Some(list);
                }
                tokio::select! {
                    r = inv.changed() => if r.is_err() { break },
                    _ = stopped(stop.clone()) => break,
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        let inv = self.shared.inventory.borrow().clone();
        let served = inv
            .resources
            .get(&self.resource)
            .cloned()
            .unwrap_or_default();
        let req = req.into_inner();
        guarded("GetPreferredAllocation", move || {
            preferred_allocation(&served, req)
        })
        .await
        .map(Response::new)
    }

    async fn allocate(
        &self,
        req: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let containers: Vec<Vec<String>> = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| c.devices_ids)
            .collect();
        let shared = self.shared.clone();
        let resource = self.resource.clone();
        let metrics = self.shared.metrics.clone();
        let result = guarded("Allocate", move || {
            let host = shared.config.host();
            allocate(
                &host,
                &shared.namer,
                shared.config.quarantine().as_ref(),
                &resource,
                &containers,
            )
        })
        .await
        .inspect_err(|_| metrics.allocation(&self.resource, AllocationResult::Failed))?;
        let outcome = match &result {
            Ok(_) => AllocationResult::Granted,
            Err(AllocateError::Plugin(_)) => AllocationResult::Failed,
            Err(_) => AllocationResult::Refused,
        };
        metrics.allocation(&self.resource, outcome);
        match result {
            Ok(a) => Ok(Response::new(api::AllocateResponse {
                container_responses: a
                    .containers
                    .into_iter()
                    .map(|c| api::ContainerAllocateResponse {
                        envs: c.envs.into_iter().collect(),
                        devices: c
                            .devices
                            .into_iter()
                            .map(|d| api::DeviceSpec {
                                container_path: d.container_path.display().to_string(),
                                host_path: d.host_path.display().to_string(),
                                permissions: "mrw".into(),
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .collect(),
            })),
            Err(e @ AllocateError::Plugin(_)) => {
                tracing::error!("allocate on {}: {e}", self.resource);
                Err(Status::internal(e.to_string()))
            }
            Err(e) => {
                tracing::warn!("allocate refused on {}: {e}", self.resource);
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }

    async fn pre_start_container(
        &self,
        _: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

fn preferred_allocation(
    served: &[crate::served::ServedDevice],
    req: api::PreferredAllocationRequest,
) -> api::PreferredAllocationResponse {
    let mut out = api::PreferredAllocationResponse::default();
    for c in req.container_requests {
        let avail: Vec<Candidate> = c
            .available_device_i_ds
            .iter()
            .map(|id| {
                let d = served.iter().find(|d| d.id == *id);
                Candidate {
                    id: id.clone(),
                    numa: d.and_then(|d| d.numa),
                    switch: d.and_then(|d| d.switch.clone()),
                }
            })
            .collect();
        let size = usize::try_from(c.allocation_size).unwrap_or(0);
        out.container_responses
            .push(api::ContainerPreferredAllocationResponse {
                device_i_ds: preferred(&avail, &c.must_include_device_i_ds, size),
            });
    }
    out
}

/// Run a request's work as its own task, so a panic in it answers that request with an error
/// and the plugin goes on serving.
async fn guarded<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        let e = PluginError::Panicked {
            task: what,
            message: crate::panic_message(e),
        };
        tracing::error!("{e}");
        Status::internal(e.to_string())
    })
}

/// One resource's server. Dropping it (at shutdown, on an error, on a panic or when the run
/// is cancelled) stops the server and removes its socket.
struct Served {
    socket: PathBuf,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// The kubelet socket's inode when we registered (None: not registered yet).
    registered_with: Option<u64>,
}

impl Served {
    /// Stop serving, waiting up to `grace` for the server to finish.
    async fn shut_down(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(grace, task).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PluginError {
    let path = path.to_owned();
    move |source| PluginError::Io {
        action,
        path,
        source,
    }
}

fn start_server(shared: &Arc<Shared>, resource: &str) -> Result<Served, PluginError> {
    let dir = shared.config.plugin_dir();
    let socket = dir.join(socket_name(resource));
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("remove the stale socket", &socket)(e));
        }
        _ => {}
    }
    let listener = UnixListener::bind(&socket).map_err(io_err("listen on", &socket))?;
    let (stop, stop_rx) = watch::channel(false);
    let svc = PluginService {
        resource: resource.to_owned(),
        shared: shared.clone(),
        stop: stop_rx.clone(),
    };
    let incoming = relayed(listener, stop_rx.clone());
    let task = tokio::spawn(async move {
        let r = Server::builder()
            .add_service(DevicePluginServer::new(svc))
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
            .await;
        if let Err(e) = r {
            tracing::error!("device plugin server: {e}");
        }
    });
    let source = shared
        .inventory
        .borrow()
        .name_sources
        .get(resource)
        .copied();
    tracing::info!(
        "serving {resource} on {} (name from {source:?})",
        socket.display()
    );
    Ok(Served {
        socket,
        stop,
        task: Some(task),
        registered_with: None,
    })
}

/// The connections accepted on `listener`, each through the authority relay.
fn relayed(
    listener: UnixListener,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<DuplexStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let client = tokio::select! {
                r = listener.accept() => r.map(|(s, _)| s),
                () = stopped(stop.clone()) => break,
            };
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: the server must outlive it, so wait and go on.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(authority::relay(client, ours));
            if tx.send(Ok(theirs)).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn register(config: &Config, resource: &str, socket: &Path) -> Result<(), String> {
    let path = config.kubelet_socket();
    let channel = Endpoint::from_static("http://kubelet")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let endpoint = socket
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    RegistrationClient::new(channel)
        .register(api::RegisterRequest {
            version: API_VERSION.into(),
            endpoint,
            resource_name: resource.to_owned(),
            options: Some(api::DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true,
            }),
        })
        .await
        .map_err(|s| s.message().to_owned())?;
    Ok(())
}

fn kubelet_inode(config: &Config) -> Option<u64> {
    std::fs::metadata(config.kubelet_socket())
        .ok()
        .map(|m| m.ino())
}

async fn scan(shared_config: &Config, namer: &Namer) -> Result<Inventory, PluginError> {
    let config = shared_config.clone();
    let namer = namer.clone();
    tokio::task::spawn_blocking(move || {
        inventory::scan(&config.host(), &namer, config.quarantine().as_ref())
    })
    .await
    .unwrap_or_else(|e| {
        Err(PluginError::Panicked {
            task: "health scan",
            message: crate::panic_message(e),
        })
    })
}

/// Run the plugin until `shutdown` completes: adopt or prepare GPUs, serve and register each
/// resource, re-register when the kubelet restarts, publish health changes; at the end stop
/// the servers and remove their sockets. Returns what the start-up pass did.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<PrepareReport, PluginError> {
    let namer = config.namer()?;
    let report = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            inventory::prepare(
                &config.host(),
                config.prepare,
                config.supported_gpus.as_deref(),
            )
        })
        .await
        .unwrap_or_else(|e| {
            Err(PluginError::Panicked {
                task: "start-up pass",
                message: crate::panic_message(e),
            })
        })?
    };
    tracing::info!(
        "start: adopted {:?}, moved {:?}, skipped {:?}",
        report.adopted,
        report.moved,
        report.skipped
    );
    let dir = config.plugin_dir();
    std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let (inv_tx, inv_rx) = watch::channel(Arc::new(scan(&config, &namer).await?));
    let metrics = Arc::new(Metrics::new(&config.state_dir));
    metrics.errors(Operation::Attach, report.attach_errors as u64);
    // Dropped with `run`, which ends the metrics server.
    let _metrics_server = match config.metrics_addr {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            tracing::info!("serving metrics on http://{addr}/metrics");
            Some(AbortOnDrop(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                inv_rx.clone(),
            ))))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        namer: namer.clone(),
        inventory: inv_rx,
        metrics,
    });
    let mut servers: BTreeMap<String, Served> = BTreeMap::new();
    let wake = Arc::new(Notify::new());
    // What woke the next scan, for the scans metric: the first event since the last scan.
    let woken_by = Arc::new(std::sync::Mutex::new(None::<events::EventSource>));
    let on_event: events::OnEvent = {
        let (wake, woken_by, metrics) = (wake.clone(), woken_by.clone(), shared.metrics.clone());
        Arc::new(move |source: events::EventSource| {
            metrics.kernel_event(source.as_str());
            woken_by
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(source);
            wake.notify_one();
        })
    };
    // Dropped with `run`, which stops them.
    let _watchers = config
        .kernel_events
        .then(|| events::spawn(&config.dev_dir, &dir, on_event));
    tokio::pin!(shutdown);
    let mut last_event = events::EventSource::Uevent.as_str();
    loop {
        tick(&shared, &mut servers).await;
        let polled = tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(config.poll_interval) => true,
            () = wake.notified() => false,
        };
        // A wake whose event an earlier scan already took (events that came together leave
        // one extra wake) is still that source's, never the poll's.
        let source = woken_by.lock().unwrap_or_else(|p| p.into_inner()).take();
        let label = match (source, polled) {
            (Some(s), _) => s.as_str(),
            (None, true) => "poll",
            (None, false) => last_event,
        };
        if let Some(s) = source {
            last_event = s.as_str();
        }
        shared.metrics.scan(label);
        match scan(&config, &namer).await {
            Ok(inv) => {
                inv_tx.send_if_modified(|cur| {
                    if **cur != inv {
                        *cur = Arc::new(inv);
                        true
                    } else {
                        false
                    }
                });
            }
            Err(e) => {
                shared.metrics.errors(Operation::Scan, 1);
                tracing::warn!("scan: {e}");
            }
        }
    }
    for (_, s) in std::mem::take(&mut servers) {
        s.shut_down(Duration::from_secs(5)).await;
    }
    Ok(report)
}

/// A task that ends when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One supervision pass: a server per resource, its socket present, registered with the
/// kubelet that is running now.
async fn tick(shared: &Arc<Shared>, servers: &mut BTreeMap<String, Served>) {
    let resources: Vec<String> = shared
        .inventory
        .borrow()
        .resources
        .keys()
        .cloned()
        .collect();
    for r in &resources {
        let restart = servers.get(r).is_some_and(|s| !s.socket.exists());
        if restart {
            // The kubelet removes every plugin socket when it restarts: serve again.
            tracing::info!(
                "{} was removed: serving {r} again",
                servers[r].socket.display()
            );
            if let Some(s) = servers.remove(r) {
                s.shut_down(Duration::from_secs(2)).await;
            }
        }
        if !servers.contains_key(r) {
            // One resource's socket failing leaves the others served; it is tried again on
            // the next pass.
            match start_server(shared, r) {
                Ok(s) => {
                    servers.insert(r.clone(), s);
                }
                Err(e) => {
                    shared.metrics.errors(Operation::Serve, 1);
                    tracing::error!("serving {r}: {e}; retrying");
                }
            }
        }
    }
    let kubelet = kubelet_inode(&shared.config);
    for (r, s) in servers.iter_mut() {
        if kubelet.is_none() {
            s.registered_with = None;
            continue;
        }
        if s.registered_with == kubelet {
            continue;
        }
        match register(&shared.config, r, &s.socket).await {
            Ok(()) => {
                tracing::info!("registered {r} with the kubelet");
                s.registered_with = kubelet;
            }
            Err(e) => {
                shared.metrics.errors(Operation::Register, 1);
                tracing::warn!("registering {r}: {e}; retrying");
            }
        }
    }
}
