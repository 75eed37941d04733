//! `initrd`: to be written.
