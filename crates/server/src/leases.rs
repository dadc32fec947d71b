//! Just-in-time leases of vault secrets to agents: `POST /api/v1/leases` with the agent's own
//! token (audience `<issuer>/vault`) → a policy decision (`credential` on
//! `Palisade::Resource::"vault/<secret>"`) → the value with a lease id and an expiry (default
//! 15 minutes, never past the session's hard end). Renewals decide again; a lease dies with
//! its session (ended, expired, killed) and with the agent's suspension. Every issue, renewal
//! and revocation is audited, without the value.
//!
//! Leases live in memory: a restart revokes them all (the safe direction; agents ask again).
// Handlers answer early with a ready response; boxing them would only add noise.
#![allow(clippy::result_large_err)]

use crate::{App, error_response};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use palisade_audit::{AuditEvent, DecisionRecord, Outcome, PrincipalRef};
use palisade_gateway::{Authenticator, Caller, DecisionPoint};
use palisade_policy::{Action, RequestContext, Target};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Default lease time.
pub const DEFAULT_TTL_SECS: u64 = 15 * 60;
/// Longest lease time asked for.
pub const MAX_TTL_SECS: u64 = 60 * 60;

/// One lease.
#[derive(Clone, Debug)]
struct Lease {
    /// The vault secret, or `db/<database>/<role>`.
    secret: String,
    principal: String,
    sid: String,
    expires_ns: i64,
    revoked: Option<&'static str>,
    /// For a database lease: the database, role template and login role created.
    dynamic: Option<(Arc<palisade_vault::database::Database>, String, String)>,
}

/// The live leases.
#[derive(Default)]
pub struct Leases {
    by_id: Mutex<HashMap<String, Lease>>,
}

impl Leases {
    /// Records a new lease of `caller`'s session; returns its id.
    fn add(
        &self,
        caller: &Caller,
        secret: &str,
        expires_ns: i64,
        dynamic: Option<(Arc<palisade_vault::database::Database>, String, String)>,
    ) -> Result<String, String> {
        let id = format!(
            "lease_{}",
            palisade_core::secret::random_id::<16>().map_err(|e| e.to_string())?
        );
        let lease = Lease {
            secret: secret.to_string(),
            principal: caller.principal.id.to_string(),
            sid: caller
                .session
                .as_ref()
                .map(|s| s.sid.clone())
                .unwrap_or_default(),
            expires_ns,
            revoked: None,
            dynamic,
        };
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), lease);
        Ok(id)
    }
}

fn now_ns(app: &App) -> i64 {
    i64::try_from(app.tokens.now().unix_nanos()).unwrap_or(i64::MAX)
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The agent behind the request's token, for the vault audience.
fn caller(app: &App, headers: &HeaderMap) -> Result<Caller, Response> {
    let unauthorized = |m: String| {
        let mut r = error_response(StatusCode::UNAUTHORIZED, "invalid_token", &m, None);
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static(r#"Bearer realm="palisade-vault""#),
        );
        r
    };
    let token = bearer(headers).ok_or_else(|| {
        unauthorized(format!(
            "leases need `Authorization: Bearer <agent token>` with resource={}",
            app.config.vault.audience
        ))
    })?;
    let caller = app
        .tokens
        .authenticate(token, &app.config.vault.audience)
        .map_err(|f| unauthorized(f.reason))?;
    if caller.principal.agent().is_none() || caller.session.is_none() {
        return Err(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "leases are for agents, inside a session",
            None,
        ));
    }
    Ok(caller)
}

/// The policy decision on leasing `secret` now.
fn decide(app: &App, caller: &Caller, secret: &str) -> (palisade_policy::Decision, String) {
    decide_as(app, caller, secret, Action::Credential)
}

/// The decision on `action` over the lease's resource.
fn decide_as(
    app: &App,
    caller: &Caller,
    secret: &str,
    action: Action,
) -> (palisade_policy::Decision, String) {
    let target = Target {
        route: "vault",
        resource: Some(secret),
        tool: false,
        route_kind: "vault",
        kind: "secret",
        system: "",
        route_classification: palisade_core::principal::Classification::Restricted,
        classification: palisade_core::principal::Classification::Restricted,
    };
    let path = format!("/api/v1/leases/{secret}");
    let mut ctx = RequestContext::at("POST", &path, app.tokens.now());
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
    app.policy.decide(&caller.principal, action, &target, &ctx)
}

fn event(kind: &str, caller: &Caller, secret: &str) -> AuditEvent {
    let mut e = AuditEvent::new(kind);
    e.principal = Some(PrincipalRef::of(&caller.principal));
    e.action = Some("credential".into());
    e.resource = Some(format!("Palisade::Resource::\"vault/{secret}\""));
    e.detail = json!({
        "resource_type": "secret",
        "session": caller.session.as_ref().map(|s| s.sid.clone()),
        "token_id": caller.token_id,
    });
    e.inputs = caller
        .session
        .as_deref()
        .and_then(palisade_audit::InputContext::of);
    e
}

async fn finish(app: &App, mut e: AuditEvent, resp: Response) -> Response {
    let status = resp.status().as_u16();
    e.outcome = Some(Outcome {
        status,
        ..Outcome::default()
    });
    crate::audit_or_503(app, e, resp).await
}

fn ttl_of(body: &Value) -> Result<u64, Response> {
    match body.get("ttl_seconds") {
        None | Some(Value::Null) => Ok(DEFAULT_TTL_SECS),
        Some(v) => v
            .as_u64()
            .filter(|t| (1..=MAX_TTL_SECS).contains(t))
            .ok_or_else(|| {
                error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    &format!("`ttl_seconds` must be 1 to {MAX_TTL_SECS}"),
                    Some("ttl_seconds"),
                )
            }),
    }
}

/// The lease's end: the asked time, but never past the session's hard end.
fn expiry(app: &App, caller: &Caller, ttl: u64) -> i64 {
    let asked = now_ns(app).saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX) * 1_000_000_000);
    let hard_end = caller.session.as_ref().map_or(i64::MAX, |s| {
        i64::try_from(s.hard_end.unix_nanos()).unwrap_or(i64::MAX)
    });
    asked.min(hard_end)
}

fn rfc3339(ns: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `POST /api/v1/leases` `{"secret": "...", "ttl_seconds": 900}`.
pub async fn issue(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match caller(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let database = match (body.get("database"), body.get("role")) {
        (Some(Value::String(d)), Some(Value::String(r))) => {
            match app.databases.iter().find(|db| db.name == *d) {
                Some(db) if db.has_role(r) => Some((db.clone(), r.clone())),
                _ => {
                    return error_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        &format!(
                            "no database `{d}` with role `{r}` is configured ([[vault.databases]])"
                        ),
                        Some("database"),
                    );
                }
            }
        }
        (None, None) => None,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "a database lease names both `database` and `role`",
                Some("role"),
            );
        }
    };
    let secret = match (&database, body.get("secret").and_then(Value::as_str)) {
        (Some((db, role)), None) => format!("db/{}/{role}", db.name),
        (None, Some(s)) => s.to_string(),
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "the body must be {\"secret\": \"<name>\"} or {\"database\": \"<db>\", \"role\": \"<role>\"}, with an optional \"ttl_seconds\": <1..3600>",
                Some("secret"),
            );
        }
    };
    let ttl = match ttl_of(&body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Some(s) = &caller.session {
        s.count_call();
    }
    let mut e = event("lease.issued", &caller, &secret);
    let (decision, version) = decide(&app, &caller, &secret);
    e.decision = Some(DecisionRecord {
        allowed: decision.allowed,
        policies: decision.policies.clone(),
        policy_version: Some(version),
    });
    if !decision.allowed {
        e.kind = "lease.refused".into();
        let resp = error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "{} may not lease `{secret}`; decided by {}",
                caller.principal.id,
                decision.policies.join(", ")
            ),
            None,
        );
        return finish(&app, e, resp).await;
    }
    if let Some((db, role)) = database {
        let rules = decision.approvals.clone();
        return issue_database(&app, &caller, (e, &headers), db, role, ttl, secret, rules).await;
    }
    let value = match app.vault.reveal(&secret) {
        Ok(v) => v,
        Err(err) => {
            e.kind = "lease.refused".into();
            let status = if matches!(err, palisade_vault::VaultError::NotFound(_)) {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let resp = error_response(status, "credential_unavailable", &err.to_string(), None);
            return finish(&app, e, resp).await;
        }
    };
    let Ok(value) = String::from_utf8(value.to_vec()) else {
        return error_response(
            StatusCode::CONFLICT,
            "credential_unavailable",
            &format!("secret `{secret}` is not UTF-8 text, so it cannot be leased as JSON"),
            None,
        );
    };
    let value = zeroize::Zeroizing::new(value);
    // Approval last, so a grant is used only by a lease that is then made.
    if let Err(resp) = approval_gate(
        &app,
        &caller,
        &headers,
        &mut e,
        &decision.approvals,
        &secret,
        ttl,
    )
    .await
    {
        return finish(&app, e, resp).await;
    }
    let expires_ns = expiry(&app, &caller, ttl);
    let lease_id = match app.leases.add(&caller, &secret, expires_ns, None) {
        Ok(id) => id,
        Err(err) => {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", &err, None);
        }
    };
    e.detail["lease_id"] = json!(lease_id);
    e.detail["expires_ns"] = json!(expires_ns);
    let resp = axum::Json(json!({
        "lease_id": lease_id,
        "secret": secret,
        "value": value.as_str(),
        "expires_at": rfc3339(expires_ns),
        "renewable": true,
    }))
    .into_response();
    finish(&app, e, resp).await
}

/// The approval the deciding permits ask for (`@approval` on a `credential` or, for a database
/// role that writes, a `write` permit), gated like any action and bound to this secret and
/// TTL: `Ok` to go ahead (the approval is now used), or the answer: 428 while it waits (with
/// `Palisade-Approval`), 403 when refused.
#[allow(clippy::result_large_err)]
async fn approval_gate(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    e: &mut AuditEvent,
    rules: &[palisade_core::approval::ApprovalRule],
    secret: &str,
    ttl: u64,
) -> Result<(), Response> {
    let Some(rule) =
        palisade_core::approval::requirement(rules, false, &app.config.approvals.defaults)
    else {
        return Ok(());
    };
    let claimed = headers
        .get(palisade_approval::APPROVAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let body = json!({ "secret": secret, "ttl_seconds": ttl }).to_string();
    let resource = format!("Palisade::Resource::\"vault/{secret}\"");
    let request_id = e.event_id.clone();
    let action = palisade_approval::Action {
        principal: &caller.principal,
        initiating_human: caller.initiating_human.as_deref(),
        session: caller.session.as_ref().map(|s| s.sid.as_str()),
        channel: "vault",
        action: "credential",
        resource: &resource,
        method: "lease",
        target: secret,
        context: "",
        query: None,
        body: body.as_bytes(),
        preview: Some((body.clone(), false)),
        reasoning: None,
        request_id: &request_id,
    };
    match app.approvals.gate(&action, &rule, claimed).await {
        palisade_approval::Gate::Proceed(a) => {
            e.detail["approval"] = palisade_gateway::approval::used(&a, &app.approvals.link(&a.id));
            Ok(())
        }
        palisade_approval::Gate::Pending(a) => {
            e.kind = "lease.refused".into();
            let summary = palisade_gateway::approval::summary(&a, &app.approvals.link(&a.id));
            e.detail["approval"] = summary.clone();
            let message =
                palisade_gateway::approval::waiting_message(&a, &format!("a lease of `{secret}`"));
            let mut resp = (
                StatusCode::PRECONDITION_REQUIRED,
                axum::Json(json!({
                    "error": { "code": "approval_required", "message": message, "approval": summary }
                })),
            )
                .into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&a.id) {
                resp.headers_mut().insert(
                    axum::http::HeaderName::from_static(palisade_approval::APPROVAL_HEADER),
                    v,
                );
            }
            Err(resp)
        }
        palisade_approval::Gate::Refused { code, message, id } => {
            e.kind = "lease.refused".into();
            e.detail["approval_refused"] = json!(code);
            if let Some(id) = id {
                e.detail["approval"] = json!({ "id": id, "refused": code });
            }
            Err(error_response(StatusCode::FORBIDDEN, code, &message, None))
        }
        palisade_approval::Gate::Unavailable(reason) => {
            e.kind = "lease.refused".into();
            tracing::error!(%reason, "approval service unavailable; refusing the lease");
            Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "approval_unavailable",
                "the approval could not be recorded; retry later",
                None,
            ))
        }
    }
}

/// Why a lease no longer holds, if it does not: revoked, expired, its session over, or its
/// agent no longer active (checked by authenticating the token).
fn dead(lease: &Lease, caller: &Caller, now: i64) -> Option<&'static str> {
    if let Some(r) = lease.revoked {
        return Some(r);
    }
    if lease.expires_ns <= now {
        return Some("expired");
    }
    if caller
        .session
        .as_ref()
        .is_none_or(|s| s.sid != lease.sid || s.is_ended())
    {
        return Some("its session is over");
    }
    None
}

/// The caller's lease `id`, or an answer refusing it.
fn own_lease(app: &App, caller: &Caller, id: &str) -> Result<Lease, Response> {
    let lease = app
        .leases
        .by_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .cloned();
    match lease {
        Some(l) if l.principal == caller.principal.id.to_string() => Ok(l),
        _ => Err(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no lease `{id}` of {}", caller.principal.id),
            None,
        )),
    }
}

/// `POST /api/v1/leases/{id}/renew` `{"ttl_seconds": 900}`: decided again.
pub async fn renew(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match caller(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let lease = match own_lease(&app, &caller, &id) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let ttl = match ttl_of(&body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut e = event("lease.renewed", &caller, &lease.secret);
    e.detail["lease_id"] = json!(id);
    if let Some(why) = dead(&lease, &caller, now_ns(&app)) {
        e.kind = "lease.refused".into();
        let resp = error_response(
            StatusCode::GONE,
            "lease_ended",
            &format!("lease `{id}` cannot be renewed: {why}; ask for a new one"),
            None,
        );
        return finish(&app, e, resp).await;
    }
    let (decision, version) = decide(&app, &caller, &lease.secret);
    e.decision = Some(DecisionRecord {
        allowed: decision.allowed,
        policies: decision.policies.clone(),
        policy_version: Some(version),
    });
    if !decision.allowed {
        e.kind = "lease.refused".into();
        let resp = error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "the renewal is refused; decided by {}",
                decision.policies.join(", ")
            ),
            None,
        );
        return finish(&app, e, resp).await;
    }
    // An approval covered one lease for its TTL; a longer one needs a new lease and approval.
    if !decision.approvals.is_empty() {
        e.kind = "lease.refused".into();
        let resp = error_response(
            StatusCode::CONFLICT,
            "approval_required",
            &format!(
                "leases of `{}` need approval, which covers leases of the approved TTL only: ask for a new lease instead of renewing",
                lease.secret
            ),
            None,
        );
        return finish(&app, e, resp).await;
    }
    let expires_ns = expiry(&app, &caller, ttl);
    if let Some(l) = app
        .leases
        .by_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        l.expires_ns = expires_ns;
    }
    e.detail["expires_ns"] = json!(expires_ns);
    let resp =
        axum::Json(json!({ "lease_id": id, "expires_at": rfc3339(expires_ns) })).into_response();
    finish(&app, e, resp).await
}

/// `DELETE /api/v1/leases/{id}`: the agent gives its lease back.
pub async fn revoke(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let lease = match own_lease(&app, &caller, &id) {
        Ok(l) => l,
        Err(r) => return r,
    };
    if let Some(l) = app
        .leases
        .by_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        l.revoked = Some("revoked");
    }
    let mut e = event("lease.revoked", &caller, &lease.secret);
    e.detail["lease_id"] = json!(id);
    finish(&app, e, StatusCode::NO_CONTENT.into_response()).await
}

/// A database lease: a login role created for it, valid until the lease's end.
#[allow(clippy::too_many_arguments)]
async fn issue_database(
    app: &App,
    caller: &Caller,
    (mut e, headers): (AuditEvent, &HeaderMap),
    db: Arc<palisade_vault::database::Database>,
    role: String,
    ttl: u64,
    secret: String,
    mut rules: Vec<palisade_core::approval::ApprovalRule>,
) -> Response {
    // Privilege separation: a role that changes data is leased only when policy allows writes
    // here too, and never to a session that ingested untrusted content.
    if db.role_writes(&role) {
        if caller.session.as_ref().is_some_and(|s| s.is_tainted()) {
            e.kind = "lease.refused".into();
            let resp = error_response(
                StatusCode::FORBIDDEN,
                "credential_withheld",
                &format!(
                    "role `{role}` of `{}` changes data and is not leased to a session that ingested untrusted content; start a new session",
                    db.name
                ),
                None,
            );
            return finish(app, e, resp).await;
        }
        let (decision, version) = decide_as(app, caller, &secret, Action::Write);
        if !decision.allowed {
            e.kind = "lease.refused".into();
            e.decision = Some(DecisionRecord {
                allowed: false,
                policies: decision.policies.clone(),
                policy_version: Some(version),
            });
            let resp = error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!(
                    "role `{role}` changes data and writes are not allowed here; decided by {}",
                    decision.policies.join(", ")
                ),
                None,
            );
            return finish(app, e, resp).await;
        }
        rules.extend(decision.approvals);
    }
    if let Err(resp) = approval_gate(app, caller, headers, &mut e, &rules, &secret, ttl).await {
        return finish(app, e, resp).await;
    }
    let expires_ns = expiry(app, caller, ttl);
    let issued = match db.issue(&role, &rfc3339(expires_ns)).await {
        Ok(i) => i,
        Err(err) => {
            e.kind = "lease.refused".into();
            tracing::error!(error = %err, "database lease failed");
            let resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "credential_unavailable",
                &err,
                None,
            );
            return finish(app, e, resp).await;
        }
    };
    let dynamic = Some((db.clone(), role.clone(), issued.username.clone()));
    let lease_id = match app.leases.add(caller, &secret, expires_ns, dynamic) {
        Ok(id) => id,
        Err(err) => {
            let _ = db.revoke(&role, &issued.username).await;
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", &err, None);
        }
    };
    e.detail["lease_id"] = json!(lease_id);
    e.detail["expires_ns"] = json!(expires_ns);
    e.detail["database"] = json!(db.name);
    e.detail["username"] = json!(issued.username);
    let resp = axum::Json(json!({
        "lease_id": lease_id,
        "database": db.name,
        "role": role,
        "username": issued.username,
        "password": issued.password.as_str(),
        "expires_at": rfc3339(expires_ns),
        "renewable": false,
    }))
    .into_response();
    finish(app, e, resp).await
}

/// Ends the leases that are over (revoked, expired, or their session ended); a database
/// lease's login role is dropped, its sessions terminated, and the end audited.
pub fn sweep(app: std::sync::Weak<App>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            let now = now_ns(&app);
            let over: Vec<(String, Lease)> = {
                let leases = app.leases.by_id.lock().unwrap_or_else(|p| p.into_inner());
                leases
                    .iter()
                    // A revoked static lease stays until its end, so a renewal is told why.
                    .filter(|(_, l)| {
                        (l.revoked.is_some() && l.dynamic.is_some())
                            || l.expires_ns <= now
                            || app.tokens.sessions.get(&l.sid).is_none_or(|s| s.is_ended())
                    })
                    .map(|(id, l)| (id.clone(), l.clone()))
                    .collect()
            };
            for (id, lease) in over {
                let why = lease.revoked.unwrap_or(if lease.expires_ns <= now {
                    "expired"
                } else {
                    "session ended"
                });
                if let Some((db, role, username)) = &lease.dynamic {
                    if let Err(err) = db.revoke(role, username).await {
                        // Kept: the next sweep tries again.
                        tracing::warn!(error = %err, lease = %id, "cannot drop a leased login role yet");
                        continue;
                    }
                    let mut e = AuditEvent::new("lease.ended");
                    e.principal = Some(PrincipalRef {
                        id: lease.principal.clone(),
                        ..PrincipalRef::default()
                    });
                    e.action = Some("credential".into());
                    e.resource = Some(format!("Palisade::Resource::\"vault/{}\"", lease.secret));
                    e.detail = json!({
                        "lease_id": id,
                        "reason": why,
                        "username": username,
                        "session": lease.sid,
                    });
                    let _ = app.audit.record(e).await;
                }
                app.leases
                    .by_id
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
        }
    })
}

/// Drops every leased login role (at shutdown: leases do not outlive the server).
pub async fn drop_all(app: &App) {
    let dynamic: Vec<Lease> = app
        .leases
        .by_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, l)| l)
        .filter(|l| l.dynamic.is_some())
        .collect();
    for lease in dynamic {
        if let Some((db, role, username)) = &lease.dynamic
            && let Err(e) = db.revoke(role, username).await
        {
            tracing::warn!(error = %e, "cannot drop a leased login role at shutdown; the next start drops it");
        }
    }
}
