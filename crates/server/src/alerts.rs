//! Detection rules on a schedule: the built-in rules plus the config's rules file run over the
//! audit log; each new finding is stored as an alert (once) and audited as `alert.raised`.

use crate::App;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use palisade_audit::detect::{Alert, Rule};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The rules in force and when each last ran.
pub struct Detection {
    /// Built-in and configured rules.
    pub rules: Vec<Rule>,
    /// Named lists for their queries.
    pub lists: HashMap<String, Vec<Value>>,
    last_run: Mutex<HashMap<String, i64>>,
}

impl Detection {
    /// The built-in rules and those of `config.audit.rules_file`, checked.
    pub fn load(config: &palisade_config::Config) -> Result<Self, String> {
        let lists: HashMap<String, Vec<Value>> = config
            .audit
            .lists
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|s| json!(s)).collect()))
            .collect();
        let mut names: Vec<&str> = lists.keys().map(String::as_str).collect();
        // The built-in credential rule names this list; an unconfigured one is empty.
        names.push("approved_credential_consumers");
        let mut rules = palisade_audit::detect::builtin();
        if let Some(path) = &config.audit.rules_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the rules file {}: {e}", path.display()))?;
            rules.extend(palisade_audit::detect::parse_rules(
                &text,
                &path.display().to_string(),
                &names,
            )?);
        }
        let mut lists = lists;
        lists
            .entry("approved_credential_consumers".into())
            .or_default();
        Ok(Self {
            rules,
            lists,
            last_run: Mutex::default(),
        })
    }
}

/// Runs the rules (only those due, unless `all`), stores new alerts and audits them; returns
/// the new alerts.
pub async fn run(app: &Arc<App>, all: bool) -> Result<Vec<Alert>, String> {
    let store = app.store.clone();
    let now = i64::try_from(app.tokens.now().unix_nanos()).unwrap_or(i64::MAX);
    let due: Vec<Rule> = {
        let mut last = app
            .detection
            .last_run
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        app.detection
            .rules
            .iter()
            .filter(|r| {
                let due = all
                    || last.get(&r.name).is_none_or(|t| {
                        now - t >= i64::try_from(r.every).unwrap_or(60) * 1_000_000_000
                    });
                if due {
                    last.insert(r.name.clone(), now);
                }
                due
            })
            .cloned()
            .collect()
    };
    if due.is_empty() {
        return Ok(Vec::new());
    }
    let lists = app.detection.lists.clone();
    let fresh = tokio::task::spawn_blocking(move || -> Result<Vec<Alert>, String> {
        let mut fresh = Vec::new();
        for rule in &due {
            // Each rule reads the log from the start of its time window.
            let alerts =
                palisade_audit::detect::evaluate_on_store(rule, store.as_ref(), now, &lists)
                    .map_err(|e| format!("rule `{}`: {e}", rule.name))?;
            for alert in alerts {
                let json = serde_json::to_string(&alert).map_err(|e| e.to_string())?;
                if store
                    .put_alert(&alert.key, alert.time_ns, &json)
                    .map_err(|e| e.to_string())?
                {
                    fresh.push(alert);
                }
            }
        }
        Ok(fresh)
    })
    .await
    .map_err(|e| e.to_string())??;
    for alert in &fresh {
        let mut event = palisade_audit::AuditEvent::new("alert.raised");
        event.principal = alert.row.get("agent_id").and_then(Value::as_str).map(|id| {
            palisade_audit::PrincipalRef {
                id: id.to_string(),
                ..Default::default()
            }
        });
        event.alert = Some(palisade_audit::Alert {
            severity: alert.severity.clone(),
            rule: alert.rule.clone(),
            message: alert.message.clone(),
        });
        event.detail = json!({ "key": alert.key, "row": alert.row });
        app.audit.record(event).await.map_err(|e| e.to_string())?;
    }
    Ok(fresh)
}

/// Runs the rules that are due every 15 seconds.
pub fn schedule(app: Weak<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            if let Err(e) = run(&app, false).await {
                tracing::warn!(error = %e, "detection rules failed; retrying next round");
            }
        }
    })
}

/// Query of `GET /api/v1/alerts`.
#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// `GET /api/v1/alerts`: the latest alerts, newest first.
pub async fn list(State(app): State<Arc<App>>, Query(q): Query<ListQuery>) -> Response {
    let store = app.store.clone();
    let limit = q.limit.clamp(1, 10_000);
    match tokio::task::spawn_blocking(move || store.alerts(limit)).await {
        Ok(Ok(items)) => {
            let items: Vec<Value> = items
                .iter()
                .filter_map(|j| serde_json::from_str(j).ok())
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "error": "internal", "message": "the alert store failed; see the server log" })),
        )
            .into_response(),
    }
}

/// `POST /api/v1/alerts/run`: runs every rule now; returns the alerts it raised.
pub async fn run_now(State(app): State<Arc<App>>) -> Response {
    match run(&app, true).await {
        Ok(raised) => axum::Json(json!({ "raised": raised })).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "error": "internal", "message": e })),
        )
            .into_response(),
    }
}
