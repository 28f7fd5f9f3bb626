//! Live task output: `task_output` from sidecars in, `WatchTaskOutput` out.
//!
//! Output is kept off the lifecycle path. A chunk takes the core lock only
//! for the ownership check (a few map lookups, no write, no event); storing
//! goes to the output store's own writer and file (see
//! [`crate::store::sqlite::output`]), and readers are woken from its
//! commits through a per-task `watch` of the stored end offset, not through
//! the event bus. A watcher reads what is stored (subscribe first, then
//! read), so it resumes from any offset, follows live output, and ends
//! once the task is finished and its output flushed and sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::Hub;
use crate::error::{Error, Result};
use crate::link::Output;
use crate::model::OutputChunk;

/// Output bytes read from the store per query.
const READ_BYTES: usize = 256 * 1024;
/// Chunks queued per watcher between its task and its stream.
const WATCHER_QUEUE: usize = 64;

/// Stored end offset per task that someone watches. Entries without
/// receivers are dropped on the next commit for that task.
#[derive(Default)]
pub(crate) struct OutputWatches {
    /// Task id → sender of its stored end offset. A std mutex, never held
    /// across `.await`.
    map: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl OutputWatches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(&self, task_id: &str) -> watch::Receiver<u64> {
        self.lock()
            .entry(task_id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Tasks with an entry (for tests and `/metrics`).
    pub fn watched_tasks(&self) -> usize {
        self.lock().len()
    }

    /// Drop the entry of a task nobody watches any more.
    fn forget_unwatched(&self, task_id: &str) {
        let mut map = self.lock();
        if map.get(task_id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(task_id);
        }
    }

    /// The output store committed output of these tasks.
    pub fn committed(&self, ends: &[(String, u64)]) {
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        for (task_id, end) in ends {
            if let Some(tx) = map.get(task_id) {
                if tx.receiver_count() == 0 {
                    map.remove(task_id);
                } else {
                    tx.send_replace(*end);
                }
            }
        }
    }
}

impl Hub {
    /// A sidecar's `task_output`: stored if the agent holds the task (at
    /// the generation given, if any); otherwise dropped (no reply).
    pub async fn task_output(&self, agent_id: &str, out: Output) {
        let generation = {
            let core = self.lock();
            core.tasks
                .get(&out.task_id)
                .filter(|t| {
                    t.state.is_active()
                        && t.agent_id.as_deref() == Some(agent_id)
                        && out.generation.is_none_or(|g| g == t.generation)
                })
                .map(|t| t.generation)
        };
        let Some(generation) = generation else {
            self.metrics.task_output_dropped.inc();
            tracing::debug!(agent_id = %agent_id, task_id = %out.task_id, "task_output for a task the agent does not hold; dropped");
            return;
        };
        self.metrics.task_output_bytes.inc_by(out.data.len() as u64);
        if let Err(e) = self
            .output
            .append(&out.task_id, generation, out.stream, out.data)
            .await
        {
            tracing::debug!(error = %e, "task_output not stored");
        }
    }

    /// A task's output from `after_offset`; with `follow`, live output
    /// until the task is finished. `NOT_FOUND` if unknown.
    pub async fn watch_output(
        self: &Arc<Self>,
        task_id: &str,
        after_offset: u64,
        follow: bool,
    ) -> Result<mpsc::Receiver<Result<OutputChunk>>> {
        // Subscribe to both signals before the first read.
        let ends = self.output_watches.subscribe(task_id);
        let finished = self.waiters.register(task_id);
        if let Err(e) = self.get_task(task_id).await {
            // Nothing is kept for an id nobody can watch.
            drop((ends, finished));
            self.output_watches.forget_unwatched(task_id);
            return Err(e);
        }
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let hub = self.clone();
        let task_id = task_id.to_string();
        tokio::spawn(async move {
            let id = task_id.clone();
            hub.follow_output(task_id, after_offset, follow, ends, finished, tx)
                .await;
            hub.output_watches.forget_unwatched(&id);
        });
        Ok(rx)
    }

    /// One output watcher, until the client goes away, the task ends, or
    /// (without `follow`) the stored output is sent.
    async fn follow_output(
        &self,
        task_id: String,
        after_offset: u64,
        follow: bool,
        mut ends: watch::Receiver<u64>,
        finished: super::wait::WaitGuard,
        tx: mpsc::Sender<Result<OutputChunk>>,
    ) {
        let mut cursor = after_offset;
        // The task's state is read at the start and after each finish signal
        // only (not on every output wake). The signal is listened for before
        // the state is read, so none is missed.
        let mut finish = Box::pin(finished.notify.notified());
        finish.as_mut().enable();
        let mut check = true;
        let mut done = false;
        loop {
            if check {
                check = false;
                done = match self.get_task(&task_id).await {
                    Ok(t) => t.state.is_final(),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if done {
                    // Output accepted before the end may still be queued.
                    let _ = self.output.flush().await;
                }
            }
            match self.send_stored(&task_id, &mut cursor, &tx).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            if done || !follow {
                return;
            }
            tokio::select! {
                r = ends.changed() => if r.is_err() { return },
                _ = finish.as_mut() => {
                    finish = Box::pin(finished.notify.notified());
                    finish.as_mut().enable();
                    check = true;
                }
                _ = tx.closed() => return,
            }
        }
    }

    /// Send every stored chunk after `cursor`. False: the client went away.
    async fn send_stored(
        &self,
        task_id: &str,
        cursor: &mut u64,
        tx: &mpsc::Sender<Result<OutputChunk>>,
    ) -> Result<bool> {
        loop {
            let store = self.output.clone();
            let (id, after) = (task_id.to_string(), *cursor);
            let chunks = tokio::task::spawn_blocking(move || store.read(&id, after, READ_BYTES))
                .await
                .map_err(|e| Error::storage(e.to_string()))??;
            if chunks.is_empty() {
                return Ok(true);
            }
            for c in chunks {
                *cursor = c.end();
                if tx.send(Ok(c)).await.is_err() {
                    return Ok(false);
                }
            }
        }
    }
}
