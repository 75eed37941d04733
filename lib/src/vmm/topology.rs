//! Where the VM's devices sit on its PCI tree, so that NCCL in the guest reads the host's
//! topology: GPUs behind a PCIe expander bridge (`pxb-pcie`) per host NUMA node, each device
//! behind a root port of its own, and a GPU with the NIC that shares its host PCIe switch
//! behind one guest switch (`x3130-upstream` + `xio3130-downstream`).
//!
//! The flat layout (every device on the root bus, slots from 0x10) stays whenever it says as
//! much: all devices on one NUMA node (or none known) and no GPU+NIC pair. Otherwise every
//! device goes behind an expander, whose root bus number QEMU fixes (`bus_nr`), so the guest
//! address of each device is known before boot: firmware (OVMF, SeaBIOS) numbers the buses
//! below a root bus depth-first in slot order, each root port and switch port taking the next
//! number, which is what [`place`] computes. The expanders' buses start at 0x80 (32 each), so
//! that the platform's own root ports on `pcie.0` (one per virtio device, as libvirt lays them
//! out) keep buses 1–0x7f; a layout that would not fit stays flat.
//!
//! `numa_node=` on an expander needs that guest NUMA node (`-numa node,nodeid=K`), which the
//! platform defines: guest node K stands for the K-th host node among the devices, and the spec
//! says so in a warning. Cloud Hypervisor has no PCIe switches to emulate: its devices stay on
//! segment 0 at their flat slots (its `--pci-segment` with `--numa pci_segments=` could carry
//! NUMA affinity; not rendered), said in its warnings.

use serde::{Deserialize, Serialize};

use crate::pci::PciAddress;

/// What placement needs to know of one device handed to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlaceInput {
    /// The host device (none for an mdev).
    pub host: Option<PciAddress>,
    /// Its host NUMA node.
    pub numa_node: Option<u32>,
    /// The upstream port of the host PCIe switch it sits behind.
    pub host_switch: Option<PciAddress>,
    /// A GPU.
    pub gpu: bool,
    /// A network controller (a ConnectX NIC beside its GPU).
    pub nic: bool,
}

/// Where one device sits in the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The host device (none for an mdev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<PciAddress>,
    /// Its guest PCI address under QEMU (bus and slot).
    pub guest: PciAddress,
    /// Its guest address under Cloud Hypervisor, where it differs (flat: root bus slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_hypervisor: Option<PciAddress>,
    /// Its host NUMA node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// The guest NUMA node its expander declares (`numa_node=`), when the devices span
    /// several host nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_numa_node: Option<u32>,
    /// The QEMU id of its expander bridge (`pxb0`), none on the flat layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expander: Option<String>,
    /// The QEMU id of the guest switch it sits behind with the devices of its host switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// The QEMU id of the port it is plugged into (`bus=`), none on the flat layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

/// Every device's placement and the bridges QEMU needs for them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// Per input device, in order (none beyond the root bus's slots on the flat layout).
    pub placements: Vec<Option<Placement>>,
    /// `-device` arguments of the expanders, root ports and switches, before the devices.
    pub qemu_bridges: Vec<String>,
    /// The host NUMA node each guest NUMA node stands for (empty: no `numa_node=` used).
    pub guest_numa_nodes: Vec<u32>,
}

impl Topology {
    /// Whether the devices sit behind expanders (not the flat layout).
    pub fn expanded(&self) -> bool {
        !self.qemu_bridges.is_empty()
    }
}

/// The first expander's root bus, and the buses each expander has for what sits below it.
const FIRST_EXPANDER_BUS: u8 = 0x80;
const BUSES_PER_EXPANDER: u8 = 0x20;
const MAX_EXPANDERS: usize = 4;

/// A flat guest address: root bus slot.
fn root_slot(slot: u8) -> PciAddress {
    PciAddress {
        domain: 0,
        bus: 0,
        device: slot,
        function: 0,
    }
}

/// The placement of `devices` (in the boot spec's order) on the VM's PCI tree; `slots` are the
/// root bus's slots the flat layout hands out in order.
pub fn place(devices: &[PlaceInput], slots: &[u8]) -> Topology {
    let flat = || Topology {
        placements: devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                slots.get(i).map(|s| Placement {
                    host: d.host,
                    guest: root_slot(*s),
                    cloud_hypervisor: None,
                    numa_node: d.numa_node,
                    guest_numa_node: None,
                    expander: None,
                    switch: None,
                    port: None,
                })
            })
            .collect(),
        ..Default::default()
    };
    let mut nodes: Vec<u32> = devices.iter().filter_map(|d| d.numa_node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    // Host switches with a GPU and a NIC both handed over: one guest switch each.
    let paired = |sw: PciAddress| {
        let on =
            |f: fn(&PlaceInput) -> bool| devices.iter().any(|d| d.host_switch == Some(sw) && f(d));
        on(|d| d.gpu) && on(|d| d.nic)
    };
    let pairs: Vec<PciAddress> = {
        let mut s: Vec<PciAddress> = devices
            .iter()
            .filter_map(|d| d.host_switch)
            .filter(|s| paired(*s))
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    if nodes.len() < 2 && pairs.is_empty() {
        return flat();
    }
    // One expander per NUMA node (unknown last), each at a root bus slot after the devices'.
    let mut keys: Vec<Option<u32>> = devices.iter().map(|d| d.numa_node).collect();
    keys.sort_by_key(|k| (k.is_none(), *k));
    keys.dedup();
    if keys.len() > MAX_EXPANDERS || slots.len() < devices.len() + keys.len() {
        return flat();
    }
    let numa = nodes.len() >= 2;
    let mut placements: Vec<Option<Placement>> = vec![None; devices.len()];
    let mut bridges = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        let bus_nr = FIRST_EXPANDER_BUS + BUSES_PER_EXPANDER * k as u8;
        let pxb = format!("pxb{k}");
        let guest_node = key
            .filter(|_| numa)
            .and_then(|n| nodes.iter().position(|x| *x == n))
            .map(|p| p as u32);
        let mut arg = format!(
            "pxb-pcie,id={pxb},bus_nr={bus_nr},bus=pcie.0,addr={:#04x}",
            slots[devices.len() + k]
        );
        if let Some(g) = guest_node {
            arg.push_str(&format!(",numa_node={g}"));
        }
        bridges.push(arg);
        // Units behind a root port each: a device, or a host switch's pair as a guest switch.
        let mut units: Vec<Vec<usize>> = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            if d.numa_node != *key {
                continue;
            }
            match d.host_switch.filter(|s| pairs.contains(s)) {
                Some(sw) => {
                    if !units
                        .iter()
                        .flatten()
                        .any(|j| devices[*j].host_switch == Some(sw))
                    {
                        units.push(
                            (0..devices.len())
                                .filter(|j| {
                                    devices[*j].host_switch == Some(sw)
                                        && devices[*j].numa_node == *key
                                })
                                .collect(),
                        );
                    }
                }
                None => units.push(vec![i]),
            }
        }
        // Depth-first, slot order: the bus numbers the firmware gives.
        let mut next_bus = u32::from(bus_nr) + 1;
        for (j, unit) in units.iter().enumerate() {
            let rp = format!("{pxb}rp{j}");
            bridges.push(format!(
                "pcie-root-port,id={rp},bus={pxb},chassis={bus_nr},slot={j},addr={j:#04x}"
            ));
            let rp_bus = next_bus;
            next_bus += 1;
            let mut put = |i: usize, bus: u32, port: &str, switch: Option<&str>| {
                placements[i] = Some(Placement {
                    host: devices[i].host,
                    guest: PciAddress {
                        domain: 0,
                        bus: bus as u8,
                        device: 0,
                        function: 0,
                    },
                    cloud_hypervisor: slots.get(i).map(|s| root_slot(*s)),
                    numa_node: devices[i].numa_node,
                    guest_numa_node: guest_node,
                    expander: Some(pxb.clone()),
                    switch: switch.map(str::to_owned),
                    port: Some(port.to_owned()),
                });
            };
            if unit.len() == 1 {
                put(unit[0], rp_bus, &rp, None);
                continue;
            }
            let sw = format!("{pxb}sw{j}");
            bridges.push(format!("x3130-upstream,id={sw},bus={rp}"));
            // The upstream port's secondary bus holds the downstream ports.
            next_bus += 1;
            for (m, &i) in unit.iter().enumerate() {
                let down = format!("{sw}d{m}");
                // A chassis of its own per switch (QEMU refuses a chassis/slot pair twice):
                // the expander's root ports use chassis `bus_nr`, its switches the next ones.
                bridges.push(format!(
                    "xio3130-downstream,id={down},bus={sw},chassis={},slot={m},addr={m:#04x}",
                    u32::from(bus_nr) + 1 + j as u32
                ));
                put(i, next_bus, &down, Some(&sw));
                next_bus += 1;
            }
        }
        if next_bus > u32::from(bus_nr) + u32::from(BUSES_PER_EXPANDER) {
            return flat();
        }
    }
    Topology {
        placements,
        qemu_bridges: bridges,
        guest_numa_nodes: if numa { nodes } else { Vec::new() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(host: &str, numa: u32, switch: &str, gpu: bool) -> PlaceInput {
        PlaceInput {
            host: Some(host.parse().unwrap()),
            numa_node: Some(numa),
            host_switch: Some(switch.parse().unwrap()),
            gpu,
            nic: !gpu,
        }
    }

    const SLOTS: [u8; 6] = [0x10, 0x11, 0x12, 0x13, 0x14, 0x15];

    #[test]
    fn one_node_without_pairs_stays_flat() {
        let t = place(
            &[
                dev("0000:1b:00.0", 0, "0000:16:00.0", true),
                dev("0000:43:00.0", 0, "0000:3e:00.0", true),
            ],
            &SLOTS,
        );
        assert!(!t.expanded());
        assert_eq!(
            t.placements[1].as_ref().unwrap().guest.to_string(),
            "0000:00:11.0"
        );
    }

    #[test]
    fn buses_are_numbered_depth_first_below_each_expander() {
        let t = place(
            &[
                dev("0000:1b:00.0", 0, "0000:16:00.0", true),
                dev("0000:18:00.0", 0, "0000:16:00.0", false),
                dev("0000:9d:00.0", 1, "0000:98:00.0", true),
            ],
            &SLOTS,
        );
        assert!(t.expanded());
        assert_eq!(t.guest_numa_nodes, [0, 1]);
        let g: Vec<String> = t
            .placements
            .iter()
            .map(|p| p.as_ref().unwrap().guest.to_string())
            .collect();
        // pxb0 (bus 0x80): root port -> 0x81, upstream -> 0x82, downstream ports -> 0x83, 0x84.
        // pxb1 (bus 0xa0): root port -> 0xa1.
        assert_eq!(g, ["0000:83:00.0", "0000:84:00.0", "0000:a1:00.0"]);
        assert_eq!(
            t.qemu_bridges[0],
            "pxb-pcie,id=pxb0,bus_nr=128,bus=pcie.0,addr=0x13,numa_node=0"
        );
        let p = t.placements[1].as_ref().unwrap();
        assert_eq!(p.switch.as_deref(), Some("pxb0sw0"));
        assert_eq!(p.cloud_hypervisor.unwrap().to_string(), "0000:00:11.0");
    }
}
