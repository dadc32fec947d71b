//! The MCP gateway: one Streamable HTTP endpoint (`POST /mcp`, JSON responses) in front of
//! several upstream MCP servers that Palisade runs over stdio. Tools are federated under
//! `<server>__<tool>`; every `tools/call` is a Cedar decision on `Palisade::Tool::"<server>/<tool>"`
//! with the action class from the tool's annotations (`readOnlyHint` → read, `destructiveHint` →
//! destructive, else write; overridable per tool in the config); `tools/list` shows only the tools
//! the agent may call. Every request is audited.
//!
//! Phases per request: authenticate (bearer token for the MCP audience; 401 points to the RFC 9728
//! metadata) → MCP session (`Mcp-Session-Id`, bound to the principal) → method → for
//! `tools/call`: decide → forward → audit → answer. Inspection of tool results and approvals for
//! destructive calls slot in between decide and answer.
//!
//! INVARIANT (token-stays-here): the agent's token never reaches an upstream server; stdio servers
//! get only their configured environment.

pub mod progress;
pub mod remote;
pub mod stdio;

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use palisade_audit::{AuditEvent, AuditLog, DecisionRecord, Outcome, PrincipalRef};
use palisade_config::InspectionPolicy;
use palisade_config::{ActionClass, ArgType, Config};
use palisade_gateway::inspection::{self, Flow, Verdict};
use palisade_gateway::{Authenticator, Caller, DecisionPoint};
use palisade_policy::{Action, ArgValue, RequestContext, Target};
use regex::Regex;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stdio::{StdioServer, UpstreamError};

/// An upstream MCP server: a local child over stdio or a remote one over Streamable HTTP.
pub enum Upstream {
    /// Run by Palisade.
    Stdio(Box<StdioServer>),
    /// Remote.
    Http(Box<remote::HttpServer>),
}

impl Upstream {
    /// From its configuration; tool-list changes are reported on `changed`.
    pub fn new(
        config: palisade_config::McpServerConfig,
        changed: tokio::sync::broadcast::Sender<String>,
        progress: progress::Routes,
        credentials: Arc<dyn palisade_gateway::CredentialSource>,
    ) -> Result<Self, String> {
        Ok(match config.url.clone() {
            Some(url) => Self::Http(Box::new(
                remote::HttpServer::new(config, url, progress)?.with_credentials(credentials),
            )),
            None => Self::Stdio(Box::new(
                StdioServer::new(config)
                    .with_notifier(changed)
                    .with_progress(progress)
                    .with_credentials(credentials),
            )),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &palisade_config::McpServerConfig {
        match self {
            Self::Stdio(s) => &s.config,
            Self::Http(s) => &s.config,
        }
    }

    /// Its tools.
    pub async fn tools(&self) -> Result<Vec<Value>, UpstreamError> {
        match self {
            Self::Stdio(s) => s.tools().await,
            Self::Http(s) => s.tools().await,
        }
    }

    /// One request.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        match self {
            Self::Stdio(s) => s.request(method, params).await,
            Self::Http(s) => s.request(method, params).await,
        }
    }
}

/// Protocol revisions the endpoint negotiates, oldest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];
/// Separator between server and tool in federated tool names.
pub const SEPARATOR: &str = "__";
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
const MAX_SESSIONS: usize = 100_000;
/// JSON-RPC error code of an authorization denial.
pub const FORBIDDEN: i64 = -32001;
/// JSON-RPC error code of a rate or in-flight limit.
pub const RATE_LIMITED: i64 = -32002;
/// JSON-RPC error code of a call that needs a write-scoped token (answered with HTTP 403 and the
/// step-up challenge). Only Palisade sets it: upstream errors with Palisade's codes are remapped.
pub const INSUFFICIENT_SCOPE: i64 = -32003;

/// The bearer token of a request, if it has one.
fn bearer_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split_once(' '))
        .filter(|(scheme, t)| scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty())
        .map(|(_, t)| t.trim().to_string())
}

struct McpSession {
    principal: String,
    started: Instant,
    last_used: Instant,
    /// How the client can ask its user (MCP elicitation), if it can.
    elicit: Option<Elicit>,
}

/// The elicitation mode a client declared: `url` (it opens a link for its user) or `form`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elicit {
    /// A message and an empty form: accept or decline.
    Form,
    /// A message and a link (the approval's) the user may open.
    Url,
}

/// How long a call whose client shows the approval to its user waits for the decision.
const ELICIT_WAIT: Duration = Duration::from_secs(300);

/// What a streamed tool call can send its agent while it runs: progress, and elicitations.
#[derive(Default)]
struct CallStream {
    progress: Option<progress::Sink>,
    elicit: Option<ElicitTo>,
    /// The bearer token, to check again after a wait.
    token: Option<String>,
}

/// Where elicitations of one call go: the client's mode, the call's event stream, and a flag
/// that turns true when the client left (a send failed, or it cancelled the request).
type ElicitTo = (
    Elicit,
    tokio::sync::mpsc::Sender<Value>,
    tokio::sync::watch::Receiver<bool>,
);

/// MCP sessions one principal may hold; a new one beyond this replaces its oldest.
const SESSIONS_PER_PRINCIPAL: usize = 32;
/// An MCP session unused this long is forgotten (the client initialises again on 404).
const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A tool definition against its pin.
enum Pin {
    /// Same as pinned.
    Kept,
    /// Seen for the first time; pinned now.
    New(String),
    /// Changed since pinned.
    Changed { pinned: String, current: String },
}

/// The SHA-256 (hex) of what a tool definition tells an agent and the gateway: name, title,
/// description, input and output schemas, annotations. A change in any of them is a changed
/// tool (a "rug pull", a poisoned description, or a flipped `readOnlyHint`).
pub fn definition_hash(tool: &Value) -> String {
    let part = |k: &str| tool.get(k).cloned().unwrap_or(Value::Null);
    // serde_json maps are ordered by key, so this text is canonical.
    let canonical = json!({
        "name": part("name"),
        "title": part("title"),
        "description": part("description"),
        "inputSchema": part("inputSchema"),
        "outputSchema": part("outputSchema"),
        "annotations": part("annotations"),
    });
    hex(&Sha256::digest(canonical.to_string().as_bytes()))
}

/// The MCP gateway.
pub struct McpGateway {
    config: Arc<Config>,
    servers: Vec<Arc<Upstream>>,
    /// Progress notifications of running calls, back to their agents.
    progress: progress::Routes,
    auth: Arc<dyn Authenticator>,
    pdp: Arc<dyn DecisionPoint>,
    audit: AuditLog,
    clock: Arc<dyn palisade_core::Clock>,
    sessions: Mutex<HashMap<String, McpSession>>,
    /// Names of servers whose tools changed; each agent event stream subscribes.
    changed: tokio::sync::broadcast::Sender<String>,
    /// Set when the server stops: event streams end, so graceful shutdown is not held open.
    stopping: tokio::sync::watch::Sender<bool>,
    store: Arc<dyn palisade_core::store::Store>,
    limits: Arc<palisade_gateway::limits::Limits>,
    inspector: Arc<palisade_inspect::Inspector>,
    provenance: Arc<dyn palisade_gateway::inspection::Provenance>,
    /// The vault (credentials the servers get, masked if they repeat them).
    credentials: Arc<dyn palisade_gateway::CredentialSource>,
    approvals: Option<Arc<palisade_approval::Approvals>>,
    /// Elicitations sent to agents' clients, waiting for their answer: id → (principal, answer).
    #[allow(clippy::type_complexity)]
    elicitations: Mutex<HashMap<String, (String, tokio::sync::oneshot::Sender<Value>)>>,
    /// Streamed calls by (principal, request id): set to true when the agent cancels one.
    #[allow(clippy::type_complexity)]
    cancels: Mutex<HashMap<(String, String), Arc<tokio::sync::watch::Sender<bool>>>>,
    /// Which server listed which resource URI (`None`: more than one did, so reads of it are
    /// refused). Resources keep their URIs; tools and prompts get a `<server>__` prefix.
    resource_servers: Mutex<HashMap<String, Option<String>>>,
    /// `<server>/<prompt>` of every listed prompt: only those are forwarded.
    prompt_names: Mutex<std::collections::HashSet<String>>,
    /// When the lists were last fetched to resolve an unknown name (at most every 10 s).
    last_relist: Mutex<Option<Instant>>,
    /// Resource templates per server (`uriTemplate` and its matcher), from the last listing.
    templates: Mutex<Vec<(String, String, Regex)>>,
    pins: Mutex<HashMap<String, String>>,
    /// The last changed definition audited per tool, so each change is reported once.
    reported: Mutex<HashMap<String, String>>,
}

/// What the MCP gateway shares with the rest of the server.
pub struct Services {
    /// Token checks.
    pub auth: Arc<dyn Authenticator>,
    /// Decisions.
    pub pdp: Arc<dyn DecisionPoint>,
    /// The audit log.
    pub audit: AuditLog,
    /// The clock.
    pub clock: Arc<dyn palisade_core::Clock>,
    /// The store (tool pins).
    pub store: Arc<dyn palisade_core::store::Store>,
    /// Rate limits and in-flight caps, shared with the HTTP gateway.
    pub limits: Arc<palisade_gateway::limits::Limits>,
    /// Content inspection.
    pub inspector: Arc<palisade_inspect::Inspector>,
    /// Session taint persistence.
    pub provenance: Arc<dyn palisade_gateway::inspection::Provenance>,
    /// The vault, for `${vault:NAME}` in servers' `env` and `headers`.
    pub credentials: Arc<dyn palisade_gateway::CredentialSource>,
    /// Approvals; without them, calls that need approval are refused.
    pub approvals: Option<Arc<palisade_approval::Approvals>>,
}

impl McpGateway {
    /// A gateway for the configured servers (they start on first use), with the tool pins from
    /// the store.
    pub fn new(config: Arc<Config>, services: Services) -> Result<Self, String> {
        let Services {
            auth,
            pdp,
            audit,
            clock,
            store,
            limits,
            inspector,
            provenance,
            credentials,
            approvals,
        } = services;
        let mut pins: HashMap<String, String> = store
            .mcp_pins()
            .map_err(|e| format!("cannot read the MCP tool pins: {e}"))?
            .into_iter()
            .collect();
        // Pins in the config win over pins from first sight.
        for server in &config.mcp.servers {
            for (tool, hash) in &server.tool_pins {
                pins.insert(format!("{}/{tool}", server.name), hash.clone());
            }
        }
        let (changed, _) = tokio::sync::broadcast::channel(64);
        let progress = progress::Routes::default();
        let servers = config
            .mcp
            .servers
            .iter()
            .map(|s| {
                Upstream::new(
                    s.clone(),
                    changed.clone(),
                    progress.clone(),
                    credentials.clone(),
                )
                .map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            servers,
            progress,
            auth,
            pdp,
            audit,
            clock,
            sessions: Mutex::new(HashMap::new()),
            changed,
            stopping: tokio::sync::watch::channel(false).0,
            store,
            limits,
            inspector,
            provenance,
            credentials,
            approvals,
            elicitations: Mutex::default(),
            cancels: Mutex::default(),
            resource_servers: Mutex::default(),
            prompt_names: Mutex::default(),
            last_relist: Mutex::default(),
            templates: Mutex::default(),
            pins: Mutex::new(pins),
            reported: Mutex::default(),
        })
    }

    /// Compares a tool's definition with its pin; pins it if new. New pins and changes are
    /// audited (a change once per new definition, with a high-severity alert).
    async fn check_pin(&self, server: &str, tool: &Value) -> Pin {
        let name = tool.get("name").and_then(Value::as_str).unwrap_or("");
        let key = format!("{server}/{name}");
        let current = definition_hash(tool);
        let pinned = self
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let state = match pinned {
            Some(p) if p == current => return Pin::Kept,
            Some(p) => Pin::Changed {
                pinned: p,
                current: current.clone(),
            },
            None => Pin::New(current.clone()),
        };
        match &state {
            Pin::New(hash) => {
                let store = self.store.clone();
                let (k, h, at) = (key.clone(), hash.clone(), self.clock.now());
                let stored =
                    tokio::task::spawn_blocking(move || store.put_mcp_pin(&k, &h, at)).await;
                if matches!(stored, Ok(Ok(()))) {
                    self.pins
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), hash.clone());
                } else {
                    tracing::warn!(tool = %key, "cannot store a tool pin; it is pinned on its next use");
                }
                let mut event = AuditEvent::new("mcp.tool_pinned");
                event.resource = Some(format!("Palisade::Tool::\"{key}\""));
                event.detail = json!({ "tool": key, "sha256": hash });
                let _ = self.audit.record(event).await;
            }
            Pin::Changed { pinned, current } => {
                let first = self
                    .reported
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), current.clone())
                    .as_ref()
                    != Some(current);
                if first {
                    let block = self
                        .servers
                        .iter()
                        .find(|s| s.config().name == server)
                        .is_none_or(|s| s.config().block_changed_tools);
                    let mut event = AuditEvent::new("mcp.tool_changed");
                    event.resource = Some(format!("Palisade::Tool::\"{key}\""));
                    event.alert = Some(palisade_audit::Alert {
                        severity: "high".into(),
                        rule: "mcp-tool-changed".into(),
                        message: format!(
                            "MCP tool `{key}` changed its definition since it was pinned; it is {} until an administrator accepts it (palisade mcp accept {key})",
                            if block { "blocked" } else { "allowed, flagged" }
                        ),
                    });
                    event.detail = json!({
                        "tool": key, "pinned_sha256": pinned, "current_sha256": current,
                        "blocked": block, "description": tool.get("description"),
                    });
                    let _ = self.audit.record(event).await;
                }
            }
            Pin::Kept => {}
        }
        state
    }

    fn blocks_changes(&self, server: &str) -> bool {
        self.servers
            .iter()
            .find(|s| s.config().name == server)
            .is_none_or(|s| s.config().block_changed_tools)
    }

    /// Every pinned tool with its pinned hash and, for running servers, the current one.
    pub async fn pins(&self) -> Value {
        let mut current: HashMap<String, String> = HashMap::new();
        for server in &self.servers {
            if let Ok(tools) = server.tools().await {
                for t in tools {
                    if let Some(n) = t.get("name").and_then(Value::as_str) {
                        current
                            .insert(format!("{}/{n}", server.config().name), definition_hash(&t));
                    }
                }
            }
        }
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut items: Vec<Value> = pins
            .into_iter()
            .map(|(tool, hash)| {
                let now = current.get(&tool).cloned();
                json!({ "tool": tool, "pinned_sha256": hash, "current_sha256": now,
                        "changed": now.as_ref().is_some_and(|c| *c != hash) })
            })
            .collect();
        items.sort_by(|a, b| a["tool"].as_str().cmp(&b["tool"].as_str()));
        json!({ "items": items })
    }

    /// Accepts a tool's current definition as its pin, if it is still the one reviewed
    /// (`expected`, its SHA-256 from the alert or `palisade mcp pins`); returns the new hash.
    pub async fn accept(&self, tool_key: &str, expected: &str) -> Result<String, String> {
        let (server_name, tool) = tool_key
            .split_once('/')
            .ok_or_else(|| format!("`{tool_key}` is not <server>/<tool>"))?;
        let server = self
            .servers
            .iter()
            .find(|s| s.config().name == server_name)
            .ok_or_else(|| format!("no MCP server `{server_name}`"))?;
        if server.config().tool_pins.iter().any(|(t, _)| t == tool) {
            return Err(format!(
                "`{tool_key}` is pinned in the config (mcp.servers.tools.{tool}.pin); change it there"
            ));
        }
        let tools = server
            .tools()
            .await
            .map_err(|e| format!("cannot list the tools of `{server_name}`: {e:?}"))?;
        let definition = tools
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some(tool))
            .ok_or_else(|| format!("`{server_name}` has no tool `{tool}`"))?;
        let hash = definition_hash(definition);
        let expected = expected.strip_prefix("sha256:").unwrap_or(expected);
        if !hash.eq_ignore_ascii_case(expected) {
            return Err(format!(
                "`{tool_key}` now has definition {hash}, not the {expected} you reviewed; review it again (palisade mcp pins)"
            ));
        }
        let store = self.store.clone();
        let (k, h, at) = (tool_key.to_string(), hash.clone(), self.clock.now());
        tokio::task::spawn_blocking(move || store.put_mcp_pin(&k, &h, at))
            .await
            .map_err(|_| "the pin task failed".to_string())?
            .map_err(|e| e.to_string())?;
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tool_key.to_string(), hash.clone());
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tool_key);
        Ok(hash)
    }

    /// Ends every open event stream (the server is stopping).
    pub fn shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// RFC 9728 protected resource metadata of the MCP endpoint.
    pub fn resource_metadata(&self) -> Value {
        json!({
            "resource": self.config.mcp.audience,
            "authorization_servers": [self.config.server.issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": "Palisade MCP gateway",
        })
    }

    fn metadata_url(&self) -> String {
        format!(
            "{}/.well-known/oauth-protected-resource{}",
            self.config.server.issuer,
            palisade_config::MCP_PATH
        )
    }

    /// Handles one HTTP request to the MCP endpoint.
    pub async fn handle(self: &Arc<Self>, req: Request<Body>) -> Response<Body> {
        let started = Instant::now();
        // Fail closed while no required SIEM sink can record (the refusal is kept locally).
        if let Some(reason) = self.audit.refusal() {
            tracing::warn!(%reason, "MCP request refused: fail-closed audit");
            let resp = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                palisade_audit::FAIL_CLOSED_MESSAGE,
            );
            return self
                .audited(None, "refused", Some(&reason), resp, started)
                .await;
        }
        let caller = match self.authenticate(req.headers()) {
            Ok(c) => c,
            Err(resp) => {
                return self
                    .audited(None, "authenticate", Some("unauthorized"), *resp, started)
                    .await;
            }
        };
        let resp = self.handle_caller(req, &caller, started).await;
        // Refusals before dispatch (bad headers, bodies or sessions, wrong HTTP method) have no
        // event of their own yet: audit them here.
        if matches!(resp.status().as_u16(), 400 | 404 | 405 | 413) {
            let id = caller.principal.id.to_string();
            return self
                .audited(
                    Some(&id),
                    "refused",
                    Some("refused before dispatch"),
                    resp,
                    started,
                )
                .await;
        }
        resp
    }

    async fn handle_caller(
        self: &Arc<Self>,
        req: Request<Body>,
        caller: &Caller,
        started: Instant,
    ) -> Response<Body> {
        let caller = caller.clone();
        let bearer = bearer_of(req.headers());
        let session_header = req
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The W3C trace the request belongs to (the caller's, or started here).
        let trace = Some(
            inspection::trace_context(
                req.headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok()),
            )
            .0,
        );
        let accepts_stream = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/event-stream"));
        match *req.method() {
            Method::POST => {}
            Method::GET => {
                return self.event_stream(req.headers(), session_header.as_deref(), &caller);
            }
            Method::DELETE => {
                let resp = self.end_session(session_header.as_deref(), &caller);
                let id = caller.principal.id.to_string();
                return self
                    .audited(Some(&id), "session/end", None, resp, started)
                    .await;
            }
            _ => {
                let mut resp = plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "the MCP endpoint takes POST, GET (an event stream) and DELETE",
                );
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
                return resp;
            }
        }
        if let Some(v) = req.headers().get("mcp-protocol-version")
            && !v.to_str().is_ok_and(|v| PROTOCOL_VERSIONS.contains(&v))
        {
            return rpc_error_response(
                StatusCode::BAD_REQUEST,
                Value::Null,
                -32600,
                &format!(
                    "MCP-Protocol-Version is not one of {}",
                    PROTOCOL_VERSIONS.join(", ")
                ),
                None,
            );
        }
        let body = match axum::body::to_bytes(req.into_body(), MAX_MESSAGE_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return rpc_error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Value::Null,
                    -32600,
                    &format!("the message is larger than {MAX_MESSAGE_BYTES} bytes"),
                    None,
                );
            }
        };
        let message: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return rpc_error_response(
                    StatusCode::BAD_REQUEST,
                    Value::Null,
                    -32700,
                    &format!("the body is not JSON: {e}"),
                    None,
                );
            }
        };
        if message.is_array() {
            return rpc_error_response(
                StatusCode::BAD_REQUEST,
                Value::Null,
                -32600,
                "JSON-RPC batches are not supported (MCP 2025-06-18 removed them); send one message per request",
                None,
            );
        }
        let id = message.get("id").cloned();
        let method = message.get("method").and_then(Value::as_str);
        let (Some(method), true) = (method, message.get("jsonrpc") == Some(&json!("2.0"))) else {
            if let Some(id) = &id
                && (message.get("result").is_some() || message.get("error").is_some())
            {
                // An answer to one of Palisade's requests (an elicitation).
                self.take_answer(&caller, id, &message);
                return accepted();
            }
            return rpc_error_response(
                StatusCode::BAD_REQUEST,
                id.unwrap_or(Value::Null),
                -32600,
                "not a JSON-RPC 2.0 request: `jsonrpc` must be \"2.0\" and `method` a string",
                None,
            );
        };
        let params = message.get("params").cloned().unwrap_or_else(|| json!({}));
        let Some(id) = id else {
            // A notification (initialized, cancelled, ...): acknowledged, nothing to answer. A
            // cancelled call that waits for an approval withdraws it.
            if method == "notifications/cancelled"
                && let Some(rid) = params.get("requestId")
                && let Some(flag) = self
                    .cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&(caller.principal.id.to_string(), rid.to_string()))
            {
                let _ = flag.send(true);
            }
            return accepted();
        };
        if method == "initialize" {
            let resp = self.initialize(&caller, id, &params);
            let who = caller.principal.id.to_string();
            return self
                .audited(Some(&who), "initialize", None, resp, started)
                .await;
        }
        match session_header.as_deref() {
            None => {
                return rpc_error_response(
                    StatusCode::BAD_REQUEST,
                    id,
                    -32600,
                    "the Mcp-Session-Id header is missing; call initialize first",
                    None,
                );
            }
            Some(sid) if !self.session_belongs(sid, &caller) => {
                return rpc_error_response(
                    StatusCode::NOT_FOUND,
                    id,
                    -32600,
                    "this MCP session does not exist (expired or never started); initialize again",
                    None,
                );
            }
            Some(_) => {}
        }
        let outcome = match method {
            "ping" => Ok(json!({})),
            "tools/list" => self.list_tools(&caller).await,
            "tools/call" => {
                let wants_progress = params
                    .pointer("/_meta/progressToken")
                    .filter(|t| t.is_string() || t.is_i64() || t.is_u64())
                    .cloned();
                let elicit = session_header
                    .as_deref()
                    .and_then(|sid| self.session_elicits(sid));
                if accepts_stream && (wants_progress.is_some() || elicit.is_some()) {
                    match self
                        .call_tool_streaming(
                            &caller,
                            params,
                            started,
                            (wants_progress, elicit, trace.clone(), bearer.clone()),
                            id.clone(),
                        )
                        .await
                    {
                        Streamed::Done(outcome) => outcome,
                        Streamed::Stream(resp) => return resp,
                    }
                } else {
                    self.call_tool(
                        &caller,
                        &params,
                        started,
                        CallStream {
                            token: bearer.clone(),
                            ..CallStream::default()
                        },
                        trace.clone(),
                    )
                    .await
                }
            }
            "resources/list" => self.list_readables(&caller, Readable::Resources).await,
            "prompts/list" => self.list_readables(&caller, Readable::Prompts).await,
            "resources/read" => {
                self.read(&caller, &params, Readable::Resources, started)
                    .await
            }
            "prompts/get" => {
                self.read(&caller, &params, Readable::Prompts, started)
                    .await
            }
            "resources/templates/list" => self.list_templates(&caller).await,
            other => Err(RpcError::new(
                -32601,
                format!("method `{other}` is not supported by the Palisade MCP gateway"),
            )),
        };
        if !matches!(method, "tools/call" | "resources/read" | "prompts/get") {
            // tools/call writes its own, richer event.
            let mut event = AuditEvent::new("mcp.request");
            event.principal = Some(PrincipalRef {
                id: caller.principal.id.to_string(),
                ..PrincipalRef::default()
            });
            event.action = Some(method.to_string());
            event.outcome = Some(Outcome {
                status: if outcome.is_ok() { 200 } else { 400 },
                bytes_out: outcome
                    .as_ref()
                    .ok()
                    .map(|r| u64::try_from(r.to_string().len()).unwrap_or(u64::MAX)),
                error: outcome.as_ref().err().map(|e| e.message.clone()),
                ..Outcome::default()
            });
            event.latency_us =
                Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            event.detail = json!({ "mcp_session": session_header });
            if let Err(e) = self.audit.record(event).await {
                tracing::error!(error = %e, "audit write failed; withholding the answer");
                return rpc_error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    id,
                    -32603,
                    "the audit log cannot record this request, so it is refused",
                    None,
                );
            }
        }
        match outcome {
            Ok(result) => json_response(
                StatusCode::OK,
                &json!({ "jsonrpc": "2.0", "id": id, "result": result }),
            ),
            Err(e) => {
                let scope = (e.code == INSUFFICIENT_SCOPE)
                    .then(|| e.data.as_ref().and_then(|d| d.get("scope")))
                    .flatten()
                    .and_then(Value::as_str)
                    .map(str::to_string);
                match scope {
                    // The MCP authorization spec's step-up signal: 403 with the scope needed.
                    Some(scope) => {
                        let mut resp = json_response(
                            StatusCode::FORBIDDEN,
                            &json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
                        );
                        if let Ok(v) = HeaderValue::from_str(&format!(
                            r#"Bearer error="insufficient_scope", scope="{scope}", resource_metadata="{}""#,
                            self.metadata_url()
                        )) {
                            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                        }
                        resp
                    }
                    None => json_response(
                        StatusCode::OK,
                        &json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
                    ),
                }
            }
        }
    }

    /// Completes a call's or read's event with the outcome and writes it; the result is released
    /// only once the event is durable.
    async fn finish_audited(
        &self,
        mut event: AuditEvent,
        result: Result<Value, RpcError>,
        started: Instant,
    ) -> Result<Value, RpcError> {
        event.outcome = Some(Outcome {
            status: match &result {
                Ok(_) if event.detail.pointer("/approval/status") == Some(&json!("pending")) => 428,
                Ok(_) => 200,
                Err(e) if e.code == FORBIDDEN || e.code == INSUFFICIENT_SCOPE => 403,
                Err(e) if e.code == RATE_LIMITED => 429,
                Err(e) if e.code == -32602 => 400,
                Err(_) => 502,
            },
            bytes_out: result
                .as_ref()
                .ok()
                .map(|r| u64::try_from(r.to_string().len()).unwrap_or(u64::MAX)),
            error: result.as_ref().err().map(|e| e.message.clone()),
            ..Outcome::default()
        });
        event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit write failed; withholding the answer");
            return Err(RpcError::new(
                -32603,
                "the audit log cannot record this request, so its result is withheld".into(),
            ));
        }
        result
    }

    /// The agent's rate limit and in-flight cap, shared with the HTTP gateway; the slot is held
    /// while the returned guard lives.
    fn enter_limits(
        &self,
        caller: &Caller,
    ) -> Result<palisade_gateway::limits::InFlight, RpcError> {
        let rate = caller
            .principal
            .agent()
            .and_then(|a| a.rate_limit)
            .or(self.config.gateway.agent_rate_limit);
        if let Err(l) = self.limits.check(&caller.principal.id, rate, usize::MAX) {
            let secs = l.retry_after.as_secs().max(1);
            return Err(RpcError {
                code: RATE_LIMITED,
                message: format!(
                    "{} is over its rate limit of {}; retry in {secs}s",
                    caller.principal.id, l.limit
                ),
                data: Some(json!({ "retry_after_seconds": secs, "limit": l.limit.to_string() })),
            });
        }
        let in_flight = caller
            .principal
            .agent()
            .and_then(|a| a.max_concurrent_requests)
            .unwrap_or(self.config.gateway.max_concurrent_requests_per_agent);
        self.limits
            .enter(&caller.principal.id, in_flight)
            .map_err(|max| {
                RpcError::new(
                    RATE_LIMITED,
                    format!(
                        "{} already has {max} requests in flight, its limit; retry when one finishes",
                        caller.principal.id
                    ),
                )
            })
    }

    /// Audits `resp` as an `mcp.request` and releases it, or answers 503 if the event could not
    /// be written.
    async fn audited(
        &self,
        principal: Option<&str>,
        method: &str,
        error: Option<&str>,
        resp: Response<Body>,
        started: Instant,
    ) -> Response<Body> {
        let status = resp.status().as_u16();
        match self
            .audit_request(principal, method, status, error, started)
            .await
        {
            Ok(()) => resp,
            Err(()) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot record this request, so it is refused; check the server log and disk",
            ),
        }
    }

    /// Writes an `mcp.request` event for a request without a richer one of its own.
    async fn audit_request(
        &self,
        principal: Option<&str>,
        method: &str,
        status: u16,
        error: Option<&str>,
        started: Instant,
    ) -> Result<(), ()> {
        let mut event = AuditEvent::new("mcp.request");
        event.principal = principal.map(|id| PrincipalRef {
            id: id.to_string(),
            ..PrincipalRef::default()
        });
        event.action = Some(method.to_string());
        event.outcome = Some(Outcome {
            status,
            error: error.map(str::to_string),
            ..Outcome::default()
        });
        event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        self.audit.record(event).await.map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, "audit write failed");
        })
    }

    fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, Box<Response<Body>>> {
        let token = bearer_of(headers);
        let token = token.as_deref();
        let challenge = |error: Option<&str>| {
            let mut value = format!(
                r#"Bearer realm="palisade", resource_metadata="{}""#,
                self.metadata_url()
            );
            if let Some(e) = error {
                value.push_str(&format!(
                    r#", error="invalid_token", error_description="{}""#,
                    e.replace('"', "'")
                ));
            }
            value
        };
        let failure = |message: &str, error: Option<&str>| {
            let mut resp = plain(StatusCode::UNAUTHORIZED, message);
            if let Ok(v) = HeaderValue::from_str(&challenge(error)) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            Box::new(resp)
        };
        let Some(token) = token else {
            return Err(failure(
                &format!(
                    "a bearer access token for {} is required; see {}",
                    self.config.mcp.audience,
                    self.metadata_url()
                ),
                None,
            ));
        };
        self.auth
            .authenticate(token, &self.config.mcp.audience)
            .map_err(|f| failure(&f.reason, Some(&f.reason)))
    }

    fn initialize(&self, caller: &Caller, id: Value, params: &Value) -> Response<Body> {
        let asked = params.get("protocolVersion").and_then(Value::as_str);
        let version = asked
            .filter(|v| PROTOCOL_VERSIONS.contains(v))
            .unwrap_or("2025-11-25");
        let sid = match palisade_core::secret::random_id::<16>() {
            Ok(r) => format!("mcp_{r}"),
            Err(_) => {
                return rpc_error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    id,
                    -32603,
                    "no randomness for a session id",
                    None,
                );
            }
        };
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            sessions.retain(|_, s| now.duration_since(s.last_used) < SESSION_IDLE);
            let principal = caller.principal.id.to_string();
            let mut own: Vec<(String, Instant)> = sessions
                .iter()
                .filter(|(_, s)| s.principal == principal)
                .map(|(k, s)| (k.clone(), s.started))
                .collect();
            if own.len() >= SESSIONS_PER_PRINCIPAL {
                own.sort_by_key(|(_, started)| *started);
                for (k, _) in own.iter().take(own.len() + 1 - SESSIONS_PER_PRINCIPAL) {
                    sessions.remove(k);
                }
            }
            if sessions.len() >= MAX_SESSIONS {
                return rpc_error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    id,
                    -32603,
                    "too many MCP sessions; end some (DELETE) and retry",
                    None,
                );
            }
            sessions.insert(
                sid.clone(),
                McpSession {
                    principal: caller.principal.id.to_string(),
                    started: now,
                    last_used: now,
                    elicit: match params.pointer("/capabilities/elicitation") {
                        Some(Value::Object(m)) if m.contains_key("url") => Some(Elicit::Url),
                        Some(Value::Object(_)) => Some(Elicit::Form),
                        _ => None,
                    },
                },
            );
        }
        let result = json!({
            "protocolVersion": version,
            "capabilities": {
                "tools": { "listChanged": true },
                "resources": {},
                "prompts": {},
            },
            "serverInfo": { "name": "palisade", "version": env!("CARGO_PKG_VERSION") },
            "instructions": "Tools of several servers, named <server>__<tool>; each call is authorized and audited by Palisade.",
        });
        let mut resp = json_response(
            StatusCode::OK,
            &json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        );
        if let Ok(v) = HeaderValue::from_str(&sid) {
            resp.headers_mut().insert("mcp-session-id", v);
        }
        resp
    }

    fn session_elicits(&self, sid: &str) -> Option<Elicit> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sid)
            .and_then(|s| s.elicit)
    }

    /// An agent's answer to one of Palisade's requests (an elicitation): handed to the call
    /// waiting for it, if that call is the same principal's.
    fn take_answer(&self, caller: &Caller, id: &Value, message: &Value) {
        let Some(key) = id.as_str() else { return };
        let mut waiting = self.elicitations.lock().unwrap_or_else(|p| p.into_inner());
        if waiting
            .get(key)
            .is_some_and(|(who, _)| *who == caller.principal.id.to_string())
            && let Some((_, tx)) = waiting.remove(key)
        {
            let _ = tx.send(message.clone());
        }
    }

    fn session_belongs(&self, sid: &str, caller: &Caller) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get_mut(sid) {
            Some(s)
                if s.principal == caller.principal.id.to_string()
                    && s.last_used.elapsed() < SESSION_IDLE =>
            {
                s.last_used = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// `GET /mcp`: the session's server-sent event stream. It carries
    /// `notifications/tools/list_changed` when an upstream's tools change (so the agent lists
    /// again and sees what policy and pins now allow), and a comment every 15 s to keep it open.
    fn event_stream(
        &self,
        headers: &http::HeaderMap,
        sid: Option<&str>,
        caller: &Caller,
    ) -> Response<Body> {
        let wants_events = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        if !wants_events {
            return plain(
                StatusCode::NOT_ACCEPTABLE,
                "GET /mcp is an event stream: send Accept: text/event-stream",
            );
        }
        let Some(sid) = sid else {
            return plain(
                StatusCode::BAD_REQUEST,
                "the Mcp-Session-Id header is missing",
            );
        };
        if !self.session_belongs(sid, caller) {
            return plain(
                StatusCode::NOT_FOUND,
                "no such MCP session; initialize again",
            );
        }
        let mut changes = self.changed.subscribe();
        let mut stopping = self.stopping.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
            loop {
                let frame = tokio::select! {
                    changed = changes.recv() => match changed {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let note = json!({ "jsonrpc": "2.0", "method": "notifications/tools/list_changed" });
                            format!("event: message\ndata: {note}\n\n")
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => ": keep-alive\n\n".to_string(),
                    _ = stopping.wait_for(|s| *s) => return,
                };
                // The agent went away: the body (and the receiver) is dropped.
                if tx.send(Ok(bytes::Bytes::from(frame))).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(Body::from_stream(ReceiverStream(rx)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    fn end_session(&self, sid: Option<&str>, caller: &Caller) -> Response<Body> {
        let Some(sid) = sid else {
            return plain(
                StatusCode::BAD_REQUEST,
                "the Mcp-Session-Id header is missing",
            );
        };
        if !self.session_belongs(sid, caller) {
            return plain(StatusCode::NOT_FOUND, "no such MCP session");
        }
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sid);
        plain(StatusCode::OK, "MCP session ended")
    }

    fn action_of(&self, server: &Upstream, tool: &Value) -> ActionClass {
        let name = tool.get("name").and_then(Value::as_str).unwrap_or("");
        if let Some((_, a)) = server.config().tool_actions.iter().find(|(t, _)| t == name) {
            return *a;
        }
        let hint = |k: &str| {
            tool.pointer(&format!("/annotations/{k}"))
                .and_then(Value::as_bool)
        };
        if hint("readOnlyHint") == Some(true) {
            ActionClass::Read
        } else if hint("destructiveHint") == Some(true) {
            ActionClass::Destructive
        } else {
            ActionClass::Write
        }
    }

    fn decide(
        &self,
        caller: &Caller,
        server: &Upstream,
        tool: &str,
        class: ActionClass,
        arguments: Option<&[(String, ArgValue)]>,
    ) -> (palisade_policy::Decision, String) {
        self.decide_on(caller, server, tool, true, action(class), arguments)
    }

    /// One decision on a server's tool (`Palisade::Tool`) or readable (`Palisade::Resource`), in
    /// the server's route, with the session's counters and the delegation in the context.
    fn decide_on(
        &self,
        caller: &Caller,
        server: &Upstream,
        name: &str,
        tool: bool,
        act: Action,
        arguments: Option<&[(String, ArgValue)]>,
    ) -> (palisade_policy::Decision, String) {
        self.decide_with(caller, server, name, tool, act, arguments, None)
    }

    /// [`McpGateway::decide_on`] with what inspection found in the call's arguments.
    #[allow(clippy::too_many_arguments)]
    fn decide_with(
        &self,
        caller: &Caller,
        server: &Upstream,
        name: &str,
        tool: bool,
        act: Action,
        arguments: Option<&[(String, ArgValue)]>,
        sent: Option<&Verdict>,
    ) -> (palisade_policy::Decision, String) {
        let c = server.config();
        let target = Target {
            route: &c.name,
            resource: Some(name),
            tool,
            route_kind: &c.kind,
            kind: &c.kind,
            system: c.system.as_deref().unwrap_or(""),
            route_classification: c.classification,
            classification: c.classification,
        };
        let path = format!("{}/{}/{name}", palisade_config::MCP_PATH, c.name);
        let mut ctx = RequestContext::at("POST", &path, self.clock.now());
        let taint = caller
            .session
            .as_ref()
            .map(|s| s.taint())
            .unwrap_or_default();
        if let Some(s) = &caller.session {
            let counters = s.counters();
            ctx.calls = counters.calls;
            ctx.objects_read = counters.objects_read;
            ctx.bytes_out = counters.bytes_out;
            ctx.initiating_human = s.initiating_human.as_deref();
            ctx.taint = &taint;
            ctx.sensitive = s.is_sensitive();
        }
        if let Some(v) = sent {
            ctx.findings = &v.categories;
            ctx.data_tier = v.data_tier();
        }
        if caller.initiating_human.is_some() {
            ctx.initiating_human = caller.initiating_human.as_deref();
        }
        ctx.arguments = arguments;
        self.pdp.decide(&caller.principal, act, &target, &ctx)
    }

    async fn list_tools(&self, caller: &Caller) -> Result<Value, RpcError> {
        // All servers at once, so a slow one delays the list by its own deadline only.
        let mut pending = tokio::task::JoinSet::new();
        for (i, server) in self.servers.iter().enumerate() {
            let server = server.clone();
            pending.spawn(async move { (i, server.tools().await) });
        }
        let mut fetched: Vec<Option<Result<Vec<Value>, UpstreamError>>> =
            (0..self.servers.len()).map(|_| None).collect();
        while let Some(done) = pending.join_next().await {
            if let Ok((i, result)) = done
                && let Some(slot) = fetched.get_mut(i)
            {
                *slot = Some(result);
            }
        }
        let mut tools = Vec::new();
        for (server, listed) in self.servers.iter().zip(fetched) {
            let Some(listed) = listed else { continue };
            let listed = match listed {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(server = %server.config().name, error = ?e, "cannot list an MCP server's tools");
                    continue;
                }
            };
            for tool in listed {
                let Some(name) = tool.get("name").and_then(Value::as_str) else {
                    continue;
                };
                if matches!(
                    self.check_pin(&server.config().name, &tool).await,
                    Pin::Changed { .. }
                ) && self.blocks_changes(&server.config().name)
                {
                    continue;
                }
                let class = self.action_of(server, &tool);
                // Listing: no arguments, so argument conditions (`context has arguments && ...`)
                // do not hide a tool; they decide each call.
                let (decision, _) = self.decide(caller, server, name, class, None);
                if decision.allowed {
                    let mut shown = tool.clone();
                    shown["name"] = json!(format!("{}{SEPARATOR}{name}", server.config().name));
                    tools.push(shown);
                }
            }
        }
        Ok(json!({ "tools": tools }))
    }

    /// A read of a resource or prompt as Cedar sees it: `read` on
    /// `Palisade::Resource::"<server>/<uri>"` or `Palisade::Resource::"<server>/prompt:<name>"`.
    fn decide_read(
        &self,
        caller: &Caller,
        server: &Upstream,
        name: &str,
    ) -> (palisade_policy::Decision, String) {
        self.decide_on(caller, server, name, false, Action::Read, None)
    }

    /// `resources/list` or `prompts/list`, merged over the servers that offer them and filtered
    /// to what the agent may read.
    async fn list_readables(&self, caller: &Caller, kind: Readable) -> Result<Value, RpcError> {
        let mut pending = tokio::task::JoinSet::new();
        for (i, server) in self.servers.iter().enumerate() {
            let server = server.clone();
            pending.spawn(async move {
                let mut all = Vec::new();
                let mut cursor: Option<String> = None;
                for _ in 0..20 {
                    let params = match &cursor {
                        Some(c) => json!({ "cursor": c }),
                        None => json!({}),
                    };
                    let Ok(page) = server.request(kind.list_method(), params).await else {
                        break;
                    };
                    if let Some(items) = page.get(kind.field()).and_then(Value::as_array) {
                        all.extend(items.iter().cloned());
                    }
                    cursor = page
                        .get("nextCursor")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    if cursor.is_none() {
                        break;
                    }
                }
                (i, all)
            });
        }
        let mut lists: Vec<Vec<Value>> = self.servers.iter().map(|_| Vec::new()).collect();
        while let Some(done) = pending.join_next().await {
            if let Ok((i, items)) = done
                && let Some(slot) = lists.get_mut(i)
            {
                *slot = items;
            }
        }
        // The indexes are rebuilt from every listed item, whatever this caller may read, so they
        // do not depend on who listed last, and entries of vanished items go.
        let key_of = |item: &Value| {
            match kind {
                Readable::Resources => item.get("uri"),
                Readable::Prompts => item.get("name"),
            }
            .and_then(Value::as_str)
            .map(str::to_string)
        };
        match kind {
            Readable::Resources => {
                let mut index: HashMap<String, Option<String>> = HashMap::new();
                for (server, items) in self.servers.iter().zip(&lists) {
                    for key in items.iter().filter_map(key_of).take(100_000) {
                        let name = server.config().name.clone();
                        index
                            .entry(key)
                            .and_modify(|owner| {
                                if owner.as_deref() != Some(name.as_str()) {
                                    *owner = None;
                                }
                            })
                            .or_insert(Some(name));
                    }
                }
                *self
                    .resource_servers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = index;
            }
            Readable::Prompts => {
                let names = self
                    .servers
                    .iter()
                    .zip(&lists)
                    .flat_map(|(s, items)| {
                        let server = s.config().name.clone();
                        items
                            .iter()
                            .filter_map(key_of)
                            .map(move |k| format!("{server}/{k}"))
                    })
                    .take(100_000)
                    .collect();
                *self.prompt_names.lock().unwrap_or_else(|p| p.into_inner()) = names;
            }
        }
        let mut shown = Vec::new();
        for (server, items) in self.servers.iter().zip(lists) {
            let server_name = &server.config().name;
            for mut item in items {
                let Some(key) = key_of(&item) else { continue };
                if matches!(kind, Readable::Resources) && self.lookup_resource(&key).is_err() {
                    continue; // listed by several servers: not readable, so not shown
                }
                let (decision, _) = self.decide_read(caller, server, &kind.cedar_name(&key));
                if !decision.allowed {
                    continue;
                }
                if matches!(kind, Readable::Prompts) {
                    item["name"] = json!(format!("{server_name}{SEPARATOR}{key}"));
                }
                shown.push(item);
            }
        }
        Ok(json!({ kind.field(): shown }))
    }

    /// `resources/templates/list`, merged over the servers: each template is shown if its
    /// server may be read by the caller (decided on `Palisade::Resource::"<server>/<template>"`);
    /// the matchers are kept so a read of a URI no server listed goes to the one server whose
    /// template it matches.
    async fn list_templates(&self, caller: &Caller) -> Result<Value, RpcError> {
        let mut pending = tokio::task::JoinSet::new();
        for (i, server) in self.servers.iter().enumerate() {
            let server = server.clone();
            pending.spawn(async move {
                let mut all = Vec::new();
                let mut cursor: Option<String> = None;
                for _ in 0..20 {
                    let params = match &cursor {
                        Some(c) => json!({ "cursor": c }),
                        None => json!({}),
                    };
                    let Ok(page) = server.request("resources/templates/list", params).await else {
                        break;
                    };
                    if let Some(items) = page.get("resourceTemplates").and_then(Value::as_array) {
                        all.extend(items.iter().cloned());
                    }
                    cursor = page
                        .get("nextCursor")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    if cursor.is_none() {
                        break;
                    }
                }
                (i, all)
            });
        }
        let mut lists: Vec<Vec<Value>> = self.servers.iter().map(|_| Vec::new()).collect();
        while let Some(done) = pending.join_next().await {
            if let Ok((i, items)) = done
                && let Some(slot) = lists.get_mut(i)
            {
                *slot = items;
            }
        }
        let mut matchers = Vec::new();
        let mut shown = Vec::new();
        for (server, items) in self.servers.iter().zip(lists) {
            for item in items.into_iter().take(10_000) {
                let Some(template) = item.get("uriTemplate").and_then(Value::as_str) else {
                    continue;
                };
                let Some(matcher) = template_matcher(template) else {
                    continue;
                };
                matchers.push((server.config().name.clone(), template.to_string(), matcher));
                let (decision, _) = self.decide_read(caller, server, template);
                if decision.allowed {
                    shown.push(item);
                }
            }
        }
        *self.templates.lock().unwrap_or_else(|p| p.into_inner()) = matchers;
        Ok(json!({ "resourceTemplates": shown }))
    }

    /// The one server whose resource template `uri` matches (`Err` if several do).
    fn lookup_template(&self, uri: &str) -> Result<Option<Arc<Upstream>>, ()> {
        let templates = self.templates.lock().unwrap_or_else(|p| p.into_inner());
        let mut owners: Vec<&str> = templates
            .iter()
            .filter(|(_, _, m)| m.is_match(uri))
            .map(|(s, _, _)| s.as_str())
            .collect();
        owners.sort_unstable();
        owners.dedup();
        match owners.as_slice() {
            [] => Ok(None),
            [one] => Ok(self
                .servers
                .iter()
                .find(|s| s.config().name == *one)
                .cloned()),
            _ => Err(()),
        }
    }

    /// `resources/read` or `prompts/get`: decided as a read, forwarded, audited as `mcp.read`.
    async fn read(
        &self,
        caller: &Caller,
        params: &Value,
        kind: Readable,
        started: Instant,
    ) -> Result<Value, RpcError> {
        let mut event = AuditEvent::new("mcp.read");
        event.principal = Some(PrincipalRef {
            id: caller.principal.id.to_string(),
            ..PrincipalRef::default()
        });
        if let Some(human) = &caller.initiating_human {
            event.delegation = Some(palisade_audit::Delegation {
                initiating_human: human.clone(),
                actor_chain: caller.actor_chain.clone(),
            });
        }
        event.detail = json!({
            "session": caller.session.as_ref().map(|s| s.sid.clone()),
            "token_id": caller.token_id,
        });
        event.action = Some(kind.read_method().into());
        let result = self.read_inner(caller, params, kind, &mut event).await;
        self.finish_audited(event, result, started).await
    }

    async fn read_inner(
        &self,
        caller: &Caller,
        params: &Value,
        kind: Readable,
        event: &mut AuditEvent,
    ) -> Result<Value, RpcError> {
        let (server, key, forward) = match kind {
            Readable::Resources => {
                let uri = params
                    .get("uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| RpcError::new(-32602, "resources/read needs a `uri`".into()))?;
                let mut owner = self.lookup_resource(uri);
                if matches!(owner, Ok(None)) && self.may_relist() {
                    // Not listed yet: list once (at most every 10 s), then look again.
                    let _ = self.list_readables(caller, Readable::Resources).await;
                    let _ = self.list_templates(caller).await;
                    owner = self.lookup_resource(uri);
                }
                if matches!(owner, Ok(None)) {
                    // A URI of a server's resource template.
                    owner = self.lookup_template(uri);
                }
                let server = match owner {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        return Err(RpcError::new(
                            -32602,
                            format!("unknown resource `{uri}`; see resources/list"),
                        ));
                    }
                    Err(()) => {
                        return Err(RpcError::new(
                            -32602,
                            format!(
                                "resource `{uri}` is listed by more than one server, so Palisade cannot tell which one to read"
                            ),
                        ));
                    }
                };
                (server, uri.to_string(), json!({ "uri": uri }))
            }
            Readable::Prompts => {
                let name = params
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| RpcError::new(-32602, "prompts/get needs a `name`".into()))?;
                let unknown = || {
                    RpcError::new(
                        -32602,
                        format!(
                            "unknown prompt `{name}`; prompts are named <server>{SEPARATOR}<prompt>"
                        ),
                    )
                };
                let (server_name, prompt) = name.split_once(SEPARATOR).ok_or_else(unknown)?;
                let server = self
                    .servers
                    .iter()
                    .find(|s| s.config().name == server_name)
                    .cloned()
                    .ok_or_else(unknown)?;
                // Only names the server listed, exactly: an upstream that normalises names
                // cannot be reached past a policy on the listed one.
                let listed_key = format!("{server_name}/{prompt}");
                let listed = |g: &Self| {
                    g.prompt_names
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&listed_key)
                };
                if !listed(self) && self.may_relist() {
                    let _ = self.list_readables(caller, Readable::Prompts).await;
                }
                if !listed(self) {
                    return Err(unknown());
                }
                let mut forward = json!({ "name": prompt });
                if let Some(args) = params.get("arguments") {
                    forward["arguments"] = args.clone();
                }
                (server, prompt.to_string(), forward)
            }
        };
        let _slot = self.enter_limits(caller)?;
        let mut object = None;
        if let Some(s) = &caller.session {
            s.count_call();
            let limit = match (
                caller
                    .principal
                    .agent()
                    .and_then(|a| a.max_files_per_session),
                caller.max_files_per_session,
            ) {
                (Some(a), Some(b)) => Some(u64::from(a.min(b))),
                (a, b) => a.or(b).map(u64::from),
            };
            match s.take_object_read(usize::MAX, limit, None) {
                Ok(_) => {
                    object = Some(palisade_gateway::limits::ObjectRead::new(
                        s.clone(),
                        usize::MAX,
                    ));
                }
                Err((count, _)) => {
                    return Err(RpcError {
                        code: FORBIDDEN,
                        message: format!(
                            "object read {count} refused: session {} may read {} objects (max_files_per_session)",
                            s.sid,
                            limit.unwrap_or(0)
                        ),
                        data: Some(
                            json!({ "error": "volume_limit", "count": count, "limit": limit }),
                        ),
                    });
                }
            }
        }
        event.inputs = caller
            .session
            .as_deref()
            .and_then(palisade_audit::InputContext::of);
        let cedar_name = kind.cedar_name(&key);
        event.resource = Some(format!(
            "Palisade::Resource::\"{}/{cedar_name}\"",
            server.config().name
        ));
        let (decision, version) = self.decide_read(caller, &server, &cedar_name);
        event.decision = Some(DecisionRecord {
            allowed: decision.allowed,
            policies: decision.policies.clone(),
            policy_version: Some(version.clone()),
        });
        if !decision.allowed {
            return Err(RpcError {
                code: FORBIDDEN,
                message: format!(
                    "{} may not read `{key}` of `{}`; decided by {}",
                    caller.principal.id,
                    server.config().name,
                    decision.policies.join(", ")
                ),
                data: Some(
                    json!({ "deciding_policies": decision.policies, "policy_version": version }),
                ),
            });
        }
        let result = server
            .request(kind.read_method(), forward)
            .await
            .map_err(|e| upstream_failure(&server.config().name, e))
            .and_then(|r| {
                // A resource's URI is its content key, as a tool's content argument is.
                let labeled = matches!(kind, Readable::Resources)
                    && self
                        .provenance
                        .is_labeled(&content_label(&server.config().name, &key));
                let source = match kind {
                    Readable::Resources => content_label(&server.config().name, &key),
                    Readable::Prompts => format!("mcp/{}/prompt:{key}", server.config().name),
                };
                self.inspect_read(caller, &server, r, event, (labeled, &source))
            });
        if result.is_ok()
            && let Some(read) = object
        {
            read.keep();
        }
        result
    }

    /// The server that listed `uri`: `Ok(None)` if none did, `Err` if several did.
    fn lookup_resource(&self, uri: &str) -> Result<Option<Arc<Upstream>>, ()> {
        let owner = self
            .resource_servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uri)
            .cloned();
        match owner {
            None => Ok(None),
            Some(None) => Err(()),
            Some(Some(name)) => Ok(self
                .servers
                .iter()
                .find(|s| s.config().name == name)
                .cloned()),
        }
    }

    fn may_relist(&self) -> bool {
        let mut last = self.last_relist.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(10)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// A `tools/call` whose agent asked for progress and takes an event stream. A call that ends
    /// before the server reports progress is answered like any other (so refusals keep their
    /// HTTP status and step-up challenge); once progress arrives, the answer becomes an event
    /// stream of the progress notifications and then the result, which is released only after
    /// its audit event is written, as always.
    async fn call_tool_streaming(
        self: &Arc<Self>,
        caller: &Caller,
        params: Value,
        started: Instant,
        (agent_token, elicit, trace, token): (
            Option<Value>,
            Option<Elicit>,
            Option<String>,
            Option<String>,
        ),
        id: Value,
    ) -> Streamed {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(64);
        // Turns true when the agent leaves: a send fails, or it cancels this request.
        let (gone_tx, gone_rx) = tokio::sync::watch::channel(false);
        let gone_tx = Arc::new(gone_tx);
        let cancel_key = (caller.principal.id.to_string(), id.to_string());
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cancel_key.clone(), gone_tx.clone());
        let stream = CallStream {
            progress: agent_token.map(|agent_token| progress::Sink {
                agent_token,
                tx: tx.clone(),
            }),
            elicit: elicit.map(|m| (m, tx, gone_rx)),
            token,
        };
        let this = self.clone();
        let caller = caller.clone();
        let cancels = self.clone();
        let mut call = tokio::spawn(async move {
            let out = this
                .call_tool(&caller, &params, started, stream, trace)
                .await;
            cancels
                .cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&cancel_key);
            out
        });
        // Progress already queued wins over a finished call, so it is not dropped.
        let first = tokio::select! {
            biased;
            first = rx.recv() => first,
            done = &mut call => return Streamed::Done(joined(done)),
        };
        let Some(first) = first else {
            // The sink is gone: the call is ending; answer as usual.
            return Streamed::Done(joined(call.await));
        };
        let (body_tx, body_rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let send = |m: &Value| {
                let event = format!("event: message\ndata: {m}\n\n");
                body_tx.send(Ok::<_, std::io::Error>(bytes::Bytes::from(event)))
            };
            if send(&first).await.is_err() {
                let _ = gone_tx.send(true);
                let _ = call.await;
                return;
            }
            // A comment every 15 s keeps proxies and clients from timing out a call that waits
            // (for an approval), and finds out when the agent left.
            let mut keepalive = tokio::time::interval(Duration::from_secs(15));
            keepalive.reset();
            let outcome = loop {
                tokio::select! {
                    biased;
                    done = &mut call => break joined(done),
                    next = rx.recv() => match next {
                        Some(note) => {
                            if send(&note).await.is_err() {
                                // The agent left: a waiting approval is withdrawn; a running
                                // call still finishes and is audited.
                                let _ = gone_tx.send(true);
                                break joined(call.await);
                            }
                        }
                        None => break joined(call.await),
                    },
                    _ = keepalive.tick() => {
                        let ping = bytes::Bytes::from_static(b": keep-alive\n\n");
                        if body_tx.send(Ok(ping)).await.is_err() {
                            let _ = gone_tx.send(true);
                            break joined(call.await);
                        }
                    }
                }
            };
            // Progress that arrived before the result goes out before it (the select above
            // prefers the finished call, so some may still be queued).
            while let Ok(note) = rx.try_recv() {
                if send(&note).await.is_err() {
                    break;
                }
            }
            let last = match outcome {
                Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
                Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
            };
            let _ = send(&last).await;
        });
        let mut resp = Response::new(Body::from_stream(ReceiverStream(body_rx)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Streamed::Stream(resp)
    }

    /// `tools/call`: every exit, refusals included, writes one `mcp.tool_call` event. With a
    /// sink, the server's progress reports for this call go to it.
    async fn call_tool(
        &self,
        caller: &Caller,
        params: &Value,
        started: Instant,
        stream: CallStream,
        trace_id: Option<String>,
    ) -> Result<Value, RpcError> {
        let mut event = AuditEvent::new("mcp.tool_call");
        event.trace_id = trace_id;
        if let Some(r) = params
            .pointer("/_meta/palisade~1reasoning")
            .and_then(Value::as_str)
        {
            event.reasoning = Some(inspection::reasoning(&self.inspector, r));
        }
        event.principal = Some(PrincipalRef::of(&caller.principal));
        if let Some(human) = &caller.initiating_human {
            event.delegation = Some(palisade_audit::Delegation {
                initiating_human: human.clone(),
                actor_chain: caller.actor_chain.clone(),
            });
        }
        event.detail = json!({
            "tool": params.get("name"),
            "session": caller.session.as_ref().map(|s| s.sid.clone()),
            "token_id": caller.token_id,
        });
        let result = self
            .call_tool_inner(caller, params, &mut event, stream)
            .await;
        self.finish_audited(event, result, started).await
    }

    async fn call_tool_inner(
        &self,
        caller: &Caller,
        params: &Value,
        event: &mut AuditEvent,
        stream: CallStream,
    ) -> Result<Value, RpcError> {
        let CallStream {
            progress: sink,
            elicit,
            token,
        } = stream;
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::new(-32602, "tools/call needs a `name`".into()))?;
        let arguments = params
            .get("arguments")
            .cloned()
            .unwrap_or_else(|| json!({}));
        if !arguments.is_object() {
            return Err(RpcError::new(
                -32602,
                "`arguments` must be an object".into(),
            ));
        }
        // What the session read before this call (references, never content).
        event.inputs = caller
            .session
            .as_deref()
            .and_then(palisade_audit::InputContext::of);
        event.detail["arguments_sha256"] =
            json!(hex(&Sha256::digest(arguments.to_string().as_bytes())));
        let unknown = || {
            RpcError::new(
                -32602,
                format!(
                    "unknown tool `{name}`; tools are named <server>{SEPARATOR}<tool> (see tools/list)"
                ),
            )
        };
        let (server_name, tool_name) = name.split_once(SEPARATOR).ok_or_else(unknown)?;
        event.resource = Some(format!("Palisade::Tool::\"{server_name}/{tool_name}\""));
        if let Some(s) = self.servers.iter().find(|s| s.config().name == server_name) {
            event.detail["resource_type"] = json!(s.config().kind);
        }
        let _slot = self.enter_limits(caller)?;
        let server = self
            .servers
            .iter()
            .find(|s| s.config().name == server_name)
            .ok_or_else(unknown)?;
        let definition = server
            .tools()
            .await
            .map_err(|e| upstream_failure(server_name, e))?
            .into_iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some(tool_name))
            .ok_or_else(unknown)?;
        if let Pin::Changed { pinned, current } = self.check_pin(server_name, &definition).await
            && self.blocks_changes(server_name)
        {
            return Err(RpcError {
                code: FORBIDDEN,
                message: format!(
                    "tool `{name}` changed its definition since it was pinned and is blocked until an administrator accepts it (palisade mcp accept {server_name}/{tool_name} --sha256 {current})"
                ),
                data: Some(json!({ "pinned_sha256": pinned, "current_sha256": current })),
            });
        }
        let class = self.action_of(server, &definition);
        event.action = Some(class.as_str().into());
        let typed = typed_arguments(server, tool_name, &arguments)?;
        event.detail["arguments"] = Value::Object(redacted(&typed, &arguments, &self.inspector));
        // Counted before the decision, so `context.calls` includes this call (as on HTTP).
        if let Some(s) = &caller.session {
            s.count_call();
        }
        // What the agent sends in the arguments is inspected before the decision, so policies
        // see `context.findings` and `context.data_tier`.
        let policy = server.config().inspection;
        let sent = policy.enabled.then(|| {
            let text = strings_of(&arguments).join("\n");
            let verdict = inspection::judge(&self.inspector, &text, &policy, Flow::Send);
            if !verdict.report.findings.is_empty() {
                let action = if verdict.blocked.is_empty() {
                    if verdict.sanitize {
                        "sanitize"
                    } else {
                        "allow"
                    }
                } else {
                    "block"
                };
                event.detail["inspection_send"] =
                    inspection::audit_record(&self.inspector, &text, &verdict, Flow::Send, action);
            }
            verdict
        });
        let (decision, version) = self.decide_with(
            caller,
            server,
            tool_name,
            true,
            action(class),
            Some(&typed),
            sent.as_ref(),
        );
        event.decision = Some(DecisionRecord {
            allowed: decision.allowed,
            policies: decision.policies.clone(),
            policy_version: Some(version.clone()),
        });
        if !decision.allowed {
            return Err(RpcError {
                code: FORBIDDEN,
                message: format!(
                    "{} may not {} with tool `{name}` (Palisade::Tool::\"{server_name}/{tool_name}\"); decided by {}",
                    caller.principal.id,
                    class.as_str(),
                    decision.policies.join(", ")
                ),
                data: Some(json!({
                    "deciding_policies": decision.policies,
                    "policy_version": version,
                })),
            });
        }
        // Privilege separation, as on the HTTP gateway: an agent's write or destructive tool call
        // needs a token with the server's write scope, asked for on its own.
        let write_scope = &server.config().write_scope;
        let has_write_scope = caller
            .scope
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|s| s == write_scope));
        if class != ActionClass::Read && caller.principal.agent().is_some() && !has_write_scope {
            return Err(RpcError {
                code: INSUFFICIENT_SCOPE,
                message: format!(
                    "{} needs a token with scope `{write_scope}` to {} with `{name}`: request one on its own (read and write never share a token)",
                    caller.principal.id,
                    class.as_str()
                ),
                data: Some(json!({ "error": "insufficient_scope", "scope": write_scope })),
            });
        }
        let content = content_key(server.config(), tool_name, &arguments)?;
        let mut arguments = arguments;
        if let Some(v) = &sent {
            if !v.blocked.is_empty() {
                return Err(RpcError {
                    code: FORBIDDEN,
                    message: inspection::blocked_message(v, Flow::Send, &format!("tool `{name}`")),
                    data: Some(json!({ "findings": inspection::header_value(v) })),
                });
            }
            if v.sanitize {
                self.sanitize_strings(&mut arguments, &policy, Flow::Send);
            }
        }
        // Approval: the policy's or the destructive default's, bound to these exact arguments
        // (as the agent sent them) and used once.
        let requirement = palisade_core::approval::requirement(
            &decision.approvals,
            self.config.approvals.destructive && class == ActionClass::Destructive,
            &self.config.approvals.defaults,
        );
        if let Some(rule) = requirement {
            let claimed = params
                .pointer("/_meta/palisade~1approval")
                .and_then(Value::as_str);
            if let Some(pending) = self
                .approve(
                    caller,
                    params,
                    event,
                    (&rule, claimed, elicit, token.as_deref()),
                    (server_name, tool_name, class),
                )
                .await?
            {
                return Ok(pending);
            }
        }
        let mut upstream_params = json!({ "name": tool_name, "arguments": arguments });
        // The agent's own progress token never travels upstream (servers are shared).
        let _route = sink.map(|s| {
            let registration = self.progress.register(s);
            upstream_params = progress::with_token(upstream_params.clone(), &registration.token);
            registration
        });
        let result = server
            .request("tools/call", upstream_params)
            .await
            .map_err(|e| upstream_failure(server_name, e))?;
        // Content a tainted session wrote is labelled (whatever the result says: a failed
        // write may have written part), so whoever reads it later is tainted too.
        if class != ActionClass::Read
            && let (Some(key), Some(s)) = (&content, &caller.session)
            && s.is_tainted()
        {
            if let Err(e) = self.provenance.label(key, &s.sid) {
                tracing::error!(error = %e, "cannot label content written by a tainted session");
                return Err(RpcError::new(
                    -32603,
                    "the label on content this tainted session wrote cannot be stored, so the result is withheld".into(),
                ));
            }
            event.detail["content_labeled"] = json!(key);
        }
        let labeled = class == ActionClass::Read
            && content
                .as_deref()
                .is_some_and(|k| self.provenance.is_labeled(k));
        let source = content
            .clone()
            .unwrap_or_else(|| format!("mcp/{server_name}/{tool_name}"));
        self.inspect_read(caller, server, result, event, (labeled, &source))
    }

    /// The approval gate of a tool call: `Ok(None)` to go ahead (the approval is now used),
    /// `Ok(Some(result))` with a tool error saying the call waits, or a refusal.
    async fn approve(
        &self,
        caller: &Caller,
        params: &Value,
        event: &mut AuditEvent,
        (rule, claimed, elicit, token): (
            &palisade_core::approval::ResolvedRule,
            Option<&str>,
            Option<ElicitTo>,
            Option<&str>,
        ),
        (server_name, tool_name, class): (&str, &str, ActionClass),
    ) -> Result<Option<Value>, RpcError> {
        let Some(approvals) = self.approvals.clone() else {
            return Err(RpcError::new(
                FORBIDDEN,
                "this call needs approval, and this gateway has no approval service; it is refused"
                    .into(),
            ));
        };
        let arguments = params
            .get("arguments")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let body = arguments.to_string();
        let target = format!("{server_name}/{tool_name}");
        let resource = format!("Palisade::Tool::\"{target}\"");
        let request_id = event
            .request_id
            .clone()
            .unwrap_or_else(|| event.event_id.clone());
        let action = palisade_approval::Action {
            principal: &caller.principal,
            initiating_human: caller.initiating_human.as_deref(),
            session: caller.session.as_ref().map(|s| s.sid.as_str()),
            channel: "mcp",
            action: class.as_str(),
            resource: &resource,
            method: "tools/call",
            target: &target,
            context: "",
            query: None,
            body: body.as_bytes(),
            preview: palisade_gateway::approval::preview(&self.inspector, body.as_bytes()),
            reasoning: event.reasoning.as_ref().map(|r| r.text.clone()),
            request_id: &request_id,
        };
        let elicit_was = elicit.is_some();
        let mut gate = approvals.gate(&action, rule, claimed).await;
        let hold = self.config.approvals.hold_secs;
        if let palisade_approval::Gate::Pending(a) = &gate {
            let id = a.id.clone();
            match elicit {
                // A client that can ask its user shows the request (and, in URL mode, the
                // approval link) while the call waits for the decision; declining, or leaving,
                // withdraws it. Accepting approves nothing: only approvers decide, with their
                // own tokens.
                Some(to) => {
                    let what = format!("tool `{server_name}{SEPARATOR}{tool_name}`");
                    if self.elicit_approval(caller, a, to, &approvals, &what).await {
                        let status = approvals
                            .withdraw(&id, &caller.principal)
                            .await
                            .map_err(|e| RpcError::new(-32603, e))?;
                        if status == palisade_approval::ApprovalStatus::Withdrawn {
                            event.detail["approval"] =
                                json!({ "id": id, "refused": "approval_withdrawn" });
                            return Err(RpcError {
                                code: FORBIDDEN,
                                message: format!(
                                    "the call was withdrawn at the client before approval `{id}` was used; it did not run"
                                ),
                                data: Some(
                                    json!({ "error": "approval_withdrawn", "approval_id": id }),
                                ),
                            });
                        }
                    }
                }
                None if hold > 0 => {
                    approvals.wait(&id, Duration::from_secs(hold)).await;
                }
                None => {}
            }
            if elicit_was || hold > 0 {
                // While it waited, the session may have ended or the token been revoked.
                self.still_live(caller, token)?;
                gate = approvals.gate(&action, rule, Some(&id)).await;
            }
        }
        match gate {
            palisade_approval::Gate::Proceed(a) => {
                event.detail["approval"] =
                    palisade_gateway::approval::used(&a, &approvals.link(&a.id));
                Ok(None)
            }
            palisade_approval::Gate::Pending(a) => {
                let summary = palisade_gateway::approval::summary(&a, &approvals.link(&a.id));
                event.detail["approval"] = summary.clone();
                let text = palisade_gateway::approval::waiting_message(
                    &a,
                    &format!("tool `{server_name}{SEPARATOR}{tool_name}`"),
                );
                Ok(Some(json!({
                    "content": [{ "type": "text", "text": text }],
                    "isError": true,
                    "_meta": { "palisade/approval": summary },
                })))
            }
            palisade_approval::Gate::Refused { code, message, id } => {
                if let Some(id) = &id {
                    event.detail["approval"] = json!({ "id": id, "refused": code });
                }
                event.detail["approval_refused"] = json!(code);
                Err(RpcError {
                    code: FORBIDDEN,
                    message,
                    data: Some(json!({ "error": code, "approval_id": id })),
                })
            }
            palisade_approval::Gate::Unavailable(reason) => {
                tracing::error!(%reason, "approval service unavailable; refusing");
                Err(RpcError::new(
                    -32603,
                    "the approval could not be recorded; retry later".into(),
                ))
            }
        }
    }

    /// After a wait: the session still live and the token still good (not revoked, the agent
    /// not suspended), as the HTTP gateway checks before forwarding a held call.
    fn still_live(&self, caller: &Caller, token: Option<&str>) -> Result<(), RpcError> {
        let ended = caller.session.as_ref().is_some_and(|s| s.is_ended());
        let revoked = token.is_some_and(|t| {
            self.auth
                .authenticate(t, &self.config.mcp.audience)
                .is_err()
        });
        if ended || revoked {
            return Err(RpcError::new(
                FORBIDDEN,
                "the token or its session ended while the call waited for approval".into(),
            ));
        }
        Ok(())
    }

    /// Shows a waiting approval to the client's user (MCP elicitation) and waits, up to
    /// [`ELICIT_WAIT`], for the decision; true when the user declined or the client left (the
    /// request is to be withdrawn). `cancel` (dismissed without a choice) keeps waiting.
    async fn elicit_approval(
        &self,
        caller: &Caller,
        a: &palisade_approval::Approval,
        (mode, tx, mut gone): ElicitTo,
        approvals: &palisade_approval::Approvals,
        what: &str,
    ) -> bool {
        let eid = match palisade_core::secret::random_id::<12>() {
            Ok(r) => format!("palisade-elicit-{r}"),
            Err(_) => return false,
        };
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        self.elicitations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(eid.clone(), (caller.principal.id.to_string(), answer_tx));
        // The entry goes however this ends (answered, decided, timed out, or dropped).
        struct Forget<'a>(&'a McpGateway, &'a str);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0
                    .elicitations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(self.1);
            }
        }
        let _forget = Forget(self, &eid);
        let link = approvals.link(&a.id);
        let message = format!(
            "{}. Approvers decide at {link}. Decline to withdraw the call.",
            palisade_gateway::approval::waiting_message(a, what)
        );
        // URL mode only for a link a person can open (a configured console page); the default
        // link is an API route that needs an approver token.
        let url_mode = mode == Elicit::Url && !self.config.approvals.link_derived;
        let params = if url_mode {
            json!({ "mode": "url", "message": message, "url": link, "elicitationId": eid })
        } else {
            json!({
                "message": message,
                "requestedSchema": { "type": "object", "properties": {} },
            })
        };
        let request = json!({ "jsonrpc": "2.0", "id": eid, "method": "elicitation/create", "params": params });
        if tx.send(request).await.is_err() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + ELICIT_WAIT;
        let left = async move {
            while gone.changed().await.is_ok() {
                if *gone.borrow() {
                    return;
                }
            }
            // The stream's owner is gone too.
        };
        tokio::pin!(left);
        let withdraw = tokio::select! {
            answer = answer_rx => {
                let action = answer.ok().and_then(|m| {
                    m.pointer("/result/action").and_then(Value::as_str).map(str::to_string)
                });
                if action.as_deref() == Some("decline") {
                    true
                } else {
                    // Accepted, dismissed, or the client could not ask: wait for the decision
                    // unless the client leaves.
                    tokio::select! {
                        () = approvals.wait(&a.id, deadline.saturating_duration_since(tokio::time::Instant::now())) => false,
                        () = &mut left => true,
                    }
                }
            }
            () = approvals.wait(&a.id, ELICIT_WAIT) => false,
            () = &mut left => true,
        };
        let decided = approvals
            .get(&a.id)
            .await
            .ok()
            .flatten()
            .is_some_and(|x| x.status != palisade_approval::ApprovalStatus::Pending);
        if url_mode && !withdraw && decided {
            let _ = tx.try_send(json!({
                "jsonrpc": "2.0",
                "method": "notifications/elicitation/complete",
                "params": { "elicitationId": eid },
            }));
        }
        withdraw
    }

    /// What a tool result, resource or prompt brings to the agent: inspected under the
    /// server's read actions (refused, sanitized or annotated in `_meta`), and the session
    /// tainted or marked sensitive (and stored) before the agent gets it.
    fn inspect_read(
        &self,
        caller: &Caller,
        server: &Upstream,
        mut result: Value,
        event: &mut AuditEvent,
        (labeled, source): (bool, &str),
    ) -> Result<Value, RpcError> {
        // A server that repeats a credential it was given from the vault does not hand it to
        // the agent.
        let forms = self.vault_values(server);
        if !forms.is_empty() && mask_values(&mut result, &forms) {
            event.detail["credential_echo_masked"] = json!(true);
        }
        let config = server.config();
        let policy = config.inspection;
        let mut verdict = None;
        if policy.enabled {
            let text = strings_of(&result).join("\n");
            let v = inspection::judge(&self.inspector, &text, &policy, Flow::Read);
            let action = if !v.blocked.is_empty() {
                "block"
            } else if v.sanitize {
                "sanitize"
            } else if v.annotate {
                "annotate"
            } else {
                "allow"
            };
            if !v.report.findings.is_empty() {
                event.detail["inspection_read"] =
                    inspection::audit_record(&self.inspector, &text, &v, Flow::Read, action);
            }
            if !v.blocked.is_empty() {
                return Err(RpcError {
                    code: FORBIDDEN,
                    message: inspection::blocked_message(
                        &v,
                        Flow::Read,
                        &format!("server `{}`", config.name),
                    ),
                    data: Some(json!({ "findings": inspection::header_value(&v) })),
                });
            }
            if v.sanitize {
                self.sanitize_strings(&mut result, &policy, Flow::Read);
            }
            if v.annotate
                && let Some(obj) = result.as_object_mut()
            {
                let meta = obj.entry("_meta").or_insert_with(|| json!({}));
                if let Some(m) = meta.as_object_mut() {
                    m.insert(
                        "palisade/findings".into(),
                        json!({
                            "categories": v.categories,
                            "summary": inspection::header_value(&v),
                            "sanitized": v.sanitize,
                        }),
                    );
                }
            }
            verdict = Some(v);
        }
        if let Some(s) = &caller.session {
            let mut changed = match &verdict {
                Some(v) => inspection::mark_session(s, v, config.classification),
                None => {
                    config.classification >= palisade_core::principal::Classification::Confidential
                        && s.mark_sensitive()
                }
            };
            if policy.untrusted {
                changed |= s.add_taint("untrusted");
            }
            if labeled {
                changed |= s.add_taint("tainted-content");
            }
            if s.is_tainted() || s.is_sensitive() {
                event.detail["session_state"] =
                    json!({ "taint": s.taint(), "sensitive": s.is_sensitive() });
            }
            if changed && let Err(e) = self.provenance.session_changed(s) {
                tracing::error!(error = %e, "cannot store the session's taint; withholding the result");
                return Err(RpcError::new(
                    -32603,
                    "the session's state cannot be stored, so the result is withheld".into(),
                ));
            }
            // The session now holds this result: later calls' events reference it.
            let mut labels: Vec<String> = verdict
                .as_ref()
                .map(|v| v.categories.clone())
                .unwrap_or_default();
            if policy.untrusted {
                labels.push("untrusted".into());
            }
            if labeled {
                labels.push("tainted-content".into());
            }
            s.add_input(palisade_core::session::InputRef {
                source: source.to_string(),
                sha256: Some(hex(&Sha256::digest(result.to_string().as_bytes()))),
                labels,
                time_ns: i64::try_from(self.clock.now().unix_nanos()).unwrap_or(i64::MAX),
            });
        }
        Ok(result)
    }

    /// The values of the vault secrets the server's environment and headers reference.
    fn vault_values(&self, server: &Upstream) -> Vec<zeroize::Zeroizing<String>> {
        let c = server.config();
        let mut out = Vec::new();
        for text in c
            .env
            .iter()
            .map(|(_, v)| v.expose())
            .chain(c.headers.iter().map(|(_, v)| v.expose()))
        {
            for name in vault_refs(text) {
                if let Ok(v) = self.credentials.reveal(name)
                    && let Ok(s) = String::from_utf8(v.to_vec())
                {
                    out.push(zeroize::Zeroizing::new(s));
                }
            }
        }
        out
    }

    /// Sanitizes every string of `value` on its own (masking and stripping per the policy).
    fn sanitize_strings(&self, value: &mut Value, policy: &InspectionPolicy, flow: Flow) {
        match value {
            Value::String(text) => {
                let v = inspection::judge(&self.inspector, text, policy, flow);
                if v.sanitize {
                    *text = inspection::sanitized(&self.inspector, text, &v, policy, flow);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.sanitize_strings(item, policy, flow);
                }
            }
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    if !SKIPPED_KEYS.contains(&key.as_str()) {
                        self.sanitize_strings(item, policy, flow);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Replaces every occurrence of `forms` in the strings of `value`; returns whether any was.
fn mask_values(value: &mut Value, forms: &[zeroize::Zeroizing<String>]) -> bool {
    match value {
        Value::String(text) => {
            let mut hit = false;
            for f in forms.iter().filter(|f| !f.is_empty()) {
                if text.contains(f.as_str()) {
                    *text = text.replace(f.as_str(), "[REDACTED:credential]");
                    hit = true;
                }
            }
            hit
        }
        // Every element is masked (no short-circuit).
        Value::Array(items) => {
            let mut hit = false;
            for i in items {
                hit |= mask_values(i, forms);
            }
            hit
        }
        Value::Object(map) => {
            let mut hit = false;
            for i in map.values_mut() {
                hit |= mask_values(i, forms);
            }
            hit
        }
        _ => false,
    }
}

/// The names of the vault secrets `text` references (`${vault:NAME}`).
fn vault_refs(text: &str) -> impl Iterator<Item = &str> {
    text.split("${vault:")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
}

/// The label key of content on an MCP server: `mcp/<server>:<path or URI>`.
fn content_label(server: &str, content: &str) -> String {
    format!("mcp/{server}:{content}")
}

/// The label key of the content a tool call reads or writes, when the config names the
/// argument that holds it; that argument must then be a string.
fn content_key(
    server: &palisade_config::McpServerConfig,
    tool: &str,
    arguments: &Value,
) -> Result<Option<String>, RpcError> {
    let Some((_, arg)) = server.tool_content.iter().find(|(t, _)| t == tool) else {
        return Ok(None);
    };
    match arguments.get(arg) {
        Some(Value::String(v)) => Ok(Some(content_label(&server.name, v))),
        _ => Err(RpcError::new(
            -32602,
            format!(
                "tool `{}{SEPARATOR}{tool}` needs its content argument `{arg}` as a string",
                server.name
            ),
        )),
    }
}

/// The call's arguments that the config declares for this tool, converted to their declared
/// types; a declared argument of another JSON type is refused (it could dodge a policy).
fn typed_arguments(
    server: &Upstream,
    tool: &str,
    arguments: &Value,
) -> Result<Vec<(String, ArgValue)>, RpcError> {
    let Some((_, declared)) = server
        .config()
        .tool_arguments
        .iter()
        .find(|(t, _)| t == tool)
    else {
        return Ok(Vec::new());
    };
    // A key that differs from a declared name only in case could reach an upstream that matches
    // keys without regard to case while the policy saw the declared one: refused.
    if let Some(obj) = arguments.as_object()
        && let Some(k) = obj.keys().find(|k| {
            declared
                .iter()
                .any(|(n, _)| n != *k && n.eq_ignore_ascii_case(k))
        })
    {
        return Err(RpcError::new(
            -32602,
            format!(
                "argument `{k}` of `{tool}` differs from a declared argument only in case; send it once, as declared"
            ),
        ));
    }
    let mut out = Vec::new();
    for (name, ty) in declared {
        let Some(value) = arguments.get(name) else {
            continue;
        };
        let converted = match ty {
            ArgType::String => value.as_str().map(|s| ArgValue::String(s.to_string())),
            ArgType::Long => value.as_i64().map(ArgValue::Long),
            ArgType::Bool => value.as_bool().map(ArgValue::Bool),
            ArgType::StringSet => value.as_array().and_then(|a| {
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .map(ArgValue::StringSet)
            }),
            ArgType::LongSet => value.as_array().and_then(|a| {
                a.iter()
                    .map(Value::as_i64)
                    .collect::<Option<Vec<_>>>()
                    .map(ArgValue::LongSet)
            }),
        };
        match converted {
            Some(v) => out.push((name.clone(), v)),
            None => {
                return Err(RpcError::new(
                    -32602,
                    format!(
                        "argument `{name}` of `{tool}` must be a {} (declared in the config); the call was not made",
                        ty.as_str()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// The declared argument values policies saw, for the audit event; secret-looking names are
/// kept only as keyed fingerprints (`hmac:<hex>`).
fn redacted(
    typed: &[(String, ArgValue)],
    arguments: &Value,
    inspector: &palisade_inspect::Inspector,
) -> serde_json::Map<String, Value> {
    typed
        .iter()
        .map(|(k, _)| {
            let lower = k.to_ascii_lowercase();
            let secret = [
                "password",
                "passwd",
                "secret",
                "token",
                "key",
                "credential",
                "auth",
            ]
            .iter()
            .any(|s| lower.contains(s));
            // A secret-looking value is kept only as a keyed fingerprint: equal values can be
            // correlated across events, the value itself cannot be read.
            let shown = if secret {
                let value = arguments.get(k).map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                json!(format!(
                    "hmac:{}",
                    inspector.fingerprint(value.as_deref().unwrap_or(""))
                ))
            } else {
                arguments.get(k).cloned().unwrap_or(Value::Null)
            };
            (k.clone(), shown)
        })
        .collect()
}

/// How a streamed call was answered.
enum Streamed {
    /// It ended before any progress: answer as usual.
    Done(Result<Value, RpcError>),
    /// Progress arrived: the event stream carries the rest.
    Stream(Response<Body>),
}

/// The outcome of a spawned call; a call task that panicked is an internal error.
fn joined(r: Result<Result<Value, RpcError>, tokio::task::JoinError>) -> Result<Value, RpcError> {
    r.unwrap_or_else(|_| {
        Err(RpcError::new(
            -32603,
            "the call failed inside Palisade".into(),
        ))
    })
}

/// A matcher for an RFC 6570 URI template (the forms MCP servers use): `{var}` is one path
/// segment's worth (no `/`, `?` or `#`), `{+var}` and `{#var}` anything, `{/var}` path
/// segments, `{?var}` and `{&var}` a query. `None` for a template that is not one.
fn template_matcher(template: &str) -> Option<Regex> {
    if template.len() > 2048 {
        return None;
    }
    let mut pattern = String::from("^");
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        pattern.push_str(&regex::escape(rest.get(..open)?));
        let close = rest.get(open..)?.find('}')? + open;
        let expr = rest.get(open + 1..close)?;
        pattern.push_str(match expr.chars().next()? {
            '+' | '#' => ".*",
            '/' => "(?:/[^/?#]*)*",
            '?' | '&' => "(?:[?&][^#]*)?",
            '.' => "(?:\\.[^/?#.]*)*",
            _ => "[^/?#]*",
        });
        rest = rest.get(close + 1..)?;
    }
    if rest.contains('}') {
        return None;
    }
    pattern.push_str(&regex::escape(rest));
    pattern.push('$');
    Regex::new(&pattern).ok()
}

/// Keys whose string values are protocol data, not content (never inspected or rewritten).
const SKIPPED_KEYS: &[&str] = &["_meta", "type", "mimeType", "uri", "name", "role"];

/// Every string of `value` (content, not protocol fields), for inspection.
fn strings_of(value: &Value) -> Vec<&str> {
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => map
                .iter()
                .filter(|(k, _)| !SKIPPED_KEYS.contains(&k.as_str()))
                .for_each(|(_, i)| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out
}

/// An mpsc receiver as a stream of body chunks.
struct ReceiverStream(tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Resources or prompts: what differs between the two.
#[derive(Clone, Copy)]
enum Readable {
    Resources,
    Prompts,
}

impl Readable {
    fn list_method(self) -> &'static str {
        match self {
            Self::Resources => "resources/list",
            Self::Prompts => "prompts/list",
        }
    }

    fn read_method(self) -> &'static str {
        match self {
            Self::Resources => "resources/read",
            Self::Prompts => "prompts/get",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Self::Resources => "resources",
            Self::Prompts => "prompts",
        }
    }

    /// The name inside the server's route: the URI, or `prompt:<name>`.
    fn cedar_name(self, key: &str) -> String {
        match self {
            Self::Resources => key.to_string(),
            Self::Prompts => format!("prompt:{key}"),
        }
    }
}

fn action(class: ActionClass) -> Action {
    match class {
        ActionClass::Read => Action::Read,
        ActionClass::Write => Action::Write,
        ActionClass::Destructive => Action::Destructive,
    }
}

fn upstream_failure(server: &str, e: UpstreamError) -> RpcError {
    match e {
        UpstreamError::Rpc(error) => RpcError {
            // Palisade's own codes mean Palisade's refusals; an upstream cannot borrow them.
            code: match error.get("code").and_then(Value::as_i64) {
                Some(FORBIDDEN | RATE_LIMITED | INSUFFICIENT_SCOPE) | None => -32603,
                Some(c) => c,
            },
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the MCP server failed")
                .to_string(),
            data: error.get("data").cloned(),
        },
        UpstreamError::Unavailable(text) => {
            RpcError::new(-32603, format!("MCP server `{server}`: {text}"))
        }
    }
}

struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: String) -> Self {
        Self {
            code,
            message,
            data: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.data {
            v["data"] = d.clone();
        }
        v
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn rpc_error_response(
    status: StatusCode,
    id: Value,
    code: i64,
    message: &str,
    data: Option<Value>,
) -> Response<Body> {
    let mut error = json!({ "code": code, "message": message });
    if let Some(d) = data {
        error["data"] = d;
    }
    json_response(
        status,
        &json!({ "jsonrpc": "2.0", "id": id, "error": error }),
    )
}

fn plain(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

fn accepted() -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uri_templates_match_the_uris_they_describe() {
        let cases = [
            (
                "demo://resource/dynamic/text/{id}",
                "demo://resource/dynamic/text/7",
                true,
            ),
            (
                "demo://resource/dynamic/text/{id}",
                "demo://resource/dynamic/text/7/x",
                false,
            ),
            (
                "demo://resource/dynamic/text/{id}",
                "demo://resource/dynamic/blob/7",
                false,
            ),
            ("file:///{+path}", "file:///etc/hosts", true),
            (
                "repo://{owner}/{repo}/issues{?state}",
                "repo://a/b/issues?state=open",
                true,
            ),
            (
                "repo://{owner}/{repo}/issues{?state}",
                "repo://a/b/issues",
                true,
            ),
            ("a.b/{x}", "aXb/1", false),
        ];
        for (template, uri, expected) in cases {
            let m = template_matcher(template).unwrap();
            assert_eq!(m.is_match(uri), expected, "{template} vs {uri}");
        }
        assert!(template_matcher("bad://{unclosed").is_none());
        assert!(template_matcher("bad://x}").is_none());
    }
}
