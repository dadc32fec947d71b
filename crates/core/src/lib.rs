//! Palisade's domain model: principal identities (humans, teams, service accounts, agents), their
//! validation rules, the identity registry service, secret handling and the storage port.
//!
//! This crate is pure domain logic. It must never depend on HTTP, SQL, Cedar or any I/O crate:
//! storage is reached only through the [`store::Store`] trait, which `palisade-store` implements.

pub mod approval;
pub mod clock;
pub mod id;
pub mod principal;
pub mod rate;
pub mod registry;
pub mod secret;
pub mod session;
pub mod store;

pub use clock::{Clock, OffsetClock, SystemClock, Timestamp};
pub use id::{PrincipalId, PrincipalKind};
pub use principal::{AgentDetail, Principal, PrincipalDetail, Status, StatusChange};
