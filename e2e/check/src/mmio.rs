//! Run M: the 64-bit MMIO window the library computes for terabyte BARs, as QEMU and the guest
//! kernel take it (no device needed: QEMU sizes the window from the argument alone), and the
//! guest PCI topology the boot spec renders for an HGX-like VM: one GPU per BAR, half on each
//! host NUMA node, each behind a host switch of its own, the first with a NIC beside it. A
//! `virtio-rng-pci` stands in for each `vfio-pci` at the bus and address the spec gives it, so
//! the guest shows whether each device sits where the spec says it will.

use std::path::PathBuf;

use gpu_passthrough::pci::PciAddress;
use gpu_passthrough::vmm::{BootDevice, BootSpec, MmioWindow};

use crate::checks::Checks;
use crate::console::Console;

/// The boot spec for one GPU per BAR in `bars` (and a NIC beside the first), with its window.
fn spec(bars: &[u64]) -> anyhow::Result<(MmioWindow, BootSpec)> {
    let window = MmioWindow::for_ports(bars.iter().map(|b| vec![*b]))
        .ok_or_else(|| anyhow::anyhow!("no BAR sizes given"))?;
    let addr = |bus: u8| PciAddress {
        domain: 0,
        bus,
        device: 0,
        function: 0,
    };
    let device = |bus: u8, numa: u32, switch: u8, gpu: bool, bar: u64| BootDevice {
        address: Some(addr(bus)),
        mdev_uuid: None,
        sysfs_path: PathBuf::from(format!("/sys/bus/pci/devices/{}", addr(bus))),
        iommu_group: Some(u32::from(bus)),
        vfio_device: PathBuf::from(format!("/dev/vfio/{bus}")),
        gpu,
        vgpu: false,
        bar64_bytes: bar,
        vfio: None,
        numa_node: Some(numa),
        host_switch: Some(addr(switch)),
        nic: !gpu,
    };
    let half = bars.len().div_ceil(2);
    let mut devices: Vec<BootDevice> = bars
        .iter()
        .enumerate()
        .map(|(i, b)| {
            device(
                0x10 + 8 * i as u8,
                u32::from(i >= half),
                0x0c + 8 * i as u8,
                true,
                *b,
            )
        })
        .collect();
    devices.push(device(0x0e, 0, 0x0c, false, 0));
    let spec = BootSpec::new("e2e-mmio", devices, Vec::new(), None).with_mmio(Some(window));
    Ok((window, spec))
}

/// The window for `bars` and the QEMU arguments the boot spec renders for it: the guest
/// address bits and the window's bytes on the first line, then one argument per line.
pub fn args(bars: &[u64]) -> anyhow::Result<()> {
    let window = MmioWindow::for_bars(bars.iter().copied())
        .ok_or_else(|| anyhow::anyhow!("no BAR sizes given"))?;
    let spec = BootSpec::new("e2e-mmio", Vec::new(), Vec::new(), None).with_mmio(Some(window));
    println!("{} {}", window.guest_phys_bits, window.window_bytes);
    for a in &spec.qemu.args {
        println!("{a}");
    }
    Ok(())
}

/// [`args`] for the HGX-like VM of [`spec`], each `vfio-pci` device replaced by its stand-in.
pub fn placement_args(bars: &[u64]) -> anyhow::Result<()> {
    let (window, spec) = spec(bars)?;
    println!("{} {}", window.guest_phys_bits, window.window_bytes);
    for a in &spec.qemu.args {
        match a.strip_prefix("vfio-pci,host=") {
            Some(rest) => println!(
                "virtio-rng-pci,{}",
                rest.split_once(',').map_or("", |(_, r)| r)
            ),
            None => println!("{a}"),
        }
    }
    Ok(())
}

/// The guest lists its PCI devices (`PCIDEV <address> <vendor> <numa_node>` lines): each
/// stand-in is at the guest address the spec placed its device at, on its guest NUMA node.
pub fn placement(console: &Console, bars: &[u64]) -> anyhow::Result<Checks> {
    let (_, spec) = spec(bars)?;
    let mut c = Checks::default();
    let seen: Vec<Vec<String>> = console
        .lines
        .iter()
        .filter_map(|l| {
            let rest = l.split_once("PCIDEV ")?.1;
            Some(rest.split_whitespace().map(str::to_owned).collect())
        })
        .collect();
    let mut at_place = 0;
    for p in &spec.placement {
        let want = p.guest.to_string();
        let node = p.guest_numa_node.map_or("-1".to_owned(), |n| n.to_string());
        let ok = seen
            .iter()
            .any(|f| f.len() >= 3 && f[0] == want && f[1] == "0x1af4" && f[2] == node);
        c.check(
            format!(
                "{} is at {want} on guest NUMA node {node} ({}{})",
                p.host.map(|h| h.to_string()).unwrap_or_default(),
                p.expander.as_deref().unwrap_or("root bus"),
                p.switch
                    .as_deref()
                    .map(|s| format!(", switch {s}"))
                    .unwrap_or_default()
            ),
            ok,
            || format!("the guest lists {seen:?}"),
        );
        at_place += usize::from(ok);
    }
    c.check(
        "the spec placed the devices behind expander bridges",
        spec.placement.iter().all(|p| p.expander.is_some()) && !spec.placement.is_empty(),
        || format!("{:?}", spec.placement),
    );
    c.figure(
        "run M devices at their computed guest addresses",
        at_place as u64,
    );
    Ok(c)
}

/// The guest booted with the window: its root bus shows a 64-bit window of at least
/// `window_bytes` (the kernel's `root bus resource` lines, from QEMU's ACPI `_CRS`).
pub fn guest(console: &Console, window_bytes: u64, boot_rc: i32) -> Checks {
    let mut c = Checks::default();
    c.check(
        "QEMU accepted the computed pci-hole64-size and the guest reached its init",
        console.text.contains("E2E-M done"),
        || format!("qemu exit {boot_rc}; no `E2E-M done` on the console"),
    );
    let largest = console
        .lines
        .iter()
        .filter(|l| l.contains("root bus resource [mem "))
        .filter_map(|l| window_of(l))
        .max();
    c.check(
        "the guest's root bus has a 64-bit MMIO window that holds the BARs",
        largest.is_some_and(|w| w >= window_bytes),
        || {
            format!(
                "largest root bus window {largest:?} bytes, wanted {window_bytes}; lines: {:?}",
                console
                    .lines
                    .iter()
                    .filter(|l| l.contains("root bus resource"))
                    .collect::<Vec<_>>()
            )
        },
    );
    if let Some(w) = largest {
        c.figure("run M guest root bus 64-bit window (GiB)", w >> 30);
    }
    c
}

/// The size of `[mem 0xSTART-0xEND ...]` in a kernel line.
fn window_of(line: &str) -> Option<u64> {
    let rest = line.split_once("[mem 0x")?.1;
    let (start, rest) = rest.split_once("-0x")?;
    let end: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    let (start, end) = (
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(&end, 16).ok()?,
    );
    (end > start).then(|| end - start + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_bus_windows_are_read_from_kernel_lines() {
        let log = "1.0 pci_bus 0000:00: root bus resource [mem 0x000a0000-0x000bffff window]\n\
                   1.1 pci_bus 0000:00: root bus resource [mem 0x100000000-0x201ffffffff window]\n\
                   2.0 E2E-M done\n";
        let c = guest(&Console::parse(log), 2049 << 30, 0);
        assert_eq!(c.failed(), 0, "{:?}", c.lines());
        let c = guest(&Console::parse(log), 4096 << 30, 0);
        assert_eq!(c.failed(), 1, "{:?}", c.lines());
    }

    #[test]
    fn placement_wants_each_stand_in_at_its_address_and_node() {
        let bars = [256u64 << 30, 256 << 30];
        let (_, spec) = spec(&bars).unwrap();
        let mut log: String = spec
            .placement
            .iter()
            .map(|p| {
                format!(
                    "1.0 PCIDEV {} 0x1af4 {}\n",
                    p.guest,
                    p.guest_numa_node.unwrap()
                )
            })
            .collect();
        let c = placement(&Console::parse(&log), &bars).unwrap();
        assert_eq!(c.failed(), 0, "{:?}", c.lines());
        log = log.replacen(" 0x1af4 0", " 0x1af4 1", 1);
        let c = placement(&Console::parse(&log), &bars).unwrap();
        assert_eq!(c.failed(), 1, "a device on the wrong node: {:?}", c.lines());
    }
}
