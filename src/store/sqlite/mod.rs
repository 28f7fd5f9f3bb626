//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! One writer thread owns the write connection and commits every batch queued
//! while the previous commit was in flight as one transaction (group commit).
//! Reads use a small pool of separate connections. A commit that fails
//! poisons its write epoch (see [`super`]): queued batches of that epoch fail
//! unwritten until the hub moves to a newer one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OptionalExtension};

pub mod history;
pub mod output;

use super::{
    Batch, CommitStats, Faults, ListFilter, Loaded, Purged, Store, TaskListing, TaskWrite,
};
use crate::error::{Error, Result};
use crate::model::{EventKind, Role, Seq, Task, TokenRecord};
use crate::pb::wire::EncodedEvent;

/// Page size of a new database.
const PAGE_SIZE: i64 = 16 * 1024;
/// Most batches folded into one transaction.
const MAX_GROUP: usize = 4096;
/// A page of events read back stops once it holds this many bytes.
const MAX_READ_BYTES: usize = 4 * 1024 * 1024;
/// Prune old events at most once per this many commits.
const PRUNE_EVERY: u64 = 64;

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

/// SQLite-backed [`Store`].
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

impl Shared {
    fn record_commit(&self, took: std::time::Duration, batches: usize, ok: bool) {
        lock(&self.commits).record(took, batches, ok);
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Batch>,
    retention: Option<u64>,
    shared: Arc<Shared>,
) {
    let mut commits: u64 = 0;
    // Batches of this epoch or older fail unwritten (see the failure rule),
    // with the error that poisoned it.
    let mut poisoned: (u64, Option<Error>) = (0, None);
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let stale: Vec<bool> = group
            .iter()
            .map(|b| poisoned.1.is_some() && b.epoch <= poisoned.0)
            .collect();
        let live: Vec<&Batch> = group
            .iter()
            .zip(&stale)
            .filter(|(_, s)| !**s)
            .map(|(b, _)| b)
            .collect();
        let writes = live.iter().any(|b| b.has_writes());
        let started = std::time::Instant::now();
        let result = if writes {
            let last = shared.durable_seq.load(Ordering::Acquire);
            write_group(
                &mut conn,
                &live,
                last,
                shared.faults.as_deref(),
                shared.replica,
            )
        } else {
            Ok(())
        };
        match &result {
            Ok(()) => {
                if let Some(last) = live.iter().rev().find_map(|b| b.events.last()) {
                    let n: usize = live.iter().map(|b| b.events.len()).sum();
                    shared.event_count.fetch_add(n as u64, Ordering::Relaxed);
                    shared.durable_seq.store(last.seq, Ordering::Release);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; queued changes of this epoch are dropped");
                let epoch = live.iter().map(|b| b.epoch).max().unwrap_or(0);
                poisoned = (poisoned.0.max(epoch), Some(e.clone()));
            }
        }
        if writes {
            shared.record_commit(started.elapsed(), live.len(), result.is_ok());
            commits += 1;
        }
        drop(live);
        let poison = Err(poisoned.1.clone().unwrap_or(Error::ShuttingDown));
        for (batch, stale) in group.into_iter().zip(stale) {
            batch.complete(if stale { &poison } else { &result });
        }
        if let (Some(keep), true, true) = (retention, writes, commits.is_multiple_of(PRUNE_EVERY)) {
            if let Err(e) = prune(&mut conn, keep, &shared) {
                tracing::warn!(error = %e, "event pruning failed");
            }
        }
    }
}

/// Commit `group` in one transaction. The log takes events only in order:
/// the first must follow `last_seq` and each the one before (a writer that
/// is behind, or that skipped, conflicts instead of leaving a hole).
fn write_group(
    conn: &mut Connection,
    group: &[&Batch],
    last_seq: Seq,
    faults: Option<&Faults>,
    replica: bool,
) -> Result<()> {
    if let Some(f) = faults {
        f.before_commit()?;
    }
    let mut prev = last_seq;
    for ev in group.iter().flat_map(|b| &b.events) {
        let expected = prev + 1;
        prev = ev.seq;
        if ev.seq != expected && !(replica && ev.seq > expected) {
            return Err(Error::Storage {
                fault: crate::error::StorageFault::Conflict,
                detail: format!("event seq {} where the log expects {expected}", ev.seq),
            });
        }
    }
    if faults.is_some_and(Faults::discards) {
        return Ok(());
    }
    // IMMEDIATE: take the write lock up front, so a lock held by another
    // process is waited for (up to BUSY_TIMEOUT) instead of failing midway.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut insert_event = tx.prepare_cached(
            "INSERT INTO events (seq, task_id, agent_id, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for batch in group {
            for ev in &batch.events {
                insert_event.execute(params![
                    ev.seq as i64,
                    ev.task_id,
                    ev.agent_id,
                    ev.kind.code(),
                    &ev.proto()[..]
                ])?;
            }
        }
        if let Some(position) = group.iter().rev().find_map(|b| b.position) {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('log_position', ?1)",
            )?
            .execute(params![position.to_string()])?;
        }
        // A task changed by several batches of the group is written once, with
        // its final state, checked against the state before the first change.
        for (w, expected) in coalesce(group).into_values() {
            let t = &w.task;
            if history::write_task(&tx, t, expected)? != 1 {
                return Err(Error::Storage {
                    fault: crate::error::StorageFault::Conflict,
                    detail: format!("compare-and-set failed for task {}", t.task_id),
                });
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The last write of each task in the group, with the first write's expectation.
fn coalesce<'a>(group: &[&'a Batch]) -> HashMap<&'a str, (&'a TaskWrite, Option<Seq>)> {
    let mut out: HashMap<&str, (&TaskWrite, Option<Seq>)> = HashMap::new();
    for w in group.iter().flat_map(|b| &b.tasks) {
        out.entry(w.task.task_id.as_str())
            .and_modify(|e| e.0 = w)
            .or_insert((w, w.expected_last_seq));
    }
    out
}

/// Keep the newest `keep` events for watch resumption. The CREATED and
/// COMPLETED events of tasks still stored are kept below that line: they
/// hold the task's description and result, which `GetTask` reads (they go
/// with their task when `--retention` removes it).
fn prune(conn: &mut Connection, keep: u64, shared: &Shared) -> Result<()> {
    let last = shared.durable_seq.load(Ordering::Acquire);
    let first = shared.first_seq.load(Ordering::Acquire);
    if last < keep || last - keep < first {
        return Ok(());
    }
    let new_first = last - keep + 1;
    let tx = conn.transaction()?;
    let n = tx.execute(
        "DELETE FROM events WHERE seq >= ?1 AND seq < ?2 AND NOT (kind IN (?3, ?4) \
         AND EXISTS (SELECT 1 FROM tasks t WHERE t.task_id = events.task_id))",
        params![
            first as i64,
            new_first as i64,
            EventKind::Created.code(),
            EventKind::Completed.code()
        ],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('pruned_below', ?1)",
        params![new_first.to_string()],
    )?;
    tx.commit()?;
    shared.first_seq.store(new_first, Ordering::Release);
    shared.event_count.fetch_sub(n as u64, Ordering::Relaxed);
    Ok(())
}

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = r.get(2)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        hash: r.get(1)?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        agent_id: r.get(3)?,
        created_at_ms: r.get(4)?,
        revoked: r.get::<_, i64>(5)? != 0,
    })
}

const TOKEN_COLS: &str = "id, hash, role, agent_id, created_at_ms, revoked";

impl Store for SqliteStore {
    fn submit(&self, batch: Batch) {
        let tx = lock(&self.tx);
        let unsent = match tx.as_ref() {
            Some(tx) => tx.send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        if let Some(batch) = unsent {
            batch.complete(&Err(Error::ShuttingDown));
        }
    }

    fn load(&self) -> Result<Loaded> {
        self.with_reader(|conn| {
            let tasks = history::load_live(conn)?;
            let last_seq: Option<u64> =
                conn.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
            Ok(Loaded {
                dependency_states: history::dependency_states(conn, &tasks)?,
                tasks,
                last_seq: last_seq.unwrap_or(0).max(history::purged_upto(conn)?),
                state_counts: history::state_counts(conn)?,
            })
        })
    }

    fn get_task(&self, task_id: &str) -> Result<Option<Task>> {
        self.with_reader(|conn| history::get(conn, task_id))
    }

    fn list_tasks(&self, filter: &ListFilter) -> Result<TaskListing> {
        self.with_reader_mut(|conn| history::list(conn, filter))
    }

    fn purge_finished(&self, cutoff_ms: i64, limit: usize) -> Result<Purged> {
        let purged = self.with_reader_mut(|conn| history::purge(conn, cutoff_ms, limit))?;
        if purged.max_seq > 0 {
            self.shared
                .event_count
                .fetch_sub(purged.events, Ordering::Relaxed);
            self.shared
                .first_seq
                .fetch_max(purged.max_seq + 1, Ordering::AcqRel);
        }
        Ok(purged)
    }

    fn disk_bytes(&self) -> u64 {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(p).ok().map(|m| m.len())
            })
            .sum()
    }

    fn read_events(&self, after: Seq, limit: usize) -> Result<Vec<EncodedEvent>> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, task_id, agent_id, kind, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            // Seqs are stored as SQLite integers (i64): a cursor beyond that
            // has nothing after it.
            let Ok(after) = i64::try_from(after) else {
                return Ok(Vec::new());
            };
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                let kind: i32 = r.get(3)?;
                Ok(EncodedEvent::stored(
                    r.get::<_, i64>(0)? as Seq,
                    r.get(1)?,
                    r.get(2)?,
                    EventKind::from_code(kind).unwrap_or(EventKind::Progress),
                    bytes::Bytes::copy_from_slice(r.get_ref(4)?.as_blob()?),
                ))
            })?;
            // A page of large events stops early: memory per read is bounded
            // in bytes, not only in events.
            let mut out = Vec::new();
            let mut bytes = 0;
            for ev in rows {
                let ev = ev?;
                bytes += ev.proto().len();
                out.push(ev);
                if bytes >= MAX_READ_BYTES {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn first_retained_seq(&self) -> Seq {
        self.shared.first_seq.load(Ordering::Acquire).max(1)
    }

    fn durable_seq(&self) -> Seq {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    fn event_count(&self) -> u64 {
        self.shared.event_count.load(Ordering::Relaxed)
    }

    fn commit_stats(&self) -> CommitStats {
        lock(&self.shared.commits).clone()
    }

    fn log_id(&self) -> String {
        self.log_id.clone()
    }

    fn probe(&self) -> Result<()> {
        if let Some(f) = &self.shared.faults {
            f.before_probe()?;
        }
        self.with_reader(|conn| {
            conn.execute_batch(
                "BEGIN IMMEDIATE; \
                 INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', strftime('%s','now')); \
                 COMMIT;",
            )
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
            Ok(())
        })
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        self.with_reader(|conn| {
            conn.execute(
                "INSERT INTO tokens (id, hash, role, agent_id, created_at_ms, revoked) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    t.id,
                    t.hash,
                    t.role.as_str(),
                    t.agent_id,
                    t.created_at_ms,
                    t.revoked as i64
                ],
            )?;
            Ok(())
        })
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.with_reader(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash = ?1"))?;
            Ok(stmt.query_row(params![hash], token_from_row).optional()?)
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at_ms, id"
            ))?;
            let rows = stmt.query_map([], token_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn revoke_token(&self, id: &str) -> Result<bool> {
        self.with_reader(|conn| {
            Ok(conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", params![id])? == 1)
        })
    }

    fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
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
