//! The hidden-Unicode detectors and stripper on arbitrary input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_inspect::{Detectors, Inspector};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let inspector = Inspector::new([0; 32]);
    let report = inspector.inspect(&text, Detectors { injection: true, dlp: false });
    for f in &report.findings {
        assert!(f.start <= f.end && f.end <= text.len());
    }
    let clean = palisade_inspect::unicode::strip_invisible(&text);
    assert!(!clean.chars().any(|c| ('\u{E0020}'..='\u{E007E}').contains(&c)));
});
