//! Token service and verifier, over HTTP against the real server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signer, SigningKey};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::Harness;

struct Forge {
    h: Harness,
    kid: String,
    key: SigningKey,
    public: Vec<u8>,
    claims: Value,
}

async fn forge(name: &str) -> Forge {
    let h = Harness::start(name).await;
    let secret = h.owner_and_agent("target").await;
    let good = h.token_for("agent:target", &secret).await;
    assert_eq!(
        h.get_tickets(&good).await.status(),
        200,
        "a genuine token must pass"
    );
    let rec = h
        .server
        .app
        .store
        .signing_keys()
        .unwrap()
        .into_iter()
        .find(|k| k.retired_at.is_none())
        .unwrap();
    let key = SigningKey::from_bytes(&rec.private_key.clone().try_into().unwrap());
    let payload = good.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
    Forge {
        h,
        kid: rec.kid,
        key,
        public: rec.public_key,
        claims,
    }
}

impl Forge {
    fn header(&self) -> Value {
        json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": self.kid })
    }

    fn sign_raw(&self, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let sig = self.key.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    }

    fn sign(&self, header: Value, claims: Value) -> String {
        self.sign_raw(&header.to_string(), &claims.to_string())
    }

    async fn expect_401(self, token: &str, reason: &str) {
        let resp = self.h.get_tickets(token).await;
        assert_eq!(resp.status(), 401);
        let www = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(www.contains(reason), "expected `{reason}` in {www}");
        assert_eq!(
            self.h.upstream.seen.lock().unwrap().len(),
            1,
            "a forged token reached the upstream"
        );
        self.h.server.stop().await;
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_expired() {
    let f = forge("expired").await;
    let mut c = f.claims.clone();
    c["exp"] = json!(now() - 120);
    c["iat"] = json!(now() - 1000);
    let t = f.sign(f.header(), c);
    f.expect_401(&t, "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_nbf_in_the_future() {
    let f = forge("nbf").await;
    let mut c = f.claims.clone();
    c["nbf"] = json!(now() + 600);
    let t = f.sign(f.header(), c);
    f.expect_401(&t, "not yet valid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_wrong_audience() {
    let f = forge("aud").await;
    let mut c = f.claims.clone();
    c["aud"] = json!("https://elsewhere.example");
    let t = f.sign(f.header(), c);
    f.expect_401(&t, "another audience").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_wrong_issuer() {
    let f = forge("iss").await;
    let mut c = f.claims.clone();
    c["iss"] = json!("https://evil.example");
    let t = f.sign(f.header(), c);
    f.expect_401(&t, "another issuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_altered_payload() {
    let f = forge("altered").await;
    let good = f.sign(f.header(), f.claims.clone());
    let mut c = f.claims.clone();
    c["allowed_resources"] = json!(["tickets", "payroll"]);
    let parts: Vec<&str> = good.split('.').collect();
    let t = format!("{}.{}.{}", parts[0], B64.encode(c.to_string()), parts[2]);
    f.expect_401(&t, "signature is invalid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_stripped_signature() {
    let f = forge("stripped").await;
    let good = f.sign(f.header(), f.claims.clone());
    let t = format!("{}.", good.rsplit_once('.').unwrap().0);
    f.expect_401(&t, "signature is invalid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_alg_none_in_any_case() {
    let f = forge("none").await;
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({ "alg": alg, "typ": "at+jwt", "kid": f.kid });
        let t = format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(f.claims.to_string())
        );
        let resp = f.h.get_tickets(&t).await;
        assert_eq!(resp.status(), 401, "alg {alg}");
        let www = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(www.contains("algorithm is not accepted"), "{alg}: {www}");
    }
    let t = f.sign(
        json!({ "alg": "none", "typ": "at+jwt", "kid": f.kid }),
        f.claims.clone(),
    );
    f.expect_401(&t, "algorithm is not accepted").await;
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_hs256_signed_with_our_public_key() {
    let f = forge("hs256").await;
    let header = json!({ "alg": "HS256", "typ": "at+jwt", "kid": f.kid });
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(f.claims.to_string())
    );
    // Both the raw key and its JWK text are classic confusion inputs.
    let jwks: Value =
        f.h.http
            .get(f.h.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    for key in [f.public.clone(), jwks["keys"][0].to_string().into_bytes()] {
        let t = format!(
            "{input}.{}",
            B64.encode(hmac_sha256(&key, input.as_bytes()))
        );
        let resp = f.h.get_tickets(&t).await;
        assert_eq!(resp.status(), 401);
    }
    let t = format!(
        "{input}.{}",
        B64.encode(hmac_sha256(&f.public, input.as_bytes()))
    );
    f.expect_401(&t, "algorithm is not accepted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_unknown_kid() {
    let f = forge("kid").await;
    let t = f.sign(
        json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": "not-ours" }),
        f.claims.clone(),
    );
    f.expect_401(&t, "key id is unknown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_key_pointing_headers_without_fetching() {
    let f = forge("jku").await;
    // A listener that would notice any fetch.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_url = format!("http://{}/keys", trap.local_addr().unwrap());
    for (name, value) in [
        ("jku", json!(trap_url)),
        ("x5u", json!(trap_url)),
        (
            "jwk",
            json!({ "kty": "OKP", "crv": "Ed25519", "x": B64.encode(&f.public) }),
        ),
    ] {
        let mut header = f.header();
        header[name] = value;
        let t = f.sign(header, f.claims.clone());
        let resp = f.h.get_tickets(&t).await;
        assert_eq!(resp.status(), 401, "{name}");
        let www = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(www.contains(&format!("`{name}`")), "{name}: {www}");
    }
    let fetched = tokio::time::timeout(std::time::Duration::from_millis(200), trap.accept()).await;
    assert!(
        fetched.is_err(),
        "the server fetched a key URL from a token header"
    );
    let mut header = f.header();
    header["jku"] = json!(trap_url);
    let t = f.sign(header, f.claims.clone());
    f.expect_401(&t, "jku").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_typ_other_than_at_jwt() {
    let f = forge("typ").await;
    let t = f.sign(
        json!({ "alg": "EdDSA", "typ": "JWT", "kid": f.kid }),
        f.claims.clone(),
    );
    f.expect_401(&t, "type is not at+jwt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_tokens_over_8_kib() {
    let f = forge("large").await;
    let mut c = f.claims.clone();
    c["padding"] = json!("x".repeat(9000));
    let t = f.sign(f.header(), c);
    assert!(t.len() > 8192);
    f.expect_401(&t, "larger than 8192").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_duplicate_claims() {
    let f = forge("dup").await;
    let body = f.claims.to_string();
    let payload = format!(
        "{},\"sub\":\"agent:someone-else\"}}",
        body.trim_end_matches('}')
    );
    let t = f.sign_raw(&f.header().to_string(), &payload);
    f.expect_401(&t, "repeats the member `sub`").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_response_carries_rfc9068_and_agent_claims() {
    let h = Harness::start("claims").await;
    let secret = h.owner_and_agent("claims").await;
    let resp = h
        .http
        .post(h.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "agent:claims"),
            ("client_secret", &secret),
            ("scope", "tickets:read"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["scope"], "tickets:read");
    let token = body["access_token"].as_str().unwrap();
    let header: Value =
        serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "EdDSA");
    let c: Value =
        serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(c["iss"], h.server.url());
    assert_eq!(c["sub"], "agent:claims");
    assert_eq!(c["client_id"], "agent:claims");
    assert_eq!(c["aud"], h.server.url());
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 900);
    assert_eq!(c["agent_purpose"], "pull-request-review");
    assert_eq!(c["model"], "anthropic/claude-opus-4@2026-05-01");
    assert_eq!(c["owner"], "human:alice");
    assert_eq!(c["allowed_resources"], json!(["tickets"]));
    assert_eq!(c["max_files_per_session"], 50);
    assert_eq!(c["data_egress_allowed"], false);
    assert_eq!(c["session_ttl_minutes"], 30);
    assert!(c["jti"].as_str().unwrap().len() >= 16);

    // Metadata and JWKS describe the same issuer and key.
    let meta: Value = h
        .http
        .get(h.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], h.server.url());
    assert_eq!(
        meta["token_endpoint"],
        format!("{}/oauth2/token", h.server.url())
    );
    let jwks: Value = h
        .http
        .get(h.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], header["kid"]);
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    h.server.stop().await;
}

/// One token request: Basic credentials and form pairs, or a raw body with its content type.
enum Body<'a> {
    Form(&'a [(&'a str, &'a str)]),
    Raw(&'a str, &'a str),
}

async fn token_request(
    h: &Harness,
    client: &str,
    secret: &str,
    body: Body<'_>,
) -> (u16, Value, Option<String>) {
    let req = h
        .http
        .post(h.url("/oauth2/token"))
        .basic_auth(client, Some(secret));
    let req = match body {
        Body::Form(pairs) => req.form(pairs),
        Body::Raw(content_type, text) => req
            .header("content-type", content_type)
            .body(text.to_string()),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, resp.json().await.unwrap_or(Value::Null), www)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_errors_follow_rfc6749() {
    let h = Harness::start("oauth-errors").await;
    let secret = h.owner_and_agent("client").await;
    let own_url = h.server.url();
    let cc: &[(&str, &str)] = &[("grant_type", "client_credentials")];
    let cases: Vec<(&str, &str, Body<'_>, u16, &str)> = vec![
        (
            "agent:client",
            "pls_wrong",
            Body::Form(cc),
            401,
            "invalid_client",
        ),
        (
            "agent:nobody",
            &secret,
            Body::Form(cc),
            401,
            "invalid_client",
        ),
        (
            "agent:client",
            &secret,
            Body::Form(&[("grant_type", "password")]),
            400,
            "unsupported_grant_type",
        ),
        (
            "agent:client",
            &secret,
            Body::Form(&[("scope", "x")]),
            400,
            "invalid_request",
        ),
        (
            "agent:client",
            &secret,
            Body::Raw("application/json", "{\"grant_type\":1"),
            400,
            "invalid_request",
        ),
        (
            "agent:client",
            &secret,
            Body::Raw(
                "application/x-www-form-urlencoded",
                "grant_type=client_credentials&grant_type=client_credentials",
            ),
            400,
            "invalid_request",
        ),
        (
            "agent:client",
            &secret,
            Body::Form(&[("grant_type", "client_credentials"), ("scope", "admin:all")]),
            400,
            "invalid_scope",
        ),
        (
            "agent:client",
            &secret,
            Body::Form(&[
                ("grant_type", "client_credentials"),
                ("resource", "https://payroll.example/api"),
            ]),
            400,
            "invalid_target",
        ),
        (
            "agent:client",
            &secret,
            Body::Form(&[
                ("grant_type", "client_credentials"),
                ("resource", "not a uri"),
            ]),
            400,
            "invalid_target",
        ),
    ];
    for (client, secret, body, status, error) in cases {
        let (s, b, www) = token_request(&h, client, secret, body).await;
        assert_eq!(
            (s, b["error"].as_str()),
            (status, Some(error)),
            "{client}: {b}"
        );
        assert!(
            b["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{b}"
        );
        // RFC 6749 §5.2: invalid_client with HTTP Basic answers 401 with WWW-Authenticate.
        assert_eq!(www.is_some(), status == 401, "{client}: {www:?}");
    }

    // RFC 8707: a known resource becomes the audience.
    let (s, b, _) = token_request(
        &h,
        "agent:client",
        &secret,
        Body::Form(&[("grant_type", "client_credentials"), ("resource", &own_url)]),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // Suspended clients get no token.
    h.api(Method::POST, "/agents/client/suspend", None).await;
    let (s, b, _) = token_request(&h, "agent:client", &secret, Body::Form(cc)).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_client")));
    assert!(
        b["error_description"]
            .as_str()
            .unwrap()
            .contains("suspended")
    );
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_overlap_then_expiry() {
    let h = Harness::start("rotate-secret").await;
    let old = h.owner_and_agent("rot").await;
    let (s, b) = h
        .api(
            Method::POST,
            "/agents/rot/rotate-secret",
            Some(json!({ "overlap_seconds": 3600 })),
        )
        .await;
    assert_eq!(s, 200);
    let new = b["client_secret"].as_str().unwrap().to_string();
    h.token_for("agent:rot", &old).await;
    h.token_for("agent:rot", &new).await;
    let (s, _) = h
        .api(
            Method::POST,
            "/agents/rot/rotate-secret",
            Some(json!({ "overlap_seconds": 0 })),
        )
        .await;
    assert_eq!(s, 200);
    let cc: &[(&str, &str)] = &[("grant_type", "client_credentials")];
    let (s, b, _) = token_request(&h, "agent:rot", &new, Body::Form(cc)).await;
    assert_eq!(s, 401, "a secret past its overlap still works: {b}");
    let (s, _, _) = token_request(&h, "agent:rot", &old, Body::Form(cc)).await;
    assert_eq!(s, 401, "the first secret outlived two rotations");
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_keeps_old_tokens_valid_and_publishes_both_keys() {
    let h = Harness::start("rotate-keys").await;
    let secret = h.owner_and_agent("keys").await;
    let before = h.token_for("agent:keys", &secret).await;
    let (s, b) = h.api(Method::POST, "/keys/rotate", None).await;
    assert_eq!(s, 200);
    let new_kid = b["active_kid"].as_str().unwrap().to_string();
    let after = h.token_for("agent:keys", &secret).await;
    let kid_of = |t: &str| -> String {
        let header: Value =
            serde_json::from_slice(&B64.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        header["kid"].as_str().unwrap().to_string()
    };
    assert_eq!(kid_of(&after), new_kid);
    assert_ne!(kid_of(&before), new_kid);
    assert_eq!(h.get_tickets(&before).await.status(), 200);
    assert_eq!(h.get_tickets(&after).await.status(), 200);
    let jwks: Value = h
        .http
        .get(h.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_introspection() {
    let h = Harness::start("revoke").await;
    let secret = h.owner_and_agent("rev").await;
    let token = h.token_for("agent:rev", &secret).await;
    let introspect = |t: String| {
        h.http
            .post(h.url("/oauth2/introspect"))
            .bearer_auth(&h.admin)
            .form(&[("token", t)])
            .send()
    };
    let v: Value = introspect(token.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["active"], true);
    assert_eq!(v["sub"], "agent:rev");
    // Unauthenticated introspection is refused.
    let resp = h
        .http
        .post(h.url("/oauth2/introspect"))
        .form(&[("token", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // The client revokes its own token.
    let resp = h
        .http
        .post(h.url("/oauth2/revoke"))
        .basic_auth("agent:rev", Some(&secret))
        .form(&[("token", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = introspect(token.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({ "active": false }));
    let resp = h.get_tickets(&token).await;
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("revoked")
    );
    // Revoking garbage is still 200 (RFC 7009 §2.2).
    let resp = h
        .http
        .post(h.url("/oauth2/revoke"))
        .basic_auth("agent:rev", Some(&secret))
        .form(&[("token", "garbage")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    h.server.stop().await;
}
