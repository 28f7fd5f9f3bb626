//! Time-based reclaims: accept timeout, progress timeout, reconnect grace;
//! the ends of the settle window and the `busy` backoff; a task's queue TTL
//! and deadline (armed from the absolute times stored in the task, so they
//! survive restarts).
//! One task sleeps until the earliest deadline; every timer re-checks the
//! task's state when it fires, so stale timers are harmless. Time is
//! `tokio::time`, so tests can pause and advance it. While the store refuses
//! writes, no timer fires (a reclaim is a write); they fire after recovery.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use serde_json::json;

use super::core::{
    LostTask, Timer, Txn, REASON_DEADLINE_EXCEEDED, REASON_TTL_EXPIRED, RECLAIM_DISCONNECTED,
};
use super::Hub;
use crate::model::TaskState;

impl Hub {
    /// Run until `shutdown` turns true.
    pub async fn run_timers(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = {
                let core = self.lock();
                match core.degraded {
                    Some(_) => None,
                    None => core.timers.first().map(|(at, _, _)| *at),
                }
            };
            let deadline = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.timer_wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            self.fire_due_timers();
        }
    }

    /// Fire every timer that is due now (the timer task calls this; tests
    /// that drive the hub without it call it after advancing paused time).
    pub fn fire_due_timers(&self) {
        let now = Instant::now();
        let mut core = self.lock();
        if core.degraded.is_some() {
            return;
        }
        let mut txn = Txn::new();
        while let Some(timer) = core.pop_due_timer(now) {
            match timer {
                Timer::Accept(task_id, generation) => {
                    let due = core.tasks.get(&task_id).is_some_and(|t| {
                        t.state == TaskState::Assigned && t.generation == generation
                    });
                    if due {
                        core.reclaim(&mut txn, &self.metrics, &task_id, "accept_timeout");
                    }
                }
                Timer::Progress(task_id, generation) => {
                    let Some(limit) = self.config.progress_timeout else {
                        continue;
                    };
                    let Some(task) = core.tasks.get(&task_id) else {
                        continue;
                    };
                    if task.state != TaskState::Running || task.generation != generation {
                        continue;
                    }
                    let last = core.last_activity.get(&task_id).copied().unwrap_or(now);
                    let silent = now.saturating_duration_since(last);
                    if silent >= limit {
                        core.reclaim(&mut txn, &self.metrics, &task_id, "progress_timeout");
                    } else {
                        let at = now + (limit - silent);
                        core.add_timer(&mut txn, at, Timer::Progress(task_id, generation));
                    }
                }
                Timer::Grace(agent_id, epoch) => {
                    let Some(agent) = core.agents.get(&agent_id) else {
                        continue;
                    };
                    if agent.session.is_some() || agent.epoch != epoch {
                        continue;
                    }
                    let held: Vec<String> = agent.active.iter().cloned().collect();
                    for task_id in held {
                        core.reclaim(&mut txn, &self.metrics, &task_id, RECLAIM_DISCONNECTED);
                        // Its sidecar may still be running it: remember whose it was.
                        let task = &core.tasks[&task_id];
                        if task.state == TaskState::Queued {
                            let lost = LostTask::new(agent_id.clone(), task.generation);
                            core.lost.insert(task_id, lost);
                        }
                    }
                }
                Timer::Settle(agent_id, epoch) => {
                    let Some(agent) = core.agents.get(&agent_id) else {
                        continue;
                    };
                    if agent.epoch == epoch && !agent.settling.is_empty() {
                        tracing::info!(agent_id = %agent_id, unreported = ?agent.settling, "settle window over");
                        core.settle_all(&agent_id);
                    }
                }
                Timer::QueueTtl(task_id) => {
                    let due = core
                        .tasks
                        .get(&task_id)
                        .is_some_and(|t| t.state == TaskState::Queued);
                    if due {
                        let error = json!({"reason": REASON_TTL_EXPIRED});
                        core.fail_task(&mut txn, &task_id, error);
                    }
                }
                Timer::Deadline(task_id) => {
                    let due = core
                        .tasks
                        .get(&task_id)
                        .is_some_and(|t| !t.state.is_final());
                    if due {
                        let error = json!({"reason": REASON_DEADLINE_EXCEEDED});
                        core.fail_task(&mut txn, &task_id, error);
                    }
                }
                Timer::Busy(agent_id, token) => {
                    let Some(agent) = core.agents.get_mut(&agent_id) else {
                        continue;
                    };
                    if agent.busy == Some(token) {
                        agent.busy = None;
                        core.agent_changed();
                    }
                }
            }
        }
        core.schedule(&mut txn, &self.config, &self.metrics);
        self.submit(&mut core, txn);
    }
}
