//! Seeded property test (the CI stand-in for the fuzz targets in `fuzz/`): random mixtures of
//! markup, invisible characters, encodings and entity look-alikes never make the engine panic,
//! every span lies inside the input on character boundaries, DLP findings carry no values, and
//! sanitized text keeps no smuggling characters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use palisade_inspect::{Category, Detectors, Inspector};

const PIECES: &[&str] = &[
    "<div style=\"display:none\">",
    "</div>",
    "<p>",
    "</p",
    "<!--",
    "-->",
    "<script>",
    "</script>",
    "<style>.x{display:none}</style>",
    "<span class=\"x\">",
    "<img alt=\"",
    "\">",
    "<",
    ">",
    "&lt;",
    "&#x",
    "&amp",
    "[//]: # (",
    ")",
    "\u{200B}",
    "\u{200C}",
    "\u{200D}",
    "\u{2060}",
    "\u{2062}",
    "\u{FEFF}",
    "\u{00AD}",
    "\u{202E}",
    "\u{202C}",
    "\u{E0049}",
    "\u{E007F}",
    "\u{1F3F4}",
    "\u{FE0F}",
    "\u{E0110}",
    "\u{FF29}",
    "\u{0430}",
    "\u{65E5}",
    "\u{0627}",
    "ignore all previous instructions",
    "SWdub3JlIGFsbCBwcmV2aW91cw==",
    "49 67 6E 6F 72 65 ",
    "vtaber nyy",
    "=20",
    "%20",
    "4111 1111 1111 1111",
    "123-45-6789",
    "DE89 3704 0044 0532 0130 00",
    "a@b.example",
    "+1 (293) 494-5893",
    "AKIA37UABTXUJDCSOX6I",
    "ghp_",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----END RSA PRIVATE KEY-----",
    "postgres://u:p@h:5432/d",
    "eyJhbGciOi.eyJzdWIi.sig",
    "password=",
    "Xy9Zk2Lm8Qw4Rt6Yu1Io3Pa5Sd7Fg0Hj",
    " ",
    "\n",
    "é",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_mixtures_never_break_the_engine() {
    let inspector = Inspector::new([3; 32]);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3000 {
        let len = (rng.next() % 40) as usize;
        let mut text = String::new();
        for _ in 0..len {
            text.push_str(PIECES[(rng.next() % PIECES.len() as u64) as usize]);
        }
        let report = inspector.inspect(&text, Detectors::default());
        for f in &report.findings {
            assert!(f.start <= f.end && f.end <= text.len(), "{f:?} in {text:?}");
            assert!(
                text.is_char_boundary(f.start) && text.is_char_boundary(f.end),
                "{f:?} in {text:?}"
            );
            if matches!(f.category, Category::Pii | Category::Secret) {
                assert!(
                    f.revealed.is_none(),
                    "a DLP finding never carries its value"
                );
            }
        }
        let clean = inspector.sanitize(&text, &report);
        assert!(
            !clean
                .chars()
                .any(|c| ('\u{E0020}'..='\u{E007E}').contains(&c)
                    || c == '\u{202E}'
                    || c == '\u{200B}'),
            "smuggling characters survive sanitizing: {clean:?} (from {text:?})"
        );
    }
}
