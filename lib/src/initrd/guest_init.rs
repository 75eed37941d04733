//! The guest init: `/init` of the base layer. It runs before anything else exists in the guest,
//! so it must be a static ELF executable for the guest's architecture; and a user who installed
//! the CLI must not need to know where it lives.

use std::fs;
use std::path::{Path, PathBuf};

use super::InitrdError;
use crate::outcome::{Classify, Outcome};
use crate::registry::Arch;

/// How the static guest init is built, for messages that have to say it.
pub const BUILD_HINT: &str = "build it with `RUSTFLAGS='-C target-feature=+crt-static' cargo build \
                              --release -p gpu-passthrough-init --target x86_64-unknown-linux-gnu` \
                              (or install with `scripts/install`)";

/// Where an installed guest init is looked for, in order: beside the running program (as
/// `cargo build` and `scripts/install` leave it), in `../libexec/gpu-passthrough/` relative to
/// it, then the system's libexec directories.
pub fn default_locations() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("gpu-init"));
        candidates.push(dir.join("../libexec/gpu-passthrough/gpu-init"));
    }
    candidates.push(PathBuf::from("/usr/local/libexec/gpu-passthrough/gpu-init"));
    candidates.push(PathBuf::from("/usr/libexec/gpu-passthrough/gpu-init"));
    candidates.push(PathBuf::from("/usr/lib/gpu-passthrough/gpu-init"));
    candidates
}

/// The first installed guest init of [`default_locations`].
pub fn find_installed() -> Result<PathBuf, InitrdError> {
    let candidates = default_locations();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| InitrdError::NoGuestInit {
            looked_in: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Read the guest init at `path` and check that it can run as the guest's `/init`.
pub(super) fn read_checked(path: &Path, arch: Arch) -> Result<Vec<u8>, InitrdError> {
    let bytes = fs::read(path).map_err(|source| InitrdError::GuestInit {
        path: path.to_owned(),
        source,
    })?;
    check(&bytes, arch).map_err(|why| InitrdError::GuestInitUnfit {
        path: path.to_owned(),
        why,
    })?;
    Ok(bytes)
}

/// Why a file cannot be the guest's `/init`.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    /// Not a 64-bit ELF file at all.
    #[error("not a 64-bit ELF executable")]
    NotElf(#[source] object::read::Error),
    /// An ELF for another machine.
    #[error("built for ELF machine {found}, the guest is {arch} ({expected})")]
    Machine {
        /// The file's `e_machine`.
        found: u16,
        /// The guest's architecture.
        arch: Arch,
        /// Its `e_machine`.
        expected: u16,
    },
    /// It names an ELF interpreter.
    #[error("dynamically linked (it names an ELF interpreter), but the initramfs has no libc")]
    Dynamic,
}

impl Classify for Unfit {
    fn outcome(&self) -> Outcome {
        match self {
            Unfit::NotElf(_) | Unfit::Machine { .. } | Unfit::Dynamic => Outcome::Failed,
        }
    }
}

/// The guest init runs before anything else exists in the guest: it must be a static ELF
/// executable for the guest's architecture.
fn check(bytes: &[u8], arch: Arch) -> Result<(), Unfit> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let header =
        object::elf::FileHeader64::<object::Endianness>::parse(bytes).map_err(Unfit::NotElf)?;
    let endian = header.endian().map_err(Unfit::NotElf)?;
    let machine = header.e_machine(endian).0;
    if machine != arch.elf_machine() {
        return Err(Unfit::Machine {
            found: machine,
            arch,
            expected: arch.elf_machine(),
        });
    }
    let phdrs = header
        .program_headers(endian, bytes)
        .map_err(Unfit::NotElf)?;
    if phdrs
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP)
    {
        return Err(Unfit::Dynamic);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal static x86_64 ELF header: no program headers, so no interpreter.
    fn static_elf(machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // 64-bit
        h[5] = 1; // little-endian
        h[6] = 1; // version
        h[16] = 2; // ET_EXEC
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[20] = 1;
        h[52] = 64; // e_ehsize
        h
    }

    #[test]
    fn guest_init_must_be_static_and_for_the_guest_arch() {
        assert!(check(&static_elf(62), Arch::X86_64).is_ok());
        let err = check(&static_elf(183), Arch::X86_64).unwrap_err();
        assert!(err.to_string().contains("machine 183"), "{err}");
        assert!(matches!(
            check(b"#!/bin/sh\n", Arch::X86_64),
            Err(Unfit::NotElf(_))
        ));
        // This test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(matches!(check(&me, Arch::X86_64), Err(Unfit::Dynamic)));
    }
}
