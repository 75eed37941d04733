//! `registry`: to be written.
