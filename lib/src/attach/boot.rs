//! The VM's boot spec from the devices an attach handed over: GPUs first, and one P2P clique
//! when asked or when the GPUs share a PCIe switch.

use std::path::PathBuf;

use super::Host;
use crate::health::GuestDevice;
use crate::owner::Owner;
use crate::pci::PciAddress;
use crate::vmm::{BootDevice, BootSpec};

impl Host {
    pub(super) fn boot_spec(
        &self,
        owner: &Owner,
        mut boot: Vec<BootDevice>,
        held: Vec<PciAddress>,
        initrd: Option<PathBuf>,
        p2p_asked: bool,
    ) -> BootSpec {
        boot.sort_by_key(|b| !b.gpu);
        let gpus: Vec<PciAddress> = boot
            .iter()
            .filter(|b| b.gpu)
            .filter_map(|b| b.address)
            .collect();
        let clique = p2p_asked || self.sysfs.share_pcie_switch(&gpus);
        BootSpec::render(owner.as_str(), boot, held, initrd, clique)
    }
}

impl BootSpec {
    /// Where the VM sees each device, as the journal keeps it for `health ingest`.
    pub(super) fn guest_map(&self) -> Vec<GuestDevice> {
        // Both VMMs' addresses where they differ: the VM runs under one of them, and the other's
        // addresses (root bus) never collide with QEMU's expander buses.
        self.guest_addresses
            .iter()
            .flat_map(|g| {
                std::iter::once(g.guest)
                    .chain(g.cloud_hypervisor)
                    .map(|guest| GuestDevice {
                        guest,
                        host: g.host,
                        mdev: g.mdev.clone(),
                    })
            })
            .collect()
    }
}
