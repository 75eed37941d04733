//! The registry parser over arbitrary text: never panics; errors are errors, not aborts.
#![no_main]

use gpu_passthrough::registry::Registry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Registry::parse(text, "fuzz.toml");
    }
});
