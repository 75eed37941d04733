//! A stub kubelet: the Registration service on `<dir>/kubelet.sock`, recording each
//! RegisterRequest, and a client for a plugin's DevicePlugin service on its socket.
//!
//! Like the real kubelet, a registration is refused unless the plugin's endpoint socket exists,
//! and stopping the stub (a kubelet restart) removes every socket in the directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpu_passthrough_device_plugin::api::device_plugin_client::DevicePluginClient;
use gpu_passthrough_device_plugin::api::registration_server::{Registration, RegistrationServer};
use gpu_passthrough_device_plugin::api::{Empty, RegisterRequest};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

struct Recorder {
    dir: PathBuf,
    seen: Arc<Mutex<Vec<RegisterRequest>>>,
}

#[tonic::async_trait]
impl Registration for Recorder {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        if req.version != "v1beta1" {
            return Err(Status::invalid_argument("unsupported version"));
        }
        if !self.dir.join(&req.endpoint).exists() {
            return Err(Status::failed_precondition("no such endpoint socket"));
        }
        self.seen.lock().unwrap().push(req);
        Ok(Response::new(Empty {}))
    }
}

/// A running stub kubelet.
pub struct StubKubelet {
    /// The device-plugins directory.
    pub dir: PathBuf,
    seen: Arc<Mutex<Vec<RegisterRequest>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl StubKubelet {
    /// Serve Registration on `<device_plugins_dir>/kubelet.sock`.
    pub fn start(device_plugins_dir: &Path) -> StubKubelet {
        std::fs::create_dir_all(device_plugins_dir).expect("mkdir device-plugins");
        let sock = device_plugins_dir.join("kubelet.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind kubelet.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder {
            dir: device_plugins_dir.to_owned(),
            seen: seen.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(RegistrationServer::new(rec))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await
                .expect("stub kubelet serves");
        });
        StubKubelet {
            dir: device_plugins_dir.to_owned(),
            seen,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The registrations so far.
    pub fn registrations(&self) -> Vec<RegisterRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait (bounded) until at least `n` registrations arrived.
    pub async fn wait_registrations(&self, n: usize, timeout: Duration) -> Vec<RegisterRequest> {
        let start = Instant::now();
        loop {
            let r = self.registrations();
            if r.len() >= n || start.elapsed() > timeout {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop like a restarting kubelet: stop serving and remove every socket in the directory.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        for e in std::fs::read_dir(&self.dir)
            .expect("read device-plugins")
            .flatten()
        {
            if e.file_name().to_string_lossy().ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A client of the plugin's service on `socket`.
pub async fn plugin_client(socket: &Path) -> DevicePluginClient<Channel> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://plugin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the plugin socket");
    DevicePluginClient::new(channel)
}

/// The `.sock` files in a directory, sorted.
pub fn sockets(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
