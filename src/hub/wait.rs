//! `WaitTask`: callers waiting for tasks to finish. No polling: the
//! after-commit callback of every batch that finished a task wakes that
//! task's waiters (only after the commit, so what they read is durable).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::Hub;
use crate::error::Result;
use crate::model::Task;

/// Tasks someone waits for → the signal that wakes them. An entry lives
/// while at least one waiter holds it.
#[derive(Default)]
pub(crate) struct Waiters {
    /// Task id → (its signal, how many waiters hold it). A std mutex, never
    /// held across `.await`.
    map: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Notify>, usize)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register interest in `task_id` (before reading its state).
    pub fn register(self: &Arc<Self>, task_id: &str) -> WaitGuard {
        let notify = {
            let mut map = self.lock();
            let entry = map
                .entry(task_id.to_string())
                .or_insert_with(|| (Arc::new(Notify::new()), 0));
            entry.1 += 1;
            entry.0.clone()
        };
        WaitGuard {
            waiters: self.clone(),
            task_id: task_id.to_string(),
            notify,
        }
    }

    /// Wake everyone waiting for these tasks (they finished; committed).
    pub fn finished<'a>(&self, task_ids: impl IntoIterator<Item = &'a str>) {
        let map = self.lock();
        if map.is_empty() {
            return;
        }
        for id in task_ids {
            if let Some((n, _)) = map.get(id) {
                n.notify_waiters();
            }
        }
    }
}

/// One waiter's registration; dropping it forgets the entry when it was the last.
pub(crate) struct WaitGuard {
    waiters: Arc<Waiters>,
    task_id: String,
    /// Notified when the task finished (after the commit).
    pub notify: Arc<Notify>,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some(entry) = map.get_mut(&self.task_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.task_id);
            }
        }
    }
}

impl Hub {
    /// The task once it is finished, or as it is when `timeout` passes
    /// (`None`: no limit). `NOT_FOUND` for an unknown task.
    pub async fn wait_task(&self, task_id: &str, timeout: Option<Duration>) -> Result<Task> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let guard = self.waiters.register(task_id);
        loop {
            // Listen before reading, so a finish in between is not missed.
            let notified = guard.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let task = self.get_task(task_id).await?;
            if task.state.is_final() {
                return Ok(task);
            }
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => return self.get_task(task_id).await,
                    }
                }
                None => notified.await,
            }
        }
    }
}
