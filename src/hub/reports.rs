//! The sidecar side of the hub: identify, lifecycle reports, disconnects.
//! Replies that follow a change are sent only after the change is durable.

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::agentcom::{on_agent_restarting, run_outlives_sidecar, REJECT_BUSY};
use super::core::{fence, obj, set_state, task_assign, Agent, Core, Timer, Txn};
use super::Hub;
use crate::auth::Role;
use crate::error::{Error, Result};
use crate::link::{AckStatus, CloseReason, FromAgent, Identify, Link, Report, ToAgent};
use crate::model::{now_ms, EventKind, Generation, TaskState};

/// The status with which a sidecar asks for no new tasks.
pub const STATUS_DRAINING: &str = "draining";

impl Hub {
    /// Register a sidecar session. The agent id comes from the token.
    pub fn identify(&self, ident: &Identify, session: &Link) -> Result<String> {
        let principal = self
            .verifier
            .verify(&ident.token)
            .map_err(|_| Error::InvalidToken)?;
        self.identify_as(principal, ident, session)
    }

    /// [`Hub::identify`] with a principal already verified (cluster mode:
    /// by the node the sidecar is connected to; its token stays there).
    pub fn identify_as(
        &self,
        principal: crate::auth::Principal,
        ident: &Identify,
        session: &Link,
    ) -> Result<String> {
        let agent_id = match (principal.role, principal.agent_id) {
            (Role::Agent, Some(a)) => a,
            _ => return Err(Error::InvalidToken),
        };
        if agent_id != ident.agent_id {
            return Err(Error::TokenAgentMismatch);
        }
        let mut core = self.lock();
        let agent = core
            .agents
            .entry(agent_id.clone())
            .or_insert_with(|| Box::new(Agent::new(&agent_id)));
        if let Some(old) = agent.session.replace(session.clone()) {
            if old.id() != session.id() {
                old.send(ToAgent::error("session_replaced", None, None));
                old.close(CloseReason::SessionReplaced);
            }
        }
        agent.name = ident.name.clone().unwrap_or_else(|| agent_id.clone());
        agent.status = ident.status.clone().unwrap_or_default();
        agent.draining = agent.status == STATUS_DRAINING;
        agent.capabilities = ident.capabilities.clone();
        agent.max_concurrency = ident.max_concurrency;
        agent.connected_at = now_ms();
        agent.epoch += 1;
        agent.busy = None;
        agent.restarting = false;
        let epoch = agent.epoch;
        let active: Vec<String> = agent.active.iter().cloned().collect();
        session.send(ToAgent::Identified {
            agent_id: agent_id.clone(),
        });
        core.agent_changed();

        let mut txn = Txn::new();
        core.note_tasks_from_before(&mut txn, &self.config, &agent_id, epoch);
        // Tasks it still holds: re-send the ones it may never have received.
        for task_id in active {
            let task = &core.tasks[&task_id];
            let generation = task.generation;
            match task.state {
                TaskState::Assigned => {
                    let traceparent = core.traceparents.get(&task_id).map(String::as_str);
                    let msg = task_assign(task, txn.now, traceparent);
                    txn.send_after_commit(session, msg);
                    let at = Instant::now() + self.config.accept_timeout;
                    core.add_timer(&mut txn, at, Timer::Accept(task_id, generation));
                }
                TaskState::Running => {
                    if let Some(t) = self.config.progress_timeout {
                        let now = Instant::now();
                        core.last_activity.insert(task_id.clone(), now);
                        core.add_timer(&mut txn, now + t, Timer::Progress(task_id, generation));
                    }
                }
                _ => {}
            }
        }
        core.schedule(&mut txn, &self.config, &self.metrics);
        self.submit(&mut core, txn);
        tracing::info!(agent_id = %agent_id, session = session.id(), "sidecar identified");
        Ok(agent_id)
    }

    /// A socket ended. Its agent keeps its tasks for the reconnect grace.
    pub fn session_closed(&self, agent_id: &str, session_id: u64) {
        let mut core = self.lock();
        let Some(agent) = core.agents.get_mut(agent_id) else {
            return;
        };
        if agent.session.as_ref().is_none_or(|s| s.id() != session_id) {
            return; // Already replaced by a newer session.
        }
        agent.session = None;
        agent.away_since = (Instant::now(), now_ms());
        agent.epoch += 1;
        let epoch = agent.epoch;
        let holds_tasks = !agent.active.is_empty();
        let was_settling = !agent.settling.is_empty();
        tracing::info!(agent_id = %agent_id, session = session_id, "sidecar disconnected");
        let mut txn = Txn::new();
        if holds_tasks {
            let at = Instant::now() + self.config.reconnect_grace;
            core.add_timer(&mut txn, at, Timer::Grace(agent_id.to_string(), epoch));
        }
        if was_settling {
            // Gone again before it reported: the tasks it held back are free.
            core.settle_all(agent_id);
            core.schedule(&mut txn, &self.config, &self.metrics);
        }
        self.submit(&mut core, txn);
    }

    /// Apply one lifecycle report from an identified sidecar. The reply (ack
    /// or error) goes to `session`, after everything before it is durable:
    /// replies leave in commit order, and an error never overtakes the ack
    /// of an earlier report.
    ///
    /// Returns once the report is queued for its commit, with a receiver
    /// that resolves when that commit is done (and the reply queued): the
    /// session bounds what it has in flight with it.
    ///
    /// `room`: the report's share of the room for reports in flight (see
    /// [`Hub::report_room`]), given back when its commit is done.
    pub async fn report(
        &self,
        agent_id: &str,
        session: &Link,
        msg: FromAgent,
        room: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Option<oneshot::Receiver<()>> {
        if let FromAgent::Output(out) = msg {
            // Not a lifecycle report: no event, no reply (see `output.rs`).
            self.task_output(agent_id, out).await;
            return None;
        }
        if let Some(task_id) = report_task_id(&msg) {
            // A finished task past the cache is read back, so the report
            // gets `task_finished`, not `unknown_task`.
            let _ = self.ensure_loaded(task_id).await;
        }
        let (tx, rx) = oneshot::channel();
        let done = move || {
            drop(room);
            let _ = tx.send(());
        };
        self.report_loaded(agent_id, session, msg, done);
        Some(rx)
    }

    fn report_loaded(
        &self,
        agent_id: &str,
        session: &Link,
        msg: FromAgent,
        done: impl FnOnce() + Send + 'static,
    ) {
        self.metrics.reports.inc();
        let about = report_task_id(&msg).map(str::to_string);
        // Checked before the change is built: a report the log could not
        // take fails alone, never the group commit it would have joined.
        let admitted = match &about {
            Some(task_id) => self.admit(task_id, super::admit::report_bytes(&msg)),
            None => Ok(()),
        };
        let mut core = self.lock();
        let mut txn = Txn::new();
        let outcome = match core.refuse_writes() {
            _ if admitted.is_err() => admitted,
            Some(e) if is_durable_report(&msg) => Err(e),
            _ => match msg {
                FromAgent::Accepted(r) => {
                    self.on_accepted(&mut core, &mut txn, agent_id, session, r)
                }
                FromAgent::Progress(r) => self.on_progress(&mut core, &mut txn, agent_id, r),
                FromAgent::Complete(r) => {
                    self.on_complete(&mut core, &mut txn, agent_id, session, r)
                }
                FromAgent::Failed(r) => self.on_failed(&mut core, &mut txn, agent_id, session, r),
                FromAgent::Rejected(r) => {
                    self.on_rejected(&mut core, &mut txn, agent_id, session, r)
                }
                FromAgent::Recovering(r) => {
                    self.on_recovering(&mut core, &mut txn, agent_id, session, r)
                }
                FromAgent::Status(status) => {
                    if let Some(agent) = core.agents.get_mut(agent_id) {
                        agent.draining = status == STATUS_DRAINING;
                        agent.status = status;
                    }
                    core.agent_changed();
                    Ok(())
                }
                FromAgent::StateReport(r) => {
                    self.on_state_report(&mut core, &mut txn, agent_id, session, r);
                    Ok(())
                }
                FromAgent::WakeResult(r) => {
                    self.on_wake_result(&mut core, &mut txn, agent_id, r);
                    Ok(())
                }
                FromAgent::ResourceReport(resources) => {
                    if let Some(agent) = core.agents.get_mut(agent_id) {
                        agent.resources = Some((resources, now_ms()));
                    }
                    Ok(())
                }
                FromAgent::AgentRestarting(reason) => {
                    on_agent_restarting(&mut core, agent_id, reason);
                    Ok(())
                }
                FromAgent::Identify(_) | FromAgent::Ping | FromAgent::Output(_) => Ok(()),
            },
        };
        if let Err(e) = outcome {
            // Nothing changed; the error still waits for earlier commits.
            let mut txn = Txn::new();
            let link = session.clone();
            txn.batch.then(move |r| {
                let reply = match r {
                    Ok(()) => ToAgent::from_error(&e),
                    // The state the error was computed on was not stored.
                    Err(store_err) => ToAgent::from_error(store_err),
                };
                let reply = with_task(reply, e.task_id().or(about.as_deref()));
                link.send(reply);
                done();
            });
            self.submit(&mut core, txn);
            return;
        }
        core.schedule(&mut txn, &self.config, &self.metrics);
        txn.batch.then(move |_| done());
        self.submit(&mut core, txn);
    }

    fn on_accepted(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        session: &Link,
        r: Report,
    ) -> Result<()> {
        fence(core, agent_id, &r)?;
        let task = core.tasks.get_mut(&r.task_id).expect("fenced");
        if task.state == TaskState::Assigned {
            set_state(&mut core.state_counts, task, TaskState::Running);
            core.emit(txn, &r.task_id, EventKind::Accepted, agent_id, r.payload);
            core.touch_activity(txn, &self.config, &r.task_id, false);
        }
        let ack = ToAgent::TaskAck {
            task_id: r.task_id.clone(),
            status: AckStatus::Accepted,
        };
        txn.reply_after_commit(session, &r.task_id, ack);
        Ok(())
    }

    fn on_progress(&self, core: &mut Core, txn: &mut Txn, agent_id: &str, r: Report) -> Result<()> {
        fence(core, agent_id, &r)?;
        let task = core.tasks.get_mut(&r.task_id).expect("fenced");
        // Progress implies the sidecar took the task.
        let was_running = task.state == TaskState::Running;
        set_state(&mut core.state_counts, task, TaskState::Running);
        core.emit(txn, &r.task_id, EventKind::Progress, agent_id, r.payload);
        core.touch_activity(txn, &self.config, &r.task_id, was_running);
        Ok(())
    }

    fn on_complete(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        session: &Link,
        mut r: Report,
    ) -> Result<()> {
        self.take_back_finished_run(core, txn, agent_id, &mut r);
        fence(core, agent_id, &r)?;
        core.finalize(&r.task_id, TaskState::Completed);
        let task = core.tasks.get_mut(&r.task_id).expect("fenced");
        task.result = Some(r.payload.get("result").cloned().unwrap_or(Value::Null));
        core.emit(txn, &r.task_id, EventKind::Completed, agent_id, r.payload);
        let ack = ToAgent::TaskAck {
            task_id: r.task_id.clone(),
            status: AckStatus::Complete,
        };
        txn.reply_after_commit(session, &r.task_id, ack);
        Ok(())
    }

    fn on_failed(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        session: &Link,
        mut r: Report,
    ) -> Result<()> {
        self.take_back_finished_run(core, txn, agent_id, &mut r);
        fence(core, agent_id, &r)?;
        let error = r
            .payload
            .get("error")
            .or_else(|| r.payload.get("reason"))
            .cloned()
            .unwrap_or_else(|| json!("unknown error"));
        end_attempt_on_report(core, txn, agent_id, session, r, EventKind::Failed, error);
        Ok(())
    }

    fn on_rejected(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        session: &Link,
        r: Report,
    ) -> Result<()> {
        fence(core, agent_id, &r)?;
        let reason = r
            .payload
            .get("reason")
            .cloned()
            .unwrap_or(json!("rejected"));
        let busy = reason == REJECT_BUSY;
        if busy && core.tasks[&r.task_id].state == TaskState::Running {
            // It runs this very task (accepted, or reported by `state_report`):
            // "busy" declines a repeated `task_assign` of it. Nothing changes.
            let ack = ToAgent::TaskAck {
                task_id: r.task_id.clone(),
                status: AckStatus::Accepted,
            };
            txn.reply_after_commit(session, &r.task_id, ack);
            return Ok(());
        }
        if busy {
            // Not a verdict on the task: the attempt does not count, and the
            // agent is left alone until it has room (see `Core::mark_busy`).
            let task = core.tasks.get_mut(&r.task_id).expect("fenced");
            task.attempts = task.attempts.saturating_sub(1);
            self.metrics.reclaimed("rejected_busy");
        } else {
            core.rejected_by
                .entry(r.task_id.clone())
                .or_default()
                .push(agent_id.to_string());
            self.metrics.reclaimed("rejected");
        }
        let error = json!({"reason": "rejected", "detail": reason});
        end_attempt_on_report(core, txn, agent_id, session, r, EventKind::Rejected, error);
        if busy {
            core.mark_busy(txn, agent_id, self.config.busy_backoff);
        }
        Ok(())
    }

    /// A final report about a run of a task this agent lost while away and
    /// that nobody was given since (its command ended while the sidecar was
    /// gone past the grace): the run is taken back (see [`Core::readopt`])
    /// and the report then lands on it under the new generation, instead of
    /// being refused and the task run a second time.
    fn take_back_finished_run(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        r: &mut Report,
    ) {
        let held = core
            .tasks
            .get(&r.task_id)
            .is_some_and(|t| t.state.is_active());
        if held {
            return;
        }
        let run = r
            .generation
            .or_else(|| core.lost_generation(agent_id, &r.task_id));
        let Some(g) = run.filter(|g| core.can_readopt(agent_id, &r.task_id, *g)) else {
            return;
        };
        core.settled(agent_id, &r.task_id);
        let payload = obj(json!({"reason": "finished_while_away"}));
        let generation = core.readopt(txn, &self.config, agent_id, &r.task_id, payload);
        tracing::info!(agent_id = %agent_id, task_id = %r.task_id, previous_generation = g, "final report of a run finished while its sidecar was away: taken");
        r.generation = Some(generation);
    }

    fn on_recovering(
        &self,
        core: &mut Core,
        txn: &mut Txn,
        agent_id: &str,
        session: &Link,
        r: Report,
    ) -> Result<()> {
        core.settled(agent_id, &r.task_id);
        let holds = core.tasks.get(&r.task_id).and_then(|t| {
            (t.agent_id.as_deref() == Some(agent_id) && t.state.is_active()).then_some(t.generation)
        });
        // The generation the sidecar had the task at before this connection.
        let before = core
            .agents
            .get(agent_id)
            .and_then(|a| a.before.get(&r.task_id))
            .copied();
        let reassign = ToAgent::TaskReassign {
            task_id: r.task_id.clone(),
        };
        match (holds, r.generation) {
            // Its own, at the generation it names; or, without one, at the
            // generation it held before this connection (or got since, with
            // no older generation of it known to have been its own).
            (Some(generation), Some(g)) if g == generation => {
                continue_task(core, txn, agent_id, session, r, generation);
            }
            (Some(generation), None) if before.is_none_or(|b| b == generation) => {
                continue_task(core, txn, agent_id, session, r, generation);
            }
            (Some(_), None) => {
                // Its run from before this connection is of an older
                // generation than the one it holds now: drop that run, keep
                // the current assignment.
                txn.reply_after_commit(session, &r.task_id, reassign);
            }
            (Some(_), Some(_)) => {
                // It holds an older generation of a task that is still its own:
                // the hub no longer trusts that run.
                core.emit(txn, &r.task_id, EventKind::Recovering, agent_id, r.payload);
                core.reclaim(txn, &self.metrics, &r.task_id, "recovering_stale");
                txn.reply_after_commit(session, &r.task_id, reassign);
            }
            (None, _) if readoptable(core, agent_id, &r) => {
                // Its run of a task it lost while away, given to nobody
                // since: its own again, under a new generation that
                // `task_continue` tells it. With or without the generation
                // it names, the same rule (see `Core::readopt`).
                let generation = core.readopt(txn, &self.config, agent_id, &r.task_id, r.payload);
                let msg = ToAgent::TaskContinue {
                    task_id: r.task_id.clone(),
                    generation,
                };
                txn.reply_after_commit(session, &r.task_id, msg);
            }
            (None, _) => {
                txn.reply_after_commit(session, &r.task_id, reassign);
            }
        }
        Ok(())
    }
}

/// May a `task_recovering` about a task `agent_id` does not hold give it
/// back? When it names a generation: that is the generation the task waits
/// in the queue at ([`Core::can_readopt`]). Without one (a restarted AgentCom
/// sidecar, which knows none): the task was lost by this agent while away
/// and given to nobody since, and its run can go on without the sidecar's
/// process ([`run_outlives_sidecar`]).
fn readoptable(core: &Core, agent_id: &str, r: &Report) -> bool {
    match r.generation {
        Some(g) => core.can_readopt(agent_id, &r.task_id, g),
        None => {
            core.lost_generation(agent_id, &r.task_id).is_some()
                && run_outlives_sidecar(&core.tasks[&r.task_id], &r.payload)
        }
    }
}

/// `task_continue` for a task the agent holds at `generation`.
fn continue_task(
    core: &mut Core,
    txn: &mut Txn,
    agent_id: &str,
    session: &Link,
    r: Report,
    generation: Generation,
) {
    core.emit(txn, &r.task_id, EventKind::Recovering, agent_id, r.payload);
    core.emit(
        txn,
        &r.task_id,
        EventKind::Continued,
        agent_id,
        obj(json!({})),
    );
    let msg = ToAgent::TaskContinue {
        task_id: r.task_id.clone(),
        generation,
    };
    txn.reply_after_commit(session, &r.task_id, msg);
}

/// `task_failed` / `task_rejected`: the attempt ends (re-queued, or FAILED
/// for good), the report is stored as the event, then acked.
fn end_attempt_on_report(
    core: &mut Core,
    txn: &mut Txn,
    agent_id: &str,
    session: &Link,
    r: Report,
    kind: EventKind,
    error: Value,
) {
    core.end_attempt(&r.task_id, error);
    core.emit(txn, &r.task_id, kind, agent_id, r.payload);
    let status = if kind == EventKind::Rejected {
        AckStatus::Rejected
    } else {
        AckStatus::Failed
    };
    let ack = ToAgent::TaskAck {
        task_id: r.task_id.clone(),
        status,
    };
    txn.reply_after_commit(session, &r.task_id, ack);
}

/// Reports that change stored state (refused while the store is degraded).
/// Every report about one task but a wake result (no event of its own).
fn is_durable_report(msg: &FromAgent) -> bool {
    msg.report().is_some() && !matches!(msg, FromAgent::WakeResult(_))
}

/// Name the task in an error reply that does not name one yet.
fn with_task(mut reply: ToAgent, task_id: Option<&str>) -> ToAgent {
    if let (
        ToAgent::Error {
            task_id: t @ None, ..
        },
        Some(id),
    ) = (&mut reply, task_id)
    {
        *t = Some(id.to_string());
    }
    reply
}

/// The task a sidecar message is about, if any.
pub(crate) fn report_task_id(msg: &FromAgent) -> Option<&str> {
    msg.report().map(|r| r.task_id.as_str())
}
