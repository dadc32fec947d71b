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
    exchange_for(h, agent, secret, subject, &[]).await
}

async fn exchange_for(
    h: &Harness,
    agent: &str,
    secret: &str,
    subject: &str,
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let mut form = vec![
        ("grant_type", EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", ACCESS),
    ];
    form.extend_from_slice(extra);
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
    assert!(
        claims(&alice_token)["aud"]
            .as_str()
            .unwrap()
            .ends_with("/oauth2/token")
    );
    assert_eq!(
        h.get_tickets(&alice_token).await.status(),
        401,
        "a human's subject token is no API token"
    );

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
    let planner_sid = c["sid"].as_str().unwrap().to_string();
    let (s, writer) = exchange_for(
        &h,
        "agent:planner",
        &planner,
        &alice_token,
        &[("scope", "tickets:write"), ("session_id", &planner_sid)],
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
    // Every actor of the chain is checked: suspending the planner stops the coder's token.
    let (s, _) = h
        .api(
            Method::POST,
            "/agents/planner/suspend",
            Some(json!({ "reason": "drill" })),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h.get_tickets(&coder_token).await.status(), 401);
    let (s, _) = h.api(Method::POST, "/agents/planner/resume", None).await;
    assert_eq!(s, 200);
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
    assert_eq!(body["error"], "invalid_request");
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

/// A real OpenID Connect provider for the test: a JWKS endpoint over HTTP on loopback with an
/// RSA key (RS256) and an Ed25519 key (EdDSA), and ID tokens signed with them here.
struct TestIdp {
    issuer: String,
    rsa: rsa::pkcs1v15::SigningKey<sha2::Sha256>,
    ed: ed25519_dalek::SigningKey,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TestIdp {
    async fn start() -> Self {
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let pem = include_str!("fixtures/test-only-idp-rsa-key.pem");
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
        let ed = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let jwks = json!({ "keys": [
            {
                "kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
                "n": b64.encode(private.n().to_bytes_be()),
                "e": b64.encode(private.e().to_bytes_be()),
            },
            {
                "kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "use": "sig", "alg": "EdDSA",
                "x": b64.encode(ed.verifying_key().as_bytes()),
            },
        ]});
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = fetches.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { axum::Json(jwks) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            issuer: format!("http://{addr}"),
            rsa: rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(private),
            ed,
            fetches,
        }
    }

    /// An ID token with `claims` over the defaults, signed with `alg` (`RS256` or `EdDSA`).
    fn id_token(&self, alg: &str, claims: Value) -> String {
        use rsa::signature::{SignatureEncoding, Signer};
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut body = json!({
            "iss": self.issuer, "aud": "palisade-client", "sub": "00u-alice",
            "email": "Alice@Corp.example", "email_verified": true,
            "iat": now, "exp": now + 300,
        });
        for (k, v) in claims.as_object().unwrap() {
            body[k] = v.clone();
        }
        let kid = if alg == "EdDSA" { "ed-1" } else { "rsa-1" };
        let header = json!({ "alg": alg, "typ": "JWT", "kid": kid });
        let input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(body.to_string())
        );
        let signature = match alg {
            "EdDSA" => ed25519_dalek::Signer::sign(&self.ed, input.as_bytes())
                .to_bytes()
                .to_vec(),
            _ => self.rsa.sign(input.as_bytes()).to_vec(),
        };
        format!("{input}.{}", b64.encode(signature))
    }
}

const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

async fn exchange_id(h: &Harness, agent: &str, secret: &str, id_token: &str) -> (u16, Value) {
    let resp = h
        .http
        .post(h.url("/oauth2/token"))
        .basic_auth(agent, Some(secret))
        .form(&[
            ("grant_type", EXCHANGE),
            ("subject_token", id_token),
            ("subject_token_type", ID_TOKEN),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_of_an_external_provider_delegate_through_its_jwks() {
    let idp = TestIdp::start().await;
    let extra = format!(
        "[[oauth.identity_providers]]\nname = \"corp\"\nissuer = \"{0}\"\njwks_uri = \"{0}/jwks.json\"\naudience = \"palisade-client\"\n",
        idp.issuer
    );
    let h = Harness::start_with("oidc", &extra).await;
    let (s, _) = h
        .api(
            Method::POST,
            "/humans",
            Some(json!({ "id": "alice", "email": "alice@corp.example" })),
        )
        .await;
    assert_eq!(s, 201);
    let planner = register(&h, "planner", "human:alice").await;

    // RS256 and EdDSA ID tokens both verify through the JWKS; the email names the human.
    for alg in ["RS256", "EdDSA"] {
        let token = idp.id_token(alg, json!({}));
        let (s, body) = exchange_id(&h, "agent:planner", &planner, &token).await;
        assert_eq!(s, 200, "{alg}: {body}");
        let c = claims(body["access_token"].as_str().unwrap());
        assert_eq!(c["sub"], "human:alice");
        assert_eq!(c["act"], json!({ "sub": "agent:planner" }));
        assert!(c["exp"].as_i64().unwrap() <= claims(&token)["exp"].as_i64().unwrap());
        let resp = h.get_tickets(body["access_token"].as_str().unwrap()).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        idp.fetches.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the JWKS is fetched once and cached"
    );

    // Everything that must not verify does not, with the reason.
    let now = claims(&idp.id_token("RS256", json!({})))["iat"]
        .as_i64()
        .unwrap();
    let cases = [
        (
            idp.id_token("RS256", json!({ "aud": "someone-else" })),
            "does not verify",
        ),
        (
            idp.id_token("RS256", json!({ "exp": now - 3600 })),
            "expired",
        ),
        (
            idp.id_token("RS256", json!({ "iss": "https://evil.example" })),
            "not a configured identity provider",
        ),
        (
            idp.id_token("EdDSA", json!({ "email_verified": false })),
            "not verified",
        ),
        (
            idp.id_token("RS256", json!({ "email": "mallory@corp.example" })),
            "no registered human",
        ),
    ];
    for (token, says) in cases {
        let (s, body) = exchange_id(&h, "agent:planner", &planner, &token).await;
        assert_eq!(s, 400, "{says}: {body}");
        assert_eq!(body["error"], "invalid_request");
        let text = body["error_description"].as_str().unwrap();
        assert!(text.contains(says), "expected `{says}` in: {text}");
    }
    // A signature from the wrong key (EdDSA signature under the RSA key's kid).
    let good = idp.id_token("RS256", json!({}));
    let forged = {
        let other = idp.id_token("EdDSA", json!({}));
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[2] = other.split('.').nth(2).unwrap();
        parts.join(".")
    };
    let (s, body) = exchange_id(&h, "agent:planner", &planner, &forged).await;
    assert_eq!(s, 400, "{body}");
    // A symmetric algorithm is refused outright.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let hs = format!(
        "{}.{}.{}",
        b64.encode(json!({ "alg": "HS256", "typ": "JWT" }).to_string()),
        good.split('.').nth(1).unwrap(),
        b64.encode(b"x")
    );
    let (s, body) = exchange_id(&h, "agent:planner", &planner, &hs).await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("not accepted"),
        "{body}"
    );
    h.server.stop().await;
}
