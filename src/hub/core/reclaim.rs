//! How a task leaves its agent: releasing the slot, ending an attempt,
//! reclaiming, finishing or failing it for good; the fence on reports; and
//! the lost-task rules (a task taken from an agent that stayed away, held
//! back until that agent reports on it).

use serde_json::{json, Value};

use crate::error::Error;
use crate::link::{Report, ToAgent};
use crate::metrics::Metrics;
use crate::model::{EventKind, Generation, Task, TaskState};

use super::{obj, set_state, Core, Txn};

impl Core {
    /// Release the task's slot on its assignee (if any).
    fn release(&mut self, task_id: &str) -> Option<String> {
        let agent_id = self.tasks.get(task_id)?.agent_id.clone()?;
        if let Some(agent) = self.agents.get_mut(&agent_id) {
            agent.active.remove(task_id);
            // A slot is free again, whatever `busy` said.
            agent.busy = None;
            self.schedulable = true;
        }
        Some(agent_id)
    }

    /// End the current attempt: back to the queue, or FAILED for good once
    /// `max_attempts` attempts are used up. Returns the agent it was taken from.
    pub fn end_attempt(&mut self, task_id: &str, error: Value) -> Option<String> {
        let from = self.release(task_id);
        let task = self.tasks.get_mut(task_id).expect("known task");
        task.error = Some(error);
        if task.attempts >= task.max_attempts {
            set_state(&mut self.state_counts, task, TaskState::Failed);
            self.finished.push_back(task_id.to_string());
            self.forget_preferences(task_id);
        } else {
            set_state(&mut self.state_counts, task, TaskState::Queued);
            if !task.pinned {
                task.agent_id = None;
            }
            self.enqueue(task_id);
        }
        from
    }

    /// Take an active task back from its agent (`RECLAIMED`), telling a
    /// still-connected agent to stop (`task_cancelled`).
    pub fn reclaim(&mut self, txn: &mut Txn, metrics: &Metrics, task_id: &str, reason: &str) {
        let mut error = json!({ "reason": reason });
        if reason == RECLAIM_DISCONNECTED {
            // Whose run it was, kept across a hub restart (see `lost_by`).
            if let Some(agent) = &self.tasks[task_id].agent_id {
                error["agent_id"] = json!(agent);
            }
        }
        let from = self.end_attempt(task_id, error);
        let agent_id = from.unwrap_or_default();
        if !self.tasks[task_id].state.is_final() {
            // Prefer someone else next time.
            self.avoid
                .entry(task_id.to_string())
                .or_default()
                .push(agent_id.clone());
        }
        self.emit(
            txn,
            task_id,
            EventKind::Reclaimed,
            &agent_id,
            obj(json!({ "reason": reason })),
        );
        metrics.reclaimed(reason);
        if let Some(session) = self.agents.get(&agent_id).and_then(|a| a.session.clone()) {
            let msg = ToAgent::TaskCancelled {
                task_id: task_id.to_string(),
                reason: reason.to_string(),
            };
            txn.send_after_commit(&session, msg);
        }
    }

    /// Drop the scheduler's per-task agent preferences (task final or retried).
    pub fn forget_preferences(&mut self, task_id: &str) {
        self.rejected_by.remove(task_id);
        self.avoid.remove(task_id);
        self.last_activity.remove(task_id);
        self.forget_lost(task_id);
    }

    /// The task is no longer waiting for the sidecar it was taken from.
    pub fn forget_lost(&mut self, task_id: &str) {
        if let Some(lost) = self.lost.remove(task_id) {
            self.settled(&lost.agent_id, task_id);
        }
    }

    /// The agent has reported on a task it lost while away (or the wait is
    /// over): the task is held back no more, now or on a later identify.
    pub fn settled(&mut self, agent_id: &str, task_id: &str) {
        if let Some(lost) = self.lost.get_mut(task_id) {
            lost.waited = true;
        }
        if let Some(agent) = self.agents.get_mut(agent_id) {
            if agent.settling.remove(task_id) {
                self.schedulable = true;
            }
        }
    }

    /// The wait for the agent's reports is over (settle window, disconnect).
    pub fn settle_all(&mut self, agent_id: &str) {
        let pending: Vec<String> = match self.agents.get(agent_id) {
            Some(a) => a.settling.iter().cloned().collect(),
            None => return,
        };
        for task_id in pending {
            self.settled(agent_id, &task_id);
        }
    }

    /// Is the task held back until the agent it was lost by reports on it?
    pub(super) fn is_settling(&self, task_id: &str) -> bool {
        self.lost.get(task_id).is_some_and(|lost| {
            self.agents
                .get(&lost.agent_id)
                .is_some_and(|a| a.settling.contains(task_id))
        })
    }

    /// Finish a task for good (COMPLETED or CANCELLED), freeing its slot.
    pub fn finalize(&mut self, task_id: &str, state: TaskState) -> Option<String> {
        self.dequeue(task_id);
        self.waiting.remove(task_id);
        let from = if self.tasks[task_id].state.is_active() {
            self.release(task_id)
        } else {
            None
        };
        self.forget_preferences(task_id);
        self.cancel_timers(task_id);
        self.last_activity.remove(task_id);
        let task = self.tasks.get_mut(task_id).expect("known task");
        set_state(&mut self.state_counts, task, state);
        self.finished.push_back(task_id.to_string());
        from
    }

    /// FAIL a task for good with `error` (a hub reason), wherever it is:
    /// waiting, queued, or at an agent (which is told to stop).
    pub fn fail_task(&mut self, txn: &mut Txn, task_id: &str, error: Value) {
        let from = self.finalize(task_id, TaskState::Failed);
        let task = self.tasks.get_mut(task_id).expect("known task");
        task.error = Some(error.clone());
        let agent = task.agent_id.clone().unwrap_or_default();
        let reason = error
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("failed")
            .to_string();
        self.emit(txn, task_id, EventKind::Failed, &agent, obj(error));
        if let Some(session) = from
            .and_then(|a| self.agents.get(&a))
            .and_then(|a| a.session.clone())
        {
            let msg = ToAgent::TaskCancelled {
                task_id: task_id.to_string(),
                reason,
            };
            txn.send_after_commit(&session, msg);
        }
    }
}

/// A task taken from an agent for staying away past the grace.
pub(crate) struct LostTask {
    pub agent_id: String,
    /// The generation it had (and still has while queued).
    pub generation: Generation,
    /// The agent came back and was waited for once: never held back again.
    pub waited: bool,
}

impl LostTask {
    pub fn new(agent_id: String, generation: Generation) -> LostTask {
        LostTask {
            agent_id,
            generation,
            waited: false,
        }
    }
}

/// A report is applied only if the reporter is the task's current assignee
/// and, when it gives a generation, that generation is current.
pub(in crate::hub) fn fence(core: &Core, agent_id: &str, r: &Report) -> crate::error::Result<()> {
    let task = core
        .tasks
        .get(&r.task_id)
        .ok_or_else(|| Error::UnknownTask(r.task_id.clone()))?;
    if r.generation.is_some_and(|g| g != task.generation) {
        return Err(Error::StaleGeneration {
            task_id: r.task_id.clone(),
            current: task.generation,
        });
    }
    if task.agent_id.as_deref() != Some(agent_id) {
        return Err(Error::NotTaskOwner(r.task_id.clone()));
    }
    if task.state.is_final() {
        return Err(Error::TaskFinished(r.task_id.clone()));
    }
    if !task.state.is_active() {
        return Err(Error::NotTaskOwner(r.task_id.clone()));
    }
    Ok(())
}

/// The agent a queued task was taken from for staying away past the grace,
/// if the stored record tells: the error of that reclaim names it (a record
/// from before it did: a pinned task keeps its agent). Any later assignment
/// ends with another error, or leaves the task not queued.
pub(super) fn lost_by(task: &Task) -> Option<String> {
    let error = task.error.as_ref()?;
    let reason = error.get("reason")?.as_str()?;
    if task.state != TaskState::Queued || reason != RECLAIM_DISCONNECTED {
        return None;
    }
    match error.get("agent_id").and_then(Value::as_str) {
        Some(agent) => Some(agent.to_string()),
        None if task.pinned => task.agent_id.clone(),
        None => None,
    }
}

/// Why the hub FAILED a task: a dependency FAILED or was CANCELLED...
pub(crate) const REASON_DEPENDENCY_FAILED: &str = "dependency_failed";
/// ...it stayed QUEUED past its `queue_ttl_ms`...
pub(crate) const REASON_TTL_EXPIRED: &str = "ttl_expired";
/// ...it was not finished by its `deadline_ms`.
pub(crate) const REASON_DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// The reclaim reason for an agent that stayed away past the grace.
pub(crate) const RECLAIM_DISCONNECTED: &str = "agent_disconnected";
