//! Hub nodes as `agenthub serve --nats ...` processes on a [`NatsCluster`].

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agenthub::client::{connect, HubClient};
use serde_json::Value;

use super::nats::NatsCluster;
use crate::core_flow::Http;
use crate::helpers::{HubProcess, Sidecar};

/// How long a cluster test waits for something that should happen.
pub const DEADLINE: Duration = Duration::from_secs(40);

/// A NATS cluster and hub nodes n0, n1, ... on it.
pub struct HubCluster {
    pub nats: NatsCluster,
    pub tmp: tempfile::TempDir,
    pub nodes: Vec<Option<HubProcess>>,
    pub admin: String,
    extra: Vec<String>,
}

impl HubCluster {
    /// Every event of the log, read from node `i` up to the head its
    /// `/health` reports (after everything settled).
    pub async fn history(&self, i: usize) -> Vec<agenthub::pb::TaskEvent> {
        use tokio_stream::StreamExt;
        let mut client = self.client(i).await;
        let head = self.health(i).await["last_seq"].as_u64().unwrap();
        let mut watch = client
            .watch_task_events(agenthub::pb::WatchTaskEventsRequest {
                after_seq: Some(0),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while out
            .last()
            .map(|e: &agenthub::pb::TaskEvent| e.seq)
            .unwrap_or(0)
            < head
        {
            let ev = tokio::time::timeout(DEADLINE, watch.next())
                .await
                .expect("history streams")
                .unwrap()
                .unwrap();
            out.push(ev);
        }
        out
    }

    /// A sidecar identified as `agent` with `token` on node `i`.
    pub async fn identify(&self, i: usize, agent: &str, token: &str) -> Sidecar {
        let mut sc =
            Sidecar::send_identify(&self.ws_url(i), agent, token, serde_json::json!({})).await;
        let v = sc.recv_type("identified").await;
        assert_eq!(v["agent_id"], agent);
        sc
    }

    /// Start NATS and `n` hub nodes; returns once one of them leads.
    pub async fn start(n: usize, extra: &[&str]) -> HubCluster {
        Self::start_on(NatsCluster::start().await, n, extra).await
    }

    /// [`HubCluster::start`] on a NATS cluster already running.
    pub async fn start_on(nats: NatsCluster, n: usize, extra: &[&str]) -> HubCluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = HubCluster {
            nats,
            tmp,
            nodes: Vec::new(),
            admin: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            let p = c.spawn_node(i).await;
            c.nodes.push(Some(p));
        }
        c.leader().await;
        // The node that bootstrapped the token set wrote admin.token.
        c.admin = (0..n)
            .map(|i| c.data_dir(i).join("admin.token"))
            .find(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).unwrap().trim().to_string())
            .expect("one node wrote admin.token");
        c
    }

    pub fn node_id(i: usize) -> String {
        format!("n{i}")
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.tmp.path().join(Self::node_id(i))
    }

    /// Node `i`'s log (every run of it, appended).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.tmp.path().join(format!("{}.log", Self::node_id(i)))
    }

    async fn spawn_node(&self, i: usize) -> HubProcess {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        self.spawn_node_at(i, any, any).await
    }

    async fn spawn_node_at(
        &self,
        i: usize,
        ws: std::net::SocketAddr,
        grpc: std::net::SocketAddr,
    ) -> HubProcess {
        let urls = self.nats.url_list();
        let id = Self::node_id(i);
        let mut args: Vec<&str> = vec!["--nats", &urls, "--node-id", &id];
        args.extend(self.extra.iter().map(String::as_str));
        let log = self.log_path(i);
        HubProcess::spawn_logged(&self.data_dir(i), ws, grpc, &args, Some(&log)).await
    }

    /// What a failing test shows: each hub node's `/health` and the last
    /// lines of its log, and the last lines of each NATS server's log.
    pub async fn diagnose(&self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            let health = match &self.nodes[i] {
                Some(p) => {
                    let http = Http::new(p.ws_addr);
                    match tokio::time::timeout(Duration::from_secs(2), http.get("/health")).await {
                        Ok((_, v)) => v.to_string(),
                        Err(_) => "no answer".into(),
                    }
                }
                None => "not running".into(),
            };
            let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            // The whole log, for a failure that needs more than its tail.
            if let Some(dir) = std::env::var_os("AGENTHUB_TEST_KEEP_LOGS") {
                let to = std::path::Path::new(&dir).join(format!("{}.log", Self::node_id(i)));
                let _ = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(to, &text));
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            out.push_str(&format!(
                "\n--- hub {} /health: {health}\n{tail}\n",
                Self::node_id(i)
            ));
        }
        for i in 0..3 {
            out.push_str(&format!(
                "\n--- nats server {i}\n{}\n",
                self.nats.log_tail(i)
            ));
        }
        out
    }

    pub fn node(&self, i: usize) -> &HubProcess {
        self.nodes[i].as_ref().expect("node running")
    }

    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.node(i).ws_addr)
    }

    /// Every running node's WebSocket URL, comma-separated.
    pub fn ws_urls(&self) -> String {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .map(|i| self.ws_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub async fn client(&self, i: usize) -> HubClient {
        connect(&self.node(i).grpc_addr.to_string(), &self.admin)
            .await
            .unwrap()
    }

    pub async fn health(&self, i: usize) -> Value {
        Http::new(self.node(i).ws_addr).get("/health").await.1
    }

    /// The index of the leading node, once every running node agrees on it.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut seen = Vec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].is_some() {
                    seen.push(self.health(i).await["leader"].as_str().map(str::to_string));
                }
            }
            if let Some(Some(first)) = seen.first() {
                if seen.iter().all(|s| s.as_deref() == Some(first.as_str())) {
                    let i: usize = first.trim_start_matches('n').parse().unwrap();
                    if self.nodes[i].is_some() {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    /// Start node `i` again on its data dir and at the same addresses
    /// (sidecars and clients find it where it was).
    pub async fn restart(
        &mut self,
        i: usize,
        ws: std::net::SocketAddr,
        grpc: std::net::SocketAddr,
    ) {
        let p = self.spawn_node_at(i, ws, grpc).await;
        self.nodes[i] = Some(p);
    }

    /// `agenthub token issue --agent ID --nats URLS`, as an operator would.
    pub fn agent_token(&self, agent: &str) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["token", "issue", "--agent", agent, "--nats"])
            .arg(self.nats.url_list())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "token issue: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}
