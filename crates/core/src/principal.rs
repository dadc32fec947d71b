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
