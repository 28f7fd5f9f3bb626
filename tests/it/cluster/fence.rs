//! The log's fence, in-process: two writers on one JetStream log.

use std::sync::Arc;

use agenthub::cluster::log::ClusterStore;
use agenthub::cluster::{ClusterOptions, Node};
use agenthub::error::{Error, StorageFault};
use agenthub::event::EncodedEvent;
use agenthub::model::{EventKind, Seq, Task, TaskEvent, TaskState};
use agenthub::store::{Batch, Store, TaskWrite};
use serde_json::json;

use super::nats::NatsCluster;

/// A batch that creates `task_id` with the event at `seq`.
pub fn created(seq: Seq, task_id: &str) -> Batch {
    let mut task: Task = serde_json::from_value(json!({
        "task_id": task_id, "agent_id": null, "state": "QUEUED", "generation": 0,
        "attempts": 0, "max_attempts": 3, "priority": "NORMAL", "result": null,
        "error": null, "created_at_ms": 1, "updated_at_ms": 1,
    }))
    .unwrap();
    task.last_seq = seq;
    task.created_seq = seq;
    let event = TaskEvent {
        seq,
        task_id: task_id.into(),
        agent_id: String::new(),
        kind: EventKind::Created,
        generation: 0,
        payload: Default::default(),
        timestamp_ms: 1,
        state: TaskState::Queued,
    };
    Batch {
        epoch: 1,
        tasks: vec![TaskWrite::new(task, None)],
        events: vec![Arc::new(EncodedEvent::new(event))],
        ..Batch::default()
    }
}

pub async fn commit(store: &ClusterStore, mut batch: Batch) -> Result<(), Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    batch.then(move |r| {
        let _ = tx.send(r.clone());
    });
    store.submit(batch);
    rx.await.unwrap()
}

pub async fn open(nats: &NatsCluster, dir: &std::path::Path, id: &str) -> Arc<ClusterStore> {
    let node = Node::connect(ClusterOptions::new(&nats.url_list(), id))
        .await
        .unwrap();
    ClusterStore::open(node, &dir.join(id)).await.unwrap()
}

/// A writer that another one fenced out cannot append, whatever it
/// believes: its append is refused, it stops writing, and no copy of the
/// log ever holds what it tried to write. Event seqs run on without a hole
/// across the change of writer, and an append that would leave one is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_out_writer_can_never_append() {
    let nats = NatsCluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let x = open(&nats, tmp.path(), "x").await;
    let y = open(&nats, tmp.path(), "y").await;

    let tx = x.promote("x/1").await.unwrap();
    let base = x.durable_seq();
    commit(&x, created(base + 1, "task-x1")).await.unwrap();
    let ty = y.promote("y/1").await.unwrap();
    // In the stream: x's term entry, x's append, y's term entry.
    assert_eq!(ty, tx + 2);

    // x appends on the head it knows: refused.
    let refused = commit(&x, created(base + 2, "task-x2")).await.unwrap_err();
    assert!(
        matches!(
            refused,
            Error::Storage {
                fault: StorageFault::Conflict | StorageFault::NotLeader,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(!x.is_leader());

    commit(&y, created(base + 2, "task-y1")).await.unwrap();
    x.catch_up().await.unwrap();
    for (name, s) in [("x", &x), ("y", &y)] {
        assert!(s.get_task("task-x1").unwrap().is_some(), "{name}");
        assert!(s.get_task("task-x2").unwrap().is_none(), "{name}");
        assert!(s.get_task("task-y1").unwrap().is_some(), "{name}");
        let seqs: Vec<Seq> = s
            .read_events(0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [base + 1, base + 2], "{name}");
        assert_eq!(s.durable_seq(), base + 2, "{name}");
    }

    // An append whose first event does not follow the log's last one.
    let hole = commit(&y, created(base + 4, "task-hole"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            hole,
            Error::Storage {
                fault: StorageFault::Conflict,
                ..
            }
        ),
        "{hole:?}"
    );
    y.catch_up().await.unwrap();
    assert!(y.get_task("task-hole").unwrap().is_none());
    assert_eq!(y.durable_seq(), base + 2);
}
