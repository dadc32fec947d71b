//! Rate limits as people write them: `100/s`, `600/min`, `5000/h`, optionally with a burst:
//! `600/min burst 20`. The gateway enforces them with GCRA (see `palisade-gateway`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// `count` requests per `per_secs` seconds, allowing bursts of `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Requests per period.
    pub count: u32,
    /// The period in seconds (1, 60 or 3600).
    pub per_secs: u32,
    /// Requests allowed back to back (default: `count`).
    pub burst: u32,
}

impl RateLimit {
    /// Parses `N/s`, `N/min` or `N/h`, optionally followed by ` burst M`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let fix = "write e.g. `100/s`, `600/min` or `5000/h burst 50`";
        let mut words = text.split_whitespace();
        let rate = words
            .next()
            .ok_or_else(|| format!("the rate limit is empty; {fix}"))?;
        let (n, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a rate; {fix}"))?;
        let count: u32 =
            n.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                format!("`{n}` in `{text}` is not a positive whole number; {fix}")
            })?;
        let per_secs = match unit {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            other => return Err(format!("`{other}` in `{text}` is not s, min or h; {fix}")),
        };
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => count,
            (Some("burst"), Some(b), None) => {
                b.parse().ok().filter(|b| *b > 0).ok_or_else(|| {
                    format!("burst `{b}` in `{text}` is not a positive whole number")
                })?
            }
            _ => return Err(format!("`{text}` has extra words; {fix}")),
        };
        Ok(Self {
            count,
            per_secs,
            burst,
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_secs {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

impl Serialize for RateLimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_print_and_explain_mistakes() {
        let r = RateLimit::parse("600/min burst 20").unwrap();
        assert_eq!((r.count, r.per_secs, r.burst), (600, 60, 20));
        assert_eq!(r.to_string(), "600/min burst 20");
        assert_eq!(RateLimit::parse("10/s").unwrap().to_string(), "10/s");
        for (bad, says) in [
            ("", "empty"),
            ("ten/s", "positive whole number"),
            ("0/s", "positive whole number"),
            ("10/day", "not s, min or h"),
            ("10", "not a rate"),
            ("10/s burst", "extra words"),
            ("10/s burst 0", "burst"),
        ] {
            let e = RateLimit::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
