//! The `cluster` group: three `agenthub serve --nats` nodes on the rep's
//! 3-node NATS cluster (the one the `js-cluster` baselines ran on). Push
//! through the leader and through a follower, watchers on all three nodes at
//! once, and failover after SIGKILL of the leader.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use agenthub::client::connect;
use agenthub::pb;

use crate::hub::{fanout_on, push_measured, FAN_AGENT, PUSH_AGENT};
use crate::procs::{http_get, Hub, NatsCluster};
use crate::util::{now_ns, Metrics, Samples};
use crate::Ctx;

/// Hub nodes in the cluster.
const NODES: usize = 3;
/// The leader lease every node runs with (the CLI default, passed explicitly
/// because the failover bound is derived from it).
const LEASE: Duration = Duration::from_secs(3);
/// How long the nodes may take to agree on a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two `/health` polls, and between two pushes while no node takes
/// writes after a kill.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// Longest wait for one push during a failover.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// A failover that takes longer than this fails the phase.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent the failover probes are pinned to; it never connects, so the
/// probes wait in the queue (`queue_if_offline`).
const OFFLINE_AGENT: &str = "offline-agent";

/// What one `cluster` group measured; each part fails on its own.
pub struct Outcome {
    /// `push_on` with the sidecar and the orchestrator on the leader.
    pub leader_push: Result<(Metrics, Metrics)>,
    /// The same through a follower (it forwards the calls and relays the
    /// sidecar to the leader over NATS).
    pub follower_push: Result<(Metrics, Metrics)>,
    /// Watchers spread over the three nodes.
    pub fanout: Result<Metrics>,
    /// Leader SIGKILL → first accepted push.
    pub failover: Result<Metrics>,
}

/// Three hub nodes `hub-1`..`hub-3`; a killed node's slot is `None` until
/// it is restarted on its data directory.
struct HubNodes<'a> {
    ctx: &'a Ctx,
    name: String,
    nats: &'a NatsCluster,
    nodes: Vec<Option<Hub>>,
    /// The admin token the node that created the token set wrote.
    admin: String,
    /// Starts of each node so far (for distinct log names).
    starts: [usize; NODES],
}

fn node_id(i: usize) -> String {
    format!("hub-{}", i + 1)
}

impl<'a> HubNodes<'a> {
    async fn start(ctx: &'a Ctx, name: &str, nats: &'a NatsCluster) -> Result<HubNodes<'a>> {
        ctx.fresh_dir(name)?;
        let mut hubs = HubNodes {
            ctx,
            name: name.to_string(),
            nats,
            nodes: Vec::with_capacity(NODES),
            admin: String::new(),
            starts: [0; NODES],
        };
        for i in 0..NODES {
            let hub = hubs.spawn(i).await?;
            hubs.nodes.push(Some(hub));
        }
        hubs.leader().await?;
        hubs.admin = (0..NODES)
            .map(|i| hubs.data_dir(i).join("admin.token"))
            .find(|p| p.exists())
            .map(std::fs::read_to_string)
            .context("no node wrote admin.token")??
            .trim()
            .to_string();
        for hub in hubs.nodes.iter_mut().flatten() {
            hub.admin = hubs.admin.clone();
        }
        Ok(hubs)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.ctx.dir(&self.name).join(node_id(i))
    }

    /// `agenthub serve --nats <every server> --node-id hub-N --lease 3s`.
    async fn spawn(&mut self, i: usize) -> Result<Hub> {
        let dir = self.data_dir(i);
        std::fs::create_dir_all(&dir)?;
        self.starts[i] += 1;
        let log = self
            .ctx
            .log(&format!("{}-{}-{}", self.name, node_id(i), self.starts[i]));
        let (urls, id, lease) = (
            self.nats.url_list(),
            node_id(i),
            format!("{}s", LEASE.as_secs()),
        );
        let extra = ["--nats", &urls, "--node-id", &id, "--lease", &lease];
        let mut hub = Hub::start(&self.ctx.agenthub, &dir, &self.admin, &log, &extra).await?;
        hub.admin = self.admin.clone();
        Ok(hub)
    }

    fn node(&self, i: usize) -> Result<&Hub> {
        self.nodes[i]
            .as_ref()
            .with_context(|| format!("{} is not running", node_id(i)))
    }

    /// The leading node's index, once every running node names it in
    /// `/health`.
    async fn leader(&self) -> Result<usize> {
        let deadline = now_ns() + LEADER_TIMEOUT.as_nanos() as u64;
        loop {
            let mut seen = Vec::new();
            for hub in self.nodes.iter().flatten() {
                let leader = match http_get(&hub.ws_addr, "/health").await {
                    Ok((_, body)) => serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["leader"].as_str().map(String::from)),
                    Err(_) => None,
                };
                seen.push(leader);
            }
            if let Some(Some(first)) = seen.first() {
                if seen.iter().all(|s| s.as_ref() == Some(first)) {
                    if let Some(i) = (0..NODES).find(|&i| node_id(i) == *first) {
                        if self.nodes[i].is_some() {
                            return Ok(i);
                        }
                    }
                }
            }
            if now_ns() > deadline {
                bail!("the nodes agree on no leader: {seen:?}");
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// Every running hub node and every NATS server.
    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.nodes.iter().flatten().map(Hub::pid).collect();
        pids.extend(self.nats.pids());
        pids
    }

    /// `agenthub token issue --agent AGENT --nats <every server>`.
    async fn agent_token(&self, agent: &str) -> Result<String> {
        let out = tokio::process::Command::new(&self.ctx.agenthub)
            .args(["token", "issue", "--agent", agent, "--nats"])
            .arg(self.nats.url_list())
            .env("RUST_LOG", "warn")
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "token issue --agent {agent}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    async fn stop(self) {
        for hub in self.nodes.into_iter().flatten() {
            hub.stop().await;
        }
    }
}

/// The `cluster` group on `nats`. `Err` only if the nodes do not start.
pub async fn run(ctx: &Ctx, name: &str, nats: &NatsCluster) -> Result<Outcome> {
    let mut hubs = HubNodes::start(ctx, name, nats).await?;
    let outcome = measure(ctx, &mut hubs).await;
    hubs.stop().await;
    ctx.remove_dir(name);
    outcome
}

async fn measure(ctx: &Ctx, hubs: &mut HubNodes<'_>) -> Result<Outcome> {
    let push_token = hubs.agent_token(PUSH_AGENT).await?;
    let fan_token = hubs.agent_token(FAN_AGENT).await?;

    let leader = hubs.leader().await?;
    let leader_push = push_measured(ctx, hubs.node(leader)?, &push_token, "l-", &hubs.pids()).await;
    let follower = (leader + 1) % NODES;
    let follower_push =
        push_measured(ctx, hubs.node(follower)?, &push_token, "f-", &hubs.pids()).await;

    let fanout = async {
        let leader = hubs.node(hubs.leader().await?)?;
        let addrs: Vec<&str> = hubs
            .nodes
            .iter()
            .flatten()
            .map(|h| h.grpc_addr.as_str())
            .collect();
        let watchers = ctx.sizes.cluster_watchers_per_node * addrs.len();
        let events = ctx.sizes.cluster_fanout_events;
        fanout_on(leader, &fan_token, &addrs, watchers, events, &hubs.pids()).await
    }
    .await;

    let failover = failover(ctx, hubs).await;
    Ok(Outcome {
        leader_push,
        follower_push,
        fanout,
        failover,
    })
}

/// `ctx.sizes.failover_rounds` times: SIGKILL the leader, then push (pinned
/// to an offline agent, `queue_if_offline`) through the surviving nodes in
/// turn, every 20 ms until one is accepted; restart the killed node on its
/// data directory before the next round.
async fn failover(ctx: &Ctx, hubs: &mut HubNodes<'_>) -> Result<Metrics> {
    let rounds = ctx.sizes.failover_rounds;
    let mut took = Samples::with_capacity(rounds);
    let mut m = Metrics::default();
    for round in 0..rounds {
        let victim = hubs.leader().await?;
        let mut clients = Vec::new();
        for i in (0..NODES).filter(|&i| i != victim) {
            let hub = hubs.node(i)?;
            clients.push(connect(&hub.grpc_addr, &hubs.admin).await?);
        }
        let hub = hubs.nodes[victim].take().context("leader not running")?;
        let killed = now_ns();
        hub.kill().await;
        let mut attempt = 0;
        let elapsed = loop {
            let req = pb::PushTaskRequest {
                agent_id: OFFLINE_AGENT.into(),
                description: "failover probe".into(),
                task_id: format!("failover-{round}"),
                queue_if_offline: true,
                ..Default::default()
            };
            let survivors = clients.len();
            let client = &mut clients[attempt % survivors];
            attempt += 1;
            if let Ok(Ok(_)) = tokio::time::timeout(PUSH_TIMEOUT, client.push_task(req)).await {
                break now_ns() - killed;
            }
            if now_ns() - killed > FAILOVER_TIMEOUT.as_nanos() as u64 {
                bail!("round {round}: no node took a push within {FAILOVER_TIMEOUT:?}");
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        };
        m.put(&format!("round_{}_ms", round + 1), elapsed as f64 / 1e6);
        took.push(elapsed);
        let hub = hubs.spawn(victim).await?;
        hubs.nodes[victim] = Some(hub);
        hubs.leader().await?;
    }
    let took = took.sorted();
    let mut out = Metrics::default();
    out.put("rounds", rounds as f64);
    out.put("failover_p50_ms", took.pct_us(0.5) / 1e3);
    out.put("failover_max_ms", took.pct_us(1.0) / 1e3);
    out.put("lease_ms", LEASE.as_millis() as f64);
    out.0.extend(m.0);
    Ok(out)
}
