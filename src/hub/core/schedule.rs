//! The scheduler: the queue order, which agents have a free slot and the
//! capabilities a task needs, and assigning queued tasks to them.

use std::cmp::Reverse;
use std::ops::Bound;

use serde_json::json;
use tokio::time::Instant;

use crate::config::Config;
use crate::link::{ToAgent, ENRICHMENT_KEYS};
use crate::metrics::Metrics;
use crate::model::{EventKind, Priority, Seq, Task, TaskState};

use super::{obj, priority_index, set_state, Agent, Core, Timer, Txn};

/// A queued task's place: priority first, then creation order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct QueueKey {
    priority: Reverse<Priority>,
    created_seq: Seq,
    task_id: String,
}

impl QueueKey {
    pub fn of(task: &Task) -> QueueKey {
        QueueKey {
            priority: Reverse(task.priority),
            created_seq: task.created_seq,
            task_id: task.task_id.clone(),
        }
    }
}

impl Agent {
    fn has_free_slot(&self) -> bool {
        self.session.is_some()
            && !self.draining
            && !self.restarting
            && self.busy.is_none()
            && self.settling.is_empty()
            && (self.active.len() as u64) < self.max_concurrency as u64
    }

    fn can_run(&self, task: &Task) -> bool {
        task.needed_capabilities
            .iter()
            .all(|c| self.capabilities.contains(c))
    }
}

impl Core {
    pub fn enqueue(&mut self, task_id: &str) {
        if let Some(t) = self.tasks.get(task_id) {
            if self.queue.insert(QueueKey::of(t)) {
                self.queued_by_priority[priority_index(t.priority)] += 1;
            }
            self.schedulable = true;
        }
    }

    /// An agent identified, or changed status: it may take queued tasks.
    pub fn agent_changed(&mut self) {
        self.schedulable = true;
    }

    pub fn dequeue(&mut self, task_id: &str) {
        if let Some(t) = self.tasks.get(task_id) {
            if self.queue.remove(&QueueKey::of(t)) {
                let i = priority_index(t.priority);
                self.queued_by_priority[i] = self.queued_by_priority[i].saturating_sub(1);
            }
        }
    }

    /// Assign queued tasks to agents with free slots: highest priority first,
    /// FIFO within a priority; among capable agents the least loaded, then
    /// the longest idle, preferring agents that did not reject the task.
    pub fn schedule(&mut self, txn: &mut Txn, cfg: &Config, metrics: &Metrics) {
        // Progress reports and the like change nothing the scheduler looks at.
        if self.degraded.is_some()
            || !std::mem::take(&mut self.schedulable)
            || self.queue.is_empty()
        {
            return;
        }
        let mut free: Vec<String> = self
            .agents
            .values()
            .filter(|a| a.has_free_slot())
            .map(|a| a.agent_id.clone())
            .collect();
        let mut next = self.queue.first().cloned();
        while let Some(key) = next {
            if free.is_empty() {
                break;
            }
            next = self
                .queue
                .range((Bound::Excluded(&key), Bound::Unbounded))
                .next()
                .cloned();
            if self.is_settling(&key.task_id) {
                continue;
            }
            let task = &self.tasks[&key.task_id];
            let rejected = self.rejected_by.get(&task.task_id);
            let avoid = self.avoid.get(&task.task_id);
            let pick = if task.pinned {
                free.iter().find(|a| Some(*a) == task.agent_id.as_ref())
            } else {
                free.iter()
                    .filter(|a| self.agents[*a].can_run(task))
                    .filter(|a| rejected.is_none_or(|r| !r.contains(a)))
                    .min_by_key(|a| {
                        let agent = &self.agents[*a];
                        (
                            avoid.is_some_and(|r| r.contains(a)),
                            agent.active.len(),
                            agent.last_assigned,
                        )
                    })
            };
            let Some(agent_id) = pick.cloned() else {
                continue;
            };
            self.assign(txn, cfg, metrics, &key.task_id, &agent_id);
            if !self.agents[&agent_id].has_free_slot() {
                free.retain(|a| *a != agent_id);
            }
        }
    }

    fn assign(
        &mut self,
        txn: &mut Txn,
        cfg: &Config,
        metrics: &Metrics,
        task_id: &str,
        agent_id: &str,
    ) {
        self.dequeue(task_id);
        self.forget_lost(task_id);
        self.assign_counter += 1;
        let agent = self.agents.get_mut(agent_id).expect("known agent");
        agent.active.insert(task_id.to_string());
        agent.last_assigned = self.assign_counter;
        let session = agent.session.clone();
        let task = self.tasks.get_mut(task_id).expect("known task");
        metrics.assigned_after(txn.now.saturating_sub(task.updated_at_ms) as u64);
        set_state(&mut self.state_counts, task, TaskState::Assigned);
        task.agent_id = Some(agent_id.to_string());
        task.generation += 1;
        task.attempts += 1;
        let (generation, attempt) = (task.generation, task.attempts);
        self.emit(
            txn,
            task_id,
            EventKind::Assigned,
            agent_id,
            obj(json!({"attempt": attempt})),
        );
        self.add_timer(
            txn,
            Instant::now() + cfg.accept_timeout,
            Timer::Accept(task_id.to_string(), generation),
        );
        if let Some(session) = session {
            let traceparent = self.traceparents.get(task_id).map(String::as_str);
            let msg = task_assign(&self.tasks[task_id], txn.now, traceparent);
            txn.send_after_commit(&session, msg);
        }
    }
}

/// The `task_assign` message for a task's current generation, with the
/// enrichment fields AgentCom sidecars read at the top level.
pub(crate) fn task_assign(task: &Task, assigned_at: i64, traceparent: Option<&str>) -> ToAgent {
    let extra = ENRICHMENT_KEYS
        .iter()
        .filter_map(|k| Some((k.to_string(), task.metadata.get(*k)?.clone())))
        .collect();
    ToAgent::TaskAssign {
        task_id: task.task_id.clone(),
        description: task.description.clone(),
        metadata: task.metadata.clone(),
        generation: task.generation,
        assigned_at,
        traceparent: traceparent.map(str::to_string),
        extra,
    }
}
