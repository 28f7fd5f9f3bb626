//! Storage faults: nothing that failed to store is ever visible or
//! acknowledged; the hub refuses writes with a clear error, keeps serving
//! reads, reports itself degraded, and takes writes again once the fault
//! clears — without a restart.

use std::time::Duration;

use agenthub::error::StorageFault;
use agenthub::pb;
use serde_json::json;
use tonic::Code;

use crate::core_flow::Http;
use agenthub::client::HubClient;

use crate::helpers::*;

/// Push until the hub takes writes again (it probes the store with backoff).
async fn push_when_recovered(client: &HubClient, req: pb::PushTaskRequest) -> pb::PushTaskResponse {
    eventually(|| {
        let mut c = client.clone();
        let req = req.clone();
        async move { c.push_task(req).await.ok().map(|r| r.into_inner()) }
    })
    .await
}

fn with_id(mut req: pb::PushTaskRequest, id: &str) -> pb::PushTaskRequest {
    req.task_id = id.into();
    req
}

#[tokio::test]
async fn a_push_whose_commit_fails_is_refused_and_never_appears() {
    let (hub, faults) = TestHub::start_with_faults(|_| {}).await;
    let mut client = hub.client().await;
    let t0 = client
        .push(with_id(
            scheduled("before", &[], pb::Priority::Normal),
            "t0",
        ))
        .await;
    assert!(t0.created);

    faults.fail_next(1);
    let req = with_id(scheduled("lost", &[], pb::Priority::Normal), "t1");
    let err = client.push_task(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("storage unavailable"), "{err:?}");
    // Not visible: neither to GetTask nor to a retry that would say "already there".
    let err = client
        .get_task(pb::GetTaskRequest {
            task_id: "t1".into(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::NotFound | Code::Unavailable),
        "{err:?}"
    );
    let retried = push_when_recovered(&client, req).await;
    assert!(
        retried.created,
        "the retry creates it: the first never existed"
    );

    // An unrelated write after the failure is not dragged down with it.
    let t2 = client
        .push(with_id(scheduled("after", &[], pb::Priority::Normal), "t2"))
        .await;
    assert!(t2.created);

    // After a restart, exactly what was acknowledged is there, seqs without holes.
    let dir = hub.dir.clone();
    let tmp = hub.stop().await;
    let hub = TestHub::start_in(&dir, |_| {}).await;
    let mut client = hub.client().await;
    let page = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = page.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["t0", "t1", "t2"]);
    let events = take_events(&mut client.watch_after(0).await, 3).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    drop(tmp);
}

#[tokio::test]
async fn degraded_hub_refuses_writes_serves_reads_and_recovers_without_restart() {
    let (hub, faults) = TestHub::start_with_faults(|_| {}).await;
    let mut client = hub.client().await;
    let http = Http::new(hub.ws_addr);
    client
        .push(with_id(
            scheduled("stored", &[], pb::Priority::Normal),
            "ok-1",
        ))
        .await;
    let mut watch = client.watch_after(0).await;
    take_events(&mut watch, 1).await;

    faults.fail_all(StorageFault::Full);
    let err = client
        .push_task(with_id(
            scheduled("no room", &[], pb::Priority::Normal),
            "x",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("disk full"), "{err:?}");
    // Degraded: every write is refused with the same clear error.
    let err = client
        .push_task(with_id(
            scheduled("no room", &[], pb::Priority::Normal),
            "y",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let (code, body) = http.get("/health").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["reason"], "disk full");
    // Reads go on.
    let t = client.task("ok-1").await;
    assert_eq!(t.description, "stored");
    client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap();

    faults.clear();
    let r = push_when_recovered(
        &client,
        with_id(scheduled("room again", &[], pb::Priority::Normal), "ok-2"),
    )
    .await;
    assert!(r.created);
    let (code, body) = http.get("/health").await;
    assert_eq!((code, &body["status"]), (200, &json!("ok")), "{body}");
    // The watch stream lived through it and carries on with the next seq.
    let ev = take_events(&mut watch, 1).await.remove(0);
    assert_eq!((ev.seq, ev.task_id.as_str()), (2, "ok-2"));
    let text = http.get_text("/metrics").await.1;
    assert!(metric(&text, "agenthub_storage_faults_total").unwrap() >= 1.0);
}

/// The copy shares the disk with the log: a full disk stops it applying
/// before the log's next append fails. The rebuild after that failure does
/// not wait for the copy: the durable records it lacks are laid over it in
/// memory, so reads go on (live tasks, a task the copy never got, one
/// finished in a record the copy never got), and once space returns both
/// catch up.
#[tokio::test]
async fn a_full_disk_that_stops_the_copy_first_still_keeps_reads() {
    let (hub, faults) = TestHub::start_with_faults(|_| {}).await;
    let mut client = hub.client().await;
    let http = Http::new(hub.ws_addr);
    for i in 0..3 {
        let req = with_id(
            scheduled("in the copy", &[], pb::Priority::Normal),
            &format!("c-{i}"),
        );
        client.push(req).await;
    }
    client.task("c-0").await; // read-your-writes: the copy holds them
    faults.fail_copy(true);
    // Durable in the log only: two new tasks, one of them cancelled.
    for id in ["l-0", "l-1"] {
        let req = with_id(scheduled("only in the log", &[], pb::Priority::Normal), id);
        client.push(req).await;
    }
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: "l-1".into(),
        })
        .await
        .unwrap();
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: "c-2".into(),
        })
        .await
        .unwrap();
    faults.fail_next(1);
    let err = client
        .push_task(with_id(scheduled("lost", &[], pb::Priority::Normal), "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(http.get("/health").await.0, 503);
    // Reads go on, as of every acknowledged change.
    let live = client.task("l-0").await;
    assert_eq!(
        (live.description.as_str(), live.state()),
        ("only in the log", pb::task::State::Queued)
    );
    assert_eq!(client.task("c-0").await.state(), pb::task::State::Queued);
    let (code, body) = http.get("/health").await;
    assert_eq!((code, &body["tasks_queued"]), (503, &json!(3)), "{body}");

    faults.fail_copy(false);
    let r = push_when_recovered(
        &client,
        with_id(scheduled("room again", &[], pb::Priority::Normal), "after"),
    )
    .await;
    assert!(r.created);
    assert_eq!(http.get("/health").await.0, 200);
    for (id, state) in [
        ("c-0", pb::task::State::Queued),
        ("c-2", pb::task::State::Cancelled),
        ("l-0", pb::task::State::Queued),
        ("l-1", pb::task::State::Cancelled),
        ("after", pb::task::State::Queued),
    ] {
        assert_eq!(client.task(id).await.state(), state, "{id}");
    }
    let err = client
        .get_task(pb::GetTaskRequest {
            task_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn a_report_that_cannot_be_stored_gets_storage_unavailable_and_is_taken_on_resend() {
    let (hub, faults) = TestHub::start_with_faults(|_| {}).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    let pushed = client.push(pinned("a", "work")).await;
    let (task_id, generation) = sc.next_assign().await;
    assert_eq!(task_id, pushed.task_id);
    sc.accept(&task_id, generation).await;

    faults.fail_all(StorageFault::Io);
    let complete = json!({"type": "task_complete", "task_id": task_id, "generation": generation, "result": {"ok": true}});
    sc.send(complete.clone()).await;
    let reply = sc.recv().await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["error"], "storage_unavailable", "{reply}");
    assert_eq!(reply["task_id"], task_id.as_str());
    // The session stays open; nothing changed.
    let t = client.task(&task_id).await;
    assert_eq!(state_of(&t), pb::task::State::Running);

    faults.clear();
    // The sidecar keeps its report and sends it again until it is stored.
    let deadline = tokio::time::Instant::now() + WAIT;
    let ack = loop {
        sc.send(complete.clone()).await;
        let reply = sc.recv().await;
        if reply["type"] == "task_ack" {
            break reply;
        }
        assert_eq!(reply["error"], "storage_unavailable", "{reply}");
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ack["status"], "complete");
    let t = client
        .get_task(pb::GetTaskRequest { task_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&t), pb::task::State::Completed);
}

#[tokio::test]
async fn errors_and_acks_leave_in_commit_order() {
    let (hub, faults) = TestHub::start_with_faults(|_| {}).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    client.push(pinned("a", "work")).await;
    let (task_id, generation) = sc.next_assign().await;
    sc.accept(&task_id, generation).await;
    // Slow commits: the fence error for the second report must still wait
    // for the ack of the first one, which it depends on.
    faults.set_delay(Duration::from_millis(100));
    sc.send(
        json!({"type": "task_complete", "task_id": task_id, "generation": generation, "result": 1}),
    )
    .await;
    sc.send(json!({"type": "task_progress", "task_id": task_id, "generation": generation, "progress": 99}))
        .await;
    let first = sc.recv().await;
    let second = sc.recv().await;
    assert_eq!(
        (first["type"].as_str(), first["status"].as_str()),
        (Some("task_ack"), Some("complete")),
        "{first}"
    );
    assert_eq!(second["error"], "task_finished", "{second}");
}

#[tokio::test]
async fn an_outside_reader_holding_the_copys_write_lock_delays_reads_never_acks() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    // Another process (a backup, a curious operator) holds the query
    // copy's write lock.
    let db = rusqlite::Connection::open(hub.dir.join("agenthub.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    // Writes go to the log: the push is acknowledged all the same.
    let r = client
        .push_task(scheduled("goes-on", &[], pb::Priority::Normal))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    // A read of the copy waits until the copy holds that push...
    let list = tokio::spawn({
        let mut client = client.clone();
        async move { client.list_tasks(pb::ListTasksRequest::default()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !list.is_finished(),
        "a read answered from a copy behind the log"
    );
    db.execute_batch("COMMIT").unwrap();
    // ...and answers with it once the lock is released.
    let page = list.await.unwrap().unwrap().into_inner();
    assert!(page.tasks.iter().any(|t| t.task_id == r.task_id));
    let (code, _) = Http::new(hub.ws_addr).get("/health").await;
    assert_eq!(code, 200);
}

/// A tmpfs of `size`, unmounted (lazily) on drop. Needs root, as the test
/// command runs.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: the disk-full test needs root (scripts/test.sh runs as root)"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fill the file system holding `path` with a filler file; returns its path.
fn fill_disk(path: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = path.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    filler
}

#[tokio::test]
async fn disk_full_refuses_writes_keeps_reads_and_recovers_when_space_returns() {
    let disk = SmallDisk::mount("24m");
    let dir = disk.path().join("data");
    let mut proc = HubProcess::spawn(&dir, &[]).await;
    let admin = admin_token(&dir);
    let mut client = agenthub::client::connect(&proc.grpc_addr.to_string(), &admin)
        .await
        .unwrap();
    let http = Http::new(proc.ws_addr);
    let mut acked = Vec::new();
    for i in 0..5 {
        let r = client
            .push(with_id(
                scheduled("before", &[], pb::Priority::Normal),
                &format!("ok-{i}"),
            ))
            .await;
        acked.push(r.task_id);
    }

    let filler = fill_disk(disk.path());
    // Pushes go on while the store still finds room in its files, then fail
    // with a clear error; nothing refused is ever visible.
    let big = "x".repeat(256 * 1024);
    let mut refused = None;
    for i in 0..200 {
        let id = format!("big-{i}");
        match client
            .push_task(with_id(scheduled(&big, &[], pb::Priority::Normal), &id))
            .await
        {
            Ok(r) => acked.push(r.into_inner().task_id),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("disk full"), "{status:?}");
                refused = Some(id);
                break;
            }
        }
    }
    let refused = refused.expect("the disk filled up");
    let (code, body) = http.get("/health").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["reason"], "disk full");
    // Reads go on.
    let t = client.task("ok-0").await;
    assert_eq!(t.description, "before");

    // Space comes back: writes work again, no restart.
    std::fs::remove_file(filler).unwrap();
    let r = push_when_recovered(
        &client,
        with_id(scheduled("after", &[], pb::Priority::Normal), "after"),
    )
    .await;
    acked.push(r.task_id);
    assert_eq!(http.get("/health").await.0, 200);

    // After a hard kill, exactly the acknowledged tasks are there.
    proc.kill9();
    proc.wait_exit().await;
    let proc = HubProcess::spawn(&dir, &[]).await;
    let mut client = agenthub::client::connect(&proc.grpc_addr.to_string(), &admin)
        .await
        .unwrap();
    for id in &acked {
        client
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e:?}"));
    }
    let err = client
        .get_task(pb::GetTaskRequest { task_id: refused })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
