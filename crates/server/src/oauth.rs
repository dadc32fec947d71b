//! OAuth 2.0 endpoints: token (client credentials), introspection (RFC 7662), revocation
//! (RFC 7009), authorization server metadata (RFC 8414) and the JWKS.

use crate::{App, audit_or_503};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use palisade_audit::{AuditEvent, Outcome, PrincipalRef};
use palisade_core::registry::ClientAuthError;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// An RFC 6749 §5.2 error response.
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    extra: Option<Value>,
}

impl From<crate::tokens::Refusal> for OAuthError {
    fn from(r: crate::tokens::Refusal) -> Self {
        Self {
            status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
            code: r.code,
            description: r.description,
            extra: r.extra,
        }
    }
}

impl OAuthError {
    fn new(code: &'static str, description: impl Into<String>) -> Self {
        let status = if code == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Self {
            status,
            code,
            description: description.into(),
            extra: None,
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "error_description": self.description });
        if let (Value::Object(map), Some(Value::Object(extra))) = (&mut body, self.extra) {
            map.extend(extra);
        }
        let clear = body.get("session").map(|s| {
            format!(
                "sid={}; reason={}",
                s["id"].as_str().unwrap_or("-"),
                s["state"].as_str().unwrap_or("-")
            )
        });
        let mut resp = (self.status, no_store(), axum::Json(body)).into_response();
        if let Some(v) = clear.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert("palisade-clear-context", v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="palisade""#),
            );
        }
        resp
    }
}

fn no_store() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::PRAGMA, HeaderValue::from_static("no-cache")),
    ]
}

/// Form parameters; RFC 6749 §3.2 forbids repeating one.
fn parse_form(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HashMap<String, Vec<String>>, OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
    {
        return Err(OAuthError::new(
            "invalid_request",
            "send the parameters as application/x-www-form-urlencoded",
        ));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(OAuthError::new(
            "invalid_request",
            "the request body is not UTF-8",
        ));
    }
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        out.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    Ok(out)
}

fn single<'a>(
    form: &'a HashMap<String, Vec<String>>,
    name: &str,
) -> Result<Option<&'a str>, OAuthError> {
    match form.get(name).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([one]) => Ok(Some(one.as_str())),
        Some(_) => Err(OAuthError::new(
            "invalid_request",
            format!("parameter `{name}` is repeated; send it once"),
        )),
    }
}

/// The client credentials of a request: HTTP Basic (client_secret_basic) or body
/// (client_secret_post), never both.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, Vec<String>>,
) -> Result<Option<(String, String)>, OAuthError> {
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| {
                OAuthError::new("invalid_client", "the Authorization header is not ASCII")
            })?;
            match text.split_once(' ') {
                Some((scheme, b64)) if scheme.eq_ignore_ascii_case("basic") => {
                    let raw = STANDARD
                        .decode(b64.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .ok_or_else(|| {
                            OAuthError::new(
                                "invalid_client",
                                "the Basic credentials are not valid base64",
                            )
                        })?;
                    // Client ids contain a colon (`agent:x`); secrets never do, so split at the last
                    // one. Both parts are form-urlencoded per RFC 6749 §2.3.1.
                    let (id, secret) = raw.rsplit_once(':').ok_or_else(|| {
                        OAuthError::new("invalid_client", "Basic credentials need id:secret")
                    })?;
                    let decode = |s: &str| {
                        form_urlencoded::parse(format!("x={s}").as_bytes())
                            .next()
                            .map(|(_, v)| v.into_owned())
                    };
                    Some((
                        decode(id).unwrap_or_default(),
                        decode(secret).unwrap_or_default(),
                    ))
                }
                _ => {
                    return Err(OAuthError::new(
                        "invalid_client",
                        "use HTTP Basic or client_secret_post client authentication",
                    ));
                }
            }
        }
    };
    let post = match (single(form, "client_id")?, single(form, "client_secret")?) {
        (Some(id), Some(secret)) => Some((id.to_string(), secret.to_string())),
        (None, None) => None,
        (Some(_), None) if basic.is_some() => None,
        _ => {
            return Err(OAuthError::new(
                "invalid_client",
                "send both client_id and client_secret",
            ));
        }
    };
    match (basic, post) {
        (Some(_), Some(_)) => Err(OAuthError::new(
            "invalid_request",
            "use exactly one client authentication method",
        )),
        (b, p) => Ok(b.or(p)),
    }
}

async fn refuse(
    app: &App,
    error: OAuthError,
    client: Option<&str>,
    started: std::time::Instant,
    grant: &str,
) -> Response {
    let mut event = AuditEvent::new("token.refused");
    event.principal = client.map(|c| PrincipalRef {
        id: c.chars().take(80).collect(),
        ..PrincipalRef::default()
    });
    event.action = Some(grant.into());
    event.outcome = Some(Outcome {
        status: error.status.as_u16(),
        error: Some(format!("{}: {}", error.code, error.description)),
        ..Outcome::default()
    });
    event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    audit_or_503(app, event, error.into_response()).await
}

/// RFC 8693 token exchange.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";

/// `POST /oauth2/token`: client credentials (RFC 6749 §4.4) and token exchange (RFC 8693).
pub async fn token(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = std::time::Instant::now();
    // Fail closed while no required SIEM sink can record (the refusal is kept locally).
    if let Some(reason) = app.audit.refusal() {
        tracing::warn!(%reason, "token request refused: fail-closed audit");
        let mut event = AuditEvent::new("token.refused");
        event.outcome = Some(palisade_audit::Outcome {
            status: 503,
            error: Some(reason),
            ..Default::default()
        });
        event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        let resp = crate::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            palisade_audit::FAIL_CLOSED_MESSAGE,
            None,
        );
        return audit_or_503(&app, event, resp).await;
    }
    let form = match parse_form(&headers, &body) {
        Ok(f) => f,
        Err(e) => return refuse(&app, e, None, started, "unknown").await,
    };
    let grant_type = match single(&form, "grant_type") {
        Ok(Some(g)) => g,
        Ok(None) => {
            return refuse(
                &app,
                OAuthError::new("invalid_request", "grant_type is missing"),
                None,
                started,
                "unknown",
            )
            .await;
        }
        Err(e) => return refuse(&app, e, None, started, "unknown").await,
    };
    if grant_type != "client_credentials" && grant_type != TOKEN_EXCHANGE {
        let e = OAuthError::new(
            "unsupported_grant_type",
            format!(
                "grant_type `{grant_type}` is not supported; use client_credentials or {TOKEN_EXCHANGE}"
            ),
        );
        return refuse(&app, e, None, started, "unknown").await;
    }
    let label = if grant_type == TOKEN_EXCHANGE {
        "token_exchange"
    } else {
        "client_credentials"
    };
    let (client_id, secret) = match client_credentials(&headers, &form) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return refuse(
                &app,
                OAuthError::new("invalid_client", "client authentication is required"),
                None,
                started,
                label,
            )
            .await;
        }
        Err(e) => return refuse(&app, e, None, started, label).await,
    };
    let principal = match app
        .registry
        .authenticate_client(&client_id, &secret, app.tokens.now())
    {
        Ok(p) => p,
        Err(ClientAuthError::Inactive(id, status)) => {
            let e = OAuthError::new(
                "invalid_client",
                format!("{id} is {status} and gets no tokens"),
            );
            return refuse(&app, e, Some(&client_id), started, label).await;
        }
        Err(ClientAuthError::BadCredentials) => {
            return refuse(
                &app,
                OAuthError::new("invalid_client", "client authentication failed"),
                Some(&client_id),
                started,
                label,
            )
            .await;
        }
        Err(ClientAuthError::Store(e)) => {
            tracing::error!(error = %e, "client lookup failed");
            return crate::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the credential store failed",
                None,
            );
        }
    };
    let delegation = if grant_type == TOKEN_EXCHANGE {
        match delegation_for(&app, &principal, &form).await {
            Ok(d) => Some(d),
            Err(e) => return refuse(&app, e, Some(&client_id), started, label).await,
        }
    } else {
        None
    };
    let scope = match single(&form, "scope") {
        Ok(s) => s,
        Err(e) => return refuse(&app, e, Some(&client_id), started, label).await,
    };
    // RFC 8693's `audience` names the same thing as RFC 8707's `resource` here: the API's URI.
    let mut resources = form.get("resource").cloned().unwrap_or_default();
    resources.extend(form.get("audience").cloned().unwrap_or_default());
    let session_id = match single(&form, "session_id") {
        Ok(s) => s,
        Err(e) => return refuse(&app, e, Some(&client_id), started, label).await,
    };
    if let Err(r) = app.tokens.admit(&principal) {
        return refuse(&app, r.into(), Some(&client_id), started, label).await;
    }
    let grant = match app.tokens.grant_for(&principal, scope, &resources) {
        Ok(g) => g,
        Err((code, msg)) => {
            return refuse(
                &app,
                OAuthError::new(code, msg),
                Some(&client_id),
                started,
                label,
            )
            .await;
        }
    };
    let human_id = delegation.as_ref().map(|d| d.human.id.to_string());
    if !grant.write_routes.is_empty() && session_id.is_none() {
        let e = OAuthError::new(
            "invalid_request",
            "write scopes are issued inside a session, so the decision sees its context: add session_id=<the sid of your read token>",
        );
        return refuse(&app, e, Some(&client_id), started, label).await;
    }
    if let Err(e) = decide_write_token(&app, &principal, &grant, session_id, human_id.as_deref()) {
        return refuse(&app, e, Some(&client_id), started, label).await;
    }
    // Last, so no refusal above leaves a session behind.
    let session = match app
        .tokens
        .session_for(&principal, session_id, human_id.as_deref())
    {
        Ok(s) => s,
        Err(r) => return refuse(&app, r.into(), Some(&client_id), started, label).await,
    };
    let (token, claims) =
        match app
            .tokens
            .issue(&principal, &grant, session.as_deref(), delegation.as_ref())
        {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "token signing failed");
                if let (Some(s), None) = (&session, session_id) {
                    let _ = app.tokens.sessions.end(
                        std::slice::from_ref(s),
                        palisade_core::session::EndReason::Ended,
                        "palisade",
                        Some("token signing failed"),
                    );
                }
                return crate::error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "token signing failed",
                    None,
                );
            }
        };
    let mut event = AuditEvent::new("token.issued");
    event.principal = Some(palisade_audit::PrincipalRef::of(&principal));
    event.action = Some(
        if delegation.is_some() {
            "token_exchange"
        } else {
            "client_credentials"
        }
        .into(),
    );
    event.resource = Some(claims.aud.clone());
    event.outcome = Some(Outcome {
        status: 200,
        ..Outcome::default()
    });
    event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    event.detail = json!({ "jti": claims.jti, "exp": claims.exp, "scope": claims.scope });
    if let Some(act) = &claims.act {
        event.delegation = Some(palisade_audit::Delegation {
            initiating_human: claims.sub.clone(),
            actor_chain: act.chain().into_iter().map(str::to_string).collect(),
        });
    }
    let mut body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": claims.exp - claims.iat,
    });
    if delegation.is_some() {
        body["issued_token_type"] = json!(ACCESS_TOKEN_TYPE);
    }
    if let Some(scope) = &claims.scope {
        body["scope"] = json!(scope);
    }
    if let Some(s) = &session {
        let renewal = session_id.is_some();
        event.detail["session"] =
            json!({ "id": s.sid, "renewal": renewal, "hard_end": s.hard_end });
        body["session_id"] = json!(s.sid);
        body["session_hard_end"] = json!(s.hard_end);
        body["session_expires_in"] = json!(s.hard_end.unix_seconds() - claims.iat);
    }
    audit_or_503(
        &app,
        event,
        (StatusCode::OK, no_store(), axum::Json(body)).into_response(),
    )
    .await
}

/// Privilege separation: an agent's token with write scopes is decided by policy (action
/// `write_token` on each route whose write scope it asks for) in the token request's context.
fn decide_write_token(
    app: &App,
    agent: &palisade_core::Principal,
    grant: &crate::tokens::Grant,
    session_id: Option<&str>,
    initiating_human: Option<&str>,
) -> Result<(), OAuthError> {
    use palisade_gateway::DecisionPoint;
    let session = session_id.and_then(|sid| app.tokens.sessions.get(sid));
    for name in &grant.write_routes {
        // A route, or an MCP server (whose Cedar route has the server's name).
        let found = app
            .config
            .routes
            .iter()
            .find(|r| &r.name == name)
            .map(|r| {
                (
                    &r.name,
                    &r.kind,
                    &r.system,
                    r.classification,
                    &r.write_scope,
                )
            })
            .or_else(|| {
                app.config
                    .mcp
                    .servers
                    .iter()
                    .find(|m| &m.name == name)
                    .map(|m| {
                        (
                            &m.name,
                            &m.kind,
                            &m.system,
                            m.classification,
                            &m.write_scope,
                        )
                    })
            });
        let Some((route_name, kind, system, classification, write_scope)) = found else {
            continue;
        };
        let target = palisade_policy::Target {
            route: route_name,
            resource: None,
            tool: false,
            route_kind: kind,
            kind,
            system: system.as_deref().unwrap_or(""),
            route_classification: classification,
            classification,
        };
        let mut ctx =
            palisade_policy::RequestContext::at("POST", "/oauth2/token", app.tokens.now());
        ctx.initiating_human = initiating_human;
        let taint = session.as_ref().map(|s| s.taint()).unwrap_or_default();
        if let Some(s) = &session {
            let c = s.counters();
            ctx.calls = c.calls;
            ctx.objects_read = c.objects_read;
            ctx.bytes_out = c.bytes_out;
            ctx.taint = &taint;
            ctx.sensitive = s.is_sensitive();
        }
        let (decision, version) =
            app.policy
                .decide(agent, palisade_policy::Action::WriteToken, &target, &ctx);
        if !decision.allowed {
            return Err(OAuthError {
                status: StatusCode::FORBIDDEN,
                code: "access_denied",
                description: format!(
                    "policy refuses {} a token with `{}` for `{}` (decided by {})",
                    agent.id,
                    write_scope,
                    route_name,
                    decision.policies.join(", ")
                ),
                extra: Some(json!({
                    "deciding_policies": decision.policies,
                    "policy_version": version,
                })),
            });
        }
    }
    Ok(())
}

/// The delegation a token-exchange request asks for: the subject token must be a Palisade token
/// of an active human (or a delegated token, whose chain the new actor extends), and the human
/// must allow this agent to act for them (owner, team owner, or `may_act`).
async fn delegation_for(
    app: &App,
    agent: &palisade_core::Principal,
    form: &HashMap<String, Vec<String>>,
) -> Result<crate::tokens::Delegation, OAuthError> {
    if agent.agent().is_none() {
        return Err(OAuthError::new(
            "unauthorized_client",
            "only agents exchange tokens to act for a human",
        ));
    }
    if single(form, "actor_token")?.is_some() {
        return Err(OAuthError::new(
            "invalid_request",
            "the authenticated client is the actor; omit actor_token",
        ));
    }
    if let Some(t) = single(form, "requested_token_type")?
        && t != ACCESS_TOKEN_TYPE
    {
        return Err(OAuthError::new(
            "invalid_request",
            format!("requested_token_type `{t}` is not issued; ask for {ACCESS_TOKEN_TYPE}"),
        ));
    }
    let subject = single(form, "subject_token")?
        .ok_or_else(|| OAuthError::new("invalid_request", "subject_token is missing"))?;
    match single(form, "subject_token_type")? {
        Some(ACCESS_TOKEN_TYPE | JWT_TOKEN_TYPE) => {}
        Some(ID_TOKEN_TYPE) => return external_delegation(app, agent, subject).await,
        Some(other) => {
            return Err(OAuthError::new(
                "invalid_request",
                format!(
                    "subject_token_type `{other}` is not accepted; send a Palisade access token as {ACCESS_TOKEN_TYPE} or an ID token of a configured identity provider as {ID_TOKEN_TYPE}"
                ),
            ));
        }
        None => {
            return Err(OAuthError::new(
                "invalid_request",
                "subject_token_type is missing",
            ));
        }
    }
    let verified = app
        .tokens
        .verify(subject, None)
        .map_err(|e| OAuthError::new("invalid_request", format!("subject_token: {e}")))?;
    let claims = verified.claims();
    let human = app
        .tokens
        .live_principal(&claims.sub)
        .map_err(|f| OAuthError::new("invalid_request", format!("subject_token: {}", f.reason)))?;
    let now = app.tokens.now().unix_seconds();
    if claims.exp <= now {
        return Err(OAuthError::new(
            "invalid_request",
            "subject_token: it has expired; get a fresh one",
        ));
    }
    if human.kind() != palisade_core::PrincipalKind::Human {
        return Err(OAuthError::new(
            "invalid_request",
            format!(
                "subject_token: its subject {} is not a human; only humans delegate",
                human.id
            ),
        ));
    }
    if claims.act.is_none() && claims.aud != app.tokens.human_token_audience() {
        return Err(OAuthError::new(
            "invalid_request",
            format!(
                "subject_token: a human's Palisade token must be minted for the token endpoint ({})",
                app.tokens.human_token_audience()
            ),
        ));
    }
    if let Some(act) = &claims.act {
        // The chain so far must still be live: a delegated subject token of a killed session or
        // a suspended agent delegates nothing.
        app.tokens.live_caller(&verified).map_err(|f| {
            OAuthError::new("invalid_request", format!("subject_token: {}", f.reason))
        })?;
        if act.chain().len() >= crate::tokens::MAX_ACTOR_CHAIN {
            return Err(OAuthError::new(
                "invalid_request",
                format!(
                    "subject_token already has {} actors; a chain may have at most {}",
                    act.chain().len(),
                    crate::tokens::MAX_ACTOR_CHAIN
                ),
            ));
        }
    }
    if !human.allows_actor(agent) {
        return Err(OAuthError::new(
            "invalid_request",
            format!(
                "{} may not act for {}: the human neither owns it (directly or through a team) nor lists it in may_act",
                agent.id, human.id
            ),
        ));
    }
    Ok(crate::tokens::Delegation {
        human,
        prior: claims.act.clone(),
        not_after: claims.exp,
    })
}

/// A delegation from an ID token of an external OpenID Connect provider: the token verifies
/// against the provider's JWKS, and its `human_claim` names a registered, active human (by email,
/// or by id slug), who must allow this agent.
async fn external_delegation(
    app: &App,
    agent: &palisade_core::Principal,
    token: &str,
) -> Result<crate::tokens::Delegation, OAuthError> {
    let now = app.tokens.now().unix_seconds();
    let identity = app
        .identity_providers
        .verify(token, now, app.config.oauth.leeway_secs)
        .await
        .map_err(|e| OAuthError::new("invalid_request", format!("subject_token: {e}")))?;
    let human_id = if identity.claim == "email" {
        app.registry
            .list(Some(palisade_core::PrincipalKind::Human))
            .iter()
            .find(|h| match &h.detail {
                palisade_core::PrincipalDetail::Human(d) => d
                    .email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(&identity.value)),
                _ => false,
            })
            .map(|h| h.id.clone())
            .ok_or_else(|| {
                OAuthError::new(
            "invalid_request",
                    format!(
                        "subject_token: no registered human has the email of this `{}` identity; register them with that email",
                        identity.provider
                    ),
                )
            })?
    } else {
        palisade_core::PrincipalId::new(palisade_core::PrincipalKind::Human, &identity.value)
            .map_err(|e| {
                OAuthError::new(
                    "invalid_request",
                    format!(
                        "subject_token: `{}` does not name a human: {}",
                        identity.claim, e.0
                    ),
                )
            })?
    };
    let human = app
        .tokens
        .live_principal(&human_id.to_string())
        .map_err(|f| OAuthError::new("invalid_request", format!("subject_token: {}", f.reason)))?;
    if !human.allows_actor(agent) {
        return Err(OAuthError::new(
            "invalid_request",
            format!(
                "{} may not act for {}: the human neither owns it (directly or through a team) nor lists it in may_act",
                agent.id, human.id
            ),
        ));
    }
    Ok(crate::tokens::Delegation {
        human,
        prior: None,
        not_after: identity.exp,
    })
}

/// `POST /api/v1/humans/{id}/token`: an administrator mints a short-lived access token for a
/// human, the subject token of a token exchange (until humans sign in through the console).
pub async fn mint_human_token(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let audience = match query.get("for").map(String::as_str) {
        None | Some("exchange") => app.tokens.human_token_audience(),
        Some("approvals") => app.tokens.approvals_audience(),
        Some(other) => {
            return crate::error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                &format!(
                    "for: `{other}` is unknown; a human token is `for=exchange` (a token exchange's subject token, the default) or `for=approvals` (deciding approvals)"
                ),
                Some("for"),
            );
        }
    };
    let id = match palisade_core::PrincipalId::parse_with_default(
        &id,
        Some(palisade_core::PrincipalKind::Human),
    ) {
        Ok(i) => i,
        Err(e) => {
            return crate::error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                &format!("id: {}", e.0),
                Some("id"),
            );
        }
    };
    let human = match app.tokens.live_principal(&id.to_string()) {
        Ok(h) => h,
        Err(f) => {
            return crate::error_response(StatusCode::CONFLICT, "conflict", &f.reason, None);
        }
    };
    let (token, claims) = match app.tokens.issue_human_for(&human, &audience) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "token signing failed");
            return crate::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "token signing failed",
                None,
            );
        }
    };
    let mut event = AuditEvent::new("token.issued");
    event.principal = Some(PrincipalRef {
        id: "admin".into(),
        ..PrincipalRef::default()
    });
    event.action = Some("human_token".into());
    event.resource = Some(human.id.to_string());
    event.outcome = Some(Outcome {
        status: 200,
        ..Outcome::default()
    });
    event.detail =
        json!({ "jti": claims.jti, "exp": claims.exp, "sub": claims.sub, "aud": claims.aud });
    let body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": claims.exp - claims.iat,
        "issued_token_type": ACCESS_TOKEN_TYPE,
    });
    audit_or_503(
        &app,
        event,
        (StatusCode::OK, no_store(), axum::Json(body)).into_response(),
    )
    .await
}

/// Authenticates the caller of introspection/revocation: the admin token or client credentials.
fn caller_of(
    app: &App,
    headers: &HeaderMap,
    form: &HashMap<String, Vec<String>>,
) -> Result<Option<String>, OAuthError> {
    if crate::admin::is_admin(app, headers) {
        return Ok(None);
    }
    match client_credentials(headers, form)? {
        Some((id, secret)) => app
            .registry
            .authenticate_client(&id, &secret, app.tokens.now())
            .map(|p| Some(p.id.to_string()))
            .map_err(|_| OAuthError::new("invalid_client", "client authentication failed")),
        None => Err(OAuthError::new(
            "invalid_client",
            "authenticate with client credentials or the admin token",
        )),
    }
}

/// The shared prologue of introspection and revocation: form, caller, `token` parameter.
fn token_request(
    app: &App,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Option<String>, String), OAuthError> {
    let form = parse_form(headers, body)?;
    let caller = caller_of(app, headers, &form)?;
    match single(&form, "token")? {
        Some(t) => Ok((caller, t.to_string())),
        None => Err(OAuthError::new(
            "invalid_request",
            "parameter `token` is missing",
        )),
    }
}

/// `POST /oauth2/introspect` (RFC 7662).
pub async fn introspect(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let (_caller, token) = match token_request(&app, &headers, &body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let token = token.as_str();
    let inactive = || {
        (
            StatusCode::OK,
            no_store(),
            axum::Json(json!({ "active": false })),
        )
            .into_response()
    };
    let Ok(verified) = app.tokens.verify(token, None) else {
        return inactive();
    };
    if app
        .tokens
        .live_caller(&verified)
        .map(|c| c.principal)
        .is_err()
    {
        return inactive();
    }
    let mut body = serde_json::to_value(verified.claims()).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut body {
        map.insert("active".into(), json!(true));
        map.insert("token_type".into(), json!("Bearer"));
    }
    (StatusCode::OK, no_store(), axum::Json(body)).into_response()
}

/// `POST /oauth2/revoke` (RFC 7009): always 200 for a token the caller may revoke or that is
/// not valid; a client may revoke only its own tokens.
pub async fn revoke(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let (caller, token) = match token_request(&app, &headers, &body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let token = token.as_str();
    let ok = || (StatusCode::OK, no_store()).into_response();
    let Ok(verified) = app.tokens.verify(token, None) else {
        return ok();
    };
    if let Some(client) = &caller
        && *client != verified.claims().client_id
    {
        return ok();
    }
    if let Err(e) = app.tokens.revoke(&verified) {
        tracing::error!(error = %e, "revocation failed");
        return crate::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the revocation could not be stored; retry",
            None,
        );
    }
    let by = caller.unwrap_or_else(|| "admin".into());
    // Revoking a token ends its session: the session's other tokens stop too.
    let ended = match verified
        .claims()
        .sid
        .as_deref()
        .and_then(|sid| app.tokens.sessions.get(sid))
    {
        Some(s) => match app.tokens.sessions.end(
            &[s],
            palisade_core::session::EndReason::Revoked,
            &by,
            None,
        ) {
            Ok(ended) => ended,
            Err(e) => {
                tracing::error!(error = %e, "session end could not be stored");
                return crate::error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "internal",
                    "the session end could not be stored; retry",
                    None,
                );
            }
        },
        None => Vec::new(),
    };
    let mut event = AuditEvent::new("token.revoked");
    event.principal = Some(PrincipalRef {
        id: by,
        ..PrincipalRef::default()
    });
    event.action = Some("revoke".into());
    event.resource = Some(verified.claims().sub.clone());
    event.detail = json!({ "jti": verified.claims().jti, "sid": verified.claims().sid });
    if crate::sessions::audit_ended(&app, &ended).await.is_err() {
        return crate::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log could not record the session end",
            None,
        );
    }
    audit_or_503(&app, event, ok()).await
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
pub async fn metadata(State(app): State<Arc<App>>) -> Response {
    let iss = &app.config.server.issuer;
    axum::Json(json!({
        "issuer": iss,
        "token_endpoint": format!("{iss}/oauth2/token"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{iss}/oauth2/introspect"),
        "revocation_endpoint": format!("{iss}/oauth2/revoke"),
        "grant_types_supported": ["client_credentials", TOKEN_EXCHANGE],
        "palisade_session_parameter": "session_id",
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
        "response_types_supported": [],
        "scopes_supported": [],
    }))
    .into_response()
}

/// `GET /.well-known/jwks.json`.
pub async fn jwks(State(app): State<Arc<App>>) -> Response {
    let keys = app.tokens.keys();
    (
        [(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        )],
        axum::Json(keys.jwks().clone()),
    )
        .into_response()
}
