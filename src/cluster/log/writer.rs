//! The leader's writer: becoming the writer (the term entry), grouping
//! queued batches into appends fenced on the entry before, pipelining them,
//! completing each batch once the log took it, and watching that the local
//! copy follows.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    demote, not_leader, wait_head, ClusterStore, Part, Shared, APPLY_TIMEOUT, HDR_NODE, HDR_TERM,
};
use crate::cluster::{nats_err, EVENT_SUBJECT, TERM_SUBJECT};
use crate::error::{Error, Result, StorageFault};
use crate::model::Seq;
use crate::store::{Batch, Poison, Store};

/// Most bytes in one append, about (NATS takes messages up to 1 MiB by
/// default). One batch larger than this still goes alone.
const MAX_APPEND_BYTES: usize = 512 * 1024;
/// Most appends sent and not yet answered by the log. One: while an
/// append is out, everything queued behind it goes out together in the
/// next. JetStream's cost is per message (replication, a sync on every
/// server), so fewer, larger appends carry more tasks on the same CPU:
/// pipelined push through the leader ran 12 % faster with one than with
/// two (docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 1;

impl ClusterStore {
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
}

/// The leader's writer: groups queued batches into appends.
pub(super) async fn writer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Batch>) {
    // Batches of this epoch or older fail unwritten (the store's failure rule).
    let mut poisoned = Poison::default();
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
            let barrier = matches!(pending, Pending::Barrier(_));
            let appended = match pending {
                Pending::Barrier(seq) => Ok(seq),
                Pending::Append(ack) => ack.await,
            };
            drop(permit);
            let r = match appended {
                // A barrier completes once the copy holds what came before it.
                Ok(last) if barrier => {
                    let r = wait_head(&completer, last, APPLY_TIMEOUT).await;
                    if r.is_err() {
                        demote(&completer, "the local copy of the log stopped following");
                    }
                    r
                }
                // Stored by the log: complete now; the copy follows (reads
                // wait for it, `watch_copy` sees that it does).
                Ok(last) => {
                    completer.acked.send_modify(|a| *a = (*a).max(last));
                    Ok(())
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
    let max_payload = crate::cluster::piece_size(&shared.node.client);
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
        let (mut live, stale): (Vec<Batch>, Vec<Batch>) =
            group.into_iter().partition(|b| !poisoned.poisons(b));
        if !stale.is_empty() {
            let err = poisoned.outcome();
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
            poisoned.record(epoch, err.clone());
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
            // One change the log cannot take in one entry. The hub checks
            // every request's own content before building its change
            // (`hub/admit.rs`), so only what the hub adds to a change (a
            // great many tasks scheduled or released by one request) can
            // get here. Refuse it (and what was built on it) without
            // stepping down: the log is fine.
            let e = Error::Storage {
                fault: StorageFault::TooLarge,
                detail: format!(
                    "the change is {} bytes in the log, more than the {max_payload} one entry takes",
                    payload.len()
                ),
            };
            tracing::error!(error = %e, "a change larger than one log entry was refused");
            let (epoch, _) = fail_group(&shared, live, e, started);
            // What was queued behind it was built on it and fails too, but
            // for its own caller that is no fault of its own: a retryable
            // error (UNAVAILABLE, `storage_unavailable`: sidecars keep the
            // report and send it again), never the refused change's.
            poisoned.record(
                epoch,
                Error::Storage {
                    fault: StorageFault::Other,
                    detail: "not stored: queued behind a change the log refused as too large; \
                             send it again"
                        .into(),
                },
            );
            continue;
        }
        let (after, after_event) = match sent {
            Some((t, at, ev)) if t == term => (at, ev),
            // The term entry is applied: the copy holds every event before it.
            _ => (term, shared.copy.store().durable_seq()),
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
            _ => {
                tracing::debug!(
                    term,
                    after,
                    first_event = ?first_event,
                    last_event,
                    rows = live.iter().map(|b| b.tasks.len()).sum::<usize>(),
                    "append"
                );
                send_append(&shared, term, after, payload).await
            }
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
                let (epoch, e) = fail_group(&shared, live, e, started);
                poisoned.record(epoch, e);
            }
        }
    }
}

/// Watch that the local copy follows this node's acknowledged appends: one
/// that does not hold an append [`APPLY_TIMEOUT`] after the log took it
/// has stopped following, and this node steps down (its reads would wait
/// for it, and a new leader needs a copy that holds the log).
pub(super) async fn watch_copy(shared: Arc<Shared>) {
    let mut acked = shared.acked.subscribe();
    while acked.changed().await.is_ok() {
        let target = *acked.borrow_and_update();
        if wait_head(&shared, target, APPLY_TIMEOUT).await.is_err() {
            demote(&shared, "the local copy of the log stopped following");
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
