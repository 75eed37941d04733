//! NVIDIA persistence mode, per GPU, through `nvidia-smi`: off before a GPU leaves `nvidia`,
//! back on when it returns.
//!
//! A wedged GPU (Xid 79, fallen off the bus) hangs `nvidia-smi`; attach runs it under the
//! journal lock, so it runs with a time limit ([`super::Host::with_command_timeout`]) and is
//! killed past it: the caller gets [`AttachError::CommandTimeout`] naming the device, and every
//! other host operation goes on.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Aftermath, AttachError};
use crate::pci::PciAddress;

/// How often a running command is polled for its exit.
const POLL: Duration = Duration::from_millis(20);

/// Turn an NVIDIA GPU's persistence mode off (or back on) with `smi -i ADDR -pm 0|1`,
/// affecting only that GPU; nvidia-persistenced itself is never stopped. Returns whether
/// nvidia-smi succeeded; a run past `limit` is killed and is an error naming the device.
pub(super) fn persistence(
    smi: &Path,
    device: PciAddress,
    on: bool,
    limit: Duration,
) -> Result<bool, AttachError> {
    let address = device.to_string();
    let args = ["-i", address.as_str(), "-pm", if on { "1" } else { "0" }];
    let Ok(mut child) = Command::new(smi)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Ok(false);
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(true),
            Ok(Some(s)) => {
                tracing::warn!("{} -i {address} -pm: exit {s}", smi.display());
                return Ok(false);
            }
            Ok(None) if start.elapsed() < limit => std::thread::sleep(POLL),
            Err(e) => {
                tracing::warn!("{} -i {address} -pm: {e}", smi.display());
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            Ok(None) => {
                // Killed and reaped, so no zombie outlives the call.
                let _ = child.kill();
                let _ = child.wait();
                return Err(AttachError::CommandTimeout {
                    device,
                    command: format!("{} {}", smi.display(), args.join(" ")),
                    after: limit,
                    aftermath: Aftermath::KeptInJournal,
                });
            }
        }
    }
}
