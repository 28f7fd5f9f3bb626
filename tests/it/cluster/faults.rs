//! Cluster mode under faults: a paused leader, killed leaders, a killed
//! NATS server, revoked tokens.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::hubs::{HubCluster, DEADLINE};
use crate::helpers::{pinned, ClientExt, Sidecar};
use crate::smoke::harness::signal;
use agenthub::pb;

/// Issue test 3: SIGSTOP the leader past its lease, then SIGCONT. Another
/// node leads meanwhile. A push that reached the paused node is either
/// refused (its append is fenced out by the log) or, if the node noticed
/// first that it lost the lease, carried to the new leader: acked exactly
/// when visible, on every node. The old leader steps down, follows, and
/// writes through it reach the new leader. (`fence.rs` shows the fence
/// itself, deterministically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_out_and_rejoins_as_a_follower() {
    let c = HubCluster::start(3, &["--lease", "1s"]).await;
    let old = c.leader().await;
    let pid = c.node(old).child.id().unwrap();
    let mut to_old = c.client(old).await;

    signal(pid, "STOP");
    // Sent to the paused leader: it reads it only when it resumes.
    let mut req = pinned("nobody", "sent to the paused leader");
    req.task_id = "task-paused-0000001".into();
    req.queue_if_offline = true;
    let pending = tokio::spawn(async move { to_old.push_task(req).await });

    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let deadline = Instant::now() + DEADLINE;
    let new = loop {
        let h = c.health(others[0]).await;
        if let Some(l) = h["leader"].as_str() {
            let i: usize = l.trim_start_matches('n').parse().unwrap();
            if i != old {
                break i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader while n{old} is paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Another node's word comes first: until `new` has seen its own
    // promotion it forwards the call to the leader it knew, and answers
    // UNAVAILABLE when that leadership ends. Clients retry that
    // (docs/cluster.md); a task_id makes the retry safe.
    let mut to_new = c.client(new).await;
    let mut after = pinned("nobody", "after the takeover");
    after.task_id = "task-after-0000001".into();
    after.queue_if_offline = true;
    let after = loop {
        match to_new.push_task(after.clone()).await {
            Ok(resp) => break resp.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("push to the new leader n{new}: {s:?}"),
        }
    };

    signal(pid, "CONT");
    let outcome = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the resumed node answers")
        .unwrap();
    let (acked, why) = match outcome {
        Ok(_) => (true, String::new()),
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            (false, status.message().to_string())
        }
    };

    // It follows now: one leader everywhere, and every node holds the new
    // leader's task, and the paused node's only if it was acked.
    assert_eq!(c.leader().await, new);
    let h = c.health(old).await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["leader"], format!("n{new}").as_str());
    for i in 0..3 {
        let mut client = c.client(i).await;
        let page = client
            .list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&str> = page.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert!(ids.contains(&after.task_id.as_str()), "node {i}: {ids:?}");
        assert_eq!(
            ids.contains(&"task-paused-0000001"),
            acked,
            "node {i}: acked={acked} ({why}) {ids:?}"
        );
    }
    // A write through the old leader reaches the new one.
    let mut via_old = c.client(old).await;
    let mut again = pinned("nobody", "through the old leader");
    again.queue_if_offline = true;
    let resp = via_old.push_task(again).await.unwrap().into_inner();
    assert!(resp.created);
}

/// Issue test 5: a token revoked with `token revoke --nats` is refused on
/// every node, and a session identified with it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revocation_holds_on_every_node() {
    let c = HubCluster::start(3, &[]).await;
    let token = c.agent_token("a1");
    let mut sc = c.identify(1, "a1", &token).await;
    let id = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["token", "list", "--nats"])
            .arg(c.nats.url_list())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("\"a1\""))
            .expect("the agent token is listed");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["token", "revoke", &id, "--nats"])
        .arg(c.nats.url_list())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    assert_eq!(sc.recv_close().await, Some(4401));
    for i in 0..3 {
        // A change of leader meanwhile closes the socket with 1012: the
        // sidecar reconnects, as any does, and asks again.
        let deadline = Instant::now() + DEADLINE;
        let err = loop {
            let mut again = Sidecar::send_identify(&c.ws_url(i), "a1", &token, json!({})).await;
            if let Some(v) = again.try_recv(Duration::from_secs(10)).await {
                break v;
            }
            assert!(Instant::now() < deadline, "node {i} never answered");
        };
        assert_eq!(err["type"], "error", "node {i}: {err}");
        assert_eq!(err["error"], "invalid_token", "node {i}");
    }
}

/// A leader stopped with SIGTERM hands its lease back: another node leads
/// before the lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_shut_down_hands_over_before_its_lease_runs_out() {
    let mut c = HubCluster::start(3, &[]).await;
    let old = c.leader().await;
    let lease = Duration::from_secs(3);
    let stopped_at = Instant::now();
    signal(c.node(old).child.id().unwrap(), "TERM");
    c.nodes[old].as_mut().unwrap().wait_exit().await;
    c.nodes[old] = None;
    let new = c.leader().await;
    let took = stopped_at.elapsed();
    assert_ne!(new, old);
    assert!(took < lease, "handover took {took:?} (lease {lease:?})");
    let mut client = c.client(new).await;
    let mut req = pinned("nobody", "after the handover");
    req.queue_if_offline = true;
    assert!(client.push_task(req).await.unwrap().into_inner().created);
}

/// Wait until node `i` takes writes (`/health` is `ok`).
async fn wait_writable(c: &HubCluster, i: usize) {
    let deadline = Instant::now() + DEADLINE;
    while c.health(i).await["status"] != "ok" {
        assert!(
            Instant::now() < deadline,
            "node {i} never took writes again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A change larger than the log takes in one entry (NATS takes 1 MiB
/// messages) is refused alone, with a clear error: a push whose metadata
/// grows past it in the log gets `RESOURCE_EXHAUSTED`, and a sidecar whose
/// result is a 600 KB frame but over 3 MB as a protobuf event gets
/// `invalid_message`. The leader keeps leading, nothing of either is
/// stored, and the same report with a normal result is taken right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_for_the_log_is_refused_and_the_leader_stays() {
    let c = HubCluster::start(3, &[]).await;
    let leader = c.leader().await;
    let leader_id = HubCluster::node_id(leader);
    let token = c.agent_token("a1");
    let mut sc = c.identify(leader, "a1", &token).await;
    let mut client = c.client(leader).await;

    // Over gRPC: a push whose metadata (300 KB as a request) grows past
    // 1 MiB in the log (each control character is six bytes in JSON).
    let ctl = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(
            "\u{1}".repeat(300_000),
        )),
    };
    let mut big = pinned("a1", "metadata too large for one log entry");
    big.task_id = "task-too-large-00001".into();
    big.metadata = Some(prost_types::Struct {
        fields: [("ctl".to_string(), ctl)].into(),
    });
    let refused = client.push_task(big).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("more than"), "{refused:?}");
    wait_writable(&c, leader).await;
    let missing = client
        .get_task(pb::GetTaskRequest {
            task_id: "task-too-large-00001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let resp = client
        .push_task(pinned("a1", "a result too large"))
        .await
        .unwrap()
        .into_inner();
    let id = resp.task_id;
    sc.recv_type("task_assign").await;
    sc.send(json!({"type": "task_accepted", "task_id": id, "generation": 1}))
        .await;
    assert_eq!(sc.recv_type("task_ack").await["status"], "accepted");

    let zeros = vec![0; 300_000];
    sc.send(json!({"type": "task_complete", "task_id": id, "generation": 1, "result": zeros}))
        .await;
    let err = sc.recv_type("error").await;
    assert_eq!(err["error"], "invalid_message", "{err}");
    let detail = err["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("more than"), "{detail}");

    // The hub rebuilds its state without the refused change (writes wait
    // for that moment, as after any failed commit); then the same report,
    // with a result the log takes, completes the task.
    wait_writable(&c, leader).await;
    sc.send(
        json!({"type": "task_complete", "task_id": id, "generation": 1, "result": {"ok": true}}),
    )
    .await;
    let ack = sc.recv_type("task_ack").await;
    assert_eq!(ack["status"], "complete", "{ack}");
    let t = client.task(&id).await;
    assert_eq!(t.state(), pb::task::State::Completed);
    assert_eq!(
        t.result.as_ref().map(pb::value_to_json),
        Some(json!({"ok": true}))
    );
    // Nobody stepped down: the same node leads, on every node's word.
    for i in 0..3 {
        assert_eq!(c.health(i).await["leader"], leader_id.as_str(), "node {i}");
    }
    // The refused result was never in the log.
    let kinds: Vec<_> = c.history(leader).await.iter().map(|e| e.kind()).collect();
    use pb::task_event::Kind as K;
    assert_eq!(kinds, [K::Created, K::Assigned, K::Accepted, K::Completed]);

    // A sidecar on a follower: a frame under the WebSocket limit (1 MiB)
    // that is over one NATS message with the relay's headers gets an
    // answer too, instead of vanishing on its way to the leader.
    let follower = (leader + 1) % 3;
    let mut far = c.identify(follower, "a2", &c.agent_token("a2")).await;
    let head = format!(r#"{{"type":"task_progress","task_id":"{id}","generation":1,"progress":""#);
    let frame = format!(r#"{head}{}"}}"#, "x".repeat(1024 * 1024 - 40 - head.len()));
    assert!(frame.len() <= 1024 * 1024);
    far.send_text(&frame).await;
    let err = far.recv_type("error").await;
    assert_eq!(err["error"], "invalid_message", "{err}");
    assert!(
        err["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("relays"),
        "{err}"
    );
}

/// One oversized report among many valid ones, sent at the same moment:
/// the oversized one gets `invalid_message`; every valid one is taken the
/// first time (no error of any kind, not even a retryable one): the
/// oversized change is refused before it joins a group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_oversized_report_among_valid_ones_fails_alone() {
    const VALID: usize = 8;
    let c = HubCluster::start(3, &[]).await;
    let leader = c.leader().await;
    let mut client = c.client(leader).await;
    let mut sidecars = Vec::new();
    for i in 0..=VALID {
        let agent = format!("s{i}");
        let mut sc = c.identify(leader, &agent, &c.agent_token(&agent)).await;
        let id = client.push(pinned(&agent, "to complete")).await.task_id;
        let (task, generation) = sc.next_assign().await;
        assert_eq!(task, id);
        sc.accept(&task, generation).await;
        sidecars.push((sc, task, generation));
    }
    let (mut big, big_task, big_gen) = sidecars.remove(0);
    // Keep the leader's log writer busy, so that reports queue up behind
    // one another (and behind the oversized one) while appends are in flight.
    let flooding = Arc::new(AtomicBool::new(true));
    let flooded = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..4 {
        let mut client = c.client(leader).await;
        let (on, n) = (flooding.clone(), flooded.clone());
        flood.push(tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                let mut req = pinned("nobody", "flood");
                req.queue_if_offline = true;
                if client.push_task(req).await.is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    crate::helpers::eventually(|| async { (flooded.load(Ordering::Relaxed) >= 40).then_some(()) })
        .await;
    // Over 3 MB as a protobuf event: no log entry can take it.
    let zeros = vec![0; 300_000];
    big.send(
        json!({"type": "task_complete", "task_id": big_task, "generation": big_gen,
                    "result": zeros}),
    )
    .await;
    let valid: Vec<_> = sidecars
        .into_iter()
        .map(|(mut sc, task, generation)| {
            tokio::spawn(async move {
                let report = json!({"type": "task_complete", "task_id": task,
                                    "generation": generation, "result": {"ok": true}});
                sc.send(report.clone()).await;
                let v = sc.recv().await;
                assert_eq!(v["type"], "task_ack", "valid report of {task}: {v}");
                assert_eq!(v["status"], "complete", "{v}");
                task
            })
        })
        .collect();
    let err = big.recv_type("error").await;
    assert_eq!(err["error"], "invalid_message", "{err}");
    assert!(
        err["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("too large"),
        "{err}"
    );
    for v in valid {
        let task = tokio::time::timeout(DEADLINE, v).await.unwrap().unwrap();
        assert_eq!(client.task(&task).await.state(), pb::task::State::Completed);
    }
    flooding.store(false, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    assert_eq!(
        client.task(&big_task).await.state(),
        pb::task::State::Running
    );
    // A push too large for the log is refused alone too, before it is built.
    let mut req = pinned("nobody", &"d".repeat(700_000));
    req.queue_if_offline = true;
    let err = client.push_task(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    let mut req = pinned("nobody", "small");
    req.queue_if_offline = true;
    assert!(client.push(req).await.created);
}
