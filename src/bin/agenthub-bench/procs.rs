//! Servers under test, each started as its own process on loopback: the hub
//! (`agenthub serve`), `nats-server` (JetStream, `sync_interval: always`),
//! a 3-node `nats-server` cluster for the cluster groups, and the raw
//! WebSocket echo server (`agenthub-bench echo-server`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use agenthub::auth::{issue_token, new_token, Role};
use agenthub::store::sqlite::SqliteStore;

/// How long a server may take to print its address or accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server process. Stopped (SIGTERM, then SIGKILL) by [`Server::stop`]
/// or killed on drop.
pub struct Server {
    child: Child,
    pub pid: u32,
}

impl Server {
    fn spawn(mut cmd: Command, log: &Path) -> Result<Server> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let child = cmd.spawn().context("spawn server")?;
        let pid = child.id().context("server pid")?;
        Ok(Server { child, pid })
    }

    /// Wait for a stdout line starting with `prefix`; returns the line.
    async fn stdout_line(&mut self, prefix: &str) -> Result<String> {
        let stdout = self.child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with(prefix) {
                    return Ok::<_, anyhow::Error>(line);
                }
            }
            bail!("server exited before printing `{prefix}`")
        })
        .await
        .context("server start timed out")??;
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(found)
    }

    /// SIGKILL, and reap the process.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, wait, then SIGKILL.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A hub process and what clients need to reach it.
pub struct Hub {
    pub server: Server,
    pub ws_addr: String,
    pub grpc_addr: String,
    /// Admin token (orchestrator rights and more).
    pub admin: String,
}

/// Tokens issued into a data directory before its hub starts.
pub struct Tokens {
    pub admin: String,
    /// `(agent_id, token)`.
    pub agents: Vec<(String, String)>,
}

/// Issue an admin token and one agent token per id into `data_dir` (no hub
/// running), the records `agenthub token issue` makes, with every agent
/// token in one SQLite transaction (100,000 tokens in seconds, not one
/// synced commit each).
pub fn issue_tokens(data_dir: &Path, agent_ids: &[String]) -> Result<Tokens> {
    let admin = {
        // Creates the database and its schema; closed before the bulk insert.
        let store = SqliteStore::open(data_dir, None, false)?;
        issue_token(&store, Role::Admin, None)?.0
    };
    let mut conn = rusqlite::Connection::open(data_dir.join("agenthub.db"))?;
    conn.busy_timeout(START_TIMEOUT)?;
    let tx = conn.transaction()?;
    let mut agents = Vec::with_capacity(agent_ids.len());
    {
        let mut insert = tx.prepare(
            "INSERT INTO tokens (id, hash, role, agent_id, created_at_ms, revoked) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for id in agent_ids {
            let (secret, t) = new_token(Role::Agent, Some(id.clone()))?;
            insert
                .execute(rusqlite::params![
                    t.id,
                    t.hash,
                    t.role.as_str(),
                    t.agent_id,
                    t.created_at_ms,
                    t.revoked as i64
                ])
                .with_context(|| format!("insert the token of {id}"))?;
            agents.push((id.clone(), secret));
        }
    }
    tx.commit()?;
    Ok(Tokens { admin, agents })
}

impl Hub {
    /// `agenthub serve` on `127.0.0.1:0` with `RUST_LOG=warn` on `data_dir`.
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        admin: &str,
        log: &Path,
        extra: &[&str],
    ) -> Result<Hub> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args([
                "--ws-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--print-addrs",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn");
        let mut server = Server::spawn(cmd, log)?;
        let line = server.stdout_line("ws=").await?;
        let mut ws_addr = None;
        let mut grpc_addr = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("ws=") {
                ws_addr = Some(a.to_string());
            } else if let Some(a) = part.strip_prefix("grpc=") {
                grpc_addr = Some(a.to_string());
            }
        }
        Ok(Hub {
            server,
            ws_addr: ws_addr.context("no ws= address")?,
            grpc_addr: grpc_addr.context("no grpc= address")?,
            admin: admin.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.server.pid
    }

    pub async fn stop(self) {
        self.server.stop().await
    }

    /// SIGKILL (no chance to hand anything over).
    pub async fn kill(self) {
        self.server.kill().await
    }
}

/// A `nats-server` process with JetStream.
pub struct Nats {
    pub server: Server,
    pub url: String,
}

impl Nats {
    /// Start with JetStream storing in `store_dir`; `sync_always` sets
    /// `sync_interval: always` (every write fsynced before it is acked).
    pub async fn start(
        bin: &Path,
        store_dir: &Path,
        sync_always: bool,
        log: &Path,
    ) -> Result<Nats> {
        std::fs::create_dir_all(store_dir)?;
        let port = free_port()?;
        let conf: PathBuf = store_dir.with_extension("conf");
        let sync = if sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 1MB\njetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 1GB\n  max_file_store: 20GB{sync}\n}}\n",
                store_dir.display()
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let server = Server::spawn(cmd, log)?;
        let addr = format!("127.0.0.1:{port}");
        wait_for_port(&addr).await?;
        Ok(Nats {
            server,
            url: format!("nats://{addr}"),
        })
    }

    pub fn pid(&self) -> u32 {
        self.server.pid
    }

    pub async fn stop(self) {
        self.server.stop().await
    }
}

/// Nodes in a [`NatsCluster`].
pub const CLUSTER_NODES: usize = 3;
/// Between two readiness polls of a cluster node.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long one monitoring (or `/health`) request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// Three `nats-server` processes (`n1`..`n3`) routed to each other on
/// loopback as one JetStream cluster, each storing in its own directory with
/// `sync_interval: always`. Stopped by [`NatsCluster::stop`], killed on drop.
pub struct NatsCluster {
    pub nodes: Vec<Nats>,
}

impl NatsCluster {
    /// Start the three nodes under `dir` (`n1/`, `n2/`, `n3/`, each with its
    /// `nats.conf`) and wait until every one reports JetStream healthy
    /// (`/healthz`) and names a meta leader (`/jsz`). Logs: `log(i)`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        log: impl Fn(usize) -> PathBuf,
    ) -> Result<NatsCluster> {
        let ports = free_ports(CLUSTER_NODES * 3)?;
        let (client, rest) = ports.split_at(CLUSTER_NODES);
        let (route, http) = rest.split_at(CLUSTER_NODES);
        let routes: String = route
            .iter()
            .map(|p| format!("    nats-route://127.0.0.1:{p}\n"))
            .collect();
        let mut nodes = Vec::with_capacity(CLUSTER_NODES);
        for i in 0..CLUSTER_NODES {
            let node_dir = dir.join(format!("n{}", i + 1));
            let store = node_dir.join("jetstream");
            std::fs::create_dir_all(&store)?;
            let conf = node_dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{n}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\nmax_payload: 1MB\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 1GB\n  max_file_store: 20GB\n  sync_interval: always\n}}\n\
                     cluster {{\n  name: agenthub-bench\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}  ]\n}}\n",
                    n = i + 1,
                    client = client[i],
                    http = http[i],
                    route = route[i],
                    store = store.display(),
                ),
            )?;
            let mut cmd = Command::new(bin);
            cmd.arg("-c").arg(&conf);
            nodes.push(Nats {
                server: Server::spawn(cmd, &log(i))?,
                url: format!("nats://127.0.0.1:{}", client[i]),
            });
        }
        let cluster = NatsCluster { nodes };
        for &port in http {
            wait_nats_ready(port).await?;
        }
        Ok(cluster)
    }

    /// Every node's URL, comma-separated (for `--nats`).
    pub fn url_list(&self) -> String {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        urls.join(",")
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Nats::pid).collect()
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
    }
}

/// Poll a cluster node's monitoring port until `/healthz` answers 200 and
/// `/jsz` names a meta leader.
async fn wait_nats_ready(http_port: u16) -> Result<()> {
    let addr = format!("127.0.0.1:{http_port}");
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let why = match nats_ready(&addr).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() > deadline {
            return Err(why.context(format!("nats node on {addr} not ready")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn nats_ready(addr: &str) -> Result<()> {
    let (status, body) = http_get(addr, "/healthz").await?;
    if status != 200 {
        bail!("/healthz {status}: {body}");
    }
    let (_, body) = http_get(addr, "/jsz").await?;
    let jsz: serde_json::Value = serde_json::from_str(&body).context("/jsz")?;
    match jsz["meta_cluster"]["leader"].as_str() {
        Some(leader) if !leader.is_empty() => Ok(()),
        _ => bail!("/jsz: no meta leader yet"),
    }
}

/// `GET path` on `addr` (HTTP/1.0: the body ends with the connection);
/// returns the status and the body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))?
        .with_context(|| format!("GET {addr}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {addr}{path}: bad status line"))?;
    Ok((status, body.to_string()))
}

/// The raw tokio-tungstenite echo server, as its own process.
pub struct Echo {
    pub server: Server,
    pub addr: String,
}

impl Echo {
    /// This binary's `subcommand` server (`echo-server`, `grpc-echo-server`).
    pub async fn start_with(log: &Path, subcommand: &str) -> Result<Echo> {
        let exe = std::env::current_exe().context("current exe")?;
        let mut cmd = Command::new(exe);
        cmd.arg(subcommand);
        let mut server = Server::spawn(cmd, log)?;
        let line = server.stdout_line("addr=").await?;
        let addr = line.trim_start_matches("addr=").trim().to_string();
        Ok(Echo { server, addr })
    }

    pub fn pid(&self) -> u32 {
        self.server.pid
    }

    pub async fn stop(self) {
        self.server.stop().await
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `count` distinct free ports (all held until all are picked).
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

async fn wait_for_port(addr: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listening on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
