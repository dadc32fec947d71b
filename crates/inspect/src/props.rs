//! The character properties the detectors ask of every non-ASCII character (its lowercase,
//! whether it is alphabetic or alphanumeric, the ASCII letter it imitates), from a table for
//! the characters below U+0800: Latin with diacritics, Greek, Cyrillic, Armenian, Hebrew,
//! Arabic and Syriac, which take two bytes in UTF-8. The standard library answers each by a
//! search of its Unicode tables (and the look-alike by a decomposition and the confusables
//! table), and those searches made Russian or Greek text scan five times slower, and Spanish
//! or German text with its accents 40 % slower, than English. The table is filled on first
//! use by the same functions (so it answers exactly as they do). Characters from U+0800 up
//! still go to them, but for CJK ideographs and Hangul syllables: caseless letters all.

use std::sync::OnceLock;

/// The characters the table covers: U+0000 to U+07FF.
const COVERED: usize = 0x800;

const ALPHABETIC: u8 = 1;
const ALPHANUMERIC: u8 = 2;
/// The lowercase is the one character in `lower` (otherwise it is longer: U+0130 only).
const ONE_LOWER: u8 = 4;

struct Table {
    lower: [char; COVERED],
    folded: [char; COVERED],
    flags: [u8; COVERED],
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Box<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new(Table {
            lower: ['\0'; COVERED],
            folded: ['\0'; COVERED],
            flags: [0; COVERED],
        });
        let Table {
            lower,
            folded,
            flags,
        } = &mut *t;
        let entries = lower
            .iter_mut()
            .zip(folded.iter_mut())
            .zip(flags.iter_mut());
        for (u, ((lower, folded), flags)) in entries.enumerate() {
            let Some(c) = u32::try_from(u).ok().and_then(char::from_u32) else {
                continue;
            };
            *folded = crate::unicode::fold_uncached(c);
            let mut lowercase = c.to_lowercase();
            *lower = lowercase.next().unwrap_or(c);
            for (has, flag) in [
                (c.is_alphabetic(), ALPHABETIC),
                (c.is_alphanumeric(), ALPHANUMERIC),
                (lowercase.next().is_none(), ONE_LOWER),
            ] {
                if has {
                    *flags |= flag;
                }
            }
        }
        t
    })
}

/// The table's entry for `c`, if it covers it; CJK ideographs (U+4E00 to U+9FFF) and Hangul
/// syllables (U+AC00 to U+D7A3) are all letters without case, answered without a table.
#[inline]
fn entry(c: char) -> Option<(char, u8)> {
    let i = u32::from(c) as usize;
    if matches!(i, 0x4E00..=0x9FFF | 0xAC00..=0xD7A3) {
        return Some((c, ALPHABETIC | ALPHANUMERIC | ONE_LOWER));
    }
    let t = table();
    Some((*t.lower.get(i)?, *t.flags.get(i)?))
}

/// The first character of `c`'s lowercase (`c.to_lowercase().next()`).
#[inline]
pub(crate) fn lower(c: char) -> char {
    match entry(c) {
        Some((lower, _)) => lower,
        None => c.to_lowercase().next().unwrap_or(c),
    }
}

/// Appends `c`'s lowercase to `out` (`out.extend(c.to_lowercase())`).
#[inline]
pub(crate) fn push_lowercase(out: &mut String, c: char) {
    match entry(c) {
        Some((lower, flags)) if flags & ONE_LOWER != 0 => out.push(lower),
        _ => out.extend(c.to_lowercase()),
    }
}

/// [`crate::unicode::fold`]: the ASCII letter `c` imitates, or `c`.
#[inline]
pub(crate) fn fold(c: char) -> char {
    match u32::from(c) as usize {
        i if i < COVERED => table().folded.get(i).copied().unwrap_or(c),
        _ => crate::unicode::fold_uncached(c),
    }
}

/// `c.is_alphabetic()`.
#[inline]
pub(crate) fn is_alphabetic(c: char) -> bool {
    match entry(c) {
        Some((_, flags)) => flags & ALPHABETIC != 0,
        None => c.is_alphabetic(),
    }
}

/// `c.is_alphanumeric()`.
#[inline]
pub(crate) fn is_alphanumeric(c: char) -> bool {
    match entry(c) {
        Some((_, flags)) => flags & ALPHANUMERIC != 0,
        None => c.is_alphanumeric(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_answers_as_the_standard_library_for_every_character() {
        // Every character it covers, and some past it (which go to the standard library).
        let covered = (0..0x800u32)
            .chain(0x4E00..=0x9FFF)
            .chain(0xAC00..=0xD7A3)
            .filter_map(char::from_u32);
        let beyond = [
            0x800u32, 0x1E9E, 0x2126, 0x212A, 0x3042, 0x4E00, 0xFF21, 0x1_0400,
        ]
        .into_iter()
        .filter_map(char::from_u32);
        for c in covered.chain(beyond) {
            assert_eq!(lower(c), c.to_lowercase().next().unwrap_or(c), "{c:?}");
            let mut ours = String::new();
            push_lowercase(&mut ours, c);
            assert_eq!(ours, c.to_lowercase().collect::<String>(), "{c:?}");
            assert_eq!(is_alphabetic(c), c.is_alphabetic(), "{c:?}");
            assert_eq!(is_alphanumeric(c), c.is_alphanumeric(), "{c:?}");
            assert_eq!(fold(c), crate::unicode::fold_uncached(c), "{c:?}");
        }
    }
}
