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
        let mut resp = (self.status, no_store(), axum::Json(body)).into_response();
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
) -> Response {
    let mut event = AuditEvent::new("token.refused");
    event.principal = client.map(|c| PrincipalRef {
        id: c.chars().take(80).collect(),
        ..PrincipalRef::default()
    });
    event.action = Some("client_credentials".into());
    event.outcome = Some(Outcome {
        status: error.status.as_u16(),
        error: Some(format!("{}: {}", error.code, error.description)),
        ..Outcome::default()
    });
    event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    audit_or_503(app, event, error.into_response()).await
}

/// `POST /oauth2/token`.
pub async fn token(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = std::time::Instant::now();
    let form = match parse_form(&headers, &body) {
        Ok(f) => f,
        Err(e) => return refuse(&app, e, None, started).await,
    };
    let grant_type = match single(&form, "grant_type") {
        Ok(Some(g)) => g,
        Ok(None) => {
            return refuse(
                &app,
                OAuthError::new("invalid_request", "grant_type is missing"),
                None,
                started,
            )
            .await;
        }
        Err(e) => return refuse(&app, e, None, started).await,
    };
    if grant_type != "client_credentials" {
        let e = OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type `{grant_type}` is not supported; use client_credentials"),
        );
        return refuse(&app, e, None, started).await;
    }
    let (client_id, secret) = match client_credentials(&headers, &form) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return refuse(
                &app,
                OAuthError::new("invalid_client", "client authentication is required"),
                None,
                started,
            )
            .await;
        }
        Err(e) => return refuse(&app, e, None, started).await,
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
            return refuse(&app, e, Some(&client_id), started).await;
        }
        Err(ClientAuthError::BadCredentials) => {
            return refuse(
                &app,
                OAuthError::new("invalid_client", "client authentication failed"),
                Some(&client_id),
                started,
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
    let scope = match single(&form, "scope") {
        Ok(s) => s,
        Err(e) => return refuse(&app, e, Some(&client_id), started).await,
    };
    let resources = form.get("resource").cloned().unwrap_or_default();
    let session_id = match single(&form, "session_id") {
        Ok(s) => s,
        Err(e) => return refuse(&app, e, Some(&client_id), started).await,
    };
    if let Err(r) = app.tokens.admit(&principal) {
        return refuse(&app, r.into(), Some(&client_id), started).await;
    }
    let grant = match app.tokens.grant_for(&principal, scope, &resources) {
        Ok(g) => g,
        Err((code, msg)) => {
            return refuse(&app, OAuthError::new(code, msg), Some(&client_id), started).await;
        }
    };
    // Last, so no refusal above leaves a session behind.
    let session = match app.tokens.session_for(&principal, session_id) {
        Ok(s) => s,
        Err(r) => return refuse(&app, r.into(), Some(&client_id), started).await,
    };
    let (token, claims) = match app.tokens.issue(&principal, &grant, session.as_deref()) {
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
    event.principal = Some(palisade_audit::PrincipalRef {
        id: principal.id.to_string(),
        model: claims.model.clone(),
        owner: claims.owner.clone(),
    });
    event.action = Some("client_credentials".into());
    event.resource = Some(claims.aud.clone());
    event.outcome = Some(Outcome {
        status: 200,
        ..Outcome::default()
    });
    event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    event.detail = json!({ "jti": claims.jti, "exp": claims.exp, "scope": claims.scope });
    let mut body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": claims.exp - claims.iat,
    });
    if let Some(s) = &session {
        let renewal = session_id.is_some();
        event.detail["session"] =
            json!({ "id": s.sid, "renewal": renewal, "hard_end": s.hard_end });
        body["session_id"] = json!(s.sid);
        body["session_hard_end"] = json!(s.hard_end);
        body["session_expires_in"] = json!(s.hard_end.unix_seconds() - claims.iat);
    }
    if let Some(scope) = &claims.scope {
        body["scope"] = json!(scope);
    }
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
    if app.tokens.live_caller(&verified).map(|(p, _)| p).is_err() {
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
    for record in &ended {
        if crate::sessions::audit_end(&app, record).await.is_err() {
            return crate::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the audit log could not record the session end",
                None,
            );
        }
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
        "grant_types_supported": ["client_credentials"],
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
