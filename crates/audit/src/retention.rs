//! Retention with chain-preserving compaction: the oldest stretch of the chain is checked,
//! written to an archive file (an export that verifies on its own), sealed by a signed
//! checkpoint of its last event, and only then deleted from the store.
//!
//! INVARIANT (archive-before-prune): events leave the store only after their archive file is
//! synced and renamed into place; the store then records the segment and deletes its events in
//! one transaction, so a crash leaves either the events or the segment, never neither.
//! The head event is never pruned, so the writer's chain always continues from a stored event.

use crate::checkpoint::{Checkpoint, ExportLine, sign};
use crate::{GENESIS_HASH, VerifyFailure, check_row};
use ed25519_dalek::SigningKey;
use palisade_core::store::{AuditSegment, Store, StoreError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why pruning stopped (nothing was deleted).
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The chain to be archived does not verify: it is not pruned.
    #[error("the events to archive do not verify, so nothing is pruned: {0}")]
    Broken(#[from] VerifyFailure),
    /// The archive could not be written.
    #[error("cannot write the archive {path}: {message}")]
    Archive {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// Archives, seals and prunes the events after the last pruned segment up to `up_to` (kept
/// below the head). Returns the new segment, or `None` when there is nothing to prune.
pub fn prune(
    store: &dyn Store,
    key: &SigningKey,
    archive_dir: &Path,
    up_to: u64,
    now_ns: i64,
) -> Result<Option<AuditSegment>, RetentionError> {
    let segments = store.audit_segments()?;
    let (base, base_hash, base_checkpoint) = match segments.last() {
        Some(s) => (
            s.last_seq,
            s.last_hash.clone(),
            serde_json::from_str::<Checkpoint>(&s.checkpoint).ok(),
        ),
        None => (0, GENESIS_HASH.to_string(), None),
    };
    let Some(head) = store.audit_head()? else {
        return Ok(None);
    };
    let up_to = up_to.min(head.seq.saturating_sub(1));
    if up_to <= base {
        return Ok(None);
    }
    let name = format!("audit-{:012}-{:012}.jsonl", base + 1, up_to);
    let path = archive_dir.join(&name);
    let archive_error = |message: String| RetentionError::Archive {
        path: path.clone(),
        message,
    };
    std::fs::create_dir_all(archive_dir).map_err(|e| archive_error(e.to_string()))?;
    let partial = archive_dir.join(format!("{name}.partial"));
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&partial).map_err(|e| archive_error(e.to_string()))?,
    );
    let line = |file: &mut std::io::BufWriter<std::fs::File>, l: &ExportLine| {
        serde_json::to_string(l)
            .map_err(|e| e.to_string())
            .and_then(|t| writeln!(file, "{t}").map_err(|e| e.to_string()))
    };
    line(
        &mut file,
        &ExportLine::Header {
            format: "palisade-audit-export".into(),
            version: 1,
            after: base,
        },
    )
    .map_err(&archive_error)?;
    // The previous seal first, so the archive verifies on its own from where it starts.
    if let Some(c) = base_checkpoint {
        line(&mut file, &ExportLine::Checkpoint(c)).map_err(&archive_error)?;
    }
    let (mut expected, mut prev) = (base + 1, base_hash);
    while expected <= up_to {
        let page = store.read_audit(expected - 1, 1000)?;
        if page.is_empty() {
            break;
        }
        for row in page {
            if row.seq > up_to {
                break;
            }
            check_row(&row, expected, &prev)?;
            prev = row.hash.clone();
            expected += 1;
            line(&mut file, &ExportLine::Event(row)).map_err(&archive_error)?;
        }
    }
    if expected != up_to + 1 {
        return Err(VerifyFailure {
            seq: expected,
            event_id: "<missing>".into(),
            reason: format!("event {expected} is missing from the store"),
        }
        .into());
    }
    let seal = sign(key, up_to, &prev, now_ns);
    line(&mut file, &ExportLine::Checkpoint(seal.clone())).map_err(&archive_error)?;
    let file = file
        .into_inner()
        .map_err(|e| archive_error(e.error().to_string()))?;
    file.sync_all().map_err(|e| archive_error(e.to_string()))?;
    drop(file);
    std::fs::rename(&partial, &path).map_err(|e| archive_error(e.to_string()))?;
    if let Ok(dir) = std::fs::File::open(archive_dir) {
        let _ = dir.sync_all();
    }
    let seal_json = serde_json::to_string(&seal).map_err(|e| archive_error(e.to_string()))?;
    store.put_audit_checkpoint(up_to, &seal_json)?;
    let segment = AuditSegment {
        first_seq: base + 1,
        last_seq: up_to,
        last_hash: prev,
        archive: path.display().to_string(),
        checkpoint: seal_json,
        pruned_ns: now_ns,
    };
    store.prune_audit(&segment)?;
    Ok(Some(segment))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chain_hash;
    use palisade_core::store::StoredAuditEvent;

    fn store_with(n: u64) -> (palisade_store::SqliteStore, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("palisade-retention-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = palisade_store::SqliteStore::open(&dir).unwrap();
        let mut prev = GENESIS_HASH.to_string();
        let rows: Vec<StoredAuditEvent> = (1..=n)
            .map(|seq| {
                let event = crate::AuditEvent::new("k");
                let body = serde_json::to_string(&event).unwrap();
                let hash = chain_hash(&prev, seq, &body);
                StoredAuditEvent {
                    seq,
                    event_id: event.event_id.clone(),
                    time_ns: event.time_ns,
                    kind: "k".into(),
                    principal: None,
                    body,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                    facts: crate::facts_of(&event),
                }
            })
            .collect();
        store.append_audit(&rows).unwrap();
        (store, dir)
    }

    #[test]
    fn pruned_chains_verify_from_their_seal_and_a_forged_seal_fails() {
        let (store, dir) = store_with(10);
        let key = SigningKey::from_bytes(&[9; 32]);
        let segment = prune(&store, &key, &dir.join("archive"), 6, 100)
            .unwrap()
            .unwrap();
        assert_eq!((segment.first_seq, segment.last_seq), (1, 6));
        let report = crate::verify(&store).unwrap();
        assert_eq!((report.pruned, report.events), (6, 4));
        // The head is never pruned.
        let again = prune(&store, &key, &dir.join("archive"), 99, 200)
            .unwrap()
            .unwrap();
        assert_eq!((again.first_seq, again.last_seq), (7, 9));
        let archive = std::fs::read_to_string(&again.archive).unwrap();
        let verified = crate::checkpoint::verify_export(&archive, None, None).unwrap();
        assert_eq!((verified.events, verified.last_seq), (3, 9));
        assert!(
            prune(&store, &key, &dir.join("archive"), 99, 300)
                .unwrap()
                .is_none()
        );

        // A segment whose seal does not sign its end breaks verification.
        let other = sign(&key, 5, "00", 1);
        let forged = AuditSegment {
            first_seq: 10,
            last_seq: 10,
            last_hash: "ff".into(),
            archive: "x".into(),
            checkpoint: serde_json::to_string(&other).unwrap(),
            pruned_ns: 1,
        };
        store.prune_audit(&forged).unwrap();
        let e = crate::verify(&store).unwrap_err().to_string();
        assert!(e.contains("sealing checkpoint signs event 5"), "{e}");
    }
}
