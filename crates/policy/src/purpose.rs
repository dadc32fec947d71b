//! Purpose binding: a purpose tag maps to the action classes and resource kinds that purpose
//! needs; Palisade compiles each into a `forbid` so an agent acting outside its declared purpose
//! is denied by the same engine, under the id `palisade.purpose.<tag>`.

use crate::Action;

/// Prefix of the compiled policies' ids; a deny by one of them is a purpose violation.
pub const POLICY_PREFIX: &str = "palisade.purpose.";

/// What one purpose allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purpose {
    /// The purpose tag agents declare, e.g. `pull-request-review`.
    pub tag: String,
    /// Action classes the purpose needs.
    pub actions: Vec<Action>,
    /// Resource kinds (route or rule `kind`) the purpose needs.
    pub resource_kinds: Vec<String>,
}

/// Whether a text is safe as a tag or kind inside a Cedar string literal and a policy id.
pub fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// The Cedar text of the purpose-binding policies. Names must satisfy [`valid_name`] (the config
/// validates them); any that do not are left out rather than quoted.
pub fn compile(purposes: &[Purpose]) -> String {
    let mut out = String::new();
    for p in purposes
        .iter()
        .filter(|p| valid_name(&p.tag) && p.resource_kinds.iter().all(|k| valid_name(k)))
    {
        let actions: Vec<String> = p
            .actions
            .iter()
            .map(|a| format!("Palisade::Action::\"{}\"", a.as_str()))
            .collect();
        let kinds: Vec<String> = p
            .resource_kinds
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect();
        let allowed = if actions.is_empty() {
            "false".to_string()
        } else {
            format!(
                "action in [{}] && [{}].contains(resource.kind)",
                actions.join(", "),
                kinds.join(", ")
            )
        };
        out.push_str(&format!(
            "@id(\"{POLICY_PREFIX}{tag}\")\nforbid (principal is Palisade::Agent, action, resource)\nwhen {{ principal.purpose_tag == \"{tag}\" }}\nunless {{ {allowed} }};\n\n",
            tag = p.tag
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PolicyEngine, RequestContext, Target};
    use palisade_core::principal::AgentDetail;
    use palisade_core::{
        Principal, PrincipalDetail, PrincipalId, PrincipalKind, Status, Timestamp,
    };

    fn reviewer() -> Principal {
        let now = Timestamp::now();
        Principal {
            id: PrincipalId::new(PrincipalKind::Agent, "pr-bot").unwrap(),
            display_name: "pr-bot".into(),
            status: Status::Active,
            status_change: None,
            created_at: now,
            updated_at: now,
            detail: PrincipalDetail::Agent(AgentDetail {
                owner: "human:alice".parse().unwrap(),
                purpose: "reviews".into(),
                purpose_tag: "pull-request-review".into(),
                model_provider: "p".into(),
                model: "m".into(),
                model_version: "1".into(),
                review_cadence_days: 90,
                next_review_at: now,
                max_session_minutes: 30,
                max_concurrent_sessions: 1,
                allowed_resources: vec!["repos".into(), "mail".into()],
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

    #[test]
    fn actions_outside_the_purpose_are_denied_by_the_purpose_policy() {
        let purposes = [Purpose {
            tag: "pull-request-review".into(),
            actions: vec![Action::Read, Action::Write],
            resource_kinds: vec!["repo".into(), "review-comment".into()],
        }];
        let grants = r#"@id("grant-all") permit (principal, action, resource);"#;
        let text = compile(&purposes);
        let engine =
            PolicyEngine::load_all(None, &[("grants.cedar", grants)], &[("<purposes>", &text)])
                .unwrap();
        let ctx = RequestContext {
            hour: 12,
            weekday: "wed",
            ..RequestContext::at("GET", "/", palisade_core::Timestamp::from_unix_seconds(0))
        };
        let agent = reviewer();
        let repo = Target {
            route: "repos",
            resource: None,
            tool: false,
            route_kind: "repo",
            kind: "repo",
            system: "",
            route_classification: Default::default(),
            classification: Default::default(),
        };
        let mail = Target {
            route: "mail",
            resource: None,
            tool: false,
            route_kind: "email",
            kind: "email",
            system: "",
            route_classification: Default::default(),
            classification: Default::default(),
        };
        assert!(engine.decide(&agent, Action::Read, &repo, &ctx).allowed);
        let d = engine.decide(&agent, Action::Write, &mail, &ctx);
        assert!(!d.allowed);
        assert_eq!(d.policies, ["palisade.purpose.pull-request-review"]);
        let d = engine.decide(&agent, Action::Destructive, &repo, &ctx);
        assert_eq!(d.policies, ["palisade.purpose.pull-request-review"]);
    }

    #[test]
    fn user_policies_cannot_take_reserved_ids_but_built_in_ones_can() {
        let text = compile(&[Purpose {
            tag: "x".into(),
            actions: vec![Action::Read],
            resource_kinds: vec!["k".into()],
        }]);
        assert!(PolicyEngine::load_all(None, &[], &[("<purposes>", &text)]).is_ok());
        let err = PolicyEngine::load_all(None, &[("user.cedar", &text)], &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("reserved prefix"), "{err}");
    }
}
