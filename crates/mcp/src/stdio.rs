//! An upstream MCP server that Palisade runs as a child process and talks to over stdio
//! (newline-delimited JSON-RPC).
//!
//! The child gets exactly the configured environment (nothing inherited: no tokens or keys of
//! Palisade's own leak into tools), its stdin/stdout carry MCP, its stderr goes to the log. It is
//! started on first use, initialised (`initialize`, `notifications/initialized`), its tool list
//! is cached, and it is started again on the next request after it exits (at most every 2 s).

use palisade_config::McpServerConfig;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

/// The protocol revision Palisade speaks to upstream servers.
pub const UPSTREAM_PROTOCOL: &str = "2025-06-18";
/// Largest message accepted from an upstream.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// Time allowed for one upstream request.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Minimum time between two starts of the same server.
const RESTART_GAP: Duration = Duration::from_secs(2);

/// Why an upstream request failed.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// The server answered with a JSON-RPC error (passed on to the agent as is).
    Rpc(Value),
    /// The server could not be reached, died or timed out (safe text).
    Unavailable(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, Value>>>>>;

struct Running {
    /// Whole lines for the writer task, the only owner of the child's stdin: a cancelled caller
    /// can never leave half a message behind, and the reader never waits on stdin.
    lines: tokio::sync::mpsc::Sender<String>,
    pending: Pending,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    _child: Mutex<Child>,
}

/// One stdio MCP server.
pub struct StdioServer {
    /// Its configuration.
    pub config: McpServerConfig,
    running: tokio::sync::Mutex<Option<Arc<Running>>>,
    last_start: Mutex<Option<Instant>>,
    tools: Mutex<Option<Vec<Value>>>,
    tools_stale: Arc<AtomicBool>,
    /// Told the server's name when its tools change (agents' event streams listen).
    changed: Option<tokio::sync::broadcast::Sender<String>>,
    /// Where its progress notifications go.
    progress: crate::progress::Routes,
    /// Fills `${vault:NAME}` in its environment.
    credentials: Option<Arc<dyn palisade_gateway::CredentialSource>>,
}

impl StdioServer {
    /// A server, not started yet.
    pub fn new(config: McpServerConfig) -> Self {
        Self {
            config,
            running: tokio::sync::Mutex::new(None),
            last_start: Mutex::new(None),
            tools: Mutex::new(None),
            tools_stale: Arc::new(AtomicBool::new(false)),
            changed: None,
            progress: crate::progress::Routes::default(),
            credentials: None,
        }
    }

    /// Fills `${vault:NAME}` references in its environment from `source` at each start.
    pub fn with_credentials(mut self, source: Arc<dyn palisade_gateway::CredentialSource>) -> Self {
        self.credentials = Some(source);
        self
    }

    /// Passes this server's progress notifications to the calls registered in `routes`.
    pub fn with_progress(mut self, routes: crate::progress::Routes) -> Self {
        self.progress = routes;
        self
    }

    /// Reports tool-list changes of this server on `changed`.
    pub fn with_notifier(mut self, changed: tokio::sync::broadcast::Sender<String>) -> Self {
        self.changed = Some(changed);
        self
    }

    /// Sends a request and waits for its answer.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        let running = self.running().await?;
        call(&running, method, params).await
    }

    /// The server's tools (cached; fetched again after a `list_changed` notification or a
    /// restart).
    pub async fn tools(&self) -> Result<Vec<Value>, UpstreamError> {
        let running = self.running().await?;
        if !self.tools_stale.swap(false, Ordering::AcqRel)
            && let Some(tools) = self.lock_tools().clone()
        {
            return Ok(tools);
        }
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let page = call(&running, "tools/list", params).await?;
            if let Some(tools) = page.get("tools").and_then(Value::as_array) {
                all.extend(tools.iter().cloned());
            }
            cursor = page
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_string);
            if cursor.is_none() {
                break;
            }
        }
        *self.lock_tools() = Some(all.clone());
        Ok(all)
    }

    fn lock_tools(&self) -> std::sync::MutexGuard<'_, Option<Vec<Value>>> {
        self.tools.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn running(&self) -> Result<Arc<Running>, UpstreamError> {
        let mut slot = self.running.lock().await;
        if let Some(r) = slot.as_ref()
            && r.alive.load(Ordering::Acquire)
        {
            return Ok(r.clone());
        }
        {
            let mut last = self.last_start.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RESTART_GAP) {
                return Err(UpstreamError::Unavailable(format!(
                    "MCP server `{}` exited and is restarting; retry in a moment",
                    self.config.name
                )));
            }
            *last = Some(Instant::now());
        }
        let running = Arc::new(self.spawn()?);
        let init = call(
            &running,
            "initialize",
            json!({
                "protocolVersion": UPSTREAM_PROTOCOL,
                "capabilities": {},
                "clientInfo": { "name": "palisade", "version": env!("CARGO_PKG_VERSION") },
            }),
        )
        .await?;
        let info = init.get("serverInfo").cloned().unwrap_or_default();
        tracing::info!(server = %self.config.name, %info, "MCP server started");
        notify(&running, "notifications/initialized").await?;
        *self.lock_tools() = None;
        *slot = Some(running.clone());
        Ok(running)
    }

    fn spawn(&self) -> Result<Running, UpstreamError> {
        let c = &self.config;
        let program = resolve(&c.command).ok_or_else(|| {
            UpstreamError::Unavailable(format!(
                "MCP server `{}`: `{}` is not an executable file or on PATH",
                c.name, c.command
            ))
        })?;
        // The environment, with vault references filled in (the child is its only holder).
        let mut env = Vec::with_capacity(c.env.len());
        for (k, v) in &c.env {
            let value = match &self.credentials {
                Some(source) if v.expose().contains("${vault:") => {
                    palisade_gateway::expand_vault(v.expose(), source.as_ref()).map_err(|e| {
                        UpstreamError::Unavailable(format!(
                            "MCP server `{}`: environment variable `{k}`: {e}",
                            c.name
                        ))
                    })?
                }
                _ => zeroize::Zeroizing::new(v.expose().to_string()),
            };
            env.push((k.as_str(), value));
        }
        let mut cmd = Command::new(program);
        cmd.args(&c.args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &c.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| {
            UpstreamError::Unavailable(format!("MCP server `{}` could not start: {e}", c.name))
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(UpstreamError::Unavailable(format!(
                "MCP server `{}`: no stdio pipes",
                c.name
            )));
        };
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (lines, mut queued) = tokio::sync::mpsc::channel::<String>(256);
        let writer_alive = alive.clone();
        tokio::spawn(async move {
            let mut stdin: ChildStdin = stdin;
            while let Some(line) = queued.recv().await {
                let written = async {
                    stdin.write_all(line.as_bytes()).await?;
                    stdin.flush().await
                }
                .await;
                if written.is_err() {
                    writer_alive.store(false, Ordering::Release);
                    break;
                }
            }
        });
        tokio::spawn(read_loop(
            c.name.clone(),
            stdout,
            lines.clone(),
            pending.clone(),
            alive.clone(),
            Listeners {
                tools_stale: self.tools_stale.clone(),
                changed: self.changed.clone(),
                progress: self.progress.clone(),
            },
        ));
        let name = c.name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line: String = line.chars().take(2000).collect();
                tracing::debug!(server = %name, "{line}");
            }
        });
        Ok(Running {
            lines,
            pending,
            next_id: AtomicU64::new(1),
            alive,
            _child: Mutex::new(child),
        })
    }
}

async fn write_line(running: &Running, message: &Value) -> Result<(), UpstreamError> {
    let mut line = message.to_string();
    line.push('\n');
    running.lines.send(line).await.map_err(|_| {
        running.alive.store(false, Ordering::Release);
        UpstreamError::Unavailable("the MCP server's stdin closed".into())
    })
}

async fn notify(running: &Running, method: &str) -> Result<(), UpstreamError> {
    write_line(running, &json!({ "jsonrpc": "2.0", "method": method })).await
}

/// One request with one deadline for writing it and reading its answer; a server that misses it
/// is marked dead (its next use starts a new child and the old one is killed).
async fn call(running: &Running, method: &str, params: Value) -> Result<Value, UpstreamError> {
    match tokio::time::timeout(CALL_TIMEOUT, call_once(running, method, params)).await {
        Ok(result) => result,
        Err(_) => {
            running.alive.store(false, Ordering::Release);
            Err(UpstreamError::Unavailable(format!(
                "the MCP server did not take or answer `{method}` within {}s; it is restarted on the next request",
                CALL_TIMEOUT.as_secs()
            )))
        }
    }
}

/// Removes a waiter from the pending map when its call ends in any way (answer, error,
/// timeout, or the caller going away), so nothing is left behind.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

async fn call_once(running: &Running, method: &str, params: Value) -> Result<Value, UpstreamError> {
    let id = running.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    running
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, tx);
    let _guard = PendingGuard {
        pending: &running.pending,
        id,
    };
    let message = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
    write_line(running, &message).await?;
    match rx.await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(error)) => Err(UpstreamError::Rpc(error)),
        Err(_) => Err(UpstreamError::Unavailable(
            "the MCP server exited before it answered".into(),
        )),
    }
}

/// Who hears of a server's notifications.
struct Listeners {
    /// Set when its tools change.
    tools_stale: Arc<AtomicBool>,
    /// Told its name when its tools change.
    changed: Option<tokio::sync::broadcast::Sender<String>>,
    /// Progress of running calls.
    progress: crate::progress::Routes,
}

/// Reads the server's messages: answers go to their waiting callers, list changes mark the
/// tool cache stale, progress goes to the call it belongs to, and requests from the server
/// (sampling, roots, elicitation) are answered with "method not found": the gateway does not
/// pass them to agents yet.
async fn read_loop(
    name: String,
    stdout: tokio::process::ChildStdout,
    lines: tokio::sync::mpsc::Sender<String>,
    pending: Pending,
    alive: Arc<AtomicBool>,
    listeners: Listeners,
) {
    let Listeners {
        tools_stale,
        changed,
        progress,
    } = listeners;
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match read_bounded_line(&mut reader, &mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(server = %name, error = %e, "MCP server output refused; stopping it");
                break;
            }
        };
        if n == 0 {
            break;
        }
        let Ok(message) = serde_json::from_slice::<Value>(&buf) else {
            tracing::warn!(server = %name, "MCP server wrote a line that is not JSON; ignored");
            continue;
        };
        let id = message.get("id").and_then(Value::as_u64);
        if let Some(method) = message.get("method").and_then(Value::as_str) {
            progress.deliver(&message);
            if method == "notifications/tools/list_changed" {
                tools_stale.store(true, Ordering::Release);
                if let Some(tx) = &changed {
                    let _ = tx.send(name.clone());
                }
            }
            if let Some(request_id) = message.get("id") {
                let refusal = json!({ "jsonrpc": "2.0", "id": request_id, "error": {
                    "code": -32601,
                    "message": format!("`{method}` from a server is not supported through the Palisade MCP gateway"),
                }});
                let mut line = refusal.to_string();
                line.push('\n');
                // Never waits: a full queue drops the refusal (the server's own timeout handles it).
                let _ = lines.try_send(line);
            }
            continue;
        }
        let Some(id) = id else { continue };
        let waiter = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(tx) = waiter {
            let answer = match (message.get("result"), message.get("error")) {
                (Some(r), _) => Ok(r.clone()),
                (None, Some(e)) => Err(e.clone()),
                (None, None) => {
                    Err(json!({ "code": -32603, "message": "the MCP server sent an empty answer" }))
                }
            };
            let _ = tx.send(answer);
        }
    }
    alive.store(false, Ordering::Release);
    // Waiters see their channel closed: "exited before it answered".
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    tracing::warn!(server = %name, "MCP server exited; it restarts on the next request");
}

/// One line (without the newline) of at most [`MAX_LINE`] bytes; 0 at end of input.
async fn read_bounded_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(buf.len());
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&available[..i]);
                reader.consume(i + 1);
                return Ok(buf.len().max(1));
            }
            None => {
                let n = available.len();
                buf.extend_from_slice(available);
                reader.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(std::io::Error::other(format!(
                "a message over {MAX_LINE} bytes"
            )));
        }
    }
}

/// A program path: as given if it contains `/`, else looked up in Palisade's own PATH.
fn resolve(command: &str) -> Option<PathBuf> {
    if command.contains('/') {
        let p = PathBuf::from(command);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}
