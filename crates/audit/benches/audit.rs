//! Audit pipeline speed on one machine: durable appends through the group-commit writer from
//! many concurrent requests, verification of a million-event chain, and the seed's three
//! detection queries over a million events spanning the last 24 hours. Prints one line per
//! measurement.
//!
//! `cargo bench -p palisade-audit --bench audit` (results in BENCHMARKS.md); `EVENTS=N` changes
//! the log size (default 1,000,000), `WRITERS=N` the concurrent writers (default 1,024). To
//! work on queries: `AUDIT_BENCH_DIR=/some/dir` keeps the log there and reuses it on the next
//! run (no append), and `QUERIES_ONLY=1` skips verification and the bare read.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The allocator the `palisade` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use palisade_audit::{AuditEvent, AuditLog, DecisionRecord, Outcome, PrincipalRef};
use palisade_core::store::Store;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

const PURPOSES: &[&str] = &[
    "code-review",
    "support-triage",
    "data-analysis",
    "release",
    "billing",
];
const TYPES: &[&str] = &["database", "keyvault", "tickets", "repo", "env-vars"];

/// Event `i` of `total`, timed so the log spans the last 24 hours evenly.
fn event(i: u64, total: u64, now_ns: i64) -> AuditEvent {
    let mut e = AuditEvent::new("gateway.decision");
    let day = 86_400_000_000_000i64;
    e.time_ns = now_ns - day + (i as i64) * (day / total.max(1) as i64);
    let agent = i % 500;
    e.request_id = Some(format!("req-{i}"));
    e.trace_id = Some(format!("{:032x}", i * 7919));
    e.principal = Some(PrincipalRef {
        id: format!("agent:bench-{agent}"),
        model: Some("anthropic/claude-opus-4@2026-05-01".into()),
        owner: Some(format!("human:owner-{}", agent % 40)),
        purpose: Some(PURPOSES[(agent % 5) as usize].into()),
    });
    e.action = Some(if i.is_multiple_of(7) { "write" } else { "read" }.into());
    e.resource = Some(format!("Palisade::Route::\"r{}\"", i % 50));
    e.decision = Some(DecisionRecord {
        allowed: !i.is_multiple_of(31),
        policies: vec!["palisade.baseline.allow-read".into()],
        policy_version: Some("v1".into()),
    });
    e.outcome = Some(Outcome {
        status: 200,
        bytes_in: Some(0),
        bytes_out: Some(512),
        error: None,
    });
    e.latency_us = Some(300 + i % 200);
    e.detail = json!({
        "route": format!("r{}", i % 50),
        "method": "GET",
        "path": format!("/r{}/items/{i}", i % 50),
        "resource_type": TYPES[(i % 5) as usize],
    });
    e
}

fn main() {
    let total: u64 = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let kept = std::env::var_os("AUDIT_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = kept.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("palisade-audit-bench-{}", std::process::id()))
    });
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let sqlite = palisade_store::SqliteStore::open(&dir).unwrap();
    let reuse = kept.is_some() && sqlite.audit_head().unwrap().is_some_and(|h| h.seq == total);
    // As in the server: WAL checkpoints on their own thread, off the commit path.
    let checkpointer = sqlite
        .start_checkpointer(std::time::Duration::from_millis(100))
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1. Durable appends: 256 concurrent requests, each waiting for its event's commit.
    let (log, writer) = AuditLog::start(store.clone()).unwrap();
    let start_ns = i64::try_from(palisade_core::Timestamp::now().unix_nanos()).unwrap();
    let producers: u64 = std::env::var("WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let started = Instant::now();
    if reuse {
        println!(
            "append      skipped: reusing the {total} events in {}",
            dir.display()
        );
    }
    rt.block_on(async {
        if reuse {
            return;
        }
        let mut tasks = Vec::new();
        for p in 0..producers {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = p;
                while i < total {
                    log.record(event(i, total, start_ns)).await.unwrap();
                    i += producers;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let secs = started.elapsed().as_secs_f64();
    if !reuse {
        println!(
            "append      {total} events, {producers} concurrent writers: {:.0} events/s ({secs:.2} s), every event durable before its caller resumes",
            total as f64 / secs
        );
    }
    drop(log);
    writer.join();
    // The log at rest, as `palisade audit verify` and queries usually meet it: the
    // checkpointer's last run has moved the WAL into the database.
    drop(checkpointer);
    let size: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("store       {:.0} MB on disk", size as f64 / 1e6);

    let queries_only = std::env::var_os("QUERIES_ONLY").is_some();
    // 2. Verification of the whole chain from the database.
    if !queries_only {
        let started = Instant::now();
        let report = palisade_audit::verify(store.as_ref()).unwrap();
        assert_eq!(report.events, total);
        println!(
            "verify      {total} events: {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let mut export = Vec::new();
        palisade_audit::checkpoint::export(store.as_ref(), 0, &mut export).unwrap();
        let text = String::from_utf8(export).unwrap();
        let exported = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let checked = palisade_audit::checkpoint::verify_export(&text, None, None).unwrap();
        assert_eq!(checked.events, total);
        println!(
            "verify file {total} events exported ({:.0} MB, {exported:.2} s): {:.2} s",
            text.len() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        drop(text);

        // Reading alone, for the record: what every query pays before it looks at an event.
        let started = Instant::now();
        let mut after = 0;
        let mut bytes = 0usize;
        loop {
            let page = store.read_audit(after, 4096).unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq;
            bytes += page.iter().map(|e| e.body.len()).sum::<usize>();
        }
        println!(
            "read        {total} events ({:.0} MB of bodies) from the store: {:.2} s",
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }

    // 3. The seed's detection queries, each over the whole log as stored.
    let mut lists = HashMap::new();
    lists.insert(
        "approved_secret_consumers".to_string(),
        vec![json!("agent:bench-1"), json!("agent:bench-2")],
    );
    let now = i64::try_from(palisade_core::Timestamp::now().unix_nanos()).unwrap();
    let queries = [
        (
            "scope violations",
            r#"AgentAuditLog
| where agent_purpose != "code-review" AND resource_type == "database"
| where timestamp > ago(1h)
| project agent_id, resource_accessed, action_taken, initiating_user"#,
        ),
        (
            "volume anomaly",
            r#"AgentAuditLog
| summarize action_count = count() by agent_id, bin(timestamp, 5m)
| where action_count > percentile_threshold_95
| project agent_id, action_count, timestamp"#,
        ),
        (
            "credential access",
            r#"AgentAuditLog
| where resource_type in ("keyvault", "secrets-manager", "env-vars")
| where action_taken == "read"
| where not(agent_id in (approved_secret_consumers))"#,
        ),
    ];
    for (name, q) in queries {
        let started = Instant::now();
        let answer = palisade_audit::query::run_on_store(q, store.as_ref(), now, &lists).unwrap();
        println!(
            "query       {name:<18} over {total} events: {:.2} s ({} rows)",
            started.elapsed().as_secs_f64(),
            answer.rows.len()
        );
    }
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
