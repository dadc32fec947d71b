use super::*;
use palisade_core::principal::{
    ActionCeiling, AgentDetail, BlastRadius, Classification, HumanDetail,
};
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
            rate_limit: None,
            max_concurrent_requests: None,
            blast_radius: palisade_core::principal::BlastRadius {
                max_action: palisade_core::principal::ActionCeiling::Destructive,
                ..Default::default()
            },
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
            may_act: Vec::new(),
        }),
    }
}

fn ctx() -> RequestContext<'static> {
    RequestContext {
        hour: 12,
        weekday: "wed",
        ..RequestContext::at(
            "GET",
            "/tickets/1",
            palisade_core::Timestamp::from_unix_seconds(0),
        )
    }
}

fn route(name: &str) -> Target<'_> {
    Target {
        route: name,
        resource: None,
        tool: false,
        route_kind: name,
        kind: name,
        system: "",
        route_classification: Default::default(),
        classification: Default::default(),
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
        (
            Action::Read,
            "payroll",
            false,
            "palisade.blast-radius.compute",
        ),
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

/// Property: for random requests, the principal-sliced evaluation gives exactly the decision,
/// deciding policies and errors of evaluating the full policy set. (A seeded xorshift drives the
/// cases so failures reproduce; 3,000 cases over 40 principals.)
#[test]
fn sliced_evaluation_equals_full_evaluation_on_random_requests() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let routes = ["tickets", "repos", "payroll", "wiki", "deploys"];
    let actions = ["read", "write", "destructive"];
    let mut texts = String::new();
    for i in 0..40 {
        let route = routes[(i * 7 % 5) as usize];
        let action = actions[(i % 3) as usize];
        let effect = if i % 4 == 0 { "forbid" } else { "permit" };
        // Some conditions read attributes that only some resources have, so they can error.
        let condition = match i % 5 {
            0 => "true".to_string(),
            1 => format!("context.path like \"/{route}/*\""),
            2 => "context.method == \"POST\"".to_string(),
            3 => "resource has name && resource.name == \"wiki\"".to_string(),
            _ => "principal.allowed_resources.contains(resource.name)".to_string(),
        };
        texts.push_str(&format!(
            "@id(\"p{i}\")\n{effect} (principal == Palisade::Agent::\"agent:a{i}\", action == Palisade::Action::\"{action}\", resource)\nwhen {{ {condition} }};\n"
        ));
    }
    texts.push_str("@id(\"g1\")\npermit (principal is Palisade::Agent, action == Palisade::Action::\"write\", resource == Palisade::Route::\"wiki\");\n");
    texts.push_str("@id(\"g2\")\nforbid (principal, action == Palisade::Action::\"destructive\", resource == Palisade::Route::\"payroll\");\n");
    texts.push_str(
        "@id(\"g3\")\npermit (principal in Palisade::Team::\"alpha\", action, resource);\n",
    );
    let sliced = PolicyEngine::from_texts(&[("gen.cedar", &texts)]).unwrap();
    let full = PolicyEngine::from_texts(&[("gen.cedar", &texts)])
        .unwrap()
        .with_slicing(false);
    let agents: Vec<Principal> = (0..45)
        .map(|i| {
            let allowed: Vec<&str> = routes.iter().copied().filter(|_| next(2) == 0).collect();
            let status = if next(10) == 0 {
                Status::Suspended
            } else {
                Status::Active
            };
            let mut a = agent(&format!("a{i}"), &allowed, status);
            if let PrincipalDetail::Agent(d) = &mut a.detail {
                d.blast_radius = BlastRadius {
                    systems: if next(2) == 0 {
                        vec!["github".into()]
                    } else {
                        vec![]
                    },
                    max_classification: [Classification::Internal, Classification::Restricted]
                        [next(2) as usize],
                    max_action: [
                        ActionCeiling::Read,
                        ActionCeiling::Write,
                        ActionCeiling::Destructive,
                    ][next(3) as usize],
                    hours: [[0, 24], [8, 18]][next(2) as usize],
                    weekdays: if next(2) == 0 {
                        vec!["mon".into()]
                    } else {
                        BlastRadius::default().weekdays
                    },
                    ..BlastRadius::default()
                };
            }
            a
        })
        .collect();
    let humans = [human("ann", &["alpha"]), human("bob", &["beta"])];
    let mut compared = 0;
    for _ in 0..3000 {
        let who: &Principal = if next(10) == 0 {
            &humans[next(2) as usize]
        } else {
            &agents[next(agents.len() as u64) as usize]
        };
        let action = [Action::Read, Action::Write, Action::Destructive][next(3) as usize];
        let route = routes[next(5) as usize];
        let resource = if next(3) == 0 { Some("comment") } else { None };
        let method = ["GET", "POST", "DELETE"][next(3) as usize];
        let path = format!("/{}/{}", routes[next(5) as usize], next(100));
        let classes = [
            Classification::Public,
            Classification::Internal,
            Classification::Confidential,
            Classification::Restricted,
        ];
        let target = Target {
            route,
            resource,
            tool: false,
            route_kind: route,
            kind: resource.unwrap_or(route),
            system: ["", "github", "jira"][next(3) as usize],
            route_classification: classes[next(4) as usize],
            classification: classes[next(4) as usize],
        };
        let ctx = RequestContext {
            hour: next(24) as u8,
            weekday: ["mon", "sat"][next(2) as usize],
            ..RequestContext::at(method, &path, Timestamp::from_unix_seconds(0))
        };
        let a = sliced.decide(who, action, &target, &ctx);
        let b = full.decide(who, action, &target, &ctx);
        assert_eq!(
            a, b,
            "{} {action:?} {route} {resource:?} {method} {path}",
            who.id
        );
        compared += 1;
    }
    assert_eq!(compared, 3000);
}

#[test]
fn a_changed_principal_record_is_never_served_from_the_entity_cache() {
    let engine = PolicyEngine::from_texts(&[]).unwrap();
    let active = agent("bot", &["tickets"], Status::Active);
    assert!(
        engine
            .decide(&active, Action::Read, &route("tickets"), &ctx())
            .allowed
    );
    let mut suspended = active.clone();
    suspended.status = Status::Suspended;
    assert!(
        !engine
            .decide(&suspended, Action::Read, &route("tickets"), &ctx())
            .allowed
    );
    let mut narrowed = active.clone();
    if let PrincipalDetail::Agent(a) = &mut narrowed.detail {
        a.allowed_resources = vec!["wiki".into()];
    }
    assert!(
        !engine
            .decide(&narrowed, Action::Read, &route("tickets"), &ctx())
            .allowed
    );
    assert!(
        engine
            .decide(&active, Action::Read, &route("tickets"), &ctx())
            .allowed
    );
}

#[test]
fn the_request_context_carries_utc_hour_and_weekday_for_temporal_policies() {
    let at = |text: &str| RequestContext::at("GET", "/", Timestamp::parse_rfc3339(text).unwrap());
    let thursday = at("2026-11-26T15:30:00Z");
    assert_eq!((thursday.hour, thursday.weekday), (15, "thu"));
    let sunday = at("2026-11-29T23:59:59Z");
    assert_eq!((sunday.hour, sunday.weekday), (23, "sun"));
    let epoch = at("1970-01-01T00:00:00Z");
    assert_eq!((epoch.hour, epoch.weekday), (0, "thu"));

    let text = r#"
        @id("office-hours")
        forbid (principal is Palisade::Agent, action, resource)
        unless { context.hour >= 8 && context.hour < 18 && !["sat", "sun"].contains(context.weekday) };
    "#;
    let engine = PolicyEngine::from_texts(&[("hours.cedar", text)]).unwrap();
    let a = agent("bot", &["tickets"], Status::Active);
    assert!(
        engine
            .decide(&a, Action::Read, &route("tickets"), &thursday)
            .allowed
    );
    let night = at("2026-11-26T03:00:00Z");
    assert_eq!(
        engine
            .decide(&a, Action::Read, &route("tickets"), &night)
            .policies,
        ["office-hours"]
    );
    let weekend = at("2026-11-28T11:00:00Z");
    assert!(
        !engine
            .decide(&a, Action::Read, &route("tickets"), &weekend)
            .allowed
    );
}

/// (name, principal, action, target, context, the policy expected to deny or none for allow)
type BlastCase<'a> = (
    &'a str,
    Principal,
    Action,
    Target<'a>,
    RequestContext<'a>,
    Option<&'a str>,
);

/// One table per blast-radius dimension: the agent's declared values decide, over grants.
#[test]
fn blast_radius_dimensions_are_ceilings_over_any_grant() {
    let grant_all = r#"@id("grant-all") permit (principal, action, resource);"#;
    let engine = PolicyEngine::from_texts(&[("grants.cedar", grant_all)]).unwrap();
    let with = |f: &dyn Fn(&mut BlastRadius)| {
        let mut a = agent("bot", &["tickets"], Status::Active);
        if let PrincipalDetail::Agent(d) = &mut a.detail {
            d.blast_radius = BlastRadius::default();
            f(&mut d.blast_radius);
        }
        a
    };
    let target = |route: &'static str, system: &'static str, class: Classification| Target {
        route,
        resource: None,
        tool: false,
        route_kind: route,
        kind: route,
        system,
        route_classification: class,
        classification: class,
    };
    let at = |hour: u8, weekday: &'static str| RequestContext {
        hour,
        weekday,
        ..RequestContext::at("GET", "/", Timestamp::from_unix_seconds(0))
    };
    let internal = Classification::Internal;
    let noon = at(12, "wed");
    let cases: Vec<BlastCase<'_>> = vec![
        // action: read-only by default
        (
            "default is read-only: read",
            with(&|_| {}),
            Action::Read,
            target("tickets", "", internal),
            noon.clone(),
            None,
        ),
        (
            "default is read-only: write",
            with(&|_| {}),
            Action::Write,
            target("tickets", "", internal),
            noon.clone(),
            Some("palisade.blast-radius.action"),
        ),
        (
            "write ceiling allows write",
            with(&|b| b.max_action = ActionCeiling::Write),
            Action::Write,
            target("tickets", "", internal),
            noon.clone(),
            None,
        ),
        (
            "write ceiling stops delete",
            with(&|b| b.max_action = ActionCeiling::Write),
            Action::Destructive,
            target("tickets", "", internal),
            noon.clone(),
            Some("palisade.blast-radius.action"),
        ),
        // compute: routes outside allowed_resources, unless their system is listed
        (
            "other route",
            with(&|_| {}),
            Action::Read,
            target("payroll", "", internal),
            noon.clone(),
            Some("palisade.blast-radius.compute"),
        ),
        (
            "other route in a listed system",
            with(&|b| b.systems = vec!["github".into()]),
            Action::Read,
            target("repos", "github", internal),
            noon.clone(),
            None,
        ),
        // data: classification ceiling (internal by default)
        (
            "confidential over the default ceiling",
            with(&|_| {}),
            Action::Read,
            target("tickets", "", Classification::Confidential),
            noon.clone(),
            Some("palisade.blast-radius.data"),
        ),
        (
            "confidential under a raised ceiling",
            with(&|b| b.max_classification = Classification::Confidential),
            Action::Read,
            target("tickets", "", Classification::Confidential),
            noon.clone(),
            None,
        ),
        // temporal: hours and weekdays
        (
            "outside hours",
            with(&|b| b.hours = [8, 18]),
            Action::Read,
            target("tickets", "", internal),
            at(19, "wed"),
            Some("palisade.blast-radius.temporal"),
        ),
        (
            "inside hours",
            with(&|b| b.hours = [8, 18]),
            Action::Read,
            target("tickets", "", internal),
            at(8, "wed"),
            None,
        ),
        (
            "weekend",
            with(&|b| {
                b.weekdays = vec![
                    "mon".into(),
                    "tue".into(),
                    "wed".into(),
                    "thu".into(),
                    "fri".into(),
                ]
            }),
            Action::Read,
            target("tickets", "", internal),
            at(12, "sat"),
            Some("palisade.blast-radius.temporal"),
        ),
        // egress: only when allowed, and only to listed destinations
        (
            "egress not allowed",
            with(&|_| {}),
            Action::Egress,
            target("tickets", "", internal),
            noon.clone(),
            Some("palisade.blast-radius.egress"),
        ),
    ];
    for (name, principal, action, target, ctx, denied_by) in cases {
        let d = engine.decide(&principal, action, &target, &ctx);
        match denied_by {
            None => assert!(d.allowed, "{name}: {d:?}"),
            Some(policy) => {
                assert!(!d.allowed, "{name}: allowed");
                assert_eq!(d.policies, [policy], "{name}");
            }
        }
    }
    let mut egress_ok = with(&|b| b.egress_destinations = vec!["api.github.com".into()]);
    if let PrincipalDetail::Agent(d) = &mut egress_ok.detail {
        d.data_egress_allowed = true;
    }
    let to = |dest: &'static str| RequestContext {
        destination: Some(dest),
        ..noon.clone()
    };
    assert!(
        engine
            .decide(
                &egress_ok,
                Action::Egress,
                &target("tickets", "", internal),
                &to("api.github.com")
            )
            .allowed
    );
    assert!(
        !engine
            .decide(
                &egress_ok,
                Action::Egress,
                &target("tickets", "", internal),
                &to("evil.example")
            )
            .allowed
    );
}

#[test]
fn review_state_is_visible_to_policies() {
    let text = r#"@id("review-overdue") forbid (principal is Palisade::Agent, action, resource) when { principal.next_review_at < context.now };"#;
    let engine = PolicyEngine::from_texts(&[("review.cedar", text)]).unwrap();
    let mut a = agent("bot", &["tickets"], Status::Active);
    let due = Timestamp::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
    if let PrincipalDetail::Agent(d) = &mut a.detail {
        d.next_review_at = due;
    }
    let before = RequestContext::at(
        "GET",
        "/",
        Timestamp::parse_rfc3339("2026-11-30T12:00:00Z").unwrap(),
    );
    let after = RequestContext::at(
        "GET",
        "/",
        Timestamp::parse_rfc3339("2026-12-02T12:00:00Z").unwrap(),
    );
    assert!(
        engine
            .decide(&a, Action::Read, &route("tickets"), &before)
            .allowed
    );
    assert_eq!(
        engine
            .decide(&a, Action::Read, &route("tickets"), &after)
            .policies,
        ["review-overdue"]
    );
}
