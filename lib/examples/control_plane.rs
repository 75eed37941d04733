//! How a control plane embeds the library: ensure the initrd for a release, attach N GPUs for an
//! instance, hand the Cloud Hypervisor config to the VMM, detach when the instance stops.
//!
//! ```text
//! cargo run --example control_plane -- SYSFS_ROOT STATE_DIR DEV_DIR GPUS [RELEASE GUEST_INIT CACHE_DIR]
//! ```
//! On a real host: `/sys /var/lib/gpu-passthrough /dev 1`. Without RELEASE the initrd step is
//! skipped (building one downloads the release's artifacts).

use std::path::PathBuf;

use gpu_passthrough::attach::{AttachRequest, Host, Liveness, Owner, OwnerLiveness, PlanRequest};
use gpu_passthrough::fetch::{FetchOptions, Fetcher, NoProgress};
use gpu_passthrough::initrd::{BuildOptions, InitrdBuilder};
use gpu_passthrough::registry::{Arch, Registry};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(
            "usage: control_plane SYSFS_ROOT STATE_DIR DEV_DIR GPUS [RELEASE GUEST_INIT CACHE_DIR]"
                .into(),
        );
    }
    let gpus: usize = args[3].parse()?;
    let instance = Owner::new("instance-0001")?;

    // 1. The initrd the instance boots: the release's combined layer, built once and cached.
    let initrd = match (args.get(4), args.get(5), args.get(6)) {
        (Some(release), Some(guest_init), Some(cache)) => {
            let registry = Registry::load(&[])?;
            let release = registry.release(release)?;
            let cache = PathBuf::from(cache);
            let fetcher = Fetcher::new(&cache, FetchOptions::default())?;
            let options =
                BuildOptions::new(Arch::host().ok_or("unsupported architecture")?, guest_init);
            let layers =
                InitrdBuilder::new(&cache, &fetcher).ensure(release, &options, &NoProgress)?;
            Some(layers.combined.path)
        }
        _ => None,
    };

    // 2. Attach N GPUs for the instance; repair what an earlier crash left first.
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
    let spec = host.attach(&AttachRequest {
        plan: PlanRequest {
            gpus: Some(gpus),
            ..Default::default()
        },
        owner: instance.clone(),
        initrd,
    })?;

    // 3. What the VMM gets: Cloud Hypervisor's VmConfig.devices and the kernel command line.
    let config = serde_json::json!({
        "devices": spec.cloud_hypervisor.vm_config_devices,
        "payload": {
            "cmdline": format!("console=ttyS0 {}", spec.kernel_cmdline.join(" ")),
            "initramfs": spec.initrd,
        },
    });
    println!("{}", serde_json::to_string_pretty(&config)?);

    // 4. The instance stopped: give the GPUs back.
    let detached = host.detach(&instance)?;
    eprintln!("detached {} devices", detached.restored.len());
    Ok(())
}
