//! [`Store`] for [`SqliteStore`]: reads on a small pool of connections
//! (tasks, history, events, tokens), `submit` and `close` handing over to
//! the writer thread.

use std::sync::atomic::Ordering;

use rusqlite::params;

use super::{history, lock, tokens, SqliteStore};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::{EventKind, Seq, Task, TokenRecord};
use crate::store::{Batch, CommitStats, ListFilter, Loaded, Purged, Store, TaskListing};

/// A page of events read back stops once it holds this many bytes.
const MAX_READ_BYTES: usize = 4 * 1024 * 1024;

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
        // One read transaction: the live tasks as of the seq it reports
        // (the copy may be applied meanwhile).
        self.with_reader_mut(|conn| {
            let tx = conn.transaction()?;
            let loaded = load_in(&tx)?;
            tx.finish()?;
            Ok(loaded)
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
        self.with_reader(|conn| tokens::insert(conn, t))
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.with_reader(|conn| tokens::find(conn, hash))
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with_reader(tokens::list)
    }

    fn revoke_token(&self, id: &str) -> Result<bool> {
        self.with_reader(|conn| tokens::revoke(conn, id))
    }

    fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
    }
}

/// Everything the hub keeps in memory, as `conn` sees the store: call it
/// inside one read transaction, so that the live tasks are those of the
/// seq it reports.
pub(super) fn load_in(conn: &rusqlite::Connection) -> Result<Loaded> {
    let tasks = history::load_live(conn)?;
    let last_seq: Option<u64> = conn.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
    Ok(Loaded {
        dependency_states: history::dependency_states(conn, &tasks)?,
        tasks,
        last_seq: last_seq.unwrap_or(0).max(history::purged_upto(conn)?),
        state_counts: history::state_counts(conn)?,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::event::EncodedEvent;
    use crate::model::{EventKind, Seq, Task};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Batch, Store, TaskWrite};

    fn running(seq: Seq) -> Task {
        serde_json::from_value(serde_json::json!({
            "task_id": "task-1", "agent_id": "a-1", "metadata": {},
            "state": "RUNNING", "generation": 1, "attempts": 1, "max_attempts": 3,
            "priority": "NORMAL", "result": null, "error": null,
            "created_at_ms": 1, "updated_at_ms": seq, "last_seq": seq, "created_seq": 1,
        }))
        .expect("task")
    }

    /// One event of task-1 at `seq`, with its row.
    fn change(seq: Seq) -> Batch {
        Batch {
            epoch: seq,
            tasks: vec![TaskWrite::new(running(seq), (seq > 1).then_some(seq - 1))],
            events: vec![Arc::new(EncodedEvent::stored(
                seq,
                "task-1".into(),
                "a-1".into(),
                if seq == 1 {
                    EventKind::Created
                } else {
                    EventKind::Progress
                },
                Bytes::from_static(b"event"),
            ))],
            position: Some(seq),
            ..Batch::default()
        }
    }

    /// What the hub rebuilds from is one moment of the store: every live
    /// task as of the last seq it reports. A load that read the tasks and
    /// the last seq at two moments, while a copy was being applied, gave
    /// the hub a task older than its seq: its next change of that task
    /// expected a `last_seq` the log no longer held, and no copy could
    /// apply that entry.
    #[test]
    fn a_load_while_changes_commit_is_one_moment_of_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open_replica(dir.path(), "log-1").expect("open"));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                for seq in 1..=3_000 {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let mut b = change(seq);
                    b.then(move |r| {
                        let _ = tx.send(r.is_ok());
                    });
                    store.submit(b);
                    assert!(rx.recv().expect("outcome"), "commit {seq}");
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut loads = 0;
        while !done.load(Ordering::SeqCst) {
            let loaded = store.load().expect("load");
            loads += 1;
            if let Some(t) = loaded.tasks.first() {
                assert_eq!(
                    t.last_seq, loaded.last_seq,
                    "load {loads}: the task is older than the seq the load reports"
                );
            }
        }
        writer.join().expect("writer");
        assert!(loads > 10, "only {loads} loads ran beside the commits");
    }
}
