//! `modinfo`: to be written.
