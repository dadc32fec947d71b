//! A cache of verified tokens: an agent presents the same token for up to 30 minutes, so the
//! signature is checked once and later uses cost a map lookup plus the time-dependent checks.

use crate::{TokenError, VerifiedToken, VerifyPolicy, verify};
use std::collections::HashMap;
use std::sync::RwLock;

/// Verified tokens by their exact text.
///
/// INVARIANT (cache-hit-rechecks): a hit is re-checked against the policy's issuer, audience and
/// expiry, which are the only verdicts that depend on the request or the clock; the signature,
/// header and claim-shape checks are properties of the exact string, which is the key.
pub struct VerifyCache {
    entries: RwLock<HashMap<String, VerifiedToken>>,
    capacity: usize,
}

impl VerifyCache {
    /// A cache holding at most `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// Like [`verify`], using and filling the cache.
    pub fn verify(
        &self,
        token: &str,
        keys: &crate::KeySet,
        policy: &VerifyPolicy<'_>,
    ) -> Result<VerifiedToken, TokenError> {
        let hit = self.entries.read().ok().and_then(|e| e.get(token).cloned());
        if let Some(verified) = hit {
            recheck(&verified, policy)?;
            return Ok(verified);
        }
        let verified = verify(token, keys, policy)?;
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= self.capacity {
                entries.retain(|_, v| v.claims().exp + policy.leeway_secs > policy.now);
                if entries.len() >= self.capacity {
                    entries.clear();
                }
            }
            entries.insert(token.to_string(), verified.clone());
        }
        Ok(verified)
    }

    /// Forgets every token (after the key set changed).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
    }
}

fn recheck(verified: &VerifiedToken, policy: &VerifyPolicy<'_>) -> Result<(), TokenError> {
    let c = verified.claims();
    if c.iss != policy.issuer {
        return Err(TokenError::Issuer);
    }
    if policy.audience.is_some_and(|aud| aud != c.aud) {
        return Err(TokenError::Audience);
    }
    if c.exp + policy.leeway_secs <= policy.now {
        return Err(TokenError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AccessTokenClaims, KeySet, generate_signing_key, sign};
    use palisade_core::Timestamp;

    fn setup() -> (KeySet, String, i64) {
        let keys = KeySet::from_records(
            &[generate_signing_key(Timestamp::now()).unwrap()],
            Timestamp::now(),
            1800,
            60,
        )
        .unwrap();
        let now = 1_800_000_000;
        let claims = AccessTokenClaims {
            iss: "http://i".into(),
            sub: "agent:a".into(),
            aud: "http://a".into(),
            exp: now + 900,
            iat: now,
            nbf: None,
            jti: "j".into(),
            client_id: "agent:a".into(),
            scope: None,
            agent_purpose: None,
            model: None,
            owner: None,
            allowed_resources: vec![],
            max_files_per_session: None,
            data_egress_allowed: None,
            sid: None,
            act: None,
            session_ttl_minutes: None,
        };
        let token = sign(&claims, &keys).unwrap();
        (keys, token, now)
    }

    #[test]
    fn a_cached_token_is_still_checked_for_audience_and_expiry() {
        let (keys, token, now) = setup();
        let cache = VerifyCache::new(8);
        let ok = VerifyPolicy {
            issuer: "http://i",
            audience: Some("http://a"),
            leeway_secs: 60,
            now,
        };
        assert!(cache.verify(&token, &keys, &ok).is_ok());
        let other_aud = VerifyPolicy {
            audience: Some("http://b"),
            ..ok.clone()
        };
        assert_eq!(
            cache.verify(&token, &keys, &other_aud).unwrap_err(),
            TokenError::Audience
        );
        let later = VerifyPolicy {
            now: now + 900 + 61,
            ..ok.clone()
        };
        assert_eq!(
            cache.verify(&token, &keys, &later).unwrap_err(),
            TokenError::Expired
        );
        let other_iss = VerifyPolicy {
            issuer: "http://x",
            ..ok
        };
        assert_eq!(
            cache.verify(&token, &keys, &other_iss).unwrap_err(),
            TokenError::Issuer
        );
    }

    #[test]
    fn a_full_cache_evicts_instead_of_growing() {
        let (keys, token, now) = setup();
        let cache = VerifyCache::new(1);
        let p = VerifyPolicy {
            issuer: "http://i",
            audience: None,
            leeway_secs: 60,
            now,
        };
        cache.verify(&token, &keys, &p).unwrap();
        let (keys2, token2, _) = setup();
        cache.verify(&token2, &keys2, &p).unwrap();
        assert_eq!(cache.entries.read().unwrap().len(), 1);
    }
}
