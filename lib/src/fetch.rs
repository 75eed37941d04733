//! `fetch`: to be written.
