//! What orchestrators ask for: WaitTask and `push --wait`, dependencies,
//! queue TTL and deadlines (also across a restart), live task output
//! (`task_output`, WatchTaskOutput, `agenthub logs`, the reference sidecar).

use std::process::Stdio;
use std::time::Duration;

use agenthub::client::HubClient;
use agenthub::pb;
use serde_json::{json, Value};
use tonic::Code;

use crate::helpers::*;

fn wait_req(task_id: &str, timeout_ms: u64) -> pb::WaitTaskRequest {
    pb::WaitTaskRequest {
        task_id: task_id.into(),
        timeout_ms,
    }
}

async fn get(client: &mut HubClient, task_id: &str) -> pb::Task {
    client.task(task_id).await
}

fn error_of(t: &pb::Task) -> Value {
    t.error.as_ref().map(pb::value_to_json).unwrap_or_default()
}

fn output_req(task_id: &str, after_offset: u64) -> pb::WatchTaskOutputRequest {
    pb::WatchTaskOutputRequest {
        task_id: task_id.into(),
        after_offset,
        stored_only: false,
    }
}

/// The next chunk of an output stream (panic after [`WAIT`]).
async fn next_chunk(s: &mut tonic::Streaming<pb::TaskOutputChunk>) -> Option<pb::TaskOutputChunk> {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("an output chunk in time")
        .unwrap()
}

/// Read chunks until `want` bytes of data arrived; returns the text.
async fn read_text(s: &mut tonic::Streaming<pb::TaskOutputChunk>, want: usize) -> String {
    let mut text = String::new();
    let mut next_offset = None;
    while text.len() < want {
        let c = next_chunk(s).await.expect("stream still open");
        if let Some(n) = next_offset {
            assert_eq!(c.offset, n, "offsets are contiguous");
        }
        next_offset = Some(c.offset + c.data.len() as u64);
        text.push_str(&c.data);
    }
    text
}

fn output(task_id: &str, generation: u64, stream: &str, data: &str) -> Value {
    json!({"type": "task_output", "task_id": task_id, "generation": generation, "stream": stream, "data": data})
}

#[tokio::test]
async fn orchestrator_wait_returns_on_complete_fail_and_timeout() {
    let hub = TestHub::start_with(|c| c.default_max_attempts = 1).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("w1").await;

    // Completes while the wait is in progress.
    let id = client.push(pinned("w1", "ok")).await.task_id;
    let mut waiter = client.clone();
    let wait = tokio::spawn({
        let id = id.clone();
        async move {
            waiter
                .wait_task(wait_req(&id, 0))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let (got, g) = sc.next_assign().await;
    assert_eq!(got, id);
    sc.accept(&id, g).await;
    sc.complete(&id, g, json!({"answer": 42})).await;
    let task = tokio::time::timeout(WAIT, wait).await.unwrap().unwrap();
    assert_eq!(state_of(&task), pb::task::State::Completed);
    assert_eq!(
        task.result.as_ref().map(pb::value_to_json),
        Some(json!({"answer": 42}))
    );
    // A finished task: at once.
    let again = client
        .wait_task(wait_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&again), pb::task::State::Completed);

    // Fails.
    let id = client.push(pinned("w1", "bad")).await.task_id;
    let mut waiter = client.clone();
    let wait = tokio::spawn({
        let id = id.clone();
        async move {
            waiter
                .wait_task(wait_req(&id, 0))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let (_, g) = sc.next_assign().await;
    sc.send(json!({"type": "task_failed", "task_id": id, "generation": g, "error": "boom"}))
        .await;
    sc.recv_type("task_ack").await;
    let task = tokio::time::timeout(WAIT, wait).await.unwrap().unwrap();
    assert_eq!(state_of(&task), pb::task::State::Failed);
    assert_eq!(error_of(&task), json!("boom"));

    // Times out: the task as it is.
    let id = client.push(pinned("w1", "slow")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    let task = client
        .wait_task(wait_req(&id, 200))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&task), pb::task::State::Running);

    let err = client.wait_task(wait_req("nope", 10)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// `agenthub push --wait` prints the finished task; exit 0 when COMPLETED, 1 otherwise.
#[tokio::test]
async fn orchestrator_push_wait_exit_code_follows_the_outcome() {
    let hub = TestHub::start_with(|c| c.default_max_attempts = 1).await;
    let mut sc = hub.sidecar("cli-1").await;
    let push = |desc: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["push", "--agent", "cli-1", "-d", desc, "--wait"])
            .env("AGENTHUB_GRPC_ADDR", hub.grpc_addr.to_string())
            .env("AGENTHUB_TOKEN", &hub.admin_token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    for (desc, succeed) in [("good", true), ("bad", false)] {
        let child = push(desc);
        let (id, g) = sc.next_assign().await;
        sc.accept(&id, g).await;
        if succeed {
            sc.complete(&id, g, json!("done")).await;
        } else {
            sc.send(json!({"type": "task_failed", "task_id": id, "generation": g, "error": "no"}))
                .await;
            sc.recv_type("task_ack").await;
        }
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed["task_id"], id.as_str());
        assert_eq!(out.status.success(), succeed, "{printed}");
        let state = if succeed { "COMPLETED" } else { "FAILED" };
        assert_eq!(printed["state"], state);
    }
}

#[tokio::test]
async fn orchestrator_chain_runs_in_order_and_a_failed_step_fails_the_rest() {
    let hub = TestHub::start_with(|c| c.default_max_attempts = 1).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar_with("c1", json!({"max_concurrency": 3})).await;
    let mut events = client.watch_after(0).await;

    let step = |id: &str, deps: &[&str]| pb::PushTaskRequest {
        task_id: id.into(),
        description: id.into(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // Three steps, pushed at once; only the first may run.
    client.push(step("s1", &[])).await;
    let s2 = client.push(step("s2", &["s1"])).await;
    client.push(step("s3", &["s2"])).await;
    assert_eq!(s2.state, pb::task::State::Queued as i32);
    let task = get(&mut client, "s3").await;
    assert_eq!(task.depends_on, vec!["s2".to_string()]);
    for expected in ["s1", "s2", "s3"] {
        let (id, g) = sc.next_assign().await;
        assert_eq!(id, expected, "steps run in order");
        // Nothing else was offered meanwhile.
        assert!(sc.try_recv(Duration::from_millis(100)).await.is_none());
        sc.accept(&id, g).await;
        sc.complete(&id, g, json!(expected)).await;
    }
    // The CREATED event says what a task waits for.
    let created: Vec<pb::TaskEvent> = take_events(&mut events, 12)
        .await
        .into_iter()
        .filter(|e| kind(e) == pb::task_event::Kind::Created)
        .collect();
    let payload = pb::struct_to_json(created[1].payload.as_ref().unwrap());
    assert_eq!(payload["waiting_for"], json!(["s1"]));

    // A failed first step fails the rest, naming the direct dependency.
    client.push(step("f1", &[])).await;
    client.push(step("f2", &["f1"])).await;
    client.push(step("f3", &["f2", "s1"])).await;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, "f1");
    sc.send(json!({"type": "task_failed", "task_id": "f1", "generation": g, "error": "x"}))
        .await;
    sc.recv_type("task_ack").await;
    let f3 = client
        .wait_task(wait_req("f3", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&f3), pb::task::State::Failed);
    assert_eq!(
        error_of(&f3),
        json!({"reason": "dependency_failed", "dependency": "f2"})
    );
    let f2 = get(&mut client, "f2").await;
    assert_eq!(
        error_of(&f2),
        json!({"reason": "dependency_failed", "dependency": "f1"})
    );
    assert_eq!(f2.generation, 0, "never assigned");

    // Cancelling a dependency fails its dependents; depending on a failed
    // task fails at once.
    client.push(step("k1", &["s1", "f2"])).await;
    let k1 = client
        .wait_task(wait_req("k1", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_of(&k1),
        json!({"reason": "dependency_failed", "dependency": "f2"})
    );
    client
        .push(pb::PushTaskRequest {
            agent_id: "nobody".into(),
            queue_if_offline: true,
            ..step("x1", &[])
        })
        .await;
    client.push(step("x2", &["x1"])).await;
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: "x1".into(),
        })
        .await
        .unwrap();
    let x2 = client
        .wait_task(wait_req("x2", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_of(&x2),
        json!({"reason": "dependency_failed", "dependency": "x1"})
    );
}

#[tokio::test]
async fn orchestrator_unknown_dependency_is_invalid_argument() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let err = client
        .push_task(pb::PushTaskRequest {
            description: "x".into(),
            depends_on: vec!["task-none".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("task-none"), "{}", err.message());
}

/// A dependency finished long ago (out of the in-memory cache) still counts.
#[tokio::test]
async fn orchestrator_dependency_on_a_task_served_from_the_store() {
    let hub = TestHub::start_with(|c| c.finished_cache = 0).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("d1").await;
    let id = client.push(pinned("d1", "first")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    sc.complete(&id, g, json!(1)).await;
    hub.hub.flush().await.unwrap();
    let next = client
        .push(pb::PushTaskRequest {
            depends_on: vec![id.clone()],
            ..pinned("d1", "second")
        })
        .await;
    let (got, _) = sc.next_assign().await;
    assert_eq!(got, next.task_id);
}

#[tokio::test]
async fn orchestrator_queue_ttl_and_deadline_fire_and_survive_a_restart() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("t1").await;

    // Short ones fire.
    let ttl = client
        .push(pb::PushTaskRequest {
            agent_id: "offline".into(),
            queue_if_offline: true,
            queue_ttl_ms: 300,
            ..pinned("offline", "never assigned")
        })
        .await
        .task_id;
    let late = client
        .push(pb::PushTaskRequest {
            deadline_ms: agenthub::model::now_ms() + 400,
            ..pinned("t1", "too slow")
        })
        .await
        .task_id;
    let (got, g) = sc.next_assign().await;
    assert_eq!(got, late);
    sc.accept(&late, g).await;
    let t = client
        .wait_task(wait_req(&ttl, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&t), pb::task::State::Failed);
    assert_eq!(error_of(&t), json!({"reason": "ttl_expired"}));
    let t = client
        .wait_task(wait_req(&late, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&t), pb::task::State::Failed);
    assert_eq!(error_of(&t), json!({"reason": "deadline_exceeded"}));
    // The sidecar is told to stop.
    let cancelled = sc.recv_type("task_cancelled").await;
    assert_eq!(cancelled["task_id"], late.as_str());
    assert_eq!(cancelled["reason"], "deadline_exceeded");
    // An assigned task is past its queue TTL's reach.
    let assigned = client
        .push(pb::PushTaskRequest {
            queue_ttl_ms: 200,
            ..pinned("t1", "taken in time")
        })
        .await
        .task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&assigned, g).await;

    // Longer ones are stored, and fire after a restart.
    let ttl2 = client
        .push(pb::PushTaskRequest {
            queue_if_offline: true,
            queue_ttl_ms: 2_500,
            ..pinned("offline", "ttl across restart")
        })
        .await
        .task_id;
    let dl2 = client
        .push(pb::PushTaskRequest {
            queue_if_offline: true,
            deadline_ms: agenthub::model::now_ms() + 3_000,
            ..pinned("offline", "deadline across restart")
        })
        .await
        .task_id;
    drop(sc);
    let dir = hub.stop().await;
    let path = dir.as_ref().unwrap().path();
    let hub = TestHub::start_in(path, |_| {}).await;
    let mut client = hub.client().await;
    let t = get(&mut client, &ttl2).await;
    assert_eq!(t.queue_ttl_ms, 2_500);
    assert_eq!(state_of(&t), pb::task::State::Queued);
    let t = client
        .wait_task(wait_req(&ttl2, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(error_of(&t), json!({"reason": "ttl_expired"}));
    let t = client
        .wait_task(wait_req(&dl2, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(error_of(&t), json!({"reason": "deadline_exceeded"}));
    let t = get(&mut client, &assigned).await;
    assert_eq!(state_of(&t), pb::task::State::Running);
    drop(dir);
}

/// A chain survives a restart: the dependent still waits, then runs.
#[tokio::test]
async fn orchestrator_dependencies_survive_a_restart() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let first = client
        .push(pb::PushTaskRequest {
            queue_if_offline: true,
            ..pinned("r1", "first")
        })
        .await
        .task_id;
    let second = client
        .push(pb::PushTaskRequest {
            queue_if_offline: true,
            depends_on: vec![first.clone()],
            ..pinned("r1", "second")
        })
        .await
        .task_id;
    let dir = hub.stop().await;
    let hub = TestHub::start_in(dir.as_ref().unwrap().path(), |_| {}).await;
    let mut sc = hub.sidecar("r1").await;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, first);
    assert!(sc.try_recv(Duration::from_millis(200)).await.is_none());
    sc.accept(&id, g).await;
    sc.complete(&id, g, json!(1)).await;
    let (id, _) = sc.next_assign().await;
    assert_eq!(id, second);
    drop(dir);
}

#[tokio::test]
async fn orchestrator_output_streams_live_to_two_readers_and_resumes_from_an_offset() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("o1").await;
    let id = client.push(pinned("o1", "talk")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;

    let mut a = client
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    let mut b = client
        .clone()
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    sc.send(output(&id, g, "stdout", "line one\n")).await;
    assert_eq!(read_text(&mut a, 9).await, "line one\n");
    assert_eq!(read_text(&mut b, 9).await, "line one\n");
    sc.send(output(&id, g, "stderr", "oops é\n")).await;
    let c = next_chunk(&mut a).await.unwrap();
    assert_eq!(
        (c.offset, c.stream.as_str(), c.data.as_str(), c.generation),
        (9, "stderr", "oops é\n", g)
    );
    assert_eq!(read_text(&mut b, 8).await, "oops é\n");
    // Output for a task the agent does not hold (stale generation) is dropped.
    sc.send(output(&id, g + 1, "stdout", "stale\n")).await;
    sc.send(output(&id, g, "stdout", "three\n")).await;
    assert_eq!(read_text(&mut a, 6).await, "three\n");

    // Resume from an offset, inside a chunk too.
    let mut r = client
        .watch_task_output(output_req(&id, 14))
        .await
        .unwrap()
        .into_inner();
    let c = next_chunk(&mut r).await.unwrap();
    assert_eq!((c.offset, c.data.as_str()), (14, "é\n"));
    let c = next_chunk(&mut r).await.unwrap();
    // Stored output keeps the generation it was written under.
    assert_eq!(
        (c.offset, c.data.as_str(), c.generation),
        (17, "three\n", g)
    );

    // Finishing ends every stream once all output is sent.
    sc.send(output(&id, g, "stdout", "last\n")).await;
    sc.complete(&id, g, json!("ok")).await;
    assert_eq!(read_text(&mut b, 11).await, "three\nlast\n");
    assert!(next_chunk(&mut b).await.is_none(), "ends with the task");
    assert_eq!(read_text(&mut a, 5).await, "last\n");
    assert!(next_chunk(&mut a).await.is_none());
    // Read back later, whole.
    let mut whole = client
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read_text(&mut whole, 28).await,
        "line one\noops é\nthree\nlast\n"
    );
    assert!(next_chunk(&mut whole).await.is_none());
    let err = client
        .watch_task_output(output_req("nope", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn orchestrator_output_keeps_only_the_newest_bytes_up_to_the_cap() {
    let hub = TestHub::start_with(|c| c.output_cap_bytes = 100).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("o2").await;
    let id = client.push(pinned("o2", "flood")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    for i in 0..50 {
        sc.send(output(&id, g, "stdout", &format!("line {i:03}\n")))
            .await;
    }
    sc.complete(&id, g, json!("ok")).await;
    let mut s = client
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = next_chunk(&mut s).await {
        chunks.push(c);
    }
    let kept: usize = chunks.iter().map(|c| c.data.len()).sum();
    assert!(kept <= 100, "{kept} bytes kept");
    assert!(kept >= 90, "the newest output is kept: {kept} bytes");
    let last = chunks.last().unwrap();
    assert_eq!(last.data, "line 049\n");
    assert_eq!(last.offset, 49 * 9, "offsets count the dropped output");
    assert_eq!(chunks[0].offset, 50 * 9 - kept as u64);
}

/// The reference sidecar streams its command's lines; `agenthub logs` prints them.
#[tokio::test]
async fn orchestrator_reference_sidecar_streams_output_and_logs_prints_it() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let state = tempfile::tempdir().unwrap();
    let _sidecar = reference_sidecar(&hub, "ref-1", state.path(), &[]);
    until_connected(&client, "ref-1").await;
    let id = client
        .push(pinned(
            "ref-1",
            "echo hello; echo warn >&2; echo '::progress 50'; echo bye",
        ))
        .await
        .task_id;
    let task = client
        .wait_task(wait_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&task), pb::task::State::Completed);

    let logs = |follow: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"));
        cmd.arg("logs");
        if follow {
            cmd.arg("-f");
        }
        cmd.arg(&id)
            .env("AGENTHUB_GRPC_ADDR", hub.grpc_addr.to_string())
            .env("AGENTHUB_TOKEN", &hub.admin_token)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
    };
    for follow in [false, true] {
        let out = tokio::time::timeout(WAIT, logs(follow))
            .await
            .unwrap()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello\n::progress 50\nbye\n"
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "warn\n");
    }
}

/// Output the command prints while the hub is down is kept by the reference
/// sidecar and sent when it is back: `agenthub logs` shows every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_reference_sidecar_keeps_output_printed_while_the_hub_is_down() {
    use tokio::io::AsyncBufReadExt;
    let hub = TestHub::start().await;
    let ws_addr = hub.ws_addr;
    let mut client = hub.client().await;
    let state = tempfile::tempdir().unwrap();
    let mut sidecar = reference_sidecar_with_log(&hub, "ref-away", state.path());
    let mut log = tokio::io::BufReader::new(sidecar.stderr.take().unwrap()).lines();
    until_connected(&client, "ref-away").await;
    let (go, done) = (state.path().join("go"), state.path().join("done"));
    let command = format!(
        "echo one; until [ -e '{}' ]; do sleep 0.05; done; echo two; echo three >&2; \
         until [ -e '{}' ]; do sleep 0.05; done; echo four",
        go.display(),
        done.display()
    );
    let id = client.push(pinned("ref-away", &command)).await.task_id;
    let mut out = client
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read_text(&mut out, 4).await, "one\n");

    // The hub goes away; the command prints; the sidecar keeps what it printed.
    let tmp = hub.stop().await.unwrap();
    let mut wait_log = async |what: &str| {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = log.next_line().await.unwrap() {
                if line.contains(what) {
                    return;
                }
            }
            panic!("the sidecar exited before logging {what:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("the sidecar never logged {what:?}"))
    };
    wait_log("hub closed the connection").await;
    std::fs::write(&go, "").unwrap();
    wait_log("output kept until the hub is reachable").await;

    let hub = TestHub::start_in(tmp.path(), |c| c.ws_addr = ws_addr).await;
    let mut client = hub.client().await;
    wait_log("connected to the hub").await;
    std::fs::write(&done, "").unwrap();
    let task = client
        .wait_task(wait_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&task), pb::task::State::Completed);
    let logs = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["logs", &id])
        .env("AGENTHUB_GRPC_ADDR", hub.grpc_addr.to_string())
        .env("AGENTHUB_TOKEN", &hub.admin_token)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let logs = tokio::time::timeout(WAIT, logs).await.unwrap().unwrap();
    assert!(logs.status.success());
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "one\ntwo\nfour\n");
    assert_eq!(String::from_utf8_lossy(&logs.stderr), "three\n");
    drop(sidecar);
    hub.stop().await;
    drop(tmp);
}

// ---- the Python client (clients/python) ------------------------------------

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's Python with the client installed, or a failure that says how.
fn client_python() -> std::path::PathBuf {
    let python = root().join(".venv/bin/python");
    let ok = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", "import agenthub, agenthub.aio"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Python client is not installed in {}. Run scripts/test-deps.sh (scripts/test.sh does) first.",
        python.display()
    );
    python
}

/// [`reference_sidecar`] with its debug log on a pipe (`stderr`).
fn reference_sidecar_with_log(
    hub: &TestHub,
    agent: &str,
    state: &std::path::Path,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .arg("sidecar")
        .args(["--hub", &hub.ws_url(), "--agent", agent, "--state-file"])
        .arg(state.join(format!("{agent}.json")))
        .args(["--kill-grace", "500ms"])
        .args(["--", "sh", "-c", r#"eval "$AGENTHUB_TASK_DESCRIPTION""#])
        .current_dir(state)
        .env("AGENTHUB_TOKEN", hub.agent_token(agent))
        .env("RUST_LOG", "agenthub=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The reference sidecar running shell descriptions, as `agent`.
fn reference_sidecar(
    hub: &TestHub,
    agent: &str,
    state: &std::path::Path,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .arg("sidecar")
        .args(["--hub", &hub.ws_url(), "--agent", agent, "--state-file"])
        .arg(state.join(format!("{agent}.json")))
        .args(["--kill-grace", "500ms"])
        .args(extra)
        .args(["--", "sh", "-c", r#"eval "$AGENTHUB_TASK_DESCRIPTION""#])
        .current_dir(state)
        .env("AGENTHUB_TOKEN", hub.agent_token(agent))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn until_connected(client: &HubClient, agent: &str) {
    eventually(|| {
        let mut c = client.clone();
        let agent = agent.to_string();
        async move {
            let agents = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .unwrap()
                .into_inner()
                .agents;
            agents
                .iter()
                .any(|a| a.agent_id == agent && a.connected)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn orchestrator_python_client_examples_run() {
    let python = client_python();
    let hub = TestHub::start().await;
    let client = hub.client().await;
    let state = tempfile::tempdir().unwrap();
    let _sidecar = reference_sidecar(&hub, "py-1", state.path(), &["--max-concurrency", "4"]);
    until_connected(&client, "py-1").await;
    for example in ["quickstart.py", "chain.py", "watch.py", "aio_quickstart.py"] {
        let run = tokio::process::Command::new(&python)
            .arg(root().join("clients/python/examples").join(example))
            .env("AGENTHUB_GRPC_ADDR", hub.grpc_addr.to_string())
            .env("AGENTHUB_TOKEN", &hub.admin_token)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(90), run)
            .await
            .unwrap_or_else(|_| panic!("{example} did not finish"))
            .unwrap();
        assert!(
            out.status.success(),
            "{example} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `watch()` (sync and asyncio) resumes by itself across a hub killed and
/// restarted: every seq once, in order.
#[tokio::test]
async fn orchestrator_python_watch_resumes_across_a_hub_restart() {
    use tokio::io::AsyncBufReadExt;
    let python = client_python();
    let dir = tempfile::tempdir().unwrap();
    let mut proc = HubProcess::spawn(dir.path(), &[]).await;
    let (ws, grpc) = (proc.ws_addr, proc.grpc_addr);
    let token = admin_token(dir.path());
    let queued = |n: usize| pb::PushTaskRequest {
        agent_id: "away".into(),
        queue_if_offline: true,
        description: format!("task {n}"),
        ..Default::default()
    };
    let mut client = agenthub::client::connect(&grpc.to_string(), &token)
        .await
        .unwrap();
    for n in 0..3 {
        client.push(queued(n)).await;
    }
    let mut watchers = Vec::new();
    for aio in [false, true] {
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(root().join("clients/python/tests/resume_watch.py"))
            .args(["--until", "6"])
            .env("AGENTHUB_GRPC_ADDR", grpc.to_string())
            .env("AGENTHUB_TOKEN", &token)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if aio {
            cmd.arg("--aio");
        }
        let mut child = cmd.spawn().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        watchers.push((child, lines));
    }
    let mut seen: Vec<Vec<u64>> = vec![Vec::new(), Vec::new()];
    for (i, (_, lines)) in watchers.iter_mut().enumerate() {
        while seen[i].len() < 3 {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("the watcher prints events")
                .unwrap()
                .expect("the watcher runs");
            seen[i].push(line.parse().unwrap());
        }
    }
    proc.kill9();
    proc.wait_exit().await;
    let _proc = HubProcess::spawn_at(dir.path(), ws, grpc, &[]).await;
    let mut client = agenthub::client::connect(&grpc.to_string(), &token)
        .await
        .unwrap();
    for n in 3..6 {
        client.push(queued(n)).await;
    }
    for (i, (child, lines)) in watchers.iter_mut().enumerate() {
        while let Some(line) = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the watcher resumes")
            .unwrap()
        {
            seen[i].push(line.parse().unwrap());
        }
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        assert_eq!(seen[i], vec![1, 2, 3, 4, 5, 6], "watcher {i}");
    }
}

/// Retention removes a finished task's output with the task.
#[tokio::test]
async fn orchestrator_retention_removes_output_with_the_task() {
    let hub = TestHub::start_with(|c| {
        c.retention = Some(Duration::from_millis(300));
        c.retention_interval = Duration::from_millis(50);
    })
    .await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("o3").await;
    let id = client.push(pinned("o3", "speak")).await.task_id;
    let (_, g) = sc.next_assign().await;
    sc.accept(&id, g).await;
    sc.send(output(&id, g, "stdout", "soon gone\n")).await;
    sc.complete(&id, g, json!("ok")).await;
    let mut s = client
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read_text(&mut s, 10).await, "soon gone\n");
    let db = hub.dir.join("output.db");
    eventually(|| {
        let db = db.clone();
        let id = id.clone();
        async move {
            let conn = rusqlite::Connection::open(db).unwrap();
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM task_output WHERE task_id = ?1",
                    [&id],
                    |r| r.get(0),
                )
                .unwrap();
            (n == 0).then_some(())
        }
    })
    .await;
    let err = client
        .watch_task_output(output_req(&id, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// The committed Python stubs are what grpcio-tools makes of the proto today.
#[test]
fn orchestrator_python_stubs_match_the_proto() {
    let python = client_python();
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(&python)
        .current_dir(root())
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", out.path().display()))
        .arg(format!("--pyi_out={}", out.path().display()))
        .arg(format!("--grpc_python_out={}", out.path().display()))
        .arg("proto/agenthub/v1/hub.proto")
        .status()
        .unwrap();
    assert!(status.success());
    for f in ["hub_pb2.py", "hub_pb2.pyi", "hub_pb2_grpc.py"] {
        let fresh = std::fs::read_to_string(out.path().join("agenthub/v1").join(f)).unwrap();
        let committed =
            std::fs::read_to_string(root().join("clients/python/agenthub/v1").join(f)).unwrap();
        assert!(
            fresh == committed,
            "clients/python/agenthub/v1/{f} is stale: run clients/python/generate.sh"
        );
    }
}

/// The TTL and deadline are stored with the task: a hub killed with SIGKILL
/// fires them after it restarts.
#[tokio::test]
async fn orchestrator_timers_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut proc = HubProcess::spawn(dir.path(), &[]).await;
    let (ws, grpc) = (proc.ws_addr, proc.grpc_addr);
    let token = admin_token(dir.path());
    let mut client = agenthub::client::connect(&grpc.to_string(), &token)
        .await
        .unwrap();
    let offline = |desc: &str| pb::PushTaskRequest {
        queue_if_offline: true,
        ..pinned("away", desc)
    };
    let ttl = client
        .push(pb::PushTaskRequest {
            queue_ttl_ms: 2_000,
            ..offline("ttl")
        })
        .await
        .task_id;
    let deadline = client
        .push(pb::PushTaskRequest {
            deadline_ms: agenthub::model::now_ms() + 2_000,
            ..offline("deadline")
        })
        .await
        .task_id;
    proc.kill9();
    proc.wait_exit().await;
    let _proc = HubProcess::spawn_at(dir.path(), ws, grpc, &[]).await;
    let mut client = agenthub::client::connect(&grpc.to_string(), &token)
        .await
        .unwrap();
    let t = client
        .wait_task(wait_req(&ttl, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(error_of(&t), json!({"reason": "ttl_expired"}));
    let t = client
        .wait_task(wait_req(&deadline, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(error_of(&t), json!({"reason": "deadline_exceeded"}));
}
