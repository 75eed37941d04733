//! The device plugin against a stub kubelet over fake sysfs trees with GPUs on vfio-pci.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_passthrough::pci::PciAddress;
use gpu_passthrough_device_plugin::api::{AllocateRequest, ContainerAllocateRequest, Empty};
use gpu_passthrough_device_plugin::api::{
    ContainerPreferredAllocationRequest, ListAndWatchResponse, PreferredAllocationRequest,
};
use gpu_passthrough_device_plugin::{Config, Prepare, Quarantine};
use gpu_passthrough_tests::kubelet::{StubKubelet, plugin_client, sockets};
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost, workstation};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Streaming;

const H100: &str = "nvidia.com/GH100_H100_SXM5_80GB";
const RTX4090: &str = "nvidia.com/AD102_GEFORCE_RTX_4090";
const H100_SOCK: &str = "gpu-passthrough-GH100_H100_SXM5_80GB.sock";
const WAIT: Duration = Duration::from_secs(10);

/// Two H100s (NUMA 0 and 1) and an RTX 4090 with its audio function, all on vfio-pci.
fn vfio_host() -> FakeHost {
    let h = FakeHost::new(true);
    for (addr, dev, class, group, numa) in [
        ("0000:18:00.0", 0x2330, 0x030200, 20, 0),
        ("0000:9a:00.0", 0x2330, 0x030200, 21, 1),
        ("0000:01:00.0", 0x2684, 0x030000, 12, 0),
        ("0000:01:00.1", 0x22ba, 0x040300, 12, 0),
    ] {
        h.add(
            FakeDevice::new(addr, 0x10de, dev, class)
                .driver("vfio-pci")
                .group(group)
                .numa(numa),
        );
        fs::write(h.dev.join("vfio").join(group.to_string()), "").unwrap();
    }
    h
}

fn pci_ids(h: &FakeHost) -> PathBuf {
    let p = h.dir.path().join("pci.ids");
    fs::write(
        &p,
        "10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n\t2684  AD102 [GeForce RTX 4090]\n",
    )
    .unwrap();
    p
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<gpu_passthrough_device_plugin::inventory::PrepareReport, String>>,
    dir: PathBuf,
}

impl Running {
    async fn stop(mut self) -> gpu_passthrough_device_plugin::inventory::PrepareReport {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().expect("plugin ran")
    }
}

fn config(h: &FakeHost) -> Config {
    Config {
        kubelet_dir: h.dir.path().join("kubelet"),
        sysfs_root: h.sys.clone(),
        state_dir: h.state.clone(),
        dev_dir: h.dev.clone(),
        pci_ids: Some(pci_ids(h)),
        poll_interval: Duration::from_millis(50),
        ..Config::new()
    }
}

fn start(config: Config) -> Running {
    let (tx, rx) = oneshot::channel::<()>();
    let dir = config.plugin_dir();
    let task = tokio::spawn(async move {
        gpu_passthrough_device_plugin::run(config, async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| e.to_string())
    });
    Running {
        stop: Some(tx),
        task,
        dir,
    }
}

async fn next(s: &mut Streaming<ListAndWatchResponse>) -> ListAndWatchResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a ListAndWatch update in time")
        .expect("stream ok")
        .expect("stream open")
}

fn health(r: &ListAndWatchResponse, id: &str) -> String {
    r.devices
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("{id} listed"))
        .health
        .clone()
}

fn alloc(ids: &[&str]) -> AllocateRequest {
    AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        }],
    }
}

fn owner_of(h: &FakeHost, addr: &str) -> Option<String> {
    let j = h.journal()?;
    j["attachments"].as_array()?.iter().find_map(|a| {
        a["devices"]
            .as_array()?
            .iter()
            .any(|d| d["device"] == addr)
            .then(|| a["owner"].as_str().unwrap().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_each_resource_and_lists_devices_with_health_and_numa() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    let regs = kubelet.wait_registrations(2, WAIT).await;
    let mut names: Vec<&str> = regs.iter().map(|r| r.resource_name.as_str()).collect();
    names.sort();
    assert_eq!(names, [RTX4090, H100]);
    let h100 = regs.iter().find(|r| r.resource_name == H100).unwrap();
    assert_eq!(h100.version, "v1beta1");
    assert_eq!(h100.endpoint, H100_SOCK);
    assert!(h100.options.unwrap().get_preferred_allocation_available);
    println!("captured Register: {h100:?}");

    let inv = gpu_passthrough_device_plugin::inventory::scan(
        &config(&h).host(),
        &config(&h).namer().unwrap(),
        &gpu_passthrough_device_plugin::NoQuarantine,
    )
    .unwrap();
    assert_eq!(
        inv.name_sources.get(H100),
        Some(&gpu_passthrough_device_plugin::naming::NameSource::PciIds)
    );

    // The adopted devices are journaled for the pool: a local `attach` would be refused.
    for a in [
        "0000:18:00.0",
        "0000:9a:00.0",
        "0000:01:00.0",
        "0000:01:00.1",
    ] {
        assert_eq!(owner_of(&h, a).as_deref(), Some("device-plugin"), "{a}");
    }

    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let opts = client
        .get_device_plugin_options(Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(opts.get_preferred_allocation_available && !opts.pre_start_required);
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let first = next(&mut stream).await;
    println!("captured ListAndWatch: {first:?}");
    let ids: Vec<&str> = first.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["0000:18:00.0", "0000:9a:00.0"]);
    assert!(first.devices.iter().all(|d| d.health == "Healthy"));
    let numa: Vec<i64> = first
        .devices
        .iter()
        .map(|d| d.topology.as_ref().unwrap().nodes[0].id)
        .collect();
    assert_eq!(numa, [0, 1]);

    // GetPreferredAllocation keeps a must-include device's NUMA node.
    let pref = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["0000:18:00.0".into(), "0000:9a:00.0".into()],
                must_include_device_i_ds: vec!["0000:9a:00.0".into()],
                allocation_size: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pref.container_responses[0].device_i_ds, ["0000:9a:00.0"]);
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_answers_vfio_nodes_and_kubevirt_env_and_journals_the_allocation() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let resp = client
        .allocate(alloc(&["0000:18:00.0"]))
        .await
        .expect("allocated")
        .into_inner();
    println!("captured Allocate: {resp:?}");
    let c = &resp.container_responses[0];
    assert_eq!(
        c.envs
            .get("PCI_RESOURCE_NVIDIA_COM_GH100_H100_SXM5_80GB")
            .map(String::as_str),
        Some("0000:18:00.0")
    );
    let nodes: Vec<(&str, &str)> = c
        .devices
        .iter()
        .map(|d| (d.container_path.as_str(), d.host_path.as_str()))
        .collect();
    let host_vfio = h.dev.join("vfio").display().to_string();
    assert_eq!(
        nodes,
        [
            ("/dev/vfio/vfio", format!("{host_vfio}/vfio").as_str()),
            ("/dev/vfio/20", format!("{host_vfio}/20").as_str()),
        ]
    );
    assert!(c.devices.iter().all(|d| d.permissions == "mrw"));
    let owner = owner_of(&h, "0000:18:00.0").unwrap();
    assert!(owner.starts_with("device-plugin:alloc-"), "{owner}");
    assert_eq!(
        owner_of(&h, "0000:9a:00.0").as_deref(),
        Some("device-plugin")
    );

    // The kubelet hands the device out again after the pod ended: a new allocation owner.
    client
        .allocate(alloc(&["0000:18:00.0"]))
        .await
        .expect("re-allocated");
    let again = owner_of(&h, "0000:18:00.0").unwrap();
    assert_ne!(again, owner);

    // Not this resource's device, and not a device at all: refused, nothing recorded.
    let err = client.allocate(alloc(&["0000:01:00.0"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("AD102"), "{}", err.message());
    let err = client.allocate(alloc(&["GPU-x"])).await.unwrap_err();
    assert!(err.message().contains("GPU-x"), "{}", err.message());
    assert_eq!(
        owner_of(&h, "0000:01:00.0").as_deref(),
        Some("device-plugin")
    );

    // The 4090 takes its audio function (same group) with it; with iommufd the container also
    // gets /dev/iommu and each function's VFIO character device.
    fs::write(h.dev.join("iommu"), "").unwrap();
    for (a, n) in [("0000:01:00.0", 3), ("0000:01:00.1", 4)] {
        fs::create_dir_all(
            h.sys
                .join("bus/pci/devices")
                .join(a)
                .join(format!("vfio-dev/vfio{n}")),
        )
        .unwrap();
    }
    let mut client = plugin_client(
        &plugin
            .dir
            .join("gpu-passthrough-AD102_GEFORCE_RTX_4090.sock"),
    )
    .await;
    let resp = client
        .allocate(alloc(&["0000:01:00.0"]))
        .await
        .unwrap()
        .into_inner();
    let paths: Vec<&str> = resp.container_responses[0]
        .devices
        .iter()
        .map(|d| d.container_path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "/dev/vfio/vfio",
            "/dev/iommu",
            "/dev/vfio/devices/vfio3",
            "/dev/vfio/devices/vfio4",
            "/dev/vfio/12"
        ]
    );
    assert_eq!(owner_of(&h, "0000:01:00.1"), owner_of(&h, "0000:01:00.0"));
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_group_node_turns_the_device_unhealthy_within_a_poll() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(health(&next(&mut stream).await, "0000:9a:00.0"), "Healthy");

    let node = h.dev.join("vfio/21");
    fs::remove_file(&node).unwrap();
    let t0 = Instant::now();
    let update = next(&mut stream).await;
    let latency = t0.elapsed();
    println!("health change → ListAndWatch update: {latency:?} (poll 50 ms)");
    assert_eq!(health(&update, "0000:9a:00.0"), "Unhealthy");
    assert_eq!(health(&update, "0000:18:00.0"), "Healthy");
    // An unhealthy device is not handed out.
    let err = client.allocate(alloc(&["0000:9a:00.0"])).await.unwrap_err();
    assert!(err.message().contains("vfio/21"), "{}", err.message());

    fs::write(&node, "").unwrap();
    assert_eq!(health(&next(&mut stream).await, "0000:9a:00.0"), "Healthy");

    // Off vfio-pci is unhealthy too.
    fs::remove_file(h.sys.join("bus/pci/devices/0000:18:00.0/driver")).unwrap();
    assert_eq!(
        health(&next(&mut stream).await, "0000:18:00.0"),
        "Unhealthy"
    );
    plugin.stop().await;
    kubelet.stop().await;
}

struct QuarantineOne(PciAddress);

impl Quarantine for QuarantineOne {
    fn is_quarantined(&self, device: PciAddress) -> bool {
        device == self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_device_is_unhealthy_and_never_allocated() {
    let h = vfio_host();
    let cfg = Config {
        quarantine: Some(Arc::new(QuarantineOne("0000:18:00.0".parse().unwrap()))),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let first = next(&mut stream).await;
    assert_eq!(health(&first, "0000:18:00.0"), "Unhealthy");
    assert_eq!(health(&first, "0000:9a:00.0"), "Healthy");
    let err = client.allocate(alloc(&["0000:18:00.0"])).await.unwrap_err();
    assert!(err.message().contains("quarantined"), "{}", err.message());
    plugin.stop().await;
    kubelet.stop().await;
}

/// By default the plugin reads the host's health records: when a GPU that two owners' VMs lost
/// is quarantined by the library's policy while the plugin serves it, the next ListAndWatch update
/// reports it unhealthy, with no wiring by the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_health_records_quarantine_by_default() {
    use gpu_passthrough::attach::Owner;
    use gpu_passthrough::health::{self, EventSource, HealthEvent, HealthStore};
    let h = vfio_host();
    let cfg = config(&h);
    assert!(
        cfg.quarantine.is_none(),
        "the default is the health records"
    );
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(health(&next(&mut stream).await, "0000:18:00.0"), "Healthy");

    let device: PciAddress = "0000:18:00.0".parse().unwrap();
    let line = "NVRM: Xid (PCI:0000:18:00): 79, pid=1234, GPU has fallen off the bus.";
    let fault = health::classify_line(line).expect("an Xid 79 line is a fault");
    let events: Vec<HealthEvent> = ["vm-1", "vm-2"]
        .iter()
        .map(|o| {
            let owner = Owner::new(o).unwrap();
            HealthEvent::now(device, Some(owner), EventSource::Console, fault.clone())
        })
        .collect();
    HealthStore::new(&h.state).record(&events).unwrap();
    assert!(health::is_quarantined(&h.state, device).unwrap().is_some());

    let update = next(&mut stream).await;
    assert_eq!(health(&update, "0000:18:00.0"), "Unhealthy");
    assert_eq!(health(&update, "0000:9a:00.0"), "Healthy");
    let err = client.allocate(alloc(&["0000:18:00.0"])).await.unwrap_err();
    assert!(err.message().contains("quarantined"), "{}", err.message());
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_again_after_the_kubelet_restarts() {
    let h = vfio_host();
    let cfg = config(&h);
    let dir = cfg.plugin_dir();
    let kubelet = StubKubelet::start(&dir);
    let plugin = start(cfg);
    assert_eq!(kubelet.wait_registrations(2, WAIT).await.len(), 2);
    // A restarting kubelet removes every socket, ours included.
    kubelet.stop().await;
    assert!(sockets(&dir).is_empty());
    let t0 = Instant::now();
    let kubelet = StubKubelet::start(&dir);
    let regs = kubelet.wait_registrations(2, WAIT).await;
    println!(
        "re-registered {} resources {:?} after the kubelet came back",
        regs.len(),
        t0.elapsed()
    );
    assert_eq!(regs.len(), 2);
    assert!(sockets(&dir).contains(&H100_SOCK.to_string()));
    let mut client = plugin_client(&dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next(&mut stream).await.devices.len(), 2);
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_is_refused_when_the_group_changed() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    // 0000:18:00.0 moves from group 20 to a new group 99 (e.g. after an ACS change and rescan).
    let dev = h.sys.join("bus/pci/devices/0000:18:00.0");
    let real = fs::canonicalize(&dev).unwrap();
    let g99 = h.sys.join("kernel/iommu_groups/99");
    fs::create_dir_all(g99.join("devices")).unwrap();
    fs::remove_file(h.sys.join("kernel/iommu_groups/20/devices/0000:18:00.0")).unwrap();
    fs::remove_file(real.join("iommu_group")).unwrap();
    symlink(&g99, real.join("iommu_group")).unwrap();
    symlink(&real, g99.join("devices/0000:18:00.0")).unwrap();

    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let err = client.allocate(alloc(&["0000:18:00.0"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("IOMMU group changed from Some(20) to Some(99)"),
        "{}",
        err.message()
    );
    assert_eq!(
        owner_of(&h, "0000:18:00.0").as_deref(),
        Some("device-plugin")
    );

    // A group member that left vfio-pci also refuses its group.
    fs::remove_file(h.sys.join("bus/pci/devices/0000:01:00.1/driver")).unwrap();
    let mut client = plugin_client(
        &plugin
            .dir
            .join("gpu-passthrough-AD102_GEFORCE_RTX_4090.sock"),
    )
    .await;
    let err = client.allocate(alloc(&["0000:01:00.0"])).await.unwrap_err();
    assert!(err.message().contains("0000:01:00.1"), "{}", err.message());
    assert_eq!(
        owner_of(&h, "0000:01:00.0").as_deref(),
        Some("device-plugin")
    );
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_moves_gpus_through_the_attach_transaction() {
    // The workstation's 4090 is on nvidia; its audio on snd_hda_intel; the iGPU is the boot VGA.
    let h = workstation();
    let cfg = Config {
        prepare: Prepare::All,
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    let regs = kubelet.wait_registrations(1, WAIT).await;
    assert_eq!(regs[0].resource_name, RTX4090);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(h.driver("0000:00:02.0").as_deref(), Some("i915"));
    assert_eq!(
        owner_of(&h, "0000:01:00.0").as_deref(),
        Some("device-plugin")
    );
    let report = plugin.stop().await;
    assert_eq!(
        report.moved,
        ["0000:01:00.0".parse::<PciAddress>().unwrap()]
    );
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_n_moves_n_gpus_and_never_the_boot_display() {
    let h = FakeHost::new(true);
    // An NVIDIA boot display, then three H100s on nvidia.
    h.add(
        FakeDevice::new("0000:05:00.0", 0x10de, 0x2330, 0x030000)
            .driver("nvidia")
            .group(5)
            .boot_vga(),
    );
    for (i, a) in ["0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0"]
        .iter()
        .enumerate()
    {
        h.add(
            FakeDevice::new(a, 0x10de, 0x2330, 0x030200)
                .driver("nvidia")
                .group(20 + i as u32)
                .numa(0),
        );
    }
    let cfg = Config {
        prepare: Prepare::Count(2),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(1, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let ids: Vec<String> = next(&mut stream)
        .await
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["0000:18:00.0", "0000:2a:00.0"]);
    assert_eq!(h.driver("0000:05:00.0").as_deref(), Some("nvidia"));
    assert_eq!(h.driver("0000:3a:00.0").as_deref(), Some("nvidia"));
    let report = plugin.stop().await;
    assert_eq!(report.moved.len(), 2);
    let (skipped, why) = &report.skipped[0];
    assert_eq!(skipped.to_string(), "0000:05:00.0");
    assert!(why.contains("boot display"), "{why}");
    kubelet.stop().await;
}

/// vGPUs the library created for the plugin's pool are served on both frameworks, named by
/// profile as kubevirt-gpu-device-plugin names them: a vendor-VFIO VF by its address in
/// `PCI_RESOURCE_…`, an mdev by its UUID in `MDEV_PCI_RESOURCE_…`; Allocate moves the journal's
/// record to the allocation; a VF whose type was changed behind the journal turns Unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_pool_vgpus_on_both_frameworks() {
    use gpu_passthrough::attach::{Owner, VgpuAttachRequest};
    use gpu_passthrough::vgpu::PlaceRequest;
    use gpu_passthrough_device_plugin::naming::socket_name;
    let h = gpu_passthrough_tests::sysfs::mixed_vgpu_host();
    let pool = Owner::new("device-plugin").unwrap();
    for profile in ["L40S-4Q", "T4-1B"] {
        let req = VgpuAttachRequest {
            place: PlaceRequest {
                profile: profile.into(),
                count: 1,
                numa: None,
                pack: false,
            },
            owner: pool.clone(),
            initrd: None,
        };
        h.host()
            .attach_vgpu(&req)
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
    }
    let j = h.journal().unwrap();
    let vgpus = j["attachments"][0]["vgpus"].as_array().unwrap().clone();
    assert_eq!(vgpus.len(), 2, "{j}");
    let vf = vgpus
        .iter()
        .find_map(|v| v["vf"].as_str())
        .unwrap()
        .to_owned();
    let uuid = vgpus
        .iter()
        .find_map(|v| v["uuid"].as_str())
        .unwrap()
        .to_owned();

    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    let regs = kubelet.wait_registrations(2, WAIT).await;
    let mut names: Vec<&str> = regs.iter().map(|r| r.resource_name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["nvidia.com/GRID_T4-1B", "nvidia.com/NVIDIA_L40S-4Q"]
    );

    let l40s = "nvidia.com/NVIDIA_L40S-4Q";
    let mut vf_client = plugin_client(&plugin.dir.join(socket_name(l40s))).await;
    let mut vf_stream = vf_client
        .list_and_watch(Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut vf_stream).await;
    assert_eq!(first.devices.len(), 1);
    assert_eq!(health(&first, &vf), "Healthy");

    let t4 = "nvidia.com/GRID_T4-1B";
    let mut mdev_client = plugin_client(&plugin.dir.join(socket_name(t4))).await;
    let mut mdev_stream = mdev_client
        .list_and_watch(Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health(&next(&mut mdev_stream).await, &uuid), "Healthy");

    let answer = mdev_client
        .allocate(alloc(&[&uuid]))
        .await
        .unwrap()
        .into_inner();
    let c = &answer.container_responses[0];
    assert_eq!(
        c.envs.get("MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1B"),
        Some(&uuid)
    );
    let paths: Vec<&str> = c
        .devices
        .iter()
        .map(|d| d.container_path.as_str())
        .collect();
    assert_eq!(paths[0], "/dev/vfio/vfio");
    assert!(
        paths.len() == 2 && paths[1].starts_with("/dev/vfio/"),
        "{paths:?}"
    );
    // Another resource's ID is refused.
    let err = mdev_client.allocate(alloc(&[&vf])).await.unwrap_err();
    assert!(err.message().contains(&vf), "{}", err.message());

    let answer = vf_client
        .allocate(alloc(&[&vf]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.container_responses[0]
            .envs
            .get("PCI_RESOURCE_NVIDIA_COM_NVIDIA_L40S-4Q"),
        Some(&vf)
    );
    let j = h.journal().unwrap();
    let allocated: Vec<&serde_json::Value> = j["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["owner"]
                .as_str()
                .unwrap()
                .starts_with("device-plugin:alloc-")
        })
        .flat_map(|a| a["vgpus"].as_array().unwrap())
        .collect();
    assert_eq!(allocated.len(), 2, "both vGPUs moved to allocations: {j}");

    // The VF's vGPU released behind the journal's back: Unhealthy, and never allocated.
    fs::write(
        h.sys
            .join("bus/pci/devices")
            .join(&vf)
            .join("nvidia/current_vgpu_type"),
        "0\n",
    )
    .unwrap();
    assert_eq!(health(&next(&mut vf_stream).await, &vf), "Unhealthy");
    let err = vf_client.allocate(alloc(&[&vf])).await.unwrap_err();
    assert!(err.message().contains("vGPU type 0"), "{}", err.message());
    plugin.stop().await;
    kubelet.stop().await;
}

/// A gRPC C-core client (Python's grpcio), naming the plugin by its socket path as `:authority`
/// the way C-core, Java and Swift clients and older kubelets do, percent-encoded or raw.
const GRPCIO_CLIENT: &str = r#"
import sys, grpc
sock, authority = sys.argv[1], sys.argv[2]
ch = grpc.insecure_channel("unix:" + sock, options=[("grpc.default_authority", authority)])
opts = ch.unary_unary("/v1beta1.DevicePlugin/GetDevicePluginOptions")(b"", timeout=10)
print("options", opts.hex())
watch = ch.unary_stream("/v1beta1.DevicePlugin/ListAndWatch")(b"", timeout=10)
print("devices", len(next(watch)))
watch.cancel()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_naming_the_socket_path_as_authority_is_served() {
    let Some(python) = gpu_passthrough_tests::python::with_modules(&["grpc"]) else {
        return;
    };
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let sock = plugin.dir.join(H100_SOCK);
    let raw = sock.display().to_string();
    let encoded = raw.replace('/', "%2F");
    for authority in [encoded, raw.clone(), "localhost".to_owned()] {
        let (python, sock) = (python.clone(), raw.clone());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .args(["-c", GRPCIO_CLIENT, &sock, &authority])
                .output()
                .expect("python runs")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // GetPreferredAllocation available (field 2 = true); a non-empty device list.
        assert!(stdout.contains("options 1001"), "{stdout}");
        assert!(!stdout.contains("devices 0"), "{stdout}");
    }
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_refuses_a_device_asked_for_twice() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let twice_in_one = alloc(&["0000:18:00.0", "0000:18:00.0"]);
    let across = AllocateRequest {
        container_requests: vec![
            ContainerAllocateRequest {
                devices_ids: vec!["0000:9a:00.0".into()],
            },
            ContainerAllocateRequest {
                devices_ids: vec!["0000:9a:00.0".into()],
            },
        ],
    };
    for (req, id) in [(twice_in_one, "0000:18:00.0"), (across, "0000:9a:00.0")] {
        let err = client.allocate(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains(id) && err.message().contains("more than once"),
            "{}",
            err.message()
        );
    }
    assert_eq!(
        owner_of(&h, "0000:18:00.0").as_deref(),
        Some("device-plugin")
    );
    assert_eq!(
        owner_of(&h, "0000:9a:00.0").as_deref(),
        Some("device-plugin")
    );
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_resources_socket_failing_leaves_the_others_served_and_is_retried() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    // A directory where the H100 socket goes: it can be neither removed nor bound.
    let blocker = cfg.plugin_dir().join(H100_SOCK);
    fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let plugin = start(cfg);
    let regs = kubelet.wait_registrations(1, WAIT).await;
    let names: Vec<&str> = regs.iter().map(|r| r.resource_name.as_str()).collect();
    assert_eq!(names, [RTX4090], "the other resource is served meanwhile");
    assert!(!plugin.task.is_finished(), "the plugin goes on");

    fs::remove_dir_all(&blocker).unwrap();
    let regs = kubelet.wait_registrations(2, WAIT).await;
    assert!(
        regs.iter().any(|r| r.resource_name == H100),
        "retried: {regs:?}"
    );
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(health(&next(&mut stream).await, "0000:18:00.0"), "Healthy");
    plugin.stop().await;
    kubelet.stop().await;
}

/// A quarantine check that panics while armed: a bug anywhere under a request or a scan.
struct PanickingQuarantine(Arc<std::sync::atomic::AtomicBool>);

impl Quarantine for PanickingQuarantine {
    fn is_quarantined(&self, _: PciAddress) -> bool {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("quarantine check exploded");
        }
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_answers_its_request_with_an_error_and_serving_goes_on() {
    let h = vfio_host();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cfg = Config {
        quarantine: Some(Arc::new(PanickingQuarantine(armed.clone()))),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;

    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = client.allocate(alloc(&["0000:18:00.0"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert!(
        err.message().contains("Allocate panicked") && err.message().contains("exploded"),
        "{}",
        err.message()
    );
    // Health scans panic too meanwhile (every 50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!plugin.task.is_finished(), "the plugin survives");
    armed.store(false, std::sync::atomic::Ordering::SeqCst);

    let ok = client.allocate(alloc(&["0000:18:00.0"])).await.unwrap();
    assert_eq!(ok.into_inner().container_responses.len(), 1);
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(health(&next(&mut stream).await, "0000:9a:00.0"), "Healthy");
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_removed_when_the_plugin_is_cancelled() {
    let h = vfio_host();
    let cfg = config(&h);
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    assert_eq!(sockets(&plugin.dir).len(), 3, "{:?}", sockets(&plugin.dir));
    plugin.task.abort();
    let _ = (&mut { plugin.task }).await;
    assert_eq!(sockets(&plugin.dir), ["kubelet.sock"]);
    kubelet.stop().await;
}

/// Scrape an OpenMetrics endpoint with Python's `prometheus_client` parser: every sample as
/// `[name, labels, value]`.
const SCRAPE: &str = r#"
import sys, json, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(text) for s in f.samples]))
"#;

type Sample = (String, std::collections::BTreeMap<String, String>, f64);

async fn scrape(python: &std::path::Path, addr: std::net::SocketAddr) -> Vec<Sample> {
    let python = python.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", SCRAPE, &format!("http://{addr}/metrics")])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("samples as JSON")
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_and_parse_as_openmetrics() {
    use gpu_passthrough::attach::Owner;
    use gpu_passthrough::health::{self, EventSource, HealthEvent, HealthStore};
    let Some(python) = gpu_passthrough_tests::python::with_modules(&["prometheus_client"]) else {
        return;
    };
    let h = vfio_host();
    let addr = free_port();
    let cfg = Config {
        metrics_addr: Some(addr),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let p = "gpu_passthrough_plugin_";
    let m = scrape(&python, addr).await;
    let devices = format!("{p}devices");
    let healthy = |r, h| [("resource", r), ("health", h)];
    assert_eq!(sample(&m, &devices, &healthy(H100, "Healthy")), Some(2.0));
    assert_eq!(sample(&m, &devices, &healthy(H100, "Unhealthy")), Some(0.0));
    assert_eq!(
        sample(&m, &devices, &healthy(RTX4090, "Healthy")),
        Some(1.0)
    );
    let dev_9a = [("resource", H100), ("device", "0000:9a:00.0")];
    assert_eq!(
        sample(&m, &format!("{p}device_healthy"), &dev_9a),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, &format!("{p}quarantined_devices"), &[]),
        Some(0.0)
    );
    for op in ["attach", "scan", "serve", "register"] {
        let errors = format!("{p}errors_total");
        assert_eq!(sample(&m, &errors, &[("operation", op)]), Some(0.0), "{op}");
    }
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let boot_id = [("boot_id", boot.trim())];
    assert_eq!(sample(&m, &format!("{p}boot"), &boot_id), Some(1.0));

    // A device turns unhealthy; one allocation granted, one refused.
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    next(&mut stream).await;
    fs::remove_file(h.dev.join("vfio/21")).unwrap();
    assert_eq!(
        health(&next(&mut stream).await, "0000:9a:00.0"),
        "Unhealthy"
    );
    client.allocate(alloc(&["0000:18:00.0"])).await.unwrap();
    client.allocate(alloc(&["0000:9a:00.0"])).await.unwrap_err();
    let m = scrape(&python, addr).await;
    assert_eq!(sample(&m, &devices, &healthy(H100, "Unhealthy")), Some(1.0));
    assert_eq!(
        sample(&m, &format!("{p}device_healthy"), &dev_9a),
        Some(0.0)
    );
    // The removed VFIO node woke a scan through inotify, not the poll.
    let by_inotify = sample(&m, &format!("{p}scans_total"), &[("source", "inotify")]);
    assert!(by_inotify.is_some_and(|n| n >= 1.0), "{by_inotify:?}");
    let seen = sample(
        &m,
        &format!("{p}kernel_events_total"),
        &[("source", "inotify")],
    );
    assert!(seen.is_some_and(|n| n >= 1.0), "{seen:?}");
    let allocations = format!("{p}allocations_total");
    let result = |r| [("resource", H100), ("result", r)];
    assert_eq!(sample(&m, &allocations, &result("granted")), Some(1.0));
    assert_eq!(sample(&m, &allocations, &result("refused")), Some(1.0));
    // Two VMs lost 0000:18:00.0: two faults, and the host quarantines it.
    let line = "NVRM: Xid (PCI:0000:18:00): 79, pid=1234, GPU has fallen off the bus.";
    let fault = health::classify_line(line).unwrap();
    let class = fault.kind.to_string();
    let events: Vec<HealthEvent> = ["vm-1", "vm-2"]
        .iter()
        .map(|o| {
            let owner = Some(Owner::new(o).unwrap());
            HealthEvent::now(
                "0000:18:00.0".parse().unwrap(),
                owner,
                EventSource::Console,
                fault.clone(),
            )
        })
        .collect();
    HealthStore::new(&h.state).record(&events).unwrap();

    // The health records are read at each scrape.
    let m = scrape(&python, addr).await;
    let faults = [("device", "0000:18:00.0"), ("class", class.as_str())];
    assert_eq!(sample(&m, &format!("{p}faults"), &faults), Some(2.0));
    assert_eq!(
        sample(&m, &format!("{p}quarantined_devices"), &[]),
        Some(1.0)
    );
    plugin.stop().await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_is_refused_naming_it() {
    let h = vfio_host();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = Config {
        metrics_addr: Some(addr),
        ..config(&h)
    };
    let plugin = start(cfg);
    let err = plugin.task.await.unwrap().unwrap_err();
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );
}

/// With the safety-net poll an hour away, a VFIO node vanishing (inotify) still reaches
/// ListAndWatch at once, and so does a restarting kubelet's new socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfio_node_and_kubelet_changes_are_seen_without_waiting_for_the_poll() {
    let h = vfio_host();
    let cfg = Config {
        poll_interval: Duration::from_secs(3600),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg.clone());
    kubelet.wait_registrations(2, WAIT).await;
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(health(&next(&mut stream).await, "0000:9a:00.0"), "Healthy");

    let node = h.dev.join("vfio/21");
    fs::remove_file(&node).unwrap();
    assert_eq!(
        health(&next(&mut stream).await, "0000:9a:00.0"),
        "Unhealthy"
    );
    fs::write(&node, "").unwrap();
    assert_eq!(health(&next(&mut stream).await, "0000:9a:00.0"), "Healthy");

    kubelet.stop().await;
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let regs = kubelet.wait_registrations(2, WAIT).await;
    assert_eq!(regs.len(), 2, "registered again: {regs:?}");
    plugin.stop().await;
    kubelet.stop().await;
}

/// A proc root as a pod without `hostPID` sees it: its own PID namespace.
fn container_proc(h: &FakeHost) -> PathBuf {
    let root = h.dir.path().join("container-proc");
    fs::create_dir_all(root.join("self/ns")).unwrap();
    symlink("pid:[4026532611]", root.join("self/ns/pid")).unwrap();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_plugin_refuses_prepare_naming_host_pid_and_moves_nothing() {
    let h = workstation();
    let cfg = Config {
        prepare: Prepare::All,
        proc_root: container_proc(&h),
        ..config(&h)
    };
    let err = gpu_passthrough_device_plugin::run(cfg, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("hostPID: true"), "{err}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert!(h.journal_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_plugin_serves_its_pool_but_adopts_nothing() {
    let h = vfio_host();
    // Prepared earlier by a plugin that saw the host: 18:00.0 is in the pool.
    let pool = gpu_passthrough::attach::Owner::new("device-plugin").unwrap();
    h.host()
        .attach(&gpu_passthrough::attach::AttachRequest {
            plan: gpu_passthrough::attach::PlanRequest {
                devices: vec!["0000:18:00.0".parse().unwrap()],
                ..Default::default()
            },
            owner: pool,
            initrd: None,
        })
        .unwrap();
    let cfg = Config {
        proc_root: container_proc(&h),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    let regs = kubelet.wait_registrations(1, WAIT).await;
    assert_eq!(regs[0].resource_name, H100);
    let mut client = plugin_client(&plugin.dir.join(H100_SOCK)).await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let first = next(&mut stream).await;
    let ids: Vec<&str> = first.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["0000:18:00.0"], "the unowned 9a:00.0 is not adopted");
    assert_eq!(health(&first, "0000:18:00.0"), "Healthy");
    // Allocate moves no device (a pool GPU on vfio-pci changes owner in the journal): served.
    client.allocate(alloc(&["0000:18:00.0"])).await.unwrap();
    assert_eq!(owner_of(&h, "0000:9a:00.0"), None);
    let report = plugin.stop().await;
    assert!(report.adopted.is_empty(), "{report:?}");
    assert!(
        report
            .skipped
            .iter()
            .any(|(a, why)| a.to_string() == "0000:9a:00.0" && why.contains("hostPID: true")),
        "{report:?}"
    );
    kubelet.stop().await;
}

/// A proc root seeing the host, in boot `boot`.
fn host_proc_in_boot(h: &FakeHost, boot: &str) -> PathBuf {
    let root = h.dir.path().join("host-proc");
    fs::create_dir_all(root.join("self/ns")).unwrap();
    let _ = symlink(
        gpu_passthrough::pidns::INITIAL_PID_NS,
        root.join("self/ns/pid"),
    );
    fs::create_dir_all(root.join("sys/kernel/random")).unwrap();
    fs::write(root.join("sys/kernel/random/boot_id"), format!("{boot}\n")).unwrap();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_start_after_a_reboot_the_earlier_boots_records_end_and_gpus_are_adopted_afresh() {
    let h = vfio_host();
    // Boot A: 18:00.0 in the pool, 9a:00.0 allocated to a pod.
    let before = host_proc_in_boot(&h, "boot-a");
    for (addr, who) in [
        ("0000:18:00.0", "device-plugin"),
        ("0000:9a:00.0", "device-plugin:alloc-1"),
    ] {
        h.host()
            .with_proc_root(&before)
            .attach(&gpu_passthrough::attach::AttachRequest {
                plan: gpu_passthrough::attach::PlanRequest {
                    devices: vec![addr.parse().unwrap()],
                    ..Default::default()
                },
                owner: gpu_passthrough::attach::Owner::new(who).unwrap(),
                initrd: None,
            })
            .unwrap();
    }
    // Boot B: both GPUs are on vfio-pci again by the node's own configuration.
    let cfg = Config {
        proc_root: host_proc_in_boot(&h, "boot-b"),
        ..config(&h)
    };
    let kubelet = StubKubelet::start(&cfg.plugin_dir());
    let plugin = start(cfg);
    kubelet.wait_registrations(2, WAIT).await;
    let j = h.journal().unwrap();
    for att in j["attachments"].as_array().unwrap() {
        assert_eq!(att["boot_id"], "boot-b", "{att}");
        assert_eq!(
            att["owner"], "device-plugin",
            "the pod's allocation ended: {att}"
        );
    }
    let report = plugin.stop().await;
    let ended: Vec<String> = report
        .ended_by_reboot
        .iter()
        .map(|e| format!("{} {}", e.owner, e.boot_id))
        .collect();
    assert_eq!(
        ended,
        ["device-plugin boot-a", "device-plugin:alloc-1 boot-a"]
    );
    let mut adopted: Vec<String> = report.adopted.iter().map(|a| a.to_string()).collect();
    adopted.sort();
    assert!(
        adopted.contains(&"0000:18:00.0".to_owned())
            && adopted.contains(&"0000:9a:00.0".to_owned()),
        "{report:?}"
    );
    kubelet.stop().await;
}

/// The plugin's counter `gpu_passthrough_plugin_scans_total{source="..."}` read over plain HTTP.
fn scans_by(addr: std::net::SocketAddr, source: &str) -> u64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let name = format!("gpu_passthrough_plugin_scans_total{{source=\"{source}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Events in a burst leave the plugin one wake more than it has events to take; that scan is
/// the events', never counted as the poll's (a 10-minute poll never fires here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_kernel_events_is_never_counted_as_the_poll() {
    let h = vfio_host();
    let addr = free_port();
    let cfg = Config {
        metrics_addr: Some(addr),
        poll_interval: Duration::from_secs(600),
        ..config(&h)
    };
    let plugin = start(cfg);
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "metrics never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for round in 0..50 {
        let node = h.dev.join(format!("vfio/burst{}", round % 5));
        let _ = fs::write(&node, b"");
        let _ = fs::remove_file(&node);
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = std::time::Instant::now() + WAIT;
    while scans_by(addr, "inotify") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no scan after the events"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        scans_by(addr, "poll"),
        0,
        "a scan the events started counted as the poll's"
    );
    plugin.stop().await;
}
