//! Table-driven policy tests (`palisade policy test FILE`): principals described inline, cases
//! that name principal, action and target, and the expected decision and, optionally, the exact
//! deciding policy ids. For CI, like `opa test`.
//!
//! ```toml
//! [principals."agent:pr-bot"]
//! owner = "human:alice"
//! purpose_tag = "pull-request-review"
//! allowed_resources = ["repos"]
//!
//! [[case]]
//! name = "the review bot reads repos"
//! principal = "agent:pr-bot"
//! action = "read"
//! route = "repos"
//! expect = "allow"
//! policies = ["palisade.baseline.agent-read"]
//! ```
//!
//! Optional per case: `resource` (a route rule's resource name), `kind` and `route_kind` (default:
//! the resource name, else the route name), `method`, `path`, `hour` (0-23, default 12) and
//! `weekday` (`mon`..`sun`, default `wed`), `system` and `classification` (default `internal`).
//! A principal may declare `blast_radius = { max_action = "write", ... }` like an agent record.

use crate::{Action, PolicyEngine, RequestContext, Target};
use palisade_core::principal::{AgentDetail, HumanDetail, ServiceAccountDetail};
use palisade_core::{Principal, PrincipalDetail, PrincipalId, PrincipalKind, Status, Timestamp};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    principals: BTreeMap<String, PrincipalSpec>,
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PrincipalSpec {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    purpose_tag: Option<String>,
    #[serde(default)]
    model_provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    allowed_resources: Vec<String>,
    #[serde(default)]
    data_egress_allowed: bool,
    #[serde(default)]
    teams: Vec<String>,
    #[serde(default)]
    blast_radius: Option<palisade_core::principal::BlastRadius>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: String,
    action: String,
    route: String,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    route_kind: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    hour: Option<u8>,
    #[serde(default)]
    weekday: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    classification: Option<String>,
    expect: String,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The verdict on one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Whether the decision (and the deciding policies, if given) matched.
    pub passed: bool,
    /// What was decided, and on failure what was expected.
    pub message: String,
}

/// Parses a case file and runs every case against `engine`. Errors name the file and the case.
pub fn run(engine: &PolicyEngine, text: &str, source: &str) -> Result<Vec<CaseResult>, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| format!("{source}: {e}"))?;
    let file: CaseFile =
        serde::Deserialize::deserialize(de).map_err(|e| format!("{source}: {e}"))?;
    if file.cases.is_empty() {
        return Err(format!(
            "{source}: no [[case]] tables; a test file needs at least one case"
        ));
    }
    let now = Timestamp::now();
    let mut principals = BTreeMap::new();
    for (id, spec) in &file.principals {
        let principal = build_principal(id, spec, now)
            .map_err(|e| format!("{source}: principal `{id}`: {e}"))?;
        principals.insert(id.clone(), principal);
    }
    let mut results = Vec::with_capacity(file.cases.len());
    for case in &file.cases {
        let at = |e: String| format!("{source}: case `{}`: {e}", case.name);
        let principal = principals.get(&case.principal).ok_or_else(|| {
            at(format!(
                "principal `{}` is not described under [principals]",
                case.principal
            ))
        })?;
        let action = match case.action.as_str() {
            "read" => Action::Read,
            "write" => Action::Write,
            "destructive" => Action::Destructive,
            "egress" => Action::Egress,
            "credential" => Action::Credential,
            "write_token" => Action::WriteToken,
            other => {
                return Err(at(format!(
                    "action `{other}` is not one of read, write, destructive, egress, credential"
                )));
            }
        };
        let expect_allow = match case.expect.as_str() {
            "allow" => true,
            "deny" => false,
            other => return Err(at(format!("expect `{other}` is not allow or deny"))),
        };
        let method = case.method.clone().unwrap_or_else(|| {
            match action {
                Action::Read => "GET",
                Action::Write | Action::Egress | Action::Credential | Action::WriteToken => "POST",
                Action::Destructive => "DELETE",
            }
            .to_string()
        });
        let path = case.path.clone().unwrap_or_else(|| "/".into());
        let route_kind = case
            .route_kind
            .clone()
            .unwrap_or_else(|| case.route.clone());
        let kind = case
            .kind
            .clone()
            .or_else(|| case.resource.clone())
            .unwrap_or_else(|| route_kind.clone());
        let classification = match case.classification.as_deref() {
            None => palisade_core::principal::Classification::Internal,
            Some(text) => palisade_core::principal::Classification::parse(text).ok_or_else(|| {
                at(format!("classification `{text}` is not public, internal, confidential or restricted"))
            })?,
        };
        let system = case.system.clone().unwrap_or_default();
        let target = Target {
            route: &case.route,
            resource: case.resource.as_deref(),
            tool: false,
            route_kind: &route_kind,
            kind: &kind,
            system: &system,
            route_classification: classification,
            classification,
        };
        let hour = case.hour.unwrap_or(12);
        if hour > 23 {
            return Err(at(format!("hour {hour} is not 0 to 23")));
        }
        let weekday = match case.weekday.as_deref().unwrap_or("wed") {
            day @ ("mon" | "tue" | "wed" | "thu" | "fri" | "sat" | "sun") => WEEKDAYS
                .iter()
                .copied()
                .find(|d| *d == day)
                .unwrap_or("wed"),
            other => {
                return Err(at(format!(
                    "weekday `{other}` is not one of mon, tue, wed, thu, fri, sat, sun"
                )));
            }
        };
        let ctx = RequestContext {
            hour,
            weekday,
            ..RequestContext::at(&method, &path, Timestamp::now())
        };
        let decision = engine.decide(principal, action, &target, &ctx);
        let got = if decision.allowed { "allow" } else { "deny" };
        let mut problems = Vec::new();
        if decision.allowed != expect_allow {
            problems.push(format!("expected {}, got {got}", case.expect));
        }
        if let Some(expected) = &case.policies {
            let mut expected = expected.clone();
            expected.sort();
            if expected != decision.policies {
                problems.push(format!(
                    "expected deciding policies {expected:?}, got {:?}",
                    decision.policies
                ));
            }
        }
        for e in &decision.errors {
            problems.push(format!("evaluation error: {e}"));
        }
        let decided = format!("{got} by {}", decision.policies.join(", "));
        results.push(CaseResult {
            name: case.name.clone(),
            passed: problems.is_empty(),
            message: if problems.is_empty() {
                decided
            } else {
                format!("{} ({decided})", problems.join("; "))
            },
        });
    }
    Ok(results)
}

fn build_principal(id: &str, spec: &PrincipalSpec, now: Timestamp) -> Result<Principal, String> {
    let id: PrincipalId = id.parse().map_err(|e: palisade_core::id::IdError| e.0)?;
    let status = match spec.status.as_deref().unwrap_or("active") {
        "active" => Status::Active,
        "suspended" => Status::Suspended,
        "deprovisioned" => Status::Deprovisioned,
        other => {
            return Err(format!(
                "status `{other}` is not active, suspended or deprovisioned"
            ));
        }
    };
    let owner = || -> Result<PrincipalId, String> {
        spec.owner
            .as_deref()
            .unwrap_or("human:owner")
            .parse()
            .map_err(|e: palisade_core::id::IdError| e.0)
    };
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let detail = match id.kind() {
        PrincipalKind::Agent => PrincipalDetail::Agent(AgentDetail {
            owner: owner()?,
            purpose: String::new(),
            purpose_tag: text(&spec.purpose_tag),
            model_provider: text(&spec.model_provider),
            model: text(&spec.model),
            model_version: text(&spec.model_version),
            review_cadence_days: 90,
            next_review_at: now,
            max_session_minutes: 30,
            max_concurrent_sessions: 5,
            allowed_resources: spec.allowed_resources.clone(),
            scopes: Vec::new(),
            max_files_per_session: None,
            data_egress_allowed: spec.data_egress_allowed,
            rate_limit: None,
            max_concurrent_requests: None,
            blast_radius: {
                let b = spec.blast_radius.clone().unwrap_or_default();
                b.validate()
                    .map_err(|(field, message)| format!("{field}: {message}"))?;
                b
            },
        }),
        PrincipalKind::Human => {
            let teams = spec
                .teams
                .iter()
                .map(|t| {
                    PrincipalId::parse_with_default(t, Some(PrincipalKind::Team)).map_err(|e| e.0)
                })
                .collect::<Result<Vec<_>, _>>()?;
            PrincipalDetail::Human(HumanDetail {
                email: None,
                teams,
                may_act: Vec::new(),
            })
        }
        PrincipalKind::ServiceAccount => PrincipalDetail::ServiceAccount(ServiceAccountDetail {
            owner: owner()?,
            description: String::new(),
            allowed_resources: spec.allowed_resources.clone(),
            scopes: Vec::new(),
        }),
        PrincipalKind::Team => {
            return Err(
                "a team cannot make requests; describe its members as humans with `teams`".into(),
            );
        }
    };
    Ok(Principal {
        display_name: id.slug().to_string(),
        id,
        status,
        status_change: None,
        created_at: now,
        updated_at: now,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[principals."agent:bot"]
allowed_resources = ["tickets"]
[principals."agent:parked"]
status = "suspended"
allowed_resources = ["tickets"]

[[case]]
name = "reads its route"
principal = "agent:bot"
action = "read"
route = "tickets"
expect = "allow"
policies = ["palisade.baseline.agent-read"]

[[case]]
name = "suspended agent reads nothing"
principal = "agent:parked"
action = "read"
route = "tickets"
expect = "deny"
policies = ["palisade.baseline.inactive-principal"]

[[case]]
name = "wrong expectation is reported"
principal = "agent:bot"
action = "write"
route = "tickets"
expect = "allow"
"#;

    #[test]
    fn cases_pass_and_fail_with_reasons() {
        let engine = PolicyEngine::from_texts(&[]).unwrap();
        let results = run(&engine, FILE, "t.toml").unwrap();
        assert_eq!(
            results.iter().map(|r| r.passed).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(
            results[2].message.contains("expected allow, got deny"),
            "{}",
            results[2].message
        );
        assert!(
            results[2].message.contains("palisade.blast-radius.action"),
            "{}",
            results[2].message
        );
    }

    #[test]
    fn bad_files_name_the_problem() {
        let engine = PolicyEngine::from_texts(&[]).unwrap();
        let cases = [
            (
                "[[case]]\nname = \"x\"\nprincipal = \"agent:ghost\"\naction = \"read\"\nroute = \"r\"\nexpect = \"allow\"\n",
                "not described",
            ),
            (
                "[principals.\"agent:a\"]\n[[case]]\nname = \"x\"\nprincipal = \"agent:a\"\naction = \"nuke\"\nroute = \"r\"\nexpect = \"allow\"\n",
                "`nuke`",
            ),
            ("[principals.\"agent:a\"]\ncolour = 1\n", "colour"),
            (
                "[principals.\"team:a\"]\n[[case]]\nname = \"x\"\nprincipal = \"team:a\"\naction = \"read\"\nroute = \"r\"\nexpect = \"allow\"\n",
                "team cannot",
            ),
            ("", "at least one case"),
        ];
        for (text, expected) in cases {
            let err = run(&engine, text, "t.toml").unwrap_err();
            assert!(
                err.contains(expected) && err.starts_with("t.toml"),
                "{text:?}: {err}"
            );
        }
    }
}
