//! The identity registry: registration, validation, lifecycle and client credentials of every
//! principal class, with an in-memory view of principals for the request path.
//!
//! INVARIANT (cache-follows-store): every mutation writes the store first and then replaces the
//! cached record, under one lock, so the gateway never sees a state the store does not hold, and a
//! suspension is visible to the next request.

use crate::principal::{HumanDetail, ServiceAccountDetail, TeamDetail, limits};
use crate::secret::{self, Secret};
use crate::store::{ClientSecretRecord, Store, StoreError};
use crate::{
    AgentDetail, Principal, PrincipalDetail, PrincipalId, PrincipalKind, Status, StatusChange,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A field of the input is invalid.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field's name.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The principal does not exist.
    #[error("{0} is not registered; `palisade {1} list` shows the registered ones")]
    NotFound(PrincipalId, &'static str),
    /// The id is taken.
    #[error("{0} is already registered; choose another name")]
    Duplicate(PrincipalId),
    /// The requested change is not allowed in the principal's current state.
    #[error("{0}")]
    Conflict(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The random generator failed.
    #[error(transparent)]
    Random(#[from] secret::RandomError),
}

fn invalid(field: &str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The user-editable fields of an agent (registration input and update target).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Name shown to people; defaults to the slug.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Owner: an active human or team id.
    #[serde(default)]
    pub owner: String,
    /// Purpose declaration.
    #[serde(default)]
    pub purpose: String,
    /// Purpose tag.
    #[serde(default)]
    pub purpose_tag: String,
    /// Model provider.
    #[serde(default)]
    pub model_provider: String,
    /// Model.
    #[serde(default)]
    pub model: String,
    /// Model version.
    #[serde(default)]
    pub model_version: String,
    /// Review cadence in days (default 90).
    #[serde(default)]
    pub review_cadence_days: Option<u32>,
    /// Next review date (default: now + cadence).
    #[serde(default)]
    pub next_review_at: Option<Timestamp>,
    /// Max session duration in minutes (default 30, at most 240).
    #[serde(default)]
    pub max_session_minutes: Option<u32>,
    /// Max concurrent sessions (default 5).
    #[serde(default)]
    pub max_concurrent_sessions: Option<u32>,
    /// Route names the agent may reach.
    #[serde(default)]
    pub allowed_resources: Vec<String>,
    /// Scopes the agent may request.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Files per session limit carried in tokens.
    #[serde(default)]
    pub max_files_per_session: Option<u32>,
    /// Whether data may leave the organisation.
    #[serde(default)]
    pub data_egress_allowed: bool,
    /// The blast radius (defaults: internal data, read-only, any time).
    #[serde(default)]
    pub blast_radius: Option<crate::principal::BlastRadius>,
    /// Gateway rate limit, e.g. `10/s` or `600/min burst 20`.
    #[serde(default)]
    pub rate_limit: Option<crate::rate::RateLimit>,
    /// Gateway requests in flight at once, 1 to 1024.
    #[serde(default)]
    pub max_concurrent_requests: Option<u32>,
}

/// The user-editable fields of a human.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HumanSpec {
    /// Name shown to people.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Email address.
    #[serde(default)]
    pub email: Option<String>,
    /// Team ids.
    #[serde(default)]
    pub teams: Vec<String>,
    /// Agent ids that may act for this human, besides the agents it owns.
    #[serde(default)]
    pub may_act: Vec<String>,
}

/// The user-editable fields of a team.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamSpec {
    /// Name shown to people.
    #[serde(default)]
    pub display_name: Option<String>,
    /// What the team does.
    #[serde(default)]
    pub description: String,
}

/// The user-editable fields of a service account.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountSpec {
    /// Name shown to people.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Owner: an active human or team id.
    #[serde(default)]
    pub owner: String,
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

/// A secret issued at registration or rotation: shown once, never stored in plaintext.
#[derive(Debug)]
pub struct IssuedSecret {
    /// The client id to authenticate with.
    pub client_id: PrincipalId,
    /// The secret value.
    pub secret: Secret,
    /// The public id of this secret.
    pub secret_id: String,
    /// When the previous secrets stop working, after a rotation.
    pub previous_expire_at: Option<Timestamp>,
}

/// Why client authentication failed. Deliberately coarse towards the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    /// Unknown client, wrong secret, or a principal that cannot hold credentials.
    #[error("client authentication failed")]
    BadCredentials,
    /// The principal exists but is not active.
    #[error("{0} is {1}")]
    Inactive(PrincipalId, &'static str),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The registry service.
pub struct Registry {
    store: Arc<dyn Store>,
    cache: RwLock<HashMap<PrincipalId, Arc<Principal>>>,
    // Serialises mutations so a read-validate-write sequence (owner checks, status changes) is atomic.
    write_lock: Mutex<()>,
}

impl Registry {
    /// Loads every principal from the store into memory.
    pub fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut cache = HashMap::new();
        for p in store.list_principals(None)? {
            cache.insert(p.id.clone(), Arc::new(p));
        }
        Ok(Self {
            store,
            cache: RwLock::new(cache),
            write_lock: Mutex::new(()),
        })
    }

    /// The cached record of a principal (request path: no storage access).
    pub fn get(&self, id: &PrincipalId) -> Option<Arc<Principal>> {
        self.cache.read().ok()?.get(id).cloned()
    }

    /// All principals of a kind (or all), ordered by id.
    pub fn list(&self, kind: Option<PrincipalKind>) -> Vec<Arc<Principal>> {
        let Ok(cache) = self.cache.read() else {
            return Vec::new();
        };
        let mut all: Vec<_> = cache
            .values()
            .filter(|p| kind.is_none_or(|k| p.kind() == k))
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Registers a principal of `kind` from a JSON spec; agents and service accounts get a secret.
    pub fn register(
        &self,
        id: PrincipalId,
        spec: Value,
        now: Timestamp,
    ) -> Result<(Arc<Principal>, Option<IssuedSecret>), RegistryError> {
        let _guard = self.write_lock.lock().map_err(|_| poisoned())?;
        if self.get(&id).is_some() {
            return Err(RegistryError::Duplicate(id));
        }
        let detail = self.detail_from_spec(&id, spec, None, now)?;
        let display_name = display_name_of(&detail.1, &id);
        let principal = Principal {
            id: id.clone(),
            display_name,
            status: Status::Active,
            status_change: None,
            created_at: now,
            updated_at: now,
            detail: detail.0,
        };
        self.store
            .insert_principal(&principal)
            .map_err(|e| match e {
                StoreError::Conflict(_) => RegistryError::Duplicate(id.clone()),
                other => other.into(),
            })?;
        let issued = if id.kind().is_client() {
            Some(self.issue_secret(&id, None, now)?)
        } else {
            None
        };
        let principal = self.cache_put(principal);
        Ok((principal, issued))
    }

    /// Applies a JSON merge patch of editable fields; the result is validated like a registration.
    pub fn update(
        &self,
        id: &PrincipalId,
        patch: Value,
        now: Timestamp,
    ) -> Result<Arc<Principal>, RegistryError> {
        let _guard = self.write_lock.lock().map_err(|_| poisoned())?;
        let current = self.require(id)?;
        if current.status == Status::Deprovisioned {
            return Err(RegistryError::Conflict(format!(
                "{id} is deprovisioned and can no longer be changed"
            )));
        }
        let Value::Object(patch) = patch else {
            return Err(invalid(
                "body",
                "an update must be a JSON object of the fields to change",
            ));
        };
        let mut spec = spec_of(&current)?;
        if let Value::Object(fields) = &mut spec {
            for (key, value) in patch {
                if value.is_null() {
                    fields.remove(&key);
                } else {
                    fields.insert(key, value);
                }
            }
        }
        let (detail, display_name) = self.detail_from_spec(id, spec, Some(&current), now)?;
        let mut updated = (*current).clone();
        updated.detail = detail;
        updated.display_name = display_name.unwrap_or_else(|| id.slug().to_string());
        updated.updated_at = now;
        self.store.update_principal(&updated)?;
        Ok(self.cache_put(updated))
    }

    /// Moves a principal to `status`, recording who, when and why.
    pub fn set_status(
        &self,
        id: &PrincipalId,
        status: Status,
        by: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<Arc<Principal>, RegistryError> {
        let _guard = self.write_lock.lock().map_err(|_| poisoned())?;
        let current = self.require(id)?;
        let verb = match status {
            Status::Active => "resume",
            Status::Suspended => "suspend",
            Status::Deprovisioned => "deprovision",
        };
        if current.status == Status::Deprovisioned {
            return Err(RegistryError::Conflict(format!(
                "{id} is deprovisioned and cannot {verb}; register a new principal instead"
            )));
        }
        if current.status == status {
            return Err(RegistryError::Conflict(format!(
                "{id} is already {}",
                status.as_str()
            )));
        }
        if status == Status::Deprovisioned {
            self.store.delete_client_secrets(id)?;
        }
        let mut updated = (*current).clone();
        updated.status = status;
        updated.status_change = Some(StatusChange {
            by: by.to_string(),
            at: now,
            reason: reason.to_string(),
        });
        updated.updated_at = now;
        self.store.update_principal(&updated)?;
        Ok(self.cache_put(updated))
    }

    /// Issues a new client secret; older secrets keep working for `overlap_seconds`.
    pub fn rotate_secret(
        &self,
        id: &PrincipalId,
        overlap_seconds: u64,
        now: Timestamp,
    ) -> Result<IssuedSecret, RegistryError> {
        let _guard = self.write_lock.lock().map_err(|_| poisoned())?;
        let current = self.require(id)?;
        if !id.kind().is_client() {
            return Err(RegistryError::Conflict(format!(
                "{id} is a {} and holds no client secret",
                id.kind().noun()
            )));
        }
        if current.status == Status::Deprovisioned {
            return Err(RegistryError::Conflict(format!(
                "{id} is deprovisioned; its credentials are gone for good"
            )));
        }
        let expire_at = now.plus_seconds(i64::try_from(overlap_seconds).unwrap_or(i64::MAX));
        self.store.expire_client_secrets(id, expire_at)?;
        self.issue_secret(id, Some(expire_at), now)
    }

    /// Checks a client id and secret. Every secret of the client is compared, in constant time.
    pub fn authenticate_client(
        &self,
        client_id: &str,
        presented: &str,
        now: Timestamp,
    ) -> Result<Arc<Principal>, ClientAuthError> {
        let id: PrincipalId = client_id
            .parse()
            .map_err(|_| ClientAuthError::BadCredentials)?;
        let principal = self.get(&id).ok_or(ClientAuthError::BadCredentials)?;
        if !id.kind().is_client() {
            return Err(ClientAuthError::BadCredentials);
        }
        let secrets = self.store.client_secrets(&id)?;
        let mut matched = false;
        for s in &secrets {
            let live = s.expires_at.is_none_or(|at| at > now);
            matched |= secret::secret_matches(presented, &s.hash) & live;
        }
        if !matched {
            return Err(ClientAuthError::BadCredentials);
        }
        if principal.status != Status::Active {
            return Err(ClientAuthError::Inactive(id, principal.status.as_str()));
        }
        Ok(principal)
    }

    fn issue_secret(
        &self,
        id: &PrincipalId,
        previous_expire_at: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<IssuedSecret, RegistryError> {
        let secret = secret::generate_secret("pls")?;
        let secret_id = secret::random_id::<6>()?;
        self.store.add_client_secret(
            id,
            &ClientSecretRecord {
                secret_id: secret_id.clone(),
                hash: secret.hash(),
                created_at: now,
                expires_at: None,
            },
        )?;
        Ok(IssuedSecret {
            client_id: id.clone(),
            secret,
            secret_id,
            previous_expire_at,
        })
    }

    fn require(&self, id: &PrincipalId) -> Result<Arc<Principal>, RegistryError> {
        self.get(id)
            .ok_or_else(|| RegistryError::NotFound(id.clone(), cli_noun(id.kind())))
    }

    fn cache_put(&self, principal: Principal) -> Arc<Principal> {
        let principal = Arc::new(principal);
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(principal.id.clone(), principal.clone());
        }
        principal
    }

    fn active_owner(&self, field: &str, text: &str) -> Result<PrincipalId, RegistryError> {
        if text.trim().is_empty() {
            return Err(invalid(
                field,
                "is required: name the responsible human or team, e.g. human:alice or team:alpha",
            ));
        }
        let owner: PrincipalId = text
            .parse()
            .map_err(|e: crate::id::IdError| invalid(field, e.0))?;
        if !matches!(owner.kind(), PrincipalKind::Human | PrincipalKind::Team) {
            return Err(invalid(
                field,
                format!(
                    "`{owner}` is a {}; an owner must be a human or a team",
                    owner.kind().noun()
                ),
            ));
        }
        match self.get(&owner) {
            None => Err(invalid(
                field,
                format!(
                    "`{owner}` is not registered; add it first (`palisade {} add {}`)",
                    cli_noun(owner.kind()),
                    owner.slug()
                ),
            )),
            Some(p) if p.status != Status::Active => Err(invalid(
                field,
                format!(
                    "`{owner}` is {}; an owner must be active",
                    p.status.as_str()
                ),
            )),
            Some(_) => Ok(owner),
        }
    }

    /// Validates a spec into a principal detail and optional display name.
    fn detail_from_spec(
        &self,
        id: &PrincipalId,
        spec: Value,
        current: Option<&Principal>,
        now: Timestamp,
    ) -> Result<(PrincipalDetail, Option<String>), RegistryError> {
        match id.kind() {
            PrincipalKind::Agent => {
                let spec: AgentSpec = parse_spec(spec)?;
                let detail = self.validate_agent(&spec, current, now)?;
                Ok((
                    PrincipalDetail::Agent(detail),
                    clean_name(spec.display_name),
                ))
            }
            PrincipalKind::Human => {
                let spec: HumanSpec = parse_spec(spec)?;
                let mut teams = Vec::new();
                for t in &spec.teams {
                    let team = PrincipalId::parse_with_default(t, Some(PrincipalKind::Team))
                        .map_err(|e| invalid("teams", e.0))?;
                    if self.get(&team).is_none() {
                        return Err(invalid(
                            "teams",
                            format!(
                                "`{team}` is not registered; add it with `palisade team add {}`",
                                team.slug()
                            ),
                        ));
                    }
                    if !teams.contains(&team) {
                        teams.push(team);
                    }
                }
                if let Some(email) = &spec.email
                    && (!email.contains('@') || email.chars().any(char::is_whitespace))
                {
                    return Err(invalid(
                        "email",
                        format!("`{email}` is not an email address"),
                    ));
                }
                let mut may_act = Vec::new();
                for a in &spec.may_act {
                    let agent = PrincipalId::parse_with_default(a, Some(PrincipalKind::Agent))
                        .map_err(|e| invalid("may_act", e.0))?;
                    if agent.kind() != PrincipalKind::Agent {
                        return Err(invalid(
                            "may_act",
                            format!("`{agent}` is not an agent; list agent ids"),
                        ));
                    }
                    if !may_act.contains(&agent) {
                        may_act.push(agent);
                    }
                }
                Ok((
                    PrincipalDetail::Human(HumanDetail {
                        email: spec.email,
                        teams,
                        may_act,
                    }),
                    clean_name(spec.display_name),
                ))
            }
            PrincipalKind::Team => {
                let spec: TeamSpec = parse_spec(spec)?;
                Ok((
                    PrincipalDetail::Team(TeamDetail {
                        description: spec.description,
                    }),
                    clean_name(spec.display_name),
                ))
            }
            PrincipalKind::ServiceAccount => {
                let spec: ServiceAccountSpec = parse_spec(spec)?;
                let owner = self.active_owner("owner", &spec.owner)?;
                let detail = ServiceAccountDetail {
                    owner,
                    description: spec.description,
                    allowed_resources: validate_names("allowed_resources", spec.allowed_resources)?,
                    scopes: validate_scopes(spec.scopes)?,
                };
                Ok((
                    PrincipalDetail::ServiceAccount(detail),
                    clean_name(spec.display_name),
                ))
            }
        }
    }

    fn validate_agent(
        &self,
        spec: &AgentSpec,
        current: Option<&Principal>,
        now: Timestamp,
    ) -> Result<AgentDetail, RegistryError> {
        // An existing agent keeps its owner even if the owner was since suspended, unless the
        // update names a new owner.
        let owner = match current.and_then(Principal::owner) {
            Some(existing) if existing.to_string() == spec.owner => existing.clone(),
            _ => self.active_owner("owner", &spec.owner)?,
        };
        let required = |field: &str, value: &str, hint: &str| -> Result<String, RegistryError> {
            let v = value.trim();
            if v.is_empty() {
                Err(invalid(field, format!("is required: {hint}")))
            } else if v.len() > 2000 {
                Err(invalid(field, "is longer than 2000 characters"))
            } else {
                Ok(v.to_string())
            }
        };
        let purpose = required(
            "purpose",
            &spec.purpose,
            "declare what this agent is designed to do",
        )?;
        let purpose_tag = required(
            "purpose_tag",
            &spec.purpose_tag,
            "give a machine-readable purpose such as pull-request-review",
        )?;
        PrincipalId::new(PrincipalKind::Agent, &purpose_tag).map_err(|_| {
            invalid(
                "purpose_tag",
                format!("`{purpose_tag}` must be lowercase letters, digits and dashes"),
            )
        })?;
        let model_provider = required(
            "model_provider",
            &spec.model_provider,
            "name the model provider, e.g. anthropic",
        )?;
        let model = required("model", &spec.model, "name the model, e.g. claude-opus-4")?;
        let model_version = required(
            "model_version",
            &spec.model_version,
            "give the model version, e.g. 2026-05-01",
        )?;
        let cadence = spec
            .review_cadence_days
            .unwrap_or(limits::DEFAULT_REVIEW_CADENCE_DAYS);
        if cadence == 0 || cadence > limits::MAX_REVIEW_CADENCE_DAYS {
            return Err(invalid(
                "review_cadence_days",
                format!(
                    "must be 1 to {} days, got {cadence}",
                    limits::MAX_REVIEW_CADENCE_DAYS
                ),
            ));
        }
        let session = spec
            .max_session_minutes
            .unwrap_or(limits::DEFAULT_MAX_SESSION_MINUTES);
        if session == 0 || session > limits::MAX_SESSION_MINUTES {
            return Err(invalid(
                "max_session_minutes",
                format!(
                    "must be 1 to {} minutes (4 hours), got {session}",
                    limits::MAX_SESSION_MINUTES
                ),
            ));
        }
        let concurrent = spec
            .max_concurrent_sessions
            .unwrap_or(limits::DEFAULT_MAX_CONCURRENT_SESSIONS);
        if concurrent == 0 || concurrent > limits::MAX_CONCURRENT_SESSIONS {
            return Err(invalid(
                "max_concurrent_sessions",
                format!(
                    "must be 1 to {}, got {concurrent}",
                    limits::MAX_CONCURRENT_SESSIONS
                ),
            ));
        }
        let next_review_at = match (spec.next_review_at, current.and_then(Principal::agent)) {
            (Some(at), _) => at,
            (None, Some(existing)) if existing.review_cadence_days == cadence => {
                existing.next_review_at
            }
            (None, _) => now.plus_seconds(i64::from(cadence) * 86_400),
        };
        if let Some(n) = spec.max_concurrent_requests
            && !(1..=1024).contains(&n)
        {
            return Err(invalid(
                "max_concurrent_requests",
                format!("must be 1 to 1024, got {n}"),
            ));
        }
        if spec.max_files_per_session == Some(0) {
            return Err(invalid(
                "max_files_per_session",
                "must be at least 1; leave it out for no limit",
            ));
        }
        let blast_radius = spec.blast_radius.clone().unwrap_or_default();
        blast_radius
            .validate()
            .map_err(|(field, message)| invalid(&field, message))?;
        Ok(AgentDetail {
            owner,
            purpose,
            purpose_tag,
            model_provider,
            model,
            model_version,
            review_cadence_days: cadence,
            next_review_at,
            max_session_minutes: session,
            max_concurrent_sessions: concurrent,
            allowed_resources: validate_names("allowed_resources", spec.allowed_resources.clone())?,
            scopes: validate_scopes(spec.scopes.clone())?,
            max_files_per_session: spec.max_files_per_session,
            data_egress_allowed: spec.data_egress_allowed,
            blast_radius,
            rate_limit: spec.rate_limit,
            max_concurrent_requests: spec.max_concurrent_requests,
        })
    }
}

fn poisoned() -> RegistryError {
    RegistryError::Store(StoreError::Backend(
        "registry lock poisoned by an earlier panic".into(),
    ))
}

fn cli_noun(kind: PrincipalKind) -> &'static str {
    match kind {
        PrincipalKind::Human => "human",
        PrincipalKind::Team => "team",
        PrincipalKind::ServiceAccount => "service-account",
        PrincipalKind::Agent => "agent",
    }
}

fn display_name_of(name: &Option<String>, id: &PrincipalId) -> String {
    name.clone().unwrap_or_else(|| id.slug().to_string())
}

fn clean_name(name: Option<String>) -> Option<String> {
    name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty())
}

// The field named in an error is the path serde reached, or for unknown fields the name that
// serde quotes in back-quotes ("unknown field `x`, expected one of ...").
fn parse_spec<T: serde::de::DeserializeOwned>(spec: Value) -> Result<T, RegistryError> {
    if !spec.is_object() {
        return Err(invalid("body", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let field = if path == "." || path.is_empty() {
            message.split('`').nth(1).unwrap_or("body").to_string()
        } else {
            path
        };
        RegistryError::Invalid { field, message }
    })
}

fn validate_names(field: &str, names: Vec<String>) -> Result<Vec<String>, RegistryError> {
    for n in &names {
        PrincipalId::new(PrincipalKind::Agent, n).map_err(|_| {
            invalid(
                field,
                format!("`{n}` is not a route name (lowercase letters, digits, `-`, `_`, `.`)"),
            )
        })?;
    }
    Ok(names)
}

fn validate_scopes(scopes: Vec<String>) -> Result<Vec<String>, RegistryError> {
    for s in &scopes {
        // RFC 6749 §3.3 scope-token: %x21 / %x23-5B / %x5D-7E
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if !ok {
            return Err(invalid(
                "scopes",
                format!("`{s}` is not a valid OAuth scope token"),
            ));
        }
    }
    Ok(scopes)
}

/// The editable spec of an existing principal, as JSON (the base an update patches).
fn spec_of(p: &Principal) -> Result<Value, RegistryError> {
    let display_name = Some(p.display_name.clone());
    let value = match &p.detail {
        PrincipalDetail::Agent(a) => serde_json::to_value(AgentSpec {
            display_name,
            owner: a.owner.to_string(),
            purpose: a.purpose.clone(),
            purpose_tag: a.purpose_tag.clone(),
            model_provider: a.model_provider.clone(),
            model: a.model.clone(),
            model_version: a.model_version.clone(),
            review_cadence_days: Some(a.review_cadence_days),
            next_review_at: None,
            max_session_minutes: Some(a.max_session_minutes),
            max_concurrent_sessions: Some(a.max_concurrent_sessions),
            allowed_resources: a.allowed_resources.clone(),
            scopes: a.scopes.clone(),
            max_files_per_session: a.max_files_per_session,
            data_egress_allowed: a.data_egress_allowed,
            blast_radius: Some(a.blast_radius.clone()),
            rate_limit: a.rate_limit,
            max_concurrent_requests: a.max_concurrent_requests,
        }),
        PrincipalDetail::Human(h) => serde_json::to_value(HumanSpec {
            display_name,
            email: h.email.clone(),
            teams: h.teams.iter().map(ToString::to_string).collect(),
            may_act: h.may_act.iter().map(ToString::to_string).collect(),
        }),
        PrincipalDetail::Team(t) => serde_json::to_value(TeamSpec {
            display_name,
            description: t.description.clone(),
        }),
        PrincipalDetail::ServiceAccount(s) => serde_json::to_value(ServiceAccountSpec {
            display_name,
            owner: s.owner.to_string(),
            description: s.description.clone(),
            allowed_resources: s.allowed_resources.clone(),
            scopes: s.scopes.clone(),
        }),
    };
    let mut value = value.map_err(|e| RegistryError::Store(StoreError::Backend(e.to_string())))?;
    // Drop nulls so a patch that sets a field cannot collide with a serialized `null`.
    if let Value::Object(map) = &mut value {
        map.retain(|_, v| !v.is_null());
    }
    Ok(value)
}
