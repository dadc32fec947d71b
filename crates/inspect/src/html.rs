//! Hidden HTML and Markdown content: text a browser or Markdown renderer does not show a
//! human, but an agent reading the source does.
//!
//! HTML is parsed with `lol_html` (streaming, the tokenizer browsers' rules). Text counts as
//! hidden inside elements that are `hidden`, `<template>`, `<noscript>`, or styled (inline or
//! by a class or id rule of an earlier `<style>`) with `display:none`, `visibility:hidden`,
//! `opacity:0`, a zero or one-pixel font, the same colour as their background, near-white
//! tiny text, off-screen positioning, `clip`/`clip-path` to nothing, or `transform:scale(0)`.
//! Comments, `<meta>` contents, `alt` and `title` attributes are extracted too. In Markdown,
//! `[//]: # (...)` and `[label]: <> "..."` comments and link-reference definition titles.
//!
//! Hidden is not malicious (cookie banners, menus, "do not edit" comments): every extracted
//! text is judged by [`Judge`](crate::instruct::Judge), and only text that instructs is an
//! injection finding; hidden text that does not is recorded as `hidden` at info level.

use crate::instruct::{Context, Judge};
use crate::{Category, Finding, Severity};
use lol_html::{doc_comments, element};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// A piece of hidden or extracted text and where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    /// How it was hidden (`display_none`, `comment`, `alt_text`, ...).
    pub technique: &'static str,
    /// Byte span in the source.
    pub start: usize,
    /// End (exclusive).
    pub end: usize,
    /// The text, entities decoded.
    pub text: String,
    /// Whether a reader cannot see it (false for `alt`, `title` and `meta`, which some
    /// renderers show).
    pub concealed: bool,
}

/// What parsing a document found.
#[derive(Debug, Default)]
pub struct Document {
    /// Hidden and extracted texts.
    pub segments: Vec<Segment>,
    /// The visible text, chunks separated by newlines.
    pub visible: String,
    /// (offset in `visible`, offset in the source) at the start of each chunk.
    pub map: Vec<(usize, usize)>,
}

impl Document {
    /// The source offset of a byte offset in [`Document::visible`].
    pub fn source_offset(&self, at: usize) -> usize {
        let i = self
            .map
            .partition_point(|(v, _)| *v <= at)
            .saturating_sub(1);
        self.map.get(i).map_or(0, |(v, s)| s + (at - v))
    }
}

/// Whether `text` has markup worth parsing: a `<` followed by a letter, `!` or `/`.
pub fn looks_like_html(text: &str) -> bool {
    let bytes = text.as_bytes();
    memchr::memchr_iter(b'<', bytes).any(|i| {
        bytes
            .get(i + 1)
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'!' || *b == b'/')
    })
}

/// Finds hidden HTML and Markdown content in `text` and judges it; returns the parsed
/// document (its visible text is for the instruction judge), or `None` for non-HTML text.
pub fn scan(
    text: &str,
    judge: &Judge,
    budget: &mut usize,
    out: &mut Vec<Finding>,
) -> Option<Document> {
    let mut segments = markdown(text);
    let visible = if looks_like_html(text) {
        let mut doc = parse(text);
        segments.append(&mut doc.segments);
        Some(doc)
    } else {
        None
    };
    for seg in segments {
        if *budget == 0 {
            break;
        }
        let words = seg.text.split_whitespace().count();
        if words == 0 {
            continue;
        }
        *budget = budget.saturating_sub(seg.text.len());
        let detector = detector_name(seg.technique);
        let context = if seg.concealed {
            Context::Hidden
        } else {
            Context::Visible
        };
        if judge.report_extracted(&seg.text, context, detector, (seg.start, seg.end), out) {
            continue;
        }
        if seg.concealed && !matches!(seg.technique, "comment" | "markdown_comment") {
            out.push(Finding {
                detector,
                category: Category::Hidden,
                entity: None,
                start: seg.start,
                end: seg.end,
                severity: Severity::Info,
                score: 0.1,
                revealed: None,
            });
        }
    }
    visible
}

fn detector_name(technique: &str) -> &'static str {
    match technique {
        "comment" => "html.comment",
        "markdown_comment" => "markdown.comment",
        "markdown_link_title" => "markdown.link_title",
        "display_none" => "html.display_none",
        "visibility_hidden" => "html.visibility_hidden",
        "opacity_zero" => "html.opacity_zero",
        "font_size_zero" => "html.font_size_zero",
        "same_colour" => "html.same_colour",
        "tiny_light_text" => "html.tiny_light_text",
        "offscreen" => "html.offscreen",
        "clipped" => "html.clipped",
        "hidden_attribute" => "html.hidden_attribute",
        "hidden_class" => "html.hidden_class",
        "noscript" => "html.noscript",
        "template" => "html.template",
        "meta" => "html.meta",
        "alt_text" => "html.alt_text",
        "tiny_image" => "html.tiny_image",
        "title_attribute" => "html.title_attribute",
        "zero_size" => "html.zero_size",
        _ => "html.hidden",
    }
}

/// A tag name, lowercase, kept inline (names are short; longer ones are cut at 15 bytes,
/// which only matters for telling two such custom elements apart); the last byte is the length.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Tag {
    bytes: [u8; 16],
}

impl Tag {
    /// The tag named by `bytes[start..end]`. Where 16 bytes can be read from `start` (all but
    /// the document's last few), the name is read as one word, masked to its length and
    /// lowercased in the word (bytes `A`-`Z` get bit 5): building it byte by byte, with a shift
    /// per byte, was a sixth of the tokenizer's time. Also tells whether the name is the source
    /// bytes unchanged (no capitals, not cut), so the caller can use them as the name's text.
    fn at(bytes: &[u8], start: usize, end: usize) -> (Self, bool) {
        let len = end.saturating_sub(start).min(15);
        let Some(word) = bytes
            .get(start..start + 16)
            .and_then(|w| <[u8; 16]>::try_from(w).ok())
        else {
            return (
                Self::new(bytes.get(start..start + len).unwrap_or_default()),
                false,
            );
        };
        const LOW7: u128 = u128::from_le_bytes([0x7f; 16]);
        const HIGH: u128 = u128::from_le_bytes([0x80; 16]);
        let word = u128::from_le_bytes(word) & ((1u128 << (8 * len)) - 1);
        // Per byte, without carries between bytes (each sum stays below 0x100): the high bit
        // of `ge_a` is set where the low seven bits are at least `A`, that of `gt_z` where they
        // are above `Z`; bytes with their own high bit set are not ASCII letters.
        let low = word & LOW7;
        let ge_a = low + u128::from_le_bytes([0x80 - b'A'; 16]);
        let gt_z = low + u128::from_le_bytes([0x80 - b'Z' - 1; 16]);
        let upper = ge_a & !gt_z & !word & HIGH;
        let tag = Self {
            bytes: (word | upper >> 2 | (len as u128) << 120).to_le_bytes(),
        };
        (tag, upper == 0 && end - start <= 15)
    }

    fn new(name: &[u8]) -> Self {
        // Built in a register and stored whole: byte-by-byte stores read back as wider words
        // would stall on store forwarding at every tag.
        let mut word = 0u128;
        let mut len = 0u128;
        for (i, b) in name.iter().take(15).enumerate() {
            word |= u128::from(b.to_ascii_lowercase()) << (8 * i);
            len += 1;
        }
        Self {
            bytes: (word | len << 120).to_le_bytes(),
        }
    }

    fn name(&self) -> &[u8] {
        let len = usize::from(self.bytes[15]).min(15);
        self.bytes.get(..len).unwrap_or(&[])
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.name()).unwrap_or("")
    }
}

/// How deep the open-element stack grows before its tags are counted (see `Parser::open`);
/// below that, an unmatched end tag walks at most this many elements.
const DEEP: usize = 64;
/// How shallow it gets again before the counts are dropped (the gap keeps a stack that moves
/// around one depth from recounting it at every step).
const SHALLOW: usize = 16;

struct Open {
    tag: Tag,
    /// This element opened a hidden segment (its index).
    segment: Option<usize>,
}

const BLOCKS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "div",
    "dl",
    "fieldset",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "ul",
];

/// Elements without content (no end tag).
fn is_void(tag: &str) -> bool {
    matches!(
        tag,
        "area"
            | "base"
            | "br"
            | "col"
            | "embed"
            | "hr"
            | "img"
            | "input"
            | "link"
            | "meta"
            | "param"
            | "source"
            | "track"
            | "wbr"
    )
}

/// Elements whose content is raw text up to their end tag (browsers run with scripting on, so
/// `<noscript>` is one of them).
fn is_raw_text(tag: &str) -> bool {
    matches!(
        tag,
        "script"
            | "style"
            | "textarea"
            | "title"
            | "xmp"
            | "iframe"
            | "noembed"
            | "noframes"
            | "noscript"
    )
}

/// One start tag's attributes (names as written; compared without regard to case), with a
/// mask of which of the names the scanner asks about on every tag are present, so asking for
/// an absent one (the usual case) does not walk the list.
struct Attrs<'a> {
    list: Vec<(&'a str, &'a str)>,
    present: u8,
}

/// The names in [`Attrs::present`], one bit each.
const MASKED: [&str; 6] = ["alt", "title", "style", "class", "id", "hidden"];

impl<'a> Attrs<'a> {
    fn new(list: Vec<(&'a str, &'a str)>) -> Self {
        let present = list.iter().fold(0u8, |mask, (n, _)| mask | bit(n));
        Self { list, present }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        let b = bit(name);
        if b != 0 && self.present & b == 0 {
            return None;
        }
        self.list
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// The bit of an attribute name in [`MASKED`] (any case), or 0.
fn bit(name: &str) -> u8 {
    MASKED
        .iter()
        .position(|m| m.len() == name.len() && m.eq_ignore_ascii_case(name))
        .map_or(0, |i| 1 << i)
}

/// The parser state: open elements, the hidden segment being filled, and what was found.
struct Parser<'t> {
    text: &'t str,
    stack: Vec<Open>,
    /// While `stack` is deep, how many of each tag are on it: an end tag that closes nothing
    /// open is then dropped without a walk down the stack (`<b></i>` repeated made each `</i>`
    /// walk all the `<b>`s). Kept only past [`DEEP`] elements (real pages stay far below; the
    /// hashing would cost every element), and dropped again below [`SHALLOW`].
    open: Option<HashMap<Tag, u32>>,
    /// [`DEEP`] (a field so a test can turn the counting off).
    deep: usize,
    hidden: Option<usize>,
    hidden_classes: HashSet<String>,
    hidden_ids: HashSet<String>,
    doc: Document,
}

impl<'t> Parser<'t> {
    /// Pops elements an opening `tag` closes implicitly (`<p>` before a block, `<li>` before
    /// `<li>`).
    fn auto_close(&mut self, tag: &str, at: usize) {
        while let Some(top) = self.stack.last() {
            let top_tag = top.tag;
            let closes = match top_tag.name() {
                b"p" => BLOCKS.contains(&tag),
                b"li" => tag == "li",
                b"dt" | b"dd" => tag == "dt" || tag == "dd",
                b"option" => tag == "option",
                b"tr" => tag == "tr",
                b"td" | b"th" => tag == "td" || tag == "th" || tag == "tr",
                _ => false,
            };
            if !closes {
                break;
            }
            self.pop_to(top_tag, at);
        }
    }

    /// Pops up to and including the innermost open `tag`; closes a hidden segment it opened.
    fn pop_to(&mut self, tag: Tag, at: usize) {
        // The usual case: the innermost element, which opened no segment.
        if self
            .stack
            .last()
            .is_some_and(|o| o.tag == tag && o.segment.is_none())
        {
            self.stack.pop();
            if self.open.is_some() {
                self.closed(tag);
            }
            return;
        }
        if self
            .open
            .as_ref()
            .is_some_and(|open| open.get(&tag).is_none_or(|n| *n == 0))
        {
            return;
        }
        let Some(pos) = self.stack.iter().rposition(|o| o.tag == tag) else {
            return;
        };
        // Innermost first.
        while self.stack.len() > pos {
            let Some(open) = self.stack.pop() else {
                break;
            };
            if self.open.is_some() {
                self.closed(open.tag);
            }
            if let Some(seg) = open.segment {
                if let Some(s) = self.doc.segments.get_mut(seg) {
                    s.end = s.end.max(at);
                }
                if self.hidden == Some(seg) {
                    self.hidden = None;
                }
            }
        }
    }

    /// Counts an element of `tag` off `open` (after it left `stack`).
    #[cold]
    #[inline(never)]
    fn closed(&mut self, tag: Tag) {
        if self.stack.len() < SHALLOW {
            self.open = None;
        } else if let Some(n) = self.open.as_mut().and_then(|open| open.get_mut(&tag)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Pushes an open element, counting it in `open` (made from the whole stack when the
    /// stack grows past [`DEEP`]).
    #[inline(always)]
    fn opened(&mut self, open: Open) {
        let tag = open.tag;
        self.stack.push(open);
        if self.open.is_some() || self.stack.len() > self.deep {
            self.count_opened(tag);
        }
    }

    #[cold]
    #[inline(never)]
    fn count_opened(&mut self, tag: Tag) {
        if let Some(counts) = self.open.as_mut() {
            *counts.entry(tag).or_insert(0) += 1;
        } else {
            let mut counts = HashMap::new();
            for o in &self.stack {
                *counts.entry(o.tag).or_insert(0) += 1;
            }
            self.open = Some(counts);
        }
    }

    /// Text content at `start..end` of the source.
    fn text(&mut self, start: usize, end: usize) {
        let Some(chunk) = self.text.get(start..end) else {
            return;
        };
        if let Some(seg) = self.hidden {
            if let Some(segment) = self.doc.segments.get_mut(seg) {
                if segment.text.len() < crate::MAX_DECODED {
                    segment.text.push_str(&unescape(chunk));
                }
                segment.end = segment.end.max(end);
            }
        } else if chunk
            .as_bytes()
            .first()
            // (An ASCII first byte that `trim` keeps, not U+0009 to U+000D or a space,
            // settles it without a call.)
            .is_some_and(|b| b.is_ascii() && !matches!(b, b'\t'..=b'\r' | b' '))
            || !chunk.trim().is_empty()
        {
            self.doc.map.push((self.doc.visible.len(), start));
            if crate::find_byte(b'&', chunk.as_bytes()).is_some() {
                self.doc.visible.push_str(&unescape(chunk));
            } else {
                self.doc.visible.push_str(chunk);
            }
            self.doc.visible.push('\n');
        }
    }

    fn comment(&mut self, start: usize, end: usize, body: &str) {
        let text = unescape(body).trim().to_string();
        if let Some(seg) = self.hidden {
            if let Some(segment) = self.doc.segments.get_mut(seg) {
                segment.text.push(' ');
                segment.text.push_str(&text);
            }
        } else if !text.is_empty() {
            self.doc.segments.push(Segment {
                technique: "comment",
                start,
                end,
                text,
                concealed: true,
            });
        }
    }

    fn start_tag(&mut self, name: Tag, tag: &str, attrs: &Attrs<'_>, start: usize, end: usize) {
        self.auto_close(tag, start);
        extract_attributes(tag, attrs, start..end, &mut self.doc.segments);
        if is_void(tag) {
            return;
        }
        let reason = if self.hidden.is_none() {
            hidden_reason(
                tag,
                |n| attrs.get(n),
                attrs.has("hidden"),
                &self.hidden_classes,
                &self.hidden_ids,
            )
        } else {
            None
        };
        let segment = reason.map(|technique| {
            self.doc.segments.push(Segment {
                technique,
                start,
                end,
                text: String::new(),
                concealed: true,
            });
            self.doc.segments.len() - 1
        });
        if segment.is_some() {
            self.hidden = segment;
        }
        self.opened(Open { tag: name, segment });
    }
}

/// Parses an HTML document into hidden segments and visible text, with a tokenizer that
/// follows the HTML tokenization rules for what matters here: tags and quoted attributes,
/// comments (`<!-- -->`, bogus `<! >` and `<? >`), raw-text elements (`script`, `style`,
/// `textarea`, `title`, `noscript`, ...) and character references.
pub fn parse(text: &str) -> Document {
    parse_counting_past(text, DEEP)
}

/// [`parse`], counting open tags past `deep` open elements.
fn parse_counting_past(text: &str, deep: usize) -> Document {
    let mut p = Parser {
        text,
        stack: Vec::new(),
        open: None,
        deep,
        hidden: None,
        hidden_classes: HashSet::new(),
        hidden_ids: HashSet::new(),
        doc: Document {
            // The visible text is at most the source and a line break (reserving it once
            // spares the copies of growing).
            visible: String::with_capacity(text.len() + 1),
            ..Document::default()
        },
    };
    let bytes = text.as_bytes();
    let mut attrs: Vec<(&str, &str)> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let Some(lt) = crate::find_byte(b'<', bytes.get(i..).unwrap_or_default()).map(|o| i + o)
        else {
            p.text(i, bytes.len());
            break;
        };
        let next = bytes.get(lt + 1).copied();
        match next {
            Some(b'!') if bytes.get(lt + 2..lt + 4) == Some(b"--") => {
                p.text(i, lt);
                let body_start = lt + 4;
                let (body_end, after) = match memchr::memmem::find(&bytes[body_start..], b"-->") {
                    Some(o) => (body_start + o, body_start + o + 3),
                    None => (bytes.len(), bytes.len()),
                };
                let body = text.get(body_start..body_end).unwrap_or("");
                p.comment(lt, after, body);
                i = after;
            }
            Some(b'!' | b'?') => {
                // A doctype or bogus comment: up to the next `>`.
                p.text(i, lt);
                let end = memchr::memchr(b'>', &bytes[lt..]).map_or(bytes.len(), |o| lt + o + 1);
                let body = text.get(lt + 2..end.saturating_sub(1)).unwrap_or("");
                if !body.to_ascii_lowercase().starts_with("doctype") {
                    p.comment(lt, end, body);
                }
                i = end;
            }
            Some(b'/') if bytes.get(lt + 2).is_some_and(u8::is_ascii_alphabetic) => {
                p.text(i, lt);
                let name_end = (lt + 2..bytes.len())
                    .find(|&j| {
                        bytes
                            .get(j)
                            .is_some_and(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
                    })
                    .unwrap_or(bytes.len());
                let (name, _) = Tag::at(bytes, lt + 2, name_end);
                let end = crate::find_byte(b'>', bytes.get(name_end..).unwrap_or_default())
                    .map_or(bytes.len(), |o| name_end + o + 1);
                p.pop_to(name, end);
                i = end;
            }
            Some(b) if b.is_ascii_alphabetic() => {
                p.text(i, lt);
                let (tag, as_written, end) = start_tag(text, lt, &mut attrs);
                // (The name as written when it is the tag's name: no UTF-8 check needed.)
                let name = match as_written {
                    Some(name) => name,
                    None => tag.as_str(),
                };
                let found = Attrs::new(std::mem::take(&mut attrs));
                p.start_tag(tag, name, &found, lt, end);
                // The buffer is kept for the next tag.
                attrs = found.list;
                i = end;
                if is_raw_text(name) {
                    // Raw text runs to `</name` (any case).
                    let close = find_end_tag(bytes, end, name);
                    let content = text.get(end..close).unwrap_or("");
                    match name {
                        "style" => {
                            let (classes, ids) = hidden_selectors(content);
                            p.hidden_classes.extend(classes);
                            p.hidden_ids.extend(ids);
                        }
                        "script" => {}
                        _ => p.text(end, close),
                    }
                    let after = memchr::memchr(b'>', &bytes[close.min(bytes.len())..])
                        .map_or(bytes.len(), |o| close + o + 1);
                    p.pop_to(tag, after);
                    i = after;
                }
            }
            _ => {
                // A lone `<` is text.
                p.text(i, lt + 1);
                i = lt + 1;
            }
        }
    }
    p.doc
}

/// Where `</name` starts at or after `from` (case-insensitive), or the end of input.
fn find_end_tag(bytes: &[u8], from: usize, name: &str) -> usize {
    let mut at = from;
    while let Some(o) = memchr::memmem::find(bytes.get(at..).unwrap_or(&[]), b"</") {
        let start = at + o;
        let candidate = bytes.get(start + 2..start + 2 + name.len());
        let after = bytes.get(start + 2 + name.len()).copied();
        if candidate.is_some_and(|c| c.eq_ignore_ascii_case(name.as_bytes()))
            && after.is_none_or(|b| b.is_ascii_whitespace() || b == b'/' || b == b'>')
        {
            return start;
        }
        at = start + 2;
    }
    bytes.len()
}

/// Bytes that end a tag name.
const NAME_END: [bool; 256] =
    crate::byte_class!(|b| b.is_ascii_whitespace() || b == b'/' || b == b'>');
/// Bytes that end an attribute name.
const ATTR_NAME_END: [bool; 256] =
    crate::byte_class!(|b| b.is_ascii_whitespace() || b == b'/' || b == b'>' || b == b'=');
/// Bytes that end an unquoted attribute value.
const UNQUOTED_END: [bool; 256] = crate::byte_class!(|b| b.is_ascii_whitespace() || b == b'>');
/// Bytes skipped between attributes.
const BETWEEN_ATTRS: [bool; 256] = crate::byte_class!(|b| b.is_ascii_whitespace() || b == b'/');
/// ASCII whitespace.
const SPACE: [bool; 256] = crate::byte_class!(|b| b.is_ascii_whitespace());

/// The first index at or after `from` whose byte is in `class` (or not in it, when `is` is
/// false), or the end of `bytes`.
fn scan_to(bytes: &[u8], from: usize, class: &[bool; 256], is: bool) -> usize {
    bytes
        .get(from..)
        .and_then(|rest| {
            rest.iter()
                .position(|b| class.get(usize::from(*b)).copied().unwrap_or(false) == is)
        })
        .map_or(bytes.len(), |o| from + o)
}

/// Parses the start tag at `lt`: its name and the index after `>`; its attributes go to
/// `attrs` (cleared first).
fn start_tag<'t>(
    text: &'t str,
    lt: usize,
    attrs: &mut Vec<(&'t str, &'t str)>,
) -> (Tag, Option<&'t str>, usize) {
    attrs.clear();
    let bytes = text.as_bytes();
    let mut j = scan_to(bytes, lt + 1, &NAME_END, true);
    let (name, unchanged) = Tag::at(bytes, lt + 1, j);
    let as_written = if unchanged { text.get(lt + 1..j) } else { None };
    loop {
        j = scan_to(bytes, j, &BETWEEN_ATTRS, false);
        match bytes.get(j) {
            None => return (name, as_written, bytes.len()),
            Some(b'>') => return (name, as_written, j + 1),
            _ => {}
        }
        let name_start = j;
        j = scan_to(bytes, j, &ATTR_NAME_END, true);
        let attr_name = text.get(name_start..j).unwrap_or("");
        j = scan_to(bytes, j, &SPACE, false);
        let mut value = "";
        if bytes.get(j) == Some(&b'=') {
            j = scan_to(bytes, j + 1, &SPACE, false);
            match bytes.get(j) {
                Some(&q @ (b'"' | b'\'')) => {
                    let end = crate::find_byte(q, bytes.get(j + 1..).unwrap_or_default())
                        .map_or(bytes.len(), |o| j + 1 + o);
                    value = text.get(j + 1..end).unwrap_or("");
                    j = (end + 1).min(bytes.len());
                }
                _ => {
                    let start = j;
                    j = scan_to(bytes, j, &UNQUOTED_END, true);
                    value = text.get(start..j).unwrap_or("");
                }
            }
        }
        if !attr_name.is_empty() {
            attrs.push((attr_name, value));
        } else {
            j += 1;
        }
    }
}

fn extract_attributes(
    tag: &str,
    attrs: &Attrs<'_>,
    at: std::ops::Range<usize>,
    segments: &mut Vec<Segment>,
) {
    let mut push = |technique: &'static str, text: String, concealed: bool| {
        if !text.trim().is_empty() {
            segments.push(Segment {
                technique,
                start: at.start,
                end: at.end,
                text,
                concealed,
            });
        }
    };
    if tag == "meta" {
        let name = attrs
            .get("name")
            .or_else(|| attrs.get("property"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let benign = matches!(
            name.as_str(),
            "viewport"
                | "theme-color"
                | "color-scheme"
                | "referrer"
                | "format-detection"
                | "robots"
                | "generator"
                | "charset"
                | ""
        );
        if !benign && let Some(content) = attrs.get("content") {
            push("meta", unescape(content), machine_meta(&name));
        }
        return;
    }
    if let Some(alt) = attrs.get("alt") {
        let tiny = ["width", "height"].iter().any(|a| {
            attrs.get(a).is_some_and(|v| {
                v.trim()
                    .trim_end_matches("px")
                    .parse::<f32>()
                    .is_ok_and(|n| n <= 1.0)
            })
        });
        if tiny {
            push("tiny_image", unescape(alt), true);
        } else {
            push("alt_text", unescape(alt), false);
        }
    }
    if let Some(title) = attrs.get("title") {
        push("title_attribute", unescape(title), false);
    }
}

/// A meta name that speaks to machines ("ai-instructions") is read by agents only.
fn machine_meta(name: &str) -> bool {
    [
        "ai",
        "llm",
        "agent",
        "instruction",
        "prompt",
        "assistant",
        "bot",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// Why an element hides its content, if it does. `get` reads an attribute (borrowed from the
/// source when scanning, owned from lol_html when sanitizing).
fn hidden_reason<S: AsRef<str>>(
    tag: &str,
    get: impl Fn(&str) -> Option<S>,
    hidden_attribute: bool,
    classes: &HashSet<String>,
    ids: &HashSet<String>,
) -> Option<&'static str> {
    match tag {
        "template" => return Some("template"),
        "noscript" => return Some("noscript"),
        _ => {}
    }
    if hidden_attribute {
        return Some("hidden_attribute");
    }
    if let Some(style) = get("style")
        && let Some(reason) = style_hides(style.as_ref())
    {
        return Some(reason);
    }
    if !classes.is_empty()
        && let Some(class) = get("class")
        && class
            .as_ref()
            .split_whitespace()
            .any(|c| classes.contains(c))
    {
        return Some("hidden_class");
    }
    if !ids.is_empty()
        && let Some(id) = get("id")
        && ids.contains(id.as_ref().trim())
    {
        return Some("hidden_class");
    }
    None
}

/// Whether a CSS declaration block hides its element, and how.
pub fn style_hides(style: &str) -> Option<&'static str> {
    let mut color: Option<String> = None;
    let mut background: Option<String> = None;
    let mut font_px: Option<f32> = None;
    let mut positioned = false;
    let mut far_offset = false;
    let mut zero_box = 0;
    let mut overflow_hidden = false;
    for decl in style.split(';') {
        let Some((prop, value)) = decl.split_once(':') else {
            continue;
        };
        let prop = prop.trim().to_ascii_lowercase();
        let value: String = value
            .to_ascii_lowercase()
            .replace("!important", "")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        match prop.as_str() {
            "display" if value == "none" => return Some("display_none"),
            "visibility" if value == "hidden" || value == "collapse" => {
                return Some("visibility_hidden");
            }
            "opacity" if value.parse::<f32>().is_ok_and(|o| o < 0.1) => {
                return Some("opacity_zero");
            }
            "font-size" => font_px = css_px(&value),
            "color" => color = Some(normalize_colour(&value)),
            "background" | "background-color" => background = Some(normalize_colour(&value)),
            "position" if value == "absolute" || value == "fixed" => positioned = true,
            "left" | "top" | "right" | "text-indent" | "margin-left"
                if css_px(&value).is_some_and(|v| v <= -999.0) =>
            {
                far_offset = true;
            }
            "clip" if value.starts_with("rect(0") => return Some("clipped"),
            "clip-path"
                if value.starts_with("inset(50%")
                    || value.starts_with("inset(100%")
                    || value.starts_with("circle(0") =>
            {
                return Some("clipped");
            }
            "transform" if value.contains("scale(0)") || value.contains("scale(0,") => {
                return Some("zero_size");
            }
            "width" | "height" | "max-width" | "max-height"
                if css_px(&value).is_some_and(|v| v <= 1.0) =>
            {
                zero_box += 1;
            }
            "overflow" if value == "hidden" => overflow_hidden = true,
            _ => {}
        }
    }
    if font_px.is_some_and(|px| px <= 0.5) {
        return Some("font_size_zero");
    }
    if let (Some(c), Some(b)) = (&color, &background)
        && !c.is_empty()
        && c == b
    {
        return Some("same_colour");
    }
    if color.as_deref() == Some("transparent") {
        return Some("same_colour");
    }
    if font_px.is_some_and(|px| px <= 2.0) && color.as_deref().is_some_and(is_near_white) {
        return Some("tiny_light_text");
    }
    if far_offset && (positioned || zero_box > 0) {
        return Some("offscreen");
    }
    if font_px.is_some_and(|px| px <= 1.0) {
        return Some("font_size_zero");
    }
    if zero_box >= 2 && overflow_hidden && !positioned {
        return Some("zero_size");
    }
    None
}

fn css_px(value: &str) -> Option<f32> {
    let v = value.trim();
    let (number, unit) = v
        .find(|c: char| c.is_ascii_alphabetic() || c == '%')
        .map_or((v, ""), |i| (&v[..i], &v[i..]));
    let n: f32 = number.trim().parse().ok()?;
    match unit {
        "" | "px" | "pt" => Some(n),
        "em" | "rem" => Some(n * 16.0),
        "%" => Some(n / 100.0 * 16.0),
        _ => None,
    }
}

fn normalize_colour(value: &str) -> String {
    let v = value.trim();
    let v = v.split_whitespace().next().unwrap_or("");
    match v {
        "white" | "#fff" | "#ffffff" | "rgb(255,255,255)" => "#ffffff".into(),
        "black" | "#000" | "#000000" | "rgb(0,0,0)" => "#000000".into(),
        other if other.len() == 4 && other.starts_with('#') => {
            let mut s = String::from("#");
            for c in other.chars().skip(1) {
                s.push(c);
                s.push(c);
            }
            s
        }
        other => other.to_string(),
    }
}

fn is_near_white(colour: &str) -> bool {
    let Some(hex) = colour.strip_prefix('#') else {
        return false;
    };
    if hex.len() != 6 {
        return false;
    }
    (0..3).all(|i| {
        hex.get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .is_some_and(|v| v >= 0xf0)
    })
}

/// Class and id selectors that a stylesheet hides (`.x{display:none}`, `#y{visibility:hidden}`).
fn hidden_selectors(css: &str) -> (Vec<String>, Vec<String>) {
    let mut classes = Vec::new();
    let mut ids = Vec::new();
    let mut rest = css;
    while let Some(open) = rest.find('{') {
        let selectors = &rest[..open];
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let body = &rest[open + 1..open + close];
        if style_hides(body).is_some() {
            for sel in selectors.split(',') {
                let sel = sel.trim();
                // Only simple selectors: `.name` or `#name`.
                if let Some(c) = sel.strip_prefix('.')
                    && !c.is_empty()
                    && c.chars()
                        .all(|ch| ch.is_alphanumeric() || ch == '-' || ch == '_')
                {
                    classes.push(c.to_string());
                }
                if let Some(i) = sel.strip_prefix('#')
                    && !i.is_empty()
                    && i.chars()
                        .all(|ch| ch.is_alphanumeric() || ch == '-' || ch == '_')
                {
                    ids.push(i.to_string());
                }
            }
        }
        rest = &rest[open + close + 1..];
    }
    (classes, ids)
}

/// Markdown comments (`[//]: # (...)`, `[comment]: <> "..."`) and link-reference definition
/// titles, which renderers never show.
fn markdown(text: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    if !text.contains("]:") {
        return out;
    }
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent > 3 || !trimmed.starts_with('[') {
            continue;
        }
        let Some(close) = trimmed.find("]:") else {
            continue;
        };
        let label = &trimmed[1..close];
        if label.is_empty() || label.contains(']') {
            continue;
        }
        let rest = trimmed[close + 2..].trim();
        // The destination, then an optional title in "", '' or ().
        let (dest, after) = match rest.strip_prefix('<') {
            Some(r) => match r.find('>') {
                Some(i) => (&r[..i], r[i + 1..].trim()),
                None => continue,
            },
            None => match rest.find(char::is_whitespace) {
                Some(i) => (&rest[..i], rest[i..].trim()),
                None => (rest, ""),
            },
        };
        let title = ["\"\"", "''", "()"].iter().find_map(|pair| {
            let (o, c) = (pair.chars().next()?, pair.chars().nth(1)?);
            after
                .strip_prefix(o)
                .and_then(|t| t.rfind(c).map(|i| &t[..i]))
        });
        let comment = label == "//"
            || label.eq_ignore_ascii_case("comment")
            || dest == "#"
            || dest.is_empty();
        let Some(title) = title else { continue };
        out.push(Segment {
            technique: if comment {
                "markdown_comment"
            } else {
                "markdown_link_title"
            },
            start,
            end: offset,
            text: unescape(title),
            concealed: true,
        });
    }
    out
}

/// Decodes the HTML character references agents see as text.
pub fn unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        // A reference's name is at most ten bytes: the `;` is looked for only that far (a
        // search to the end would make a text of `&`s without `;` quadratic).
        let end = memchr::memchr(b';', after.as_bytes().get(..11).unwrap_or(after.as_bytes()));
        let decoded = end.and_then(|e| {
            let name = &after[..e];
            let c = match name {
                "lt" => Some('<'),
                "gt" => Some('>'),
                "amp" => Some('&'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ => name.strip_prefix('#').and_then(|n| {
                    let code = match n.strip_prefix(['x', 'X']) {
                        Some(h) => u32::from_str_radix(h, 16).ok(),
                        None => n.parse().ok(),
                    };
                    code.and_then(char::from_u32)
                }),
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &after[e + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The document with hidden elements, comments and smuggling `<meta>` tags removed (an HTML
/// sanitizer for responses that policy says to clean). Non-HTML text comes back unchanged.
pub fn strip_hidden(text: &str) -> String {
    if !looks_like_html(text) {
        return text.to_string();
    }
    /// Hidden classes, hidden ids, and the stylesheet text being read.
    type Styles = Rc<RefCell<(HashSet<String>, HashSet<String>, String)>>;
    let hidden_classes: Styles = Rc::default();
    let classes = hidden_classes.clone();
    let styles = hidden_classes.clone();
    let result = lol_html::rewrite_str(
        text,
        lol_html::RewriteStrSettings::new()
            .append_element_content_handler(element!("*", move |el| {
                let tag = el.tag_name();
                let c = classes.borrow();
                if tag == "meta" {
                    let name = el
                        .get_attribute("name")
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    if machine_meta(&name) {
                        el.remove();
                    }
                    return Ok(());
                }
                if el.can_have_content()
                    && hidden_reason(
                        &tag,
                        |n| el.get_attribute(n),
                        el.has_attribute("hidden"),
                        &c.0,
                        &c.1,
                    )
                    .is_some()
                {
                    el.remove();
                }
                Ok(())
            }))
            .append_element_content_handler(lol_html::text!("style", move |t| {
                let mut s = styles.borrow_mut();
                s.2.push_str(t.as_str());
                if t.last_in_text_node() {
                    let css = std::mem::take(&mut s.2);
                    let (classes, ids) = hidden_selectors(&css);
                    s.0.extend(classes);
                    s.1.extend(ids);
                }
                Ok(())
            }))
            .append_document_content_handler(doc_comments!(|c| {
                c.remove();
                Ok(())
            })),
    );
    let stripped = result.unwrap_or_else(|_| text.to_string());
    // Markdown comments go too.
    stripped
        .split_inclusive('\n')
        .filter(|line| {
            let t = line.trim_start();
            !(t.starts_with("[//]:") || t.to_ascii_lowercase().starts_with("[comment]:"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_open_tags_on_deep_stacks_parses_as_walking_them() {
        // Deep nesting, end tags that close nothing, close something deep down, or close a
        // hidden element, in random orders: the document is the same whether unmatched end
        // tags are found by the counts (past 64 open elements) or by walking the stack.
        let pieces = [
            "<b>",
            "<i>",
            "<span>",
            "<div>",
            "<p>",
            "<li>",
            "</b>",
            "</i>",
            "</span>",
            "</div>",
            "</p>",
            "</li>",
            "</x>",
            "<div hidden>",
            "<span style=\"display:none\">",
            "text ",
            "<b><b><b><b><b><b><b><b><b><b><b><b><b><b><b><b>",
            "<i><i><i><i><i><i><i><i><i><i><i><i><i><i><i><i>",
            "</b></b></b></b></b></b></b></b></b></b></b></b>",
        ];
        let mut deep = 0;
        for text in crate::random_texts(&pieces, 1_500, 120, 0x005e_ed0f_0de7) {
            let counted = parse_counting_past(&text, DEEP);
            let walked = parse_counting_past(&text, usize::MAX);
            assert_eq!(counted.visible, walked.visible, "{text:?}");
            let segments = |d: &Document| -> Vec<(usize, usize, String)> {
                d.segments
                    .iter()
                    .map(|s| (s.start, s.end, s.text.clone()))
                    .collect()
            };
            assert_eq!(segments(&counted), segments(&walked), "{text:?}");
            deep += usize::from(text.matches('<').count() > 2 * DEEP);
        }
        assert!(deep > 100, "only {deep} deep documents");
    }

    #[test]
    fn tag_names_read_as_words_equal_the_byte_by_byte_names() {
        // Every byte value at every place of a name of every length, then random names of
        // letters, digits, punctuation and UTF-8 (cut at 15 bytes, even inside a character).
        let mut names: Vec<Vec<u8>> = Vec::new();
        for b in 0..=255u8 {
            for len in 1..=17 {
                for at in 0..len {
                    let mut name = b"aBzZ@[`{09-x_AQ".repeat(2);
                    name.truncate(len);
                    if let Some(slot) = name.get_mut(at) {
                        *slot = b;
                    }
                    names.push(name);
                }
            }
        }
        let pieces: [&[u8]; 9] = [
            b"A",
            b"z",
            b"Q",
            b"7",
            b"@",
            b"[",
            "é".as_bytes(),
            "\u{1F600}".as_bytes(),
            b"-",
        ];
        names.extend(crate::random_mixes(&pieces, 2000, 24, 99));
        for name in names {
            // Room to read 16 bytes, and none (the name at the document's end).
            for tail in [&b"> and the rest of the page"[..], b""] {
                let mut doc = b"<".to_vec();
                doc.extend_from_slice(&name);
                doc.extend_from_slice(tail);
                let (tag, unchanged) = Tag::at(&doc, 1, 1 + name.len());
                assert!(tag == Tag::new(&name), "{name:?}");
                // "Unchanged" exactly when the name is its own tag name (read as a word).
                if doc.len() >= 17 {
                    assert_eq!(unchanged, tag.name() == name.as_slice(), "{name:?}");
                } else {
                    assert!(!unchanged, "{name:?}");
                }
                let lower = name.to_ascii_lowercase();
                assert_eq!(tag.name(), lower.get(..15).unwrap_or(&lower), "{name:?}");
            }
        }
    }

    fn techniques(html: &str) -> Vec<(&'static str, String)> {
        let mut segs = markdown(html);
        if looks_like_html(html) {
            segs.extend(parse(html).segments);
        }
        segs.into_iter()
            .map(|s| (s.technique, s.text.trim().to_string()))
            .collect()
    }

    #[test]
    fn the_visible_text_skips_exactly_the_chunks_trim_empties() {
        for b in 0..=127u8 {
            let chunk = format!("<p>{}  </p><p>x</p>", char::from(b));
            if b == b'<' || b == b'&' {
                continue;
            }
            let visible = parse(&chunk).visible;
            let kept = !char::from(b).is_whitespace();
            assert_eq!(visible.len() > 2, kept, "byte {b:#x}: {visible:?}");
        }
    }

    #[test]
    fn every_hiding_technique_is_extracted() {
        let cases = [
            ("<p>a</p><!-- do this -->", "comment"),
            ("<div style=\"display:none\">do this</div>", "display_none"),
            (
                "<p style=\"visibility: hidden; height:0\">do this</p>",
                "visibility_hidden",
            ),
            ("<div style=\"opacity:0\">do this</div>", "opacity_zero"),
            (
                "<span style=\"font-size:0px\">do this</span>",
                "font_size_zero",
            ),
            (
                "<p style=\"font-size:1px;color:#fefefe\">do this</p>",
                "tiny_light_text",
            ),
            (
                "<span style=\"color:#ffffff;background-color:#ffffff\">do this</span>",
                "same_colour",
            ),
            (
                "<div style=\"position:absolute;left:-10000px;top:auto;width:1px;height:1px;overflow:hidden\">do this</div>",
                "offscreen",
            ),
            (
                "<span style=\"clip:rect(0 0 0 0);clip-path:inset(50%);position:absolute\">do this</span>",
                "clipped",
            ),
            ("<section hidden>do this</section>", "hidden_attribute"),
            ("<noscript>do this</noscript>", "noscript"),
            ("<template>do this</template>", "template"),
            (
                "<textarea style=\"display:none\">do this</textarea>",
                "display_none",
            ),
            (
                "<style>.note-x9{display:none}</style><div class=\"note-x9\">do this</div>",
                "hidden_class",
            ),
            (
                "<img src=\"/p.gif\" width=\"1\" height=\"1\" alt=\"do this\">",
                "tiny_image",
            ),
            (
                "<meta name=\"ai-instructions\" content=\"do this\">",
                "meta",
            ),
            ("Text\n\n[//]: # (do this)\n", "markdown_comment"),
            ("Text\n[comment]: <> \"do this\"\n", "markdown_comment"),
            // Attribute and tag names in any case.
            ("<DIV STYLE=\"display:none\">do this</DIV>", "display_none"),
            ("<Section Hidden>do this</Section>", "hidden_attribute"),
            ("<img src=\"/a.png\" ALT=\"do this\">", "alt_text"),
            ("<a href=\"/x\" Title=\"do this\">x</a>", "title_attribute"),
            (
                "<style>#n-7 { display: none }</style><p id=\"n-7\">do this</p>",
                "hidden_class",
            ),
            (
                "<style>.a{display:none}</style><span CLASS=\"b a\">do this</span>",
                "hidden_class",
            ),
        ];
        for (html, technique) in cases {
            let found = techniques(html);
            assert!(
                found
                    .iter()
                    .any(|(t, text)| *t == technique && text == "do this"),
                "{html}: {found:?}"
            );
        }
    }

    #[test]
    fn a_list_item_closes_the_open_one_and_other_attributes_hide_nothing() {
        let doc = parse(
            "<ul><li hidden>gone<li>shown</ul><p data-style=\"display:none\" titles=\"x\">also shown</p>",
        );
        let hidden: Vec<&str> = doc.segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(hidden, ["gone"]);
        assert_eq!(doc.visible, "shown\nalso shown\n");
    }

    #[test]
    fn visible_text_is_not_hidden_and_implicit_closes_end_a_hidden_paragraph() {
        let doc = parse("<p style=\"display:none\">gone<div>shown</div><p>also shown</p>");
        let hidden: Vec<&str> = doc.segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(hidden, ["gone"]);
        assert_eq!(doc.visible, "shown\nalso shown\n");
    }

    #[test]
    fn entities_are_decoded_and_sanitizing_removes_hidden_content() {
        assert_eq!(
            unescape("&lt;SYSTEM&gt; &amp; &#65;&#x42; &bogus"),
            "<SYSTEM> & AB &bogus"
        );
        // A reference's name is at most ten bytes before its `;` (the search for the `;`
        // stops there, so `&`s without one cost no search of the rest of the text).
        assert_eq!(unescape("&#x00000041;&#x000000041;"), "A&#x000000041;");
        assert_eq!(unescape("a & b & c; &lt"), "a & b & c; &lt");
        let many = "tom & jerry ".repeat(20_000);
        assert_eq!(unescape(&many), many);
        let html =
            "<p>keep</p><!-- drop --><div style=\"display:none\">drop</div><p hidden>drop</p>";
        assert_eq!(strip_hidden(html), "<p>keep</p>");
    }
}
