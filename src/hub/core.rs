//! The hub's in-memory state and every task state transition. Only `Hub`
//! touches it, under one `std::sync::Mutex` that is never held across an
//! `.await`. Each operation builds a [`Txn`]; its events get their `seq` here,
//! so the store receives batches in `seq` order.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::config::Config;
use crate::error::{Error, StorageFault};
use crate::link::{Link, Report, Resources, ToAgent, ENRICHMENT_KEYS};
use crate::metrics::Metrics;
use crate::model::{EventKind, Generation, JsonObject, Priority, Seq, Task, TaskEvent, TaskState};
use crate::pb::wire::EncodedEvent;
use crate::store::{Batch, Loaded, TaskWrite};

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

/// An agent the hub knows: connected, or holding tasks while away.
pub(crate) struct Agent {
    pub agent_id: String,
    pub name: String,
    pub status: String,
    pub capabilities: Vec<String>,
    pub max_concurrency: u32,
    pub session: Option<Link>,
    pub connected_at: i64,
    pub active: BTreeSet<String>,
    /// Assignment counter value of its last assignment (smaller = idle longer).
    pub last_assigned: u64,
    /// Bumped on every disconnect and identify; fences stale grace timers.
    pub epoch: u64,
    /// Status "draining": finishing its tasks, takes no new ones.
    pub draining: bool,
    /// Tasks its sidecar may still run from before its current connection,
    /// at the generation it had them: those it held when it identified and
    /// those taken from it while it was away. A generation-less
    /// `task_recovering` is about one of these.
    pub before: HashMap<String, Generation>,
    /// Tasks taken from it while it was away that it has not reported on
    /// since it came back. While any remain (at most `reconnect_settle`) it
    /// gets no new task, and these tasks go to nobody.
    pub settling: BTreeSet<String>,
    /// It rejected a task as `busy`: no new task until one of its tasks
    /// ends, it identifies again, or this backoff timer fires.
    pub busy: Option<u64>,
    /// It announced a restart: no new task until it identifies again.
    pub restarting: bool,
    /// Its last `resource_report`, and when it arrived (Unix ms).
    pub resources: Option<(Resources, i64)>,
    /// When its last session ended (or the hub learned of it without one),
    /// for telling "away within the grace" from "gone" (`list_agents`).
    pub away_since: (Instant, i64),
}

impl Agent {
    pub fn new(agent_id: &str) -> Agent {
        Agent {
            agent_id: agent_id.to_string(),
            name: String::new(),
            status: String::new(),
            capabilities: Vec::new(),
            max_concurrency: 1,
            session: None,
            connected_at: 0,
            active: BTreeSet::new(),
            last_assigned: 0,
            epoch: 0,
            draining: false,
            before: HashMap::new(),
            settling: BTreeSet::new(),
            busy: None,
            restarting: false,
            resources: None,
            away_since: (Instant::now(), crate::model::now_ms()),
        }
    }

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

/// One atomic change: task writes, events and after-commit callbacks.
pub(crate) struct Txn {
    pub batch: Batch,
    touched: Vec<(String, Option<Seq>)>,
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

/// All mutable hub state.
#[derive(Default)]
pub(crate) struct Core {
    pub tasks: HashMap<String, Task>,
    /// Creation order: created_seq → task_id.
    /// Finished tasks kept in `tasks` as a cache, oldest first (bounded by
    /// `finished_cap`); the store serves the rest.
    pub finished: VecDeque<String>,
    /// How many finished tasks the cache keeps (`Config::finished_cache`).
    pub finished_cap: usize,
    pub queue: BTreeSet<QueueKey>,
    pub agents: HashMap<String, Agent>,
    pub last_seq: Seq,
    pub timers: BTreeSet<TimerEntry>,
    /// The armed timers of each task, so that they go with it when it
    /// finishes (memory follows live work, not what timers once were).
    task_timers: HashMap<String, Vec<TimerEntry>>,
    /// Agents that rejected a task: it is not offered to them again
    /// (unless it is pinned to one of them).
    pub rejected_by: HashMap<String, Vec<String>>,
    /// Agents that lost a task to a timeout: the scheduler prefers others.
    pub avoid: HashMap<String, Vec<String>>,
    /// Tasks per state (index: `TaskState::ALL`), kept as states change.
    pub state_counts: [u64; 6],
    /// Queued tasks per priority (index: `Priority::ALL`).
    pub queued_by_priority: [u64; 4],
    /// Last report (accept or progress) per RUNNING task, for the progress timeout.
    pub last_activity: HashMap<String, Instant>,
    /// Tasks taken back because their agent stayed away past the grace and
    /// still queued since. Its sidecar may still be running them (see `agentcom.rs`).
    pub lost: HashMap<String, LostTask>,
    /// Counts `busy` rejections: names each backoff timer.
    pub busy_marks: u64,
    /// QUEUED tasks not in `queue` because dependencies have not COMPLETED
    /// yet: task → the dependencies it still waits for.
    pub waiting: HashMap<String, BTreeSet<String>>,
    /// Dependency → the waiting tasks that depend on it.
    pub dependents: HashMap<String, Vec<String>>,
    /// Write epoch: batches carry it; a failed commit poisons its epoch and
    /// the hub rebuilds from the store under a newer one.
    pub epoch: u64,
    /// Set while the store refuses writes: the cause.
    pub degraded: Option<(StorageFault, String)>,
    /// The store could not be read after a failed commit: memory may be
    /// ahead of it, so nothing is served until a rebuild succeeds.
    pub stale: bool,
    /// Cluster mode: this node's id, a field of every task line.
    pub node_id: Option<String>,
    /// The W3C `traceparent` a task was pushed with, while it is not
    /// finished: its spans' parent, and passed on in `task_assign`. Memory
    /// only (after a restart, a task's later spans start a trace of their own).
    pub traceparents: HashMap<String, String>,
    timer_nonce: u64,
    assign_counter: u64,
    /// A task was queued, a slot freed or an agent became eligible since the
    /// last `schedule`: only then can it assign anything.
    schedulable: bool,
}

impl Core {
    /// Rebuild from the store at start. Every agent holding tasks is away
    /// after a restart: it gets a fresh reconnect grace.
    pub fn restore(loaded: Loaded, cfg: &Config) -> Core {
        let mut core = Core {
            epoch: 1,
            finished_cap: cfg.finished_cache,
            ..Core::default()
        };
        core.load(loaded, cfg);
        core
    }

    /// Replace task state with what the store holds (after a failed commit:
    /// whatever was not committed is forgotten). Connected sessions stay;
    /// timers are re-armed from the rebuilt state.
    pub fn rebuild(&mut self, loaded: Loaded, cfg: &Config) {
        self.tasks.clear();
        self.finished.clear();
        self.queue.clear();
        self.state_counts = [0; 6];
        self.queued_by_priority = [0; 4];
        self.timers.clear();
        self.task_timers.clear();
        self.last_activity.clear();
        self.lost.clear();
        self.waiting.clear();
        self.dependents.clear();
        self.agents.retain(|_, a| a.session.is_some());
        for a in self.agents.values_mut() {
            a.active.clear();
            // Their timers are gone with the others: do not hold them back.
            a.settling.clear();
            a.busy = None;
        }
        self.stale = false;
        self.load(loaded, cfg);
        let tasks = &self.tasks;
        self.traceparents.retain(|id, _| tasks.contains_key(id));
    }

    fn load(&mut self, loaded: Loaded, cfg: &Config) {
        self.last_seq = loaded.last_seq;
        self.state_counts = loaded.state_counts;
        let now = Instant::now();
        let mut running = Vec::new();
        let mut assigned = Vec::new();
        let mut with_deps = Vec::new();
        let mut deadlines = Vec::new();
        for task in loaded.tasks {
            if task.state == TaskState::Queued && !task.depends_on.is_empty() {
                with_deps.push(task.task_id.clone());
            } else if task.state == TaskState::Queued && self.queue.insert(QueueKey::of(&task)) {
                self.queued_by_priority[priority_index(task.priority)] += 1;
            }
            deadlines.push(task.task_id.clone());
            if task.state.is_active() {
                if let Some(a) = &task.agent_id {
                    self.agents
                        .entry(a.clone())
                        .or_insert_with(|| Agent::new(a))
                        .active
                        .insert(task.task_id.clone());
                }
                match task.state {
                    TaskState::Running => running.push((task.task_id.clone(), task.generation)),
                    _ => assigned.push((task.task_id.clone(), task.generation)),
                }
            }
            if let Some(agent_id) = lost_by(&task) {
                let lost = LostTask::new(agent_id, task.generation);
                self.lost.insert(task.task_id.clone(), lost);
            }
            self.tasks.insert(task.task_id.clone(), task);
        }
        for task_id in with_deps {
            // A dependency not stored any more was removed by retention, so
            // it finished; one that failed would have failed this task in
            // the same commit: whatever is not live is done with.
            let unmet: BTreeSet<String> = self.tasks[&task_id]
                .depends_on
                .iter()
                .filter(|d| {
                    let state = self
                        .tasks
                        .get(*d)
                        .map(|t| t.state)
                        .or_else(|| loaded.dependency_states.get(*d).copied());
                    state.is_some_and(|s| !s.is_final())
                })
                .cloned()
                .collect();
            self.wait_for(&task_id, unmet);
        }
        for task_id in deadlines {
            self.arm_deadlines(&task_id);
        }
        let away: Vec<(String, u64)> = self
            .agents
            .values()
            .filter(|a| !a.active.is_empty() && a.session.is_none())
            .map(|a| (a.agent_id.clone(), a.epoch))
            .collect();
        for (agent_id, epoch) in away {
            self.push_timer(now + cfg.reconnect_grace, Timer::Grace(agent_id, epoch));
        }
        for (task_id, generation) in assigned {
            self.push_timer(now + cfg.accept_timeout, Timer::Accept(task_id, generation));
        }
        if let Some(t) = cfg.progress_timeout {
            for (task_id, generation) in running {
                self.last_activity.insert(task_id.clone(), now);
                self.push_timer(now + t, Timer::Progress(task_id, generation));
            }
        }
        self.schedulable = true;
    }

    fn push_timer(&mut self, at: Instant, timer: Timer) {
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
    fn cancel_timers(&mut self, task_id: &str) {
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

    /// Queue a QUEUED task, or hold it back until `unmet` dependencies
    /// have COMPLETED.
    pub fn wait_for(&mut self, task_id: &str, unmet: BTreeSet<String>) {
        if unmet.is_empty() {
            self.enqueue(task_id);
            return;
        }
        for dep in &unmet {
            self.dependents
                .entry(dep.clone())
                .or_default()
                .push(task_id.to_string());
        }
        self.waiting.insert(task_id.to_string(), unmet);
    }

    /// Where a task's dependencies stand: the first that FAILED or was
    /// CANCELLED, else those not COMPLETED yet. A dependency not in memory
    /// is finished: its state is in `known` (read from the store before the
    /// lock; a finished task only changes in memory), else retention removed
    /// it, which it does only to finished tasks: counted as COMPLETED.
    pub fn dependency_check(
        &self,
        task: &Task,
        known: &HashMap<String, TaskState>,
    ) -> Result<BTreeSet<String>, String> {
        let mut unmet = BTreeSet::new();
        for dep in &task.depends_on {
            let state = self.tasks.get(dep).map(|t| t.state);
            match state.or_else(|| known.get(dep).copied()) {
                Some(TaskState::Completed) | None => {}
                Some(TaskState::Failed | TaskState::Cancelled) => return Err(dep.clone()),
                Some(_) => {
                    unmet.insert(dep.clone());
                }
            }
        }
        Ok(unmet)
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

    /// Tasks that finished in this transaction release or fail the tasks
    /// waiting for them (and those, in turn, theirs). True if anything changed.
    pub fn resolve_dependents(&mut self, txn: &mut Txn) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i < txn.touched.len() {
            let id = txn.touched[i].0.clone();
            i += 1;
            let Some(state) = self.tasks.get(&id).map(|t| t.state) else {
                continue;
            };
            if !state.is_final() {
                continue;
            }
            let Some(waiters) = self.dependents.remove(&id) else {
                continue;
            };
            for w in waiters {
                let Some(unmet) = self.waiting.get_mut(&w) else {
                    continue; // Already failed, cancelled or released.
                };
                changed = true;
                if state == TaskState::Completed {
                    unmet.remove(&id);
                    if unmet.is_empty() {
                        self.waiting.remove(&w);
                        self.enqueue(&w);
                    }
                } else {
                    let error = json!({"reason": REASON_DEPENDENCY_FAILED, "dependency": id});
                    self.fail_task(txn, &w, error);
                }
            }
        }
        changed
    }

    /// The error for a write refused while the store is degraded.
    pub fn refuse_writes(&self) -> Option<Error> {
        self.degraded
            .as_ref()
            .map(|(fault, detail)| Error::Storage {
                fault: *fault,
                detail: detail.clone(),
            })
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
                txn.batch.tasks.push(TaskWrite {
                    task: task.row_copy(),
                    expected_last_seq: expected,
                });
            }
        }
        self.evict_finished(durable);
        txn.batch
    }

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
    fn is_settling(&self, task_id: &str) -> bool {
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

    /// Keep a finished task read from the store in the cache.
    pub fn cache_finished(&mut self, task: Task) {
        if task.state.is_final() && !self.tasks.contains_key(&task.task_id) {
            self.finished.push_back(task.task_id.clone());
            self.tasks.insert(task.task_id.clone(), task);
        }
    }

    /// Drop finished tasks beyond the cache bound (they stay in the store).
    fn evict_finished(&mut self, durable: Seq) {
        while self.finished.len() > self.finished_cap {
            let Some(id) = self.finished.front() else {
                break;
            };
            match self.tasks.get(id) {
                // Not stored yet: the store could not answer for it.
                Some(t) if t.state.is_final() && t.last_seq > durable => break,
                Some(t) if t.state.is_final() => {
                    let id = id.clone();
                    self.tasks.remove(&id);
                    self.forget_preferences(&id);
                }
                _ => {}
            }
            self.finished.pop_front();
        }
    }

    /// Forget tasks retention removed from the store.
    pub fn forget_purged(&mut self, purged: &crate::store::Purged) {
        for id in &purged.task_ids {
            if self.tasks.get(id).is_some_and(|t| t.state.is_final()) {
                self.tasks.remove(id);
            }
        }
        for (n, gone) in self.state_counts.iter_mut().zip(purged.by_state) {
            *n = n.saturating_sub(gone);
        }
    }
}

/// Change a task's state, keeping the per-state counts.
pub(crate) fn set_state(counts: &mut [u64; 6], task: &mut Task, to: TaskState) {
    let idx = |s: TaskState| TaskState::ALL.iter().position(|x| *x == s).unwrap_or(0);
    counts[idx(task.state)] = counts[idx(task.state)].saturating_sub(1);
    counts[idx(to)] += 1;
    task.state = to;
}

pub(crate) fn count_in(counts: &mut [u64; 6], state: TaskState) {
    counts[TaskState::ALL.iter().position(|x| *x == state).unwrap_or(0)] += 1;
}

fn priority_index(p: Priority) -> usize {
    Priority::ALL.iter().position(|x| *x == p).unwrap_or(0)
}

/// A `json!` object literal as a map.
pub(crate) fn obj(v: Value) -> JsonObject {
    match v {
        Value::Object(m) => m,
        _ => JsonObject::new(),
    }
}

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
        true => tracing::enabled!(tracing::Level::DEBUG),
        false => tracing::enabled!(tracing::Level::INFO),
    };
    if !exporting && !logged {
        return;
    }
    let span = crate::telemetry::task_span(task_id, agent_id, node_id);
    if exporting {
        crate::telemetry::trace_task_span(&span, kind.as_str(), traceparent);
    }
    span.in_scope(|| match progress {
        true => tracing::debug!(generation, seq, "task PROGRESS"),
        false => tracing::info!(generation, seq, "task {}", kind.as_str()),
    });
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
pub(super) fn fence(core: &Core, agent_id: &str, r: &Report) -> crate::error::Result<()> {
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
fn lost_by(task: &Task) -> Option<String> {
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

/// The `tokio` instant of a Unix-ms time (now, if it has passed).
fn instant_at(unix_ms: i64) -> Instant {
    let left = unix_ms.saturating_sub(crate::model::now_ms()).max(0) as u64;
    Instant::now() + std::time::Duration::from_millis(left)
}

/// The reclaim reason for an agent that stayed away past the grace.
pub(crate) const RECLAIM_DISCONNECTED: &str = "agent_disconnected";
