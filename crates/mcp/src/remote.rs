//! An upstream MCP server reached over Streamable HTTP: JSON-RPC over POST, answered with
//! `application/json` or a `text/event-stream` that carries the answer (and possibly
//! notifications before it). Palisade initialises its own MCP session with the server
//! (`Mcp-Session-Id`), sends the negotiated `MCP-Protocol-Version`, and initialises again when the
//! server forgets the session (404). Tools are fetched again at most every 30 s.
//!
//! The server gets its own credential (the configured `headers`), never the agent's token. https
//! is checked against Mozilla's roots, or only against the configured `ca_file`.

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade_config::McpServerConfig;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::stdio::{UPSTREAM_PROTOCOL, UpstreamError};

const MAX_BODY: usize = 16 * 1024 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const TOOLS_TTL: Duration = Duration::from_secs(30);

struct Session {
    id: Option<String>,
    protocol: String,
}

/// One Streamable HTTP MCP server.
pub struct HttpServer {
    /// Its configuration.
    pub config: McpServerConfig,
    url: Uri,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    session: tokio::sync::Mutex<Option<Session>>,
    next_id: AtomicU64,
    tools: Mutex<Option<(Vec<Value>, Instant)>>,
    progress: crate::progress::Routes,
    /// Fills `${vault:NAME}` in its headers.
    credentials: Option<std::sync::Arc<dyn palisade_gateway::CredentialSource>>,
}

impl HttpServer {
    /// A server at `url` (not contacted until first use). Fails when the configured CA file
    /// cannot be read or holds no certificate.
    pub fn new(
        config: McpServerConfig,
        url: Uri,
        progress: crate::progress::Routes,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = tls_config(&config)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            config,
            url,
            client: Client::builder(TokioExecutor::new()).build(connector),
            session: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            tools: Mutex::new(None),
            progress,
            credentials: None,
        })
    }

    /// Fills `${vault:NAME}` references in its headers from `source` on every request.
    pub fn with_credentials(
        mut self,
        source: std::sync::Arc<dyn palisade_gateway::CredentialSource>,
    ) -> Self {
        self.credentials = Some(source);
        self
    }

    /// The server's tools, fetched again when older than 30 s.
    pub async fn tools(&self) -> Result<Vec<Value>, UpstreamError> {
        if let Some((tools, at)) = self
            .tools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && at.elapsed() < TOOLS_TTL
        {
            return Ok(tools.clone());
        }
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let page = self.request("tools/list", params).await?;
            if let Some(tools) = page.get("tools").and_then(Value::as_array) {
                all.extend(tools.iter().cloned());
            }
            cursor = page
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_string);
            if cursor.is_none() {
                break;
            }
        }
        *self.tools.lock().unwrap_or_else(|p| p.into_inner()) = Some((all.clone(), Instant::now()));
        Ok(all)
    }

    /// Sends a request in Palisade's session with the server, starting one if needed; one
    /// deadline covers all of it (session renewal included).
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        tokio::time::timeout(CALL_TIMEOUT, self.request_once(method, params))
            .await
            .map_err(|_| {
                UpstreamError::Unavailable(format!(
                    "`{}` did not answer `{method}` within {}s",
                    self.config.name,
                    CALL_TIMEOUT.as_secs()
                ))
            })?
    }

    async fn request_once(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        let mut session = self.session.lock().await;
        if session.is_none() {
            *session = Some(self.initialize().await?);
        }
        let (sid, protocol) = session
            .as_ref()
            .map(|s| (s.id.clone(), s.protocol.clone()))
            .unwrap_or_default();
        drop(session);
        match self
            .post(method, params.clone(), sid.as_deref(), &protocol)
            .await
        {
            Err(Expired) => {
                // The server forgot the session: start a new one, once.
                let fresh = self.initialize().await?;
                let (sid, protocol) = (fresh.id.clone(), fresh.protocol.clone());
                *self.session.lock().await = Some(fresh);
                self.post(method, params, sid.as_deref(), &protocol)
                    .await
                    .map_err(|Expired| {
                        UpstreamError::Unavailable(
                            "the MCP server keeps dropping its session".into(),
                        )
                    })?
            }
            Ok(result) => result,
        }
    }

    async fn initialize(&self) -> Result<Session, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = json!({ "jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
            "protocolVersion": UPSTREAM_PROTOCOL,
            "capabilities": {},
            "clientInfo": { "name": "palisade", "version": env!("CARGO_PKG_VERSION") },
        }});
        let (sid, answer) = self.exchange(&message, None, None).await?.ok_or_else(|| {
            UpstreamError::Unavailable("the MCP server forgot a new session".into())
        })?;
        let result = answer?;
        let protocol = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(UPSTREAM_PROTOCOL)
            .to_string();
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        let _ = self
            .exchange(&note, sid.as_deref(), Some(&protocol))
            .await?;
        tracing::info!(server = %self.config.name, "MCP server session started");
        Ok(Session { id: sid, protocol })
    }

    async fn post(
        &self,
        method: &str,
        params: Value,
        sid: Option<&str>,
        protocol: &str,
    ) -> Result<Result<Value, UpstreamError>, Expired> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        match self.exchange(&message, sid, Some(protocol)).await {
            Ok(Some((_, answer))) => Ok(answer),
            Ok(None) => Err(Expired),
            Err(e) => Ok(Err(e)),
        }
    }

    /// One POST. `Ok(None)`: the server does not know the session (404). For a request, the
    /// answer with the same id (from JSON or the event stream); for a notification, `Null`.
    #[allow(clippy::type_complexity)]
    async fn exchange(
        &self,
        message: &Value,
        sid: Option<&str>,
        protocol: Option<&str>,
    ) -> Result<Option<(Option<String>, Result<Value, UpstreamError>)>, UpstreamError> {
        let mut builder = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(s) = sid {
            builder = builder.header("mcp-session-id", s);
        }
        if let Some(p) = protocol {
            builder = builder.header("mcp-protocol-version", p);
        }
        for (name, value) in &self.config.headers {
            let filled = match &self.credentials {
                Some(source) if value.expose().contains("${vault:") => {
                    palisade_gateway::expand_vault(value.expose(), source.as_ref()).map_err(
                        |e| {
                            UpstreamError::Unavailable(format!(
                                "MCP server `{}`: header `{name}`: {e}",
                                self.config.name
                            ))
                        },
                    )?
                }
                _ => zeroize::Zeroizing::new(value.expose().to_string()),
            };
            let mut value = http::HeaderValue::from_str(&filled)
                .map_err(|_| UpstreamError::Unavailable("a configured header is invalid".into()))?;
            value.set_sensitive(true);
            builder = builder.header(name, value);
        }
        let req = builder
            .body(Full::new(Bytes::from(message.to_string())))
            .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        let name = &self.config.name;
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| {
                UpstreamError::Unavailable(format!("`{name}` did not answer within 30 s"))
            })?
            .map_err(|e| {
                UpstreamError::Unavailable(format!(
                    "`{name}` could not be reached: {}",
                    error_chain(&e)
                ))
            })?;
        if resp.status() == StatusCode::NOT_FOUND && sid.is_some() {
            return Ok(None);
        }
        let new_sid = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| sid.map(str::to_string));
        let status = resp.status();
        let is_stream = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let Some(want) = message.get("id").cloned() else {
            // A notification: 202 expected, nothing to read.
            return Ok(Some((new_sid, Ok(Value::Null))));
        };
        if !status.is_success() {
            return Err(UpstreamError::Unavailable(format!(
                "`{name}` answered HTTP {status}"
            )));
        }
        let answer = if is_stream {
            read_stream(resp.into_body(), &want, &self.progress).await
        } else {
            let body = tokio::time::timeout(
                CALL_TIMEOUT,
                Limited::new(resp.into_body(), MAX_BODY).collect(),
            )
            .await
            .map_err(|_| UpstreamError::Unavailable(format!("`{name}` stalled mid-answer")))?
            .map_err(|e| {
                UpstreamError::Unavailable(format!("`{name}`'s answer could not be read: {e}"))
            })?
            .to_bytes();
            serde_json::from_slice::<Value>(&body)
                .map_err(|_| UpstreamError::Unavailable(format!("`{name}` answered with no JSON")))
        };
        let answer = answer.and_then(|a| match (a.get("result"), a.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(UpstreamError::Rpc(e.clone())),
            _ => Err(UpstreamError::Unavailable(format!(
                "`{name}` sent an empty answer"
            ))),
        });
        Ok(Some((new_sid, answer)))
    }
}

/// The session is unknown to the server.
struct Expired;

/// TLS for the server: Mozilla's roots, or only the certificates in its `ca_file`.
fn tls_config(config: &McpServerConfig) -> Result<rustls::ClientConfig, String> {
    client_tls(
        config.ca_file.as_deref(),
        &format!("mcp server `{}`", config.name),
    )
}

/// TLS client settings: Mozilla's roots, or only the certificates in `ca_file` (PEM); `at`
/// names the configured peer in errors. Also used by the SIEM sinks.
pub fn client_tls(
    ca_file: Option<&std::path::Path>,
    at: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{at}: cannot read ca_file {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{at}: ca_file {} is not PEM: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "{at}: ca_file {} holds no CERTIFICATE block",
                    path.display()
                ));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    format!(
                        "{at}: a certificate in ca_file {} is not usable: {e}",
                        path.display()
                    )
                })?;
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("{at}: TLS set-up failed: {e}"))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// An error with its causes, which name what failed (a refused connection, a bad certificate).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads server-sent events until the JSON-RPC answer with id `want`; progress notifications on
/// the way go to their calls.
async fn read_stream(
    mut body: hyper::body::Incoming,
    want: &Value,
    progress: &crate::progress::Routes,
) -> Result<Value, UpstreamError> {
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    let mut buf: Vec<u8> = Vec::new();
    let mut data = String::new();
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| UpstreamError::Unavailable("the event stream stalled".into()))?;
        let Some(frame) = frame else {
            return Err(UpstreamError::Unavailable(
                "the event stream ended before the answer".into(),
            ));
        };
        let frame = frame
            .map_err(|e| UpstreamError::Unavailable(format!("the event stream broke: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_BODY {
            return Err(UpstreamError::Unavailable("an event over 16 MiB".into()));
        }
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if data.len() > MAX_BODY {
                return Err(UpstreamError::Unavailable("an event over 16 MiB".into()));
            }
            if let Some(rest) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            } else if line.is_empty() && !data.is_empty() {
                let event = std::mem::take(&mut data);
                if let Ok(message) = serde_json::from_str::<Value>(&event) {
                    if message.get("id") == Some(want)
                        && (message.get("result").is_some() || message.get("error").is_some())
                    {
                        return Ok(message);
                    }
                    progress.deliver(&message);
                }
            }
        }
    }
}
