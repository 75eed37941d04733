//! `archive`: to be written.
