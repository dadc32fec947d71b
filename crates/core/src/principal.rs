//! Principal records: the identity registry's rows.

use crate::{PrincipalId, PrincipalKind, Timestamp};
use serde::{Deserialize, Serialize};

/// Lifecycle state of a principal. Only `Active` principals get tokens or pass the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// May authenticate and act.
    Active,
    /// Temporarily stopped; `resume` reactivates.
    Suspended,
    /// Permanently retired; credentials are destroyed and it never comes back.
    Deprovisioned,
}

impl Status {
    /// Lowercase name as used in JSON, Cedar and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deprovisioned => "deprovisioned",
        }
    }
}

/// Who changed a principal's status, when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The actor, e.g. `admin` or a human id.
    pub by: String,
    /// When it happened.
    pub at: Timestamp,
    /// The reason given.
    pub reason: String,
}

/// One registered principal of any class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    /// Unique id, `<kind>:<slug>`.
    pub id: PrincipalId,
    /// Name shown to people.
    pub display_name: String,
    /// Lifecycle state.
    pub status: Status,
    /// The last status change, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_change: Option<StatusChange>,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When it was last changed.
    pub updated_at: Timestamp,
    /// Class-specific fields.
    #[serde(flatten)]
    pub detail: PrincipalDetail,
}

impl Principal {
    /// The principal class.
    pub fn kind(&self) -> PrincipalKind {
        self.id.kind()
    }

    /// The agent record, when this principal is an agent.
    pub fn agent(&self) -> Option<&AgentDetail> {
        match &self.detail {
            PrincipalDetail::Agent(a) => Some(a),
            _ => None,
        }
    }

    /// The owner (human or team) of an agent or service account.
    pub fn owner(&self) -> Option<&PrincipalId> {
        match &self.detail {
            PrincipalDetail::Agent(a) => Some(&a.owner),
            PrincipalDetail::ServiceAccount(s) => Some(&s.owner),
            _ => None,
        }
    }

    /// Teams a human belongs to.
    pub fn teams(&self) -> &[PrincipalId] {
        match &self.detail {
            PrincipalDetail::Human(h) => &h.teams,
            _ => &[],
        }
    }
}

/// Class-specific fields of a principal.
// Principals live behind `Arc` in the registry and most of them are agents, so boxing the large
// variant would add an allocation and an indirection to the common case for no memory gain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PrincipalDetail {
    /// A person.
    Human(HumanDetail),
    /// A group of humans.
    Team(TeamDetail),
    /// A non-AI workload.
    ServiceAccount(ServiceAccountDetail),
    /// An AI agent.
    Agent(AgentDetail),
}

/// Fields of a human.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanDetail {
    /// Contact address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Teams this human belongs to.
    #[serde(default)]
    pub teams: Vec<PrincipalId>,
    /// Agents that may act for this human (RFC 8693 token exchange) besides the agents the human
    /// owns directly or through one of its teams.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_act: Vec<PrincipalId>,
}

impl Principal {
    /// Whether `agent` may act for this human: the human owns it, directly or through a team,
    /// or lists it in `may_act`. Always false for non-humans.
    pub fn allows_actor(&self, agent: &Principal) -> bool {
        let PrincipalDetail::Human(h) = &self.detail else {
            return false;
        };
        let Some(a) = agent.agent() else {
            return false;
        };
        a.owner == self.id || h.teams.contains(&a.owner) || h.may_act.contains(&agent.id)
    }
}

/// Fields of a team.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamDetail {
    /// What the team is for.
    #[serde(default)]
    pub description: String,
}

/// Fields of a service account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountDetail {
    /// The responsible human or team.
    pub owner: PrincipalId,
    /// What the workload is.
    #[serde(default)]
    pub description: String,
    /// Route names it may reach.
    #[serde(default)]
    pub allowed_resources: Vec<String>,
    /// Scopes it may request.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The agent identity record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDetail {
    /// The responsible human or team.
    pub owner: PrincipalId,
    /// Free-text purpose declaration.
    pub purpose: String,
    /// Machine-readable purpose, e.g. `pull-request-review`.
    pub purpose_tag: String,
    /// Model provider, e.g. `anthropic`.
    pub model_provider: String,
    /// Model name, e.g. `claude-opus-4`.
    pub model: String,
    /// Model version.
    pub model_version: String,
    /// Days between access reviews.
    pub review_cadence_days: u32,
    /// When the next access review is due.
    pub next_review_at: Timestamp,
    /// Hard limit on one session's length, in minutes.
    pub max_session_minutes: u32,
    /// How many sessions may be live at once.
    pub max_concurrent_sessions: u32,
    /// Route names this agent may reach (its compute blast radius); empty means none.
    #[serde(default)]
    pub allowed_resources: Vec<String>,
    /// OAuth scopes this agent may request.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Volume limit carried in tokens as `max_files_per_session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files_per_session: Option<u32>,
    /// Whether data read by the agent may leave the organisation.
    #[serde(default)]
    pub data_egress_allowed: bool,
    /// The declared blast radius: ceilings enforced by the built-in policies.
    #[serde(default)]
    pub blast_radius: BlastRadius,
    /// Gateway requests per period across all routes (default: `gateway.agent_rate_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::rate::RateLimit>,
    /// Gateway requests in flight at once (default: `gateway.max_concurrent_requests_per_agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

/// Data classification, lowest to highest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// Anyone may see it.
    Public,
    /// Inside the organisation.
    #[default]
    Internal,
    /// A need to know.
    Confidential,
    /// The most sensitive data.
    Restricted,
}

impl Classification {
    /// 0 (public) to 3 (restricted), as policies compare it.
    pub fn rank(self) -> i64 {
        match self {
            Self::Public => 0,
            Self::Internal => 1,
            Self::Confidential => 2,
            Self::Restricted => 3,
        }
    }

    /// Parses `public`, `internal`, `confidential` or `restricted`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "public" => Some(Self::Public),
            "internal" => Some(Self::Internal),
            "confidential" => Some(Self::Confidential),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }
}

/// The highest action class an agent may perform (without approval, once approvals exist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionCeiling {
    /// Read-only: the default.
    #[default]
    Read,
    /// Reads and writes.
    Write,
    /// Everything, including destructive actions.
    Destructive,
}

impl ActionCeiling {
    /// 0 (read), 1 (write), 2 (destructive), as policies compare it.
    pub fn rank(self) -> i64 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Destructive => 2,
        }
    }
}

/// An agent's declared blast radius, in four dimensions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlastRadius {
    /// Compute: systems whose routes the agent may reach, besides `allowed_resources`.
    pub systems: Vec<String>,
    /// Data: the highest classification the agent may touch.
    pub max_classification: Classification,
    /// Data: where data may be sent (egress), when `data_egress_allowed`.
    pub egress_destinations: Vec<String>,
    /// Action: the highest action class.
    pub max_action: ActionCeiling,
    /// Temporal: allowed hours, `[start, end)` in UTC, 0 to 24.
    pub hours: [u8; 2],
    /// Temporal: allowed weekdays (`mon` .. `sun`).
    pub weekdays: Vec<String>,
}

/// The weekday names, Monday first.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Default for BlastRadius {
    fn default() -> Self {
        Self {
            systems: Vec::new(),
            max_classification: Classification::Internal,
            egress_destinations: Vec::new(),
            max_action: ActionCeiling::Read,
            hours: [0, 24],
            weekdays: WEEKDAYS.iter().map(|d| (*d).to_string()).collect(),
        }
    }
}

impl BlastRadius {
    /// Checks the values; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let [start, end] = self.hours;
        if start >= end || end > 24 {
            return Err((
                "blast_radius.hours".into(),
                format!(
                    "[{start}, {end}] is not a window; give [start, end] with 0 <= start < end <= 24 (UTC)"
                ),
            ));
        }
        for d in &self.weekdays {
            if !WEEKDAYS.contains(&d.as_str()) {
                return Err((
                    "blast_radius.weekdays".into(),
                    format!("`{d}` is not one of mon, tue, wed, thu, fri, sat, sun"),
                ));
            }
        }
        if self.weekdays.is_empty() {
            return Err((
                "blast_radius.weekdays".into(),
                "is empty, so the agent could never act; list at least one day".into(),
            ));
        }
        for s in &self.systems {
            if s.is_empty()
                || !s.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
                })
            {
                return Err((
                    "blast_radius.systems".into(),
                    format!(
                        "`{s}` is not a system name (lowercase letters, digits, `-`, `_`, `.`)"
                    ),
                ));
            }
        }
        for d in &self.egress_destinations {
            if d.is_empty() || d.contains(char::is_whitespace) || d.contains('/') {
                return Err((
                    "blast_radius.egress_destinations".into(),
                    format!("`{d}` is not a host name"),
                ));
            }
        }
        Ok(())
    }
}

/// The default and bounds of agent record fields.
pub mod limits {
    /// Default review cadence in days.
    pub const DEFAULT_REVIEW_CADENCE_DAYS: u32 = 90;
    /// Default max session duration in minutes.
    pub const DEFAULT_MAX_SESSION_MINUTES: u32 = 30;
    /// Upper bound of max session duration: 4 hours.
    pub const MAX_SESSION_MINUTES: u32 = 240;
    /// Default max concurrent sessions.
    pub const DEFAULT_MAX_CONCURRENT_SESSIONS: u32 = 5;
    /// Upper bound of max concurrent sessions.
    pub const MAX_CONCURRENT_SESSIONS: u32 = 1000;
    /// Longest review cadence accepted.
    pub const MAX_REVIEW_CADENCE_DAYS: u32 = 366;
}
