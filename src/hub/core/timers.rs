//! The timers the core arms: what each is about, arming and disarming them
//! (per task, so they go with it), the queue-TTL and deadline timers and the
//! progress timeout. Firing them is `Hub`'s (`hub/timers.rs`).

use tokio::time::Instant;

use crate::config::Config;
use crate::model::{Generation, TaskState};

use super::{Core, Txn};

/// Something the hub must check at a given instant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Reclaim if the task is still ASSIGNED at this generation.
    Accept(String, Generation),
    /// Reclaim if the task, RUNNING at this generation, has been silent too long.
    Progress(String, Generation),
    /// Reclaim the agent's tasks if it is still away after this disconnect.
    Grace(String, u64),
    /// Stop waiting for the agent (at this epoch) to report on the tasks it
    /// lost while away.
    Settle(String, u64),
    /// End the agent's `busy` backoff (this one).
    Busy(String, u64),
    /// Fail the task (`ttl_expired`) if it is still QUEUED.
    QueueTtl(String),
    /// Fail the task (`deadline_exceeded`) if it is not finished.
    Deadline(String),
}

impl Timer {
    /// The task a timer is about (timers about agents have none).
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Timer::Accept(t, _)
            | Timer::Progress(t, _)
            | Timer::QueueTtl(t)
            | Timer::Deadline(t) => Some(t),
            Timer::Grace(..) | Timer::Settle(..) | Timer::Busy(..) => None,
        }
    }
}

/// An armed timer: when, a nonce that orders equal instants, what.
pub(crate) type TimerEntry = (Instant, u64, Timer);

impl Core {
    pub(super) fn push_timer(&mut self, at: Instant, timer: Timer) {
        self.timer_nonce += 1;
        let entry = (at, self.timer_nonce, timer);
        if let Some(task_id) = entry.2.task_id() {
            self.task_timers
                .entry(task_id.to_string())
                .or_default()
                .push(entry.clone());
        }
        self.timers.insert(entry);
    }

    /// Take the earliest timer if it is due at `now`.
    pub fn pop_due_timer(&mut self, now: Instant) -> Option<Timer> {
        if self.timers.first().is_none_or(|(at, _, _)| *at > now) {
            return None;
        }
        let (_, nonce, timer) = self.timers.pop_first()?;
        if let Some(task_id) = timer.task_id() {
            if let Some(armed) = self.task_timers.get_mut(task_id) {
                armed.retain(|(_, n, _)| *n != nonce);
                if armed.is_empty() {
                    self.task_timers.remove(task_id);
                }
            }
        }
        Some(timer)
    }

    /// Disarm every timer of a task (it finished: none of them can fire).
    pub(super) fn cancel_timers(&mut self, task_id: &str) {
        for entry in self.task_timers.remove(task_id).unwrap_or_default() {
            self.timers.remove(&entry);
        }
    }

    /// Timers armed now (for `/metrics`).
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Arm the queue-TTL and deadline timers of a live task from the
    /// absolute times stored in it (at push, and again at every load).
    pub fn arm_deadlines(&mut self, task_id: &str) -> bool {
        let Some(task) = self.tasks.get(task_id) else {
            return false;
        };
        let ttl = task
            .ttl_expires_at()
            .filter(|_| task.state == TaskState::Queued);
        let deadline = task.deadline().filter(|_| !task.state.is_final());
        if let Some(at) = ttl {
            self.push_timer(instant_at(at), Timer::QueueTtl(task_id.to_string()));
        }
        if let Some(at) = deadline {
            self.push_timer(instant_at(at), Timer::Deadline(task_id.to_string()));
        }
        ttl.is_some() || deadline.is_some()
    }

    /// A report made the task RUNNING or showed it alive.
    pub fn touch_activity(
        &mut self,
        txn: &mut Txn,
        cfg: &Config,
        task_id: &str,
        was_running: bool,
    ) {
        let Some(limit) = cfg.progress_timeout else {
            return;
        };
        let now = Instant::now();
        self.last_activity.insert(task_id.to_string(), now);
        if !was_running {
            let generation = self.tasks[task_id].generation;
            self.add_timer(
                txn,
                now + limit,
                Timer::Progress(task_id.to_string(), generation),
            );
        }
    }

    pub fn add_timer(&mut self, txn: &mut Txn, at: Instant, timer: Timer) {
        self.push_timer(at, timer);
        txn.timers_added = true;
    }
}

/// The `tokio` instant of a Unix-ms time (now, if it has passed).
fn instant_at(unix_ms: i64) -> Instant {
    let left = unix_ms.saturating_sub(crate::model::now_ms()).max(0) as u64;
    Instant::now() + std::time::Duration::from_millis(left)
}
