//! The Palisade server: wires the store, registry, token service, policy engine, audit log and
//! gateway into one HTTP listener.
//!
//! Start-up order is the safety argument: config and policies are validated, the store is opened
//! and migrated, keys and the admin token exist, the audit writer runs, and only then is the port
//! bound. Anything that fails stops the start with a message naming the problem.

pub mod admin;
pub mod alerts;
pub mod approvals;
pub mod authzen;
pub mod demo;
pub mod leases;
pub mod oauth;
pub mod oidc;
pub mod policy;
mod provenance;
pub mod sessions;
pub mod sinks;
pub mod tokens;
pub mod vault;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use palisade_audit::{AuditEvent, AuditLog};
use palisade_config::Config;
use palisade_core::registry::Registry;
use palisade_core::store::Store;
use palisade_gateway::Gateway;
use palisade_policy::PolicyEngine;
use palisade_store::SqliteStore;
use policy::PolicyHolder;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokens::TokenService;

/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Shared state of the running server.
pub struct App {
    /// Resolved configuration (issuer follows the bound port).
    pub config: Arc<Config>,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// Principals.
    pub registry: Arc<Registry>,
    /// Tokens.
    pub tokens: Arc<TokenService>,
    /// Policies.
    pub policy: Arc<PolicyHolder>,
    /// Audit writer handle.
    pub audit: AuditLog,
    /// SHA-256 of the admin token.
    pub admin_token_hash: [u8; 32],
    /// Enforcement point.
    pub gateway: Arc<Gateway>,
    /// External OpenID Connect providers (token exchange subject tokens).
    pub identity_providers: oidc::Providers,
    /// The MCP gateway at `/mcp`.
    pub mcp: Arc<palisade_mcp::McpGateway>,
    /// Signs the audit chain's checkpoints.
    pub checkpoint_key: Arc<ed25519_dalek::SigningKey>,
    /// Detection rules.
    pub detection: alerts::Detection,
    /// SIEM sinks delivering the audit log.
    pub sinks: Arc<sinks::Sinks>,
    /// Secrets for injection.
    pub vault: Arc<palisade_vault::Vault>,
    /// Just-in-time leases of vault secrets.
    pub leases: leases::Leases,
    /// Human-in-the-loop approvals.
    pub approvals: Arc<palisade_approval::Approvals>,
    /// PostgreSQL databases whose login roles are leased.
    pub databases: Vec<Arc<palisade_vault::database::Database>>,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Policies failed validation.
    #[error("{0}")]
    Policy(#[from] palisade_policy::PolicyLoadError),
    /// Storage failed.
    #[error("data directory: {0}")]
    Store(#[from] palisade_core::store::StoreError),
    /// The port could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        message: String,
    },
    /// Anything else at start-up.
    #[error("{0}")]
    Other(String),
}

/// Extra start-up inputs beyond the config file.
#[derive(Default)]
pub struct StartOptions {
    /// Policy texts added after the baseline and the policy directory (the demo's).
    pub extra_policies: Vec<(String, String)>,
    /// The clock every time-based decision reads (the system clock when `None`); tests pass an
    /// [`palisade_core::OffsetClock`] to jump past session ends without sleeping.
    pub clock: Option<Arc<dyn palisade_core::Clock>>,
}

/// A running server.
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// Shared state.
    pub app: Arc<App>,
    /// The admin token file.
    pub admin_token_path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    writer: palisade_audit::AuditWriter,
    checkpointer: palisade_store::Checkpointer,
    watcher: tokio::task::JoinHandle<()>,
    sweeper: tokio::task::JoinHandle<()>,
    checkpoints: tokio::task::JoinHandle<()>,
    detection: tokio::task::JoinHandle<()>,
    lease_sweeper: tokio::task::JoinHandle<()>,
    approval_tasks: [tokio::task::JoinHandle<()>; 2],
}

impl RunningServer {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the server stops (Ctrl-C in `palisade serve`), then drains the audit log.
    pub async fn wait(self) {
        let Self {
            app,
            task,
            writer,
            shutdown,
            checkpointer,
            watcher,
            sweeper,
            checkpoints,
            detection,
            lease_sweeper,
            approval_tasks,
            ..
        } = self;
        detection.abort();
        lease_sweeper.abort();
        for t in approval_tasks {
            t.abort();
        }
        let _ = task.await;
        watcher.abort();
        sweeper.abort();
        checkpoints.abort();
        let (store, key, clock) = (
            app.store.clone(),
            app.checkpoint_key.clone(),
            app.tokens.clock(),
        );
        // Last counters of live sessions, so a restart continues from them, and the audit
        // events of session ends still due.
        let sessions = app.tokens.sessions.clone();
        if let Ok((due, _)) = tokio::task::spawn_blocking(move || sessions.sweep()).await {
            sessions::audit_taken(&app, &due).await;
        }
        // Leased database roles end with the server (leases live in memory).
        leases::drop_all(&app).await;
        // The sinks get a moment to deliver the last events (the rest follow at the next
        // start, from their cursors); their handles on the log must go before it can close.
        let head = *app.audit.head().borrow();
        app.sinks
            .drain(head, std::time::Duration::from_secs(3))
            .await;
        app.sinks.stop().await;
        drop((app, shutdown));
        // The writer ends once every AuditLog handle is gone (the router's went with the task),
        // after writing everything still queued.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::task::spawn_blocking(move || writer.join()),
        )
        .await;
        // A signed checkpoint of the final head, then the last WAL checkpoint.
        let _ = tokio::task::spawn_blocking(move || {
            audit_checkpoint(store.as_ref(), &key, clock.as_ref());
        })
        .await;
        let _ = tokio::task::spawn_blocking(move || drop(checkpointer)).await;
    }

    /// Stops accepting, finishes in-flight requests, drains the audit log.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await;
    }
}

/// Validates everything, binds the listener and serves until stopped.
pub async fn start(mut config: Config, options: StartOptions) -> Result<RunningServer, StartError> {
    // Policies first: an invalid policy must stop the start before anything else happens.
    let extra: Vec<(&str, &str)> = options
        .extra_policies
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let builtin = policy::builtin_sources(&config);
    let builtin_refs: Vec<(&str, &str)> = builtin
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let engine = PolicyEngine::load_all(config.policy.dir.as_deref(), &extra, &builtin_refs)?;
    let policy = Arc::new(PolicyHolder::new(
        engine,
        config.policy.dir.clone(),
        options.extra_policies.clone(),
        builtin,
    ));

    let sqlite = SqliteStore::open(&config.server.data_dir)?;
    // Small, frequent checkpoints: each copies ~0.1 s of commits into the database file, so its
    // fsync is short and an audit commit's own fsync never queues behind seconds of pages (with
    // one checkpoint a second, the requests around each tick were the gateway's p99 tail).
    let checkpointer = sqlite.start_checkpointer(std::time::Duration::from_millis(100))?;
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let registry = Arc::new(Registry::load(store.clone())?);
    let admin_token_path = config.server.data_dir.join(ADMIN_TOKEN_FILE);
    let admin_token_hash = ensure_admin_token(&admin_token_path)?;

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| StartError::Bind {
            addr: config.server.listen,
            message: e.to_string(),
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    config.bind_to(addr);
    let config = Arc::new(config);

    let clock = options
        .clock
        .clone()
        .unwrap_or_else(|| Arc::new(palisade_core::SystemClock));
    let tokens = Arc::new(
        TokenService::load(
            config.clone(),
            store.clone(),
            registry.clone(),
            clock.clone(),
        )
        .map_err(StartError::Other)?,
    );
    let (audit, writer) = AuditLog::start(store.clone())?;
    let sinks = Arc::new(
        sinks::Sinks::start(&config.audit.sinks, store.clone(), &audit, clock.clone())
            .map_err(StartError::Other)?,
    );
    let inspection_key = ensure_key(&config.server.data_dir.join(INSPECTION_KEY_FILE))?;
    let checkpoint_key = Arc::new(ed25519_dalek::SigningKey::from_bytes(&ensure_key(
        &config.server.data_dir.join(AUDIT_CHECKPOINT_KEY_FILE),
    )?));
    let inspector = Arc::new(palisade_inspect::Inspector::new(inspection_key));
    let provenance: Arc<dyn palisade_gateway::inspection::Provenance> = Arc::new(
        provenance::StoreProvenance::load(store.clone(), tokens.sessions.clone(), clock.clone())
            .map_err(StartError::Other)?,
    );
    let key_source = match &config.vault.master_key_env {
        Some(name) => palisade_vault::KeySource::Env(name.clone()),
        None => palisade_vault::KeySource::File(
            config
                .vault
                .master_key_file
                .clone()
                .unwrap_or_else(|| config.server.data_dir.join(VAULT_MASTER_KEY_FILE)),
        ),
    };
    let vault = Arc::new(
        palisade_vault::Vault::open(store.clone(), key_source)
            .map_err(|e| StartError::Other(e.to_string()))?,
    );
    let mut databases = Vec::new();
    for d in &config.vault.databases {
        let url =
            palisade_gateway::expand_vault(d.url.expose(), &vault::VaultCredentials(vault.clone()))
                .map_err(|e| StartError::Other(format!("vault database `{}`: url: {e}", d.name)))?;
        let roles = d
            .roles
            .iter()
            .map(|r| palisade_vault::database::RoleTemplate {
                name: r.name.clone(),
                creation: r.creation.clone(),
                revocation: r.revocation.clone(),
                writes: r.writes,
            })
            .collect();
        let db = Arc::new(palisade_vault::database::Database::new(&d.name, url, roles));
        // Roles of leases from before this start are orphans (leases live in memory).
        let orphans = db.clone();
        tokio::spawn(async move {
            match orphans.drop_orphans(&[]).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(database = %orphans.name, roles = n, "dropped login roles of leases from before the restart")
                }
                Err(e) => tracing::warn!(error = %e, "cannot check for leftover login roles"),
            }
        });
        databases.push(db);
    }
    for route in &config.routes {
        for c in &route.credentials {
            if !vault.contains(&c.secret) {
                tracing::warn!(route = %route.name, secret = %c.secret, "the route's credential is not in the vault yet; its requests are refused until `palisade secret put` stores it");
            }
        }
    }
    let (announce, announced) = tokio::sync::mpsc::unbounded_channel();
    let approvals = Arc::new(
        palisade_approval::Approvals::load(
            store.clone(),
            clock.clone(),
            audit.clone(),
            palisade_approval::Settings {
                wait_secs: config.approvals.wait_secs,
                link: config.approvals.link.clone(),
            },
        )
        .map_err(StartError::Other)?
        .with_announcer(announce),
    );
    let gateway = Arc::new(
        Gateway::new(
            config.clone(),
            tokens.clone(),
            policy.clone(),
            audit.clone(),
            clock.clone(),
            inspector.clone(),
            provenance.clone(),
        )
        .with_credentials(Arc::new(vault::VaultCredentials(vault.clone())))
        .with_approvals(approvals.clone()),
    );
    let mcp = Arc::new(
        palisade_mcp::McpGateway::new(
            config.clone(),
            palisade_mcp::Services {
                auth: tokens.clone(),
                pdp: policy.clone(),
                audit: audit.clone(),
                clock,
                store: store.clone(),
                limits: gateway.limits(),
                inspector,
                provenance,
                credentials: Arc::new(vault::VaultCredentials(vault.clone())),
                approvals: Some(approvals.clone()),
            },
        )
        .map_err(StartError::Other)?,
    );
    let identity_providers =
        oidc::Providers::new(&config.oauth.identity_providers).map_err(StartError::Other)?;
    let detection = alerts::Detection::load(&config).map_err(StartError::Other)?;
    let app = Arc::new(App {
        approvals,
        databases,
        leases: leases::Leases::default(),
        vault,
        sinks,
        detection,
        checkpoint_key,
        mcp,
        identity_providers,
        config,
        store,
        registry,
        tokens,
        policy,
        audit,
        admin_token_hash,
        gateway,
    });

    let mut event = AuditEvent::new("server.start");
    event.detail =
        json!({ "listen": addr.to_string(), "policy_version": app.policy.current().version() });
    app.audit
        .record(event)
        .await
        .map_err(|e| StartError::Other(e.to_string()))?;

    let watcher = policy::watch(Arc::downgrade(&app), std::time::Duration::from_secs(1));
    let checkpoints = checkpoint_task(Arc::downgrade(&app), AUDIT_CHECKPOINT_EVERY);
    let detection = alerts::schedule(Arc::downgrade(&app));
    let sweeper = sessions::sweep(Arc::downgrade(&app), std::time::Duration::from_secs(1));
    let lease_sweeper = leases::sweep(Arc::downgrade(&app), std::time::Duration::from_secs(1));
    let approval_sweeper =
        approvals::sweep(Arc::downgrade(&app), std::time::Duration::from_secs(2));
    let notifier =
        approvals::notifier(Arc::downgrade(&app), announced).map_err(StartError::Other)?;
    let router = router(app.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mcp = app.mcp.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            tokio::select! {
                _ = rx => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            // Open MCP event streams would hold graceful shutdown forever.
            mcp.shutdown();
        };
        // Small JSON answers and streamed chunks must leave at once, not wait for Nagle.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "server stopped with an error");
        }
    });
    Ok(RunningServer {
        addr,
        app,
        admin_token_path,
        shutdown: Some(tx),
        task,
        writer,
        checkpointer,
        watcher,
        sweeper,
        lease_sweeper,
        approval_tasks: [approval_sweeper, notifier],
        checkpoints,
        detection,
    })
}

/// How often the audit chain's head is signed (when it moved).
pub const AUDIT_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The vault's master key file in the data directory (unless `[vault]` names another or an
/// environment variable), created `0600` on first start.
pub const VAULT_MASTER_KEY_FILE: &str = "vault-master.key";

/// The key that signs audit checkpoints, created `0600` on first start.
pub const AUDIT_CHECKPOINT_KEY_FILE: &str = "audit-checkpoint.key";

/// Signs and stores a checkpoint of the head if it moved; logs failures.
pub fn audit_checkpoint(
    store: &dyn Store,
    key: &ed25519_dalek::SigningKey,
    clock: &dyn palisade_core::Clock,
) -> Option<palisade_audit::checkpoint::Checkpoint> {
    let now = i64::try_from(clock.now().unix_nanos()).unwrap_or(i64::MAX);
    match palisade_audit::checkpoint::checkpoint_now(store, key, now) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot store an audit checkpoint");
            None
        }
    }
}

fn checkpoint_task(
    app: std::sync::Weak<App>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            let (store, key, clock) = (
                app.store.clone(),
                app.checkpoint_key.clone(),
                app.tokens.clock(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                audit_checkpoint(store.as_ref(), &key, clock.as_ref());
            })
            .await;
            // Retention runs hourly (and at the first tick after start).
            if app.config.audit.retention.is_some()
                && last_prune.is_none_or(|t| t.elapsed() >= AUDIT_PRUNE_EVERY)
            {
                last_prune = Some(tokio::time::Instant::now());
                if let Err(e) = prune_audit(&app).await {
                    tracing::error!(error = %e, "audit retention failed; nothing was pruned");
                }
            }
        }
    })
}

/// How often retention looks for events to prune.
pub const AUDIT_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Archives, seals and prunes the events older than `[audit] retention` that every sink has
/// delivered; audits the pruning as `audit.pruned`. `Ok(None)`: nothing to prune.
pub async fn prune_audit(
    app: &Arc<App>,
) -> Result<Option<palisade_core::store::AuditSegment>, String> {
    let Some(retention) = app.config.audit.retention else {
        return Err("no retention is configured ([audit] retention = \"90d\")".into());
    };
    let now = i64::try_from(app.tokens.now().unix_nanos()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX));
    let dir = app
        .config
        .audit
        .archive_dir
        .clone()
        .unwrap_or_else(|| app.config.server.data_dir.join("audit-archive"));
    let (store, key) = (app.store.clone(), app.checkpoint_key.clone());
    let sinks: Vec<String> = app
        .config
        .audit
        .sinks
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let segment = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let Some(mut up_to) = store.audit_seq_before(cutoff).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        // Events a sink has not delivered yet stay, so no sink ever misses one.
        for sink in &sinks {
            up_to = up_to.min(store.sink_cursor(sink).map_err(|e| e.to_string())?);
        }
        palisade_audit::retention::prune(store.as_ref(), &key, &dir, up_to, now)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    if let Some(s) = &segment {
        let mut event = AuditEvent::new("audit.pruned");
        event.action = Some("prune".into());
        event.detail = json!({
            "first_seq": s.first_seq,
            "last_seq": s.last_seq,
            "last_hash": s.last_hash,
            "archive": s.archive,
        });
        app.audit.record(event).await.map_err(|e| e.to_string())?;
        tracing::info!(first = s.first_seq, last = s.last_seq, archive = %s.archive, "audit events archived and pruned");
    }
    Ok(segment)
}

/// The key of the inspection fingerprints (keyed hashes of PII and secrets in audit events),
/// created on first start next to the admin token.
pub const INSPECTION_KEY_FILE: &str = "inspection.key";

/// Reads a 32-byte key (hex) from `path`, creating it (0600) on first start.
fn ensure_key(path: &std::path::Path) -> Result<[u8; 32], StartError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = text.trim();
            let mut key = [0u8; 32];
            let ok = text.len() == 64
                && key.iter_mut().enumerate().all(|(i, b)| {
                    text.get(i * 2..i * 2 + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .map(|v| *b = v)
                        .is_some()
                });
            if !ok {
                return Err(StartError::Other(format!(
                    "{} does not hold a 64-digit hex key; restore it from a backup (fingerprints in the audit log depend on it) or delete it to have a new one created",
                    path.display()
                )));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = palisade_core::secret::random_bytes::<32>()
                .map_err(|e| StartError::Other(e.to_string()))?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            write_private(path, &hex)?;
            Ok(key)
        }
        Err(e) => Err(StartError::Other(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Reads the admin token file, creating it (mode 0600) with a fresh token on first start.
fn ensure_admin_token(path: &std::path::Path) -> Result<[u8; 32], StartError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() < 32 {
                return Err(StartError::Other(format!(
                    "{} does not hold a valid admin token; delete it to have a new one created",
                    path.display()
                )));
            }
            Ok(palisade_core::secret::hash_secret(token))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = palisade_core::secret::generate_secret("pat")
                .map_err(|e| StartError::Other(e.to_string()))?;
            write_private(path, secret.expose())?;
            Ok(secret.hash())
        }
        Err(e) => Err(StartError::Other(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn write_private(path: &std::path::Path, content: &str) -> Result<(), StartError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| StartError::Other(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(content.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| StartError::Other(format!("cannot write {}: {e}", path.display())))
}

fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/keys", get(admin::keys))
        .route("/keys/rotate", post(admin::rotate_keys))
        .route("/audit/events", get(admin::audit_events))
        .route("/audit/query", post(admin::audit_query))
        .route("/alerts", get(alerts::list))
        .route("/alerts/run", post(alerts::run_now))
        .route("/audit/sinks", get(sinks::list))
        .route("/secrets", get(vault::list))
        .route(
            "/secrets/{*name}",
            get(vault::metadata).put(vault::put).delete(vault::delete),
        )
        .route("/vault/rotate-master", post(vault::rotate_master))
        .route("/audit/prune", post(admin::audit_prune))
        .route(
            "/audit/checkpoints",
            get(admin::audit_checkpoints).post(admin::audit_checkpoint_now),
        )
        .route("/policy", get(policy::status))
        .route("/policy/reload", post(policy::reload))
        .route("/policy/agents/{id}", get(policy::show_agent))
        .route("/policy/agents/{id}/can", get(policy::what_can))
        .route("/policy/explain", post(policy::explain))
        .route("/sessions", get(sessions::list))
        .route("/sessions/{sid}", get(sessions::get))
        .route("/sessions/{sid}/end", post(sessions::end))
        .route("/agents/{id}/kill", post(sessions::kill_agent))
        .route("/owners/{id}/kill", post(sessions::kill_owner))
        .route("/panic", post(sessions::panic_all))
        .route("/humans/{id}/token", post(oauth::mint_human_token))
        .route("/mcp/pins", get(mcp_pins))
        .route("/mcp/pins/{server}/{tool}/accept", post(mcp_accept))
        .route("/{collection}", get(admin::list).post(admin::create))
        .route("/{collection}/{id}", get(admin::get).patch(admin::update))
        .route("/{collection}/{id}/{verb}", post(admin::lifecycle))
        .fallback(api_not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            admin::require_admin,
        ))
        .layer(DefaultBodyLimit::max(64 * 1024));
    // Leases are asked for with an agent's token, not the admin token.
    let leases = Router::new()
        .route("/api/v1/leases", post(leases::issue))
        .route("/api/v1/leases/{id}/renew", post(leases::renew))
        .route("/api/v1/leases/{id}", axum::routing::delete(leases::revoke))
        .layer(DefaultBodyLimit::max(16 * 1024));
    // Approvals are read with the admin token or an approver's human token, and decided only
    // with the latter (the handlers authenticate).
    let decisions = Router::new()
        .route("/api/v1/approvals", get(approvals::list))
        .route("/api/v1/approvals/{id}", get(approvals::get))
        .route("/api/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/api/v1/approvals/{id}/deny", post(approvals::deny))
        .layer(DefaultBodyLimit::max(16 * 1024));
    let oauth = Router::new()
        .merge(leases)
        .merge(decisions)
        .route("/oauth2/token", post(oauth::token))
        .route("/oauth2/introspect", post(oauth::introspect))
        .route("/oauth2/revoke", post(oauth::revoke))
        .route("/oauth2/session/end", post(sessions::end_own))
        .layer(DefaultBodyLimit::max(16 * 1024));
    Router::new()
        .nest("/api/v1", api)
        .merge(oauth)
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::metadata),
        )
        .route("/.well-known/jwks.json", get(oauth::jwks))
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(|State(app): State<Arc<App>>| async move {
                axum::Json(app.mcp.resource_metadata())
            }),
        )
        .route(
            "/mcp",
            axum::routing::any(|State(app): State<Arc<App>>, req: axum::extract::Request| async move {
                app.mcp.handle(req).await
            }),
        )
        .route(
            "/.well-known/authzen-configuration",
            get(authzen::configuration),
        )
        .merge(
            Router::new()
                .route("/access/v1/evaluation", post(authzen::evaluation))
                .route("/access/v1/evaluations", post(authzen::evaluations))
                .route("/access/v1/search/subject", post(authzen::search_subject))
                .route("/access/v1/search/resource", post(authzen::search_resource))
                .route("/access/v1/search/action", post(authzen::search_action))
                .layer(DefaultBodyLimit::max(1024 * 1024)),
        )
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .fallback(gateway)
        .with_state(app)
}

async fn mcp_pins(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.mcp.pins().await).into_response()
}

async fn mcp_accept(
    State(app): State<Arc<App>>,
    axum::extract::Path((server, tool)): axum::extract::Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let key = format!("{server}/{tool}");
    let expected = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("sha256").and_then(|s| s.as_str()).map(str::to_string));
    let Some(expected) = expected else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "sha256: give the SHA-256 of the definition you reviewed, e.g. {\"sha256\": \"...\"} (palisade mcp pins shows it)",
            Some("sha256"),
        );
    };
    match app.mcp.accept(&key, &expected).await {
        Ok(hash) => {
            let mut event = AuditEvent::new("admin.change");
            event.principal = Some(palisade_audit::PrincipalRef {
                id: "admin".into(),
                ..palisade_audit::PrincipalRef::default()
            });
            event.action = Some("mcp.accept_tool".into());
            event.resource = Some(format!("Palisade::Tool::\"{key}\""));
            event.detail = json!({ "sha256": hash });
            audit_or_503(
                &app,
                event,
                axum::Json(json!({ "tool": key, "pinned_sha256": hash })).into_response(),
            )
            .await
        }
        Err(message) => error_response(StatusCode::CONFLICT, "conflict", &message, None),
    }
}

async fn api_not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such admin endpoint; see README for the /api/v1 reference",
        None,
    )
}

async fn gateway(State(app): State<Arc<App>>, req: axum::extract::Request) -> Response {
    app.gateway.handle(req).await
}

/// A JSON error body: `{"error": {"code", "message", "field"?}}`.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    field: Option<&str>,
) -> Response {
    let mut error = json!({ "code": code, "message": message });
    if let Some(f) = field {
        error["field"] = json!(f);
    }
    let mut resp = (status, axum::Json(json!({ "error": error }))).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Records `event`; answers `ok` only once it is durable, else 503.
pub async fn audit_or_503(app: &App, event: AuditEvent, ok: Response) -> Response {
    match app.audit.record(event).await {
        Ok(_) => ok,
        Err(e) => {
            tracing::error!(error = %e, "audit write failed; refusing the response");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the audit log could not record this; nothing was acknowledged",
                None,
            )
        }
    }
}

/// The policy engine a server with this policy directory would load (for `config check`).
pub fn policy_engine_for(config: &Config) -> Result<PolicyEngine, StartError> {
    let builtin = policy::builtin_sources(config);
    let refs: Vec<(&str, &str)> = builtin
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    Ok(PolicyEngine::load_all(
        config.policy.dir.as_deref(),
        &[],
        &refs,
    )?)
}
