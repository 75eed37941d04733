//! `attach`: to be written.
