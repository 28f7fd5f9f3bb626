//! The `output-flood` group: does one agent flooding the hub slow another
//! agent's push round trip? Sequential pushes to a quiet agent are timed
//! without, then with, a second agent flooding for its running task, on
//! the same hub: 10 MB/s of `task_output` (paced), or 1 MB `task_progress`
//! frames as fast as the hub reads them (every one a durable event).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use agenthub::client::{connect, HubClient};
use agenthub::pb;

use crate::procs::{issue_tokens, Hub};
use crate::util::{now_ns, Metrics, Samples};
use crate::ws::{report, sidecar, wait_ack, wait_assign, Ws};
use crate::Ctx;

/// Output bytes per second the flooding agent sends.
const FLOOD_BYTES_PER_S: u64 = 10 * 1024 * 1024;
/// Bytes of one `task_output` frame's data.
const CHUNK: usize = 4096;
/// Pacing tick of the flood.
const TICK: Duration = Duration::from_millis(10);
/// Bytes of one flooding `task_progress` frame's progress.
const PROGRESS_BYTES: usize = 1_000_000;

/// What the second agent floods the hub with.
#[derive(Clone, Copy)]
pub enum Flood {
    /// 10 MB/s of `task_output`, paced.
    Output,
    /// 1 MB `task_progress` frames, unpaced: the hub's backpressure paces them.
    Progress,
}

/// Sequential push → accept ack round trips on `ws`'s agent; returns samples.
async fn round_trips(
    client: &mut HubClient,
    ws: &mut Ws,
    agent: &str,
    prefix: &str,
    n: usize,
) -> Result<Samples> {
    let mut lat = Samples::with_capacity(n);
    for i in 0..n {
        let task_id = format!("{prefix}-{i}");
        let req = pb::PushTaskRequest {
            agent_id: agent.into(),
            description: "quiet".into(),
            task_id: task_id.clone(),
            ..Default::default()
        };
        let t0 = now_ns();
        let (resp, generation) = tokio::join!(client.push_task(req), wait_assign(ws, &task_id));
        resp.context("PushTask")?;
        let generation = generation?;
        ws.send(Message::text(report("task_accepted", &task_id, generation)))
            .await?;
        wait_ack(ws, &task_id, "accepted").await?;
        lat.push(now_ns() - t0);
        ws.send(Message::text(report("task_complete", &task_id, generation)))
            .await?;
        wait_ack(ws, &task_id, "complete").await?;
    }
    Ok(lat)
}

pub async fn run(ctx: &Ctx, name: &str, kind: Flood) -> Result<Metrics> {
    let s = &ctx.sizes;
    let agents = ["quiet".to_string(), "flood".to_string()];
    let dir = ctx.fresh_dir(name)?;
    let tokens = issue_tokens(&dir, &agents)?;
    // Every flooded progress frame is a stored event of 1 MB: keep the
    // newest 1,000 only, or the phase fills the disk (about 50 MB/s).
    let args: &[&str] = match kind {
        Flood::Output => &[],
        Flood::Progress => &["--event-retention", "1000"],
    };
    let hub = Hub::start(&ctx.agenthub, &dir, &tokens.admin, &ctx.log(name), args).await?;
    let result = async {
        let mut client = connect(&hub.grpc_addr, &hub.admin).await?;
        let mut quiet = sidecar(&hub.ws_addr, "quiet", &tokens.agents[0].1, 1).await?;
        let warm = s.push_warmup.min(500);
        round_trips(&mut client, &mut quiet, "quiet", "warm", warm).await?;
        let n = match kind {
            Flood::Output => s.push_measured.min(5000),
            Flood::Progress => s.push_measured.min(1000),
        };
        let before = round_trips(&mut client, &mut quiet, "quiet", "calm", n)
            .await?
            .sorted();

        // The flooding agent's task, accepted and left running.
        let mut flood = sidecar(&hub.ws_addr, "flood", &tokens.agents[1].1, 1).await?;
        let req = pb::PushTaskRequest {
            agent_id: "flood".into(),
            description: "noisy".into(),
            task_id: "flood-task".into(),
            ..Default::default()
        };
        let (resp, generation) =
            tokio::join!(client.push_task(req), wait_assign(&mut flood, "flood-task"));
        resp?;
        let generation = generation?;
        flood
            .send(Message::text(report(
                "task_accepted",
                "flood-task",
                generation,
            )))
            .await?;
        wait_ack(&mut flood, "flood-task", "accepted").await?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let flooder = tokio::spawn({
            let (stop, sent) = (stop.clone(), sent.clone());
            async move {
                if let Flood::Progress = kind {
                    let frame = serde_json::json!({
                        "type": "task_progress", "task_id": "flood-task", "generation": generation,
                        "progress": "p".repeat(PROGRESS_BYTES),
                    })
                    .to_string();
                    while !stop.load(Ordering::Relaxed) {
                        flood.send(Message::text(frame.clone())).await?;
                        sent.fetch_add(PROGRESS_BYTES as u64, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                let frame = serde_json::json!({
                    "type": "task_output", "task_id": "flood-task", "generation": generation,
                    "stream": "stdout", "data": "o".repeat(CHUNK),
                })
                .to_string();
                let per_tick =
                    (FLOOD_BYTES_PER_S as f64 * TICK.as_secs_f64() / CHUNK as f64).ceil() as usize;
                let mut tick = tokio::time::interval(TICK);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for _ in 0..per_tick {
                        flood.feed(Message::text(frame.clone())).await?;
                    }
                    flood.flush().await?;
                    sent.fetch_add((per_tick * CHUNK) as u64, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        let t0 = now_ns();
        let during = round_trips(&mut client, &mut quiet, "quiet", "flood", n)
            .await?
            .sorted();
        let secs = (now_ns() - t0) as f64 / 1e9;
        stop.store(true, Ordering::Relaxed);
        flooder.await??;
        let mut m = Metrics::default();
        m.put("count", n as f64);
        m.put("push_p50_calm_us", before.pct_us(0.5));
        m.put("push_p99_calm_us", before.pct_us(0.99));
        m.put("push_p50_flood_us", during.pct_us(0.5));
        m.put("push_p99_flood_us", during.pct_us(0.99));
        m.put(
            "flood_mb_per_s",
            sent.load(Ordering::Relaxed) as f64 / secs / (1024.0 * 1024.0),
        );
        m.put("slowdown_p50", during.pct_us(0.5) / before.pct_us(0.5));
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    hub.stop().await;
    ctx.remove_dir(name);
    result
}
