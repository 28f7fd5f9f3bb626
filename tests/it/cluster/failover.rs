//! Issue tests 2 and 4: killed leaders and a killed NATS server during a
//! burst of pushes and reports, with reference sidecars as processes.

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agenthub::pb;
use agenthub::pb::task_event::Kind as K;
use rand::{Rng, SeedableRng};

use super::hubs::{HubCluster, DEADLINE};

/// Reference sidecars (`agenthub sidecar --hub <every node>`), each task a
/// short shell script.
struct Sidecars {
    _children: Vec<tokio::process::Child>,
    _dir: tempfile::TempDir,
}

impl Sidecars {
    fn start(c: &HubCluster, agents: &[&str]) -> Sidecars {
        let dir = tempfile::tempdir().unwrap();
        let hubs = c.ws_urls();
        let children = agents
            .iter()
            .map(|agent| {
                let token = c.agent_token(agent);
                let log = std::fs::File::create(dir.path().join(format!("{agent}.log"))).unwrap();
                tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
                    .arg("sidecar")
                    .args(["--hub", &hubs, "--agent", agent, "--state-file"])
                    .arg(dir.path().join(format!("{agent}.json")))
                    .args([
                        "--heartbeat",
                        "2s",
                        "--kill-grace",
                        "500ms",
                        "--max-concurrency",
                        "4",
                    ])
                    .args(["--", "sh", "-c", r#"eval "$AGENTHUB_TASK_DESCRIPTION""#])
                    .env("AGENTHUB_TOKEN", token)
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap()
            })
            .collect();
        Sidecars {
            _children: children,
            _dir: dir,
        }
    }
}

/// Pushes `n` tasks (ids chosen by the caller, so a retry after an
/// unanswered push is the same task) through whichever node answers.
/// Returns the acked ids.
async fn push_burst(
    c: Arc<tokio::sync::RwLock<HubCluster>>,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut acked = Vec::new();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for k in 0..n {
        let id = format!("task-{prefix}-{k:04}");
        let sleep_ms = rng.random_range(50..400);
        let req = pb::PushTaskRequest {
            task_id: id.clone(),
            description: format!("sleep 0.{sleep_ms:03}"),
            queue_if_offline: true,
            ..Default::default()
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let node = rng.random_range(0..3);
            let client = {
                let c = c.read().await;
                if c.nodes[node].is_none() {
                    continue;
                }
                agenthub::client::connect(&c.node(node).grpc_addr.to_string(), &c.admin).await
            };
            if let Ok(mut client) = client {
                if let Ok(r) = client.push_task(req.clone()).await {
                    assert_eq!(r.into_inner().task_id, id);
                    acked.push(id);
                    break;
                }
            }
            if Instant::now() >= deadline {
                let why = c.read().await.diagnose().await;
                panic!("push {id} never acked{why}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    acked
}

/// A dashboard that follows the log through every failover: it watches
/// through some node and, when that stream ends or breaks, resumes from the
/// last seq it saw through another node. Returns what it saw once it has
/// seen `until` (set when the test is done).
async fn follow_across_nodes(
    c: Arc<tokio::sync::RwLock<HubCluster>>,
    until: Arc<std::sync::atomic::AtomicU64>,
) -> Vec<pb::TaskEvent> {
    use tokio_stream::StreamExt;
    let mut seen: Vec<pb::TaskEvent> = Vec::new();
    let mut node = 1;
    loop {
        let last = seen.last().map(|e| e.seq).unwrap_or(0);
        let target = until.load(std::sync::atomic::Ordering::Acquire);
        if target > 0 && last >= target {
            return seen;
        }
        node = (node + 1) % 3;
        let client = {
            let c = c.read().await;
            if c.nodes[node].is_none() {
                continue;
            }
            agenthub::client::connect(&c.node(node).grpc_addr.to_string(), &c.admin).await
        };
        let Ok(mut client) = client else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let req = pb::WatchTaskEventsRequest {
            after_seq: Some(last),
            ..Default::default()
        };
        let Ok(stream) = client.watch_task_events(req).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
            match next {
                Ok(Some(Ok(ev))) => seen.push(ev),
                Ok(_) => break,
                Err(_) => {
                    let target = until.load(std::sync::atomic::Ordering::Acquire);
                    let last = seen.last().map(|e| e.seq).unwrap_or(0);
                    if target > 0 && last >= target {
                        return seen;
                    }
                }
            }
        }
    }
}

/// Wait until every task in `ids` is finished, asking node `i`.
async fn wait_finished(c: &HubCluster, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let i = c.leader().await;
        let mut client = c.client(i).await;
        let mut open = 0;
        for id in ids {
            let t = client
                .get_task(pb::GetTaskRequest {
                    task_id: id.clone(),
                })
                .await;
            match t {
                Ok(t)
                    if matches!(
                        t.get_ref().state(),
                        pb::task::State::Completed
                            | pb::task::State::Failed
                            | pb::task::State::Cancelled
                    ) => {}
                _ => open += 1,
            }
        }
        if open == 0 {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{open} tasks never finished{}", c.diagnose().await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What every acked task must satisfy in the final history: it exists, it
/// completed exactly once, it has no second terminal event, and every
/// report applied carries the task's generation at the time.
fn check_history(events: &[pb::TaskEvent], acked: &[String]) -> HashMap<String, u64> {
    // One global seq, consecutive across every change of leader (SPEC §5).
    assert_eq!(
        events.first().map(|e| e.seq),
        Some(1),
        "the log starts at 1"
    );
    assert!(
        events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "seqs run on without a hole: {:?}",
        events
            .windows(2)
            .find(|w| w[1].seq != w[0].seq + 1)
            .map(|w| (w[0].seq, w[1].seq))
    );
    let mut terminal: HashMap<&str, Vec<K>> = HashMap::new();
    let mut generation: HashMap<&str, u64> = HashMap::new();
    for e in events {
        let kind = e.kind();
        if kind == K::Assigned {
            generation.insert(&e.task_id, e.generation);
        }
        if matches!(kind, K::Accepted | K::Completed | K::Failed) {
            assert_eq!(
                generation.get(e.task_id.as_str()).copied(),
                Some(e.generation),
                "report at a stale generation applied: {e:?}"
            );
        }
        if matches!(kind, K::Completed | K::Failed | K::Cancelled) {
            terminal.entry(&e.task_id).or_default().push(kind);
        }
    }
    for id in acked {
        assert_eq!(
            terminal.get(id.as_str()).map(Vec::as_slice),
            Some(&[K::Completed][..]),
            "acked task {id}: terminal events"
        );
    }
    generation
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Issue test 2: SIGKILL the leader at random moments, five times, during
/// a burst of pushes and of sidecar reports. Every acked push ends
/// COMPLETED exactly once, no stale report is applied, a new leader takes
/// writes within the lease + 1 s, and the sidecars keep their tasks (no task
/// needs a second attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_five_times_loses_nothing_acked() {
    let c = HubCluster::start(3, &[]).await;
    let lease = Duration::from_secs(3);
    let _sidecars = Sidecars::start(&c, &["a1", "a2", "a3"]);
    let c = Arc::new(tokio::sync::RwLock::new(c));
    let burst = tokio::spawn(push_burst(c.clone(), "kill", 120));
    let watched_until = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = tokio::spawn(follow_across_nodes(c.clone(), watched_until.clone()));

    let mut failovers = Vec::new();
    for round in 0..5 {
        let wait = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let (victim, ws, grpc) = {
            let c = c.read().await;
            let l = c.leader().await;
            (l, c.node(l).ws_addr, c.node(l).grpc_addr)
        };
        let killed_at = Instant::now();
        c.write().await.kill(victim);
        // The first write a new leader accepts.
        let deadline = killed_at + DEADLINE;
        let took = loop {
            let c = c.read().await;
            let other = (0..3)
                .find(|i| *i != victim && c.nodes[*i].is_some())
                .unwrap();
            let mut client = c.client(other).await;
            let mut probe = crate::helpers::pinned("nobody", "probe");
            probe.task_id = format!("task-probe-{round}");
            probe.queue_if_offline = true;
            if client.push_task(probe).await.is_ok() {
                break killed_at.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "no leader took writes after the kill"
            );
            drop(c);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        failovers.push(took);
        c.write().await.restart(victim, ws, grpc).await;
    }
    let acked = burst.await.unwrap();
    let guard = c.read().await;
    wait_finished(&guard, &acked).await;
    let events = guard.history(guard.leader().await).await;
    drop(guard);
    let generations = check_history(&events, &acked);
    // The dashboard that resumed through whichever node answered saw the
    // same log: every event once, in order, none missing.
    watched_until.store(
        events.last().unwrap().seq,
        std::sync::atomic::Ordering::Release,
    );
    let watched = tokio::time::timeout(DEADLINE, watcher)
        .await
        .expect("the watcher catches up")
        .unwrap();
    let seqs = |v: &[pb::TaskEvent]| {
        v.iter()
            .map(|e| (e.seq, e.task_id.clone(), e.kind))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(&watched),
        seqs(&events),
        "a watcher resuming across nodes"
    );
    let retried: BTreeSet<&String> = acked
        .iter()
        .filter(|id| generations.get(*id).copied().unwrap_or(0) > 1)
        .collect();
    assert!(
        retried.is_empty(),
        "tasks reassigned after a kill: {retried:?}"
    );
    let max = failovers.iter().max().unwrap();
    eprintln!("failover after leader SIGKILL: {failovers:?}");
    assert!(
        *max <= lease + Duration::from_secs(1),
        "failover took {failovers:?} (bound: lease + 1 s)"
    );
}

/// Issue test 4: SIGKILL one NATS server during a burst. Nothing acked is
/// lost, service goes on, and the restarted server catches up with the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_nats_server_loses_nothing_acked() {
    let c = HubCluster::start(3, &[]).await;
    let _sidecars = Sidecars::start(&c, &["a1", "a2"]);
    let c = Arc::new(tokio::sync::RwLock::new(c));
    let burst = tokio::spawn(push_burst(c.clone(), "nats", 60));
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..1000))).await;
    c.write().await.nats.kill(1);
    let acked = burst.await.unwrap();
    {
        let c = c.read().await;
        wait_finished(&c, &acked).await;
        let events = c.history(c.leader().await).await;
        check_history(&events, &acked);
    }
    // The stream's head as the servers that stayed up hold it (stream
    // seqs count appends and term entries, not events).
    let head = {
        let c = c.read().await;
        let (a, _) = stream_last_seq(c.nats.monitor_port(0)).await;
        let (b, _) = stream_last_seq(c.nats.monitor_port(2)).await;
        a.max(b)
    };
    assert!(head > 0);
    c.write().await.nats.restart(1).await;
    // The restarted server's replica of the log reaches the head.
    let port = c.read().await.nats.monitor_port(1);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (last, jsz) = stream_last_seq(port).await;
        if last >= head {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted NATS server at {last}, head {head}: {jsz}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `AGENTHUB_LOG`'s last seq as one NATS server holds it (`/jsz`).
async fn stream_last_seq(port: u16) -> (u64, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(
        b"GET /jsz?accounts=true&streams=true HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let found = v["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == "AGENTHUB_LOG");
    let last = found
        .and_then(|s| s["state"]["last_seq"].as_u64())
        .unwrap_or(0);
    (last, v)
}
