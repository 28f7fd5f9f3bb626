//! Creating tasks: `PushTask` (and the HTTP push and the CLI) checked,
//! admitted, made idempotent by task id against the durable state, and
//! queued or assigned.

use std::collections::HashMap;

use serde_json::json;
use tokio::sync::oneshot;

use super::core::{obj, Core, Txn, REASON_DEPENDENCY_FAILED};
use super::{admit, Durable, Hub, MAX_ATTEMPTS_LIMIT, MAX_DEPENDENCIES, MAX_TASK_ID_LEN};
use crate::error::{Error, Result};
use crate::model::{new_task_id, EventKind, JsonObject, Priority, Task, TaskState};

/// A request to create a task (gRPC `PushTask`, HTTP push, CLI).
#[derive(Clone, Debug, Default)]
pub struct PushRequest {
    pub agent_id: Option<String>,
    pub description: String,
    pub metadata: JsonObject,
    pub task_id: Option<String>,
    pub needed_capabilities: Vec<String>,
    pub priority: Priority,
    pub queue_if_offline: bool,
    /// 0: the configured default.
    pub max_attempts: u32,
    /// Tasks that must COMPLETE first (each must exist).
    pub depends_on: Vec<String>,
    /// FAIL (`ttl_expired`) if still QUEUED this long after the push. 0: no limit.
    pub queue_ttl_ms: u64,
    /// FAIL (`deadline_exceeded`) if not finished by this Unix ms. 0: none.
    pub deadline_ms: i64,
    /// W3C trace context (gRPC `traceparent` metadata): parents the task's
    /// spans and goes to the sidecar in `task_assign`. Checked at the edge.
    pub traceparent: Option<String>,
}

/// What `push_task` did.
#[derive(Clone, Debug)]
pub struct PushOutcome {
    pub task: Task,
    pub created: bool,
}

impl Hub {
    /// Create a task (or return the identical existing one).
    pub async fn push_task(&self, req: PushRequest) -> Result<PushOutcome> {
        validate_push(&req)?;
        let bytes = admit::push_bytes(&req);
        self.admit(req.task_id.as_deref().unwrap_or_default(), bytes)?;
        // Pushes share the room for writes in flight with reports: what
        // waits for the store is bounded whoever sends it.
        let _room = self.report_room(bytes).await;
        let max_attempts = match req.max_attempts {
            0 => self.config.default_max_attempts,
            n => n,
        };
        // Dependencies must exist. Their states are read first (finished
        // ones may be served by the store); under the lock, memory wins.
        let mut known = HashMap::new();
        for dep in &req.depends_on {
            match self.stored_or_cached(dep).await? {
                Some(t) => known.insert(dep.clone(), t.state),
                None => return Err(Error::InvalidArgument(format!("unknown dependency {dep}"))),
            };
        }
        // An id memory does not hold may still be stored (a finished task
        // past the cache, or one from before a restart): the store decides
        // whether it exists, never the cache.
        let stored = match &req.task_id {
            Some(id) if !self.lock().tasks.contains_key(id) && self.store.may_hold_task(id) => {
                self.stored_task(id).await?
            }
            _ => None,
        };
        let (rx, task, created) = self.push_locked(&req, max_attempts, &known, stored)?;
        if let Some(rx) = rx {
            Self::wait(rx).await?;
        }
        if created {
            self.metrics.tasks_pushed.inc();
        }
        Ok(PushOutcome { task, created })
    }

    /// The part of `push_task` under the lock. `known`: the states of the
    /// dependencies as read before it; `stored`: the task with the
    /// requested id as the store held it (when memory did not). Returns
    /// what to wait for before answering (nothing for a task read from
    /// the store: it is durable).
    fn push_locked(
        &self,
        req: &PushRequest,
        max_attempts: u32,
        known: &HashMap<String, TaskState>,
        stored: Option<Task>,
    ) -> Result<(Option<Durable>, Task, bool)> {
        let mut core = self.lock();
        self.check_writable(&core)?;
        let mut txn = Txn::new();
        let in_memory = req.task_id.as_ref().and_then(|id| core.tasks.get(id));
        match (in_memory, stored) {
            (Some(existing), _) if !same_request(existing, req, max_attempts) => {
                Err(Error::AlreadyExists(existing.task_id.clone()))
            }
            (Some(existing), _) => {
                // A safe retry: answer once the original is durable.
                let task = existing.clone();
                let rx = Self::durable_signal(&mut txn);
                self.submit(&mut core, txn);
                Ok((Some(rx), task, false))
            }
            (None, Some(existing)) if !same_request(&existing, req, max_attempts) => {
                Err(Error::AlreadyExists(existing.task_id))
            }
            (None, Some(existing)) => Ok((None, existing, false)),
            (None, None) => {
                let (rx, task) = self.create_task(&mut core, txn, req, max_attempts, known)?;
                Ok((Some(rx), task, true))
            }
        }
    }

    fn create_task(
        &self,
        core: &mut Core,
        mut txn: Txn,
        req: &PushRequest,
        max_attempts: u32,
        known: &HashMap<String, TaskState>,
    ) -> Result<(oneshot::Receiver<Result<()>>, Task)> {
        {
            if let Some(agent_id) = &req.agent_id {
                let connected = core
                    .agents
                    .get(agent_id)
                    .is_some_and(|a| a.session.is_some());
                if !connected && !req.queue_if_offline {
                    return Err(Error::AgentNotConnected(agent_id.clone()));
                }
            }
            let task_id = req.task_id.clone().unwrap_or_else(new_task_id);
            let task = Task {
                task_id: task_id.clone(),
                agent_id: req.agent_id.clone(),
                pinned: req.agent_id.is_some(),
                description: req.description.clone(),
                metadata: std::sync::Arc::new(req.metadata.clone()),
                state: TaskState::Queued,
                generation: 0,
                attempts: 0,
                max_attempts,
                needed_capabilities: req.needed_capabilities.clone(),
                priority: req.priority,
                result: None,
                error: None,
                created_at_ms: txn.now,
                updated_at_ms: txn.now,
                last_seq: 0,
                created_seq: 0,
                depends_on: req.depends_on.clone(),
                queue_ttl_ms: req.queue_ttl_ms,
                deadline_ms: req.deadline_ms,
            };
            if let Some(tp) = &req.traceparent {
                core.traceparents.insert(task_id.clone(), tp.clone());
            }
            let deps = core.dependency_check(&task, known);
            core.insert_new(&mut txn, task);
            let mut payload = obj(json!({
                "description": req.description,
                "priority": req.priority.as_str(),
                "needed_capabilities": req.needed_capabilities,
                "max_attempts": max_attempts,
                "pinned": req.agent_id.is_some(),
            }));
            if !req.depends_on.is_empty() {
                payload.insert("depends_on".into(), json!(req.depends_on));
                // Why the task waits: the dependencies not COMPLETED yet.
                if let Ok(unmet) = &deps {
                    payload.insert("waiting_for".into(), json!(unmet));
                }
            }
            if req.queue_ttl_ms > 0 {
                payload.insert("queue_ttl_ms".into(), json!(req.queue_ttl_ms));
            }
            if req.deadline_ms > 0 {
                payload.insert("deadline_ms".into(), json!(req.deadline_ms));
            }
            let agent = req.agent_id.clone().unwrap_or_default();
            core.emit(&mut txn, &task_id, EventKind::Created, &agent, payload);
            match deps {
                Ok(unmet) => {
                    core.wait_for(&task_id, unmet);
                    if core.arm_deadlines(&task_id) {
                        txn.timers_added = true;
                    }
                }
                Err(failed) => {
                    let error = json!({"reason": REASON_DEPENDENCY_FAILED, "dependency": failed});
                    core.fail_task(&mut txn, &task_id, error);
                }
            }
            core.schedule(&mut txn, &self.config, &self.metrics);
            let rx = Self::durable_signal(&mut txn);
            let task = core.tasks[&task_id].clone();
            self.submit(core, txn);
            Ok((rx, task))
        }
    }
}

fn validate_push(req: &PushRequest) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if let Some(id) = &req.task_id {
        if id.is_empty()
            || id.len() > MAX_TASK_ID_LEN
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
        {
            return bad(format!(
                "task_id must be 1-{MAX_TASK_ID_LEN} characters of [A-Za-z0-9-_.:/]"
            ));
        }
    }
    if req.agent_id.as_deref().is_some_and(str::is_empty) {
        return bad("agent_id must not be empty".into());
    }
    if req.max_attempts > MAX_ATTEMPTS_LIMIT {
        return bad(format!("max_attempts must be at most {MAX_ATTEMPTS_LIMIT}"));
    }
    if req.needed_capabilities.iter().any(String::is_empty) {
        return bad("needed_capabilities must not contain empty strings".into());
    }
    if req.depends_on.len() > MAX_DEPENDENCIES {
        return bad(format!(
            "depends_on takes at most {MAX_DEPENDENCIES} task ids"
        ));
    }
    if req.depends_on.iter().any(String::is_empty) {
        return bad("depends_on must not contain empty task ids".into());
    }
    if req
        .task_id
        .as_ref()
        .is_some_and(|id| req.depends_on.contains(id))
    {
        return bad("a task cannot depend on itself".into());
    }
    if req.deadline_ms < 0 {
        return bad("deadline_ms must be a Unix time in ms (or 0)".into());
    }
    Ok(())
}

/// Is `req` the request that created `task` (a safe retry)?
fn same_request(task: &Task, req: &PushRequest, max_attempts: u32) -> bool {
    task.pinned == req.agent_id.is_some()
        && (!task.pinned || task.agent_id == req.agent_id)
        && task.description == req.description
        && *task.metadata == req.metadata
        && task.needed_capabilities == req.needed_capabilities
        && task.priority == req.priority
        && task.max_attempts == max_attempts
        && task.depends_on == req.depends_on
        && task.queue_ttl_ms == req.queue_ttl_ms
        && task.deadline_ms == req.deadline_ms
}
