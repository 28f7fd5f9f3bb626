//! Transactions: [`Txn`], one atomic change, and how the core records into
//! it (new tasks, events with their `seq`) and turns it into a store batch.

use std::sync::Arc;

use crate::event::EncodedEvent;
use crate::link::{Link, ToAgent};
use crate::model::{EventKind, Generation, JsonObject, Seq, Task, TaskEvent};
use crate::store::{Batch, TaskWrite};

use super::{count_in, Core};

/// One atomic change: task writes, events and after-commit callbacks.
pub(crate) struct Txn {
    pub batch: Batch,
    pub(super) touched: Vec<(String, Option<Seq>)>,
    pub now: i64,
    pub timers_added: bool,
}

impl Txn {
    pub fn new() -> Txn {
        Txn {
            batch: Batch::default(),
            touched: Vec::new(),
            now: crate::model::now_ms(),
            timers_added: false,
        }
    }

    fn touch(&mut self, task_id: &str, expected: Option<Seq>) {
        if !self.touched.iter().any(|(id, _)| id == task_id) {
            self.touched.push((task_id.to_string(), expected));
        }
    }

    /// Send `msg` to a sidecar once the transaction is durable (nothing if
    /// the commit fails: the sidecar never hears of what was not stored).
    pub fn send_after_commit(&mut self, link: &Link, msg: ToAgent) {
        let link = link.clone();
        self.batch.then(move |r| {
            if r.is_ok() {
                link.send(msg);
            }
        });
    }

    /// Answer a sidecar's report once the transaction is durable: `msg` on
    /// success, else the storage error for `task_id` (the sidecar keeps its
    /// report and sends it again).
    pub fn reply_after_commit(&mut self, link: &Link, task_id: &str, msg: ToAgent) {
        let link = link.clone();
        let task_id = task_id.to_string();
        self.batch.then(move |r| match r {
            Ok(()) => {
                link.send(msg);
            }
            Err(e) => {
                let mut reply = ToAgent::from_error(e);
                if let ToAgent::Error { task_id: t, .. } = &mut reply {
                    *t = Some(task_id);
                }
                link.send(reply);
            }
        });
    }
}

impl Core {
    /// Insert a new task (not yet evented).
    pub fn insert_new(&mut self, txn: &mut Txn, task: Task) {
        txn.touch(&task.task_id, None);
        count_in(&mut self.state_counts, task.state);
        self.tasks.insert(task.task_id.clone(), task);
    }

    /// Record one event for `task_id` (whose fields are already updated).
    pub fn emit(
        &mut self,
        txn: &mut Txn,
        task_id: &str,
        kind: EventKind,
        agent_id: &str,
        payload: JsonObject,
    ) -> Seq {
        self.last_seq += 1;
        let seq = self.last_seq;
        let task = self.tasks.get_mut(task_id).expect("emit for a known task");
        txn.touch(task_id, Some(task.last_seq));
        task.last_seq = seq;
        task.updated_at_ms = txn.now;
        if kind == EventKind::Created {
            task.created_seq = seq;
        }
        let traceparent = match self.traceparents.is_empty() {
            true => None,
            false => self.traceparents.get(task_id).map(String::as_str),
        };
        log_task_event(
            task_id,
            agent_id,
            self.node_id.as_deref(),
            traceparent,
            (kind, task.generation, seq),
        );
        if task.state.is_final() && traceparent.is_some() {
            self.traceparents.remove(task_id);
        }
        let event = TaskEvent {
            seq,
            task_id: task_id.to_string(),
            agent_id: agent_id.to_string(),
            kind,
            generation: task.generation,
            payload,
            timestamp_ms: txn.now,
            state: task.state,
        };
        // Encoded once, later, outside the hub lock (by the store's writer);
        // the store and every watcher share those bytes.
        txn.batch.events.push(Arc::new(EncodedEvent::new(event)));
        seq
    }

    /// Turn the transaction into a store batch. `durable`: the store's
    /// durable seq (only finished tasks stored up to it leave the cache).
    pub fn finish(&mut self, mut txn: Txn, durable: Seq) -> Batch {
        txn.batch.epoch = self.epoch;
        for (id, expected) in txn.touched.drain(..) {
            if let Some(task) = self.tasks.get(&id) {
                txn.batch
                    .tasks
                    .push(TaskWrite::new(task.row_copy(), expected));
            }
        }
        self.evict_finished(durable);
        txn.batch
    }
}

/// The target of the task event lines: the core's, whichever of its files
/// logs them (docs/operations.md shows it; log filters name it).
const TASK_TARGET: &str = "agenthub::hub::core";

/// One line per task event, in the task's span; when exporting, the span
/// is also sent, under the task's `traceparent`. Cheap when neither wants
/// it: the span is not even built. Progress is at debug: a busy agent
/// reports often.
fn log_task_event(
    task_id: &str,
    agent_id: &str,
    node_id: Option<&str>,
    traceparent: Option<&str>,
    (kind, generation, seq): (EventKind, Generation, Seq),
) {
    let exporting = crate::telemetry::exporting();
    let progress = kind == EventKind::Progress;
    let logged = match progress {
        true => tracing::enabled!(target: TASK_TARGET, tracing::Level::DEBUG),
        false => tracing::enabled!(target: TASK_TARGET, tracing::Level::INFO),
    };
    if !exporting && !logged {
        return;
    }
    let span = crate::telemetry::task_span(task_id, agent_id, node_id);
    if exporting {
        crate::telemetry::trace_task_span(&span, kind.as_str(), traceparent);
    }
    span.in_scope(|| match progress {
        true => tracing::debug!(target: TASK_TARGET, generation, seq, "task PROGRESS"),
        false => tracing::info!(target: TASK_TARGET, generation, seq, "task {}", kind.as_str()),
    });
}
