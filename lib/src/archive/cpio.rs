//! Deterministic cpio (newc) writer and a reader for inspecting initrds. To be written.
