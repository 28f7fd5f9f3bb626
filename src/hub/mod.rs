//! The hub: owns task state, the registry of sidecar sessions and the
//! scheduler. `grpc`, `http` and `ws` call it; it is the only caller of the
//! store's write side.
//!
//! **Files.** This one holds the hub's handle, its reads (tasks, agents,
//! health, metrics) and cancel/retry. `core/` is the state and every
//! transition; `commit.rs` how changes become durable and what a failed
//! commit does (epoch, rebuild, probe); `push.rs` creating tasks;
//! `reports.rs` the sidecar side; `agentcom.rs` what today's AgentCom
//! sidecars add; `admit.rs` the size check before a change joins a group;
//! `timers.rs` time-based reclaims; `wait.rs` `WaitTask`; `output.rs` live
//! task output; `retention.rs` removing finished tasks.

mod admit;
mod agentcom;
mod commit;
mod core;
mod output;
mod push;
mod reports;
mod retention;
mod timers;
mod wait;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::json;
use tokio::sync::{mpsc, oneshot, Notify};

use self::core::{obj, Core, Txn, REASON_DEPENDENCY_FAILED};
pub use self::push::{PushOutcome, PushRequest};
pub(crate) use self::reports::report_task_id;
use crate::auth::{issue_token, Role, TokenVerifier};
use crate::bus::{EventBus, WatchItem};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::link::ToAgent;
use crate::metrics::{self, Metrics};
use crate::model::{
    AgentInfo, AgentPresence, EventFilter, EventKind, Priority, Seq, Task, TaskState,
};
use crate::store::file::FileStore;
use crate::store::sqlite::output::OutputStore;
use crate::store::Store;

/// Most bytes of sidecar reports and pushes received and not yet committed,
/// across all sessions and calls: this bounds what waits in the store's
/// queue. A session waits for room before it reads its next frame; a push
/// waits for room before its change is built.
pub const MAX_REPORT_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Longest caller-supplied task id.
pub const MAX_TASK_ID_LEN: usize = 128;
/// Largest `max_attempts` a task may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Most dependencies one task may have.
pub const MAX_DEPENDENCIES: usize = 100;
/// A task this close to retention's cutoff can no longer be retried
/// (retention may be removing it at the same moment).
const RETRY_MARGIN_MS: i64 = 60_000;
/// Default and largest `ListTasks` page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// Resolves once a change is durable (or failed to be).
type Durable = oneshot::Receiver<Result<()>>;

/// A `ListTasks` query.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub state: Option<TaskState>,
    pub agent_id: Option<String>,
    pub page_size: usize,
    pub page_token: Option<String>,
}

/// One page of tasks.
#[derive(Clone, Debug)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    pub next_page_token: Option<String>,
    pub as_of_seq: Seq,
    /// The log `as_of_seq` belongs to.
    pub log_id: String,
}

/// What `/health` reports.
#[derive(Clone, Debug)]
pub struct Health {
    /// Cluster mode: this node's id and the leader's.
    pub node_id: Option<String>,
    pub leader: Option<String>,
    /// Cluster mode: "leader" or "follower", and why the node cannot serve
    /// yet, if it cannot (see [`Cluster::not_ready`]).
    pub role: Option<&'static str>,
    pub not_ready: Option<&'static str>,
    pub agents_connected: usize,
    pub tasks_queued: usize,
    pub last_seq: Seq,
    /// Why the store refuses writes, if it does.
    pub degraded: Option<&'static str>,
}

/// What the hub asks of cluster mode: who this node is and who leads (for
/// `/health` and `/metrics`). Implemented by `cluster::Member`, which also
/// holds the node's own handles: `Hub::relay` and `Hub::cluster_node`, for
/// the sessions and listeners, are defined in `cluster` and find them again
/// through `Any`.
pub trait Cluster: std::any::Any + Send + Sync {
    /// This node's id.
    fn node_id(&self) -> &str;
    /// The node that leads now, if one does.
    fn leader_id(&self) -> Option<String>;
    /// Does this node lead?
    fn is_leader(&self) -> bool;
    /// "leader" or "follower" (`/health`'s `role`).
    fn role(&self) -> &'static str;
    /// Why this node cannot serve now (`None`: it can), given whether its
    /// hub takes writes.
    fn not_ready(&self, writable: bool) -> Option<&'static str>;
    /// Leaderships this node has seen since it started.
    fn leaderships(&self) -> u64;
}

/// The hub core. Cheap to share: `Arc<Hub>`.
pub struct Hub {
    config: Config,
    store: Arc<dyn Store>,
    bus: Arc<EventBus>,
    verifier: Arc<TokenVerifier>,
    /// All mutable task, agent and timer state. A std mutex, never held
    /// across `.await`; a panic under it leaves state that is still
    /// consistent with the store's (it is rebuilt on the next failure).
    core: Mutex<Core>,
    /// Itself, for after-commit callbacks that run on the store's thread.
    weak: Weak<Hub>,
    /// The name of the store's log (cursor validation, `log_id`).
    log_id: String,
    /// Wakes the timer task (new earliest timer, or recovery).
    timer_wake: Notify,
    /// Wakes the recovery task (a commit failed).
    recovery_wake: Notify,
    /// Bumped whenever agents may have changed (any transaction, identify,
    /// disconnect): `WatchAgents` streams follow it.
    agents_changed: tokio::sync::watch::Sender<u64>,
    /// `WaitTask` callers, woken after the commit that finished their task.
    waiters: Arc<wait::Waiters>,
    /// Task output: its own file and writer thread (off the lifecycle path).
    output: Arc<OutputStore>,
    /// Output watchers, woken by the output store's commits.
    output_watches: Arc<output::OutputWatches>,
    metrics: Metrics,
    /// Room for sidecar reports in flight, in bytes (see
    /// [`MAX_REPORT_BYTES_IN_FLIGHT`]); FIFO, so no session starves.
    report_room: Arc<tokio::sync::Semaphore>,
    closing: AtomicBool,
    /// The admin token created on first start, to print once.
    bootstrap_token: Mutex<Option<String>>,
    /// Cluster mode: this node (and, behind it, its session relay).
    cluster: std::sync::OnceLock<Arc<dyn Cluster>>,
}

impl Hub {
    /// Open the embedded store in `config.data_dir` and rebuild state from it.
    pub fn open(config: Config) -> Result<Arc<Hub>> {
        config.validate()?;
        let store: Arc<dyn Store> =
            Arc::new(FileStore::open(&config.data_dir, config.event_retention)?);
        Hub::with_store(config, store)
    }

    /// A hub on any store (a fault-injecting one in tests, another backend).
    pub fn with_store(config: Config, store: Arc<dyn Store>) -> Result<Arc<Hub>> {
        config.validate()?;
        let bus = Arc::new(EventBus::new(config.watch_buffer));
        let bootstrap_token = if config.bootstrap_admin_token && store.list_tokens()?.is_empty() {
            let (secret, _) = issue_token(&*store, Role::Admin, None)?;
            write_secret_file(&config.data_dir.join("admin.token"), &secret)?;
            Some(secret)
        } else {
            None
        };
        let mut core = Core::restore(store.load()?, &config);
        if store.replicated() {
            // A cluster node follows the log until it wins the lease.
            core.degraded = Some((
                crate::error::StorageFault::NotLeader,
                "not elected yet".into(),
            ));
        }
        let output_watches = Arc::new(output::OutputWatches::default());
        let watches = output_watches.clone();
        let output = Arc::new(OutputStore::open(
            &config.data_dir,
            config.output_cap_bytes,
            Box::new(move |ends| watches.committed(ends)),
        )?);
        let mut metrics = Metrics::new();
        metrics.register_store(store.clone());
        let log_id = store.log_id();
        Ok(Arc::new_cyclic(|weak| Hub {
            verifier: Arc::new(TokenVerifier::with_counters(
                store.clone(),
                metrics.tokens.clone(),
            )),
            config,
            store,
            bus,
            core: Mutex::new(core),
            weak: weak.clone(),
            log_id,
            timer_wake: Notify::new(),
            recovery_wake: Notify::new(),
            agents_changed: tokio::sync::watch::Sender::new(0),
            waiters: Arc::default(),
            output,
            output_watches,
            metrics,
            report_room: Arc::new(tokio::sync::Semaphore::new(MAX_REPORT_BYTES_IN_FLIGHT)),
            closing: AtomicBool::new(false),
            bootstrap_token: Mutex::new(bootstrap_token),
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// Cluster mode: this hub is a node of `cluster` (set once, at start).
    pub fn set_cluster(&self, cluster: Arc<dyn Cluster>) {
        self.lock().node_id = Some(cluster.node_id().to_string());
        let _ = self.cluster.set(cluster);
    }

    /// Cluster mode: the cluster this hub is a node of.
    pub fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.get()
    }

    /// The event bus (cluster mode: the log's follower feeds it).
    pub fn bus(&self) -> Arc<EventBus> {
        self.bus.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The token verifier (shared with the task that re-reads revocations).
    pub fn verifier(&self) -> &Arc<TokenVerifier> {
        &self.verifier
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The admin token created on first start (returned once).
    pub fn take_bootstrap_token(&self) -> Option<String> {
        self.bootstrap_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for room for a report of `bytes` in flight (held until its
    /// commit is done).
    pub async fn report_room(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = bytes.clamp(1, MAX_REPORT_BYTES_IN_FLIGHT) as u32;
        self.report_room.clone().acquire_many_owned(n).await.ok()
    }

    /// Tell `WatchAgents` streams to look again (cheap when nobody watches).
    pub(crate) fn note_agents_changed(&self) {
        if self.agents_changed.receiver_count() > 0 {
            self.agents_changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Follow agent changes (see [`Hub::note_agents_changed`]).
    pub fn agent_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.agents_changed.subscribe()
    }

    /// The name of the event log cursors refer to.
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    // ---- orchestrator side -------------------------------------------------

    /// One task, as durably stored: live and recently finished ones from
    /// memory, older ones from the store.
    pub async fn get_task(&self, task_id: &str) -> Result<Task> {
        let cached = {
            let core = self.lock();
            Self::check_readable(&core)?;
            core.tasks.get(task_id).cloned().map(|t| (t, core.epoch))
        };
        let Some((task, epoch)) = cached else {
            return self
                .stored_task(task_id)
                .await?
                .ok_or_else(|| Error::UnknownTask(task_id.to_string()));
        };
        if task.last_seq > self.store.durable_seq() {
            self.barrier_at(epoch).await?;
        }
        Ok(task)
    }

    /// A task read from the store (off the async threads).
    async fn stored_task(&self, task_id: &str) -> Result<Option<Task>> {
        let store = self.store.clone();
        let id = task_id.to_string();
        tokio::task::spawn_blocking(move || store.get_task(&id))
            .await
            .map_err(|e| Error::storage(e.to_string()))?
    }

    /// A task from memory or, failing that, the store.
    async fn stored_or_cached(&self, task_id: &str) -> Result<Option<Task>> {
        if let Some(t) = self.lock().tasks.get(task_id) {
            return Ok(Some(t.clone()));
        }
        self.stored_task(task_id).await
    }

    /// Make sure `task_id` is in memory if it exists: finished tasks past
    /// the cache are read back from the store (reports about them must still
    /// get `task_finished`; retry and cancel need them).
    async fn ensure_loaded(&self, task_id: &str) -> Result<()> {
        if self.lock().tasks.contains_key(task_id) {
            return Ok(());
        }
        if let Some(task) = self.stored_task(task_id).await? {
            self.lock().cache_finished(task);
        }
        Ok(())
    }

    /// Tasks in creation order, filtered and paged, with the seq they
    /// reflect — served by the store's indexes, as committed.
    pub async fn list_tasks(&self, q: ListQuery) -> Result<TaskPage> {
        let page_size = match q.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after: Seq = match q.page_token.as_deref() {
            None | Some("") => 0,
            Some(t) => t
                .parse()
                .map_err(|_| Error::InvalidArgument("invalid page_token".into()))?,
        };
        Self::check_readable(&self.lock())?;
        let filter = crate::store::ListFilter {
            state: q.state,
            agent_id: q.agent_id,
            after_created_seq: after,
            limit: page_size + 1,
        };
        let store = self.store.clone();
        let mut listing = tokio::task::spawn_blocking(move || store.list_tasks(&filter))
            .await
            .map_err(|e| Error::storage(e.to_string()))??;
        let next_page_token = (listing.tasks.len() > page_size).then(|| {
            listing.tasks.truncate(page_size);
            listing
                .tasks
                .last()
                .map(|t| t.created_seq)
                .unwrap_or_default()
                .to_string()
        });
        Ok(TaskPage {
            tasks: listing.tasks,
            next_page_token,
            as_of_seq: listing.as_of_seq,
            log_id: self.log_id.clone(),
        })
    }

    /// Apply `change` to an existing task, schedule, and answer with the
    /// task once the change is durable.
    async fn change_task(
        &self,
        task_id: &str,
        change: impl FnOnce(&mut Core, &mut Txn) -> Result<()>,
    ) -> Result<Task> {
        self.ensure_loaded(task_id).await?;
        let (rx, task) = {
            let mut core = self.lock();
            self.check_writable(&core)?;
            if !core.tasks.contains_key(task_id) {
                return Err(Error::UnknownTask(task_id.to_string()));
            }
            let mut txn = Txn::new();
            change(&mut core, &mut txn)?;
            core.schedule(&mut txn, &self.config, &self.metrics);
            let rx = Self::durable_signal(&mut txn);
            let task = core.tasks[task_id].clone();
            self.submit(&mut core, txn);
            (rx, task)
        };
        Self::wait(rx).await?;
        Ok(task)
    }

    /// Cancel a non-final task; its assignee is told.
    pub async fn cancel_task(&self, task_id: &str) -> Result<Task> {
        self.change_task(task_id, |core, txn| {
            let state = core.tasks[task_id].state;
            if state.is_final() {
                return Err(Error::FailedPrecondition(format!(
                    "task {task_id} is already {}",
                    state.as_str()
                )));
            }
            let from = core.finalize(task_id, TaskState::Cancelled);
            let agent = core.tasks[task_id].agent_id.clone().unwrap_or_default();
            let payload = obj(json!({"reason": "cancelled"}));
            core.emit(txn, task_id, EventKind::Cancelled, &agent, payload);
            if let Some(session) = from
                .and_then(|a| core.agents.get(&a))
                .and_then(|a| a.session.clone())
            {
                let msg = ToAgent::TaskCancelled {
                    task_id: task_id.to_string(),
                    reason: "cancelled".into(),
                };
                txn.send_after_commit(&session, msg);
            }
            Ok(())
        })
        .await
    }

    /// Re-queue a FAILED or CANCELLED task with its attempts reset (it
    /// waits again for dependencies that are not COMPLETED).
    pub async fn retry_task(&self, task_id: &str) -> Result<Task> {
        let mut known = HashMap::new();
        if let Some(task) = self.stored_or_cached(task_id).await? {
            for dep in &task.depends_on {
                if let Some(t) = self.stored_or_cached(dep).await? {
                    known.insert(dep.clone(), t.state);
                }
            }
        }
        let retention = self.config.retention;
        self.change_task(task_id, |core, txn| {
            let core = &mut *core;
            let task = core.tasks.get_mut(task_id).expect("checked");
            if let Some(keep) = retention {
                // Never re-open what retention is about to remove.
                let cutoff = txn.now - keep.as_millis() as i64 + RETRY_MARGIN_MS;
                if task.state.is_final() && task.updated_at_ms < cutoff {
                    return Err(Error::FailedPrecondition(format!(
                        "task {task_id} finished too long ago to be retried (retention)"
                    )));
                }
            }
            if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
                return Err(Error::FailedPrecondition(format!(
                    "only FAILED or CANCELLED tasks can be retried; task {task_id} is {}",
                    task.state.as_str()
                )));
            }
            self::core::set_state(&mut core.state_counts, task, TaskState::Queued);
            task.attempts = 0;
            task.result = None;
            if !task.pinned {
                task.agent_id = None;
            }
            let agent = task.agent_id.clone().unwrap_or_default();
            let payload = obj(json!({"reason": "retry"}));
            core.emit(txn, task_id, EventKind::Retried, &agent, payload);
            core.forget_preferences(task_id);
            match core.dependency_check(&core.tasks[task_id], &known) {
                Ok(unmet) => {
                    core.wait_for(task_id, unmet);
                    if core.arm_deadlines(task_id) {
                        txn.timers_added = true;
                    }
                }
                Err(failed) => {
                    let error = json!({"reason": REASON_DEPENDENCY_FAILED, "dependency": failed});
                    core.fail_task(txn, task_id, error);
                }
            }
            Ok(())
        })
        .await
    }

    /// Every agent the hub knows: connected, away within the reconnect
    /// grace, or gone (away for longer).
    pub fn list_agents(&self) -> Vec<AgentInfo> {
        let grace = self.config.reconnect_grace;
        let now = tokio::time::Instant::now();
        let core = self.lock();
        let mut agents: Vec<AgentInfo> = core
            .agents
            .values()
            .map(|a| AgentInfo {
                agent_id: a.agent_id.clone(),
                name: a.name.clone(),
                capabilities: a.capabilities.clone(),
                status: a.status.clone(),
                connected: a.session.is_some(),
                presence: match a.session {
                    Some(_) => AgentPresence::Connected,
                    None if now < a.away_since.0 + grace => AgentPresence::Away {
                        since_ms: a.away_since.1,
                        grace_ends: a.away_since.0 + grace,
                    },
                    None => AgentPresence::Gone {
                        since_ms: a.away_since.1,
                    },
                },
                connected_at: a.connected_at,
                active_task_ids: a.active.iter().cloned().collect(),
                max_concurrency: a.max_concurrency,
                resources: a.resources.clone(),
            })
            .collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        agents
    }

    /// Follow events (see [`EventBus::watch`]). `log_id`: the log the
    /// cursor came from, if the client knows it.
    pub fn watch(
        &self,
        after: Option<Seq>,
        log_id: Option<&str>,
        filter: EventFilter,
    ) -> Result<mpsc::Receiver<WatchItem>> {
        if let Some(given) = log_id.filter(|l| !l.is_empty()) {
            if given != self.log_id {
                return Err(Error::LogMismatch {
                    given: given.to_string(),
                    current: self.log_id.clone(),
                });
            }
        }
        self.bus.watch(self.store.clone(), after, filter)
    }

    /// The log's head as this node knows it. A cluster follower's own
    /// state is as of when it last led; its copy of the log is current.
    fn head_seq(&self, core: &Core) -> Seq {
        core.last_seq.max(self.store.durable_seq())
    }

    /// `/health` figures.
    pub fn health(&self) -> Health {
        let core = self.lock();
        let node = self.cluster();
        Health {
            node_id: node.map(|n| n.node_id().to_string()),
            leader: node.and_then(|n| n.leader_id()),
            role: node.map(|n| n.role()),
            not_ready: node.and_then(|n| n.not_ready(core.degraded.is_none())),
            agents_connected: core.agents.values().filter(|a| a.session.is_some()).count(),
            tasks_queued: core.queue.len(),
            last_seq: self.head_seq(&core),
            // A cluster follower refuses writes by design (it forwards
            // them to the leader): that is not a degraded store.
            degraded: core
                .degraded
                .as_ref()
                .filter(|(fault, _)| *fault != crate::error::StorageFault::NotLeader)
                .map(|(fault, _)| crate::error::fault_text(*fault)),
        }
    }

    /// Cluster mode: does the hub take writes now? (`None` once it is gone.)
    pub fn writable(weak: &Weak<Hub>) -> Option<bool> {
        weak.upgrade().map(|h| h.lock().degraded.is_none())
    }

    /// The `/metrics` exposition. Gauges are set from counters kept as
    /// state changes (no scan of tasks).
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        {
            let core = self.lock();
            let connected = core.agents.values().filter(|a| a.session.is_some()).count();
            metrics::gauge_set(&m.agents_connected, connected as u64);
            for (state, n) in TaskState::ALL.iter().zip(core.state_counts) {
                let label = metrics::StateLabel {
                    state: state.as_str(),
                };
                metrics::gauge_set(&m.tasks.get_or_create(&label), n);
            }
            for (p, n) in Priority::ALL.iter().zip(core.queued_by_priority) {
                let label = metrics::PriorityLabel {
                    priority: p.as_str(),
                };
                metrics::gauge_set(&m.queue_depth.get_or_create(&label), n);
            }
            metrics::gauge_set(&m.last_event_seq, self.head_seq(&core));
            metrics::gauge_set(&m.tasks_in_memory, core.tasks.len() as u64);
            metrics::gauge_set(&m.timers, core.timer_count() as u64);
            let finished: u64 = TaskState::ALL
                .iter()
                .zip(core.state_counts)
                .filter(|(s, _)| s.is_final())
                .map(|(_, n)| n)
                .sum();
            metrics::gauge_set(&m.finished_stored, finished);
        }
        metrics::gauge_set(&m.watchers, self.bus.watcher_count() as u64);
        metrics::gauge_set(
            &m.output_watched,
            self.output_watches.watched_tasks() as u64,
        );
        metrics::gauge_set(&m.data_dir_bytes, self.store.disk_bytes());
        if let Some(node) = self.cluster() {
            metrics::gauge_set(&m.cluster_leader, u64::from(node.is_leader()));
            metrics::gauge_set(&m.cluster_leaderships, node.leaderships());
        }
        let mut out = String::new();
        m.render(&mut out);
        out
    }

    /// Stop taking writes, finish the queued ones, close the store.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.store.close();
        self.output.close();
    }
}

/// Write a secret to a file only its owner can read.
pub fn write_secret_file(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::storage(format!("write {}: {e}", path.display())))?;
    writeln!(f, "{secret}").map_err(|e| Error::storage(e.to_string()))?;
    Ok(())
}
