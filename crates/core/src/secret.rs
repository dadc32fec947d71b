//! Generated secrets (client secrets, admin tokens) and their constant-time verification.
//!
//! Secrets carry 256 bits from the OS generator, so one SHA-256 is a sound verifier: there is no
//! low-entropy password to stretch. Comparison is constant-time over the hashes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// A freshly generated secret. Its `Debug` never shows the value.
pub struct Secret(String);

impl Secret {
    /// The plaintext, to show once to the caller.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The verifier to store.
    pub fn hash(&self) -> [u8; 32] {
        hash_secret(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a secret could not be made.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random generator failed: {0}")]
pub struct RandomError(String);

/// Fills a buffer from the OS random generator.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| RandomError(e.to_string()))?;
    Ok(buf)
}

/// A new 256-bit secret, `<prefix>_<base64url>`.
pub fn generate_secret(prefix: &str) -> Result<Secret, RandomError> {
    let bytes = random_bytes::<32>()?;
    Ok(Secret(format!(
        "{prefix}_{}",
        URL_SAFE_NO_PAD.encode(bytes)
    )))
}

/// A random opaque identifier of `n` bytes, base64url.
pub fn random_id<const N: usize>() -> Result<String, RandomError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<N>()?))
}

/// SHA-256 of a secret's text.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `presented` matches `stored_hash`, in constant time.
pub fn secret_matches(presented: &str, stored_hash: &[u8; 32]) -> bool {
    hash_secret(presented).ct_eq(stored_hash).into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secret_verifies_and_others_do_not() {
        let s = generate_secret("pls").unwrap();
        assert!(s.expose().starts_with("pls_"));
        assert_eq!(s.expose().len(), 4 + 43);
        let h = s.hash();
        assert!(secret_matches(s.expose(), &h));
        assert!(!secret_matches("pls_wrong", &h));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn two_secrets_differ() {
        let a = generate_secret("x").unwrap();
        let b = generate_secret("x").unwrap();
        assert_ne!(a.expose(), b.expose());
    }
}
