//! Signed checkpoints and exports: tamper evidence that survives the server.
//!
//! A checkpoint is an Ed25519 signature over the chain's head at one point: the sequence
//! number, the head hash and the time (`palisade-audit-checkpoint-v1\n<seq>\n<hash>\n<time_ns>`).
//! It carries its public key (and the key's id, the first 16 hex digits of its SHA-256), so an
//! auditor who pinned the key once can check every later export offline.
//!
//! An export is JSON lines: a header, the events (each with its chain fields) and the
//! checkpoints. [`verify_export`] checks every link and hash, every checkpoint's signature and
//! that the chain holds the head each checkpoint signed. Deleting events at the tail is caught
//! when a checkpoint (in the file, or the auditor's own copy given as `from`/`expect`) names a
//! later event than the file holds.

use crate::{GENESIS_HASH, VerifyFailure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use palisade_core::store::{Store, StoreError, StoredAuditEvent};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A signed statement of the chain's head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Events in the chain when it was signed (the head's sequence number).
    pub seq: u64,
    /// The head's hash.
    pub head_hash: String,
    /// When it was signed, nanoseconds since the epoch.
    pub time_ns: i64,
    /// First 16 hex digits of SHA-256 of the public key.
    pub key_id: String,
    /// The Ed25519 public key, base64url.
    pub public_key: String,
    /// The signature, base64url.
    pub signature: String,
}

fn message(seq: u64, head_hash: &str, time_ns: i64) -> Vec<u8> {
    format!("palisade-audit-checkpoint-v1\n{seq}\n{head_hash}\n{time_ns}").into_bytes()
}

/// The id of a public key.
pub fn key_id(public: &VerifyingKey) -> String {
    palisade_core::secret::hex(&Sha256::digest(public.as_bytes()))
        .chars()
        .take(16)
        .collect()
}

/// Signs the head `(seq, head_hash)` at `time_ns`.
pub fn sign(key: &SigningKey, seq: u64, head_hash: &str, time_ns: i64) -> Checkpoint {
    let public = key.verifying_key();
    let signature = key.sign(&message(seq, head_hash, time_ns));
    Checkpoint {
        seq,
        head_hash: head_hash.to_string(),
        time_ns,
        key_id: key_id(&public),
        public_key: URL_SAFE_NO_PAD.encode(public.as_bytes()),
        signature: URL_SAFE_NO_PAD.encode(signature.to_bytes()),
    }
}

impl Checkpoint {
    /// Checks the signature with the embedded key, which must be `pinned` when given.
    pub fn verify(&self, pinned: Option<&str>) -> Result<(), String> {
        if let Some(p) = pinned
            && p != self.public_key
            && p != self.key_id
        {
            return Err(format!(
                "checkpoint at event {} is signed by key {}, not the pinned key",
                self.seq, self.key_id
            ));
        }
        let bytes: [u8; 32] = URL_SAFE_NO_PAD
            .decode(&self.public_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "checkpoint at event {}: the public key is not 32 bytes of base64url",
                    self.seq
                )
            })?;
        let public = VerifyingKey::from_bytes(&bytes).map_err(|_| {
            format!(
                "checkpoint at event {}: not an Ed25519 public key",
                self.seq
            )
        })?;
        if key_id(&public) != self.key_id {
            return Err(format!(
                "checkpoint at event {}: key id {} does not belong to its public key",
                self.seq, self.key_id
            ));
        }
        let sig: [u8; 64] = URL_SAFE_NO_PAD
            .decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "checkpoint at event {}: the signature is not 64 bytes of base64url",
                    self.seq
                )
            })?;
        public
            .verify(
                &message(self.seq, &self.head_hash, self.time_ns),
                &Signature::from_bytes(&sig),
            )
            .map_err(|_| {
                format!(
                    "checkpoint at event {}: the signature does not match (the checkpoint was altered or forged)",
                    self.seq
                )
            })
    }
}

/// Stores a checkpoint of the current head if it moved since the last one; returns it.
pub fn checkpoint_now(
    store: &dyn Store,
    key: &SigningKey,
    time_ns: i64,
) -> Result<Option<Checkpoint>, StoreError> {
    let Some(head) = store.audit_head()? else {
        return Ok(None);
    };
    let last = store.audit_checkpoints(1)?.into_iter().next();
    if let Some(last) = &last
        && let Ok(c) = serde_json::from_str::<Checkpoint>(last)
        && c.seq >= head.seq
    {
        return Ok(None);
    }
    let checkpoint = sign(key, head.seq, &head.hash, time_ns);
    let json = serde_json::to_string(&checkpoint)
        .map_err(|e| StoreError::Backend(format!("cannot encode a checkpoint: {e}")))?;
    store.put_audit_checkpoint(checkpoint.seq, &json)?;
    Ok(Some(checkpoint))
}

/// Verifies the database without exporting it: every link and hash (from the last pruned
/// segment's seal), every stored checkpoint's signature (against `pinned` when given), that the
/// chain holds the hash each checkpoint (and the auditor's `from`) signed, and that it reaches
/// the latest of them (so deleting the newest events is caught).
pub fn verify_store(
    store: &dyn Store,
    from: Option<&Checkpoint>,
    pinned: Option<&str>,
) -> Result<ExportReport, ExportVerifyError> {
    let report = crate::verify(store).map_err(|e| match e {
        crate::VerifyError::Broken(b) => ExportVerifyError::Broken(b),
        crate::VerifyError::Store(s) => ExportVerifyError::Checkpoint(s.to_string()),
    })?;
    let last_seq = report.pruned + report.events;
    let stored: Vec<Checkpoint> = store
        .audit_checkpoints(usize::MAX)
        .map_err(|e| ExportVerifyError::Checkpoint(e.to_string()))?
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let mut latest: Option<u64> = None;
    let mut checked = 0;
    for c in from.into_iter().chain(&stored) {
        c.verify(pinned).map_err(ExportVerifyError::Checkpoint)?;
        checked += 1;
        latest = latest.max(Some(c.seq));
        if c.seq > last_seq {
            return Err(ExportVerifyError::Checkpoint(format!(
                "the chain ends at event {last_seq}, but a checkpoint signed it at event {} ({} ns): events {}..{} were deleted",
                c.seq,
                c.time_ns,
                last_seq + 1,
                c.seq
            )));
        }
        if c.seq > report.pruned {
            let at = store
                .read_audit(c.seq - 1, 1)
                .map_err(|e| ExportVerifyError::Checkpoint(e.to_string()))?;
            if at
                .first()
                .is_none_or(|e| e.seq != c.seq || e.hash != c.head_hash)
            {
                return Err(ExportVerifyError::Checkpoint(format!(
                    "event {} does not have the hash checkpoint {} signed: the chain was rewritten",
                    c.seq, c.key_id
                )));
            }
        }
    }
    Ok(ExportReport {
        events: report.events,
        last_seq,
        head_hash: report.head_hash,
        checkpoints: checked,
        last_checkpoint: latest,
    })
}

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportLine {
    /// The first line.
    Header {
        /// `palisade-audit-export`.
        format: String,
        /// 1.
        version: u32,
        /// The first event's sequence number minus one.
        after: u64,
    },
    /// An event with its chain fields.
    Event(StoredAuditEvent),
    /// A signed checkpoint.
    Checkpoint(Checkpoint),
}

/// Writes the events after `after` and every checkpoint as JSON lines.
pub fn export(
    store: &dyn Store,
    after: u64,
    out: &mut dyn std::io::Write,
) -> Result<u64, ExportError> {
    // Events retention pruned are in their archives; the export starts where the store does.
    let base = store.audit_segments()?.last().map_or(0, |s| s.last_seq);
    let after = after.max(base);
    let header = ExportLine::Header {
        format: "palisade-audit-export".into(),
        version: 1,
        after,
    };
    writeln!(out, "{}", serde_json::to_string(&header)?)?;
    let mut next = after;
    let mut count = 0;
    loop {
        let page = store.read_audit(next, 1000)?;
        let Some(last) = page.last() else { break };
        next = last.seq;
        for event in page {
            writeln!(out, "{}", serde_json::to_string(&ExportLine::Event(event))?)?;
            count += 1;
        }
    }
    for json in store.audit_checkpoints(usize::MAX)?.into_iter().rev() {
        let c: Checkpoint = serde_json::from_str(&json)?;
        writeln!(
            out,
            "{}",
            serde_json::to_string(&ExportLine::Checkpoint(c))?
        )?;
    }
    Ok(count)
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing failed.
    #[error("cannot write the export: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding failed.
    #[error("cannot encode: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a verified export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// Events checked.
    pub events: u64,
    /// Sequence number of the last event.
    pub last_seq: u64,
    /// Hash of the last event.
    pub head_hash: String,
    /// Checkpoints whose signature and head were checked.
    pub checkpoints: usize,
    /// The latest checkpoint, if any.
    pub last_checkpoint: Option<u64>,
}

/// Why an export does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ExportVerifyError {
    /// A line is not part of an export.
    #[error("line {line}: {message}")]
    Format {
        /// 1-based.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The chain is broken.
    #[error(transparent)]
    Broken(#[from] VerifyFailure),
    /// A checkpoint does not hold.
    #[error("{0}")]
    Checkpoint(String),
}

/// Verifies an export. `from` is a checkpoint the auditor trusts (the export may start after
/// it); `pinned` is the public key (base64url) or key id every checkpoint must be signed by.
pub fn verify_export(
    text: &str,
    from: Option<&Checkpoint>,
    pinned: Option<&str>,
) -> Result<ExportReport, ExportVerifyError> {
    let mut events = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut header_after: Option<u64> = None;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: ExportLine =
            serde_json::from_str(line).map_err(|e| ExportVerifyError::Format {
                line: i + 1,
                message: format!("not an export line: {e}"),
            })?;
        match parsed {
            ExportLine::Header {
                format,
                version,
                after,
            } => {
                if format != "palisade-audit-export" || version != 1 {
                    return Err(ExportVerifyError::Format {
                        line: i + 1,
                        message: format!("unknown export format `{format}` version {version}"),
                    });
                }
                header_after = Some(after);
            }
            ExportLine::Event(e) => events.push(e),
            ExportLine::Checkpoint(c) => checkpoints.push(c),
        }
    }
    let Some(after) = header_after else {
        return Err(ExportVerifyError::Format {
            line: 1,
            message: "no export header; write the file with `palisade audit export`".into(),
        });
    };
    // Without a trusted starting point, an export that starts after event N (a later archive,
    // or an export after retention) starts from its own checkpoint of event N: its signature is
    // checked (against the pinned key, when given) like every other.
    let own_start = checkpoints.iter().find(|c| c.seq == after).cloned();
    let from = match from {
        Some(f) => Some(f),
        None if after > 0 => own_start.as_ref(),
        None => None,
    };
    if let Some(f) = from {
        f.verify(pinned).map_err(ExportVerifyError::Checkpoint)?;
    }
    // Where the chain starts: the genesis, or the trusted checkpoint the export starts from.
    let (mut expected, mut prev) = match (after, from) {
        (0, _) => (1, GENESIS_HASH.to_string()),
        (a, Some(f)) if a == f.seq => (f.seq + 1, f.head_hash.clone()),
        (a, _) => {
            return Err(VerifyFailure {
                seq: a + 1,
                event_id: "<start>".into(),
                reason: format!(
                    "the export starts after event {a}; give the checkpoint of event {a} it starts from (--from)"
                ),
            }
            .into());
        }
    };
    let mut hashes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    if let Some(f) = from
        && f.seq == after
    {
        hashes.insert(f.seq, f.head_hash.clone());
    }
    let mut count = 0;
    let start = expected;
    for event in events.iter().filter(|e| e.seq >= start) {
        crate::check_row(event, expected, &prev)?;
        hashes.insert(event.seq, event.hash.clone());
        prev = event.hash.clone();
        expected += 1;
        count += 1;
    }
    let last_seq = expected - 1;
    let mut checked = 0;
    let mut latest: Option<&Checkpoint> = None;
    // The trusted checkpoint is checked like the ones in the file.
    for c in from.into_iter().chain(&checkpoints) {
        c.verify(pinned).map_err(ExportVerifyError::Checkpoint)?;
        checked += 1;
        if latest.is_none_or(|l| c.seq > l.seq) {
            latest = Some(c);
        }
        match hashes.get(&c.seq) {
            Some(h) if *h != c.head_hash => {
                return Err(ExportVerifyError::Checkpoint(format!(
                    "event {} does not have the hash checkpoint {} signed: the chain was rewritten",
                    c.seq, c.key_id
                )));
            }
            _ => {}
        }
    }
    if let Some(l) = latest
        && l.seq > last_seq
    {
        return Err(ExportVerifyError::Checkpoint(format!(
            "the export ends at event {last_seq}, but a checkpoint signed the chain at event {} ({} ns): events {}..{} were deleted",
            l.seq,
            l.time_ns,
            last_seq + 1,
            l.seq
        )));
    }
    Ok(ExportReport {
        events: count,
        last_seq,
        head_hash: prev,
        checkpoints: checked,
        last_checkpoint: latest.map(|l| l.seq),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_checkpoint_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let c = sign(&key, 42, "ab", 1_000);
        c.verify(None).unwrap();
        c.verify(Some(&c.key_id)).unwrap();
        c.verify(Some(&c.public_key)).unwrap();
        assert!(c.verify(Some("0000000000000000")).is_err());
        let mut altered = c.clone();
        altered.seq = 43;
        assert!(
            altered
                .verify(None)
                .unwrap_err()
                .contains("altered or forged")
        );
        let mut foreign = c.clone();
        foreign.public_key = sign(&SigningKey::from_bytes(&[8; 32]), 42, "ab", 1_000).public_key;
        assert!(foreign.verify(None).is_err());
    }
}
