//! Tamper evidence an auditor can use without the server: signed checkpoints, exports, and
//! `palisade audit verify` on an exported file (modification, tail deletion, forged keys).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use reqwest::Method;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use support::Harness;

fn palisade(args: &[&str], data_dir: &Path) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_verify_offline_and_tampering_or_tail_deletion_is_named() {
    let h = Harness::start("audit-export").await;
    let token = h.agent_token("auditor-subject", &["tickets"]).await;
    for _ in 0..3 {
        assert_eq!(h.get_tickets(&token).await.status(), 200);
    }
    // The auditor asks for a checkpoint and keeps it.
    let (s, checkpoint) = h.api(Method::POST, "/audit/checkpoints", None).await;
    assert_eq!(s, 200, "{checkpoint}");
    let signed_seq = checkpoint["seq"].as_u64().unwrap();
    assert!(signed_seq >= 5, "{checkpoint}");
    let (_, listed) = h.api(Method::GET, "/audit/checkpoints", None).await;
    assert_eq!(listed["items"][0]["seq"], checkpoint["seq"]);
    // More events after the checkpoint.
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let data_dir = h.data_dir.clone();
    h.server.stop().await;

    let dir = support::temp_dir("audit-export-files");
    std::fs::create_dir_all(&dir).unwrap();
    let kept = dir.join("checkpoint.json");
    std::fs::write(&kept, checkpoint.to_string()).unwrap();
    let export = dir.join("audit.jsonl");
    let (ok, _, err) = palisade(
        &["audit", "export", "--out", export.to_str().unwrap()],
        &data_dir,
    );
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&export).unwrap();

    let verify = |file: &Path, extra: &[&str]| {
        let mut args = vec!["audit", "verify", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        palisade(&args, &dir)
    };
    let key_id = checkpoint["key_id"].as_str().unwrap().to_string();
    let (ok, out, err) = verify(&export, &["--key", &key_id]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("audit chain intact"), "{out}");
    // The server's final checkpoint at shutdown is in the export too.
    assert!(out.contains("signed checkpoints verified"), "{out}");

    // A modified event is named.
    let lines: Vec<&str> = text.lines().collect();
    let tampered_seq = 3;
    let tampered: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            if v["type"] == "event" && v["seq"] == tampered_seq {
                l.replace("gateway.decision", "gateway.decisioX")
                    .replace("server.start", "server.stArt")
                    .replace("\\\"allowed\\\":true", "\\\"allowed\\\":false")
                    .replace("agent:", "agenT:")
            } else {
                l.to_string()
            }
        })
        .collect();
    let file = dir.join("tampered.jsonl");
    std::fs::write(&file, tampered.join("\n")).unwrap();
    let (ok, _, err) = verify(&file, &[]);
    assert!(!ok);
    assert!(err.contains(&format!("event {tampered_seq} ")), "{err}");

    // Deleting the newest events and every later checkpoint is caught against the kept one.
    let truncated: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            match v["type"].as_str().unwrap() {
                "event" => v["seq"].as_u64().unwrap() < signed_seq - 1,
                "checkpoint" => false,
                _ => true,
            }
        })
        .collect();
    let file = dir.join("truncated.jsonl");
    std::fs::write(&file, truncated.join("\n")).unwrap();
    let (ok, out, _) = verify(&file, &[]);
    assert!(
        ok,
        "without a checkpoint a shortened chain still links: {out}"
    );
    let (ok, _, err) = verify(&file, &["--from", kept.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("deleted"), "{err}");

    // An export that starts after the kept checkpoint verifies from it.
    let (ok, _, err) = palisade(
        &[
            "audit",
            "export",
            "--out",
            dir.join("later.jsonl").to_str().unwrap(),
            "--after",
            &signed_seq.to_string(),
        ],
        &data_dir,
    );
    assert!(ok, "{err}");
    let later = dir.join("later.jsonl");
    let (ok, out, err) = verify(&later, &["--from", kept.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // Without it, the export starts from its own signed checkpoint of that event, which a
    // pinned key must have signed when one is given.
    let (ok, out, err) = verify(&later, &[]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = verify(&later, &["--key", "0123456789abcdef"]);
    assert!(!ok && err.contains("not the pinned key"), "{err}");
    // An export cut so that no checkpoint of its start remains cannot start mid-chain.
    let text = std::fs::read_to_string(&later).unwrap();
    let headless: String = text
        .lines()
        .filter(|l| !l.contains(&format!("\"type\":\"checkpoint\",\"seq\":{signed_seq},")))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(headless, text);
    let cut = dir.join("cut.jsonl");
    std::fs::write(&cut, headless).unwrap();
    let (ok, _, err) = verify(&cut, &[]);
    assert!(
        !ok,
        "without a checkpoint of its start it cannot start mid-chain"
    );
    assert!(err.contains("--from"), "{err}");

    // A checkpoint signed by another key is refused when the key is pinned.
    let (ok, _, err) = verify(&export, &["--key", "0123456789abcdef"]);
    assert!(!ok);
    assert!(err.contains("not the pinned key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_detection_queries_run_on_the_real_log_by_cli_and_api() {
    let h = Harness::start("audit-query").await;
    let token = h.agent_token("reviewer", &["tickets"]).await;
    for _ in 0..4 {
        assert_eq!(h.get_tickets(&token).await.status(), 200);
    }
    // The first of the seed's queries, as written (no agent here has that purpose, and
    // tickets hold tickets, so it finds nothing: the point is that it runs).
    let scope = r#"AgentAuditLog
| where agent_purpose != "code-review" AND resource_type == "database"
| where timestamp > ago(1h)
| project agent_id, resource_accessed, action_taken, initiating_user"#;
    let (s, body) = h
        .api(
            Method::POST,
            "/audit/query",
            Some(serde_json::json!({ "query": scope })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["rows"], serde_json::json!([]));
    // The same shape finds the reviewer's reads of tickets.
    let reads = r#"AgentAuditLog
| where agent_purpose == "pull-request-review" and resource_type == "tickets"
| where timestamp > ago(1h)
| project agent_id, resource_accessed, action_taken, initiating_user"#;
    let (s, body) = h
        .api(
            Method::POST,
            "/audit/query",
            Some(serde_json::json!({ "query": reads })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{body}");
    assert_eq!(rows[0]["agent_id"], "agent:reviewer");
    assert_eq!(rows[0]["action_taken"], "read");

    let (s, body) = h
        .api(
            Method::POST,
            "/audit/query",
            Some(serde_json::json!({ "query": "AgentAuditLog | where agnt_id == 'x'" })),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(body["token"], "agnt_id");
    assert_eq!(body["column"], 23);

    let data_dir = h.data_dir.clone();
    h.server.stop().await;
    let volume = "AgentAuditLog
| where kind == 'gateway.decision'
| summarize action_count = count() by agent_id, bin(timestamp, 5m)
| where action_count > percentile_threshold_95
| project agent_id, action_count, timestamp";
    let (ok, out, err) = palisade(&["audit", "query", volume, "--format", "csv"], &data_dir);
    assert!(ok, "{err}");
    assert!(out.starts_with("agent_id,action_count,timestamp"), "{out}");
    let secrets = "AgentAuditLog
| where resource_type in (\"keyvault\", \"secrets-manager\", \"tickets\")
| where action_taken == \"read\"
| where not(agent_id in (approved_secret_consumers))";
    let (ok, out, err) = palisade(
        &[
            "audit",
            "query",
            secrets,
            "--list",
            "approved_secret_consumers=agent:other",
        ],
        &data_dir,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("agent:reviewer") && out.contains("(4 rows)"),
        "{out}"
    );
    // One request's whole story by its trace id.
    let (ok, out, err) = palisade(&["audit", "trace", "agent:reviewer"], &data_dir);
    assert!(ok, "{err}");
    assert!(
        out.contains("token.issued") && out.contains("gateway.decision"),
        "{out}"
    );
    let (ok, _, err) = palisade(&["audit", "trace", "nothing-like-this"], &data_dir);
    assert!(!ok);
    assert!(err.contains("no event"), "{err}");
    let (ok, _, err) = palisade(&["audit", "query", "AgentAuditLog | wher x"], &data_dir);
    assert!(!ok);
    assert!(err.contains("unknown stage") && err.contains("^"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_denials_raises_one_alert_and_a_normal_day_none() {
    let dir = support::temp_dir("audit-rules-file");
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rules]]\nname = \"any-delete\"\nseverity = \"medium\"\nevery = 60\n\
         query = \"AgentAuditLog | where action_taken == 'destructive' | project timestamp, agent_id, resource_accessed\"\n\
         message = \"an agent tried to delete\"\n",
    )
    .unwrap();
    let extra = format!("[audit]\nrules_file = \"{}\"\n", rules.display());
    let h = Harness::start_with("audit-alerts", &extra).await;
    let token = h.agent_token("prober", &["tickets"]).await;
    // A normal day: reads, one denial.
    for _ in 0..3 {
        assert_eq!(h.get_tickets(&token).await.status(), 200);
    }
    let (s, body) = h.api(Method::POST, "/alerts/run", None).await;
    assert_eq!(s, 200, "{body}");
    let raised: Vec<&str> = body["raised"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["rule"].as_str().unwrap())
        .collect();
    assert!(!raised.contains(&"denial-burst"), "{body}");
    assert!(!raised.contains(&"any-delete"), "{body}");

    // A burst: twelve denied deletes (tickets.no-deletes) in a row.
    for _ in 0..12 {
        let resp = h
            .http
            .delete(h.url("/tickets/1"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }
    let (_, body) = h.api(Method::POST, "/alerts/run", None).await;
    let raised: Vec<&str> = body["raised"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["rule"].as_str().unwrap())
        .collect();
    assert!(raised.contains(&"denial-burst"), "{body}");
    assert!(
        raised.contains(&"any-delete"),
        "the configured rule fires too: {body}"
    );
    // Raised once: a second run finds nothing new.
    let (_, body) = h.api(Method::POST, "/alerts/run", None).await;
    assert!(
        !body["raised"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["rule"] == "denial-burst"),
        "{body}"
    );
    let out = h.cli(&["alerts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("denial-burst") && text.contains("agent:prober"),
        "{text}"
    );
    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"]["kind"] == "alert.raised"
                && e["event"]["alert"]["rule"] == "denial-burst"),
        "alerts are audited"
    );
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_archives_seals_and_prunes_and_every_piece_still_verifies() {
    let clock = Arc::new(palisade_core::OffsetClock::new());
    let h = Harness::start_full(
        "audit-retention",
        "",
        "[audit]\nretention = \"1d\"\n",
        Some(clock.clone()),
    )
    .await;
    let token = h.agent_token("retained", &["tickets"]).await;
    for _ in 0..3 {
        assert_eq!(h.get_tickets(&token).await.status(), 200);
    }
    // Nothing is a day old yet.
    let (s, v) = h.api(Method::POST, "/audit/prune", None).await;
    assert_eq!((s, &v["pruned"]), (200, &Value::Null), "{v}");

    clock.advance(2 * 86_400);
    let (s, v) = h.api(Method::POST, "/audit/prune", None).await;
    assert_eq!(s, 200, "{v}");
    let first = v["pruned"].clone();
    assert_eq!(first["first_seq"], 1);
    let cut = first["last_seq"].as_u64().unwrap();
    assert!(cut >= 6, "{first}");
    let archive = std::path::PathBuf::from(first["archive"].as_str().unwrap());
    // The store now starts after the segment; the pruning itself is audited.
    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    let items = events["items"].as_array().unwrap();
    assert_eq!(items[0]["seq"].as_u64().unwrap(), cut + 1);
    assert!(items.iter().any(|i| i["event"]["kind"] == "audit.pruned"));

    // A second round: the next archive starts where the first ended.
    let token = h.agent_token("retained-2", &["tickets"]).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    clock.advance(2 * 86_400);
    let (_, v) = h.api(Method::POST, "/audit/prune", None).await;
    let second = v["pruned"].clone();
    assert_eq!(second["first_seq"].as_u64().unwrap(), cut + 1, "{v}");
    let archive2 = std::path::PathBuf::from(second["archive"].as_str().unwrap());
    let data_dir = h.data_dir.clone();
    let out = h.cli(&["audit", "prune"]);
    assert!(out.status.success());
    h.server.stop().await;

    // The store verifies from the last seal; each archive verifies on its own, offline.
    let (ok, out, err) = palisade(&["audit", "verify"], &data_dir);
    assert!(ok, "{out}{err}");
    for file in [&archive, &archive2] {
        let (ok, out, err) = palisade(&["audit", "verify", file.to_str().unwrap()], &data_dir);
        assert!(ok, "{}: {out}{err}", file.display());
    }
    let (ok, out, _) = palisade(&["audit", "verify", archive2.to_str().unwrap()], &data_dir);
    assert!(
        ok && out.contains(&format!("up to event {}", second["last_seq"])),
        "{out}"
    );

    // An archive that was edited does not verify.
    let text = std::fs::read_to_string(&archive).unwrap();
    let edited = text.replacen("retained", "innocent", 1);
    assert_ne!(text, edited);
    let forged = archive.with_extension("edited");
    std::fs::write(&forged, edited).unwrap();
    let (ok, _, err) = palisade(&["audit", "verify", forged.to_str().unwrap()], &data_dir);
    assert!(!ok && err.contains("modified"), "{err}");

    // Deleting the oldest stored events and claiming retention pruned them is caught: no
    // signed checkpoint seals the claimed segment's end.
    let db = data_dir.join("palisade.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let base: i64 = conn
        .query_row("SELECT MAX(last_seq) FROM audit_segments", [], |r| r.get(0))
        .unwrap();
    conn.execute("DELETE FROM audit_events WHERE seq = ?1", [base + 1])
        .unwrap();
    conn.execute(
        "INSERT INTO audit_segments (first_seq, last_seq, last_hash, archive, checkpoint, pruned_ns) \
         SELECT ?1, ?1, last_hash, archive, checkpoint, pruned_ns FROM audit_segments WHERE last_seq = ?2",
        [base + 1, base],
    )
    .unwrap();
    drop(conn);
    let (ok, out, err) = palisade(&["audit", "verify"], &data_dir);
    assert!(!ok && err.contains("checkpoint"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_a_sink_has_not_delivered() {
    let clock = Arc::new(palisade_core::OffsetClock::new());
    let h = Harness::start_full(
        "audit-retention-sink",
        "",
        "[audit]\nretention = \"1d\"\n[[audit.sinks]]\nname = \"down\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/never\"\n",
        Some(clock.clone()),
    )
    .await;
    let token = h.agent_token("kept", &["tickets"]).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    clock.advance(2 * 86_400);
    let (s, v) = h.api(Method::POST, "/audit/prune", None).await;
    assert_eq!((s, &v["pruned"]), (200, &Value::Null), "{v}");
    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    assert_eq!(events["items"][0]["seq"], 1, "nothing was pruned");
    h.server.stop().await;
}
