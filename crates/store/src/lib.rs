//! The embedded SQLite backend of the [`palisade_core::store::Store`] port.
//!
//! One database file, `palisade.db`, in the data directory, in WAL mode with `synchronous=FULL` so
//! a committed transaction survives power loss. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`. Two connections: one for registry/token state, one for the audit chain,
//! so the audit group-commit writer never waits behind admin work.
//!
//! This crate knows SQL and nothing of HTTP, Cedar or tokens.

use palisade_core::session::SessionRecord;
use palisade_core::store::{
    AuditFacts, AuditSegment, ClientSecretRecord, RevocationRecord, SecretRecord, SigningKeyRecord,
    Store, StoreError, StoredAuditEvent,
};
use palisade_core::{Principal, PrincipalId, PrincipalKind, Timestamp};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The database file name inside the data directory.
pub const DB_FILE: &str = "palisade.db";

/// Numbered schema migrations; index + 1 is the version after applying it. Never edit a released
/// migration: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: principals, credentials, keys, revocations, audit chain.
    r#"
    CREATE TABLE principals (
        id         TEXT PRIMARY KEY,
        kind       TEXT NOT NULL,
        status     TEXT NOT NULL,
        owner      TEXT,
        data       TEXT NOT NULL,
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL
    );
    CREATE INDEX principals_kind ON principals(kind, id);
    CREATE INDEX principals_owner ON principals(owner);
    CREATE TABLE client_secrets (
        principal_id TEXT NOT NULL REFERENCES principals(id),
        secret_id    TEXT NOT NULL,
        hash         BLOB NOT NULL,
        created_ns   INTEGER NOT NULL,
        expires_ns   INTEGER,
        PRIMARY KEY (principal_id, secret_id)
    );
    CREATE TABLE signing_keys (
        kid         TEXT PRIMARY KEY,
        alg         TEXT NOT NULL,
        private_key BLOB NOT NULL,
        public_key  BLOB NOT NULL,
        created_ns  INTEGER NOT NULL,
        retired_ns  INTEGER
    );
    CREATE TABLE revocations (
        jti        TEXT PRIMARY KEY,
        expires_ns INTEGER NOT NULL
    );
    CREATE TABLE audit_events (
        seq       INTEGER PRIMARY KEY,
        event_id  TEXT NOT NULL UNIQUE,
        time_ns   INTEGER NOT NULL,
        kind      TEXT NOT NULL,
        principal TEXT,
        body      TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    CREATE INDEX audit_principal_time ON audit_events(principal, time_ns);
    "#,
    // 2: agent sessions. `data` is the JSON record; the columns are what queries select on.
    r#"
    CREATE TABLE sessions (
        sid         TEXT PRIMARY KEY,
        principal   TEXT NOT NULL,
        hard_end_ns INTEGER NOT NULL,
        ended       INTEGER NOT NULL DEFAULT 0,
        data        TEXT NOT NULL
    );
    CREATE INDEX sessions_hard_end ON sessions(hard_end_ns);
    CREATE INDEX sessions_principal ON sessions(principal);
    "#,
    // 3: pinned MCP tool definitions (hash of name, description, schema and annotations).
    r#"
    CREATE TABLE mcp_tool_pins (
        tool      TEXT PRIMARY KEY,
        hash      TEXT NOT NULL,
        pinned_ns INTEGER NOT NULL
    );
    "#,
    // 4: content written through Palisade by tainted sessions (cross-agent taint).
    r#"
    CREATE TABLE content_labels (
        resource   TEXT PRIMARY KEY,
        label      TEXT NOT NULL,
        session    TEXT NOT NULL,
        labeled_ns INTEGER NOT NULL
    );
    "#,
    // 5: signed checkpoints of the audit chain's head.
    r#"
    CREATE TABLE audit_checkpoints (
        seq  INTEGER PRIMARY KEY,
        data TEXT NOT NULL
    );
    "#,
    // 6: alerts raised by detection rules (key: rule and finding, so each is raised once).
    r#"
    CREATE TABLE alerts (
        key     TEXT PRIMARY KEY,
        time_ns INTEGER NOT NULL,
        data    TEXT NOT NULL
    );
    CREATE INDEX alerts_time ON alerts(time_ns);
    "#,
    // 7: how far each SIEM sink has delivered the audit log (at-least-once, durable).
    r#"
    CREATE TABLE audit_sink_cursors (
        name       TEXT PRIMARY KEY,
        seq        INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL
    );
    "#,
    // 8: segments of the audit chain sealed by a signed checkpoint, archived, then pruned; the
    // last one is where the stored chain now starts.
    r#"
    CREATE TABLE audit_segments (
        first_seq  INTEGER PRIMARY KEY,
        last_seq   INTEGER NOT NULL,
        last_hash  TEXT NOT NULL,
        archive    TEXT NOT NULL,
        checkpoint TEXT NOT NULL,
        pruned_ns  INTEGER NOT NULL
    );
    "#,
    // 9: no index on the audit log's principal: nothing looks events up by it (queries scan
    // the log in order), and with many agents every group commit rewrote a page of it per
    // agent, which halved append throughput.
    r#"
    DROP INDEX IF EXISTS audit_principal_time;
    "#,
    // 10: vault secrets (envelope-encrypted: wrapped data key, sealed value).
    r#"
    CREATE TABLE vault_secrets (
        name          TEXT PRIMARY KEY,
        version       INTEGER NOT NULL,
        description   TEXT NOT NULL,
        wrapped_key   BLOB NOT NULL,
        ciphertext    BLOB NOT NULL,
        master_key_id TEXT NOT NULL,
        created_ns    INTEGER NOT NULL,
        updated_ns    INTEGER NOT NULL
    );
    "#,
    // 11: approvals (human-in-the-loop): the record as JSON, its status for listing.
    r#"
    CREATE TABLE approvals (
        id           TEXT PRIMARY KEY,
        status       TEXT NOT NULL,
        requested_ns INTEGER NOT NULL,
        record       TEXT NOT NULL
    );
    CREATE INDEX approvals_status ON approvals (status, requested_ns);
    "#,
    // 12: audit facts: body fields kept as columns so queries filter without reading bodies
    // (`facts = 1` when filled; older events have 0 and queries read their bodies).
    r#"
    ALTER TABLE audit_events ADD COLUMN action TEXT;
    ALTER TABLE audit_events ADD COLUMN resource_type TEXT;
    ALTER TABLE audit_events ADD COLUMN facts INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// The background WAL checkpointer; stops (after a last checkpoint) when dropped.
pub struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    main: Mutex<Connection>,
    audit: Mutex<Connection>,
    /// Session counter snapshots: `synchronous=NORMAL`, so the once-a-second save never holds
    /// the WAL write lock through an fsync that an audit commit would wait behind. A crash can
    /// lose the last snapshots (the next FULL commit on any connection makes them durable).
    counters: Mutex<Connection>,
    /// Audit scans (queries, verification): readers of their own, so a long scan never holds
    /// the audit writer's connection (WAL readers do not block the writer); two, so two scans
    /// run at once.
    scans: [Mutex<Connection>; 2],
    /// An open handle on the database file, for the checkpointer's syncs. Opened once and
    /// closed only after every connection above (fields drop in declaration order): on Linux,
    /// closing any handle on a file drops every POSIX lock the process holds on it, SQLite's
    /// included. Keep it the last field.
    db_handle: Arc<std::fs::File>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn ns(t: Timestamp) -> i64 {
    i64::try_from(t.unix_nanos()).unwrap_or(i64::MAX)
}

fn ts(ns: i64) -> Timestamp {
    Timestamp::from_unix_nanos(i128::from(ns))
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`, applying pending migrations.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(data_dir)?;
        Self::open_file(&data_dir.join(DB_FILE))
    }

    /// Opens the store of an existing data directory; fails if there is none (no empty database
    /// is created by a mistyped path).
    pub fn open_existing(data_dir: &Path) -> Result<Self, StoreError> {
        let file = data_dir.join(DB_FILE);
        if !file.is_file() {
            return Err(StoreError::NotFound(format!(
                "database `{}` (is --data-dir right? the server creates it on first start)",
                file.display()
            )));
        }
        Self::open_file(&file)
    }

    fn open_file(file: &Path) -> Result<Self, StoreError> {
        let main = connect(file)?;
        migrate(&main)?;
        let audit = connect(file)?;
        let counters = connect(file)?;
        counters
            .execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(backend)?;
        let scans = [Mutex::new(connect(file)?), Mutex::new(connect(file)?)];
        let db_handle = Arc::new(
            std::fs::File::open(file)
                .map_err(|e| backend(format!("cannot open `{}`: {e}", file.display())))?,
        );
        Ok(Self {
            path: file.to_path_buf(),
            main: Mutex::new(main),
            audit: Mutex::new(audit),
            counters: Mutex::new(counters),
            scans,
            db_handle,
        })
    }

    /// Moves WAL checkpoints off the commit path: a thread with its own connection runs a
    /// passive checkpoint every `every`, and the request-serving connections stop checkpointing
    /// automatically (otherwise the commit that crosses 1,000 WAL pages copies them all into the
    /// database and fsyncs it while a request waits). Dropping the handle stops the thread.
    ///
    /// Under sustained writes a passive checkpoint never catches up with the writer, and SQLite
    /// then neither syncs the database file nor restarts the WAL: both grew without bound (a
    /// 10-second burst left a 700 MB WAL and 400 MB of dirty pages, whose final flush stalled
    /// commits for 200 ms). So after each passive checkpoint that copied pages but did not
    /// catch up, the thread syncs the database file itself, and once the WAL holds more than
    /// [`WAL_RESTART_FRAMES`] frames it runs a restart checkpoint, which holds writers while
    /// it copies what the last passive one left and syncs the database file.
    pub fn start_checkpointer(
        &self,
        every: std::time::Duration,
    ) -> Result<Checkpointer, StoreError> {
        self.start_checkpointer_with(every, WAL_RESTART_FRAMES)
    }

    fn start_checkpointer_with(
        &self,
        every: std::time::Duration,
        restart_frames: i64,
    ) -> Result<Checkpointer, StoreError> {
        let mut conn = connect(&self.path)?;
        // A restart checkpoint takes the write lock, then waits for readers of older snapshots
        // (a long audit query) while holding it: it gives up after ~5 ms of waiting in all, so
        // it never holds the audit writer up for longer (the WAL restarts on a later round).
        conn.busy_handler(Some(|attempt: i32| {
            if attempt >= 50 {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
            true
        }))
        .map_err(backend)?;
        for c in [self.main()?, self.audit()?, self.counters()?] {
            c.execute_batch("PRAGMA wal_autocheckpoint=0;")
                .map_err(backend)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let tick = std::time::Duration::from_millis(50).min(every);
        let db_file = self.path.clone();
        let db_handle = self.db_handle.clone();
        let thread = std::thread::Builder::new()
            .name("palisade-checkpoint".into())
            .spawn(move || {
                let mut waited = std::time::Duration::ZERO;
                while !stop_thread.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    waited += tick;
                    if waited >= every {
                        waited = std::time::Duration::ZERO;
                        if let Err(e) = checkpoint(&conn, &db_file, &db_handle, restart_frames) {
                            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                        }
                    }
                }
                // One last checkpoint so a clean stop leaves a short WAL behind.
                let _ = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);");
                // The connection closes before this thread's handle on the file.
                drop(conn);
                drop(db_handle);
            })
            .map_err(|e| backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn main(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.main.lock().map_err(|_| backend("store lock poisoned"))
    }

    fn counters(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.counters
            .lock()
            .map_err(|_| backend("store lock poisoned"))
    }

    fn audit(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.audit
            .lock()
            .map_err(|_| backend("audit store lock poisoned"))
    }

    /// A free scan connection, or a new one when both are busy (so scans never wait for each
    /// other, and a scan started inside another cannot deadlock).
    fn scan(&self) -> Result<ScanConn<'_>, StoreError> {
        for c in &self.scans {
            match c.try_lock() {
                Ok(guard) => return Ok(ScanConn::Pooled(guard)),
                // A scan that panicked left the connection as SQLite keeps it: usable.
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    return Ok(ScanConn::Pooled(p.into_inner()));
                }
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        Ok(ScanConn::Extra(connect(&self.path)?))
    }
}

/// WAL frames (pages, 4 KiB each) above which the checkpointer restarts the WAL: 64 MiB.
pub const WAL_RESTART_FRAMES: i64 = 16_384;

/// One round of the checkpointer (see [`SqliteStore::start_checkpointer`]).
fn checkpoint(
    conn: &Connection,
    db_file: &Path,
    db_handle: &std::fs::File,
    restart_frames: i64,
) -> Result<(), String> {
    let run = |mode: &str| -> Result<(i64, i64, i64), String> {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(|e| e.to_string())
    };
    // `log` frames in the WAL, `copied` of them in the database file so far.
    let (busy, log, copied) = run("PASSIVE")?;
    if busy == 0 && copied > 0 && copied < log {
        // SQLite syncs the database file only when a checkpoint catches up. (Through the
        // store's long-lived handle: opening and closing one here would drop SQLite's locks.)
        db_handle
            .sync_data()
            .map_err(|e| format!("cannot sync `{}`: {e}", db_file.display()))?;
    }
    if log > restart_frames {
        let (busy, log, _) = run("RESTART")?;
        // Busy: a reader or the writer was in the way; tried again next round.
        if busy != 0 && log > restart_frames.saturating_mul(4) {
            tracing::warn!(
                wal_frames = log,
                "the WAL cannot be restarted (long readers or a slow disk keep the checkpoint out); it keeps growing"
            );
        }
    }
    Ok(())
}

/// A connection for one audit scan.
enum ScanConn<'a> {
    Pooled(MutexGuard<'a, Connection>),
    Extra(Connection),
}

impl std::ops::Deref for ScanConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Self::Pooled(c) => c,
            Self::Extra(c) => c,
        }
    }
}

/// A row of an audit scan, read from the statement's current row: columns `seq, time_ns,
/// event_id, kind, principal, facts, action, resource_type, body, prev_hash, hash`, each
/// borrowed from SQLite, not copied.
struct ScanRow<'a>(&'a rusqlite::Row<'a>);

impl ScanRow<'_> {
    fn text(&self, i: usize) -> Option<&str> {
        self.0.get_ref(i).ok().and_then(|v| v.as_str().ok())
    }

    fn int(&self, i: usize) -> Option<i64> {
        self.0.get_ref(i).ok().and_then(|v| v.as_i64().ok())
    }
}

impl palisade_core::store::AuditRow for ScanRow<'_> {
    fn seq(&self) -> u64 {
        self.int(0).and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
    }
    fn time_ns(&self) -> i64 {
        self.int(1).unwrap_or(0)
    }
    fn event_id(&self) -> Option<&str> {
        self.text(2)
    }
    fn kind(&self) -> Option<&str> {
        self.text(3)
    }
    fn principal(&self) -> Option<&str> {
        self.text(4)
    }
    fn facts(&self) -> Option<(Option<&str>, Option<&str>)> {
        (self.int(5) == Some(1)).then(|| (self.text(6), self.text(7)))
    }
    fn body(&self) -> Result<&str, StoreError> {
        self.0
            .get_ref(8)
            .map_err(backend)?
            .as_str()
            .map_err(|e| backend(format!("an audit body is not text: {e}")))
    }
    fn prev_hash(&self) -> Option<&str> {
        self.text(9)
    }
    fn hash(&self) -> Option<&str> {
        self.text(10)
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        backend(format!(
            "cannot create data directory `{}`: {e}",
            dir.display()
        ))
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            backend(format!(
                "cannot restrict data directory `{}` to its owner: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

fn secret_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SecretRecord> {
    Ok(SecretRecord {
        name: r.get(0)?,
        version: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
        description: r.get(2)?,
        wrapped_key: r.get(3)?,
        ciphertext: r.get(4)?,
        master_key_id: r.get(5)?,
        created_ns: r.get(6)?,
        updated_ns: r.get(7)?,
    })
}

/// How long a connection waits for another connection's write lock before it fails.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sleeps between retries while another connection holds the write lock: short at first, then
/// at most [`BUSY_MAX_SLEEP`].
const BUSY_SLEEPS: [std::time::Duration; 5] = [
    std::time::Duration::from_micros(20),
    std::time::Duration::from_micros(50),
    std::time::Duration::from_micros(100),
    std::time::Duration::from_micros(200),
    std::time::Duration::from_micros(300),
];
const BUSY_MAX_SLEEP: std::time::Duration = std::time::Duration::from_micros(500);

/// The busy handler of every connection: `true` retries, `false` gives up with `SQLITE_BUSY`
/// once [`BUSY_TIMEOUT`] has passed (wall clock) since the wait began.
///
/// SQLite's own handler (`busy_timeout`) sleeps 1, 2, 5, 10, 15, 20, 25 ms between retries, so
/// an audit commit that meets the once-a-second session counters save, which holds the lock for
/// well under a millisecond, still waited 3 ms or more. That was the gateway's p99 tail. Writes
/// here hold the lock for a commit (at most one fsync), so retrying every few hundred
/// microseconds is cheap and ends the wait close to when the lock is free.
fn busy_wait() -> impl FnMut(i32) -> bool + Send + 'static {
    // A new wait starts whenever the attempt count does not grow (SQLite counts per statement
    // and may not reset the count between statements).
    let mut since = std::time::Instant::now();
    let mut last: Option<i32> = None;
    move |attempt| {
        let now = std::time::Instant::now();
        if last.is_none_or(|l| attempt <= l) {
            since = now;
        }
        last = Some(attempt);
        if now.duration_since(since) >= BUSY_TIMEOUT {
            return false;
        }
        let step = usize::try_from(attempt).unwrap_or(0);
        std::thread::sleep(BUSY_SLEEPS.get(step).copied().unwrap_or(BUSY_MAX_SLEEP));
        true
    }
}

fn connect(file: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(file)
        .map_err(|e| backend(format!("cannot open `{}`: {e}", file.display())))?;
    conn.busy_handler(Some(busy_wait())).map_err(backend)?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(backend)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version > known {
        return Err(backend(format!(
            "the database schema is version {version}, newer than this palisade knows ({known}); run a newer palisade"
        )));
    }
    for (index, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let next = index + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {next}; COMMIT;"
        ))
        .map_err(|e| backend(format!("migration {next} failed: {e}")))?;
    }
    Ok(())
}

fn kind_name(kind: PrincipalKind) -> &'static str {
    kind.prefix()
}

fn principal_from_row(data: String) -> Result<Principal, StoreError> {
    serde_json::from_str(&data)
        .map_err(|e| backend(format!("a stored principal does not parse: {e}")))
}

fn audit_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAuditEvent> {
    let seq: i64 = r.get(0)?;
    Ok(StoredAuditEvent {
        seq: u64::try_from(seq).unwrap_or(0),
        event_id: r.get(1)?,
        time_ns: r.get(2)?,
        kind: r.get(3)?,
        principal: r.get(4)?,
        body: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
        facts: if r.get::<_, i64>(8)? == 1 {
            Some(AuditFacts {
                action: r.get(9)?,
                resource_type: r.get(10)?,
            })
        } else {
            None
        },
    })
}

impl Store for SqliteStore {
    fn insert_principal(&self, p: &Principal) -> Result<(), StoreError> {
        let data = serde_json::to_string(p).map_err(backend)?;
        let result = self.main()?.execute(
            "INSERT INTO principals (id, kind, status, owner, data, created_ns, updated_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                p.id.to_string(),
                kind_name(p.kind()),
                p.status.as_str(),
                p.owner().map(ToString::to_string),
                data,
                ns(p.created_at),
                ns(p.updated_at)
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(p.id.to_string()))
            }
            Err(e) => Err(backend(e)),
        }
    }

    fn update_principal(&self, p: &Principal) -> Result<(), StoreError> {
        let data = serde_json::to_string(p).map_err(backend)?;
        let changed = self
            .main()?
            .execute(
                "UPDATE principals SET status = ?2, owner = ?3, data = ?4, updated_ns = ?5 WHERE id = ?1",
                params![p.id.to_string(), p.status.as_str(), p.owner().map(ToString::to_string), data, ns(p.updated_at)],
            )
            .map_err(backend)?;
        if changed == 0 {
            Err(StoreError::NotFound(p.id.to_string()))
        } else {
            Ok(())
        }
    }

    fn get_principal(&self, id: &PrincipalId) -> Result<Option<Principal>, StoreError> {
        let data: Option<String> = self
            .main()?
            .query_row(
                "SELECT data FROM principals WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        data.map(principal_from_row).transpose()
    }

    fn list_principals(&self, kind: Option<PrincipalKind>) -> Result<Vec<Principal>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached("SELECT data FROM principals WHERE ?1 IS NULL OR kind = ?1 ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map([kind.map(kind_name)], |r| r.get::<_, String>(0))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        rows.into_iter().map(principal_from_row).collect()
    }

    fn add_client_secret(
        &self,
        principal: &PrincipalId,
        s: &ClientSecretRecord,
    ) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "INSERT INTO client_secrets (principal_id, secret_id, hash, created_ns, expires_ns) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![principal.to_string(), s.secret_id, s.hash.as_slice(), ns(s.created_at), s.expires_at.map(ns)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn client_secrets(
        &self,
        principal: &PrincipalId,
    ) -> Result<Vec<ClientSecretRecord>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT secret_id, hash, created_ns, expires_ns FROM client_secrets WHERE principal_id = ?1 ORDER BY created_ns DESC",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([principal.to_string()], |r| {
                let hash: Vec<u8> = r.get(1)?;
                Ok((
                    r.get::<_, String>(0)?,
                    hash,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        rows.into_iter()
            .map(|(secret_id, hash, created, expires)| {
                let hash: [u8; 32] = hash
                    .try_into()
                    .map_err(|_| backend("a stored secret hash is not 32 bytes"))?;
                Ok(ClientSecretRecord {
                    secret_id,
                    hash,
                    created_at: ts(created),
                    expires_at: expires.map(ts),
                })
            })
            .collect()
    }

    fn expire_client_secrets(
        &self,
        principal: &PrincipalId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "UPDATE client_secrets SET expires_ns = ?2 WHERE principal_id = ?1 AND (expires_ns IS NULL OR expires_ns > ?2)",
                params![principal.to_string(), ns(at)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn delete_client_secrets(&self, principal: &PrincipalId) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "DELETE FROM client_secrets WHERE principal_id = ?1",
                [principal.to_string()],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn insert_signing_key(&self, k: &SigningKeyRecord) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "INSERT INTO signing_keys (kid, alg, private_key, public_key, created_ns, retired_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![k.kid, k.alg, k.private_key, k.public_key, ns(k.created_at), k.retired_at.map(ns)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn retire_signing_key(&self, kid: &str, at: Timestamp) -> Result<(), StoreError> {
        let changed = self
            .main()?
            .execute(
                "UPDATE signing_keys SET retired_ns = ?2 WHERE kid = ?1 AND retired_ns IS NULL",
                params![kid, ns(at)],
            )
            .map_err(backend)?;
        if changed == 0 {
            Err(StoreError::NotFound(format!("active signing key `{kid}`")))
        } else {
            Ok(())
        }
    }

    fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached("SELECT kid, alg, private_key, public_key, created_ns, retired_ns FROM signing_keys ORDER BY created_ns, kid")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SigningKeyRecord {
                    kid: r.get(0)?,
                    alg: r.get(1)?,
                    private_key: r.get(2)?,
                    public_key: r.get(3)?,
                    created_at: ts(r.get(4)?),
                    retired_at: r.get::<_, Option<i64>>(5)?.map(ts),
                })
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn insert_revocation(&self, r: &RevocationRecord) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "INSERT OR IGNORE INTO revocations (jti, expires_ns) VALUES (?1, ?2)",
                params![r.jti, ns(r.expires_at)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn live_revocations(&self, now: Timestamp) -> Result<Vec<RevocationRecord>, StoreError> {
        let conn = self.main()?;
        conn.execute("DELETE FROM revocations WHERE expires_ns <= ?1", [ns(now)])
            .map_err(backend)?;
        let mut stmt = conn
            .prepare_cached("SELECT jti, expires_ns FROM revocations")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RevocationRecord {
                    jti: r.get(0)?,
                    expires_at: ts(r.get(1)?),
                })
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn insert_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        let data = serde_json::to_string(session).map_err(backend)?;
        self.main()?
            .execute(
                "INSERT INTO sessions (sid, principal, hard_end_ns, ended, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    session.sid,
                    session.principal.to_string(),
                    ns(session.hard_end),
                    session.end.is_some(),
                    data
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict(format!("session {}", session.sid))
                }
                e => backend(e),
            })?;
        Ok(())
    }

    fn end_sessions(&self, sessions: &[SessionRecord]) -> Result<(), StoreError> {
        let mut conn = self.main()?;
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut stmt = tx
                .prepare_cached("UPDATE sessions SET ended = 1, data = ?2 WHERE sid = ?1")
                .map_err(backend)?;
            for s in sessions {
                let data = serde_json::to_string(s).map_err(backend)?;
                stmt.execute(params![s.sid, data]).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn save_session_counters(&self, sessions: &[SessionRecord]) -> Result<(), StoreError> {
        let mut conn = self.counters()?;
        let tx = conn.transaction().map_err(backend)?;
        {
            // Never overwrite an end with an older snapshot taken before it.
            let mut stmt = tx
                .prepare_cached("UPDATE sessions SET data = ?2 WHERE sid = ?1 AND ended = 0")
                .map_err(backend)?;
            for s in sessions.iter().filter(|s| s.end.is_none()) {
                let data = serde_json::to_string(s).map_err(backend)?;
                stmt.execute(params![s.sid, data]).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn sessions_since(&self, since: Timestamp) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            // Also ended sessions whose `session.ended` event was never written (a crash between
            // storing the end and auditing it), so the sweeper writes it now.
            .prepare_cached(
                "SELECT data FROM sessions WHERE hard_end_ns >= ?1 \
                 OR (ended = 1 AND json_extract(data, '$.audited') = 0)",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([ns(since)], |r| r.get::<_, String>(0))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        rows.iter()
            .map(|d| serde_json::from_str(d).map_err(|e| backend(format!("session row: {e}"))))
            .collect()
    }

    fn mark_sessions_audited(&self, sids: &[String]) -> Result<(), StoreError> {
        // The counters connection (synchronous=NORMAL): losing this mark in a crash only means
        // the end is audited once more after the restart.
        let mut conn = self.counters()?;
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE sessions SET data = json_set(data, '$.audited', json('true')) WHERE sid = ?1",
                )
                .map_err(backend)?;
            for sid in sids {
                stmt.execute([sid]).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn prune_sessions(&self, before: Timestamp) -> Result<(), StoreError> {
        self.main()?
            .execute("DELETE FROM sessions WHERE hard_end_ns < ?1", [ns(before)])
            .map_err(backend)?;
        Ok(())
    }

    fn get_session(&self, sid: &str) -> Result<Option<SessionRecord>, StoreError> {
        let data: Option<String> = self
            .main()?
            .query_row("SELECT data FROM sessions WHERE sid = ?1", [sid], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend)?;
        data.map(|d| serde_json::from_str(&d).map_err(|e| backend(format!("session row: {e}"))))
            .transpose()
    }

    fn put_content_label(
        &self,
        resource: &str,
        label: &str,
        session: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "INSERT INTO content_labels (resource, label, session, labeled_ns) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(resource) DO UPDATE SET label = excluded.label, session = excluded.session, labeled_ns = excluded.labeled_ns",
                params![resource, label, session, ns(at)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn put_alert(&self, key: &str, time_ns: i64, alert: &str) -> Result<bool, StoreError> {
        let n = self
            .main()?
            .execute(
                "INSERT OR IGNORE INTO alerts (key, time_ns, data) VALUES (?1, ?2, ?3)",
                params![key, time_ns, alert],
            )
            .map_err(backend)?;
        Ok(n == 1)
    }

    fn alerts(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached("SELECT data FROM alerts ORDER BY time_ns DESC LIMIT ?1")
            .map_err(backend)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map([limit], |r| r.get(0))
            .map_err(backend)?
            .collect::<Result<Vec<String>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn put_approval(
        &self,
        id: &str,
        status: &str,
        requested_ns: i64,
        record: &str,
    ) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "INSERT INTO approvals (id, status, requested_ns, record) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record",
                params![id, status, requested_ns, record],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn approvals(&self, status: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let conn = self.main()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match status {
            Some(st) => conn
                .prepare_cached(
                    "SELECT record FROM approvals WHERE status = ?1 ORDER BY requested_ns DESC LIMIT ?2",
                )
                .map_err(backend)?
                .query_map(params![st, limit], |r| r.get(0))
                .map_err(backend)?
                .collect::<Result<Vec<String>, _>>(),
            None => conn
                .prepare_cached("SELECT record FROM approvals ORDER BY requested_ns DESC LIMIT ?1")
                .map_err(backend)?
                .query_map([limit], |r| r.get(0))
                .map_err(backend)?
                .collect::<Result<Vec<String>, _>>(),
        };
        rows.map_err(backend)
    }

    fn get_approval(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.main()?
            .query_row("SELECT record FROM approvals WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend)
    }

    fn sink_cursor(&self, sink: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .main()?
            .query_row(
                "SELECT seq FROM audit_sink_cursors WHERE name = ?1",
                [sink],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
    }

    fn put_sink_cursor(&self, sink: &str, seq: u64, at: Timestamp) -> Result<(), StoreError> {
        let seq = i64::try_from(seq).map_err(|_| StoreError::Backend("seq overflow".into()))?;
        self.main()?
            .execute(
                "INSERT INTO audit_sink_cursors (name, seq, updated_ns) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, updated_ns = excluded.updated_ns",
                params![sink, seq, ns(at)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn put_audit_checkpoint(&self, seq: u64, checkpoint: &str) -> Result<(), StoreError> {
        let seq = i64::try_from(seq).map_err(|_| StoreError::Backend("seq overflow".into()))?;
        self.main()?
            .execute(
                "INSERT INTO audit_checkpoints (seq, data) VALUES (?1, ?2) \
                 ON CONFLICT(seq) DO UPDATE SET data = excluded.data",
                params![seq, checkpoint],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn audit_checkpoints(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached("SELECT data FROM audit_checkpoints ORDER BY seq DESC LIMIT ?1")
            .map_err(backend)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map([limit], |r| r.get(0))
            .map_err(backend)?
            .collect::<Result<Vec<String>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn content_labels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached("SELECT resource, label FROM content_labels")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn mcp_pins(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached("SELECT tool, hash FROM mcp_tool_pins")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn put_mcp_pin(&self, tool: &str, hash: &str, at: Timestamp) -> Result<(), StoreError> {
        self.main()?
            .execute(
                "INSERT INTO mcp_tool_pins (tool, hash, pinned_ns) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(tool) DO UPDATE SET hash = excluded.hash, pinned_ns = excluded.pinned_ns",
                params![tool, hash, ns(at)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn audit_head(&self) -> Result<Option<StoredAuditEvent>, StoreError> {
        self.audit()?
            .query_row(
                "SELECT seq, event_id, time_ns, kind, principal, body, prev_hash, hash, facts, action, resource_type FROM audit_events ORDER BY seq DESC LIMIT 1",
                [],
                audit_from_row,
            )
            .optional()
            .map_err(backend)
    }

    fn append_audit(&self, events: &[StoredAuditEvent]) -> Result<(), StoreError> {
        let mut conn = self.audit()?;
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO audit_events (seq, event_id, time_ns, kind, principal, body, prev_hash, hash, facts, action, resource_type) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(backend)?;
            for e in events {
                let seq = i64::try_from(e.seq).map_err(backend)?;
                stmt.execute(params![
                    seq,
                    e.event_id,
                    e.time_ns,
                    e.kind,
                    e.principal,
                    e.body,
                    e.prev_hash,
                    e.hash,
                    i64::from(e.facts.is_some()),
                    e.facts.as_ref().and_then(|f| f.action.as_deref()),
                    e.facts.as_ref().and_then(|f| f.resource_type.as_deref())
                ])
                .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn put_secret(&self, s: &SecretRecord) -> Result<(), StoreError> {
        let version = i64::try_from(s.version).map_err(backend)?;
        self.main()?
            .execute(
                "INSERT INTO vault_secrets (name, version, description, wrapped_key, ciphertext, master_key_id, created_ns, updated_ns) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT(name) DO UPDATE SET version = excluded.version, description = excluded.description, \
                 wrapped_key = excluded.wrapped_key, ciphertext = excluded.ciphertext, \
                 master_key_id = excluded.master_key_id, updated_ns = excluded.updated_ns",
                params![
                    s.name,
                    version,
                    s.description,
                    s.wrapped_key,
                    s.ciphertext,
                    s.master_key_id,
                    s.created_ns,
                    s.updated_ns
                ],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn get_secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        self.main()?
            .query_row(
                "SELECT name, version, description, wrapped_key, ciphertext, master_key_id, created_ns, updated_ns FROM vault_secrets WHERE name = ?1",
                [name],
                secret_from_row,
            )
            .optional()
            .map_err(backend)
    }

    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let conn = self.main()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, version, description, wrapped_key, ciphertext, master_key_id, created_ns, updated_ns FROM vault_secrets ORDER BY name",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([], secret_from_row)
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .main()?
            .execute("DELETE FROM vault_secrets WHERE name = ?1", [name])
            .map_err(backend)?;
        Ok(n > 0)
    }

    fn rewrap_secrets(&self, secrets: &[SecretRecord]) -> Result<(), StoreError> {
        let mut conn = self.main()?;
        let tx = conn.transaction().map_err(backend)?;
        for s in secrets {
            tx.execute(
                "UPDATE vault_secrets SET wrapped_key = ?2, master_key_id = ?3 WHERE name = ?1",
                params![s.name, s.wrapped_key, s.master_key_id],
            )
            .map_err(backend)?;
        }
        tx.commit().map_err(backend)
    }

    fn audit_seq_from_time(&self, time_ns: i64) -> Result<u64, StoreError> {
        let conn = self.audit()?;
        let (lo, hi): (Option<i64>, Option<i64>) = conn
            .query_row("SELECT MIN(seq), MAX(seq) FROM audit_events", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(backend)?;
        let (Some(mut lo), Some(hi)) = (lo, hi) else {
            return Ok(1);
        };
        let mut stmt = conn
            .prepare_cached("SELECT time_ns FROM audit_events WHERE seq >= ?1 ORDER BY seq LIMIT 1")
            .map_err(backend)?;
        // The first seq in [lo, hi + 1) whose time is at or after `time_ns`.
        let mut end = hi + 1;
        while lo < end {
            let mid = lo + (end - lo) / 2;
            let t: Option<i64> = stmt
                .query_row([mid], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            match t {
                Some(t) if t >= time_ns => end = mid,
                _ => lo = mid + 1,
            }
        }
        Ok(u64::try_from(lo).unwrap_or(1))
    }

    fn audit_seq_before(&self, time_ns: i64) -> Result<Option<u64>, StoreError> {
        let seq: Option<i64> = self
            .audit()?
            .query_row(
                "SELECT MAX(seq) FROM audit_events WHERE time_ns < ?1",
                [time_ns],
                |r| r.get(0),
            )
            .map_err(backend)?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()))
    }

    fn audit_segments(&self) -> Result<Vec<AuditSegment>, StoreError> {
        let conn = self.audit()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT first_seq, last_seq, last_hash, archive, checkpoint, pruned_ns FROM audit_segments ORDER BY first_seq",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AuditSegment {
                    first_seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    last_seq: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    last_hash: r.get(2)?,
                    archive: r.get(3)?,
                    checkpoint: r.get(4)?,
                    pruned_ns: r.get(5)?,
                })
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn prune_audit(&self, segment: &AuditSegment) -> Result<(), StoreError> {
        let mut conn = self.audit()?;
        let tx = conn.transaction().map_err(backend)?;
        let last = i64::try_from(segment.last_seq).map_err(backend)?;
        let first = i64::try_from(segment.first_seq).map_err(backend)?;
        tx.execute(
            "INSERT INTO audit_segments (first_seq, last_seq, last_hash, archive, checkpoint, pruned_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                first,
                last,
                segment.last_hash,
                segment.archive,
                segment.checkpoint,
                segment.pruned_ns
            ],
        )
        .map_err(backend)?;
        tx.execute("DELETE FROM audit_events WHERE seq <= ?1", [last])
            .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn read_audit_bodies(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let conn = self.audit()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, body FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(backend)?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![after, limit], |r| {
                Ok((u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get(1)?))
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }

    fn scan_audit(
        &self,
        after: u64,
        until: u64,
        visit: &mut dyn FnMut(&dyn palisade_core::store::AuditRow) -> bool,
    ) -> Result<(), StoreError> {
        // In chunks, each its own read transaction, so a long scan does not hold one WAL
        // snapshot (and keep checkpoints from finishing) for its whole length.
        const CHUNK: i64 = 65_536;
        let conn = self.scan()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, time_ns, event_id, kind, principal, facts, action, resource_type, body, \
                 prev_hash, hash FROM audit_events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(backend)?;
        let mut after = i64::try_from(after).unwrap_or(i64::MAX);
        let until = i64::try_from(until).unwrap_or(i64::MAX);
        loop {
            let mut rows = stmt.query(params![after, until, CHUNK]).map_err(backend)?;
            let mut seen = 0;
            while let Some(row) = rows.next().map_err(backend)? {
                seen += 1;
                after = row.get(0).map_err(backend)?;
                if !visit(&ScanRow(row)) {
                    return Ok(());
                }
            }
            if seen < CHUNK {
                return Ok(());
            }
        }
    }

    fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let conn = self.audit()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, event_id, time_ns, kind, principal, body, prev_hash, hash, facts, action, resource_type FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(backend)?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![after, limit], audit_from_row)
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_core::principal::TeamDetail;
    use palisade_core::{PrincipalDetail, Status};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("palisade-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn team(slug: &str) -> Principal {
        let now = Timestamp::now();
        Principal {
            id: PrincipalId::new(PrincipalKind::Team, slug).unwrap(),
            display_name: slug.into(),
            status: Status::Active,
            status_change: None,
            created_at: now,
            updated_at: now,
            detail: PrincipalDetail::Team(TeamDetail::default()),
        }
    }

    #[test]
    fn principals_persist_across_reopen_and_duplicates_conflict() {
        let dir = temp_dir("reopen");
        {
            let store = SqliteStore::open(&dir).unwrap();
            store.insert_principal(&team("alpha")).unwrap();
            assert!(matches!(
                store.insert_principal(&team("alpha")),
                Err(StoreError::Conflict(_))
            ));
        }
        let store = SqliteStore::open(&dir).unwrap();
        let all = store.list_principals(Some(PrincipalKind::Team)).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id.to_string(), "team:alpha");
        assert!(
            store
                .list_principals(Some(PrincipalKind::Agent))
                .unwrap()
                .is_empty()
        );
    }

    /// Two connections to a fresh store, the first holding the write lock (its transaction has
    /// inserted one row into table `t`).
    fn lock_held(name: &str) -> (Connection, Connection) {
        let dir = temp_dir(name);
        drop(SqliteStore::open(&dir).unwrap());
        let holder = connect(&dir.join(DB_FILE)).unwrap();
        let writer = connect(&dir.join(DB_FILE)).unwrap();
        holder
            .execute_batch("CREATE TABLE t (n INTEGER); BEGIN IMMEDIATE; INSERT INTO t VALUES (0);")
            .unwrap();
        (holder, writer)
    }

    #[test]
    fn a_write_waits_for_another_connections_lock_then_succeeds() {
        let (holder, writer) = lock_held("busy");
        let started = std::time::Instant::now();
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            holder.execute_batch("COMMIT").unwrap();
        });
        writer.execute("INSERT INTO t (n) VALUES (1)", []).unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(40));
        released.join().unwrap();
        let n: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn the_busy_handler_gives_up_after_the_timeout() {
        let (_holder, writer) = lock_held("busy-timeout");
        let started = std::time::Instant::now();
        let result = writer.execute("INSERT INTO t (n) VALUES (1)", []);
        let (code, waited) = (
            result.err().and_then(|e| e.sqlite_error_code()),
            started.elapsed(),
        );
        assert_eq!(
            code,
            Some(rusqlite::ErrorCode::DatabaseBusy),
            "a write behind a lock held for good fails as busy"
        );
        assert!(
            waited >= BUSY_TIMEOUT && waited < BUSY_TIMEOUT * 3,
            "gave up after {waited:?}"
        );
    }

    #[test]
    fn a_database_from_a_newer_palisade_is_refused() {
        let dir = temp_dir("newer");
        drop(SqliteStore::open(&dir).unwrap());
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let err = SqliteStore::open(&dir).err().unwrap().to_string();
        assert!(err.contains("newer than this palisade"), "{err}");
    }

    fn rows_in_main_file(dir: &Path) -> i64 {
        // `immutable=1` ignores the WAL: only checkpointed pages are visible.
        let uri = format!("file:{}?immutable=1", dir.join(DB_FILE).display());
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(uri, flags).unwrap();
        conn.query_row("SELECT count(*) FROM audit_events", [], |r| r.get(0))
            .unwrap_or(0)
    }

    fn event(seq: u64) -> StoredAuditEvent {
        StoredAuditEvent {
            seq,
            event_id: format!("e{seq}"),
            time_ns: 1,
            kind: "k".into(),
            principal: None,
            body: "{}".into(),
            prev_hash: "p".into(),
            hash: "h".into(),
            facts: None,
        }
    }

    #[test]
    fn sustained_writes_keep_the_wal_bounded() {
        let dir = temp_dir("wal-bound");
        let store = SqliteStore::open(&dir).unwrap();
        let checkpointer = store
            .start_checkpointer_with(std::time::Duration::from_millis(5), 256)
            .unwrap();
        // Back-to-back commits of ~8 KB each, about 40 MB in all, with no pause in which a
        // passive checkpoint could catch up with the writer.
        let body = "x".repeat(2_000);
        let mut prev = "0".repeat(64);
        for batch in 0..1_250u64 {
            let rows: Vec<StoredAuditEvent> = (0..4)
                .map(|i| {
                    let seq = batch * 4 + i + 1;
                    let hash = format!("{seq:064}");
                    StoredAuditEvent {
                        body: body.clone(),
                        prev_hash: std::mem::replace(&mut prev, hash.clone()),
                        hash,
                        ..event(seq)
                    }
                })
                .collect();
            store.append_audit(&rows).unwrap();
        }
        drop(checkpointer);
        let wal = std::fs::metadata(dir.join(format!("{DB_FILE}-wal"))).map_or(0, |m| m.len());
        // Without restarts the WAL holds every frame written: over 10,000 (40 MB).
        assert!(wal < 4_000 * 4_096, "the WAL grew to {wal} bytes");
        assert_eq!(rows_in_main_file(&dir), 5_000);
    }

    #[test]
    fn a_restart_checkpoint_never_holds_writers_behind_a_long_reader() {
        let dir = temp_dir("wal-reader");
        let store = SqliteStore::open(&dir).unwrap();
        let mut seq = 0;
        let mut append = |store: &SqliteStore, n: u64| {
            let rows: Vec<StoredAuditEvent> = (0..n)
                .map(|_| {
                    seq += 1;
                    StoredAuditEvent {
                        body: "y".repeat(3_000),
                        ..event(seq)
                    }
                })
                .collect();
            store.append_audit(&rows).unwrap();
        };
        append(&store, 50);
        // A reader holds a snapshot that the checkpoint cannot pass (like a long query).
        let reader = connect(&dir.join(DB_FILE)).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM audit_events;")
            .unwrap();
        append(&store, 50);
        let checkpointer = store
            .start_checkpointer_with(std::time::Duration::from_millis(5), 16)
            .unwrap();
        // Every round now wants to restart the WAL and finds the reader in the way.
        let mut slowest = std::time::Duration::ZERO;
        for _ in 0..40 {
            let started = std::time::Instant::now();
            append(&store, 1);
            slowest = slowest.max(started.elapsed());
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        // A checkpoint waiting on the reader with the write lock held would stall a write for
        // the whole busy timeout (5 s).
        assert!(slowest < std::time::Duration::from_secs(1), "{slowest:?}");
        reader.execute_batch("COMMIT").unwrap();
        drop(checkpointer);
        assert_eq!(rows_in_main_file(&dir), 140);
    }

    #[test]
    fn the_checkpointer_moves_committed_events_into_the_main_file() {
        let dir = temp_dir("checkpoint");
        let store = SqliteStore::open(&dir).unwrap();
        store.append_audit(&[event(1), event(2)]).unwrap();
        assert_eq!(
            rows_in_main_file(&dir),
            0,
            "events should still be only in the WAL"
        );
        let checkpointer = store
            .start_checkpointer(std::time::Duration::from_millis(20))
            .unwrap();
        store.append_audit(&[event(3)]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rows_in_main_file(&dir) < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(rows_in_main_file(&dir), 3);
        drop(checkpointer);
        assert_eq!(store.read_audit(0, 10).unwrap().len(), 3);
    }

    #[test]
    fn open_existing_refuses_a_missing_database() {
        let dir = temp_dir("missing");
        let err = SqliteStore::open_existing(&dir).err().unwrap().to_string();
        assert!(err.contains("--data-dir"), "{err}");
        assert!(!dir.join(DB_FILE).exists());
    }

    #[test]
    fn sessions_limit_expire_and_reload_with_their_end_and_counters() {
        use palisade_core::OffsetClock;
        use palisade_core::session::{EndReason, Sessions, StartError};
        let dir = temp_dir("sessions");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir).unwrap());
        let clock = Arc::new(OffsetClock::new());
        let agent = PrincipalId::new(PrincipalKind::Agent, "bot").unwrap();
        let sessions = Sessions::load(store.clone(), clock.clone(), 1, 60).unwrap();
        let a = sessions.start(&agent, 30, 2, None).unwrap();
        let b = sessions.start(&agent, 30, 2, None).unwrap();
        match sessions.start(&agent, 30, 2, None) {
            Err(StartError::Limit { limit, live, .. }) => {
                assert_eq!(limit, 2);
                assert_eq!(live.len(), 2);
            }
            other => panic!("expected the limit, got {other:?}"),
        }
        a.count_call();
        assert_eq!(a.take_object_read(0, Some(1), None), Ok((1, 1)));
        assert_eq!(a.take_object_read(0, Some(1), None), Err((2, 2)));
        sessions
            .end(std::slice::from_ref(&b), EndReason::Revoked, "admin", None)
            .unwrap();
        assert_eq!(sessions.check(&b.sid, &agent).unwrap_err().state, "revoked");
        assert!(sessions.check(&a.sid, &agent).is_ok());
        assert!(
            sessions.check("ses_nope", &agent).is_err(),
            "unknown ids fail closed"
        );

        clock.advance(30 * 60 + 10);
        let (due, error) = sessions.sweep();
        assert!(error.is_none());
        // Both ends are due for their audit event: the expiry and the unaudited revocation.
        let mut due: Vec<_> = due
            .iter()
            .map(|r| (r.sid.clone(), r.end.as_ref().unwrap().reason.as_str()))
            .collect();
        due.sort();
        let mut expected = vec![(a.sid.clone(), "expired"), (b.sid.clone(), "revoked")];
        expected.sort();
        assert_eq!(due, expected);
        assert!(sessions.sweep().0.is_empty(), "each end is handed out once");

        // Nobody wrote their audit events (as after a crash): a new process sees both ends and
        // the counters, and hands the ends out for auditing again.
        let reloaded = Sessions::load(store.clone(), clock.clone(), 1, 60).unwrap();
        let (again, _) = reloaded.sweep();
        assert_eq!(again.len(), 2, "unaudited ends are audited after a restart");
        for r in &again {
            reloaded.get(&r.sid).unwrap().audit_done();
        }
        reloaded
            .mark_audited(&again.iter().map(|r| r.sid.clone()).collect::<Vec<_>>())
            .unwrap();
        let a2 = reloaded.get(&a.sid).unwrap();
        assert_eq!(a2.end().unwrap().reason, EndReason::Expired);
        assert_eq!(a2.counters().objects_read, 1);
        assert_eq!(a2.counters().calls, 1);
        assert_eq!(
            reloaded.get(&b.sid).unwrap().end().unwrap().reason,
            EndReason::Revoked
        );
        assert!(reloaded.live_of(&agent).is_empty());
        // Past the linger time they are forgotten, and still refused.
        clock.advance(120);
        assert!(reloaded.sweep().1.is_none());
        assert!(reloaded.get(&a.sid).is_none());
        assert_eq!(reloaded.check(&a.sid, &agent).unwrap_err().state, "unknown");
        // Audited and past their linger, they are not loaded again.
        let third = Sessions::load(store.clone(), clock.clone(), 1, 60).unwrap();
        assert!(third.get(&a.sid).is_none() && third.get(&b.sid).is_none());
    }

    #[test]
    fn object_reads_never_exceed_the_limit_under_contention() {
        use palisade_core::OffsetClock;
        use palisade_core::session::Sessions;
        let dir = temp_dir("sessions-race");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir).unwrap());
        let sessions = Sessions::load(store, Arc::new(OffsetClock::new()), 2, 60).unwrap();
        let agent = PrincipalId::new(PrincipalKind::Agent, "racer").unwrap();
        let s = sessions.start(&agent, 30, 1, None).unwrap();
        let granted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if s.take_object_read(1, Some(500), Some(50)).is_ok() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            granted.load(Ordering::Relaxed),
            50,
            "the route limit holds exactly"
        );
        assert_eq!(s.counters().objects_read, 50);
    }
}
