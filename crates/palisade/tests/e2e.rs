//! End-to-end: the real server on port 0, a real upstream, real HTTP clients and the real CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_loop_token_allow_deny_suspend_verify_and_tamper() {
    let h = Harness::start("loop").await;
    let secret = h.owner_and_agent("pr-reviewer").await;
    let token = h.token_for("agent:pr-reviewer", &secret).await;

    // Allowed read reaches the upstream, without the agent's token.
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["path"], "/tickets/42");
    {
        let seen = h.upstream.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].headers.get("authorization").is_none(),
            "bearer token was forwarded upstream"
        );
        assert!(seen[0].headers.get("x-request-id").is_some());
    }

    // DELETE is refused, naming the forbid policy.
    let resp = h
        .http
        .delete(h.url("/tickets/42"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["deciding_policies"], json!(["tickets.no-deletes"]));
    assert_eq!(
        h.upstream.seen.lock().unwrap().len(),
        1,
        "a denied request reached the upstream"
    );

    // Suspension makes the live token fail at once.
    let (s, _) = h
        .api(
            Method::POST,
            "/agents/pr-reviewer/suspend",
            Some(json!({ "reason": "incident 7" })),
        )
        .await;
    assert_eq!(s, 200);
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 401);
    let www = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        www.contains("invalid_token") && www.contains("suspended"),
        "{www}"
    );

    // The audit chain verifies with the real CLI, then a tampered row is named.
    let data_dir = h.data_dir.clone();
    h.server.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("audit chain intact"), "{stdout}");

    let db = rusqlite::Connection::open(data_dir.join("palisade.db")).unwrap();
    let (seq, kind): (i64, String) = db
        .query_row(
            "SELECT seq, kind FROM audit_events WHERE kind = 'gateway.decision' ORDER BY seq LIMIT 1 OFFSET 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(kind, "gateway.decision");
    db.execute(
        "UPDATE audit_events SET body = replace(body, '403', '200') WHERE seq = ?1",
        [seq],
    )
    .unwrap();
    drop(db);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("event {seq} ")), "{stderr}");
    assert!(stderr.contains("modified"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_and_admin_change_is_audited_without_secrets() {
    let h = Harness::start("audit-content").await;
    let secret = h.owner_and_agent("auditee").await;
    let token = h.token_for("agent:auditee", &secret).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let bad = h
        .http
        .post(h.url("/oauth2/token"))
        .basic_auth("agent:auditee", Some("pls_wrong"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    let text = events.to_string();
    assert!(!text.contains(&secret), "client secret in the audit log");
    assert!(!text.contains(&token), "access token in the audit log");
    assert!(!text.contains(&h.admin), "admin token in the audit log");
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["event"]["kind"].as_str().unwrap())
        .collect();
    for expected in [
        "server.start",
        "admin.change",
        "token.issued",
        "gateway.decision",
        "token.refused",
    ] {
        assert!(kinds.contains(&expected), "missing {expected} in {kinds:?}");
    }
    let decision = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["event"])
        .find(|e| e["kind"] == "gateway.decision")
        .unwrap();
    assert_eq!(decision["principal"]["id"], "agent:auditee");
    assert_eq!(
        decision["principal"]["model"],
        "anthropic/claude-opus-4@2026-05-01"
    );
    assert_eq!(decision["principal"]["owner"], "human:alice");
    assert_eq!(decision["action"], "read");
    assert_eq!(decision["decision"]["allowed"], true);
    assert_eq!(
        decision["decision"]["policies"],
        json!(["palisade.baseline.agent-read"])
    );
    assert_eq!(decision["outcome"]["status"], 200);
    assert!(decision["latency_us"].as_u64().is_some());
    assert!(decision["request_id"].as_str().is_some());
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validation_names_the_field() {
    let h = Harness::start("validation").await;
    h.owner_and_agent("first").await;
    let cases = [
        (json!({ "owner": "human:nobody" }), 400, "owner"),
        (json!({ "owner": "agent:first" }), 400, "owner"),
        (json!({ "purpose": "" }), 400, "purpose"),
        (
            json!({ "max_session_minutes": 500 }),
            400,
            "max_session_minutes",
        ),
        (
            json!({ "max_session_minutes": "long" }),
            400,
            "max_session_minutes",
        ),
        (json!({ "colour": "blue" }), 400, "colour"),
        (json!({ "id": "agent:first" }), 409, "id"),
        (json!({ "id": "human:first" }), 400, "id"),
    ];
    for (patch, status, field) in cases {
        let mut body = support::agent_body("second");
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, resp) = h.api(Method::POST, "/agents", Some(body)).await;
        assert_eq!(s, status, "{patch} -> {resp}");
        assert_eq!(resp["error"]["field"], field, "{patch} -> {resp}");
    }
    // Without a declared blast radius an agent is read-only, whatever a policy grants.
    let mut plain = support::agent_body("plain");
    plain.as_object_mut().unwrap().remove("blast_radius");
    let (s, body) = h.api(Method::POST, "/agents", Some(plain)).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["principal"]["blast_radius"]["max_action"], "read");
    assert_eq!(
        body["principal"]["blast_radius"]["max_classification"],
        "internal"
    );
    let (s, body) = h
        .api(
            Method::POST,
            "/agents",
            Some({
                let mut b = support::agent_body("bad-hours");
                b["blast_radius"] = json!({ "hours": [18, 8] });
                b
            }),
        )
        .await;
    assert_eq!(
        (s, body["error"]["field"].as_str()),
        (400, Some("blast_radius.hours")),
        "{body}"
    );
    // A suspended owner cannot own a new agent.
    let (s, _) = h.api(Method::POST, "/humans/alice/suspend", None).await;
    assert_eq!(s, 200);
    let (s, resp) = h
        .api(Method::POST, "/agents", Some(support::agent_body("third")))
        .await;
    assert_eq!(s, 400);
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("suspended"),
        "{resp}"
    );
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_admin_bodies_get_clear_errors() {
    let h = Harness::start("bad-input").await;
    let resp = h
        .http
        .post(h.url("/api/v1/humans"))
        .bearer_auth(&h.admin)
        .header("content-type", "application/json")
        .body("{\"id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json");

    let big = format!(
        "{{\"id\":\"x\",\"description\":\"{}\"}}",
        "a".repeat(100 * 1024)
    );
    let resp = h
        .http
        .post(h.url("/api/v1/teams"))
        .bearer_auth(&h.admin)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    let resp = h.http.get(h.url("/api/v1/agents")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin.token")
    );

    let resp = h
        .http
        .get(h.url("/api/v1/agents"))
        .bearer_auth("pat_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Gateway body limit (4096 in the harness config) and unknown paths.
    let secret = h.owner_and_agent("bodies").await;
    let token = h.token_for("agent:bodies", &secret).await;
    let resp = h
        .http
        .post(h.url("/tickets/1"))
        .bearer_auth(&token)
        .body(vec![b'x'; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let resp = h.get_with("/nowhere", &token).await;
    assert_eq!(resp.status(), 404);
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_registers_lists_and_suspends_through_the_api() {
    let h = Harness::start("cli").await;
    let out = h.cli(&["human", "add", "bob", "--email", "bob@example.com"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = h.cli(&[
        "agent",
        "register",
        "cli-bot",
        "--owner",
        "human:bob",
        "--purpose",
        "triage",
        "--purpose-tag",
        "ticket-triage",
        "--model-provider",
        "anthropic",
        "--model",
        "claude",
        "--model-version",
        "1",
        "--allow-route",
        "tickets",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("client_secret: pls_"), "{stdout}");

    let out = h.cli(&["agent", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("agent:cli-bot") && stdout.contains("active"),
        "{stdout}"
    );

    // The effective policy: the blast radius values and every policy that can apply.
    let out = h.cli(&["policy", "show", "--agent", "cli-bot"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("max action         read"), "{stdout}");
    assert!(
        stdout.contains("@id(\"palisade.blast-radius.action\")"),
        "{stdout}"
    );
    assert!(
        stdout.contains("@id(\"palisade.baseline.agent-read\")"),
        "{stdout}"
    );
    let out = h.cli(&["agent", "suspend", "cli-bot", "--reason", "test"]);
    assert!(out.status.success());
    let out = h.cli(&["--json", "agent", "show", "agent:cli-bot"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "suspended");
    assert_eq!(v["status_change"]["reason"], "test");

    let out = h.cli(&[
        "agent",
        "register",
        "x",
        "--owner",
        "human:ghost",
        "--purpose",
        "p",
        "--purpose-tag",
        "p",
        "--model-provider",
        "a",
        "--model",
        "b",
        "--model-version",
        "c",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owner: `human:ghost` is not registered")
    );
    h.server.stop().await;
}

#[test]
fn config_check_rejects_unknown_keys_with_exit_64() {
    let dir = support::temp_dir("config");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("palisade.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:0\"\nlisten_port = 9\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_port"), "{stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "config",
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../palisade.example.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "example config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_refuses_an_invalid_policy_before_binding() {
    let dir = support::temp_dir("badpolicy");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("broken.cedar"),
        "@id(\"x\")\npermit (principal, action, resource)\nwhen { principal.nope == 1 };\n",
    )
    .unwrap();
    let file = dir.join("palisade.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[policy]\ndir = \"{}\"\n",
            dir.join("data").display(),
            policies.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.cedar:3:"), "{stderr}");
    assert!(
        !dir.join("data").exists(),
        "the data directory was created before the policy check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_streaming_and_chunked_limits() {
    // A port with nothing listening, for the "upstream down" route.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let up = support::upstream().await;
    let extra = format!(
        "[[routes]]\nname = \"slow\"\npath_prefix = \"/slow\"\nupstream = \"http://{}\"\ntimeout_seconds = 1\n\
         [[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"http://{closed_addr}\"\n",
        up.addr
    );
    let h = Harness::start_with("failures", &extra).await;
    let secret = h.agent_secret("edge", &["tickets", "slow", "down"]).await;
    let token = h.token_for("agent:edge", &secret).await;

    let resp = h.get_with("/slow/x/slow", &token).await;
    assert_eq!(resp.status(), 504);
    let resp = h.get_with("/down/x", &token).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("`down`"),
        "{body}"
    );

    // A streamed response arrives whole, and hop-by-hop headers stay on their hop.
    let resp = h
        .http
        .get(h.url("/tickets/1/stream"))
        .bearer_auth(&token)
        .header("x-hop", "secret")
        .header("connection", "x-hop")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.len(), 3 * 64 * 1024);
    assert_eq!(
        (bytes[0], bytes[64 * 1024], bytes[128 * 1024]),
        (b'a', b'b', b'c')
    );
    {
        let seen = h.upstream.seen.lock().unwrap();
        let last = seen.last().unwrap();
        assert_eq!(last.path, "/tickets/1/stream");
        assert!(
            last.headers.get("x-hop").is_none(),
            "a Connection-listed header was forwarded"
        );
    }

    // A chunked body without Content-Length is cut off at the limit (4096 in the harness).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let token = h
        .scoped_token("agent:edge", &secret, "slow:write", None)
        .await;
    let mut tcp = tokio::net::TcpStream::connect(h.server.addr).await.unwrap();
    let head = format!(
        "POST /slow/1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..4 {
        let chunk = vec![b'z'; 2000];
        tcp.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        tcp.write_all(&chunk).await.unwrap();
        tcp.write_all(b"\r\n").await.unwrap();
    }
    tcp.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    h.server.stop().await;
}

/// The README's first command: `serve --demo` prints three commands, and they do what it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_demo_prints_commands_that_work() {
    use std::io::BufRead;
    let data_dir = support::temp_dir("demo");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            text.push_str(&line);
            text.push('\n');
            if line.contains("Press Ctrl-C") {
                break;
            }
        }
        text
    })
    .await
    .unwrap();
    let base = printed
        .split("running at ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let secret = printed
        .split("client_secret=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        printed.contains(&format!(
            "curl -i -H \"Authorization: Bearer $TOKEN\" {base}/tickets/42"
        )),
        "{printed}"
    );

    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{base}/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "agent:ticket-triage"),
            ("client_secret", &secret),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap();
    let get = http
        .get(format!("{base}/tickets/42"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let delete = http
        .delete(format!("{base}/tickets/42"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 403);
    let body: Value = delete.json().await.unwrap();
    // Both the demo policy and the agent's blast radius (write at most) refuse a delete.
    assert_eq!(
        body["deciding_policies"],
        json!(["demo.no-ticket-deletes", "palisade.blast-radius.action"])
    );

    // The demo's own registrations are audited like admin changes.
    let admin = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
    let events: Value = http
        .get(format!("{base}/api/v1/audit/events?limit=1000"))
        .bearer_auth(admin.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let demo_changes: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["event"]["principal"]["id"] == "demo")
        .map(|i| i["event"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        demo_changes,
        ["human.register", "agent.register", "agent.rotate-secret"]
    );
    child.kill().unwrap();
    let _ = child.wait();
}

/// Purpose binding: an agent acting outside its declared purpose is denied by the compiled
/// purpose policy, and the audit event carries a high-severity alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purpose_binding_denies_and_alerts_outside_the_declared_purpose() {
    let mail = support::upstream().await;
    let extra = format!(
        "[[routes]]\nname = \"mail\"\npath_prefix = \"/mail\"\nupstream = \"http://{}\"\nkind = \"email\"\n\n\
         [purposes.pull-request-review]\nactions = [\"read\", \"write\"]\nresource_kinds = [\"tickets\"]\n",
        mail.addr
    );
    let h = Harness::start_with("purpose", &extra).await;
    let token = h.agent_token("reviewer", &["tickets", "mail"]).await;

    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let resp = h.get_with("/mail/inbox", &token).await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["deciding_policies"],
        json!(["palisade.purpose.pull-request-review"])
    );
    assert!(
        mail.seen.lock().unwrap().is_empty(),
        "the denied call reached the mail upstream"
    );

    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    let alerts: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["event"].get("alert"))
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["severity"], "high");
    assert_eq!(alerts[0]["rule"], "purpose-violation");
    let message = alerts[0]["message"].as_str().unwrap();
    assert!(
        message.contains("agent:reviewer")
            && message.contains("pull-request-review")
            && message.contains("email"),
        "{message}"
    );
    h.server.stop().await;
}

/// `policy explain` and `policy what-can` through the real CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_and_what_can() {
    let h = Harness::start("explain").await;
    h.owner_and_agent("helper").await;

    let out = h.cli(&[
        "--json",
        "policy",
        "explain",
        "--principal",
        "agent:helper",
        "--action",
        "write",
        "--route",
        "tickets",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["deciding_policies"], json!(["palisade.default-deny"]));
    let considered = v["permits_considered"].as_array().unwrap();
    let slow = considered
        .iter()
        .find(|p| p["id"] == "tests.slow-route-writes")
        .expect("the write permit for another route");
    assert_eq!(slow["would_allow_alone"], false);

    let out = h.cli(&[
        "policy",
        "explain",
        "--principal",
        "agent:helper",
        "--action",
        "destructive",
        "--route",
        "tickets",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("DENY by tickets.no-deletes"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = h.cli(&[
        "policy",
        "explain",
        "--principal",
        "agent:helper",
        "--action",
        "read",
        "--route",
        "nope",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("routes are: tickets"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = h.cli(&["--json", "policy", "what-can", "helper"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v["items"].as_array().unwrap();
    let find = |action: &str| {
        items
            .iter()
            .find(|i| i["route"] == "tickets" && i["action"] == action)
            .unwrap()
    };
    assert_eq!(find("read")["allowed"], true);
    assert_eq!(find("write")["allowed"], false);
    assert_eq!(
        find("destructive")["policies"],
        json!(["tickets.no-deletes"])
    );
    h.server.stop().await;
}

/// The gateway judges and forwards one normalised path: dot segments and encoded slashes are
/// refused, encoded unreserved characters are decoded before routing, deciding and forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing_deciding_and_forwarding() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start("paths").await;
    let secret = h.owner_and_agent("walker").await;
    let token = h.token_for("agent:walker", &secret).await;
    let raw = |path: &str| {
        let addr = h.server.addr;
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
        );
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.unwrap();
            answer
        }
    };
    for bad in [
        "/tickets/../tickets/1",
        "/tickets/%2e%2e/x",
        "/tickets/a%2fb",
        "/tickets//1",
    ] {
        let answer = raw(bad).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
    }
    assert!(
        h.upstream.seen.lock().unwrap().is_empty(),
        "a refused path reached the upstream"
    );
    let answer = raw("/%74ickets/%34%32").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(h.upstream.seen.lock().unwrap()[0].path, "/tickets/42");
    h.server.stop().await;
}
