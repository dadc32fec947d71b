//! Signing keys: generation, the active key, and the verification set published as JWKS.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{SigningKey, VerifyingKey};
use palisade_core::Timestamp;
use palisade_core::store::SigningKeyRecord;
use serde_json::{Value, json};
use std::collections::HashMap;

/// A problem with the stored keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A stored key does not decode.
    #[error("signing key `{0}` is corrupt: {1}")]
    Corrupt(String, String),
    /// No key may sign.
    #[error("there is no active signing key; `palisade keys rotate` creates one")]
    NoActiveKey,
    /// The OS random generator failed.
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// Creates a new Ed25519 signing key record.
pub fn generate_signing_key(now: Timestamp) -> Result<SigningKeyRecord, KeyError> {
    let seed =
        palisade_core::secret::random_bytes::<32>().map_err(|e| KeyError::Random(e.to_string()))?;
    let kid =
        palisade_core::secret::random_id::<12>().map_err(|e| KeyError::Random(e.to_string()))?;
    let signing = SigningKey::from_bytes(&seed);
    Ok(SigningKeyRecord {
        kid,
        alg: "EdDSA".into(),
        private_key: seed.to_vec(),
        public_key: signing.verifying_key().to_bytes().to_vec(),
        created_at: now,
        retired_at: None,
    })
}

/// The keys in force: one that signs, and every key whose tokens may still be alive.
pub struct KeySet {
    active: Option<(String, SigningKey)>,
    verifying: HashMap<String, VerifyingKey>,
    jwks: Value,
}

impl KeySet {
    /// Builds the set from stored records. A retired key stays for verification until
    /// `retired_at + max_token_lifetime + leeway` has passed, so no live token loses its key.
    pub fn from_records(
        records: &[SigningKeyRecord],
        now: Timestamp,
        max_token_lifetime_secs: i64,
        leeway_secs: i64,
    ) -> Result<Self, KeyError> {
        let mut active = None;
        let mut verifying = HashMap::new();
        let mut jwks = Vec::new();
        for record in records {
            if record.alg != "EdDSA" {
                return Err(KeyError::Corrupt(
                    record.kid.clone(),
                    format!("unknown algorithm `{}`", record.alg),
                ));
            }
            let retained = record
                .retired_at
                .is_none_or(|at| at.plus_seconds(max_token_lifetime_secs + leeway_secs) > now);
            if !retained {
                continue;
            }
            let public: [u8; 32] = record.public_key.as_slice().try_into().map_err(|_| {
                KeyError::Corrupt(record.kid.clone(), "public key is not 32 bytes".into())
            })?;
            let key = VerifyingKey::from_bytes(&public)
                .map_err(|e| KeyError::Corrupt(record.kid.clone(), e.to_string()))?;
            if record.retired_at.is_none() {
                let seed: [u8; 32] = record.private_key.as_slice().try_into().map_err(|_| {
                    KeyError::Corrupt(record.kid.clone(), "private key is not 32 bytes".into())
                })?;
                let signing = SigningKey::from_bytes(&seed);
                if signing.verifying_key() != key {
                    return Err(KeyError::Corrupt(
                        record.kid.clone(),
                        "private and public key do not match".into(),
                    ));
                }
                // The newest unretired key signs.
                active = Some((record.kid.clone(), signing));
            }
            jwks.push(json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "alg": "EdDSA",
                "use": "sig",
                "kid": record.kid,
                "x": URL_SAFE_NO_PAD.encode(public),
            }));
            verifying.insert(record.kid.clone(), key);
        }
        Ok(Self {
            active,
            verifying,
            jwks: json!({ "keys": jwks }),
        })
    }

    /// The JWK Set document.
    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    /// The id of the key that signs new tokens.
    pub fn active_kid(&self) -> Option<&str> {
        self.active.as_ref().map(|(kid, _)| kid.as_str())
    }

    pub(crate) fn signer(&self) -> Result<(&str, &SigningKey), KeyError> {
        self.active
            .as_ref()
            .map(|(k, s)| (k.as_str(), s))
            .ok_or(KeyError::NoActiveKey)
    }

    pub(crate) fn verifier(&self, kid: &str) -> Option<&VerifyingKey> {
        self.verifying.get(kid)
    }
}
