//! Test harness: a real hub on 127.0.0.1:0 with a temp data dir, a real
//! WebSocket sidecar client, and the project's own gRPC client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agenthub::auth::{issue_token, Role};
use agenthub::client::{connect, HubClient};
use agenthub::pb;
use agenthub::store::file::FileStore;
use agenthub::store::Faults;
use agenthub::{Config, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("agenthub=debug,info"))
            .try_init();
    }
}

/// Test defaults: port 0, short timers where tests rely on them.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::for_data_dir(dir);
    c.ws_addr = "127.0.0.1:0".parse().unwrap();
    c.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.shutdown_grace = Duration::from_secs(2);
    c
}

/// A hub running in this process.
pub struct TestHub {
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub admin_token: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub hub: std::sync::Arc<agenthub::Hub>,
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHub {
        init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let mut hub = Self::start_in(tmp.path(), tweak).await;
        hub._tmp = Some(tmp);
        hub
    }

    /// A hub whose store fails, or slows, commits on demand.
    pub async fn start_with_faults(
        tweak: impl FnOnce(&mut Config),
    ) -> (TestHub, std::sync::Arc<Faults>) {
        init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(Faults::default());
        let mut hub = Self::start_on(tmp.path(), tweak, Some(faults.clone())).await;
        hub._tmp = Some(tmp);
        (hub, faults)
    }

    /// Start on `dir` with a store opened by the caller.
    pub async fn start_on_store(
        dir: &Path,
        tweak: impl FnOnce(&mut Config),
        store: std::sync::Arc<dyn agenthub::store::Store>,
    ) -> TestHub {
        init_logs();
        Self::start_with_store(dir, tweak, store).await
    }

    /// Start on an existing data dir (restart tests).
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestHub {
        Self::start_on(dir, tweak, None).await
    }

    async fn start_on(
        dir: &Path,
        tweak: impl FnOnce(&mut Config),
        faults: Option<std::sync::Arc<Faults>>,
    ) -> TestHub {
        let mut config = test_config(dir);
        tweak(&mut config);
        let store = FileStore::open_with_faults(dir, config.event_retention, faults).unwrap();
        Self::start_with_store(dir, |c| *c = config, std::sync::Arc::new(store)).await
    }

    async fn start_with_store(
        dir: &Path,
        tweak: impl FnOnce(&mut Config),
        store: std::sync::Arc<dyn agenthub::store::Store>,
    ) -> TestHub {
        let mut config = test_config(dir);
        tweak(&mut config);
        let server = Server::build_on(config, store).await.expect("hub starts");
        let admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ws_addr, grpc_addr) = (server.ws_addr(), server.grpc_addr());
        let hub = server.hub().clone();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestHub {
            ws_addr,
            grpc_addr,
            admin_token,
            dir: dir.to_path_buf(),
            _tmp: None,
            stop: Some(stop),
            task: Some(task),
            hub,
        }
    }

    /// Graceful shutdown; returns the temp dir so the data survives.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
        self._tmp.take()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.ws_addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.ws_addr, path)
    }

    /// Issue a token directly in the store.
    pub fn token(&self, role: Role, agent: Option<&str>) -> String {
        let store = agenthub::store::sqlite::SqliteStore::open(&self.dir, None, false).unwrap();
        issue_token(&store, role, agent.map(str::to_string))
            .unwrap()
            .0
    }

    pub fn agent_token(&self, agent: &str) -> String {
        self.token(Role::Agent, Some(agent))
    }

    /// gRPC client with the admin token.
    pub async fn client(&self) -> HubClient {
        connect(&self.grpc_addr.to_string(), &self.admin_token)
            .await
            .unwrap()
    }

    pub async fn client_with(&self, token: &str) -> HubClient {
        connect(&self.grpc_addr.to_string(), token).await.unwrap()
    }

    /// A sidecar connected and identified as `agent`.
    pub async fn sidecar(&self, agent: &str) -> Sidecar {
        self.sidecar_with(agent, json!({})).await
    }

    /// Identify with extra fields (capabilities, max_concurrency...).
    pub async fn sidecar_with(&self, agent: &str, extra: Value) -> Sidecar {
        let token = self.agent_token(agent);
        let mut s = Sidecar::send_identify(&self.ws_url(), agent, &token, extra).await;
        let reply = s.recv().await;
        assert_eq!(reply["type"], "identified", "{reply}");
        s
    }
}

/// A real WebSocket client speaking the sidecar protocol.
pub struct Sidecar {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub agent_id: String,
    pub token: String,
}

impl Sidecar {
    /// Connect to `url` and send an identify as `agent` with `token` (and
    /// `extra` fields); the answer is the caller's to read.
    pub async fn send_identify(url: &str, agent: &str, token: &str, extra: Value) -> Sidecar {
        let mut s = Sidecar::connect(url).await;
        let mut msg =
            json!({"type": "identify", "agent_id": agent, "token": token, "protocol_version": 1});
        if let Value::Object(extra) = extra {
            msg.as_object_mut().unwrap().extend(extra);
        }
        s.send(msg).await;
        s.agent_id = agent.to_string();
        s.token = token.to_string();
        s
    }

    pub async fn connect(url: &str) -> Sidecar {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Sidecar {
            ws,
            agent_id: String::new(),
            token: String::new(),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Message::Text(t.to_string().into()))
            .await
            .unwrap();
    }

    /// Next JSON text frame (skips pings), or panic after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        match self.try_recv(WAIT).await {
            Some(v) => v,
            None => panic!("sidecar {}: no message within {WAIT:?}", self.agent_id),
        }
    }

    /// Next JSON text frame within `d`, or None (also on close).
    pub async fn try_recv(&mut self, d: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg.ok()? {
                Message::Text(t) => return Some(serde_json::from_str(&t).unwrap()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Next message of this `type`, skipping others.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Wait for the close frame; returns its code.
    pub async fn recv_close(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("no close within {WAIT:?}"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// `task_accepted` and wait for its ack.
    pub async fn accept(&mut self, task_id: &str, generation: u64) {
        self.send(json!({"type": "task_accepted", "task_id": task_id, "generation": generation}))
            .await;
        let ack = self.recv_type("task_ack").await;
        assert_eq!(ack["status"], "accepted", "{ack}");
        assert_eq!(ack["task_id"], task_id);
    }

    /// `task_complete` and wait for its ack.
    pub async fn complete(&mut self, task_id: &str, generation: u64, result: Value) {
        self.send(json!({"type": "task_complete", "task_id": task_id, "generation": generation, "result": result}))
            .await;
        let ack = self.recv_type("task_ack").await;
        assert_eq!(ack["status"], "complete", "{ack}");
        assert_eq!(ack["task_id"], task_id);
    }

    /// Receive the next `task_assign`: (task_id, generation).
    pub async fn next_assign(&mut self) -> (String, u64) {
        let a = self.recv_type("task_assign").await;
        (
            a["task_id"].as_str().unwrap().to_string(),
            a["generation"].as_u64().unwrap(),
        )
    }
}

/// Client calls that must succeed, without the `.await.unwrap().into_inner()` chains.
pub trait ClientExt {
    async fn push(&mut self, req: pb::PushTaskRequest) -> pb::PushTaskResponse;
    /// `WatchTaskEvents` with every stored event after `after_seq`, then live ones.
    async fn watch_after(&mut self, after_seq: u64) -> tonic::Streaming<pb::TaskEvent>;
    /// `GetTask`, which must succeed.
    async fn task(&mut self, task_id: &str) -> pb::Task;
}

impl ClientExt for HubClient {
    async fn push(&mut self, req: pb::PushTaskRequest) -> pb::PushTaskResponse {
        self.push_task(req).await.unwrap().into_inner()
    }

    async fn task(&mut self, task_id: &str) -> pb::Task {
        let req = pb::GetTaskRequest {
            task_id: task_id.to_string(),
        };
        self.get_task(req).await.unwrap().into_inner()
    }

    async fn watch_after(&mut self, after_seq: u64) -> tonic::Streaming<pb::TaskEvent> {
        let req = pb::WatchTaskEventsRequest {
            after_seq: Some(after_seq),
            ..Default::default()
        };
        self.watch_task_events(req).await.unwrap().into_inner()
    }
}

/// A PushTask request pinned to `agent`.
pub fn pinned(agent: &str, description: &str) -> pb::PushTaskRequest {
    pb::PushTaskRequest {
        agent_id: agent.into(),
        description: description.into(),
        ..Default::default()
    }
}

/// A scheduled PushTask request.
pub fn scheduled(description: &str, caps: &[&str], priority: pb::Priority) -> pb::PushTaskRequest {
    pb::PushTaskRequest {
        description: description.into(),
        needed_capabilities: caps.iter().map(|s| s.to_string()).collect(),
        priority: priority as i32,
        ..Default::default()
    }
}

/// Read `n` events from a watch stream (panic after [`WAIT`]).
pub async fn take_events(
    stream: &mut tonic::Streaming<pb::TaskEvent>,
    n: usize,
) -> Vec<pb::TaskEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("event within WAIT")
            .expect("stream ok")
            .expect("stream open");
        out.push(ev);
    }
    out
}

pub fn kind(ev: &pb::TaskEvent) -> pb::task_event::Kind {
    pb::task_event::Kind::try_from(ev.kind).unwrap()
}

pub fn state_of(t: &pb::Task) -> pb::task::State {
    pb::task::State::try_from(t.state).unwrap()
}

/// Poll `f` until it returns Some, for up to [`WAIT`].
pub async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("condition not met within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `ListAgents` shows a disconnected agent; return it.
pub async fn disconnected_agent(client: &HubClient) -> pb::Agent {
    eventually(|| {
        let mut c = client.clone();
        async move {
            let agents = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .ok()?
                .into_inner()
                .agents;
            agents.into_iter().find(|a| !a.connected)
        }
    })
    .await
}

/// The hub binary running as its own OS process (for SIGKILL tests).
pub struct HubProcess {
    pub child: tokio::process::Child,
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
}

impl HubProcess {
    /// Start `agenthub serve` on `dir` with port 0 and extra args.
    pub async fn spawn(dir: &Path, extra: &[&str]) -> HubProcess {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::spawn_at(dir, any, any, extra).await
    }

    /// Start `agenthub serve` on `dir` at the given addresses (port 0: any;
    /// fixed ports: a restart where clients find it again).
    pub async fn spawn_at(
        dir: &Path,
        ws_addr: SocketAddr,
        grpc_addr: SocketAddr,
        extra: &[&str],
    ) -> HubProcess {
        Self::spawn_logged(dir, ws_addr, grpc_addr, extra, None).await
    }

    /// [`HubProcess::spawn_at`] with the process's log (at `info`, unless
    /// `AGENTHUB_TEST_HUB_LOG` says otherwise) appended to `log` instead of
    /// the test's stderr: a failing test can show its own nodes' logs.
    pub async fn spawn_logged(
        dir: &Path,
        ws_addr: SocketAddr,
        grpc_addr: SocketAddr,
        extra: &[&str],
        log: Option<&Path>,
    ) -> HubProcess {
        use tokio::io::AsyncBufReadExt;
        let (stderr, level) = match log {
            Some(path) => (
                Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .unwrap(),
                ),
                "info",
            ),
            None => (Stdio::inherit(), "warn"),
        };
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .arg("serve")
            .arg("--ws-addr")
            .arg(ws_addr.to_string())
            .arg("--grpc-addr")
            .arg(grpc_addr.to_string())
            .arg("--print-addrs")
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            // AGENTHUB_TEST_HUB_LOG=info (or a filter) to see a hub process's log.
            .env(
                "RUST_LOG",
                std::env::var("AGENTHUB_TEST_HUB_LOG").unwrap_or_else(|_| level.into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // A hub that exits before it prints its addresses: say why (its log).
        let exited = |what: &str| {
            let why = log
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_else(|| "(its log is on stderr)".into());
            panic!("{what}; the hub's log:\n{why}")
        };
        loop {
            let line = match tokio::time::timeout(WAIT, lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(_) => exited("the hub exited before it printed its addresses"),
                Err(_) => exited("the hub did not print its addresses"),
            };
            if let Some(rest) = line.strip_prefix("ws=") {
                let (ws, grpc) = rest.split_once(" grpc=").unwrap();
                return HubProcess {
                    child,
                    ws_addr: ws.parse().unwrap(),
                    grpc_addr: grpc.parse().unwrap(),
                };
            }
        }
    }

    pub fn kill9(&mut self) {
        let pid = self.child.id().expect("running") as i32;
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }

    pub async fn wait_exit(&mut self) {
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

pub fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
