//! Ready means ready: a node that reports SERVING serves, and a copy that
//! fails to apply the log once catches up by itself.

use std::sync::Arc;
use std::time::Duration;

use agenthub::client::connect;
use agenthub::cluster::log::ClusterStore;
use agenthub::cluster::{ClusterOptions, Node};
use agenthub::store::{Faults, Store};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::fence::{commit, created, open};
use super::hubs::DEADLINE;
use super::nats::NatsCluster;
use crate::helpers::{eventually, pinned, HubProcess, Sidecar, WAIT};

/// `agenthub token issue ARGS --nats URLS`, as an operator would before
/// starting the nodes.
fn issue(urls: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["token", "issue"])
        .args(args)
        .args(["--nats", urls])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "token issue: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Wait until the node's gRPC health answers SERVING (polled as a load
/// balancer would).
pub async fn serving(node: &HubProcess) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let endpoint = format!("http://{}", node.grpc_addr);
    loop {
        let status = async {
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .ok()?
                .connect()
                .await
                .ok()?;
            let r = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: "agenthub.v1.TaskHub".into(),
                })
                .await
                .ok()?;
            Some(r.into_inner().status)
        }
        .await;
        if status == Some(1) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Leaderships the node has seen since it started (its
/// `agenthub_cluster_leaderships`).
async fn leaderships(node: &HubProcess) -> f64 {
    let text = crate::core_flow::Http::new(node.ws_addr)
        .get_text("/metrics")
        .await
        .1;
    crate::helpers::metric(&text, "agenthub_cluster_leaderships").unwrap_or(0.0)
}

/// Why a round did not count: the leader changed after the nodes reported
/// SERVING (a lease not renewed in time on a starved machine). Serving
/// through an election is its own case (the calls wait for the next
/// leader, within 2 × the lease).
struct Disturbed(String);

/// One fresh three-node cluster: the three nodes start together; on each,
/// as soon as it reports SERVING, a sidecar identifies; then each node
/// takes a push pinned to the agent on the next node. Nothing is answered
/// UNAVAILABLE, no socket is closed — unless the leader changed since the
/// nodes reported SERVING (then the round is `Disturbed`, and retried).
async fn one_fresh_cluster(round: usize) -> Result<(), Disturbed> {
    let nats = NatsCluster::start().await;
    let urls = nats.url_list();
    let tmp = tempfile::tempdir().unwrap();
    let orchestrator = issue(&urls, &["--role", "orchestrator"]);
    let agents: Vec<String> = (0..3).map(|i| format!("agent-{i}")).collect();
    let tokens: Vec<String> = agents
        .iter()
        .map(|a| issue(&urls, &["--agent", a]))
        .collect();
    let nodes = futures_util::future::join_all((0..3).map(|i| {
        let dir = tmp.path().join(format!("n{i}"));
        let urls = urls.clone();
        async move {
            let id = format!("n{i}");
            HubProcess::spawn(&dir, &["--nats", &urls, "--node-id", &id]).await
        }
    }))
    .await;
    let sidecars = futures_util::future::join_all((0..3).map(|i| {
        let node = &nodes[i];
        let (agent, token) = (&agents[i], &tokens[i]);
        async move {
            serving(node).await;
            let seen = leaderships(node).await;
            let url = format!("ws://{}/ws", node.ws_addr);
            let mut sc = Sidecar::send_identify(&url, agent, token, serde_json::json!({})).await;
            let answer = sc.try_recv(WAIT).await;
            if answer.as_ref().map(|v| v["type"].clone()) != Some("identified".into())
                && leaderships(node).await > seen
            {
                return Err(Disturbed(format!("identify on n{i}: {answer:?}")));
            }
            assert_eq!(
                answer.as_ref().map(|v| v["type"].clone()),
                Some("identified".into()),
                "round {round}: node n{i} reported SERVING, then its identify got {answer:?} \
                 (None: the socket was closed), with no change of leader"
            );
            Ok((sc, seen))
        }
    }))
    .await;
    let sidecars = sidecars.into_iter().collect::<Result<Vec<_>, _>>()?;
    let pushed = futures_util::future::join_all((0..3).map(|i| {
        let node = &nodes[i];
        let target = &agents[(i + 1) % 3];
        let token = &orchestrator;
        async move {
            let seen = leaderships(node).await;
            let mut client = connect(&node.grpc_addr.to_string(), token).await.unwrap();
            match client.push_task(pinned(target, "ready?")).await {
                Ok(r) => Ok(r.into_inner().task_id),
                Err(s) if leaderships(node).await > seen => {
                    Err(Disturbed(format!("push through n{i}: {s:?}")))
                }
                Err(s) => panic!("round {round}: push through n{i}: {s:?}"),
            }
        }
    }))
    .await;
    let pushed = pushed.into_iter().collect::<Result<Vec<_>, _>>()?;
    for (i, (mut sc, seen)) in sidecars.into_iter().enumerate() {
        let task = &pushed[(i + 2) % 3];
        let got = sc.try_recv(WAIT).await;
        let assigned = got
            .as_ref()
            .map(|v| (v["type"].clone(), v["task_id"].clone()))
            == Some(("task_assign".into(), task.as_str().into()));
        if !assigned && leaderships(&nodes[i]).await > seen {
            return Err(Disturbed(format!("sidecar on n{i}: {got:?}")));
        }
        assert_eq!(
            got.as_ref()
                .map(|v| (v["type"].clone(), v["task_id"].clone())),
            Some(("task_assign".into(), task.as_str().into())),
            "round {round}: sidecar on n{i} got {got:?} (None: the socket was closed)"
        );
    }
    Ok(())
}

/// Fresh three-node clusters in a row (`AGENTHUB_TEST_FRESH_CLUSTERS`,
/// default 20), each used as soon as its nodes report SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_clusters_serve_as_soon_as_they_report_serving() {
    let rounds: usize = std::env::var("AGENTHUB_TEST_FRESH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // A round disturbed by a change of leader is run again, a few times
    // at most: the rounds that count all ran on one leadership.
    let mut disturbed = Vec::new();
    let mut round = 0;
    while round < rounds {
        match one_fresh_cluster(round).await {
            Ok(()) => round += 1,
            Err(Disturbed(what)) => {
                eprintln!("round {round}: the leader changed after SERVING ({what}); again");
                disturbed.push(what);
                assert!(
                    disturbed.len() <= 3,
                    "the leader changed in {} rounds: {disturbed:?}",
                    disturbed.len()
                );
            }
        }
    }
}

/// Node `id`'s store on `nats`, in `dir/id`, with `faults` injected.
async fn open_with_faults(
    nats: &NatsCluster,
    dir: &std::path::Path,
    id: &str,
    faults: &Arc<Faults>,
) -> Arc<ClusterStore> {
    let node = Node::connect(ClusterOptions::new(&nats.url_list(), id))
        .await
        .unwrap();
    ClusterStore::open_with_faults(node, &dir.join(id), Some(faults.clone()))
        .await
        .unwrap()
}

/// A leading writer and a follower with faults injected, on a fresh NATS
/// cluster; `base`: the writer's last seq once it leads.
struct Pair {
    _nats: NatsCluster,
    _tmp: tempfile::TempDir,
    writer: Arc<ClusterStore>,
    follower: Arc<ClusterStore>,
    faults: Arc<Faults>,
    base: u64,
}

impl Pair {
    async fn start() -> Pair {
        let nats = NatsCluster::start().await;
        let tmp = tempfile::tempdir().unwrap();
        let writer = open(&nats, tmp.path(), "w").await;
        let faults = Arc::new(Faults::default());
        let follower = open_with_faults(&nats, tmp.path(), "f", &faults).await;
        writer.promote("w/1").await.unwrap();
        let base = writer.durable_seq();
        Pair {
            _nats: nats,
            _tmp: tmp,
            writer,
            follower,
            faults,
            base,
        }
    }
}

/// A follower whose local copy fails to apply an entry (a transient local
/// fault: SQLITE_BUSY, a full disk) retries with backoff and catches up
/// with everything appended since, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_apply_fails_once_catches_up_without_a_restart() {
    let p = Pair::start().await;

    p.faults.fail_next(1);
    commit(&p.writer, created(p.base + 1, "task-f1"))
        .await
        .unwrap();
    eventually(|| async { (p.faults.injected() == 1).then_some(()) }).await;
    commit(&p.writer, created(p.base + 2, "task-f2"))
        .await
        .unwrap();
    commit(&p.writer, created(p.base + 3, "task-f3"))
        .await
        .unwrap();

    // The follower's own following (no catch-up asked of it) gets there.
    eventually(|| async { (p.follower.durable_seq() == p.base + 3).then_some(()) }).await;
    for id in ["task-f1", "task-f2", "task-f3"] {
        assert!(p.follower.get_task(id).unwrap().is_some(), "{id}");
    }
    assert_eq!(p.faults.injected(), 1);
}

/// A follower whose consumer goes quiet without an error (seen when its
/// NATS server goes away while the consumer is being recreated) notices
/// that the log holds entries it was never given, and follows with a new
/// consumer: it catches up without a restart and without a catch-up asked
/// of it. Without that check it stayed behind for good (and, not ready,
/// held every call made to it until the call's wait for a leader ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_consumer_goes_quiet_catches_up_without_a_restart() {
    let p = Pair::start().await;

    p.faults.lose_deliveries(true);
    commit(&p.writer, created(p.base + 1, "task-q1"))
        .await
        .unwrap();
    eventually(|| async { (p.faults.lost_deliveries() >= 1).then_some(()) }).await;
    p.faults.lose_deliveries(false);
    // Delivered to the quiet consumer, which drops it too.
    commit(&p.writer, created(p.base + 2, "task-q2"))
        .await
        .unwrap();

    eventually(|| async { (p.follower.durable_seq() == p.base + 2).then_some(()) }).await;
    for id in ["task-q1", "task-q2"] {
        assert!(p.follower.get_task(id).unwrap().is_some(), "{id}");
    }
}

/// A follower asked again and again to catch up while its consumer
/// delivers nothing (as happens when each node that wins the lease catches
/// up before it fences the log, while NATS recovers from a lost server)
/// keeps following: each request replaces the consumer of the moment at
/// once, and is neither a failure nor held against the next consumer.
/// Before, each request ended the consumer as a failure, the pauses between
/// consumers grew to 5 s, and a request made during a pause ended the next
/// consumer at its start: the lease winners, each waiting for its own copy
/// to bring its term entry, timed out one after another and the cluster
/// went minutes without a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_asked_to_catch_up_again_and_again_keeps_following() {
    let p = Pair::start().await;

    p.faults.lose_deliveries(true);
    for i in 1..=4 {
        commit(&p.writer, created(p.base + i, &format!("task-c{i}")))
            .await
            .unwrap();
        // Read directly, and a new consumer asked for.
        p.follower.catch_up().await.unwrap();
        assert_eq!(p.follower.durable_seq(), p.base + i);
    }
    p.faults.lose_deliveries(false);
    // Appended after the last catch-up: only the follower's consumer brings it.
    commit(&p.writer, created(p.base + 5, "task-c5"))
        .await
        .unwrap();

    eventually(|| async { (p.follower.durable_seq() == p.base + 5).then_some(()) }).await;
    assert!(p.follower.get_task("task-c5").unwrap().is_some());
    assert!(p.faults.lost_deliveries() >= 1);
    // The only failures are consumers found quiet by the follower's own
    // check (the injected fault, when a catch-up comes late under load).
    assert_eq!(
        p.faults.follow_failures(),
        p.faults.stalls(),
        "a requested consumer counted as a failure"
    );
}

/// A node whose first catch-ups with the log fail while it starts (a
/// request to a settling NATS cluster times out) retries them, as it does
/// the rest of its setup, instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_catch_up_fails_while_it_starts_retries_it() {
    let nats = NatsCluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let writer = open(&nats, tmp.path(), "w").await;
    writer.promote("w/1").await.unwrap();
    let base = writer.durable_seq();
    commit(&writer, created(base + 1, "task-s1")).await.unwrap();

    let faults = Arc::new(Faults::default());
    faults.fail_catch_ups(2);
    let started = open_with_faults(&nats, tmp.path(), "s", &faults).await;
    assert_eq!(faults.injected(), 2);
    assert!(started.durable_seq() > base);
    assert!(started.get_task("task-s1").unwrap().is_some());
}

/// The leader acknowledges a change once the log has stored it, without
/// waiting for its own copy: the copy is applied off the acknowledgement
/// path. Its reads still see every change acknowledged to it before they
/// began (they wait for the copy), and a copy that stops following makes
/// it step down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_acknowledges_before_its_copy_applies_and_reads_its_writes() {
    let nats = NatsCluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let writer = open_with_faults(&nats, tmp.path(), "w", &faults).await;
    writer.promote("w/1").await.unwrap();
    let base = writer.durable_seq();

    // Every commit of the copy takes 2 s: the change is acknowledged before.
    faults.set_delay(Duration::from_secs(2));
    commit(&writer, created(base + 1, "task-r1")).await.unwrap();
    assert_eq!(writer.durable_seq(), base, "the copy was on the ack path");
    // A read waits until the copy holds it.
    assert!(writer.get_task("task-r1").unwrap().is_some());
    assert_eq!(writer.durable_seq(), base + 1);
    assert_eq!(writer.read_events(base, 10).unwrap().len(), 1);
    faults.set_delay(Duration::ZERO);

    // A copy that cannot apply what the log acknowledged: the leader steps
    // down (after the copy's timeout) and appends nothing more.
    faults.fail_all(agenthub::error::StorageFault::Io);
    commit(&writer, created(base + 2, "task-r2")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while writer.is_leader() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still leading with a copy that does not follow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(commit(&writer, created(base + 3, "task-r3")).await.is_err());
}
