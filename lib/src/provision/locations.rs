//! Where the host's files are: the sysfs and devices roots, the state dir, the cache, and the
//! registry files. Every command takes them; the CLI derives its global flags from them.

use std::path::PathBuf;

use crate::attach::{Host, Owner, PidLiveness};
use crate::fabric::Fmpm;
use crate::paths;
use crate::registry::{Registry, RegistryError};

/// Where the host's files are: the sysfs and devices roots, the state dir, the cache, and the
/// registry files merged over the embedded default. Every default is [`paths`]'s.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Locations {
    /// Registry file merged over the embedded default; repeatable, later files win.
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "registry",
            value_name = "FILE",
            global = true,
            env = "GPU_PASSTHROUGH_REGISTRY",
            value_delimiter = ':'
        )
    )]
    pub registries: Vec<PathBuf>,
    /// Artifact and layer cache [default: $XDG_CACHE_HOME/gpu-passthrough, or
    /// /var/cache/gpu-passthrough for root].
    #[cfg_attr(
        feature = "cli",
        arg(
            long,
            value_name = "DIR",
            global = true,
            env = "GPU_PASSTHROUGH_CACHE_DIR"
        )
    )]
    pub cache_dir: Option<PathBuf>,
    /// Root of the sysfs tree to read and write (tests point this at a fake tree).
    #[cfg_attr(feature = "cli", arg(
        long, value_name = "DIR", global = true, default_value = paths::SYSFS_ROOT
    ))]
    pub sysfs_root: PathBuf,
    /// Where attachments and the bind journal are kept.
    #[cfg_attr(feature = "cli", arg(
        long, value_name = "DIR", global = true, default_value = paths::STATE_DIR
    ))]
    pub state_dir: PathBuf,
    /// Devices directory where `vfio/<group>` nodes appear (tests point this at a fake tree).
    #[cfg_attr(feature = "cli", arg(
        long, value_name = "DIR", global = true, default_value = paths::DEV_DIR
    ))]
    pub dev_dir: PathBuf,
    /// Shared-NVSwitch mode: NVIDIA's `fmpm` (Fabric-Manager-Client) at this path lists,
    /// activates and deactivates the fabric manager's partitions; GPUs then go to VMs in
    /// partitions and NVSwitches stay with the host.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "PATH", global = true, env = "GPU_PASSTHROUGH_FMPM")
    )]
    pub fmpm: Option<PathBuf>,
}

impl Default for Locations {
    fn default() -> Self {
        Locations {
            registries: Vec::new(),
            cache_dir: None,
            sysfs_root: paths::SYSFS_ROOT.into(),
            state_dir: paths::STATE_DIR.into(),
            dev_dir: paths::DEV_DIR.into(),
            fmpm: None,
        }
    }
}

impl Locations {
    /// The cache directory: the one given, or [`paths::default_cache_dir`].
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(paths::default_cache_dir)
    }

    /// The embedded registry with the registry files merged over it.
    pub fn registry(&self) -> Result<Registry, RegistryError> {
        Registry::load(&self.registries)
    }

    /// The host at these roots; owners in `gone` are declared gone, `pid:N` owners are judged
    /// by their process.
    pub fn host(&self, gone: Vec<Owner>) -> Host {
        let liveness = PidLiveness {
            gone,
            ..Default::default()
        };
        let host = Host::new(&self.sysfs_root, &self.state_dir, Box::new(liveness))
            .with_dev_dir(&self.dev_dir);
        match &self.fmpm {
            Some(program) => host.with_fabric_manager(Box::new(Fmpm::new(program))),
            None => host,
        }
    }
}
