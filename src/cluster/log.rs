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
//! node's event bus. The leader's appends become visible the same way: a
//! batch's callbacks (acks, replies) run once the stream acknowledged it
//! *and* the local copy holds it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{block_on, nats_err, Node, EVENT_SUBJECT, STREAM, TERM_SUBJECT, TOKEN_BUCKET};
use crate::bus::EventBus;
use crate::error::{Error, Result, StorageFault};
use crate::model::{Seq, Task, TokenRecord};
use crate::pb::wire::EncodedEvent;
use crate::store::sqlite::SqliteStore;
use crate::store::{Batch, CommitStats, ListFilter, Loaded, Purged, Store, TaskListing};

/// Most bytes in one append, about (NATS takes messages up to 1 MiB by
/// default). One batch larger than this still goes alone.
const MAX_APPEND_BYTES: usize = 512 * 1024;
/// Most appends sent and not yet answered by the log.
const MAX_IN_FLIGHT: usize = 2;
/// How long an appended batch may take to reach the local copy before the
/// append counts as failed.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most stream messages applied to the local copy in one commit.
const MAX_APPLY: usize = 1000;
/// How long a catch-up waits for the consumer before reading directly.
const CATCH_UP_WAIT: Duration = Duration::from_millis(500);

/// One stream message, however it was read.
struct Entry {
    seq: Seq,
    subject: String,
    /// The node that appended it.
    node: String,
    payload: Bytes,
}

impl Entry {
    fn of(msg: &jetstream::Message) -> Result<Entry> {
        let seq = msg
            .info()
            .map_err(|e| nats_err("log entry", e))?
            .stream_sequence;
        Ok(Entry {
            seq,
            subject: msg.subject.to_string(),
            node: msg
                .headers
                .as_ref()
                .and_then(|h| h.get(HDR_NODE))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default(),
            payload: msg.payload.clone(),
        })
    }
}

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

/// A token as kept in the token bucket (the record's hash is not serialized
/// with the record itself).
#[derive(Clone, Serialize, Deserialize)]
struct StoredToken {
    id: String,
    hash: String,
    role: crate::model::Role,
    agent_id: Option<String>,
    created_at_ms: i64,
    revoked: bool,
}

impl StoredToken {
    fn of(r: &TokenRecord) -> StoredToken {
        StoredToken {
            id: r.id.clone(),
            hash: r.hash.clone(),
            role: r.role,
            agent_id: r.agent_id.clone(),
            created_at_ms: r.created_at_ms,
            revoked: r.revoked,
        }
    }

    fn record(&self) -> TokenRecord {
        TokenRecord {
            id: self.id.clone(),
            hash: self.hash.clone(),
            role: self.role,
            agent_id: self.agent_id.clone(),
            created_at_ms: self.created_at_ms,
            revoked: self.revoked,
        }
    }
}

/// How long a node retries setting up the stream and buckets at start.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Create (or find) the log stream and the token bucket: the log's id and the bucket.
async fn setup(node: &Node) -> Result<(String, kv::Store)> {
    let opts = &node.options;
    let mut metadata = HashMap::new();
    metadata.insert(
        "agenthub_log_id".to_string(),
        format!("log-{}", hex::encode(rand::random::<[u8; 8]>())),
    );
    let config = stream::Config {
        name: STREAM.to_string(),
        subjects: vec!["agenthub.log.>".to_string()],
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        allow_atomic_publish: true,
        allow_direct: true,
        metadata,
        ..Default::default()
    };
    let stream = node
        .js
        .get_or_create_stream(config)
        .await
        .map_err(|e| nats_err("cannot create the log stream", e))?;
    let info = stream
        .get_info()
        .await
        .map_err(|e| nats_err("cannot read the log stream", e))?;
    let log_id = info
        .config
        .metadata
        .get("agenthub_log_id")
        .cloned()
        .ok_or_else(|| {
            Error::storage(format!(
                "stream {STREAM} exists but was not made by agenthub (no agenthub_log_id)"
            ))
        })?;
    let token_kv = token_bucket(&node.js, opts.replicas).await?;
    Ok((log_id, token_kv))
}

/// Create (or open) the token bucket.
async fn token_bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store> {
    js.create_key_value(kv::Config {
        bucket: TOKEN_BUCKET.to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_err("cannot open the token bucket", e))
}

/// Every token in the bucket.
async fn read_tokens(kv: &kv::Store) -> Result<Vec<StoredToken>> {
    let mut keys = kv.keys().await.map_err(|e| nats_err("token bucket", e))?;
    let mut out = Vec::new();
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(v)) = kv.get(&key).await {
            if let Ok(t) = serde_json::from_slice::<StoredToken>(&v) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// Called when this node loses the right to append (with the reason).
pub type OnDeposed = Box<dyn Fn(&str) + Send + Sync>;

struct Shared {
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    replica: SqliteStore,
    /// Highest stream seq applied to the local copy (term entries included).
    head: watch::Sender<Seq>,
    /// Stream seq of the last append this node sent.
    sent: AtomicU64,
    part: Mutex<Part>,
    bus: Mutex<Option<Arc<EventBus>>>,
    on_deposed: Mutex<Option<OnDeposed>>,
    tokens: Mutex<HashMap<String, StoredToken>>,
    token_kv: kv::Store,
    stats: Mutex<CommitStats>,
    log_id: String,
    /// One applier at a time (the consumer, or a catch-up reading directly).
    apply_lock: tokio::sync::Mutex<()>,
    /// Ask the follower to start a new consumer (its current one stalled).
    refollow: tokio::sync::Notify,
    /// Write epoch of the next apply to the local copy: one failed apply
    /// fails only itself (the local store's failure rule), and its retry
    /// is a new epoch.
    apply_epoch: AtomicU64,
}

/// [`Store`] on a JetStream stream, with a local SQLite copy for reads.
pub struct ClusterStore {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Batch>,
}

impl ClusterStore {
    /// Create (or find) the stream and token bucket, open the local copy in
    /// `dir`, and start following the log. Returns once the copy has caught
    /// up with the log's head as it was at the start.
    pub async fn open(node: Arc<Node>, dir: &std::path::Path) -> Result<Arc<ClusterStore>> {
        Self::open_with_faults(node, dir, None).await
    }

    /// [`ClusterStore::open`] with fault injection on the local copy (tests,
    /// fault drills).
    pub async fn open_with_faults(
        node: Arc<Node>,
        dir: &std::path::Path,
        faults: Option<Arc<crate::store::Faults>>,
    ) -> Result<Arc<ClusterStore>> {
        // A NATS cluster that is starting (or electing) may time out the
        // first requests: retry for a while before giving up.
        let give_up = Instant::now() + SETUP_TIMEOUT;
        let mut backoff = Duration::from_millis(100);
        let (log_id, token_kv) = loop {
            match setup(&node).await {
                Ok(v) => break v,
                Err(e) if Instant::now() < give_up => {
                    tracing::warn!(error = %e, "cannot set up the log in NATS yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        let replica = SqliteStore::open_replica_with_faults(dir, &log_id, faults)?;
        let start = replica.log_position()?;
        let shared = Arc::new(Shared {
            node: node.clone(),
            rt: tokio::runtime::Handle::current(),
            apply_lock: tokio::sync::Mutex::new(()),
            refollow: tokio::sync::Notify::new(),
            apply_epoch: AtomicU64::new(1),
            replica,
            head: watch::Sender::new(start),
            sent: AtomicU64::new(0),
            part: Mutex::new(Part::Follower),
            bus: Mutex::new(None),
            on_deposed: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            token_kv,
            stats: Mutex::new(CommitStats::default()),
            log_id,
        });
        follow_tokens(shared.clone()).await?;
        tokio::spawn(follow(shared.clone(), start));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(shared.clone(), rx));
        let store = Arc::new(ClusterStore { shared, tx });
        store.catch_up().await?;
        store.note_last_term().await;
        Ok(store)
    }

    /// Wait until the local copy holds everything the log holds now.
    pub async fn catch_up(&self) -> Result<Seq> {
        let last = self.stream_last_seq().await?;
        if self.wait_head(last, CATCH_UP_WAIT).await.is_ok() {
            return Ok(last);
        }
        // The consumer is behind or stalled (its NATS server went away):
        // read what is missing directly, and have it start afresh.
        self.shared.refollow.notify_one();
        let stream = self
            .shared
            .node
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| nats_err("log stream", e))?;
        let mut next = self.head() + 1;
        while next <= last {
            let mut entries = Vec::new();
            while next <= last && entries.len() < MAX_APPLY {
                let m = stream
                    .get_raw_message(next)
                    .await
                    .map_err(|e| nats_err("log entry", e))?;
                entries.push(Entry {
                    seq: m.sequence,
                    subject: m.subject.to_string(),
                    node: m
                        .headers
                        .get(HDR_NODE)
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default(),
                    payload: m.payload,
                });
                next += 1;
            }
            apply(&self.shared, entries).await?;
        }
        Ok(last)
    }

    /// The copy held the last term entry before this start: say whose it is
    /// (a follower is ready once it holds its leader's term entry).
    async fn note_last_term(&self) {
        if self.shared.node.applied_term.borrow().is_some() {
            return;
        }
        let Ok(stream) = self.shared.node.js.get_stream(STREAM).await else {
            return;
        };
        if let Ok(m) = stream.get_last_raw_message_by_subject(TERM_SUBJECT).await {
            if m.sequence <= self.head() {
                if let Some(l) = term_leadership(&m.payload) {
                    self.shared.node.applied_term.send_replace(Some(l));
                }
            }
        }
    }

    async fn stream_last_seq(&self) -> Result<Seq> {
        let stream = self
            .shared
            .node
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| nats_err("cannot read the log stream", e))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| nats_err("cannot read the log stream", e))?;
        Ok(info.state.last_sequence)
    }

    async fn wait_head(&self, seq: Seq, limit: Duration) -> Result<()> {
        wait_head(&self.shared, seq, limit).await
    }

    /// Feed applied events to `bus` (the hub's).
    pub fn set_bus(&self, bus: Arc<EventBus>) {
        *self.shared.bus.lock().expect("bus") = Some(bus);
    }

    /// Run `f` when this node loses the right to append.
    pub fn on_deposed(&self, f: OnDeposed) {
        *self.shared.on_deposed.lock().expect("on_deposed") = Some(f);
    }

    /// Become the log's writer for `leadership` (the lease's value): catch
    /// up with the head, then append a term entry fenced on it. From then
    /// on no earlier leader can append.
    pub async fn promote(&self, leadership: &str) -> Result<Seq> {
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            let last = self.catch_up().await?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(HDR_NODE, self.shared.node.node_id());
            let body = serde_json::to_vec(&serde_json::json!({
                "node_id": self.shared.node.node_id(),
                "leadership": leadership,
                "at_ms": crate::model::now_ms(),
            }))
            .expect("json");
            let publish = jetstream::message::PublishMessage::build()
                .payload(body.into())
                .headers(headers)
                .expected_last_sequence(last);
            let ack = async {
                self.shared
                    .node
                    .js
                    .send_publish(TERM_SUBJECT, publish)
                    .await?
                    .await
            }
            .await;
            match ack {
                Ok(ack) => {
                    let term = ack.sequence;
                    self.wait_head(term, APPLY_TIMEOUT).await?;
                    // Appends sent in an earlier term (even ones whose
                    // outcome was never known) are behind the term entry.
                    self.shared.sent.store(term, Ordering::Release);
                    *self.shared.part.lock().expect("part") = Part::Leader { term };
                    tracing::info!(term, "this node now appends to the log");
                    return Ok(term);
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    // Someone appended after we read the head: catch up again.
                    continue;
                }
                Err(e) if Instant::now() < give_up => {
                    // The stream may be electing its own leader (just
                    // created, or a NATS server went away): try again.
                    tracing::debug!(error = %e, "term entry not appended yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(nats_err("cannot append the term entry", e)),
            }
        }
    }

    /// Stop appending (lease lost). Queued batches fail.
    pub fn demote(&self, why: &str) {
        demote(&self.shared, why);
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.shared.part.lock().expect("part"), Part::Leader { .. })
    }

    /// The highest seq in the local copy.
    pub fn head(&self) -> Seq {
        *self.shared.head.borrow()
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

/// First and largest pause before following the log again after a failure.
const FOLLOW_BACKOFF_MIN: Duration = Duration::from_millis(200);
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Failures in a row after which each is logged as an error.
const STUCK_LOUD: u32 = 5;

/// Apply the stream to the local copy, from `start + 1`, forever. A failure
/// (the local store busy or full, the consumer gone) is retried with
/// backoff from what the copy holds: it catches up once the cause clears,
/// without a restart.
async fn follow(shared: Arc<Shared>, start: Seq) {
    let mut from = start;
    let mut backoff = FOLLOW_BACKOFF_MIN;
    // Failures in a row without the copy moving on.
    let mut stuck = 0u32;
    loop {
        let before = *shared.head.borrow();
        match follow_once(&shared, from).await {
            Ok(()) => {}
            Err(e) if stuck >= STUCK_LOUD => tracing::error!(
                error = %e,
                after_seq = before,
                failures = stuck + 1,
                "the local copy cannot apply the log past this seq; this node is not ready \
                 until it can (a local fault that persists, or an entry no node can apply)"
            ),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "following the log failed; resuming")
            }
        }
        from = *shared.head.borrow();
        if from > before {
            backoff = FOLLOW_BACKOFF_MIN;
            stuck = 0;
        } else {
            stuck += 1;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(FOLLOW_BACKOFF_MAX);
    }
}

async fn follow_once(shared: &Arc<Shared>, after: Seq) -> Result<()> {
    let stream = shared
        .node
        .js
        .get_stream(STREAM)
        .await
        .map_err(|e| nats_err("log stream", e))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: shared.node.client.new_inbox(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("log consumer", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats_err("log consumer", e))?;
    let mut pending: Vec<Entry> = Vec::new();
    loop {
        let first = tokio::select! {
            m = messages.next() => m,
            _ = shared.refollow.notified() => {
                return Err(Error::storage("the consumer stalled; starting a new one"));
            }
        };
        let first = match first {
            Some(m) => m.map_err(|e| nats_err("log consumer", e))?,
            None => return Ok(()),
        };
        pending.push(Entry::of(&first)?);
        // Take whatever else has already arrived, to apply it in one commit.
        while pending.len() < MAX_APPLY {
            match futures_util::FutureExt::now_or_never(messages.next()) {
                Some(Some(m)) => {
                    pending.push(Entry::of(&m.map_err(|e| nats_err("log consumer", e))?)?)
                }
                _ => break,
            }
        }
        apply(shared, std::mem::take(&mut pending)).await?;
    }
}

/// Apply stream messages to the local copy, then publish their events.
async fn apply(shared: &Arc<Shared>, entries: Vec<Entry>) -> Result<()> {
    let _one = shared.apply_lock.lock().await;
    let head = *shared.head.borrow();
    let mut batch = Batch::default();
    let mut last = head;
    // Event seqs run on without holes across appends (term entries are
    // not events); an append the copy already holds is skipped whole.
    let mut last_event = shared.replica.durable_seq();
    let mut term = None;
    for msg in entries {
        let seq = msg.seq;
        if seq <= last {
            continue;
        }
        last = seq;
        if msg.subject == TERM_SUBJECT {
            let by = msg.node;
            let part = *shared.part.lock().expect("part");
            if let Part::Leader { term } = part {
                if seq > term {
                    demote(shared, &format!("node {by} took over the log at seq {seq}"));
                }
            }
            term = term_leadership(&msg.payload).or(term);
            continue;
        }
        let (events, rows) = crate::store::entry::decode(&seq.to_string(), &msg.payload)?;
        match events.last() {
            Some(ev) if ev.seq <= last_event => continue,
            Some(ev) => last_event = ev.seq,
            None => {}
        }
        batch.events.extend(events);
        batch.tasks.extend(rows);
    }
    if last == head {
        return Ok(());
    }
    batch.position = Some(last);
    batch.epoch = shared.apply_epoch.fetch_add(1, Ordering::Relaxed);
    let events = batch.events.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    batch.then(move |r| {
        let _ = done_tx.send(r.clone());
    });
    shared.replica.submit(batch);
    let applied = done_rx
        .await
        .map_err(|_| Error::storage("local copy closed"))
        .and_then(|r| r);
    if let Err(e) = applied {
        shared.node.copy_ok.send_replace(false);
        return Err(e);
    }
    shared.head.send_replace(last);
    shared.node.copy_ok.send_replace(true);
    if term.is_some() {
        shared.node.applied_term.send_replace(term);
    }
    if !events.is_empty() {
        if let Some(bus) = &*shared.bus.lock().expect("bus") {
            bus.publish(&events);
        }
    }
    Ok(())
}

/// Keep the token cache equal to the token bucket.
async fn follow_tokens(shared: Arc<Shared>) -> Result<()> {
    // A watch of every change, then the current values (read directly: the
    // watch's own replay of them ends with a marker we cannot see here).
    // Retried like the rest of the setup: a starting cluster may time out.
    let give_up = Instant::now() + SETUP_TIMEOUT;
    let (mut watch, tokens) = loop {
        let attempt = async {
            let watch = shared
                .token_kv
                .watch_with_history(">")
                .await
                .map_err(|e| nats_err("token bucket", e))?;
            Ok::<_, Error>((watch, read_tokens(&shared.token_kv).await?))
        };
        match attempt.await {
            Ok(v) => break v,
            Err(e) if Instant::now() < give_up => {
                tracing::warn!(error = %e, "cannot read the token bucket yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    for t in tokens {
        shared
            .tokens
            .lock()
            .expect("tokens")
            .insert(t.id.clone(), t);
    }
    tokio::spawn(async move {
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            if entry.operation != kv::Operation::Put {
                shared.tokens.lock().expect("tokens").remove(&entry.key);
                continue;
            }
            if let Ok(t) = serde_json::from_slice::<StoredToken>(&entry.value) {
                shared
                    .tokens
                    .lock()
                    .expect("tokens")
                    .insert(t.id.clone(), t);
            }
        }
    });
    Ok(())
}

/// The leader's writer: groups queued batches into appends.
async fn writer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Batch>) {
    // Batches of this epoch or older fail unwritten (the store's failure rule).
    let mut poisoned: Option<(u64, Error)> = None;
    // Sent, waiting for the log's answer and then the local copy:
    // completed in order. At most MAX_IN_FLIGHT appends are pending.
    let window = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(
        Pending,
        Vec<Batch>,
        Instant,
        tokio::sync::OwnedSemaphorePermit,
    )>();
    let completer = shared.clone();
    tokio::spawn(async move {
        while let Some((pending, group, started, permit)) = done_rx.recv().await {
            let appended = match pending {
                Pending::Barrier(seq) => Ok(seq),
                Pending::Append(ack) => ack.await,
            };
            drop(permit);
            let r = match appended {
                Ok(last) => {
                    let r = wait_head(&completer, last, APPLY_TIMEOUT).await;
                    if r.is_err() {
                        demote(&completer, "the local copy of the log stopped following");
                    }
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, "append to the log failed");
                    step_down_after(&completer, &e);
                    Err(e)
                }
            };
            completer.record(started.elapsed(), group.len(), r.is_ok());
            for b in group {
                b.complete(&r);
            }
        }
    });
    // The last append sent in this node's current term: (term, its stream
    // seq, its last event seq). The next is fenced on it.
    let mut sent: Option<(Seq, Seq, Seq)> = None;
    // Batches that did not fit in the previous append, in order.
    let mut carry: std::collections::VecDeque<Batch> = Default::default();
    // An append must fit in one NATS message.
    let max_payload = super::piece_size(&shared.node.client);
    loop {
        // Take a slot first: while the window is full, more batches queue
        // up and go out together in the next append.
        let Ok(permit) = window.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.pop_front() {
            Some(b) => b,
            None => match rx.recv().await {
                Some(b) => b,
                None => return,
            },
        };
        let mut size = append_size(&first);
        let mut group = vec![first];
        while size < MAX_APPEND_BYTES {
            let next = match carry.pop_front() {
                Some(b) => b,
                None => match rx.try_recv() {
                    Ok(b) => b,
                    Err(_) => break,
                },
            };
            if size + append_size(&next) > MAX_APPEND_BYTES {
                carry.push_front(next);
                break;
            }
            size += append_size(&next);
            group.push(next);
        }
        let (mut live, stale): (Vec<Batch>, Vec<Batch>) = group
            .into_iter()
            .partition(|b| !matches!(&poisoned, Some((e, _)) if b.epoch <= *e));
        if let Some((_, e)) = &poisoned {
            let err = Err(e.clone());
            for b in stale {
                b.complete(&err);
            }
        }
        if live.is_empty() {
            continue;
        }
        let started = Instant::now();
        let part = *shared.part.lock().expect("part");
        let Part::Leader { term } = part else {
            let err = not_leader(&shared);
            let epoch = live.iter().map(|b| b.epoch).max().unwrap_or(0);
            poisoned = Some((epoch, err.clone()));
            for b in live {
                b.complete(&Err(err.clone()));
            }
            continue;
        };
        if live
            .iter()
            .all(|b| b.events.is_empty() && b.tasks.is_empty())
        {
            // Barriers only: done once everything sent before them is.
            let last = *shared.head.borrow();
            let _ = done_tx.send((Pending::Barrier(last.max(term)), live, started, permit));
            continue;
        }
        let mut payload = crate::store::entry::encode(&live);
        if payload.len() > max_payload && live.len() > 1 {
            // The estimate was off (large task rows): the first batch goes
            // alone, the others next.
            for b in live.split_off(1).into_iter().rev() {
                carry.push_front(b);
            }
            payload = crate::store::entry::encode(&live);
        }
        if payload.len() > max_payload {
            // One change the log cannot take in one entry. Refuse it (and
            // what was built on it) without stepping down: the log is fine.
            let e = Error::Storage {
                fault: StorageFault::TooLarge,
                detail: format!(
                    "the change is {} bytes in the log, more than the {max_payload} one entry takes",
                    payload.len()
                ),
            };
            tracing::warn!(error = %e, "change refused");
            let (epoch, _) = fail_group(&shared, live, e, started);
            // What was queued behind it was built on it and fails too, but
            // for its own caller that is no fault of its own: a retryable
            // error (UNAVAILABLE, `storage_unavailable`: sidecars keep the
            // report and send it again), never the refused change's.
            poisoned = Some((
                epoch,
                Error::Storage {
                    fault: StorageFault::Other,
                    detail: "not stored: queued behind a change the log refused as too large; \
                             send it again"
                        .into(),
                },
            ));
            continue;
        }
        let (after, after_event) = match sent {
            Some((t, at, ev)) if t == term => (at, ev),
            // The term entry is applied: the copy holds every event before it.
            _ => (term, shared.replica.durable_seq()),
        };
        let last_event = live
            .iter()
            .flat_map(|b| &b.events)
            .next_back()
            .map_or(after_event, |ev| ev.seq);
        let first_event = live.iter().flat_map(|b| &b.events).next().map(|ev| ev.seq);
        let outcome = match first_event {
            Some(seq) if seq != after_event + 1 => Err(Error::Storage {
                fault: StorageFault::Conflict,
                detail: format!("event seq {seq} where the log expects {}", after_event + 1),
            }),
            _ => send_append(&shared, term, after, payload).await,
        };
        match outcome {
            Ok(ack) => {
                sent = Some((term, after + 1, last_event));
                shared.sent.store(after + 1, Ordering::Release);
                let _ = done_tx.send((Pending::Append(ack), live, started, permit));
            }
            Err(e) => {
                tracing::error!(error = %e, "append to the log failed");
                step_down_after(&shared, &e);
                poisoned = Some(fail_group(&shared, live, e, started));
            }
        }
    }
}

/// Fail every batch of `group` with `e` (nothing of it was appended). The
/// poison it leaves: batches of its epoch or older, still queued, were
/// built on it and fail too.
fn fail_group(shared: &Shared, group: Vec<Batch>, e: Error, started: Instant) -> (u64, Error) {
    shared.record(started.elapsed(), group.len(), false);
    let epoch = group.iter().map(|b| b.epoch).max().unwrap_or(0);
    let err = Err(e.clone());
    for b in group {
        b.complete(&err);
    }
    (epoch, e)
}

/// What the completer waits for.
enum Pending {
    /// The log's answer to an append.
    Append(AckFuture),
    /// Nothing to append: the local copy reaching this seq.
    Barrier(Seq),
}

/// An append failed. Refused by the fence: someone else leads. Any other
/// failure (a timeout, the stream electing its own leader) leaves the
/// append's outcome unknown. Step down either way, and let the next
/// election catch up with the log before anyone writes.
fn step_down_after(shared: &Shared, e: &Error) {
    let fenced = matches!(
        e,
        Error::Storage {
            fault: StorageFault::Conflict,
            ..
        }
    );
    demote(
        shared,
        if fenced {
            "the log refused an append (another node appended)"
        } else {
            "an append to the log failed"
        },
    );
}

/// About how many bytes `b` adds to an append.
fn append_size(b: &Batch) -> usize {
    b.events
        .iter()
        .map(|ev| ev.proto().len() + 96)
        .sum::<usize>()
        + 512 * b.tasks.len()
}

/// The outcome of an append that was sent: its stream seq.
type AckFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Seq>> + Send>>;

/// Send one append, fenced on the stream seq `after` (the log's last entry
/// as this writer knows it), without waiting for the log's answer: appends
/// are pipelined, and the next one is fenced on this one, so it fails if
/// this one does.
async fn send_append(shared: &Shared, term: Seq, after: Seq, payload: Bytes) -> Result<AckFuture> {
    let mut h = async_nats::HeaderMap::new();
    h.insert(HDR_NODE, shared.node.node_id());
    h.insert(HDR_TERM, term.to_string().as_str());
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(h)
        .expected_last_sequence(after);
    let ack = shared
        .node
        .js
        .send_publish(EVENT_SUBJECT, publish)
        .await
        .map_err(|e| publish_error(&e.to_string(), e.kind()))?;
    Ok(Box::pin(async move {
        match ack.await {
            Ok(ack) => check_ack(ack.sequence, after + 1),
            Err(e) => Err(publish_error(&e.to_string(), e.kind())),
        }
    }))
}

fn check_ack(stored_at: Seq, last_seq: Seq) -> Result<Seq> {
    if stored_at == last_seq {
        Ok(last_seq)
    } else {
        Err(Error::Storage {
            fault: StorageFault::Conflict,
            detail: format!(
                "the log stored the append at seq {stored_at} where {last_seq} was expected"
            ),
        })
    }
}

/// A refused or failed publish as a storage error (the fence's refusal is a conflict).
fn publish_error(text: &str, kind: jetstream::context::PublishErrorKind) -> Error {
    // An atomic batch refused for its fence reports the same cause.
    if kind == jetstream::context::PublishErrorKind::WrongLastSequence
        || text.contains("wrong last sequence")
    {
        Error::Storage {
            fault: StorageFault::Conflict,
            detail: format!("another node appended to the log: {text}"),
        }
    } else {
        nats_err("append to the log", text)
    }
}

impl Shared {
    fn record(&self, took: Duration, batches: usize, ok: bool) {
        self.stats.lock().expect("stats").record(took, batches, ok);
    }

    fn put_token(&self, t: StoredToken) -> Result<()> {
        let kv = self.token_kv.clone();
        let stored = t.clone();
        block_on(&self.rt, async move { store_token(&kv, &stored).await })?;
        self.tokens.lock().expect("tokens").insert(t.id.clone(), t);
        Ok(())
    }
}

/// Store `t` in the token bucket. A bucket just created may not have a
/// leader yet, or not be known to every server: retry a while.
async fn store_token(kv: &kv::Store, t: &StoredToken) -> Result<()> {
    let value = Bytes::from(serde_json::to_vec(t).expect("token serializes"));
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match kv.put(t.id.clone(), value.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < give_up => {
                tracing::debug!(error = %e, "token not stored yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(nats_err("token bucket", e)),
        }
    }
}

impl Store for ClusterStore {
    fn submit(&self, batch: Batch) {
        if let Err(mpsc::error::SendError(batch)) = self.tx.send(batch) {
            batch.complete(&Err(Error::ShuttingDown));
        }
    }

    fn load(&self) -> Result<Loaded> {
        self.shared.replica.load()
    }

    fn get_task(&self, task_id: &str) -> Result<Option<Task>> {
        self.shared.replica.get_task(task_id)
    }

    fn list_tasks(&self, filter: &ListFilter) -> Result<TaskListing> {
        self.shared.replica.list_tasks(filter)
    }

    fn purge_finished(&self, cutoff_ms: i64, limit: usize) -> Result<Purged> {
        // Retention works on this node's copy only (see docs/cluster.md).
        self.shared.replica.purge_finished(cutoff_ms, limit)
    }

    fn disk_bytes(&self) -> u64 {
        self.shared.replica.disk_bytes()
    }

    fn read_events(&self, after: Seq, limit: usize) -> Result<Vec<EncodedEvent>> {
        self.shared.replica.read_events(after, limit)
    }

    fn first_retained_seq(&self) -> Seq {
        self.shared.replica.first_retained_seq()
    }

    fn durable_seq(&self) -> Seq {
        self.shared.replica.durable_seq()
    }

    fn log_id(&self) -> String {
        self.shared.log_id.clone()
    }

    fn probe(&self) -> Result<()> {
        if !self.is_leader() {
            return Err(not_leader(&self.shared));
        }
        // The hub reloads its state from the copy next: it must hold every
        // append this node sent. A leader whose copy stopped following
        // lets another node lead rather than hold the lease unable to write.
        let sent = self.shared.sent.load(Ordering::Acquire);
        if self.head() < sent {
            let shared = self.shared.clone();
            let caught_up = block_on(&self.shared.rt, async move {
                wait_head(&shared, sent, APPLY_TIMEOUT).await
            });
            if let Err(e) = caught_up {
                self.shared.refollow.notify_one();
                demote(&self.shared, "the local copy of the log stopped following");
                return Err(e);
            }
        }
        Ok(())
    }

    fn event_count(&self) -> u64 {
        self.shared.replica.event_count()
    }

    fn commit_stats(&self) -> CommitStats {
        self.shared.stats.lock().expect("stats").clone()
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        self.shared.put_token(StoredToken::of(token))
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let found = |tokens: &HashMap<String, StoredToken>| {
            tokens
                .values()
                .find(|t| t.hash == hash)
                .map(StoredToken::record)
        };
        if let Some(r) = found(&self.shared.tokens.lock().expect("tokens")) {
            return Ok(Some(r));
        }
        // Issued a moment ago on another node: read the bucket itself.
        let id = format!("tok-{}", &hash[..12.min(hash.len())]);
        let kv = self.shared.token_kv.clone();
        let got = block_on(&self.shared.rt, async move { kv.get(id).await })
            .map_err(|e| nats_err("token bucket", e))?;
        let Some(v) = got else { return Ok(None) };
        let Ok(t) = serde_json::from_slice::<StoredToken>(&v) else {
            return Ok(None);
        };
        let mut tokens = self.shared.tokens.lock().expect("tokens");
        tokens.insert(t.id.clone(), t);
        Ok(found(&tokens))
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let tokens = self.shared.tokens.lock().expect("tokens");
        let mut out: Vec<TokenRecord> = tokens.values().map(StoredToken::record).collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    fn revoke_token(&self, id: &str) -> Result<bool> {
        let current = self.shared.tokens.lock().expect("tokens").get(id).map(|t| {
            let mut r = t.record();
            r.revoked = true;
            StoredToken::of(&r)
        });
        match current {
            Some(t) => {
                self.shared.put_token(t)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn replicated(&self) -> bool {
        true
    }

    fn close(&self) {
        self.shared.replica.close();
    }
}

/// How long `agenthub token ... --nats` retries opening the token bucket.
const TOKEN_ADMIN_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Issue, list and revoke tokens on a cluster without running a node
/// (`agenthub token ... --nats`).
pub struct TokenAdmin {
    kv: kv::Store,
}

impl TokenAdmin {
    pub async fn connect(options: &super::ClusterOptions) -> Result<TokenAdmin> {
        let client = options.connect().await?;
        let js = jetstream::new(client);
        // A NATS cluster that is starting may time out the first requests
        // (as for a node's own setup): retry a while before giving up.
        let give_up = Instant::now() + TOKEN_ADMIN_SETUP_TIMEOUT;
        let mut backoff = Duration::from_millis(100);
        loop {
            match token_bucket(&js, options.replicas).await {
                Ok(kv) => return Ok(TokenAdmin { kv }),
                Err(e) if Instant::now() < give_up => {
                    tracing::debug!(error = %e, "cannot open the token bucket yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn insert(&self, token: &TokenRecord) -> Result<()> {
        store_token(&self.kv, &StoredToken::of(token)).await
    }

    pub async fn list(&self) -> Result<Vec<TokenRecord>> {
        let mut out: Vec<TokenRecord> = read_tokens(&self.kv)
            .await?
            .iter()
            .map(StoredToken::record)
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    pub async fn revoke(&self, id: &str) -> Result<bool> {
        let Some(v) = self
            .kv
            .get(id)
            .await
            .map_err(|e| nats_err("token bucket", e))?
        else {
            return Ok(false);
        };
        let mut t: StoredToken =
            serde_json::from_slice(&v).map_err(|e| nats_err("token bucket", e))?;
        t.revoked = true;
        store_token(&self.kv, &t).await?;
        Ok(true)
    }
}
