//! The follower: one ordered consumer per node applies every entry of the
//! log, in order, to the local copy and then to the node's event bus; a
//! catch-up reads what it misses directly.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{demote, term_leadership, wait_head, ClusterStore, Part, Shared, HDR_NODE};
use crate::cluster::{nats_err, STREAM, TERM_SUBJECT};
use crate::error::{Error, Result};
use crate::model::Seq;
use crate::store::Store;

/// Most stream messages applied to the local copy in one commit.
const MAX_APPLY: usize = 1000;
/// How long a catch-up waits for the consumer before reading directly.
const CATCH_UP_WAIT: Duration = Duration::from_millis(500);
/// How long the follower waits for a delivery before it asks the stream
/// whether it is missing something: a consumer can stop delivering without
/// an error (seen when its NATS server goes away while it is recreated),
/// and a follower that trusted it would stay behind for good. Idle, this
/// is one small request a second.
const STALL_CHECK: Duration = Duration::from_secs(1);

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

impl ClusterStore {
    /// Wait until the local copy holds everything the log holds now.
    pub async fn catch_up(&self) -> Result<Seq> {
        if let Some(f) = &self.shared.faults {
            f.before_catch_up()?;
        }
        let last = stream_last_seq(&self.shared.node.js).await?;
        if self.wait_head(last, CATCH_UP_WAIT).await.is_ok() {
            return Ok(last);
        }
        // The consumer is behind or stalled (its NATS server went away):
        // read what is missing directly, and have it start afresh.
        refollow(&self.shared);
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
    pub(super) async fn note_last_term(&self) {
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

    pub(super) async fn wait_head(&self, seq: Seq, limit: Duration) -> Result<()> {
        wait_head(&self.shared, seq, limit).await
    }
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
pub(super) async fn follow(shared: Arc<Shared>, start: Seq) {
    let mut from = start;
    let mut backoff = FOLLOW_BACKOFF_MIN;
    // Failures in a row without the copy moving on.
    let mut stuck = 0u32;
    loop {
        let before = *shared.head.borrow();
        match follow_once(&shared, from).await {
            Ok(Ended::Asked) => {
                // A new consumer at once, from what the copy holds: not a
                // failure, and no pause (a node that wins the lease waits
                // for this consumer to bring its term entry).
                tracing::debug!(
                    after_seq = *shared.head.borrow(),
                    "following the log afresh"
                );
                from = *shared.head.borrow();
                continue;
            }
            Ok(Ended::Closed) => {}
            Err(e) => {
                if let Some(f) = &shared.faults {
                    f.note_follow_failure();
                }
                if stuck >= STUCK_LOUD {
                    tracing::error!(
                        error = %e,
                        after_seq = before,
                        failures = stuck + 1,
                        "the local copy cannot apply the log past this seq; this node is not \
                         ready until it can (a local fault that persists, or an entry no node \
                         can apply)"
                    );
                } else {
                    tracing::warn!(error = %e, retry_in = ?backoff, "following the log failed; resuming");
                }
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

/// Why a consumer ended without an error.
enum Ended {
    /// A new one was asked for ([`refollow`]).
    Asked,
    /// Its stream of messages ended.
    Closed,
}

/// Ask the follower for a new consumer, from what the copy holds. Only the
/// consumer running now (or the next one, if none runs) is replaced: a
/// request is never held against a consumer started after it.
pub(super) fn refollow(shared: &Shared) {
    shared.refollow.send_modify(|n| *n = n.wrapping_add(1));
}

async fn follow_once(shared: &Arc<Shared>, after: Seq) -> Result<Ended> {
    // Requests made from here on are for this consumer.
    let mut asked = shared.refollow.subscribe();
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
    // The stream's last seq at the previous quiet check: an entry that was
    // in the stream a whole check ago and is still not applied was not
    // delivered, and will not be.
    let mut seen_last: Option<Seq> = None;
    // Injected fault: this consumer went quiet for good.
    let mut quiet = false;
    loop {
        let first = tokio::select! {
            m = messages.next() => m,
            _ = asked.changed() => return Ok(Ended::Asked),
            _ = tokio::time::sleep(STALL_CHECK) => {
                let head = *shared.head.borrow();
                if seen_last.is_some_and(|last| last > head) {
                    if let Some(f) = &shared.faults {
                        f.note_stall();
                    }
                    return Err(Error::storage(format!(
                        "the consumer delivered nothing for {STALL_CHECK:?} while the log \
                         holds entries past seq {head}; starting a new one"
                    )));
                }
                // Not answered (NATS away): nothing learned, ask again next time.
                seen_last = stream_last_seq(&shared.node.js).await.ok();
                continue;
            }
        };
        seen_last = None;
        let first = match first {
            Some(m) => m.map_err(|e| nats_err("log consumer", e))?,
            None => return Ok(Ended::Closed),
        };
        quiet |= lost(shared);
        if !quiet {
            pending.push(Entry::of(&first)?);
        }
        // Take whatever else has already arrived, to apply it in one commit.
        while pending.len() < MAX_APPLY {
            match futures_util::FutureExt::now_or_never(messages.next()) {
                Some(Some(m)) => {
                    let m = m.map_err(|e| nats_err("log consumer", e))?;
                    quiet |= lost(shared);
                    if !quiet {
                        pending.push(Entry::of(&m)?);
                    }
                }
                _ => break,
            }
        }
        if !pending.is_empty() {
            apply(shared, std::mem::take(&mut pending)).await?;
        }
    }
}

/// An injected fault: the consumer's delivery is lost, and the consumer
/// delivers nothing more.
fn lost(shared: &Shared) -> bool {
    shared.faults.as_ref().is_some_and(|f| f.delivery_lost())
}

/// The stream's last seq as the stream's leader has it (one request).
async fn stream_last_seq(js: &jetstream::Context) -> Result<Seq> {
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| nats_err("cannot read the log stream", e))?;
    Ok(stream.cached_info().state.last_sequence)
}

/// Apply stream messages to the local copy, then publish their events.
async fn apply(shared: &Arc<Shared>, entries: Vec<Entry>) -> Result<()> {
    let _one = shared.apply_lock.lock().await;
    let head = *shared.head.borrow();
    let mut changes = shared.copy.changes();
    let mut term = None;
    if tracing::enabled!(tracing::Level::DEBUG) {
        let seqs: Vec<(Seq, &str)> = entries.iter().map(|e| (e.seq, e.node.as_str())).collect();
        tracing::debug!(head, held_event = shared.copy.store().durable_seq(), entries = ?seqs, "apply");
    }
    for msg in entries {
        let seq = msg.seq;
        if seq <= changes.position().unwrap_or(head) {
            continue;
        }
        if msg.subject == TERM_SUBJECT {
            let by = msg.node;
            let part = *shared.part.lock().expect("part");
            if let Part::Leader { term } = part {
                if seq > term {
                    demote(shared, &format!("node {by} took over the log at seq {seq}"));
                }
            }
            term = term_leadership(&msg.payload).or(term);
            changes.pass(seq);
            continue;
        }
        changes.entry(seq, &msg.payload)?;
    }
    shared.ids.insert_created(changes.tasks());
    let Some(last) = changes.position() else {
        return Ok(());
    };
    let events = changes.events().to_vec();
    if let Err(e) = shared.copy.apply(changes).done().await {
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
