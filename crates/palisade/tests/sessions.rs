//! Sessions, limits and the kill switch, end to end: the real server on port 0, a real upstream,
//! real HTTP clients, and a clock the test moves instead of sleeping for minutes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Harness, agent_body};

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Every audit event of `kind`, paging through the whole chain.
async fn events(h: &Harness, kind: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let path = format!("/audit/events?after={after}&limit=1000");
        let (_, page) = h.api(Method::GET, &path, None).await;
        let items = page["items"].as_array().unwrap();
        let Some(last) = items.last() else {
            return out;
        };
        after = last["seq"].as_u64().unwrap();
        out.extend(
            items
                .iter()
                .map(|i| i["event"].clone())
                .filter(|e| e["kind"] == kind),
        );
    }
}

/// Registers human:alice and an agent from `agent_body(slug)` changed by `edit`; returns the
/// client secret.
async fn agent(h: &Harness, slug: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (s, _) = h
        .api(Method::POST, "/humans", Some(json!({ "id": "alice" })))
        .await;
    assert!(s == 201 || s == 409);
    let mut body = agent_body(slug);
    edit(&mut body);
    let (s, created) = h.api(Method::POST, "/agents", Some(body)).await;
    assert_eq!(s, 201, "{created}");
    created["credentials"]["client_secret"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A new session: (token, session id).
async fn session(h: &Harness, slug: &str, secret: &str) -> (String, String) {
    let (s, body) = h.token_request(&format!("agent:{slug}"), secret, &[]).await;
    assert_eq!(s, 200, "{body}");
    (
        body["access_token"].as_str().unwrap().to_string(),
        body["session_id"].as_str().unwrap().to_string(),
    )
}

fn clear_context_header(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("palisade-clear-context")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_stays_in_the_session_until_its_hard_end_then_the_agent_must_clear_context() {
    let clock = Arc::new(palisade_core::OffsetClock::new());
    let h = Harness::start_full("session-end", "", "", Some(clock.clone())).await;
    let secret = agent(&h, "runner", |a| a["max_session_minutes"] = json!(30)).await;

    let (s, first) = h.token_request("agent:runner", &secret, &[]).await;
    assert_eq!(s, 200, "{first}");
    let sid = first["session_id"].as_str().unwrap().to_string();
    assert!(sid.starts_with("ses_"), "{sid}");
    assert_eq!(claims(first["access_token"].as_str().unwrap())["sid"], sid);
    assert_eq!(first["expires_in"], 900, "15 minutes by default");
    let left = first["session_expires_in"].as_i64().unwrap();
    assert!((1790..=1800).contains(&left), "{left}");

    // 20 minutes in: the renewal stays in the session, and the token stops at the hard end.
    clock.advance(20 * 60);
    let (s, renewed) = h
        .token_request("agent:runner", &secret, &[("session_id", &sid)])
        .await;
    assert_eq!(s, 200, "{renewed}");
    assert_eq!(renewed["session_id"], sid);
    let expires_in = renewed["expires_in"].as_i64().unwrap();
    assert!(
        (590..=600).contains(&expires_in),
        "capped at the hard end: {expires_in}"
    );
    let token = renewed["access_token"].as_str().unwrap().to_string();
    assert_eq!(claims(&token)["sid"], sid);
    assert_eq!(h.get_tickets(&token).await.status(), 200);

    // 5 s past the hard end (inside the token leeway): the session, not the token, refuses.
    clock.advance(10 * 60 + 5);
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 401);
    let header = clear_context_header(&resp);
    assert!(header.contains(&format!("sid={sid}")), "{header}");
    assert!(header.contains("reason=expired"), "{header}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["session"]["clear_context"], true, "{body}");
    assert_eq!(body["session"]["id"], sid);

    let (s, refused) = h
        .token_request("agent:runner", &secret, &[("session_id", &sid)])
        .await;
    assert_eq!(s, 400, "{refused}");
    assert_eq!(refused["error"], "invalid_grant");
    let text = refused["error_description"].as_str().unwrap();
    assert!(
        text.contains("hard end") && text.contains("new session"),
        "{text}"
    );
    assert_eq!(refused["session"]["clear_context"], true);

    // The end is audited as a context-clearing event (by the sweeper, within about a second).
    let mut ended = Vec::new();
    for _ in 0..50 {
        ended = events(&h, "session.ended").await;
        if !ended.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = ended
        .iter()
        .find(|e| e["detail"]["sid"] == sid)
        .expect("session.ended audited");
    assert_eq!(e["detail"]["reason"], "expired");
    assert_eq!(e["detail"]["clear_context"], true);
    assert_eq!(e["principal"]["id"], "agent:runner");

    // A new session starts clean.
    let (s, fresh) = h.token_request("agent:runner", &secret, &[]).await;
    assert_eq!(s, 200, "{fresh}");
    assert_ne!(fresh["session_id"], sid);
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_session_over_the_limit_is_refused_naming_the_live_ones() {
    let h = Harness::start("session-limit").await;
    let secret = agent(&h, "pair", |a| a["max_concurrent_sessions"] = json!(2)).await;
    let (token_a, sid_a) = session(&h, "pair", &secret).await;
    let (token_b, sid_b) = session(&h, "pair", &secret).await;

    let (s, refused) = h.token_request("agent:pair", &secret, &[]).await;
    assert_eq!(s, 403, "{refused}");
    assert_eq!(refused["error"], "access_denied");
    assert_eq!(refused["limit"], 2);
    let mut live: Vec<&str> = refused["live_sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    live.sort_unstable();
    let mut expected = vec![sid_a.as_str(), sid_b.as_str()];
    expected.sort_unstable();
    assert_eq!(live, expected);
    let text = refused["error_description"].as_str().unwrap();
    assert!(
        text.contains("max_concurrent_sessions") && text.contains(&sid_a),
        "{text}"
    );

    // The agent ends its own session: context clearing is in the answer and on later use.
    let resp = h
        .http
        .post(h.url("/oauth2/session/end"))
        .bearer_auth(&token_a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["clear_context"], true);
    let resp = h.get_tickets(&token_a).await;
    assert_eq!(resp.status(), 401);
    assert!(clear_context_header(&resp).contains("reason=ended"));

    // A slot is free again.
    let (_token_c, sid_c) = session(&h, "pair", &secret).await;

    // The CLI lists the live sessions and ends one.
    let out = h.cli(&["session", "list", "--agent", "agent:pair"]);
    assert!(out.status.success(), "{out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains(&sid_b) && listing.contains(&sid_c),
        "{listing}"
    );
    assert!(!listing.contains(&sid_a), "{listing}");
    let out = h.cli(&["session", "end", &sid_b, "--reason", "task done"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(h.get_tickets(&token_b).await.status(), 401);
    let ends = events(&h, "session.ended").await;
    let by_admin = ends.iter().find(|e| e["detail"]["sid"] == sid_b).unwrap();
    assert_eq!(by_admin["detail"]["message"], "task done");
    assert_eq!(by_admin["detail"]["reason"], "ended");
    h.server.stop().await;
}

const OBJECT_RULE: &str = r#"
[[routes.rules]]
methods = ["GET"]
path = "/tickets/*/attachments/**"
action = "read"
object_read = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_51st_object_read_is_refused_with_the_counter_and_the_limit() {
    let h = Harness::start_with("objects", OBJECT_RULE).await;
    // agent_body sets max_files_per_session = 50.
    let secret = agent(&h, "reader", |_| {}).await;
    let (token, sid) = session(&h, "reader", &secret).await;
    assert_eq!(claims(&token)["max_files_per_session"], 50);
    for n in 1..=50 {
        let resp = h
            .get_with(&format!("/tickets/7/attachments/f{n}.txt"), &token)
            .await;
        assert_eq!(resp.status(), 200, "read {n}");
    }
    // Requests that are not object reads still pass.
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let resp = h.get_with("/tickets/7/attachments/f51.txt", &token).await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "volume_limit", "{body}");
    assert_eq!(body["count"], 51);
    assert_eq!(body["limit"], 50);
    assert_eq!(body["counter"], "objects_read");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_files_per_session")
    );
    let upstream_reads = h
        .upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path.contains("/attachments/"))
        .count();
    assert_eq!(upstream_reads, 50, "the 51st never reached the upstream");

    let (s, shown) = h.api(Method::GET, &format!("/sessions/{sid}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(shown["counters"]["objects_read"], 50, "{shown}");
    assert_eq!(shown["counters"]["calls"], 52);
    assert!(shown["counters"]["bytes_in"].as_u64().unwrap() > 0);
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_counters_feed_the_policy_context() {
    let h = Harness::start_with("counters-policy", OBJECT_RULE).await;
    let policy_dir = h.data_dir.with_extension("policies");
    std::fs::write(
        policy_dir.join("volume.cedar"),
        r#"
@id("tickets.writers")
permit (principal, action == Palisade::Action::"write", resource == Palisade::Route::"tickets");

@id("tickets.no-writes-after-reading-3")
forbid (principal, action == Palisade::Action::"write", resource)
when { context.objects_read >= 3 };
"#,
    )
    .unwrap();
    let (s, body) = h.api(Method::POST, "/policy/reload", None).await;
    assert_eq!(s, 200, "{body}");
    let secret = agent(&h, "writer", |_| {}).await;
    let (token, sid) = session(&h, "writer", &secret).await;
    // The write token lives in the same session, so it sees the same counters.
    let writer = h
        .scoped_token("agent:writer", &secret, "tickets:write", Some(&sid))
        .await;
    let post = || {
        h.http
            .post(h.url("/tickets/7"))
            .bearer_auth(&writer)
            .json(&json!({ "note": "x" }))
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 200);
    for n in 1..=3 {
        let path = format!("/tickets/7/attachments/{n}");
        assert_eq!(h.get_with(&path, &token).await.status(), 200);
    }
    let resp = post().await.unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["deciding_policies"],
        json!(["tickets.no-writes-after-reading-3"])
    );
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    // Per agent on a route, from the config.
    let h = Harness::start_with("rate-route", "agent_rate_limit = \"3/min\"\n").await;
    let secret = agent(&h, "busy", |_| {}).await;
    let (token, _) = session(&h, "busy", &secret).await;
    for _ in 0..3 {
        assert_eq!(h.get_tickets(&token).await.status(), 200);
    }
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "one request per 20 s: {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["scope"], "agent-route");
    assert_eq!(body["limit"], "3/min");
    // Another agent has its own budget on the route.
    let other = agent(&h, "calm", |_| {}).await;
    let (token, _) = session(&h, "calm", &other).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let limited = events(&h, "gateway.decision")
        .await
        .into_iter()
        .filter(|e| e["outcome"]["status"] == 429)
        .count();
    assert_eq!(limited, 1, "the refusal is audited");
    h.server.stop().await;

    // Per agent across routes, from the agent record.
    let h = Harness::start("rate-agent").await;
    let secret = agent(&h, "slow", |a| a["rate_limit"] = json!("2/min")).await;
    let (token, _) = session(&h, "slow", &secret).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["scope"], "agent");
    let (s, bad) = h
        .api(
            Method::PATCH,
            "/agents/agent:slow",
            Some(json!({ "rate_limit": "lots" })),
        )
        .await;
    assert_eq!(s, 400, "{bad}");
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_stops_every_session_at_once_under_load() {
    let h = Harness::start("kill").await;
    let secret = agent(&h, "wild", |_| {}).await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(session(&h, "wild", &secret).await.0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let mut tasks = Vec::new();
    for n in 0..6 {
        let (http, url, token) = (
            h.http.clone(),
            h.url("/tickets/42"),
            tokens[n % tokens.len()].clone(),
        );
        let (stop, log) = (stop.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                // 0: the response was cut off mid-body, which the kill does to running streams.
                let status = match http.get(&url).bearer_auth(&token).send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.bytes().await {
                            Ok(_) => status,
                            Err(_) => 0,
                        }
                    }
                    Err(_) => 0,
                };
                log.lock().unwrap().push((sent, status));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill_started = Instant::now();
    let (s, killed) = h
        .api(
            Method::POST,
            "/agents/agent:wild/kill",
            Some(json!({ "reason": "INC-7 runaway loop", "operator": "oncall-bob" })),
        )
        .await;
    let kill_done = Instant::now();
    assert_eq!(s, 200, "{killed}");
    assert_eq!(killed["sessions_ended"].as_array().unwrap().len(), 3);
    assert_eq!(killed["suspended"], json!(["agent:wild"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    let before_ok = log
        .iter()
        .filter(|(t, s)| *t < kill_started && *s == 200)
        .count();
    let after: Vec<u16> = log
        .iter()
        .filter(|(t, _)| *t > kill_done)
        .map(|(_, s)| *s)
        .collect();
    assert!(before_ok > 0, "load ran before the kill");
    assert!(!after.is_empty(), "load ran after the kill");
    assert!(
        after.iter().all(|s| *s == 401),
        "no request sent after the kill returned got through: {after:?}"
    );
    let first_refusal = log
        .iter()
        .filter(|(t, s)| *t >= kill_started && *s == 401)
        .map(|(t, _)| t.duration_since(kill_started))
        .min()
        .unwrap();
    eprintln!(
        "kill switch: call took {:?}, first refused request sent {first_refusal:?} after it started; {} requests after it, all refused",
        kill_done.duration_since(kill_started),
        after.len()
    );

    // A killed session tells the runtime to clear context; no new tokens until resumed.
    let resp = h.get_tickets(&tokens[0]).await;
    assert!(clear_context_header(&resp).contains("reason=killed"));
    let (s, refused) = h.token_request("agent:wild", &secret, &[]).await;
    assert_eq!(s, 401, "{refused}");
    let kill = events(&h, "killswitch").await;
    assert_eq!(kill.len(), 1);
    assert_eq!(kill[0]["principal"]["id"], "admin (oncall-bob)");
    assert_eq!(kill[0]["detail"]["reason"], "INC-7 runaway loop");
    assert_eq!(kill[0]["alert"]["rule"], "kill-switch");
    let ends = events(&h, "session.ended").await;
    assert_eq!(
        ends.iter()
            .filter(|e| e["detail"]["reason"] == "killed")
            .count(),
        3
    );
    // A kill needs a reason.
    let (s, body) = h
        .api(Method::POST, "/agents/agent:wild/kill", Some(json!({})))
        .await;
    assert_eq!(s, 400, "{body}");
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_kill_and_panic_from_the_cli() {
    let h = Harness::start("kill-owner").await;
    let (s, _) = h
        .api(Method::POST, "/humans", Some(json!({ "id": "bob" })))
        .await;
    assert_eq!(s, 201);
    let a1 = agent(&h, "a1", |_| {}).await;
    let a2 = agent(&h, "a2", |_| {}).await;
    let b1 = agent(&h, "b1", |a| a["owner"] = json!("human:bob")).await;
    let (t1, _) = session(&h, "a1", &a1).await;
    let (t2, _) = session(&h, "a2", &a2).await;
    let (t3, _) = session(&h, "b1", &b1).await;

    let out = h.cli(&["owner", "kill", "human:alice", "--reason", "INC-8"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 session(s) ended, 2 agent(s) suspended"),
        "{text}"
    );
    assert_eq!(h.get_tickets(&t1).await.status(), 401);
    assert_eq!(h.get_tickets(&t2).await.status(), 401);
    assert_eq!(
        h.get_tickets(&t3).await.status(),
        200,
        "bob's agent runs on"
    );

    let out = h.cli(&["panic", "--reason", "INC-9 everything"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(h.get_tickets(&t3).await.status(), 401);
    let out = h.cli(&["panic"]);
    assert!(!out.status.success(), "panic without --reason is refused");
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_kills_and_counters_survive_a_restart() {
    let h = Harness::start_full(
        "session-restart",
        "issuer = \"http://palisade.test\"",
        OBJECT_RULE,
        None,
    )
    .await;
    let secret = agent(&h, "durable", |_| {}).await;
    let (revoked, _) = session(&h, "durable", &secret).await;
    let (kept, kept_sid) = session(&h, "durable", &secret).await;
    let resp = h
        .http
        .post(h.url("/oauth2/revoke"))
        .basic_auth("agent:durable", Some(&secret))
        .form(&[("token", revoked.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for n in 0..2 {
        let path = format!("/tickets/1/attachments/{n}");
        assert_eq!(h.get_with(&path, &kept).await.status(), 200);
    }

    let h = h.restart().await;
    let resp = h.get_tickets(&revoked).await;
    assert_eq!(resp.status(), 401);
    assert!(clear_context_header(&resp).contains("reason=revoked"));
    assert_eq!(h.get_tickets(&kept).await.status(), 200);
    let (_, shown) = h
        .api(Method::GET, &format!("/sessions/{kept_sid}"), None)
        .await;
    assert_eq!(shown["counters"]["objects_read"], 2, "{shown}");

    let (s, _) = h
        .api(
            Method::POST,
            "/agents/agent:durable/kill",
            Some(json!({ "reason": "drill" })),
        )
        .await;
    assert_eq!(s, 200);
    let h = h.restart().await;
    let (s, _) = h
        .api(Method::POST, "/agents/agent:durable/resume", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        h.get_tickets(&kept).await.status(),
        401,
        "a killed session stays dead after a restart and a resume"
    );
    let (fresh, _) = session(&h, "durable", &secret).await;
    assert_eq!(h.get_tickets(&fresh).await.status(), 200);
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_scopes_come_in_their_own_token_that_policy_decides() {
    let h = Harness::start("privilege").await;
    let policy_dir = h.data_dir.with_extension("policies");
    std::fs::write(
        policy_dir.join("writes.cedar"),
        r#"
@id("tickets.writers")
permit (principal, action == Palisade::Action::"write", resource == Palisade::Route::"tickets");
"#,
    )
    .unwrap();
    let (s, body) = h.api(Method::POST, "/policy/reload", None).await;
    assert_eq!(s, 200, "{body}");
    let secret = agent(&h, "split", |_| {}).await;
    let (read_token, sid) = session(&h, "split", &secret).await;
    assert_eq!(
        claims(&read_token)["scope"],
        "tickets:read",
        "no write scope by default"
    );

    // A read token cannot write, though the policy allows the write.
    let post = |token: String| {
        h.http
            .post(h.url("/tickets/3"))
            .bearer_auth(token)
            .json(&json!({ "note": "x" }))
            .send()
    };
    let resp = post(read_token.clone()).await.unwrap();
    assert_eq!(resp.status(), 403);
    let www = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        www.contains("insufficient_scope") && www.contains("tickets:write"),
        "{www}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "insufficient_scope");

    // Read and write never share a token.
    let (s, mixed) = h
        .token_request(
            "agent:split",
            &secret,
            &[("scope", "tickets:read tickets:write")],
        )
        .await;
    assert_eq!(s, 400, "{mixed}");
    assert_eq!(mixed["error"], "invalid_scope");
    assert!(
        mixed["error_description"]
            .as_str()
            .unwrap()
            .contains("never share a token")
    );

    // The separate request is decided by policy; here it passes and the write goes through.
    let writer = h
        .scoped_token("agent:split", &secret, "tickets:write", Some(&sid))
        .await;
    assert_eq!(claims(&writer)["sid"], sid, "same session");
    assert_eq!(post(writer).await.unwrap().status(), 200);

    // A policy that wants an approval first refuses the write token, naming itself.
    std::fs::write(
        policy_dir.join("approval.cedar"),
        r#"
@id("tickets.write-tokens-need-approval")
forbid (principal, action == Palisade::Action::"write_token", resource == Palisade::Route::"tickets")
unless { context.approval == "approved" };
"#,
    )
    .unwrap();
    let (s, body) = h.api(Method::POST, "/policy/reload", None).await;
    assert_eq!(s, 200, "{body}");
    let (s, refused) = h
        .token_request("agent:split", &secret, &[("scope", "tickets:write")])
        .await;
    assert_eq!(s, 400, "{refused}");
    assert!(
        refused["error_description"]
            .as_str()
            .unwrap()
            .contains("session_id"),
        "write scopes come inside a session: {refused}"
    );
    let (s, refused) = h
        .token_request(
            "agent:split",
            &secret,
            &[("scope", "tickets:write"), ("session_id", &sid)],
        )
        .await;
    assert_eq!(s, 403, "{refused}");
    assert_eq!(refused["error"], "access_denied");
    assert_eq!(
        refused["deciding_policies"],
        json!(["tickets.write-tokens-need-approval"])
    );
    // The read-only blast radius refuses it too, by itself.
    let ro = agent(&h, "ro", |a| a["blast_radius"] = json!({})).await;
    let (_, ro_sid) = session(&h, "ro", &ro).await;
    let (s, refused) = h
        .token_request(
            "agent:ro",
            &ro,
            &[("scope", "tickets:write"), ("session_id", &ro_sid)],
        )
        .await;
    assert_eq!(s, 403, "{refused}");
    let policies = refused["deciding_policies"].as_array().unwrap();
    assert!(
        policies.contains(&json!("palisade.blast-radius.action")),
        "{refused}"
    );
    let refusals = events(&h, "token.refused").await;
    assert!(refusals.len() >= 3, "refusals are audited");
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_limits_cap_responses_and_requests_in_flight() {
    let up = support::upstream().await;
    let extra = format!(
        "max_response_bytes = 100000\n\
         [routes.inspection]\nenabled = false\n\
         [[routes]]\nname = \"tiny\"\npath_prefix = \"/tiny\"\nupstream = \"http://{}\"\nmax_response_bytes = 10\n",
        up.addr
    );
    let h = Harness::start_with("resource-limits", &extra).await;
    let secret = agent(&h, "capped", |a| {
        a["allowed_resources"] = json!(["tickets", "tiny"]);
        a["max_concurrent_requests"] = json!(1);
    })
    .await;
    let (token, _) = session(&h, "capped", &secret).await;

    // A declared length over the cap: 502 before any byte is passed on.
    let resp = h.get_with("/tiny/1", &token).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream_response_too_large", "{body}");
    // A streamed body (192 KiB, no length) is cut off at the cap (100,000 bytes); inspection
    // is off on this route (an inspected body is read whole first, and refused whole).
    let resp = h.get_with("/tickets/1/stream", &token).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "the stream was cut at the cap");
    // Small answers pass.
    assert_eq!(h.get_tickets(&token).await.status(), 200);

    // One request in flight at a time: the second gets 429 with Retry-After while the first
    // (a 3 s upstream) runs, and passes again once it is done.
    let (http, url, t) = (h.http.clone(), h.url("/tickets/1/slow"), token.clone());
    let first = tokio::spawn(async move {
        let resp = http.get(url).bearer_auth(t).send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().len())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too_many_in_flight", "{body}");
    assert_eq!(body["limit"], 1);
    let (status, len) = first.await.unwrap();
    assert_eq!(status, 200);
    assert!(len > 0);
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    h.server.stop().await;
}
