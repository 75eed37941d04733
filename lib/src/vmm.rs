//! `vmm`: to be written.
