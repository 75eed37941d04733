//! NVIDIA persistence mode, per GPU, through `nvidia-smi`: off before a GPU leaves `nvidia`,
//! back on when it returns.
//!
//! A wedged GPU (Xid 79, fallen off the bus) hangs `nvidia-smi`; attach runs it under the
//! journal lock, so it runs with a time limit ([`super::Host::with_command_timeout`]) and is
//! killed past it: the caller gets [`AttachError::CommandTimeout`] naming the device, and every
//! other host operation goes on.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{Aftermath, AttachError};
use crate::pci::PciAddress;
use crate::tools::{RunError, run_bounded};

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
    match run_bounded(Command::new(smi).args(args), limit) {
        Ok(output) if output.status.success() => Ok(true),
        Ok(output) => {
            tracing::warn!("{} -i {address} -pm: exit {}", smi.display(), output.status);
            Ok(false)
        }
        Err(RunError::Start { source, .. }) => {
            tracing::warn!("{} -i {address} -pm: {source}", smi.display());
            Ok(false)
        }
        Err(RunError::TimedOut { .. }) => Err(AttachError::CommandTimeout {
            device,
            command: format!("{} {}", smi.display(), args.join(" ")),
            after: limit,
            aftermath: Aftermath::KeptInJournal,
        }),
    }
}
