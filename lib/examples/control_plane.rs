//! How a control plane embeds the library: attach N GPUs for an instance booting a registry
//! release (its layers are ensured before any device moves), hand the Cloud Hypervisor config to
//! the VMM, detach when the instance stops.
//!
//! ```text
//! cargo run --example control_plane -- SYSFS_ROOT STATE_DIR DEV_DIR GPUS [RELEASE GUEST_INIT CACHE_DIR [REGISTRY]]
//! ```
//! On a real host: `/sys /var/lib/gpu-passthrough /dev 1`. Without RELEASE the VM gets no
//! initrd from us (building one downloads the release's artifacts). GPUS may instead be
//! `vgpu:PROFILE` (e.g. `vgpu:L40S-4Q`): one vGPU of that profile, placed on the least-used GPU.

use std::path::PathBuf;

use gpu_passthrough::attach::{Host, Liveness, Owner, OwnerLiveness, PlanRequest};
use gpu_passthrough::fetch::NoProgress;
use gpu_passthrough::provision::{Provisioner, VmDevices, VmRequest};
use gpu_passthrough::registry::Registry;
use gpu_passthrough::vgpu::PlaceRequest;

/// The control plane knows which instances exist; here: only the one we run.
struct Instances(Vec<String>);

impl OwnerLiveness for Instances {
    fn is_alive(&self, owner: &Owner) -> Liveness {
        if self.0.iter().any(|i| i == owner.as_str()) {
            Liveness::Alive
        } else {
            Liveness::Gone
        }
    }
}

/// One instance's life: attach, the VMM's config, detach. Returns the config.
fn run(args: &[String]) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    if args.len() < 4 {
        return Err(
            "usage: control_plane SYSFS_ROOT STATE_DIR DEV_DIR GPUS [RELEASE GUEST_INIT CACHE_DIR [REGISTRY]]"
                .into(),
        );
    }
    let vgpu = args[3].strip_prefix("vgpu:").map(str::to_owned);
    let gpus: usize = if vgpu.is_some() { 0 } else { args[3].parse()? };
    let instance = Owner::new("instance-0001")?;
    let registries: Vec<PathBuf> = args.get(7).map(PathBuf::from).into_iter().collect();
    let registry = Registry::load(&registries)?;
    let cache = args
        .get(6)
        .map(PathBuf::from)
        .unwrap_or_else(gpu_passthrough::paths::default_cache_dir);

    // 1. The host, with our own idea of which owners are alive; repair what a crash left first.
    let host = Host::new(
        &args[0],
        &args[1],
        Box::new(Instances(vec![instance.to_string()])),
    )
    .with_dev_dir(&args[2]);
    let repaired = host.reconcile()?;
    eprintln!(
        "reconcile: {} rolled back, {} released",
        repaired.rolled_back.len(),
        repaired.released.len()
    );

    // 2. Attach N GPUs for the instance. With a release, its layers are built or found in the
    //    cache first, and the GPUs are checked against that release's driver.
    let mut provisioner = Provisioner::new(&host, &registry, cache);
    if let Some(guest_init) = args.get(5) {
        provisioner = provisioner.with_guest_init(guest_init);
    }
    //    A vGPU instead: the release must carry the vGPU guest driver for this host's manager.
    let devices = match vgpu {
        Some(profile) => VmDevices::Vgpus(PlaceRequest {
            profile,
            count: 1,
            numa: None,
            pack: false,
        }),
        None => VmDevices::Gpus(PlanRequest {
            gpus: Some(gpus),
            ..Default::default()
        }),
    };
    let request = VmRequest {
        devices,
        owner: instance.clone(),
        release: args.get(4).cloned(),
        initrd: None,
        disk: Default::default(),
    };
    let spec = provisioner.attach_vm(request, &NoProgress)?;

    // 3. What the VMM gets: Cloud Hypervisor's VmConfig.devices and the kernel command line.
    let config = serde_json::json!({
        "devices": spec.cloud_hypervisor.vm_config_devices,
        "payload": {
            "cmdline": format!("console=ttyS0 {}", spec.kernel_cmdline.join(" ")),
            "initramfs": spec.initrd,
        },
    });

    // 4. The instance stopped (SIGTERM first for a vGPU VM): give the GPUs back.
    let detached = host.detach(&instance)?;
    eprintln!(
        "detached {} devices, {} vGPUs",
        detached.restored.len(),
        detached.released_vgpus.len()
    );
    Ok(config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = run(&args)?;
    println!("{}", serde_json::to_string_pretty(&config)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_passthrough_tests::{fixtures, sysfs};

    fn args(h: &sysfs::FakeHost, rest: &[&str]) -> Vec<String> {
        [&h.sys, &h.state, &h.dev]
            .iter()
            .map(|p| p.display().to_string())
            .chain(rest.iter().map(|s| s.to_string()))
            .collect()
    }

    #[test]
    fn attaches_and_detaches_two_gpus() {
        let h = sysfs::server_8gpu();
        let config = run(&args(&h, &["2"])).unwrap();
        assert_eq!(config["devices"].as_array().unwrap().len(), 2);
        // Two GPUs of an NVSwitch board without its NVSwitches: NVLink is turned off in the guest.
        let cmdline = config["payload"]["cmdline"].as_str().unwrap();
        assert!(
            cmdline.ends_with("HAS_GPU=1 nvidia.NVreg_NvLinkDisable=1"),
            "{cmdline}"
        );
        assert!(h.journal_clean());
        assert_eq!(h.driver("0000:18:00.0").as_deref(), Some("nvidia"));
    }

    #[test]
    fn attaches_and_releases_one_vgpu() {
        let h = sysfs::l40s_host();
        let config = run(&args(&h, &["vgpu:L40S-4Q"])).unwrap();
        let devices = config["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 1);
        let vf = h.sys.join("bus/pci/devices/0000:61:00.4");
        assert_eq!(devices[0]["path"], format!("{}/", vf.display()));
        assert!(h.journal_clean());
        assert_eq!(h.vgpu_type("0000:61:00.4"), "0", "released at the end");
        assert_eq!(h.driver("0000:61:00.4").as_deref(), Some("nvidia"));
    }

    #[test]
    fn a_release_that_cannot_be_built_moves_no_device() {
        let h = sysfs::server_8gpu();
        let dir = tempfile::tempdir().unwrap();
        // Unpinned artifacts are refused before any device is touched.
        let registry = fixtures::write_registry(
            dir.path(),
            "fx",
            fixtures::KERNEL_VERSION,
            &fixtures::gpu_artifacts(),
            false,
        );
        let init = fixtures::guest_init_stand_in(dir.path());
        let cache = dir.path().join("cache");
        let err = run(&args(
            &h,
            &[
                "1",
                "fx",
                init.to_str().unwrap(),
                cache.to_str().unwrap(),
                registry.to_str().unwrap(),
            ],
        ))
        .unwrap_err();
        assert!(err.to_string().contains("no device was moved"), "{err}");
        assert!(h.journal_clean());
        assert_eq!(h.driver("0000:18:00.0").as_deref(), Some("nvidia"));
    }
}
