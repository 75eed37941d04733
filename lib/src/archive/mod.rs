//! `archive`: reading tar artifacts safely; writing and reading deterministic cpio (newc) initrds.

pub mod compress;
pub mod cpio;
