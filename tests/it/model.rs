//! A model-based property test of the hub core, driven in-process with
//! paused time: random sequences of push, identify, accept, progress,
//! complete, fail, reject (also `busy`), recover, `state_report`, disconnect,
//! reconnect (also past the grace), timeouts, cancel,
//! retry and injected commit failures, checked after every step against the
//! invariants the hub promises:
//! - one owner per active task, and only active tasks have one;
//! - no sidecar but the owner believes it holds the task's current generation;
//! - a task's generation never decreases;
//! - a final state is final (only `RetryTask` re-opens a task);
//! - every acknowledged report is stored, exactly once;
//! - every acknowledged push is stored; seqs have no holes.
//!
//! Seeds are fixed, so a failure names the seed that reproduces it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agenthub::auth::{issue_token, Role};
use agenthub::hub::{ListQuery, PushRequest};
use agenthub::link::{
    AckStatus, AgentLink, CloseReason, FromAgent, Identify, Link, Report, StateAction, ToAgent,
};
use agenthub::model::{Priority, Task, TaskState};
use agenthub::pb;
use agenthub::store::sqlite::SqliteStore;
use agenthub::store::{Faults, Store};
use agenthub::{Config, Hub};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1_000_000);

/// An agent connection in memory: records what the hub sends.
struct MemLink {
    id: u64,
    inbox: Mutex<Vec<ToAgent>>,
}

impl AgentLink for MemLink {
    fn id(&self) -> u64 {
        self.id
    }
    fn send(&self, msg: ToAgent) -> bool {
        self.inbox.lock().unwrap().push(msg);
        true
    }
    fn close(&self, _why: CloseReason) {}
}

struct Agent {
    name: String,
    token: String,
    link: Option<Arc<MemLink>>,
    /// Tasks the sidecar believes it holds: task → generation.
    held: BTreeMap<String, u64>,
}

const AGENTS: [&str; 3] = ["a0", "a1", "a2"];

struct Run {
    rng: StdRng,
    hub: Arc<Hub>,
    store: Arc<SqliteStore>,
    faults: Arc<Faults>,
    agents: Vec<Agent>,
    /// Every task whose push was acknowledged.
    pushed: Vec<String>,
    /// Acked final reports: (task, status, generation sent).
    acked: Vec<(String, AckStatus, u64)>,
    /// Last seen (state, generation) per task.
    seen: HashMap<String, (TaskState, u64)>,
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::for_data_dir(dir);
    c.accept_timeout = Duration::from_secs(60);
    c.reconnect_grace = Duration::from_secs(60);
    c.progress_timeout = Some(Duration::from_secs(30));
    c.default_max_attempts = 3;
    c
}

impl Run {
    fn new(seed: u64, dir: &std::path::Path) -> Run {
        let faults = Arc::new(Faults::default());
        let store =
            Arc::new(SqliteStore::open_with_faults(dir, None, true, Some(faults.clone())).unwrap());
        let agents = AGENTS
            .iter()
            .map(|a| Agent {
                name: a.to_string(),
                token: issue_token(&*store, Role::Agent, Some(a.to_string()))
                    .unwrap()
                    .0,
                link: None,
                held: BTreeMap::new(),
            })
            .collect();
        let hub = Hub::with_store(config(dir), store.clone() as Arc<dyn Store>).unwrap();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        std::mem::forget(_stop);
        tokio::spawn(hub.clone().run_recovery(stop_rx));
        Run {
            rng: StdRng::seed_from_u64(seed),
            hub,
            store,
            faults,
            agents,
            pushed: Vec::new(),
            acked: Vec::new(),
            seen: HashMap::new(),
        }
    }

    fn any_task(&mut self) -> Option<String> {
        let ids: Vec<&String> = self.seen.keys().collect();
        if ids.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..ids.len());
        Some(ids[i].clone())
    }

    async fn step(&mut self) -> Option<String> {
        let roll = self.rng.random_range(0..100);
        let mut retried = None;
        match roll {
            0..25 => self.push().await,
            25..35 => self.connect(),
            35..42 => self.disconnect(),
            42..80 => self.report().await,
            80..85 => {
                if let Some(t) = self.any_task() {
                    let _ = self.hub.cancel_task(&t).await;
                }
            }
            85..90 => {
                if let Some(t) = self.any_task() {
                    if self.hub.retry_task(&t).await.is_ok() {
                        retried = Some(t);
                    }
                }
            }
            90..98 => {
                let secs = self.rng.random_range(1..70);
                tokio::time::advance(Duration::from_secs(secs)).await;
                self.hub.fire_due_timers();
            }
            _ => self.faults.fail_next(1),
        }
        // Everything decided so far is durable and every reply delivered,
        // and the hub takes writes again (so each history is reproducible).
        // Recovery runs on its own thread: it takes writes again and submits
        // the assignments it makes in one step, so the flush must come after
        // the hub is seen writable, or those commits could land between the
        // reads of `check`.
        loop {
            if self.hub.health().degraded.is_none()
                && self.hub.flush().await.is_ok()
                && self.hub.health().degraded.is_none()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.read_inboxes();
        retried
    }

    async fn push(&mut self) {
        let pinned = self.rng.random_bool(0.4);
        let req = PushRequest {
            agent_id: pinned.then(|| AGENTS[self.rng.random_range(0..3)].to_string()),
            queue_if_offline: true,
            needed_capabilities: if self.rng.random_bool(0.3) {
                vec!["gpu".into()]
            } else {
                vec![]
            },
            priority: Priority::ALL[self.rng.random_range(0..4)],
            max_attempts: self.rng.random_range(1..4),
            description: "model".into(),
            ..PushRequest::default()
        };
        if let Ok(out) = self.hub.push_task(req).await {
            self.pushed.push(out.task.task_id.clone());
            self.seen
                .insert(out.task.task_id, (out.task.state, out.task.generation));
        }
    }

    fn connect(&mut self) {
        let i = self.rng.random_range(0..self.agents.len());
        let caps = if self.rng.random_bool(0.5) {
            vec!["gpu".to_string()]
        } else {
            vec![]
        };
        let max_concurrency = self.rng.random_range(1..4);
        let agent = &mut self.agents[i];
        if agent.link.is_some() {
            return;
        }
        let link = Arc::new(MemLink {
            id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            inbox: Mutex::new(Vec::new()),
        });
        let ident = Identify {
            agent_id: agent.name.clone(),
            token: agent.token.clone(),
            name: None,
            status: None,
            capabilities: caps,
            max_concurrency,
        };
        let dyn_link: Link = link.clone();
        self.hub.identify(&ident, &dyn_link).unwrap();
        agent.link = Some(link);
    }

    fn disconnect(&mut self) {
        let i = self.rng.random_range(0..self.agents.len());
        let agent = &mut self.agents[i];
        if let Some(link) = agent.link.take() {
            self.hub.session_closed(&agent.name, link.id);
        }
    }

    async fn report(&mut self) {
        let connected: Vec<usize> = (0..self.agents.len())
            .filter(|i| self.agents[*i].link.is_some() && !self.agents[*i].held.is_empty())
            .collect();
        if connected.is_empty() {
            return;
        }
        let i = connected[self.rng.random_range(0..connected.len())];
        let held: Vec<(String, u64)> = self.agents[i]
            .held
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let (task_id, generation) = held[self.rng.random_range(0..held.len())].clone();
        let generation = match self.rng.random_range(0..10) {
            0 => Some(generation.saturating_sub(1)),
            1 => None,
            _ => Some(generation),
        };
        let mut payload = serde_json::Map::new();
        payload.insert("task_id".into(), json!(task_id));
        let report = Report {
            task_id,
            generation,
            payload,
        };
        let msg = match self.rng.random_range(0..14) {
            0..4 => FromAgent::Accepted(report),
            4..6 => FromAgent::Progress(report),
            6..9 => FromAgent::Complete(report),
            9 => FromAgent::Failed(report),
            10 => FromAgent::Rejected(report),
            11 => FromAgent::Recovering(report),
            12 => FromAgent::StateReport(report),
            _ => {
                let mut report = report;
                report.payload.insert("reason".into(), json!("busy"));
                FromAgent::Rejected(report)
            }
        };
        let agent = &self.agents[i];
        let link: Link = agent.link.clone().unwrap();
        self.hub.report(&agent.name, &link, msg, None).await;
    }

    /// Apply what each sidecar was told.
    fn read_inboxes(&mut self) {
        for agent in &mut self.agents {
            let Some(link) = &agent.link else { continue };
            let msgs: Vec<ToAgent> = std::mem::take(&mut *link.inbox.lock().unwrap());
            for msg in msgs {
                match msg {
                    ToAgent::TaskAssign {
                        task_id,
                        generation,
                        ..
                    }
                    | ToAgent::TaskContinue {
                        task_id,
                        generation,
                    } => {
                        agent.held.insert(task_id, generation);
                    }
                    ToAgent::TaskCancelled { task_id, .. }
                    | ToAgent::TaskReassign { task_id }
                    | ToAgent::StateReportAck {
                        task_id,
                        action: StateAction::Abort,
                    } => {
                        agent.held.remove(&task_id);
                    }
                    ToAgent::TaskAck { task_id, status } if status != AckStatus::Accepted => {
                        let g = agent.held.remove(&task_id).unwrap_or(0);
                        self.acked.push((task_id, status, g));
                    }
                    ToAgent::Error {
                        error: "task_finished" | "not_task_owner" | "unknown_task",
                        task_id: Some(t),
                        ..
                    } => {
                        agent.held.remove(&t);
                    }
                    _ => {}
                }
            }
        }
    }

    async fn all_tasks(&self) -> Vec<Task> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .hub
                .list_tasks(ListQuery {
                    page_size: 1000,
                    page_token: token,
                    ..ListQuery::default()
                })
                .await
                .unwrap();
            out.extend(page.tasks);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return out,
            }
        }
    }

    async fn check(&mut self, seed: u64, step: usize, retried: Option<String>) {
        let ctx = format!("seed {seed}, step {step}");
        let tasks = self.all_tasks().await;
        let agents = self.hub.list_agents();
        let mut owners: HashMap<&str, Vec<&str>> = HashMap::new();
        for a in &agents {
            for t in &a.active_task_ids {
                owners.entry(t.as_str()).or_default().push(&a.agent_id);
            }
        }
        for t in &tasks {
            let owned = owners.get(t.task_id.as_str()).cloned().unwrap_or_default();
            if t.state.is_active() {
                assert_eq!(
                    owned,
                    [t.agent_id.as_deref().unwrap()],
                    "{ctx}: one owner for {t:?}"
                );
            } else {
                assert!(
                    owned.is_empty(),
                    "{ctx}: {} is {:?} but held by {owned:?}",
                    t.task_id,
                    t.state
                );
            }
            if let Some((prev_state, prev_gen)) = self.seen.get(&t.task_id) {
                assert!(
                    t.generation >= *prev_gen,
                    "{ctx}: generation went down for {}",
                    t.task_id
                );
                if prev_state.is_final() && *prev_state != t.state {
                    assert_eq!(
                        retried.as_deref(),
                        Some(t.task_id.as_str()),
                        "{ctx}: {} left {prev_state:?} for {:?}",
                        t.task_id,
                        t.state
                    );
                }
            }
            self.seen.insert(t.task_id.clone(), (t.state, t.generation));
        }
        // A run (task, generation) belongs to one sidecar: no other one
        // believes it holds the current generation of an active task.
        for t in tasks.iter().filter(|t| t.state.is_active()) {
            for agent in &self.agents {
                if agent.held.get(&t.task_id) == Some(&t.generation) {
                    assert_eq!(
                        t.agent_id.as_deref(),
                        Some(agent.name.as_str()),
                        "{ctx}: {} holds the run of {t:?}",
                        agent.name
                    );
                }
            }
        }
        let listed: HashSet<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        for id in &self.pushed {
            assert!(
                listed.contains(id.as_str()),
                "{ctx}: acknowledged push {id} lost"
            );
        }
        assert_eq!(
            listed.len(),
            self.pushed.len(),
            "{ctx}: tasks nobody pushed"
        );
    }

    /// Read the whole log back: no holes, and every acked report in it once.
    fn check_log(&self, seed: u64) {
        let events = self.store.read_events(0, usize::MAX >> 1).unwrap();
        for (i, ev) in events.iter().enumerate() {
            assert_eq!(ev.seq, i as u64 + 1, "seed {seed}: hole in the log");
        }
        let mut finals: HashMap<(String, i32, u64), usize> = HashMap::new();
        // A run given back to its agent (CONTINUED): its reports land under
        // the new generation. Key: (task, new generation) → the run's own.
        let mut continued: HashMap<(String, u64), u64> = HashMap::new();
        for ev in &events {
            let e = pb::TaskEvent::decode(ev.proto().clone()).unwrap();
            if e.kind == pb::task_event::Kind::Continued as i32 {
                let payload = pb::struct_to_json(e.payload.as_ref().unwrap());
                if let Some(prev) = payload.get("previous_generation").and_then(|v| v.as_u64()) {
                    continued.insert((e.task_id.clone(), e.generation), prev);
                }
            }
            let run = continued
                .get(&(e.task_id.clone(), e.generation))
                .copied()
                .unwrap_or(e.generation);
            *finals
                .entry((e.task_id.clone(), e.kind, e.generation))
                .or_default() += 1;
            if run != e.generation {
                *finals.entry((e.task_id, e.kind, run)).or_default() += 1;
            }
        }
        for (task, status, generation) in &self.acked {
            let kind = match status {
                AckStatus::Complete => pb::task_event::Kind::Completed,
                AckStatus::Failed => pb::task_event::Kind::Failed,
                AckStatus::Rejected => pb::task_event::Kind::Rejected,
                AckStatus::Accepted => continue,
            } as i32;
            let n = finals
                .get(&(task.clone(), kind, *generation))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                n, 1,
                "seed {seed}: acked {status:?} of {task} gen {generation} stored {n} times"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn random_histories_keep_the_hub_invariants() {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let mut stats = (0usize, 0u64, 0usize);
    for seed in 1..=12u64 {
        let tmp = tempfile::tempdir_in(base).unwrap();
        let mut run = Run::new(seed, tmp.path());
        for step in 0..150 {
            let retried = run.step().await;
            run.check(seed, step, retried).await;
        }
        run.check_log(seed);
        // The histories did reach the interesting states.
        assert!(
            run.pushed.len() > 10,
            "seed {seed}: {} pushes",
            run.pushed.len()
        );
        stats.0 += run.acked.len();
        stats.1 += run.faults.injected();
        stats.2 += run
            .seen
            .values()
            .filter(|(s, _)| *s == TaskState::Completed)
            .count();
        run.hub.close();
    }
    let (acked, faults, completed) = stats;
    assert!(
        acked > 50 && faults > 5 && completed > 20,
        "acks {acked}, faults {faults}, completed {completed}"
    );
}

#[tokio::test(start_paused = true)]
async fn progress_without_accept_arms_the_progress_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::new(0, tmp.path());
    run.agents.truncate(1);
    run.connect();
    let req = PushRequest {
        agent_id: Some("a0".into()),
        description: "quiet".into(),
        ..PushRequest::default()
    };
    run.hub.push_task(req).await.unwrap();
    run.hub.flush().await.unwrap();
    run.read_inboxes();
    let (task_id, generation) = run.agents[0]
        .held
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), *v))
        .unwrap();
    let link: Link = run.agents[0].link.clone().unwrap();
    let progress = |g| {
        let mut payload = serde_json::Map::new();
        payload.insert("progress".into(), json!(1));
        FromAgent::Progress(Report {
            task_id: task_id.clone(),
            generation: Some(g),
            payload,
        })
    };
    // Progress straight away (no task_accepted): the task is RUNNING...
    run.hub
        .report("a0", &link, progress(generation), None)
        .await;
    run.hub.flush().await.unwrap();
    assert_eq!(
        run.hub.get_task(&task_id).await.unwrap().state,
        TaskState::Running
    );
    // ...kept alive by progress...
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(20)).await;
        run.hub.fire_due_timers();
        run.hub
            .report("a0", &link, progress(generation), None)
            .await;
        run.hub.flush().await.unwrap();
    }
    assert_eq!(
        run.hub.get_task(&task_id).await.unwrap().state,
        TaskState::Running
    );
    // ...and taken back once it falls silent past the progress timeout.
    tokio::time::advance(Duration::from_secs(31)).await;
    run.hub.fire_due_timers();
    run.hub.flush().await.unwrap();
    let t = run.hub.get_task(&task_id).await.unwrap();
    assert_eq!(
        t.error,
        Some(json!({"reason": "progress_timeout"})),
        "{t:?}"
    );
    assert!(
        t.generation > generation || t.state == TaskState::Queued,
        "{t:?}"
    );
}
