//! `pci`: to be written.
