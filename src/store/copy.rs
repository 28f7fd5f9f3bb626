//! The query copy's applier, one for both modes: entries of the log (the
//! single node's log file records, the cluster's stream messages) become
//! commits of the SQLite copy, each of which records how far into the log
//! the copy is ([`Batch::position`]).
//!
//! The two modes differ only in how they read their log and when they
//! apply (the log file's applier thread gathers records for a few
//! milliseconds; a cluster node applies what its consumer delivered). What
//! an entry does to the copy is decided here:
//!
//! - its events are appended, except those the copy already holds (an
//!   entry read twice, across a restart or a new consumer, changes nothing);
//! - its task rows are written by compare-and-set against the rows the copy
//!   holds (the copy's writer coalesces the rows of one commit);
//! - an entry with nothing for the copy (a cluster's term entry) only moves
//!   the position on.
//!
//! Each commit is its own write epoch: one that fails fails alone, and its
//! retry (from what the copy holds) is a new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::sqlite::SqliteStore;
use super::{entry, Batch, Store, TaskWrite};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::Seq;

/// Applies log entries to a SQLite copy.
pub struct Applier {
    store: Arc<SqliteStore>,
    /// Write epoch of the next commit.
    next_epoch: AtomicU64,
}

impl Applier {
    pub fn new(store: Arc<SqliteStore>) -> Applier {
        Applier {
            store,
            next_epoch: AtomicU64::new(1),
        }
    }

    /// The copy itself (reads, checkpoints).
    pub fn store(&self) -> &Arc<SqliteStore> {
        &self.store
    }

    /// Start one commit of entries that follow what the copy holds.
    pub fn changes(&self) -> Changes {
        Changes {
            batch: Batch::default(),
            last_event: self.store.durable_seq(),
        }
    }

    /// Queue `changes` as one commit of the copy. Nothing to write (no
    /// entry added) completes at once.
    pub fn apply(&self, changes: Changes) -> Applying {
        let (tx, rx) = oneshot::channel();
        let mut batch = changes.batch;
        if batch.position.is_none() {
            let _ = tx.send(Ok(()));
            return Applying(rx);
        }
        batch.epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        batch.then(move |r| {
            let _ = tx.send(r.clone());
        });
        self.store.submit(batch);
        Applying(rx)
    }
}

/// The entries of one commit of the copy, in log order.
pub struct Changes {
    batch: Batch,
    /// The seq of the newest event the copy holds or this commit adds.
    last_event: Seq,
}

impl Changes {
    /// Add the entry at `position` (its events past those the copy holds,
    /// and its rows). `position` names it in errors.
    pub fn entry(&mut self, position: Seq, body: &Bytes) -> Result<()> {
        let (events, rows) = entry::decode(&position.to_string(), body)?;
        self.decoded(position, events, rows);
        Ok(())
    }

    /// [`Changes::entry`] for an entry already decoded (or never encoded:
    /// the log file's writer hands over what it appended). `rows` may
    /// change a task more than once: the copy's writer keeps the last.
    pub fn decoded(&mut self, position: Seq, events: Vec<Arc<EncodedEvent>>, rows: Vec<TaskWrite>) {
        self.batch.position = Some(position);
        match events.last() {
            // Held already: the rows were written with those events.
            Some(ev) if ev.seq <= self.last_event => return,
            Some(ev) => self.last_event = ev.seq,
            None => {}
        }
        self.batch.events.extend(events);
        self.batch.tasks.extend(rows);
    }

    /// Add an entry that holds nothing for the copy: the position moves on.
    pub fn pass(&mut self, position: Seq) {
        self.batch.position = Some(position);
    }

    /// The position the commit brings the copy to (`None`: nothing added).
    pub fn position(&self) -> Option<Seq> {
        self.batch.position
    }

    /// The task rows the commit writes, in order.
    pub fn tasks(&self) -> &[TaskWrite] {
        &self.batch.tasks
    }

    /// The events the commit adds, in order.
    pub fn events(&self) -> &[Arc<EncodedEvent>] {
        &self.batch.events
    }
}

/// A commit of the copy on its way.
pub struct Applying(oneshot::Receiver<Result<()>>);

impl Applying {
    /// Wait for the outcome on a thread that may block.
    pub fn wait(self) -> Result<()> {
        self.0.blocking_recv().unwrap_or_else(|_| Err(closed()))
    }

    /// Wait for the outcome on the runtime.
    pub async fn done(self) -> Result<()> {
        self.0.await.unwrap_or_else(|_| Err(closed()))
    }
}

fn closed() -> Error {
    Error::storage("the query copy closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as a log holds it: one CREATED event of `task` at `seq`,
    /// with the task's row.
    fn created(seq: Seq, task: &str) -> Bytes {
        let row: crate::model::Task = serde_json::from_value(serde_json::json!({
            "task_id": task, "agent_id": "a-1", "metadata": {},
            "state": "QUEUED", "generation": 0, "attempts": 0, "max_attempts": 3,
            "priority": "NORMAL", "result": null, "error": null,
            "created_at_ms": 1, "updated_at_ms": 1, "last_seq": seq,
        }))
        .expect("task");
        let batch = Batch {
            tasks: vec![TaskWrite::new(row, None)],
            events: vec![Arc::new(EncodedEvent::stored(
                seq,
                task.into(),
                "a-1".into(),
                crate::model::EventKind::Created,
                Bytes::from_static(b"event"),
            ))],
            ..Batch::default()
        };
        entry::encode([&batch])
    }

    #[test]
    fn an_entry_the_copy_holds_changes_nothing_and_a_pass_moves_the_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = Applier::new(Arc::new(
            SqliteStore::open_replica(dir.path(), "log-1").expect("open"),
        ));
        let mut first = copy.changes();
        first.entry(1, &created(1, "t1")).expect("entry");
        first.pass(2);
        first.entry(3, &created(2, "t2")).expect("entry");
        assert_eq!(first.position(), Some(3));
        copy.apply(first).wait().expect("apply");
        assert_eq!(copy.store().log_position().expect("position"), 3);
        assert_eq!(copy.store().durable_seq(), 2);

        // The same entries again (a new consumer from an older position),
        // then a new one: only the new one's event and row are written.
        let mut again = copy.changes();
        again.entry(1, &created(1, "t1")).expect("entry");
        again.entry(3, &created(2, "t2")).expect("entry");
        again.entry(4, &created(3, "t3")).expect("entry");
        assert_eq!(again.events().len(), 1);
        copy.apply(again).wait().expect("apply");
        assert_eq!(copy.store().durable_seq(), 3);
        assert_eq!(copy.store().event_count(), 3);
        assert!(copy.store().get_task("t3").expect("read").is_some());

        // Nothing added: nothing written, at once.
        copy.apply(copy.changes()).wait().expect("nothing");
        assert_eq!(copy.store().log_position().expect("position"), 4);
    }
}
