//! Detection rules: named queries with a severity and a schedule, run over the audit log; each
//! result row is an alert, raised once (a key over the rule and the row keeps reruns quiet).
//!
//! Built in (each a query in the language of [`crate::query`], so they read like the rules an
//! operator writes):
//! - `out-of-scope-access`: an action outside the agent's declared purpose (denied by purpose
//!   binding, which marks the event);
//! - `volume-anomaly`: an agent's 5-minute action count of at least 20 above the 95th
//!   percentile of its own 5-minute counts over the last day (its baseline); an agent with less
//!   than an hour of history (12 bins) is compared with the 95th percentile of every agent's;
//! - `credential-access-unapproved`: a credential action by an agent not in the
//!   `approved_credential_consumers` list;
//! - `off-hours-activity`: agent actions between 22:00 and 06:00 UTC;
//! - `denial-burst`: ten or more denials of one principal within five minutes (probing, or an
//!   injected agent trying its way around);
//! - `first-seen-resource`: an agent reaching a resource it never reached before, in the last
//!   ten minutes;
//! - `tool-definition-changed`: an MCP tool whose definition changed since it was pinned.
//! - `approval-tampering`: someone not allowed tried to decide an approval, or an agent retried
//!   a changed call under an approval (`approval_mismatch`).

use crate::query::{self, QueryError, Rows};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// One detection rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable name, e.g. `denial-burst`.
    pub name: String,
    /// `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// Seconds between runs.
    #[serde(default = "default_every")]
    pub every: u64,
    /// The query; every row it returns is an alert.
    pub query: String,
    /// What an alert says, for a person.
    pub message: String,
}

fn default_every() -> u64 {
    60
}

/// The built-in rules.
pub fn builtin() -> Vec<Rule> {
    let rule = |name: &str, severity: &str, every: u64, query: &str, message: &str| Rule {
        name: name.into(),
        severity: severity.into(),
        every,
        query: query.into(),
        message: message.into(),
    };
    vec![
        rule(
            "out-of-scope-access",
            "high",
            60,
            "AgentAuditLog | where timestamp > ago(10m) and alert_rule == \"purpose-violation\" | project timestamp, agent_id, agent_purpose, action_taken, resource_accessed, resource_type",
            "an agent acted outside its declared purpose",
        ),
        rule(
            "volume-anomaly",
            "medium",
            300,
            "AgentAuditLog | where timestamp > ago(1d) and isnotnull(agent_id) | summarize action_count = count() by agent_id, window = bin(timestamp, 5m) | extend baseline = percentile_by(action_count, 95, agent_id), history = count_by(agent_id) | where window > ago(10m) and action_count >= 20 and ((history >= 12 and action_count > baseline) or (history < 12 and action_count > percentile_threshold_95))",
            "an agent's 5-minute action count is far above its own baseline",
        ),
        rule(
            "credential-access-unapproved",
            "high",
            60,
            "AgentAuditLog | where timestamp > ago(10m) and action_taken == \"credential\" and not(agent_id in (approved_credential_consumers)) | project timestamp, agent_id, resource_accessed, allowed",
            "an agent not approved for credentials asked for one",
        ),
        rule(
            "off-hours-activity",
            "low",
            300,
            "AgentAuditLog | where timestamp > ago(10m) and kind in (\"gateway.decision\", \"mcp.tool_call\") and (hourofday(timestamp) >= 22 or hourofday(timestamp) < 6) | summarize actions = count() by agent_id",
            "agent activity between 22:00 and 06:00 UTC",
        ),
        rule(
            "denial-burst",
            "high",
            60,
            "AgentAuditLog | where timestamp > ago(5m) and allowed == false | summarize denials = count() by agent_id | where denials >= 10",
            "ten or more denials within five minutes: probing, or an agent trying its way around a policy",
        ),
        rule(
            "first-seen-resource",
            "low",
            300,
            "AgentAuditLog | where isnotnull(agent_id) and isnotnull(resource_accessed) and allowed == true | summarize first_seen = min(timestamp) by agent_id, resource_accessed | where first_seen > ago(10m)",
            "an agent reached a resource for the first time",
        ),
        rule(
            "tool-definition-changed",
            "high",
            60,
            "AgentAuditLog | where timestamp > ago(10m) and kind == \"mcp.tool_changed\" | project timestamp, resource_accessed, detail.tool",
            "an MCP tool's definition changed since it was pinned",
        ),
        rule(
            "approval-tampering",
            "high",
            60,
            "AgentAuditLog | where timestamp > ago(10m) and (kind == \"approval.refused\" or detail.approval_refused == \"approval_mismatch\") | project timestamp, kind, agent_id, resource_accessed, detail.approval_refused",
            "an approval was tampered with: a decision by someone not allowed, or a changed call under an approval",
        ),
    ]
}

/// `[[rules]]` in a rules file (TOML), checked: names unique and not built in, severities
/// known, queries that parse.
pub fn parse_rules(text: &str, source: &str, lists: &[&str]) -> Result<Vec<Rule>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        rules: Vec<Rule>,
    }
    let file: File = toml::from_str(text).map_err(|e| format!("{source}: {e}"))?;
    let mut names: Vec<String> = builtin().into_iter().map(|r| r.name).collect();
    for (i, r) in file.rules.iter().enumerate() {
        let at = format!("{source}: rules[{i}]");
        if r.name.is_empty() || names.contains(&r.name) {
            return Err(format!(
                "{at}: name `{}` is empty or already taken (built-in rules are {})",
                r.name,
                builtin()
                    .iter()
                    .map(|b| b.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        names.push(r.name.clone());
        if !matches!(r.severity.as_str(), "low" | "medium" | "high" | "critical") {
            return Err(format!(
                "{at}: severity `{}` is not low, medium, high or critical",
                r.severity
            ));
        }
        if r.every < 10 {
            return Err(format!("{at}: every = {} is below 10 seconds", r.every));
        }
        query::check(&r.query, lists).map_err(|e| format!("{at}: query: {e}"))?;
    }
    Ok(file.rules)
}

/// A raised alert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The rule.
    pub rule: String,
    /// Its severity.
    pub severity: String,
    /// Its message.
    pub message: String,
    /// When it was raised, nanoseconds.
    pub time_ns: i64,
    /// The result row that raised it.
    pub row: Map<String, Value>,
    /// SHA-256 over the rule and the row: the same finding raises one alert.
    pub key: String,
}

/// Runs `rule` over `rows`; one alert per result row.
pub fn evaluate(
    rule: &Rule,
    rows: Rows,
    now_ns: i64,
    lists: &HashMap<String, Vec<Value>>,
) -> Result<Vec<Alert>, QueryError> {
    let answer = query::run(&rule.query, rows, now_ns, lists)?;
    Ok(alerts_of(rule, answer, now_ns))
}

/// [`evaluate`] over the store, streaming (a rule's time window bounds what is read).
pub fn evaluate_on_store(
    rule: &Rule,
    store: &dyn palisade_core::store::Store,
    now_ns: i64,
    lists: &HashMap<String, Vec<Value>>,
) -> Result<Vec<Alert>, query::StoreQueryError> {
    let answer = query::run_on_store(&rule.query, store, now_ns, lists)?;
    Ok(alerts_of(rule, answer, now_ns))
}

fn alerts_of(rule: &Rule, answer: query::Answer, now_ns: i64) -> Vec<Alert> {
    answer
        .rows
        .into_iter()
        .map(|row| {
            let mut h = Sha256::new();
            h.update(rule.name.as_bytes());
            h.update(b"\n");
            h.update(serde_json::to_string(&row).unwrap_or_default().as_bytes());
            Alert {
                rule: rule.name.clone(),
                severity: rule.severity.clone(),
                message: rule.message.clone(),
                time_ns: now_ns,
                row,
                key: palisade_core::secret::hex(&h.finalize()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn event(agent: &str, minutes_ago: i64, allowed: bool, extra: Value) -> Map<String, Value> {
        let mut e = json!({
            "time_ns": NOW - minutes_ago * 60_000_000_000,
            "event_id": format!("{agent}-{minutes_ago}"),
            "kind": "gateway.decision",
            "principal": { "id": agent },
            "action": "read",
            "resource": "Palisade::Route::\"tickets\"",
            "decision": { "allowed": allowed, "policies": [] },
        });
        if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        query::row_of(&e)
    }

    fn fired(name: &str, rows: Rows, lists: &HashMap<String, Vec<Value>>) -> usize {
        let rule = builtin().into_iter().find(|r| r.name == name).unwrap();
        evaluate(&rule, rows, NOW, lists).unwrap().len()
    }

    #[test]
    fn every_builtin_rule_parses() {
        for r in builtin() {
            query::check(&r.query, &["approved_credential_consumers"]).unwrap();
        }
    }

    #[test]
    fn each_rule_fires_on_its_scenario_and_not_on_a_normal_one() {
        let none = HashMap::new();
        // Denial burst: 12 denials in 5 minutes vs 3.
        let burst: Rows = (0..12)
            .map(|i| event("agent:prober", i % 4, false, json!({})))
            .collect();
        assert_eq!(fired("denial-burst", burst, &none), 1);
        let few: Rows = (0..3)
            .map(|i| event("agent:prober", i, false, json!({})))
            .collect();
        assert_eq!(fired("denial-burst", few, &none), 0);

        // Out-of-scope access: a purpose violation vs an ordinary denial.
        let violation = vec![event(
            "agent:pr",
            1,
            false,
            json!({ "alert": { "rule": "purpose-violation", "severity": "high", "message": "x" } }),
        )];
        assert_eq!(fired("out-of-scope-access", violation, &none), 1);
        assert_eq!(
            fired(
                "out-of-scope-access",
                vec![event("agent:pr", 1, false, json!({}))],
                &none
            ),
            0
        );

        // Credential access: an unapproved agent vs an approved one.
        let cred = |agent: &str| event(agent, 1, true, json!({ "action": "credential" }));
        let mut lists = HashMap::new();
        lists.insert(
            "approved_credential_consumers".to_string(),
            vec![json!("agent:vault")],
        );
        assert_eq!(
            fired(
                "credential-access-unapproved",
                vec![cred("agent:rogue")],
                &lists
            ),
            1
        );
        assert_eq!(
            fired(
                "credential-access-unapproved",
                vec![cred("agent:vault")],
                &lists
            ),
            0
        );

        // Volume anomaly: one agent's 5-minute burst against a day of steady traffic.
        let mut rows: Rows = Vec::new();
        for bin in 3..200 {
            rows.push(event("agent:steady", bin * 5, true, json!({})));
        }
        let steady = rows.clone();
        for i in 0..40 {
            rows.push(event("agent:spiky", i % 4, true, json!({})));
        }
        assert_eq!(fired("volume-anomaly", rows, &none), 1);
        assert_eq!(fired("volume-anomaly", steady, &none), 0);
        // Each agent against its own baseline: a busy agent at its usual 25 per bin is quiet;
        // a quiet agent's 22 in the last bin, far above its usual 1, fires (though 22 is below
        // the fleet's 95th percentile).
        let mut rows: Rows = Vec::new();
        for bin in 0..30 {
            for _ in 0..25 {
                rows.push(event("agent:busy", bin * 5 + 1, true, json!({})));
            }
            if bin > 0 {
                rows.push(event("agent:quiet", bin * 5 + 1, true, json!({})));
            }
        }
        let usual = rows.clone();
        for _ in 0..22 {
            rows.push(event("agent:quiet", 1, true, json!({})));
        }
        let rule = builtin()
            .into_iter()
            .find(|r| r.name == "volume-anomaly")
            .unwrap();
        let alerts = evaluate(&rule, rows, NOW, &none).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].row["agent_id"], "agent:quiet");
        assert_eq!(fired("volume-anomaly", usual, &none), 0);

        // First-seen resource: new in the last 10 minutes vs long known.
        let old = event("agent:a", 600, true, json!({}));
        let again = event("agent:a", 2, true, json!({}));
        assert_eq!(
            fired("first-seen-resource", vec![old, again.clone()], &none),
            0
        );
        assert_eq!(fired("first-seen-resource", vec![again], &none), 1);

        // Off-hours: an action at 00:00 UTC vs the same at 08:00 UTC.
        let rule = builtin()
            .into_iter()
            .find(|r| r.name == "off-hours-activity")
            .unwrap();
        let midnight = NOW + 16 * 3_600_000_000_000;
        let mut late = event("agent:owl", 0, true, json!({}));
        late.insert("timestamp".into(), json!(midnight - 60_000_000_000));
        assert_eq!(
            evaluate(&rule, vec![late], midnight, &none).unwrap().len(),
            1
        );
        assert_eq!(
            fired(
                "off-hours-activity",
                vec![event("agent:owl", 1, true, json!({}))],
                &none
            ),
            0
        );

        // Tool-definition changes.
        let changed = event("agent:x", 1, true, json!({ "kind": "mcp.tool_changed" }));
        assert_eq!(fired("tool-definition-changed", vec![changed], &none), 1);

        // Approval tampering: a refused approver, a changed call under an approval; not an
        // ordinary wait.
        let refused = event("human:eve", 1, true, json!({ "kind": "approval.refused" }));
        let mismatch = event(
            "agent:x",
            1,
            false,
            json!({ "detail": { "approval_refused": "approval_mismatch" } }),
        );
        let waiting = event(
            "agent:x",
            1,
            true,
            json!({ "detail": { "approval_refused": "approval_used" } }),
        );
        assert_eq!(
            fired("approval-tampering", vec![refused, mismatch], &none),
            2
        );
        assert_eq!(fired("approval-tampering", vec![waiting], &none), 0);
    }

    #[test]
    fn rules_files_are_checked() {
        let ok = "[[rules]]\nname = \"writes\"\nseverity = \"low\"\nquery = \"AgentAuditLog | where action_taken == 'write'\"\nmessage = \"a write\"\n";
        assert_eq!(parse_rules(ok, "r.toml", &[]).unwrap().len(), 1);
        let bad = ok.replace("action_taken", "acton_taken");
        assert!(
            parse_rules(&bad, "r.toml", &[])
                .unwrap_err()
                .contains("acton_taken")
        );
        let dup = ok.replace("writes", "denial-burst");
        assert!(
            parse_rules(&dup, "r.toml", &[])
                .unwrap_err()
                .contains("already taken")
        );
        let sev = ok.replace("\"low\"", "\"urgent\"");
        assert!(
            parse_rules(&sev, "r.toml", &[])
                .unwrap_err()
                .contains("severity")
        );
    }
}
