//! Workloads against the hub: push (sequential and pipelined), fan-out to
//! watchers, idle connections, ingest, and replay.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Endpoint;

use agenthub::client::{connect, HubClient};
use agenthub::pb;

use crate::procs::{issue_tokens, Hub};
use crate::util::{now_ns, padded, CpuMeter, Metrics, Samples};
use crate::ws::{self, report, sidecar, sidecar_from, wait_ack, wait_assign, Frame, FRAME_TIMEOUT};
use crate::Ctx;

/// Largest decoded gRPC message.
const MAX_GRPC_MESSAGE: usize = 64 * 1024 * 1024;
/// A fan-out sender never runs further ahead of its slowest watcher.
pub const FANOUT_AHEAD: u64 = 1000;
/// A watcher that sees nothing for this long has lost events.
const WATCH_IDLE: Duration = Duration::from_secs(10);

/// A `TaskEvent` decoded down to what the bench checks: the sequence number
/// and kind (the payload is skipped without being parsed).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteEvent {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(int32, tag = "4")]
    pub kind: i32,
}

/// `WatchTaskEvents` on its own connection, decoding [`LiteEvent`]s.
pub async fn watch_lite(
    grpc_addr: &str,
    token: &str,
    after_seq: Option<u64>,
) -> Result<tonic::Streaming<LiteEvent>> {
    let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_GRPC_MESSAGE);
    grpc.ready().await.context("grpc ready")?;
    let mut req = tonic::Request::new(pb::WatchTaskEventsRequest {
        after_seq,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let codec = tonic_prost::ProstCodec::<pb::WatchTaskEventsRequest, LiteEvent>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/agenthub.v1.TaskHub/WatchTaskEvents",
    );
    Ok(grpc.server_streaming(req, path, codec).await?.into_inner())
}

/// The task metadata: a JSON object of [`crate::util::PAYLOAD_BYTES`] bytes.
fn metadata() -> prost_types::Struct {
    let json: serde_json::Value = serde_json::from_str(&padded("{", "}")).expect("valid json");
    let serde_json::Value::Object(o) = json else {
        unreachable!()
    };
    pb::json_to_struct(&o)
}

fn push_request(
    agent_id: &str,
    task_id: String,
    meta: &prost_types::Struct,
) -> pb::PushTaskRequest {
    pb::PushTaskRequest {
        agent_id: agent_id.to_string(),
        description: "bench".into(),
        metadata: Some(meta.clone()),
        task_id,
        ..Default::default()
    }
}

/// A fresh hub with an admin token and agent tokens for `agents`.
async fn fresh_hub(
    ctx: &Ctx,
    name: &str,
    agents: &[String],
    extra: &[&str],
) -> Result<(Hub, Vec<(String, String)>)> {
    let dir = ctx.fresh_dir(name)?;
    let tokens = issue_tokens(&dir, agents)?;
    let hub = Hub::start(&ctx.agenthub, &dir, &tokens.admin, &ctx.log(name), extra).await?;
    Ok((hub, tokens.agents))
}

/// Push one pinned task and have the sidecar accept it.
async fn push_and_accept(
    client: &mut HubClient,
    ws: &mut ws::Ws,
    agent_id: &str,
    task_id: &str,
) -> Result<u64> {
    let req = push_request(agent_id, task_id.to_string(), &metadata());
    let (resp, generation) = tokio::join!(client.push_task(req), wait_assign(ws, task_id));
    resp.context("PushTask")?;
    let generation = generation?;
    ws.send(Message::text(report("task_accepted", task_id, generation)))
        .await?;
    wait_ack(ws, task_id, "accepted").await?;
    Ok(generation)
}

/// Push: sequential latencies, then pipelined throughput, on one fresh hub
/// started with `extra` arguments.
pub async fn push(ctx: &Ctx, name: &str, extra: &[&str]) -> Result<(Metrics, Metrics)> {
    let agent = PUSH_AGENT.to_string();
    let (hub, tokens) = fresh_hub(ctx, name, std::slice::from_ref(&agent), extra).await?;
    let result = push_on(ctx, &hub, &tokens[0].1).await;
    hub.stop().await;
    ctx.remove_dir(name);
    result
}

/// The agent the push workloads run on.
pub const PUSH_AGENT: &str = "push-agent";

/// The push workloads on a running hub whose `PUSH_AGENT` token is `token`.
pub async fn push_on(ctx: &Ctx, hub: &Hub, token: &str) -> Result<(Metrics, Metrics)> {
    push_measured(ctx, hub, token, "", &[hub.pid()]).await
}

/// [`push_on`] with task ids starting with `prefix` (unique per run on one
/// hub: a push of a known task id is answered from the store), and the
/// server CPU per task summed over `cpu_pids` (in a cluster: every hub node
/// and every NATS server).
pub async fn push_measured(
    ctx: &Ctx,
    hub: &Hub,
    token: &str,
    prefix: &str,
    cpu_pids: &[u32],
) -> Result<(Metrics, Metrics)> {
    let s = &ctx.sizes;
    let agent = PUSH_AGENT.to_string();
    let tokens = [(agent.clone(), token.to_string())];
    let result = async {
        let mut client = connect(&hub.grpc_addr, &hub.admin).await?;
        let meta = metadata();

        // Sequential.
        let mut ws = sidecar(&hub.ws_addr, &agent, &tokens[0].1, 256).await?;
        let mut to_assign = Samples::with_capacity(s.push_measured);
        let mut to_ack = Samples::with_capacity(s.push_measured);
        let mut to_response = Samples::with_capacity(s.push_measured);
        let mut cpu = None;
        let mut commits0 = None;
        for i in 0..s.push_warmup + s.push_measured {
            if i == s.push_warmup {
                commits0 = store_commits(&hub.ws_addr).await;
                cpu = Some(CpuMeter::start_all(cpu_pids)?);
            }
            let task_id = format!("{prefix}s-{i}");
            let req = push_request(&agent, task_id.clone(), &meta);
            let t0 = now_ns();
            let (resp, side) = tokio::join!(
                async {
                    let r = client.push_task(req).await;
                    (r, now_ns())
                },
                async {
                    let generation = wait_assign(&mut ws, &task_id).await?;
                    let t_assign = now_ns();
                    ws.send(Message::text(report("task_accepted", &task_id, generation)))
                        .await?;
                    wait_ack(&mut ws, &task_id, "accepted").await?;
                    Ok::<_, anyhow::Error>((generation, t_assign, now_ns()))
                }
            );
            resp.0.context("PushTask")?;
            let (generation, t_assign, t_ack) = side?;
            if i >= s.push_warmup {
                to_assign.push(t_assign - t0);
                to_ack.push(t_ack - t0);
                to_response.push(resp.1 - t0);
            }
            ws.send(Message::text(report("task_complete", &task_id, generation)))
                .await?;
            wait_ack(&mut ws, &task_id, "complete").await?;
        }
        let cpu_us = cpu.context("no measured pushes")?.used_us()?;
        let mut seq = Metrics::default();
        put_commits_per_task(&mut seq, &hub.ws_addr, commits0, s.push_measured).await;
        seq.put("count", s.push_measured as f64);
        to_ack.sorted().put(&mut seq, "push_to_accept_ack");
        to_assign.sorted().put(&mut seq, "push_to_assign");
        to_response.sorted().put(&mut seq, "push_response");
        seq.put(
            "server_cpu_us_per_task",
            cpu_us as f64 / s.push_measured as f64,
        );

        // The hub's own hops without the store, to split the round trip up:
        // a unary gRPC call (ListAgents) and a sidecar `ping` → `pong`.
        let n = s.push_warmup;
        let mut grpc = Samples::with_capacity(n);
        let mut ping = Samples::with_capacity(n);
        for _ in 0..n {
            let t0 = now_ns();
            client.list_agents(pb::ListAgentsRequest {}).await?;
            grpc.push(now_ns() - t0);
            let t0 = now_ns();
            ws.send(Message::text(r#"{"type":"ping"}"#)).await?;
            loop {
                let text = ws::recv_text(&mut ws).await?;
                if Frame::parse(&text)?.kind == "pong" {
                    break;
                }
            }
            ping.push(now_ns() - t0);
        }
        seq.put("grpc_unary_p50_us", grpc.sorted().pct_us(0.5));
        seq.put("ws_ping_pong_p50_us", ping.sorted().pct_us(0.5));
        drop(ws);

        // Pipelined: a task leaves the window when its `task_complete` is acked.
        let ws = sidecar(&hub.ws_addr, &agent, &tokens[0].1, 256).await?;
        let piped =
            push_pipelined(ctx, cpu_pids, &mut client, ws, &agent, prefix, &hub.ws_addr).await?;
        Ok::<_, anyhow::Error>((seq, piped))
    }
    .await;
    result
}

/// The hub's group commits so far (`agenthub_store_commit_seconds_count`
/// on `/metrics`); `None` if it cannot be read.
async fn store_commits(http_addr: &str) -> Option<u64> {
    let (status, body) = crate::procs::http_get(http_addr, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("agenthub_store_commit_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// `commits_per_task`: the hub's group commits (one durable append each)
/// since `before` ([`store_commits`] then), per task of `tasks`; left out
/// when `/metrics` cannot be read.
async fn put_commits_per_task(m: &mut Metrics, http_addr: &str, before: Option<u64>, tasks: usize) {
    if let (Some(a), Some(b)) = (before, store_commits(http_addr).await) {
        m.put(
            "commits_per_task",
            b.saturating_sub(a) as f64 / tasks as f64,
        );
    }
}

/// `ctx.sizes.push_pipelined` pushes with `ctx.sizes.inflight` tasks in flight.
async fn push_pipelined(
    ctx: &Ctx,
    cpu_pids: &[u32],
    client: &mut HubClient,
    ws: ws::Ws,
    agent: &str,
    prefix: &str,
    http_addr: &str,
) -> Result<Metrics> {
    let (count, inflight, limit) = (ctx.sizes.push_pipelined, ctx.sizes.inflight, ctx.limit);
    let commits0 = store_commits(http_addr).await;
    let meta = metadata();
    let window = Arc::new(Semaphore::new(inflight));
    let errors = Arc::new(AtomicU64::new(0));
    let (mut sink, mut stream) = ws.split();
    let cpu = CpuMeter::start_all(cpu_pids)?;
    let t0 = now_ns();
    let side = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut done = 0usize;
            while done < count {
                let msg = tokio::time::timeout(FRAME_TIMEOUT, stream.next())
                    .await
                    .context("pipelined sidecar timed out")?;
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("hub closed the socket"),
                };
                let f = Frame::parse(text.as_str())?;
                f.check()?;
                match (&*f.kind, f.status.as_deref()) {
                    ("task_assign", _) => {
                        let generation = f.generation.context("generation")?;
                        sink.feed(Message::text(report("task_accepted", f.task(), generation)))
                            .await?;
                        sink.send(Message::text(report("task_complete", f.task(), generation)))
                            .await?;
                    }
                    ("task_ack", Some("complete")) => {
                        done += 1;
                        window.add_permits(1);
                    }
                    // A report refused would leave its task in the window
                    // for good: say why instead of timing out.
                    ("error", _) => bail!("the hub answered a report with an error: {text}"),
                    _ => {}
                }
            }
            Ok::<_, anyhow::Error>(now_ns())
        })
    };
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let orchestrator = async {
        for i in 0..count {
            window.acquire().await?.forget();
            if errors.load(Ordering::Relaxed) > 0 {
                // A failed push never leaves the window: stop here.
                break;
            }
            let mut c = client.clone();
            let req = push_request(agent, format!("{prefix}q-{i}"), &meta);
            let (errors, first_error) = (errors.clone(), first_error.clone());
            tokio::spawn(async move {
                if let Err(e) = c.push_task(req).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().unwrap().get_or_insert(e.to_string());
                }
            });
        }
        Ok::<_, anyhow::Error>(())
    };
    // The sidecar's end fails as soon as the hub refuses a report: the
    // pushes waiting for its window would otherwise wait out the limit.
    let t1 = tokio::time::timeout(limit, async {
        tokio::pin!(orchestrator);
        let mut pushed = false;
        let mut side = side;
        loop {
            tokio::select! {
                r = &mut orchestrator, if !pushed => {
                    r?;
                    pushed = true;
                }
                r = &mut side => return r?,
            }
        }
    })
    .await
    .with_context(|| match first_error.lock().unwrap().clone() {
        Some(e) => format!("pipelined push stalled: a PushTask failed with {e}"),
        None => "pipelined push timed out".to_string(),
    })??;
    let cpu_us = cpu.used_us()?;
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} PushTask calls failed");
    }
    let mut m = Metrics::default();
    put_commits_per_task(&mut m, http_addr, commits0, count).await;
    m.put("count", count as f64);
    m.put("inflight", inflight as f64);
    m.put("tasks_per_s", count as f64 / ((t1 - t0) as f64 / 1e9));
    m.put("server_cpu_us_per_task", cpu_us as f64 / count as f64);
    Ok(m)
}

/// What the watchers of a fan-out run saw.
pub struct FanoutTally {
    pub lat: Samples,
    pub lost: u64,
    pub dup: u64,
    pub last_ns: u64,
}

/// Shared state of a fan-out run: per-event send times and per-watcher progress.
pub struct Fanout {
    pub sent_ns: Vec<AtomicU64>,
    pub received: Vec<AtomicU64>,
    pub progress: Notify,
}

impl Fanout {
    pub fn new(events: usize, watchers: usize) -> Arc<Fanout> {
        Arc::new(Fanout {
            sent_ns: (0..events).map(|_| AtomicU64::new(0)).collect(),
            received: (0..watchers).map(|_| AtomicU64::new(0)).collect(),
            progress: Notify::new(),
        })
    }

    /// A watcher got event `idx` (0-based) as its `count`-th.
    pub fn record(&self, watcher: usize, idx: u64, count: u64, lat: &mut Samples) {
        if let Some(sent) = self.sent_ns.get(idx as usize) {
            lat.push(now_ns().saturating_sub(sent.load(Ordering::Relaxed)));
        }
        self.received[watcher].store(count, Ordering::Release);
        if count.is_multiple_of(64) || count == self.sent_ns.len() as u64 {
            self.progress.notify_one();
        }
    }

    fn slowest(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// May event `i` (0-based) go out without running more than
    /// [`FANOUT_AHEAD`] events ahead of the slowest watcher?
    pub fn fits(&self, i: u64) -> bool {
        i < self.slowest() + FANOUT_AHEAD
    }

    /// Wait until event `i` [`fits`](Self::fits).
    pub async fn admit(&self, i: u64) -> Result<()> {
        let deadline = now_ns() + WATCH_IDLE.as_nanos() as u64;
        loop {
            let slowest = self.slowest();
            if i < slowest + FANOUT_AHEAD {
                return Ok(());
            }
            if now_ns() > deadline {
                bail!("watchers stopped receiving (slowest at {slowest} of {i} sent)");
            }
            let _ = tokio::time::timeout(Duration::from_millis(1), self.progress.notified()).await;
        }
    }

    /// Sum up the watchers' tallies.
    pub fn metrics(&self, tallies: Vec<FanoutTally>, t0: u64) -> Metrics {
        let watchers = tallies.len() as u64;
        let events = self.sent_ns.len() as u64;
        let mut lat = Samples::with_capacity((watchers * events) as usize);
        let (mut lost, mut dup, mut last) = (0, 0, t0);
        for t in tallies {
            lost += t.lost;
            dup += t.dup;
            last = last.max(t.last_ns);
            lat.extend(t.lat);
        }
        let delivered = lat.len() as f64;
        let mut m = Metrics::default();
        m.put("watchers", watchers as f64);
        m.put("events", events as f64);
        m.put("delivered", delivered);
        m.put("lost", lost as f64);
        m.put("duplicated", dup as f64);
        m.put("delivered_per_s", delivered / ((last - t0) as f64 / 1e9));
        let lat = lat.sorted();
        m.put("delivery_p50_us", lat.pct_us(0.50));
        m.put("delivery_p99_us", lat.pct_us(0.99));
        m
    }
}

/// Fan-out: one sidecar's `task_progress` stream to `watchers` watch streams.
pub async fn fanout(ctx: &Ctx, name: &str, watchers: usize, events: usize) -> Result<Metrics> {
    let agent = FAN_AGENT.to_string();
    let (hub, tokens) = fresh_hub(ctx, name, std::slice::from_ref(&agent), &[]).await?;
    let result = fanout_on(
        &hub,
        &tokens[0].1,
        &[hub.grpc_addr.as_str()],
        watchers,
        events,
        &[hub.pid()],
    )
    .await;
    hub.stop().await;
    ctx.remove_dir(name);
    result
}

/// The agent the fan-out workloads run on.
pub const FAN_AGENT: &str = "fan-agent";

/// Fan-out on a running hub: a `FAN_AGENT` sidecar (token `token`) on `hub`
/// sends `events` `task_progress` to `watchers` watch streams, watcher `w`
/// on `watch_addrs[w % len]` (gRPC addresses). Server CPU is summed over
/// `cpu_pids`.
pub async fn fanout_on(
    hub: &Hub,
    token: &str,
    watch_addrs: &[&str],
    watchers: usize,
    events: usize,
    cpu_pids: &[u32],
) -> Result<Metrics> {
    let agent = FAN_AGENT;
    let mut client = connect(&hub.grpc_addr, &hub.admin).await?;
    let mut ws = sidecar(&hub.ws_addr, agent, token, 1).await?;
    let task_id = "fan-task";
    let generation = push_and_accept(&mut client, &mut ws, agent, task_id).await?;
    let as_of = client
        .list_tasks(pb::ListTasksRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .as_of_seq;
    let shared = Fanout::new(events, watchers);
    let mut tasks = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let addr = watch_addrs[w % watch_addrs.len()];
        let mut stream = watch_lite(addr, &hub.admin, Some(as_of)).await?;
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = FanoutTally {
                lat: Samples::with_capacity(events),
                lost: 0,
                dup: 0,
                last_ns: 0,
            };
            let mut expected = as_of + 1;
            let mut count = 0u64;
            while count < events as u64 {
                let ev = match tokio::time::timeout(WATCH_IDLE, stream.message()).await {
                    Ok(Ok(Some(ev))) => ev,
                    _ => {
                        t.lost += events as u64 - count;
                        break;
                    }
                };
                if ev.seq < expected {
                    t.dup += 1;
                    continue;
                }
                t.lost += ev.seq - expected;
                expected = ev.seq + 1;
                if ev.kind != pb::task_event::Kind::Progress as i32 {
                    continue;
                }
                count += 1;
                shared.record(w, ev.seq - as_of - 1, count, &mut t.lat);
                t.last_ns = now_ns();
            }
            t
        }));
    }
    let cpu = CpuMeter::start_all(cpu_pids)?;
    let t0 = now_ns();
    for i in 0..events as u64 {
        if !shared.fits(i) {
            ws.flush().await?;
            shared.admit(i).await?;
        }
        let frame = padded(
            &format!(
                r#"{{"type":"task_progress","task_id":"{task_id}","generation":{generation},"progress":{{"i":{i}}},"#
            ),
            "}",
        );
        shared.sent_ns[i as usize].store(now_ns(), Ordering::Relaxed);
        ws.feed(Message::text(frame)).await?;
        if i % 8 == 7 {
            ws.flush().await?;
        }
    }
    ws.flush().await?;
    let mut tallies = Vec::with_capacity(watchers);
    for t in tasks {
        tallies.push(t.await?);
    }
    let cpu_us = cpu.used_us()?;
    let mut m = shared.metrics(tallies, t0);
    m.put(
        "server_cpu_us_per_delivery",
        cpu_us as f64 / (events * watchers) as f64,
    );
    Ok(m)
}

/// Ingest: `sidecars` sidecars, each with an accepted task, each sending
/// `per_sidecar` progress events as fast as the socket takes them, then a
/// `task_complete` whose ack proves the events before it durable. Leaves the
/// hub running (for replay preparation) when `keep` is set.
pub async fn ingest_on(
    hub: &Hub,
    tokens: &[(String, String)],
    per_sidecar: usize,
    limit: Duration,
) -> Result<Metrics> {
    let mut client = connect(&hub.grpc_addr, &hub.admin).await?;
    let mut socks = Vec::with_capacity(tokens.len());
    for (k, (agent, token)) in tokens.iter().enumerate() {
        let mut ws = sidecar(&hub.ws_addr, agent, token, 1).await?;
        let task_id = format!("ing-{k}");
        let generation = push_and_accept(&mut client, &mut ws, agent, &task_id).await?;
        socks.push((ws, task_id, generation));
    }
    let cpu = CpuMeter::start(hub.pid())?;
    let start = Arc::new(tokio::sync::Barrier::new(socks.len() + 1));
    let mut tasks = Vec::with_capacity(socks.len());
    for (mut ws, task_id, generation) in socks {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for i in 0..per_sidecar {
                let frame = padded(
                    &format!(r#"{{"type":"task_progress","task_id":"{task_id}","generation":{generation},"progress":{{"i":{i}}},"#),
                    "}",
                );
                ws.feed(Message::text(frame)).await?;
                if i % 32 == 31 {
                    ws.flush().await?;
                }
            }
            ws.send(Message::text(report("task_complete", &task_id, generation))).await?;
            wait_ack(&mut ws, &task_id, "complete").await?;
            Ok::<_, anyhow::Error>(now_ns())
        }));
    }
    start.wait().await;
    let t0 = now_ns();
    let last = crate::util::latest_finish(tasks, limit, "ingest")
        .await?
        .max(t0);
    let cpu_us = cpu.used_us()?;
    let events = (tokens.len() * per_sidecar) as f64;
    let mut m = Metrics::default();
    m.put("sidecars", tokens.len() as f64);
    m.put("events", events);
    m.put("events_per_s", events / ((last - t0) as f64 / 1e9));
    m.put("server_cpu_us_per_event", cpu_us as f64 / events);
    Ok(m)
}

pub fn agent_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| format!("{prefix}-{k}")).collect()
}

pub async fn ingest(ctx: &Ctx, name: &str) -> Result<Metrics> {
    let s = &ctx.sizes;
    let agents = agent_ids("ing", s.ingest_sidecars);
    let (hub, tokens) = fresh_hub(ctx, name, &agents, &[]).await?;
    let result = ingest_on(&hub, &tokens, s.ingest_per_sidecar, ctx.limit).await;
    hub.stop().await;
    ctx.remove_dir(name);
    result
}

/// Fill `dir` with at least `events` stored events (once per bench run);
/// returns the last seq.
pub async fn prepare_replay(ctx: &Ctx, events: usize) -> Result<u64> {
    let name = "hub-replay-data";
    let dir = ctx.fresh_dir(name)?;
    let sidecars = ctx.sizes.ingest_sidecars;
    let agents = agent_ids("rep", sidecars);
    let tokens = issue_tokens(&dir, &agents)?;
    let hub = Hub::start(
        &ctx.agenthub,
        &dir,
        &tokens.admin,
        &ctx.log("hub-replay-prepare"),
        &[],
    )
    .await?;
    let result = async {
        let m = ingest_on(
            &hub,
            &tokens.agents,
            events.div_ceil(sidecars),
            ctx.limit * 10,
        )
        .await?;
        let mut client = connect(&hub.grpc_addr, &hub.admin).await?;
        let last = client
            .list_tasks(pb::ListTasksRequest {
                page_size: 1,
                ..Default::default()
            })
            .await?
            .into_inner()
            .as_of_seq;
        eprintln!(
            "  replay data: {last} hub events stored ({:.0} events/s)",
            m.0.iter()
                .find(|(k, _)| k == "events_per_s")
                .map(|(_, v)| *v)
                .unwrap_or(0.0)
        );
        std::fs::write(dir.join("admin.token.bench"), &tokens.admin)?;
        Ok::<_, anyhow::Error>(last)
    }
    .await;
    hub.stop().await;
    result
}

/// Replay: a fresh hub process on the prepared store; one watcher with
/// `after_seq = 0` reads every stored event.
pub async fn replay(ctx: &Ctx, name: &str, last_seq: u64) -> Result<Metrics> {
    let dir = ctx.dir("hub-replay-data");
    let admin = std::fs::read_to_string(dir.join("admin.token.bench"))
        .context("replay data not prepared")?;
    let hub = Hub::start(&ctx.agenthub, &dir, admin.trim(), &ctx.log(name), &[]).await?;
    let result = async {
        let cpu = CpuMeter::start(hub.pid())?;
        let t0 = now_ns();
        let mut stream = watch_lite(&hub.grpc_addr, &hub.admin, Some(0)).await?;
        let mut count = 0u64;
        let mut expected = 1u64;
        loop {
            let ev = tokio::time::timeout(WATCH_IDLE, stream.message())
                .await
                .context("replay stalled")??
                .context("replay stream ended")?;
            if ev.seq != expected {
                bail!(
                    "replay gap or duplicate: got seq {} expected {expected}",
                    ev.seq
                );
            }
            expected += 1;
            count += 1;
            if ev.seq >= last_seq {
                break;
            }
        }
        let t1 = now_ns();
        let cpu_us = cpu.used_us()?;
        let mut m = Metrics::default();
        m.put("events", count as f64);
        m.put("events_per_s", count as f64 / ((t1 - t0) as f64 / 1e9));
        m.put("server_cpu_us_per_event", cpu_us as f64 / count as f64);
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    hub.stop().await;
    result
}

/// Agent tokens for the connection counts, issued once and copied into each
/// fresh data directory.
pub fn prepare_connections(ctx: &Ctx, max: usize) -> Result<Vec<(String, String)>> {
    let dir = ctx.fresh_dir("hub-conn-template")?;
    let tokens = issue_tokens(&dir, &agent_ids("idle", max))?;
    std::fs::write(dir.join("admin.token.bench"), &tokens.admin)?;
    Ok(tokens.agents)
}

/// Descriptors the hub and the bench each need beyond one per sidecar.
pub const CONN_FD_MARGIN: u64 = 100;
/// Loopback source addresses the sidecars may connect from: 127.0.0.1 ..
/// 127.0.0.254.
const MAX_SOURCE_ADDRESSES: usize = 254;

/// Why `n` sidecars cannot run on this machine (the open-file limit, which
/// the hub inherits from the bench, is below one descriptor per sidecar plus
/// [`CONN_FD_MARGIN`]), or `None` when they can (or the limit is unknown:
/// then the phase runs and fails on its own if it must).
pub fn connections_not_run(n: usize) -> Option<String> {
    let needed = n as u64 + CONN_FD_MARGIN;
    match crate::util::open_file_limit() {
        Ok(Some(limit)) if limit < needed => Some(format!(
            "not run: open-file limit {limit} < needed {needed} (raise `ulimit -n`)"
        )),
        _ => None,
    }
}

/// Sidecars per loopback source address: `requested`, but at most 9/10 of
/// `net.ipv4.ip_local_port_range` (a source address reaches one server from
/// at most that many ports; the rest stay free for other connections).
pub fn sidecars_per_address(requested: usize) -> Result<usize> {
    let ports = crate::util::local_port_count()? as usize;
    Ok(requested.min(ports * 9 / 10).max(1))
}

/// The source address of sidecar `k`: 127.0.0.1 for the first
/// `per_address`, then 127.0.0.2, and so on.
fn source_address(k: usize, per_address: usize) -> IpAddr {
    let host = 1 + k / per_address;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, host as u8))
}

/// Idle connections: `n` identified sidecars on a fresh hub process, from
/// `ctx.sizes.conn_per_address` sidecars per loopback source address (so
/// counts beyond one address's ephemeral ports fit). Hub RSS per
/// connection, and hub CPU while idle with heartbeats (WebSocket pings every
/// `ping_interval`) running.
pub async fn connections(
    ctx: &Ctx,
    name: &str,
    tokens: &[(String, String)],
    n: usize,
) -> Result<Metrics> {
    let per_address = sidecars_per_address(ctx.sizes.conn_per_address)?;
    let addresses = n.div_ceil(per_address);
    if addresses > MAX_SOURCE_ADDRESSES {
        bail!(
            "{n} sidecars need {addresses} source addresses at {per_address} each \
             (at most {MAX_SOURCE_ADDRESSES})"
        );
    }
    let template = ctx.dir("hub-conn-template");
    let dir = ctx.fresh_dir(name)?;
    for entry in std::fs::read_dir(&template)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    let admin = std::fs::read_to_string(dir.join("admin.token.bench"))?;
    let ping = format!("{}s", ctx.sizes.idle_ping_secs);
    let hub = Hub::start(
        &ctx.agenthub,
        &dir,
        admin.trim(),
        &ctx.log(name),
        // No connection cap: the phase measures idle sockets, not limits.
        &["--ping-interval", &ping, "--max-connections", "0"],
    )
    .await?;
    let result = async {
        // One sidecar first, so one-time allocations are not charged to the count.
        let warm = sidecar(&hub.ws_addr, &tokens[0].0, &tokens[0].1, 1).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss0 = crate::util::rss_kib(hub.pid())?;
        let connect_t0 = now_ns();
        let opened = Arc::new(Semaphore::new(200));
        let mut joins = Vec::with_capacity(n);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for (k, (agent, token)) in tokens[1..=n].iter().enumerate() {
            let permit = opened.clone().acquire_owned().await?;
            let (ws_addr, agent, token) = (hub.ws_addr.clone(), agent.clone(), token.clone());
            let source = source_address(k, per_address);
            let mut stop = stop_rx.clone();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let ws = sidecar_from(source, &ws_addr, &agent, &token, 1).await;
                drop(permit);
                let mut ws = match ws {
                    Ok(ws) => {
                        let _ = ready_tx.send(Ok(()));
                        ws
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Idle: read (answers the hub's pings) until told to stop.
                loop {
                    tokio::select! {
                        msg = ws.next() => match msg {
                            Some(Ok(_)) => {}
                            _ => return,
                        },
                        _ = stop.changed() => return,
                    }
                }
            });
            joins.push(ready_rx);
        }
        for j in joins {
            j.await.context("sidecar task died")??;
        }
        let connect_s = (now_ns() - connect_t0) as f64 / 1e9;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss1 = crate::util::rss_kib(hub.pid())?;
        let idle = Duration::from_secs(ctx.sizes.idle_secs);
        let cpu = CpuMeter::start(hub.pid())?;
        tokio::time::sleep(idle).await;
        let cpu_us = cpu.used_us()?;
        let rss2 = crate::util::rss_kib(hub.pid())?;
        let _ = stop_tx.send(true);
        drop(warm);
        let mut m = Metrics::default();
        m.put("sidecars", n as f64);
        m.put("connect_per_s", n as f64 / connect_s);
        m.put("rss_base_kib", rss0 as f64);
        m.put("rss_kib", rss1 as f64);
        m.put(
            "rss_per_sidecar_kib",
            rss1.saturating_sub(rss0) as f64 / n as f64,
        );
        m.put(
            "rss_per_sidecar_after_idle_kib",
            rss2.saturating_sub(rss0) as f64 / n as f64,
        );
        m.put(
            "idle_cpu_pct",
            cpu_us as f64 / idle.as_micros() as f64 * 100.0,
        );
        m.put("idle_window_s", idle.as_secs_f64());
        m.put("ping_interval_s", ctx.sizes.idle_ping_secs as f64);
        m.put("source_addresses", addresses as f64);
        m.put("sidecars_per_address", per_address as f64);
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    hub.stop().await;
    ctx.remove_dir(name);
    result
}
