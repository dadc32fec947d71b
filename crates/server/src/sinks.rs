//! SIEM sinks: one worker per `[[audit.sinks]]` entry delivers the audit log in order, at least
//! once, from a cursor kept in the store.
//!
//! INVARIANT (at-least-once): a sink's cursor advances only after its delivery succeeded
//! (a file synced, an HTTP 2xx, a syslog frame written), so an outage or a crash can repeat
//! events but never skip one. A new sink starts from the beginning of the log.
//! INVARIANT (fail-closed): required sinks report each delivery to the log's `SinkGate`;
//! while all of them fail, the enforcement points refuse requests.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade_audit::AuditLog;
use palisade_audit::siem;
use palisade_config::{SinkConfig, SinkFormat, SinkTarget, SyslogTransport};
use palisade_core::Clock;
use palisade_core::store::{Store, StoredAuditEvent};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

/// Longest wait between retries of a failing sink (required sinks retry sooner, since
/// requests wait on them).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF_REQUIRED: Duration = Duration::from_secs(2);
/// Longest a delivery may take before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What `palisade audit sinks` shows of one sink.
pub struct SinkStatus {
    config: SinkConfig,
    delivered: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<(String, i64)>>,
}

impl SinkStatus {
    /// The sink's state as JSON (never a header value or other credential).
    pub fn to_json(&self, head: u64) -> Value {
        let delivered = self.delivered.load(Ordering::Relaxed);
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (kind, target) = match &self.config.target {
            SinkTarget::File { path, .. } => ("file", path.display().to_string()),
            SinkTarget::Http { url, .. } if self.config.format == SinkFormat::Otlp => {
                ("otlp", url.to_string())
            }
            SinkTarget::Http { url, .. } => ("http", url.to_string()),
            SinkTarget::Syslog { address, .. } => ("syslog", address.clone()),
        };
        json!({
            "name": self.config.name,
            "kind": kind,
            "target": target,
            "format": self.config.format.as_str(),
            "required": self.config.required,
            "kinds": self.config.kinds,
            "delivered_seq": delivered,
            "lag": head.saturating_sub(delivered),
            "failing": error.is_some(),
            "consecutive_failures": self.failures.load(Ordering::Relaxed),
            "last_error": error.as_ref().map(|(e, _)| e),
            "failing_since_ns": error.as_ref().map(|(_, t)| t),
        })
    }
}

/// The running sinks.
pub struct Sinks {
    statuses: Vec<Arc<SinkStatus>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Sinks {
    /// Starts a worker per configured sink (checking each target first, so a bad CA file or
    /// an unwritable path stops the start with its name).
    pub fn start(
        configs: &[SinkConfig],
        store: Arc<dyn Store>,
        audit: &AuditLog,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let (stop, stop_rx) = watch::channel(false);
        let host = host_name();
        let mut statuses = Vec::new();
        let mut tasks = Vec::new();
        for config in configs {
            let deliver = Deliver::new(config, &host)?;
            if config.required {
                audit.gate().require(&config.name);
            }
            let status = Arc::new(SinkStatus {
                config: config.clone(),
                delivered: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            });
            statuses.push(status.clone());
            let worker = Worker {
                status,
                deliver,
                store: store.clone(),
                audit: audit.clone(),
                clock: clock.clone(),
            };
            tasks.push(tokio::spawn(worker.run(stop_rx.clone())));
        }
        Ok(Self {
            statuses,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// Every sink's state.
    pub fn status(&self, head: u64) -> Vec<Value> {
        self.statuses.iter().map(|s| s.to_json(head)).collect()
    }

    /// Waits until every sink that is not failing has delivered up to `head`, at most
    /// `limit`.
    pub async fn drain(&self, head: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let pending = self.statuses.iter().any(|s| {
                s.delivered.load(Ordering::Relaxed) < head
                    && s.last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_none()
            });
            if !pending {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the workers after their current delivery (cursors are stored; the next start
    /// resumes from them).
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = tokio::time::timeout(DELIVERY_TIMEOUT, task).await;
        }
    }
}

/// `GET /api/v1/audit/sinks`: each sink's delivery state, and whether requests are being
/// refused because the required ones fail.
pub async fn list(
    axum::extract::State(app): axum::extract::State<Arc<crate::App>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let head = *app.audit.head().borrow();
    axum::Json(json!({
        "head_seq": head,
        "refusing": app.audit.refusal(),
        "sinks": app.sinks.status(head),
    }))
    .into_response()
}

struct Worker {
    status: Arc<SinkStatus>,
    deliver: Deliver,
    store: Arc<dyn Store>,
    audit: AuditLog,
    clock: Arc<dyn Clock>,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let name = self.status.config.name.clone();
        let mut head = self.audit.head();
        let store = self.store.clone();
        let mut cursor = loop {
            let (store, n) = (store.clone(), name.clone());
            match tokio::task::spawn_blocking(move || store.sink_cursor(&n)).await {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) => self.failed(&format!("cannot read the sink's cursor: {e}")),
                Err(e) => self.failed(&format!("cannot read the sink's cursor: {e}")),
            }
            if wait(&mut stop, self.backoff()).await {
                return;
            }
        };
        self.status.delivered.store(cursor, Ordering::Relaxed);
        loop {
            if *stop.borrow() {
                return;
            }
            let batch = self.status.config.batch;
            let rows = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.read_audit(cursor, batch)).await
            };
            let rows = match rows {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    self.failed(&format!("cannot read the audit log: {e}"));
                    if wait(&mut stop, self.backoff()).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    self.failed(&format!("cannot read the audit log: {e}"));
                    return;
                }
            };
            let Some(last) = rows.last().map(|r| r.seq) else {
                // Caught up: wait for the next commit (or look again in a while).
                tokio::select! {
                    _ = head.changed() => {}
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            };
            let wanted: Vec<StoredAuditEvent> = rows
                .into_iter()
                .filter(|r| self.status.config.wants(&r.kind))
                .collect();
            let delivered = if wanted.is_empty() {
                Ok(())
            } else {
                match tokio::time::timeout(DELIVERY_TIMEOUT, self.deliver.send(&wanted)).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.deliver.reset();
                        Err(format!(
                            "delivery took longer than {} s",
                            DELIVERY_TIMEOUT.as_secs()
                        ))
                    }
                }
            };
            let stored = match delivered {
                Ok(()) => {
                    let (store, n, at) = (store.clone(), name.clone(), self.clock.now());
                    tokio::task::spawn_blocking(move || store.put_sink_cursor(&n, last, at))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| format!("cannot store the sink's cursor: {e}")))
                }
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => {
                    cursor = last;
                    self.status.delivered.store(last, Ordering::Relaxed);
                    self.status.failures.store(0, Ordering::Relaxed);
                    *self
                        .status
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                    self.audit.gate().report(&name, Ok(()));
                }
                Err(e) => {
                    self.failed(&e);
                    if wait(&mut stop, self.backoff()).await {
                        return;
                    }
                }
            }
        }
    }

    fn failed(&self, error: &str) {
        let n = self.status.failures.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut last = self
                .status
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let since = last.as_ref().map_or_else(
                || i64::try_from(self.clock.now().unix_nanos()).unwrap_or(i64::MAX),
                |(_, t)| *t,
            );
            *last = Some((error.to_string(), since));
        }
        self.audit
            .gate()
            .report(&self.status.config.name, Err(error));
        // The first failure and then every tenth, so an outage does not flood the log.
        if n == 1 || n.is_multiple_of(10) {
            tracing::warn!(sink = %self.status.config.name, failures = n, %error, "audit sink delivery failed; retrying");
        }
    }

    fn backoff(&self) -> Duration {
        let n = self.status.failures.load(Ordering::Relaxed).min(8);
        let max = if self.status.config.required {
            MAX_BACKOFF_REQUIRED
        } else {
            MAX_BACKOFF
        };
        (Duration::from_millis(250) * (1u32 << n)).min(max)
    }
}

/// Waits `d`; returns whether the sinks are stopping.
async fn wait(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => true,
        () = tokio::time::sleep(d) => *stop.borrow(),
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How a sink delivers a batch.
enum Deliver {
    File(FileSink),
    Http {
        client: HttpsClient,
        url: http::Uri,
        headers: Vec<(http::HeaderName, palisade_config::Sensitive)>,
        format: SinkFormat,
        host: String,
    },
    Syslog(SyslogSink),
}

impl Deliver {
    fn new(config: &SinkConfig, host: &str) -> Result<Self, String> {
        let at = format!("audit sink `{}`", config.name);
        match &config.target {
            SinkTarget::File {
                path,
                rotate_bytes,
                keep,
            } => {
                let sink = FileSink::open(path, *rotate_bytes, *keep, config.format)
                    .map_err(|e| format!("{at}: {e}"))?;
                Ok(Self::File(sink))
            }
            SinkTarget::Http {
                url,
                headers,
                ca_file,
            } => {
                let tls = palisade_mcp::remote::client_tls(ca_file.as_deref(), &at)?;
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(Duration::from_secs(5)));
                http.enforce_http(false);
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                Ok(Self::Http {
                    client: Client::builder(TokioExecutor::new()).build(connector),
                    url: url.clone(),
                    headers: headers.clone(),
                    format: config.format,
                    host: host.to_string(),
                })
            }
            SinkTarget::Syslog {
                address,
                transport,
                ca_file,
            } => {
                let tls = match transport {
                    SyslogTransport::Tls => Some(Arc::new(palisade_mcp::remote::client_tls(
                        ca_file.as_deref(),
                        &at,
                    )?)),
                    _ => None,
                };
                Ok(Self::Syslog(SyslogSink {
                    address: address.clone(),
                    transport: *transport,
                    tls,
                    cef: config.format == SinkFormat::Cef,
                    host: host.to_string(),
                    conn: None,
                }))
            }
        }
    }

    /// Forgets any open connection (after a timeout it may be half-written).
    fn reset(&mut self) {
        if let Self::Syslog(s) = self {
            s.conn = None;
        }
    }

    async fn send(&mut self, rows: &[StoredAuditEvent]) -> Result<(), String> {
        match self {
            Self::File(f) => f.append(rows),
            Self::Http {
                client,
                url,
                headers,
                format,
                host,
            } => {
                let body = match format {
                    SinkFormat::Hec => {
                        let mut out = String::new();
                        for r in rows {
                            out.push_str(&siem::hec_event(r, host).to_string());
                            out.push('\n');
                        }
                        out
                    }
                    SinkFormat::Otlp => siem::otlp_request(rows, host).to_string(),
                    SinkFormat::Ocsf => {
                        Value::Array(rows.iter().map(siem::ocsf_event).collect()).to_string()
                    }
                    _ => Value::Array(rows.iter().map(siem::json_event).collect()).to_string(),
                };
                let mut req = http::Request::post(url.clone())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| format!("cannot build the request: {e}"))?;
                for (name, value) in headers.iter() {
                    if let Ok(v) = http::HeaderValue::from_str(value.expose()) {
                        req.headers_mut().insert(name.clone(), v);
                    }
                }
                let resp = client.request(req).await.map_err(|e| {
                    format!("POST {url}: {}", palisade_mcp::remote::error_chain(&e))
                })?;
                let status = resp.status();
                // Read (and drop) the answer so the connection can be reused.
                let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                    .collect()
                    .await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("POST {url}: HTTP {}", status.as_u16()))
                }
            }
            Self::Syslog(s) => s.send(rows).await,
        }
    }
}

/// JSON lines appended to a file, synced per batch, rotated by size.
struct FileSink {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    rotate_bytes: u64,
    keep: usize,
    format: SinkFormat,
}

impl FileSink {
    fn open(
        path: &Path,
        rotate_bytes: u64,
        keep: usize,
        format: SinkFormat,
    ) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {} for appending: {e}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            rotate_bytes,
            keep,
            format,
        })
    }

    fn append(&mut self, rows: &[StoredAuditEvent]) -> Result<(), String> {
        let mut buf = Vec::new();
        for r in rows {
            let line = match self.format {
                SinkFormat::Ocsf => siem::ocsf_event(r),
                _ => siem::json_event(r),
            };
            buf.extend_from_slice(line.to_string().as_bytes());
            buf.push(b'\n');
        }
        let shown = self.path.display().to_string();
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| format!("cannot write {shown}: {e}"))?;
        self.size += buf.len() as u64;
        if self.size >= self.rotate_bytes {
            self.rotate()
                .map_err(|e| format!("cannot rotate {shown}: {e}"))?;
        }
        Ok(())
    }

    /// `path` → `path.1` → ... → `path.<keep>` (the oldest dropped), then a fresh `path`.
    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

enum SyslogConn {
    Udp(tokio::net::UdpSocket),
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// RFC 5424 over UDP (a datagram per event), TCP or TLS (octet-counted frames, RFC 6587 and
/// RFC 5425), on one connection kept between batches.
struct SyslogSink {
    address: String,
    transport: SyslogTransport,
    tls: Option<Arc<rustls::ClientConfig>>,
    cef: bool,
    host: String,
    conn: Option<SyslogConn>,
}

impl SyslogSink {
    async fn connect(&self) -> Result<SyslogConn, String> {
        let at = &self.address;
        match self.transport {
            SyslogTransport::Udp => {
                let target = tokio::net::lookup_host(at)
                    .await
                    .map_err(|e| format!("cannot resolve {at}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{at} resolves to no address"))?;
                let local = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = tokio::net::UdpSocket::bind(local)
                    .await
                    .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
                socket
                    .connect(target)
                    .await
                    .map_err(|e| format!("cannot reach {at}: {e}"))?;
                Ok(SyslogConn::Udp(socket))
            }
            SyslogTransport::Tcp | SyslogTransport::Tls => {
                let stream = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(at.as_str()),
                )
                .await
                .map_err(|_| format!("connecting to {at} timed out"))?
                .map_err(|e| format!("cannot connect to {at}: {e}"))?;
                let _ = stream.set_nodelay(true);
                let Some(tls) = &self.tls else {
                    return Ok(SyslogConn::Tcp(stream));
                };
                let host = at.rsplit_once(':').map_or(at.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| {
                        format!(
                            "TLS with {at} failed: {}",
                            palisade_mcp::remote::error_chain(&e)
                        )
                    })?;
                Ok(SyslogConn::Tls(Box::new(stream)))
            }
        }
    }

    async fn send(&mut self, rows: &[StoredAuditEvent]) -> Result<(), String> {
        let pid = std::process::id();
        let messages: Vec<String> = rows
            .iter()
            .map(|r| siem::syslog_message(r, &self.host, pid, self.cef))
            .collect();
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let at = self.address.clone();
        let result = match self.conn.as_mut() {
            Some(SyslogConn::Udp(socket)) => {
                let mut r = Ok(());
                for m in &messages {
                    if let Err(e) = socket.send(m.as_bytes()).await {
                        r = Err(format!("cannot send to {at}: {e}"));
                        break;
                    }
                }
                r
            }
            Some(SyslogConn::Tcp(stream)) => write_frames(stream, &messages, &at).await,
            Some(SyslogConn::Tls(stream)) => write_frames(stream.as_mut(), &messages, &at).await,
            None => Err(format!("not connected to {at}")),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// Octet-counted frames (`LEN SP MSG`), written and flushed.
async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    messages: &[String],
    at: &str,
) -> Result<(), String> {
    let mut buf = Vec::new();
    for m in messages {
        buf.extend_from_slice(format!("{} ", m.len()).as_bytes());
        buf.extend_from_slice(m.as_bytes());
    }
    w.write_all(&buf)
        .await
        .and(w.flush().await)
        .map_err(|e| format!("cannot write to {at}: {e}"))
}

/// This machine's name for the records (`HOSTNAME`, `/etc/hostname`, or `-`).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".into())
}
