//! The token service: issues, verifies, introspects and revokes access tokens, and holds the
//! signing keys and the revocation list in memory for the request path.

use palisade_config::Config;
use palisade_core::store::{RevocationRecord, Store, StoreError};
use palisade_core::{Principal, PrincipalDetail, Status, Timestamp};
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
}

/// What a token request asked for, after validation.
pub struct Grant {
    /// Audience.
    pub audience: String,
    /// Granted scopes.
    pub scope: Option<String>,
}

impl TokenService {
    /// Loads keys (creating the first one) and live revocations.
    pub fn load(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        registry: Arc<palisade_core::registry::Registry>,
    ) -> Result<Self, String> {
        let now = Timestamp::now();
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
        let service = Self {
            config,
            store,
            registry,
            keys: RwLock::new(Arc::new(keys)),
            revoked: RwLock::new(revoked),
            verified: VerifyCache::new(VERIFY_CACHE_CAPACITY),
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
        let scope = match scope {
            None => (!allowed_scopes.is_empty()).then(|| allowed_scopes.join(" ")),
            Some(requested) => {
                for s in requested.split(' ').filter(|s| !s.is_empty()) {
                    if !allowed_scopes.iter().any(|a| a == s) {
                        return Err((
                            "invalid_scope",
                            format!("scope `{s}` is not granted to {}", principal.id),
                        ));
                    }
                }
                let joined = requested
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
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
                let known = one == self.config.oauth.default_audience || !routes.is_empty();
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
        Ok(Grant { audience, scope })
    }

    /// Signs an access token for `principal`.
    pub fn issue(
        &self,
        principal: &Principal,
        grant: &Grant,
    ) -> Result<(String, AccessTokenClaims), String> {
        let now = Timestamp::now().unix_seconds();
        let jti = palisade_core::secret::random_id::<16>().map_err(|e| e.to_string())?;
        let agent = principal.agent();
        let allowed_resources = match &principal.detail {
            PrincipalDetail::Agent(a) => a.allowed_resources.clone(),
            PrincipalDetail::ServiceAccount(s) => s.allowed_resources.clone(),
            _ => Vec::new(),
        };
        let claims = AccessTokenClaims {
            iss: self.config.server.issuer.clone(),
            sub: principal.id.to_string(),
            aud: grant.audience.clone(),
            exp: now + self.config.oauth.access_token_ttl_secs,
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
        };
        let token = palisade_token::sign(&claims, &self.keys()).map_err(|e| e.to_string())?;
        Ok((token, claims))
    }

    /// Verifies signature, type, issuer, lifetime and (optionally) audience, then revocation.
    pub fn verify(&self, token: &str, audience: Option<&str>) -> Result<VerifiedToken, String> {
        let policy = VerifyPolicy {
            issuer: &self.config.server.issuer,
            audience,
            leeway_secs: self.config.oauth.leeway_secs,
            now: Timestamp::now().unix_seconds(),
        };
        let verified = self
            .verified
            .verify(token, &self.keys(), &policy)
            .map_err(|e| e.to_string())?;
        let revoked = self
            .revoked
            .read()
            .map(|r| r.contains_key(&verified.claims().jti))
            .unwrap_or(true);
        if revoked {
            return Err("the token has been revoked".into());
        }
        Ok(verified)
    }

    /// Revokes a verified token until it would have expired.
    pub fn revoke(&self, token: &VerifiedToken) -> Result<(), StoreError> {
        let c = token.claims();
        self.store.insert_revocation(&RevocationRecord {
            jti: c.jti.clone(),
            expires_at: Timestamp::from_unix_seconds(c.exp),
        })?;
        if let Ok(mut r) = self.revoked.write() {
            let now = Timestamp::now().unix_seconds();
            // A token is accepted until exp + leeway, so its revocation must outlive that.
            let leeway = self.config.oauth.leeway_secs;
            r.retain(|_, exp| *exp + leeway > now);
            r.insert(c.jti.clone(), c.exp);
        }
        Ok(())
    }

    /// The live principal behind a verified token, or why it is not live.
    pub fn live_principal(&self, token: &VerifiedToken) -> Result<Arc<Principal>, AuthFailure> {
        let sub = &token.claims().sub;
        let id = sub.parse().map_err(|_| AuthFailure {
            subject: None,
            reason: "the token's subject is not a principal id".into(),
        })?;
        let principal = self.registry.get(&id).ok_or_else(|| AuthFailure {
            subject: Some(sub.clone()),
            reason: format!("{sub} is no longer registered"),
        })?;
        if principal.status != Status::Active {
            return Err(AuthFailure {
                subject: Some(sub.clone()),
                reason: format!("{sub} is {}", principal.status.as_str()),
            });
        }
        Ok(principal)
    }
}

impl Authenticator for TokenService {
    fn authenticate(&self, token: &str, audience: &str) -> Result<Caller, AuthFailure> {
        let verified = self
            .verify(token, Some(audience))
            .map_err(|reason| AuthFailure {
                subject: None,
                reason,
            })?;
        let principal = self.live_principal(&verified)?;
        Ok(Caller {
            principal,
            token_id: verified.claims().jti.clone(),
        })
    }
}
