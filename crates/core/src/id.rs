//! Principal identifiers: `<kind>:<slug>`, so that an agent id can never equal a human's or a
//! service account's.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// The class of a principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A person.
    Human,
    /// A group of humans; teams can own agents.
    Team,
    /// A non-AI workload (CI job, backend service).
    ServiceAccount,
    /// An AI agent: its own principal class.
    Agent,
}

impl PrincipalKind {
    /// All kinds, in display order.
    pub const ALL: [PrincipalKind; 4] =
        [Self::Human, Self::Team, Self::ServiceAccount, Self::Agent];

    /// The id prefix of this kind (`agent` in `agent:pr-reviewer`).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Team => "team",
            Self::ServiceAccount => "svc",
            Self::Agent => "agent",
        }
    }

    /// The admin API collection name (`/api/v1/<collection>`).
    pub fn collection(self) -> &'static str {
        match self {
            Self::Human => "humans",
            Self::Team => "teams",
            Self::ServiceAccount => "service-accounts",
            Self::Agent => "agents",
        }
    }

    /// The kind for an admin API collection name.
    pub fn from_collection(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.collection() == name)
    }

    /// A human-readable name, e.g. "service account".
    pub fn noun(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Team => "team",
            Self::ServiceAccount => "service account",
            Self::Agent => "agent",
        }
    }

    /// Whether principals of this kind can hold client credentials and get tokens.
    pub fn is_client(self) -> bool {
        matches!(self, Self::Agent | Self::ServiceAccount)
    }
}

/// A principal id such as `agent:pr-reviewer`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrincipalId {
    kind: PrincipalKind,
    slug: String,
}

/// Why a text is not a valid principal id or slug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub String);

impl PrincipalId {
    /// Builds an id from a kind and a slug, validating the slug.
    pub fn new(kind: PrincipalKind, slug: &str) -> Result<Self, IdError> {
        validate_slug(slug)?;
        Ok(Self {
            kind,
            slug: slug.to_string(),
        })
    }

    /// Parses `kind:slug`, or a bare slug when `default_kind` is given.
    pub fn parse_with_default(
        text: &str,
        default_kind: Option<PrincipalKind>,
    ) -> Result<Self, IdError> {
        match text.split_once(':') {
            Some((prefix, slug)) => {
                let kind = PrincipalKind::ALL
                    .into_iter()
                    .find(|k| k.prefix() == prefix)
                    .ok_or_else(|| {
                        IdError(format!(
                            "`{text}` has unknown kind `{prefix}`; ids look like agent:NAME, human:NAME, team:NAME or svc:NAME"
                        ))
                    })?;
                if let Some(expected) = default_kind
                    && expected != kind
                {
                    return Err(IdError(format!(
                        "`{text}` is a {} id, but a {} id is expected here",
                        kind.noun(),
                        expected.noun()
                    )));
                }
                Self::new(kind, slug)
            }
            None => match default_kind {
                Some(kind) => Self::new(kind, text),
                None => Err(IdError(format!(
                    "`{text}` has no kind; write e.g. agent:{text} or human:{text}"
                ))),
            },
        }
    }

    /// The principal class.
    pub fn kind(&self) -> PrincipalKind {
        self.kind
    }

    /// The slug after the colon.
    pub fn slug(&self) -> &str {
        &self.slug
    }
}

fn validate_slug(slug: &str) -> Result<(), IdError> {
    let ok_chars = slug.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    });
    let starts_ok = slug
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if slug.is_empty() || slug.len() > 63 || !ok_chars || !starts_ok {
        return Err(IdError(format!(
            "`{slug}` is not a valid name: use 1 to 63 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit"
        )));
    }
    Ok(())
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.slug)
    }
}

impl FromStr for PrincipalId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_with_default(s, None)
    }
}

impl Serialize for PrincipalId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PrincipalId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_display() {
        let cases = [
            ("agent:pr-reviewer", Some("agent:pr-reviewer")),
            ("svc:ci", Some("svc:ci")),
            ("human:alice", Some("human:alice")),
            ("team:alpha", Some("team:alpha")),
            ("robot:x", None),
            ("agent:", None),
            ("agent:Upper", None),
            ("agent:-lead", None),
            ("bare", None),
        ];
        for (input, expected) in cases {
            let got = input.parse::<PrincipalId>().ok().map(|id| id.to_string());
            assert_eq!(got.as_deref(), expected, "input {input}");
        }
    }

    #[test]
    fn bare_slug_takes_the_default_kind_and_a_mismatched_kind_is_refused() {
        let id = PrincipalId::parse_with_default("ci-bot", Some(PrincipalKind::Agent)).unwrap();
        assert_eq!(id.to_string(), "agent:ci-bot");
        let err =
            PrincipalId::parse_with_default("human:bob", Some(PrincipalKind::Agent)).unwrap_err();
        assert!(err.0.contains("agent id is expected"), "{}", err.0);
    }
}
