//! Content inspection: prompt injection in what agents read, data leaks in what they send.
//!
//! One pure engine (no I/O, no async, no clock) used by the HTTP and MCP gateways on responses
//! (untrusted input to an agent) and requests (egress from an agent), by the audit pipeline on
//! reasoning traces, and by `palisade scan`. [`Inspector::inspect`] runs every detector over a
//! text and returns a [`Report`]; [`Inspector::sanitize`] returns the text with hidden content
//! removed and secrets masked.
//!
//! Detectors, each reporting detector, byte span, severity and score:
//! - [`unicode`]: hidden Unicode (TAG smuggling, variation-selector smuggling, zero-width binary,
//!   invisible operators, interleaving, bidi overrides, homoglyph and full-width obfuscation),
//!   with legitimate uses (emoji ZWJ, flags, ZWNJ, RTL marks, BOM) left alone;
//! - [`html`]: hidden HTML and Markdown content, extracted and judged;
//! - [`encoded`]: base64, base32, hex, ROT13, URL and quoted-printable payloads, decoded and
//!   judged;
//! - [`instruct`]: instruction-like text (override phrasing, role-tag spoofing, exfiltration
//!   lures) and the [`classifier`] score;
//! - [`dlp`]: PII and secrets, with validation (Luhn, mod-97, checksums) and decoy rules.
//!
//! **Architecture Invariant:** no finding carries a secret or PII value: DLP findings hold the
//! span, the type and a keyed hash ([`Inspector::fingerprint`]), never the text.
//! **Architecture Invariant:** every detector's work is linear in its input, and decoded or
//! extracted text is bounded ([`MAX_DECODED`]), so no input can make a scan explode.

pub mod classifier;
pub mod dlp;
pub mod encoded;
pub mod eval;
pub mod html;
pub mod instruct;
mod props;
pub mod unicode;

use palisade_core::principal::Classification;
use serde::Serialize;
use sha2::Sha256;

/// Most bytes of decoded or extracted text judged per scan (hidden HTML text, decoded payloads).
pub const MAX_DECODED: usize = 256 * 1024;

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Text that tries to instruct the agent (prompt injection).
    Injection,
    /// Content hidden from a human reader that does not instruct (reported for context).
    Hidden,
    /// Personal data.
    Pii,
    /// A credential or key.
    Secret,
    /// Bulk data on its way out (large encoded blobs).
    ExfilIndicator,
}

impl Category {
    /// The name used in reports, configs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injection => "injection",
            Self::Hidden => "hidden",
            Self::Pii => "pii",
            Self::Secret => "secret",
            Self::ExfilIndicator => "exfil_indicator",
        }
    }
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth recording.
    Info,
    /// Suspicious.
    Low,
    /// Likely an attack or a leak.
    Medium,
    /// An attack technique or a live secret.
    High,
}

/// One thing a detector found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finding {
    /// Which detector, e.g. `unicode.tags`, `html.display_none`, `dlp.credit_card`.
    pub detector: &'static str,
    /// What it is about.
    pub category: Category,
    /// For DLP: the entity type (`CREDIT_CARD`, `AWS_ACCESS_KEY_ID`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<&'static str>,
    /// Byte offsets in the inspected text.
    pub start: usize,
    /// End (exclusive).
    pub end: usize,
    /// How bad.
    pub severity: Severity,
    /// Confidence, 0 to 1.
    pub score: f32,
    /// For injections: what the hidden or decoded text says (bounded, never a secret). Absent
    /// for DLP findings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revealed: Option<String>,
}

/// Everything found in one text.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Findings, in span order.
    pub findings: Vec<Finding>,
    /// Whether the text carries a prompt injection (any injection finding).
    pub injection: bool,
    /// The highest injection score.
    pub injection_score: f32,
    /// The lowest tier the findings allow: a secret makes the text Restricted, PII Confidential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<Classification>,
}

impl Report {
    fn finish(mut self) -> Self {
        self.findings
            .sort_by(|a, b| (a.start, a.end, a.detector).cmp(&(b.start, b.end, b.detector)));
        self.findings
            .dedup_by(|b, a| a.start == b.start && a.end == b.end && a.detector == b.detector);
        self.injection_score = self
            .findings
            .iter()
            .filter(|f| f.category == Category::Injection)
            .map(|f| f.score)
            .fold(0.0, f32::max);
        self.injection = self
            .findings
            .iter()
            .any(|f| f.category == Category::Injection);
        self.tier = self
            .findings
            .iter()
            .filter_map(|f| match f.category {
                Category::Secret => Some(Classification::Restricted),
                Category::Pii | Category::ExfilIndicator => Some(Classification::Confidential),
                _ => None,
            })
            .max_by_key(|c| c.rank());
        self
    }

    /// Whether any finding is of `category`.
    pub fn has(&self, category: Category) -> bool {
        self.findings.iter().any(|f| f.category == category)
    }
}

/// Which detectors run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detectors {
    /// Prompt injection (Unicode, hidden HTML, encoded payloads, instruction-like text).
    pub injection: bool,
    /// PII and secrets.
    pub dlp: bool,
}

impl Default for Detectors {
    fn default() -> Self {
        Self {
            injection: true,
            dlp: true,
        }
    }
}

/// The inspection engine: detectors compiled once, shared by every request.
pub struct Inspector {
    instruct: instruct::Judge,
    dlp: dlp::Scanner,
    key: [u8; 32],
}

impl Inspector {
    /// An engine with the built-in model; `key` keys the fingerprints of DLP findings (so an
    /// analyst can correlate equal values without reading them).
    pub fn new(key: [u8; 32]) -> Self {
        Self::with_model(key, classifier::Model::builtin())
    }

    /// An engine with a given classifier model (training and cross-validation use this).
    pub fn with_model(key: [u8; 32], model: classifier::Model) -> Self {
        Self {
            instruct: instruct::Judge::new(model),
            dlp: dlp::Scanner::new(),
            key,
        }
    }

    /// Sets the classifier thresholds (0 to 1) for visible and for hidden or decoded text;
    /// higher is stricter (fewer false alarms, fewer catches).
    pub fn with_thresholds(mut self, visible: f32, hidden: f32) -> Self {
        self.instruct.visible_threshold = visible.clamp(0.0, 1.0);
        self.instruct.hidden_threshold = hidden.clamp(0.0, 1.0);
        self
    }

    /// Runs the detectors over `text`.
    pub fn inspect(&self, text: &str, detectors: Detectors) -> Report {
        let mut report = Report::default();
        if detectors.injection {
            self.injection(text, &mut report.findings);
        }
        if detectors.dlp {
            self.dlp.scan(text, &mut report.findings);
        }
        // INVARIANT (spans-in-bounds): every span lies inside the text, on character
        // boundaries (spans mapped back from decoded or normalised text can only be
        // approximate; they are widened to whole characters).
        for f in &mut report.findings {
            let mut start = f.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = f.end.clamp(start, text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            f.start = start;
            f.end = end;
        }
        report.finish()
    }

    fn injection(&self, text: &str, out: &mut Vec<Finding>) {
        let mut budget = MAX_DECODED;
        unicode::scan(text, &self.instruct, &mut budget, out);
        let visible = html::scan(text, &self.instruct, &mut budget, out);
        encoded::scan(text, &self.instruct, &mut budget, out);
        match visible {
            // An HTML document: judge what a reader sees, mapped back to source offsets.
            Some(doc) => {
                let mut found = Vec::new();
                self.instruct.scan_page(&doc.visible, &mut found);
                for mut f in found {
                    f.start = doc.source_offset(f.start).min(text.len());
                    f.end = doc
                        .source_offset(f.end.saturating_sub(1))
                        .saturating_add(1)
                        .min(text.len());
                    out.push(f);
                }
            }
            None => self.instruct.scan_visible(text, out),
        }
    }

    /// The text with hidden Unicode removed, hidden HTML and comments dropped and secrets and
    /// PII masked, guided by `report` (from [`Inspector::inspect`] of the same text).
    pub fn sanitize(&self, text: &str, report: &Report) -> String {
        self.sanitize_with(
            text,
            report,
            &[Category::Secret, Category::Pii, Category::ExfilIndicator],
            true,
        )
    }

    /// Like [`Inspector::sanitize`], masking only the `mask` categories, and stripping hidden
    /// content and neutralising markup lures (role tags, fake tool calls, exfiltration images)
    /// only when `strip_hidden` is set.
    pub fn sanitize_with(
        &self,
        text: &str,
        report: &Report,
        mask_categories: &[Category],
        strip_hidden: bool,
    ) -> String {
        let masked = mask(text, report, mask_categories, strip_hidden);
        if !strip_hidden {
            return masked;
        }
        let visible = html::strip_hidden(&masked);
        unicode::strip_invisible(&visible)
    }

    /// A keyed fingerprint of a value (HMAC-SHA-256, first 16 bytes in hex): equal values
    /// give equal fingerprints, and without the key nothing can be learnt from one.
    pub fn fingerprint(&self, value: &str) -> String {
        use hmac::Mac;
        let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(value.as_bytes());
        mac.finalize().into_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Detectors whose span is markup aimed at the agent, removed when sanitizing.
const LURES: &[&str] = &[
    "instruct.role_tag",
    "instruct.fake_tool_call",
    "instruct.exfil_lure",
];

/// Replaces the span of every finding of `categories` with `[REDACTED:<TYPE>]`, and with
/// `lures` every markup lure with `[removed: <detector>]`.
fn mask(text: &str, report: &Report, categories: &[Category], lures: bool) -> String {
    let mut spans: Vec<(usize, usize, &str)> = report
        .findings
        .iter()
        .filter(|f| categories.contains(&f.category) || (lures && LURES.contains(&f.detector)))
        .map(|f| {
            let label = match f.entity {
                Some(e) => e,
                None => f.detector,
            };
            (f.start, f.end, label)
        })
        .collect();
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end, entity) in spans {
        if start < at || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
            continue;
        }
        out.push_str(text.get(at..start).unwrap_or(""));
        if entity.starts_with("instruct.") {
            out.push_str("[removed: ");
            out.push_str(entity);
            out.push(']');
        } else {
            out.push_str("[REDACTED:");
            out.push_str(entity);
            out.push(']');
        }
        at = end;
    }
    out.push_str(text.get(at..).unwrap_or(""));
    out
}

/// At most `max` bytes of `text`, cut at a character boundary.
pub(crate) fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Maximal runs of at least `min` bytes for which `class` holds, found without looking at
/// every byte (the idea of Boyer-Moore's skip): a long run starting at `pos` must hold the byte
/// `min - 1` ahead, so when that byte is outside the class the search jumps past it; when it is
/// inside, the search walks back to the last outside byte before it (not into bytes already
/// known to be inside) and jumps there. Only a window of `min` inside bytes is walked forward
/// to its end.
pub(crate) fn long_runs<'a>(
    bytes: &'a [u8],
    class: &'a [bool; 256],
    min: usize,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let min = min.max(1);
    let inside = move |i: usize| bytes.get(i).is_some_and(|b| class[usize::from(*b)]);
    let mut pos = 0usize;
    // Bytes in `pos..known` are known to be inside the class.
    let mut known = 0usize;
    std::iter::from_fn(move || {
        while pos + min <= bytes.len() {
            let probe = pos + min - 1;
            if !inside(probe) {
                pos = probe + 1;
                continue;
            }
            let floor = known.max(pos);
            let mut start = probe;
            while start > floor && inside(start - 1) {
                start -= 1;
            }
            if start > floor {
                // The byte before `start` is outside: no long run starts before it.
                known = probe + 1;
                pos = start;
                continue;
            }
            // `pos..=probe` is inside: a run of at least `min` bytes. Forward to its end.
            let start = pos;
            let mut end = probe + 1;
            while inside(end) {
                end += 1;
            }
            // (`pos` always follows an outside byte, so the run is maximal; checked anyway.)
            let maximal = start == 0 || !inside(start - 1);
            pos = end + 1;
            known = 0;
            if maximal {
                return Some((start, end));
            }
        }
        None
    })
}

/// The first position at or after a given one that `find` reports, remembered: asked again
/// from a later position at or before the last answer, it answers without a search (so a
/// search per `![` does not run to the text's end each time).
pub(crate) struct NextFound<F: Fn(&[u8]) -> Option<usize>> {
    find: F,
    /// The last search: where it started and what it found.
    last: Option<(usize, Option<usize>)>,
}

impl<F: Fn(&[u8]) -> Option<usize>> NextFound<F> {
    pub(crate) fn new(find: F) -> Self {
        Self { find, last: None }
    }

    pub(crate) fn at_or_after(&mut self, bytes: &[u8], from: usize) -> Option<usize> {
        match self.last {
            Some((searched, found)) if searched <= from && found.is_none_or(|f| f >= from) => found,
            _ => {
                let found = (self.find)(bytes.get(from..).unwrap_or_default()).map(|i| from + i);
                self.last = Some((from, found));
                found
            }
        }
    }
}

/// The first `needle` in `hay`. Where the next one is usually a few bytes away (the next `<`
/// or quote in markup, the next `&` in a short text chunk), a call into `memchr` costs more
/// than it saves: the first 16 bytes are looked at directly.
#[inline]
pub(crate) fn find_byte(needle: u8, hay: &[u8]) -> Option<usize> {
    const NEAR: usize = 16;
    match hay.get(..NEAR) {
        Some(near) => near
            .iter()
            .position(|b| *b == needle)
            .or_else(|| memchr::memchr(needle, hay.get(NEAR..)?).map(|i| i + NEAR)),
        None => hay.iter().position(|b| *b == needle),
    }
}

/// Whether `c` is in General Punctuation (U+2000 to U+206F: typographic spaces, dashes,
/// quotes, bullets, format characters), where no character is a letter or a digit or has a
/// lower case: a quick answer for the most common non-ASCII characters of English text, which
/// the Unicode tables answer by search.
#[inline]
pub(crate) fn is_general_punctuation(c: char) -> bool {
    matches!(u32::from(c), 0x2000..=0x206F)
}

/// The index of the first non-ASCII byte at or after `from` (32, then eight bytes at a time), or the
/// length of `bytes`.
pub(crate) fn next_non_ascii(bytes: &[u8], from: usize) -> usize {
    let mut i = from;
    // Long ASCII stretches 32 bytes at a time (the standard library's check), then eight.
    while bytes.get(i..i + 32).is_some_and(<[u8]>::is_ascii) {
        i += 32;
    }
    while let Some(chunk) = bytes
        .get(i..i + 8)
        .and_then(|c| <[u8; 8]>::try_from(c).ok())
    {
        if u64::from_le_bytes(chunk) & 0x8080_8080_8080_8080 != 0 {
            break;
        }
        i += 8;
    }
    bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|b| !b.is_ascii()))
        .map_or(bytes.len(), |o| i + o)
}

/// The index of the first ASCII digit at or after `from`, eight bytes at a time (SWAR: a byte
/// is a digit when adding 0x50 sets its high bit and adding 0x46 does not, on bytes with the
/// high bit cleared so no carry crosses bytes).
pub(crate) fn next_digit(bytes: &[u8], from: usize) -> Option<usize> {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let digits_of = |chunk: &[u8]| {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let low = w & LOW;
        let at_least_0 = low.wrapping_add(0x5050_5050_5050_5050);
        let above_9 = low.wrapping_add(0x4646_4646_4646_4646);
        at_least_0 & !above_9 & !w & HIGH
    };
    let mut i = from;
    // 32 bytes a step while none is a digit (one branch instead of four), then eight.
    while let Some(block) = bytes.get(i..i + 32) {
        let any = block.chunks_exact(8).fold(0, |acc, c| acc | digits_of(c));
        if any != 0 {
            break;
        }
        i += 32;
    }
    while let Some(chunk) = bytes.get(i..i + 8) {
        let digits = digits_of(chunk);
        if digits != 0 {
            return Some(i + (digits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(u8::is_ascii_digit))
        .map(|o| i + o)
}

/// A byte class as a lookup table, computed at compile time: `byte_class!(|b| ...)`.
macro_rules! byte_class {
    (|$b:ident| $e:expr) => {{
        let mut table = [false; 256];
        let mut i = 0;
        while i < 256 {
            let $b = i as u8;
            table[i] = $e;
            i += 1;
        }
        table
    }};
}
pub(crate) use byte_class;

/// Seeded random texts for tests: `count` concatenations of fewer than `most` pieces each,
/// chosen by xorshift from `seed` (every run tests the same texts).
#[cfg(test)]
pub(crate) fn random_mixes<P: AsRef<[u8]>>(
    pieces: &[P],
    count: usize,
    most: u64,
    mut seed: u64,
) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let mut text = Vec::new();
            for _ in 0..(seed % most) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if let Some(piece) = pieces.get((seed % pieces.len() as u64) as usize) {
                    text.extend_from_slice(piece.as_ref());
                }
            }
            seed = seed.wrapping_add(1);
            text
        })
        .collect()
}

/// [`random_mixes`] of string pieces, as strings.
#[cfg(test)]
pub(crate) fn random_texts(pieces: &[&str], count: usize, most: u64, seed: u64) -> Vec<String> {
    random_mixes(pieces, count, most, seed)
        .into_iter()
        .map(|t| String::from_utf8(t).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod run_tests {
    use super::*;

    #[test]
    fn general_punctuation_has_no_letters_digits_or_case() {
        for c in ('\u{2000}'..='\u{206f}').filter(|c| is_general_punctuation(*c)) {
            assert!(!c.is_alphanumeric(), "{c:?}");
            assert!(c.to_lowercase().eq([c]), "{c:?}");
        }
        assert!(!is_general_punctuation('\u{1fff}') && !is_general_punctuation('\u{2070}'));
    }

    #[test]
    fn long_runs_match_a_plain_scan_on_random_mixes() {
        const CLASS: [bool; 256] = byte_class!(|b| b.is_ascii_alphanumeric() || b == b'/');
        let pieces: [&[u8]; 7] = [
            b"a",
            b" ",
            b"abcdefghijklmnop",
            b"xyz/",
            b"\xc3\xa9",
            b"-",
            b"1234567",
        ];
        for text in random_mixes(&pieces, 3_000, 40, 0x2545_f491_4f6c_dd1d) {
            for min in [1, 2, 5, 16, 20, 28] {
                let fast: Vec<(usize, usize)> = long_runs(&text, &CLASS, min).collect();
                let mut slow = Vec::new();
                let mut i = 0;
                while i < text.len() {
                    let s = i;
                    while text.get(i).is_some_and(|b| CLASS[usize::from(*b)]) {
                        i += 1;
                    }
                    if i - s >= min {
                        slow.push((s, i));
                    }
                    i = i.max(s + 1);
                }
                assert_eq!(
                    fast,
                    slow,
                    "min {min}: {:?}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    #[test]
    fn long_runs_match_a_plain_scan() {
        const ALNUM: [bool; 256] = byte_class!(|b| b.is_ascii_alphanumeric());
        let text = b"ab cdefghijklmnopqrstu vw xyzABCDEFGHIJKLMNOPQ 0123456789012345 x";
        for min in [1, 3, 5, 16, 20, 30] {
            let fast: Vec<(usize, usize)> = long_runs(text, &ALNUM, min).collect();
            let mut slow = Vec::new();
            let mut i = 0;
            while i < text.len() {
                if ALNUM[usize::from(text[i])] {
                    let s = i;
                    while i < text.len() && ALNUM[usize::from(text[i])] {
                        i += 1;
                    }
                    if i - s >= min {
                        slow.push((s, i));
                    }
                } else {
                    i += 1;
                }
            }
            assert_eq!(fast, slow, "min {min}");
        }
    }

    #[test]
    fn next_non_ascii_finds_every_non_ascii_byte_like_a_plain_scan() {
        let long = format!("{}\u{e9}{}\u{2014}", "x".repeat(100), "y".repeat(70));
        for text in [
            "plain ascii words, then caf\u{e9} and more plain text \u{2014} end".as_bytes(),
            long.as_bytes(),
        ] {
            for from in 0..=text.len() {
                let slow = text[from..]
                    .iter()
                    .position(|b| !b.is_ascii())
                    .map_or(text.len(), |o| from + o);
                assert_eq!(next_non_ascii(text, from), slow, "from {from}");
            }
        }
    }

    #[test]
    fn next_digit_finds_every_digit_like_a_plain_scan() {
        let text = "ab\u{e9}c 0x9f \u{663}\u{ff10}/:09 zz7 ~\u{80}8".as_bytes();
        for from in 0..text.len() {
            let slow = text[from..]
                .iter()
                .position(u8::is_ascii_digit)
                .map(|o| from + o);
            assert_eq!(next_digit(text, from), slow, "from {from}");
        }
        let all: Vec<u8> = (0..=255u8).collect();
        let slow: Vec<usize> = (0..256).filter(|i| all[*i].is_ascii_digit()).collect();
        let mut fast = Vec::new();
        let mut at = 0;
        while let Some(d) = next_digit(&all, at) {
            fast.push(d);
            at = d + 1;
        }
        assert_eq!(fast, slow);
    }
}
