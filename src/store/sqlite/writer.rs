//! The writer thread: it owns the write connection, folds the batches
//! queued while a commit was in flight into one transaction (group commit),
//! fails the batches of a poisoned epoch, and prunes old events.

use foldhash::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use rusqlite::{params, Connection};

use super::{history, lock, Shared};
use crate::error::{Error, Result};
use crate::model::{EventKind, Seq};
use crate::store::{Batch, Faults, Poison, TaskWrite};

/// Most batches folded into one transaction.
const MAX_GROUP: usize = 4096;

/// Prune old events once at least this many are past the line (one
/// DELETE for many events, and none for a burst too small to matter).
const PRUNE_SLACK: u64 = 64;

impl Shared {
    fn record_commit(&self, took: std::time::Duration, batches: usize, ok: bool) {
        lock(&self.commits).record(took, batches, ok);
    }
}

pub(super) fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Batch>,
    retention: Option<u64>,
    shared: Arc<Shared>,
) {
    // Batches of this epoch or older fail unwritten (see the failure rule),
    // with the error that poisoned it.
    let mut poisoned = Poison::default();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let (stale, live) = poisoned.split(&group);
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
                poisoned.record(epoch, e.clone());
            }
        }
        if writes {
            shared.record_commit(started.elapsed(), live.len(), result.is_ok());
        }
        drop(live);
        let poison = poisoned.outcome();
        for (batch, stale) in group.into_iter().zip(stale) {
            batch.complete(if stale { &poison } else { &result });
        }
        if let (Some(keep), true) = (retention, writes) {
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
            if history::write_task(&tx, w, expected)? != 1 {
                return Err(Error::Storage {
                    fault: crate::error::StorageFault::Conflict,
                    detail: format!("compare-and-set failed for task {}", w.task.task_id),
                });
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The last write of each task in the group, with the first write's expectation.
fn coalesce<'a>(group: &[&'a Batch]) -> HashMap<&'a str, (&'a TaskWrite, Option<Seq>)> {
    let mut out: HashMap<&str, (&TaskWrite, Option<Seq>)> = HashMap::default();
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
    if last < keep || last - keep < first + PRUNE_SLACK.min(keep) {
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
