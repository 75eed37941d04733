//! Every sysfs write that changes the host goes through [`Kernel`], so that tests can run against
//! a kernel that reacts.
//!
//! On a real host ([`RealKernel`]) a write is a plain write to the sysfs attribute and Linux does
//! the rest. Tests swap in the simulated kernel of `crate::simulation` (cargo feature
//! `simulation`, never in a shipped build).

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use crate::tools::{Tool, run_bounded};

/// `modprobe`, which loads a device's VFIO variant driver.
pub const MODPROBE: Tool = Tool {
    program: "modprobe",
    package: "kmod",
};

/// How long loading one module may take before `modprobe` is taken as hung and killed.
pub const MODPROBE_LIMIT: Duration = Duration::from_secs(60);

/// Where sysfs attribute writes go.
pub trait Kernel: Send + Sync {
    /// Write `value` to the attribute at `path`, as `echo -n value > path` would.
    fn write_attr(&self, path: &Path, value: &str) -> io::Result<()>;

    /// Whether this is the simulation (no processes are run, no real devices touched).
    fn is_simulated(&self) -> bool {
        false
    }

    /// The running kernel's `modules.alias` (`/lib/modules/$(uname -r)/modules.alias`), where
    /// VFIO variant drivers are found ([`crate::pci::variant`]); empty when there is none.
    fn modules_alias(&self) -> io::Result<String> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
        let path = Path::new("/lib/modules")
            .join(release.trim())
            .join("modules.alias");
        match fs::read_to_string(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            other => other,
        }
    }

    /// Load a kernel module (`modprobe -- MODULE`, from a checked path, killed past
    /// [`MODPROBE_LIMIT`]; a loaded one is kept).
    fn load_module(&self, module: &str) -> io::Result<()> {
        let modprobe = MODPROBE.find().map_err(io::Error::other)?;
        let out = run_bounded(
            std::process::Command::new(modprobe).args(["--", module]),
            MODPROBE_LIMIT,
        )
        .map_err(io::Error::other)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "modprobe {module}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// The real kernel: a single write to the attribute file.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealKernel;

impl Kernel for RealKernel {
    fn write_attr(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
}
