//! Task output (`task_output`) in its own SQLite file, `<data-dir>/output.db`.
//!
//! Output is bulk data, not lifecycle state, so it has its own file and its
//! own writer thread: an agent flooding output never holds the lifecycle
//! store's write lock nor grows its group commits. The writer takes every
//! chunk queued while it was committing in one transaction
//! (`synchronous=NORMAL` in WAL: a committed chunk survives a crash of the
//! hub process; the last moments before a power loss may not), gives each
//! chunk its offset, drops the oldest output of a task beyond the per-task
//! byte cap, and then reports the new end offsets (readers are woken only
//! for what is stored). The queue to the writer is bounded: an agent that
//! sends faster than the disk takes it is slowed down at its own socket.
//!
//! Offsets are UTF-8 byte offsets in the task's output, both streams in one
//! offset space, contiguous from 0. Dropping old output moves the start of
//! what is kept; offsets never change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::model::{Generation, OutputChunk, OutputStream};

/// Chunks queued to the writer before senders wait.
const QUEUE: usize = 1024;
/// Most chunks in one transaction.
const MAX_GROUP: usize = 4096;
/// Tasks whose offsets the writer remembers (more: it forgets and re-reads).
const MAX_TRACKED: usize = 10_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS task_output (
    task_id TEXT NOT NULL,
    offset INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    data TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, offset)
) WITHOUT ROWID;
";

/// Add the `generation` column to a table made before it existed (its
/// chunks read as generation 0: unknown).
fn migrate(conn: &Connection) -> Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('task_output') WHERE name = 'generation'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE task_output ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

/// Called after each commit with the tasks that got output and their new
/// end offsets.
pub type OnCommit = Box<dyn Fn(&[(String, u64)]) + Send>;

enum Cmd {
    Append {
        task_id: String,
        generation: Generation,
        stream: OutputStream,
        data: String,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
    /// Remove these tasks' output (retention).
    Purge(Vec<String>),
}

/// The output file: a writer thread and reader connections.
pub struct OutputStore {
    path: PathBuf,
    /// Queue to the writer thread; `None` once closed.
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    /// The writer thread, joined on close.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Idle reader connections.
    readers: Mutex<Vec<Connection>>,
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OutputStore {
    /// Open (or create) `<dir>/output.db`, keeping at most `cap_bytes` of
    /// output per task.
    pub fn open(dir: &Path, cap_bytes: u64, on_commit: OnCommit) -> Result<OutputStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::storage(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("output.db");
        let conn = open_conn(&path)?;
        // Before the first table of a new file: retention gives pages back.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("agenthub-output".into())
            .spawn(move || writer_loop(conn, rx, cap_bytes.max(1), on_commit))
            .map_err(|e| Error::storage(e.to_string()))?;
        Ok(OutputStore {
            path,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Cmd>> {
        lock(&self.tx).clone().ok_or(Error::ShuttingDown)
    }

    /// Queue a chunk written under `generation` (waits while the writer's
    /// queue is full).
    pub async fn append(
        &self,
        task_id: &str,
        generation: Generation,
        stream: OutputStream,
        data: String,
    ) -> Result<()> {
        let cmd = Cmd::Append {
            task_id: task_id.to_string(),
            generation,
            stream,
            data,
        };
        self.sender()?
            .send(cmd)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Wait until everything queued so far is committed.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Cmd::Flush(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Remove the output of these tasks (queued behind pending writes).
    pub fn purge(&self, task_ids: Vec<String>) {
        if let Ok(tx) = self.sender() {
            let _ = tx.try_send(Cmd::Purge(task_ids));
        }
    }

    /// Stored chunks of `task_id` from `after_offset` on, up to about
    /// `max_bytes`. A chunk that `after_offset` falls inside is cut to start
    /// there (at the next character boundary).
    pub fn read(
        &self,
        task_id: &str,
        after_offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<OutputChunk>> {
        let conn = lock(&self.readers).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let out = read_chunks(&conn, task_id, after_offset, max_bytes);
        let mut pool = lock(&self.readers);
        if pool.len() < 4 {
            pool.push(conn);
        }
        out
    }

    /// Finish queued writes and stop the writer.
    pub fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
    }
}

fn read_chunks(
    conn: &Connection,
    task_id: &str,
    after: u64,
    max_bytes: usize,
) -> Result<Vec<OutputChunk>> {
    let after_i = i64::try_from(after).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "SELECT offset, stream, data, generation FROM task_output \
         WHERE task_id = ?1 AND offset + length(CAST(data AS BLOB)) > ?2 ORDER BY offset",
    )?;
    let mut rows = stmt.query(params![task_id, after_i])?;
    let mut out = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let offset = row.get::<_, i64>(0)? as u64;
        let mut data: String = row.get(2)?;
        let mut start = offset;
        if offset < after {
            let mut cut = (after - offset) as usize;
            while cut < data.len() && !data.is_char_boundary(cut) {
                cut += 1;
            }
            data = data[cut.min(data.len())..].to_string();
            start = offset + cut as u64;
        }
        bytes += data.len();
        out.push(OutputChunk {
            task_id: task_id.to_string(),
            offset: start,
            stream: OutputStream::from_code(row.get(1)?),
            data,
            generation: row.get::<_, i64>(3)? as Generation,
        });
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// What the writer knows of a task's stored output.
#[derive(Clone, Copy)]
struct Span {
    /// Offset of the oldest chunk kept.
    first: u64,
    /// Offset just past the newest chunk.
    end: u64,
}

fn span_of(conn: &Connection, task_id: &str) -> Result<Span> {
    let row: Option<(i64, i64)> = conn
        .query_row(
            "SELECT MIN(offset), MAX(offset + length(CAST(data AS BLOB))) FROM task_output WHERE task_id = ?1",
            params![task_id],
            |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .optional()?
        .and_then(|(a, b)| Some((a?, b?)));
    Ok(match row {
        Some((first, end)) => Span {
            first: first as u64,
            end: end as u64,
        },
        None => Span { first: 0, end: 0 },
    })
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Cmd>, cap: u64, on_commit: OnCommit) {
    let mut spans: HashMap<String, Span> = HashMap::new();
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        if spans.len() > MAX_TRACKED {
            spans.clear();
        }
        let mut flushes = Vec::new();
        let purges = group.iter().any(|c| matches!(c, Cmd::Purge(_)));
        match write_group(&mut conn, group, cap, &mut spans, &mut flushes) {
            Ok(ends) => {
                if !ends.is_empty() {
                    on_commit(&ends);
                }
                if purges {
                    if let Err(e) = vacuum(&conn) {
                        tracing::debug!(error = %e, "incremental vacuum of task output failed");
                    }
                }
            }
            Err(e) => {
                // What is remembered may not be what is stored: re-read.
                spans.clear();
                tracing::warn!(error = %e, "storing task output failed; this output is lost");
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Give pages freed by retention back to the file system.
fn vacuum(conn: &Connection) -> Result<()> {
    let mut stmt = conn.prepare("PRAGMA incremental_vacuum")?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

fn write_group(
    conn: &mut Connection,
    group: Vec<Cmd>,
    cap: u64,
    spans: &mut HashMap<String, Span>,
    flushes: &mut Vec<oneshot::Sender<()>>,
) -> Result<Vec<(String, u64)>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut touched: Vec<String> = Vec::new();
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO task_output (task_id, offset, stream, data, generation) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut purge = tx.prepare_cached("DELETE FROM task_output WHERE task_id = ?1")?;
        for cmd in group {
            match cmd {
                Cmd::Append {
                    task_id,
                    generation,
                    stream,
                    mut data,
                } => {
                    if data.is_empty() {
                        continue;
                    }
                    let span = match spans.get(&task_id) {
                        Some(s) => *s,
                        None => span_of(&tx, &task_id)?,
                    };
                    let mut offset = span.end;
                    let len = data.len() as u64;
                    if len > cap {
                        // Only the newest `cap` bytes of it can be kept.
                        let mut cut = (len - cap) as usize;
                        while !data.is_char_boundary(cut) {
                            cut += 1;
                        }
                        data = data[cut..].to_string();
                        offset += cut as u64;
                    }
                    insert.execute(params![
                        task_id,
                        offset as i64,
                        stream.code(),
                        data,
                        generation as i64
                    ])?;
                    let end = offset + data.len() as u64;
                    let first = if span.end == 0 && span.first == 0 {
                        offset
                    } else {
                        span.first
                    };
                    spans.insert(task_id.clone(), Span { first, end });
                    if !touched.contains(&task_id) {
                        touched.push(task_id);
                    }
                }
                Cmd::Flush(done) => flushes.push(done),
                Cmd::Purge(ids) => {
                    for id in ids {
                        purge.execute(params![id])?;
                        spans.remove(&id);
                    }
                }
            }
        }
        // Keep at most `cap` bytes per task: drop whole chunks from the start.
        let mut trim =
            tx.prepare_cached("DELETE FROM task_output WHERE task_id = ?1 AND offset < ?2")?;
        let mut first_kept =
            tx.prepare_cached("SELECT MIN(offset) FROM task_output WHERE task_id = ?1")?;
        for id in &touched {
            let Some(span) = spans.get_mut(id) else {
                continue;
            };
            let floor = span.end.saturating_sub(cap);
            if span.first < floor {
                trim.execute(params![id, floor as i64])?;
                let first: Option<i64> = first_kept.query_row(params![id], |r| r.get(0))?;
                span.first = first.map(|f| f as u64).unwrap_or(span.end);
            }
        }
    }
    tx.commit()?;
    Ok(touched
        .into_iter()
        .filter_map(|id| spans.get(&id).map(|s| (id.clone(), s.end)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table made before generations were kept gains the column; its
    /// chunks read as generation 0 and new ones keep theirs.
    #[tokio::test]
    async fn an_old_output_table_is_migrated_and_keeps_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("output.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE task_output (task_id TEXT NOT NULL, offset INTEGER NOT NULL, \
             stream INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (task_id, offset)) WITHOUT ROWID;
             INSERT INTO task_output VALUES ('t', 0, 1, 'old\n');",
        )
        .unwrap();
        drop(conn);
        let store = OutputStore::open(dir.path(), 1 << 20, Box::new(|_| {})).unwrap();
        store
            .append("t", 3, OutputStream::Stdout, "new\n".into())
            .await
            .unwrap();
        store.flush().await.unwrap();
        let chunks = store.read("t", 0, usize::MAX).unwrap();
        let seen: Vec<_> = chunks
            .iter()
            .map(|c| (c.offset, c.generation, c.data.as_str()))
            .collect();
        assert_eq!(seen, vec![(0, 0, "old\n"), (4, 3, "new\n")]);
        store.close();
        // Opened again: nothing to migrate, nothing changed.
        let store = OutputStore::open(dir.path(), 1 << 20, Box::new(|_| {})).unwrap();
        assert_eq!(store.read("t", 0, usize::MAX).unwrap().len(), 2);
        store.close();
    }
}
