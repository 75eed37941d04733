//! `gpu-passthrough device-plugin` as a DaemonSet runs it: registers, then SIGTERM stops it
//! with its sockets removed.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpu_passthrough_tests::kubelet::{StubKubelet, sockets};
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_plugin_and_leaves_no_stale_sockets() {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:18:00.0", 0x10de, 0x2330, 0x030200)
            .driver("vfio-pci")
            .group(20)
            .numa(0),
    );
    fs::write(h.dev.join("vfio/20"), "").unwrap();
    let kubelet_dir = h.dir.path().join("kubelet");
    let plugins = kubelet_dir.join("device-plugins");
    let kubelet = StubKubelet::start(&plugins);
    let pci_ids = h.dir.path().join("pci.ids");
    fs::write(
        &pci_ids,
        "10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n",
    )
    .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-passthrough"))
        .args(h.cli_args())
        .arg("--dev-dir")
        .arg(&h.dev)
        .args([
            "device-plugin",
            "--poll-ms",
            "50",
            "--json",
            "--kubelet-dir",
        ])
        .arg(&kubelet_dir)
        .arg("--pci-ids")
        .arg(&pci_ids)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the plugin");
    let regs = kubelet.wait_registrations(1, Duration::from_secs(20)).await;
    assert_eq!(regs.len(), 1, "the plugin registered");
    assert_eq!(regs[0].resource_name, "nvidia.com/GH100_H100_SXM5_80GB");
    assert_eq!(
        sockets(&plugins),
        ["gpu-passthrough-GH100_H100_SXM5_80GB.sock", "kubelet.sock"]
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "plugin did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
    assert!(status.success(), "exit {status}: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(report["adopted"][0], "0000:18:00.0");
    // Only the kubelet's own socket is left.
    assert_eq!(sockets(&plugins), ["kubelet.sock"]);
    kubelet.stop().await;
}
