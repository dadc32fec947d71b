//! Lease issue rate for a static vault secret over HTTP (the whole path: agent token, Cedar
//! decision, decryption, durable audit event), with 64 requests in flight for five seconds;
//! and, when `PALISADE_TEST_PG_URL` names a PostgreSQL admin connection, how long a dynamic
//! database lease takes to issue (a login role created per lease).
//!
//! `cargo bench -p palisade --bench leases` (results in BENCHMARKS.md)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use palisade_config::Config;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::temp_dir().join(format!("palisade-bench-leases-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/leases.cedar"),
        "@id(\"bench.leases\")\npermit (principal is Palisade::Agent, action == Palisade::Action::\"credential\", resource in Palisade::Route::\"vault\");\n",
    )
    .unwrap();
    let pg = std::env::var("PALISADE_TEST_PG_URL").ok();
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[policy]\ndir = \"{}\"\n",
        dir.join("data").display(),
        dir.join("policies").display()
    );
    if let Some(url) = &pg {
        toml.push_str(&format!(
            "[[vault.databases]]\nname = \"bench\"\nurl = \"{url}\"\n[vault.databases.roles.reader]\ncreation = [\"CREATE ROLE {{{{name}}}} LOGIN PASSWORD {{{{password}}}} VALID UNTIL {{{{expiry}}}}\"]\n"
        ));
    }
    let config = Config::from_toml(&toml, "bench.toml").unwrap();
    let server = palisade_server::start(config, Default::default())
        .await
        .unwrap();
    let base = server.url();
    let admin = std::fs::read_to_string(&server.admin_token_path).unwrap();
    let http = reqwest::Client::new();
    let api = |method: reqwest::Method, path: &str, body: Value| {
        http.request(method, format!("{base}/api/v1{path}"))
            .bearer_auth(admin.trim())
            .json(&body)
            .send()
    };
    api(reqwest::Method::POST, "/humans", json!({ "id": "bench" }))
        .await
        .unwrap();
    api(
        reqwest::Method::PUT,
        "/secrets/bench/token",
        json!({ "value": "bench-secret-value-0123456789" }),
    )
    .await
    .unwrap();
    let created: Value = api(
        reqwest::Method::POST,
        "/agents",
        json!({
            "id": "agent:bench", "owner": "human:bench", "purpose": "bench", "purpose_tag": "bench",
            "model_provider": "p", "model": "m", "model_version": "1",
            "allowed_resources": ["vault"], "max_session_minutes": 240,
            "blast_radius": { "max_classification": "restricted" },
        }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let secret = created["credentials"]["client_secret"].as_str().unwrap();
    let audience = format!("{base}/vault");
    let token: Value = http
        .post(format!("{base}/oauth2/token"))
        .basic_auth("agent:bench", Some(secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("resource", audience.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = Arc::new(token["access_token"].as_str().unwrap().to_string());
    let url = Arc::new(format!("{base}/api/v1/leases"));

    // Static secret leases, 64 in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (http, token, url, stop) = (http.clone(), token.clone(), url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let resp = http
                    .post(url.as_str())
                    .bearer_auth(token.as_str())
                    .json(&json!({ "secret": "bench/token", "ttl_seconds": 60 }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let _ = resp.bytes().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    lat.sort_unstable();
    println!(
        "static leases: {} in {:.1} s = {:.0} leases/s, p50 {:?}, p99 {:?} (64 in flight, each audited durably)",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.50),
        pct(&lat, 0.99)
    );

    if pg.is_some() {
        let mut lat = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let resp = http
                .post(url.as_str())
                .bearer_auth(token.as_str())
                .json(&json!({ "database": "bench", "role": "reader", "ttl_seconds": 60 }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let _ = resp.bytes().await;
            lat.push(t.elapsed());
        }
        lat.sort_unstable();
        println!(
            "database leases: 50 one after another, p50 {:?}, p99 {:?} (CREATE ROLE + GRANTs in one transaction)",
            pct(&lat, 0.50),
            pct(&lat, 0.99)
        );
    } else {
        println!("database leases: skipped (PALISADE_TEST_PG_URL is not set)");
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
