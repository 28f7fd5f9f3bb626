//! The single node's log file under crashes and damage: SIGKILL at random
//! points loses nothing acknowledged; a torn last record is dropped; a
//! damaged record in the middle stops the start and `agenthub check` names
//! it; a deleted copy is rebuilt from the log.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use agenthub::client::{connect, HubClient};
use agenthub::event::EncodedEvent;
use agenthub::pb;
use agenthub::store::file::{segment, FileStore};
use agenthub::store::{Batch, Store};
use serde_json::json;

use crate::helpers::*;

fn agenthub(args: &[&str], dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

/// Every task the hub lists, by id.
async fn all_tasks(c: &mut HubClient) -> HashMap<String, pb::Task> {
    let mut tasks = HashMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for t in page.tasks {
            tasks.insert(t.task_id.clone(), t);
        }
        if page.next_page_token.is_empty() {
            return tasks;
        }
        token = page.next_page_token;
    }
}

/// The log's segments, scanned.
fn segments(dir: &Path) -> Vec<segment::Scan> {
    segment::list(&dir.join("log"))
        .unwrap()
        .into_iter()
        .map(|(_, p)| segment::scan(&p).unwrap())
        .collect()
}

#[tokio::test]
async fn sigkill_at_random_points_under_load_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut acked: HashSet<String> = HashSet::new();
    for round in 0..6 {
        let mut proc = HubProcess::spawn(dir, &[]).await;
        let admin = admin_token(dir);
        let grpc = proc.grpc_addr.to_string();
        {
            // Everything acknowledged before the last kill is there.
            let mut c = connect(&grpc, &admin).await.unwrap();
            let tasks = all_tasks(&mut c).await;
            for id in &acked {
                assert!(
                    tasks.contains_key(id),
                    "round {round}: acknowledged {id} lost"
                );
            }
        }
        let kill_after = rand::random_range(20..300usize);
        let now_acked: Arc<Mutex<Vec<String>>> = Default::default();
        let mut pushers = Vec::new();
        for p in 0..3 {
            let (grpc, admin, now_acked) = (grpc.clone(), admin.clone(), now_acked.clone());
            pushers.push(tokio::spawn(async move {
                let mut c = connect(&grpc, &admin).await.unwrap();
                for i in 0.. {
                    let mut req = scheduled("crash", &[], pb::Priority::Normal);
                    req.task_id = format!("r{round}-p{p}-{i}");
                    match c.push_task(req).await {
                        Ok(r) => now_acked.lock().unwrap().push(r.into_inner().task_id),
                        Err(_) => return, // killed under us
                    }
                }
            }));
        }
        eventually(|| {
            let n = now_acked.lock().unwrap().len();
            async move { (n >= kill_after).then_some(()) }
        })
        .await;
        proc.kill9();
        proc.wait_exit().await;
        for p in pushers {
            let _ = p.await;
        }
        acked.extend(now_acked.lock().unwrap().iter().cloned());
    }
    let proc = HubProcess::spawn(dir, &[]).await;
    let mut c = connect(&proc.grpc_addr.to_string(), &admin_token(dir))
        .await
        .unwrap();
    let tasks = all_tasks(&mut c).await;
    for id in &acked {
        assert!(tasks.contains_key(id), "acknowledged {id} lost");
    }
    drop(proc);
    let out = agenthub(&["check"], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Push `n` tasks and stop the hub: their ids.
async fn some_history(dir: &Path, n: usize) -> Vec<String> {
    let hub = TestHub::start_in(dir, |_| {}).await;
    let mut c = hub.client().await;
    let mut ids = Vec::new();
    for i in 0..n {
        let r = c
            .push_task(scheduled(&format!("task {i}"), &[], pb::Priority::Normal))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.task_id);
    }
    hub.stop().await;
    ids
}

#[tokio::test]
async fn a_torn_last_record_is_dropped_and_a_damaged_one_in_the_middle_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ids = some_history(dir, 20).await;
    // A crash in the middle of an append: the start of a record, cut short.
    let seg = segments(dir).pop().unwrap();
    let record = segment::encode_record(seg.last_index + 1, 9_999, &[7u8; 500]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg.path)
        .unwrap();
    f.write_all_at(&record[..200], seg.end).unwrap();
    drop(f);
    let out = agenthub(&["check"], dir);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cut short"), "{text}");

    // The start drops it and every task is there; the log goes on.
    let hub = TestHub::start_in(dir, |_| {}).await;
    let mut c = hub.client().await;
    let tasks = all_tasks(&mut c).await;
    for id in &ids {
        assert!(tasks.contains_key(id), "{id} lost");
    }
    let more = c
        .push_task(scheduled("after the tear", &[], pb::Priority::Normal))
        .await
        .unwrap()
        .into_inner();
    hub.stop().await;
    let out = agenthub(&["check"], dir);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("cut short"),
        "{text}"
    );

    // One bit flipped in the first record: sound records follow it.
    let seg = segments(dir).remove(0);
    let at = segment::HEADER_LEN + segment::RECORD_HEAD as u64 + 10;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    drop(f);
    let name = seg.path.file_name().unwrap().to_str().unwrap().to_string();
    let err = FileStore::open(dir, None)
        .err()
        .expect("a damaged log stops the start");
    let text = err.to_string();
    assert!(
        text.contains(&name) && text.contains(&format!("offset {}", segment::HEADER_LEN)),
        "{text}"
    );
    let out = agenthub(&["check"], dir);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("problem: log damaged") && text.contains(&name),
        "{text}"
    );
    // The binary refuses to start, saying why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args([
            "serve",
            "--ws-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("log damaged") && text.contains(&name),
        "{text}"
    );
    assert!(!more.task_id.is_empty());
}

#[tokio::test]
async fn the_copy_deleted_while_the_hub_is_stopped_is_rebuilt_from_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let before = {
        let hub = TestHub::start_in(dir, |_| {}).await;
        let mut c = hub.client().await;
        let mut sc = hub
            .sidecar_with("rebuild", json!({"max_concurrency": 100}))
            .await;
        // Acknowledged reports are durable: a third stay running, the rest complete.
        for i in 0..30 {
            c.push(pinned("rebuild", &format!("work {i}"))).await;
            let (id, g) = sc.next_assign().await;
            sc.accept(&id, g).await;
            if i % 3 != 0 {
                sc.complete(&id, g, json!({"answer": i})).await;
            }
        }
        let tasks = all_tasks(&mut c).await;
        let mut got = HashMap::new();
        for id in tasks.keys() {
            let t = c
                .get_task(pb::GetTaskRequest {
                    task_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            got.insert(id.clone(), t);
        }
        drop(sc);
        hub.stop().await;
        got
    };
    assert_eq!(before.len(), 30);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("agenthub.db{suffix}")));
    }
    let hub = TestHub::start_in(dir, |_| {}).await;
    let mut c = hub.client().await;
    for (id, t) in &before {
        let now = c
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&now, t, "{id} differs after the rebuild");
    }
    hub.stop().await;
    let out = agenthub(&["check"], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn a_store_without_a_log_is_taken_over_as_the_copy_and_then_cannot_be_rebuilt_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A data directory as an earlier version left it: the database alone.
    let ids = some_history(dir, 10).await;
    std::fs::remove_dir_all(dir.join("log")).unwrap();
    let hub = TestHub::start_in(dir, |_| {}).await;
    let mut c = hub.client().await;
    let later = c
        .push_task(scheduled("after the upgrade", &[], pb::Priority::Normal))
        .await
        .unwrap()
        .into_inner();
    let tasks = all_tasks(&mut c).await;
    for id in ids.iter().chain([&later.task_id]) {
        assert!(tasks.contains_key(id), "{id} missing");
    }
    hub.stop().await;
    let out = agenthub(&["check"], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The log starts after the database's history: without the database
    // there is nothing to rebuild it from, and the start says so.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("agenthub.db{suffix}")));
    }
    let err = FileStore::open(dir, None).err().expect("refused");
    assert!(err.to_string().contains("cannot be rebuilt"), "{err}");
    let out = agenthub(&["check"], dir);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn segments_roll_and_those_the_copy_holds_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 64 KiB segments: a few hundred tasks roll the log many times. The
    // applier gets few records from the writer's memory (a bound of 2 KiB):
    // it reads the others back from the log, in and across segments.
    let store = Arc::new(FileStore::open_with_segments(dir, None, None, 64 << 10).unwrap());
    store.keep_fresh_bytes(2 << 10);
    let hub = TestHub::start_on_store(dir, |_| {}, store.clone()).await;
    let mut c = hub.client().await;
    let mut ids = Vec::new();
    for i in 0..400 {
        let r = c
            .push_task(scheduled(
                &format!("{i} {}", "d".repeat(600)),
                &[],
                pb::Priority::Normal,
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.task_id);
    }
    // The first task is read back from the copy, through every segment.
    let first = c
        .get_task(pb::GetTaskRequest {
            task_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.description.starts_with("0 d"));
    // Segments whose records the copy holds go, once it is checkpointed.
    eventually(|| {
        let n = segment::list(&dir.join("log")).unwrap().len();
        async move { (n <= 2).then_some(()) }
    })
    .await;
    let bases: Vec<u64> = segment::list(&dir.join("log"))
        .unwrap()
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert!(bases[0] > 0, "the first segment is still there: {bases:?}");
    // Every apply of the copy succeeded the first time (a misread record
    // would fail one, to be retried from the log).
    assert_eq!(store.copy_failures(), 0);
    drop(store);
    hub.stop().await;
    // A restart reads the remaining segments and the copy: every task is there.
    let hub = TestHub::start_in(dir, |_| {}).await;
    let mut c = hub.client().await;
    let tasks = all_tasks(&mut c).await;
    for id in &ids {
        assert!(tasks.contains_key(id), "{id} lost");
    }
    c.push(scheduled("after the restart", &[], pb::Priority::Normal))
        .await;
    hub.stop().await;
    let out = agenthub(&["check"], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A batch of one progress event at `seq`; its callback records where and
/// in which order it ran.
fn progress_batch(seq: u64, ran: &Arc<Mutex<Vec<(u64, std::thread::ThreadId)>>>) -> Batch {
    let event = agenthub::model::TaskEvent {
        seq,
        task_id: format!("t-{seq}"),
        agent_id: "a-1".into(),
        kind: agenthub::model::EventKind::Progress,
        generation: 1,
        payload: Default::default(),
        timestamp_ms: 1,
        state: agenthub::model::TaskState::Running,
    };
    let mut b = Batch {
        epoch: 1,
        events: vec![Arc::new(EncodedEvent::new(event))],
        ..Batch::default()
    };
    let ran = ran.clone();
    b.then(move |r| {
        r.as_ref().unwrap();
        ran.lock().unwrap().push((seq, std::thread::current().id()));
    });
    b
}

/// The seqs of the batches whose callbacks ran, in the order they ran.
fn seqs_run(ran: &Mutex<Vec<(u64, std::thread::ThreadId)>>) -> Vec<u64> {
    ran.lock().unwrap().iter().map(|(s, _)| *s).collect()
}

/// On a runtime, a lone batch (a quiet hub) commits and completes on the
/// thread that awaits it, with no hand-off; batches queued together (a
/// busy hub) go out as one group; every callback runs in order.
#[tokio::test]
async fn a_lone_batch_commits_where_it_is_awaited_and_queued_ones_as_one_group() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path(), None).unwrap();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let here = std::thread::current().id();
    let marker = |store: &FileStore| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut b = Batch::default();
        b.then(move |_| {
            let _ = tx.send(());
        });
        store.submit(b);
        rx
    };
    // One at a time: each on this thread.
    for seq in 1..=20 {
        store.submit(progress_batch(seq, &ran));
        tokio::task::yield_now().await;
        assert_eq!(ran.lock().unwrap().len() as u64, seq, "batch {seq} waits");
    }
    assert!(ran.lock().unwrap().iter().all(|(_, t)| *t == here));
    assert_eq!(store.commit_stats().commits, 20);
    // A burst: one group.
    for seq in 21..=120 {
        store.submit(progress_batch(seq, &ran));
    }
    marker(&store).await.unwrap();
    assert_eq!(seqs_run(&ran), (1..=120).collect::<Vec<_>>());
    let stats = store.commit_stats();
    assert_eq!((stats.commits, stats.batches), (21, 121));
    assert_eq!(store.durable_seq(), 120);
    store.close();
}

/// Without a runtime (the offline tools) a thread of the log's leads, and
/// closing the store commits everything still queued first.
#[test]
fn without_a_runtime_the_log_commits_on_its_own_thread_and_close_finishes_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path(), None).unwrap();
    let ran = Arc::new(Mutex::new(Vec::new()));
    for seq in 1..=100 {
        store.submit(progress_batch(seq, &ran));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut marker = Batch::default();
    marker.then(move |_| tx.send(()).unwrap());
    store.submit(marker);
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("nothing committed the queued batches");
    let here = std::thread::current().id();
    assert!(ran.lock().unwrap().iter().all(|(_, t)| *t != here));
    // Queued right before close: close commits them.
    for seq in 101..=200 {
        store.submit(progress_batch(seq, &ran));
    }
    store.close();
    assert_eq!(seqs_run(&ran), (1..=200).collect::<Vec<_>>());
    // A closed store takes nothing more: the batch fails at once.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut late = Batch::default();
    late.then(move |r| tx.send(r.is_err()).unwrap());
    store.submit(late);
    assert!(rx.recv().unwrap(), "a batch after close was taken");
    // Reopened, the log holds all of them.
    let store = FileStore::open(tmp.path(), None).unwrap();
    assert_eq!(store.durable_seq(), 200);
    assert_eq!(store.read_events(0, 1000).unwrap().len(), 200);
    store.close();
}

/// A batch whose callback panics (a bug) loses its own group's callbacks,
/// but the log goes on: the next batch commits, on a worker and on the
/// log's thread alike, and seqs continue.
#[tokio::test]
async fn a_leader_that_panics_is_replaced_and_the_log_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path(), None).unwrap();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let panicking = |seq| {
        let mut b = progress_batch(seq, &Arc::new(Mutex::new(Vec::new())));
        b.then(|_| panic!("a callback's bug"));
        b
    };
    let committed = |store: &FileStore| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut b = Batch::default();
        b.then(move |r| {
            let _ = tx.send(r.is_ok());
        });
        store.submit(b);
        tokio::time::timeout(std::time::Duration::from_secs(10), rx)
    };
    // A lone batch: its leader is a task on this runtime, which panics.
    store.submit(panicking(1));
    tokio::task::yield_now().await;
    assert_eq!(store.durable_seq(), 1);
    store.submit(progress_batch(2, &ran));
    assert!(committed(&store).await.expect("the log stalled").unwrap());
    // A burst: the log's thread leads, and panics in its group's callbacks
    // (the callbacks after the panicking one are lost with it).
    for seq in 3..=10 {
        store.submit(if seq == 5 {
            panicking(seq)
        } else {
            progress_batch(seq, &ran)
        });
    }
    while store.durable_seq() < 10 {
        tokio::task::yield_now().await;
    }
    store.submit(progress_batch(11, &ran));
    assert!(committed(&store).await.expect("the log stalled").unwrap());
    assert_eq!(store.durable_seq(), 11);
    assert!(seqs_run(&ran).contains(&11));
    store.close();
}
