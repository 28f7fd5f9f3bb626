//! What today's AgentCom sidecars add to the protocol, and the rules that
//! keep a task from running twice when a sidecar comes back after the
//! reconnect grace (see `docs/protocol.md`, "Coming back after the grace").
//!
//! - `state_report` (after every reconnect: "I am still working on this task
//!   at this generation") → `state_report_ack` `continue` / `abort`.
//! - `wake_result`, `resource_report`, `agent_restarting`: no reply.
//! - `restart_sidecar`: an administrator asks a sidecar to restart.
//! - A task taken from an agent because it stayed away past the grace is
//!   remembered (`Core::lost`) while it waits in the queue. When that agent
//!   identifies again, it gets no new task, and those tasks go to nobody,
//!   until it has reported on each of them, leaves again, or `reconnect_settle`
//!   passes (once per task: a flapping sidecar cannot starve the others). If it
//!   reports that it is still running a task that was not assigned again
//!   since, the hub gives the task back to it: no other run can exist, since
//!   any new assignment raises the generation. It gets the task back under a
//!   new generation, told in `task_continue`, whichever form its report takes
//!   (`state_report`, `task_recovering` with or without the generation; see
//!   [`Core::readopt`]).
//! - A `busy` rejection does not cost an attempt and leaves the agent alone
//!   until it has room again.

use serde_json::{json, Value};
use tokio::time::Instant;

use super::core::{fence, obj, set_state, Core, Timer, Txn};
use super::Hub;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::link::{Link, Report, StateAction, ToAgent};
use crate::model::{EventKind, Generation, JsonObject, Task, TaskState};

/// The `task_rejected` reason that means "no free slot right now".
pub const REJECT_BUSY: &str = "busy";

/// The agent status shown after `agent_restarting`, until it identifies again.
pub const STATUS_RESTARTING: &str = "restarting";

impl Hub {
    /// Ask a connected agent's sidecar to restart itself (`restart_sidecar`).
    pub fn restart_agent(&self, agent_id: &str, reason: &str) -> Result<()> {
        let core = self.lock();
        let session = core
            .agents
            .get(agent_id)
            .and_then(|a| a.session.clone())
            .ok_or_else(|| Error::AgentNotConnected(agent_id.to_string()))?;
        let reason = match reason {
            "" => "hub_commanded".to_string(),
            r => r.to_string(),
        };
        tracing::info!(agent_id = %agent_id, %reason, "asking the sidecar to restart");
        if session.send(ToAgent::RestartSidecar { reason }) {
            Ok(())
        } else {
            Err(Error::AgentNotConnected(agent_id.to_string()))
        }
    }

    /// `state_report`: `continue` if the task is this agent's, active, at the
    /// reported generation — or was taken from it while it was away and not
    /// assigned since (then it is its own again, under a new generation that
    /// a `task_continue` after the ack tells it); `abort` otherwise.
    pub(super) fn on_state_report(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        session: &Link,
        r: Report,
    ) {
        core.settled(agent_id, &r.task_id);
        let current = core.tasks.get(&r.task_id).and_then(|t| {
            let own = t.agent_id.as_deref() == Some(agent_id) && t.state.is_active();
            (own && r.generation == Some(t.generation)).then_some(t.state)
        });
        let action = match (current, r.generation) {
            (Some(TaskState::Assigned), _) => {
                // It runs the task: as good as `task_accepted`.
                let task = core.tasks.get_mut(&r.task_id).expect("checked");
                set_state(&mut core.state_counts, task, TaskState::Running);
                core.emit(txn, &r.task_id, EventKind::Accepted, agent_id, r.payload);
                core.touch_activity(txn, &self.config, &r.task_id, false);
                StateAction::Continue
            }
            (Some(_), _) => {
                core.touch_activity(txn, &self.config, &r.task_id, true);
                StateAction::Continue
            }
            (None, Some(g)) if core.can_readopt(agent_id, &r.task_id, g) => {
                let task_id = r.task_id.clone();
                let generation = core.readopt(txn, &self.config, agent_id, &task_id, r.payload);
                let ack = ToAgent::StateReportAck {
                    task_id: task_id.clone(),
                    action: StateAction::Continue,
                };
                txn.reply_after_commit(session, &task_id, ack);
                // The ack names no generation: AgentCom's sidecar learns the
                // new one from `task_continue` (for a task in its active slot
                // it only takes the generation).
                let msg = ToAgent::TaskContinue {
                    task_id: task_id.clone(),
                    generation,
                };
                txn.reply_after_commit(session, &task_id, msg);
                return;
            }
            (None, _) => {
                // It drops the task: whatever made it busy is gone.
                if let Some(agent) = core.agents.get_mut(agent_id) {
                    if agent.busy.take().is_some() {
                        core.agent_changed();
                    }
                }
                StateAction::Abort
            }
        };
        tracing::info!(agent_id = %agent_id, task_id = %r.task_id, ?action, "state_report");
        let ack = ToAgent::StateReportAck {
            task_id: r.task_id.clone(),
            action,
        };
        txn.reply_after_commit(session, &r.task_id, ack);
    }

    /// `wake_result`: a successful wake of a running task is a sign of life
    /// (it restarts the progress timeout). Nothing is stored or answered.
    pub(super) fn on_wake_result(&self, core: &mut Core, txn: &mut Txn, agent_id: &str, r: Report) {
        let success = r.payload.get("status").and_then(Value::as_str) == Some("success");
        let running =
            fence(core, agent_id, &r).is_ok() && core.tasks[&r.task_id].state == TaskState::Running;
        if success && running {
            core.touch_activity(txn, &self.config, &r.task_id, true);
        }
    }
}

/// Does the run a restarted sidecar reports with a generation-less
/// `task_recovering` (AgentCom's `reportRecovery`) go on without the
/// sidecar's process? On AgentCom's wake path, once the agent was woken, it
/// does: the woken agent is a process of its own and writes its result file
/// later, which the restarted sidecar picks up after `task_continue`. A task
/// the sidecar executes itself (`routing_decision` with a `target_type` other
/// than `wake`) ran inside the killed process, and one it reports as
/// `accepted` or `waking` may never have woken its agent: given back, either
/// would sit in its active slot with nothing running it.
pub(super) fn run_outlives_sidecar(task: &Task, report: &JsonObject) -> bool {
    let target = task
        .metadata
        .get("routing_decision")
        .and_then(|r| r.get("target_type"))
        .and_then(Value::as_str);
    let in_process = target.is_some_and(|t| !t.is_empty() && t != "wake");
    let status = report.get("last_status").and_then(Value::as_str);
    let not_started = matches!(status, Some("accepted" | "waking" | "failed"));
    !in_process && !not_started
}

/// `agent_restarting`: the sidecar is about to exit and come back; it gets no
/// new task until it identifies again (its tasks stay with it, as for any
/// disconnect).
pub(super) fn on_agent_restarting(core: &mut Core, agent_id: &str, reason: Option<String>) {
    if let Some(agent) = core.agents.get_mut(agent_id) {
        tracing::info!(agent_id = %agent_id, reason = reason.as_deref().unwrap_or(""), "sidecar restarting");
        agent.restarting = true;
        agent.status = STATUS_RESTARTING.to_string();
    }
}

impl Core {
    /// On identify: note what the sidecar may still run from before this
    /// connection (for generation-less `task_recovering`), and hold back the
    /// tasks taken from it while it was away until it reports on them.
    pub fn note_tasks_from_before(
        &mut self,
        txn: &mut Txn,
        cfg: &Config,
        agent_id: &str,
        epoch: u64,
    ) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        let mut before: std::collections::HashMap<String, Generation> = agent
            .active
            .iter()
            .map(|t| (t.clone(), self.tasks[t].generation))
            .collect();
        let mut settling = std::collections::BTreeSet::new();
        for (task_id, lost) in &self.lost {
            if lost.agent_id == agent_id {
                before.insert(task_id.clone(), lost.generation);
                if !lost.waited {
                    settling.insert(task_id.clone());
                }
            }
        }
        let agent = self.agents.get_mut(agent_id).expect("checked");
        agent.before = before;
        agent.settling = settling;
        if !agent.settling.is_empty() {
            tracing::info!(agent_id = %agent_id, lost = ?agent.settling, "waiting for the sidecar to report on tasks it lost while away");
            let at = Instant::now() + cfg.reconnect_settle;
            self.add_timer(txn, at, Timer::Settle(agent_id.to_string(), epoch));
        }
    }

    /// A generation-less `task_recovering` is about the run of a task lost by
    /// `agent_id` while it was away and not assigned since: the generation
    /// it had then, if so.
    pub fn lost_generation(&self, agent_id: &str, task_id: &str) -> Option<Generation> {
        let lost = self.lost.get(task_id).filter(|l| l.agent_id == agent_id)?;
        self.can_readopt(agent_id, task_id, lost.generation)
            .then_some(lost.generation)
    }

    /// May `agent_id`, reporting that it still runs `task_id` at `generation`,
    /// have it back? Only if the task waits in the queue at that very
    /// generation: every assignment raises the generation, so it was given
    /// to nobody since — and the hub sent that generation only to the agent
    /// it assigned it to, so that was this one (for a pinned task, or one
    /// remembered as lost, the hub checks it too).
    pub fn can_readopt(&self, agent_id: &str, task_id: &str, generation: Generation) -> bool {
        let Some(task) = self.tasks.get(task_id) else {
            return false;
        };
        let lost_by_other = self
            .lost
            .get(task_id)
            .is_some_and(|l| l.agent_id != agent_id);
        let pinned_to_other = task.pinned && task.agent_id.as_deref() != Some(agent_id);
        generation >= 1
            && task.state == TaskState::Queued
            && task.generation == generation
            && !lost_by_other
            && !pinned_to_other
    }

    /// Give a task back to the agent it was taken from (see [`Core::can_readopt`]):
    /// RUNNING again, same attempt (it is the same run). `RECOVERING` stores
    /// the report (at the generation the task had), `CONTINUED` the give-back.
    /// It is a new assignment of that run to the same agent: the generation
    /// rises, as for every assignment, so nothing sent at the reclaimed
    /// generation lands any more, and `CONTINUED` carries the new one with
    /// `previous_generation`. Returns the generation the agent now holds it
    /// at (the sidecar learns it from `task_continue`).
    pub fn readopt(
        &mut self,
        txn: &mut Txn,
        cfg: &Config,
        agent_id: &str,
        task_id: &str,
        report: JsonObject,
    ) -> Generation {
        self.dequeue(task_id);
        self.forget_lost(task_id);
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.active.insert(task_id.to_string());
        }
        self.emit(txn, task_id, EventKind::Recovering, agent_id, report);
        let task = self.tasks.get_mut(task_id).expect("known task");
        set_state(&mut self.state_counts, task, TaskState::Running);
        task.agent_id = Some(agent_id.to_string());
        let before = task.generation;
        task.generation += 1;
        let generation = task.generation;
        let payload = json!({"reason": "still_running", "previous_generation": before});
        self.emit(txn, task_id, EventKind::Continued, agent_id, obj(payload));
        self.touch_activity(txn, cfg, task_id, false);
        tracing::info!(agent_id = %agent_id, task_id, generation, previous_generation = before, "task given back to the sidecar still running it");
        generation
    }

    /// The agent rejected a task as `busy`: no new task for it until one of
    /// its tasks ends, it identifies again, or `backoff` passes.
    pub fn mark_busy(&mut self, txn: &mut Txn, agent_id: &str, backoff: std::time::Duration) {
        self.busy_marks += 1;
        let token = self.busy_marks;
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.busy = Some(token);
            let at = Instant::now() + backoff;
            self.add_timer(txn, at, Timer::Busy(agent_id.to_string(), token));
        }
    }
}
