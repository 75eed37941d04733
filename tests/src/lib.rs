//! Shared test support: fixtures lookup, a loopback HTTP mirror, fake sysfs trees.

pub mod fixtures;
pub mod http;
pub mod kubelet;
pub mod python;
pub mod sysfs;
