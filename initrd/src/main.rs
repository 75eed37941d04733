//! `gpu-init`: the guest init. To be written.
fn main() {}
