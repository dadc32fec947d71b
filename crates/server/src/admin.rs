//! The admin API under `/api/v1/`: thin handlers that parse, call the registry or token service,
//! audit, and map errors.

// Handlers return a ready error `Response` from their parsing helpers; the admin API is not a hot
// path, so the larger `Err` variant is cheaper than an extra error type and mapping.
#![allow(clippy::result_large_err)]

use crate::{App, audit_or_503, error_response};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use palisade_audit::{AuditEvent, Outcome, PrincipalRef};
use palisade_core::registry::RegistryError;
use palisade_core::{Principal, PrincipalId, PrincipalKind, Status, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Whether the request carries the admin token (constant-time comparison).
pub fn is_admin(app: &App, headers: &HeaderMap) -> bool {
    let Some(text) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            palisade_core::secret::secret_matches(token.trim(), &app.admin_token_hash)
        }
        _ => false,
    }
}

/// The admin gate for every `/api/v1/` route.
pub async fn require_admin(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if is_admin(&app, req.headers()) {
        return next.run(req).await;
    }
    let mut resp = error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &format!(
            "the admin API needs `Authorization: Bearer <admin token>`; the token is in {}/admin.token (set PALISADE_TOKEN for the CLI)",
            app.config.server.data_dir.display()
        ),
        None,
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(r#"Bearer realm="palisade-admin""#),
    );
    resp
}

fn registry_error(e: RegistryError) -> Response {
    match e {
        RegistryError::Invalid { field, message } => error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("{field}: {message}"),
            Some(&field),
        ),
        RegistryError::NotFound(..) => {
            error_response(StatusCode::NOT_FOUND, "not_found", &e.to_string(), None)
        }
        RegistryError::Duplicate(_) => error_response(
            StatusCode::CONFLICT,
            "duplicate",
            &e.to_string(),
            Some("id"),
        ),
        RegistryError::Conflict(_) => {
            error_response(StatusCode::CONFLICT, "conflict", &e.to_string(), None)
        }
        RegistryError::Store(_) | RegistryError::Random(_) => {
            tracing::error!(error = %e, "registry failure");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the registry could not complete the change; see the server log",
                None,
            )
        }
    }
}

fn kind_of(collection: &str) -> Result<PrincipalKind, Response> {
    PrincipalKind::from_collection(collection).ok_or_else(|| {
        error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("`/api/v1/{collection}` does not exist; collections are agents, humans, teams and service-accounts"),
            None,
        )
    })
}

fn id_in(kind: PrincipalKind, text: &str, field: &str) -> Result<PrincipalId, Response> {
    PrincipalId::parse_with_default(text, Some(kind)).map_err(|e| {
        error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("{field}: {}", e.0),
            Some(field),
        )
    })
}

/// Parses a JSON body into an object, with a clear error.
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Response> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
            None,
        )),
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &format!("the body is not valid JSON: {e}"),
            None,
        )),
    }
}

/// Audits an admin change (`admin.change` by `admin`) before answering `ok`.
pub(crate) async fn audited(
    app: &App,
    action: &str,
    resource: &str,
    detail: Value,
    ok: Response,
) -> Response {
    let mut event = AuditEvent::new("admin.change");
    event.principal = Some(PrincipalRef {
        id: "admin".into(),
        ..PrincipalRef::default()
    });
    event.action = Some(action.into());
    event.resource = Some(resource.into());
    event.outcome = Some(Outcome {
        status: ok.status().as_u16(),
        ..Outcome::default()
    });
    event.detail = detail;
    audit_or_503(app, event, ok).await
}

fn view(p: &Principal) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// `GET /api/v1/{collection}`.
pub async fn list(State(app): State<Arc<App>>, Path(collection): Path<String>) -> Response {
    match kind_of(&collection) {
        Ok(kind) => {
            let items: Vec<Value> = app
                .registry
                .list(Some(kind))
                .iter()
                .map(|p| view(p))
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        Err(r) => r,
    }
}

/// `POST /api/v1/{collection}`.
pub async fn create(
    State(app): State<Arc<App>>,
    Path(collection): Path<String>,
    body: Bytes,
) -> Response {
    let kind = match kind_of(&collection) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let mut fields = match json_object(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let id = match fields.remove("id") {
        Some(Value::String(s)) => match id_in(kind, &s, "id") {
            Ok(id) => id,
            Err(r) => return r,
        },
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "id: must be a string",
                Some("id"),
            );
        }
        None => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                &format!("id: is required, e.g. \"{}:my-name\"", kind.prefix()),
                Some("id"),
            );
        }
    };
    let registry = app.registry.clone();
    let id_for_task = id.clone();
    let result = tokio::task::spawn_blocking(move || {
        registry.register(id_for_task, Value::Object(fields), Timestamp::now())
    })
    .await;
    let (principal, issued) = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return registry_error(e),
        Err(_) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "registration task failed",
                None,
            );
        }
    };
    let mut body = json!({ "principal": view(&principal) });
    if let Some(issued) = &issued {
        body["credentials"] = json!({
            "client_id": issued.client_id.to_string(),
            "client_secret": issued.secret.expose(),
            "secret_id": issued.secret_id,
            "note": "store this secret now: it is shown only once",
        });
    }
    let action = format!("{}.register", kind.prefix());
    audited(
        &app,
        &action,
        &id.to_string(),
        json!({ "principal": view(&principal) }),
        (StatusCode::CREATED, axum::Json(body)).into_response(),
    )
    .await
}

/// `GET /api/v1/{collection}/{id}`.
pub async fn get(
    State(app): State<Arc<App>>,
    Path((collection, id)): Path<(String, String)>,
) -> Response {
    let kind = match kind_of(&collection) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let id = match id_in(kind, &id, "id") {
        Ok(i) => i,
        Err(r) => return r,
    };
    match app.registry.get(&id) {
        Some(p) => axum::Json(view(&p)).into_response(),
        None => registry_error(RegistryError::NotFound(id, cli_noun(kind))),
    }
}

fn cli_noun(kind: PrincipalKind) -> &'static str {
    match kind {
        PrincipalKind::ServiceAccount => "service-account",
        other => other.prefix(),
    }
}

/// `PATCH /api/v1/{collection}/{id}`: a JSON merge patch of editable fields.
pub async fn update(
    State(app): State<Arc<App>>,
    Path((collection, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let kind = match kind_of(&collection) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let id = match id_in(kind, &id, "id") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let patch = match json_object(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if patch.contains_key("id") || patch.contains_key("status") {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "id and status cannot be patched; use suspend, resume or deprovision for status",
            None,
        );
    }
    let changed: Vec<String> = patch.keys().cloned().collect();
    let registry = app.registry.clone();
    let id2 = id.clone();
    match tokio::task::spawn_blocking(move || {
        registry.update(&id2, Value::Object(patch), Timestamp::now())
    })
    .await
    {
        Ok(Ok(p)) => {
            let action = format!("{}.update", kind.prefix());
            audited(
                &app,
                &action,
                &id.to_string(),
                json!({ "fields": changed }),
                axum::Json(view(&p)).into_response(),
            )
            .await
        }
        Ok(Err(e)) => registry_error(e),
        Err(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "update task failed",
            None,
        ),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LifecycleBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    overlap_seconds: Option<u64>,
}

/// `POST /api/v1/{collection}/{id}/{suspend|resume|deprovision|rotate-secret}`.
pub async fn lifecycle(
    State(app): State<Arc<App>>,
    Path((collection, id, verb)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let kind = match kind_of(&collection) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let id = match id_in(kind, &id, "id") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let parsed: LifecycleBody = if body.is_empty() {
        LifecycleBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    &format!("the body is not valid: {e}"),
                    None,
                );
            }
        }
    };
    let reason = parsed.reason.unwrap_or_default();
    let registry = app.registry.clone();
    let id2 = id.clone();
    let action = format!("{}.{verb}", kind.prefix());
    match verb.as_str() {
        "suspend" | "resume" | "deprovision" => {
            let status = match verb.as_str() {
                "suspend" => Status::Suspended,
                "resume" => Status::Active,
                _ => Status::Deprovisioned,
            };
            let reason2 = reason.clone();
            let now = app.tokens.now();
            let result = tokio::task::spawn_blocking(move || {
                registry.set_status(&id2, status, "admin", &reason2, now)
            })
            .await;
            match result {
                Ok(Ok(p)) => {
                    if let Err(r) =
                        crate::sessions::end_for_status_change(&app, &id, status, &reason).await
                    {
                        return r;
                    }
                    audited(
                        &app,
                        &action,
                        &id.to_string(),
                        json!({ "reason": reason }),
                        axum::Json(view(&p)).into_response(),
                    )
                    .await
                }
                Ok(Err(e)) => registry_error(e),
                Err(_) => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "status task failed",
                    None,
                ),
            }
        }
        "rotate-secret" => {
            let overlap = parsed.overlap_seconds.unwrap_or(3600);
            if overlap > 7 * 86_400 {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    "overlap_seconds: must be at most 604800 (7 days)",
                    Some("overlap_seconds"),
                );
            }
            match tokio::task::spawn_blocking(move || {
                registry.rotate_secret(&id2, overlap, Timestamp::now())
            })
            .await
            {
                Ok(Ok(issued)) => {
                    let body = json!({
                        "client_id": issued.client_id.to_string(),
                        "client_secret": issued.secret.expose(),
                        "secret_id": issued.secret_id,
                        "previous_secrets_expire_at": issued.previous_expire_at,
                        "note": "store this secret now: it is shown only once",
                    });
                    let detail =
                        json!({ "secret_id": issued.secret_id, "overlap_seconds": overlap });
                    audited(
                        &app,
                        &action,
                        &id.to_string(),
                        detail,
                        axum::Json(body).into_response(),
                    )
                    .await
                }
                Ok(Err(e)) => registry_error(e),
                Err(_) => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "rotation task failed",
                    None,
                ),
            }
        }
        other => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "`{other}` is not an operation; use suspend, resume, deprovision or rotate-secret"
            ),
            None,
        ),
    }
}

/// `GET /api/v1/keys`.
pub async fn keys(State(app): State<Arc<App>>) -> Response {
    let keys = app.tokens.keys();
    axum::Json(json!({ "active_kid": keys.active_kid(), "jwks": keys.jwks() })).into_response()
}

/// `POST /api/v1/keys/rotate`.
pub async fn rotate_keys(State(app): State<Arc<App>>) -> Response {
    let tokens = app.tokens.clone();
    match tokio::task::spawn_blocking(move || tokens.rotate_keys()).await {
        Ok(Ok(kid)) => {
            let body = axum::Json(json!({ "active_kid": kid })).into_response();
            audited(&app, "keys.rotate", &kid, Value::Null, body).await
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "key rotation failed");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "key rotation failed; see the server log",
                None,
            )
        }
        Err(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "key rotation task failed",
            None,
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
/// Query of `GET /api/v1/audit/events`.
pub struct AuditQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// Body of `POST /api/v1/audit/query`.
#[derive(serde::Deserialize)]
pub struct QueryBody {
    query: String,
    #[serde(default)]
    lists: std::collections::HashMap<String, Vec<Value>>,
    #[serde(default)]
    format: Option<String>,
}

/// `POST /api/v1/audit/query`: runs a Kusto-like query over the audit log; `{"rows": [...]}`, or
/// with `"format": "csv"`/`"table"` the rendered text. A bad query is a 400 naming the token.
pub async fn audit_query(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let body: QueryBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("the body must be {{\"query\": \"...\", \"lists\": {{...}}}}: {e}"),
                None,
            );
        }
    };
    let store = app.store.clone();
    let now = i64::try_from(app.tokens.now().unix_nanos()).unwrap_or(i64::MAX);
    let result = tokio::task::spawn_blocking(move || {
        let answer =
            palisade_audit::query::run_on_store(&body.query, store.as_ref(), now, &body.lists);
        (answer, body.format)
    })
    .await;
    match result {
        Ok((Ok(answer), format)) => match format.as_deref() {
            Some(f @ ("csv" | "table")) => {
                palisade_audit::query::render(&answer, f).into_response()
            }
            _ => axum::Json(json!({ "columns": answer.columns, "rows": answer.rows }))
                .into_response(),
        },
        Ok((Err(palisade_audit::query::StoreQueryError::Query(e)), _)) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({
                "error": "bad_query",
                "message": e.to_string(),
                "column": e.column,
                "token": e.token,
            })),
        )
            .into_response(),
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the audit store failed; see the server log",
            None,
        ),
    }
}

/// `POST /api/v1/audit/prune`: applies retention now; answers the pruned segment, or
/// `{"pruned": null}` when nothing is old enough (or every old event awaits a sink).
pub async fn audit_prune(State(app): State<Arc<App>>) -> Response {
    match crate::prune_audit(&app).await {
        Ok(Some(s)) => axum::Json(json!({ "pruned": {
            "first_seq": s.first_seq,
            "last_seq": s.last_seq,
            "last_hash": s.last_hash,
            "archive": s.archive,
            "checkpoint": serde_json::from_str::<Value>(&s.checkpoint).unwrap_or(Value::Null),
        }}))
        .into_response(),
        Ok(None) => axum::Json(json!({ "pruned": null })).into_response(),
        Err(e) => error_response(StatusCode::CONFLICT, "retention", &e, None),
    }
}

/// `GET /api/v1/audit/checkpoints`: the latest 100 signed checkpoints, newest first.
pub async fn audit_checkpoints(State(app): State<Arc<App>>) -> Response {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.audit_checkpoints(100)).await {
        Ok(Ok(list)) => {
            let items: Vec<Value> = list
                .iter()
                .filter_map(|j| serde_json::from_str(j).ok())
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the audit store failed; see the server log",
            None,
        ),
    }
}

/// `POST /api/v1/audit/checkpoints`: signs the head now (if it moved since the last one) and
/// returns the latest checkpoint, for an auditor to keep.
pub async fn audit_checkpoint_now(State(app): State<Arc<App>>) -> Response {
    let (store, key, clock) = (
        app.store.clone(),
        app.checkpoint_key.clone(),
        app.tokens.clock(),
    );
    let done = tokio::task::spawn_blocking(move || {
        crate::audit_checkpoint(store.as_ref(), &key, clock.as_ref());
        store.audit_checkpoints(1)
    })
    .await;
    match done {
        Ok(Ok(latest)) => match latest
            .first()
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
        {
            Some(c) => axum::Json(c).into_response(),
            None => error_response(
                StatusCode::CONFLICT,
                "no_events",
                "the audit log is empty; there is nothing to sign yet",
                None,
            ),
        },
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the audit store failed; see the server log",
            None,
        ),
    }
}

/// `GET /api/v1/audit/events?after=SEQ&limit=N`.
pub async fn audit_events(
    State(app): State<Arc<App>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "use ?after=<seq>&limit=<1..1000>",
            None,
        );
    };
    if q.limit == 0 || q.limit > 1000 {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit must be 1 to 1000",
            Some("limit"),
        );
    }
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.read_audit(q.after, q.limit)).await {
        Ok(Ok(rows)) => {
            let items: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
                    json!({ "seq": r.seq, "hash": r.hash, "event": body })
                })
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the audit log could not be read",
            None,
        ),
    }
}
