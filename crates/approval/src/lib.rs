//! Human-in-the-loop approvals.
//!
//! An enforcement point (the HTTP gateway, the MCP gateway) that finds an action needs approval
//! asks [`Approvals::gate`]. The first time, a request is created (stored, audited, announced)
//! and the caller is told to wait; once authenticated humans have approved it
//! ([`Approvals::decide`]), the same call goes through exactly once (or as often as the rule's
//! `uses` allows within the grant).
//!
//! **Binding.** A request covers exactly one action: the agent, the human it acts for, the
//! channel, method or tool, target, resource, action class, the context the enforcement point
//! binds (HTTP: the query and forwarded headers) and the SHA-256 of the body or arguments
//! ([`binding`]). Any other call, including the same call with a changed body, is not covered.
//!
//! **Counted uses.** `// INVARIANT (used-before-forward)`: each use is stored, then counted in
//! memory, before `gate` returns [`Gate::Proceed`], so a crash after forwarding can never let
//! the grant run more often than allowed (the forwarded call's own event records the use).
//!
//! **Who decides.** Only humans named by the requirement (the owner, a team, a human) and never
//! the human the agent acts for under four eyes (`ResolvedRule::check_approver`); the server
//! authenticates them with a human token for the approvals audience, which an agent cannot hold.

use palisade_audit::{AuditEvent, AuditLog, Outcome, PrincipalRef};
use palisade_core::approval::ResolvedRule;
use palisade_core::secret::hex;
use palisade_core::store::Store;
use palisade_core::{Clock, Principal, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How many requests one agent may have waiting at once; more are refused, so an agent cannot
/// flood its approvers.
pub const MAX_PENDING_PER_AGENT: usize = 20;

/// The header (HTTP) or `_meta` key (MCP) with which an agent names the approval it retries
/// under; optional, since a retry of the same call finds its approval by binding.
pub const APPROVAL_HEADER: &str = "palisade-approval";

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Waiting for decisions.
    Pending,
    /// Approved and not used yet: the next identical call goes through.
    Approved,
    /// An approver refused.
    Denied,
    /// No decision in time, or the grant was not used in time.
    Expired,
    /// The approved call went through (as often as the rule allows).
    Used,
    /// The agent's client withdrew it before a decision (its user declined).
    Withdrawn,
}

impl ApprovalStatus {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Used => "used",
            Self::Withdrawn => "withdrawn",
        }
    }

    /// Parses a lowercase name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Approved,
            Self::Denied,
            Self::Expired,
            Self::Used,
            Self::Withdrawn,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// One approver's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// The human.
    pub approver: String,
    /// Approve (true) or deny.
    pub approve: bool,
    /// Why.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// An approval request and its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// `apr_` and a UUIDv7.
    pub id: String,
    /// Where it stands.
    pub status: ApprovalStatus,
    /// The agent (or other principal) whose action waits.
    pub agent: String,
    /// The agent's owner when it asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The human the agent acts for (delegated token), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiating_human: Option<String>,
    /// The agent's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// `http` or `mcp`.
    pub channel: String,
    /// The action class (`destructive`, `write`, `read`).
    pub action: String,
    /// The Cedar resource.
    pub resource: String,
    /// The HTTP method, or `tools/call`.
    pub method: String,
    /// The path, or `<server>/<tool>`.
    pub target: String,
    /// The query string, secrets and personal data masked (HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// SHA-256 (hex) of what else is bound: the query and the forwarded headers (HTTP).
    #[serde(default)]
    pub context_sha256: String,
    /// SHA-256 (hex) of the request body or the tool arguments.
    pub body_sha256: String,
    /// Its size.
    pub body_bytes: u64,
    /// The start of the body or arguments with secrets and personal data masked, for the
    /// approver to see what they approve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// Whether the preview stops before the end of the body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview_truncated: bool,
    /// What the agent said it was doing (`Palisade-Reasoning`), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// SHA-256 (hex) over everything the approval is bound to.
    pub binding: String,
    /// Who may approve, how many, for how long.
    pub rule: ResolvedRule,
    /// The gateway request that asked.
    pub request_id: String,
    /// When it was asked for (RFC 3339).
    pub requested_at: String,
    /// Nanoseconds since the epoch, for ordering.
    pub requested_ns: i64,
    /// The deadline of the current state (unix seconds): the decision while pending, the use
    /// while approved, how long a denial answers retries while denied.
    pub expires_at: i64,
    /// The decisions so far.
    #[serde(default)]
    pub votes: Vec<Vote>,
    /// When it was approved or denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// How many times the approved call went through (at most `rule.uses`).
    #[serde(default)]
    pub used: u32,
    /// When the approved call last went through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<String>,
    /// The gateway request that used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_request: Option<String>,
}

impl Approval {
    /// How many distinct approvers have approved.
    pub fn approvals(&self) -> usize {
        self.votes.iter().filter(|v| v.approve).count()
    }

    /// `expires_at` as RFC 3339.
    pub fn expires_at_text(&self) -> String {
        Timestamp::from_unix_seconds(self.expires_at).to_rfc3339()
    }
}

/// The action an enforcement point asks about.
pub struct Action<'a> {
    /// The acting principal.
    pub principal: &'a Principal,
    /// The human it acts for.
    pub initiating_human: Option<&'a str>,
    /// Its session.
    pub session: Option<&'a str>,
    /// `http` or `mcp`.
    pub channel: &'static str,
    /// The action class.
    pub action: &'a str,
    /// The Cedar resource.
    pub resource: &'a str,
    /// The method, or `tools/call`.
    pub method: &'a str,
    /// The path, or `<server>/<tool>`.
    pub target: &'a str,
    /// Everything else the call is bound to, hashed only: the query and the headers that go
    /// upstream (HTTP).
    pub context: &'a str,
    /// The query string as approvers see it (secrets and personal data masked).
    pub query: Option<String>,
    /// The body or the arguments (canonical JSON).
    pub body: &'a [u8],
    /// A masked preview of the body for approvers, and whether it was cut short.
    pub preview: Option<(String, bool)>,
    /// The agent's stated reasoning.
    pub reasoning: Option<String>,
    /// The gateway's request id.
    pub request_id: &'a str,
}

/// SHA-256 (hex) over what an approval is bound to, each part length-prefixed.
pub fn binding(a: &Action<'_>, body_sha256: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        a.channel,
        &a.principal.id.to_string(),
        a.initiating_human.unwrap_or(""),
        a.method,
        a.target,
        a.resource,
        a.action,
        &sha256_hex(a.context.as_bytes()),
        body_sha256,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// What the enforcement point does.
#[derive(Debug)]
pub enum Gate {
    /// Forward the call: this approval was approved and is now used.
    Proceed(Approval),
    /// Answer that the call waits for this approval.
    Pending(Approval),
    /// Refuse (403): `code` names the reason, `message` says what to do.
    Refused {
        /// Machine-readable reason: `approval_unknown`, `approval_mismatch`, `approval_denied`,
        /// `approval_expired`, `approval_used`, `too_many_pending`.
        code: &'static str,
        /// For the agent.
        message: String,
        /// The approval concerned.
        id: Option<String>,
    },
    /// The store or the audit log failed: refuse with 503.
    Unavailable(String),
}

/// Why a decision was not taken.
#[derive(Debug)]
pub enum DecideError {
    /// No approval has this id.
    NotFound(String),
    /// It is no longer pending (or this approver already decided).
    Conflict(String),
    /// The approver may not decide it.
    Forbidden(String),
    /// Bad input (e.g. a denial without a reason).
    Invalid(String),
    /// The store or audit log failed; nothing changed.
    Unavailable(String),
}

impl std::fmt::Display for DecideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m)
            | Self::Conflict(m)
            | Self::Forbidden(m)
            | Self::Invalid(m)
            | Self::Unavailable(m) => f.write_str(m),
        }
    }
}

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a request waits for decisions, in seconds (and how long a denial answers
    /// retries of the same call).
    pub wait_secs: u64,
    /// The approve link; `{id}` is replaced.
    pub link: String,
}

#[derive(Default)]
struct State {
    /// Pending, approved and recently denied requests (final ones are only in the store).
    live: HashMap<String, Approval>,
    /// The latest live request per binding.
    by_binding: HashMap<String, String>,
}

impl State {
    fn put(&mut self, next: Approval) {
        match next.status {
            ApprovalStatus::Pending | ApprovalStatus::Approved | ApprovalStatus::Denied => {
                self.by_binding
                    .insert(next.binding.clone(), next.id.clone());
                self.live.insert(next.id.clone(), next);
            }
            ApprovalStatus::Withdrawn => {
                if self.by_binding.get(&next.binding) == Some(&next.id) {
                    self.by_binding.remove(&next.binding);
                }
                self.live.insert(next.id.clone(), next);
            }
            ApprovalStatus::Expired | ApprovalStatus::Used => self.forget(&next),
        }
    }

    fn forget(&mut self, a: &Approval) {
        if self.by_binding.get(&a.binding) == Some(&a.id) {
            self.by_binding.remove(&a.binding);
        }
        self.live.remove(&a.id);
    }
}

/// The approval service: live requests in memory; every change is audited, then stored, then
/// made visible, under one lock, so concurrent calls see each change whole.
pub struct Approvals {
    state: tokio::sync::Mutex<State>,
    changed: tokio::sync::Notify,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
    settings: Settings,
    announce: Option<tokio::sync::mpsc::UnboundedSender<Approval>>,
}

impl Approvals {
    /// The service, with the pending, approved and still-answering denied requests from the
    /// store.
    pub fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        settings: Settings,
    ) -> Result<Self, String> {
        let mut state = State::default();
        let now = clock.now().unix_seconds();
        for status in [
            ApprovalStatus::Pending,
            ApprovalStatus::Approved,
            ApprovalStatus::Denied,
            ApprovalStatus::Withdrawn,
        ] {
            let rows = store
                .approvals(Some(status.as_str()), usize::MAX >> 1)
                .map_err(|e| format!("cannot load approvals: {e}"))?;
            for row in rows {
                let a: Approval = serde_json::from_str(&row)
                    .map_err(|e| format!("a stored approval is unreadable: {e}"))?;
                // Denials older than their window are history; pending and approved ones past
                // their deadline are expired (and audited) by the first sweep.
                if matches!(status, ApprovalStatus::Denied | ApprovalStatus::Withdrawn)
                    && a.expires_at <= now
                {
                    continue;
                }
                state.put(a);
            }
        }
        Ok(Self {
            state: tokio::sync::Mutex::new(state),
            changed: tokio::sync::Notify::new(),
            store,
            clock,
            audit,
            settings,
            announce: None,
        })
    }

    /// New requests are also sent here (the server's webhook notifier).
    pub fn with_announcer(mut self, tx: tokio::sync::mpsc::UnboundedSender<Approval>) -> Self {
        self.announce = Some(tx);
        self
    }

    /// The approve link of `id`.
    pub fn link(&self, id: &str) -> String {
        self.settings.link.replace("{id}", id)
    }

    /// Makes `next` the record: its audit event first (nothing changes if the log cannot
    /// record it), then the store, then memory.
    async fn apply(
        &self,
        state: &mut State,
        next: Approval,
        event: Option<AuditEvent>,
    ) -> Result<(), String> {
        if let Some(e) = event {
            self.audit
                .record(e)
                .await
                .map_err(|e| format!("the audit log cannot record: {e}"))?;
        }
        let record = serde_json::to_string(&next).map_err(|e| e.to_string())?;
        self.store
            .put_approval(&next.id, next.status.as_str(), next.requested_ns, &record)
            .map_err(|e| format!("cannot store the approval: {e}"))?;
        state.put(next);
        Ok(())
    }

    fn stored(&self, id: &str) -> Result<Option<Approval>, String> {
        match self.store.get_approval(id).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(row) => serde_json::from_str(&row)
                .map(Some)
                .map_err(|e| format!("approval {id} is unreadable: {e}")),
        }
    }

    /// An approval by id: the live one, or the stored record.
    pub async fn get(&self, id: &str) -> Result<Option<Approval>, String> {
        if let Some(a) = self.state.lock().await.live.get(id) {
            return Ok(Some(a.clone()));
        }
        self.stored(id)
    }

    /// Approvals from the store, newest first, optionally with one status.
    pub fn list(
        &self,
        status: Option<ApprovalStatus>,
        limit: usize,
    ) -> Result<Vec<Approval>, String> {
        self.store
            .approvals(status.map(ApprovalStatus::as_str), limit)
            .map_err(|e| e.to_string())?
            .iter()
            .map(|row| serde_json::from_str(row).map_err(|e| e.to_string()))
            .collect()
    }

    /// Whether `action` may go ahead under `rule`; `claimed` is the approval id the caller
    /// names, if any.
    pub async fn gate(
        &self,
        action: &Action<'_>,
        rule: &ResolvedRule,
        claimed: Option<&str>,
    ) -> Gate {
        let body_sha256 = sha256_hex(action.body);
        let bound = binding(action, &body_sha256);
        let now = self.clock.now();
        let mut state = self.state.lock().await;
        let outcome = self
            .gate_locked(
                &mut state,
                action,
                rule,
                claimed,
                (&bound, &body_sha256),
                now,
            )
            .await;
        match outcome {
            Ok(gate) => gate,
            Err(e) => Gate::Unavailable(e),
        }
    }

    async fn gate_locked(
        &self,
        state: &mut State,
        action: &Action<'_>,
        rule: &ResolvedRule,
        claimed: Option<&str>,
        (bound, body_sha256): (&str, &str),
        now: Timestamp,
    ) -> Result<Gate, String> {
        let agent = action.principal.id.to_string();
        if let Some(id) = claimed {
            let found = match state.live.get(id) {
                Some(a) => Some(a.clone()),
                None => self.stored(id)?,
            };
            let Some(a) = found.filter(|a| a.agent == agent) else {
                return Ok(Gate::Refused {
                    code: "approval_unknown",
                    message: format!(
                        "approval `{id}` does not exist for {agent}; make the call without naming an approval to ask for one"
                    ),
                    id: None,
                });
            };
            if a.binding != bound {
                return Ok(Gate::Refused {
                    code: "approval_mismatch",
                    message: format!(
                        "approval `{id}` covers a different call ({}); an approval covers exactly one method, target, query, headers and body, so this call needs its own",
                        mismatch(&a, action, body_sha256)
                    ),
                    id: Some(a.id),
                });
            }
            let a = self.settle(state, a, rule, now).await?;
            return self.use_or_wait(state, a, action, now).await;
        }
        if let Some(a) = state
            .by_binding
            .get(bound)
            .and_then(|id| state.live.get(id))
            .cloned()
        {
            let a = self.settle(state, a, rule, now).await?;
            match a.status {
                ApprovalStatus::Pending | ApprovalStatus::Approved | ApprovalStatus::Denied => {
                    return self.use_or_wait(state, a, action, now).await;
                }
                ApprovalStatus::Expired | ApprovalStatus::Used | ApprovalStatus::Withdrawn => {}
            }
        }
        let waiting = state
            .live
            .values()
            .filter(|a| {
                a.agent == agent
                    && (a.status == ApprovalStatus::Pending
                        || (a.status == ApprovalStatus::Withdrawn
                            && now.unix_seconds() < a.expires_at))
            })
            .count();
        if waiting >= MAX_PENDING_PER_AGENT {
            return Ok(Gate::Refused {
                code: "too_many_pending",
                message: format!(
                    "{agent} already has {waiting} approval requests waiting or recently withdrawn, its limit; wait for decisions before asking for more"
                ),
                id: None,
            });
        }
        let a = Approval {
            id: format!("apr_{}", uuid::Uuid::now_v7().simple()),
            status: ApprovalStatus::Pending,
            agent,
            owner: match &action.principal.detail {
                palisade_core::PrincipalDetail::Agent(d) => Some(d.owner.to_string()),
                palisade_core::PrincipalDetail::ServiceAccount(d) => Some(d.owner.to_string()),
                _ => None,
            },
            initiating_human: action.initiating_human.map(str::to_string),
            session: action.session.map(str::to_string),
            channel: action.channel.into(),
            action: action.action.into(),
            resource: action.resource.into(),
            method: action.method.into(),
            target: action.target.into(),
            query: action.query.clone(),
            context_sha256: sha256_hex(action.context.as_bytes()),
            body_sha256: body_sha256.into(),
            body_bytes: action.body.len() as u64,
            preview: action.preview.as_ref().map(|p| p.0.clone()),
            preview_truncated: action.preview.as_ref().is_some_and(|p| p.1),
            reasoning: action.reasoning.clone(),
            binding: bound.into(),
            rule: rule.clone(),
            request_id: action.request_id.into(),
            requested_at: now.to_rfc3339(),
            requested_ns: i64::try_from(now.unix_nanos()).unwrap_or(i64::MAX),
            expires_at: deadline(now, self.settings.wait_secs),
            votes: Vec::new(),
            decided_at: None,
            used: 0,
            used_at: None,
            used_by_request: None,
        };
        let event = self.event("approval.requested", &a, Some(action.principal), None);
        self.apply(state, a.clone(), Some(event)).await?;
        if let Some(tx) = &self.announce {
            let _ = tx.send(a.clone());
        }
        Ok(Gate::Pending(a))
    }

    /// Moves `a` to expired if its deadline passed, or if the rule that applies now differs
    /// from the one it was asked under (a policy changed since), audited and stored.
    async fn settle(
        &self,
        state: &mut State,
        mut a: Approval,
        rule: &ResolvedRule,
        now: Timestamp,
    ) -> Result<Approval, String> {
        let open = matches!(a.status, ApprovalStatus::Pending | ApprovalStatus::Approved);
        let superseded = open && !a.rule.same_as(rule);
        if open && (superseded || now.unix_seconds() >= a.expires_at) {
            let was = a.status;
            a.status = ApprovalStatus::Expired;
            let mut event = self.event("approval.expired", &a, None, None);
            event.detail["was"] = json!(was.as_str());
            if superseded {
                event.detail["superseded"] = json!(true);
            }
            self.apply(state, a.clone(), Some(event)).await?;
        } else if matches!(a.status, ApprovalStatus::Denied | ApprovalStatus::Withdrawn)
            && now.unix_seconds() >= a.expires_at
        {
            // The denial stops answering retries; the record stays denied.
            state.forget(&a);
        }
        Ok(a)
    }

    async fn use_or_wait(
        &self,
        state: &mut State,
        mut a: Approval,
        action: &Action<'_>,
        now: Timestamp,
    ) -> Result<Gate, String> {
        Ok(match a.status {
            ApprovalStatus::Pending => Gate::Pending(a),
            ApprovalStatus::Approved => {
                // INVARIANT (used-before-forward): each use is stored before the call is
                // forwarded; the last one makes the approval used.
                a.used += 1;
                if a.used >= a.rule.uses {
                    a.status = ApprovalStatus::Used;
                }
                a.used_at = Some(now.to_rfc3339());
                a.used_by_request = Some(action.request_id.to_string());
                self.apply(state, a.clone(), None).await?;
                Gate::Proceed(a)
            }
            ApprovalStatus::Denied => {
                let why = a
                    .votes
                    .iter()
                    .find(|v| !v.approve)
                    .map(|v| format!("{}: {}", v.approver, v.reason))
                    .unwrap_or_default();
                Gate::Refused {
                    code: "approval_denied",
                    message: format!(
                        "approval `{}` was denied ({why}); do not retry this call",
                        a.id
                    ),
                    id: Some(a.id),
                }
            }
            ApprovalStatus::Expired => Gate::Refused {
                code: "approval_expired",
                message: format!(
                    "approval `{}` expired (not decided or not used in time, or the policy's approval rule changed); make the call again without naming it to ask anew",
                    a.id
                ),
                id: Some(a.id),
            },
            ApprovalStatus::Withdrawn => Gate::Refused {
                code: "approval_withdrawn",
                message: format!(
                    "approval `{}` was withdrawn at the client; make the call again without naming it to ask anew",
                    a.id
                ),
                id: Some(a.id),
            },
            ApprovalStatus::Used => Gate::Refused {
                code: "approval_used",
                message: format!(
                    "approval `{}` was used up ({} of {} use(s), last by request {}); make the call again without naming it to ask anew",
                    a.id,
                    a.used,
                    a.rule.uses,
                    a.used_by_request.as_deref().unwrap_or("-")
                ),
                id: Some(a.id),
            },
        })
    }

    /// The agent's side withdraws its own request (its client's user declined, or it left):
    /// a pending one, or an approved one not used yet. Returns the status it ends with. A
    /// withdrawn request still counts toward the agent's waiting requests until `wait` passes,
    /// so declining cannot be used to flood approvers.
    pub async fn withdraw(&self, id: &str, agent: &Principal) -> Result<ApprovalStatus, String> {
        let status = {
            let mut state = self.state.lock().await;
            let Some(mut a) = state.live.get(id).cloned() else {
                return Ok(self
                    .stored(id)?
                    .map_or(ApprovalStatus::Expired, |a| a.status));
            };
            let open = a.status == ApprovalStatus::Pending
                || (a.status == ApprovalStatus::Approved && a.used == 0);
            if a.agent != agent.id.to_string() || !open {
                return Ok(a.status);
            }
            let now = self.clock.now();
            a.status = ApprovalStatus::Withdrawn;
            a.decided_at = Some(now.to_rfc3339());
            a.expires_at = deadline(now, self.settings.wait_secs);
            let event = self.event("approval.withdrawn", &a, Some(agent), None);
            self.apply(&mut state, a, Some(event)).await?;
            ApprovalStatus::Withdrawn
        };
        self.changed.notify_waiters();
        Ok(status)
    }

    /// Waits up to `limit` for `id` to leave pending.
    pub async fn wait(&self, id: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending = self
                .state
                .lock()
                .await
                .live
                .get(id)
                .is_some_and(|a| a.status == ApprovalStatus::Pending);
            if !pending {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// `approver` approves or denies `id`. Denials need a reason.
    pub async fn decide(
        &self,
        id: &str,
        approver: &Principal,
        approve: bool,
        reason: &str,
    ) -> Result<Approval, DecideError> {
        let reason = reason.trim();
        if !approve && reason.is_empty() {
            return Err(DecideError::Invalid(
                "reason: a denial needs a reason (--reason), which the agent and the audit log get"
                    .into(),
            ));
        }
        if reason.chars().count() > 1000 {
            return Err(DecideError::Invalid(
                "reason: at most 1000 characters".into(),
            ));
        }
        let now = self.clock.now();
        let result = {
            let mut state = self.state.lock().await;
            self.decide_locked(&mut state, id, approver, approve, reason, now)
                .await
        };
        self.changed.notify_waiters();
        result
    }

    async fn decide_locked(
        &self,
        state: &mut State,
        id: &str,
        approver: &Principal,
        approve: bool,
        reason: &str,
        now: Timestamp,
    ) -> Result<Approval, DecideError> {
        let unavailable = |e: String| DecideError::Unavailable(e);
        let Some(a) = state.live.get(id).cloned() else {
            return match self.stored(id) {
                Err(e) => Err(unavailable(e)),
                Ok(None) => Err(DecideError::NotFound(format!("no approval `{id}`"))),
                Ok(Some(a)) => Err(DecideError::Conflict(format!(
                    "approval `{id}` is {}; only pending requests can be decided",
                    a.status.as_str()
                ))),
            };
        };
        let rule = a.rule.clone();
        let mut a = self
            .settle(state, a, &rule, now)
            .await
            .map_err(unavailable)?;
        if a.status != ApprovalStatus::Pending {
            return Err(DecideError::Conflict(format!(
                "approval `{id}` is {}; only pending requests can be decided",
                a.status.as_str()
            )));
        }
        if let Err(e) = self.eligible(&a, approver) {
            let mut event = self.event("approval.refused", &a, Some(approver), Some(&e));
            event.outcome = Some(Outcome {
                status: 403,
                error: Some(e.clone()),
                ..Outcome::default()
            });
            self.audit
                .record(event)
                .await
                .map_err(|e| unavailable(format!("the audit log cannot record: {e}")))?;
            return Err(DecideError::Forbidden(e));
        }
        let who = approver.id.to_string();
        if a.votes.iter().any(|v| v.approver == who) {
            return Err(DecideError::Conflict(format!(
                "{who} already decided approval `{id}`; {} more approval(s) from other approvers are needed",
                (a.rule.count as usize).saturating_sub(a.approvals())
            )));
        }
        a.votes.push(Vote {
            approver: who,
            approve,
            reason: reason.to_string(),
            at: now.to_rfc3339(),
        });
        let kind = if !approve {
            a.status = ApprovalStatus::Denied;
            a.decided_at = Some(now.to_rfc3339());
            a.expires_at = deadline(now, self.settings.wait_secs);
            "approval.denied"
        } else if a.approvals() >= a.rule.count as usize {
            a.status = ApprovalStatus::Approved;
            a.decided_at = Some(now.to_rfc3339());
            a.expires_at = deadline(now, a.rule.grant_secs);
            "approval.approved"
        } else {
            "approval.vote"
        };
        let event = self.event(kind, &a, Some(approver), Some(reason));
        self.apply(state, a.clone(), Some(event))
            .await
            .map_err(unavailable)?;
        Ok(a)
    }

    /// Whether `approver` may decide `a`; the error says why not.
    pub fn eligible(&self, a: &Approval, approver: &Principal) -> Result<(), String> {
        let owner = a
            .owner
            .as_deref()
            .and_then(|o| palisade_core::PrincipalId::parse_with_default(o, None).ok());
        a.rule
            .check_approver(approver, owner.as_ref(), a.initiating_human.as_deref())
            .map_err(|e| e.0)
    }

    /// Expires what passed its deadline; the server calls it every few seconds.
    pub async fn sweep(&self) {
        let now = self.clock.now();
        let mut changed = false;
        {
            let mut state = self.state.lock().await;
            let due: Vec<Approval> = state
                .live
                .values()
                .filter(|a| now.unix_seconds() >= a.expires_at)
                .cloned()
                .collect();
            for a in due {
                let rule = a.rule.clone();
                match self.settle(&mut state, a, &rule, now).await {
                    Ok(_) => changed = true,
                    Err(e) => tracing::error!(error = %e, "cannot expire an approval; retrying"),
                }
            }
        }
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Records that a notification was (or could not be) delivered.
    pub async fn notified(&self, a: &Approval, channel: &str, error: Option<String>) {
        let mut event = self.event("approval.notified", a, None, None);
        event.detail["channel"] = json!(channel);
        event.outcome = Some(Outcome {
            status: if error.is_some() { 502 } else { 200 },
            error,
            ..Outcome::default()
        });
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "cannot audit an approval notification");
        }
    }

    /// An audit event about `a`: what it covers, linked by its id and the request that asked.
    fn event(
        &self,
        kind: &str,
        a: &Approval,
        principal: Option<&Principal>,
        reason: Option<&str>,
    ) -> AuditEvent {
        let mut event = AuditEvent::new(kind);
        event.request_id = Some(a.request_id.clone());
        event.principal = Some(match principal {
            Some(p) => PrincipalRef::of(p),
            None => PrincipalRef {
                id: a.agent.clone(),
                ..PrincipalRef::default()
            },
        });
        event.action = Some(a.action.clone());
        event.resource = Some(a.resource.clone());
        event.detail = json!({
            "approval": a.id,
            "status": a.status.as_str(),
            "agent": a.agent,
            "channel": a.channel,
            "method": a.method,
            "target": a.target,
            "body_sha256": a.body_sha256,
            "binding": a.binding,
            "approvers": a.rule.approvers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "count": a.rule.count,
            "approved": a.approvals(),
            "four_eyes": a.rule.four_eyes,
            "rule_sources": a.rule.sources,
            "expires_at": a.expires_at_text(),
        });
        if let Some(h) = &a.initiating_human {
            event.detail["initiating_human"] = json!(h);
        }
        if let Some(r) = reason {
            event.detail["reason"] = json!(r);
        }
        event
    }
}

/// `now` plus `secs`, in unix seconds.
fn deadline(now: Timestamp, secs: u64) -> i64 {
    now.unix_seconds()
        .saturating_add(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// What differs between an approval and a call, for the refusal.
fn mismatch(a: &Approval, action: &Action<'_>, body_sha256: &str) -> String {
    let mut parts = Vec::new();
    if a.method != action.method {
        parts.push(format!("method {} ≠ {}", a.method, action.method));
    }
    if a.target != action.target {
        parts.push(format!("target `{}` ≠ `{}`", a.target, action.target));
    }
    if a.context_sha256 != sha256_hex(action.context.as_bytes()) {
        parts.push("the query or headers differ".to_string());
    }
    if a.body_sha256 != body_sha256 {
        parts.push("the body or arguments differ".to_string());
    }
    if a.initiating_human.as_deref() != action.initiating_human {
        parts.push("it was asked for another human".to_string());
    }
    if parts.is_empty() {
        parts.push("the resource or action class differ".to_string());
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_core::approval::Approver;
    use palisade_core::principal::HumanDetail;
    use palisade_core::{PrincipalDetail, PrincipalId, Status};

    fn human(slug: &str) -> Principal {
        Principal {
            id: PrincipalId::parse_with_default(slug, Some(palisade_core::PrincipalKind::Human))
                .unwrap(),
            display_name: slug.into(),
            status: Status::Active,
            status_change: None,
            created_at: Timestamp::from_unix_seconds(0),
            updated_at: Timestamp::from_unix_seconds(0),
            detail: PrincipalDetail::Human(HumanDetail {
                email: None,
                teams: Vec::new(),
                may_act: Vec::new(),
            }),
        }
    }

    fn service(name: &str) -> (Arc<Approvals>, Arc<dyn Store>, palisade_audit::AuditWriter) {
        let dir =
            std::env::temp_dir().join(format!("palisade-approval-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Arc<dyn Store> = Arc::new(palisade_store::SqliteStore::open(&dir).unwrap());
        let (audit, writer) = AuditLog::start(store.clone()).unwrap();
        let settings = Settings {
            wait_secs: 3600,
            link: "https://c/{id}".into(),
        };
        let svc = Approvals::load(
            store.clone(),
            Arc::new(palisade_core::SystemClock),
            audit,
            settings,
        )
        .unwrap();
        (Arc::new(svc), store, writer)
    }

    fn rule() -> ResolvedRule {
        ResolvedRule {
            approvers: vec![Approver::Human(
                PrincipalId::parse_with_default("human:bob", None).unwrap(),
            )],
            count: 1,
            grant_secs: 600,
            four_eyes: true,
            uses: 1,
            sources: vec!["test".into()],
        }
    }

    fn action<'a>(who: &'a Principal, body: &'a [u8], request_id: &'a str) -> Action<'a> {
        Action {
            principal: who,
            initiating_human: None,
            session: None,
            channel: "http",
            action: "destructive",
            resource: "Palisade::Route::\"r\"",
            method: "DELETE",
            target: "/r/1",
            context: "",
            query: None,
            body,
            preview: None,
            reasoning: None,
            request_id,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_retries_use_a_grant_exactly_once() {
        let (svc, store, _writer) = service("once");
        let agent = human("runner");
        let bob = human("bob");
        let Gate::Pending(a) = svc.gate(&action(&agent, b"{}", "r0"), &rule(), None).await else {
            panic!("a new request waits");
        };
        let approved = svc.decide(&a.id, &bob, true, "ok").await.unwrap();
        assert_eq!(approved.status, ApprovalStatus::Approved);
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (svc, agent, id) = (svc.clone(), agent.clone(), a.id.clone());
            tasks.push(tokio::spawn(async move {
                let rid = format!("r{}", i + 1);
                let claimed = (i % 2 == 0).then_some(id.as_str());
                match svc
                    .gate(&action(&agent, b"{}", &rid), &rule(), claimed)
                    .await
                {
                    Gate::Proceed(_) => "proceed",
                    Gate::Pending(_) => "pending",
                    Gate::Refused { code, .. } => code,
                    Gate::Unavailable(_) => "unavailable",
                }
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        assert_eq!(
            outcomes.iter().filter(|o| **o == "proceed").count(),
            1,
            "{outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| ["proceed", "pending", "approval_used"].contains(o)),
            "{outcomes:?}"
        );
        // The store holds it as used, so a reload cannot bring the grant back.
        let row = store.get_approval(&a.id).unwrap().unwrap();
        let stored: Approval = serde_json::from_str(&row).unwrap();
        assert_eq!(stored.status, ApprovalStatus::Used);
        let (audit, _w) = AuditLog::start(store.clone()).unwrap();
        let settings = Settings {
            wait_secs: 3600,
            link: "{id}".into(),
        };
        let reloaded =
            Approvals::load(store, Arc::new(palisade_core::SystemClock), audit, settings).unwrap();
        let again = reloaded
            .gate(&action(&agent, b"{}", "r99"), &rule(), Some(&a.id))
            .await;
        assert!(
            matches!(
                again,
                Gate::Refused {
                    code: "approval_used",
                    ..
                }
            ),
            "{again:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grant_for_three_uses_runs_three_times() {
        let (svc, _store, _writer) = service("uses");
        let agent = human("runner");
        let thrice = ResolvedRule { uses: 3, ..rule() };
        let Gate::Pending(a) = svc.gate(&action(&agent, b"{}", "r0"), &thrice, None).await else {
            panic!("a new request waits");
        };
        svc.decide(&a.id, &human("bob"), true, "ok").await.unwrap();
        for i in 1..=3 {
            let g = svc
                .gate(
                    &action(&agent, b"{}", &format!("r{i}")),
                    &thrice,
                    Some(&a.id),
                )
                .await;
            assert!(matches!(&g, Gate::Proceed(p) if p.used == i), "{g:?}");
        }
        let g = svc
            .gate(&action(&agent, b"{}", "r4"), &thrice, Some(&a.id))
            .await;
        assert!(
            matches!(&g, Gate::Refused { code: "approval_used", message, .. } if message.contains("3 of 3")),
            "{g:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_rule_supersedes_requests_and_grants() {
        let (svc, _store, _writer) = service("superseded");
        let agent = human("runner");
        let Gate::Pending(a) = svc.gate(&action(&agent, b"{}", "r0"), &rule(), None).await else {
            panic!("a new request waits");
        };
        svc.decide(&a.id, &human("bob"), true, "ok").await.unwrap();
        // A policy now asks for two approvers: the grant under the old rule does not count.
        let stricter = ResolvedRule { count: 2, ..rule() };
        let again = svc
            .gate(&action(&agent, b"{}", "r1"), &stricter, Some(&a.id))
            .await;
        assert!(
            matches!(
                again,
                Gate::Refused {
                    code: "approval_expired",
                    ..
                }
            ),
            "{again:?}"
        );
        let Gate::Pending(b) = svc
            .gate(&action(&agent, b"{}", "r2"), &stricter, None)
            .await
        else {
            panic!("a new request under the new rule");
        };
        assert_ne!(a.id, b.id);
        assert_eq!(b.rule.count, 2);
        assert_eq!(
            svc.get(&a.id).await.unwrap().unwrap().status,
            ApprovalStatus::Expired
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_named_humans_decide_once_and_wait_wakes_up() {
        let (svc, _store, _writer) = service("decide");
        let agent = human("runner");
        let Gate::Pending(a) = svc.gate(&action(&agent, b"x", "r0"), &rule(), None).await else {
            panic!("a new request waits");
        };
        let eve = human("eve");
        assert!(matches!(
            svc.decide(&a.id, &eve, true, "").await,
            Err(DecideError::Forbidden(_))
        ));
        assert!(matches!(
            svc.decide(&a.id, &human("bob"), false, " ").await,
            Err(DecideError::Invalid(_))
        ));
        let waiter = {
            let (svc, id) = (svc.clone(), a.id.clone());
            tokio::spawn(async move { svc.wait(&id, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "waits while pending");
        svc.decide(&a.id, &human("bob"), false, "no").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the decision wakes the waiter")
            .unwrap();
        assert!(matches!(
            svc.decide(&a.id, &human("bob"), true, "").await,
            Err(DecideError::Conflict(_))
        ));
        assert!(matches!(
            svc.decide("apr_nope", &human("bob"), true, "").await,
            Err(DecideError::NotFound(_))
        ));
    }
}
