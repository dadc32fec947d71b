//! The enforcement point for HTTP APIs: every request through a route passes these phases, in
//! this order, and each later feature (sessions and limits, inspection, credential injection,
//! approvals) becomes one more phase in the list:
//!
//! 1. **route**: longest path prefix; no route → 404 (not audited: nothing was decided).
//! 2. **authenticate**: bearer access token for the route's audience, principal still active,
//!    token not revoked, the agent's session live → else 401 with `WWW-Authenticate` (and
//!    `Palisade-Clear-Context` when the session is over). The session counts the call.
//! 3. **classify**: method + route rules → action class and resource.
//! 4. **limit**: declared body size over the route's limit → 413; rate limits (agent, route,
//!    agent×route; GCRA) → 429 with `Retry-After`; requests in flight per agent → 429; the
//!    session's object-read volume (`max_files_per_session`, route `max_objects_per_session`)
//!    → 403 with the counter and the limit.
//! 5. **inspect what is sent**: a textual request body is read (up to `[inspection] max_bytes`)
//!    and inspected; its findings reach the decision's context.
//! 6. **decide**: the policy decision point → else 403 naming the deciding policies; then the
//!    write scope, then the inspection's block action (403).
//! 7. **forward**: hop-by-hop headers and the bearer token removed, pooled upstream connection,
//!    timeouts → 502/504 on failure; bodies are metered into the session's byte counters; a
//!    response over the route's `max_response_bytes` is cut off.
//! 8. **inspect what is read**: a textual response is read whole and inspected (block → 502,
//!    sanitize, annotate); the session's taint and sensitivity are updated and stored.
//! 9. **audit**: one event per decision, durable before the response is released; if the audit
//!    write fails the client gets 503 instead.
//!
//! This crate never sees a token's signature or the store: authentication and decisions come in
//! through the [`Authenticator`] and [`DecisionPoint`] traits, which the server implements.

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Limited;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade_audit::{AuditEvent, AuditLog, DecisionRecord, Outcome, PrincipalRef};
use palisade_config::{ActionClass, Config, RouteConfig};
use palisade_core::Principal;
use palisade_policy::{Action, Decision, RequestContext, Target};
use serde_json::json;
use std::sync::Arc;

pub mod approval;
pub mod inspection;
pub mod limits;
use inspection::{Flow, Provenance};
use limits::{Direction, Limits, Metered, ObjectRead};
use palisade_core::session::{LiveSession, SessionRefusal};
use palisade_inspect::Inspector;
use std::time::{Duration, Instant};

/// An authenticated caller of the gateway.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The principal, as the registry holds it now.
    pub principal: Arc<Principal>,
    /// The token's `jti`.
    pub token_id: String,
    /// The agent's session (agents only).
    pub session: Option<Arc<LiveSession>>,
    /// The token's `max_files_per_session` claim.
    pub max_files_per_session: Option<u32>,
    /// For a delegated token (RFC 8693), the human the agent acts for.
    pub initiating_human: Option<String>,
    /// For a delegated token, the actors from the current agent back to the first.
    pub actor_chain: Vec<String>,
    /// The token's scopes (space-separated), if any.
    pub scope: Option<String>,
}

/// Why authentication failed; the text is safe to return and to log.
#[derive(Clone, Debug)]
pub struct AuthFailure {
    /// The principal the token named, if the signature was good.
    pub subject: Option<String>,
    /// Safe reason text.
    pub reason: String,
    /// Set when the token's session is over: the caller must clear its context.
    pub session: Option<SessionRefusal>,
}

/// Checks bearer tokens (the server's token service implements it).
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `token` for `audience` and returns the live principal.
    fn authenticate(&self, token: &str, audience: &str) -> Result<Caller, AuthFailure>;
}

/// Answers policy questions (the server's current policy engine implements it).
pub trait DecisionPoint: Send + Sync + 'static {
    /// Decides, returning the decision and the policy-set version that made it.
    fn decide(
        &self,
        principal: &Principal,
        action: Action,
        target: &Target<'_>,
        ctx: &RequestContext<'_>,
    ) -> (Decision, String);
}

/// The HTTP gateway.
pub struct Gateway {
    config: Arc<Config>,
    client: Client<HttpConnector, Body>,
    auth: Arc<dyn Authenticator>,
    pdp: Arc<dyn DecisionPoint>,
    audit: AuditLog,
    clock: Arc<dyn palisade_core::Clock>,
    limits: Arc<Limits>,
    inspector: Arc<Inspector>,
    provenance: Arc<dyn Provenance>,
    credentials: Arc<dyn CredentialSource>,
    approvals: Option<Arc<palisade_approval::Approvals>>,
}

/// The header in which an agent states why it makes a request (audited, never forwarded).
pub const REASONING_HEADER: &str = "palisade-reasoning";

// RFC 9110 §7.6.1 hop-by-hop fields, plus proxy credentials; never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Where injected credentials come from (the vault).
pub trait CredentialSource: Send + Sync + 'static {
    /// The secret's value; the error names the secret, never a value.
    fn reveal(&self, secret: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String>;
}

/// `text` with each `${vault:NAME}` replaced by that secret (UTF-8); `$$` was already folded
/// by the config, so any `${vault:` here is a reference. The error names the secret only.
pub fn expand_vault(
    text: &str,
    source: &dyn CredentialSource,
) -> Result<zeroize::Zeroizing<String>, String> {
    let mut out = zeroize::Zeroizing::new(String::with_capacity(text.len()));
    let mut rest = text;
    while let Some(i) = rest.find("${vault:") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "${vault:".len()..];
        let end = after
            .find('}')
            .ok_or_else(|| "a `${vault:` reference is not closed".to_string())?;
        let name = &after[..end];
        let value = source.reveal(name)?;
        let value = std::str::from_utf8(&value)
            .map_err(|_| format!("vault secret `{name}` is not UTF-8 text"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// No vault: every injection fails closed.
struct NoCredentials;

impl CredentialSource for NoCredentials {
    fn reveal(&self, secret: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        Err(format!("no vault is configured to hold `{secret}`"))
    }
}

/// A credential on its way upstream: how it is sent and the forms an echo of it may take.
struct Injected<'a> {
    config: &'a palisade_config::CredentialConfig,
    value: zeroize::Zeroizing<Vec<u8>>,
}

impl Injected<'_> {
    /// The byte strings that must never reach the agent: the value and, for basic auth, its
    /// encoded header form.
    fn forms(&self) -> Vec<zeroize::Zeroizing<Vec<u8>>> {
        let mut forms = vec![self.value.clone()];
        if let palisade_config::CredentialKind::Basic(user) = &self.config.kind {
            use base64::Engine;
            let mut pair = zeroize::Zeroizing::new(format!("{user}:").into_bytes());
            pair.extend_from_slice(&self.value);
            forms.push(zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .encode(pair.as_slice())
                    .into_bytes(),
            ));
        }
        forms
    }
}

/// Replaces every occurrence of each form in `bytes`; returns whether any was found.
fn mask_echoes(bytes: &[u8], forms: &[zeroize::Zeroizing<Vec<u8>>]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for form in forms.iter().filter(|f| !f.is_empty()) {
        let src = out.as_deref().unwrap_or(bytes);
        if memchr::memmem::find(src, form).is_none() {
            continue;
        }
        let mut next = Vec::with_capacity(src.len());
        let mut at = 0;
        for i in memchr::memmem::find_iter(src, form.as_slice()) {
            if i < at {
                continue;
            }
            next.extend_from_slice(&src[at..i]);
            next.extend_from_slice(b"[REDACTED:credential]");
            at = i + form.len();
        }
        next.extend_from_slice(&src[at..]);
        out = Some(next);
    }
    out
}

struct Classified {
    object_read: bool,
    action: ActionClass,
    resource: Option<String>,
    kind: String,
    classification: palisade_core::principal::Classification,
}

impl Gateway {
    /// Builds a gateway with a pooled keep-alive upstream client.
    pub fn new(
        config: Arc<Config>,
        auth: Arc<dyn Authenticator>,
        pdp: Arc<dyn DecisionPoint>,
        audit: AuditLog,
        clock: Arc<dyn palisade_core::Clock>,
        inspector: Arc<Inspector>,
        provenance: Arc<dyn Provenance>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(
            config.gateway.connect_timeout_secs,
        )));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(512)
            .build(connector);
        let limits = Arc::new(Limits::new(&config));
        Self {
            config,
            client,
            auth,
            pdp,
            audit,
            clock,
            limits,
            inspector,
            provenance,
            credentials: Arc::new(NoCredentials),
            approvals: None,
        }
    }

    /// Holds actions that need approval in `approvals` (without it they are refused).
    pub fn with_approvals(mut self, approvals: Arc<palisade_approval::Approvals>) -> Self {
        self.approvals = Some(approvals);
        self
    }

    /// Injects route credentials from `source` (the vault).
    pub fn with_credentials(mut self, source: Arc<dyn CredentialSource>) -> Self {
        self.credentials = source;
        self
    }

    /// The rate limiters and in-flight counters, shared with the MCP gateway so an agent's
    /// limits count its HTTP and MCP requests together.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.clone()
    }

    /// Whether a path belongs to some route.
    pub fn serves(&self, path: &str) -> bool {
        self.config.route_for(path).is_some()
    }

    /// Runs the phases for one request.
    pub async fn handle(&self, mut req: Request<Body>) -> Response<Body> {
        let started = Instant::now();
        let request_id = uuid::Uuid::now_v7().to_string();
        // INVARIANT (one-path): routing, classification, the decision and the forwarded request
        // all use the same normalised path, so `..` or `%xx` tricks cannot make the gateway judge
        // one path and the upstream serve another.
        let path = match normalize_path(req.uri().path()) {
            Ok(p) => p,
            Err(message) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &request_id,
                    json!({ "error": "bad_request", "message": message }),
                );
            }
        };
        let Some(route) = self.config.route_for(&path) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &request_id,
                json!({
                    "error": "not_found",
                    "message": format!("no route serves `{path}`; routes are configured in palisade.toml"),
                }),
            );
        };
        let method = req.method().clone();
        let bytes_in = content_length(req.headers());
        let mut event = AuditEvent::new("gateway.decision");
        event.request_id = Some(request_id.clone());
        event.detail = json!({ "route": route.name, "method": method.as_str(), "path": path });
        // The trace this request belongs to (kept, or started here) travels upstream; the
        // agent's reasoning is for the audit log only.
        let (trace_id, traceparent) = inspection::trace_context(
            req.headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        event.trace_id = Some(trace_id);
        if let Ok(v) = HeaderValue::from_str(&traceparent) {
            req.headers_mut()
                .insert(HeaderName::from_static("traceparent"), v);
        }
        // The approval an agent retries under is for Palisade only.
        let claimed_approval = req
            .headers_mut()
            .remove(palisade_approval::APPROVAL_HEADER)
            .and_then(|v| v.to_str().ok().map(|s| s.trim().to_string()));
        if let Some(r) = req.headers_mut().remove(REASONING_HEADER) {
            event.reasoning = Some(inspection::reasoning(
                &self.inspector,
                &String::from_utf8_lossy(r.as_bytes()),
            ));
        }
        // Fail closed while no required SIEM sink can record; the refusal itself is kept in
        // the local log and delivered when a sink recovers.
        if let Some(reason) = self.audit.refusal() {
            tracing::warn!(%reason, "request refused: fail-closed audit");
            event.outcome = Some(Outcome {
                status: 503,
                bytes_in,
                bytes_out: None,
                error: Some(reason),
            });
            event.latency_us = Some(elapsed_us(started));
            if self.audit.record(event).await.is_err() {
                return audit_unavailable(&request_id);
            }
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &request_id,
                json!({ "error": "audit_unavailable", "message": palisade_audit::FAIL_CLOSED_MESSAGE }),
            );
        }

        // Phase 2: authenticate.
        let caller = match bearer(req.headers()) {
            Err(reason) => {
                return self
                    .refuse_401(event, started, &request_id, (None, None), reason, bytes_in)
                    .await;
            }
            Ok(token) => match self.auth.authenticate(token, &route.audience) {
                Ok(c) => c,
                Err(f) => {
                    let reason = f.reason.clone();
                    return self
                        .refuse_401(
                            event,
                            started,
                            &request_id,
                            (f.subject, f.session),
                            Some(reason),
                            bytes_in,
                        )
                        .await;
                }
            },
        };
        event.principal = Some(principal_ref(&caller.principal));
        if let Some(human) = &caller.initiating_human {
            event.delegation = Some(palisade_audit::Delegation {
                initiating_human: human.clone(),
                actor_chain: caller.actor_chain.clone(),
            });
        }
        let calls = caller.session.as_ref().map(|s| s.count_call());
        if let serde_json::Value::Object(d) = &mut event.detail {
            d.insert("token_id".into(), json!(caller.token_id));
            if let Some(s) = &caller.session {
                d.insert("session".into(), json!(s.sid));
            }
        }
        // What the session read before this action (references, never content).
        event.inputs = caller
            .session
            .as_deref()
            .and_then(palisade_audit::InputContext::of);
        let route_idx = self
            .config
            .routes
            .iter()
            .position(|r| std::ptr::eq(r, route))
            .unwrap_or(usize::MAX);

        // Phase 3: classify.
        let class = classify(route, &method, &path);
        let resource_name = match &class.resource {
            Some(r) => format!("Palisade::Resource::\"{}/{r}\"", route.name),
            None => format!("Palisade::Route::\"{}\"", route.name),
        };
        event.action = Some(class.action.as_str().to_string());
        event.resource = Some(resource_name);
        event.detail["resource_type"] = json!(class.kind);

        // Phase 4: limit.
        if bytes_in.is_some_and(|n| n > route.max_body_bytes) {
            let body = json!({
                "error": "payload_too_large",
                "message": over_route_limit(route),
            });
            return self
                .finish(
                    event,
                    started,
                    &request_id,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    bytes_in,
                    body,
                )
                .await;
        }

        let agent_rate = caller
            .principal
            .agent()
            .and_then(|a| a.rate_limit)
            .or(self.config.gateway.agent_rate_limit);
        if let Err(l) = self
            .limits
            .check(&caller.principal.id, agent_rate, route_idx)
        {
            let secs = l.retry_after.as_secs() + u64::from(l.retry_after.subsec_nanos() > 0);
            let secs = secs.max(1);
            let who = match l.scope {
                "route" => format!("route `{}`", route.name),
                "agent-route" => format!("{} on route `{}`", caller.principal.id, route.name),
                _ => caller.principal.id.to_string(),
            };
            let body = json!({
                "error": "rate_limited",
                "message": format!("{who} is over its rate limit of {}; retry in {secs}s", l.limit),
                "scope": l.scope,
                "limit": l.limit.to_string(),
                "retry_after_seconds": secs,
            });
            return self
                .too_many(event, started, &request_id, bytes_in, body, secs)
                .await;
        }
        let max_in_flight = caller
            .principal
            .agent()
            .and_then(|a| a.max_concurrent_requests)
            .unwrap_or(self.config.gateway.max_concurrent_requests_per_agent);
        let slot = match self.limits.enter(&caller.principal.id, max_in_flight) {
            Ok(s) => s,
            Err(max) => {
                let body = json!({
                    "error": "too_many_in_flight",
                    "message": format!("{} already has {max} requests in flight, its limit; retry when one finishes", caller.principal.id),
                    "limit": max,
                });
                return self
                    .too_many(event, started, &request_id, bytes_in, body, 1)
                    .await;
            }
        };
        let mut object_read = None;
        if class.object_read
            && let Some(s) = &caller.session
        {
            let record_limit = caller
                .principal
                .agent()
                .and_then(|a| a.max_files_per_session);
            let session_limit = match (record_limit, caller.max_files_per_session) {
                (Some(a), Some(b)) => Some(u64::from(a.min(b))),
                (a, b) => a.or(b).map(u64::from),
            };
            match s.take_object_read(route_idx, session_limit, route.max_objects_per_session) {
                Ok(_) => object_read = Some(ObjectRead::new(s.clone(), route_idx)),
                Err((in_session, on_route)) => {
                    let (scope, counter, limit) = match session_limit {
                        Some(l) if in_session > l => ("session", in_session, l),
                        _ => (
                            "route",
                            on_route,
                            route.max_objects_per_session.unwrap_or(0),
                        ),
                    };
                    let message = match scope {
                        "session" => format!(
                            "object read {counter} refused: session {} may read {limit} objects (max_files_per_session); start a new session for more",
                            s.sid
                        ),
                        _ => format!(
                            "object read {counter} on route `{}` refused: a session may read {limit} objects there (max_objects_per_session)",
                            route.name
                        ),
                    };
                    let body = json!({
                        "error": "volume_limit",
                        "message": message,
                        "scope": scope,
                        "counter": "objects_read",
                        "count": counter,
                        "limit": limit,
                        "session": s.sid,
                    });
                    return self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::FORBIDDEN,
                            bytes_in,
                            body,
                        )
                        .await;
                }
            }
        }

        // Phase 4b: inspect what the agent sends, before the decision so policies see it.
        let mut send: Option<inspection::Verdict> = None;
        let inspect_send = route.inspection.enabled
            && (bytes_in.is_some_and(|n| n > 0)
                || req.headers().contains_key(header::TRANSFER_ENCODING))
            && inspection::is_textual(content_type(req.headers()));
        let uninspected_send = bytes_in.is_some_and(|n| n > self.config.inspection.max_bytes)
            && self.config.inspection.pass_oversize;
        if inspect_send && uninspected_send {
            event.detail["inspection_send"] =
                json!({ "flow": "send", "action": "uninspected (over max_bytes)" });
        } else if inspect_send {
            let cap = self.config.inspection.max_bytes.min(route.max_body_bytes);
            let (parts, body) = req.into_parts();
            let too_large = || {
                if cap == route.max_body_bytes {
                    over_route_limit(route)
                } else {
                    format!(
                        "the request body is larger than the {cap} bytes content inspection reads ([inspection] max_bytes); raise it, or set oversize = \"pass\" to forward larger bodies uninspected"
                    )
                }
            };
            let bytes = match buffer_body(body, cap, route, too_large).await {
                Ok(b) => b,
                Err((status, body)) => {
                    return self
                        .finish(event, started, &request_id, status, bytes_in, body)
                        .await;
                }
            };
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let verdict = inspection::judge(&self.inspector, &text, &route.inspection, Flow::Send);
            let mut body_bytes = bytes;
            let mut parts = parts;
            if !verdict.report.findings.is_empty() {
                let action = if !verdict.blocked.is_empty() {
                    "block"
                } else if verdict.sanitize {
                    "sanitize"
                } else {
                    "allow"
                };
                event.detail["inspection_send"] =
                    inspection::audit_record(&self.inspector, &text, &verdict, Flow::Send, action);
                if verdict.sanitize && verdict.blocked.is_empty() {
                    let clean = inspection::sanitized(
                        &self.inspector,
                        &text,
                        &verdict,
                        &route.inspection,
                        Flow::Send,
                    );
                    body_bytes = bytes::Bytes::from(clean);
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(body_bytes.len()));
                }
            }
            req = Request::from_parts(parts, Body::from(body_bytes));
            send = Some(verdict);
        }

        // Phase 5: decide.
        let action = match class.action {
            ActionClass::Read => Action::Read,
            ActionClass::Write => Action::Write,
            ActionClass::Destructive => Action::Destructive,
        };
        let target = Target {
            route: &route.name,
            resource: class.resource.as_deref(),
            tool: false,
            route_kind: &route.kind,
            kind: &class.kind,
            system: route.system.as_deref().unwrap_or(""),
            route_classification: route.classification,
            classification: class.classification,
        };
        let mut ctx = RequestContext::at(method.as_str(), &path, self.clock.now());
        let taint = caller
            .session
            .as_ref()
            .map(|s| s.taint())
            .unwrap_or_default();
        if let Some(s) = &caller.session {
            let c = s.counters();
            ctx.calls = calls.unwrap_or(c.calls);
            ctx.objects_read = c.objects_read;
            ctx.bytes_out = c.bytes_out;
            ctx.initiating_human = s.initiating_human.as_deref();
            ctx.taint = &taint;
            ctx.sensitive = s.is_sensitive();
        }
        if let Some(v) = &send {
            ctx.findings = &v.categories;
            ctx.data_tier = v.data_tier();
        }
        if caller.initiating_human.is_some() {
            ctx.initiating_human = caller.initiating_human.as_deref();
        }
        let (decision, version) = self.pdp.decide(&caller.principal, action, &target, &ctx);
        event.decision = Some(DecisionRecord {
            allowed: decision.allowed,
            policies: decision.policies.clone(),
            policy_version: Some(version.clone()),
        });
        if !decision.allowed {
            if decision
                .policies
                .iter()
                .any(|p| p.starts_with(palisade_policy::purpose::POLICY_PREFIX))
            {
                let purpose = caller
                    .principal
                    .agent()
                    .map(|a| a.purpose_tag.as_str())
                    .unwrap_or("-");
                event.alert = Some(palisade_audit::Alert {
                    severity: "high".into(),
                    rule: "purpose-violation".into(),
                    message: format!(
                        "{} (purpose `{purpose}`) tried to {} `{}` on {}, outside its declared purpose",
                        caller.principal.id,
                        action.as_str(),
                        class.kind,
                        target_text(&target)
                    ),
                });
            }
            let body = json!({
                "error": "forbidden",
                "message": format!(
                    "{} may not perform `{}` on {} (decided by {})",
                    caller.principal.id, action.as_str(), target_text(&target), decision.policies.join(", ")
                ),
                "deciding_policies": decision.policies,
                "policy_version": version,
            });
            return self
                .finish(
                    event,
                    started,
                    &request_id,
                    StatusCode::FORBIDDEN,
                    bytes_in,
                    body,
                )
                .await;
        }

        // Privilege separation: an agent writes only with a token that carries the route's write
        // scope, which it gets from its own, policy-decided token request.
        let has_write_scope = caller
            .scope
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|s| s == route.write_scope));
        if action != Action::Read && caller.principal.agent().is_some() && !has_write_scope {
            let body = json!({
                "error": "insufficient_scope",
                "message": format!(
                    "{} needs a token with scope `{}` to {} on route `{}`: request one on its own (read and write never share a token)",
                    caller.principal.id, route.write_scope, action.as_str(), route.name
                ),
                "scope": route.write_scope,
            });
            let mut resp = self
                .finish(
                    event,
                    started,
                    &request_id,
                    StatusCode::FORBIDDEN,
                    bytes_in,
                    body,
                )
                .await;
            if resp.status() == StatusCode::FORBIDDEN
                && let Ok(v) = HeaderValue::from_str(&format!(
                    r#"Bearer realm="palisade", error="insufficient_scope", scope="{}""#,
                    route.write_scope
                ))
            {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return resp;
        }

        // Content inspection refused what the agent sends (after the decision, so a policy
        // denial keeps precedence in what the agent is told).
        if let Some(v) = send.as_ref().filter(|v| !v.blocked.is_empty()) {
            let body = json!({
                "error": "inspection_blocked",
                "message": inspection::blocked_message(v, Flow::Send, &format!("route `{}`", route.name)),
                "findings": inspection::header_value(v),
            });
            return self
                .finish(
                    event,
                    started,
                    &request_id,
                    StatusCode::FORBIDDEN,
                    bytes_in,
                    body,
                )
                .await;
        }

        // Phase 5b: the route's credential for this action class, from the vault. A write or
        // destructive credential is withheld from a tainted session (privilege separation).
        let injected = match route
            .credentials
            .iter()
            .find(|c| c.actions.contains(&class.action))
        {
            None => None,
            Some(c) => {
                if class.action != ActionClass::Read
                    && caller.session.as_ref().is_some_and(|s| s.is_tainted())
                {
                    let body = json!({
                        "error": "credential_withheld",
                        "message": format!("route `{}`'s {} credential is not given to a session that ingested untrusted content; start a new session", route.name, class.action.as_str()),
                    });
                    return self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::FORBIDDEN,
                            bytes_in,
                            body,
                        )
                        .await;
                }
                match self.credentials.reveal(&c.secret) {
                    Ok(value) => Some(Injected { config: c, value }),
                    Err(e) => {
                        tracing::error!(route = %route.name, secret = %c.secret, error = %e, "credential unavailable; refusing");
                        let body = json!({
                            "error": "credential_unavailable",
                            "message": format!("route `{}`'s credential `{}` cannot be read from the vault; an administrator must check it (palisade secret list)", route.name, c.secret),
                        });
                        return self
                            .finish(
                                event,
                                started,
                                &request_id,
                                StatusCode::SERVICE_UNAVAILABLE,
                                bytes_in,
                                body,
                            )
                            .await;
                    }
                }
            }
        };
        if let Some(i) = &injected {
            event.detail["credential"] = json!(i.config.secret);
        }

        // Phase 5c: approval, the last check before forwarding (so a grant is used only by a
        // call that is forwarded). An action the policy or the destructive default marks waits
        // for authenticated humans; the approval is bound to this exact call and used once.
        let requirement = palisade_core::approval::requirement(
            &decision.approvals,
            self.config.approvals.destructive && class.action == ActionClass::Destructive,
            &self.config.approvals.defaults,
        );
        if let Some(rule) = requirement {
            let Some(approvals) = self.approvals.clone() else {
                let body = json!({ "error": "approval_unavailable", "message": "this action needs approval, and this gateway has no approval service; it is refused" });
                return self
                    .finish(
                        event,
                        started,
                        &request_id,
                        StatusCode::FORBIDDEN,
                        bytes_in,
                        body,
                    )
                    .await;
            };
            let (parts, body) = req.into_parts();
            let bytes = match buffer_body(body, route.max_body_bytes, route, || {
                over_route_limit(route)
            })
            .await
            {
                Ok(b) => b,
                Err((status, body)) => {
                    return self
                        .finish(event, started, &request_id, status, bytes_in, body)
                        .await;
                }
            };
            let context = approval::http_context(parts.uri.query(), &parts.headers);
            let target = path.clone();
            let resource = event.resource.clone().unwrap_or_default();
            let action = palisade_approval::Action {
                principal: &caller.principal,
                initiating_human: caller.initiating_human.as_deref(),
                session: caller.session.as_ref().map(|s| s.sid.as_str()),
                channel: "http",
                action: class.action.as_str(),
                resource: &resource,
                method: method.as_str(),
                target: &target,
                context: &context,
                query: approval::masked_query(&self.inspector, parts.uri.query()),
                body: &bytes,
                preview: approval::preview(&self.inspector, &bytes),
                reasoning: event.reasoning.as_ref().map(|r| r.text.clone()),
                request_id: &request_id,
            };
            let mut gate = approvals
                .gate(&action, &rule, claimed_approval.as_deref())
                .await;
            let hold = self.config.approvals.hold_secs;
            if let (palisade_approval::Gate::Pending(a), true) = (&gate, hold > 0) {
                approvals.wait(&a.id, Duration::from_secs(hold)).await;
                // While held, the session may have been killed, the agent suspended or the
                // token revoked: the call goes ahead only for a caller that is still live.
                let live = bearer(&parts.headers)
                    .ok()
                    .is_some_and(|t| self.auth.authenticate(t, &route.audience).is_ok());
                if !live {
                    return self
                        .refuse_401(
                            event,
                            started,
                            &request_id,
                            (None, None),
                            Some(
                                "the token or its session ended while the call waited for approval"
                                    .into(),
                            ),
                            bytes_in,
                        )
                        .await;
                }
                let id = a.id.clone();
                gate = approvals.gate(&action, &rule, Some(&id)).await;
            }
            match gate {
                palisade_approval::Gate::Proceed(a) => {
                    event.detail["approval"] = approval::used(&a, &approvals.link(&a.id));
                    req = Request::from_parts(parts, Body::from(bytes));
                }
                palisade_approval::Gate::Pending(a) => {
                    let summary = approval::summary(&a, &approvals.link(&a.id));
                    event.detail["approval"] = summary.clone();
                    let what = format!("{} {target} on route `{}`", method.as_str(), route.name);
                    let body = json!({
                        "error": "approval_required",
                        "message": approval::waiting_message(&a, &what),
                        "approval": summary,
                    });
                    let mut resp = self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::PRECONDITION_REQUIRED,
                            bytes_in,
                            body,
                        )
                        .await;
                    if resp.status() == StatusCode::PRECONDITION_REQUIRED
                        && let Ok(v) = HeaderValue::from_str(&a.id)
                    {
                        resp.headers_mut().insert(
                            HeaderName::from_static(palisade_approval::APPROVAL_HEADER),
                            v,
                        );
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                    }
                    return resp;
                }
                palisade_approval::Gate::Refused { code, message, id } => {
                    if let Some(id) = &id {
                        event.detail["approval"] = json!({ "id": id, "refused": code });
                    }
                    event.detail["approval_refused"] = json!(code);
                    let body = json!({ "error": code, "message": message, "approval_id": id });
                    return self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::FORBIDDEN,
                            bytes_in,
                            body,
                        )
                        .await;
                }
                palisade_approval::Gate::Unavailable(reason) => {
                    tracing::error!(%reason, "approval service unavailable; refusing");
                    let body = json!({ "error": "approval_unavailable", "message": "the approval could not be recorded; retry later" });
                    return self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::SERVICE_UNAVAILABLE,
                            bytes_in,
                            body,
                        )
                        .await;
                }
            }
        }

        // Phase 6: forward.
        let upstream_req = match self.upstream_request(
            route,
            req,
            &path,
            &request_id,
            caller.session.clone(),
            injected.as_ref(),
        ) {
            Ok(r) => r,
            Err(message) => {
                let body = json!({ "error": "bad_request", "message": message });
                return self
                    .finish(
                        event,
                        started,
                        &request_id,
                        StatusCode::BAD_REQUEST,
                        bytes_in,
                        body,
                    )
                    .await;
            }
        };
        let timeout = Duration::from_secs(route.timeout_secs);
        let upstream = tokio::time::timeout(timeout, self.client.request(upstream_req)).await;
        let response = match upstream {
            Err(_) => {
                let body = json!({ "error": "upstream_timeout", "message": format!("route `{}` did not answer within {}s", route.name, route.timeout_secs) });
                return self
                    .finish(
                        event,
                        started,
                        &request_id,
                        StatusCode::GATEWAY_TIMEOUT,
                        bytes_in,
                        body,
                    )
                    .await;
            }
            Ok(Err(e)) if body_limit_exceeded(&e) => {
                // A streamed (chunked) body crossed the limit while being forwarded.
                let body = json!({
                    "error": "payload_too_large",
                    "message": over_route_limit(route),
                });
                return self
                    .finish(
                        event,
                        started,
                        &request_id,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        bytes_in,
                        body,
                    )
                    .await;
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.name, error = %e, "upstream request failed");
                let body = json!({ "error": "bad_gateway", "message": format!("route `{}`'s upstream could not be reached or failed mid-request", route.name) });
                return self
                    .finish(
                        event,
                        started,
                        &request_id,
                        StatusCode::BAD_GATEWAY,
                        bytes_in,
                        body,
                    )
                    .await;
            }
            Ok(Ok(r)) => r,
        };
        // The upstream served the request: an object read it took now counts for good (any
        // refusal or failure before this point gave it back when `object_read` dropped).
        if let Some(read) = object_read {
            read.keep();
        }

        // Phase 7: inspect what the agent will read, audit, then release the response.
        let status = response.status();
        let bytes_out = content_length(response.headers());
        if let (Some(cap), Some(n)) = (route.max_response_bytes, bytes_out)
            && n > cap
        {
            let body = json!({
                "error": "upstream_response_too_large",
                "message": format!("route `{}`'s upstream answered {n} bytes, over the route's max_response_bytes of {cap}", route.name),
            });
            return self
                .finish(
                    event,
                    started,
                    &request_id,
                    StatusCode::BAD_GATEWAY,
                    bytes_in,
                    body,
                )
                .await;
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(i) = &injected {
            let forms = i.forms();
            let echoed: Vec<HeaderName> = parts
                .headers
                .iter()
                .filter(|(_, v)| mask_echoes(v.as_bytes(), &forms).is_some())
                .map(|(k, _)| k.clone())
                .collect();
            for name in echoed {
                parts.headers.remove(&name);
                event.detail["credential_echo_masked"] = json!(true);
            }
        }
        let resource_key = format!("{}:{path}", route.name);
        let inspect_read = route.inspection.enabled
            && inspection::is_textual(content_type(&parts.headers))
            && !(bytes_out.is_some_and(|n| n > self.config.inspection.max_bytes)
                && self.config.inspection.pass_oversize);
        let mut read: Option<inspection::Verdict> = None;
        let mut read_sha256: Option<String> = None;
        let body = if inspect_read {
            let cap = route
                .max_response_bytes
                .map_or(self.config.inspection.max_bytes, |m| {
                    m.min(self.config.inspection.max_bytes)
                });
            let bytes = match tokio::time::timeout(
                timeout,
                axum::body::to_bytes(Body::new(body), usize::try_from(cap).unwrap_or(usize::MAX)),
            )
            .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(_)) => {
                    let body = json!({
                        "error": "upstream_response_too_large",
                        "message": format!("route `{}`'s upstream answered more than the {cap} bytes content inspection reads ([inspection] max_bytes, or the route's max_response_bytes); the answer is withheld", route.name),
                    });
                    return self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::BAD_GATEWAY,
                            bytes_in,
                            body,
                        )
                        .await;
                }
                Err(_) => {
                    let body = json!({ "error": "upstream_timeout", "message": format!("route `{}`'s answer did not finish within {}s", route.name, route.timeout_secs) });
                    return self
                        .finish(
                            event,
                            started,
                            &request_id,
                            StatusCode::GATEWAY_TIMEOUT,
                            bytes_in,
                            body,
                        )
                        .await;
                }
            };
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let verdict = inspection::judge(&self.inspector, &text, &route.inspection, Flow::Read);
            let action = if !verdict.blocked.is_empty() {
                "block"
            } else if verdict.sanitize {
                "sanitize"
            } else if verdict.annotate {
                "annotate"
            } else {
                "allow"
            };
            if !verdict.report.findings.is_empty() {
                event.detail["inspection_read"] =
                    inspection::audit_record(&self.inspector, &text, &verdict, Flow::Read, action);
            }
            if !verdict.blocked.is_empty() {
                let body = json!({
                    "error": "inspection_blocked",
                    "message": inspection::blocked_message(&verdict, Flow::Read, &format!("route `{}`", route.name)),
                    "findings": inspection::header_value(&verdict),
                });
                return self
                    .finish(
                        event,
                        started,
                        &request_id,
                        StatusCode::BAD_GATEWAY,
                        bytes_in,
                        body,
                    )
                    .await;
            }
            let out = if verdict.sanitize {
                let clean = inspection::sanitized(
                    &self.inspector,
                    &text,
                    &verdict,
                    &route.inspection,
                    Flow::Read,
                );
                bytes::Bytes::from(clean)
            } else {
                bytes
            };
            // An upstream that echoes the injected credential does not hand it to the agent.
            let out = match injected
                .as_ref()
                .and_then(|i| mask_echoes(&out, &i.forms()))
            {
                Some(masked) => {
                    event.detail["credential_echo_masked"] = json!(true);
                    bytes::Bytes::from(masked)
                }
                None => out,
            };
            read_sha256 = Some(hex_sha256(&out));
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            if verdict.annotate
                && let Ok(v) = HeaderValue::from_str(&inspection::header_value(&verdict))
            {
                parts
                    .headers
                    .insert(HeaderName::from_static("palisade-findings"), v);
            }
            read = Some(verdict);
            Body::from(out)
        } else {
            if route.inspection.enabled && inspection::is_textual(content_type(&parts.headers)) {
                event.detail["inspection_read"] =
                    json!({ "flow": "read", "action": "uninspected (over max_bytes)" });
            }
            Body::new(body)
        };
        // The session learns what it read before the agent does: taint (injections, untrusted
        // routes, content a tainted session wrote) and sensitivity.
        if let Some(s) = &caller.session {
            let mut changed = false;
            if let Some(v) = &read {
                changed |= inspection::mark_session(s, v, class.classification);
            } else if status.is_success()
                && class.classification >= palisade_core::principal::Classification::Confidential
            {
                changed |= s.mark_sensitive();
            }
            if route.inspection.untrusted {
                changed |= s.add_taint("untrusted");
            }
            if action == Action::Read && self.provenance.is_labeled(&resource_key) {
                changed |= s.add_taint("tainted-content");
            }
            if !s.taint().is_empty() || s.is_sensitive() {
                event.detail["session_state"] =
                    json!({ "taint": s.taint(), "sensitive": s.is_sensitive() });
            }
            // The session now holds this content: later actions' events reference it.
            if status.is_success() {
                let mut labels: Vec<String> = read
                    .as_ref()
                    .map(|v| v.categories.clone())
                    .unwrap_or_default();
                if route.inspection.untrusted {
                    labels.push("untrusted".into());
                }
                if action == Action::Read && self.provenance.is_labeled(&resource_key) {
                    labels.push("tainted-content".into());
                }
                s.add_input(palisade_core::session::InputRef {
                    source: resource_key.clone(),
                    sha256: read_sha256.take(),
                    labels,
                    time_ns: i64::try_from(self.clock.now().unix_nanos()).unwrap_or(i64::MAX),
                });
            }
            if changed && let Err(e) = self.provenance.session_changed(s) {
                tracing::error!(error = %e, "cannot store the session's taint; withholding the response");
                return audit_unavailable(&request_id);
            }
            // Content a tainted session writes is labelled, so whoever reads it later is
            // tainted too.
            if action != Action::Read
                && status.is_success()
                && s.is_tainted()
                && let Err(e) = self.provenance.label(&resource_key, &s.sid)
            {
                tracing::error!(error = %e, "cannot label content written by a tainted session");
                return audit_unavailable(&request_id);
            }
        }
        event.outcome = Some(Outcome {
            status: status.as_u16(),
            bytes_in,
            bytes_out,
            error: None,
        });
        event.latency_us = Some(elapsed_us(started));
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit write failed; withholding the upstream response");
            return audit_unavailable(&request_id);
        }
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            parts
                .headers
                .insert(HeaderName::from_static("x-request-id"), v);
        }
        let metered = Metered::new(
            body,
            caller.session.clone(),
            Direction::In,
            route.max_response_bytes,
            Some(slot),
        );
        Response::from_parts(parts, Body::new(metered))
    }

    async fn refuse_401(
        &self,
        mut event: AuditEvent,
        started: Instant,
        request_id: &str,
        (subject, session): (Option<String>, Option<SessionRefusal>),
        reason: Option<String>,
        bytes_in: Option<u64>,
    ) -> Response<Body> {
        event.principal = subject.map(|id| PrincipalRef {
            id,
            ..PrincipalRef::default()
        });
        let www = match &reason {
            None => r#"Bearer realm="palisade""#.to_string(),
            Some(r) => format!(
                r#"Bearer realm="palisade", error="invalid_token", error_description="{}""#,
                r.replace('"', "'")
            ),
        };
        let message = reason.clone().unwrap_or_else(|| {
            "a bearer access token is required: get one at /oauth2/token".into()
        });
        event.decision = Some(DecisionRecord {
            allowed: false,
            policies: vec![],
            policy_version: None,
        });
        let mut body = json!({ "error": "unauthorized", "message": message });
        if let Some(r) = &session {
            body["session"] = json!({ "id": r.sid, "state": r.state, "clear_context": true });
        }
        let mut resp = self
            .finish(
                event,
                started,
                request_id,
                StatusCode::UNAUTHORIZED,
                bytes_in,
                body,
            )
            .await;
        if resp.status() == StatusCode::UNAUTHORIZED
            && let Ok(v) = HeaderValue::from_str(&www)
        {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            if let Some(r) = &session {
                clear_context(&mut resp, r);
            }
        }
        resp
    }

    /// Audits a 429, then answers with `body` and `Retry-After: retry_after_secs`.
    async fn too_many(
        &self,
        event: AuditEvent,
        started: Instant,
        request_id: &str,
        bytes_in: Option<u64>,
        body: serde_json::Value,
        retry_after_secs: u64,
    ) -> Response<Body> {
        let mut resp = self
            .finish(
                event,
                started,
                request_id,
                StatusCode::TOO_MANY_REQUESTS,
                bytes_in,
                body,
            )
            .await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }

    /// Audits a refusal, then answers with `body`.
    async fn finish(
        &self,
        mut event: AuditEvent,
        started: Instant,
        request_id: &str,
        status: StatusCode,
        bytes_in: Option<u64>,
        body: serde_json::Value,
    ) -> Response<Body> {
        let error = body
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string);
        event.outcome = Some(Outcome {
            status: status.as_u16(),
            bytes_in,
            bytes_out: None,
            error,
        });
        event.latency_us = Some(elapsed_us(started));
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit write failed");
            return audit_unavailable(request_id);
        }
        json_response(status, request_id, body)
    }

    fn upstream_request(
        &self,
        route: &RouteConfig,
        req: Request<Body>,
        path: &str,
        request_id: &str,
        session: Option<Arc<LiveSession>>,
        injected: Option<&Injected<'_>>,
    ) -> Result<Request<Body>, String> {
        let (mut parts, body) = req.into_parts();
        let rest = if route.strip_prefix && route.path_prefix != "/" {
            path.get(route.path_prefix.len()..).unwrap_or("")
        } else {
            path
        };
        let base = route.upstream.path().trim_end_matches('/');
        let rest = if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        };
        let mut query = parts.uri.query().map(str::to_string);
        if let Some(Injected {
            config:
                palisade_config::CredentialConfig {
                    kind: palisade_config::CredentialKind::Query(name),
                    ..
                },
            value,
        }) = injected
        {
            // The credential replaces any parameter of that name the agent sent.
            let mut q = form_urlencoded::Serializer::new(String::new());
            for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
                if k != name.as_str() {
                    q.append_pair(&k, &v);
                }
            }
            q.append_pair(name, &String::from_utf8_lossy(value));
            query = Some(q.finish());
        }
        let path_and_query = match &query {
            Some(q) => format!("{base}{rest}?{q}"),
            None => format!("{base}{rest}"),
        };
        let mut builder = Uri::builder().path_and_query(path_and_query);
        if let Some(scheme) = route.upstream.scheme() {
            builder = builder.scheme(scheme.clone());
        }
        if let Some(authority) = route.upstream.authority() {
            builder = builder.authority(authority.clone());
        }
        parts.uri = builder
            .build()
            .map_err(|e| format!("cannot build the upstream URL: {e}"))?;
        strip_hop_by_hop(&mut parts.headers);
        // INVARIANT (token-stays-here): the agent's bearer token is never forwarded upstream.
        parts.headers.remove(header::AUTHORIZATION);
        parts.headers.remove(header::HOST);
        if let Some(i) = injected {
            let value = |bytes: &[u8]| {
                HeaderValue::from_bytes(bytes)
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| {
                        format!(
                            "credential `{}` cannot travel in a header (control characters)",
                            i.config.secret
                        )
                    })
            };
            match &i.config.kind {
                palisade_config::CredentialKind::Bearer => {
                    let mut v = zeroize::Zeroizing::new(b"Bearer ".to_vec());
                    v.extend_from_slice(&i.value);
                    parts.headers.insert(header::AUTHORIZATION, value(&v)?);
                }
                palisade_config::CredentialKind::Basic(_) => {
                    let forms = i.forms();
                    let mut v = zeroize::Zeroizing::new(b"Basic ".to_vec());
                    v.extend_from_slice(forms.get(1).map_or(&[][..], |f| f.as_slice()));
                    parts.headers.insert(header::AUTHORIZATION, value(&v)?);
                }
                palisade_config::CredentialKind::Header(name) => {
                    parts.headers.insert(name.clone(), value(&i.value)?);
                }
                palisade_config::CredentialKind::Query(_) => {}
            }
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            parts
                .headers
                .insert(HeaderName::from_static("x-request-id"), v);
        }
        parts.version = http::Version::HTTP_11;
        let limited = Body::new(Limited::new(
            body,
            usize::try_from(route.max_body_bytes).unwrap_or(usize::MAX),
        ));
        let metered = Body::new(Metered::new(limited, session, Direction::Out, None, None));
        Ok(Request::from_parts(parts, metered))
    }
}

/// The request path in one canonical form (RFC 3986 §6.2.2): percent-encoded unreserved
/// characters decoded, other escapes upper-cased. Refused: dot segments, empty segments,
/// backslashes, encoded `/` or `\`, and malformed escapes, since upstreams disagree on them.
pub fn normalize_path(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err("the request path must start with `/`".into());
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' => return Err("a backslash is not allowed in the request path".into()),
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .ok_or("a `%` escape in the path is incomplete")?;
                let value = u8::from_str_radix(hex, 16)
                    .map_err(|_| format!("`%{hex}` is not a valid escape in the path"))?;
                match value {
                    b'/' | b'\\' => {
                        return Err(
                            "an encoded `/` or `\\` is not allowed in the request path".into()
                        );
                    }
                    v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                        out.push(char::from(v))
                    }
                    _ => {
                        out.push('%');
                        out.push_str(&hex.to_ascii_uppercase());
                    }
                }
                i += 3;
            }
            _ => {
                out.push(char::from(b));
                i += 1;
            }
        }
    }
    // `raw` is ASCII here (a parsed URI path), so pushing bytes as chars kept it intact.
    let segments: Vec<&str> = out.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (n, segment) in segments.iter().enumerate() {
        if *segment == "." || *segment == ".." {
            return Err("`.` and `..` segments are not allowed in the request path".into());
        }
        if segment.is_empty() && n != last {
            return Err("empty segments (`//`) are not allowed in the request path".into());
        }
    }
    Ok(out)
}

/// The request body in memory, at most `cap` bytes, within the route's timeout; otherwise the
/// refusal (413 with `too_large`'s message, or 408).
async fn buffer_body(
    body: Body,
    cap: u64,
    route: &RouteConfig,
    too_large: impl FnOnce() -> String,
) -> Result<bytes::Bytes, (StatusCode, serde_json::Value)> {
    match tokio::time::timeout(
        Duration::from_secs(route.timeout_secs),
        axum::body::to_bytes(body, usize::try_from(cap).unwrap_or(usize::MAX)),
    )
    .await
    {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({ "error": "payload_too_large", "message": too_large() }),
        )),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            json!({ "error": "request_timeout", "message": format!("the request body did not arrive within {}s", route.timeout_secs) }),
        )),
    }
}

/// The refusal text for a body over the route's limit.
fn over_route_limit(route: &RouteConfig) -> String {
    format!(
        "the request body is larger than route `{}`'s limit of {} bytes",
        route.name, route.max_body_bytes
    )
}

fn classify(route: &RouteConfig, method: &Method, path: &str) -> Classified {
    match route.rules.iter().find(|r| r.matches(method, path)) {
        Some(rule) => Classified {
            object_read: rule.object_read,
            action: rule.action,
            resource: rule.resource.clone(),
            classification: rule.classification.unwrap_or(route.classification),
            kind: rule
                .kind
                .clone()
                .or_else(|| rule.resource.clone())
                .unwrap_or_else(|| route.kind.clone()),
        },
        None => Classified {
            object_read: false,
            action: ActionClass::of_method(method),
            resource: None,
            kind: route.kind.clone(),
            classification: route.classification,
        },
    }
}

fn target_text(t: &Target<'_>) -> String {
    match t.resource {
        Some(r) => format!("resource `{}/{r}`", t.route),
        None => format!("route `{}`", t.route),
    }
}

fn principal_ref(p: &Principal) -> PrincipalRef {
    PrincipalRef::of(p)
}

/// The bearer token of a request, or why there is none usable (`None`: no credentials at all).
fn bearer(headers: &HeaderMap) -> Result<&str, Option<String>> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(None);
    };
    if values.next().is_some() {
        return Err(Some("send exactly one Authorization header".into()));
    }
    let text = value
        .to_str()
        .map_err(|_| Some("the Authorization header is not ASCII".to_string()))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or_else(|| Some("use `Authorization: Bearer <token>`".to_string()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Some("use `Authorization: Bearer <token>`".into()));
    }
    Ok(token.trim())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// Whether a client error was caused by the request body crossing the size limit.
fn body_limit_exceeded(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn elapsed_us(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The context-clearing contract on a refused request: the header names the session and why it
/// is over; the JSON body gets a `session` member with `clear_context: true`.
fn clear_context(resp: &mut Response<Body>, r: &SessionRefusal) {
    let sid = r.sid.as_deref().unwrap_or("-");
    if let Ok(v) = HeaderValue::from_str(&format!("sid={sid}; reason={}", r.state)) {
        resp.headers_mut()
            .insert(HeaderName::from_static("palisade-clear-context"), v);
    }
}

fn audit_unavailable(request_id: &str) -> Response<Body> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        request_id,
        json!({ "error": "audit_unavailable", "message": "the audit log cannot record this request, so it is refused; check the server log and disk" }),
    )
}

fn json_response(
    status: StatusCode,
    request_id: &str,
    mut body: serde_json::Value,
) -> Response<Body> {
    if let serde_json::Value::Object(map) = &mut body {
        map.insert("request_id".into(), json!(request_id));
    }
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    resp
}

/// SHA-256 of `bytes`, in hex.
fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    palisade_core::secret::hex(&sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_once_or_refused() {
        let cases = [
            ("/tickets/42", Ok("/tickets/42")),
            ("/tickets/%34%32", Ok("/tickets/42")),
            ("/hr/%73alaries/all", Ok("/hr/salaries/all")),
            ("/a/%20b", Ok("/a/%20b")),
            ("/a/%3f", Ok("/a/%3F")),
            ("/tickets/", Ok("/tickets/")),
            ("/tickets/../admin", Err("segments")),
            ("/tickets/%2e%2e/admin", Err("segments")),
            ("/tickets/./x", Err("segments")),
            ("/a//b", Err("empty segments")),
            ("/a/%2fb", Err("encoded")),
            ("/a/%5Cb", Err("encoded")),
            ("/a\\b", Err("backslash")),
            ("/a/%zz", Err("not a valid escape")),
            ("/a/%4", Err("incomplete")),
        ];
        for (input, expected) in cases {
            match (normalize_path(input), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{input}: {got}"),
                (got, want) => panic!("{input}: got {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn bearer_parsing_refuses_everything_but_one_bearer() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer tok"),
        );
        assert_eq!(bearer(&h), Ok("tok"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer other"),
        );
        assert!(bearer(&h).is_err());
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-keep").is_some());
    }
}
