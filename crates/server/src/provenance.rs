//! Where content came from and who wrote it: the gateway's `Provenance`, over the store.
//!
//! A session whose taint or sensitivity changes is stored at once (the periodic save is too
//! late: after a crash the session would come back clean). Labels on content written by
//! tainted sessions live in the store (`content_labels`) and in memory, loaded at start.

use palisade_core::Clock;
use palisade_core::session::{LiveSession, Sessions};
use palisade_core::store::Store;
use palisade_gateway::inspection::Provenance;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// The store-backed provenance.
pub struct StoreProvenance {
    store: Arc<dyn Store>,
    sessions: Arc<Sessions>,
    clock: Arc<dyn Clock>,
    labeled: RwLock<HashSet<String>>,
}

impl StoreProvenance {
    /// Loads the labels.
    pub fn load(
        store: Arc<dyn Store>,
        sessions: Arc<Sessions>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let labeled = store
            .content_labels()
            .map_err(|e| format!("cannot read the content labels: {e}"))?
            .into_iter()
            .map(|(resource, _)| resource)
            .collect();
        Ok(Self {
            store,
            sessions,
            clock,
            labeled: RwLock::new(labeled),
        })
    }
}

impl Provenance for StoreProvenance {
    fn session_changed(&self, session: &LiveSession) -> Result<(), String> {
        self.sessions.persist(session).map_err(|e| e.to_string())
    }

    fn label(&self, resource: &str, session: &str) -> Result<(), String> {
        if self
            .labeled
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(resource)
        {
            return Ok(());
        }
        self.store
            .put_content_label(resource, "tainted-session", session, self.clock.now())
            .map_err(|e| e.to_string())?;
        self.labeled
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(resource.to_string());
        Ok(())
    }

    fn is_labeled(&self, resource: &str) -> bool {
        self.labeled
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(resource)
    }
}
