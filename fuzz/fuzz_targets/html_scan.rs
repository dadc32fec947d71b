//! The HTML tokenizer and sanitizer on arbitrary input: no panic, spans inside the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let doc = palisade_inspect::html::parse(&text);
    for s in &doc.segments {
        assert!(s.start <= s.end && s.end <= text.len());
    }
    let _ = palisade_inspect::html::strip_hidden(&text);
});
