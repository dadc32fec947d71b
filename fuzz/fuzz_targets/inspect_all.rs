//! The whole engine (every detector, then sanitizing) on arbitrary input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_inspect::{Detectors, Inspector};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let inspector = Inspector::new([0; 32]);
    let report = inspector.inspect(&text, Detectors::default());
    let _ = inspector.sanitize(&text, &report);
});
