//! Human delegation (RFC 8693 token exchange), end to end over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};
use support::{Harness, agent_body};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn register(h: &Harness, slug: &str, owner: &str) -> String {
    let mut body = agent_body(slug);
    body["owner"] = json!(owner);
    let (s, created) = h.api(Method::POST, "/agents", Some(body)).await;
    assert_eq!(s, 201, "{created}");
    created["credentials"]["client_secret"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn exchange(h: &Harness, agent: &str, secret: &str, subject: &str) -> (u16, Value) {
    exchange_for(h, agent, secret, subject, None).await
}

async fn exchange_for(
    h: &Harness,
    agent: &str,
    secret: &str,
    subject: &str,
    scope: Option<&str>,
) -> (u16, Value) {
    let mut form = vec![
        ("grant_type", EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", ACCESS),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let resp = h
        .http
        .post(h.url("/oauth2/token"))
        .basic_auth(agent, Some(secret))
        .form(&form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_builds_the_actor_chain_that_policies_and_audit_see() {
    let h = Harness::start("delegation").await;
    std::fs::write(
        h.data_dir.with_extension("policies").join("delegated.cedar"),
        r#"
@id("tickets.writes-for-a-human")
permit (principal is Palisade::Agent, action == Palisade::Action::"write", resource == Palisade::Route::"tickets")
when { context has initiating_human };
"#,
    )
    .unwrap();
    let (s, body) = h.api(Method::POST, "/policy/reload", None).await;
    assert_eq!(s, 200, "{body}");
    for (id, email) in [("alice", "alice@example.com"), ("bob", "bob@example.com")] {
        let (s, _) = h
            .api(
                Method::POST,
                "/humans",
                Some(json!({ "id": id, "email": email })),
            )
            .await;
        assert_eq!(s, 201);
    }
    let planner = register(&h, "planner", "human:alice").await;
    let coder = register(&h, "coder", "human:bob").await;
    let rogue = register(&h, "rogue", "human:bob").await;

    let (s, minted) = h.api(Method::POST, "/humans/alice/token", None).await;
    assert_eq!(s, 200, "{minted}");
    let alice_token = minted["access_token"].as_str().unwrap().to_string();
    assert_eq!(claims(&alice_token)["sub"], "human:alice");

    // alice owns the planner, so it may act for her.
    let (s, delegated) = exchange(&h, "agent:planner", &planner, &alice_token).await;
    assert_eq!(s, 200, "{delegated}");
    assert_eq!(delegated["issued_token_type"], ACCESS);
    let planner_token = delegated["access_token"].as_str().unwrap().to_string();
    let c = claims(&planner_token);
    assert_eq!(c["sub"], "human:alice");
    assert_eq!(c["act"], json!({ "sub": "agent:planner" }));
    assert_eq!(c["client_id"], "agent:planner");
    assert!(c["sid"].as_str().unwrap().starts_with("ses_"));
    assert!(c["exp"].as_i64() <= claims(&alice_token)["exp"].as_i64());

    // Policies see the initiating human: a delegated write token may write, the agent's own
    // write token not (both asked for on their own: read and write never share a token).
    let (s, writer) = exchange_for(
        &h,
        "agent:planner",
        &planner,
        &alice_token,
        Some("tickets:write"),
    )
    .await;
    assert_eq!(s, 200, "{writer}");
    let planner_writer = writer["access_token"].as_str().unwrap().to_string();
    assert_eq!(claims(&planner_writer)["scope"], "tickets:write");
    assert_eq!(claims(&planner_token)["scope"], "tickets:read");
    let post = |token: String| {
        h.http
            .post(h.url("/tickets/9"))
            .bearer_auth(token)
            .json(&json!({ "note": "from alice" }))
            .send()
    };
    assert_eq!(post(planner_writer).await.unwrap().status(), 200);
    let own = h
        .scoped_token("agent:planner", &planner, "tickets:write", None)
        .await;
    let resp = post(own).await.unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["deciding_policies"], json!(["palisade.default-deny"]));

    // Agent-to-agent: the coder acts on the planner's delegated token once alice allows it.
    let (s, refused) = exchange(&h, "agent:coder", &coder, &planner_token).await;
    assert_eq!(s, 400, "{refused}");
    assert!(
        refused["error_description"]
            .as_str()
            .unwrap()
            .contains("may_act"),
        "{refused}"
    );
    let (s, body) = h
        .api(
            Method::PATCH,
            "/humans/alice",
            Some(json!({ "may_act": ["agent:coder"] })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, chained) = exchange(&h, "agent:coder", &coder, &planner_token).await;
    assert_eq!(s, 200, "{chained}");
    let coder_token = chained["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        claims(&coder_token)["act"],
        json!({ "sub": "agent:coder", "act": { "sub": "agent:planner" } })
    );
    assert_eq!(h.get_tickets(&coder_token).await.status(), 200);

    // Audit: the exchange and the gateway call carry the human and the whole chain.
    let (_, all) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    let events: Vec<Value> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["event"].clone())
        .collect();
    let chain = json!({ "initiating_human": "human:alice", "actor_chain": ["agent:coder", "agent:planner"] });
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "token.issued" && e["delegation"] == chain),
        "exchange audited with the chain"
    );
    let call = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "gateway.decision")
        .unwrap();
    assert_eq!(call["delegation"], chain);
    assert_eq!(call["principal"]["id"], "agent:coder");

    // Refusals: an agent alice does not allow, an agent's own token as the subject, a bad type.
    let (s, body) = exchange(&h, "agent:rogue", &rogue, &alice_token).await;
    assert_eq!(s, 400);
    assert_eq!(body["error"], "invalid_grant");
    let rogue_own = h.token_for("agent:rogue", &rogue).await;
    let (s, body) = exchange(&h, "agent:planner", &planner, &rogue_own).await;
    assert_eq!(s, 400);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("not a human"),
        "{body}"
    );
    let resp = h
        .http
        .post(h.url("/oauth2/token"))
        .basic_auth("agent:planner", Some(&planner))
        .form(&[
            ("grant_type", EXCHANGE),
            ("subject_token", alice_token.as_str()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:saml2",
            ),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Withdrawing consent stops the chain at the next request, not at token expiry.
    let out = h.cli(&["human", "update", "alice", "--set", r#"{"may_act":[]}"#]);
    assert!(out.status.success(), "{out:?}");
    let resp = h.get_tickets(&coder_token).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no longer allows"),
        "{body}"
    );
    // Suspending the human stops every token acting for her.
    let (s, _) = h
        .api(
            Method::POST,
            "/humans/alice/suspend",
            Some(json!({ "reason": "left" })),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h.get_tickets(&planner_token).await.status(), 401);
    h.server.stop().await;
}
