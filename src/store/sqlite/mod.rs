//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! One writer thread owns the write connection and commits every batch queued
//! while the previous commit was in flight as one transaction (group commit).
//! Reads use a small pool of separate connections. A commit that fails
//! poisons its write epoch (see [`super`]): queued batches of that epoch fail
//! unwritten until the hub moves to a newer one.
//!
//! This file holds the schema, the connections and opening the store;
//! `writer.rs` the writer thread, `read.rs` the [`Store`](super::Store)
//! impl (the read side), `tokens.rs` the token queries, `history.rs` the
//! task and history queries, `output.rs` streamed output.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OptionalExtension};

pub mod history;
pub mod output;
mod read;
mod tokens;
mod writer;

use super::{Batch, CommitStats, Faults, Loaded};
use crate::error::{Error, Result};
use crate::model::Seq;
use writer::writer_loop;

/// Page size of a new database.
const PAGE_SIZE: i64 = 16 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    body TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    -- The event as an encoded agenthub.v1.TaskEvent.
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    agent_id TEXT,
    created_at_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
";

struct Shared {
    durable_seq: AtomicU64,
    first_seq: AtomicU64,
    event_count: AtomicU64,
    commits: Mutex<CommitStats>,
    faults: Option<Arc<Faults>>,
    /// A copy of a log kept elsewhere (cluster mode): seqs may skip numbers
    /// (the log's own entries that are not events), and commits need not
    /// reach the disk before they are acknowledged (the log is the record).
    replica: bool,
}

/// SQLite-backed [`Store`](super::Store).
pub struct SqliteStore {
    path: std::path::PathBuf,
    tx: Mutex<Option<mpsc::Sender<Batch>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    shared: Arc<Shared>,
    log_id: String,
}

/// How long a write waits for a lock held by another process (an outside
/// reader or backup) before the commit fails.
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_conn(path: &Path) -> Result<Connection> {
    open_conn_with(path, "FULL")
}

fn open_conn_with(path: &Path, synchronous: &str) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // A new database: these must come before anything creates the file (WAL
    // mode does). Only then: setting auto_vacuum takes the write lock. 16 KiB
    // pages: a task's events (a 2 KB result is common) leave far less slack
    // at the end of each page than with 4 KiB ones.
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    if pages == 0 {
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (or create) `<dir>/agenthub.db`. `writer`: start the writer
    /// thread (the hub); without it the store only serves reads and token
    /// commands (`agenthub token ...`).
    pub fn open(dir: &Path, retention: Option<u64>, writer: bool) -> Result<SqliteStore> {
        Self::open_with_faults(dir, retention, writer, None)
    }

    /// Open `<dir>/agenthub.db` as a local copy of the log named `log_id`
    /// (cluster mode). A copy of another log is removed first. Seqs may
    /// skip numbers, and commits are not synced: the copy is rebuilt from
    /// the log it follows.
    pub fn open_replica(dir: &Path, log_id: &str) -> Result<SqliteStore> {
        Self::open_replica_with_faults(dir, log_id, None)
    }

    /// [`SqliteStore::open_replica`] with fault injection (tests, fault drills).
    pub fn open_replica_with_faults(
        dir: &Path,
        log_id: &str,
        faults: Option<Arc<Faults>>,
    ) -> Result<SqliteStore> {
        let path = dir.join("agenthub.db");
        if path.exists() {
            let conn = open_conn_with(&path, "NORMAL")?;
            let stored: Option<String> = conn
                .query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
                    r.get(0)
                })
                .ok();
            drop(conn);
            if stored.as_deref() != Some(log_id) {
                tracing::info!(dir = %dir.display(), "local copy belongs to another log; starting it afresh");
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(dir.join(format!("agenthub.db{suffix}")));
                }
            }
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::storage(format!("create {}: {e}", dir.display())))?;
        {
            let conn = open_conn_with(&path, "NORMAL")?;
            conn.execute_batch(SCHEMA)?;
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('log_id', ?1)",
                params![log_id],
            )?;
        }
        Self::open_inner(dir, None, true, faults, true)
    }

    /// Open `<dir>/agenthub.db` as the query copy of the single node's log
    /// file (see [`crate::store::file`]): commits are not synced (the log
    /// is the record; the copy is synced at checkpoints, before the log
    /// drops what it copied). `log_id`: the log's name when the log has
    /// records; a copy of another log is refused, never removed.
    pub fn open_copy(
        dir: &Path,
        log_id: Option<&str>,
        retention: Option<u64>,
    ) -> Result<SqliteStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::storage(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("agenthub.db");
        {
            let conn = open_conn_with(&path, "NORMAL")?;
            conn.execute_batch(SCHEMA)?;
            if let Some(id) = log_id {
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('log_id', ?1)",
                    params![id],
                )?;
                let stored: String =
                    conn.query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
                        r.get(0)
                    })?;
                if stored != id {
                    return Err(Error::Storage {
                        fault: crate::error::StorageFault::Corrupt,
                        detail: format!(
                            "{} is the copy of log {stored}, but the log in {} is {id}: \
                             they come from different data directories",
                            path.display(),
                            dir.join("log").display()
                        ),
                    });
                }
            }
        }
        Self::open_inner(dir, retention, true, None, true)
    }

    /// Make everything committed to the copy durable (a WAL checkpoint,
    /// which syncs the WAL and the database).
    pub fn checkpoint(&self) -> Result<()> {
        self.with_reader(|conn| {
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
            Ok(())
        })
    }

    /// Call `f` with every stored task id.
    pub fn for_each_task_id(&self, mut f: impl FnMut(&str)) -> Result<()> {
        self.with_reader(|conn| {
            // The smallest index that holds every id (the table itself holds
            // whole rows).
            let mut stmt = conn.prepare("SELECT task_id FROM tasks INDEXED BY tasks_by_created")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                if let Ok(id) = row.get_ref(0)?.as_str() {
                    f(id);
                }
            }
            Ok(())
        })
    }

    /// How far into the log it copies this copy holds (the last
    /// [`Batch::position`] committed; 0 for a new copy).
    pub fn log_position(&self) -> Result<Seq> {
        self.with_reader(|conn| {
            let v: Option<String> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'log_position'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
        })
    }

    /// [`Store::load`] and [`SqliteStore::log_position`] as of one moment
    /// (one read transaction), for laying the records the copy lacks over it.
    pub fn load_with_position(&self) -> Result<(Loaded, Seq)> {
        self.with_reader_mut(|conn| {
            let tx = conn.transaction()?;
            let loaded = read::load_in(&tx)?;
            let v: Option<String> = tx
                .query_row(
                    "SELECT value FROM meta WHERE key = 'log_position'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            tx.finish()?;
            Ok((loaded, v.and_then(|v| v.parse().ok()).unwrap_or(0)))
        })
    }

    /// Verify integrity (see [`history::check`]): the problems found.
    pub fn check(&self) -> Result<Vec<String>> {
        self.with_reader(history::check)
    }

    /// A consistent copy of the database at `to`, taken while the hub may
    /// be writing (SQLite's online backup).
    pub fn backup_to(&self, to: &Path) -> Result<()> {
        self.with_reader(|conn| {
            conn.backup(rusqlite::MAIN_DB, to, None)?;
            Ok(())
        })
    }

    /// [`SqliteStore::open`] with fault injection (tests, fault drills).
    pub fn open_with_faults(
        dir: &Path,
        retention: Option<u64>,
        writer: bool,
        faults: Option<Arc<Faults>>,
    ) -> Result<SqliteStore> {
        Self::open_inner(dir, retention, writer, faults, false)
    }

    fn open_inner(
        dir: &Path,
        retention: Option<u64>,
        writer: bool,
        faults: Option<Arc<Faults>>,
        replica: bool,
    ) -> Result<SqliteStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::storage(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("agenthub.db");
        let conn = open_conn_with(&path, if replica { "NORMAL" } else { "FULL" })?;

        conn.execute_batch(SCHEMA)?;
        history::migrate(&conn)?;
        let purged = history::purged_upto(&conn)?;
        let pruned = history::pruned_below(&conn)?;
        let (first, last, count): (Option<u64>, Option<u64>, u64) =
            conn.query_row("SELECT MIN(seq), MAX(seq), COUNT(*) FROM events", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        let log_id = log_id(&conn)?;
        // Retention may have removed the newest events too: the log's head
        // is never lower than what it removed (seqs are never reused).
        let head = last.unwrap_or(0).max(purged);
        let shared = Arc::new(Shared {
            durable_seq: AtomicU64::new(head),
            // A replica's seqs skip the log's non-event entries: what it
            // holds starts right after what retention removed.
            first_seq: AtomicU64::new(if replica {
                (purged + 1).max(pruned).min(head + 1)
            } else {
                first
                    .unwrap_or(head + 1)
                    .max(purged + 1)
                    .max(pruned)
                    .min(head + 1)
            }),
            event_count: AtomicU64::new(count),
            commits: Mutex::new(CommitStats::default()),
            faults,
            replica,
        });
        let (tx, rx) = mpsc::channel::<Batch>();
        let writer = if writer {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name("agenthub-store".into())
                .spawn(move || writer_loop(conn, rx, retention, shared))
                .map_err(|e| Error::storage(e.to_string()))?;
            Some(handle)
        } else {
            None
        };
        Ok(SqliteStore {
            path,
            tx: Mutex::new(writer.as_ref().map(|_| tx)),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            shared,
            log_id,
        })
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.with_reader_mut(|c| f(c))
    }

    fn with_reader_mut<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let conn = lock(&self.readers).pop();
        let mut conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let out = f(&mut conn);
        let mut pool = lock(&self.readers);
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }
}

/// Lock a mutex whose data stays valid even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The log's name: made once when the database is created, kept for good.
fn log_id(conn: &Connection) -> Result<String> {
    let fresh = format!("log-{}", hex::encode(rand::random::<[u8; 8]>()));
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('log_id', ?1)",
        params![fresh],
    )?;
    Ok(
        conn.query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
            r.get(0)
        })?,
    )
}
