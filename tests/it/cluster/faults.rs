//! Cluster mode under faults: a paused leader, killed leaders, a killed
//! NATS server, revoked tokens.

use std::time::{Duration, Instant};

use serde_json::json;

use super::hubs::{HubCluster, DEADLINE};
use crate::helpers::{pinned, Sidecar};
use crate::smoke::harness::signal;
use agenthub::pb;

async fn identify(url: &str, agent: &str, token: &str) -> Sidecar {
    let mut sc = Sidecar::connect(url).await;
    sc.send(json!({"type": "identify", "agent_id": agent, "token": token, "protocol_version": 1}))
        .await;
    sc.recv_type("identified").await;
    sc
}

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
    let mut to_new = c.client(new).await;
    let mut after = pinned("nobody", "after the takeover");
    after.queue_if_offline = true;
    let after = to_new.push_task(after).await.unwrap().into_inner();

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
    let mut sc = identify(&c.ws_url(1), "a1", &token).await;
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
        let mut again = Sidecar::connect(&c.ws_url(i)).await;
        again
            .send(json!({"type": "identify", "agent_id": "a1", "token": token, "protocol_version": 1}))
            .await;
        let err = again.recv_type("error").await;
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
