//! The guest init must run in an initramfs with no libc: build it the documented way and check
//! that it is static (no ELF interpreter, no needed shared libraries).

mod common;

use common::build_static;
use std::process::Command;

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes([b[o], b[o + 1]]) as usize
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// (has PT_INTERP, number of DT_NEEDED entries) of a little-endian ELF64 file.
fn dynamic_needs(elf: &[u8]) -> (bool, usize) {
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELF64");
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 0x20) as usize,
        u16_at(elf, 0x36),
        u16_at(elf, 0x38),
    );
    let mut interp = false;
    let mut needed = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap());
        match p_type {
            3 => interp = true, // PT_INTERP
            2 => {
                // PT_DYNAMIC: count DT_NEEDED (tag 1) entries.
                let (off, size) = (u64_at(elf, ph + 8) as usize, u64_at(elf, ph + 32) as usize);
                needed += elf[off..off + size]
                    .chunks_exact(16)
                    .filter(|e| u64_at(e, 0) == 1)
                    .count();
            }
            _ => {}
        }
    }
    (interp, needed)
}

#[test]
fn the_release_binary_is_static_and_small() {
    let bin = build_static();
    let elf = std::fs::read(&bin).unwrap();
    assert_eq!(
        dynamic_needs(&elf),
        (false, 0),
        "{} must be statically linked",
        bin.display()
    );
    let file = Command::new("file").arg(&bin).output().unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "file(1) says: {file}"
    );
    assert!(elf.len() < 4 << 20, "gpu-init grew to {} bytes", elf.len());
}

#[test]
fn a_dynamic_binary_is_told_apart() {
    // The checker itself must be able to fail: the test binary is dynamically linked.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let (interp, needed) = dynamic_needs(&me);
    assert!(interp && needed > 0);
}
