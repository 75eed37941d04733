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
