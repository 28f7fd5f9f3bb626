//! A 3-node `nats-server` cluster with JetStream on loopback, for the cluster
//! tests. The binary comes from `AGENTHUB_TEST_NATS_SERVER` (scripts/test.sh
//! installs nats-server >= 2.12 into `.venv` and sets it).
//!
//! Each node (`n1`, `n2`, `n3`) has its own temp dir holding its generated
//! config, its JetStream store (`sync_interval: always`: every write fsynced
//! before it is acknowledged) and `nats.log` (its stdout and stderr). Client,
//! route and monitoring ports are picked free on 127.0.0.1 once and kept for
//! restarts. [`NatsCluster::start`] and [`NatsCluster::restart`] return once
//! the nodes report JetStream healthy (`/healthz`) and see a meta leader
//! (`/jsz`). Dropping the cluster kills every node.

// Support for tests to come: not every helper is used yet.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The environment variable naming the `nats-server` binary.
pub const NATS_SERVER_ENV: &str = "AGENTHUB_TEST_NATS_SERVER";
/// Nodes in the cluster.
const NODES: usize = 3;
/// How long a node may take to report JetStream healthy with a meta leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long one monitoring request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// A node's JetStream store, under its temp dir.
const STORE_DIR: &str = "jetstream";
/// Lines of a node's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 40;

/// Three `nats-server` processes routed to each other as one JetStream
/// cluster. Owns the processes: [`NatsCluster::kill`] and [`Drop`] end them.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
}

/// One node: its files, its ports and its process (`None` while killed).
struct Node {
    name: String,
    dir: tempfile::TempDir,
    client_port: u16,
    http_port: u16,
    child: Option<Child>,
}

impl Node {
    fn conf(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }
}

impl NatsCluster {
    /// Start three nodes and wait until every one reports JetStream healthy
    /// and a meta leader exists. Panics (with the nodes' log tails) if that
    /// does not happen within 30 s, or if `AGENTHUB_TEST_NATS_SERVER` is unset.
    pub async fn start() -> NatsCluster {
        Self::start_with("").await
    }

    /// [`NatsCluster::start`] with `extra` added to every node's config
    /// (TLS, authorization).
    pub async fn start_with(extra: &str) -> NatsCluster {
        // The ports are picked free, then bound by nats-server a moment
        // later: another process can take one in between. Such a node exits
        // at once; start the cluster again on other ports.
        for _ in 0..3 {
            if let Some(cluster) = Self::try_start(extra).await {
                return cluster;
            }
        }
        panic!("a nats node kept exiting while starting (ports taken?)");
    }

    async fn try_start(extra: &str) -> Option<NatsCluster> {
        let bin = nats_server_bin();
        let ports = free_ports(NODES * 3);
        let (client, rest) = ports.split_at(NODES);
        let (route, http) = rest.split_at(NODES);
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let name = format!("n{}", i + 1);
            let dir = tempfile::Builder::new()
                .prefix(&format!("agenthub-nats-{name}-"))
                .tempdir()
                .unwrap();
            let store = dir.path().join(STORE_DIR);
            let routes: String = (0..NODES)
                .filter(|&j| j != i)
                .map(|j| format!("    nats-route://127.0.0.1:{}\n", route[j]))
                .collect();
            let conf = format!(
                "server_name: {name}\n\
                 listen: 127.0.0.1:{client}\n\
                 http: 127.0.0.1:{http}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: agenthub-test\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}  ]\n}}\n{extra}\n",
                client = client[i],
                http = http[i],
                route = route[i],
                store = store.display(),
            );
            let node = Node {
                name,
                dir,
                client_port: client[i],
                http_port: http[i],
                child: None,
            };
            std::fs::write(node.conf(), conf).unwrap();
            nodes.push(node);
        }
        let mut cluster = NatsCluster { bin, nodes };
        for i in 0..NODES {
            cluster.spawn(i);
        }
        for i in 0..NODES {
            if !cluster.wait_ready(i).await {
                return None;
            }
        }
        Some(cluster)
    }

    /// `nats://127.0.0.1:PORT` of every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// [`NatsCluster::urls`] joined with commas (for `--nats`).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// The server name of node `i` (`n1`, `n2`, `n3`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The pid of node `i`; panics if it is not running.
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("nats node {} is not running", self.nodes[i].name))
            .id()
    }

    /// SIGKILL node `i` and reap it. Its store and ports are kept for
    /// [`NatsCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("nats node {} is not running", node.name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start the killed node `i` again with the same config and store, and
    /// wait until it reports JetStream healthy and sees a meta leader.
    pub async fn restart(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "nats node {} is still running",
            self.nodes[i].name
        );
        self.spawn(i);
        assert!(
            self.wait_ready(i).await,
            "nats node {} exited while restarting",
            self.nodes[i].name
        );
    }

    /// Node `i`'s JetStream store directory.
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.path().join(STORE_DIR)
    }

    /// The last lines of node `i`'s log (its stdout and stderr).
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.nodes[i].log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log())
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(node.conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} ({NATS_SERVER_ENV}): {e}", self.bin.display()));
        node.child = Some(child);
    }

    /// Node `i`'s HTTP monitoring port (`/jsz`, `/healthz`).
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].http_port
    }

    /// Poll node `i`'s monitoring port until `/healthz` answers 200 and
    /// `/jsz` names a meta leader.
    /// False if the node exited while starting (its log is printed).
    async fn wait_ready(&mut self, i: usize) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        let port = self.nodes[i].http_port;
        loop {
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(Child::try_wait) {
                eprintln!(
                    "nats node {} exited ({status}) while starting; log:\n{}",
                    self.nodes[i].name,
                    self.log_tail(i)
                );
                return false;
            }
            let why = match ready(port).await {
                Ok(()) => return true,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                let logs: String = (0..NODES)
                    .map(|j| {
                        format!(
                            "---- {} log ----\n{}\n",
                            self.nodes[j].name,
                            self.log_tail(j)
                        )
                    })
                    .collect();
                panic!(
                    "nats node {} not ready within {READY_TIMEOUT:?}: {why}\n{logs}",
                    self.nodes[i].name
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The binary named by `AGENTHUB_TEST_NATS_SERVER`.
fn nats_server_bin() -> PathBuf {
    let Some(bin) = std::env::var_os(NATS_SERVER_ENV).filter(|v| !v.is_empty()) else {
        panic!(
            "{NATS_SERVER_ENV} is not set: the cluster tests need nats-server >= 2.12. \
             Run scripts/test.sh (it installs one into .venv and sets {NATS_SERVER_ENV}), \
             or set {NATS_SERVER_ENV} to the absolute path of a nats-server binary"
        );
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "{NATS_SERVER_ENV}={} is not a file; run scripts/test.sh",
        bin.display()
    );
    bin
}

/// Lowest port [`free_ports`] picks.
const FIRST_PORT: u16 = 10_000;

/// `count` distinct free ports on 127.0.0.1 (all held until all are
/// picked), below the kernel's range of ephemeral ports: a killed node's
/// ports stay free until it restarts on them, and a port in that range can
/// meanwhile become the source port of any outgoing connection on the
/// machine (seen: a restart failing "address already in use").
fn free_ports(count: usize) -> Vec<u16> {
    let below = ephemeral_ports_start();
    let span = u64::from(below - FIRST_PORT);
    let random = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let mut port = FIRST_PORT + (random % span) as u16;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..span {
        if listeners.len() == count {
            break;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
        port = if port + 1 >= below {
            FIRST_PORT
        } else {
            port + 1
        };
    }
    assert_eq!(
        listeners.len(),
        count,
        "no {count} free ports below {below}"
    );
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The first port the kernel hands out as a source port (32768 if unknown).
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|&p| p > FIRST_PORT + 1_000)
        .unwrap_or(32_768)
}

/// Is the node behind this monitoring port JetStream-healthy with a meta
/// leader? `Err` says why not.
async fn ready(port: u16) -> Result<(), String> {
    let (status, body) = http_get(port, "/healthz").await?;
    if status != 200 {
        return Err(format!("/healthz {status}: {body}"));
    }
    let (status, body) = http_get(port, "/jsz").await?;
    let jsz: Value = serde_json::from_str(&body).map_err(|e| format!("/jsz {status}: {e}"))?;
    match jsz["meta_cluster"]["leader"].as_str() {
        Some(leader) if !leader.is_empty() => Ok(()),
        _ => Err(format!("/jsz: no meta leader yet: {}", jsz["meta_cluster"])),
    }
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0: the body ends with the
/// connection); returns the status and the body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line"))?;
    Ok((status, body.to_string()))
}

/// The harness itself: an R3 file stream takes a write, loses a node, takes
/// another, and the node comes back on its store.
#[tokio::test]
async fn a_three_node_nats_cluster_starts_with_jetstream() {
    use async_nats::jetstream::{self, stream};

    let mut cluster = NatsCluster::start().await;
    assert_eq!(cluster.url_list(), cluster.urls().join(","));
    let client = async_nats::connect(cluster.urls().as_slice())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    // JetStream answers its API once the servers have elected a meta
    // leader: on a loaded machine the first request may time out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut stream = loop {
        let created = js
            .create_stream(stream::Config {
                name: "SELFTEST".into(),
                subjects: vec!["selftest.>".into()],
                num_replicas: 3,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await;
        match created {
            Ok(stream) => break stream,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no stream within 30 s: {e}"
            ),
        }
    };
    // A new R3 stream takes writes once its replicas have elected a leader.
    while stream
        .info()
        .await
        .ok()
        .and_then(|i| i.cluster.as_ref().and_then(|c| c.leader.clone()))
        .is_none()
    {
        assert!(std::time::Instant::now() < deadline, "no stream leader");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // ...and once every server routes the stream's subjects to it: until
    // then a publish may find no stream ("no responders").
    let ack = loop {
        match js
            .publish("selftest.one", "one".into())
            .await
            .unwrap()
            .await
        {
            Ok(ack) => break ack,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!((ack.stream.as_str(), ack.sequence), ("SELFTEST", 1));

    // Kill a follower the client is not connected to: the other two are a
    // quorum, so the next write is acknowledged without an election.
    let info = stream.info().await.unwrap();
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    let connected = client.server_info().server_name;
    let victim = (0..3)
        .find(|&i| Some(cluster.name(i)) != leader.as_deref() && cluster.name(i) != connected)
        .expect("a follower the client is not on");
    let pid = cluster.pid(victim);
    cluster.kill(victim);
    let ack = js
        .publish("selftest.two", "two".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 2);

    cluster.restart(victim).await;
    assert_ne!(cluster.pid(victim), pid);
    assert!(cluster.store_dir(victim).is_dir());
    let ack = js
        .publish("selftest.three", "three".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 3);
}
