use super::*;
use palisade_core::principal::{AgentDetail, HumanDetail};
use palisade_core::{PrincipalId, PrincipalKind, Status, Timestamp};

fn agent(slug: &str, allowed: &[&str], status: Status) -> Principal {
    let now = Timestamp::now();
    Principal {
        id: PrincipalId::new(PrincipalKind::Agent, slug).unwrap(),
        display_name: slug.into(),
        status,
        status_change: None,
        created_at: now,
        updated_at: now,
        detail: PrincipalDetail::Agent(AgentDetail {
            owner: "human:alice".parse().unwrap(),
            purpose: "reviews".into(),
            purpose_tag: "pull-request-review".into(),
            model_provider: "anthropic".into(),
            model: "claude".into(),
            model_version: "1".into(),
            review_cadence_days: 90,
            next_review_at: now,
            max_session_minutes: 30,
            max_concurrent_sessions: 1,
            allowed_resources: allowed.iter().map(|s| s.to_string()).collect(),
            scopes: vec![],
            max_files_per_session: None,
            data_egress_allowed: false,
        }),
    }
}

fn human(slug: &str, teams: &[&str]) -> Principal {
    let now = Timestamp::now();
    Principal {
        id: PrincipalId::new(PrincipalKind::Human, slug).unwrap(),
        display_name: slug.into(),
        status: Status::Active,
        status_change: None,
        created_at: now,
        updated_at: now,
        detail: PrincipalDetail::Human(HumanDetail {
            email: None,
            teams: teams
                .iter()
                .map(|t| PrincipalId::new(PrincipalKind::Team, t).unwrap())
                .collect(),
        }),
    }
}

fn ctx() -> RequestContext<'static> {
    RequestContext {
        method: "GET",
        path: "/tickets/1",
    }
}

fn route(name: &str) -> Target<'_> {
    Target {
        route: name,
        resource: None,
    }
}

#[test]
fn baseline_lets_agents_read_allowed_routes_only() {
    let engine = PolicyEngine::from_texts(&[]).unwrap();
    let a = agent("bot", &["tickets"], Status::Active);
    let cases = [
        (
            Action::Read,
            "tickets",
            true,
            "palisade.baseline.agent-read",
        ),
        (Action::Read, "payroll", false, DEFAULT_DENY),
        (Action::Write, "tickets", false, DEFAULT_DENY),
        (Action::Destructive, "tickets", false, DEFAULT_DENY),
    ];
    for (action, r, allowed, policy) in cases {
        let d = engine.decide(&a, action, &route(r), &ctx());
        assert_eq!(d.allowed, allowed, "{action:?} {r}");
        assert_eq!(d.policies, vec![policy.to_string()], "{action:?} {r}");
    }
}

#[test]
fn suspended_agents_are_forbidden_even_with_a_grant() {
    let engine = PolicyEngine::from_texts(&[]).unwrap();
    let a = agent("bot", &["tickets"], Status::Suspended);
    let d = engine.decide(&a, Action::Read, &route("tickets"), &ctx());
    assert!(!d.allowed);
    assert_eq!(
        d.policies,
        vec!["palisade.baseline.inactive-principal".to_string()]
    );
}

#[test]
fn forbid_wins_and_is_named_by_its_id() {
    let text = r#"
        @id("tickets-write")
        permit (principal is Palisade::Agent, action in [Palisade::Action::"write", Palisade::Action::"destructive"], resource == Palisade::Route::"tickets");
        @id("no-deletes")
        forbid (principal, action == Palisade::Action::"destructive", resource);
    "#;
    let engine = PolicyEngine::from_texts(&[("t.cedar", text)]).unwrap();
    let a = agent("bot", &["tickets"], Status::Active);
    let w = engine.decide(&a, Action::Write, &route("tickets"), &ctx());
    assert!(w.allowed);
    assert_eq!(w.policies, vec!["tickets-write".to_string()]);
    let d = engine.decide(&a, Action::Destructive, &route("tickets"), &ctx());
    assert!(!d.allowed);
    assert_eq!(d.policies, vec!["no-deletes".to_string()]);
}

#[test]
fn humans_match_team_membership() {
    let text = r#"@id("alpha-writes") permit (principal in Palisade::Team::"alpha", action == Palisade::Action::"write", resource);"#;
    let engine = PolicyEngine::from_texts(&[("t.cedar", text)]).unwrap();
    assert!(
        engine
            .decide(
                &human("ann", &["alpha"]),
                Action::Write,
                &route("x"),
                &ctx()
            )
            .allowed
    );
    assert!(
        !engine
            .decide(&human("bob", &["beta"]), Action::Write, &route("x"), &ctx())
            .allowed
    );
}

#[test]
fn invalid_policies_report_file_line_and_reason() {
    let bad_syntax =
        "@id(\"x\")\npermit (principal, action, resource)\nwhen { principal.status == };\n";
    let err = PolicyEngine::from_texts(&[("p/bad.cedar", bad_syntax)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("p/bad.cedar:3:"), "{err}");

    let bad_schema =
        "@id(\"y\")\npermit (principal, action, resource)\nwhen { principal.no_such_attr == 1 };\n";
    let err = PolicyEngine::from_texts(&[("p/schema.cedar", bad_schema)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("p/schema.cedar:3:"), "{err}");
    assert!(err.contains("`y`"), "{err}");

    let dup = "@id(\"z\") permit (principal, action, resource);\n@id(\"z\") permit (principal, action, resource);";
    let err = PolicyEngine::from_texts(&[("d.cedar", dup)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already used"), "{err}");
}

#[test]
fn version_changes_with_policy_text() {
    let a = PolicyEngine::from_texts(&[]).unwrap();
    let b = PolicyEngine::from_texts(&[(
        "x.cedar",
        "@id(\"x\") permit (principal, action, resource);",
    )])
    .unwrap();
    assert_ne!(a.version(), b.version());
    assert_eq!(b.policy_count(), a.policy_count() + 1);
}
