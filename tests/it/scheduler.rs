//! Scheduling and the task lifecycle: queue, capabilities, priorities,
//! timeouts, reclaim, retries, recovery, restart.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agenthub::pb;
use pb::task_event::Kind as K;
use serde_json::json;

use crate::helpers::*;

fn task_req(id: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest { task_id: id.into() }
}

#[tokio::test]
async fn scheduled_tasks_spread_evenly_and_complete_exactly_once() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut watch = client
        .watch_task_events(pb::WatchTaskEventsRequest {
            after_seq: Some(0),
            kinds: vec![K::Completed as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut workers = Vec::new();
    for i in 0..4 {
        let mut sc = hub.sidecar(&format!("w{i}")).await;
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while let Some(msg) = sc.try_recv(Duration::from_secs(2)).await {
                if msg["type"] == "task_assign" {
                    let id = msg["task_id"].as_str().unwrap().to_string();
                    let g = msg["generation"].as_u64().unwrap();
                    sc.accept(&id, g).await;
                    sc.complete(&id, g, json!(sc.agent_id)).await;
                    done.push(id);
                }
            }
            done
        }));
    }
    let mut latencies = Vec::new();
    for i in 0..20 {
        let t0 = Instant::now();
        client
            .push_task(scheduled(&format!("job {i}"), &[], pb::Priority::Normal))
            .await
            .unwrap();
        latencies.push(t0.elapsed());
    }
    let completed = take_events(&mut watch, 20).await;
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for e in &completed {
        *per_task.entry(e.task_id.clone()).or_default() += 1;
    }
    assert_eq!(per_task.len(), 20);
    assert!(per_task.values().all(|n| *n == 1));
    for w in workers {
        let n = w.await.unwrap().len();
        assert!((3..=7).contains(&n), "an agent got {n} of 20 tasks");
    }
    latencies.sort();
    eprintln!(
        "PushTask round trip (scheduled, debug build): p50 {:?}, max {:?}",
        latencies[10], latencies[19]
    );
}

#[tokio::test]
async fn urgent_is_assigned_before_low_when_the_agent_frees() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("solo").await;
    let busy = client
        .push(scheduled("busy", &[], pb::Priority::Normal))
        .await;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, busy.task_id);
    let low = client.push(scheduled("low", &[], pb::Priority::Low)).await;
    let urgent = client
        .push(scheduled("urgent", &[], pb::Priority::Urgent))
        .await;
    assert_eq!(low.state, pb::task::State::Queued as i32);
    sc.accept(&id, g).await;
    sc.complete(&id, g, json!(1)).await;
    let (next, g2) = sc.next_assign().await;
    assert_eq!(next, urgent.task_id);
    sc.accept(&next, g2).await;
    sc.complete(&next, g2, json!(1)).await;
    let (last, _) = sc.next_assign().await;
    assert_eq!(last, low.task_id);
}

#[tokio::test]
async fn task_needing_a_capability_waits_for_a_capable_agent() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut cpu = hub
        .sidecar_with("cpu", json!({"capabilities": ["linux"]}))
        .await;
    let t = client
        .push(scheduled("train", &["gpu"], pb::Priority::Normal))
        .await;
    assert_eq!(t.state, pb::task::State::Queued as i32);
    assert!(cpu.try_recv(Duration::from_millis(200)).await.is_none());
    let mut gpu = hub
        .sidecar_with("gpu", json!({"capabilities": ["linux", "gpu"]}))
        .await;
    let (id, g) = gpu.next_assign().await;
    assert_eq!(id, t.task_id);
    assert_eq!(g, 1);
}

#[tokio::test]
async fn agent_joining_a_backlog_gets_at_most_its_concurrency() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    for i in 0..5 {
        client
            .push_task(scheduled(&format!("t{i}"), &[], pb::Priority::Normal))
            .await
            .unwrap();
    }
    let mut sc = hub
        .sidecar_with("pair", json!({"max_concurrency": 2}))
        .await;
    let (a, ga) = sc.next_assign().await;
    let (b, _) = sc.next_assign().await;
    assert!(
        sc.try_recv(Duration::from_millis(200)).await.is_none(),
        "more than max_concurrency"
    );
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents[0].max_concurrency, 2);
    let mut active = agents[0].active_task_ids.clone();
    active.sort();
    let mut expect = vec![a.clone(), b];
    expect.sort();
    assert_eq!(active, expect);
    sc.accept(&a, ga).await;
    sc.complete(&a, ga, json!(1)).await;
    sc.next_assign().await;
    assert!(sc.try_recv(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn accept_timeout_reclaims_and_fences_the_late_agent() {
    let hub = TestHub::start_with(|c| c.accept_timeout = Duration::from_millis(300)).await;
    let mut client = hub.client().await;
    let mut slow = hub.sidecar("slow").await;
    let t = client.push(scheduled("x", &[], pb::Priority::Normal)).await;
    let (id, g1) = slow.next_assign().await;
    assert_eq!(g1, 1);
    let mut fast = hub.sidecar("fast").await;
    let mut watch = client
        .watch_task_events(pb::WatchTaskEventsRequest {
            after_seq: Some(0),
            task_id: t.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The slow agent is told its task was taken back.
    let cancelled = slow.recv_type("task_cancelled").await;
    assert_eq!(cancelled["reason"], "accept_timeout");
    let (id2, g2) = fast.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), 2));
    let evs = take_events(&mut watch, 4).await;
    assert_eq!(
        evs.iter().map(kind).collect::<Vec<_>>(),
        [K::Created, K::Assigned, K::Reclaimed, K::Assigned]
    );
    assert_eq!(
        pb::struct_to_json(evs[2].payload.as_ref().unwrap())["reason"],
        "accept_timeout"
    );
    // The first agent's late report changes nothing.
    slow.send(json!({"type": "task_complete", "task_id": id, "generation": g1, "result": "late"}))
        .await;
    let err = slow.recv_type("error").await;
    assert_eq!(err["error"], "stale_generation");
    fast.accept(&id, g2).await;
    fast.complete(&id, g2, json!("on time")).await;
    let task = client.get_task(task_req(&id)).await.unwrap().into_inner();
    assert_eq!(
        pb::value_to_json(task.result.as_ref().unwrap()),
        json!("on time")
    );
    assert_eq!(task.attempts, 2);
}

#[tokio::test]
async fn reconnect_within_grace_keeps_the_task() {
    let hub = TestHub::start_with(|c| c.reconnect_grace = Duration::from_secs(5)).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("flaky").await;
    let t = client.push(scheduled("x", &[], pb::Priority::Normal)).await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    drop(sc);
    let agent = disconnected_agent(&client).await;
    assert_eq!(agent.active_task_ids, vec![t.task_id.clone()]);
    let mut back = hub.sidecar("flaky").await;
    back.complete(&id, g, json!("finished after reconnect"))
        .await;
    let task = client.get_task(task_req(&id)).await.unwrap().into_inner();
    assert_eq!(state_of(&task), pb::task::State::Completed);
    assert_eq!(task.generation, 1);
}

#[tokio::test]
async fn disconnect_beyond_grace_reclaims_to_another_agent() {
    let hub = TestHub::start_with(|c| c.reconnect_grace = Duration::from_millis(200)).await;
    let mut client = hub.client().await;
    let mut gone = hub.sidecar("gone").await;
    client
        .push_task(scheduled("x", &[], pb::Priority::Normal))
        .await
        .unwrap();
    let (id, g) = gone.next_assign().await;
    gone.accept(&id, g).await;
    let mut other = hub.sidecar("other").await;
    drop(gone);
    let (id2, g2) = other.next_assign().await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), 2));
    other.accept(&id, g2).await;
    other.complete(&id, g2, json!(1)).await;
    let task = client.get_task(task_req(&id)).await.unwrap().into_inner();
    assert_eq!(state_of(&task), pb::task::State::Completed);
    assert_eq!(task.agent_id, "other");
}

#[tokio::test]
async fn rejected_task_goes_to_another_agent() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut picky = hub.sidecar("picky").await;
    let mut willing = hub.sidecar("willing").await;
    let t = client.push(scheduled("x", &[], pb::Priority::Normal)).await;
    // Whoever gets it first rejects it; the other must receive it.
    let (first, second) = tokio::select! {
        a = picky.next_assign() => (a, "willing"),
        a = willing.next_assign() => (a, "picky"),
    };
    let (rejecter, taker) = if second == "willing" {
        (&mut picky, &mut willing)
    } else {
        (&mut willing, &mut picky)
    };
    rejecter
        .send(json!({"type": "task_rejected", "task_id": first.0, "generation": first.1, "reason": "busy"}))
        .await;
    assert_eq!(rejecter.recv_type("task_ack").await["status"], "rejected");
    let (id, g) = taker.next_assign().await;
    assert_eq!((id.as_str(), g), (t.task_id.as_str(), 2));
}

#[tokio::test]
async fn recovering_sidecar_continues_its_task_or_is_told_to_drop_it() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("rec").await;
    let t = client.push(pinned("rec", "x")).await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    // Still its own: continue with the current generation.
    sc.send(json!({"type": "task_recovering", "task_id": id, "last_status": "running"}))
        .await;
    let cont = sc.recv_type("task_continue").await;
    assert_eq!(
        (cont["task_id"].as_str(), cont["generation"].as_u64()),
        (Some(id.as_str()), Some(g))
    );
    sc.complete(&id, g, json!(1)).await;
    // Finished, unknown, or someone else's: drop it.
    sc.send(json!({"type": "task_recovering", "task_id": id}))
        .await;
    assert_eq!(sc.recv_type("task_reassign").await["task_id"], id.as_str());
    sc.send(json!({"type": "task_recovering", "task_id": "task-ffffffffffffffff"}))
        .await;
    assert_eq!(
        sc.recv_type("task_reassign").await["task_id"],
        "task-ffffffffffffffff"
    );
    let mut watch = client
        .watch_task_events(pb::WatchTaskEventsRequest {
            after_seq: Some(0),
            task_id: t.task_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<_> = take_events(&mut watch, 6).await.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            K::Created,
            K::Assigned,
            K::Accepted,
            K::Recovering,
            K::Continued,
            K::Completed
        ]
    );
}

#[tokio::test]
async fn always_failing_task_is_dead_lettered_after_max_attempts_and_can_be_retried() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("f").await;
    let mut req = scheduled("doomed", &[], pb::Priority::Normal);
    req.max_attempts = 3;
    let t = client.push(req).await;
    for attempt in 1..=3u64 {
        let (id, g) = sc.next_assign().await;
        assert_eq!(g, attempt);
        sc.accept(&id, g).await;
        sc.send(json!({"type": "task_failed", "task_id": id, "generation": g, "error": format!("boom {attempt}")}))
            .await;
        assert_eq!(sc.recv_type("task_ack").await["status"], "failed");
    }
    assert!(
        sc.try_recv(Duration::from_millis(200)).await.is_none(),
        "a 4th attempt"
    );
    let dead = client
        .list_tasks(pb::ListTasksRequest {
            state: pb::task::State::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.tasks.len(), 1);
    assert_eq!(dead.tasks[0].attempts, 3);
    assert_eq!(
        pb::value_to_json(dead.tasks[0].error.as_ref().unwrap()),
        json!("boom 3")
    );

    let retried = client
        .retry_task(pb::RetryTaskRequest {
            task_id: t.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Re-queued with attempts reset, and (the agent being free) assigned at once.
    assert!(matches!(
        state_of(&retried),
        pb::task::State::Queued | pb::task::State::Assigned
    ));
    assert!(retried.attempts <= 1);
    let (id, g) = sc.next_assign().await;
    assert_eq!((id.as_str(), g), (t.task_id.as_str(), 4));
    let e = client
        .retry_task(pb::RetryTaskRequest { task_id: t.task_id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn cancel_while_running_tells_the_sidecar_and_finishes_the_task() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("c").await;
    let t = client.push(pinned("c", "x")).await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    let task = client
        .cancel_task(pb::CancelTaskRequest {
            task_id: t.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&task), pb::task::State::Cancelled);
    assert_eq!(sc.recv_type("task_cancelled").await["task_id"], id.as_str());
    sc.send(json!({"type": "task_complete", "task_id": id, "generation": g, "result": 1}))
        .await;
    assert_eq!(sc.recv_type("error").await["error"], "task_finished");
    let e = client
        .cancel_task(pb::CancelTaskRequest { task_id: t.task_id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // A queued task can be cancelled too and is never assigned.
    let mut req = pinned("nobody", "queued");
    req.queue_if_offline = true;
    let q = client.push(req).await;
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: q.task_id.clone(),
        })
        .await
        .unwrap();
    let _late = hub.sidecar("nobody").await;
    let task = client
        .get_task(task_req(&q.task_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&task), pb::task::State::Cancelled);
}

#[tokio::test]
async fn progress_timeout_reclaims_a_silent_task() {
    let hub = TestHub::start_with(|c| c.progress_timeout = Some(Duration::from_millis(300))).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("quiet").await;
    client
        .push_task(scheduled("x", &[], pb::Priority::Normal))
        .await
        .unwrap();
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    // Silence past the timeout takes it back (progress keeping a task alive
    // is shown with paused time in `model::progress_without_accept_...`).
    let c = sc.recv_type("task_cancelled").await;
    assert_eq!(c["reason"], "progress_timeout");
    let (id2, g2) = sc.next_assign().await;
    assert_eq!((id2, g2), (id, 2));
}

#[tokio::test]
async fn restart_reschedules_queued_tasks_and_reclaims_abandoned_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let grace = |c: &mut agenthub::Config| c.reconnect_grace = Duration::from_millis(300);
    let hub = TestHub::start_in(tmp.path(), grace).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("vanishes").await;
    let held = client
        .push(scheduled("held", &[], pb::Priority::Normal))
        .await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    let queued = client
        .push(scheduled("queued", &["special"], pb::Priority::High))
        .await;
    drop(sc);
    drop(client);
    hub.stop().await;

    let hub = TestHub::start_in(tmp.path(), grace).await;
    let mut client = hub.client().await;
    let task = client
        .get_task(task_req(&held.task_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state_of(&task),
        pb::task::State::Running,
        "kept through the grace"
    );
    let mut fresh = hub
        .sidecar_with(
            "fresh",
            json!({"capabilities": ["special"], "max_concurrency": 2}),
        )
        .await;
    let mut got = vec![fresh.next_assign().await, fresh.next_assign().await];
    got.sort();
    let mut want = vec![(held.task_id.clone(), 2), (queued.task_id.clone(), 1)];
    want.sort();
    assert_eq!(got, want);
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let v = agents.iter().find(|a| a.agent_id == "vanishes").unwrap();
    assert!(!v.connected && v.active_task_ids.is_empty());
}

#[tokio::test]
async fn metrics_show_queue_depth_reclaims_and_assignment_wait() {
    let hub = TestHub::start_with(|c| c.accept_timeout = Duration::from_millis(200)).await;
    let mut client = hub.client().await;
    client
        .push_task(scheduled("u", &["none"], pb::Priority::Urgent))
        .await
        .unwrap();
    let mut sc = hub.sidecar("m").await;
    client
        .push_task(scheduled("n", &[], pb::Priority::Normal))
        .await
        .unwrap();
    sc.next_assign().await;
    sc.recv_type("task_cancelled").await;
    let http = crate::core_flow::Http::new(hub.ws_addr);
    let (_, text) = http.get_text("/metrics").await;
    for needle in [
        "agenthub_queue_depth{priority=\"URGENT\"} 1",
        "agenthub_reclaims_total{reason=\"accept_timeout\"} 1",
        "agenthub_assignment_wait_seconds_count",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
}

#[tokio::test]
async fn a_rejecting_agent_is_not_offered_the_task_again() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut lone = hub.sidecar("lone").await;
    let t = client.push(scheduled("x", &[], pb::Priority::Normal)).await;
    let (id, g) = lone.next_assign().await;
    lone.send(
        json!({"type": "task_rejected", "task_id": id, "generation": g, "reason": "not mine"}),
    )
    .await;
    assert_eq!(lone.recv_type("task_ack").await["status"], "rejected");
    assert!(
        lone.try_recv(Duration::from_millis(300)).await.is_none(),
        "offered again to the rejecter"
    );
    let task = client
        .get_task(task_req(&t.task_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&task), pb::task::State::Queued);
    let mut next = hub.sidecar("next").await;
    assert_eq!(next.next_assign().await, (id, 2));
}

#[tokio::test]
async fn a_draining_agent_gets_no_new_tasks_until_ready_again() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar_with("d", json!({"max_concurrency": 4})).await;
    let first = client.push(scheduled("a", &[], pb::Priority::Normal)).await;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, first.task_id);
    sc.accept(&id, g).await;
    sc.send(json!({"type": "status", "status": "draining"}))
        .await;
    let second = client.push(scheduled("b", &[], pb::Priority::Normal)).await;
    assert_eq!(second.state, pb::task::State::Queued as i32);
    // It still finishes what it holds.
    sc.complete(&id, g, json!(1)).await;
    assert!(
        sc.try_recv(Duration::from_millis(300)).await.is_none(),
        "a draining agent got work"
    );
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents[0].status, "draining");
    sc.send(json!({"type": "status", "status": "ready"})).await;
    assert_eq!(sc.next_assign().await.0, second.task_id);
}
