//! Which GPUs and NVSwitches form one NVLink baseboard (an HGX board), from what sysfs shows.
//!
//! The rule: NVSwitches behind one upstream PCIe port (the board's management switch; on an
//! HGX H100/H200 the four NVSwitches share it and its IOMMU group) are one baseboard, named by
//! that port's address; NVSwitches straight on a root bus form one baseboard per PCI domain.
//! Its GPUs are the NVIDIA display controllers of the same PCI domain that are not SR-IOV
//! virtual functions. Limits: sysfs shows no NVLink wiring, so a domain with two switch
//! groups (two boards, e.g. HGX-2) leaves its GPUs unassigned, and a PCIe NVIDIA GPU that
//! sits beside a board in its domain is counted as the board's. The NVIDIA driver (`nvidia-smi
//! nvlink`) or the fabric manager would tell; neither is loaded when the board is passed through.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DeviceKind, PciAddress, PciDevice, PciError, Sysfs};

/// One NVLink baseboard: its NVSwitches and the GPUs counted as its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseboard {
    /// Its name: the address of the NVSwitches' upstream PCIe port, or `domain-DDDD` when they
    /// sit on a root bus.
    pub id: String,
    /// The NVSwitches, sorted.
    pub nvswitches: Vec<PciAddress>,
    /// The GPUs, sorted (empty when the rule cannot tell; see the module docs).
    pub gpus: Vec<PciAddress>,
}

impl Baseboard {
    /// Every device of the board, GPUs first.
    pub fn members(&self) -> Vec<PciAddress> {
        self.gpus
            .iter()
            .chain(self.nvswitches.iter())
            .copied()
            .collect()
    }
}

impl Sysfs {
    /// The host's NVLink baseboards, by the rule in the module docs (none without NVSwitches).
    pub fn baseboards(&self) -> Result<Vec<Baseboard>, PciError> {
        Ok(baseboards_of(self, &self.devices()?))
    }

    /// The baseboard `address` (a GPU or an NVSwitch) belongs to.
    pub fn baseboard_of(&self, address: PciAddress) -> Result<Option<Baseboard>, PciError> {
        Ok(self
            .baseboards()?
            .into_iter()
            .find(|b| b.members().contains(&address)))
    }
}

/// [`Sysfs::baseboards`] over devices already read.
pub(crate) fn baseboards_of(sysfs: &Sysfs, devices: &[PciDevice]) -> Vec<Baseboard> {
    let mut boards: BTreeMap<String, Baseboard> = BTreeMap::new();
    for d in devices.iter().filter(|d| d.kind == DeviceKind::NvSwitch) {
        let id = sysfs
            .upstream_switch(d.address)
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .unwrap_or_else(|| format!("domain-{:04x}", d.address.domain));
        boards
            .entry(id.clone())
            .or_insert_with(|| Baseboard {
                id,
                nvswitches: Vec::new(),
                gpus: Vec::new(),
            })
            .nvswitches
            .push(d.address);
    }
    let mut per_domain: BTreeMap<u16, usize> = BTreeMap::new();
    for b in boards.values() {
        *per_domain.entry(b.nvswitches[0].domain).or_default() += 1;
    }
    for b in boards.values_mut() {
        let domain = b.nvswitches[0].domain;
        if per_domain.get(&domain) != Some(&1) {
            continue;
        }
        b.gpus = devices
            .iter()
            .filter(|d| d.is_nvidia_gpu() && d.physfn.is_none() && d.address.domain == domain)
            .map(|d| d.address)
            .collect();
        b.nvswitches.sort();
        b.gpus.sort();
    }
    boards.into_values().collect()
}
