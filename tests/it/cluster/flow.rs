//! Cluster mode with every node up: one hub across nodes.

use serde_json::json;

use super::hubs::HubCluster;
use crate::helpers::{kind, pinned, take_events, ClientExt};
use agenthub::pb;
use agenthub::pb::task_event::Kind as K;

/// Issue test 1: a push on node A reaches an agent on node C; a watcher on
/// node B sees every event once, in seq order. Also: the agent registry is
/// cluster-wide (issue test 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_on_one_node_reaches_an_agent_on_another_and_a_third_node_streams_it() {
    let c = HubCluster::start(3, &[]).await;
    let token = c.agent_token("a1");
    let mut sc = c.identify(2, "a1", &token).await;

    let mut watcher = c.client(1).await;
    let mut watch = watcher.watch_after(0).await;

    let mut pusher = c.client(0).await;
    let resp = pusher.push(pinned("a1", "across nodes")).await;
    assert!(resp.created);

    let assign = sc.recv_type("task_assign").await;
    assert_eq!(assign["task_id"], resp.task_id.as_str());
    assert_eq!(assign["description"], "across nodes");
    let id = resp.task_id.as_str();
    sc.accept(id, 1).await;
    sc.complete(id, 1, json!({"ok": true})).await;

    let events = take_events(&mut watch, 4).await;
    let kinds: Vec<_> = events.iter().map(kind).collect();
    assert_eq!(kinds, [K::Created, K::Assigned, K::Accepted, K::Completed]);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(events.iter().all(|e| e.task_id == id));

    // One node says it leads, in /metrics too; every node's copy is at the head.
    let leader = c.leader().await;
    let head = events.last().unwrap().seq;
    for i in 0..3 {
        let (_, text) = crate::core_flow::Http::new(c.node(i).ws_addr)
            .get_text("/metrics")
            .await;
        let leads = crate::helpers::metric(&text, "agenthub_cluster_leader");
        assert_eq!(leads, Some(if i == leader { 1.0 } else { 0.0 }), "node {i}");
        // Followers apply the log as it comes: wait for this one to reach the head.
        let deadline = std::time::Instant::now() + super::hubs::DEADLINE;
        loop {
            let h = c.health(i).await;
            assert_eq!(h["node_id"], format!("n{i}").as_str());
            if h["last_seq"].as_u64().unwrap() >= head {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {i}: {h}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    // Every node answers reads the same way, on one log (SPEC §8 `log_id`).
    let mut log_ids = Vec::new();
    for i in 0..3 {
        let mut client = c.client(i).await;
        let page = client
            .list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner();
        log_ids.push(page.log_id);
        // WatchTaskEvents is served by each node from its own copy.
        let watch = client
            .watch_task_events(pb::WatchTaskEventsRequest {
                after_seq: Some(head),
                ..Default::default()
            })
            .await
            .unwrap();
        let header = watch.metadata().get("agenthub-log-id").unwrap();
        log_ids.push(header.to_str().unwrap().to_string());
    }
    assert!(!log_ids[0].is_empty());
    assert!(log_ids.iter().all(|l| *l == log_ids[0]), "{log_ids:?}");
    for i in 0..3 {
        let mut client = c.client(i).await;
        let task = client.task(id).await;
        assert_eq!(task.state(), pb::task::State::Completed, "node {i}");
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents;
        assert!(
            agents.iter().any(|a| a.agent_id == "a1" && a.connected),
            "node {i}: {agents:?}"
        );
    }
}

/// The same agent identifying on a second node replaces its first session
/// (issue test 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_agent_on_two_nodes_is_one_session() {
    let c = HubCluster::start(3, &[]).await;
    let token = c.agent_token("a1");
    let mut first = c.identify(0, "a1", &token).await;
    let _second = c.identify(1, "a1", &token).await;
    let err = first.recv_type("error").await;
    assert_eq!(err["error"], "session_replaced");
    assert_eq!(first.recv_close().await, Some(4000));
}

/// A follower carries calls whose answers are larger than one NATS message
/// (a page of tasks with big results, 1 MiB by default), and tells a client
/// whose request it cannot carry to send it to the leader, instead of
/// "cannot reach the cluster".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_carries_answers_larger_than_one_nats_message() {
    let c = HubCluster::start(3, &[]).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    let token = c.agent_token("a1");
    let mut sc = c.identify(leader, "a1", &token).await;
    let mut to_leader = c.client(leader).await;
    let big = "r".repeat(450 * 1024);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = to_leader.push(pinned("a1", "a big result")).await.task_id;
        sc.recv_type("task_assign").await;
        sc.accept(&id, 1).await;
        sc.complete(&id, 1, json!(big)).await;
        ids.push(id);
    }

    let mut via_follower = c.client(follower).await;
    let page = via_follower
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .expect("a page of 1.3 MB through a follower")
        .into_inner();
    let listed: Vec<&String> = page.tasks.iter().map(|t| &t.task_id).collect();
    assert_eq!(listed, ids.iter().collect::<Vec<_>>());
    for t in &page.tasks {
        assert_eq!(
            t.result.as_ref().map(pb::value_to_json),
            Some(json!(big)),
            "{}",
            t.task_id
        );
    }

    // A sidecar relayed through the follower gets a task_assign whose
    // frame is over 1 MiB (each control character is six bytes in JSON),
    // whole, and its report about it comes back.
    let mut far = c.identify(follower, "a2", &c.agent_token("a2")).await;
    let ctl = "\u{1}".repeat(300_000);
    let id = to_leader.push(pinned("a2", &ctl)).await.task_id;
    let assign = far.recv_type("task_assign").await;
    assert_eq!(assign["task_id"], id.as_str());
    assert_eq!(assign["description"], ctl.as_str());
    assert!(assign.to_string().len() > 1024 * 1024);
    far.accept(&id, 1).await;

    // A request over one NATS message with the forwarding headers, though
    // under the hub's own 1 MiB limit: refused with what to do.
    let refused = via_follower
        .push_task(pinned("a1", &"d".repeat(1024 * 1024 - 64)))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("send it to the leader"),
        "{refused:?}"
    );
}

/// A re-push of a task id that has left every node's memory, through a
/// follower: the store decides it exists, the answer is `created=false`
/// (a different request: `ALREADY_EXISTS`), and the cluster keeps taking
/// writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repush_of_a_long_finished_id_through_a_follower_answers_created_false() {
    let c = HubCluster::start(3, &["--finished-cache", "4"]).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    let mut pusher = c.client(leader).await;
    let req = |i: usize| pb::PushTaskRequest {
        task_id: format!("fixed-{i}"),
        description: format!("fixed {i}"),
        needed_capabilities: vec!["nobody-has-this".into()],
        ..Default::default()
    };
    for i in 0..40 {
        let id = pusher.push(req(i)).await.task_id;
        pusher
            .cancel_task(pb::CancelTaskRequest { task_id: id })
            .await
            .unwrap();
    }
    let mut through = c.client(follower).await;
    let again = through.push(req(0)).await;
    assert!(!again.created);
    assert_eq!(again.state, pb::task::State::Cancelled as i32);
    let mut other = req(1);
    other.description = "not the same".into();
    let err = through.push_task(other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    // Writes go on, through every node.
    for i in 0..3 {
        let mut c_i = c.client(i).await;
        assert!(c_i.push(req(1000 + i)).await.created);
    }
    assert_eq!(c.health(leader).await["status"], "ok");
}

/// A re-push after the leader that stored the first push is gone: the new
/// leader never took that push itself, yet its id filter holds the id (it
/// applied it from the log), so the store decides the id exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repush_after_a_failover_finds_the_id_the_old_leader_stored() {
    let mut c = HubCluster::start(3, &["--finished-cache", "4"]).await;
    let first = c.leader().await;
    let mut pusher = c.client(first).await;
    let req = |i: usize| pb::PushTaskRequest {
        task_id: format!("kept-{i}"),
        description: format!("kept {i}"),
        needed_capabilities: vec!["nobody-has-this".into()],
        ..Default::default()
    };
    for i in 0..20 {
        let id = pusher.push(req(i)).await.task_id;
        pusher
            .cancel_task(pb::CancelTaskRequest { task_id: id })
            .await
            .unwrap();
    }
    c.kill(first);
    let second = c.leader().await;
    assert_ne!(second, first);
    let mut next = c.client(second).await;
    let again = next.push(req(0)).await;
    assert!(!again.created);
    assert_eq!(again.state, pb::task::State::Cancelled as i32);
    let mut other = req(1);
    other.description = "not the same".into();
    let err = next.push_task(other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(next.push(req(100)).await.created);
}

/// A busy sidecar relayed through a follower answers each of many
/// assignments with `task_accepted` and `task_complete` at once, without
/// waiting for acks: the leader takes the burst and acks every report.
/// (A queue of 64 reports per relayed session refused part of such a burst
/// with `storage_unavailable`: the tasks stayed RUNNING.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_sidecar_answering_a_burst_of_assignments_gets_every_report_acked() {
    const TASKS: usize = 200;
    let c = HubCluster::start(3, &[]).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    let token = c.agent_token("busy");
    let mut sc = crate::helpers::Sidecar::send_identify(
        &c.ws_url(follower),
        "busy",
        &token,
        json!({"max_concurrency": TASKS}),
    )
    .await;
    assert_eq!(sc.recv_type("identified").await["agent_id"], "busy");
    let client = c.client(follower).await;
    let mut pushes = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let mut client = client.clone();
        pushes.spawn(async move { client.push(pinned("busy", &format!("burst {i}"))).await });
    }
    let mut ids = Vec::new();
    while let Some(r) = pushes.join_next().await {
        ids.push(r.unwrap().task_id);
    }
    let (mut accepted, mut completed) = (0, 0);
    while completed < TASKS {
        let v = sc.recv().await;
        match v["type"].as_str().unwrap() {
            "task_assign" => {
                let (id, generation) = (v["task_id"].clone(), v["generation"].clone());
                sc.send(json!({"type": "task_accepted", "task_id": id, "generation": generation}))
                    .await;
                sc.send(json!({"type": "task_complete", "task_id": id, "generation": generation, "result": {}}))
                    .await;
            }
            "task_ack" if v["status"] == "accepted" => accepted += 1,
            "task_ack" if v["status"] == "complete" => completed += 1,
            "error" => panic!("a report was refused: {v}"),
            _ => {}
        }
    }
    assert_eq!(accepted, TASKS);
    let mut reader = c.client(leader).await;
    for id in &ids {
        assert_eq!(
            reader.task(id).await.state(),
            pb::task::State::Completed,
            "{id}"
        );
    }
}
