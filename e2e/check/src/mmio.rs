//! Run M: the 64-bit MMIO window the library computes for terabyte BARs, as QEMU and the guest
//! kernel take it (no device needed: QEMU sizes the window from the argument alone).

use gpu_passthrough::vmm::{BootSpec, MmioWindow};

use crate::checks::Checks;
use crate::console::Console;

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
}
