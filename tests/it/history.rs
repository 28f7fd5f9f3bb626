//! History: memory bounded by live work, finished tasks served from the
//! store, retention, backup and integrity checks.

use std::time::Duration;

use agenthub::pb;
use serde_json::json;
use tonic::Code;

use crate::core_flow::Http;
use crate::helpers::*;

/// Push a task pinned to `sc`'s agent and complete it with `result`.
async fn run_task(
    client: &mut agenthub::client::HubClient,
    sc: &mut Sidecar,
    description: &str,
    result: serde_json::Value,
) -> String {
    let pushed = client.push(pinned(&sc.agent_id.clone(), description)).await;
    let (id, g) = sc.next_assign().await;
    assert_eq!(id, pushed.task_id);
    sc.accept(&id, g).await;
    sc.complete(&id, g, result).await;
    id
}

fn task_req(id: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest { task_id: id.into() }
}

async fn metric_value(hub: &TestHub, name: &str) -> f64 {
    let text = Http::new(hub.ws_addr).get_text("/metrics").await.1;
    metric(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn finished_tasks_leave_memory_and_are_served_from_the_store() {
    let hub = TestHub::start_with(|c| c.finished_cache = 2).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    let mut done = Vec::new();
    for i in 0..6 {
        let id = run_task(
            &mut client,
            &mut sc,
            &format!("job {i}"),
            json!({"n": i, "text": "x".repeat(100)}),
        )
        .await;
        done.push(id);
    }
    // Only the cache's worth of finished tasks stays in memory.
    let in_memory = metric_value(&hub, "agenthub_tasks_in_memory").await;
    assert!(in_memory <= 2.0, "{in_memory} tasks in memory");
    assert_eq!(
        metric_value(&hub, "agenthub_finished_tasks_stored").await,
        6.0
    );
    // The oldest comes back whole from the store: description and result.
    let t = client
        .get_task(task_req(&done[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&t), pb::task::State::Completed);
    assert_eq!(t.description, "job 0");
    assert_eq!(
        agenthub::pb::value_to_json(t.result.as_ref().unwrap())["n"],
        json!(0)
    );
    // Listing by state reads the store's index, in creation order.
    let page = client
        .list_tasks(pb::ListTasksRequest {
            state: pb::task::State::Completed as i32,
            page_size: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = page.tasks.iter().map(|t| t.task_id.clone()).collect();
    assert_eq!(ids, done[..4]);
    assert_eq!(page.tasks[1].description, "job 1");
    assert!(!page.next_page_token.is_empty());
    // A late report about an evicted finished task is still `task_finished`.
    sc.send(json!({"type": "task_complete", "task_id": done[0], "generation": 1, "result": 2}))
        .await;
    let err = sc.recv_type("error").await;
    assert_eq!(err["error"], "task_finished", "{err}");
    // And cancel of it is refused for the right reason.
    let e = client
        .cancel_task(pb::CancelTaskRequest {
            task_id: done[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

#[tokio::test]
async fn restart_reads_only_live_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_in(tmp.path(), |_| {}).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    for i in 0..20 {
        run_task(&mut client, &mut sc, &format!("job {i}"), json!(i)).await;
    }
    let mut live = Vec::new();
    for i in 0..3 {
        let mut req = pinned("offline", &format!("waits {i}"));
        req.queue_if_offline = true;
        live.push(client.push(req).await.task_id);
    }
    drop(sc);
    hub.stop().await;
    let hub = TestHub::start_in(tmp.path(), |_| {}).await;
    assert_eq!(metric_value(&hub, "agenthub_tasks_in_memory").await, 3.0);
    assert_eq!(
        metric_value(&hub, "agenthub_finished_tasks_stored").await,
        20.0
    );
    let mut client = hub.client().await;
    for id in &live {
        let t = client.get_task(task_req(id)).await.unwrap().into_inner();
        assert_eq!(state_of(&t), pb::task::State::Queued);
        assert!(t.description.starts_with("waits"), "{t:?}");
    }
    let page = client
        .list_tasks(pb::ListTasksRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.tasks.len(), 23);
}

#[tokio::test]
async fn retention_removes_finished_tasks_and_their_events_never_live_ones() {
    let hub = TestHub::start_with(|c| {
        c.retention = Some(Duration::from_millis(300));
        c.retention_interval = Duration::from_millis(50);
    })
    .await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    let big = "y".repeat(64 * 1024);
    let mut old = Vec::new();
    for _ in 0..40 {
        old.push(run_task(&mut client, &mut sc, &big, json!({"ok": true})).await);
    }
    let mut req = pinned("offline", "still waiting");
    req.queue_if_offline = true;
    let live = client.push(req).await.task_id;
    let db = hub.dir.join("agenthub.db");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let checkpoint = || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    };
    checkpoint();
    let before = size(&db);

    // Gone within the interval once expired (the counter moves once the
    // pass, space reclaim included, is over); the live task stays.
    eventually(|| async {
        let n = metric_value(&hub, "agenthub_retention_purged_tasks_total").await;
        (n >= 40.0).then_some(())
    })
    .await;
    for id in &old {
        let e = client.get_task(task_req(id)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let t = client.get_task(task_req(&live)).await.unwrap().into_inner();
    assert_eq!(state_of(&t), pb::task::State::Queued);
    // The removed history is out of range for cursors; what is left is whole.
    let e = client
        .watch_task_events(pb::WatchTaskEventsRequest {
            after_seq: Some(0),
            ..Default::default()
        })
        .await;
    let code = match e {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };

    assert_eq!(code, Code::OutOfRange);
    // The disk space is given back.
    checkpoint();
    let after = size(&db);
    assert!(
        after < before / 2,
        "database {before} bytes before the purge, {after} after"
    );
}

#[tokio::test]
async fn backup_taken_during_writes_restores_to_a_hub_that_passes_check() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    for i in 0..10 {
        run_task(&mut client, &mut sc, &format!("before {i}"), json!(i)).await;
    }
    // Writes go on while the backup runs.
    let writer = tokio::spawn({
        let mut client = client.clone();
        async move {
            for i in 0..200 {
                let mut req = pinned("offline", &format!("during {i}"));
                req.queue_if_offline = true;
                client.push(req).await;
            }
        }
    });
    let copy = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["backup", "--data-dir"])
        .arg(&hub.dir)
        .arg("--to")
        .arg(copy.path().join("agenthub.db"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    writer.await.unwrap();

    let check = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["check", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = check(copy.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The copy serves as a hub's store.
    std::fs::copy(hub.dir.join("admin.token"), copy.path().join("admin.token")).unwrap();
    let restored = TestHub::start_in(copy.path(), |_| {}).await;
    let mut rc = restored.client_with(&hub.admin_token).await;
    let page = rc
        .list_tasks(pb::ListTasksRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.tasks.len() >= 10, "{} tasks", page.tasks.len());
    restored.stop().await;

    // A damaged store fails the check with a clear exit code.
    let conn = rusqlite::Connection::open(copy.path().join("agenthub.db")).unwrap();
    conn.execute(
        "DELETE FROM events WHERE seq = (SELECT MIN(seq) + 1 FROM events)",
        [],
    )
    .unwrap();
    drop(conn);
    let out = check(copy.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("problem"));
}

#[tokio::test]
async fn seqs_are_never_reused_after_retention_removed_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let short = |c: &mut agenthub::Config| {
        c.retention = Some(Duration::from_millis(200));
        c.retention_interval = Duration::from_millis(50);
    };
    let hub = TestHub::start_in(tmp.path(), short).await;
    let mut client = hub.client().await;
    let mut sc = hub.sidecar("a").await;
    for i in 0..3 {
        run_task(&mut client, &mut sc, &format!("job {i}"), json!(i)).await;
    }
    let head = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .as_of_seq;
    eventually(|| async {
        let n = metric_value(&hub, "agenthub_retention_purged_tasks_total").await;
        (n >= 3.0).then_some(())
    })
    .await;
    drop(sc);
    hub.stop().await;
    let hub = TestHub::start_in(tmp.path(), short).await;
    let mut client = hub.client().await;
    let page = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(page.tasks.is_empty());
    assert_eq!(page.as_of_seq, head, "the head survives an empty log");
    let mut watch = client.watch_after(head).await;
    let mut req = pinned("offline", "after");
    req.queue_if_offline = true;
    client.push(req).await;
    let ev = take_events(&mut watch, 1).await.remove(0);
    assert_eq!(ev.seq, head + 1);
}
