//! Real processes for the smoke tests: the `agenthub serve` binary and
//! `agenthub sidecar` processes, each task a small shell script passed as the
//! task's description (the sidecars run `sh -c 'eval "$AGENTHUB_TASK_DESCRIPTION"'`).

use crate::helpers::ClientExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agenthub::client::{connect, HubClient};
use agenthub::pb;
use agenthub::pb::task_event::Kind;
use serde_json::Value;

use crate::helpers::HubProcess;

/// How long a smoke test waits for something that should happen.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Append "<task id> <generation>" to `$OUT/<task id>`.
pub const WRITE_ID: &str =
    r#"echo "$AGENTHUB_TASK_ID $AGENTHUB_TASK_GENERATION" >> "$OUT/$AGENTHUB_TASK_ID""#;

/// A hub process, its data dir, and a directory tasks write into.
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub out: PathBuf,
    pub hub: HubProcess,
    pub admin: String,
    hub_args: Vec<String>,
}

impl Cluster {
    pub async fn start(hub_args: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let hub = HubProcess::spawn(&data, hub_args).await;
        let admin = crate::helpers::admin_token(&data);
        Cluster {
            data,
            out,
            hub,
            admin,
            hub_args: hub_args.iter().map(|s| s.to_string()).collect(),
            tmp,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.hub.ws_addr)
    }

    pub async fn client(&self) -> HubClient {
        connect(&self.hub.grpc_addr.to_string(), &self.admin)
            .await
            .unwrap()
    }

    /// `agenthub token issue --agent ID --data-dir DIR`, as an operator would.
    pub fn agent_token(&self, agent: &str) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["token", "issue", "--agent", agent, "--data-dir"])
            .arg(&self.data)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "token issue: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Start `agenthub sidecar` for `agent` (state file in the temp dir).
    pub fn sidecar(&self, agent: &str, args: &[&str], env: &[(&str, &str)]) -> SidecarProc {
        self.sidecar_at(&self.ws_url(), agent, args, env)
    }

    /// Start `agenthub sidecar` for `agent` with `--hub HUB` (one URL or several).
    pub fn sidecar_at(
        &self,
        hub: &str,
        agent: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> SidecarProc {
        let token = self.agent_token(agent);
        let state_file = self.tmp.path().join(format!("{agent}.state.json"));
        let log = self.tmp.path().join(format!("{agent}.log"));
        let mut sc = SidecarProc {
            agent: agent.to_string(),
            token,
            state_file,
            log,
            url: hub.to_string(),
            out: self.out.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        sc.spawn();
        sc
    }

    /// Wait until the hub lists these agents as connected.
    pub async fn wait_connected(&self, agents: &[&str]) {
        let mut client = self.client().await;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let listed = client
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map(|r| r.into_inner().agents)
                .unwrap_or_default();
            let connected = agents
                .iter()
                .all(|a| listed.iter().any(|l| l.agent_id == *a && l.connected));
            if connected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agents {agents:?} not connected in time: {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Push a scheduled task whose description is `script`.
    pub async fn push(
        &self,
        client: &mut HubClient,
        script: &str,
        priority: pb::Priority,
    ) -> String {
        client
            .push_task(pb::PushTaskRequest {
                description: script.to_string(),
                priority: priority as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_id
    }

    /// `kill -9` the hub and start it again on the same data dir and ports.
    pub async fn kill_and_restart_hub(&mut self) {
        self.kill_hub().await;
        self.restart_hub_at(self.hub.ws_addr).await;
    }

    /// `kill -9` the hub and wait until it is gone.
    pub async fn kill_hub(&mut self) {
        self.hub.kill9();
        self.hub.wait_exit().await;
    }

    /// Start the (killed) hub again on the same data dir and gRPC port, with
    /// its WebSocket listener at `ws_addr`.
    pub async fn restart_hub_at(&mut self, ws_addr: SocketAddr) {
        let args: Vec<&str> = self.hub_args.iter().map(String::as_str).collect();
        let grpc = self.hub.grpc_addr;
        self.hub = HubProcess::spawn_at(&self.data, ws_addr, grpc, &args).await;
    }

    /// Lines a task's script appended to `$OUT/<task id>`.
    pub fn output_lines(&self, task_id: &str) -> Vec<String> {
        std::fs::read_to_string(self.out.join(task_id))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Every stored event, replayed from seq 0.
    pub async fn history(&self) -> Vec<pb::TaskEvent> {
        let mut client = self.client().await;
        let as_of = client
            .list_tasks(pb::ListTasksRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .as_of_seq;
        let mut stream = client.watch_after(0).await;
        let mut out = Vec::new();
        while out.last().is_none_or(|e: &pb::TaskEvent| e.seq < as_of) {
            let ev = tokio::time::timeout(DEADLINE, stream.message())
                .await
                .expect("history replay in time")
                .unwrap()
                .expect("stream open");
            out.push(ev);
        }
        out
    }
}

/// One `agenthub sidecar` process; its log goes to `<tmp>/<agent>.log`.
pub struct SidecarProc {
    pub agent: String,
    pub token: String,
    pub state_file: PathBuf,
    pub log: PathBuf,
    url: String,
    out: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub child: Option<tokio::process::Child>,
}

impl SidecarProc {
    /// (Re)start the process with the same agent, state file and flags.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .arg("sidecar")
            .args(["--hub", &self.url, "--agent", &self.agent, "--state-file"])
            .arg(&self.state_file)
            .args(["--heartbeat", "2s", "--kill-grace", "500ms"])
            .args(&self.args)
            .args(["--", "sh", "-c", r#"eval "$AGENTHUB_TASK_DESCRIPTION""#])
            .env("AGENTHUB_TOKEN", &self.token)
            .env("OUT", &self.out)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    pub async fn kill9(&mut self) {
        signal(self.pid(), "KILL");
        let mut child = self.child.take().unwrap();
        let _ = tokio::time::timeout(DEADLINE, child.wait()).await;
    }

    pub fn sigterm(&self) {
        signal(self.pid(), "TERM");
    }

    /// Wait for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = tokio::time::timeout(within, child.wait())
            .await
            .unwrap_or_else(|_| panic!("sidecar {} did not exit within {within:?}", self.agent))
            .unwrap();
        self.child = None;
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The state file's content.
    pub fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.state_file).unwrap()).unwrap()
    }

    /// The pid the state file records for `task` (written right after the
    /// command starts, which is just after `task_accepted` is sent).
    pub async fn recorded_pid(&self, task: &str) -> u64 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(pid) = self.state()["tasks"][task]["pid"].as_u64() {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no pid for {task} in {}",
                self.state()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- sidecar {} log (last lines) ----", self.agent);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A loopback address nothing listens on (bound once, then released).
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `kill -SIG PID` (use `-PGID` for a process group).
pub fn signal(pid: impl std::fmt::Display, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), "--", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Is this process alive (and not a zombie)?
pub fn pid_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .trim_start()
                .chars()
                .next();
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// Events of a live `WatchTaskEvents(after_seq = 0)`, with the instant each
/// arrived.
pub struct Follow {
    events: Arc<Mutex<Vec<(Instant, pb::TaskEvent)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Follow {
    pub async fn start(cluster: &Cluster) -> Follow {
        let mut client = cluster.client().await;
        let mut stream = client.watch_after(0).await;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                sink.lock().unwrap().push((Instant::now(), ev));
            }
        });
        Follow { events, task }
    }

    pub fn all(&self) -> Vec<pb::TaskEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// When the first event of `kind` for `task` arrived.
    pub fn arrived(&self, task: &str, kind: Kind) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, e)| e.task_id == task && e.kind == kind as i32)
            .map(|(at, _)| *at)
    }

    /// Wait until `done` holds for the events so far.
    pub async fn until(&self, what: &str, done: impl Fn(&[pb::TaskEvent]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if done(&self.all()) {
                return;
            }
            assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events of `kind` for `task`.
pub fn of<'a>(events: &'a [pb::TaskEvent], task: &str, kind: Kind) -> Vec<&'a pb::TaskEvent> {
    events
        .iter()
        .filter(|e| e.task_id == task && e.kind == kind as i32)
        .collect()
}

/// Number of tasks among `tasks` with at least one event of `kind`.
pub fn count_with(events: &[pb::TaskEvent], tasks: &[String], kind: Kind) -> usize {
    tasks
        .iter()
        .filter(|t| !of(events, t, kind).is_empty())
        .count()
}

/// Each task has exactly one COMPLETED event.
pub fn assert_completed_once(events: &[pb::TaskEvent], tasks: &[String]) {
    for t in tasks {
        let n = of(events, t, Kind::Completed).len();
        assert_eq!(n, 1, "task {t}: {n} COMPLETED events");
    }
}

/// An event's payload as JSON.
pub fn payload(ev: &pb::TaskEvent) -> Value {
    pb::event_to_json(ev)["payload"].clone()
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// p50 and max of some durations.
pub fn p50_max(mut v: Vec<Duration>) -> (u64, u64) {
    v.sort();
    (ms(v[v.len() / 2]), ms(*v.last().unwrap()))
}
