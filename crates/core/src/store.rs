//! The storage port. Domain services call these methods and never see SQL; `palisade-store`
//! implements it for SQLite, and a PostgreSQL backend implements the same trait later.
//!
//! The trait is synchronous on purpose: the SQLite backend is blocking, the audit writer runs on
//! its own thread, and async callers hop onto the blocking pool. A networked backend can wrap a
//! blocking client the same way.

use crate::{Principal, PrincipalId, PrincipalKind, Timestamp};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with the same key exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// The row to change does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The backend failed (I/O, corruption, lock).
    #[error("storage failure: {0}")]
    Backend(String),
}

/// A stored hash of a client secret (the secret itself is never stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSecretRecord {
    /// Short public id of this secret, shown in listings.
    pub secret_id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// When it was created.
    pub created_at: Timestamp,
    /// When it stops working (set when a rotation starts its overlap window).
    pub expires_at: Option<Timestamp>,
}

/// A token signing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// Key id, the JWT `kid`.
    pub kid: String,
    /// JOSE algorithm name, e.g. `EdDSA`.
    pub alg: String,
    /// Private key bytes.
    pub private_key: Vec<u8>,
    /// Public key bytes.
    pub public_key: Vec<u8>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it stopped signing (rotated out); it verifies until every token it signed expired.
    pub retired_at: Option<Timestamp>,
}

/// A revoked token, kept until the token would have expired anyway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The token's `jti`.
    pub jti: String,
    /// The token's `exp`.
    pub expires_at: Timestamp,
}

/// An audit event as stored, with its place in the hash chain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredAuditEvent {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// Unique event id.
    pub event_id: String,
    /// Event time, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// Event kind, e.g. `gateway.decision`.
    pub kind: String,
    /// The acting principal, if any.
    pub principal: Option<String>,
    /// The canonical JSON body that the hash covers.
    pub body: String,
    /// Hex SHA-256 of the previous event (64 zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256 of this event.
    pub hash: String,
    /// Copies of body fields kept as columns for queries; `None` for events stored before the
    /// columns existed. Not part of the export: the body is the record.
    #[serde(skip)]
    pub facts: Option<AuditFacts>,
}

/// Fields of an audit event's body that the store also keeps as columns, so queries can filter
/// on them without reading the body. `audit verify` checks them against the hashed body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFacts {
    /// The event's `action`.
    pub action: Option<String>,
    /// The event's `detail.resource_type`, when it is a string.
    pub resource_type: Option<String>,
}

/// One stored audit event as a scan sees it: the columns, and the body only when asked for.
pub trait AuditRow {
    /// Position in the chain.
    fn seq(&self) -> u64;
    /// Event time, nanoseconds since the Unix epoch.
    fn time_ns(&self) -> i64;
    /// Event id.
    fn event_id(&self) -> Option<&str>;
    /// Event kind.
    fn kind(&self) -> Option<&str>;
    /// The acting principal's id.
    fn principal(&self) -> Option<&str>;
    /// `(action, resource_type)` as kept in columns, or `None` when this event predates them
    /// (read the body instead).
    fn facts(&self) -> Option<(Option<&str>, Option<&str>)>;
    /// The canonical JSON body.
    fn body(&self) -> Result<&str, StoreError>;
    /// Hex SHA-256 of the previous event, as stored.
    fn prev_hash(&self) -> Option<&str>;
    /// Hex SHA-256 of this event, as stored.
    fn hash(&self) -> Option<&str>;
}

/// A [`StoredAuditEvent`] read in full, seen as a scan row.
impl AuditRow for StoredAuditEvent {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn time_ns(&self) -> i64 {
        self.time_ns
    }
    fn event_id(&self) -> Option<&str> {
        Some(&self.event_id)
    }
    fn kind(&self) -> Option<&str> {
        Some(&self.kind)
    }
    fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }
    fn facts(&self) -> Option<(Option<&str>, Option<&str>)> {
        self.facts
            .as_ref()
            .map(|f| (f.action.as_deref(), f.resource_type.as_deref()))
    }
    fn body(&self) -> Result<&str, StoreError> {
        Ok(&self.body)
    }
    fn prev_hash(&self) -> Option<&str> {
        Some(&self.prev_hash)
    }
    fn hash(&self) -> Option<&str> {
        Some(&self.hash)
    }
}

/// A vault secret as stored: its data key wrapped by the master key, its value sealed by the
/// data key (both `nonce ‖ ciphertext`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRecord {
    /// Name.
    pub name: String,
    /// Version, from 1.
    pub version: u64,
    /// What it is for.
    pub description: String,
    /// The data key, sealed by the master key.
    pub wrapped_key: Vec<u8>,
    /// The value, sealed by the data key.
    pub ciphertext: Vec<u8>,
    /// Id of the master key that wrapped the data key.
    pub master_key_id: String,
    /// Created, nanoseconds since the epoch.
    pub created_ns: i64,
    /// Last written, nanoseconds since the epoch.
    pub updated_ns: i64,
}

/// A pruned stretch of the audit chain: archived to a file, sealed by a signed checkpoint of its
/// last event, then deleted from the store. The last segment is where the stored chain starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSegment {
    /// First sequence number in the segment.
    pub first_seq: u64,
    /// Last sequence number in the segment.
    pub last_seq: u64,
    /// Hash of the last event (the next event's `prev_hash`).
    pub last_hash: String,
    /// The archive file it was written to.
    pub archive: String,
    /// The signed checkpoint of `(last_seq, last_hash)`, JSON.
    pub checkpoint: String,
    /// When it was pruned, nanoseconds since the epoch.
    pub pruned_ns: i64,
}

/// Persistent state of one Palisade deployment.
pub trait Store: Send + Sync + 'static {
    /// Inserts a new principal; `Conflict` if the id exists.
    fn insert_principal(&self, principal: &Principal) -> Result<(), StoreError>;
    /// Replaces an existing principal; `NotFound` if it does not exist.
    fn update_principal(&self, principal: &Principal) -> Result<(), StoreError>;
    /// One principal.
    fn get_principal(&self, id: &PrincipalId) -> Result<Option<Principal>, StoreError>;
    /// All principals, optionally of one kind, ordered by id.
    fn list_principals(&self, kind: Option<PrincipalKind>) -> Result<Vec<Principal>, StoreError>;

    /// Adds a client secret hash for a principal.
    fn add_client_secret(
        &self,
        principal: &PrincipalId,
        secret: &ClientSecretRecord,
    ) -> Result<(), StoreError>;
    /// The principal's client secrets, newest first, expired ones included.
    fn client_secrets(
        &self,
        principal: &PrincipalId,
    ) -> Result<Vec<ClientSecretRecord>, StoreError>;
    /// Sets an expiry on every current secret that has none or a later one (rotation overlap).
    fn expire_client_secrets(
        &self,
        principal: &PrincipalId,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Deletes every client secret of a principal (deprovisioning).
    fn delete_client_secrets(&self, principal: &PrincipalId) -> Result<(), StoreError>;

    /// Adds a signing key.
    fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<(), StoreError>;
    /// Marks a key as no longer signing.
    fn retire_signing_key(&self, kid: &str, at: Timestamp) -> Result<(), StoreError>;
    /// Every signing key, oldest first.
    fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError>;

    /// Records a revoked token.
    fn insert_revocation(&self, revocation: &RevocationRecord) -> Result<(), StoreError>;
    /// Revocations whose tokens have not expired by `now`.
    fn live_revocations(&self, now: Timestamp) -> Result<Vec<RevocationRecord>, StoreError>;

    /// Stores a new session.
    fn insert_session(&self, session: &crate::session::SessionRecord) -> Result<(), StoreError>;
    /// Records the end (and final counters) of sessions that have not ended yet.
    fn end_sessions(&self, sessions: &[crate::session::SessionRecord]) -> Result<(), StoreError>;
    /// Saves the counters of sessions.
    fn save_session_counters(
        &self,
        sessions: &[crate::session::SessionRecord],
    ) -> Result<(), StoreError>;
    /// Sessions whose hard end is at or after `since`, ended or not, plus ended sessions whose
    /// end is not audited yet.
    fn sessions_since(
        &self,
        since: Timestamp,
    ) -> Result<Vec<crate::session::SessionRecord>, StoreError>;
    /// Records that the ends of these sessions are in the audit log.
    fn mark_sessions_audited(&self, sids: &[String]) -> Result<(), StoreError>;
    /// Deletes sessions whose hard end is before `before`.
    fn prune_sessions(&self, before: Timestamp) -> Result<(), StoreError>;
    /// One session.
    fn get_session(&self, sid: &str) -> Result<Option<crate::session::SessionRecord>, StoreError>;

    /// Pinned MCP tool definitions: `(server/tool, sha256 hex)`.
    fn mcp_pins(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Pins (or re-pins) an MCP tool definition.
    fn put_mcp_pin(&self, tool: &str, hash: &str, at: Timestamp) -> Result<(), StoreError>;

    /// Labels content written through Palisade by a tainted session (cross-agent taint):
    /// `resource` is `<route>:<path>` or `<server>:<uri>`.
    fn put_content_label(
        &self,
        resource: &str,
        label: &str,
        session: &str,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Every content label: `(resource, label)`.
    fn content_labels(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Stores an alert (JSON) under its key unless one with that key exists; returns whether it
    /// was new.
    fn put_alert(&self, key: &str, time_ns: i64, alert: &str) -> Result<bool, StoreError>;
    /// The latest `limit` alerts (JSON), newest first.
    fn alerts(&self, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Inserts or replaces an approval record (JSON) with its status.
    fn put_approval(
        &self,
        id: &str,
        status: &str,
        requested_ns: i64,
        record: &str,
    ) -> Result<(), StoreError>;
    /// Approval records (JSON), newest first, optionally only those with `status`.
    fn approvals(&self, status: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError>;
    /// One approval record (JSON).
    fn get_approval(&self, id: &str) -> Result<Option<String>, StoreError>;

    /// The last audit `seq` that SIEM sink `sink` delivered (0: none yet).
    fn sink_cursor(&self, sink: &str) -> Result<u64, StoreError>;
    /// Records that `sink` delivered every event up to `seq`.
    fn put_sink_cursor(&self, sink: &str, seq: u64, at: Timestamp) -> Result<(), StoreError>;

    /// Stores a signed audit checkpoint (JSON) of the chain at `seq`.
    fn put_audit_checkpoint(&self, seq: u64, checkpoint: &str) -> Result<(), StoreError>;
    /// The latest `limit` audit checkpoints (JSON), newest first.
    fn audit_checkpoints(&self, limit: usize) -> Result<Vec<String>, StoreError>;

    /// The last event of the audit chain.
    fn audit_head(&self) -> Result<Option<StoredAuditEvent>, StoreError>;
    /// Appends events durably in one transaction (group commit); all or none.
    fn append_audit(&self, events: &[StoredAuditEvent]) -> Result<(), StoreError>;
    /// Creates or replaces a vault secret.
    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError>;
    /// A vault secret.
    fn get_secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError>;
    /// Every vault secret.
    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    /// Deletes a vault secret; returns whether it existed.
    fn delete_secret(&self, name: &str) -> Result<bool, StoreError>;
    /// Replaces the wrapped data keys (and master key ids) of these secrets in one transaction.
    fn rewrap_secrets(&self, secrets: &[SecretRecord]) -> Result<(), StoreError>;

    /// The first sequence number whose event time is at or after `time_ns`, found by binary
    /// search on the (nearly) time-ordered log; one past the head if none. Callers allow for
    /// events committed out of time order by asking for an earlier time.
    fn audit_seq_from_time(&self, time_ns: i64) -> Result<u64, StoreError>;
    /// The last sequence number of an event older than `time_ns`.
    fn audit_seq_before(&self, time_ns: i64) -> Result<Option<u64>, StoreError>;
    /// Pruned segments of the chain, oldest first.
    fn audit_segments(&self) -> Result<Vec<AuditSegment>, StoreError>;
    /// Records `segment` and deletes its events, in one transaction.
    fn prune_audit(&self, segment: &AuditSegment) -> Result<(), StoreError>;
    /// `(seq, body)` of the events with `seq > after`, ascending, at most `limit` (queries read
    /// only the bodies).
    fn read_audit_bodies(&self, after: u64, limit: usize)
    -> Result<Vec<(u64, String)>, StoreError>;
    /// Events with `seq > after`, ascending, at most `limit`.
    fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<StoredAuditEvent>, StoreError>;
    /// Visits the events with `after < seq <= until` in order until `visit` returns `false`.
    /// A row reads its body only when asked, so a scan that needs only the columns never
    /// copies bodies. Two scans may run at once (on different threads). The default reads
    /// whole events page by page; a backend that can read columns alone overrides it.
    fn scan_audit(
        &self,
        after: u64,
        until: u64,
        visit: &mut dyn FnMut(&dyn AuditRow) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = after;
        loop {
            let page = self.read_audit(after, 4096)?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.seq;
            for row in page.iter().take_while(|r| r.seq <= until) {
                if !visit(row) {
                    return Ok(());
                }
            }
            if after >= until {
                return Ok(());
            }
        }
    }
}
