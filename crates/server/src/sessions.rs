//! Session endpoints and the kill switch.
//!
//! - `GET  /api/v1/sessions[?principal=ID]`: live sessions (admin).
//! - `GET  /api/v1/sessions/{sid}`: one session, live or ended (admin).
//! - `POST /api/v1/sessions/{sid}/end`: end a session (admin).
//! - `POST /oauth2/session/end`: the agent ends the session of the bearer token it presents.
//! - `POST /api/v1/agents/{id}/kill`, `/api/v1/owners/{id}/kill`, `/api/v1/panic`: the kill switch.
//!
//! The context-clearing contract: every session end is audited as `session.ended` with
//! `clear_context: true`, and every later use of the session is answered with the header
//! `Palisade-Clear-Context: sid=<sid>; reason=<state>` and a `session.clear_context: true`
//! member, on which an agent runtime must drop the context it accumulated in that session.

use crate::{App, audit_or_503, error_response};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use palisade_audit::{AuditEvent, PrincipalRef};
use palisade_core::session::{EndReason, LiveSession, SessionRecord};
use palisade_core::{PrincipalId, PrincipalKind, Status};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Audits the ends of sessions that nobody has audited yet (each end is audited exactly once,
/// by whoever takes it first: the handler that ended it or the sweeper). An end whose event
/// could not be written goes back to the sweeper, which retries it every second.
pub async fn audit_ended(app: &App, records: &[SessionRecord]) -> Result<(), ()> {
    let taken: Vec<SessionRecord> = records
        .iter()
        .filter(|r| {
            app.tokens
                .sessions
                .get(&r.sid)
                .is_none_or(|s| s.take_audit())
        })
        .cloned()
        .collect();
    audit_and_confirm(app, &taken).await
}

/// Writes the `session.ended` events of ends already taken for auditing, marks the written ones
/// done (in memory and in the store) and hands failed ones back to the sweeper.
async fn audit_and_confirm(app: &App, records: &[SessionRecord]) -> Result<(), ()> {
    let mut result = Ok(());
    let mut done = Vec::new();
    for record in records {
        let live = app.tokens.sessions.get(&record.sid);
        if audit_end(app, record).await.is_ok() {
            if let Some(s) = live {
                s.audit_done();
            }
            done.push(record.sid.clone());
        } else {
            if let Some(s) = live {
                s.audit_failed();
            }
            result = Err(());
        }
    }
    if !done.is_empty() {
        let sessions = app.tokens.sessions.clone();
        match tokio::task::spawn_blocking(move || sessions.mark_audited(&done)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot mark session ends audited; a restart audits them again")
            }
            Err(_) => tracing::warn!("mark-audited task failed"),
        }
    }
    result
}

/// Audits ends the sweeper handed over (already taken); failures go back to the sweeper.
pub async fn audit_taken(app: &App, records: &[SessionRecord]) {
    let _ = audit_and_confirm(app, records).await;
}

/// Writes the `session.ended` event of one session.
async fn audit_end(app: &App, record: &SessionRecord) -> Result<(), ()> {
    let mut event = AuditEvent::new("session.ended");
    event.principal = Some(PrincipalRef {
        id: record.principal.to_string(),
        ..PrincipalRef::default()
    });
    event.action = Some("session.end".into());
    event.resource = Some(record.sid.clone());
    let end = record.end.as_ref();
    event.detail = json!({
        "sid": record.sid,
        "reason": end.map(|e| e.reason.as_str()),
        "by": end.map(|e| e.by.as_str()),
        "message": end.and_then(|e| e.message.as_deref()),
        "started_at": record.started_at,
        "hard_end": record.hard_end,
        "counters": record.counters,
        "clear_context": true,
    });
    app.audit.record(event).await.map(|_| ()).map_err(|e| {
        tracing::error!(error = %e, "audit write failed for a session end");
    })
}

fn view(s: &LiveSession, now: palisade_core::Timestamp) -> Value {
    let mut v = serde_json::to_value(s.record()).unwrap_or(Value::Null);
    v["state"] = json!(match s.usable_at(now) {
        Ok(()) => "live",
        Err(r) => r.state,
    });
    v
}

/// Query of the session listing.
#[derive(Deserialize)]
pub struct ListQuery {
    principal: Option<String>,
}

/// `GET /api/v1/sessions`.
pub async fn list(State(app): State<Arc<App>>, Query(q): Query<ListQuery>) -> Response {
    let sessions = &app.tokens.sessions;
    let now = app.tokens.now();
    let live = match q.principal.as_deref() {
        None => sessions.all_live(),
        Some(text) => match PrincipalId::parse_with_default(text, Some(PrincipalKind::Agent)) {
            Ok(id) => sessions.live_of(&id),
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    &format!("principal: {}", e.0),
                    Some("principal"),
                );
            }
        },
    };
    let items: Vec<Value> = live.iter().map(|s| view(s, now)).collect();
    axum::Json(json!({ "items": items })).into_response()
}

/// `GET /api/v1/sessions/{sid}`.
pub async fn get(State(app): State<Arc<App>>, Path(sid): Path<String>) -> Response {
    if let Some(s) = app.tokens.sessions.get(&sid) {
        return axum::Json(view(&s, app.tokens.now())).into_response();
    }
    let store = app.store.clone();
    let sid2 = sid.clone();
    match tokio::task::spawn_blocking(move || store.get_session(&sid2)).await {
        Ok(Ok(Some(record))) => {
            let mut v = serde_json::to_value(&record).unwrap_or(Value::Null);
            v["state"] = json!(if record.end.is_some() {
                "ended"
            } else {
                "expired"
            });
            axum::Json(v).into_response()
        }
        Ok(Ok(None)) => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("session {sid} does not exist"),
            None,
        ),
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the session store failed; see the server log",
            None,
        ),
    }
}

/// Body of end and kill requests.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Because {
    #[serde(default)]
    reason: Option<String>,
    /// Who is acting, as the operator names themself (the admin token is shared).
    #[serde(default)]
    operator: Option<String>,
}

#[allow(clippy::result_large_err)]
fn because(body: &[u8]) -> Result<Because, Response> {
    if body.is_empty() {
        return Ok(Because::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        error_response(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &format!(
                "the body is not valid: {e}; send {{\"reason\": \"...\", \"operator\": \"...\"}}"
            ),
            None,
        )
    })
}

fn who(b: &Because) -> String {
    match &b.operator {
        Some(o) => format!("admin ({})", o.chars().take(80).collect::<String>()),
        None => "admin".into(),
    }
}

/// Ends sessions, audits each end, and answers `ok` (or 503 when either could not be stored).
async fn end_and_audit(
    app: &App,
    targets: Vec<Arc<LiveSession>>,
    reason: EndReason,
    by: &str,
    message: Option<&str>,
) -> Result<Vec<SessionRecord>, Response> {
    let ended = app
        .tokens
        .sessions
        .end(&targets, reason, by, message)
        .map_err(|e| {
            tracing::error!(error = %e, "session end could not be stored; the sweeper retries");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the sessions are ended in this server; storing the end failed and is retried every second",
                None,
            )
        })?;
    if audit_ended(app, &ended).await.is_err() {
        return Err(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the sessions are ended; the audit log could not record it yet and retries every second",
            None,
        ));
    }
    Ok(ended)
}

/// `POST /api/v1/sessions/{sid}/end`.
pub async fn end(State(app): State<Arc<App>>, Path(sid): Path<String>, body: Bytes) -> Response {
    let b = match because(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(session) = app.tokens.sessions.get(&sid) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("session {sid} is not live (unknown, or ended long ago)"),
            None,
        );
    };
    if session.is_ended() {
        return error_response(
            StatusCode::CONFLICT,
            "conflict",
            &format!("session {sid} has already ended"),
            None,
        );
    }
    let by = who(&b);
    match end_and_audit(
        &app,
        vec![session],
        EndReason::Ended,
        &by,
        b.reason.as_deref(),
    )
    .await
    {
        Ok(ended) => axum::Json(json!({ "ended": ended, "clear_context": true })).into_response(),
        Err(r) => r,
    }
}

/// `POST /oauth2/session/end`: the agent ends its own session with one of its tokens.
pub async fn end_own(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let Some(token) = token else {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the session's access token as `Authorization: Bearer <token>`",
            None,
        );
    };
    let verified = match app.tokens.verify(&token, None) {
        Ok(v) => v,
        Err(reason) => {
            return error_response(StatusCode::UNAUTHORIZED, "unauthorized", &reason, None);
        }
    };
    let claims = verified.claims();
    let Some(session) = claims
        .sid
        .as_deref()
        .and_then(|sid| app.tokens.sessions.get(sid))
        .filter(|s| s.principal.to_string() == claims.sub)
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "no_session",
            "this token belongs to no live session",
            None,
        );
    };
    if session.is_ended() {
        return axum::Json(json!({ "ended": [], "clear_context": true })).into_response();
    }
    let by = claims.sub.clone();
    match end_and_audit(&app, vec![session], EndReason::Ended, &by, None).await {
        Ok(ended) => axum::Json(json!({ "ended": ended, "clear_context": true })).into_response(),
        Err(r) => r,
    }
}

/// `POST /api/v1/agents/{id}/kill`.
pub async fn kill_agent(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let id = match registered(&app, &id, PrincipalKind::Agent, &[PrincipalKind::Agent]) {
        Ok(i) => i,
        Err(r) => return r,
    };
    kill(&app, vec![id.clone()], "agent", &id.to_string(), &body).await
}

/// A registered principal id of one of `kinds` (a bare slug means `default`), or the error
/// response naming the problem.
#[allow(clippy::result_large_err)]
fn registered(
    app: &App,
    text: &str,
    default: PrincipalKind,
    kinds: &[PrincipalKind],
) -> Result<PrincipalId, Response> {
    let default_kind = (!text.contains(':')).then_some(default);
    let invalid = |message: String| {
        error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &message,
            Some("id"),
        )
    };
    let id = PrincipalId::parse_with_default(text, default_kind)
        .map_err(|e| invalid(format!("id: {}", e.0)))?;
    if !kinds.contains(&id.kind()) {
        let names: Vec<&str> = kinds.iter().map(|k| k.noun()).collect();
        return Err(invalid(format!("id: {id} is not a {}", names.join(" or "))));
    }
    if app.registry.get(&id).is_none() {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{id} does not exist"),
            None,
        ));
    }
    Ok(id)
}

/// `POST /api/v1/owners/{id}/kill`: every agent the human or team owns.
pub async fn kill_owner(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let owner = match registered(
        &app,
        &id,
        PrincipalKind::Human,
        &[PrincipalKind::Human, PrincipalKind::Team],
    ) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let agents: Vec<PrincipalId> = app
        .registry
        .list(Some(PrincipalKind::Agent))
        .iter()
        .filter(|a| a.owner() == Some(&owner))
        .map(|a| a.id.clone())
        .collect();
    kill(&app, agents, "owner", &owner.to_string(), &body).await
}

/// `POST /api/v1/panic`: every agent.
pub async fn panic_all(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let agents: Vec<PrincipalId> = app
        .registry
        .list(Some(PrincipalKind::Agent))
        .iter()
        .map(|a| a.id.clone())
        .collect();
    kill(&app, agents, "panic", "*", &body).await
}

/// The kill switch: ends every session of `agents` at once (in memory first, so the gateway
/// refuses their tokens before this returns), then suspends the agents so they get no new
/// tokens until an administrator resumes them; all of it audited with who and why.
async fn kill(
    app: &App,
    agents: Vec<PrincipalId>,
    scope: &str,
    target: &str,
    body: &[u8],
) -> Response {
    let b = match because(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(reason) = b.reason.clone().filter(|r| !r.trim().is_empty()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "reason: say why (it is audited), e.g. {\"reason\": \"INC-42 runaway agent\"}",
            Some("reason"),
        );
    };
    let by = who(&b);
    let message = format!("kill switch ({scope}): {reason}");
    let sessions = &app.tokens.sessions;
    let mut failed = Vec::new();
    // In memory first: the gateway refuses these sessions from here on.
    let mut ended = sessions
        .end_all_of(&agents, EndReason::Killed, &by, Some(&message))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "kill: storing the session ends failed; the sweeper retries");
            failed.push(format!("storing the session ends: {e} (retried every second)"));
            Vec::new()
        });
    let registry = app.registry.clone();
    let to_suspend = agents.clone();
    let by2 = by.clone();
    let message2 = message.clone();
    let now = app.tokens.now();
    let suspended = tokio::task::spawn_blocking(move || {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for id in &to_suspend {
            if registry.get(id).map(|p| p.status) == Some(Status::Active) {
                match registry.set_status(id, Status::Suspended, &by2, &message2, now) {
                    Ok(_) => done.push(id.to_string()),
                    Err(e) => failed.push(format!("{id}: {e}")),
                }
            }
        }
        (done, failed)
    })
    .await;
    let (suspended, suspend_failed) =
        suspended.unwrap_or_else(|_| (Vec::new(), vec!["suspend task failed".into()]));
    failed.extend(suspend_failed);
    // Again: a session started between the first pass and the suspension dies too.
    match sessions.end_all_of(&agents, EndReason::Killed, &by, Some(&message)) {
        Ok(more) => ended.extend(more),
        Err(e) => failed.push(format!(
            "storing the session ends: {e} (retried every second)"
        )),
    }
    if audit_ended(app, &ended).await.is_err() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the kill took effect; the audit log could not record it yet and retries every second",
            None,
        );
    }
    let mut event = AuditEvent::new("killswitch");
    event.principal = Some(PrincipalRef {
        id: by.clone(),
        ..PrincipalRef::default()
    });
    event.action = Some(format!("kill.{scope}"));
    event.resource = Some(target.to_string());
    event.alert = Some(palisade_audit::Alert {
        severity: if scope == "panic" { "critical" } else { "high" }.into(),
        rule: "kill-switch".into(),
        message: format!(
            "{by} used the kill switch ({scope} {target}): {} session(s) ended, {} agent(s) suspended; reason: {reason}",
            ended.len(),
            suspended.len()
        ),
    });
    event.detail = json!({
        "reason": reason,
        "agents": agents.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "sessions_ended": ended.iter().map(|s| s.sid.as_str()).collect::<Vec<_>>(),
        "suspended": suspended,
        "failed": failed,
    });
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let body = json!({
        "scope": scope,
        "target": target,
        "agents": agents.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "sessions_ended": ended.iter().map(|s| s.sid.as_str()).collect::<Vec<_>>(),
        "suspended": suspended,
        "failed": failed,
        "note": "the agents stay suspended until resumed: palisade agent resume ID",
    });
    audit_or_503(app, event, (status, axum::Json(body)).into_response()).await
}

/// Ends the sessions of an agent that was suspended or deprovisioned through the admin API.
pub async fn end_for_status_change(
    app: &App,
    id: &PrincipalId,
    status: Status,
    reason: &str,
) -> Result<(), Response> {
    if id.kind() != PrincipalKind::Agent || status == Status::Active {
        return Ok(());
    }
    let live = app.tokens.sessions.live_of(id);
    let message = format!("agent {}: {reason}", status.as_str());
    end_and_audit(app, live, EndReason::Ended, "admin", Some(&message))
        .await
        .map(|_| ())
}

/// Background housekeeping: ends sessions at their hard end (audited as context-clearing),
/// saves counters, forgets old sessions. Runs every `every` until the app is gone.
pub fn sweep(app: std::sync::Weak<App>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            let sessions = app.tokens.sessions.clone();
            match tokio::task::spawn_blocking(move || sessions.sweep()).await {
                Ok((due, error)) => {
                    audit_taken(&app, &due).await;
                    if let Some(e) = error {
                        tracing::warn!(error = %e, "session sweep could not store; retrying");
                    }
                }
                Err(_) => tracing::warn!("session sweep task failed"),
            }
        }
    })
}
