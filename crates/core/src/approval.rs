//! Approval requirements: who must confirm an action before the gateway forwards it, how many
//! of them, and for how long their confirmation stays usable. Policies state them (Cedar
//! annotations on a permit) and the configuration states the default for destructive actions;
//! the approval service (`palisade-approval`) holds the requests.

use crate::id::{PrincipalId, PrincipalKind};
use crate::principal::{Principal, PrincipalDetail, Status};
use serde::{Deserialize, Serialize};

/// Who may approve.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum Approver {
    /// The agent's owner: the human, or any member of the owning team.
    Owner,
    /// Any member of this team (teams are Palisade's roles).
    Team(PrincipalId),
    /// This human.
    Human(PrincipalId),
}

impl Approver {
    /// Parses `owner`, `team:NAME` or `human:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t == "owner" {
            return Ok(Self::Owner);
        }
        let id = PrincipalId::parse_with_default(t, None).map_err(|e| {
            format!("approver `{t}`: {e}; approvers are `owner`, `team:NAME` or `human:NAME`")
        })?;
        match id.kind() {
            PrincipalKind::Team => Ok(Self::Team(id)),
            PrincipalKind::Human => Ok(Self::Human(id)),
            k => Err(format!(
                "approver `{t}` is a {}; approvers are `owner`, `team:NAME` or `human:NAME` (an agent or service account never approves)",
                k.noun()
            )),
        }
    }

    /// A comma-separated list; at least one.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let mut out: Vec<Self> = Vec::new();
        for part in text.split(',') {
            let a = Self::parse(part)?;
            if !out.contains(&a) {
                out.push(a);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Approver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Owner => f.write_str("owner"),
            Self::Team(id) | Self::Human(id) => write!(f, "{id}"),
        }
    }
}

/// An approval requirement as a policy or the configuration states it; unset fields take the
/// configured defaults ([`ApprovalRule::resolve`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRule {
    /// Who may approve (any of them counts).
    pub approvers: Vec<Approver>,
    /// How many distinct approvers must approve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// How long an approval stays usable, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_secs: Option<u64>,
    /// Whether the human the agent acts for is barred from approving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub four_eyes: Option<bool>,
    /// How many times the approved call may run within the grant (default 1: single use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// Where it comes from: a policy id, or `config:approvals.destructive`.
    pub source: String,
}

/// A requirement with every field decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedRule {
    /// Who may approve.
    pub approvers: Vec<Approver>,
    /// How many distinct approvers must approve (at least 1).
    pub count: u32,
    /// How long an approval stays usable, in seconds.
    pub grant_secs: u64,
    /// Whether the initiating human is barred from approving.
    pub four_eyes: bool,
    /// How many times the approved call may run within the grant (at least 1).
    #[serde(default = "one")]
    pub uses: u32,
    /// The policies (or configuration) that asked for it.
    pub sources: Vec<String>,
}

fn one() -> u32 {
    1
}

impl ApprovalRule {
    /// Fills unset fields from the defaults.
    pub fn resolve(&self, defaults: &ResolvedRule) -> ResolvedRule {
        ResolvedRule {
            approvers: if self.approvers.is_empty() {
                defaults.approvers.clone()
            } else {
                self.approvers.clone()
            },
            count: self.count.unwrap_or(defaults.count).max(1),
            grant_secs: self.grant_secs.unwrap_or(defaults.grant_secs),
            four_eyes: self.four_eyes.unwrap_or(defaults.four_eyes),
            uses: self.uses.unwrap_or(defaults.uses).max(1),
            sources: vec![self.source.clone()],
        }
    }
}

/// The longest grant a policy or the configuration may give: a day.
pub const MAX_GRANT_SECS: u64 = 86_400;

/// The requirement for one action: each determining permit's (unset fields from the defaults)
/// and, when `destructive_default` applies, the configured default, combined so that none is
/// weakened: the largest count, the shortest grant, the fewest uses, four eyes if any asks. Approvers are the
/// permits' (any of them may approve), or the default's when no permit names any.
pub fn requirement(
    policies: &[ApprovalRule],
    destructive_default: bool,
    defaults: &ResolvedRule,
) -> Option<ResolvedRule> {
    const DEFAULT_SOURCE: &str = "config:approvals.destructive";
    let mut rules: Vec<ResolvedRule> = policies.iter().map(|p| p.resolve(defaults)).collect();
    if destructive_default {
        rules.push(ResolvedRule {
            sources: vec![DEFAULT_SOURCE.into()],
            ..defaults.clone()
        });
    }
    let (first, rest) = rules.split_first()?;
    let mut out = first.clone();
    for r in rest {
        if r.sources.iter().any(|s| s == DEFAULT_SOURCE) && !policies.is_empty() {
            // The default's approvers give way to the permits' own.
        } else {
            for a in &r.approvers {
                if !out.approvers.contains(a) {
                    out.approvers.push(a.clone());
                }
            }
        }
        out.count = out.count.max(r.count);
        out.grant_secs = out.grant_secs.min(r.grant_secs);
        out.four_eyes |= r.four_eyes;
        out.uses = out.uses.min(r.uses);
        out.sources.extend(r.sources.iter().cloned());
    }
    Some(out)
}

impl ResolvedRule {
    /// Whether two rules ask the same (who, how many, how long, four eyes), whatever their
    /// sources.
    pub fn same_as(&self, other: &ResolvedRule) -> bool {
        let mut a: Vec<String> = self.approvers.iter().map(ToString::to_string).collect();
        let mut b: Vec<String> = other.approvers.iter().map(ToString::to_string).collect();
        a.sort();
        b.sort();
        a == b
            && self.count == other.count
            && self.grant_secs == other.grant_secs
            && self.four_eyes == other.four_eyes
            && self.uses == other.uses
    }
}

/// Why a principal may not approve (the text names the rule and is safe to return).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotEligible(pub String);

impl ResolvedRule {
    /// Whether `approver` may decide an action of an agent owned by `owner`, started for
    /// `initiating_human`: an active human the rule names (directly, through a team, or as the
    /// owner), and not the initiating human under four eyes. Agents and service accounts never.
    pub fn check_approver(
        &self,
        approver: &Principal,
        owner: Option<&PrincipalId>,
        initiating_human: Option<&str>,
    ) -> Result<(), NotEligible> {
        let PrincipalDetail::Human(h) = &approver.detail else {
            return Err(NotEligible(format!(
                "{} is a {}; only humans approve",
                approver.id,
                approver.kind().noun()
            )));
        };
        if approver.status != Status::Active {
            return Err(NotEligible(format!("{} is not active", approver.id)));
        }
        if self.four_eyes && initiating_human == Some(approver.id.to_string().as_str()) {
            return Err(NotEligible(format!(
                "{} started this request (the agent acts for them) and may not approve it: four eyes; another approver must decide",
                approver.id
            )));
        }
        let named = self.approvers.iter().any(|a| match a {
            Approver::Owner => owner.is_some_and(|o| *o == approver.id || h.teams.contains(o)),
            Approver::Team(t) => h.teams.contains(t),
            Approver::Human(id) => *id == approver.id,
        });
        if !named {
            let list: Vec<String> = self.approvers.iter().map(ToString::to_string).collect();
            return Err(NotEligible(format!(
                "{} is not an approver of this request; it may be approved by: {}",
                approver.id,
                list.join(", ")
            )));
        }
        Ok(())
    }
}

/// `30s`, `15m`, `2h`, `1d` as seconds (at least one second).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a duration such as `30s`, `15m`, `2h` or `1d`");
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let unit = match &t[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).filter(|s| *s > 0).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::HumanDetail;

    fn human(slug: &str, teams: &[&str]) -> Principal {
        Principal {
            id: PrincipalId::new(PrincipalKind::Human, slug).unwrap(),
            display_name: slug.into(),
            status: Status::Active,
            status_change: None,
            created_at: crate::Timestamp::from_unix_seconds(0),
            updated_at: crate::Timestamp::from_unix_seconds(0),
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

    fn rule(approvers: &str, four_eyes: bool) -> ResolvedRule {
        ResolvedRule {
            approvers: Approver::parse_list(approvers).unwrap(),
            count: 1,
            grant_secs: 60,
            four_eyes,
            uses: 1,
            sources: vec!["t".into()],
        }
    }

    #[test]
    fn approvers_parse_and_refuse_machines() {
        assert_eq!(
            Approver::parse_list("owner, team:sre, human:bob, owner").unwrap(),
            vec![
                Approver::Owner,
                Approver::Team(PrincipalId::parse_with_default("team:sre", None).unwrap()),
                Approver::Human(PrincipalId::parse_with_default("human:bob", None).unwrap()),
            ]
        );
        let e = Approver::parse("agent:bot").unwrap_err();
        assert!(e.contains("never approves"), "{e}");
        assert!(
            Approver::parse("teem:x")
                .unwrap_err()
                .contains("unknown kind")
        );
    }

    #[test]
    fn owner_team_membership_and_four_eyes() {
        let team = PrincipalId::new(PrincipalKind::Team, "sre").unwrap();
        let alice = human("alice", &["sre"]);
        let bob = human("bob", &[]);
        let r = rule("owner", true);
        assert!(r.check_approver(&alice, Some(&team), None).is_ok());
        assert!(r.check_approver(&bob, Some(&team), None).is_err());
        let e = r
            .check_approver(&alice, Some(&team), Some("human:alice"))
            .unwrap_err();
        assert!(e.0.contains("four eyes"), "{}", e.0);
        assert!(
            rule("owner", false)
                .check_approver(&alice, Some(&team), Some("human:alice"))
                .is_ok()
        );
        assert!(
            rule("human:bob", true)
                .check_approver(&bob, None, None)
                .is_ok()
        );
        let mut gone = human("bob", &[]);
        gone.status = Status::Suspended;
        assert!(
            rule("human:bob", true)
                .check_approver(&gone, None, None)
                .is_err()
        );
    }

    #[test]
    fn combining_never_weakens_a_rule() {
        let a = ApprovalRule {
            approvers: vec![Approver::Owner],
            count: None,
            grant_secs: Some(600),
            four_eyes: None,
            uses: Some(3),
            source: "a".into(),
        };
        let b = ApprovalRule {
            approvers: vec![Approver::Human(
                PrincipalId::parse_with_default("human:x", None).unwrap(),
            )],
            count: Some(2),
            grant_secs: Some(60),
            four_eyes: Some(false),
            uses: None,
            source: "b".into(),
        };
        let defaults = rule("team:ops", true);
        // b's explicit `four_eyes = false` does not lift a's default `true`.
        let r = requirement(&[a.clone(), b.clone()], false, &defaults).unwrap();
        assert_eq!(r.approvers.len(), 2);
        assert_eq!((r.count, r.grant_secs, r.four_eyes), (2, 60, true));
        assert_eq!(r.uses, 1, "b's default single use wins over a's three");
        assert_eq!(r.sources, vec!["a".to_string(), "b".to_string()]);
        // The destructive default is a floor, but its approvers give way to the permit's.
        let lax = ApprovalRule {
            four_eyes: Some(false),
            grant_secs: Some(3600),
            ..b
        };
        let r = requirement(&[lax], true, &defaults).unwrap();
        assert_eq!(r.approvers.len(), 1);
        assert_eq!((r.count, r.grant_secs, r.four_eyes), (2, 60, true));
        // Without a permit's rule, the default alone.
        let r = requirement(&[], true, &defaults).unwrap();
        assert_eq!(r.approvers, defaults.approvers);
        assert!(requirement(&[], false, &defaults).is_none());
        assert!(r.same_as(&defaults) && !r.same_as(&rule("owner", true)));
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 min").is_err());
    }
}
