//! NVIDIA persistence mode, per GPU, through `nvidia-smi`: off before a GPU leaves `nvidia`,
//! back on when it returns.

use std::process::Command;

use super::guard::{NVIDIA_SMI_PATHS, find_nvidia_smi};

/// Turn an NVIDIA GPU's persistence mode off (or back on) with `nvidia-smi -i ADDR -pm 0|1`,
/// affecting only that GPU; nvidia-persistenced itself is never stopped. Returns whether
/// nvidia-smi succeeded (absent nvidia-smi: false, the unbind then tells if the GPU is held).
pub(super) fn persistence(address: &str, on: bool) -> bool {
    let Some(smi) = find_nvidia_smi(NVIDIA_SMI_PATHS) else {
        return false;
    };
    let status = Command::new(smi)
        .args(["-i", address, "-pm", if on { "1" } else { "0" }])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            tracing::warn!("nvidia-smi -i {address} -pm: exit {s}");
            false
        }
        Err(_) => false,
    }
}
