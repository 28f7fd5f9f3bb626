//! Durable state behind the hub: task records updated by compare-and-set, an
//! append-only event log with a global `seq`, and tokens.
//!
//! **One design for both modes: a log, and a copy applied from it.** The
//! hub writes to the log alone; a group commit is one log entry
//! ([`entry`]: the group's events and the final row of each task it
//! changed). Reads that are not live state come from a SQLite copy that
//! [`copy`] applies from the log, in large batches, off the
//! acknowledgement path, with the same code in both modes:
//!
//! - one node: [`file::FileStore`], the log an append-only file of
//!   checksummed segments, the copy `agenthub.db`;
//! - a cluster: `cluster::log::ClusterStore`, the log a JetStream stream
//!   appended to by the leader, a copy on every node.
//!
//! [`sqlite`] is the copy's store; the offline tools (`agenthub check`,
//! `backup`, `token`) read it directly.
//!
//! The hub hands the store [`Batch`]es in `seq` order;
//! the store commits them (grouping concurrent batches into one commit),
//! then runs their callbacks, in the same order, with the outcome. A backend
//! may be asynchronous and its commits may fail or conflict (the log checks
//! that each event's `seq` is the next one): the hub applies nothing it has
//! not seen committed.
//!
//! **Failure rule.** Once a commit fails, every batch of that write epoch or
//! an older one that is still queued fails too, unwritten: those batches were
//! built on the state the failed commit would have made ([`Poison`], kept by
//! every writer). The hub then rebuilds its state from the store and
//! continues with a newer epoch (`hub/commit.rs`).

pub mod copy;
pub mod entry;
pub mod faults;
pub mod file;
pub mod ids;
pub mod row;
pub mod sqlite;

use std::sync::Arc;

use crate::error::Result;
use crate::event::EncodedEvent;
use crate::model::{Seq, Task, TokenRecord};

pub use faults::Faults;

/// Runs after the batch's commit, with its outcome.
pub type Callback = Box<dyn FnOnce(&Result<()>) + Send>;

/// A compare-and-set write of one task record.
#[derive(Debug)]
pub struct TaskWrite {
    /// The row's content ([`Task::row_copy`]: description and result live
    /// in the task's events).
    pub task: Task,
    /// `last_seq` of the stored record this write replaces; `None` for a new task.
    pub expected_last_seq: Option<Seq>,
    /// The row's body ([`row::body`]), encoded once: by the log's writer,
    /// or read from the log; the copy stores it as it is.
    body: std::sync::OnceLock<String>,
}

impl TaskWrite {
    pub fn new(task: Task, expected_last_seq: Option<Seq>) -> TaskWrite {
        TaskWrite {
            task,
            expected_last_seq,
            body: std::sync::OnceLock::new(),
        }
    }

    /// A write read back from a log, with the body it carried.
    pub fn with_body(task: Task, expected_last_seq: Option<Seq>, body: String) -> TaskWrite {
        TaskWrite {
            task,
            expected_last_seq,
            body: body.into(),
        }
    }

    /// The row's JSON body, encoded on first use.
    pub fn body(&self) -> &str {
        self.body.get_or_init(|| row::body(&self.task))
    }
}

/// Changes that become durable together.
#[derive(Default)]
pub struct Batch {
    /// The hub's write epoch when it built this batch (see the failure rule).
    pub epoch: u64,
    pub tasks: Vec<TaskWrite>,
    pub events: Vec<Arc<EncodedEvent>>,
    /// Run after the commit, in order (publish, acks, pushes to sidecars, RPC replies).
    pub callbacks: Vec<Callback>,
    /// A copy of a log kept elsewhere (cluster mode): the position in that
    /// log this batch brings the copy to, stored with it.
    pub position: Option<Seq>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        !self.has_writes() && self.callbacks.is_empty()
    }

    /// Does committing this batch write anything?
    pub fn has_writes(&self) -> bool {
        !self.tasks.is_empty() || !self.events.is_empty() || self.position.is_some()
    }

    /// Add a callback that runs after the commit.
    pub fn then(&mut self, f: impl FnOnce(&Result<()>) + Send + 'static) {
        self.callbacks.push(Box::new(f));
    }

    /// Run every callback, in order, with the batch's outcome.
    pub fn complete(self, result: &Result<()>) {
        for cb in self.callbacks {
            cb(result);
        }
    }
}

/// The failure rule as a writer keeps it: the newest poisoned epoch and
/// the error that poisoned it (every writer uses it: the log file's, the
/// SQLite store's and the cluster's).
#[derive(Default)]
pub struct Poison {
    epoch: u64,
    error: Option<crate::error::Error>,
}

impl Poison {
    /// Which batches of `group` fail unwritten (poisoned), and the others.
    pub fn split<'a>(&self, group: &'a [Batch]) -> (Vec<bool>, Vec<&'a Batch>) {
        let stale: Vec<bool> = group.iter().map(|b| self.poisons(b)).collect();
        let live = group
            .iter()
            .zip(&stale)
            .filter(|(_, s)| !**s)
            .map(|(b, _)| b)
            .collect();
        (stale, live)
    }

    /// Whether `b` fails unwritten: it was built on a change that failed.
    pub fn poisons(&self, b: &Batch) -> bool {
        self.error.is_some() && b.epoch <= self.epoch
    }

    /// A commit of batches up to `epoch` failed with `e`.
    pub fn record(&mut self, epoch: u64, e: crate::error::Error) {
        self.epoch = self.epoch.max(epoch);
        self.error = Some(e);
    }

    /// What a poisoned batch is completed with.
    pub fn outcome(&self) -> Result<()> {
        Err(self
            .error
            .clone()
            .unwrap_or(crate::error::Error::ShuttingDown))
    }
}

/// The most one change may take in a log without a smaller limit of its
/// own: far above any request or frame the hub accepts.
pub const MAX_CHANGE_BYTES: usize = 64 << 20;

/// Upper bounds (µs) of the commit-duration histogram buckets.
pub const COMMIT_BUCKETS_US: [u64; 10] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

/// How the store's commits went so far.
#[derive(Clone, Debug, Default)]
pub struct CommitStats {
    pub commits: u64,
    pub batches: u64,
    pub failed_commits: u64,
    pub total_us: u64,
    /// Cumulative counts per [`COMMIT_BUCKETS_US`] bound.
    pub buckets: [u64; COMMIT_BUCKETS_US.len()],
}

impl CommitStats {
    /// Count one commit of `batches` batches that took `took`.
    pub fn record(&mut self, took: std::time::Duration, batches: usize, ok: bool) {
        let us = took.as_micros() as u64;
        self.commits += 1;
        if !ok {
            self.failed_commits += 1;
        }
        self.batches += batches as u64;
        self.total_us += us;
        for (i, le) in COMMIT_BUCKETS_US.iter().enumerate() {
            if us <= *le {
                self.buckets[i] += 1;
            }
        }
    }
}

/// What the hub reads back at start (and after a failed commit).
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live tasks only (QUEUED, ASSIGNED, RUNNING).
    pub tasks: Vec<Task>,
    /// Highest seq ever assigned (0 for an empty store).
    pub last_seq: Seq,
    /// Stored tasks per state (index: `TaskState::ALL`), finished ones included.
    pub state_counts: [u64; 6],
    /// States of the finished tasks live tasks depend on.
    pub dependency_states: std::collections::HashMap<String, crate::model::TaskState>,
}

/// A `ListTasks` query as the store runs it.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub state: Option<crate::model::TaskState>,
    pub agent_id: Option<String>,
    /// Tasks created after this seq (the page token).
    pub after_created_seq: Seq,
    pub limit: usize,
}

/// One page of stored tasks and the seq it reflects.
#[derive(Clone, Debug, Default)]
pub struct TaskListing {
    pub tasks: Vec<Task>,
    pub as_of_seq: Seq,
}

/// What one retention pass removed.
#[derive(Clone, Debug, Default)]
pub struct Purged {
    pub task_ids: Vec<String>,
    /// Per state (index: `TaskState::ALL`).
    pub by_state: [u64; 6],
    pub events: u64,
    /// Highest seq removed.
    pub max_seq: Seq,
}

/// The storage seam. Writes are queued and asynchronous; reads are blocking
/// (call them from `spawn_blocking` on hot async paths).
pub trait Store: Send + Sync + 'static {
    /// Queue a batch. Batches commit in submission order.
    fn submit(&self, batch: Batch);
    /// Everything the hub keeps in memory, as committed.
    fn load(&self) -> Result<Loaded>;
    /// One stored task (finished ones included).
    fn get_task(&self, task_id: &str) -> Result<Option<Task>>;
    /// May a task with this id be stored? `false` is certain (a store that
    /// keeps a filter of its ids answers it without a read); `true` means
    /// "look it up".
    fn may_hold_task(&self, _task_id: &str) -> bool {
        true
    }
    /// The most bytes one change (one request's rows and events) may take
    /// in the log: what one entry takes. The hub checks a change against it
    /// before the change joins a group commit.
    fn max_change_bytes(&self) -> usize {
        MAX_CHANGE_BYTES
    }
    /// Checked with [`Store::max_change_bytes`] before a change of
    /// `task_id` is built: a store with injected faults can refuse one
    /// change here, as a change failing for a reason of its own would be.
    fn check_change(&self, _task_id: &str) -> Result<()> {
        Ok(())
    }
    /// A page of stored tasks in creation order, as of one seq.
    fn list_tasks(&self, filter: &ListFilter) -> Result<TaskListing>;
    /// Remove up to `limit` tasks finished before `cutoff_ms` (Unix ms), with
    /// their events. Never touches a live task.
    fn purge_finished(&self, cutoff_ms: i64, limit: usize) -> Result<Purged>;
    /// Bytes the store occupies on disk (for `/metrics`).
    fn disk_bytes(&self) -> u64;
    /// Up to `limit` events with `seq > after`, in order.
    fn read_events(&self, after: Seq, limit: usize) -> Result<Vec<EncodedEvent>>;
    /// The oldest seq still stored (events before it were pruned).
    fn first_retained_seq(&self) -> Seq;
    /// The highest seq that is durable.
    fn durable_seq(&self) -> Seq;
    /// The name of this log, made when it was created (SPEC §8 `log_id`).
    fn log_id(&self) -> String;
    /// Try a small write; `Ok` once the store takes writes again.
    fn probe(&self) -> Result<()>;
    /// Number of events currently stored.
    fn event_count(&self) -> u64;
    /// Commit statistics (for `/metrics`).
    fn commit_stats(&self) -> CommitStats;

    fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Mark a token revoked; false if no such token id.
    fn revoke_token(&self, id: &str) -> Result<bool>;

    /// Does the store keep a copy of a log written elsewhere (cluster
    /// mode)? Then it publishes events to the bus itself as it applies
    /// them, and the hub reloads its state whenever it starts writing.
    fn replicated(&self) -> bool {
        false
    }

    /// Finish every queued batch, then stop the writer.
    fn close(&self);
}
