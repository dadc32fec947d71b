//! JWS compact serialization for access tokens, with a strict verifier.

use crate::{KeySet, MAX_TOKEN_BYTES};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// The claims of a Palisade access token (RFC 9068 plus agent claims).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    /// Issuer.
    pub iss: String,
    /// Subject: the principal id.
    pub sub: String,
    /// Audience: one resource URI.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Unique token id.
    pub jti: String,
    /// The OAuth client that asked.
    pub client_id: String,
    /// Granted scopes, space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The agent's purpose tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_purpose: Option<String>,
    /// `provider/model@version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Owner id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Route names the principal may reach.
    #[serde(default)]
    pub allowed_resources: Vec<String>,
    /// Volume limit per session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files_per_session: Option<u32>,
    /// Whether data may leave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_egress_allowed: Option<bool>,
    /// Session time limit, minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ttl_minutes: Option<u32>,
    /// The agent session this token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// RFC 8693 §4.1: the party acting for `sub` (a delegated token), with earlier actors nested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
}

/// An RFC 8693 `act` claim: the acting party, and in `act` the one that acted before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's principal id.
    pub sub: String,
    /// The previous actor in the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain from the current actor back to the first one.
    pub fn chain(&self) -> Vec<&str> {
        let mut out = vec![self.sub.as_str()];
        let mut next = self.act.as_deref();
        while let Some(a) = next {
            out.push(a.sub.as_str());
            next = a.act.as_deref();
        }
        out
    }
}

/// Why a token was refused. Messages never contain the token or its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Over [`MAX_TOKEN_BYTES`].
    #[error("the token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Not three base64url parts of JSON.
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` other than `EdDSA` (including `none` in any case, and HMAC).
    #[error("the token's algorithm is not accepted; only EdDSA is")]
    Algorithm,
    /// `typ` other than `at+jwt`.
    #[error("the token's type is not at+jwt")]
    Type,
    /// A header member we never accept, such as `jku`: keys are never fetched from a token.
    #[error("the token's header carries `{0}`, which is not accepted")]
    ForbiddenHeader(String),
    /// `kid` missing or not one of ours.
    #[error("the token's key id is unknown")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// A JSON member appears twice.
    #[error("the token repeats the member `{0}`")]
    Duplicate(String),
    /// Past `exp` (plus leeway).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` or `iat` (minus leeway).
    #[error("the token is not yet valid")]
    NotYetValid,
    /// `iss` is not ours.
    #[error("the token was issued by another issuer")]
    Issuer,
    /// `aud` does not name this resource.
    #[error("the token is for another audience")]
    Audience,
}

/// What a verifier requires besides a good signature.
#[derive(Clone, Debug)]
pub struct VerifyPolicy<'a> {
    /// Expected `iss`.
    pub issuer: &'a str,
    /// Expected `aud`; `None` accepts any (introspection and revocation).
    pub audience: Option<&'a str>,
    /// Clock skew tolerance, seconds (at most 60 by Palisade's rule).
    pub leeway_secs: i64,
    /// The current time, seconds since the epoch.
    pub now: i64,
}

/// A token whose signature, type, issuer, audience and lifetime were all checked.
///
/// INVARIANT (verified-only): the only constructor is [`verify`], so holding one is proof.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    claims: AccessTokenClaims,
    kid: String,
}

impl VerifiedToken {
    /// The checked claims.
    pub fn claims(&self) -> &AccessTokenClaims {
        &self.claims
    }

    /// The key that signed it.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// Signs claims with the active key.
pub fn sign(claims: &AccessTokenClaims, keys: &KeySet) -> Result<String, crate::KeyError> {
    let (kid, signer) = keys.signer()?;
    let header = serde_json::json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": kid });
    let mut out = String::with_capacity(512);
    out.push_str(&URL_SAFE_NO_PAD.encode(header.to_string()));
    out.push('.');
    let payload = serde_json::to_vec(claims)
        .map_err(|e| crate::KeyError::Corrupt(kid.into(), e.to_string()))?;
    out.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let signature = signer.sign(out.as_bytes());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    Ok(out)
}

/// Verifies a compact JWS access token against the key set and the policy.
pub fn verify(
    token: &str,
    keys: &KeySet,
    policy: &VerifyPolicy<'_>,
) -> Result<VerifiedToken, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let header = unique_object(&decode(h64, "header")?)?;
    let alg = header.get("alg").and_then(Value::as_str);
    if alg != Some("EdDSA") {
        return Err(TokenError::Algorithm);
    }
    for (name, _) in header.iter() {
        match name.as_str() {
            "alg" | "typ" | "kid" => {}
            other => return Err(TokenError::ForbiddenHeader(sanitize(other))),
        }
    }
    let typ = header
        .get("typ")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !(typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt")) {
        return Err(TokenError::Type);
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(TokenError::UnknownKey)?;
    let key = keys.verifier(kid).ok_or(TokenError::UnknownKey)?;
    let sig_bytes = decode(s64, "signature")?;
    let signature = Signature::from_slice(&sig_bytes).map_err(|_| TokenError::Signature)?;
    let signing_input_len = h64.len() + 1 + p64.len();
    let signing_input = token
        .get(..signing_input_len)
        .ok_or(TokenError::Malformed("bad part boundaries"))?;
    key.verify_strict(signing_input.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;

    let payload = unique_object(&decode(p64, "payload")?)?;
    let claims: AccessTokenClaims = serde_json::from_value(Value::Object(payload))
        .map_err(|_| TokenError::Malformed("claims are missing or mistyped"))?;
    if claims.iss != policy.issuer {
        return Err(TokenError::Issuer);
    }
    if policy.audience.is_some_and(|aud| aud != claims.aud) {
        return Err(TokenError::Audience);
    }
    if claims.exp + policy.leeway_secs <= policy.now {
        return Err(TokenError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > policy.now + policy.leeway_secs)
        || claims.iat > policy.now + policy.leeway_secs
    {
        return Err(TokenError::NotYetValid);
    }
    Ok(VerifiedToken {
        claims,
        kid: kid.to_string(),
    })
}

/// Decodes without padding, refusing any other alphabet.
fn decode(part: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        TokenError::Malformed(match what {
            "header" => "the header is not base64url",
            "payload" => "the payload is not base64url",
            _ => "the signature is not base64url",
        })
    })
}

/// Attacker-supplied names are echoed only when short and printable.
fn sanitize(name: &str) -> String {
    if name.len() <= 32 && name.bytes().all(|b| b.is_ascii_graphic()) {
        name.to_string()
    } else {
        "<unprintable>".into()
    }
}

/// Parses a JSON object, refusing duplicate top-level members.
fn unique_object(bytes: &[u8]) -> Result<Map<String, Value>, TokenError> {
    struct Unique(Map<String, Value>);
    struct UniqueVisitor;
    impl<'de> Visitor<'de> for UniqueVisitor {
        type Value = Unique;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(de::Error::custom(format_args!("\u{0}dup:{key}")));
                }
                let value: Value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(Unique(out))
        }
    }
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(UniqueVisitor)
        }
    }
    serde_json::from_slice::<Unique>(bytes)
        .map(|u| u.0)
        .map_err(|e| {
            let msg = e.to_string();
            match msg.split_once("\u{0}dup:") {
                Some((_, rest)) => {
                    let name = rest.split(" at line").next().unwrap_or(rest);
                    TokenError::Duplicate(sanitize(name))
                }
                None => TokenError::Malformed("a part is not a JSON object"),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate_signing_key;
    use palisade_core::Timestamp;

    fn keys() -> KeySet {
        let rec = generate_signing_key(Timestamp::now()).unwrap();
        KeySet::from_records(&[rec], Timestamp::now(), 1800, 60).unwrap()
    }

    fn claims(now: i64) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: "http://issuer".into(),
            sub: "agent:a".into(),
            aud: "http://aud".into(),
            exp: now + 900,
            iat: now,
            nbf: None,
            jti: "j1".into(),
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
        }
    }

    fn policy(now: i64) -> VerifyPolicy<'static> {
        VerifyPolicy {
            issuer: "http://issuer",
            audience: Some("http://aud"),
            leeway_secs: 60,
            now,
        }
    }

    #[test]
    fn a_signed_token_verifies() {
        let k = keys();
        let now = 1_800_000_000;
        let t = sign(&claims(now), &k).unwrap();
        let v = verify(&t, &k, &policy(now)).unwrap();
        assert_eq!(v.claims().sub, "agent:a");
        assert_eq!(Some(v.kid()), k.active_kid());
    }

    #[test]
    fn duplicate_members_are_found_by_name() {
        assert_eq!(
            unique_object(br#"{"a":1,"a":2}"#).unwrap_err(),
            TokenError::Duplicate("a".into())
        );
        assert!(unique_object(br#"{"a":{"b":1}}"#).is_ok());
        assert!(matches!(
            unique_object(b"[1]"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn a_token_from_another_key_set_is_refused() {
        let now = 1_800_000_000;
        let t = sign(&claims(now), &keys()).unwrap();
        assert_eq!(
            verify(&t, &keys(), &policy(now)).unwrap_err(),
            TokenError::UnknownKey
        );
    }
}
