//! Access tokens: RFC 9068 JWT profile, signed with Ed25519 (JOSE `EdDSA`), and the signing key set
//! behind the JWKS.
//!
//! The JOSE framing is written here rather than taken from a JWT crate because the verifier must
//! enforce a narrower profile than general-purpose crates do (RFC 8725): exactly one algorithm,
//! `typ: at+jwt`, no `jwk`/`jku`/`x5u`/`x5c`/`crit` header members at all, duplicate JSON members
//! rejected, and a size cap applied before any decoding. The cryptography itself is
//! `ed25519-dalek`'s strict verification; nothing here implements a primitive.
//!
//! This crate does no I/O and reads no clock: `now` comes in as an argument.

mod cache;
mod jose;
mod keys;

pub use cache::VerifyCache;
pub use jose::{AccessTokenClaims, Actor, TokenError, VerifiedToken, VerifyPolicy, sign, verify};
pub use keys::{KeyError, KeySet, generate_signing_key};

/// Longest accepted access token, in bytes (checked before decoding).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
