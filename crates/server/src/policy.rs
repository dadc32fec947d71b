//! The policy set in force, its hot reload, and the `/api/v1/policy` endpoints.
//!
//! INVARIANT (keep-last-good): a reload that fails validation changes nothing in force; the
//! failure is logged, audited (`policy.reload_failed`) and shown by `GET /api/v1/policy` until a
//! later reload succeeds.

use crate::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use palisade_audit::{AuditEvent, PrincipalRef};
use palisade_core::{Principal, Timestamp};
use palisade_gateway::DecisionPoint;
use palisade_policy::{Action, Decision, PolicyEngine, PolicyLoadError, RequestContext, Target};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

/// A failed reload, kept for the status endpoint.
#[derive(Clone, Debug)]
pub struct ReloadFailure {
    /// When it failed.
    pub at: Timestamp,
    /// The validation errors, each with file and line where known.
    pub errors: Vec<String>,
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The texts produced the version already in force.
    Unchanged(String),
    /// A new version is in force.
    Changed {
        /// The version before.
        previous: String,
        /// The version now.
        current: String,
    },
}

/// The policy engine in force and how to rebuild it.
pub struct PolicyHolder {
    engine: RwLock<Arc<PolicyEngine>>,
    dir: Option<PathBuf>,
    extra: Vec<(String, String)>,
    builtin: Vec<(String, String)>,
    loaded_at: Mutex<Timestamp>,
    last_failure: Mutex<Option<ReloadFailure>>,
    // Serialises reloads so two triggers cannot interleave their swaps.
    reloading: Mutex<()>,
}

impl PolicyHolder {
    /// Wraps the engine loaded at start-up from `dir` and `extra`.
    pub fn new(
        engine: PolicyEngine,
        dir: Option<PathBuf>,
        extra: Vec<(String, String)>,
        builtin: Vec<(String, String)>,
    ) -> Self {
        Self {
            engine: RwLock::new(Arc::new(engine)),
            dir,
            extra,
            builtin,
            loaded_at: Mutex::new(Timestamp::now()),
            last_failure: Mutex::new(None),
            reloading: Mutex::new(()),
        }
    }

    /// The engine in force.
    pub fn current(&self) -> Arc<PolicyEngine> {
        self.engine
            .read()
            .map(|e| e.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&PathBuf> {
        self.dir.as_ref()
    }

    /// Re-reads and validates everything; swaps only on success (blocking: call off the runtime).
    pub fn reload(&self) -> Result<ReloadOutcome, PolicyLoadError> {
        let _guard = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let builtin: Vec<(&str, &str)> = self
            .builtin
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let result = PolicyEngine::load_all(self.dir.as_deref(), &extra, &builtin);
        let mut failure = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(e) => {
                let errors = match &e {
                    PolicyLoadError::Invalid(list) => list.clone(),
                    other => vec![other.to_string()],
                };
                *failure = Some(ReloadFailure {
                    at: Timestamp::now(),
                    errors,
                });
                Err(e)
            }
            Ok(engine) => {
                *failure = None;
                let previous = self.current().version().to_string();
                if engine.version() == previous {
                    return Ok(ReloadOutcome::Unchanged(previous));
                }
                let current = engine.version().to_string();
                if let Ok(mut slot) = self.engine.write() {
                    *slot = Arc::new(engine);
                }
                if let Ok(mut at) = self.loaded_at.lock() {
                    *at = Timestamp::now();
                }
                Ok(ReloadOutcome::Changed { previous, current })
            }
        }
    }

    /// The status document of `GET /api/v1/policy`.
    pub fn status(&self) -> Value {
        let engine = self.current();
        let failure = self.last_failure.lock().map(|f| f.clone()).unwrap_or(None);
        json!({
            "version": engine.version(),
            "policies": engine.policy_ids(),
            "dir": self.dir.as_ref().map(|d| d.display().to_string()),
            "loaded_at": self.loaded_at.lock().map(|t| *t).unwrap_or_else(|_| Timestamp::now()),
            "last_reload_error": failure.map(|f| json!({ "at": f.at, "errors": f.errors })),
        })
    }
}

impl DecisionPoint for PolicyHolder {
    fn decide(
        &self,
        principal: &Principal,
        action: Action,
        target: &Target<'_>,
        ctx: &RequestContext<'_>,
    ) -> (Decision, String) {
        let engine = self.current();
        (
            engine.decide(principal, action, target, ctx),
            engine.version().to_string(),
        )
    }
}

/// Policies Palisade generates from the configuration: the purpose bindings.
pub fn builtin_sources(config: &palisade_config::Config) -> Vec<(String, String)> {
    let declared: Vec<(String, String)> = config
        .mcp
        .argument_types()
        .into_iter()
        .map(|(name, ty)| (name, ty.cedar().to_string()))
        .collect();
    let mut sources = vec![(
        palisade_policy::ARGUMENTS_SCHEMA_NAME.to_string(),
        palisade_policy::arguments_schema(&declared),
    )];
    sources.extend(purpose_sources(config));
    sources
}

fn purpose_sources(config: &palisade_config::Config) -> Vec<(String, String)> {
    let purposes: Vec<palisade_policy::purpose::Purpose> = config
        .purposes
        .iter()
        .map(|p| palisade_policy::purpose::Purpose {
            tag: p.tag.clone(),
            actions: p
                .actions
                .iter()
                .map(|a| match a {
                    palisade_config::ActionClass::Read => Action::Read,
                    palisade_config::ActionClass::Write => Action::Write,
                    palisade_config::ActionClass::Destructive => Action::Destructive,
                })
                .collect(),
            resource_kinds: p.resource_kinds.clone(),
        })
        .collect();
    if purposes.is_empty() {
        return Vec::new();
    }
    vec![(
        "<purposes from the config>".to_string(),
        palisade_policy::purpose::compile(&purposes),
    )]
}

/// Reloads, then audits what happened; returns the outcome or the validation errors.
pub async fn reload_and_audit(
    app: &App,
    actor: &str,
) -> (Result<ReloadOutcome, Vec<String>>, bool) {
    let holder = app.policy.clone();
    let result = tokio::task::spawn_blocking(move || holder.reload())
        .await
        .unwrap_or_else(|e| {
            Err(PolicyLoadError::Invalid(vec![format!(
                "reload task failed: {e}"
            )]))
        });
    let mut event = AuditEvent::new("policy.reload");
    event.principal = Some(PrincipalRef {
        id: actor.to_string(),
        ..PrincipalRef::default()
    });
    event.action = Some("policy.reload".into());
    let outcome = match result {
        Ok(ReloadOutcome::Unchanged(version)) => {
            event.kind = "policy.reload_unchanged".into();
            event.detail = json!({ "version": version });
            Ok(ReloadOutcome::Unchanged(version))
        }
        Ok(ReloadOutcome::Changed { previous, current }) => {
            tracing::info!(%previous, %current, "policy set reloaded");
            event.kind = "policy.reloaded".into();
            event.detail = json!({ "previous_version": previous, "version": current });
            Ok(ReloadOutcome::Changed { previous, current })
        }
        Err(e) => {
            let errors = match e {
                PolicyLoadError::Invalid(list) => list,
                other => vec![other.to_string()],
            };
            let in_force = app.policy.current().version().to_string();
            tracing::error!(errors = %errors.join("; "), version_in_force = %in_force, "policy reload failed; the previous policy set stays in force");
            event.kind = "policy.reload_failed".into();
            event.detail = json!({ "errors": errors, "version_in_force": in_force });
            Err(errors)
        }
    };
    // The swap has happened by now; if it cannot be audited the caller must say so loudly.
    let audited = match app.audit.record(event).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "could not audit a policy reload; the new policy set is in force without an audit record");
            false
        }
    };
    (outcome, audited)
}

/// A fingerprint of the policy, schema and entity files in a directory: names, sizes and
/// modification times.
fn fingerprint(dir: &std::path::Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| palisade_policy::source_kind_of(&e.path()).is_some())
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    files.sort();
    files
}

/// Polls the policy directory and reloads when its files change. Ends when the server is gone.
pub fn watch(app: Weak<App>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(dir) = app.upgrade().and_then(|a| a.policy.dir().cloned()) else {
            return;
        };
        let mut seen = fingerprint(&dir);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let scan_dir = dir.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&scan_dir)).await else {
                continue;
            };
            if now == seen {
                continue;
            }
            seen = now;
            let Some(app) = app.upgrade() else { return };
            let _ = reload_and_audit(&app, "policy-watcher").await;
        }
    })
}

/// The registered agent named by a path segment (`pr-bot` or `agent:pr-bot`), or the error
/// response naming the problem.
fn registered_agent(app: &App, text: &str) -> Result<Arc<palisade_core::Principal>, Box<Response>> {
    let id = palisade_core::PrincipalId::parse_with_default(
        text,
        Some(palisade_core::PrincipalKind::Agent),
    )
    .map_err(|e| {
        Box::new(crate::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("id: {}", e.0),
            Some("id"),
        ))
    })?;
    app.registry.get(&id).ok_or_else(|| {
        Box::new(crate::error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{id} is not registered; `palisade agent list` shows the registered ones"),
            None,
        ))
    })
}

/// `GET /api/v1/policy/agents/{id}`: an agent's blast radius and every policy that can apply
/// to it.
pub async fn show_agent(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let agent = match registered_agent(&app, &id) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let id = &agent.id;
    let engine = app.policy.current();
    match engine.effective_for(&agent) {
        Ok(policies) => axum::Json(json!({
            "agent": id.to_string(),
            "status": agent.status.as_str(),
            "purpose_tag": agent.agent().map(|a| a.purpose_tag.clone()),
            "allowed_resources": agent.agent().map(|a| a.allowed_resources.clone()),
            "blast_radius": agent.agent().map(|a| a.blast_radius.clone()),
            "policy_version": engine.version(),
            "policies": policies.into_iter().map(|(id, text)| json!({ "id": id, "text": text })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => crate::error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e, None),
    }
}

/// The parts of a target the configuration knows for `route` and an optional rule resource.
struct TargetParts {
    kind: String,
    system: String,
    classification: palisade_core::principal::Classification,
}

fn target_parts(route: &palisade_config::RouteConfig, resource: Option<&str>) -> TargetParts {
    let rule = resource.and_then(|r| {
        route
            .rules
            .iter()
            .find(|rule| rule.resource.as_deref() == Some(r))
    });
    TargetParts {
        kind: rule
            .and_then(|r| r.kind.clone().or_else(|| r.resource.clone()))
            .unwrap_or_else(|| route.kind.clone()),
        system: route.system.clone().unwrap_or_default(),
        classification: rule
            .and_then(|r| r.classification)
            .unwrap_or(route.classification),
    }
}

fn parse_action(text: &str) -> Option<Action> {
    match text {
        "read" => Some(Action::Read),
        "write" => Some(Action::Write),
        "destructive" => Some(Action::Destructive),
        "egress" => Some(Action::Egress),
        "credential" => Some(Action::Credential),
        "write_token" => Some(Action::WriteToken),
        _ => None,
    }
}

fn default_method(action: Action) -> &'static str {
    match action {
        Action::Read => "GET",
        Action::Destructive => "DELETE",
        _ => "POST",
    }
}

/// Body of `POST /api/v1/policy/explain`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    principal: String,
    action: String,
    route: String,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

/// `POST /api/v1/policy/explain`: the decision for a hypothetical gateway request now, with the
/// permits considered when it is a deny.
pub async fn explain(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let req: ExplainRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return crate::error_response(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &format!("the body is not valid: {e}"),
                None,
            );
        }
    };
    let Ok(id) = req.principal.parse::<palisade_core::PrincipalId>() else {
        return crate::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "principal: give an id such as agent:pr-bot",
            Some("principal"),
        );
    };
    let Some(principal) = app.registry.get(&id) else {
        return crate::error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{id} is not registered"),
            Some("principal"),
        );
    };
    let Some(action) = parse_action(&req.action) else {
        return crate::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!(
                "action: `{}` is not one of read, write, destructive, egress, credential",
                req.action
            ),
            Some("action"),
        );
    };
    let Some(route) = app.config.routes.iter().find(|r| r.name == req.route) else {
        let names: Vec<&str> = app.config.routes.iter().map(|r| r.name.as_str()).collect();
        return crate::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!(
                "route: `{}` is not configured; routes are: {}",
                req.route,
                names.join(", ")
            ),
            Some("route"),
        );
    };
    if let Some(resource) = &req.resource
        && !route
            .rules
            .iter()
            .any(|r| r.resource.as_deref() == Some(resource.as_str()))
    {
        let known: Vec<&str> = route
            .rules
            .iter()
            .filter_map(|r| r.resource.as_deref())
            .collect();
        return crate::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!(
                "resource: no rule of route `{}` names `{resource}`; its resources are: {}",
                route.name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
            Some("resource"),
        );
    }
    let parts = target_parts(route, req.resource.as_deref());
    let target = Target {
        route: &route.name,
        resource: req.resource.as_deref(),
        tool: false,
        route_kind: &route.kind,
        kind: &parts.kind,
        system: &parts.system,
        route_classification: route.classification,
        classification: parts.classification,
    };
    let method = req
        .method
        .clone()
        .unwrap_or_else(|| default_method(action).to_string());
    let path = req
        .path
        .clone()
        .unwrap_or_else(|| route.path_prefix.clone());
    let ctx = RequestContext::at(&method, &path, app.tokens.now());
    let engine = app.policy.current();
    match engine.explain(&principal, action, &target, &ctx) {
        Ok(ex) => axum::Json(json!({
            "allowed": ex.decision.allowed,
            "deciding_policies": ex.decision.policies,
            "errors": ex.decision.errors,
            "policy_version": engine.version(),
            "permits_considered": ex.permits.iter().map(|p| json!({
                "id": p.id, "would_allow_alone": p.would_allow, "errors": p.errors, "text": p.text,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => crate::error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e, None),
    }
}

/// `GET /api/v1/policy/agents/{id}/can`: every configured route and rule resource, with each
/// gateway action class, decided for this agent now.
pub async fn what_can(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let agent = match registered_agent(&app, &id) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let id = &agent.id;
    let engine = app.policy.current();
    let now = app.tokens.now();
    let mut items = Vec::new();
    for route in &app.config.routes {
        let mut resources: Vec<Option<String>> = vec![None];
        for rule in &route.rules {
            if let Some(r) = &rule.resource
                && !resources.contains(&Some(r.clone()))
            {
                resources.push(Some(r.clone()));
            }
        }
        for resource in &resources {
            let parts = target_parts(route, resource.as_deref());
            let target = Target {
                route: &route.name,
                resource: resource.as_deref(),
                tool: false,
                route_kind: &route.kind,
                kind: &parts.kind,
                system: &parts.system,
                route_classification: route.classification,
                classification: parts.classification,
            };
            for action in [Action::Read, Action::Write, Action::Destructive] {
                let ctx = RequestContext::at(default_method(action), &route.path_prefix, now);
                let d = engine.decide(&agent, action, &target, &ctx);
                items.push(json!({
                    "route": route.name,
                    "resource": resource,
                    "action": action.as_str(),
                    "allowed": d.allowed,
                    "policies": d.policies,
                }));
            }
        }
    }
    axum::Json(json!({ "agent": id.to_string(), "at": now, "policy_version": engine.version(), "items": items })).into_response()
}

/// `GET /api/v1/policy`.
pub async fn status(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.policy.status()).into_response()
}

/// `POST /api/v1/policy/reload`: 200 with the status, or 400 with the errors while the previous
/// set stays in force.
pub async fn reload(State(app): State<Arc<App>>) -> Response {
    let (result, audited) = reload_and_audit(&app, "admin").await;
    if !audited {
        return crate::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            &format!(
                "policy version {} is in force, but the audit log could not record the reload; check the server log and disk",
                app.policy.current().version()
            ),
            None,
        );
    }
    match result {
        Ok(outcome) => {
            let mut body = app.policy.status();
            body["changed"] = json!(matches!(outcome, ReloadOutcome::Changed { .. }));
            axum::Json(body).into_response()
        }
        Err(errors) => {
            let version = app.policy.current().version().to_string();
            let body = json!({ "error": {
                "code": "invalid_policy",
                "message": format!("the policy set did not validate, so version {version} stays in force; fix the files and reload"),
                "errors": errors,
                "version_in_force": version,
            }});
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
    }
}
