//! The 64-bit MMIO window a VM needs for its devices' BARs (terabytes on an HGX board), and the
//! guest physical address bits that window takes.
//!
//! The window holds the sum of the passed devices' 64-bit prefetchable BARs plus
//! [`VMM_OVERHEAD`] for the VMM's own devices, in whole GiB, and starts aligned to the largest
//! BAR: OVMF places it at the first multiple of the largest power of two not above its size
//! (`PlatformInitLib`), which is at least the largest BAR, and its PCI bus driver places BARs
//! largest first, so power-of-two BARs fill the window without gaps. With the guest's RAM
//! ending below that alignment, the window ends below `alignment + window`: that bound gives
//! the address bits (a guest with more RAM than the alignment needs one bit more). Devices
//! each behind a guest root port of their own (the expander layout of [`super::topology`])
//! need each device's share rounded up to its own largest BAR, since a bridge's window is
//! aligned to the largest BAR below it ([`MmioWindow::for_ports`]).

use serde::{Deserialize, Serialize};

/// Room for the VMM's own 64-bit BARs (virtio devices, hotplug reservations of root ports).
pub const VMM_OVERHEAD: u64 = 1 << 30;

/// What the window is sized from, and what it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioWindow {
    /// Sum of the passed devices' 64-bit prefetchable BARs.
    pub bar_bytes: u64,
    /// The largest of those BARs.
    pub largest_bar: u64,
    /// The 64-bit MMIO window the VM needs, bytes (a whole number of GiB).
    pub window_bytes: u64,
    /// The guest physical address bits the window takes.
    pub guest_phys_bits: u8,
}

impl MmioWindow {
    /// The window for these BAR sizes (bytes; zero sizes ignored); `None` when there are none.
    pub fn for_bars(bars: impl IntoIterator<Item = u64>) -> Option<MmioWindow> {
        let sizes: Vec<u64> = bars.into_iter().filter(|s| *s > 0).collect();
        let largest = *sizes.iter().max()?;
        let sum = sizes.iter().fold(0u64, |a, s| a.saturating_add(*s));
        let gib = 1u64 << 30;
        let window = round_up(sum.saturating_add(VMM_OVERHEAD), gib);
        // OVMF aligns the window to the largest power of two not above its size (never below
        // the largest BAR, which fits in the window).
        let alignment = (1u64 << (63 - window.leading_zeros())).max(largest);
        let top = alignment.saturating_add(window);
        let bits = 64 - (top - 1).leading_zeros();
        Some(MmioWindow {
            bar_bytes: sum,
            largest_bar: largest,
            window_bytes: window,
            guest_phys_bits: bits as u8,
        })
    }

    /// [`MmioWindow::for_bars`] for devices each behind a guest root port of its own (each
    /// item: one device's BAR sizes): each takes the sum of its BARs rounded up to its largest
    /// (an H200's 256 GiB + 32 MiB takes 512 GiB); `bar_bytes` and `largest_bar` stay the
    /// BARs' own.
    pub fn for_ports(devices: impl IntoIterator<Item = Vec<u64>>) -> Option<MmioWindow> {
        let devices: Vec<Vec<u64>> = devices
            .into_iter()
            .map(|b| b.into_iter().filter(|s| *s > 0).collect::<Vec<u64>>())
            .filter(|b| !b.is_empty())
            .collect();
        let sum = |b: &[u64]| b.iter().fold(0u64, |a, s| a.saturating_add(*s));
        let shares = devices
            .iter()
            .map(|b| round_up(sum(b), b.iter().copied().max().unwrap_or(1)));
        let mut w = MmioWindow::for_bars(shares)?;
        w.bar_bytes = devices.iter().fold(0u64, |a, b| a.saturating_add(sum(b)));
        w.largest_bar = devices.iter().flatten().copied().max().unwrap_or(0);
        Some(w)
    }

    /// The window in MiB, as OVMF's `X-PciMmio64Mb` takes it.
    pub fn window_mib(&self) -> u64 {
        self.window_bytes >> 20
    }

    /// The window in GiB, as QEMU's `pci-hole64-size` is given.
    pub fn window_gib(&self) -> u64 {
        self.window_bytes >> 30
    }
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

/// The host CPU's physical address bits, from `/proc/cpuinfo`'s first `address sizes` line
/// (`address sizes : 46 bits physical, 57 bits virtual`).
pub fn host_phys_bits(cpuinfo: &str) -> Option<u8> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("address sizes"))?
        .split_once(':')?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_h200s_get_a_window_that_holds_them() {
        // Eight H200: BAR1 256 GiB and BAR3 32 MiB each, both 64-bit prefetchable.
        let bars = (0..8).flat_map(|_| [256u64 << 30, 32 << 20]);
        let w = MmioWindow::for_bars(bars).unwrap();
        assert_eq!(w.bar_bytes, (2048u64 << 30) + (256 << 20));
        assert_eq!(w.largest_bar, 256 << 30);
        assert!(w.window_bytes >= w.bar_bytes + VMM_OVERHEAD);
        assert!(w.window_bytes - w.bar_bytes - VMM_OVERHEAD < 1 << 30);
        // Aligned at 2 TiB, 2050 GiB long: ends just above 4 TiB.
        assert_eq!(w.window_gib(), 2050);
        assert_eq!(w.guest_phys_bits, 43);
    }

    #[test]
    fn one_small_gpu_needs_few_bits_and_no_devices_no_window() {
        // A 16 GiB BAR and a 32 MiB one: an 18 GiB window at 16 GiB ends at 34 GiB.
        let w = MmioWindow::for_bars([16u64 << 30, 32 << 20]).unwrap();
        assert_eq!(w.window_gib(), 18);
        assert_eq!(w.window_mib(), 18 * 1024);
        assert_eq!(w.guest_phys_bits, 36);
        // One 256 GiB BAR: a 257 GiB window at 256 GiB ends at 513 GiB.
        assert_eq!(
            MmioWindow::for_bars([256u64 << 30])
                .unwrap()
                .guest_phys_bits,
            40
        );
        assert!(MmioWindow::for_bars([0u64]).is_none());
    }

    #[test]
    fn cpuinfo_address_sizes_are_read() {
        let text =
            "processor\t: 0\nflags\t\t: fpu\naddress sizes\t: 46 bits physical, 57 bits virtual\n";
        assert_eq!(host_phys_bits(text), Some(46));
        assert_eq!(host_phys_bits("processor : 0\n"), None);
    }

    #[test]
    fn behind_root_ports_each_device_takes_its_bars_rounded_to_the_largest() {
        let h200 = vec![256u64 << 30, 32 << 20];
        let flat = MmioWindow::for_bars(h200.iter().copied().cycle().take(16)).unwrap();
        let ports = MmioWindow::for_ports(std::iter::repeat_n(h200, 8)).unwrap();
        assert_eq!(
            ports.bar_bytes, flat.bar_bytes,
            "the BARs' own sum either way"
        );
        assert_eq!(ports.largest_bar, 256 << 30);
        // 8 × 512 GiB of bridge windows, plus the VMM's own GiB.
        assert_eq!(ports.window_bytes, (8 * (512u64 << 30)) + (1 << 30));
        assert!(ports.window_bytes > flat.window_bytes);
        assert_eq!(MmioWindow::for_ports(Vec::<Vec<u64>>::new()), None);
    }
}
