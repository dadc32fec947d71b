//! MCP `tools/call` round trips through Palisade versus straight to the same kind of upstream,
//! in one run. The upstream is the test suite's stdio echo server (Python, standard library);
//! "direct" drives it with the same stdio client Palisade uses upstream, so the difference is
//! what the gateway adds: HTTP, token check, MCP session, Cedar decision, durable audit.
//!
//! `cargo bench -p palisade --bench mcp` (results in BENCHMARKS.md)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The allocator the `palisade` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use palisade_config::Config;
use palisade_mcp::stdio::StdioServer;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const CALLS: usize = 3_000;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn report(label: &str, mut lat: Vec<Duration>, wall: Duration) -> (Duration, Duration) {
    lat.sort_unstable();
    let (p50, p99) = (pct(&lat, 0.50), pct(&lat, 0.99));
    println!(
        "{label}: {} calls, p50 {p50:?}, p99 {p99:?}, p99.9 {:?}, {:.0} calls/s",
        lat.len(),
        pct(&lat, 0.999),
        lat.len() as f64 / wall.as_secs_f64()
    );
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/mutable_server.py");
    let dir = std::env::temp_dir().join(format!("palisade-bench-mcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let desc = dir.join("desc.txt");
    std::fs::write(&desc, "Echoes text back.").unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[mcp.servers]]\nname = \"echo\"\ncommand = \"python3\"\nargs = [\"{script}\", \"{}\"]\n",
        dir.join("data").display(),
        desc.display()
    );
    let config = Config::from_toml(&toml, "bench.toml").unwrap();
    let upstream_config = config.mcp.servers[0].clone();
    let server = palisade_server::start(config, Default::default())
        .await
        .unwrap();
    let base = server.url();
    let admin = std::fs::read_to_string(&server.admin_token_path).unwrap();
    let http = reqwest::Client::new();
    let api = |path: &str, body: Value| {
        http.post(format!("{base}/api/v1{path}"))
            .bearer_auth(admin.trim())
            .json(&body)
            .send()
    };
    api("/humans", json!({ "id": "bench" })).await.unwrap();
    let created: Value = api(
        "/agents",
        json!({
            "id": "agent:bench", "owner": "human:bench", "purpose": "bench", "purpose_tag": "bench",
            "model_provider": "p", "model": "m", "model_version": "1",
            "allowed_resources": ["echo"], "max_session_minutes": 240,
        }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let secret = created["credentials"]["client_secret"].as_str().unwrap();
    let mcp = format!("{base}/mcp");
    let token: Value = http
        .post(format!("{base}/oauth2/token"))
        .basic_auth("agent:bench", Some(secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("resource", mcp.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    let init = http
        .post(&mcp)
        .bearer_auth(&token)
        .json(&json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": { "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": { "name": "bench", "version": "1" } } }))
        .send()
        .await
        .unwrap();
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let call = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": "echo__echo", "arguments": { "text": "ping" } } });

    // Direct: Palisade's own stdio client to a separate instance of the same server.
    let direct = StdioServer::new(upstream_config);
    for _ in 0..100 {
        direct
            .request(
                "tools/call",
                json!({ "name": "echo", "arguments": { "text": "ping" } }),
            )
            .await
            .unwrap();
    }
    let mut lat = Vec::with_capacity(CALLS);
    let t0 = Instant::now();
    for _ in 0..CALLS {
        let t = Instant::now();
        direct
            .request(
                "tools/call",
                json!({ "name": "echo", "arguments": { "text": "ping" } }),
            )
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    let (d50, d99) = report("direct (stdio)", lat, t0.elapsed());

    // Through Palisade: HTTP, token, MCP session, Cedar decision, durable audit, stdio.
    for _ in 0..100 {
        http.post(&mcp)
            .bearer_auth(&token)
            .header("mcp-session-id", &sid)
            .json(&call)
            .send()
            .await
            .unwrap();
    }
    let mut lat = Vec::with_capacity(CALLS);
    let t0 = Instant::now();
    for _ in 0..CALLS {
        let t = Instant::now();
        let resp: Value = http
            .post(&mcp)
            .bearer_auth(&token)
            .header("mcp-session-id", &sid)
            .json(&call)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(resp["result"]["content"][0]["text"], "ping", "{resp}");
        lat.push(t.elapsed());
    }
    let (g50, g99) = report("through Palisade", lat, t0.elapsed());
    println!(
        "added by Palisade: p50 {:?}, p99 {:?}",
        g50.saturating_sub(d50),
        g99.saturating_sub(d99)
    );

    // Concurrency: 8 calls in flight through Palisade.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, mcp, token, sid, call) = (
            http.clone(),
            mcp.clone(),
            token.clone(),
            sid.clone(),
            call.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..CALLS / 8 {
                http.post(&mcp)
                    .bearer_auth(&token)
                    .header("mcp-session-id", &sid)
                    .json(&call)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "through Palisade, 8 in flight: {:.0} calls/s",
        (CALLS / 8 * 8) as f64 / t0.elapsed().as_secs_f64()
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
