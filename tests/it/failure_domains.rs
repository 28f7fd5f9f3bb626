//! One request's fault stays with that request: a re-pushed id, retention
//! of events, a flood from one peer, unknown ids and bad tokens never become
//! a fault of the whole hub (SPEC §4, §8).

use agenthub::pb;
use serde_json::json;
use tonic::Code;

use crate::core_flow::Http;
use crate::helpers::*;

fn with_id(mut req: pb::PushTaskRequest, id: &str) -> pb::PushTaskRequest {
    req.task_id = id.into();
    req
}

fn probe(i: usize) -> pb::PushTaskRequest {
    with_id(
        scheduled(
            &format!("probe {i}"),
            &["nobody-has-this"],
            pb::Priority::Normal,
        ),
        &format!("probe-{i}"),
    )
}

async fn health_status(hub: &TestHub) -> u16 {
    Http::new(hub.ws_addr).get_text("/health").await.0
}

async fn failed_commits(hub: &TestHub) -> f64 {
    let text = Http::new(hub.ws_addr).get_text("/metrics").await.1;
    metric(&text, "agenthub_store_commits_failed_total").unwrap_or(0.0)
}

#[tokio::test]
async fn a_repush_of_an_id_only_the_store_holds_answers_created_false() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_in(tmp.path(), |c| c.finished_cache = 4).await;
    let mut client = hub.client().await;
    // Far more finished tasks than memory keeps: the first ones are only on disk.
    for i in 0..200 {
        let pushed = client.push(probe(i)).await;
        assert!(pushed.created);
        client
            .cancel_task(pb::CancelTaskRequest {
                task_id: pushed.task_id,
            })
            .await
            .unwrap();
    }
    // Re-pushes of evicted ids race with fresh pushes: every call succeeds.
    let mut calls = Vec::new();
    for i in 0..5 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            let r = c.push_task(probe(i)).await.map(|r| r.into_inner());
            (i, true, r)
        }));
    }
    for i in 0..40 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            let req = scheduled(
                &format!("fresh {i}"),
                &["nobody-has-this"],
                pb::Priority::Low,
            );
            (i, false, c.push_task(req).await.map(|r| r.into_inner()))
        }));
    }
    for call in calls {
        let (i, repush, r) = call.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("push {i} (re-push: {repush}) failed: {e:?}"));
        if repush {
            assert!(!r.created, "probe-{i} was created again");
            assert_eq!(r.task_id, format!("probe-{i}"));
            assert_eq!(r.state, pb::task::State::Cancelled as i32);
            let task = client.task(&r.task_id).await;
            assert_eq!(task.description, format!("probe {i}"));
        } else {
            assert!(r.created);
        }
    }
    // A different request under a stored id is ALREADY_EXISTS, nothing else.
    let mut other = probe(1);
    other.description = "something else".into();
    let err = client.push_task(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(health_status(&hub).await, 200);
    assert_eq!(failed_commits(&hub).await, 0.0);

    // After a restart, memory holds none of them: the store still decides.
    hub.stop().await;
    let hub = TestHub::start_in(tmp.path(), |c| c.finished_cache = 4).await;
    let mut client = hub.client().await;
    let again = client.push(probe(0)).await;
    assert!(!again.created);
    assert_eq!(again.state, pb::task::State::Cancelled as i32);
    let err = client.push_task(other_request(7)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(client.push(probe(100_000)).await.created);
    assert_eq!(health_status(&hub).await, 200);
    assert_eq!(failed_commits(&hub).await, 0.0);
}

/// A change that fails for a reason of its own (the store's fault switch
/// refuses every change of one task, as a change too large for the log is
/// refused) fails its caller alone: the changes committed with it in the
/// same group commits all commit, the hub never reports degraded, and the
/// log has no hole.
#[tokio::test]
async fn a_change_refused_for_a_reason_of_its_own_fails_alone_and_the_rest_commit() {
    let (hub, faults) = TestHub::start_with_faults(|_| {}).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    let victim = client
        .push(pinned("a", "its report is refused"))
        .await
        .task_id;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, victim);
    sc.accept(&id, g).await;

    faults.refuse_changes_of(Some(&victim));
    // Slow commits: what arrives meanwhile is committed in groups.
    faults.set_delay(std::time::Duration::from_millis(5));
    let mut pushes = Vec::new();
    for i in 0..40 {
        let mut c = client.clone();
        pushes.push(tokio::spawn(async move {
            let req = scheduled(
                &format!("other {i}"),
                &["nobody-has-this"],
                pb::Priority::Low,
            );
            c.push_task(req).await.map(|r| r.into_inner())
        }));
    }
    sc.send(json!({"type": "task_progress", "task_id": id, "generation": g, "progress": 50}))
        .await;
    sc.send(json!({"type": "task_complete", "task_id": id, "generation": g, "result": "done"}))
        .await;
    let mut errors = Vec::new();
    for _ in 0..2 {
        let v = sc.recv().await;
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["task_id"], json!(victim), "{v}");
        errors.push(v["error"].clone());
    }
    assert_eq!(errors, [json!("invalid_message"), json!("invalid_message")]);
    for p in pushes {
        let r = p
            .await
            .unwrap()
            .expect("a change committed beside the refused one");
        assert!(r.created);
    }
    faults.set_delay(std::time::Duration::ZERO);
    assert!(faults.injected() >= 2);
    assert_eq!(client.task(&victim).await.state(), pb::task::State::Running);
    assert_eq!(health_status(&hub).await, 200);
    assert_eq!(failed_commits(&hub).await, 0.0);

    // The fault gone, the same report is taken.
    faults.refuse_changes_of(None);
    sc.complete(&id, g, json!("done")).await;
    assert_eq!(
        client.task(&victim).await.state(),
        pb::task::State::Completed
    );
    // Every seq from 1 to the last is there, once: no change left a hole.
    let last = client.task(&victim).await.last_seq;
    let events = take_events(&mut client.watch_after(0).await, last as usize).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<u64>>());
}

fn other_request(i: usize) -> pb::PushTaskRequest {
    let mut req = probe(i);
    req.priority = pb::Priority::Urgent as i32;
    req
}

/// Every field `GetTask` answers, as the client sees it.
async fn snapshot(client: &mut agenthub::client::HubClient, ids: &[String]) -> Vec<pb::Task> {
    let mut out = Vec::new();
    for id in ids {
        out.push(client.task(id).await);
    }
    out
}

#[tokio::test]
async fn event_retention_never_changes_what_get_task_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let tweak = |c: &mut agenthub::Config| {
        c.event_retention = Some(10);
        c.finished_cache = 2;
    };
    let hub = TestHub::start_in(tmp.path(), tweak).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    let mut ids = Vec::new();
    // A queued task, a completed one with a result, a failed and a cancelled one.
    ids.push(
        client
            .push(scheduled("waits for a gpu", &["gpu"], pb::Priority::High))
            .await
            .task_id,
    );
    let done = client.push(pinned("a", "completes")).await.task_id;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    sc.complete(&id, g, json!({"answer": 42, "text": "x".repeat(300)}))
        .await;
    ids.push(done);
    let mut req = pinned("a", "fails");
    req.max_attempts = 1;
    let failed = client.push(req).await.task_id;
    let (id, g) = sc.next_assign().await;
    sc.send(json!({"type": "task_failed", "task_id": id, "generation": g, "error": "boom"}))
        .await;
    ids.push(failed);
    let cancelled = client
        .push(scheduled("cancelled", &["gpu"], pb::Priority::Low))
        .await
        .task_id;
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: cancelled.clone(),
        })
        .await
        .unwrap();
    ids.push(cancelled);
    hub.hub.flush().await.unwrap();
    let before = snapshot(&mut client, &ids).await;
    assert_eq!(before[0].description, "waits for a gpu");
    assert!(before[1].result.is_some());

    // Many more events than retention keeps, one commit each.
    for i in 0..200 {
        client
            .push(scheduled(
                &format!("filler {i}"),
                &["gpu"],
                pb::Priority::Low,
            ))
            .await;
    }
    // Old cursors go out of range: pruning runs as the copy applies the log.
    eventually(|| {
        let mut client = client.clone();
        async move {
            let watch = client
                .watch_task_events(pb::WatchTaskEventsRequest {
                    after_seq: Some(0),
                    ..Default::default()
                })
                .await;
            match watch {
                Err(e) if e.code() == Code::OutOfRange => Some(()),
                Err(e) => panic!("{e:?}"),
                Ok(_) => None,
            }
        }
    })
    .await;
    assert_eq!(snapshot(&mut client, &ids).await, before);

    hub.stop().await;
    let hub = TestHub::start_in(tmp.path(), tweak).await;
    let mut client = hub.client().await;
    assert_eq!(snapshot(&mut client, &ids).await, before);
    // The queued task is still assignable with its description.
    let mut gpu = hub
        .sidecar_with("g", json!({"capabilities": ["gpu"]}))
        .await;
    let assign = gpu.recv_type("task_assign").await;
    assert_eq!(assign["task_id"], json!(ids[0]));
    assert_eq!(assign["description"], json!("waits for a gpu"));
    let problems = agenthub::store::sqlite::SqliteStore::open(tmp.path(), None, false)
        .unwrap()
        .check()
        .unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

async fn metric_of(hub: &TestHub, name: &str) -> f64 {
    let text = Http::new(hub.ws_addr).get_text("/metrics").await.1;
    metric(&text, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_go_with_their_tasks() {
    use futures_util::StreamExt;
    let hub = TestHub::start_with(|c| {
        c.progress_timeout = Some(std::time::Duration::from_secs(3600));
        c.finished_cache = 16;
    })
    .await;
    // 100,000 tasks, each arming a queue TTL and a deadline, then cancelled.
    const N: usize = 100_000;
    let deadline_ms = agenthub::model::now_ms() + 3_600_000;
    let h = hub.hub.clone();
    futures_util::stream::iter(0..N)
        .map(|i| {
            let h = h.clone();
            async move {
                let pushed = h
                    .push_task(agenthub::hub::PushRequest {
                        description: format!("t{i}"),
                        needed_capabilities: vec!["nobody-has-this".into()],
                        queue_ttl_ms: 3_600_000,
                        deadline_ms,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                h.cancel_task(&pushed.task.task_id).await.unwrap();
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
    // Running tasks arm accept and progress timers; cancelled, they go too.
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    for i in 0..20 {
        let pushed = client.push(pinned("a", &format!("runs {i}"))).await;
        let (id, g) = sc.next_assign().await;
        assert_eq!(id, pushed.task_id);
        sc.accept(&id, g).await;
        client
            .cancel_task(pb::CancelTaskRequest { task_id: id })
            .await
            .unwrap();
        sc.recv_type("task_cancelled").await;
    }
    assert_eq!(metric_of(&hub, "agenthub_timers").await, 0.0);
    assert!(metric_of(&hub, "agenthub_tasks_in_memory").await <= 16.0);
}

#[tokio::test]
async fn watching_the_output_of_unknown_ids_keeps_nothing() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    for i in 0..1000 {
        let err = client
            .watch_task_output(pb::WatchTaskOutputRequest {
                task_id: format!("no-such-task-{i}"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    assert_eq!(metric_of(&hub, "agenthub_output_watched_tasks").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_costs_a_bounded_number_of_store_reads() {
    let hub = TestHub::start().await;
    let before = metric_of(&hub, "agenthub_token_lookups_total").await;
    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for worker in 0..16 {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", hub.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        calls.push(tokio::spawn(async move {
            let mut c = pb::task_hub_client::TaskHubClient::new(channel);
            for i in 0..625u128 {
                // Each call a new token, never seen before.
                let token = format!("{:064x}", (worker as u128) << 64 | i);
                let mut req = tonic::Request::new(pb::ListAgentsRequest {});
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let err = c.list_agents(req).await.unwrap_err();
                assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
            }
        }));
    }
    for c in calls {
        c.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let lookups = metric_of(&hub, "agenthub_token_lookups_total").await - before;
    let bound = agenthub::auth::UNKNOWN_LOOKUP_BURST
        + agenthub::auth::UNKNOWN_LOOKUPS_PER_SEC * secs
        + 16.0;
    assert!(
        lookups <= bound,
        "{lookups} store look-ups for 10,000 bad tokens in {secs:.1}s (bound {bound:.0})"
    );
    // Valid tokens still work during and after the flood: one issued
    // without the hub is known after the next revocation poll.
    let mut admin = hub.client().await;
    admin.list_agents(pb::ListAgentsRequest {}).await.unwrap();
    let fresh = hub.token(agenthub::auth::Role::Viewer, None);
    let mut viewer = hub.client_with(&fresh).await;
    eventually(|| {
        let mut v = viewer.clone();
        async move { v.list_agents(pb::ListAgentsRequest {}).await.ok() }
    })
    .await;
    viewer.list_agents(pb::ListAgentsRequest {}).await.unwrap();
}

#[tokio::test]
async fn an_error_about_a_bad_frame_never_overtakes_an_earlier_ack() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    for i in 0..20 {
        client.push(pinned("a", &format!("job {i}"))).await;
        let (id, g) = sc.next_assign().await;
        // The report and a malformed frame back to back: the ack comes first.
        sc.send(json!({"type": "task_accepted", "task_id": id, "generation": g}))
            .await;
        sc.send_text("{not json").await;
        let first = sc.recv().await;
        assert_eq!(first["type"], "task_ack", "{first}");
        assert_eq!(first["task_id"], json!(id));
        let second = sc.recv().await;
        assert_eq!(second["type"], "error", "{second}");
        assert_eq!(second["error"], "invalid_json", "{second}");
        sc.complete(&id, g, json!(i)).await;
    }
}

#[tokio::test]
async fn wait_task_ends_when_its_token_is_revoked() {
    let hub = TestHub::start().await;
    let mut admin = hub.client().await;
    let issued = admin
        .issue_token(pb::IssueTokenRequest {
            role: "viewer".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let queued = admin
        .push(scheduled(
            "never runs",
            &["nobody-has-this"],
            pb::Priority::Low,
        ))
        .await;
    let mut viewer = hub.client_with(&issued.token).await;
    let waiting = tokio::spawn(async move {
        viewer
            .wait_task(pb::WaitTaskRequest {
                task_id: queued.task_id,
                timeout_ms: 600_000,
            })
            .await
    });
    // The wait is running (a read with the same token works meanwhile).
    let mut probe = hub.client_with(&issued.token).await;
    probe.list_agents(pb::ListAgentsRequest {}).await.unwrap();
    admin
        .revoke_token(pb::RevokeTokenRequest { id: issued.id })
        .await
        .unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(2), waiting)
        .await
        .expect("WaitTask ends within 2 s of the revocation")
        .unwrap();
    let err = ended.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn sighup_leaves_a_hub_without_tls_running() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::spawn(tmp.path(), &[]).await;
    let pid = hub.child.id().unwrap();
    let health = || async { Http::new(hub.ws_addr).get_text("/health").await.0 };
    assert_eq!(health().await, 200);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Still there, still answering (a second signal too).
    assert_eq!(health().await, 200);
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert_eq!(health().await, 200);
    assert!(
        hub.child.try_wait().unwrap().is_none(),
        "hub exited on SIGHUP"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Push a task to `sc`'s agent and time push → task_assign → accept → ack.
async fn round_trip(client: &mut agenthub::client::HubClient, sc: &mut Sidecar) -> f64 {
    let started = std::time::Instant::now();
    let pushed = client.push(pinned(&sc.agent_id.clone(), "calm")).await;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, pushed.task_id);
    sc.accept(&id, g).await;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    sc.complete(&id, g, json!("ok")).await;
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Hub RSS may grow by at most this much while one sidecar floods it
/// (docs/operations.md, "Backpressure").
const FLOOD_RSS_BOUND_MIB: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_flooding_progress_is_slowed_and_others_keep_working() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::spawn(tmp.path(), &[]).await;
    let pid = hub.child.id().unwrap();
    let url = format!("ws://{}/ws", hub.ws_addr);
    let mut admin = agenthub::client::connect(&hub.grpc_addr.to_string(), &admin_token(tmp.path()))
        .await
        .unwrap();
    let agent_token = |agent: &str| {
        let mut admin = admin.clone();
        let agent = agent.to_string();
        async move {
            admin
                .issue_token(pb::IssueTokenRequest {
                    role: "agent".into(),
                    agent_id: agent,
                })
                .await
                .unwrap()
                .into_inner()
                .token
        }
    };
    let flood_token = agent_token("flood").await;
    let calm_token = agent_token("calm").await;
    let mut flood = Sidecar::send_identify(&url, "flood", &flood_token, json!({})).await;
    assert_eq!(flood.recv().await["type"], "identified");
    let mut calm = Sidecar::send_identify(&url, "calm", &calm_token, json!({})).await;
    assert_eq!(calm.recv().await["type"], "identified");

    let mut calm_ms = Vec::new();
    for _ in 0..20 {
        calm_ms.push(round_trip(&mut admin, &mut calm).await);
    }
    let rss_before = rss_kib(pid);

    // The flooder's task, then 1 MB progress frames as fast as the hub reads them.
    let flood_task = admin.push(pinned("flood", "floods")).await.task_id;
    let (id, g) = flood.next_assign().await;
    assert_eq!(id, flood_task);
    flood.accept(&id, g).await;
    let data = "x".repeat(1_000_000);
    let frame = json!({"type": "task_progress", "task_id": id, "generation": g, "progress": &data})
        .to_string();
    let flood_for = std::time::Duration::from_secs(30);
    let flooding = tokio::spawn(async move {
        use futures_util::SinkExt;
        let until = std::time::Instant::now() + flood_for;
        let mut sent = 0u64;
        while std::time::Instant::now() < until {
            flood
                .ws
                .send(tokio_tungstenite::tungstenite::Message::Text(
                    frame.clone().into(),
                ))
                .await
                .unwrap();
            sent += 1;
        }
        (flood, sent)
    });
    let mut busy_ms = Vec::new();
    let mut peak = rss_before;
    while !flooding.is_finished() {
        busy_ms.push(round_trip(&mut admin, &mut calm).await);
        peak = peak.max(rss_kib(pid));
    }
    let (_flood, sent) = flooding.await.unwrap();
    let (calm_p50, busy_p50) = (median(calm_ms), median(busy_ms.clone()));
    let grew_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "flood: {sent} frames of 1 MB in {flood_for:?}; hub RSS +{grew_mib} MiB at peak; \
         other agent's round trip p50 {calm_p50:.1} ms calm, {busy_p50:.1} ms during the flood \
         ({} round trips)",
        busy_ms.len()
    );
    assert!(
        grew_mib <= FLOOD_RSS_BOUND_MIB,
        "hub RSS grew by {grew_mib} MiB (bound {FLOOD_RSS_BOUND_MIB} MiB)"
    );
    assert!(
        busy_ms.len() >= 10,
        "only {} round trips during the flood",
        busy_ms.len()
    );
    // The flooder was slowed to its byte rate (a second's burst, then the
    // rate; the socket buffers hold some frames more), and it is still served.
    let rate = agenthub::config::DEFAULT_SIDECAR_BYTES_PER_S as f64;
    let most = ((flood_for.as_secs_f64() + 1.0) * rate / data.len() as f64) as u64 + 64;
    assert!(
        sent <= most,
        "{sent} frames of 1 MB taken in {flood_for:?} (at most {most})"
    );
    let metrics = Http::new(hub.ws_addr).get_text("/metrics").await.1;
    assert!(metric(&metrics, "agenthub_ws_paced_total").unwrap_or(0.0) > 0.0);
    let health = Http::new(hub.ws_addr).get_text("/health").await.0;
    assert_eq!(health, 200);
}
