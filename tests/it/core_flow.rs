//! The core contract: lifecycle over a real WebSocket + gRPC, pinned push,
//! idempotency, watch replay, bad input, roles, HTTP endpoints.

use std::time::Duration;

use agenthub::auth::Role;
use agenthub::pb;
use serde_json::{json, Value};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn full_lifecycle_is_acked_and_watched_in_order() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut watch = client
        .watch_task_events(pb::WatchTaskEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut sc = hub.sidecar("agent-1").await;

    let mut req = pinned("agent-1", "write a haiku");
    req.metadata = Some(pb::json_to_struct(
        json!({"repo": "x/y", "n": 3, "nested": {"list": [1, "two", null, true]}})
            .as_object()
            .unwrap(),
    ));
    let resp = client.push(req).await;
    assert!(resp.created);
    assert!(resp.task_id.starts_with("task-") && resp.task_id.len() == 21);

    let assign = sc.recv_type("task_assign").await;
    assert_eq!(assign["task_id"], resp.task_id.as_str());
    assert_eq!(assign["description"], "write a haiku");
    assert_eq!(assign["generation"], 1);
    assert_eq!(
        assign["metadata"],
        json!({"repo": "x/y", "n": 3, "nested": {"list": [1, "two", null, true]}})
    );
    assert!(assign["assigned_at"].as_i64().unwrap() > 0);

    let id = resp.task_id.as_str();
    sc.accept(id, 1).await;
    sc.send(json!({"type": "task_progress", "task_id": id, "generation": 1, "progress": 50, "note": "half"}))
        .await;
    sc.complete(id, 1, json!({"text": "done"})).await;

    let events = take_events(&mut watch, 5).await;
    let kinds: Vec<_> = events.iter().map(kind).collect();
    use pb::task_event::Kind as K;
    assert_eq!(
        kinds,
        [
            K::Created,
            K::Assigned,
            K::Accepted,
            K::Progress,
            K::Completed
        ]
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let progress = pb::struct_to_json(events[3].payload.as_ref().unwrap());
    assert_eq!(progress["progress"], 50);
    assert_eq!(progress["note"], "half");
    assert!(!progress.contains_key("type"));
    let done = pb::struct_to_json(events[4].payload.as_ref().unwrap());
    assert_eq!(done["result"], json!({"text": "done"}));

    let task = client.task(id).await;
    assert_eq!(state_of(&task), pb::task::State::Completed);
    assert_eq!(
        pb::value_to_json(task.result.as_ref().unwrap()),
        json!({"text": "done"})
    );
    assert_eq!(task.last_seq, events[4].seq);
    assert_eq!(task.generation, 1);
    assert_eq!(
        pb::struct_to_json(task.metadata.as_ref().unwrap())["nested"],
        json!({"list": [1, "two", null, true]})
    );
}

#[tokio::test]
async fn push_to_offline_agent_is_not_found_and_stores_nothing() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let err = client.push_task(pinned("ghost", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("agent_not_connected"),
        "{}",
        err.message()
    );
    let list = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.tasks.is_empty());
    assert_eq!(list.as_of_seq, 0);
}

#[tokio::test]
async fn queued_if_offline_task_is_delivered_when_agent_identifies() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut req = pinned("later", "wait for me");
    req.queue_if_offline = true;
    let resp = client.push(req).await;
    assert_eq!(resp.state, pb::task::State::Queued as i32);
    let mut sc = hub.sidecar("later").await;
    let (task_id, generation) = sc.next_assign().await;
    assert_eq!(task_id, resp.task_id);
    assert_eq!(generation, 1);
}

#[tokio::test]
async fn caller_task_id_makes_push_idempotent() {
    let hub = TestHub::start().await;
    let _sc = hub.sidecar("a").await;
    let mut client = hub.client().await;
    let mut req = pinned("a", "same");
    req.task_id = "order-42".into();
    let first = client.push(req.clone()).await;
    assert!(first.created);
    let again = client.push(req.clone()).await;
    assert!(!again.created);
    assert_eq!(again.task_id, "order-42");
    req.description = "different".into();
    let err = client.push_task(req).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let list = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.tasks.len(), 1);
}

#[tokio::test]
async fn watch_from_cursor_while_events_flow_has_no_gap_or_duplicate() {
    let hub = TestHub::start().await;
    let mut sc = hub.sidecar_with("w", json!({"max_concurrency": 1})).await;
    let mut client = hub.client().await;
    let id = client.push(pinned("w", "t")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    // Keep events flowing from the sidecar while watchers join at various cursors.
    let total = 3000u64;
    let producer = tokio::spawn(async move {
        for i in 0..total {
            sc.send(json!({"type": "task_progress", "task_id": id, "progress": i}))
                .await;
            if i.is_multiple_of(200) {
                tokio::task::yield_now().await;
            }
        }
        sc
    });
    let mut watchers = Vec::new();
    for cursor in [0u64, 1, 2, 3] {
        let mut c = hub.client().await;
        watchers.push(tokio::spawn(async move {
            let mut s = c.watch_after(cursor).await;
            let want = 3 + total - cursor; // CREATED, ASSIGNED, ACCEPTED + progress
            let evs = take_events(&mut s, want as usize).await;
            let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
            let expect: Vec<u64> = (cursor + 1..=cursor + want).collect();
            assert_eq!(seqs, expect, "watcher after {cursor}");
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    producer.await.unwrap();
    for w in watchers {
        w.await.unwrap();
    }
}

#[tokio::test]
async fn stalled_watcher_does_not_block_the_hub_and_later_gets_everything() {
    let hub = TestHub::start_with(|c| c.watch_buffer = 1024).await;
    let mut sc = hub.sidecar("fast").await;
    let mut client = hub.client().await;
    // A watcher that does not read at all while >=100k events flow.
    let mut stalled = hub.client().await.watch_after(0).await;
    let id = client.push(pinned("fast", "t")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    let progress = 100_000u64;
    for i in 0..progress {
        sc.send(json!({"type": "task_progress", "task_id": id, "progress": i}))
            .await;
    }
    // The hub still answers pushes promptly while the watcher is stalled.
    let pushed = tokio::time::timeout(WAIT, client.push_task(pinned("fast", "after")))
        .await
        .expect("push not blocked by a stalled watcher")
        .unwrap()
        .into_inner();
    assert!(pushed.created);
    sc.complete(&id, g, json!(null)).await;
    let last = eventually(|| {
        let mut c = client.clone();
        async move {
            let page = c
                .list_tasks(pb::ListTasksRequest::default())
                .await
                .ok()?
                .into_inner();
            (page.as_of_seq >= 3 + progress + 3).then_some(page.as_of_seq)
        }
    })
    .await;
    // Now read everything: every seq from 1 to last, in order, once.
    let evs = take_events(&mut stalled, last as usize).await;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_through_a_burst_of_large_events_gets_them_all_in_order() {
    let hub = TestHub::start().await;
    let mut sc = hub.sidecar("big").await;
    let mut client = hub.client().await;
    // Live from the start and not read while the burst is stored: its queue
    // and its room for large events (8 MiB) fill, the rest of the burst
    // waits in the live buffer, and reaches the watcher at once when the
    // reader starts: more large events than the room holds in one go.
    let mut stalled = hub.client().await.watch_after(0).await;
    let id = client.push(pinned("big", "t")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    let pad = "x".repeat(600 * 1024);
    let burst = 40u64;
    for i in 0..burst {
        sc.send(json!({"type": "task_progress", "task_id": id, "progress": {"i": i, "pad": pad}}))
            .await;
    }
    // Acknowledged: every report before it is stored.
    sc.complete(&id, g, json!(null)).await;
    let want = 3 + burst + 1; // CREATED, ASSIGNED, ACCEPTED, the burst, COMPLETED
    let evs = take_events(&mut stalled, want as usize).await;
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=want).collect::<Vec<u64>>());
    assert_eq!(
        kind(&evs[want as usize - 1]),
        pb::task_event::Kind::Completed
    );
}

#[tokio::test]
async fn cursor_older_than_retention_is_out_of_range() {
    let hub = TestHub::start_with(|c| c.event_retention = Some(10)).await;
    let mut sc = hub.sidecar("r").await;
    let mut client = hub.client().await;
    let id = client.push(pinned("r", "t")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    // Enough commits for the pruner to run (it runs every 64 commits).
    for i in 0..300u32 {
        sc.send(json!({"type": "task_progress", "task_id": id, "progress": i}))
            .await;
        if i.is_multiple_of(3) {
            sc.send(json!({"type": "ping"})).await;
            sc.recv_type("pong").await;
        }
    }
    let mut status = None;
    for _ in 0..100 {
        let r = client
            .watch_task_events(pb::WatchTaskEventsRequest {
                after_seq: Some(0),
                ..Default::default()
            })
            .await;
        match r {
            Err(s) => {
                status = Some(s);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let status = status.expect("old cursor refused once history is pruned");
    assert_eq!(status.code(), Code::OutOfRange);
    // A recent cursor still works.
    let page = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut s = client.watch_after(page.as_of_seq - 2).await;
    let evs = take_events(&mut s, 2).await;
    assert_eq!(evs[1].seq, page.as_of_seq);
}

/// Send `msg` and expect `{"type":"error","error":code}`.
async fn expect_error(sc: &mut Sidecar, msg: &str, code: &str) -> Value {
    sc.send_text(msg).await;
    let reply = sc.recv().await;
    assert_eq!(reply["type"], "error", "{msg} -> {reply}");
    assert_eq!(reply["error"], code, "{msg} -> {reply}");
    reply
}

#[tokio::test]
async fn bad_input_gets_its_error_and_changes_nothing() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut owner = hub.sidecar("owner").await;
    let id = client.push(pinned("owner", "t")).await.task_id;
    let (_, g) = owner.next_assign().await;
    let before = client.task(&id).await;

    // Not identified yet.
    let mut anon = Sidecar::connect(&hub.ws_url()).await;
    expect_error(
        &mut anon,
        &json!({"type": "task_accepted", "task_id": id}).to_string(),
        "not_identified",
    )
    .await;
    expect_error(&mut anon, "{not json", "invalid_json").await;
    // Wrong token, token for another agent.
    expect_error(
        &mut anon,
        r#"{"type":"identify","agent_id":"owner","token":"nope"}"#,
        "invalid_token",
    )
    .await;
    let other_token = hub.agent_token("other");
    expect_error(
        &mut anon,
        &json!({"type": "identify", "agent_id": "owner", "token": other_token}).to_string(),
        "token_agent_mismatch",
    )
    .await;
    let viewer = hub.token(Role::Viewer, None);
    expect_error(
        &mut anon,
        &json!({"type": "identify", "agent_id": "owner", "token": viewer}).to_string(),
        "invalid_token",
    )
    .await;

    let mut other = hub.sidecar("other").await;
    expect_error(&mut other, "{not json", "invalid_json").await;
    expect_error(
        &mut other,
        r#"{"type":"launch_missiles"}"#,
        "unknown_message_type",
    )
    .await;
    let r = expect_error(
        &mut other,
        r#"{"type":"task_complete","result":1}"#,
        "invalid_message",
    )
    .await;
    assert!(r["detail"].as_str().unwrap().contains("task_id"));
    expect_error(&mut other, r#"{"no_type":1}"#, "invalid_message").await;
    expect_error(
        &mut other,
        r#"{"type":"task_accepted","task_id":"task-0000000000000000"}"#,
        "unknown_task",
    )
    .await;
    let r = expect_error(
        &mut other,
        &json!({"type": "task_complete", "task_id": id, "result": 1}).to_string(),
        "not_task_owner",
    )
    .await;
    assert_eq!(r["task_id"], id.as_str());
    // The owner with a stale generation.
    expect_error(
        &mut owner,
        &json!({"type": "task_complete", "task_id": id, "generation": g + 5, "result": 1})
            .to_string(),
        "stale_generation",
    )
    .await;
    // The socket stays open and usable after errors.
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.recv().await["type"], "pong");

    let after = client.task(&id).await;
    assert_eq!(before, after, "bad input changed the task");

    // A finished task refuses further reports.
    owner.accept(&id, g).await;
    owner.complete(&id, g, json!("ok")).await;
    expect_error(
        &mut owner,
        &json!({"type": "task_failed", "task_id": id, "generation": g, "error": "late"})
            .to_string(),
        "task_finished",
    )
    .await;
    let done = client.task(&id).await;
    assert_eq!(state_of(&done), pb::task::State::Completed);
    assert_eq!(
        pb::value_to_json(done.result.as_ref().unwrap()),
        json!("ok")
    );
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let hub = TestHub::start_with(|c| c.max_message_bytes = 64 * 1024).await;
    let mut sc = hub.sidecar("big").await;
    let huge = "x".repeat(65 * 1024);
    sc.send(json!({"type": "task_progress", "task_id": "t", "progress": huge}))
        .await;
    assert_eq!(sc.recv_close().await, Some(1009));
    // The hub itself is fine.
    let mut again = hub.sidecar("big").await;
    again.send(json!({"type": "ping"})).await;
    assert_eq!(again.recv().await["type"], "pong");
}

#[tokio::test]
async fn socket_without_identify_is_closed_with_1008() {
    let hub = TestHub::start_with(|c| c.identify_timeout = Duration::from_millis(300)).await;
    let mut sc = Sidecar::connect(&hub.ws_url()).await;
    sc.send(json!({"type": "ping"})).await;
    assert_eq!(sc.recv().await["error"], "not_identified");
    assert_eq!(sc.recv_close().await, Some(1008));
}

#[tokio::test]
async fn second_identify_replaces_the_session_and_keeps_tasks() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut first = hub.sidecar("dup").await;
    let id = client.push(pinned("dup", "t")).await.task_id;
    let (_, g) = first.next_assign().await;
    first.accept(&id, g).await;
    let mut second = hub.sidecar("dup").await;
    let err = first.recv().await;
    assert_eq!(err["error"], "session_replaced");
    assert!(first.recv_close().await.is_some());
    second.complete(&id, g, json!(1)).await;
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agents.agents.len(), 1);
    assert!(agents.agents[0].connected);
}

#[tokio::test]
async fn roles_are_enforced_on_grpc() {
    let hub = TestHub::start().await;
    let _sc = hub.sidecar("a").await;
    let mut anon = hub.client_with("").await;
    let e = anon
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut bad = hub.client_with("deadbeef").await;
    let e = bad.push_task(pinned("a", "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut viewer = hub.client_with(&hub.token(Role::Viewer, None)).await;
    let e = viewer.push_task(pinned("a", "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    viewer
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap();

    let mut agent = hub.client_with(&hub.agent_token("a")).await;
    let e = agent
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let mut orch = hub.client_with(&hub.token(Role::Orchestrator, None)).await;
    orch.push_task(pinned("a", "x")).await.unwrap();
    assert_eq!(
        orch.list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tasks
            .len(),
        1
    );
}

#[tokio::test]
async fn http_push_endpoint_status_codes_and_health_metrics() {
    let hub = TestHub::start().await;
    let _sc = hub.sidecar("h").await;
    let http = Http::new(hub.ws_addr);
    let body =
        json!({"agent_id": "h", "description": "via http", "metadata": {"k": 1}}).to_string();
    let auth = format!("Bearer {}", hub.admin_token);
    let (code, v) = http.post("/api/admin/push-task", Some(&auth), &body).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "pushed");
    assert_eq!(v["agent_id"], "h");
    assert!(v["task_id"].as_str().unwrap().starts_with("task-"));

    let offline = json!({"agent_id": "nobody", "description": "x"}).to_string();
    let (code, v) = http
        .post("/api/admin/push-task", Some(&auth), &offline)
        .await;
    assert_eq!(
        (code, v["error"].as_str()),
        (404, Some("agent_not_connected"))
    );
    let (code, v) = http
        .post("/api/admin/push-task", Some(&auth), "{oops")
        .await;
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].is_string());
    let (code, _) = http.post("/api/admin/push-task", None, &body).await;
    assert_eq!(code, 401);
    let viewer = format!("Bearer {}", hub.token(Role::Viewer, None));
    let (code, _) = http
        .post("/api/admin/push-task", Some(&viewer), &body)
        .await;
    assert_eq!(code, 403);

    let (code, v) = http.get("/health").await;
    assert_eq!(code, 200);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["agents_connected"], 1);
    let (code, text) = http.get_text("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "agenthub_agents_connected 1",
        "agenthub_tasks{state=\"ASSIGNED\"} 1",
        "agenthub_events_stored 2",
        "agenthub_watchers 0",
    ] {
        assert!(text.contains(name), "metrics lack `{name}`:\n{text}");
    }
}

/// Bare-bones HTTP/1.1 client (one request per connection).
pub struct Http {
    addr: std::net::SocketAddr,
}

impl Http {
    pub fn new(addr: std::net::SocketAddr) -> Http {
        Http { addr }
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        (code, body)
    }

    pub async fn post(&self, path: &str, auth: Option<&str>, body: &str) -> (u16, Value) {
        let (code, body) = self.request("POST", path, auth, body).await;
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (code, body) = self.request("GET", path, None, "").await;
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        self.request("GET", path, None, "").await
    }
}

#[tokio::test]
async fn grpc_health_and_reflection_work_for_stock_tools() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let hub = TestHub::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", hub.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "agenthub.v1.TaskHub".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    let mut refl = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "agenthub.v1.TaskHub".into(),
        )),
        ask(MessageRequest::FileByFilename(
            "google/protobuf/struct.proto".into(),
        )),
    ];
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    while let Some(r) = resp.message().await.unwrap() {
        answers.push(r.message_response.unwrap());
    }
    match &answers[0] {
        MessageResponse::ListServicesResponse(l) => {
            assert!(
                l.service.iter().any(|s| s.name == "agenthub.v1.TaskHub"),
                "{l:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    for a in &answers[1..] {
        match a {
            MessageResponse::FileDescriptorResponse(f) => {
                assert!(!f.file_descriptor_proto.is_empty())
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn sidecar_that_stops_reading_is_disconnected_not_buffered() {
    let hub = TestHub::start_with(|c| c.outbound_queue = 4).await;
    let mut client = hub.client().await;
    let sc = hub
        .sidecar_with("stuck", json!({"max_concurrency": 1000}))
        .await;
    // ~20 MiB of task_assign frames to a sidecar that never reads.
    let big = "x".repeat(200 * 1024);
    for i in 0..100 {
        let mut req = pinned("stuck", &big);
        req.task_id = format!("big-{i}");
        if client.push_task(req).await.is_err() {
            break; // disconnected already: the agent is no longer connected
        }
    }
    let agent = disconnected_agent(&client).await;
    assert_eq!(agent.agent_id, "stuck");
    // The hub ended the connection itself: reading what it managed to send
    // reaches the end of the stream, and no session task is left.
    let mut sc = sc;
    let end = tokio::time::timeout(WAIT, async {
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut sc.ws).await {}
    })
    .await;
    assert!(end.is_ok(), "the hub left the socket open");
    eventually(|| async {
        let (_, text) = Http::new(hub.ws_addr).get_text("/metrics").await;
        (metric(&text, "agenthub_ws_sessions_open") == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sidecar_that_stops_answering_pings_is_closed() {
    let hub = TestHub::start_with(|c| {
        c.ws_ping_interval = Duration::from_millis(100);
        c.ws_ping_timeout = Duration::from_millis(100);
    })
    .await;
    let mut sc = hub.sidecar("silent").await;
    // Not reading means not answering the hub's pings: the hub gives up on it.
    let client = hub.client().await;
    let agent = disconnected_agent(&client).await;
    assert_eq!(agent.agent_id, "silent");
    // It said why, with a close frame, and waits for ours in return.
    assert_eq!(sc.recv_close().await, Some(1001));
}

#[tokio::test]
async fn list_pages_in_creation_order_and_as_of_seq_joins_the_watch_without_gaps() {
    let hub = TestHub::start().await;
    let _a = hub.sidecar_with("a", json!({"max_concurrency": 10})).await;
    let mut client = hub.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut req = if i % 2 == 0 {
            pinned("a", "pinned")
        } else {
            pinned("b", "queued")
        };
        req.queue_if_offline = true;
        ids.push(client.push(req).await.task_id);
    }
    // Pages of 2: 3 pages, creation order, nothing twice.
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    let as_of = loop {
        let page = client
            .list_tasks(pb::ListTasksRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.tasks.into_iter().map(|t| t.task_id));
        if page.next_page_token.is_empty() {
            break page.as_of_seq;
        }
        token = page.next_page_token;
    };
    assert_eq!((pages, &seen), (3, &ids));
    // Filters: by state and by agent.
    let queued = client
        .list_tasks(pb::ListTasksRequest {
            state: pb::task::State::Queued as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queued.tasks.len(), 2);
    assert!(queued.tasks.iter().all(|t| t.agent_id == "b"));
    let on_a = client
        .list_tasks(pb::ListTasksRequest {
            agent_id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_a.tasks.len(), 3);
    let err = client
        .list_tasks(pb::ListTasksRequest {
            page_token: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Snapshot, then changes: the next event after as_of_seq is the next change.
    let mut watch = client.watch_after(as_of).await;
    let next = client.push(pinned("a", "after the snapshot")).await;
    let ev = take_events(&mut watch, 1).await.remove(0);
    assert_eq!(
        (ev.seq, ev.task_id.as_str()),
        (as_of + 1, next.task_id.as_str())
    );
    assert_eq!(kind(&ev), pb::task_event::Kind::Created);
}

#[tokio::test]
async fn unknown_task_is_not_found_for_get_and_cancel() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let e = client
        .get_task(pb::GetTaskRequest {
            task_id: "task-0000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .cancel_task(pb::CancelTaskRequest {
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn tokens_are_stored_only_as_hashes_and_the_admin_token_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let hub = TestHub::start().await;
    let agent = hub.agent_token("secretive");
    let mode = std::fs::metadata(hub.dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(hub.admin_token.len(), 64);
    // Nothing on disk holds a secret (database, WAL, log segments).
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let mut dirs = vec![hub.dir.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "seg")));
    for path in files {
        if path.file_name().unwrap() == "admin.token" {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&agent),
            "{} holds an agent token",
            path.display()
        );
        assert!(
            !text.contains(&hub.admin_token),
            "{} holds the admin token",
            path.display()
        );
    }
}

#[tokio::test]
async fn watch_agents_streams_connects_slots_and_disconnects() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut stream = client
        .watch_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        next(&mut stream).await.agents.is_empty(),
        "the list at once"
    );
    let mut sc = hub.sidecar("w1").await;
    // Lists come as things change, until they show what happened.
    let mut list = next(&mut stream).await;
    while !list
        .agents
        .iter()
        .any(|a| a.agent_id == "w1" && a.connected)
    {
        list = next(&mut stream).await;
    }
    client.push(pinned("w1", "x")).await;
    let (id, _) = sc.next_assign().await;
    while !list
        .agents
        .iter()
        .any(|a| a.agent_id == "w1" && a.active_task_ids == [id.clone()])
    {
        list = next(&mut stream).await;
    }
    drop(sc);
    while list
        .agents
        .iter()
        .any(|a| a.agent_id == "w1" && a.connected)
    {
        list = next(&mut stream).await;
    }
}

async fn next(stream: &mut tonic::Streaming<pb::ListAgentsResponse>) -> pb::ListAgentsResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a list within WAIT")
        .unwrap()
        .expect("stream open")
}
