//! The hub's in-memory state and every task state transition. Only `Hub`
//! touches it, under one `std::sync::Mutex` that is never held across an
//! `.await`. Each operation builds a [`Txn`]; its events get their `seq` here,
//! so the store receives batches in `seq` order.
//!
//! This file owns the state itself: [`Core`]'s fields, the agents it knows,
//! restoring it from the store, the finished-task cache and the per-state
//! counts. The operations on it live in the submodules, one concern each.

mod deps;
mod reclaim;
mod schedule;
mod timers;
mod txn;

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde_json::Value;
use tokio::time::Instant;

use crate::config::Config;
use crate::error::{Error, StorageFault};
use crate::link::{Link, Resources};
use crate::model::{Generation, JsonObject, Priority, Seq, Task, TaskState};
use crate::store::Loaded;

pub(super) use reclaim::{fence, LostTask, RECLAIM_DISCONNECTED};
pub(super) use reclaim::{REASON_DEADLINE_EXCEEDED, REASON_DEPENDENCY_FAILED, REASON_TTL_EXPIRED};
pub(super) use schedule::task_assign;
pub(super) use timers::Timer;
pub(super) use txn::Txn;

use reclaim::lost_by;
use schedule::QueueKey;
use timers::TimerEntry;

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
    /// Boxed: the map's table has up to twice as many slots as agents, and
    /// an agent's record is about 400 bytes (one per sidecar, idle or not).
    pub agents: HashMap<String, Box<Agent>>,
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
                        .or_insert_with(|| Box::new(Agent::new(a)))
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

    /// The error for a write refused while the store is degraded.
    pub fn refuse_writes(&self) -> Option<Error> {
        self.degraded
            .as_ref()
            .map(|(fault, detail)| Error::Storage {
                fault: *fault,
                detail: detail.clone(),
            })
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
