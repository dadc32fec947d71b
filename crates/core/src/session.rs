//! Agent sessions: the unit that tokens, counters, limits and the kill switch hang off.
//!
//! A session starts at an agent's first token request, has a hard end at the agent's maximum
//! session duration, and ends early on request, on revocation or by the kill switch. Every token
//! of an agent carries its session id (`sid`); the gateway looks the session up on every request,
//! so ending a session stops all its tokens at once.
//!
//! INVARIANT (fail-closed): a `sid` this table does not hold is refused, so a session that was
//! ended, expired or never existed can never authorise anything, also after a restart.
//! INVARIANT (memory-first end): an end is applied in memory before it is written to the store,
//! so enforcement never waits for the disk; a failed write is reported to the caller.

use crate::store::{Store, StoreError};
use crate::{Clock, PrincipalId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// It reached its hard end (the agent's max session duration).
    Expired,
    /// The agent or an administrator ended it.
    Ended,
    /// One of its tokens was revoked.
    Revoked,
    /// The kill switch (agent, owner or panic).
    Killed,
}

impl EndReason {
    /// Stable text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Ended => "ended",
            Self::Revoked => "revoked",
            Self::Killed => "killed",
        }
    }

    /// Parses [`EndReason::as_str`] text.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Expired, Self::Ended, Self::Revoked, Self::Killed]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// How and when a session ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnd {
    /// When.
    pub at: Timestamp,
    /// Why.
    pub reason: EndReason,
    /// Who: a principal id, `admin`, or `palisade` for expiry.
    pub by: String,
    /// Free text from whoever ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Volume so far in a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCounters {
    /// Gateway requests that passed authentication.
    pub calls: u64,
    /// Requests that a route rule counts as reading an object, and that were let through.
    pub objects_read: u64,
    /// Body bytes the agent received (responses).
    pub bytes_in: u64,
    /// Body bytes the agent sent (requests): what left the agent.
    pub bytes_out: u64,
}

/// A session as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id, the tokens' `sid`.
    pub sid: String,
    /// The agent.
    pub principal: PrincipalId,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ends at the latest; no token of it lives longer.
    pub hard_end: Timestamp,
    /// The human who started the task, for delegated sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiating_human: Option<String>,
    /// Set once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<SessionEnd>,
    /// Volume so far.
    pub counters: SessionCounters,
    /// Whether the end's `session.ended` event is in the audit log (ended sessions only; rows
    /// from before this field count as audited).
    #[serde(default = "yes")]
    pub audited: bool,
    /// Labels of untrusted content the session ingested (`untrusted`, `injection`,
    /// `tainted-content`): once set, never cleared for the session's life.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taint: Vec<String>,
    /// Whether it read Confidential or Restricted data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
}

fn yes() -> bool {
    true
}

const AUDIT_DONE: u8 = 0;
const AUDIT_PENDING: u8 = 1;
const AUDIT_IN_FLIGHT: u8 = 2;

/// A session in memory, shared by the token service and the gateway.
#[derive(Debug)]
pub struct LiveSession {
    /// Session id.
    pub sid: String,
    /// The agent.
    pub principal: PrincipalId,
    /// Start.
    pub started_at: Timestamp,
    /// Hard end.
    pub hard_end: Timestamp,
    /// The human who started the task, if delegated.
    pub initiating_human: Option<String>,
    ended: AtomicBool,
    end: Mutex<Option<SessionEnd>>,
    calls: AtomicU64,
    objects_read: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    route_objects: Box<[AtomicU64]>,
    dirty: AtomicBool,
    /// The end is in memory but its store write failed; the sweeper retries it.
    end_unsaved: AtomicBool,
    /// Whether the end's audit event is written (`AUDIT_DONE`), due (`AUDIT_PENDING`), or being
    /// written by whoever took it (`AUDIT_IN_FLIGHT`).
    audit: AtomicU8,
    taint: Mutex<Vec<String>>,
    sensitive: AtomicBool,
    inputs: Mutex<Inputs>,
}

/// Most content references a session remembers (the newest are kept).
pub const MAX_INPUTS: usize = 16;

/// A reference to content a session ingested: where from, a hash of what was read, and what it
/// carried (never the content itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    /// What was read: `<route>:<path>`, `mcp/<server>/<tool>` or `mcp/<server>:<uri>`.
    pub source: String,
    /// SHA-256 (hex) of the bytes the agent received, when Palisade saw them whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Labels the content carried (`untrusted`, `injection`, `tainted-content`, a finding
    /// category), empty when clean.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// When it was read, nanoseconds since the epoch.
    pub time_ns: i64,
}

/// The newest inputs of a session and how many it ingested in all.
#[derive(Debug, Default)]
struct Inputs {
    recent: std::collections::VecDeque<InputRef>,
    total: u64,
}

/// Why a session cannot be used (for a request or a renewal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRefusal {
    /// The session id, when there was one.
    pub sid: Option<String>,
    /// Why: how it ended (`expired`, `ended`, `revoked`, `killed`), or `unknown` / `mismatch`.
    pub state: &'static str,
    /// Safe text for the caller.
    pub message: String,
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The agent already has its maximum number of live sessions.
    #[error(
        "{principal} already has {limit} live session(s), its max_concurrent_sessions; end one (palisade session end SID) or wait for one to expire"
    )]
    Limit {
        /// The agent.
        principal: PrincipalId,
        /// Its limit.
        limit: u32,
        /// The live sessions.
        live: Vec<SessionRecord>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LiveSession {
    fn new(record: &SessionRecord, routes: usize) -> Self {
        let c = record.counters;
        Self {
            sid: record.sid.clone(),
            principal: record.principal.clone(),
            started_at: record.started_at,
            hard_end: record.hard_end,
            initiating_human: record.initiating_human.clone(),
            ended: AtomicBool::new(record.end.is_some()),
            end: Mutex::new(record.end.clone()),
            calls: AtomicU64::new(c.calls),
            objects_read: AtomicU64::new(c.objects_read),
            bytes_in: AtomicU64::new(c.bytes_in),
            bytes_out: AtomicU64::new(c.bytes_out),
            route_objects: (0..routes).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(false),
            end_unsaved: AtomicBool::new(false),
            // A stored end without its audit event (a crash in between) is audited again.
            audit: AtomicU8::new(if record.end.is_some() && !record.audited {
                AUDIT_PENDING
            } else {
                AUDIT_DONE
            }),
            taint: Mutex::new(record.taint.clone()),
            sensitive: AtomicBool::new(record.sensitive),
            inputs: Mutex::default(),
        }
    }

    /// Records content the session ingested (the newest [`MAX_INPUTS`] are kept, in memory).
    pub fn add_input(&self, input: InputRef) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        if inputs.recent.len() == MAX_INPUTS {
            inputs.recent.pop_front();
        }
        inputs.recent.push_back(input);
        inputs.total += 1;
    }

    /// The newest inputs, oldest first, and how many the session ingested in all.
    pub fn inputs(&self) -> (Vec<InputRef>, u64) {
        let inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        (inputs.recent.iter().cloned().collect(), inputs.total)
    }

    /// Adds a taint label; returns whether it is new (the caller then persists the session
    /// before releasing the content that tainted it).
    pub fn add_taint(&self, label: &str) -> bool {
        let mut taint = self.taint.lock().unwrap_or_else(|p| p.into_inner());
        if taint.iter().any(|t| t == label) {
            return false;
        }
        taint.push(label.to_string());
        taint.sort_unstable();
        drop(taint);
        self.touched();
        true
    }

    /// The taint labels, sorted.
    pub fn taint(&self) -> Vec<String> {
        self.taint.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether any taint label is set.
    pub fn is_tainted(&self) -> bool {
        !self
            .taint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Marks that it read Confidential or Restricted data; returns whether that is new.
    pub fn mark_sensitive(&self) -> bool {
        let new = !self.sensitive.swap(true, Ordering::AcqRel);
        if new {
            self.touched();
        }
        new
    }

    /// Whether it read Confidential or Restricted data.
    pub fn is_sensitive(&self) -> bool {
        self.sensitive.load(Ordering::Acquire)
    }

    /// Claims the duty to audit this session's end: true once per end. The caller then reports
    /// [`LiveSession::audit_done`] or [`LiveSession::audit_failed`] (the sweeper retries).
    pub fn take_audit(&self) -> bool {
        self.audit
            .compare_exchange(
                AUDIT_PENDING,
                AUDIT_IN_FLIGHT,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The end's audit event is written.
    pub fn audit_done(&self) {
        self.audit.store(AUDIT_DONE, Ordering::Release);
    }

    /// Hands the audit of this session's end back to the sweeper.
    pub fn audit_failed(&self) {
        self.audit.store(AUDIT_PENDING, Ordering::Release);
    }

    fn touched(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether it has ended (by request, revocation or kill; expiry is checked against a clock).
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// How it ended, if it did.
    pub fn end(&self) -> Option<SessionEnd> {
        self.end
            .lock()
            .map(|e| e.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The counters now.
    pub fn counters(&self) -> SessionCounters {
        SessionCounters {
            calls: self.calls.load(Ordering::Relaxed),
            objects_read: self.objects_read.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    /// The stored form.
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            sid: self.sid.clone(),
            principal: self.principal.clone(),
            started_at: self.started_at,
            hard_end: self.hard_end,
            initiating_human: self.initiating_human.clone(),
            end: self.end(),
            counters: self.counters(),
            audited: self.audit.load(Ordering::Acquire) == AUDIT_DONE,
            taint: self.taint(),
            sensitive: self.is_sensitive(),
        }
    }

    /// Counts one call and returns the session's call count including it.
    pub fn count_call(&self) -> u64 {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        self.touched();
        n
    }

    /// Takes one object read if both the session-wide and the route's count stay within their
    /// limits; returns the new counts `(session, route)`, or the counts that would have been
    /// exceeded as `Err`. Concurrent callers can never take more than a limit allows.
    pub fn take_object_read(
        &self,
        route: usize,
        session_limit: Option<u64>,
        route_limit: Option<u64>,
    ) -> Result<(u64, u64), (u64, u64)> {
        let session = self.objects_read.fetch_add(1, Ordering::SeqCst) + 1;
        let per_route = self
            .route_objects
            .get(route)
            .map(|c| c.fetch_add(1, Ordering::SeqCst) + 1)
            .unwrap_or(session);
        let over = session_limit.is_some_and(|l| session > l)
            || route_limit.is_some_and(|l| per_route > l);
        if over {
            self.objects_read.fetch_sub(1, Ordering::SeqCst);
            if let Some(c) = self.route_objects.get(route) {
                c.fetch_sub(1, Ordering::SeqCst);
            }
            return Err((session, per_route));
        }
        self.touched();
        Ok((session, per_route))
    }

    /// Gives back an object read taken by [`LiveSession::take_object_read`] for a request that was
    /// refused later (by policy).
    pub fn return_object_read(&self, route: usize) {
        self.objects_read.fetch_sub(1, Ordering::SeqCst);
        if let Some(c) = self.route_objects.get(route) {
            c.fetch_sub(1, Ordering::SeqCst);
        }
        self.touched();
    }

    /// Adds body bytes the agent received.
    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
        self.touched();
    }

    /// Adds body bytes the agent sent.
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
        self.touched();
    }

    /// Marks it ended unless it already was; returns whether this call ended it.
    fn mark_ended(&self, end: SessionEnd) -> bool {
        let mut slot = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(end);
        self.ended.store(true, Ordering::SeqCst);
        self.audit.store(AUDIT_PENDING, Ordering::Release);
        true
    }

    /// Whether a request or renewal at `now` may use it.
    pub fn usable_at(&self, now: Timestamp) -> Result<(), SessionRefusal> {
        if let Some(end) = self.is_ended().then(|| self.end()).flatten() {
            return Err(SessionRefusal {
                sid: Some(self.sid.clone()),
                state: end.reason.as_str(),
                message: format!(
                    "session {} was {} at {} by {}; start a new session",
                    self.sid,
                    end.reason.as_str(),
                    end.at,
                    end.by
                ),
            });
        }
        if now >= self.hard_end {
            return Err(SessionRefusal {
                sid: Some(self.sid.clone()),
                state: "expired",
                message: format!(
                    "session {} reached its hard end at {} (the agent's max session duration); start a new session",
                    self.sid, self.hard_end
                ),
            });
        }
        Ok(())
    }
}

/// Every session the server knows, live or recently ended.
pub struct Sessions {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    routes: usize,
    /// How long ended sessions stay in memory after their hard end, for precise messages.
    linger_secs: i64,
    table: RwLock<HashMap<String, Arc<LiveSession>>>,
    /// Serialises starts, so the concurrency limit cannot be raced.
    starting: Mutex<()>,
    last_prune: Mutex<Option<Timestamp>>,
}

/// Days a session stays in the store after its hard end (the audit log keeps it for good).
pub const RETAIN_DAYS: i64 = 30;

impl Sessions {
    /// Loads open and recently ended sessions. `routes` is the number of gateway routes (for
    /// per-route counters); `linger_secs` is how long after its hard end an ended session is kept
    /// (the token leeway).
    pub fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        routes: usize,
        linger_secs: i64,
    ) -> Result<Self, StoreError> {
        let since = clock.now().plus_seconds(-linger_secs);
        let table = store
            .sessions_since(since)?
            .into_iter()
            .map(|r| (r.sid.clone(), Arc::new(LiveSession::new(&r, routes))))
            .collect();
        Ok(Self {
            store,
            clock,
            routes,
            linger_secs,
            table: RwLock::new(table),
            starting: Mutex::new(()),
            last_prune: Mutex::new(None),
        })
    }

    /// The clock sessions are judged by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// One session, if known.
    pub fn get(&self, sid: &str) -> Option<Arc<LiveSession>> {
        self.read().get(sid).cloned()
    }

    /// The session `sid` of `principal`, if it may be used now.
    pub fn check(
        &self,
        sid: &str,
        principal: &PrincipalId,
    ) -> Result<Arc<LiveSession>, SessionRefusal> {
        let Some(session) = self.get(sid) else {
            return Err(SessionRefusal {
                sid: Some(sid.to_string()),
                state: "unknown",
                message: format!("session {sid} is not live; start a new session"),
            });
        };
        if session.principal != *principal {
            return Err(SessionRefusal {
                sid: Some(sid.to_string()),
                state: "mismatch",
                message: format!("session {sid} belongs to another principal"),
            });
        }
        session.usable_at(self.clock.now())?;
        Ok(session)
    }

    /// Live sessions of a principal (not ended, before their hard end), oldest first.
    pub fn live_of(&self, principal: &PrincipalId) -> Vec<Arc<LiveSession>> {
        let now = self.clock.now();
        let mut live: Vec<_> = self
            .read()
            .values()
            .filter(|s| s.principal == *principal && s.usable_at(now).is_ok())
            .cloned()
            .collect();
        live.sort_by_key(|s| s.started_at);
        live
    }

    /// Every live session, oldest first.
    pub fn all_live(&self) -> Vec<Arc<LiveSession>> {
        let now = self.clock.now();
        let mut live: Vec<_> = self
            .read()
            .values()
            .filter(|s| s.usable_at(now).is_ok())
            .cloned()
            .collect();
        live.sort_by_key(|s| s.started_at);
        live
    }

    /// Starts a session of at most `max_minutes` for `principal`, unless it already has
    /// `max_concurrent` live ones. The session is stored before it is returned.
    pub fn start(
        &self,
        principal: &PrincipalId,
        max_minutes: u32,
        max_concurrent: u32,
        initiating_human: Option<String>,
    ) -> Result<Arc<LiveSession>, StartError> {
        let _guard = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.live_of(principal);
        if live.len() >= usize::try_from(max_concurrent).unwrap_or(usize::MAX) {
            return Err(StartError::Limit {
                principal: principal.clone(),
                limit: max_concurrent,
                live: live.iter().map(|s| s.record()).collect(),
            });
        }
        let now = self.clock.now();
        let sid = format!(
            "ses_{}",
            crate::secret::random_id::<16>().map_err(|e| StoreError::Backend(e.to_string()))?
        );
        let record = SessionRecord {
            sid: sid.clone(),
            principal: principal.clone(),
            started_at: now,
            hard_end: now.plus_seconds(i64::from(max_minutes) * 60),
            initiating_human,
            end: None,
            counters: SessionCounters::default(),
            audited: true,
            taint: Vec::new(),
            sensitive: false,
        };
        self.store.insert_session(&record)?;
        let session = Arc::new(LiveSession::new(&record, self.routes));
        self.write().insert(sid, session.clone());
        Ok(session)
    }

    /// Ends sessions (those already ended are skipped) and returns the ones this call ended.
    /// Memory first, then the store: the gateway refuses them before this returns, even if the
    /// write then fails (the error is returned so the caller can say so and retry).
    pub fn end(
        &self,
        sessions: &[Arc<LiveSession>],
        reason: EndReason,
        by: &str,
        message: Option<&str>,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let end = SessionEnd {
            at: self.clock.now(),
            reason,
            by: by.to_string(),
            message: message.map(str::to_string),
        };
        let ended: Vec<&Arc<LiveSession>> = sessions
            .iter()
            .filter(|s| s.mark_ended(end.clone()))
            .collect();
        let records: Vec<SessionRecord> = ended.iter().map(|s| s.record()).collect();
        if !records.is_empty()
            && let Err(e) = self.store.end_sessions(&records)
        {
            // Enforced already; the sweeper stores it on its next run.
            for s in &ended {
                s.end_unsaved.store(true, Ordering::Release);
            }
            return Err(e);
        }
        Ok(records)
    }

    /// Ends every session of the given principals (the kill switch).
    pub fn end_all_of(
        &self,
        principals: &[PrincipalId],
        reason: EndReason,
        by: &str,
        message: Option<&str>,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let targets: Vec<_> = self
            .read()
            .values()
            .filter(|s| !s.is_ended() && principals.contains(&s.principal))
            .cloned()
            .collect();
        self.end(&targets, reason, by, message)
    }

    /// Housekeeping, run about once a second: ends sessions past their hard end, retries ends
    /// whose store write failed, saves changed counters, prunes stored sessions older than
    /// [`RETAIN_DAYS`], and forgets ended sessions once `linger` has passed since they ended.
    /// Returns the ended sessions whose audit event is still due (the caller writes them and
    /// calls [`LiveSession::audit_failed`] for any it could not write), and the first store error.
    pub fn sweep(&self) -> (Vec<SessionRecord>, Option<StoreError>) {
        let now = self.clock.now();
        let mut error = None;
        let expired: Vec<_> = self
            .read()
            .values()
            .filter(|s| !s.is_ended() && now >= s.hard_end)
            .cloned()
            .collect();
        if let Err(e) = self.end(&expired, EndReason::Expired, "palisade", None) {
            error.get_or_insert(e);
        }
        let unsaved: Vec<Arc<LiveSession>> = self
            .read()
            .values()
            .filter(|s| s.end_unsaved.swap(false, Ordering::AcqRel))
            .cloned()
            .collect();
        if !unsaved.is_empty() {
            let records: Vec<SessionRecord> = unsaved.iter().map(|s| s.record()).collect();
            if let Err(e) = self.store.end_sessions(&records) {
                for s in &unsaved {
                    s.end_unsaved.store(true, Ordering::Release);
                }
                error.get_or_insert(e);
            }
        }
        let dirty: Vec<Arc<LiveSession>> = self
            .read()
            .values()
            .filter(|s| s.dirty.swap(false, Ordering::Acquire))
            .cloned()
            .collect();
        if !dirty.is_empty() {
            let records: Vec<SessionRecord> = dirty.iter().map(|s| s.record()).collect();
            if let Err(e) = self.store.save_session_counters(&records) {
                for s in &dirty {
                    s.touched();
                }
                error.get_or_insert(e);
            }
        }
        let due_prune = {
            let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| now >= t.plus_seconds(3_600));
            if due {
                *last = Some(now);
            }
            due
        };
        if due_prune
            && let Err(e) = self
                .store
                .prune_sessions(now.plus_seconds(-RETAIN_DAYS * 86_400))
        {
            error.get_or_insert(e);
        }
        let to_audit: Vec<SessionRecord> = self
            .read()
            .values()
            .filter(|s| s.take_audit())
            .map(|s| s.record())
            .collect();
        let linger = self.linger_secs;
        self.write().retain(|_, s| {
            let Some(end) = s.end() else { return true };
            // Only once the end is stored and its audit event confirmed written.
            let settled = !s.end_unsaved.load(Ordering::Acquire)
                && s.audit.load(Ordering::Acquire) == AUDIT_DONE;
            // Forgotten sessions are still refused (fail closed), only less precisely.
            !(settled && now >= end.at.min(s.hard_end).plus_seconds(linger))
        });
        (to_audit, error)
    }

    /// Stores `session` now (its taint or sensitivity changed: that must survive a crash
    /// before the content that caused it reaches the agent).
    pub fn persist(&self, session: &LiveSession) -> Result<(), StoreError> {
        self.store.save_session_counters(&[session.record()])
    }

    /// Marks sessions' end events as audited.
    pub fn mark_audited(&self, sids: &[String]) -> Result<(), StoreError> {
        if sids.is_empty() {
            return Ok(());
        }
        self.store.mark_sessions_audited(sids)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<LiveSession>>> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<LiveSession>>> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }
}
