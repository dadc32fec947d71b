//! Progress notifications from upstream servers back to the agent whose call they belong to.
//!
//! An agent's `tools/call` may carry `_meta.progressToken`. Upstreams are shared by every agent,
//! so Palisade never forwards the agent's token: it sends a token of its own, unique in the
//! process, and maps it back when the server reports progress. A notification with an unknown
//! token (a finished call, or one the server made up) is dropped, so no agent ever sees another
//! agent's progress.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Where one call's progress goes: the agent's own token and its stream.
pub struct Sink {
    /// The `progressToken` the agent sent.
    pub agent_token: Value,
    /// The agent's response stream (bounded; a slow agent loses progress, never blocks the
    /// server's output).
    pub tx: mpsc::Sender<Value>,
}

/// Upstream token → sink, shared by all upstreams of one gateway.
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<HashMap<String, Sink>>>);

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Keeps a call's route while it runs; dropping it removes the route.
pub struct Registration {
    routes: Routes,
    /// The token sent upstream.
    pub token: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.routes.lock().remove(&self.token);
    }
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sink>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes progress for one call until the registration is dropped.
    pub fn register(&self, sink: Sink) -> Registration {
        let token = format!("palisade-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.lock().insert(token.clone(), sink);
        Registration {
            routes: self.clone(),
            token,
        }
    }

    /// Passes a server's `notifications/progress` to the call it belongs to, with the agent's
    /// token put back; anything else, or an unknown token, is ignored. Never waits.
    pub fn deliver(&self, message: &Value) {
        if message.get("method").and_then(Value::as_str) != Some("notifications/progress") {
            return;
        }
        let Some(params) = message.get("params") else {
            return;
        };
        let Some(token) = params.get("progressToken").and_then(Value::as_str) else {
            return;
        };
        let routes = self.lock();
        let Some(sink) = routes.get(token) else {
            return;
        };
        // Only the fields the protocol defines travel on.
        let mut out = serde_json::Map::new();
        out.insert("progressToken".into(), sink.agent_token.clone());
        for key in ["progress", "total"] {
            if let Some(v) = params.get(key).filter(|v| v.is_number()) {
                out.insert(key.into(), v.clone());
            }
        }
        if let Some(m) = params.get("message").and_then(Value::as_str) {
            out.insert(
                "message".into(),
                json!(m.chars().take(1000).collect::<String>()),
            );
        }
        if !out.contains_key("progress") {
            return;
        }
        let _ = sink.tx.try_send(json!({
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": out,
        }));
    }
}

/// Sets `_meta.progressToken` of outgoing request params to Palisade's own token (replacing
/// whatever the agent sent).
pub fn with_token(mut params: Value, token: &str) -> Value {
    if let Some(obj) = params.as_object_mut() {
        let meta = obj.entry("_meta").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        if let Some(m) = meta.as_object_mut() {
            m.insert("progressToken".into(), json!(token));
        }
    }
    params
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn progress_reaches_only_its_own_call_with_the_agents_token() {
        let routes = Routes::default();
        let (tx, mut rx) = mpsc::channel(4);
        let reg = routes.register(Sink {
            agent_token: json!(7),
            tx,
        });
        routes.deliver(
            &json!({ "jsonrpc": "2.0", "method": "notifications/progress",
            "params": { "progressToken": "palisade-unknown", "progress": 1 } }),
        );
        routes.deliver(
            &json!({ "jsonrpc": "2.0", "method": "notifications/progress",
            "params": { "progressToken": reg.token, "progress": 2, "total": 3, "extra": "x" } }),
        );
        let got = rx.recv().await.unwrap();
        assert_eq!(
            got["params"],
            json!({ "progressToken": 7, "progress": 2, "total": 3 })
        );
        assert!(rx.try_recv().is_err());
        let token = reg.token.clone();
        drop(reg);
        routes.deliver(
            &json!({ "jsonrpc": "2.0", "method": "notifications/progress",
            "params": { "progressToken": token, "progress": 3 } }),
        );
        assert!(rx.try_recv().is_err(), "a finished call gets nothing");
        let p = with_token(
            json!({ "name": "t", "_meta": { "progressToken": "agent" } }),
            "p-1",
        );
        assert_eq!(p["_meta"]["progressToken"], "p-1");
    }
}
