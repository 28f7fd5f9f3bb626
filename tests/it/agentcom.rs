//! Today's AgentCom sidecar, as a scripted client: the messages it sends and
//! the way it reacts to the hub's, in the same order and with the same fields,
//! over a real WebSocket, with a real shell command per task (no LLM).
//!
//! What it does, in short: it holds at most one task (`active`, persisted
//! like its `queue.json`); a second `task_assign` gets `task_rejected`
//! `busy`. It accepts without a generation and reports the end of a task
//! with the generation it learnt from `task_assign` / `task_continue` (0 if
//! it knows none). After a restart its active task becomes `recovering`,
//! reported with a generation-less `task_recovering`; after a reconnect its
//! still active task is reported with `state_report`. Tasks with a
//! `routing_decision` run directly, inside its process (its shell executor
//! runs `metadata.shell_command`, streaming `task_progress`); the others go
//! through the wake path: its wake command wakes an agent that is a process
//! of its own (it outlives a killed sidecar), which drops `<task>.started`
//! and later `<task>.json` into the results directory the sidecar watches
//! (`wake_result`, `handleConfirmation`, `handleResult`). It sends
//! `resource_report` and `ping` periodically, and `agent_restarting` before
//! a restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agenthub::pb;
use agenthub::pb::task_event::Kind;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A task as the sidecar keeps it (its `queue.json` entry).
#[derive(Clone, Debug)]
struct Job {
    task_id: String,
    description: String,
    metadata: Value,
    status: String,
    assigned_at: i64,
    generation: u64,
    routing_decision: Value,
}

/// What survives a kill of the sidecar: `{active, recovering}`.
#[derive(Clone, Debug, Default)]
struct QueueFile {
    active: Option<Job>,
    recovering: Option<Job>,
}

enum Event {
    Frame(Value),
    Exited {
        task_id: String,
        ok: bool,
        output: String,
    },
    /// A new file in the results directory (its chokidar watcher).
    ResultFile(String),
    Closed,
}

/// The woken agent's side, which outlives the sidecar: the results directory
/// (the sidecar's `results_dir`), a log with one `wake <task>` line per wake,
/// and a gate file the agent waits for before it writes its result.
struct AgentHome {
    _tmp: tempfile::TempDir,
    results: PathBuf,
    wakes: PathBuf,
    gate: PathBuf,
}

impl AgentHome {
    fn new() -> AgentHome {
        let tmp = tempfile::tempdir().unwrap();
        let results = tmp.path().join("results");
        std::fs::create_dir(&results).unwrap();
        AgentHome {
            results,
            wakes: tmp.path().join("wakes.log"),
            gate: tmp.path().join("gate"),
            _tmp: tmp,
        }
    }

    /// One whose agent finishes as soon as it is woken.
    fn open() -> AgentHome {
        let home = AgentHome::new();
        home.let_agent_finish();
        home
    }

    fn let_agent_finish(&self) {
        std::fs::write(&self.gate, "").unwrap();
    }

    /// The sidecar's `wake_command`: log the wake, start the agent in the
    /// background (not a child the sidecar waits for) and return. The agent
    /// confirms (`.started`), works until the gate opens (10 s at most), then
    /// writes its result file whole (`awaitWriteFinish`).
    fn wake_command(&self) -> String {
        format!(
            r#"echo "wake $TASK_ID" >> {wakes}; ( touch {results}/$TASK_ID.started; i=0; while [ ! -e {gate} ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done; printf '{{"status":"success","output":"%s"}}' "$TASK_ID" > {results}/$TASK_ID.tmp; mv {results}/$TASK_ID.tmp {results}/$TASK_ID.json ) </dev/null >/dev/null 2>&1 &"#,
            wakes = self.wakes.display(),
            results = self.results.display(),
            gate = self.gate.display(),
        )
    }

    /// The tasks its agent was woken for, one entry per wake.
    fn wakes(&self) -> Vec<String> {
        lines(&self.wakes)
            .into_iter()
            .filter_map(|l| l.strip_prefix("wake ").map(str::to_string))
            .collect()
    }
}

struct AgentCom {
    agent_id: String,
    token: String,
    url: String,
    ws: Option<Ws>,
    queue: QueueFile,
    /// task → generation, from `task_assign` / `task_continue` (memory only).
    generations: HashMap<String, u64>,
    /// The command of the task it executes.
    run: Option<(String, Child)>,
    /// Every frame the hub sent, in order.
    received: Vec<Value>,
    /// Commands started: (task, generation).
    started: Vec<(String, u64)>,
    /// A restart was asked for while a task was working.
    pending_restart: Option<String>,
    /// Its `results_dir` and `wake_command`.
    results: PathBuf,
    wake_command: String,
    /// The agent home it owns (`start`), if any.
    _home: Option<AgentHome>,
    /// Files of `results` it has seen (present at start: ignored, as
    /// chokidar's `ignoreInitial`).
    seen: HashSet<String>,
}

impl AgentCom {
    /// Start it with an empty queue file and an agent that finishes at once,
    /// and wait for `identified`.
    async fn start(hub: &TestHub, agent: &str) -> AgentCom {
        let home = AgentHome::open();
        let mut s = Self::start_in(hub, agent, &home).await;
        s._home = Some(home);
        s
    }

    /// Start it with an empty queue file, waking the agent of `home`.
    async fn start_in(hub: &TestHub, agent: &str, home: &AgentHome) -> AgentCom {
        let token = hub.agent_token(agent);
        Self::start_with(hub.ws_url(), agent, token, QueueFile::default(), home).await
    }

    /// Start it on a queue file left by an earlier run (crash recovery: the
    /// active task becomes the recovering one).
    async fn start_with(
        url: String,
        agent: &str,
        token: String,
        mut queue: QueueFile,
        home: &AgentHome,
    ) -> AgentCom {
        if let Some(job) = queue.active.take() {
            queue.recovering = Some(job);
        }
        let seen = std::fs::read_dir(&home.results)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut s = AgentCom {
            agent_id: agent.to_string(),
            token,
            url,
            ws: None,
            queue,
            generations: HashMap::new(),
            run: None,
            received: Vec::new(),
            started: Vec::new(),
            pending_restart: None,
            results: home.results.clone(),
            wake_command: home.wake_command(),
            seen,
            _home: None,
        };
        s.connect().await;
        s.pump_until("identified", |v| v["type"] == "identified")
            .await;
        s
    }

    /// Open the socket and identify (its `ws.on('open')`).
    async fn connect(&mut self) {
        let (ws, _) = tokio_tungstenite::connect_async(self.url.as_str())
            .await
            .unwrap();
        self.ws = Some(ws);
        let identify = json!({
            "type": "identify",
            "agent_id": self.agent_id,
            "token": self.token,
            "name": self.agent_id,
            "status": "idle",
            "capabilities": [],
            "client_type": "sidecar",
            "protocol_version": 1,
        });
        self.send(identify).await;
    }

    /// Every message carries `protocol_version: 1`.
    async fn send(&mut self, mut v: Value) {
        v["protocol_version"] = json!(1);
        if let Some(ws) = self.ws.as_mut() {
            let _ = ws.send(Message::Text(v.to_string().into())).await;
        }
    }

    /// The process dies (`kill -9`): the socket drops, a command it executes
    /// dies with it; only the queue file (and a woken agent) is left.
    fn kill(mut self) -> QueueFile {
        if let Some((_, child)) = self.run.as_mut() {
            let _ = child.start_kill();
        }
        self.queue.clone()
    }

    /// Handle frames and command exits until a frame matches `done`.
    async fn pump_until(&mut self, what: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.next_event())
                .await
                .unwrap_or_else(|_| panic!("{}: no {what} within {WAIT:?}", self.agent_id));
            if let Some(v) = self.handle(event).await {
                if done(&v) {
                    return v;
                }
            }
        }
    }

    /// Handle events until its active task is `status`.
    async fn pump_until_status(&mut self, task_id: &str, status: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self
            .queue
            .active
            .as_ref()
            .is_some_and(|j| j.task_id == task_id && j.status == status)
        {
            let event = tokio::time::timeout_at(deadline, self.next_event())
                .await
                .unwrap_or_else(|_| {
                    panic!("{}: {task_id} not {status} within {WAIT:?}", self.agent_id)
                });
            self.handle(event).await;
        }
    }

    /// React to one event; a frame is returned.
    async fn handle(&mut self, event: Event) -> Option<Value> {
        match event {
            Event::Frame(v) => {
                self.received.push(v.clone());
                self.on_frame(&v).await;
                return Some(v);
            }
            Event::Exited {
                task_id,
                ok,
                output,
            } => self.on_command_exit(&task_id, ok, output).await,
            Event::ResultFile(name) => self.on_result_file(&name).await,
            // `ws.on('close')`: reconnect.
            Event::Closed => self.connect().await,
        }
        None
    }

    async fn next_event(&mut self) -> Event {
        let ws = self.ws.as_mut().expect("connected");
        let run = &mut self.run;
        let (results, seen) = (&self.results, &mut self.seen);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    if let Some(name) = new_file(results, seen) {
                        return Event::ResultFile(name);
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => return Event::Frame(serde_json::from_str(&t).unwrap()),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Event::Closed,
                    Some(Ok(_)) => continue,
                },
                status = wait_run(run) => {
                    let (task_id, mut child) = run.take().expect("running");
                    let mut output = String::new();
                    if let Some(mut out) = child.stdout.take() {
                        let _ = out.read_to_string(&mut output).await;
                    }
                    return Event::Exited { task_id, ok: status, output };
                }
            }
        }
    }

    /// Its `handleMessage`.
    async fn on_frame(&mut self, msg: &Value) {
        let task_id = msg["task_id"].as_str().unwrap_or_default().to_string();
        match msg["type"].as_str().unwrap_or_default() {
            "identified" => {
                self.report_recovery().await;
                self.report_active_state().await;
                // Its timers: a resource report 5 s after connecting, a ping every 30 s.
                self.send(json!({
                    "type": "resource_report",
                    "agent_id": self.agent_id,
                    "cpu_percent": 12.5,
                    "ram_used_bytes": 1_000_000_000u64,
                    "ram_total_bytes": 8_000_000_000u64,
                    "vram_used_bytes": null,
                    "vram_total_bytes": null,
                    "timestamp": 1,
                }))
                .await;
                self.send(json!({"type": "ping"})).await;
            }
            "task_assign" => self.on_task_assign(msg).await,
            "task_reassign" => {
                self.generations.remove(&task_id);
                if self.queue.recovering.as_ref().map(|j| &j.task_id) == Some(&task_id) {
                    self.queue.recovering = None;
                }
            }
            "task_continue" => {
                if let Some(g) = msg["generation"].as_u64() {
                    self.generations.insert(task_id.clone(), g);
                }
                if self.queue.recovering.as_ref().map(|j| &j.task_id) == Some(&task_id) {
                    self.queue.active = self.queue.recovering.take();
                }
            }
            "task_cancelled" => {
                if self.queue.active.as_ref().map(|j| &j.task_id) == Some(&task_id) {
                    self.queue.active = None;
                }
                if self.queue.recovering.as_ref().map(|j| &j.task_id) == Some(&task_id) {
                    self.queue.recovering = None;
                }
                self.generations.remove(&task_id);
            }
            "state_report_ack" => {
                let active = self.queue.active.as_ref().map(|j| &j.task_id) == Some(&task_id);
                if msg["action"] == "abort" && active {
                    self.queue.active = None;
                    self.generations.remove(&task_id);
                }
            }
            "restart_sidecar" => {
                let reason = msg["reason"]
                    .as_str()
                    .unwrap_or("hub_commanded")
                    .to_string();
                let working = self
                    .queue
                    .active
                    .as_ref()
                    .is_some_and(|j| j.status == "working");
                if working {
                    self.pending_restart = Some(reason);
                } else {
                    self.send(json!({"type": "agent_restarting", "reason": reason}))
                        .await;
                }
            }
            // error, pong, task_ack: logged only.
            _ => {}
        }
    }

    /// Its `handleTaskAssign`.
    async fn on_task_assign(&mut self, msg: &Value) {
        let task_id = msg["task_id"].as_str().unwrap().to_string();
        if self.queue.active.is_some() {
            self.send(json!({"type": "task_rejected", "task_id": task_id, "reason": "busy"}))
                .await;
            return;
        }
        if let Some(g) = msg["generation"].as_u64() {
            self.generations.insert(task_id.clone(), g);
        }
        let job = Job {
            task_id: task_id.clone(),
            description: msg["description"].as_str().unwrap_or_default().to_string(),
            metadata: msg.get("metadata").cloned().unwrap_or(json!({})),
            status: "accepted".into(),
            assigned_at: msg["assigned_at"].as_i64().unwrap_or_default(),
            generation: msg["generation"].as_u64().unwrap_or(0),
            routing_decision: msg.get("routing_decision").cloned().unwrap_or(Value::Null),
        };
        self.queue.active = Some(job.clone());
        self.send(json!({"type": "task_accepted", "task_id": task_id}))
            .await;
        let direct = job.routing_decision["target_type"]
            .as_str()
            .is_some_and(|t| t != "wake");
        if !direct {
            self.wake_agent(&job).await;
            return;
        }
        // `executeTask`.
        self.set_status(&task_id, "working");
        let command = job.metadata["shell_command"]
            .as_str()
            .unwrap_or("true")
            .to_string();
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("TASK_ID", &task_id)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.started.push((task_id.clone(), job.generation));
        self.run = Some((task_id.clone(), child));
        let event = json!({"event_type": "status", "text": "running", "tokens_so_far": null, "model": null, "timestamp": 1});
        self.send(json!({"type": "task_progress", "task_id": task_id, "execution_event": event}))
            .await;
    }

    /// Its `wakeAgent`: run the wake command (it returns once the agent is
    /// woken), report it, wait for the agent's confirmation.
    async fn wake_agent(&mut self, job: &Job) {
        self.set_status(&job.task_id, "waking");
        let woke = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.wake_command)
            .env("TASK_ID", &job.task_id)
            .status()
            .await
            .unwrap();
        assert!(woke.success());
        self.started.push((job.task_id.clone(), job.generation));
        self.send(json!({"type": "wake_result", "task_id": job.task_id, "status": "success", "attempt": 1}))
            .await;
        self.set_status(&job.task_id, "waking_confirmation");
    }

    /// Its result watcher: `handleConfirmation` (`.started`) and
    /// `handleResult` (`.json`), both for the active task only.
    async fn on_result_file(&mut self, name: &str) {
        let active = self.queue.active.as_ref().map(|j| j.task_id.clone());
        if let Some(task_id) = name.strip_suffix(".started") {
            let confirming = self
                .queue
                .active
                .as_ref()
                .is_some_and(|j| j.task_id == task_id && j.status == "waking_confirmation");
            if confirming {
                self.set_status(task_id, "working");
            }
            return;
        }
        let Some(task_id) = name.strip_suffix(".json") else {
            return;
        };
        if active.as_deref() != Some(task_id) {
            return; // result_ignored: not the active task
        }
        let path = self.results.join(name);
        let result: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let generation = self.generations.remove(task_id).unwrap_or(0);
        if result["status"] == "success" {
            self.send(json!({
                "type": "task_complete",
                "task_id": task_id,
                "result": result,
                "generation": generation,
                "verification_report": {"status": "skip"},
                "verification_history": null,
            }))
            .await;
        } else {
            self.send(json!({"type": "task_failed", "task_id": task_id, "reason": result["reason"], "generation": generation}))
                .await;
        }
        self.queue.active = None;
        for ext in ["started", "json"] {
            let _ = std::fs::remove_file(self.results.join(format!("{task_id}.{ext}")));
        }
        if let Some(reason) = self.pending_restart.take() {
            self.send(json!({"type": "agent_restarting", "reason": reason}))
                .await;
        }
    }

    fn set_status(&mut self, task_id: &str, status: &str) {
        if let Some(job) = self.queue.active.as_mut().filter(|j| j.task_id == task_id) {
            job.status = status.to_string();
        }
    }

    /// The end of `executeTask`: report, clear the active slot, restart if asked.
    async fn on_command_exit(&mut self, task_id: &str, ok: bool, output: String) {
        let generation = self.generations.remove(task_id).unwrap_or(0);
        if ok {
            let result = json!({"status": "success", "output": output, "model_used": "none", "tokens_in": 0, "tokens_out": 0});
            self.send(json!({
                "type": "task_complete",
                "task_id": task_id,
                "result": result,
                "generation": generation,
                "verification_report": null,
                "verification_history": null,
            }))
            .await;
        } else {
            self.send(json!({"type": "task_failed", "task_id": task_id, "reason": "exit status 1", "generation": generation}))
                .await;
        }
        self.queue.active = None;
        if let Some(reason) = self.pending_restart.take() {
            self.send(json!({"type": "agent_restarting", "reason": reason}))
                .await;
        }
    }

    /// Its `reportRecovery`.
    async fn report_recovery(&mut self) {
        if let Some(job) = self.queue.recovering.clone() {
            self.send(json!({
                "type": "task_recovering",
                "task_id": job.task_id,
                "description": job.description,
                "metadata": job.metadata,
                "last_status": job.status,
            }))
            .await;
        }
    }

    /// Its `reportActiveState`.
    async fn report_active_state(&mut self) {
        if let Some(job) = self.queue.active.clone() {
            let generation = self
                .generations
                .get(&job.task_id)
                .copied()
                .unwrap_or(job.generation);
            self.send(json!({
                "type": "state_report",
                "task_id": job.task_id,
                "status": job.status,
                "generation": generation,
                "assigned_at": job.assigned_at,
            }))
            .await;
        }
    }

    /// Frames of this type received so far.
    fn frames(&self, ty: &str) -> Vec<&Value> {
        self.received.iter().filter(|v| v["type"] == ty).collect()
    }
}

/// A file of `dir` not in `seen` yet (it is added). Temporary files are
/// left until renamed (`awaitWriteFinish`).
fn new_file(dir: &Path, seen: &mut HashSet<String>) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|n| !n.ends_with(".tmp") && !seen.contains(n))
        .collect();
    names.sort_by_key(|n| !n.ends_with(".started"));
    let name = names.into_iter().next()?;
    seen.insert(name.clone());
    Some(name)
}

async fn wait_run(run: &mut Option<(String, Child)>) -> bool {
    match run {
        Some((_, child)) => child.wait().await.is_ok_and(|s| s.success()),
        None => std::future::pending().await,
    }
}

/// A command that appends `start <task>` to `log`, waits for `gate` to exist
/// (the test decides when it ends), then appends `end <task>`.
fn gated_command(log: &Path, gate: &Path) -> String {
    format!(
        r#"echo "start $TASK_ID" >> {log}; while [ ! -e {gate} ]; do sleep 0.02; done; echo "end $TASK_ID" >> {log}; echo done"#,
        log = log.display(),
        gate = gate.display()
    )
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A pinned push whose metadata routes it to AgentCom's shell executor.
fn shell_task(agent: &str, command: &str) -> pb::PushTaskRequest {
    let mut req = pinned(agent, "run a command");
    req.metadata = Some(pb::json_to_struct(
        json!({
            "routing_decision": {"target_type": "sidecar", "reason": "test"},
            "shell_command": command,
        })
        .as_object()
        .unwrap(),
    ));
    req
}

/// Watch events until one matches.
async fn until_event(
    stream: &mut tonic::Streaming<pb::TaskEvent>,
    what: &str,
    mut f: impl FnMut(&pb::TaskEvent) -> bool,
) -> pb::TaskEvent {
    loop {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
            .unwrap()
            .unwrap();
        if f(&ev) {
            return ev;
        }
    }
}

async fn task(hub: &TestHub, task_id: &str) -> pb::Task {
    hub.client().await.task(task_id).await
}

fn no_errors(sc: &AgentCom) {
    let errors = sc.frames("error");
    assert!(errors.is_empty(), "errors sent to the sidecar: {errors:?}");
}

struct Dir {
    _tmp: tempfile::TempDir,
    log: PathBuf,
    gate: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().unwrap();
    Dir {
        log: tmp.path().join("runs.log"),
        gate: tmp.path().join("gate"),
        _tmp: tmp,
    }
}

#[tokio::test]
async fn agentcom_sidecar_runs_a_task_to_completion_without_protocol_errors() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = AgentCom::start(&hub, "ac-1").await;
    let d = dir();
    std::fs::write(&d.gate, "").unwrap();
    // Directly executed (routing_decision), then the wake path, then a failure.
    let direct = client
        .push(shell_task("ac-1", &gated_command(&d.log, &d.gate)))
        .await;
    sc.pump_until("direct ack", |v| {
        v["type"] == "task_ack" && v["status"] == "complete"
    })
    .await;
    let mut wake = pinned("ac-1", "woken");
    wake.metadata = Some(pb::json_to_struct(
        json!({"shell_command": "echo woken"}).as_object().unwrap(),
    ));
    let wake = client.push(wake).await;
    sc.pump_until("wake ack", |v| {
        v["type"] == "task_ack" && v["status"] == "complete"
    })
    .await;
    let mut failing = shell_task("ac-1", "exit 3");
    failing.max_attempts = 1;
    let failing = client.push(failing).await;
    sc.pump_until("failed ack", |v| {
        v["type"] == "task_ack" && v["status"] == "failed"
    })
    .await;
    assert!(!sc.frames("pong").is_empty(), "its ping was answered");

    for (id, state) in [
        (&direct.task_id, pb::task::State::Completed),
        (&wake.task_id, pb::task::State::Completed),
        (&failing.task_id, pb::task::State::Failed),
    ] {
        let t = task(&hub, id).await;
        assert_eq!(state_of(&t), state, "{t:?}");
        assert_eq!(t.generation, 1);
    }
    let done = task(&hub, &direct.task_id).await;
    assert_eq!(
        pb::value_to_json(done.result.as_ref().unwrap())["output"],
        "done\n"
    );
    // Its resource_report shows in ListAgents.
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let res = agents[0].resources.as_ref().expect("resources kept");
    assert_eq!(res.cpu_percent, Some(12.5));
    assert_eq!(res.ram_total_bytes, Some(8_000_000_000));
    assert_eq!(res.vram_used_bytes, None);
    assert!(res.reported_at_ms > 0);
    // Every message it sent was understood: no error at all.
    no_errors(&sc);
    assert_eq!(lines(&d.log).len(), 2);
}

#[tokio::test]
async fn agentcom_task_assign_carries_enrichment_fields_at_top_level() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = AgentCom::start(&hub, "ac-2").await;
    let metadata = json!({
        "routing_decision": {"target_type": "sidecar", "model": null, "reason": "shell"},
        "repo": "acme/app",
        "branch": "feature/x",
        "complexity": {"effective_tier": "trivial"},
        "verification_steps": [{"type": "command", "command": "true"}],
        "skip_verification": true,
        "verification_timeout_ms": 5000,
        "max_verification_retries": 2,
        "shell_command": "echo ok",
        "owner": "team-a",
    });
    let mut req = pinned("ac-2", "enriched");
    req.metadata = Some(pb::json_to_struct(metadata.as_object().unwrap()));
    client.push(req).await;
    let assign = sc
        .pump_until("task_assign", |v| v["type"] == "task_assign")
        .await;
    for key in [
        "routing_decision",
        "repo",
        "branch",
        "complexity",
        "verification_steps",
        "skip_verification",
        "verification_timeout_ms",
        "max_verification_retries",
    ] {
        assert_eq!(assign[key], assign["metadata"][key], "{key}: {assign}");
        assert!(!assign[key].is_null(), "{key} missing: {assign}");
    }
    assert_eq!(assign["repo"], "acme/app");
    assert_eq!(assign["routing_decision"]["target_type"], "sidecar");
    // Other metadata stays only in metadata, which is unchanged.
    assert!(assign.get("shell_command").is_none() && assign.get("owner").is_none());
    assert_eq!(assign["metadata"]["owner"], "team-a");
    assert_eq!(assign["metadata"].as_object().unwrap().len(), 10);
    // The shell executor was reached (routing_decision) and streamed progress.
    sc.pump_until("complete ack", |v| {
        v["type"] == "task_ack" && v["status"] == "complete"
    })
    .await;
    no_errors(&sc);
}

/// Killed for longer than the grace while it executes a task itself
/// (`routing_decision`): that run died with it. The task is settled
/// (`task_recovering` → `task_reassign`) before it gets the task again, so
/// it runs once, to completion.
#[tokio::test]
async fn agentcom_sidecar_killed_past_the_grace_runs_the_task_exactly_once() {
    let hub = TestHub::start_with(|c| c.reconnect_grace = Duration::from_millis(200)).await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let d = dir();
    let home = AgentHome::open();
    let mut sc = AgentCom::start_in(&hub, "ac-3", &home).await;
    let (url, token) = (sc.url.clone(), sc.token.clone());
    let t = client
        .push(shell_task("ac-3", &gated_command(&d.log, &d.gate)))
        .await;
    sc.pump_until("accepted", |v| {
        v["type"] == "task_ack" && v["status"] == "accepted"
    })
    .await;
    // Killed mid-task (its command dies with it).
    let queue = sc.kill();
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;

    let mut sc = AgentCom::start_with(url, "ac-3", token, queue, &home).await;
    std::fs::write(&d.gate, "").unwrap();
    sc.pump_until("complete ack", |v| {
        v["type"] == "task_ack" && v["status"] == "complete"
    })
    .await;
    // Its recovery was answered before the new assignment reached it.
    let order: Vec<&str> = sc
        .received
        .iter()
        .filter_map(|v| v["type"].as_str())
        .filter(|t| matches!(*t, "task_reassign" | "task_continue" | "task_assign"))
        .collect();
    assert_eq!(order, ["task_reassign", "task_assign"]);
    assert_eq!(sc.started, [(t.task_id.clone(), 2)]);
    let ends: Vec<String> = lines(&d.log)
        .into_iter()
        .filter(|l| l.starts_with("end"))
        .collect();
    assert_eq!(ends, [format!("end {}", t.task_id)]);
    let done = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed);
    assert_eq!((done.generation, done.attempts), (2, 2));
    no_errors(&sc);
}

/// Events of one task, from a watch of everything: (kind, generation).
async fn history(
    watch: &mut tonic::Streaming<pb::TaskEvent>,
    task_id: &str,
    until: Kind,
) -> Vec<(Kind, u64)> {
    let mut seen = Vec::new();
    loop {
        let ev = until_event(watch, "event", |ev| ev.task_id == task_id).await;
        seen.push((kind(&ev), ev.generation));
        if kind(&ev) == until {
            return seen;
        }
    }
}

/// The frames about tasks it got, by type, in order.
fn task_frames(sc: &AgentCom) -> Vec<&str> {
    sc.received
        .iter()
        .filter_map(|v| v["type"].as_str())
        .filter(|t| {
            matches!(
                *t,
                "task_assign" | "task_reassign" | "task_continue" | "task_cancelled"
            )
        })
        .collect()
}

/// Push a wake-path task to `agent` (an AgentCom sidecar started on `home`)
/// and wait until its agent is at work on it (`working`, after `.started`).
async fn working_task(hub: &TestHub, sc: &mut AgentCom, req: pb::PushTaskRequest) -> String {
    let t = hub.client().await.push(req).await;
    sc.pump_until_status(&t.task_id, "working").await;
    t.task_id
}

/// The issue's sequence: killed (SIGKILL) while its woken agent works, back
/// after the grace on the same queue file. Its generation-less
/// `task_recovering` (`last_status: "working"`) gets `task_continue` with a
/// new generation instead of `task_reassign` + `task_assign`: the agent is
/// woken once, and its result completes the task under that generation.
#[tokio::test]
async fn agentcom_killed_while_its_agent_works_continues_the_task_and_wakes_it_once() {
    let hub = TestHub::start_with(|c| c.reconnect_grace = Duration::from_millis(200)).await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let home = AgentHome::new();
    let mut sc = AgentCom::start_in(&hub, "ac-11", &home).await;
    let (url, token) = (sc.url.clone(), sc.token.clone());
    let id = working_task(&hub, &mut sc, pinned("ac-11", "wake me")).await;
    let queue = sc.kill();
    assert_eq!(queue.active.as_ref().unwrap().status, "working");
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;

    let mut sc = AgentCom::start_with(url, "ac-11", token, queue, &home).await;
    continued_at(&mut sc, 2).await;
    assert_eq!(
        sc.queue.active.as_ref().unwrap().task_id,
        id,
        "moved back to active"
    );
    // The agent, still at work, finishes; the restarted sidecar reports it.
    let done = finished_once(&hub, &mut sc, &home, &id).await;
    assert_eq!((done.generation, done.attempts), (2, 1));
    assert_eq!(
        pb::value_to_json(done.result.as_ref().unwrap())["output"],
        id.as_str()
    );
    let mut watch = client.watch_after(0).await;
    assert_eq!(
        history(&mut watch, &id, Kind::Completed).await,
        CONTINUED_RUN
    );
    let continued = until_event(&mut client.watch_after(0).await, "continued", |ev| {
        kind(ev) == Kind::Continued
    })
    .await;
    assert_eq!(
        Value::Object(pb::struct_to_json(continued.payload.as_ref().unwrap())),
        json!({"reason": "still_running", "previous_generation": 1})
    );
}

/// The same with `state_report`: the connection is silent past the grace
/// while the sidecar (and its woken agent) keep working; on reconnect its
/// `state_report` gets `continue`, then `task_continue` with the new
/// generation, which its result carries: COMPLETED, one wake.
#[tokio::test]
async fn agentcom_connection_paused_past_the_grace_still_completes() {
    let hub = TestHub::start_with(|c| {
        c.reconnect_grace = Duration::from_millis(200);
        c.ws_ping_interval = Duration::from_millis(100);
        c.ws_ping_timeout = Duration::from_millis(100);
        c.ws_close_timeout = Duration::from_millis(100);
    })
    .await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let home = AgentHome::new();
    let mut sc = AgentCom::start_in(&hub, "ac-4", &home).await;
    let id = working_task(&hub, &mut sc, pinned("ac-4", "wake me")).await;
    // Paused: it reads nothing and answers no ping until the hub has given
    // the task up.
    let reclaimed = until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;
    assert_eq!(
        pb::struct_to_json(reclaimed.payload.as_ref().unwrap())["reason"],
        "agent_disconnected"
    );
    // Resumed: it notices the closed socket, reconnects and reports its task.
    let ack = sc
        .pump_until("state_report_ack", |v| v["type"] == "state_report_ack")
        .await;
    assert_eq!(ack["action"], "continue", "{ack}");
    assert_eq!(ack["task_id"], id.as_str());
    let cont = sc
        .pump_until("task_continue", |v| v["type"] == "task_continue")
        .await;
    assert_eq!(cont["generation"], 2, "{cont}");
    assert_eq!(sc.generations[&id], 2);
    home.let_agent_finish();
    sc.pump_until("complete ack", |v| {
        v["type"] == "task_ack" && v["status"] == "complete"
    })
    .await;
    let done = task(&hub, &id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed, "{done:?}");
    assert_eq!((done.generation, done.attempts), (2, 1));
    assert_eq!(home.wakes(), [id.as_str()], "the agent was woken once");
    assert_eq!(task_frames(&sc), ["task_assign", "task_continue"]);
    assert!(sc.frames("task_rejected").is_empty());
    no_errors(&sc);
    let mut watch = client.watch_after(0).await;
    assert_eq!(
        history(&mut watch, &id, Kind::Completed).await,
        CONTINUED_RUN
    );
}

/// The same with a hub restart between the reclaim and the sidecar's return,
/// for a scheduled task (which has no agent once queued: the reclaim's error
/// names it, so the restarted hub still knows whose run it was).
#[tokio::test]
async fn agentcom_killed_sidecar_continues_its_task_after_a_hub_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let tweak = |c: &mut agenthub::Config| {
        c.reconnect_grace = Duration::from_millis(200);
        c.reconnect_settle = Duration::from_secs(3600);
    };
    let hub = TestHub::start_in(tmp.path(), tweak).await;
    let mut watch = hub.client().await.watch_after(0).await;
    let home = AgentHome::new();
    let mut sc = AgentCom::start_in(&hub, "ac-12", &home).await;
    let token = sc.token.clone();
    let id = working_task(
        &hub,
        &mut sc,
        scheduled("wake me", &[], pb::Priority::Normal),
    )
    .await;
    let queue = sc.kill();
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;
    let lost = task(&hub, &id).await;
    assert_eq!(state_of(&lost), pb::task::State::Queued);
    assert_eq!(lost.agent_id, "", "a queued scheduled task has no agent");
    assert_eq!(
        pb::value_to_json(lost.error.as_ref().unwrap()),
        json!({"reason": "agent_disconnected", "agent_id": "ac-12"})
    );
    drop(watch);
    hub.stop().await;

    let hub = TestHub::start_in(tmp.path(), tweak).await;
    let mut sc = AgentCom::start_with(hub.ws_url(), "ac-12", token, queue, &home).await;
    continued_at(&mut sc, 2).await;
    let done = finished_once(&hub, &mut sc, &home, &id).await;
    assert_eq!(
        (done.generation, done.attempts, done.agent_id.as_str()),
        (2, 1, "ac-12")
    );
    let mut watch = hub.client().await.watch_after(0).await;
    let events = history(&mut watch, &id, Kind::Completed).await;
    assert_eq!(
        events[3..],
        [
            (Kind::Reclaimed, 1),
            (Kind::Recovering, 1),
            (Kind::Continued, 2),
            (Kind::Completed, 2),
        ]
    );
}

/// The events of a task taken back for its agent's absence, given back to
/// it under generation 2, and completed by that run.
const CONTINUED_RUN: [(Kind, u64); 7] = [
    (Kind::Created, 0),
    (Kind::Assigned, 1),
    (Kind::Accepted, 1),
    (Kind::Reclaimed, 1),
    (Kind::Recovering, 1),
    (Kind::Continued, 2),
    (Kind::Completed, 2),
];

/// The sidecar's recovery answer: `task_continue` at `generation`.
async fn continued_at(sc: &mut AgentCom, generation: u64) {
    let reply = sc
        .pump_until("recovery answer", |v| {
            matches!(v["type"].as_str(), Some("task_continue" | "task_reassign"))
        })
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["generation"].as_u64()),
        (Some("task_continue"), Some(generation)),
        "{reply}"
    );
}

/// Let the woken agent finish; the sidecar reports it: the task is
/// COMPLETED, its agent was woken once, and the only task frame the sidecar
/// got was `task_continue`.
async fn finished_once(hub: &TestHub, sc: &mut AgentCom, home: &AgentHome, id: &str) -> pb::Task {
    home.let_agent_finish();
    sc.pump_until("complete ack", |v| {
        v["type"] == "task_ack" && v["status"] == "complete"
    })
    .await;
    assert_eq!(home.wakes(), [id], "the agent was woken once");
    assert_eq!(task_frames(sc), ["task_continue"]);
    no_errors(sc);
    let done = task(hub, id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed, "{done:?}");
    done
}

/// Kill `agent`'s sidecar while its woken agent works on a new task (pushed
/// with `req`), and wait until the hub takes the task back: the task, and
/// what the sidecar leaves to its next start.
async fn lose_working_task(
    hub: &TestHub,
    home: &AgentHome,
    agent: &str,
    req: pb::PushTaskRequest,
) -> (String, QueueFile) {
    let mut watch = hub.client().await.watch_after(0).await;
    let mut sc = AgentCom::start_in(hub, agent, home).await;
    let id = working_task(hub, &mut sc, req).await;
    let queue = sc.kill();
    until_event(&mut watch, "reclaim", |ev| {
        kind(ev) == Kind::Reclaimed && ev.task_id == id
    })
    .await;
    (id, queue)
}

/// Restart `agent`'s sidecar on `queue`: the hub's answer to its
/// `task_recovering`, and the sidecar.
async fn recover(
    hub: &TestHub,
    home: &AgentHome,
    agent: &str,
    queue: QueueFile,
) -> (Value, AgentCom) {
    let token = hub.agent_token(agent);
    let mut sc = AgentCom::start_with(hub.ws_url(), agent, token, queue, home).await;
    let reply = sc
        .pump_until("recovery answer", |v| {
            matches!(v["type"].as_str(), Some("task_continue" | "task_reassign"))
        })
        .await;
    (reply, sc)
}

#[track_caller]
fn reassigned(reply: &Value, id: &str) {
    assert_eq!(
        (reply["type"].as_str(), reply["task_id"].as_str()),
        (Some("task_reassign"), Some(id)),
        "{reply}"
    );
}

/// The counter-cases: a task that is no longer the returning sidecar's to
/// continue gets `task_reassign` (and `abort` for `state_report`), and the
/// hub's record of it does not change: given to another agent, finished,
/// cancelled, or held by another agent since (its report names an older
/// generation). Nor does a run the sidecar's restart ended (`last_status`
/// before its agent was woken).
#[tokio::test]
async fn agentcom_recovery_of_a_task_no_longer_its_own_is_reassigned() {
    let hub = TestHub::start_with(|c| {
        c.reconnect_grace = Duration::from_millis(200);
        c.reconnect_settle = Duration::from_secs(3600);
    })
    .await;
    let mut client = hub.client().await;
    let home = AgentHome::new();

    // Given to another agent while it was away (scheduled: anyone may run it).
    let req = scheduled("x", &[], pb::Priority::Normal);
    let (id, queue) = lose_working_task(&hub, &home, "cc-a", req).await;
    let mut other = hub.sidecar("cc-b").await;
    let (id2, g2) = other.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), 2));
    other.accept(&id, 2).await;
    let (reply, sc) = recover(&hub, &home, "cc-a", queue.clone()).await;
    reassigned(&reply, &id);
    assert!(sc.queue.recovering.is_none() && sc.queue.active.is_none());
    no_errors(&sc);
    let now = task(&hub, &id).await;
    assert_eq!(
        (state_of(&now), now.generation, now.agent_id.as_str()),
        (pb::task::State::Running, 2, "cc-b")
    );
    drop(sc);

    // Finished (by that agent) before it came back.
    other.complete(&id, 2, json!("by b")).await;
    let (reply, sc) = recover(&hub, &home, "cc-a", queue).await;
    reassigned(&reply, &id);
    let done = task(&hub, &id).await;
    assert_eq!(
        (state_of(&done), done.generation, done.agent_id.as_str()),
        (pb::task::State::Completed, 2, "cc-b")
    );
    drop((sc, other));

    // Cancelled while it was away.
    let (id, queue) = lose_working_task(&hub, &home, "cc-a", pinned("cc-a", "y")).await;
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap();
    let (reply, sc) = recover(&hub, &home, "cc-a", queue).await;
    reassigned(&reply, &id);
    assert_eq!(state_of(&task(&hub, &id).await), pb::task::State::Cancelled);
    drop(sc);

    // Held by another agent since, which lost it in turn: the returning
    // sidecar's run is of an older generation than that agent's.
    let req = scheduled("z", &[], pb::Priority::Normal);
    let (id, queue) = lose_working_task(&hub, &home, "cc-c", req).await;
    let mut watch = client.watch_after(0).await;
    let mut other = hub.sidecar("cc-d").await;
    let (_, g2) = other.next_assign().await;
    other.accept(&id, g2).await;
    drop(other);
    until_event(&mut watch, "reclaim from cc-d", |ev| {
        kind(ev) == Kind::Reclaimed && ev.agent_id == "cc-d"
    })
    .await;
    // Back, silent: the task waits for its report (not for cc-c's).
    let _d = hub.sidecar("cc-d").await;
    let (reply, sc) = recover(&hub, &home, "cc-c", queue).await;
    reassigned(&reply, &id);
    drop(sc);
    let mut raw = hub.sidecar("cc-c").await;
    raw.send(json!({"type": "state_report", "task_id": id, "status": "working", "generation": 1}))
        .await;
    let ack = raw.recv_type("state_report_ack").await;
    assert_eq!(ack["action"], "abort", "{ack}");
    raw.send(json!({"type": "task_recovering", "task_id": id, "generation": 1, "last_status": "working"}))
        .await;
    reassigned(&raw.recv().await, &id);
    let queued = task(&hub, &id).await;
    assert_eq!(
        (state_of(&queued), queued.generation),
        (pb::task::State::Queued, 2)
    );
    drop(raw);

    // Killed before its agent was woken: no run is left to continue.
    let mut sc = AgentCom::start_in(&hub, "cc-e", &home).await;
    let mut watch = client.watch_after(0).await;
    let t = client.push(pinned("cc-e", "w")).await;
    sc.pump_until("accepted", |v| v["type"] == "task_ack").await;
    let mut queue = sc.kill();
    until_event(&mut watch, "reclaim", |ev| {
        kind(ev) == Kind::Reclaimed && ev.task_id == t.task_id
    })
    .await;
    queue.active.as_mut().unwrap().status = "waking".into();
    let (reply, mut sc) = recover(&hub, &home, "cc-e", queue).await;
    reassigned(&reply, &t.task_id);
    // Then it gets the task again, as a new assignment.
    let assign = sc
        .pump_until("task_assign", |v| v["type"] == "task_assign")
        .await;
    assert_eq!(assign["generation"], 2);
}

/// Without any report from it, the wait for a returning sidecar ends after
/// `reconnect_settle`; a generation-less `task_recovering` that arrives
/// after the task was assigned to it again is about its old run: `task_reassign`.
#[tokio::test]
async fn agentcom_generationless_recovery_of_a_newer_generation_is_reassigned() {
    let hub = TestHub::start_with(|c| {
        c.reconnect_grace = Duration::from_millis(100);
        c.reconnect_settle = Duration::from_millis(200);
    })
    .await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let mut sc = hub.sidecar("ac-5").await;
    let t = client.push(pinned("ac-5", "x")).await;
    let (id, g) = sc.next_assign().await;
    sc.send(json!({"type": "task_accepted", "task_id": id}))
        .await;
    sc.recv_type("task_ack").await;
    drop(sc);
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;
    // Back, silent: after the settle window the task is assigned again.
    let mut sc = hub.sidecar("ac-5").await;
    let (id2, g2) = sc.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), g + 1));
    sc.send(json!({"type": "task_recovering", "task_id": id, "last_status": "working"}))
        .await;
    let reply = sc.recv().await;
    assert_eq!(reply["type"], "task_reassign", "{reply}");
    // The new assignment stands.
    let now = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&now), pb::task::State::Assigned);
    assert_eq!(now.generation, 2);
    sc.accept(&id, 2).await;
    sc.complete(&id, 2, json!("once")).await;
}

/// A `busy` rejection costs no attempt, and the task is not offered to that
/// agent again until it has room (here: it drops a task it was running).
#[tokio::test]
async fn agentcom_busy_rejection_costs_no_attempt_and_waits_for_a_free_slot() {
    let hub = TestHub::start_with(|c| c.busy_backoff = Duration::from_secs(3600)).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("ac-6").await;
    let mut req = pinned("ac-6", "x");
    req.max_attempts = 1;
    let t = client.push(req).await;
    let (id, g) = sc.next_assign().await;
    sc.send(json!({"type": "task_rejected", "task_id": id, "reason": "busy"}))
        .await;
    assert_eq!(sc.recv_type("task_ack").await["status"], "rejected");
    let queued = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&queued), pb::task::State::Queued, "{queued:?}");
    assert_eq!(queued.attempts, 0);
    // It drops what kept it busy (a task the hub had taken from it): now it
    // has room, and the task comes back — after the abort, not before.
    sc.send(json!({"type": "state_report", "task_id": "task-0000000000000000", "status": "working", "generation": 1}))
        .await;
    let ack = sc.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["action"].as_str()),
        (Some("state_report_ack"), Some("abort")),
        "{ack}"
    );
    let (id2, g2) = sc.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), g + 1));
    sc.accept(&id, g2).await;
    sc.complete(&id, g2, json!(1)).await;
    let done = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed);
    assert_eq!(done.attempts, 1);
}

#[tokio::test]
async fn agentcom_busy_backoff_ends_by_itself() {
    let hub = TestHub::start_with(|c| c.busy_backoff = Duration::from_millis(200)).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("ac-7").await;
    client.push(pinned("ac-7", "x")).await;
    let (id, _) = sc.next_assign().await;
    sc.send(json!({"type": "task_rejected", "task_id": id, "reason": "busy"}))
        .await;
    let (id2, g2) = sc.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), 2));
}

#[tokio::test]
async fn agentcom_state_report_continues_only_the_current_assignment() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("ac-8").await;
    let mut other = hub.sidecar("ac-9").await;
    let t = client.push(pinned("ac-8", "x")).await;
    let (id, g) = sc.next_assign().await;
    let report = |gen: u64| json!({"type": "state_report", "task_id": id, "status": "working", "generation": gen, "assigned_at": 1});
    // Not accepted yet: the report counts as the accept.
    sc.send(report(g)).await;
    assert_eq!(sc.recv_type("state_report_ack").await["action"], "continue");
    assert_eq!(
        state_of(&task(&hub, &t.task_id).await),
        pb::task::State::Running
    );
    // A repeated task_assign of the task it runs gets "busy": nothing changes.
    sc.send(json!({"type": "task_rejected", "task_id": id, "reason": "busy"}))
        .await;
    assert_eq!(sc.recv_type("task_ack").await["status"], "accepted");
    let running = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&running), pb::task::State::Running);
    assert_eq!((running.generation, running.attempts), (g, 1));
    // Another generation (0: it knows none) is not the current assignment.
    for gen in [g + 1, 0] {
        sc.send(report(gen)).await;
        assert_eq!(sc.recv_type("state_report_ack").await["action"], "abort");
    }
    other.send(report(g)).await;
    assert_eq!(other.recv_type("state_report_ack").await["action"], "abort");
    // Nothing changed by the aborts.
    sc.complete(&id, g, json!(1)).await;
}

#[tokio::test]
async fn agentcom_admin_restarts_a_sidecar() {
    let hub = TestHub::start().await;
    let mut admin = hub.client().await;
    let mut sc = AgentCom::start(&hub, "ac-10").await;
    admin
        .restart_agent(pb::RestartAgentRequest {
            agent_id: "ac-10".into(),
            reason: "upgrade".into(),
        })
        .await
        .unwrap();
    let msg = sc
        .pump_until("restart_sidecar", |v| v["type"] == "restart_sidecar")
        .await;
    assert_eq!(msg["reason"], "upgrade");
    // It announced the restart: no new task until it identifies again.
    let agent = eventually(|| {
        let mut c = admin.clone();
        async move {
            let agents = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .ok()?
                .into_inner()
                .agents;
            agents.into_iter().find(|a| a.status == "restarting")
        }
    })
    .await;
    assert_eq!(agent.agent_id, "ac-10");
    no_errors(&sc);

    let missing = admin
        .restart_agent(pb::RestartAgentRequest {
            agent_id: "nobody".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let orchestrator = hub.token(agenthub::auth::Role::Orchestrator, None);
    let denied = hub
        .client_with(&orchestrator)
        .await
        .restart_agent(pb::RestartAgentRequest {
            agent_id: "ac-10".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}

/// A sidecar that names the generation in `task_recovering` (as the
/// reference sidecar does) gets back a task it lost while away if nobody
/// got it since, under a new generation: `task_continue` tells it, and a
/// report of the old generation no longer lands.
#[tokio::test]
async fn recovering_with_generation_after_the_grace_gets_the_task_back() {
    let hub = TestHub::start_with(|c| c.reconnect_grace = Duration::from_millis(100)).await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let mut sc = hub.sidecar("rg-1").await;
    let t = client.push(scheduled("x", &[], pb::Priority::Normal)).await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    drop(sc);
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;
    let mut sc = hub.sidecar("rg-1").await;
    sc.send(json!({"type": "task_recovering", "task_id": id, "generation": g, "last_status": "running"}))
        .await;
    let reply = sc.recv().await;
    assert_eq!(
        (reply["type"].as_str(), reply["generation"].as_u64()),
        (Some("task_continue"), Some(g + 1)),
        "{reply}"
    );
    sc.send(json!({"type": "task_complete", "task_id": id, "generation": g, "result": "old"}))
        .await;
    assert_eq!(sc.recv_type("error").await["error"], "stale_generation");
    sc.complete(&id, g + 1, json!("one run")).await;
    let done = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed);
    assert_eq!(
        (done.generation, done.attempts, done.agent_id.as_str()),
        (g + 1, 1, "rg-1")
    );
    let continued = until_event(&mut watch, "continued", |ev| kind(ev) == Kind::Continued).await;
    assert_eq!(continued.generation, g + 1);
    assert_eq!(
        Value::Object(pb::struct_to_json(continued.payload.as_ref().unwrap())),
        json!({"reason": "still_running", "previous_generation": g})
    );
    let mut all = client.watch_after(0).await;
    assert_eq!(
        history(&mut all, &t.task_id, Kind::Completed).await,
        [
            (Kind::Created, 0),
            (Kind::Assigned, 1),
            (Kind::Accepted, 1),
            (Kind::Reclaimed, 1),
            (Kind::Recovering, 1),
            (Kind::Continued, 2),
            (Kind::Completed, 2),
        ],
        "assigned once: the run was given back, not run again"
    );
}

/// After a hub restart the hub still waits for a returning sidecar's report
/// on a pinned task it lost while away, instead of assigning it again at once.
#[tokio::test]
async fn pinned_task_lost_before_a_hub_restart_is_still_settled_first() {
    let tmp = tempfile::tempdir().unwrap();
    let tweak = |c: &mut agenthub::Config| {
        c.reconnect_grace = Duration::from_millis(100);
        c.reconnect_settle = Duration::from_secs(3600);
    };
    let hub = TestHub::start_in(tmp.path(), tweak).await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let mut sc = hub.sidecar("rs-1").await;
    let t = client.push(pinned("rs-1", "x")).await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    drop(sc);
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;
    drop((watch, client));
    hub.stop().await;

    let hub = TestHub::start_in(tmp.path(), tweak).await;
    let mut sc = hub.sidecar("rs-1").await;
    sc.send(json!({"type": "state_report", "task_id": id, "status": "working", "generation": g}))
        .await;
    let first = sc.recv().await;
    assert_eq!(
        (first["type"].as_str(), first["action"].as_str()),
        (Some("state_report_ack"), Some("continue")),
        "{first}"
    );
    let cont = sc.recv().await;
    assert_eq!(
        (cont["type"].as_str(), cont["generation"].as_u64()),
        (Some("task_continue"), Some(g + 1)),
        "{cont}"
    );
    sc.complete(&id, g + 1, json!(1)).await;
    let done = task(&hub, &t.task_id).await;
    assert_eq!(
        (state_of(&done), done.generation),
        (pb::task::State::Completed, g + 1)
    );
}

/// Tasks lost by a sidecar are held back for it once: if it leaves again
/// before reporting on them, they go to others at once.
#[tokio::test]
async fn lost_tasks_are_held_back_for_a_returning_sidecar_only_while_it_stays() {
    let hub = TestHub::start_with(|c| {
        c.reconnect_grace = Duration::from_millis(100);
        c.reconnect_settle = Duration::from_secs(3600);
    })
    .await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let mut a = hub.sidecar("hb-a").await;
    let t = client.push(scheduled("x", &[], pb::Priority::Normal)).await;
    let (id, g) = a.next_assign().await;
    a.accept(&id, g).await;
    drop(a);
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;
    // Back, silent: the task waits for its report, even with another agent free.
    let a = hub.sidecar("hb-a").await;
    let mut b = hub.sidecar("hb-b").await;
    hub.hub.flush().await.unwrap();
    let waiting = task(&hub, &t.task_id).await;
    assert_eq!(state_of(&waiting), pb::task::State::Queued);
    // Gone again without a word: the other agent gets it.
    drop(a);
    let (id2, g2) = b.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), g + 1));
}

/// A run that ended while its sidecar was away past the grace (the task
/// waits in the queue, given to nobody since): the final report the sidecar
/// sends on reconnect is taken under a new generation and completes the
/// task, instead of being refused and the task run a second time.
#[tokio::test]
async fn a_final_report_sent_after_the_grace_completes_the_task_it_ran() {
    let hub = TestHub::start_with(|c| c.reconnect_grace = Duration::from_millis(200)).await;
    let mut client = hub.client().await;
    let mut watch = client.watch_after(0).await;
    let mut sc = hub.sidecar("fin").await;
    let id = client.push(pinned("fin", "ends while away")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    drop(sc);
    until_event(&mut watch, "reclaim", |ev| kind(ev) == Kind::Reclaimed).await;

    let mut sc = hub.sidecar("fin").await;
    sc.send(json!({"type": "task_complete", "task_id": id, "generation": g, "result": "done"}))
        .await;
    let ack = sc.recv_type("task_ack").await;
    assert_eq!(
        (ack["task_id"].as_str(), ack["status"].as_str()),
        (Some(id.as_str()), Some("complete")),
        "{ack}"
    );
    let done = task(&hub, &id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed, "{done:?}");
    assert_eq!((done.generation, done.attempts), (2, 1));
    let mut watch = client.watch_after(0).await;
    assert_eq!(
        history(&mut watch, &id, Kind::Completed).await,
        CONTINUED_RUN
    );
    // A report at the old generation for a task given to someone else is
    // still refused.
    let other = client.push(pinned("fin", "second")).await.task_id;
    let (_, g2) = sc.next_assign().await;
    sc.send(
        json!({"type": "task_complete", "task_id": other, "generation": g2 + 5, "result": "x"}),
    )
    .await;
    let err = sc.recv_type("error").await;
    assert_eq!(err["error"], "stale_generation", "{err}");
}
