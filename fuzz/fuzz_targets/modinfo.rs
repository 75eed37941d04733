//! The `.modinfo` parser over arbitrary bytes: never panics; what it returns is consistent.
#![no_main]

use gpu_passthrough::modinfo::ModInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = ModInfo::parse(data) {
        let _ = (info.name(), info.version(), info.vermagic(), info.elf_machine());
        if let (Some(release), Some(full)) = (info.vermagic_release(), info.vermagic()) {
            assert!(full.contains(release));
        }
        assert!(info.depends().iter().all(|d| !d.is_empty() && !d.contains(',')));
        assert_eq!(info.firmware().len(), info.all("firmware").len());
    }
    // The section parser alone, on the raw bytes.
    let info = ModInfo::from_section(data, 62);
    for (key, _) in info.entries() {
        assert!(!key.contains('\0'));
    }
});
