//! The token service: issues, verifies, introspects and revokes access tokens, and holds the
//! signing keys and the revocation list in memory for the request path.

use palisade_config::Config;
use palisade_core::session::{LiveSession, SessionRefusal, Sessions};
use palisade_core::store::{RevocationRecord, Store, StoreError};
use palisade_core::{Clock, Principal, PrincipalDetail, Status, Timestamp};
use palisade_gateway::{AuthFailure, Authenticator, Caller};
use palisade_token::{
    AccessTokenClaims, KeyError, KeySet, VerifiedToken, VerifyCache, VerifyPolicy,
};

/// Verified tokens remembered between requests (about 2 KiB each).
const VERIFY_CACHE_CAPACITY: usize = 16 * 1024;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Token service state.
pub struct TokenService {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    registry: Arc<palisade_core::registry::Registry>,
    keys: RwLock<Arc<KeySet>>,
    revoked: RwLock<HashMap<String, i64>>,
    verified: VerifyCache,
    clock: Arc<dyn Clock>,
    /// Agent sessions: every agent token names one.
    pub sessions: Arc<Sessions>,
}

/// Why a token request was refused: an RFC 6749 error code, the HTTP status, safe text, and
/// extra response members (the live sessions of a concurrency refusal, or the context-clearing
/// instruction of an ended session).
#[derive(Debug)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// RFC 6749 `error`.
    pub code: &'static str,
    /// `error_description`.
    pub description: String,
    /// More members for the JSON body.
    pub extra: Option<serde_json::Value>,
}

impl Refusal {
    fn new(status: u16, code: &'static str, description: String) -> Self {
        Self {
            status,
            code,
            description,
            extra: None,
        }
    }
}

/// The JSON members that tell an agent runtime its session is over and its context must go.
pub fn clear_context_json(r: &SessionRefusal) -> serde_json::Value {
    serde_json::json!({ "session": { "id": r.sid, "state": r.state, "clear_context": true } })
}

/// The human an agent acts for (RFC 8693 token exchange) and the chain so far.
pub struct Delegation {
    /// The human: the delegated token's `sub`.
    pub human: Arc<Principal>,
    /// Earlier actors (from a delegated subject token), to nest under the new one.
    pub prior: Option<palisade_token::Actor>,
    /// The delegated token never outlives the subject token (unix seconds).
    pub not_after: i64,
}

/// Longest actor chain a delegated token may carry.
pub const MAX_ACTOR_CHAIN: usize = 5;

/// What a token request asked for, after validation.
pub struct Grant {
    /// Audience.
    pub audience: String,
    /// Granted scopes.
    pub scope: Option<String>,
    /// For an agent's write-scoped token: the routes whose write scopes it asked for. The token
    /// request must then pass a `write_token` decision for each.
    pub write_routes: Vec<String>,
}

impl TokenService {
    /// Loads keys (creating the first one) and live revocations.
    pub fn load(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        registry: Arc<palisade_core::registry::Registry>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let now = clock.now();
        if store
            .signing_keys()
            .map_err(|e| e.to_string())?
            .iter()
            .all(|k| k.retired_at.is_some())
        {
            let key = palisade_token::generate_signing_key(now).map_err(|e| e.to_string())?;
            store.insert_signing_key(&key).map_err(|e| e.to_string())?;
        }
        let revoked = store
            // A token is accepted until exp + leeway, so its revocation must outlive that.
            .live_revocations(now.plus_seconds(-config.oauth.leeway_secs))
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| (r.jti, r.expires_at.unix_seconds()))
            .collect();
        let keys = Self::key_set(&store, config.oauth.leeway_secs).map_err(|e| e.to_string())?;
        let sessions = Sessions::load(
            store.clone(),
            clock.clone(),
            config.routes.len(),
            config.oauth.leeway_secs,
        )
        .map_err(|e| format!("cannot load sessions: {e}"))?;
        let service = Self {
            config,
            store,
            registry,
            keys: RwLock::new(Arc::new(keys)),
            revoked: RwLock::new(revoked),
            verified: VerifyCache::new(VERIFY_CACHE_CAPACITY),
            clock,
            sessions: Arc::new(sessions),
        };
        Ok(service)
    }

    /// Keys are retained for the longest lifetime any configuration allows (30 minutes), not
    /// just the current one, so shortening the TTL never orphans a live token.
    const MAX_TOKEN_LIFETIME_SECS: i64 = 30 * 60;

    fn key_set(store: &Arc<dyn Store>, leeway_secs: i64) -> Result<KeySet, KeyError> {
        let records = store
            .signing_keys()
            .map_err(|e| KeyError::Corrupt("*".into(), e.to_string()))?;
        KeySet::from_records(
            &records,
            Timestamp::now(),
            Self::MAX_TOKEN_LIFETIME_SECS,
            leeway_secs,
        )
    }

    /// Re-reads keys from the store.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        let set = Self::key_set(&self.store, self.config.oauth.leeway_secs)?;
        if let Ok(mut keys) = self.keys.write() {
            *keys = Arc::new(set);
        }
        self.verified.clear();
        Ok(())
    }

    /// The current key set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Starts signing with a new key; the old one keeps verifying until its tokens expired.
    pub fn rotate_keys(&self) -> Result<String, String> {
        let now = Timestamp::now();
        let new = palisade_token::generate_signing_key(now).map_err(|e| e.to_string())?;
        let old = self.keys().active_kid().map(str::to_string);
        self.store
            .insert_signing_key(&new)
            .map_err(|e| e.to_string())?;
        if let Some(old) = old {
            self.store
                .retire_signing_key(&old, now)
                .map_err(|e| e.to_string())?;
        }
        self.reload_keys().map_err(|e| e.to_string())?;
        Ok(new.kid)
    }

    /// Validates `scope` and `resource` for a client and returns what may be granted.
    pub fn grant_for(
        &self,
        principal: &Principal,
        scope: Option<&str>,
        resources: &[String],
    ) -> Result<Grant, (&'static str, String)> {
        let (allowed_scopes, allowed_routes) = match &principal.detail {
            PrincipalDetail::Agent(a) => (&a.scopes, &a.allowed_resources),
            PrincipalDetail::ServiceAccount(s) => (&s.scopes, &s.allowed_resources),
            _ => {
                return Err((
                    "invalid_client",
                    "only agents and service accounts get tokens".into(),
                ));
            }
        };
        let is_agent = principal.agent().is_some();
        // Routes and MCP servers each have their own write scope.
        let write_route = |s: &str| {
            self.config
                .routes
                .iter()
                .find(|r| r.write_scope == s)
                .map(|r| r.name.clone())
                .or_else(|| {
                    self.config
                        .mcp
                        .servers
                        .iter()
                        .find(|m| m.write_scope == s)
                        .map(|m| m.name.clone())
                })
        };
        let mut write_routes = Vec::new();
        let scope = match scope {
            // An agent's default token carries only its read scopes (privilege separation).
            None => {
                let defaults: Vec<&str> = allowed_scopes
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !is_agent || s.ends_with(":read"))
                    .collect();
                (!defaults.is_empty()).then(|| defaults.join(" "))
            }
            Some(requested) => {
                for s in requested.split(' ').filter(|s| !s.is_empty()) {
                    if !allowed_scopes.iter().any(|a| a == s) {
                        return Err((
                            "invalid_scope",
                            format!("scope `{s}` is not granted to {}", principal.id),
                        ));
                    }
                }
                let asked: Vec<&str> = requested.split(' ').filter(|s| !s.is_empty()).collect();
                if is_agent {
                    // Agents' scopes are read scopes (`*:read`) or a route's write scope;
                    // anything else could not be separated, so it is refused (fail closed).
                    if let Some(s) = asked
                        .iter()
                        .find(|s| !s.ends_with(":read") && write_route(s).is_none())
                    {
                        return Err((
                            "invalid_scope",
                            format!(
                                "scope `{s}` is neither a read scope (`<name>:read`) nor a route's write scope (routes.write_scope, default `<route>:write`)"
                            ),
                        ));
                    }
                    let (writes, reads): (Vec<&str>, Vec<&str>) =
                        asked.iter().partition(|s| write_route(s).is_some());
                    if !writes.is_empty() && !reads.is_empty() {
                        return Err((
                            "invalid_scope",
                            format!(
                                "read and write scopes never share a token: ask for {} in one token request and {} in another",
                                writes.join(" "),
                                reads.join(" ")
                            ),
                        ));
                    }
                    write_routes = writes.iter().filter_map(|s| write_route(s)).collect();
                }
                let joined = asked.join(" ");
                (!joined.is_empty()).then_some(joined)
            }
        };
        let audience = match resources {
            [] => self.config.oauth.default_audience.clone(),
            [one] => {
                let uri: http::Uri = one.parse().map_err(|_| {
                    (
                        "invalid_target",
                        format!("resource `{one}` is not an absolute URI"),
                    )
                })?;
                if uri.scheme().is_none() || uri.authority().is_none() || one.contains('#') {
                    return Err((
                        "invalid_target",
                        format!("resource `{one}` must be an absolute URI without a fragment"),
                    ));
                }
                let one = one.trim_end_matches('/');
                let routes: Vec<_> = self
                    .config
                    .routes
                    .iter()
                    .filter(|r| r.audience == one)
                    .collect();
                let known = one == self.config.oauth.default_audience
                    || one == self.config.mcp.audience
                    || one == self.config.vault.audience
                    || !routes.is_empty();
                if !known {
                    return Err((
                        "invalid_target",
                        format!("resource `{one}` is not served by this gateway"),
                    ));
                }
                if !routes.is_empty() && !routes.iter().any(|r| allowed_routes.contains(&r.name)) {
                    return Err((
                        "invalid_target",
                        format!("{} may not reach resource `{one}`", principal.id),
                    ));
                }
                one.to_string()
            }
            _ => return Err(("invalid_target", "ask for one resource per token".into())),
        };
        Ok(Grant {
            audience,
            scope,
            write_routes,
        })
    }

    /// The time by this service's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The checks every token request makes before a token is signed, first or renewal: the
    /// agent's access review is not overdue and the request falls in its allowed hours and
    /// weekdays (the temporal blast radius). Status is checked by client authentication, and
    /// scopes and resources by [`TokenService::grant_for`].
    pub fn admit(&self, principal: &Principal) -> Result<(), Refusal> {
        let Some(agent) = principal.agent() else {
            return Ok(());
        };
        let now = self.clock.now();
        if agent.next_review_at < now {
            return Err(Refusal::new(
                403,
                "access_denied",
                format!(
                    "{}'s access review was due at {}; its owner must review it (palisade agent update {} --next-review-at ...) before it gets tokens",
                    principal.id, agent.next_review_at, principal.id
                ),
            ));
        }
        let ctx = palisade_policy::RequestContext::at("POST", "/oauth2/token", now);
        if !palisade_policy::in_window(principal, &ctx) {
            let [start, end] = agent.blast_radius.hours;
            return Err(Refusal::new(
                403,
                "access_denied",
                format!(
                    "{} may only work {start:02}:00-{end:02}:00 UTC on {}; it is {} {:02}:xx UTC now",
                    principal.id,
                    agent.blast_radius.weekdays.join(","),
                    ctx.weekday,
                    ctx.hour
                ),
            ));
        }
        Ok(())
    }

    /// The session a token request belongs to: a new one when `session_id` is absent (refused
    /// at the agent's concurrency limit), else the named one if it is the caller's and still
    /// before its hard end. Principals other than agents have no sessions.
    pub fn session_for(
        &self,
        principal: &Principal,
        session_id: Option<&str>,
        initiating_human: Option<&str>,
    ) -> Result<Option<Arc<LiveSession>>, Refusal> {
        let Some(agent) = principal.agent() else {
            return match session_id {
                None => Ok(None),
                Some(_) => Err(Refusal::new(
                    400,
                    "invalid_request",
                    "only agents have sessions; drop session_id".into(),
                )),
            };
        };
        match session_id {
            Some(sid) => {
                let session = self
                    .sessions
                    .check(sid, &principal.id)
                    .map_err(|r| Refusal {
                        status: 400,
                        code: "invalid_grant",
                        description: r.message.clone(),
                        extra: Some(clear_context_json(&r)),
                    })?;
                // A session works for one initiator: the human it was delegated by, or none.
                if session.initiating_human.as_deref() != initiating_human {
                    return Err(Refusal::new(
                        400,
                        "invalid_grant",
                        format!(
                            "session {sid} was started {}; renew it the same way or start a new session",
                            match &session.initiating_human {
                                Some(h) => format!("for {h} (token exchange)"),
                                None => "without a human (client credentials)".into(),
                            }
                        ),
                    ));
                }
                Ok(Some(session))
            }
            None => self
                .sessions
                .start(
                    &principal.id,
                    agent.max_session_minutes,
                    agent.max_concurrent_sessions,
                    initiating_human.map(str::to_string),
                )
                .map(Some)
                .map_err(|e| match e {
                    palisade_core::session::StartError::Limit { live, limit, .. } => Refusal {
                        status: 403,
                        code: "access_denied",
                        description: format!(
                            "{} already has {limit} live session(s), its max_concurrent_sessions limit: {}; renew one of them (session_id), end one, or wait for one to expire",
                            principal.id,
                            live.iter().map(|s| s.sid.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                        extra: Some(serde_json::json!({
                            "limit": limit,
                            "live_sessions": live.iter().map(|s| serde_json::json!({
                                "id": s.sid, "started_at": s.started_at, "hard_end": s.hard_end,
                            })).collect::<Vec<_>>(),
                        })),
                    },
                    palisade_core::session::StartError::Store(e) => {
                        tracing::error!(error = %e, "cannot store a new session");
                        Refusal::new(
                            503,
                            "temporarily_unavailable",
                            "the session could not be stored; retry".into(),
                        )
                    }
                }),
        }
    }

    /// Signs an access token for `principal`, in `session` if it has one: the token never
    /// outlives the session's hard end.
    pub fn issue(
        &self,
        principal: &Principal,
        grant: &Grant,
        session: Option<&LiveSession>,
        delegation: Option<&Delegation>,
    ) -> Result<(String, AccessTokenClaims), String> {
        let now = self.clock.now().unix_seconds();
        let jti = palisade_core::secret::random_id::<16>().map_err(|e| e.to_string())?;
        let agent = principal.agent();
        let allowed_resources = match &principal.detail {
            PrincipalDetail::Agent(a) => a.allowed_resources.clone(),
            PrincipalDetail::ServiceAccount(s) => s.allowed_resources.clone(),
            _ => Vec::new(),
        };
        let (sub, act) = match delegation {
            None => (principal.id.to_string(), None),
            Some(d) => (
                d.human.id.to_string(),
                Some(palisade_token::Actor {
                    sub: principal.id.to_string(),
                    act: d.prior.clone().map(Box::new),
                }),
            ),
        };
        let mut claims = AccessTokenClaims {
            iss: self.config.server.issuer.clone(),
            sub,
            aud: grant.audience.clone(),
            exp: match session {
                Some(s) => {
                    (now + self.config.oauth.access_token_ttl_secs).min(s.hard_end.unix_seconds())
                }
                None => now + self.config.oauth.access_token_ttl_secs,
            },
            iat: now,
            nbf: None,
            jti,
            client_id: principal.id.to_string(),
            scope: grant.scope.clone(),
            agent_purpose: agent.map(|a| a.purpose_tag.clone()),
            model: agent.map(|a| format!("{}/{}@{}", a.model_provider, a.model, a.model_version)),
            owner: principal.owner().map(ToString::to_string),
            allowed_resources,
            max_files_per_session: agent.and_then(|a| a.max_files_per_session),
            data_egress_allowed: agent.map(|a| a.data_egress_allowed),
            session_ttl_minutes: agent.map(|a| a.max_session_minutes),
            sid: session.map(|s| s.sid.clone()),
            act,
        };
        if let Some(d) = delegation {
            claims.exp = claims.exp.min(d.not_after);
        }
        let token = palisade_token::sign(&claims, &self.keys()).map_err(|e| e.to_string())?;
        Ok((token, claims))
    }

    /// The audience of admin-minted human tokens: the token endpoint.
    pub fn human_token_audience(&self) -> String {
        format!("{}/oauth2/token", self.config.server.issuer)
    }

    /// An access token for a human, minted by an administrator (the stand-in for a human login
    /// until the web console's OIDC sign-in): the subject token of a token exchange.
    pub fn issue_human(&self, human: &Principal) -> Result<(String, AccessTokenClaims), String> {
        self.issue_human_for(human, &self.human_token_audience())
    }

    /// The audience of approver tokens: `<issuer>/approvals`. Only the approval decision
    /// endpoints accept it, so a human's token-exchange subject token (which agents hold) can
    /// never approve.
    pub fn approvals_audience(&self) -> String {
        format!("{}/approvals", self.config.server.issuer)
    }

    /// A human's access token for `audience` (the token endpoint or the approvals endpoints).
    pub fn issue_human_for(
        &self,
        human: &Principal,
        audience: &str,
    ) -> Result<(String, AccessTokenClaims), String> {
        let now = self.clock.now().unix_seconds();
        let jti = palisade_core::secret::random_id::<16>().map_err(|e| e.to_string())?;
        let claims = AccessTokenClaims {
            iss: self.config.server.issuer.clone(),
            sub: human.id.to_string(),
            // Only the token endpoint accepts it (as a token exchange's subject token): no
            // gateway route has this audience, so a human token never calls an API itself.
            aud: audience.to_string(),
            exp: now + self.config.oauth.access_token_ttl_secs,
            iat: now,
            nbf: None,
            jti,
            client_id: "palisade-admin".into(),
            scope: None,
            agent_purpose: None,
            model: None,
            owner: None,
            allowed_resources: Vec::new(),
            max_files_per_session: None,
            data_egress_allowed: None,
            session_ttl_minutes: None,
            sid: None,
            act: None,
        };
        let token = palisade_token::sign(&claims, &self.keys()).map_err(|e| e.to_string())?;
        Ok((token, claims))
    }

    /// Verifies signature, type, issuer, lifetime and (optionally) audience, then revocation.
    pub fn verify(&self, token: &str, audience: Option<&str>) -> Result<VerifiedToken, String> {
        let verified = self.verify_unrevoked(token, audience)?;
        if self.is_revoked(&verified) {
            return Err("the token has been revoked".into());
        }
        Ok(verified)
    }

    fn is_revoked(&self, token: &VerifiedToken) -> bool {
        self.revoked
            .read()
            .map(|r| r.contains_key(&token.claims().jti))
            .unwrap_or(true)
    }

    /// Everything [`TokenService::verify`] checks except revocation.
    fn verify_unrevoked(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<VerifiedToken, String> {
        let policy = VerifyPolicy {
            issuer: &self.config.server.issuer,
            audience,
            leeway_secs: self.config.oauth.leeway_secs,
            now: self.clock.now().unix_seconds(),
        };
        self.verified
            .verify(token, &self.keys(), &policy)
            .map_err(|e| e.to_string())
    }

    /// Why the session of `token` can no longer be used, if it can't.
    fn session_refusal(&self, token: &VerifiedToken) -> Option<SessionRefusal> {
        let c = token.claims();
        c.sid
            .as_deref()
            .and_then(|sid| self.sessions.get(sid))
            .filter(|s| s.principal.to_string() == acting_id(c))
            .and_then(|s| s.usable_at(self.clock.now()).err())
    }

    /// Revokes a verified token until it would have expired.
    pub fn revoke(&self, token: &VerifiedToken) -> Result<(), StoreError> {
        let c = token.claims();
        self.store.insert_revocation(&RevocationRecord {
            jti: c.jti.clone(),
            expires_at: Timestamp::from_unix_seconds(c.exp),
        })?;
        if let Ok(mut r) = self.revoked.write() {
            let now = self.clock.now().unix_seconds();
            // A token is accepted until exp + leeway, so its revocation must outlive that.
            let leeway = self.config.oauth.leeway_secs;
            r.retain(|_, exp| *exp + leeway > now);
            r.insert(c.jti.clone(), c.exp);
        }
        Ok(())
    }

    /// The live caller behind a verified token: the acting principal (the agent, for a delegated
    /// token), its live session, and for delegated tokens the human it acts for, who must still
    /// be active and still allow this agent (`may_act`). An agent token without a live session is
    /// refused (fail closed).
    pub fn live_caller(&self, token: &VerifiedToken) -> Result<LiveCaller, AuthFailure> {
        let claims = token.claims();
        let principal = match self.live_principal(acting_id(claims)) {
            Ok(p) => p,
            Err(mut f) => {
                // A suspended agent's killed session still tells the runtime to clear context.
                f.session = self.session_refusal(token);
                return Err(f);
            }
        };
        let mut caller = LiveCaller {
            principal,
            session: None,
            initiating_human: None,
            actor_chain: Vec::new(),
        };
        if let Some(act) = &claims.act {
            let human = self.live_principal(&claims.sub)?;
            // Every actor of the chain, not only the current one, must still be live and still
            // allowed by the human: killing or un-allowing an earlier agent stops the chain.
            for id in act.chain() {
                let actor = if id == caller.principal.id.to_string() {
                    caller.principal.clone()
                } else {
                    self.live_principal(id)?
                };
                if !human.allows_actor(&actor) {
                    return Err(AuthFailure {
                        subject: Some(caller.principal.id.to_string()),
                        reason: format!(
                            "{} no longer allows {} to act for them",
                            human.id, actor.id
                        ),
                        session: None,
                    });
                }
            }
            caller.actor_chain = act.chain().into_iter().map(str::to_string).collect();
            caller.initiating_human = Some(human);
        }
        if caller.principal.agent().is_none() {
            return Ok(caller);
        }
        let Some(sid) = claims.sid.as_deref() else {
            return Err(AuthFailure {
                subject: Some(caller.principal.id.to_string()),
                reason: "the token names no session; request a new token".into(),
                session: None,
            });
        };
        match self.sessions.check(sid, &caller.principal.id) {
            Ok(s) => {
                caller.session = Some(s);
                Ok(caller)
            }
            Err(r) => Err(AuthFailure {
                subject: Some(caller.principal.id.to_string()),
                reason: r.message.clone(),
                session: Some(r),
            }),
        }
    }

    /// A live (registered, active) principal by id text, or why it is not live.
    pub fn live_principal(&self, sub: &str) -> Result<Arc<Principal>, AuthFailure> {
        let id = sub.parse().map_err(|_| AuthFailure {
            subject: None,
            reason: "the token's subject is not a principal id".into(),
            session: None,
        })?;
        let principal = self.registry.get(&id).ok_or_else(|| AuthFailure {
            subject: Some(sub.to_string()),
            reason: format!("{sub} is no longer registered"),
            session: None,
        })?;
        if principal.status != Status::Active {
            return Err(AuthFailure {
                subject: Some(sub.to_string()),
                reason: format!("{sub} is {}", principal.status.as_str()),
                session: None,
            });
        }
        Ok(principal)
    }
}

/// Who is calling, once a token checked out.
pub struct LiveCaller {
    /// The acting principal (for a delegated token, the current actor).
    pub principal: Arc<Principal>,
    /// Its session (agents).
    pub session: Option<Arc<LiveSession>>,
    /// For delegated tokens, the human the chain acts for.
    pub initiating_human: Option<Arc<Principal>>,
    /// For delegated tokens, the actors from the current one back to the first.
    pub actor_chain: Vec<String>,
}

/// The principal a token acts as: the current actor of a delegated token, else the subject.
pub fn acting_id(claims: &AccessTokenClaims) -> &str {
    claims
        .act
        .as_ref()
        .map_or(claims.sub.as_str(), |a| a.sub.as_str())
}

impl Authenticator for TokenService {
    fn authenticate(&self, token: &str, audience: &str) -> Result<Caller, AuthFailure> {
        let verified = self
            .verify_unrevoked(token, Some(audience))
            .map_err(|reason| AuthFailure {
                subject: None,
                reason,
                session: None,
            })?;
        if self.is_revoked(&verified) {
            return Err(AuthFailure {
                subject: Some(acting_id(verified.claims()).to_string()),
                reason: "the token has been revoked".into(),
                session: self.session_refusal(&verified),
            });
        }
        let live = self.live_caller(&verified)?;
        Ok(Caller {
            principal: live.principal,
            token_id: verified.claims().jti.clone(),
            session: live.session,
            max_files_per_session: verified.claims().max_files_per_session,
            initiating_human: live.initiating_human.map(|h| h.id.to_string()),
            actor_chain: live.actor_chain,
            scope: verified.claims().scope.clone(),
        })
    }
}
