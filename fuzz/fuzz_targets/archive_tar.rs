//! The tar walker over arbitrary (possibly compressed) bytes: it must never panic, and every
//! entry it accepts must have a safe path and a relative symlink target.
#![no_main]

use std::path::{Component, Path};

use gpu_passthrough::archive::tar::{EntryKind, Limits, walk_tar_stream};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits keep each run fast and exercise the limit paths.
    let limits = Limits {
        max_entry_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        max_entries: 1000,
    };
    let _ = walk_tar_stream(data, Path::new("fuzz.tar"), &limits, &mut |entry, contents| {
        assert!(!entry.path.as_os_str().is_empty());
        assert!(
            entry.path.components().all(|c| matches!(c, Component::Normal(_))),
            "unsafe path {:?}",
            entry.path
        );
        assert_eq!(entry.mode & !0o777, 0, "special mode bits kept");
        match &entry.kind {
            EntryKind::Symlink { target } => assert!(target.is_relative()),
            EntryKind::File { size } => {
                let mut n = 0u64;
                let mut buf = [0u8; 4096];
                while let Ok(got) = contents.read(&mut buf) {
                    if got == 0 {
                        break;
                    }
                    n += got as u64;
                }
                assert!(n <= *size, "read {n} bytes from an entry of {size}");
            }
            EntryKind::Directory => {}
        }
        Ok(())
    });
});
