//! The `history` group: a hub whose store holds many finished tasks
//! (500-byte description, 2 KB result each), written once per run straight
//! into the store through its own `Store` API (the hub then reads them
//! through its normal code). Measures what history costs: memory, restart
//! time, reads of finished tasks, disk per task, and the push workloads
//! with that history in place.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use rand::Rng;
use serde_json::json;

use agenthub::client::connect;
use agenthub::event::EncodedEvent;
use agenthub::model::{EventKind, Priority, Task, TaskEvent, TaskState};
use agenthub::pb;
use agenthub::store::sqlite::SqliteStore;
use agenthub::store::{Batch, Store, TaskWrite};

use crate::hub::{push_on, PUSH_AGENT};
use crate::procs::{issue_tokens, Hub};
use crate::util::{now_ns, rss_kib, Metrics, Samples};
use crate::Ctx;

const DATA: &str = "hub-history-data";
pub const DESCRIPTION_BYTES: usize = 500;
pub const RESULT_BYTES: usize = 2000;
/// Agents the finished tasks are spread over (for the agent filter).
const AGENTS: usize = 100;
/// Tasks per write batch while preparing.
const PREPARE_BATCH: usize = 2000;

fn event(
    seq: u64,
    task: &Task,
    kind: EventKind,
    payload: serde_json::Value,
    state: TaskState,
) -> Arc<EncodedEvent> {
    let payload = match payload {
        serde_json::Value::Object(m) => m,
        _ => Default::default(),
    };
    Arc::new(EncodedEvent::new(TaskEvent {
        seq,
        task_id: task.task_id.clone(),
        agent_id: task.agent_id.clone().unwrap_or_default(),
        kind,
        generation: 1,
        payload,
        timestamp_ms: task.updated_at_ms,
        state,
    }))
}

/// Write `n` finished tasks (4 events each) into a fresh store in `DATA`,
/// with tokens for the push agent. Returns the admin token.
pub async fn prepare(ctx: &Ctx, n: usize) -> Result<String> {
    let dir = ctx.fresh_dir(DATA)?;
    let tokens = issue_tokens(&dir, &[PUSH_AGENT.to_string()])?;
    std::fs::write(dir.join("agent.token.bench"), &tokens.agents[0].1)?;
    let t0 = now_ns();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let store = SqliteStore::open(&dir, None, true)?;
        let description = "d".repeat(DESCRIPTION_BYTES);
        let result = "r".repeat(RESULT_BYTES);
        let now = agenthub::model::now_ms();
        let mut seq = 0u64;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<agenthub::Result<()>>();
        let mut pending = 0;
        for start in (0..n).step_by(PREPARE_BATCH) {
            let mut batch = Batch::default();
            for i in start..(start + PREPARE_BATCH).min(n) {
                let agent = format!("hist-{}", i % AGENTS);
                let created = seq + 1;
                let mut task = Task {
                    task_id: format!("hist-{i:08}"),
                    agent_id: Some(agent.clone()),
                    pinned: true,
                    description: description.clone(),
                    metadata: Default::default(),
                    state: TaskState::Completed,
                    generation: 1,
                    attempts: 1,
                    max_attempts: 3,
                    needed_capabilities: Vec::new(),
                    priority: Priority::Normal,
                    result: None,
                    error: None,
                    created_at_ms: now,
                    updated_at_ms: now,
                    last_seq: created + 3,
                    created_seq: created,
                    depends_on: Vec::new(),
                    queue_ttl_ms: 0,
                    deadline_ms: 0,
                };
                let created_payload = json!({"description": description, "priority": "NORMAL", "needed_capabilities": [], "max_attempts": 3, "pinned": true});
                batch.events.push(event(created, &task, EventKind::Created, created_payload, TaskState::Queued));
                batch.events.push(event(created + 1, &task, EventKind::Assigned, json!({"attempt": 1}), TaskState::Assigned));
                batch.events.push(event(created + 2, &task, EventKind::Accepted, json!({"task_id": task.task_id, "generation": 1}), TaskState::Running));
                batch.events.push(event(created + 3, &task, EventKind::Completed, json!({"task_id": task.task_id, "generation": 1, "result": result}), TaskState::Completed));
                seq += 4;
                task.result = Some(json!(result));
                batch.tasks.push(TaskWrite::new(task, None));
            }
            let tx = done_tx.clone();
            batch.then(move |r| {
                let _ = tx.send(r.clone());
            });
            store.submit(batch);
            pending += 1;
            // Keep a few batches in flight, no more (bounded memory).
            while pending > 4 {
                done_rx.recv()??;
                pending -= 1;
            }
        }
        for _ in 0..pending {
            done_rx.recv()??;
        }
        store.close();
        Ok(())
    })
    .await??;
    eprintln!(
        "  history data: {n} finished tasks in {:.0}s",
        (now_ns() - t0) as f64 / 1e9
    );
    Ok(tokens.admin)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    ["agenthub.db", "agenthub.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes of event bodies and task row bodies (what the pages hold besides
/// keys, indexes and slack).
fn stored_bytes(dir: &std::path::Path) -> Result<(f64, f64)> {
    let c = rusqlite::Connection::open(dir.join("agenthub.db"))?;
    let events: f64 = c.query_row("SELECT TOTAL(LENGTH(body)) FROM events", [], |r| r.get(0))?;
    let rows: f64 = c.query_row("SELECT TOTAL(LENGTH(body)) FROM tasks", [], |r| r.get(0))?;
    Ok((events, rows))
}

/// Start a hub on `dir`; returns it and the time until its first answer.
async fn start_timed(
    ctx: &Ctx,
    dir: &std::path::Path,
    admin: &str,
    log: &str,
) -> Result<(Hub, f64)> {
    let t0 = Instant::now();
    let hub = Hub::start(&ctx.agenthub, dir, admin, &ctx.log(log), &[]).await?;
    let mut client = connect(&hub.grpc_addr, admin).await?;
    client.list_agents(pb::ListAgentsRequest {}).await?;
    Ok((hub, t0.elapsed().as_secs_f64() * 1e3))
}

/// RSS once the hub has answered `reads` reads (settled).
async fn settled_rss(hub: &Hub) -> Result<f64> {
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    Ok(rss_kib(hub.pid())? as f64 / 1024.0)
}

/// The history phase: (history figures, push on the history hub, pipelined).
pub async fn run(
    ctx: &Ctx,
    name: &str,
    n: usize,
    admin: &str,
) -> Result<(Metrics, Metrics, Metrics)> {
    let mut m = Metrics::default();
    m.put("finished_tasks", n as f64);

    // An empty hub, for the memory baseline.
    let empty = ctx.fresh_dir(&format!("{name}-empty"))?;
    let empty_tokens = issue_tokens(&empty, &[])?;
    let (hub, empty_ms) =
        start_timed(ctx, &empty, &empty_tokens.admin, &format!("{name}-empty")).await?;
    let rss_empty = settled_rss(&hub).await?;
    hub.stop().await;
    ctx.remove_dir(&format!("{name}-empty"));
    m.put("empty_start_ms", empty_ms);

    let dir = ctx.dir(DATA);
    let payload = (DESCRIPTION_BYTES + RESULT_BYTES) as f64;
    m.put("disk_bytes_per_task", dir_bytes(&dir) as f64 / n as f64);
    m.put(
        "disk_ratio_to_payload",
        dir_bytes(&dir) as f64 / n as f64 / payload,
    );
    if let Ok((events, rows)) = stored_bytes(&dir) {
        m.put("event_bytes_per_task", events / n as f64);
        m.put("row_bytes_per_task", rows / n as f64);
    }
    let (hub, start_ms) = start_timed(ctx, &dir, admin, name).await?;
    m.put("restart_to_serving_ms", start_ms);
    let result = async {
        let mut client = connect(&hub.grpc_addr, admin).await?;
        let mut rng = rand::rng();
        // GetTask of finished tasks, sequential, random ids.
        let mut get = Samples::with_capacity(2000);
        for _ in 0..2000 {
            let id = format!("hist-{:08}", rng.random_range(0..n));
            let t0 = now_ns();
            let t = client
                .get_task(pb::GetTaskRequest { task_id: id })
                .await?
                .into_inner();
            get.push(now_ns() - t0);
            anyhow::ensure!(t.description.len() == DESCRIPTION_BYTES, "description lost");
        }
        get.sorted().put(&mut m, "get_task");
        // ListTasks pages of 100, each filter, random positions.
        let filters: [(&str, i32, &str); 4] = [
            ("list_all", 0, ""),
            ("list_state", pb::task::State::Completed as i32, ""),
            ("list_agent", 0, "hist-7"),
            (
                "list_agent_state",
                pb::task::State::Completed as i32,
                "hist-7",
            ),
        ];
        let mut worst: f64 = 0.0;
        for (label, state, agent) in filters {
            let mut lat = Samples::with_capacity(200);
            for _ in 0..200 {
                let token = (rng.random_range(0..n as u64 * 4)).to_string();
                let t0 = now_ns();
                let page = client
                    .list_tasks(pb::ListTasksRequest {
                        state,
                        agent_id: agent.into(),
                        page_size: 100,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                lat.push(now_ns() - t0);
                let _ = page;
            }
            let sorted = lat.sorted();
            worst = worst.max(sorted.pct_us(0.5));
            sorted.put(&mut m, label);
        }
        m.put("list_worst_filter_p50_us", worst);
        m.put("rss_empty_mib", rss_empty);
        let rss = settled_rss(&hub).await?;
        m.put("rss_history_mib", rss);
        m.put("rss_above_empty_mib", rss - rss_empty);
        // The push workloads with that history in place.
        let token =
            std::fs::read_to_string(dir.join("agent.token.bench")).context("agent token")?;
        let (seq, piped) = push_on(ctx, &hub, token.trim()).await?;
        Ok::<_, anyhow::Error>((seq, piped))
    }
    .await;
    hub.stop().await;
    let (seq, piped) = result?;
    Ok((m, seq, piped))
}
