//! Every sysfs write that changes the host goes through [`Kernel`], so that tests can run against
//! a kernel that reacts.
//!
//! On a real host ([`RealKernel`]) a write is a plain write to the sysfs attribute and Linux does
//! the rest. Tests swap in the simulated kernel of `crate::simulation` (cargo feature
//! `simulation`, never in a shipped build).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

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

    /// Load a kernel module (`modprobe -- MODULE`, from a checked path; a loaded one is kept).
    fn load_module(&self, module: &str) -> io::Result<()> {
        let modprobe = crate::tools::Tool {
            program: "modprobe",
            package: "kmod",
        }
        .find()
        .map_err(io::Error::other)?;
        let out = std::process::Command::new(modprobe)
            .args(["--", module])
            .stdin(std::process::Stdio::null())
            .output()?;
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
