//! Approvals over HTTP: listing and showing them (admin token), deciding them (an approver's
//! human token for `<issuer>/approvals`, never the admin token and never an agent's), the
//! webhook notifier (Slack-compatible) and the expiry sweeper.

use crate::{App, error_response};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade_approval::{Approval, ApprovalStatus, DecideError};
use palisade_gateway::Authenticator;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Who reads or decides approvals.
enum Viewer {
    /// The admin token: reads everything, decides nothing (it names no human).
    Admin,
    /// A human with an approver token: reads what they may decide or decided, decides.
    Human(Arc<palisade_core::Principal>),
}

/// The caller: the admin token, or a human's token for `<issuer>/approvals`. Agents, and
/// humans' token-exchange tokens (which agents hold), are refused.
#[allow(clippy::result_large_err)] // the refusal is the response, built once per request
fn viewer(app: &App, headers: &HeaderMap) -> Result<Viewer, Response> {
    if crate::admin::is_admin(app, headers) {
        return Ok(Viewer::Admin);
    }
    let audience = app.tokens.approvals_audience();
    let how = format!(
        "approvals are read with the admin token, and decided by a human with `Authorization: Bearer <token>` for {audience} (an administrator mints one: palisade approvals token human:NAME)"
    );
    let unauthorized = |m: &str| {
        let mut r = error_response(StatusCode::UNAUTHORIZED, "invalid_token", m, None);
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static(r#"Bearer realm="palisade-approvals""#),
        );
        r
    };
    let Some(token) = crate::leases::bearer(headers) else {
        return Err(unauthorized(&how));
    };
    let caller = app
        .tokens
        .authenticate(token.trim(), &audience)
        .map_err(|f| unauthorized(&format!("{}; {how}", f.reason)))?;
    // An agent can never approve, whether on its own or acting for a human.
    if caller.principal.kind() != palisade_core::PrincipalKind::Human
        || caller.initiating_human.is_some()
    {
        return Err(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "{} is not a human: only authenticated humans approve, never an agent",
                caller.principal.id
            ),
            None,
        ));
    }
    Ok(Viewer::Human(caller.principal))
}

/// Whether `viewer` may see `a`: the admin always; a human it may decide or did decide.
fn visible(app: &App, viewer: &Viewer, a: &Approval) -> bool {
    match viewer {
        Viewer::Admin => true,
        Viewer::Human(h) => {
            let me = h.id.to_string();
            a.votes.iter().any(|v| v.approver == me) || app.approvals.eligible(a, h).is_ok()
        }
    }
}

/// `GET /api/v1/approvals?status=pending&limit=50`: everything for the admin token; for an
/// approver, the requests they may decide or decided.
pub async fn list(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let viewer = match viewer(&app, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let status = match q.get("status").map(String::as_str) {
        None | Some("all") => None,
        Some(s) => match ApprovalStatus::parse(s) {
            Some(st) => Some(st),
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    &format!(
                        "status: `{s}` is unknown; use pending, approved, denied, expired, used, withdrawn or all"
                    ),
                    Some("status"),
                );
            }
        },
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=10_000).contains(&n) => n,
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "limit: a number from 1 to 10000",
                Some("limit"),
            );
        }
    };
    let reader = app.clone();
    match tokio::task::spawn_blocking(move || reader.approvals.list(status, limit)).await {
        Ok(Ok(items)) => {
            let items: Vec<Value> = items
                .iter()
                .filter(|a| visible(&app, &viewer, a))
                .map(|a| view(&app, a))
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        Ok(Err(e)) => store_error(&e),
        Err(e) => store_error(&e.to_string()),
    }
}

/// `GET /api/v1/approvals/{id}`.
pub async fn get(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let viewer = match viewer(&app, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.approvals.get(&id).await {
        Ok(Some(a)) if visible(&app, &viewer, &a) => axum::Json(view(&app, &a)).into_response(),
        Ok(_) => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no approval `{id}` that you may see (palisade approvals list shows them)"),
            None,
        ),
        Err(e) => store_error(&e),
    }
}

/// `POST /api/v1/approvals/{id}/approve`, body `{"reason": "..."}` (optional).
pub async fn approve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    decide(app, id, headers, body, true).await
}

/// `POST /api/v1/approvals/{id}/deny`, body `{"reason": "..."}` (required).
pub async fn deny(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    decide(app, id, headers, body, false).await
}

async fn decide(
    app: Arc<App>,
    id: String,
    headers: HeaderMap,
    body: Bytes,
    approve: bool,
) -> Response {
    let human = match viewer(&app, &headers) {
        Ok(Viewer::Human(h)) => h,
        Ok(Viewer::Admin) => {
            return error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!(
                    "the admin token names no human, so it cannot approve; approvals are decided by a human with a token for {} (palisade approvals token human:NAME)",
                    app.tokens.approvals_audience()
                ),
                None,
            );
        }
        Err(r) => return r,
    };
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => match m.get("reason") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(r)) => r.clone(),
                Some(_) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_field",
                        "reason: must be a string",
                        Some("reason"),
                    );
                }
            },
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the body must be a JSON object such as {\"reason\": \"...\"}",
                    None,
                );
            }
        }
    };
    match app.approvals.decide(&id, &human, approve, &reason).await {
        Ok(a) => axum::Json(view(&app, &a)).into_response(),
        Err(DecideError::NotFound(m)) => {
            error_response(StatusCode::NOT_FOUND, "not_found", &m, None)
        }
        Err(DecideError::Conflict(m)) => error_response(StatusCode::CONFLICT, "conflict", &m, None),
        Err(DecideError::Forbidden(m)) => {
            error_response(StatusCode::FORBIDDEN, "forbidden", &m, None)
        }
        Err(DecideError::Invalid(m)) => {
            error_response(StatusCode::BAD_REQUEST, "invalid_field", &m, Some("reason"))
        }
        Err(DecideError::Unavailable(m)) => {
            tracing::error!(error = %m, "cannot record an approval decision");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the decision could not be recorded; nothing changed, retry",
                None,
            )
        }
    }
}

fn store_error(e: &str) -> Response {
    tracing::error!(error = %e, "cannot read approvals");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "approvals cannot be read from the store",
        None,
    )
}

/// An approval as the API shows it: the record and its approve link.
fn view(app: &App, a: &Approval) -> Value {
    let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
    v["link"] = json!(app.approvals.link(&a.id));
    v["approved"] = json!(a.approvals());
    v
}

/// Text for Slack's mrkdwn: `&`, `<` and `>` escaped, so nothing the agent controls can make
/// links or mentions (`<!channel>`).
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "'")
}

/// The Slack-compatible message announcing `a` (incoming-webhook `text` and `blocks`). What the
/// agent controls (target, query, body preview, reasoning) is escaped.
pub fn slack_message(a: &Approval, link: &str) -> Value {
    let approvers: Vec<String> = a.rule.approvers.iter().map(ToString::to_string).collect();
    let query = a
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let what = format!("{} `{}{}`", a.method, esc(&a.target), esc(&query));
    let mut fields = vec![
        json!({ "type": "mrkdwn", "text": format!("*Agent*\n{}", a.agent) }),
        json!({ "type": "mrkdwn", "text": format!("*Action*\n{} ({})", what, a.action) }),
        json!({ "type": "mrkdwn", "text": format!("*Approvers*\n{} ({} needed)", approvers.join(", "), a.rule.count) }),
        json!({ "type": "mrkdwn", "text": format!("*Expires*\n{}", a.expires_at_text()) }),
    ];
    if let Some(h) = &a.initiating_human {
        fields.push(json!({ "type": "mrkdwn", "text": format!("*On behalf of*\n{h}") }));
    }
    let mut blocks = vec![
        json!({
            "type": "section",
            "text": { "type": "mrkdwn", "text": format!("*Approval needed* `{}`: {} wants to {}", a.id, a.agent, what) }
        }),
        json!({ "type": "section", "fields": fields }),
    ];
    if let Some(p) = &a.preview {
        let cut = if a.preview_truncated {
            " (cut short: see the full body's SHA-256 in the request)"
        } else {
            ""
        };
        blocks.push(json!({
            "type": "section",
            "text": { "type": "mrkdwn", "text": format!("*Body*{cut}\n```{}```", esc(&truncate(p, 1500))) }
        }));
    }
    if let Some(r) = &a.reasoning {
        blocks.push(json!({
            "type": "context",
            "elements": [{ "type": "mrkdwn", "text": format!("Agent's reasoning: {}", esc(&truncate(r, 500))) }]
        }));
    }
    blocks.push(json!({
        "type": "actions",
        "elements": [{
            "type": "button",
            "text": { "type": "plain_text", "text": "Review and approve" },
            "url": link,
            "style": "primary"
        }]
    }));
    json!({
        "text": format!(
            "Approval needed: {} wants to {} — review: {link} (or: palisade approvals approve {})",
            esc(&a.agent), what, a.id
        ),
        "blocks": blocks,
    })
}

fn truncate(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Announces each new request to every webhook (three tries each), auditing each delivery.
pub fn notifier(
    app: Weak<App>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Approval>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let tls = palisade_mcp::remote::client_tls(None, "approval webhooks")?;
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    Ok(tokio::spawn(async move {
        while let Some(a) = rx.recv().await {
            let Some(app) = app.upgrade() else { return };
            let link = app.approvals.link(&a.id);
            let body = slack_message(&a, &link).to_string();
            for hook in &app.config.approvals.webhooks {
                let mut error = None;
                for attempt in 0..3u32 {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                    }
                    let req = axum::http::Request::post(hook.url.expose())
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.clone())));
                    let Ok(req) = req else {
                        error = Some("the webhook URL is not usable".to_string());
                        break;
                    };
                    error = match tokio::time::timeout(Duration::from_secs(10), client.request(req))
                        .await
                    {
                        Err(_) => Some("timed out after 10s".into()),
                        Ok(Err(e)) => Some(format!("cannot connect: {}", short(&e))),
                        Ok(Ok(r)) if r.status().is_success() => None,
                        Ok(Ok(r)) => Some(format!("answered HTTP {}", r.status().as_u16())),
                    };
                    if error.is_none() {
                        break;
                    }
                }
                if let Some(e) = &error {
                    // The URL is a secret (Slack's carries the token): only the name is logged.
                    tracing::warn!(webhook = %hook.name, approval = %a.id, error = %e, "approval notification failed");
                }
                app.approvals
                    .notified(&a, &format!("webhook:{}", hook.name), error)
                    .await;
            }
        }
    }))
}

/// A connection error without the URL (hyper's text can include it).
fn short(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    text
}

/// Expires approvals past their deadline every `every`.
pub fn sweep(app: Weak<App>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            app.approvals.sweep().await;
        }
    })
}
