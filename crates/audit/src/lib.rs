//! The audit log: structured events, a SHA-256 hash chain, a group-commit writer that makes each
//! event durable before its caller proceeds, and a verifier that names the first broken event.
//!
//! INVARIANT (durable-before-ack): [`AuditLog::record`] resolves only after the event's
//! transaction committed (`synchronous=FULL`); callers send their response after that.
//! INVARIANT (no-secrets): events are built from typed fields; nothing here copies headers or
//! bodies, so a token or secret can only enter an event if a caller puts it in a field by name.

pub mod checkpoint;
pub mod detect;
pub mod query;
pub mod retention;
pub mod siem;

use palisade_core::store::{AuditFacts, AuditRow, Store, StoreError, StoredAuditEvent};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// Version of the event schema (2 added `trace_id` and `reasoning`, 3 `inputs`).
pub const SCHEMA_VERSION: u32 = 3;
/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const MAX_BATCH: usize = 2048;

/// The acting principal of an event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalRef {
    /// Principal id.
    pub id: String,
    /// `provider/model@version` for agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Owner id for agents and service accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// An agent's purpose tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

impl PrincipalRef {
    /// The reference to a principal: id, and for agents model, owner and purpose tag.
    pub fn of(p: &palisade_core::Principal) -> Self {
        Self {
            id: p.id.to_string(),
            model: p
                .agent()
                .map(|a| format!("{}/{}@{}", a.model_provider, a.model, a.model_version)),
            owner: p.owner().map(ToString::to_string),
            purpose: p.agent().map(|a| a.purpose_tag.clone()),
        }
    }
}

/// A policy decision as recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Allowed or not.
    pub allowed: bool,
    /// Deciding policy ids.
    pub policies: Vec<String>,
    /// Policy-set version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
}

/// What happened as a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// HTTP status sent.
    pub status: u16,
    /// Request body bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Response body bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Error or refusal reason (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Who started the task an agent acts in (RFC 8693 delegation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// The human the agent acts for.
    pub initiating_human: String,
    /// The actors, from the one acting now back to the first.
    pub actor_chain: Vec<String>,
}

/// The input context of an action: the newest content references of the session, oldest
/// first, and how many it ingested in all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputContext {
    /// The newest references (at most 16).
    pub recent: Vec<palisade_core::session::InputRef>,
    /// Everything the session ingested so far.
    pub total: u64,
}

impl InputContext {
    /// The session's input context, or `None` before it ingested anything.
    pub fn of(session: &palisade_core::session::LiveSession) -> Option<Self> {
        let (recent, total) = session.inputs();
        (total > 0).then_some(Self { recent, total })
    }
}

/// An agent's reasoning trace for one action (`Palisade-Reasoning` header, or
/// `_meta["palisade/reasoning"]` of an MCP call): capped, scanned, redacted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reasoning {
    /// The text, at most 4 KiB, secrets and PII masked as `[REDACTED:<TYPE>]`.
    pub text: String,
    /// SHA-256 (hex) of the text as sent (before capping and masking).
    pub sha256: String,
    /// Whether it was longer than the cap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Categories content inspection found in it (`secret`, `pii`, `injection`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
}

/// An alert-grade finding attached to an event, for detection rules and the SOC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// A stable rule name, e.g. `purpose-violation`.
    pub rule: String,
    /// What happened, for a person.
    pub message: String,
}

/// One audit event (schema version 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Schema version.
    pub schema: u32,
    /// Unique id (UUIDv7, time-ordered).
    pub event_id: String,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// e.g. `token.issued`, `token.refused`, `gateway.decision`, `admin.change`.
    pub kind: String,
    /// The request this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The W3C trace id (from the caller's `traceparent`, or started here), 32 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The agent's stated reason for the action, as it sent it, with secrets and PII masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Reasoning>,
    /// What the acting session ingested before this action: references (source, content
    /// hash, labels), never content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<InputContext>,
    /// The acting principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<PrincipalRef>,
    /// The action (`read`, `agent.suspend`, `client_credentials`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The resource (`Route::tickets`, `agent:x`, an audience, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The policy decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionRecord>,
    /// The outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Time from request receipt to response, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// For delegated actions: the initiating human and the actor chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Delegation>,
    /// An alert raised by this event, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<Alert>,
    /// Kind-specific extra fields.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl AuditEvent {
    /// A new event of `kind`, stamped now with a fresh id.
    pub fn new(kind: &str) -> Self {
        let now = palisade_core::Timestamp::now().unix_nanos();
        Self {
            schema: SCHEMA_VERSION,
            event_id: uuid::Uuid::now_v7().to_string(),
            time_ns: i64::try_from(now).unwrap_or(i64::MAX),
            kind: kind.to_string(),
            request_id: None,
            trace_id: None,
            reasoning: None,
            inputs: None,
            principal: None,
            action: None,
            resource: None,
            decision: None,
            outcome: None,
            latency_us: None,
            delegation: None,
            alert: None,
            detail: serde_json::Value::Null,
        }
    }
}

/// An audit failure. Callers fail closed on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The write failed; the event is not recorded.
    #[error("the audit log could not record the event: {0}")]
    Write(String),
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
}

/// The hash of an event given its predecessor's hash, sequence number and body.
pub fn chain_hash(prev_hash: &str, seq: u64, body: &str) -> String {
    palisade_core::secret::hex(&chain_digest(prev_hash, seq, body))
}

/// SHA-256 of `prev_hash`, `seq` and `body`, newline-separated: the bytes of [`chain_hash`].
fn chain_digest(prev_hash: &str, seq: u64, body: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    h.finalize().into()
}

/// An event on its way to the writer, already serialised by its caller (so the single writer
/// thread only chains, hashes and inserts).
struct Job {
    body: Result<String, String>,
    event_id: String,
    time_ns: i64,
    kind: String,
    principal: Option<String>,
    facts: Option<AuditFacts>,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// The fields of `event` that the store keeps as columns beside its body; `None` when one
/// cannot be kept as text (a `resource_type` that is not a string), so queries read the body.
pub fn facts_of(event: &AuditEvent) -> Option<AuditFacts> {
    let resource_type = match event.detail.get("resource_type") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return None,
    };
    Some(AuditFacts {
        action: event.action.clone(),
        resource_type,
    })
}

/// Handle to the group-commit writer. Cloning shares the writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    head: watch::Receiver<u64>,
    gate: Arc<SinkGate>,
}

/// What a refused caller is told while the required sinks fail (the reason, which names
/// internal collectors, goes to the local log and the server log only).
pub const FAIL_CLOSED_MESSAGE: &str = "a required audit sink cannot record, so requests are refused until it recovers (fail-closed); operators: palisade audit sinks";

/// Fail-closed state of the required SIEM sinks: while every one of them is failing, the
/// enforcement points refuse requests (Vault's contract: no action that cannot be recorded).
#[derive(Debug, Default)]
pub struct SinkGate {
    /// Required sink name → its last delivery error (`None` while it delivers).
    required: Mutex<BTreeMap<String, Option<String>>>,
}

impl SinkGate {
    /// Declares a required sink (healthy until a delivery fails).
    pub fn require(&self, sink: &str) {
        self.lock().insert(sink.to_string(), None);
    }

    /// Records a required sink's delivery result; other sinks are ignored.
    pub fn report(&self, sink: &str, result: Result<(), &str>) {
        if let Some(state) = self.lock().get_mut(sink) {
            *state = result.err().map(str::to_string);
        }
    }

    /// Why requests must be refused now: every required sink is failing (names and errors).
    pub fn refusal(&self) -> Option<String> {
        let required = self.lock();
        if required.is_empty() || required.values().any(Option::is_none) {
            return None;
        }
        let failing: Vec<String> = required
            .iter()
            .map(|(name, e)| format!("{name} ({})", e.as_deref().unwrap_or("")))
            .collect();
        Some(format!(
            "no required audit sink can record: {}",
            failing.join("; ")
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<String>>> {
        self.required.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer thread; joining it waits until every queued event is written.
pub struct AuditWriter {
    thread: std::thread::JoinHandle<()>,
}

impl AuditWriter {
    /// Waits for the writer to drain and stop (after every [`AuditLog`] handle is dropped).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl AuditLog {
    /// Starts the writer thread on `store`, continuing its chain.
    pub fn start(store: Arc<dyn Store>) -> Result<(Self, AuditWriter), StoreError> {
        let head = store.audit_head()?;
        let (tx, rx) = mpsc::channel::<Job>(16 * 1024);
        let (head_tx, head_rx) = watch::channel(head.as_ref().map_or(0, |h| h.seq));
        let thread = std::thread::Builder::new()
            .name("palisade-audit".into())
            .spawn(move || writer_loop(store, rx, head, head_tx))
            .map_err(|e| StoreError::Backend(format!("cannot start the audit writer: {e}")))?;
        Ok((
            Self {
                tx,
                head: head_rx,
                gate: Arc::default(),
            },
            AuditWriter { thread },
        ))
    }

    /// The `seq` of the last committed event, updated after every commit (sinks wait on it).
    pub fn head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// The fail-closed gate of the required sinks.
    pub fn gate(&self) -> &Arc<SinkGate> {
        &self.gate
    }

    /// Why requests must be refused now, if they must (see [`SinkGate`]).
    pub fn refusal(&self) -> Option<String> {
        self.gate.refusal()
    }

    /// Records an event durably; resolves with its sequence number once committed.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job {
                body: serde_json::to_string(&event).map_err(|e| e.to_string()),
                facts: facts_of(&event),
                principal: event.principal.map(|p| p.id),
                event_id: event.event_id,
                time_ns: event.time_ns,
                kind: event.kind,
                done,
            })
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }
}

fn writer_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
    head: Option<StoredAuditEvent>,
    head_tx: watch::Sender<u64>,
) {
    let (mut seq, mut prev) = match head {
        Some(h) => (h.seq, h.hash),
        None => (0, GENESIS_HASH.to_string()),
    };
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // An event that could not be serialised is refused on its own.
        if jobs.iter().any(|j| j.body.is_err()) {
            let (bad, good): (Vec<Job>, Vec<Job>) = jobs.drain(..).partition(|j| j.body.is_err());
            for job in bad {
                let e = job.body.err().unwrap_or_default();
                let _ = job.done.send(Err(AuditError::Write(e)));
            }
            jobs = good;
        }
        if jobs.is_empty() {
            continue;
        }
        let mut rows = Vec::with_capacity(jobs.len());
        let (mut next_seq, mut next_prev) = (seq, prev.clone());
        for job in &mut jobs {
            next_seq += 1;
            let body = std::mem::replace(&mut job.body, Ok(String::new())).unwrap_or_default();
            let hash = chain_hash(&next_prev, next_seq, &body);
            rows.push(StoredAuditEvent {
                seq: next_seq,
                event_id: std::mem::take(&mut job.event_id),
                time_ns: job.time_ns,
                kind: std::mem::take(&mut job.kind),
                principal: job.principal.take(),
                body,
                prev_hash: std::mem::replace(&mut next_prev, hash.clone()),
                hash,
                facts: job.facts.take(),
            });
        }
        let result = store
            .append_audit(&rows)
            .map_err(|e| AuditError::Write(e.to_string()));
        match result {
            Ok(()) => {
                for (job, row) in jobs.drain(..).zip(rows.iter()) {
                    let _ = job.done.send(Ok(row.seq));
                }
                seq = next_seq;
                prev = next_prev;
                head_tx.send_replace(seq);
            }
            Err(e) => {
                tracing::error!(error = %e, events = jobs.len(), "audit batch failed; the requests are refused");
                for job in jobs.drain(..) {
                    let _ = job.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Events checked.
    pub events: u64,
    /// Hash of the last event.
    pub head_hash: String,
    /// Events before the stored chain, pruned into archives (the chain starts after them, at
    /// a signed checkpoint).
    pub pruned: u64,
}

/// The first break in the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("audit chain broken at event {seq} ({event_id}): {reason}")]
pub struct VerifyFailure {
    /// Sequence number of the first bad event.
    pub seq: u64,
    /// Its id (as stored).
    pub event_id: String,
    /// What is wrong.
    pub reason: String,
}

/// Why verification could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chain is broken.
    #[error(transparent)]
    Broken(#[from] VerifyFailure),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Walks the whole chain from the first event and checks every link and hash.
pub fn verify(store: &dyn Store) -> Result<VerifyReport, VerifyError> {
    // After retention pruned the oldest events, the chain starts at the last segment's sealed
    // end: its checkpoint must be signed over exactly that event, and segments must be
    // contiguous from the first event.
    let (mut expected_seq, mut prev) = (1u64, GENESIS_HASH.to_string());
    for segment in store.audit_segments()? {
        let broken = |reason: String| VerifyFailure {
            seq: segment.first_seq,
            event_id: "<pruned segment>".into(),
            reason,
        };
        if segment.first_seq != expected_seq || segment.last_seq < segment.first_seq {
            return Err(broken(format!(
                "pruned segment {}-{} does not follow event {}",
                segment.first_seq,
                segment.last_seq,
                expected_seq - 1
            ))
            .into());
        }
        let sealed: checkpoint::Checkpoint = serde_json::from_str(&segment.checkpoint)
            .map_err(|e| broken(format!("its sealing checkpoint is not readable: {e}")))?;
        sealed.verify(None).map_err(broken)?;
        if sealed.seq != segment.last_seq || sealed.head_hash != segment.last_hash {
            return Err(broken(format!(
                "its sealing checkpoint signs event {}, not the segment's end {}",
                sealed.seq, segment.last_seq
            ))
            .into());
        }
        expected_seq = segment.last_seq + 1;
        prev = segment.last_hash;
    }
    let pruned = expected_seq - 1;
    // The chain is checked in two halves at once, each scanned by its own thread straight from
    // the store (nothing copied). The second half's first link is checked against the stored
    // hash of the first half's last event, which the first half checks in turn; the first
    // half must also reach that event. So the first break found is the first in order, as in
    // a walk from the start.
    let head = store.audit_head()?.map_or(pruned, |h| h.seq);
    let mid = pruned + head.saturating_sub(pruned) / 2;
    let mid_hash = if mid == pruned {
        prev.clone()
    } else {
        // If event `mid` is missing, the first half reports it before anything the second
        // half finds.
        store
            .read_audit(mid - 1, 1)?
            .into_iter()
            .find(|r| r.seq == mid)
            .map_or_else(String::new, |r| r.hash)
    };
    let (first, second) = std::thread::scope(|scope| {
        let other = scope.spawn(|| check_range(store, mid, u64::MAX, &mid_hash));
        let first = check_range(store, pruned, mid, &prev);
        let second = other.join().unwrap_or_else(|_| {
            Err(VerifyError::Broken(VerifyFailure {
                seq: mid + 1,
                event_id: "<unchecked>".into(),
                reason: "the checking thread failed".into(),
            }))
        });
        (first, second)
    });
    let (first, second) = (first?, second?);
    Ok(VerifyReport {
        events: first.events + second.events,
        head_hash: second
            .last_hash
            .or(first.last_hash)
            .unwrap_or_else(|| prev.clone()),
        pruned,
    })
}

/// What [`check_range`] found.
struct RangeReport {
    events: u64,
    /// The hash of the range's last event, if it held any.
    last_hash: Option<String>,
}

/// Checks the stored events with `after < seq <= until`: they must run from `after + 1`
/// without gaps (up to `until` when it is bounded), each must match its stored hash, and each
/// must link to the one before it, the first to `first_prev`.
fn check_range(
    store: &dyn Store,
    after: u64,
    until: u64,
    first_prev: &str,
) -> Result<RangeReport, VerifyError> {
    let mut expected = after + 1;
    let mut prev = first_prev.to_string();
    let mut failure: Option<VerifyFailure> = None;
    store.scan_audit(after, until, &mut |row| {
        if let Err(f) = check_row(row, expected, &prev) {
            failure = Some(f);
            return false;
        }
        prev.clear();
        prev.push_str(row.hash().unwrap_or_default());
        expected += 1;
        true
    })?;
    if let Some(f) = failure {
        return Err(f.into());
    }
    if until != u64::MAX && expected <= until {
        return Err(VerifyFailure {
            seq: expected,
            event_id: "<missing>".into(),
            reason: format!("event {expected} is missing: it was deleted"),
        }
        .into());
    }
    let events = expected - after - 1;
    Ok(RangeReport {
        events,
        last_hash: (events > 0).then_some(prev),
    })
}

/// The fields of an event body that the store also keeps as indexed columns.
#[derive(Deserialize)]
struct Indexed<'a> {
    #[serde(borrow)]
    event_id: std::borrow::Cow<'a, str>,
    time_ns: i64,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    principal: Option<IndexedPrincipal<'a>>,
    #[serde(borrow)]
    action: Option<std::borrow::Cow<'a, str>>,
    detail: Option<DetailFields>,
}

/// `detail.resource_type` and `detail.session` of an event body, read from whatever `detail`
/// holds: a `detail` that is not an object has neither (and does not make the event
/// unreadable). Other fields are skipped without being built.
#[derive(Debug, Default)]
pub(crate) struct DetailFields {
    pub(crate) resource_type: Option<serde_json::Value>,
    pub(crate) session: Option<serde_json::Value>,
}

impl<'de> Deserialize<'de> for DetailFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Key {
            ResourceType,
            Session,
            #[serde(other)]
            Other,
        }
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = DetailFields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DetailFields, A::Error> {
                let mut out = DetailFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::ResourceType => out.resource_type = Some(map.next_value()?),
                        Key::Session => out.session = Some(map.next_value()?),
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DetailFields, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(DetailFields::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<DetailFields, E> {
                Ok(DetailFields::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<DetailFields, E> {
                Ok(DetailFields::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<DetailFields, E> {
                Ok(DetailFields::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<DetailFields, E> {
                Ok(DetailFields::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<DetailFields, E> {
                Ok(DetailFields::default())
            }
            fn visit_unit<E>(self) -> Result<DetailFields, E> {
                Ok(DetailFields::default())
            }
        }
        d.deserialize_any(Fields)
    }
}

#[derive(Deserialize)]
struct IndexedPrincipal<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

pub(crate) fn check_row(
    row: &dyn AuditRow,
    expected_seq: u64,
    prev: &str,
) -> Result<(), VerifyFailure> {
    let seq = row.seq();
    let fail = |seq: u64, reason: String| VerifyFailure {
        seq,
        event_id: row.event_id().unwrap_or_default().to_string(),
        reason,
    };
    if seq != expected_seq {
        return Err(VerifyFailure {
            seq: expected_seq,
            event_id: "<missing>".into(),
            reason: format!(
                "event {expected_seq} is missing (the next stored event is {seq}): it was deleted"
            ),
        });
    }
    let body = row
        .body()
        .map_err(|e| fail(seq, format!("its body cannot be read: {e}")))?;
    let (stored_prev, stored_hash) = (
        row.prev_hash().unwrap_or_default(),
        row.hash().unwrap_or_default(),
    );
    if !chain_hash_is(stored_prev, seq, body, stored_hash) {
        return Err(fail(
            seq,
            "its content does not match its hash: the event was modified".into(),
        ));
    }
    if stored_prev != prev {
        return Err(fail(
            seq,
            format!(
                "it does not link to event {}: the events were reordered, or event {} was replaced",
                seq - 1,
                seq - 1
            ),
        ));
    }
    let event: Indexed<'_> = serde_json::from_str(body)
        .map_err(|e| fail(seq, format!("its body is not an audit event: {e}")))?;
    let principal = event.principal.as_ref().map(|p| p.id.as_ref());
    // Fact columns, where kept, must be exactly the body's fields (queries trust them).
    let facts_match = row.facts().is_none_or(|(action, resource_type)| {
        let in_body = event.detail.as_ref().and_then(|d| d.resource_type.as_ref());
        let resource_type_matches = match (in_body, resource_type) {
            (None | Some(serde_json::Value::Null), None) => true,
            (Some(serde_json::Value::String(body)), Some(column)) => body == column,
            _ => false,
        };
        event.action.as_deref() == action && resource_type_matches
    });
    if Some(event.event_id.as_ref()) != row.event_id()
        || event.time_ns != row.time_ns()
        || Some(event.kind.as_ref()) != row.kind()
        || principal != row.principal()
        || !facts_match
    {
        return Err(fail(
            seq,
            "its indexed columns differ from its hashed body: the event was modified".into(),
        ));
    }
    Ok(())
}

/// Whether `hex` is the chain hash of `body` after `prev_hash` (no allocation).
fn chain_hash_is(prev_hash: &str, seq: u64, body: &str, hex: &str) -> bool {
    let digest = chain_digest(prev_hash, seq, body);
    let hex = hex.as_bytes();
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    hex.len() == digest.len() * 2
        && digest.iter().enumerate().all(|(i, b)| {
            hex[2 * i] == DIGITS[usize::from(b >> 4)]
                && hex[2 * i + 1] == DIGITS[usize::from(b & 0xf)]
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, prev: &str, kind: &str) -> StoredAuditEvent {
        let mut e = AuditEvent::new(kind);
        e.event_id = format!("e{seq}");
        let body = serde_json::to_string(&e).unwrap();
        let facts = facts_of(&e);
        StoredAuditEvent {
            seq,
            event_id: e.event_id,
            time_ns: e.time_ns,
            kind: kind.into(),
            principal: None,
            hash: chain_hash(prev, seq, &body),
            body,
            prev_hash: prev.into(),
            facts,
        }
    }

    fn chain(n: u64) -> Vec<StoredAuditEvent> {
        let mut out: Vec<StoredAuditEvent> = Vec::new();
        for seq in 1..=n {
            let prev = out
                .last()
                .map(|r| r.hash.clone())
                .unwrap_or_else(|| GENESIS_HASH.into());
            out.push(row(seq, &prev, "k"));
        }
        out
    }

    fn first_break(rows: &[StoredAuditEvent]) -> Option<(u64, String)> {
        let mut prev = GENESIS_HASH.to_string();
        for (i, r) in rows.iter().enumerate() {
            if let Err(f) = check_row(r, i as u64 + 1, &prev) {
                return Some((f.seq, f.reason));
            }
            prev = r.hash.clone();
        }
        None
    }

    /// A store holding `rows` as given (tampered or not).
    fn store_of(name: &str, rows: &[StoredAuditEvent]) -> palisade_store::SqliteStore {
        let dir =
            std::env::temp_dir().join(format!("palisade-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = palisade_store::SqliteStore::open(&dir).unwrap();
        store.append_audit(rows).unwrap();
        store
    }

    /// Re-chains `rows` from `from` on, so each stays self-consistent after an edit.
    fn rechain(rows: &mut [StoredAuditEvent], from: usize) {
        for i in from..rows.len() {
            let prev = if i == 0 {
                GENESIS_HASH.to_string()
            } else {
                rows[i - 1].hash.clone()
            };
            rows[i].prev_hash = prev.clone();
            rows[i].hash = chain_hash(&prev, rows[i].seq, &rows[i].body);
        }
    }

    #[test]
    fn verifying_a_store_checks_both_halves_and_the_link_between_them() {
        // Ten events: the halves are 1–5 and 6–10.
        let intact = chain(10);
        let report = verify(&store_of("intact", &intact)).unwrap();
        assert_eq!(report.events, 10);
        assert_eq!(report.head_hash, intact[9].hash);

        let broken = |name: &str, rows: &[StoredAuditEvent]| -> VerifyFailure {
            match verify(&store_of(name, rows)) {
                Err(VerifyError::Broken(f)) => f,
                other => panic!("{name}: expected a break, got {other:?}"),
            }
        };
        let expect = |name: &str, rows: &[StoredAuditEvent], seq: u64, says: &str| {
            let f = broken(name, rows);
            assert_eq!(f.seq, seq, "{name}: {}", f.reason);
            assert!(f.reason.contains(says), "{name}: {}", f.reason);
        };
        // A modified body in the second half.
        let mut modified = chain(10);
        modified[7].body = modified[7].body.replace("\"k\"", "\"x\"");
        expect("modified", &modified, 8, "does not match its hash");

        // The first event of the second half deleted.
        let mut gap = chain(10);
        gap.remove(5);
        expect("gap", &gap, 6, "missing");

        // The second half's first event replaced (its own hash consistent): reported there,
        // whether the events after it were re-chained onto it or not.
        let mut replaced = chain(10);
        replaced[5].prev_hash = "0".repeat(64);
        replaced[5].hash = chain_hash(&replaced[5].prev_hash, 6, &replaced[5].body);
        expect("replaced", &replaced, 6, "does not link to event 5");
        rechain(&mut replaced, 6);
        expect("relinked", &replaced, 6, "does not link to event 5");

        // The last event of the first half deleted.
        let mut tail_of_first = chain(10);
        tail_of_first.remove(4);
        expect("tail", &tail_of_first, 5, "missing");

        // Events 4 and 5 deleted and the rest re-chained onto event 3, so every stored link
        // holds: the gap in the numbering still shows.
        let mut spliced = chain(10);
        spliced.drain(3..5);
        rechain(&mut spliced, 3);
        expect("spliced", &spliced, 4, "missing");

        // A fact column that disagrees with its (intact) body.
        let mut fact = chain(10);
        fact[2].facts = Some(AuditFacts {
            action: Some("destructive".into()),
            resource_type: None,
        });
        expect("fact", &fact, 3, "indexed columns");

        // Breaks in both halves: the first one is reported.
        let mut both = chain(10);
        both[1].kind = "other".into();
        both[8].body.push(' ');
        rechain(&mut both, 9);
        expect("both", &both, 2, "indexed columns");
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(first_break(&chain(5)), None);
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_bad_event() {
        let mut modified = chain(5);
        modified[2].body = modified[2].body.replace("\"k\"", "\"x\"");
        assert_eq!(first_break(&modified).map(|b| b.0), Some(3));

        let mut column = chain(5);
        column[1].kind = "other".into();
        assert!(first_break(&column).unwrap().1.contains("indexed columns"));

        // The fact columns that queries filter on are checked too: an action or resource
        // type changed beside an intact body, in either direction.
        for (action, resource_type) in [
            (Some("read"), None),
            (None, Some("keyvault")),
            (Some(""), None),
        ] {
            let mut facts = chain(5);
            facts[3].facts = Some(AuditFacts {
                action: action.map(str::to_string),
                resource_type: resource_type.map(str::to_string),
            });
            assert_eq!(first_break(&facts).map(|b| b.0), Some(4));
        }
        // Columns that the body agrees with pass; a row without them is read by its body.
        let mut agreeing = chain(5);
        for (i, row) in agreeing.iter_mut().enumerate() {
            let mut e: AuditEvent = serde_json::from_str(&row.body).unwrap();
            e.action = Some("read".into());
            e.detail = serde_json::json!({ "resource_type": "database" });
            row.body = serde_json::to_string(&e).unwrap();
            row.facts = (i % 2 == 0).then(|| facts_of(&e)).flatten();
        }
        let mut prev = GENESIS_HASH.to_string();
        for row in &mut agreeing {
            row.prev_hash = prev.clone();
            row.hash = chain_hash(&prev, row.seq, &row.body);
            prev = row.hash.clone();
        }
        assert_eq!(first_break(&agreeing), None);
        assert_eq!(
            agreeing[0]
                .facts
                .as_ref()
                .and_then(|f| f.resource_type.as_deref()),
            Some("database")
        );
        agreeing[2].facts = Some(AuditFacts {
            action: Some("write".into()),
            resource_type: Some("database".into()),
        });
        assert_eq!(first_break(&agreeing).map(|b| b.0), Some(3));

        let mut deleted = chain(5);
        deleted.remove(3);
        let b = first_break(&deleted).unwrap();
        assert_eq!(b.0, 4);
        assert!(b.1.contains("deleted"), "{}", b.1);

        let mut reordered = chain(5);
        reordered.swap(1, 2);
        let (s1, s2) = (reordered[1].seq, reordered[2].seq);
        reordered[1].seq = s2;
        reordered[2].seq = s1;
        assert_eq!(first_break(&reordered).map(|b| b.0), Some(2));
    }
}
