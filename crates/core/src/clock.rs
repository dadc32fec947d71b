//! Wall-clock time as Palisade stores and shows it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A UTC instant with nanosecond precision, shown as RFC 3339 in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i128);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Self(OffsetDateTime::now_utc().unix_timestamp_nanos())
    }

    /// From whole seconds since the Unix epoch.
    pub fn from_unix_seconds(secs: i64) -> Self {
        Self(i128::from(secs) * 1_000_000_000)
    }

    /// From nanoseconds since the Unix epoch.
    pub fn from_unix_nanos(nanos: i128) -> Self {
        Self(nanos)
    }

    /// Whole seconds since the Unix epoch (rounded down).
    pub fn unix_seconds(self) -> i64 {
        i64::try_from(self.0.div_euclid(1_000_000_000)).unwrap_or(i64::MAX)
    }

    /// Nanoseconds since the Unix epoch.
    pub fn unix_nanos(self) -> i128 {
        self.0
    }

    /// This instant moved by a number of seconds (negative moves back).
    pub fn plus_seconds(self, secs: i64) -> Self {
        Self(self.0.saturating_add(i128::from(secs) * 1_000_000_000))
    }

    /// RFC 3339 text, e.g. `2026-11-26T15:08:09.5Z`.
    pub fn to_rfc3339(self) -> String {
        OffsetDateTime::from_unix_timestamp_nanos(self.0)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| format!("@{}ns", self.0))
    }

    /// Parses RFC 3339 text.
    pub fn parse_rfc3339(text: &str) -> Result<Self, String> {
        OffsetDateTime::parse(text, &Rfc3339)
            .map(|t| Self(t.unix_timestamp_nanos()))
            .map_err(|e| {
                format!("`{text}` is not an RFC 3339 time ({e}); write e.g. 2026-11-26T15:00:00Z")
            })
    }

    /// The calendar date (UTC) as `YYYY-MM-DD`.
    pub fn date_string(self) -> String {
        let rfc = self.to_rfc3339();
        rfc.get(..10).unwrap_or(&rfc).to_string()
    }
}

/// Where services read the time. Everything that decides by time (token lifetimes, session hard
/// ends, allowed-hours windows) asks a `Clock`, so tests can move time forward instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The system clock plus an offset that only moves forward: tests use it to jump past a session's
/// hard end. Real time keeps flowing underneath, so timeouts and durations still behave.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_secs: AtomicI64,
}

impl OffsetClock {
    /// A clock that starts at the system time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `secs` seconds (negative values are ignored).
    pub fn advance(&self, secs: i64) {
        self.offset_secs.fetch_add(secs.max(0), Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        Timestamp::now().plus_seconds(self.offset_secs.load(Ordering::SeqCst))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_nanoseconds() {
        let t = Timestamp::from_unix_nanos(1_764_169_689_123_456_789);
        let text = t.to_rfc3339();
        assert_eq!(Timestamp::parse_rfc3339(&text), Ok(t));
        assert_eq!(t.unix_seconds(), 1_764_169_689);
    }

    #[test]
    fn the_offset_clock_only_moves_forward() {
        let clock = OffsetClock::new();
        let before = SystemClock.now();
        clock.advance(3_600);
        clock.advance(-7_200);
        let moved = clock.now().unix_seconds() - before.unix_seconds();
        assert!((3_600..3_660).contains(&moved), "moved {moved}s");
    }

    #[test]
    fn bad_time_text_names_the_expected_format() {
        let err = Timestamp::parse_rfc3339("yesterday").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
