//! External OpenID Connect identity providers: a human's ID token, verified through the
//! provider's JWKS, is the subject token of a token exchange (RFC 8693).
//!
//! Verification: the token's `iss` picks the configured provider (an unknown issuer is refused
//! before any key is fetched); the header's `alg` must be an asymmetric algorithm and match the
//! key (`jsonwebtoken`, RustCrypto backend); `aud` must contain the configured audience; `exp`,
//! `nbf` and `iat` are checked against Palisade's clock with the configured leeway. Keys are
//! fetched over https (or http on loopback) with a 5 s timeout and a 256 KiB cap, cached for an
//! hour, and fetched again at most once a minute when a token names an unknown `kid`.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use palisade_config::IdentityProviderConfig;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

const JWKS_MAX_BYTES: usize = 256 * 1024;
const JWKS_TTL: Duration = Duration::from_secs(3600);
const REFETCH_MIN: Duration = Duration::from_secs(60);
const JWKS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const MAX_ID_TOKEN_BYTES: usize = 16 * 1024;

/// A verified external identity.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    /// The provider's configured name.
    pub provider: String,
    /// The claim that names the human (`email`, or one holding the human's id slug).
    pub claim: String,
    /// Its value.
    pub value: String,
    /// The ID token's expiry, unix seconds.
    pub exp: i64,
}

struct Provider {
    config: IdentityProviderConfig,
    keys: Mutex<KeyCache>,
}

#[derive(Default)]
struct KeyCache {
    set: Option<JwkSet>,
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not: refetches are at most once a minute.
    tried_at: Option<Instant>,
}

/// The configured providers and the client that fetches their keys.
pub struct Providers {
    providers: Vec<Provider>,
    client: Option<HttpsClient>,
}

impl Providers {
    /// Providers from the configuration (no network access until a token arrives).
    pub fn new(configs: &[IdentityProviderConfig]) -> Result<Self, String> {
        let client = if configs.is_empty() {
            None
        } else {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(Duration::from_secs(5)));
            http.enforce_http(false);
            // Mozilla's roots (webpki-roots), ring as the crypto provider.
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
                .map_err(|e| format!("cannot set up TLS for identity providers: {e}"))?
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            Some(Client::builder(TokioExecutor::new()).build(connector))
        };
        Ok(Self {
            providers: configs
                .iter()
                .map(|c| Provider {
                    config: c.clone(),
                    keys: Mutex::new(KeyCache::default()),
                })
                .collect(),
            client,
        })
    }

    /// Verifies an ID token of one of the providers at `now` (unix seconds).
    pub async fn verify(
        &self,
        token: &str,
        now: i64,
        leeway: i64,
    ) -> Result<ExternalIdentity, String> {
        if token.len() > MAX_ID_TOKEN_BYTES {
            return Err(format!(
                "the ID token is larger than {MAX_ID_TOKEN_BYTES} bytes"
            ));
        }
        let issuer = unverified_issuer(token)?;
        let provider = self
            .providers
            .iter()
            .find(|p| p.config.issuer == issuer)
            .ok_or_else(|| {
                format!("issuer `{issuer}` is not a configured identity provider (oauth.identity_providers)")
            })?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("the ID token's header is not valid: {e}"))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(format!(
                "the ID token's algorithm {:?} is not accepted; only asymmetric signatures are",
                header.alg
            ));
        }
        let key = self
            .key_for(provider, header.kid.as_deref(), header.alg)
            .await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[provider.config.issuer.as_str()]);
        validation.set_audience(&[provider.config.audience.as_str()]);
        // Time is checked below against Palisade's clock, not the library's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| {
                format!(
                    "the ID token from `{}` does not verify: {e}",
                    provider.config.name
                )
            })?
            .claims;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or("the ID token has no numeric exp")?;
        if now > exp + leeway {
            return Err(format!(
                "the ID token from `{}` has expired",
                provider.config.name
            ));
        }
        if claims
            .get("nbf")
            .and_then(Value::as_i64)
            .is_some_and(|nbf| now + leeway < nbf)
        {
            return Err("the ID token is not valid yet (nbf)".into());
        }
        if claims
            .get("iat")
            .and_then(Value::as_i64)
            .is_some_and(|iat| iat > now + leeway)
        {
            return Err("the ID token was issued in the future (iat)".into());
        }
        let claim = provider.config.human_claim.clone();
        let value = claims
            .get(&claim)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("the ID token has no `{claim}` claim to name the human"))?
            .to_string();
        // An email names a human only if the provider vouches for it: some providers let users
        // set any address, so a missing `email_verified` is as good as false.
        if claim == "email" && claims.get("email_verified") != Some(&Value::Bool(true)) {
            return Err(
                "the ID token's email is not verified (email_verified is not true); use a provider that verifies emails or another human_claim".into(),
            );
        }
        Ok(ExternalIdentity {
            provider: provider.config.name.clone(),
            claim,
            value,
            exp,
        })
    }

    async fn key_for(
        &self,
        provider: &Provider,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, String> {
        // One fetch at a time per provider; the others wait for its result instead of
        // fetching too (no refetch storm), and a failed fetch is not retried for a minute.
        let mut cache = provider.keys.lock().await;
        let stale = cache.fetched_at.is_none_or(|at| at.elapsed() > JWKS_TTL);
        let unknown_kid = cache
            .set
            .as_ref()
            .is_some_and(|s| kid.is_some_and(|k| s.find(k).is_none()));
        let may_try = cache.tried_at.is_none_or(|at| at.elapsed() > REFETCH_MIN);
        if (stale || unknown_kid) && may_try {
            cache.tried_at = Some(Instant::now());
            match self.fetch(&provider.config).await {
                Ok(set) => {
                    cache.set = Some(set);
                    cache.fetched_at = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(provider = %provider.config.name, error = %e, "JWKS fetch failed")
                }
            }
        }
        // Keys not refreshed for a day are not trusted any more (a provider's rotation would go
        // unnoticed).
        if cache
            .fetched_at
            .is_none_or(|at| at.elapsed() > JWKS_MAX_AGE)
        {
            return Err(format!(
                "the keys of `{}` could not be fetched from {} (retried at most once a minute)",
                provider.config.name, provider.config.jwks_uri
            ));
        }
        let set = cache
            .set
            .as_ref()
            .ok_or("no keys for the identity provider")?;
        let jwk = match kid {
            Some(k) => set.find(k),
            None if set.keys.len() == 1 => set.keys.first(),
            None => None,
        }
        .ok_or_else(|| {
            format!(
                "no key `{}` in the JWKS of `{}`",
                kid.unwrap_or("(none named)"),
                provider.config.name
            )
        })?;
        if let Some(key_alg) = jwk.common.key_algorithm
            && format!("{key_alg:?}") != format!("{alg:?}")
        {
            return Err(format!(
                "the ID token says {alg:?} but its key is for {key_alg:?}"
            ));
        }
        DecodingKey::from_jwk(jwk).map_err(|e| format!("the provider's key is not usable: {e}"))
    }

    async fn fetch(&self, config: &IdentityProviderConfig) -> Result<JwkSet, String> {
        let client = self.client.as_ref().ok_or("no HTTP client")?;
        let req = http::Request::get(config.jwks_uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let what = format!("the JWKS of `{}` ({})", config.name, config.jwks_uri);
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| format!("{what} did not answer within 5 s"))?
            .map_err(|e| format!("{what} could not be fetched: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{what} answered {}", resp.status()));
        }
        let body = tokio::time::timeout(
            Duration::from_secs(5),
            Limited::new(resp.into_body(), JWKS_MAX_BYTES).collect(),
        )
        .await
        .map_err(|_| format!("{what} did not finish within 5 s"))?
        .map_err(|e| format!("{what} could not be read (over {JWKS_MAX_BYTES} bytes?): {e}"))?
        .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{what} is not a JWK set: {e}"))
    }
}

/// The `iss` of a token before verification, only to pick the provider whose keys and issuer
/// then verify it.
fn unverified_issuer(token: &str) -> Result<String, String> {
    use base64::Engine;
    let payload = token.split('.').nth(1).ok_or("the ID token is not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| "the ID token's payload is not base64url")?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| "the ID token's payload is not JSON")?;
    claims
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "the ID token has no iss".into())
}
