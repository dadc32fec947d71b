//! The policy decision point: Cedar policies over one schema for humans, service accounts and
//! agents.
//!
//! Pure: no I/O during decisions, no clock, no async. Loading reads a directory once and returns
//! an immutable [`PolicyEngine`]; the server swaps engines on reload.
//!
//! INVARIANT (fail-closed): a decision is `allow` only if Cedar allows and no policy raised an
//! evaluation error; an erroring `forbid` could otherwise be skipped silently.

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, SchemaFragment, ValidationMode, Validator,
};
use palisade_core::approval::{ApprovalRule, Approver};
use palisade_core::{Principal, PrincipalDetail};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The Cedar schema, in Cedar's human-readable format.
pub const SCHEMA: &str = include_str!("schema.cedarschema");
/// The built-in baseline policies.
pub const BASELINE: &str = include_str!("baseline.cedar");
/// The id reported when no policy permitted a request.
pub const DEFAULT_DENY: &str = "palisade.default-deny";
/// The id reported when evaluation errors forced a deny.
pub const ERROR_DENY: &str = "palisade.evaluation-error";

/// Why the policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// File I/O.
    #[error("{path}: {message}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Syntax or schema errors, each with file and line.
    #[error("invalid policy:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// An action class as Cedar sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `Palisade::Action::"read"`.
    Read,
    /// `Palisade::Action::"write"`.
    Write,
    /// `Palisade::Action::"destructive"`.
    Destructive,
    /// `Palisade::Action::"egress"`: data leaving the organisation.
    Egress,
    /// `Palisade::Action::"credential"`: asking for a credential.
    Credential,
    /// `Palisade::Action::"write_token"`: asking for a token with a route's write scope
    /// (privilege separation: write capabilities come in their own token).
    WriteToken,
}

impl Action {
    /// The action id.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Destructive => "destructive",
            Self::Egress => "egress",
            Self::Credential => "credential",
            Self::WriteToken => "write_token",
        }
    }
}

/// What the request targets.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    /// The route name.
    pub route: &'a str,
    /// A named resource inside the route, from a route rule (or an MCP tool of a server).
    pub resource: Option<&'a str>,
    /// Whether `resource` is an MCP tool (`Palisade::Tool::"<server>/<tool>"`, the server being
    /// the route) rather than a route rule's `Palisade::Resource`.
    pub tool: bool,
    /// What the route holds (`repo`, `email`, ...), for purpose binding.
    pub route_kind: &'a str,
    /// What the target holds: the resource's kind if a resource is named, else the route's.
    pub kind: &'a str,
    /// The system (compute boundary) the route belongs to; empty for none.
    pub system: &'a str,
    /// The route's data classification.
    pub route_classification: palisade_core::principal::Classification,
    /// The target's classification: the resource's if one is named, else the route's.
    pub classification: palisade_core::principal::Classification,
}

/// The request attributes policies see as `context`.
#[derive(Clone, Debug)]
pub struct RequestContext<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Request path.
    pub path: &'a str,
    /// Hour of the day, 0-23, UTC.
    pub hour: u8,
    /// Day of the week, `mon` .. `sun`, UTC.
    pub weekday: &'static str,
    /// The time, unix seconds.
    pub now: i64,
    /// Calls so far in the session.
    pub calls: u64,
    /// Objects read so far in the session.
    pub objects_read: u64,
    /// Bytes sent out so far in the session.
    pub bytes_out: u64,
    /// Where data is going, for egress.
    pub destination: Option<&'a str>,
    /// The human who started the task, when delegated.
    pub initiating_human: Option<&'a str>,
    /// `none`, `pending` or `approved`.
    pub approval: &'static str,
    /// Labels of what the session has ingested.
    pub taint: &'a [String],
    /// Whether the session has read Confidential or Restricted data.
    pub sensitive: bool,
    /// Categories of what content inspection found in the request's own content
    /// (`injection`, `hidden`, `secret`, `pii`, `exfil_indicator`).
    pub findings: &'a [String],
    /// The tier those findings imply (0 public to 3 restricted; 0 when nothing was found).
    pub data_tier: i64,
    /// An MCP tool call's declared arguments, typed.
    pub arguments: Option<&'a [(String, ArgValue)]>,
}

/// A typed tool-call argument, as declared in the config.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    /// `string`.
    String(String),
    /// `long`.
    Long(i64),
    /// `bool`.
    Bool(bool),
    /// `set<string>`.
    StringSet(Vec<String>),
    /// `set<long>`.
    LongSet(Vec<i64>),
}

impl ArgValue {
    fn expression(&self) -> RestrictedExpression {
        match self {
            Self::String(s) => RestrictedExpression::new_string(s.clone()),
            Self::Long(n) => RestrictedExpression::new_long(*n),
            Self::Bool(b) => RestrictedExpression::new_bool(*b),
            Self::StringSet(v) => string_set(v),
            Self::LongSet(v) => {
                RestrictedExpression::new_set(v.iter().map(|n| RestrictedExpression::new_long(*n)))
            }
        }
    }
}

/// The declaration of `Palisade::McpArguments` for argument names and their Cedar types
/// (`String`, `Long`, `Bool`, `Set<String>`, `Set<Long>`): a schema source for
/// [`PolicyEngine::load_all`], named [`ARGUMENTS_SCHEMA_NAME`].
pub fn arguments_schema(arguments: &[(String, String)]) -> String {
    let fields: Vec<String> = arguments
        .iter()
        .map(|(name, ty)| format!("{name:?}?: {ty}"))
        .collect();
    format!(
        "namespace Palisade {{ type McpArguments = {{ {} }}; }}",
        fields.join(", ")
    )
}

/// The source name under which the generated `McpArguments` declaration is passed.
pub const ARGUMENTS_SCHEMA_NAME: &str = "<mcp arguments>.cedarschema";

impl<'a> RequestContext<'a> {
    /// A context for `method` and `path` at time `at`.
    pub fn at(method: &'a str, path: &'a str, at: palisade_core::Timestamp) -> Self {
        let secs = at.unix_seconds();
        let days = secs.div_euclid(86_400);
        let hour = u8::try_from(secs.rem_euclid(86_400) / 3_600).unwrap_or(0);
        // 1970-01-01 was a Thursday.
        const WEEKDAYS: [&str; 7] = ["thu", "fri", "sat", "sun", "mon", "tue", "wed"];
        let weekday = WEEKDAYS
            .get(usize::try_from(days.rem_euclid(7)).unwrap_or(0))
            .copied()
            .unwrap_or("thu");
        Self {
            method,
            path,
            hour,
            weekday,
            now: secs,
            calls: 0,
            objects_read: 0,
            bytes_out: 0,
            destination: None,
            initiating_human: None,
            approval: "none",
            taint: &[],
            sensitive: false,
            findings: &[],
            data_tier: 0,
            arguments: None,
        }
    }
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// For an allow: the approvals the determining permits require (`@approval`), one per
    /// permit that asks (`palisade_core::approval::requirement` combines them).
    pub approvals: Vec<ApprovalRule>,
    /// The policies that determined it (`palisade.default-deny` when none matched).
    pub policies: Vec<String>,
    /// Evaluation errors, if any (they force a deny).
    pub errors: Vec<String>,
}

/// A validated, immutable policy set with its schema.
pub struct PolicyEngine {
    schema: Schema,
    policies: PolicySet,
    version: String,
    count: usize,
    authorizer: Authorizer,
    /// The policies each (principal, action) can match.
    index: index::PolicyIndex,
    /// Cedar entities of routes by name, with the attributes they were built from.
    #[allow(clippy::type_complexity)]
    route_entities: std::sync::RwLock<
        HashMap<
            String,
            (
                String,
                String,
                palisade_core::principal::Classification,
                Entity,
            ),
        >,
    >,
    /// Cedar entities of principals as last seen, reused while the record is unchanged.
    principal_entities: std::sync::RwLock<HashMap<palisade_core::PrincipalId, (Principal, Entity)>>,
    /// Off only to compare against the full set (tests and benchmarks).
    slicing: bool,
    /// Application entities from `.entities.json` files, by uid, with every ancestor as a parent.
    entities: HashMap<EntityUid, StoredEntity>,
    /// Action entities from the schema, with their groups.
    actions: HashMap<EntityUid, StoredEntity>,
    /// Approval requirements of permits (`@approval` annotations), by policy id.
    approvals: HashMap<String, ApprovalRule>,
}

/// The approval requirement a permit states with annotations: `@approval("owner, team:sre")`
/// (required, and who may approve), optionally `@approval_count("2")`,
/// `@approval_grant("10m")` (how long the approval stays usable),
/// `@approval_four_eyes("false")` and `@approval_uses("3")` (how often the approved call may run
/// within the grant; default once).
fn approval_annotations(id: &str, policy: &Policy) -> Result<Option<ApprovalRule>, String> {
    let get = |k: &str| policy.annotation(k).map(str::trim);
    let extra = [
        "approval_count",
        "approval_grant",
        "approval_four_eyes",
        "approval_uses",
    ];
    let Some(approvers) = get("approval") else {
        if let Some(k) = extra.iter().find(|k| get(k).is_some()) {
            return Err(format!(
                "`@{k}` needs `@approval(\"...\")` naming who approves (e.g. `@approval(\"owner\")`)"
            ));
        }
        return Ok(None);
    };
    if policy.effect() != cedar_policy::Effect::Permit {
        return Err(
            "`@approval` belongs on a permit: a forbid cannot be approved away".to_string(),
        );
    }
    let approvers = Approver::parse_list(approvers).map_err(|e| format!("`@approval`: {e}"))?;
    let count = match get("approval_count") {
        None => None,
        Some(c) => Some(
            c.parse::<u32>()
                .ok()
                .filter(|n| (1..=10).contains(n))
                .ok_or_else(|| {
                    format!("`@approval_count(\"{c}\")` must be a number from 1 to 10")
                })?,
        ),
    };
    let grant_secs = match get("approval_grant") {
        None => None,
        Some(g) => Some(
            palisade_core::approval::parse_duration(g)
                .ok()
                .filter(|s| *s <= palisade_core::approval::MAX_GRANT_SECS)
                .ok_or_else(|| {
                    format!("`@approval_grant(\"{g}\")` is not a duration such as `10m` or `2h`, at most `1d`")
                })?,
        ),
    };
    let four_eyes = match get("approval_four_eyes") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => {
            return Err(format!(
                "`@approval_four_eyes(\"{v}\")` must be \"true\" or \"false\""
            ));
        }
    };
    let uses = match get("approval_uses") {
        None => None,
        Some(u) => Some(u.parse::<u32>().ok().filter(|n| (1..=100).contains(n)).ok_or_else(
            || format!("`@approval_uses(\"{u}\")` must be a number from 1 to 100 (how often the approved call may run)"),
        )?),
    };
    Ok(Some(ApprovalRule {
        approvers,
        count,
        grant_secs,
        four_eyes,
        uses,
        source: id.to_string(),
    }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    /// `.cedar`: policies.
    Policies,
    /// `.cedarschema`: an application schema fragment, merged with Palisade's.
    Schema,
    /// `.entities.json`: application entities in Cedar's JSON format.
    Entities,
}

struct Source {
    name: String,
    text: String,
    kind: SourceKind,
    /// Built into Palisade (baseline, compiled purposes): may use the `palisade.` id prefix.
    builtin: bool,
}

impl Source {
    fn policies(name: &str, text: &str) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
            kind: SourceKind::Policies,
            builtin: false,
        }
    }
}

/// What a policy-directory file is, by its name; `None` for files the engine ignores.
pub fn source_kind_of(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".entities.json") {
        Some("entities")
    } else if name.ends_with(".cedarschema") {
        Some("schema")
    } else if name.ends_with(".cedar") {
        Some("policies")
    } else {
        None
    }
}

impl PolicyEngine {
    /// The baseline, every `.cedar` file in `dir` (sorted by name), then `extra` (name, text)
    /// sources, validated together against the schema.
    pub fn load(dir: Option<&Path>, extra: &[(&str, &str)]) -> Result<Self, PolicyLoadError> {
        Self::load_all(dir, extra, &[])
    }

    /// Like [`PolicyEngine::load`], plus `builtin` sources that Palisade generates (compiled
    /// purposes), which may use the reserved `palisade.` id prefix.
    pub fn load_all(
        dir: Option<&Path>,
        extra: &[(&str, &str)],
        builtin: &[(&str, &str)],
    ) -> Result<Self, PolicyLoadError> {
        let mut sources = vec![Source {
            builtin: true,
            ..Source::policies("<built-in baseline>", BASELINE)
        }];
        sources.extend(builtin.iter().map(|(n, t)| Source {
            builtin: true,
            kind: if n.ends_with(".cedarschema") {
                SourceKind::Schema
            } else {
                SourceKind::Policies
            },
            ..Source::policies(n, t)
        }));
        if !builtin.iter().any(|(n, _)| *n == ARGUMENTS_SCHEMA_NAME) {
            sources.push(Source {
                builtin: true,
                kind: SourceKind::Schema,
                ..Source::policies(ARGUMENTS_SCHEMA_NAME, &arguments_schema(&[]))
            });
        }
        if let Some(dir) = dir {
            let mut files: Vec<(PathBuf, SourceKind)> = std::fs::read_dir(dir)
                .map_err(|e| PolicyLoadError::Io {
                    path: dir.to_path_buf(),
                    message: format!("cannot read the policy directory: {e}"),
                })?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter_map(|p| {
                    let kind = match source_kind_of(&p)? {
                        "entities" => SourceKind::Entities,
                        "schema" => SourceKind::Schema,
                        _ => SourceKind::Policies,
                    };
                    Some((p, kind))
                })
                .collect();
            files.sort_by(|a, b| a.0.cmp(&b.0));
            for (file, kind) in files {
                let text = std::fs::read_to_string(&file).map_err(|e| PolicyLoadError::Io {
                    path: file.clone(),
                    message: e.to_string(),
                })?;
                sources.push(Source {
                    name: file.display().to_string(),
                    text,
                    kind,
                    builtin: false,
                });
            }
        }
        sources.extend(extra.iter().map(|(n, t)| Source::policies(n, t)));
        Self::from_sources(sources)
    }

    /// Builds an engine from in-memory texts (name, text), after the baseline.
    pub fn from_texts(texts: &[(&str, &str)]) -> Result<Self, PolicyLoadError> {
        Self::load(None, texts)
    }

    fn from_sources(sources: Vec<Source>) -> Result<Self, PolicyLoadError> {
        let mut problems = Vec::new();
        let mut fragments = Vec::new();
        let schema_sources = std::iter::once(("<built-in schema>", SCHEMA)).chain(
            sources
                .iter()
                .filter(|s| s.kind == SourceKind::Schema)
                .map(|s| (s.name.as_str(), s.text.as_str())),
        );
        for (name, text) in schema_sources {
            match SchemaFragment::from_cedarschema_str(text) {
                Ok((fragment, _warnings)) => fragments.push(fragment),
                Err(e) => problems.push(located(name, text, &e)),
            }
        }
        if !problems.is_empty() {
            return Err(PolicyLoadError::Invalid(problems));
        }
        let schema = Schema::from_schema_fragments(fragments)
            .map_err(|e| PolicyLoadError::Invalid(vec![format!("schema: {e}")]))?;
        let mut set = PolicySet::new();
        let mut origin: HashMap<String, usize> = HashMap::new();
        let mut approvals: HashMap<String, ApprovalRule> = HashMap::new();
        let mut hasher = Sha256::new();
        for (index, source) in sources.iter().enumerate() {
            hasher.update(source.name.as_bytes());
            hasher.update([0]);
            hasher.update(source.text.as_bytes());
            hasher.update([0]);
            if source.kind != SourceKind::Policies {
                continue;
            }
            let parsed = match PolicySet::from_str(&source.text) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(located(&source.name, &source.text, &e));
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                problems.push(format!(
                    "{}: policy templates are not supported yet; write static policies",
                    source.name
                ));
                continue;
            }
            for (n, policy) in parsed.policies().enumerate() {
                let id = match policy.annotation("id") {
                    Some(id) if !id.trim().is_empty() => id.trim().to_string(),
                    _ => format!("{}#{n}", file_stem(&source.name)),
                };
                if let Some(first) = origin.get(&id) {
                    let first_name = sources.get(*first).map(|s| s.name.as_str()).unwrap_or("?");
                    problems.push(format!(
                        "{}: policy id `{id}` is already used in {first_name}; ids must be unique",
                        source.name
                    ));
                    continue;
                }
                if id.starts_with("palisade.") && !source.builtin {
                    problems.push(format!(
                        "{}: policy id `{id}` uses the reserved prefix `palisade.`",
                        source.name
                    ));
                    continue;
                }
                match approval_annotations(&id, policy) {
                    Ok(Some(rule)) => {
                        approvals.insert(id.clone(), rule);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        problems.push(format!("{}: policy `{id}`: {e}", source.name));
                        continue;
                    }
                }
                let renamed: Policy = policy.new_id(PolicyId::new(&id));
                if let Err(e) = set.add(renamed) {
                    problems.push(format!("{}: {e}", source.name));
                    continue;
                }
                origin.insert(id, index);
            }
        }
        if problems.is_empty() {
            let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
            for error in result.validation_errors() {
                let id = error.policy_id().to_string();
                let source = origin.get(&id).and_then(|i| sources.get(*i));
                match source {
                    Some(s) => problems.push(format!(
                        "{} (policy `{id}`)",
                        located(&s.name, &s.text, error)
                    )),
                    None => problems.push(format!("policy `{id}`: {error}")),
                }
            }
        }
        let entities = load_entities(&sources, &schema, &mut problems);
        let actions = load_actions(&schema, &mut problems);
        if !problems.is_empty() {
            return Err(PolicyLoadError::Invalid(problems));
        }
        let digest = hasher.finalize();
        let version = palisade_core::secret::hex(digest.get(..8).unwrap_or(&[]));
        let count = set.policies().count();
        let index = index::PolicyIndex::new(&set);
        Ok(Self {
            schema,
            policies: set,
            version,
            count,
            authorizer: Authorizer::new(),
            entities,
            actions,
            index,
            approvals,
            principal_entities: std::sync::RwLock::new(HashMap::new()),
            route_entities: std::sync::RwLock::new(HashMap::new()),
            slicing: true,
        })
    }

    /// A short hash of every policy text: the policy-set version recorded with decisions.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The ids of every loaded policy, sorted, baseline included.
    pub fn policy_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// How many policies are loaded, baseline included.
    pub fn policy_count(&self) -> usize {
        self.count
    }

    /// Decides whether `principal` may do `action` on `target`.
    pub fn decide(
        &self,
        principal: &Principal,
        action: Action,
        target: &Target<'_>,
        ctx: &RequestContext<'_>,
    ) -> Decision {
        match self.try_decide(principal, action, target, ctx) {
            Ok(d) => d,
            Err(message) => Decision {
                allowed: false,
                approvals: Vec::new(),
                policies: vec![ERROR_DENY.into()],
                errors: vec![message],
            },
        }
    }

    fn try_decide(
        &self,
        principal: &Principal,
        action: Action,
        target: &Target<'_>,
        ctx: &RequestContext<'_>,
    ) -> Result<Decision, String> {
        let built = self.build_request(principal, action, target, ctx)?;
        Ok(self.authorize(
            &built.principal,
            &built.action,
            &built.resource,
            &built.request,
            &built.entities,
        ))
    }

    /// Explains a decision: the decision itself and, when it is a deny, every permit that could
    /// have applied to this principal, action and resource type and what it would decide alone
    /// (`would_allow: true` means a forbid overrode it; `false` means its scope or condition did
    /// not match this request).
    pub fn explain(
        &self,
        principal: &Principal,
        action: Action,
        target: &Target<'_>,
        ctx: &RequestContext<'_>,
    ) -> Result<Explanation, String> {
        let built = self.build_request(principal, action, target, ctx)?;
        let decision = self.authorize(
            &built.principal,
            &built.action,
            &built.resource,
            &built.request,
            &built.entities,
        );
        let mut permits = Vec::new();
        if !decision.allowed {
            let slice =
                self.index
                    .for_request(&built.principal, &built.action, built.resource.type_name());
            for policy in slice
                .policies()
                .filter(|p| p.effect() == cedar_policy::Effect::Permit)
            {
                let mut alone = PolicySet::new();
                alone.add(policy.clone()).map_err(|e| e.to_string())?;
                let response =
                    self.authorizer
                        .is_authorized(&built.request, &alone, &built.entities);
                permits.push(PermitExplanation {
                    id: policy.id().to_string(),
                    text: policy.to_string(),
                    would_allow: response.decision() == cedar_policy::Decision::Allow,
                    errors: response
                        .diagnostics()
                        .errors()
                        .map(ToString::to_string)
                        .collect(),
                });
            }
        }
        Ok(Explanation { decision, permits })
    }

    fn build_request(
        &self,
        principal: &Principal,
        action: Action,
        target: &Target<'_>,
        ctx: &RequestContext<'_>,
    ) -> Result<BuiltRequest, String> {
        let principal_entity = self.cached_principal_entity(principal)?;
        let route_uid = uid("Route", target.route)?;
        let route = self.cached_route_entity(&route_uid, target)?;
        let mut entities = vec![principal_entity.clone(), route];
        let resource_uid = match target.resource {
            Some(name) => {
                let id = format!("{}/{name}", target.route);
                let res_uid = uid(if target.tool { "Tool" } else { "Resource" }, &id)?;
                entities.push(
                    Entity::new(
                        res_uid.clone(),
                        HashMap::from([
                            (
                                "route".to_string(),
                                RestrictedExpression::new_string(target.route.to_string()),
                            ),
                            (
                                "name".to_string(),
                                RestrictedExpression::new_string(name.to_string()),
                            ),
                            (
                                "kind".to_string(),
                                RestrictedExpression::new_string(target.kind.to_string()),
                            ),
                            (
                                "system".to_string(),
                                RestrictedExpression::new_string(target.system.to_string()),
                            ),
                            (
                                "classification".to_string(),
                                RestrictedExpression::new_long(target.classification.rank()),
                            ),
                        ]),
                        HashSet::from([route_uid]),
                    )
                    .map_err(|e| e.to_string())?,
                );
                res_uid
            }
            None => route_uid,
        };
        // Team entities for a human's memberships, so `principal in Palisade::Team::"x"` works.
        for team in principal.teams() {
            let team_uid = uid("Team", team.slug())?;
            entities.push(
                Entity::new(
                    team_uid,
                    HashMap::from([(
                        "status".to_string(),
                        RestrictedExpression::new_string("active".into()),
                    )]),
                    HashSet::new(),
                )
                .map_err(|e| e.to_string())?,
            );
        }
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        let long = |n: u64| RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX));
        let mut pairs = vec![
            (
                "method".to_string(),
                RestrictedExpression::new_string(ctx.method.to_string()),
            ),
            (
                "path".to_string(),
                RestrictedExpression::new_string(ctx.path.to_string()),
            ),
            (
                "hour".to_string(),
                RestrictedExpression::new_long(i64::from(ctx.hour)),
            ),
            (
                "weekday".to_string(),
                RestrictedExpression::new_string(ctx.weekday.to_string()),
            ),
            ("calls".to_string(), long(ctx.calls)),
            ("objects_read".to_string(), long(ctx.objects_read)),
            ("bytes_out".to_string(), long(ctx.bytes_out)),
            (
                "approval".to_string(),
                RestrictedExpression::new_string(ctx.approval.to_string()),
            ),
            ("taint".to_string(), string_set(ctx.taint)),
            (
                "sensitive".to_string(),
                RestrictedExpression::new_bool(ctx.sensitive),
            ),
            ("findings".to_string(), string_set(ctx.findings)),
            (
                "data_tier".to_string(),
                RestrictedExpression::new_long(ctx.data_tier),
            ),
            ("now".to_string(), RestrictedExpression::new_long(ctx.now)),
            (
                "in_window".to_string(),
                RestrictedExpression::new_bool(in_window(principal, ctx)),
            ),
        ];
        if let Some(d) = ctx.destination {
            pairs.push((
                "destination".to_string(),
                RestrictedExpression::new_string(d.to_string()),
            ));
        }
        if let Some(args) = ctx.arguments {
            let record = RestrictedExpression::new_record(
                args.iter().map(|(k, v)| (k.clone(), v.expression())),
            )
            .map_err(|e| e.to_string())?;
            pairs.push(("arguments".to_string(), record));
        }
        if let Some(h) = ctx.initiating_human {
            pairs.push((
                "initiating_human".to_string(),
                RestrictedExpression::new_string(h.to_string()),
            ));
        }
        let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
        let action_uid = uid("Action", action.as_str())?;
        // No request validation against the schema here: every part is built above from typed
        // values, in the shapes the schema declares (the schema validated the policies at load).
        let request = Request::new(
            principal_entity.uid(),
            action_uid.clone(),
            resource_uid.clone(),
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        Ok(BuiltRequest {
            principal: principal_entity.uid(),
            action: action_uid,
            resource: resource_uid,
            request,
            entities,
        })
    }
}

struct BuiltRequest {
    principal: EntityUid,
    action: EntityUid,
    resource: EntityUid,
    request: Request,
    entities: Entities,
}

/// A decision with the permits that were considered, for `palisade policy explain`.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The decision, as the gateway would make it.
    pub decision: Decision,
    /// On a deny: each permit that could apply to this principal, action and resource type.
    pub permits: Vec<PermitExplanation>,
}

/// One permit, evaluated alone against the same request.
#[derive(Clone, Debug)]
pub struct PermitExplanation {
    /// Policy id.
    pub id: String,
    /// Cedar text.
    pub text: String,
    /// Whether it alone would allow (then a forbid overrode it).
    pub would_allow: bool,
    /// Evaluation errors it raised.
    pub errors: Vec<String>,
}

impl PolicyEngine {
    /// Runs Cedar and applies Palisade's rules: fail closed on evaluation errors, and name the
    /// default deny.
    fn authorize(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
        request: &Request,
        entities: &Entities,
    ) -> Decision {
        let sliced;
        let policies: &PolicySet = if self.slicing {
            sliced = self
                .index
                .for_request(principal, action, resource.type_name());
            &sliced
        } else {
            &self.policies
        };
        let response = self.authorizer.is_authorized(request, policies, entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policies.sort();
        let cedar_allowed = response.decision() == cedar_policy::Decision::Allow;
        let allowed = cedar_allowed && errors.is_empty();
        if !allowed && (policies.is_empty() || cedar_allowed) {
            policies = vec![if errors.is_empty() {
                DEFAULT_DENY.into()
            } else {
                ERROR_DENY.into()
            }];
        }
        let approvals = if allowed && !self.approvals.is_empty() {
            policies
                .iter()
                .filter_map(|p| self.approvals.get(p).cloned())
                .collect()
        } else {
            Vec::new()
        };
        Decision {
            allowed,
            approvals,
            policies,
            errors,
        }
    }
}

impl PolicyEngine {
    /// Turns principal slicing off (or on): every request then evaluates the full set. Only for
    /// checking slicing against the full set, in tests and benchmarks.
    pub fn with_slicing(mut self, on: bool) -> Self {
        self.slicing = on;
        self
    }

    /// The policies that can apply to `principal`, for any action, as `(id, Cedar text)` sorted by
    /// id: the generic ones whose scope admits its type, and its own. Together with the
    /// principal's attributes (its blast radius) they are its effective policy.
    pub fn effective_for(&self, principal: &Principal) -> Result<Vec<(String, String)>, String> {
        let entity = principal_entity(principal)?;
        let uid = entity.uid();
        let mut out: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        for action in [
            Action::Read,
            Action::Write,
            Action::Destructive,
            Action::Egress,
            Action::Credential,
            Action::WriteToken,
        ] {
            let action_uid = crate::uid("Action", action.as_str())?;
            let mut seen_types = Vec::new();
            for resource_type in ["Route", "Resource"] {
                seen_types.push(crate::uid(resource_type, "-")?.type_name().clone());
            }
            for policy in seen_types.iter().flat_map(|t| {
                self.index
                    .for_request(&uid, &action_uid, t)
                    .policies()
                    .cloned()
                    .collect::<Vec<_>>()
            }) {
                let admits_type = match policy.principal_constraint() {
                    cedar_policy::PrincipalConstraint::Is(t)
                    | cedar_policy::PrincipalConstraint::IsIn(t, _) => t == *uid.type_name(),
                    _ => true,
                };
                if admits_type {
                    out.insert(policy.id().to_string(), policy.to_string());
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The route's Cedar entity, rebuilt only when its configured attributes differ from the
    /// cached one's (routes change only with the configuration).
    fn cached_route_entity(
        &self,
        route_uid: &EntityUid,
        target: &Target<'_>,
    ) -> Result<Entity, String> {
        let attrs = (
            target.route_kind,
            target.system,
            target.route_classification,
        );
        if let Ok(cache) = self.route_entities.read()
            && let Some((kind, system, class, entity)) = cache.get(target.route)
            && (kind.as_str(), system.as_str(), *class) == attrs
        {
            return Ok(entity.clone());
        }
        let parents = if target.system.is_empty() {
            HashSet::new()
        } else {
            HashSet::from([uid("System", target.system)?])
        };
        let entity = Entity::new(
            route_uid.clone(),
            HashMap::from([
                (
                    "name".to_string(),
                    RestrictedExpression::new_string(target.route.to_string()),
                ),
                (
                    "kind".to_string(),
                    RestrictedExpression::new_string(target.route_kind.to_string()),
                ),
                (
                    "system".to_string(),
                    RestrictedExpression::new_string(target.system.to_string()),
                ),
                (
                    "classification".to_string(),
                    RestrictedExpression::new_long(target.route_classification.rank()),
                ),
            ]),
            parents,
        )
        .map_err(|e| e.to_string())?;
        if let Ok(mut cache) = self.route_entities.write() {
            if cache.len() >= 10_000 {
                cache.clear();
            }
            cache.insert(
                target.route.to_string(),
                (
                    target.route_kind.to_string(),
                    target.system.to_string(),
                    target.route_classification,
                    entity.clone(),
                ),
            );
        }
        Ok(entity)
    }

    /// The principal's Cedar entity, rebuilt only when its record differs from the cached one
    /// (a whole-record comparison, so no change can be missed).
    fn cached_principal_entity(&self, principal: &Principal) -> Result<Entity, String> {
        if let Ok(cache) = self.principal_entities.read()
            && let Some((seen, entity)) = cache.get(&principal.id)
            && seen == principal
        {
            return Ok(entity.clone());
        }
        let entity = principal_entity(principal)?;
        if let Ok(mut cache) = self.principal_entities.write() {
            if cache.len() >= 100_000 {
                cache.clear();
            }
            cache.insert(principal.id.clone(), (principal.clone(), entity.clone()));
        }
        Ok(entity)
    }
}

/// A stored application entity: as parsed (attributes, parents and tags intact) with every
/// ancestor, so a request can take it and its ancestors into its slice.
pub(crate) struct StoredEntity {
    pub(crate) entity: Entity,
    pub(crate) ancestors: Vec<EntityUid>,
}

fn stored_from(parsed: &Entities, skip_actions: bool) -> Vec<(EntityUid, StoredEntity)> {
    parsed
        .iter()
        .filter(|e| !(skip_actions && e.uid().type_name().basename() == "Action"))
        .map(|e| {
            let uid = e.uid();
            let ancestors = parsed
                .ancestors(&uid)
                .map(|it| it.cloned().collect())
                .unwrap_or_default();
            (
                uid,
                StoredEntity {
                    entity: e.clone(),
                    ancestors,
                },
            )
        })
        .collect()
}

/// Parses every `.entities.json` source against the schema into one map, refusing duplicates.
/// The action entities a schema-aware parse adds to each file are left out here; they come from
/// the schema once (see `actions`).
fn load_entities(
    sources: &[Source],
    schema: &Schema,
    problems: &mut Vec<String>,
) -> HashMap<EntityUid, StoredEntity> {
    let mut out: HashMap<EntityUid, StoredEntity> = HashMap::new();
    for source in sources.iter().filter(|s| s.kind == SourceKind::Entities) {
        let value: serde_json::Value = match serde_json::from_str(&source.text) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!(
                    "{}:{}:{}: not JSON: {e}",
                    source.name,
                    e.line(),
                    e.column()
                ));
                continue;
            }
        };
        let parsed = match Entities::from_json_value(value, Some(schema)) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("{}: {e}", source.name));
                continue;
            }
        };
        for (uid, stored) in stored_from(&parsed, true) {
            if out.contains_key(&uid) {
                problems.push(format!("{}: entity {uid} is defined twice", source.name));
                continue;
            }
            out.insert(uid, stored);
        }
    }
    out
}

/// The schema's action entities (with their action groups as ancestors).
fn load_actions(schema: &Schema, problems: &mut Vec<String>) -> HashMap<EntityUid, StoredEntity> {
    match schema.action_entities() {
        Ok(actions) => stored_from(&actions, false).into_iter().collect(),
        Err(e) => {
            problems.push(format!("schema actions: {e}"));
            HashMap::new()
        }
    }
}

/// Whether the request's hour and weekday fall in the principal's allowed window (the temporal
/// blast radius; always true for principals without one).
pub fn in_window(principal: &Principal, ctx: &RequestContext<'_>) -> bool {
    match principal.agent() {
        None => true,
        Some(a) => {
            let [start, end] = a.blast_radius.hours;
            ctx.hour >= start
                && ctx.hour < end
                && a.blast_radius.weekdays.iter().any(|d| d == ctx.weekday)
        }
    }
}

/// A `Palisade::` entity uid; the type names are parsed once, not per request.
fn uid(type_name: &str, id: &str) -> Result<EntityUid, String> {
    static TYPES: std::sync::OnceLock<HashMap<&'static str, EntityTypeName>> =
        std::sync::OnceLock::new();
    let types = TYPES.get_or_init(|| {
        [
            "Agent",
            "Human",
            "ServiceAccount",
            "Team",
            "Role",
            "System",
            "Route",
            "Resource",
            "Tool",
            "Action",
        ]
        .into_iter()
        .filter_map(|n| Some((n, EntityTypeName::from_str(&format!("Palisade::{n}")).ok()?)))
        .collect()
    });
    let t = types
        .get(type_name)
        .cloned()
        .ok_or_else(|| format!("unknown Palisade entity type `{type_name}`"))?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

/// The Cedar entity of a principal; its id is the full principal id (`agent:x`).
pub fn principal_entity(p: &Principal) -> Result<Entity, String> {
    let s = |v: &str| RestrictedExpression::new_string(v.to_string());
    let mut attrs = HashMap::from([("status".to_string(), s(p.status.as_str()))]);
    let mut parents = HashSet::new();
    let type_name = match &p.detail {
        PrincipalDetail::Human(h) => {
            for t in &h.teams {
                parents.insert(uid("Team", t.slug())?);
            }
            "Human"
        }
        PrincipalDetail::Team(_) => "Team",
        PrincipalDetail::ServiceAccount(sa) => {
            attrs.insert("owner".into(), s(&sa.owner.to_string()));
            attrs.insert(
                "allowed_resources".into(),
                string_set(&sa.allowed_resources),
            );
            "ServiceAccount"
        }
        PrincipalDetail::Agent(a) => {
            attrs.insert("owner".into(), s(&a.owner.to_string()));
            attrs.insert("purpose_tag".into(), s(&a.purpose_tag));
            attrs.insert("model_provider".into(), s(&a.model_provider));
            attrs.insert("model".into(), s(&a.model));
            attrs.insert("model_version".into(), s(&a.model_version));
            attrs.insert("allowed_resources".into(), string_set(&a.allowed_resources));
            attrs.insert(
                "data_egress_allowed".into(),
                RestrictedExpression::new_bool(a.data_egress_allowed),
            );
            let b = &a.blast_radius;
            attrs.insert("systems".into(), string_set(&b.systems));
            attrs.insert(
                "max_classification".into(),
                RestrictedExpression::new_long(b.max_classification.rank()),
            );
            attrs.insert(
                "egress_destinations".into(),
                string_set(&b.egress_destinations),
            );
            attrs.insert(
                "max_action".into(),
                RestrictedExpression::new_long(b.max_action.rank()),
            );
            attrs.insert(
                "hours_start".into(),
                RestrictedExpression::new_long(i64::from(b.hours[0])),
            );
            attrs.insert(
                "hours_end".into(),
                RestrictedExpression::new_long(i64::from(b.hours[1])),
            );
            attrs.insert("weekdays".into(), string_set(&b.weekdays));
            attrs.insert(
                "next_review_at".into(),
                RestrictedExpression::new_long(a.next_review_at.unix_seconds()),
            );
            "Agent"
        }
    };
    let id = match &p.detail {
        PrincipalDetail::Team(_) => p.id.slug().to_string(),
        _ => p.id.to_string(),
    };
    Entity::new(uid(type_name, &id)?, attrs, parents).map_err(|e| e.to_string())
}

fn file_stem(name: &str) -> String {
    Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string())
}

/// `file:line:column: message` from a Cedar diagnostic's first label.
fn located(
    name: &str,
    text: &str,
    diag: &(dyn miette::Diagnostic + Send + Sync + 'static),
) -> String {
    let offset = diag
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset());
    let mut message = diag.to_string();
    if let Some(help) = diag.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    match offset {
        Some(offset) => {
            let before = text.get(..offset).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("{name}:{line}:{column}: {message}")
        }
        None => format!("{name}: {message}"),
    }
}

pub mod app;
pub mod cases;
mod index;
pub mod purpose;

#[cfg(test)]
mod tests;
