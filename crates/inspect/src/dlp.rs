//! Data-loss prevention: PII and secrets in what agents send (and in what they read, for
//! classification).
//!
//! Every entity is validated, not just shaped: payment cards by Luhn and brand ranges
//! (Mastercard 2-series and 12-digit Maestro included), US SSNs by area/group/serial rules,
//! IBANs by country length and mod-97, GitHub tokens by their CRC32 checksum. Documentation
//! examples and placeholders (`AKIAIOSFODNN7EXAMPLE`, `YOUR_API_KEY_HERE`, `xxxx`, `${VAR}`,
//! `********`) are not secrets. Phone numbers count when international (`+`, `00`), in the North
//! American shape, national with a trunk `0`, or after a phone keyword. Where spans overlap, the
//! more specific entity wins (a JWT over a generic secret, a connection string over the e-mail
//! address inside it).
//!
//! Findings carry the type and span, never the value.

use crate::{Category, Finding, Severity};
use aho_corasick::AhoCorasick;
use regex::Regex;

/// One kind of entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entity {
    name: &'static str,
    category: Category,
    /// Higher wins an overlap.
    priority: u8,
}

const fn secret(name: &'static str, priority: u8) -> Entity {
    Entity {
        name,
        category: Category::Secret,
        priority,
    }
}

const fn pii(name: &'static str, priority: u8) -> Entity {
    Entity {
        name,
        category: Category::Pii,
        priority,
    }
}

const AWS_ACCESS_KEY_ID: Entity = secret("AWS_ACCESS_KEY_ID", 90);
const AWS_SECRET_ACCESS_KEY: Entity = secret("AWS_SECRET_ACCESS_KEY", 60);
const GITHUB_TOKEN: Entity = secret("GITHUB_TOKEN", 90);
const GITLAB_TOKEN: Entity = secret("GITLAB_TOKEN", 90);
const SLACK_TOKEN: Entity = secret("SLACK_TOKEN", 90);
const SLACK_WEBHOOK: Entity = secret("SLACK_WEBHOOK", 95);
const STRIPE_SECRET_KEY: Entity = secret("STRIPE_SECRET_KEY", 90);
const OPENAI_API_KEY: Entity = secret("OPENAI_API_KEY", 92);
const ANTHROPIC_API_KEY: Entity = secret("ANTHROPIC_API_KEY", 93);
const GOOGLE_API_KEY: Entity = secret("GOOGLE_API_KEY", 90);
const NPM_TOKEN: Entity = secret("NPM_TOKEN", 90);
const SENDGRID_API_KEY: Entity = secret("SENDGRID_API_KEY", 90);
const PRIVATE_KEY: Entity = secret("PRIVATE_KEY", 99);
const JWT: Entity = secret("JWT", 85);
const DB_CONNECTION_STRING: Entity = secret("DB_CONNECTION_STRING", 95);
const GENERIC_SECRET: Entity = secret("GENERIC_SECRET", 40);
const LARGE_BASE64_BLOB: Entity = Entity {
    name: "LARGE_BASE64_BLOB",
    category: Category::ExfilIndicator,
    priority: 30,
};
const CREDIT_CARD: Entity = pii("CREDIT_CARD", 70);
const US_SSN: Entity = pii("US_SSN", 65);
const IBAN: Entity = pii("IBAN", 75);
const EMAIL: Entity = pii("EMAIL", 50);
const PHONE: Entity = pii("PHONE", 45);

/// A prefix that starts a known secret format, and how to read the rest.
struct Prefixed {
    /// The literal it starts with.
    prefix: &'static str,
    entity: Entity,
    /// Anchored at the prefix.
    regex: Regex,
}

/// The compiled detectors.
pub struct Scanner {
    prefixes: Option<AhoCorasick>,
    prefixed: Vec<Prefixed>,
    db: Regex,
    email: Regex,
    card: Regex,
    ssn: Regex,
    iban: Regex,
    phone: Regex,
    keywords: Option<AhoCorasick>,
}

// The literal each prefixed format starts with, and its pattern (anchored by `^`).
const PREFIXED: &[(&str, Entity, &str)] = &[
    ("AKIA", AWS_ACCESS_KEY_ID, r"^AKIA[A-Z2-7]{16}\b"),
    ("ASIA", AWS_ACCESS_KEY_ID, r"^ASIA[A-Z2-7]{16}\b"),
    ("ghp_", GITHUB_TOKEN, r"^ghp_[A-Za-z0-9]{36}\b"),
    ("gho_", GITHUB_TOKEN, r"^gho_[A-Za-z0-9]{36}\b"),
    ("ghu_", GITHUB_TOKEN, r"^ghu_[A-Za-z0-9]{36}\b"),
    ("ghs_", GITHUB_TOKEN, r"^ghs_[A-Za-z0-9]{36}\b"),
    ("ghr_", GITHUB_TOKEN, r"^ghr_[A-Za-z0-9]{36}\b"),
    (
        "github_pat_",
        GITHUB_TOKEN,
        r"^github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}\b",
    ),
    ("glpat-", GITLAB_TOKEN, r"^glpat-[A-Za-z0-9_-]{20}"),
    (
        "xoxb-",
        SLACK_TOKEN,
        r"^xoxb-[0-9]{9,13}-[0-9]{9,13}-[A-Za-z0-9]{20,32}",
    ),
    (
        "xoxp-",
        SLACK_TOKEN,
        r"^xoxp-[0-9]{9,13}-[0-9]{9,13}-[0-9]{9,13}-[a-f0-9]{32}",
    ),
    ("xoxa-", SLACK_TOKEN, r"^xoxa-[0-9]{1,2}-[A-Za-z0-9-]{20,}"),
    ("xoxe.", SLACK_TOKEN, r"^xoxe\.xoxp-[0-9]-[A-Za-z0-9-]{20,}"),
    (
        "https://hooks.slack.com/",
        SLACK_WEBHOOK,
        r"^https://hooks\.slack\.com/(services|workflows|triggers)/T[A-Z0-9]{6,12}/[A-Z0-9]{6,12}/[A-Za-z0-9]{16,32}",
    ),
    (
        "sk_live_",
        STRIPE_SECRET_KEY,
        r"^sk_live_[A-Za-z0-9]{24,99}",
    ),
    (
        "rk_live_",
        STRIPE_SECRET_KEY,
        r"^rk_live_[A-Za-z0-9]{24,99}",
    ),
    (
        "sk_test_",
        STRIPE_SECRET_KEY,
        r"^sk_test_[A-Za-z0-9]{24,99}",
    ),
    (
        "rk_test_",
        STRIPE_SECRET_KEY,
        r"^rk_test_[A-Za-z0-9]{24,99}",
    ),
    (
        "SG.",
        SENDGRID_API_KEY,
        r"^SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}",
    ),
    (
        "sk-ant-",
        ANTHROPIC_API_KEY,
        r"^sk-ant-(api|admin)[0-9]{2}-[A-Za-z0-9_-]{80,120}",
    ),
    (
        "sk-",
        OPENAI_API_KEY,
        r"^sk-(proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,100}T3BlbkFJ[A-Za-z0-9_-]{20,100}|^sk-proj-[A-Za-z0-9_-]{48,200}",
    ),
    ("AIza", GOOGLE_API_KEY, r"^AIza[0-9A-Za-z_-]{35}"),
    ("npm_", NPM_TOKEN, r"^npm_[A-Za-z0-9]{36}\b"),
    (
        "eyJ",
        JWT,
        r"^eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}",
    ),
    (
        "-----BEGIN ",
        PRIVATE_KEY,
        r"^-----BEGIN ((RSA|EC|DSA|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY( BLOCK)?-----",
    ),
];

/// The end (in `rest`, which starts at `start` with `sk-`) of the OpenAI key there, as
/// [`PREFIXED`]'s regex reads it: `sk-`, an optional `proj-`, `svcacct-` or `admin-`, 20 to 100
/// key characters, `T3BlbkFJ` and 20 to 100 more; or `sk-proj-` and 48 to 200 key characters.
/// The regex runs only when a `T3BlbkFJ` lies where the first form needs it; otherwise the
/// second form is worked out from the run of key characters, remembered for the keys inside
/// the same run (a text of `sk-proj-` ran the regex over 200 bytes from each).
fn openai_key(
    regex: &Regex,
    bytes: &[u8],
    rest: &str,
    start: usize,
    marks: &mut Option<Vec<usize>>,
    run: &mut crate::NextFound<impl Fn(&[u8]) -> Option<usize>>,
) -> Option<usize> {
    let marks =
        marks.get_or_insert_with(|| memchr::memmem::find_iter(bytes, b"T3BlbkFJ").collect());
    // The first form: `T3BlbkFJ` between 20 and 9 + 100 characters after `sk-`.
    let (lo, hi) = (start + 3 + 20, start + 3 + 9 + 100);
    let near = marks
        .get(marks.partition_point(|m| *m < lo))
        .is_some_and(|m| *m <= hi);
    if near {
        return regex.find(rest).map(|hit| hit.end());
    }
    if !rest.starts_with("sk-proj-") {
        return None;
    }
    let body = start + 8;
    let len = run.at_or_after(bytes, body).unwrap_or(bytes.len()) - body;
    (len >= 48).then(|| 8 + len.min(200))
}

/// The URL schemes of the database connection strings (the regex's alternatives, and what
/// the search checks before `://` to run it).
const DB_SCHEMES: &[&str] = &[
    "postgres",
    "postgresql",
    "mysql",
    "mariadb",
    "mongodb",
    "mongodb+srv",
    "redis",
    "rediss",
    "amqp",
    "amqps",
    "mssql",
    "sqlserver",
    "cockroachdb",
];

/// What a JWT or `xoxa-` prefix found in its run of characters (they end where the run ends,
/// so a prefix inside it matches the same bytes from its own start, or fails): a match that
/// was reported (or, for JWTs, a failure) settles the prefixes inside the run, which could
/// only add a tail of that match (dropped as an overlap) or fail. A match that was a
/// placeholder leaves them to be judged by where they start: a tail is a placeholder only if
/// it starts by `placeholder`'s second value ([`placeholder_suffixes`]), and the first one
/// after that is reported, ending where the match did (its first value).
struct OpenRun {
    run_end: usize,
    placeholder: Option<(usize, usize)>,
}

/// Whether the `prefix` format matched at `start`, inside the run of its characters that ends
/// at `run_end`, given that a longer match of it ends where the run's match does: a JWT's
/// first part still has 8 characters after `eyJ` (the run ends at its first `.`); an `xoxa-`
/// token still has its one or two digits, `-` and 20 characters before the run's end.
fn open_tail_matches(prefix: &str, bytes: &[u8], start: usize, run_end: usize) -> bool {
    if prefix == "eyJ" {
        return run_end >= start + 3 + 8;
    }
    let digits = bytes
        .get(start + 5..)
        .unwrap_or_default()
        .iter()
        .take(3)
        .take_while(|b| b.is_ascii_digit())
        .count();
    (1..=2).contains(&digits)
        && bytes.get(start + 5 + digits) == Some(&b'-')
        && run_end >= start + 5 + digits + 1 + 20
}

/// For a value that [`is_placeholder`] rejects, how far into it a tail can start and still be
/// rejected (a tail holds a placeholder marker if it starts by the marker's last occurrence;
/// `None` for a value that is not a placeholder). Values of JWTs and `xoxa-` tokens hold no
/// `<`, so the `<...>` form does not arise.
fn placeholder_suffixes(v: &str) -> Option<usize> {
    if !is_placeholder(v) {
        return None;
    }
    let upper = v.to_ascii_uppercase();
    let markers = [
        "EXAMPLE",
        "YOUR_",
        "YOUR-",
        "PLACEHOLDER",
        "CHANGEME",
        "REDACTED",
        "XXXX",
    ]
    .iter()
    .filter_map(|m| upper.rfind(m));
    let literal = ["****", "${", "{{"].iter().filter_map(|m| v.rfind(m));
    // Eight equal bytes at least four bytes into the tail.
    let b = v.as_bytes();
    let repeat = (0..b.len().saturating_sub(7))
        .rev()
        .find(|&w| {
            b.get(w..w + 8)
                .is_some_and(|r| r.iter().all(|x| Some(x) == r.first()))
        })
        .and_then(|w| w.checked_sub(4));
    markers.chain(literal).chain(repeat).max()
}

/// The base64url alphabet, which a JWT's first part (its `eyJ` prefix too) and an OpenAI key
/// run over.
const BASE64URL: [bool; 256] =
    crate::byte_class!(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
/// The characters an `xoxa-` token runs over (its prefix too).
const XOXA_RUN: [bool; 256] = crate::byte_class!(|b| b.is_ascii_alphanumeric() || b == b'-');

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants covered by the tests; an impossible failure degrades to a
    // pattern that never matches rather than a panic in the request path.
    Regex::new(pattern).unwrap_or_else(|_| never())
}

#[expect(
    clippy::unwrap_used,
    reason = "a constant pattern that always compiles"
)]
fn never() -> Regex {
    Regex::new(r"\b\B").unwrap()
}

impl Scanner {
    /// Compiles the detectors.
    pub fn new() -> Self {
        // Leftmost-longest: at one position `sk-ant-` wins over `sk-`.
        let prefixes = AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(PREFIXED.iter().map(|(p, _, _)| *p))
            .ok();
        Self {
            prefixes,
            prefixed: PREFIXED
                .iter()
                .map(|(prefix, entity, pattern)| Prefixed {
                    prefix,
                    entity: *entity,
                    regex: re(pattern),
                })
                .collect(),
            db: re(&format!(
                // (Schemes in ASCII case only, as `db_scheme_before` reads them: `(?i)` alone
                // would also take `ſ` for `s` and the Kelvin sign for `k`.)
                r"(?i-u:\b({}))://([^\s:@/'\x22]+):([^\s@'\x22]+)@([A-Za-z0-9.\-\[\]:]+)(/[A-Za-z0-9_.\-]*)?",
                DB_SCHEMES
                    .iter()
                    .map(|s| regex::escape(s))
                    .collect::<Vec<_>>()
                    .join("|")
            )),
            email: re(
                r"\b[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b",
            ),
            card: re(r"(?-u:\b)\d(?:[ -]?\d){11,18}(?-u:\b)"),
            ssn: re(r"(?-u:\b)(\d{3})([- ]?)(\d{2})([- ]?)(\d{4})(?-u:\b)"),
            // Anchored: the caller tries it where a word starts with two capitals and two
            // digits, and only a match there counts (an unanchored search of the 42 bytes
            // at each such place cost 100 ns a byte on text made of them).
            iban: re(r"^[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?-u:\b)"),
            phone: re(
                r"(?:\+|(?-u:\b)00)?(?:\d{1,4}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,8}(?:[ .-]\d{2,8}){0,4}(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?-u:\b)",
            ),
            keywords: AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(keyword_variants())
                .ok(),
        }
    }

    /// Appends a finding for every PII or secret entity in `text`.
    ///
    /// Each detector looks only where its entity can be: prefixes and keywords found by one
    /// Aho-Corasick pass each, e-mail addresses around `@`, connection strings around `://`,
    /// numbers around digit clusters, tokens and blobs in runs of the base64 alphabet. Regexes
    /// run on those small slices, never on the whole text.
    pub fn scan(&self, text: &str, out: &mut Vec<Finding>) {
        let mut found: Vec<(usize, usize, Entity)> = Vec::new();
        self.prefixed(text, &mut found);
        self.addresses(text, &mut found);
        self.numbers(text, &mut found);
        self.keyword_secrets(text, &mut found);
        self.runs(text, &mut found);
        for (start, end, entity) in resolve(found) {
            out.push(Finding {
                detector: detector(entity.name),
                category: entity.category,
                entity: Some(entity.name),
                start,
                end,
                severity: match entity.category {
                    Category::Secret => Severity::High,
                    _ => Severity::Medium,
                },
                score: 0.9,
                revealed: None,
            });
        }
    }

    /// Database connection strings (at each `://`) and e-mail addresses (at each `@`).
    fn addresses(&self, text: &str, found: &mut Vec<(usize, usize, Entity)>) {
        let bytes = text.as_bytes();
        let mut last_db_end = 0;
        for at in memchr::memmem::find_iter(bytes, b"://") {
            if at < last_db_end {
                continue;
            }
            // Only a database scheme right before `://` can start a match: the regex then runs
            // from the scheme, over at most 320 bytes, and only when they hold an `@`.
            let Some(scheme_start) = db_scheme_before(bytes, at) else {
                continue;
            };
            // (From up to four bytes before the scheme: the regex's `\b` sees the character
            // before it.)
            let (from, slice) = slice_around(text, at, at - scheme_start + 4, 320);
            if memchr::memchr(b'@', slice.as_bytes()).is_none() {
                continue;
            }
            // Only a string reported from this scheme settles the `://`s inside it (one
            // that is a placeholder, or starts further on, leaves them to be tried).
            if let Some(c) = self.db.captures(slice)
                && let Some(all) = c.get(0)
                && self.connection_string(from, &c, found)
                && from + all.start() == scheme_start
            {
                last_db_end = from + all.end();
            }
        }
        let mut last_email_end = 0;
        for at in memchr::memchr_iter(b'@', bytes) {
            if at < last_email_end {
                continue;
            }
            // The regex runs over the address-shaped bytes around this `@` only (see
            // `email_candidate`): a text of `@`s costs one look at each, not a search of the
            // 320 bytes around each.
            let Some((from, slice, mut pos)) = email_candidate(text, at, last_email_end) else {
                continue;
            };
            while let Some(m) = self.email.find_at(slice, pos) {
                if from + m.start() <= at && at < from + m.end() {
                    found.push((from + m.start(), from + m.end(), EMAIL));
                    last_email_end = from + m.end();
                }
                pos = m.end().max(m.start() + 1);
            }
        }
    }

    fn prefixed(&self, text: &str, found: &mut Vec<(usize, usize, Entity)>) {
        let Some(prefixes) = &self.prefixes else {
            return;
        };
        let bytes = text.as_bytes();
        // JWTs and `xoxa-` tokens run to the end of a run of their characters, which their
        // prefix is made of too, so every prefix inside such a run would run the regex to its
        // end (a text of `eyJ-` took seconds). What the first one found decides for the ones
        // inside its run (see `OpenRun`).
        let mut open_runs: [Option<OpenRun>; 2] = [None, None];
        // The first `-----END ` at or after a position, found once for all the BEGIN lines
        // before it (a search from each BEGIN to the text's end was quadratic).
        let mut pem_end: Option<(usize, Option<(usize, usize)>)> = None;
        // For `sk-` keys: where `T3BlbkFJ` occurs (found once), and the end of the run of key
        // characters a key starts (remembered for the keys inside the same run).
        let mut key_marks: Option<Vec<usize>> = None;
        let mut key_run =
            crate::NextFound::new(|b: &[u8]| b.iter().position(|c| !BASE64URL[usize::from(*c)]));
        for m in prefixes.find_iter(text) {
            let Some(p) = self.prefixed.get(m.pattern().as_usize()) else {
                continue;
            };
            let start = m.start();
            // A format starts at a word boundary (not inside a longer token).
            if start > 0
                && text
                    .as_bytes()
                    .get(start - 1)
                    .is_some_and(|b| b.is_ascii_alphanumeric())
            {
                continue;
            }
            let Some(rest) = text.get(start..) else {
                continue;
            };
            let open = match p.entity.name {
                "JWT" => Some((0, BASE64URL)),
                "SLACK_TOKEN" if p.prefix == "xoxa-" => Some((1, XOXA_RUN)),
                _ => None,
            };
            if let Some((k, class)) = open {
                let Some(slot) = open_runs.get_mut(k) else {
                    continue;
                };
                if let Some(run) = slot.as_ref().filter(|r| start < r.run_end) {
                    // Inside the run of an earlier prefix of this kind.
                    if let Some((end, placeholder_to)) = run.placeholder
                        && start > placeholder_to
                        && open_tail_matches(p.prefix, bytes, start, run.run_end)
                    {
                        found.push((start, end, p.entity));
                        *slot = Some(OpenRun {
                            run_end: run.run_end,
                            placeholder: None,
                        });
                    }
                    continue;
                }
                let run_end = start
                    + bytes
                        .get(start..)
                        .unwrap_or_default()
                        .iter()
                        .take_while(|b| class[usize::from(**b)])
                        .count();
                let Some(hit) = p.regex.find(rest) else {
                    // A failed JWT fails from anywhere in its run; an `xoxa-` token can start
                    // after a failed one (`xoxa-xoxa-12-...`), and fails within 20 bytes.
                    *slot = (k == 0).then_some(OpenRun {
                        run_end,
                        placeholder: None,
                    });
                    continue;
                };
                let value = hit.as_str();
                let placeholder =
                    placeholder_suffixes(value).map(|to| (start + hit.end(), start + to));
                *slot = Some(OpenRun {
                    run_end,
                    placeholder,
                });
                if placeholder.is_none() {
                    found.push((start, start + hit.end(), p.entity));
                }
                continue;
            }
            let hit_end = if p.prefix == "sk-" {
                match openai_key(&p.regex, bytes, rest, start, &mut key_marks, &mut key_run) {
                    Some(end) => end,
                    None => continue,
                }
            } else {
                match p.regex.find(rest) {
                    Some(hit) => hit.end(),
                    None => continue,
                }
            };
            let mut end = start + hit_end;
            let Some(value) = rest.get(..hit_end) else {
                continue;
            };
            if is_placeholder(value) {
                continue;
            }
            match p.entity.name {
                "GITHUB_TOKEN" if !value.starts_with("github_pat_") && !github_checksum(value) => {
                    continue;
                }
                "PRIVATE_KEY" => {
                    // The whole block, through its END line.
                    let close = match pem_end {
                        Some((from, close))
                            if from <= start && close.is_none_or(|c| c.0 >= start) =>
                        {
                            close
                        }
                        _ => {
                            let close = memchr::memmem::find(
                                bytes.get(start..).unwrap_or_default(),
                                b"-----END ",
                            )
                            .map(|c| start + c)
                            .and_then(|c| {
                                let after = c + 9;
                                memchr::memmem::find(
                                    bytes.get(after..).unwrap_or_default(),
                                    b"-----",
                                )
                                .map(|d| (c, after + d + 5))
                            });
                            // (No END, or no dashes after it: none for any later BEGIN
                            // either, until the END found.)
                            pem_end = Some((start, close));
                            close
                        }
                    };
                    let Some((_, close_end)) = close else {
                        continue;
                    };
                    end = close_end;
                }
                // Exactly 20 characters after the prefix.
                "GITLAB_TOKEN"
                    if rest
                        .as_bytes()
                        .get(hit_end)
                        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') =>
                {
                    continue;
                }
                _ => {}
            }
            found.push((start, end, p.entity));
        }
    }

    /// Reports the connection string `c` (found in a slice starting at `from`) unless its
    /// password is a placeholder or too short; returns whether it did.
    fn connection_string(
        &self,
        from: usize,
        c: &regex::Captures<'_>,
        found: &mut Vec<(usize, usize, Entity)>,
    ) -> bool {
        let (Some(all), Some(password)) = (c.get(0), c.get(3)) else {
            return false;
        };
        if is_placeholder(password.as_str()) || password.as_str().len() < 3 {
            return false;
        }
        found.push((from + all.start(), from + all.end(), DB_CONNECTION_STRING));
        true
    }

    /// Cards, SSNs and phone numbers in the slices around clusters of digits; IBANs where two
    /// capitals and two digits start a word.
    fn numbers(&self, text: &str, found: &mut Vec<(usize, usize, Entity)>) {
        let bytes = text.as_bytes();
        let mut i = 0;
        let mut last_end = 0;
        while let Some(first) = crate::next_digit(bytes, i) {
            // A cluster: digits with at most two separator characters between them.
            let mut end = first;
            let mut j = first;
            while j < bytes.len() {
                match bytes.get(j) {
                    Some(b) if b.is_ascii_digit() => {
                        j += 1;
                        end = j;
                    }
                    Some(b' ' | b'-' | b'.' | b'(' | b')' | b'/' | b'x' | b'+') if j - end < 3 => {
                        j += 1;
                    }
                    _ => break,
                }
            }
            // Cards, SSNs and phone numbers have at least seven digits (most clusters, ids and
            // counts, have fewer and stop here).
            let digits = bytes
                .get(first..end)
                .map_or(0, |c| c.iter().filter(|b| b.is_ascii_digit()).count());
            if digits >= 7 {
                let mut start = first.saturating_sub(5).max(last_end);
                while !text.is_char_boundary(start) {
                    start += 1;
                }
                let mut stop = (end + 6).min(bytes.len());
                while !text.is_char_boundary(stop) {
                    stop -= 1;
                }
                if let Some(slice) = text.get(start..stop) {
                    self.number_slice(text, start, slice, found);
                }
            }
            // An IBAN: two capitals right before the cluster's first two digits, at a word
            // start.
            let at = first.saturating_sub(2);
            if first >= 2
                && bytes.get(at).is_some_and(u8::is_ascii_uppercase)
                && bytes.get(at + 1).is_some_and(u8::is_ascii_uppercase)
                && bytes.get(first + 1).is_some_and(u8::is_ascii_digit)
                && (at == 0 || !bytes.get(at - 1).is_some_and(u8::is_ascii_alphanumeric))
            {
                let mut stop = (at + 42).min(bytes.len());
                while !text.is_char_boundary(stop) {
                    stop -= 1;
                }
                if let Some(m) = text.get(at..stop).and_then(|s| self.iban.find(s))
                    && m.start() == 0
                    && is_iban(m.as_str())
                {
                    found.push((at, at + m.end(), IBAN));
                }
            }
            last_end = end;
            i = end.max(first + 1);
        }
    }

    fn number_slice(
        &self,
        text: &str,
        from: usize,
        slice: &str,
        found: &mut Vec<(usize, usize, Entity)>,
    ) {
        for m in self.card.find_iter(slice) {
            let digits: Vec<u8> = m
                .as_str()
                .bytes()
                .filter(u8::is_ascii_digit)
                .map(|b| b - b'0')
                .collect();
            if consistent_groups(m.as_str()) && is_card(&digits) {
                found.push((from + m.start(), from + m.end(), CREDIT_CARD));
            }
        }
        for c in self.ssn.captures_iter(slice) {
            let (Some(all), Some(area), Some(s1), Some(group), Some(s2), Some(serial)) =
                (c.get(0), c.get(1), c.get(2), c.get(3), c.get(4), c.get(5))
            else {
                continue;
            };
            if s1.as_str() != s2.as_str() {
                continue;
            }
            let area: u32 = area.as_str().parse().unwrap_or(0);
            let valid = area != 0
                && area != 666
                && area < 900
                && group.as_str() != "00"
                && serial.as_str() != "0000";
            // Without separators (or with spaces) nine digits are too common to count without
            // a keyword.
            let (start, end) = (from + all.start(), from + all.end());
            let context = s1.as_str() == "-" || has_keyword_before(text, start, SSN_WORDS);
            if valid && context && !adjacent_digit(text, start, end) {
                found.push((start, end, US_SSN));
            }
        }
        for m in self.phone.find_iter(slice) {
            let candidate = m.as_str().trim();
            if candidate.len() < 7 {
                continue;
            }
            let start = from + m.start() + (m.as_str().len() - m.as_str().trim_start().len());
            let end = start + candidate.len();
            // (The keyword is looked for only when it decides: most candidates are phones
            // or not whether or not one precedes them.)
            let phone = match (is_phone(candidate, false), is_phone(candidate, true)) {
                (same, other) if same == other => same,
                _ => is_phone(candidate, has_keyword_before(text, start, PHONE_WORDS)),
            };
            if phone && !adjacent_digit(text, start, end) {
                found.push((start, end, PHONE));
            }
        }
    }

    /// A value after a secret-like key (`api_secret: ...`, `PASSWORD=...`, `?key=...`).
    fn keyword_secrets(&self, text: &str, found: &mut Vec<(usize, usize, Entity)>) {
        let Some(keywords) = &self.keywords else {
            return;
        };
        let bytes = text.as_bytes();
        let ident = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
        let mut done = 0;
        for m in keywords.find_iter(text) {
            if m.start() < done {
                continue;
            }
            // "key" alone only as a word of its own or after `_`, `-`, `.` ("api.key", not
            // "monkey").
            if m.pattern().as_usize() / 3 == KEYWORDS.len() - 1
                && m.start() > 0
                && bytes
                    .get(m.start() - 1)
                    .is_some_and(u8::is_ascii_alphabetic)
            {
                continue;
            }
            let mut j = m.end();
            while bytes.get(j).copied().is_some_and(ident) {
                j += 1;
            }
            done = j;
            if matches!(bytes.get(j), Some(b'"' | b'\'')) {
                j += 1;
            }
            while bytes.get(j).is_some_and(|b| *b == b' ' || *b == b'\t') {
                j += 1;
            }
            let sep = match (bytes.get(j), bytes.get(j + 1)) {
                (Some(b':'), Some(b'=')) | (Some(b'='), Some(b'>')) => 2,
                (Some(b':' | b'='), _) => 1,
                _ => continue,
            };
            j += sep;
            while bytes.get(j).is_some_and(|b| *b == b' ' || *b == b'\t') {
                j += 1;
            }
            if matches!(bytes.get(j), Some(b'"' | b'\'')) {
                j += 1;
            }
            let start = j;
            while bytes.get(j).is_some_and(|b| {
                !b.is_ascii_whitespace()
                    && !matches!(
                        b,
                        b'"' | b'\'' | b',' | b';' | b'&' | b'<' | b'>' | b'(' | b')'
                    )
            }) && j - start < 256
            {
                j += 1;
            }
            let Some(v) = text.get(start..j) else {
                continue;
            };
            let v = v.trim_end_matches(['.', '?', '!']);
            if v.len() >= 12 && looks_random(v) && !is_placeholder(v) {
                found.push((start, start + v.len(), GENERIC_SECRET));
            }
        }
    }

    /// Runs of the base64 alphabet: 28 to 64 characters of mixed case and digits with no
    /// keyword (40 is an AWS secret key's shape, others a generic secret), and 1,000+ as a
    /// bulk blob. PEM bodies, data URIs and digests are skipped.
    fn runs(&self, text: &str, found: &mut Vec<(usize, usize, Entity)>) {
        const RUN: [bool; 256] =
            crate::byte_class!(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
        let bytes = text.as_bytes();
        let pem = PemLines::of(text);
        for (start, i) in crate::long_runs(bytes, &RUN, 28) {
            let len = i - start;
            if len >= 1000 {
                let mut end = i;
                while bytes.get(end) == Some(&b'=') {
                    end += 1;
                }
                if !in_pem_or_data(text, &pem, start) {
                    found.push((start, end, LARGE_BASE64_BLOB));
                }
                continue;
            }
            if !(28..=64).contains(&len) {
                continue;
            }
            let Some(v) = text.get(start..i) else {
                continue;
            };
            let before = start.checked_sub(1).and_then(|k| bytes.get(k)).copied();
            let after = bytes.get(i).copied();
            // Only whole tokens.
            if before.is_some_and(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'=')
            }) || after.is_some_and(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'.')
            }) {
                continue;
            }
            if !looks_random(v)
                || entropy(v) < 4.0
                || is_placeholder(v)
                || in_pem_or_data(text, &pem, start)
            {
                continue;
            }
            let entity = if v.len() == 40 {
                AWS_SECRET_ACCESS_KEY
            } else {
                GENERIC_SECRET
            };
            found.push((start, i, entity));
        }
    }
}

/// The keywords in lower, upper and capitalised case, in that order per keyword (explicit
/// variants keep the search on the SIMD prefilter, which case-insensitive search leaves).
fn keyword_variants() -> Vec<String> {
    KEYWORDS
        .iter()
        .flat_map(|k| {
            let mut capital = k.to_string();
            if let Some(first) = capital.get_mut(..1) {
                first.make_ascii_uppercase();
            }
            [k.to_string(), k.to_ascii_uppercase(), capital]
        })
        .collect()
}

/// Keywords that introduce a secret value; "key" must stay last (it has a word rule).
const KEYWORDS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "pwd",
    "token",
    "api_key",
    "api-key",
    "apikey",
    "access_key",
    "access-key",
    "auth_key",
    "credential",
    "private_key",
    "key",
];

/// The slice of `text` from `before` bytes before `at` to `after` bytes after it, on character
/// boundaries, with its start offset.
fn slice_around(text: &str, at: usize, before: usize, after: usize) -> (usize, &str) {
    let mut from = at.saturating_sub(before);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    let mut to = (at + after).min(text.len());
    while !text.is_char_boundary(to) {
        to -= 1;
    }
    (from, text.get(from..to).unwrap_or(""))
}

/// Where the database scheme that ends at `at` (just before `://`) starts: a whole word (a
/// letter, digit or `_` does not precede it) from the connection-string regex's schemes, in
/// any case; `mongodb+srv` too.
fn db_scheme_before(bytes: &[u8], at: usize) -> Option<usize> {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let before = bytes.get(at.saturating_sub(16)..at)?;
    let word_start = |end: usize| {
        end - before
            .get(..end)
            .unwrap_or_default()
            .iter()
            .rev()
            .take_while(|b| word(b))
            .count()
    };
    let mut start = word_start(before.len());
    // `mongodb+srv`: the word before `+srv`.
    if before.get(start..) == Some(b"srv".as_slice())
        && start > 0
        && before.get(start - 1) == Some(&b'+')
    {
        start = word_start(start - 1);
    }
    // The word must begin at a boundary: the 16 bytes hold the longest scheme and the byte
    // before it.
    if start == 0 && at >= 16 {
        return None;
    }
    let scheme = before.get(start..)?;
    DB_SCHEMES
        .iter()
        .any(|s| s.as_bytes().eq_ignore_ascii_case(scheme))
        .then_some(at - (before.len() - start))
}

/// Where an e-mail address through the `@` at `at` can be: the slice of `text` from 64 bytes
/// before `at` to 256 after it (as far as the regex looks), cut just after the domain
/// characters that follow `at` (and one more character, for the regex's `\b`), with its
/// start offset and where in it to start searching: the local-part characters before `at`,
/// but not before `floor` (the end of the last address found; a search of the whole slice
/// would have passed it). A search from there sees the bytes before it for `\b`. `None` when
/// no address can go through this `@`: no local-part character before it, or no letter or
/// digit after it.
fn email_candidate(text: &str, at: usize, floor: usize) -> Option<(usize, &str, usize)> {
    let bytes = text.as_bytes();
    let local = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-');
    let domain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-');
    if !bytes.get(at + 1).is_some_and(u8::is_ascii_alphanumeric)
        || !at
            .checked_sub(1)
            .and_then(|i| bytes.get(i))
            .is_some_and(local)
    {
        return None;
    }
    let (from, whole) = slice_around(text, at, 64, 256);
    let rel = at.checked_sub(from)?;
    let before = whole.as_bytes().get(..rel)?;
    let local_start = rel - before.iter().rev().take_while(|b| local(b)).count();
    let search = local_start.max(floor.saturating_sub(from));
    let after = whole.as_bytes().get(rel + 1..)?;
    let mut end = rel + 1 + after.iter().take_while(|b| domain(b)).count();
    // One character more, whole (the slice ends on a character boundary).
    if end < whole.len() {
        end += 1;
        while !whole.is_char_boundary(end) {
            end += 1;
        }
    }
    Some((from, whole.get(..end)?, search))
}

fn detector(name: &str) -> &'static str {
    match name {
        "AWS_ACCESS_KEY_ID" => "dlp.aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY" => "dlp.aws_secret_access_key",
        "GITHUB_TOKEN" => "dlp.github_token",
        "GITLAB_TOKEN" => "dlp.gitlab_token",
        "SLACK_TOKEN" => "dlp.slack_token",
        "SLACK_WEBHOOK" => "dlp.slack_webhook",
        "STRIPE_SECRET_KEY" => "dlp.stripe_secret_key",
        "OPENAI_API_KEY" => "dlp.openai_api_key",
        "ANTHROPIC_API_KEY" => "dlp.anthropic_api_key",
        "GOOGLE_API_KEY" => "dlp.google_api_key",
        "NPM_TOKEN" => "dlp.npm_token",
        "SENDGRID_API_KEY" => "dlp.sendgrid_api_key",
        "PRIVATE_KEY" => "dlp.private_key",
        "JWT" => "dlp.jwt",
        "DB_CONNECTION_STRING" => "dlp.db_connection_string",
        "GENERIC_SECRET" => "dlp.generic_secret",
        "LARGE_BASE64_BLOB" => "dlp.large_base64_blob",
        "CREDIT_CARD" => "dlp.credit_card",
        "US_SSN" => "dlp.us_ssn",
        "IBAN" => "dlp.iban",
        "EMAIL" => "dlp.email",
        "PHONE" => "dlp.phone",
        _ => "dlp.entity",
    }
}

/// Keeps, among overlapping spans, the one of the highest priority (then the longest).
fn resolve(mut found: Vec<(usize, usize, Entity)>) -> Vec<(usize, usize, Entity)> {
    found.sort_by(|a, b| {
        b.2.priority
            .cmp(&a.2.priority)
            .then((b.1 - b.0).cmp(&(a.1 - a.0)))
            .then(a.0.cmp(&b.0))
    });
    // The kept spans do not overlap, so ordered by start they are ordered by end too: a new
    // span overlaps one of them exactly when it overlaps the last one starting before its end
    // (a lookup, not a walk over all of them: texts can hold thousands of findings).
    // (Spans are never empty: each is a match or a run of at least one byte.)
    let mut kept: std::collections::BTreeMap<(usize, usize), Entity> =
        std::collections::BTreeMap::new();
    for (start, end, entity) in found {
        let overlaps = kept
            .range(..(end, 0))
            .next_back()
            .is_some_and(|(k, _)| k.1 > start);
        if !overlaps {
            kept.insert((start, end), entity);
        }
    }
    kept.into_iter()
        .map(|((s, e), entity)| (s, e, entity))
        .collect()
}

const SSN_WORDS: &[&str] = &["ssn", "social", "security", "taxpayer", "tin"];
const PHONE_WORDS: &[&str] = &[
    "phone", "tel", "mobile", "cell", "call", "fax", "contact", "sms", "whatsapp",
];

/// Whether one of `words` starts a word (case-insensitively) in the 40 bytes before `at`
/// ("tel" in "Tel:", not in "hotel").
fn has_keyword_before(text: &str, at: usize, words: &[&str]) -> bool {
    let mut from = at.saturating_sub(40);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let before = text.get(from..at).unwrap_or("").to_ascii_lowercase();
    words.iter().any(|w| {
        before.match_indices(w).any(|(i, _)| {
            i == 0
                || !before
                    .as_bytes()
                    .get(i - 1)
                    .is_some_and(u8::is_ascii_alphabetic)
        })
    })
}

/// Whether the number continues a longer token (`PO6003...`, `12-345-67`).
fn adjacent_digit(text: &str, start: usize, end: usize) -> bool {
    let b = text.as_bytes();
    start
        .checked_sub(1)
        .and_then(|i| b.get(i))
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        || b.get(end)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Card digits grouped like a printed card: no separators, or the same separator between
/// groups of at least three digits.
fn consistent_groups(s: &str) -> bool {
    let seps: Vec<char> = s.chars().filter(|c| !c.is_ascii_digit()).collect();
    if seps.is_empty() {
        return true;
    }
    seps.iter().all(|c| *c == seps[0]) && s.split(seps[0]).all(|g| g.len() >= 3)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn prefix_number(digits: &[u8], n: usize) -> u32 {
    digits
        .iter()
        .take(n)
        .fold(0u32, |acc, d| acc * 10 + u32::from(*d))
}

/// Luhn-valid, with the length and issuer range of a card brand.
fn is_card(digits: &[u8]) -> bool {
    let len = digits.len();
    if !(12..=19).contains(&len) || !luhn(digits) {
        return false;
    }
    let p1 = prefix_number(digits, 1);
    let p2 = prefix_number(digits, 2);
    let p3 = prefix_number(digits, 3);
    let p4 = prefix_number(digits, 4);
    let visa = p1 == 4 && matches!(len, 13 | 16 | 19);
    let mastercard = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && len == 16;
    let amex = matches!(p2, 34 | 37) && len == 15;
    let discover =
        (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65) && (16..=19).contains(&len);
    // JCB's registered range is 3528-3589; issuers and test generators use all of 35xx.
    let jcb = p2 == 35 && (16..=19).contains(&len);
    let diners =
        ((300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39) && (14..=19).contains(&len);
    let maestro = (p2 == 50 || (56..=69).contains(&p2)) && (12..=19).contains(&len);
    let unionpay = p2 == 62 && (16..=19).contains(&len);
    visa || mastercard || amex || discover || jcb || diners || maestro || unionpay
}

/// IBAN length per country (the common SEPA and neighbours).
fn iban_length(country: &str) -> Option<usize> {
    Some(match country {
        "AD" => 24,
        "AT" => 20,
        "BE" => 16,
        "BG" => 22,
        "CH" => 21,
        "CY" => 28,
        "CZ" => 24,
        "DE" => 22,
        "DK" => 18,
        "EE" => 20,
        "ES" => 24,
        "FI" => 18,
        "FR" => 27,
        "GB" => 22,
        "GR" => 27,
        "HR" => 21,
        "HU" => 28,
        "IE" => 22,
        "IS" => 26,
        "IT" => 27,
        "LI" => 21,
        "LT" => 20,
        "LU" => 20,
        "LV" => 21,
        "MC" => 27,
        "MT" => 31,
        "NL" => 18,
        "NO" => 15,
        "PL" => 28,
        "PT" => 25,
        "RO" => 24,
        "SE" => 24,
        "SI" => 19,
        "SK" => 24,
        "SM" => 27,
        "TR" => 26,
        "SA" => 24,
        "AE" => 23,
        "IL" => 23,
        "BR" => 29,
        _ => return None,
    })
}

fn is_iban(candidate: &str) -> bool {
    let compact: String = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(country) = compact.get(..2) else {
        return false;
    };
    if iban_length(country) != Some(compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => u32::from(c) - u32::from('0'),
            'A'..='Z' => u32::from(c) - u32::from('A') + 10,
            _ => return false,
        };
        remainder = if v >= 10 {
            (remainder * 100 + v) % 97
        } else {
            (remainder * 10 + v) % 97
        };
    }
    remainder == 1
}

/// A phone number: 7 to 15 digits (an extension aside), international (`+`, `00`), North
/// American (`(AAA) EEE-NNNN` and relatives), national with a trunk `0` and a separator, or
/// any shape after a phone keyword.
fn is_phone(candidate: &str, keyword: bool) -> bool {
    let main = candidate
        .split(['x', 'e'])
        .next()
        .unwrap_or(candidate)
        .trim();
    let digits: String = main.chars().filter(char::is_ascii_digit).collect();
    if !(7..=15).contains(&digits.len()) {
        return false;
    }
    let separators = main
        .chars()
        .filter(|c| matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .count();
    let dots = main.matches('.').count();
    // Dotted numbers are versions and addresses unless they have the NANP shape.
    if main.starts_with('+') {
        return digits.len() >= 8;
    }
    if main.starts_with("00") && !main.starts_with("000") && digits.len() >= 10 && separators > 0 {
        return true;
    }
    let groups: Vec<usize> = main
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .map(str::len)
        .collect();
    let nanp = matches!(groups.as_slice(), [3, 3, 4] | [1, 3, 3, 4])
        && (main.contains('(') || main.contains('-') || dots == 2 || main.contains(' '));
    if nanp && !(dots > 0 && groups.len() == 4) {
        return true;
    }
    if dots > 0 {
        return false;
    }
    // A date (2024-07-07) is not a number to call.
    if matches!(groups.as_slice(), [4, 2, 2] | [2, 2, 4]) {
        return false;
    }
    let national =
        main.starts_with('0') && separators > 0 && digits.len() >= 10 && groups.len() <= 3;
    national || (keyword && (digits.len() >= 9 || separators > 0))
}

/// At least two of lower, upper and digits, and not one repeated or sequential character.
fn looks_random(v: &str) -> bool {
    let lower = v.bytes().any(|b| b.is_ascii_lowercase());
    let upper = v.bytes().any(|b| b.is_ascii_uppercase());
    let digit = v.bytes().any(|b| b.is_ascii_digit());
    let classes = usize::from(lower) + usize::from(upper) + usize::from(digit);
    classes >= 2
        && upper
        && !v.bytes().all(|b| b.is_ascii_hexdigit())
        && entropy(v) >= 3.0
        && !is_uuid(v)
}

fn is_uuid(v: &str) -> bool {
    v.len() == 36 && v.split('-').map(str::len).eq([8, 4, 4, 4, 12])
}

/// Shannon entropy in bits per character.
fn entropy(v: &str) -> f32 {
    let mut counts = [0u32; 256];
    for b in v.bytes() {
        if let Some(c) = counts.get_mut(usize::from(b)) {
            *c += 1;
        }
    }
    let n = v.len().max(1) as f32;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = c as f32 / n;
            -p * p.log2()
        })
        .sum()
}

/// Documentation examples and template placeholders.
fn is_placeholder(v: &str) -> bool {
    let upper = v.to_ascii_uppercase();
    upper.contains("EXAMPLE")
        || upper.contains("YOUR_")
        || upper.contains("YOUR-")
        || upper.contains("PLACEHOLDER")
        || upper.contains("CHANGEME")
        || upper.contains("REDACTED")
        || upper.contains("XXXX")
        || v.contains("****")
        || v.contains("${")
        || v.contains("{{")
        || (v.starts_with('<') && v.ends_with('>'))
        || v.bytes()
            .skip(4)
            .collect::<Vec<_>>()
            .windows(8)
            .any(|w| w.iter().all(|b| Some(b) == w.first()))
}

/// Where a text's PEM `-----BEGIN ` and `-----END ` lines are, found once per scan: a
/// search of the 4 KiB before every token was 140 bytes of search per byte of a text of
/// random-looking tokens.
struct PemLines {
    begins: Vec<usize>,
    ends: Vec<usize>,
}

impl PemLines {
    fn of(text: &str) -> Self {
        let find = |needle: &[u8]| memchr::memmem::find_iter(text.as_bytes(), needle).collect();
        Self {
            begins: find(b"-----BEGIN "),
            ends: find(b"-----END "),
        }
    }
}

/// Whether `at` lies in a PEM block (a BEGIN line in the 4 KiB before it with no END line
/// after that) or right after `data:...;base64,` or a digest prefix.
fn in_pem_or_data(text: &str, pem: &PemLines, at: usize) -> bool {
    let mut from = at.saturating_sub(4096);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let before = text.get(from..at).unwrap_or("");
    // The last BEGIN wholly inside `from..at`, and whether an END lies wholly between it and
    // `at`.
    let last_begin = pem
        .begins
        .get(..pem.begins.partition_point(|b| b + 11 <= at))
        .and_then(|b| b.last())
        .filter(|b| **b >= from);
    if let Some(&begin) = last_begin {
        let first_end = pem.ends.get(pem.ends.partition_point(|e| *e < begin));
        if first_end.is_none_or(|e| e + 9 > at) {
            return true;
        }
    }
    let mut cut = before.len().saturating_sub(24);
    while !before.is_char_boundary(cut) {
        cut += 1;
    }
    let near = before.get(cut..).unwrap_or("");
    near.contains(";base64,")
        || near.ends_with("sha256-")
        || near.ends_with("sha384-")
        || near.ends_with("sha512-")
        || near.ends_with("sha1-")
}

/// GitHub's token checksum: the last six characters are the CRC32 of the 30 before them, in
/// base62, zero-padded.
fn github_checksum(token: &str) -> bool {
    let Some((_, body)) = token.split_once('_') else {
        return false;
    };
    if body.len() != 36 {
        return false;
    }
    let (random, check) = body.split_at(30);
    let mut n = crc32fast::hash(random.as_bytes());
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET.get((n % 62) as usize).copied().unwrap_or(b'0');
        n /= 62;
    }
    out == check.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_found_as_a_search_of_the_whole_text_finds_them() {
        // The candidate slices around each `@` and `://` must find what the regexes find over
        // the whole text (addresses here are far shorter than the 64/256/320-byte bounds).
        let s = Scanner::new();
        let pieces = [
            "a",
            "Bo",
            "x9",
            ".",
            "-",
            "_",
            "+",
            "%",
            "@",
            "@",
            "example",
            ".com",
            ".io",
            "c",
            " ",
            "\n",
            "\"",
            "'",
            "\u{e9}",
            "\u{3b1}",
            "://",
            "postgres",
            "MySQL",
            "mongodb+srv",
            "PostgreSQL",
            "rediss",
            "amqps",
            "sqlserver",
            "cockroachdb",
            "x+srv",
            "user",
            ":",
            "pw123",
            "s3cr3t",
            "/db",
            "[",
            "]",
            "1",
            "\u{2014}",
        ];
        // Word boundaries next to non-ASCII letters, underscores and `+srv`, then random mixes.
        let fixed = [
            "\u{e9}postgres://user:pw123@db/x and postgres://user:pw123@db/x",
            "xpostgres://user:pw123@db _mysql://u:pass@h \u{3b1}redis://u:pass@h",
            "\u{e9}bob@example.com bob_@example.com \u{e9}@example.com b@\u{e9}xample.com",
            "mongodb+srv://u:secret@h x+srv://u:secret@h +srv://u:secret@h",
            "postgres://someuser:CHANGEME-mysql://root:hunter2pass@10.0.0.5/prod",
            "postgres://nothing here mysql://u:pw123@longhost.example.internal/db",
            "po\u{17f}tgres://admin:hunter22@db.internal/app",
        ]
        .map(String::from);
        let random = crate::random_texts(&pieces, 4_000, 30, 0x51f1_5e7a_1b2c_3d4e);
        for text in fixed.into_iter().chain(random) {
            let mut ours = Vec::new();
            s.addresses(&text, &mut ours);
            // Connection strings: the regex's match from every place one can start (a string
            // whose password is a placeholder must not hide one inside it); e-mail addresses:
            // the regex over the whole text. Compared after the overlap rule.
            let mut whole = Vec::new();
            for at in (0..text.len()).filter(|i| text.is_char_boundary(*i)) {
                if let Some(c) = s.db.captures_at(&text, at)
                    && c.get(0).is_some_and(|m| m.start() == at)
                {
                    s.connection_string(0, &c, &mut whole);
                }
            }
            for m in s.email.find_iter(&text) {
                whole.push((m.start(), m.end(), EMAIL));
            }
            let spans = |f: Vec<(usize, usize, Entity)>| -> Vec<(usize, usize, &str)> {
                resolve(f)
                    .into_iter()
                    .map(|(a, b, e)| (a, b, e.name))
                    .collect()
            };
            assert_eq!(spans(ours), spans(whole), "{text:?}");
        }
    }

    #[test]
    fn resolving_overlaps_keeps_what_the_pairwise_check_kept() {
        // The overlap rule checked against every kept span, as it was before the ordered map.
        let pairwise = |mut found: Vec<(usize, usize, Entity)>| {
            found.sort_by(|a, b| {
                b.2.priority
                    .cmp(&a.2.priority)
                    .then((b.1 - b.0).cmp(&(a.1 - a.0)))
                    .then(a.0.cmp(&b.0))
            });
            let mut kept: Vec<(usize, usize, Entity)> = Vec::new();
            for f in found {
                if kept.iter().all(|k| f.1 <= k.0 || f.0 >= k.1) {
                    kept.push(f);
                }
            }
            kept.sort_by_key(|k| k.0);
            kept
        };
        let entities = [EMAIL, PHONE, CREDIT_CARD, GENERIC_SECRET, IBAN];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..2_000 {
            let found: Vec<(usize, usize, Entity)> = (0..next(40))
                .map(|_| {
                    let start = next(200) as usize;
                    let len = 1 + next(30) as usize;
                    let e = entities[next(entities.len() as u64) as usize];
                    (start, start + len, e)
                })
                .collect();
            let key = |v: Vec<(usize, usize, Entity)>| -> Vec<(usize, usize, &str)> {
                v.into_iter().map(|(a, b, e)| (a, b, e.name)).collect()
            };
            assert_eq!(key(resolve(found.clone())), key(pairwise(found)));
        }
    }

    fn entities(text: &str) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        Scanner::new().scan(text, &mut out);
        out.into_iter()
            .map(|f| {
                (
                    f.entity.unwrap_or(""),
                    text.get(f.start..f.end).unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn github_token(random: &str) -> String {
        let mut n = crc32fast::hash(random.as_bytes());
        let alphabet = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut check = [b'0'; 6];
        for slot in check.iter_mut().rev() {
            *slot = alphabet[(n % 62) as usize];
            n /= 62;
        }
        format!("ghp_{random}{}", String::from_utf8_lossy(&check))
    }

    #[test]
    fn each_entity_is_found_with_its_exact_span() {
        let gh = github_token("HrVHNpOPD6XSTSTa9vEZhvlsre9ZFI");
        let cases: Vec<(String, &str, String)> = vec![
            ("card 4111 1111 1111 1111 ok".into(), "CREDIT_CARD", "4111 1111 1111 1111".into()),
            ("mc 2223000048400011.".into(), "CREDIT_CARD", "2223000048400011".into()),
            ("maestro 503868327753".into(), "CREDIT_CARD", "503868327753".into()),
            ("amex 3457-897592-08962".into(), "CREDIT_CARD", "3457-897592-08962".into()),
            ("SSN: 123-45-6789".into(), "US_SSN", "123-45-6789".into()),
            ("social=409098281".into(), "US_SSN", "409098281".into()),
            ("IBAN DE89 3704 0044 0532 0130 00".into(), "IBAN", "DE89 3704 0044 0532 0130 00".into()),
            ("mail bryan@example.org now".into(), "EMAIL", "bryan@example.org".into()),
            ("call +1 (293) 494-5893".into(), "PHONE", "+1 (293) 494-5893".into()),
            ("908.418.4680x3768".into(), "PHONE", "908.418.4680x3768".into()),
            ("fyi 0113 4960181".into(), "PHONE", "0113 4960181".into()),
            ("Phone: 4074946835".into(), "PHONE", "4074946835".into()),
            ("key AKIA37UABTXUJDCSOX6I".into(), "AWS_ACCESS_KEY_ID", "AKIA37UABTXUJDCSOX6I".into()),
            (format!("token {gh}"), "GITHUB_TOKEN", gh.clone()),
            ("glpat-xtHe3vfwjev3suEoiCKa".into(), "GITLAB_TOKEN", "glpat-xtHe3vfwjev3suEoiCKa".into()),
            ("https://hooks.slack.com/services/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".into(), "SLACK_WEBHOOK", "https://hooks.slack.com/services/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".into()),
            ("sk_live_Cy8eVVNrdRgipeuJXfMpWU5s".into(), "STRIPE_SECRET_KEY", "sk_live_Cy8eVVNrdRgipeuJXfMpWU5s".into()),
            ("AIzahFOWgzexlf6xpUptwrRbMgl9OIGixCckFJq".into(), "GOOGLE_API_KEY", "AIzahFOWgzexlf6xpUptwrRbMgl9OIGixCckFJq".into()),
            ("postgres://joseph93:gEkNI4k60UP#ov#L@cache.prod.local:5432/argue here".into(), "DB_CONNECTION_STRING", "postgres://joseph93:gEkNI4k60UP#ov#L@cache.prod.local:5432/argue".into()),
            ("api_secret: JHKBJh/riNpCTCj9OOFnw3jjzKO33kqo2slxnTr9q8CP.".into(), "GENERIC_SECRET", "JHKBJh/riNpCTCj9OOFnw3jjzKO33kqo2slxnTr9q8CP".into()),
            ("k = \"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA\n-----END EC PRIVATE KEY-----\"".into(), "PRIVATE_KEY", "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA\n-----END EC PRIVATE KEY-----".into()),
            ("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".into(), "JWT", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".into()),
        ];
        for (text, entity, value) in cases {
            let found = entities(&text);
            assert!(
                found.iter().any(|(e, v)| *e == entity && *v == value),
                "{text}: {found:?}"
            );
        }
    }

    #[test]
    fn prefixed_formats_are_found_as_trying_every_prefix_finds_them() {
        // Every prefix tried with its regex from its start, as before the shortcuts for runs
        // of JWT and `xoxa-` characters, OpenAI keys and PEM END lines, against the search
        // with them, after the overlap rule (placeholders inside runs included).
        let s = Scanner::new();
        let reference = |text: &str| {
            let mut found = Vec::new();
            let Some(prefixes) = &s.prefixes else {
                return found;
            };
            for m in prefixes.find_iter(text) {
                let Some(p) = s.prefixed.get(m.pattern().as_usize()) else {
                    continue;
                };
                let start = m.start();
                let after_word = start
                    .checked_sub(1)
                    .and_then(|i| text.as_bytes().get(i))
                    .is_some_and(u8::is_ascii_alphanumeric);
                let Some(rest) = text.get(start..).filter(|_| !after_word) else {
                    continue;
                };
                let Some(hit) = p.regex.find(rest) else {
                    continue;
                };
                let value = hit.as_str();
                let mut end = start + hit.end();
                if is_placeholder(value) {
                    continue;
                }
                match p.entity.name {
                    "GITHUB_TOKEN"
                        if !value.starts_with("github_pat_") && !github_checksum(value) =>
                    {
                        continue;
                    }
                    "PRIVATE_KEY" => {
                        let Some(close) = rest.find("-----END ") else {
                            continue;
                        };
                        let Some(d) = rest.get(close + 9..).and_then(|r| r.find("-----")) else {
                            continue;
                        };
                        end = start + close + 9 + d + 5;
                    }
                    _ => {}
                }
                found.push((start, end, p.entity));
            }
            found
        };
        let pieces = [
            "eyJ",
            "eyJhbGciOiJIUzI1NiJ9",
            ".",
            "-",
            "_",
            "abcdefgh",
            "EXAMPLE",
            "XXXX",
            "aaaaaaaa",
            "xoxa-",
            "12-",
            "1-",
            "ABCDEFGHIJKLMNOPQRST",
            " ",
            "sk-",
            "sk-proj-",
            "T3BlbkFJ",
            "-----BEGIN PRIVATE KEY-----\n",
            "-----END PRIVATE KEY-----",
            "\n",
            "MIIEvQ",
            "${x}",
            "{{",
            "a",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.",
            "dozjgNryP4J3jVmNHl0w5N_XgL0",
            "xoxa-12-ABCDEFGHIJKLMNOPQRSTUV",
            "eyJEXAMPLE",
            "xoxa-xoxa-",
            "eyJXXXXabc-",
        ];
        let key = |v: Vec<(usize, usize, Entity)>| -> Vec<(usize, usize, &str)> {
            v.into_iter().map(|(a, b, e)| (a, b, e.name)).collect()
        };
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        // A failed boundary, a failed `xoxa-` before a good one, placeholders before real
        // tokens in one run, then random mixes.
        let fixed = [
            format!("aeyJ12345678-{jwt}"),
            "xoxa-xoxa-12-ABCDEFGHIJKLMNOPQRSTUV".to_string(),
            format!("eyJEXAMPLEabc-{jwt}"),
            format!("eyJXXXXXXXXXXX-eyJXXXX-eyJabcdefghij-{jwt}"),
            "xoxa-1-XXXXxoxa-12-ABCDEFGHIJKLMNOPQRSTUV".to_string(),
            // Eight equal bytes three bytes into the inner token: not a placeholder there.
            "eyJXXXXabc-eyJaaaaaaaa.eyJabcdefghij.abcdefghijklmnopqrst".to_string(),
        ];
        let random = crate::random_texts(&pieces, 4_000, 40, 0x00de_cade_0fba_5e64);
        let mut any = 0;
        for text in fixed.into_iter().chain(random) {
            let mut ours = Vec::new();
            s.prefixed(&text, &mut ours);
            let theirs = reference(&text);
            any += usize::from(!theirs.is_empty());
            assert_eq!(key(resolve(ours)), key(resolve(theirs)), "{text:?}");
        }
        assert!(any > 400, "only {any} texts with a finding");
    }

    #[test]
    fn openai_keys_are_read_as_their_regex_reads_them() {
        // The key's end from each `sk-`, worked out without the regex where the first form
        // cannot match, against the regex from each `sk-`.
        let s = Scanner::new();
        let Some(p) = s.prefixed.iter().find(|p| p.prefix == "sk-") else {
            panic!("the OpenAI format is there");
        };
        let pieces = [
            "sk-",
            "sk-proj-",
            "proj-",
            "svcacct-",
            "admin-",
            "T3BlbkFJ",
            "abcdefghij",
            "ABCDEFGHIJKLMNOPQRST",
            "0123456789",
            "_",
            "-",
            " ",
            ".",
            "\n",
            "x",
        ];
        let mut keys = 0;
        for text in crate::random_texts(&pieces, 4_000, 60, 0x7e57_c0de_5eed_0001) {
            let bytes = text.as_bytes();
            let mut marks = None;
            let mut run = crate::NextFound::new(|b: &[u8]| {
                b.iter().position(|c| !BASE64URL[usize::from(*c)])
            });
            for start in memchr::memmem::find_iter(bytes, b"sk-") {
                let rest = text.get(start..).unwrap_or_default();
                let ours = openai_key(&p.regex, bytes, rest, start, &mut marks, &mut run);
                assert_eq!(
                    ours,
                    p.regex.find(rest).map(|m| m.end()),
                    "{text:?} at {start}"
                );
                keys += usize::from(ours.is_some());
            }
        }
        assert!(keys > 500, "only {keys} keys in the mixes");
    }

    #[test]
    fn formats_are_found_after_many_false_starts_of_their_kind() {
        // Each format after prefixes that start it and go nowhere (searched once, not from
        // each of them), and the Slack refresh token, whose prefix is `xoxe.`. (A key block
        // runs from the first BEGIN line to its END line.)
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----";
        let xoxa = "xoxa-2-AbCdEfGhIjKlMnOpQrStUv";
        let xoxe = "xoxe.xoxp-1-Mi0yLTE3MjQ3OTk2NjUtNzA5MjM0";
        let cases = [
            (format!("{} {jwt}", "eyJ-".repeat(2_000)), "JWT", jwt),
            (
                format!("{}\n{pem}", "-----BEGIN PRIVATE KEY-----\n".repeat(2_000)),
                "PRIVATE_KEY",
                pem,
            ),
            (
                format!("{} {xoxa}", "xoxa-1-".repeat(2_000)),
                "SLACK_TOKEN",
                xoxa,
            ),
            (format!("refresh {xoxe} end"), "SLACK_TOKEN", xoxe),
        ];
        for (text, entity, value) in cases {
            let found = entities(&text);
            assert!(
                found.iter().any(|(e, v)| *e == entity
                    && v.ends_with(value)
                    && (entity == "PRIVATE_KEY" || v == value)),
                "{entity}: {:?}",
                found.iter().map(|(e, v)| (e, v.len())).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn decoys_are_not_reported() {
        let decoys = [
            "card 4111 1111 1111 1112",
            "item=787-00-9232 and 000-87-6603 and 666-78-2944",
            "IBAN GB49 FPAU 1406 4900 6364 72",
            "AKIAIOSFODNN7EXAMPLE and wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx and xoxb-your-token and YOUR_API_KEY_HERE",
            "commit 9e682dbc7d50837345d27554747485ed55f210e8 id 448255da-fe7d-4f41-920d-dffa6304b480",
            "isbn 9780931234262 tracking 1ZGEOPM2FB26QBB0UV 9400122819394450874230",
            "pk_live_djwe8L4Uo4CmM1U9GC2XTWE5 ch_9DDKYgoSjWb63F",
            "version 16.30.5 on 2023-10-04, build 03577065, ORD-0328323890",
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAWLhacXP38lxcbTj93E//drHzVgz8xPKgBbhQO1Wslfg=\n-----END PUBLIC KEY-----",
            "digest sha256:41656f257b779bb16bd1ef05cf38e6112c947e2d63a6811f4477a304ac5a5ca7",
            "integrity sha512-DWMHJBA7nAt6oNOXK+shH3jOMTDiE97Ms9MfmUgsiqlxyvAbCdEf==",
            "https://www.youtube.com/watch?v=Pw0LV6VaHqu",
        ];
        for text in decoys {
            assert_eq!(entities(text), vec![], "{text}");
        }
    }

    #[test]
    fn validators() {
        assert!(is_iban("DE89370400440532013000"));
        assert!(!is_iban("DE89370400440532013001"));
        assert!(is_card(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]));
        assert!(!is_card(&[9, 7, 8, 0, 9, 3, 1, 2, 3, 4, 2, 6, 2]));
        assert!(github_checksum(&github_token(
            "HrVHNpOPD6XSTSTa9vEZhvlsre9ZFI"
        )));
        assert!(!github_checksum("ghp_HrVHNpOPD6XSTSTa9vEZhvlsre9ZFI000000"));
    }
}
