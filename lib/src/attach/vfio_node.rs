//! Waiting for the VFIO node a VMM opens after a bind or a vGPU creation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Aftermath, AttachError, Host};
use crate::pci::PciAddress;

impl Host {
    /// The node a VMM opens for `device` in `group` ([`crate::vfio::present_node`]).
    pub(super) fn present_node(&self, group: u32, device: PciAddress) -> Option<PathBuf> {
        crate::vfio::present_node(&self.sysfs.device_dir(device), &self.dev_dir, group)
    }

    /// Wait for the node of the device (a PCI function, a VF or an mdev) at `sysfs_device`.
    pub(super) fn wait_node(
        &self,
        group: u32,
        sysfs_device: &Path,
    ) -> Result<PathBuf, AttachError> {
        let start = Instant::now();
        loop {
            if let Some(node) = crate::vfio::present_node(sysfs_device, &self.dev_dir, group) {
                return Ok(node);
            }
            if start.elapsed() >= self.vfio_wait {
                return Err(AttachError::NoVfioNode {
                    node: self.dev_dir.join("vfio").join(group.to_string()),
                    group,
                    waited: self.vfio_wait,
                    aftermath: Aftermath::KeptInJournal,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
