//! The cluster's log: a JetStream stream, followed by every node into a
//! local copy, appended to by the leader only.
//!
//! **Entries.** Each append is one stream message on [`EVENT_SUBJECT`]: the
//! events of the batches it groups, each with its own `seq`, and the final
//! row of every task they change, so a node that replays the stream
//! rebuilds the same task records. Event seqs are the hub's one global
//! sequence: consecutive across appends and across leaders. A new leader's
//! first append is a term entry on [`TERM_SUBJECT`]: it holds no events and
//! fences out whoever wrote before.
//!
//! **Appends.** The leader's writer groups the batches queued while earlier
//! appends were in flight into one message, and carries
//! `Nats-Expected-Last-Sequence` (the stream seq of the entry before it): if
//! anyone else appended since, the stream refuses the append, whatever any
//! clock says, and this node steps down. Appends are pipelined, each fenced
//! on the one before; an append whose first event does not follow the
//! log's last one is refused before it is sent.
//!
//! **Following.** One ordered consumer per node applies every entry, in
//! order, to the local SQLite copy (which serves reads, history and watch
//! catch-up, and records how far into the stream it is) and then to the
//! node's event bus. The leader's appends become visible the same way. A
//! batch's callbacks (acks, replies) run once the stream acknowledged it
//! (stored on a majority of the NATS servers): the local copy follows off
//! that path, and this node's reads of the copy wait until it holds every
//! append acknowledged to this node (read-your-writes). A copy that stops
//! following makes the leader step down.
//!
//! **Files.** This one holds what the parts share: the node's part (leader
//! or follower), the state the writer, the follower and the store handle
//! share, and stepping down. `setup.rs` creates the stream and the token
//! bucket and opens the store; `retry.rs` is how a start-up step is
//! retried; `writer.rs` is the leader's appends; `follower.rs` reads the
//! log into the local copy (through [`crate::store::copy`], the applier the
//! single node's log file uses too); `tokens.rs` is the token bucket and
//! its cache; `store.rs` is the [`Store`](crate::store::Store) the hub uses.

mod follower;
mod retry;
mod setup;
mod store;
mod tokens;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::sync::watch;

use super::Node;
use crate::bus::EventBus;
use crate::error::{Error, Result, StorageFault};
use crate::model::Seq;
use crate::store::copy::Applier;
use crate::store::CommitStats;

pub use store::{ClusterStore, OnDeposed};
pub use tokens::TokenAdmin;

use tokens::StoredToken;

/// How long an appended batch may take to reach the local copy before the
/// append counts as failed.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Header: the node that appended the entry.
const HDR_NODE: &str = "Agenthub-Node";
/// Header: the appender's term (the seq of its term entry).
const HDR_TERM: &str = "Agenthub-Term";

/// The part this node plays in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Follower,
    /// Appends, fenced since its term entry at this seq.
    Leader {
        term: Seq,
    },
}

struct Shared {
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    /// The local copy and its applier (shared with the log file's, see
    /// [`crate::store::copy`]).
    copy: Applier,
    /// Highest stream seq applied to the local copy (term entries included).
    head: watch::Sender<Seq>,
    /// Stream seq of the last append this node sent.
    sent: AtomicU64,
    /// Stream seq of the last append the log acknowledged to this node: its
    /// batches are complete, and this node's reads of the copy wait for it
    /// (read-your-writes).
    acked: watch::Sender<Seq>,
    part: Mutex<Part>,
    bus: Mutex<Option<Arc<EventBus>>>,
    on_deposed: Mutex<Option<OnDeposed>>,
    tokens: Mutex<HashMap<String, StoredToken>>,
    token_kv: kv::Store,
    stats: Mutex<CommitStats>,
    log_id: String,
    /// One applier at a time (the consumer, or a catch-up reading directly).
    apply_lock: tokio::sync::Mutex<()>,
    /// Requests for the follower to start a new consumer (its current one
    /// stalled), counted: see [`follower::refollow`].
    refollow: watch::Sender<u64>,
    /// Fault injection (tests, fault drills): the copy's, and the consumer's
    /// deliveries.
    faults: Option<Arc<crate::store::Faults>>,
    /// Which task ids the log may hold (a push with a new id is not a read
    /// of the copy): filled from the copy at the first load, then with
    /// every id this node submits or applies.
    ids: crate::store::ids::Ids,
}

impl Shared {
    fn record(&self, took: Duration, batches: usize, ok: bool) {
        self.stats.lock().expect("stats").record(took, batches, ok);
    }
}

fn demote(shared: &Shared, why: &str) {
    let was = std::mem::replace(&mut *shared.part.lock().expect("part"), Part::Follower);
    if was != Part::Follower {
        tracing::warn!(reason = why, "this node stops appending to the log");
        if let Some(f) = &*shared.on_deposed.lock().expect("on_deposed") {
            f(why);
        }
    }
}

async fn wait_head(shared: &Shared, seq: Seq, limit: Duration) -> Result<()> {
    let mut rx = shared.head.subscribe();
    let reached = tokio::time::timeout(limit, rx.wait_for(|h| *h >= seq)).await;
    match reached {
        Ok(Ok(_)) => Ok(()),
        _ => Err(Error::storage(format!(
            "the local copy of the log did not reach seq {seq} in {limit:?}"
        ))),
    }
}

fn not_leader(shared: &Shared) -> Error {
    let leader = shared
        .node
        .leader_id()
        .map(|l| format!("the leader is {l}"))
        .unwrap_or_else(|| "no leader is elected yet".into());
    Error::Storage {
        fault: StorageFault::NotLeader,
        detail: format!("node {} does not append ({leader})", shared.node.node_id()),
    }
}

/// The leadership named in a term entry's body.
fn term_leadership(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("leadership")?
        .as_str()
        .map(str::to_string)
}
