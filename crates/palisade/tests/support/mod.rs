//! Test harness: the real server on port 0 with a real upstream HTTP server, over real sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use palisade_config::Config;
use palisade_server::{RunningServer, StartOptions};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// Documents of the test upstream's `/docs/` store, shared by every test upstream of a test
/// binary (tests use distinct names).
type Docs = std::collections::HashMap<String, (String, Vec<u8>)>;
static DOCS: std::sync::LazyLock<Mutex<Docs>> = std::sync::LazyLock::new(Mutex::default);

/// Puts a document into the test upstream's store (as if someone outside Palisade wrote it).
pub fn put_doc(name: &str, content_type: &str, body: &str) {
    DOCS.lock().unwrap().insert(
        name.to_string(),
        (content_type.to_string(), body.as_bytes().to_vec()),
    );
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// A real HTTP upstream that records every request and answers JSON. Paths ending in `/slow`
/// answer after 3 s; paths ending in `/stream` answer 192 KiB in three chunks without a length;
/// paths under `/docs/` are a document store (PUT keeps, GET serves).
pub async fn upstream() -> Upstream {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let app = Router::new().fallback(
        |State(seen): State<Arc<Mutex<Vec<Seen>>>>, req: axum::extract::Request| async move {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let method = req.method().to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/plain")
                .to_string();
            seen.lock().unwrap().push(Seen {
                method: req.method().to_string(),
                path: path.clone(),
                headers: req.headers().clone(),
            });
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            // A careless upstream that repeats the credentials it received, in its body and in a
            // header.
            if path.ends_with("/echo-credential") {
                let seen = seen.lock().unwrap();
                let h = &seen.last().unwrap().headers;
                let get = |n: &str| {
                    h.get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let text = format!(
                    "authorization={} x-api-key={} query={query}",
                    get("authorization"),
                    get("x-api-key")
                );
                return axum::response::Response::builder()
                    .header("content-type", "text/plain")
                    .header("x-echo", get("authorization"))
                    .body(axum::body::Body::from(text))
                    .unwrap();
            }
            if path.ends_with("/slow") {
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            }
            // A document store: a PUT under `/docs/` keeps the body and its content type; a GET
            // serves them back.
            if path.contains("/docs/") {
                let key = path.rsplit("/docs/").next().unwrap_or("").to_string();
                if method == "PUT" {
                    DOCS.lock()
                        .unwrap()
                        .insert(key, (content_type, body.to_vec()));
                    return axum::response::Response::builder()
                        .status(201)
                        .body(axum::body::Body::empty())
                        .unwrap();
                }
                return match DOCS.lock().unwrap().get(&key) {
                    Some((ct, bytes)) => axum::response::Response::builder()
                        .header("content-type", ct.as_str())
                        .body(axum::body::Body::from(bytes.clone()))
                        .unwrap(),
                    None => axum::response::Response::builder()
                        .status(404)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                };
            }
            if path.ends_with("/stream") {
                let chunks = (0..3u8).map(|i| {
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b'a' + i; 64 * 1024]))
                });
                return axum::response::Response::new(axum::body::Body::from_stream(iter_stream(
                    chunks,
                )));
            }
            axum::response::IntoResponse::into_response(axum::Json(
                json!({ "upstream": "tickets", "path": path, "echo_len": body.len() }),
            ))
        },
    );
    let app = app.with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream { addr, seen }
}

/// Runs `git` in `dir` with a fixed identity; returns its output.
#[allow(dead_code)] // not every test binary uses it
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A fresh git repository with one commit (`README`), for the MCP git server.
#[allow(dead_code)]
pub fn git_workspace(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q"]);
    std::fs::write(dir.join("README"), "hello\n").unwrap();
    git(&dir, &["add", "README"]);
    git(&dir, &["commit", "-q", "-m", "first commit"]);
    dir
}

pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "palisade-test-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub const NO_DELETES: &str = r#"
@id("tickets.no-deletes")
forbid (principal, action == Palisade::Action::"destructive", resource == Palisade::Route::"tickets");

@id("tests.slow-route-writes")
permit (principal, action == Palisade::Action::"write", resource == Palisade::Route::"slow");
"#;

pub struct Harness {
    pub server: RunningServer,
    pub upstream: Upstream,
    pub data_dir: PathBuf,
    pub http: reqwest::Client,
    pub admin: String,
    /// The config the server was started with (for restarts).
    pub toml: String,
    /// The clock the server reads, when the test controls it.
    pub clock: Option<Arc<palisade_core::OffsetClock>>,
}

impl Harness {
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, "").await
    }

    pub async fn start_with(name: &str, extra_toml: &str) -> Self {
        Self::start_full(name, "", extra_toml, None).await
    }

    /// `server_extra` goes into `[server]`, `extra_toml` after the `tickets` route; `clock`
    /// lets the test move time.
    pub async fn start_full(
        name: &str,
        server_extra: &str,
        extra_toml: &str,
        clock: Option<Arc<palisade_core::OffsetClock>>,
    ) -> Self {
        let upstream = upstream().await;
        let data_dir = temp_dir(name);
        let policy_dir = data_dir.with_extension("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("tickets.cedar"), NO_DELETES).unwrap();
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
{server_extra}
[policy]
dir = "{}"
[gateway]
max_body_bytes = 4096
[[routes]]
name = "tickets"
path_prefix = "/tickets"
upstream = "http://{}"
{extra_toml}
"#,
            data_dir.display(),
            policy_dir.display(),
            upstream.addr
        );
        let server = Self::boot(&toml, clock.clone()).await;
        let admin = std::fs::read_to_string(&server.admin_token_path)
            .unwrap()
            .trim()
            .to_string();
        Self {
            server,
            upstream,
            data_dir,
            http: reqwest::Client::new(),
            admin,
            toml,
            clock,
        }
    }

    async fn boot(toml: &str, clock: Option<Arc<palisade_core::OffsetClock>>) -> RunningServer {
        let config = Config::from_toml(toml, "test.toml").unwrap();
        let options = StartOptions {
            clock: clock.map(|c| c as Arc<dyn palisade_core::Clock>),
            ..StartOptions::default()
        };
        palisade_server::start(config, options).await.unwrap()
    }

    /// Stops the server (draining its audit log) and starts it again on the same data directory.
    pub async fn restart(self) -> Self {
        let Self {
            server,
            upstream,
            data_dir,
            http,
            admin,
            toml,
            clock,
        } = self;
        server.stop().await;
        let server = Self::boot(&toml, clock.clone()).await;
        Self {
            server,
            upstream,
            data_dir,
            http,
            admin,
            toml,
            clock,
        }
    }

    /// A token request with extra form fields; returns the status and the JSON body.
    pub async fn token_request(
        &self,
        client_id: &str,
        secret: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut form = vec![("grant_type", "client_credentials")];
        form.extend_from_slice(extra);
        let resp = self
            .http
            .post(self.url("/oauth2/token"))
            .basic_auth(client_id, Some(secret))
            .form(&form)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(&format!("/api/v1{path}")))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers human:alice and an agent allowed on `tickets`; returns the agent's secret.
    pub async fn owner_and_agent(&self, slug: &str) -> String {
        let (s, _) = self
            .api(
                reqwest::Method::POST,
                "/humans",
                Some(json!({ "id": "alice", "email": "alice@example.com" })),
            )
            .await;
        assert!(s == 201 || s == 409, "human add: {s}");
        let (s, body) = self
            .api(reqwest::Method::POST, "/agents", Some(agent_body(slug)))
            .await;
        assert_eq!(s, 201, "{body}");
        body["credentials"]["client_secret"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Registers human:alice (if needed) and an agent from `agent_body(slug)` with `allowed`
    /// routes; returns an access token for it.
    pub async fn agent_token(&self, slug: &str, allowed: &[&str]) -> String {
        let secret = self.agent_secret(slug, allowed).await;
        self.token_for(&format!("agent:{slug}"), &secret).await
    }

    /// Like [`Harness::agent_token`], but returns the client secret.
    pub async fn agent_secret(&self, slug: &str, allowed: &[&str]) -> String {
        let (s, _) = self
            .api(
                reqwest::Method::POST,
                "/humans",
                Some(json!({ "id": "alice" })),
            )
            .await;
        assert!(s == 201 || s == 409, "human add: {s}");
        let mut agent = agent_body(slug);
        agent["allowed_resources"] = json!(allowed);
        let (s, body) = self
            .api(reqwest::Method::POST, "/agents", Some(agent))
            .await;
        assert_eq!(s, 201, "{body}");
        body["credentials"]["client_secret"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A token with only `scope` (a write scope gets its own token request, decided by policy,
    /// inside a session): in `session`, or in a session started for it.
    pub async fn scoped_token(
        &self,
        client_id: &str,
        secret: &str,
        scope: &str,
        session: Option<&str>,
    ) -> String {
        let started;
        let sid = match session {
            Some(s) => s,
            None => {
                let (status, body) = self.token_request(client_id, secret, &[]).await;
                assert_eq!(status, 200, "{body}");
                started = body["session_id"].as_str().unwrap().to_string();
                started.as_str()
            }
        };
        let extra = vec![("scope", scope), ("session_id", sid)];
        let (status, body) = self.token_request(client_id, secret, &extra).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    pub async fn token_for(&self, client_id: &str, secret: &str) -> String {
        let resp = self
            .http
            .post(self.url("/oauth2/token"))
            .basic_auth(client_id, Some(secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }

    pub async fn get_tickets(&self, token: &str) -> reqwest::Response {
        self.get_with("/tickets/42", token).await
    }

    /// `GET path` through the server with a bearer token.
    pub async fn get_with(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(args)
            .env("PALISADE_ADDR", self.server.url())
            .env("PALISADE_TOKEN", &self.admin)
            .env("PALISADE_DATA_DIR", &self.data_dir)
            .output()
            .unwrap()
    }
}

pub fn agent_body(slug: &str) -> Value {
    json!({
        "id": format!("agent:{slug}"),
        "owner": "human:alice",
        "purpose": "Reviews pull requests and posts comments",
        "purpose_tag": "pull-request-review",
        "model_provider": "anthropic",
        "model": "claude-opus-4",
        "model_version": "2026-05-01",
        "allowed_resources": ["tickets"],
        // Write scopes are never in a default token; tests ask for them on their own.
        "scopes": ["tickets:read", "tickets:write", "slow:write"],
        "max_files_per_session": 50,
        // Wide open on actions, so tests see the policies under test decide; the read-only
        // default has its own test.
        "blast_radius": { "max_action": "destructive" }
    })
}

/// A stream over an iterator, yielding between items so chunks leave separately.
fn iter_stream<I>(items: I) -> impl futures_core::Stream<Item = I::Item> + Send
where
    I: Iterator + Send + Unpin + 'static,
    I::Item: Send,
{
    struct It<I>(I);
    impl<I: Iterator + Unpin> futures_core::Stream for It<I> {
        type Item = I::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<I::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    It(items)
}
