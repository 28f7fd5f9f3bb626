//! Durable state behind the hub: task records updated by compare-and-set, an
//! append-only event log with a global `seq`, and tokens.
//!
//! The hub is the only writer. It hands the store [`Batch`]es in `seq` order;
//! the store commits them (grouping concurrent batches into one transaction),
//! then publishes their events and runs their callbacks, in the same order.
//! A second backend (NATS JetStream: events in a stream, tasks in a KV bucket)
//! implements the same trait.

pub mod sqlite;

use std::sync::Arc;

use crate::auth::TokenRecord;
use crate::error::Result;
use crate::model::{EncodedEvent, Seq, Task};

/// Runs after the batch's commit, with its outcome.
pub type Callback = Box<dyn FnOnce(&Result<()>) + Send>;
/// Receives every committed event, in `seq` order, right after its commit.
pub type Publisher = Box<dyn Fn(&[Arc<EncodedEvent>]) + Send>;

/// A compare-and-set write of one task record.
#[derive(Debug)]
pub struct TaskWrite {
    pub task: Task,
    /// `last_seq` of the stored record this write replaces; `None` for a new task.
    pub expected_last_seq: Option<Seq>,
}

/// Changes that become durable together.
#[derive(Default)]
pub struct Batch {
    pub tasks: Vec<TaskWrite>,
    pub events: Vec<Arc<EncodedEvent>>,
    /// Run after the commit, in order (acks, pushes to sidecars, RPC replies).
    pub callbacks: Vec<Callback>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.events.is_empty() && self.callbacks.is_empty()
    }

    /// Add a callback that runs after the commit.
    pub fn then(&mut self, f: impl FnOnce(&Result<()>) + Send + 'static) {
        self.callbacks.push(Box::new(f));
    }
}

/// Upper bounds (µs) of the commit-duration histogram buckets.
pub const COMMIT_BUCKETS_US: [u64; 10] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

/// How the store's commits went so far.
#[derive(Clone, Debug, Default)]
pub struct CommitStats {
    pub commits: u64,
    pub batches: u64,
    pub total_us: u64,
    /// Cumulative counts per [`COMMIT_BUCKETS_US`] bound.
    pub buckets: [u64; COMMIT_BUCKETS_US.len()],
}

/// What the hub reads back at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tasks: Vec<Task>,
    /// Highest seq ever assigned (0 for an empty store).
    pub last_seq: Seq,
}

/// The storage seam. Writes are queued and asynchronous; reads are blocking
/// (call them from `spawn_blocking` on hot async paths).
pub trait Store: Send + Sync + 'static {
    /// Queue a batch. Batches commit in submission order.
    fn submit(&self, batch: Batch);
    /// Everything the hub keeps in memory.
    fn load(&self) -> Result<Loaded>;
    /// Up to `limit` events with `seq > after`, in order.
    fn read_events(&self, after: Seq, limit: usize) -> Result<Vec<EncodedEvent>>;
    /// The oldest seq still stored (events before it were pruned).
    fn first_retained_seq(&self) -> Seq;
    /// The highest seq that is durable and published.
    fn durable_seq(&self) -> Seq;
    /// Number of events currently stored.
    fn event_count(&self) -> u64;
    /// Commit statistics (for `/metrics`).
    fn commit_stats(&self) -> CommitStats;

    fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Mark a token revoked; false if no such token id.
    fn revoke_token(&self, id: &str) -> Result<bool>;

    /// Finish every queued batch, then stop the writer.
    fn close(&self);
}
