//! OpenID AuthZEN Authorization API 1.0: evaluation, batch evaluations, subject/resource/action
//! search and the discovery document, answered by the same Cedar engine as the gateway.
//!
//! Request shapes are checked by hand rather than by serde derive so that every missing or
//! mistyped field gets a 400 naming it, while unknown fields are ignored as the spec requires.
//! Deny is `200 {"decision": false}`. Every call is audited before it is answered.

use crate::App;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use palisade_audit::{AuditEvent, DecisionRecord, Outcome, PrincipalRef};
use palisade_policy::app::{AppEntity, AppRequest};
use palisade_policy::{Decision, PolicyEngine};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Largest search page; also the default when a request gives no limit.
const MAX_PAGE: usize = 1000;

/// A request-level problem: answered with 400.
struct BadRequest(String);

#[derive(Clone)]
struct Ent {
    entity_type: String,
    id: Option<String>,
    properties: Option<Value>,
}

#[derive(Clone)]
struct Act {
    name: String,
    properties: Option<Value>,
}

fn entity(
    body: &Map<String, Value>,
    field: &str,
    need_id: bool,
) -> Result<Option<Ent>, BadRequest> {
    let Some(value) = body.get(field) else {
        return Ok(None);
    };
    let obj = value
        .as_object()
        .ok_or_else(|| BadRequest(format!("`{field}` must be an object with `type` and `id`")))?;
    let entity_type = match obj.get("type") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(_) => {
            return Err(BadRequest(format!(
                "`{field}.type` must be a non-empty string"
            )));
        }
        None => return Err(BadRequest(format!("`{field}.type` is required"))),
    };
    let id = match obj.get("id") {
        Some(Value::String(i)) if !i.is_empty() => Some(i.clone()),
        Some(Value::Null) | None if !need_id => None,
        Some(_) => {
            return Err(BadRequest(format!(
                "`{field}.id` must be a non-empty string"
            )));
        }
        None => return Err(BadRequest(format!("`{field}.id` is required"))),
    };
    let properties = match obj.get("properties") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => {
            return Err(BadRequest(format!(
                "`{field}.properties` must be an object"
            )));
        }
    };
    Ok(Some(Ent {
        entity_type,
        id,
        properties,
    }))
}

fn action(body: &Map<String, Value>) -> Result<Option<Act>, BadRequest> {
    let Some(value) = body.get("action") else {
        return Ok(None);
    };
    let obj = value
        .as_object()
        .ok_or_else(|| BadRequest("`action` must be an object with `name`".into()))?;
    let name = match obj.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        Some(_) => {
            return Err(BadRequest(
                "`action.name` must be a non-empty string".into(),
            ));
        }
        None => return Err(BadRequest("`action.name` is required".into())),
    };
    let properties = match obj.get("properties") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => return Err(BadRequest("`action.properties` must be an object".into())),
    };
    Ok(Some(Act { name, properties }))
}

fn context(body: &Map<String, Value>) -> Result<Option<Value>, BadRequest> {
    match body.get("context") {
        None | Some(Value::Null) => Ok(None),
        Some(c @ Value::Object(_)) => Ok(Some(c.clone())),
        Some(_) => Err(BadRequest("`context` must be an object".into())),
    }
}

fn require<T>(value: Option<T>, field: &str) -> Result<T, BadRequest> {
    value.ok_or_else(|| BadRequest(format!("`{field}` is required")))
}

/// One fully specified evaluation.
struct Eval {
    subject: Ent,
    action: Act,
    resource: Ent,
    context: Option<Value>,
}

impl Eval {
    fn decide(&self, engine: &PolicyEngine, namespace: &str) -> Decision {
        // Action properties reach policies as `context.action_properties` (Cedar actions carry no
        // per-request attributes).
        let mut ctx = self.context.clone().unwrap_or_else(|| json!({}));
        if let (Some(props), Value::Object(map)) = (&self.action.properties, &mut ctx) {
            map.insert("action_properties".into(), props.clone());
        }
        engine.decide_app(&AppRequest {
            namespace,
            subject: AppEntity {
                entity_type: &self.subject.entity_type,
                id: self.subject.id.as_deref().unwrap_or_default(),
                properties: self.subject.properties.as_ref(),
            },
            action: &self.action.name,
            resource: AppEntity {
                entity_type: &self.resource.entity_type,
                id: self.resource.id.as_deref().unwrap_or_default(),
                properties: self.resource.properties.as_ref(),
            },
            context: Some(&ctx),
        })
    }
}

/// Authenticates the caller: the admin token, or a live Palisade access token for the default
/// audience (so human-facing applications and agents use the same credentials as elsewhere).
fn caller(app: &App, headers: &HeaderMap) -> Result<String, String> {
    if crate::admin::is_admin(app, headers) {
        return Ok("admin".into());
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let reason = match bearer {
        None => "send `Authorization: Bearer <access token or admin token>`".to_string(),
        Some(token) => match app
            .tokens
            .verify(token, Some(&app.config.oauth.default_audience))
        {
            Ok(verified) => match app.tokens.live_caller(&verified).map(|c| c.principal) {
                Ok(principal) => return Ok(principal.id.to_string()),
                Err(f) => f.reason,
            },
            Err(reason) => reason,
        },
    };
    Err(reason)
}

fn unauthorized(reason: &str) -> Response {
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({ "error": "unauthorized", "message": reason })),
    )
        .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer realm="palisade""#),
    );
    resp
}

/// The JSON object body, or the 400 that says what is wrong with it.
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Map<String, Value>, BadRequest> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media != "application/json" {
        return Err(BadRequest(
            "send the request as Content-Type: application/json".into(),
        ));
    }
    if body.is_empty() {
        return Err(BadRequest(
            "the request body is empty; send a JSON object".into(),
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(BadRequest("the request body must be a JSON object".into())),
        Err(e) => Err(BadRequest(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

fn with_request_id(headers: &HeaderMap, mut resp: Response) -> Response {
    if let Some(id) = headers.get("x-request-id") {
        resp.headers_mut().insert("x-request-id", id.clone());
    }
    resp
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "invalid_request", "message": message })),
    )
        .into_response()
}

/// Audits a refused call (401 or 400) like any other, then answers with `resp`.
async fn refused(
    app: &App,
    headers: &HeaderMap,
    caller: Option<&str>,
    resp: Response,
    reason: &str,
) -> Response {
    let mut event = AuditEvent::new("authzen.refused");
    event.principal = caller.map(|c| PrincipalRef {
        id: c.to_string(),
        ..PrincipalRef::default()
    });
    event.request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect());
    event.outcome = Some(Outcome {
        status: resp.status().as_u16(),
        error: Some(reason.chars().take(500).collect()),
        ..Outcome::default()
    });
    let resp = crate::audit_or_503(app, event, resp).await;
    with_request_id(headers, resp)
}

async fn answer(
    app: &App,
    headers: &HeaderMap,
    mut event: AuditEvent,
    caller: &str,
    body: Value,
) -> Response {
    event.principal = Some(PrincipalRef {
        id: caller.to_string(),
        ..PrincipalRef::default()
    });
    event.request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect());
    // Fail closed while no required SIEM sink can record: the decision is not released.
    if let Some(reason) = app.audit.refusal() {
        tracing::warn!(%reason, "AuthZEN answer withheld: fail-closed audit");
        event.outcome = Some(Outcome {
            status: 503,
            error: Some(reason),
            ..Outcome::default()
        });
        let resp = crate::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            palisade_audit::FAIL_CLOSED_MESSAGE,
            None,
        );
        return with_request_id(headers, crate::audit_or_503(app, event, resp).await);
    }
    event.outcome = Some(Outcome {
        status: 200,
        ..Outcome::default()
    });
    let resp = crate::audit_or_503(app, event, axum::Json(body).into_response()).await;
    with_request_id(headers, resp)
}

fn describe(e: &Eval) -> Value {
    json!({
        "subject": { "type": e.subject.entity_type, "id": e.subject.id },
        "action": e.action.name,
        "resource": { "type": e.resource.entity_type, "id": e.resource.id },
    })
}

/// `POST /access/v1/evaluation`.
pub async fn evaluation(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match caller(&app, &headers) {
        Ok(c) => c,
        Err(reason) => return refused(&app, &headers, None, unauthorized(&reason), &reason).await,
    };
    let parsed = json_body(&headers, &body).and_then(|b| {
        Ok(Eval {
            subject: require(entity(&b, "subject", true)?, "subject")?,
            action: require(action(&b)?, "action")?,
            resource: require(entity(&b, "resource", true)?, "resource")?,
            context: context(&b)?,
        })
    });
    let eval = match parsed {
        Ok(e) => e,
        Err(BadRequest(m)) => {
            return refused(&app, &headers, Some(&caller), bad_request(&m), &m).await;
        }
    };
    let engine = app.policy.current();
    let decision = eval.decide(&engine, &app.config.authzen.namespace);
    let mut event = AuditEvent::new("authzen.evaluation");
    event.action = Some(eval.action.name.clone());
    event.resource = Some(format!(
        "{}:{}",
        eval.resource.entity_type,
        eval.resource.id.clone().unwrap_or_default()
    ));
    event.decision = Some(DecisionRecord {
        allowed: decision.allowed,
        policies: decision.policies.clone(),
        policy_version: Some(engine.version().to_string()),
    });
    event.detail = describe(&eval);
    answer(
        &app,
        &headers,
        event,
        &caller,
        json!({ "decision": decision.allowed }),
    )
    .await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

/// `POST /access/v1/evaluations`.
pub async fn evaluations(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match caller(&app, &headers) {
        Ok(c) => c,
        Err(reason) => return refused(&app, &headers, None, unauthorized(&reason), &reason).await,
    };
    let body = match json_body(&headers, &body) {
        Ok(b) => b,
        Err(BadRequest(m)) => {
            return refused(&app, &headers, Some(&caller), bad_request(&m), &m).await;
        }
    };
    let parsed = (|| -> Result<_, BadRequest> {
        let defaults = (
            entity(&body, "subject", true)?,
            action(&body)?,
            entity(&body, "resource", true)?,
            context(&body)?,
        );
        let semantic = match body
            .get("options")
            .and_then(|o| o.get("evaluations_semantic"))
        {
            None | Some(Value::Null) => Semantic::ExecuteAll,
            Some(Value::String(s)) if s == "execute_all" => Semantic::ExecuteAll,
            Some(Value::String(s)) if s == "deny_on_first_deny" => Semantic::DenyOnFirstDeny,
            Some(Value::String(s)) if s == "permit_on_first_permit" => {
                Semantic::PermitOnFirstPermit
            }
            Some(other) => {
                return Err(BadRequest(format!(
                    "`options.evaluations_semantic` {other} is not one of execute_all, deny_on_first_deny, permit_on_first_permit"
                )));
            }
        };
        let items = match body.get("evaluations") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => return Err(BadRequest("`evaluations` must be an array".into())),
        };
        Ok((defaults, semantic, items))
    })();
    let ((subject, act, resource, ctx), semantic, items) = match parsed {
        Ok(p) => p,
        Err(BadRequest(m)) => {
            return refused(&app, &headers, Some(&caller), bad_request(&m), &m).await;
        }
    };
    let engine = app.policy.current();
    let namespace = app.config.authzen.namespace.clone();
    let mut event = AuditEvent::new("authzen.evaluations");

    // Without an evaluations array this is a single evaluation (backwards compatible).
    let Some(items) = items else {
        let (Some(subject), Some(act), Some(resource)) = (subject, act, resource) else {
            let m = "give `subject`, `action` and `resource`, or an `evaluations` array";
            return refused(&app, &headers, Some(&caller), bad_request(m), m).await;
        };
        let eval = Eval {
            subject,
            action: act,
            resource,
            context: ctx,
        };
        let decision = eval.decide(&engine, &namespace);
        event.decision = Some(DecisionRecord {
            allowed: decision.allowed,
            policies: decision.policies,
            policy_version: Some(engine.version().to_string()),
        });
        event.detail = describe(&eval);
        return answer(
            &app,
            &headers,
            event,
            &caller,
            json!({ "decision": decision.allowed }),
        )
        .await;
    };

    let mut results = Vec::with_capacity(items.len());
    let mut audited = Vec::with_capacity(items.len());
    for item in &items {
        // An item that is not complete after defaults is an evaluation-level error: a deny with
        // the reason, not a failure of the whole batch.
        let built = (|| -> Result<Eval, BadRequest> {
            let obj = item
                .as_object()
                .ok_or_else(|| BadRequest("an evaluation must be an object".into()))?;
            Ok(Eval {
                subject: require(
                    entity(obj, "subject", true)?.or_else(|| subject.clone()),
                    "subject",
                )?,
                action: require(action(obj)?.or_else(|| act.clone()), "action")?,
                resource: require(
                    entity(obj, "resource", true)?.or_else(|| resource.clone()),
                    "resource",
                )?,
                context: context(obj)?.or_else(|| ctx.clone()),
            })
        })();
        let (allowed, entry) = match built {
            Ok(eval) => {
                let d = eval.decide(&engine, &namespace);
                let mut record = describe(&eval);
                record["decision"] = json!(d.allowed);
                record["policies"] = json!(d.policies);
                audited.push(record);
                (d.allowed, json!({ "decision": d.allowed }))
            }
            Err(BadRequest(m)) => {
                audited.push(json!({ "decision": false, "error": m }));
                (
                    false,
                    json!({ "decision": false, "context": { "error": { "status": 400, "message": m } } }),
                )
            }
        };
        results.push(entry);
        let stop = match semantic {
            Semantic::ExecuteAll => false,
            Semantic::DenyOnFirstDeny => !allowed,
            Semantic::PermitOnFirstPermit => allowed,
        };
        if stop {
            break;
        }
    }
    event.detail = json!({ "evaluations": audited, "policy_version": engine.version() });
    answer(
        &app,
        &headers,
        event,
        &caller,
        json!({ "evaluations": results }),
    )
    .await
}

#[derive(Clone, Copy)]
enum SearchKind {
    Subject,
    Resource,
    Action,
}

/// `POST /access/v1/search/{subject|resource|action}`.
async fn search(app: Arc<App>, headers: HeaderMap, body: Bytes, kind: SearchKind) -> Response {
    let caller = match caller(&app, &headers) {
        Ok(c) => c,
        Err(reason) => return refused(&app, &headers, None, unauthorized(&reason), &reason).await,
    };
    let body = match json_body(&headers, &body) {
        Ok(b) => b,
        Err(BadRequest(m)) => {
            return refused(&app, &headers, Some(&caller), bad_request(&m), &m).await;
        }
    };
    let parsed = (|| -> Result<_, BadRequest> {
        let subject = require(
            entity(&body, "subject", !matches!(kind, SearchKind::Subject))?,
            "subject",
        )?;
        let resource = require(
            entity(&body, "resource", !matches!(kind, SearchKind::Resource))?,
            "resource",
        )?;
        let act = match kind {
            SearchKind::Action => None,
            _ => Some(require(action(&body)?, "action")?),
        };
        let (offset, limit) = page(&body)?;
        Ok((subject, resource, act, context(&body)?, offset, limit))
    })();
    let (subject, resource, act, ctx, offset, limit) = match parsed {
        Ok(p) => p,
        Err(BadRequest(m)) => {
            return refused(&app, &headers, Some(&caller), bad_request(&m), &m).await;
        }
    };
    let engine = app.policy.current();
    let namespace = &app.config.authzen.namespace;
    let candidates: Vec<String> = match kind {
        SearchKind::Subject => engine.app_entity_ids(namespace, &subject.entity_type),
        SearchKind::Resource => engine.app_entity_ids(namespace, &resource.entity_type),
        SearchKind::Action => engine.app_actions(namespace),
    };
    let mut matches = Vec::new();
    for candidate in candidates {
        let mut eval = Eval {
            subject: subject.clone(),
            action: act.clone().unwrap_or(Act {
                name: candidate.clone(),
                properties: None,
            }),
            resource: resource.clone(),
            context: ctx.clone(),
        };
        let result = match kind {
            SearchKind::Subject => {
                eval.subject = Ent {
                    id: Some(candidate.clone()),
                    properties: None,
                    ..subject.clone()
                };
                json!({ "type": subject.entity_type, "id": candidate })
            }
            SearchKind::Resource => {
                eval.resource = Ent {
                    id: Some(candidate.clone()),
                    properties: None,
                    ..resource.clone()
                };
                json!({ "type": resource.entity_type, "id": candidate })
            }
            SearchKind::Action => json!({ "name": candidate }),
        };
        if eval.decide(&engine, namespace).allowed {
            matches.push(result);
        }
    }
    let total = matches.len();
    let page_items: Vec<Value> = matches.into_iter().skip(offset).take(limit).collect();
    let next = offset + page_items.len();
    let mut response = json!({ "results": page_items });
    if next < total {
        response["page"] = json!({ "next_token": URL_SAFE_NO_PAD.encode(next.to_string()) });
    }
    let mut event = AuditEvent::new("authzen.search");
    event.action = Some(
        match kind {
            SearchKind::Subject => "search.subject",
            SearchKind::Resource => "search.resource",
            SearchKind::Action => "search.action",
        }
        .into(),
    );
    event.detail =
        json!({ "results": total, "offset": offset, "policy_version": engine.version() });
    answer(&app, &headers, event, &caller, response).await
}

/// The page offset (from an opaque token) and size.
fn page(body: &Map<String, Value>) -> Result<(usize, usize), BadRequest> {
    let Some(page) = body.get("page") else {
        return Ok((0, MAX_PAGE));
    };
    let page = page
        .as_object()
        .ok_or_else(|| BadRequest("`page` must be an object".into()))?;
    let limit = match page.get("limit") {
        None | Some(Value::Null) => MAX_PAGE,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(l) if l >= 1 => usize::try_from(l).unwrap_or(MAX_PAGE).min(MAX_PAGE),
            _ => return Err(BadRequest("`page.limit` must be a positive integer".into())),
        },
        Some(_) => return Err(BadRequest("`page.limit` must be a positive integer".into())),
    };
    let offset = match page.get("token") {
        None | Some(Value::Null) => 0,
        Some(Value::String(t)) if t.is_empty() => 0,
        Some(Value::String(t)) => URL_SAFE_NO_PAD
            .decode(t)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| {
                BadRequest("`page.token` is not a token this PDP issued; start without one".into())
            })?,
        Some(_) => return Err(BadRequest("`page.token` must be a string".into())),
    };
    Ok((offset, limit))
}

/// `POST /access/v1/search/subject`.
pub async fn search_subject(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    search(app, headers, body, SearchKind::Subject).await
}

/// `POST /access/v1/search/resource`.
pub async fn search_resource(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    search(app, headers, body, SearchKind::Resource).await
}

/// `POST /access/v1/search/action`.
pub async fn search_action(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    search(app, headers, body, SearchKind::Action).await
}

/// `GET /.well-known/authzen-configuration`.
pub async fn configuration(State(app): State<Arc<App>>) -> Response {
    let base = &app.config.server.issuer;
    axum::Json(json!({
        "policy_decision_point": base,
        "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
        "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
        "search_subject_endpoint": format!("{base}/access/v1/search/subject"),
        "search_resource_endpoint": format!("{base}/access/v1/search/resource"),
        "search_action_endpoint": format!("{base}/access/v1/search/action"),
    }))
    .into_response()
}
