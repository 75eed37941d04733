//! Waiting for the VFIO node a VMM opens after a bind or a vGPU creation.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Aftermath, AttachError, Host};
use crate::pci::PciAddress;

impl Host {
    /// The node a VMM opens for `device` in `group`: `/dev/vfio/<group>`, or on a kernel with
    /// iommufd and no legacy group interface, the device's `/dev/vfio/devices/vfioX`.
    pub(super) fn present_node(&self, group: u32, device: Option<PciAddress>) -> Option<PathBuf> {
        let node = self.dev_dir.join("vfio").join(group.to_string());
        if node.exists() {
            return Some(node);
        }
        device
            .into_iter()
            .flat_map(|d| self.vfio_cdevs(d))
            .find(|c| c.exists())
    }

    pub(super) fn wait_node(
        &self,
        group: u32,
        device: Option<PciAddress>,
    ) -> Result<PathBuf, AttachError> {
        let start = Instant::now();
        loop {
            if let Some(node) = self.present_node(group, device) {
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
