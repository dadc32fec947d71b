//! `palisade serve --demo`: a demo upstream ("tickets" API), a demo owner and agent, demo
//! policies, and the three commands a newcomer pastes next.

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use palisade_audit::{AuditEvent, PrincipalRef};
use palisade_config::Config;
use palisade_core::registry::Registry;
use palisade_core::{PrincipalId, PrincipalKind, Timestamp};
use serde_json::json;
use std::net::SocketAddr;

/// The demo agent's id.
pub const DEMO_AGENT: &str = "agent:ticket-triage";
/// The demo owner's id.
pub const DEMO_OWNER: &str = "human:alice";

/// Demo policies: the agent may comment on tickets; nobody deletes tickets.
pub const DEMO_POLICY: &str = r#"
// The triage agent may add comments (a write) but nothing else beyond the baseline's reads.
@id("demo.triage-may-comment")
permit (
  principal == Palisade::Agent::"agent:ticket-triage",
  action == Palisade::Action::"write",
  resource == Palisade::Resource::"tickets/comment"
);

// Destroying tickets is never allowed through the gateway.
@id("demo.no-ticket-deletes")
forbid (principal, action == Palisade::Action::"destructive", resource == Palisade::Route::"tickets");
"#;

/// Starts the demo tickets API on a free loopback port.
pub async fn start_upstream() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/tickets",
            get(|| async { axum::Json(json!([{ "id": 42, "title": "Login page returns 500" }])) }),
        )
        .route(
            "/tickets/{id}",
            get(|Path(id): Path<u64>| async move {
                axum::Json(json!({ "id": id, "title": "Login page returns 500", "status": "open" }))
            })
            .delete(|Path(id): Path<u64>| async move { axum::Json(json!({ "deleted": id })) }),
        )
        .route(
            "/tickets/{id}/comments",
            axum::routing::post(|Path(id): Path<u64>| async move {
                axum::Json(json!({ "ticket": id, "comment": "added" }))
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// The demo configuration: one `tickets` route to the demo upstream. (`{:?}` quotes and escapes
/// the strings, which TOML reads back as basic strings.)
pub fn config(listen: &str, data_dir: &str, upstream: SocketAddr) -> Result<Config, String> {
    let text = format!(
        r#"
[server]
listen = {listen:?}
data_dir = {data_dir:?}

[[routes]]
name = "tickets"
path_prefix = "/tickets"
upstream = "http://{upstream}"

[[routes.rules]]
methods = ["POST"]
path = "/tickets/*/comments"
action = "write"
resource = "comment"
"#
    );
    Config::from_toml(&text, "<demo config>").map_err(|e| e.to_string())
}

/// Registers the demo owner and agent if missing, reactivates the agent, and gives it a fresh
/// secret. Each change is audited as an admin change by `demo`, like one made through the API.
pub async fn seed(app: &crate::App) -> Result<String, String> {
    let registry = app.registry.clone();
    let (changes, secret) = tokio::task::spawn_blocking(move || seed_registry(&registry))
        .await
        .map_err(|e| e.to_string())??;
    for (action, resource) in changes {
        let mut event = AuditEvent::new("admin.change");
        event.principal = Some(PrincipalRef {
            id: "demo".into(),
            ..PrincipalRef::default()
        });
        event.action = Some(action.into());
        event.resource = Some(resource);
        app.audit.record(event).await.map_err(|e| e.to_string())?;
    }
    Ok(secret)
}

type Changes = Vec<(&'static str, String)>;

fn seed_registry(registry: &Registry) -> Result<(Changes, String), String> {
    let now = Timestamp::now();
    let mut changes = Vec::new();
    let owner: PrincipalId = DEMO_OWNER
        .parse()
        .map_err(|e: palisade_core::id::IdError| e.0)?;
    if registry.get(&owner).is_none() {
        registry
            .register(
                owner.clone(),
                json!({ "display_name": "Alice (demo owner)", "email": "alice@example.com" }),
                now,
            )
            .map_err(|e| e.to_string())?;
        changes.push(("human.register", owner.to_string()));
    }
    let agent = PrincipalId::new(PrincipalKind::Agent, "ticket-triage").map_err(|e| e.0)?;
    if registry.get(&agent).is_none() {
        registry
            .register(
                agent.clone(),
                json!({
                    "display_name": "Ticket triage agent",
                    "owner": DEMO_OWNER,
                    "purpose": "Reads support tickets and adds triage comments",
                    "purpose_tag": "ticket-triage",
                    "model_provider": "anthropic",
                    "model": "claude-sonnet-4",
                    "model_version": "2026-05-01",
                    "allowed_resources": ["tickets"],
                    // Comments need a token with tickets:write, asked for on its own.
                    "scopes": ["tickets:read", "tickets:write"],
                    "max_files_per_session": 50,
                    "blast_radius": { "max_action": "write", "max_classification": "internal" }
                }),
                now,
            )
            .map_err(|e| e.to_string())?;
        changes.push(("agent.register", agent.to_string()));
    }
    if registry
        .get(&agent)
        .is_some_and(|p| p.status != palisade_core::Status::Active)
    {
        registry
            .set_status(
                &agent,
                palisade_core::Status::Active,
                "demo",
                "demo restart",
                now,
            )
            .map_err(|e| e.to_string())?;
        changes.push(("agent.resume", agent.to_string()));
    }
    let issued = registry
        .rotate_secret(&agent, 0, now)
        .map_err(|e| e.to_string())?;
    changes.push(("agent.rotate-secret", agent.to_string()));
    Ok((changes, issued.secret.expose().to_string()))
}

/// The text `serve --demo` prints.
pub fn instructions(base: &str, secret: &str, data_dir: &str, upstream: &str) -> String {
    format!(
        r#"
Palisade demo is running at {base}
  demo owner  {DEMO_OWNER}
  demo agent  {DEMO_AGENT}   (may read /tickets, may comment, may never delete)
  admin token {data_dir}/admin.token
  upstream    {upstream}   (the demo tickets API behind route `tickets`)

Paste these three commands in another terminal:

  TOKEN=$(curl -s -d grant_type=client_credentials -d client_id={DEMO_AGENT} -d client_secret={secret} {base}/oauth2/token | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
  curl -i -H "Authorization: Bearer $TOKEN" {base}/tickets/42
  curl -i -X DELETE -H "Authorization: Bearer $TOKEN" {base}/tickets/42

Then: `palisade audit tail` shows what happened and `palisade audit verify` checks the chain.
Press Ctrl-C to stop.
"#
    )
}
