//! The device plugin's idle cost and detection time with 64 GPUs: kernel events and a 30 s
//! safety-net poll against the 1 s poll the plugin used before, in one run. Figures, not
//! pass/fail: run by `bench/device-plugin-health.sh` (ignored in the default suite, since it
//! takes about three minutes).
//!
//! The plugin runs in this process, as it does in the other plugin tests; while it idles the
//! test only sleeps, so the process's CPU time (user + system, all threads, `getrusage`) is
//! the plugin's.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use gpu_passthrough_device_plugin::Config;
use gpu_passthrough_device_plugin::api::{Empty, ListAndWatchResponse};
use gpu_passthrough_tests::kubelet::{StubKubelet, plugin_client};
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};
use nix::sys::resource::{UsageWho, getrusage};
use tonic::Streaming;

const GPUS: u32 = 64;
const EVENTS: usize = 20;
const SOCK: &str = "gpu-passthrough-GH100_H100_SXM5_80GB.sock";

fn host() -> FakeHost {
    let h = FakeHost::new(true);
    for i in 0..GPUS {
        let addr = format!("0000:{:02x}:00.0", 0x10 + i);
        h.add(
            FakeDevice::new(&addr, 0x10de, 0x2330, 0x030200)
                .driver("vfio-pci")
                .group(100 + i)
                .numa(i32::try_from(i % 2).unwrap()),
        );
        fs::write(h.dev.join(format!("vfio/{}", 100 + i)), "").unwrap();
    }
    h
}

fn config(h: &FakeHost, poll: Duration, kernel_events: bool) -> Config {
    let ids = h.dir.path().join("pci.ids");
    fs::write(
        &ids,
        "10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n",
    )
    .unwrap();
    Config {
        kubelet_dir: h.dir.path().join("kubelet"),
        sysfs_root: h.sys.clone(),
        state_dir: h.state.clone(),
        dev_dir: h.dev.clone(),
        pci_ids: Some(ids),
        poll_interval: poll,
        kernel_events,
        ..Config::new()
    }
}

fn cpu_seconds() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

async fn next(s: &mut Streaming<ListAndWatchResponse>) -> ListAndWatchResponse {
    tokio::time::timeout(Duration::from_secs(30), s.message())
        .await
        .expect("an update in time")
        .unwrap()
        .unwrap()
}

fn health_of(r: &ListAndWatchResponse, id: &str) -> String {
    r.devices
        .iter()
        .find(|d| d.id == id)
        .unwrap()
        .health
        .clone()
}

struct Figures {
    idle_cpu_percent: f64,
    detection_ms: Vec<f64>,
}

/// Serve 64 GPUs with `poll` (and kernel events or not); idle for `idle`; then take `EVENTS` VFIO nodes away one at a
/// time, timing each to its Unhealthy update.
async fn measure(poll: Duration, kernel_events: bool, idle: Duration) -> Figures {
    let h = host();
    let cfg = config(&h, poll, kernel_events);
    let dir = cfg.plugin_dir();
    let kubelet = StubKubelet::start(&dir);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let plugin = tokio::spawn(gpu_passthrough_device_plugin::run(cfg, async {
        let _ = stopped.await;
    }));
    kubelet.wait_registrations(1, Duration::from_secs(60)).await;
    let mut client = plugin_client(&dir.join(SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next(&mut stream).await.devices.len(), GPUS as usize);
    // Settle: the start-up scans and registrations are not idle time.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let c0 = cpu_seconds();
    let t0 = Instant::now();
    tokio::time::sleep(idle).await;
    let idle_cpu_percent = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64() * 100.0;

    let mut detection_ms = Vec::new();
    for i in 0..EVENTS {
        let id = format!("0000:{:02x}:00.0", 0x10 + i);
        let node = h.dev.join(format!("vfio/{}", 100 + i));
        // Out of step with the poll, as a real fault is: spread over a second.
        tokio::time::sleep(Duration::from_millis((i as u64 * 397) % 1000)).await;
        let start = Instant::now();
        fs::remove_file(&node).unwrap();
        while health_of(&next(&mut stream).await, &id) != "Unhealthy" {}
        detection_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        fs::write(&node, "").unwrap();
        while health_of(&next(&mut stream).await, &id) != "Healthy" {}
    }
    drop(stream);
    let _ = stop.send(());
    plugin.await.unwrap().expect("plugin ran");
    kubelet.stop().await;
    Figures {
        idle_cpu_percent,
        detection_ms,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn report(name: &str, f: &Figures) {
    let max = f.detection_ms.iter().copied().fold(0.0, f64::max);
    println!(
        "{name}: idle CPU {:.3}% of a core; VFIO node gone -> Unhealthy on ListAndWatch: median {:.1} ms, max {:.1} ms ({} events)",
        f.idle_cpu_percent,
        median(&f.detection_ms),
        max,
        f.detection_ms.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about three minutes: bench/device-plugin-health.sh runs it"]
async fn idle_cpu_and_detection_with_64_gpus() {
    let idle = Duration::from_secs(
        std::env::var("BENCH_IDLE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    assert!(Path::new("/proc/self").exists());
    let polled = measure(Duration::from_secs(1), false, idle).await;
    let evented = measure(Duration::from_secs(30), true, idle).await;
    println!("{GPUS} GPUs served, idle {} s each:", idle.as_secs());
    report("before: a 1 s poll, no events", &polled);
    report("now: kernel events + 30 s poll", &evented);
}
