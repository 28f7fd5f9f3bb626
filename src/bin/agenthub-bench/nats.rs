//! Baselines on `nats-server`: core request-reply and fan-out, and JetStream
//! (`sync_interval: always`) durable work-queue round trips (on one server,
//! and R3 on a 3-node cluster), ingest with PubAck, and ordered-consumer
//! replay. Same shapes as the hub workloads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::hub::{Fanout, FanoutTally};
use crate::procs::{Nats, NatsCluster};
use crate::util::{now_ns, padded, CpuMeter, Metrics, Samples};
use crate::Ctx;

/// Longest wait for one expected message.
const MSG_TIMEOUT: Duration = Duration::from_secs(30);
/// Outstanding PubAcks per ingest publisher (100 publishers: 3,200 in all).
pub const INGEST_WINDOW: usize = 32;

/// Connect to `url`, or to any of a comma-separated list of URLs.
async fn client(url: &str) -> Result<async_nats::Client> {
    let urls: Vec<&str> = url.split(',').collect();
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .connect(urls)
        .await
        .with_context(|| format!("connect {url}"))
}

/// A JetStream context that waits up to [`MSG_TIMEOUT`] for PubAcks.
fn js_context(c: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(MSG_TIMEOUT)
        .build(c)
}

fn payload() -> Bytes {
    Bytes::from(padded("{", "}"))
}

async fn fresh_nats(ctx: &Ctx, name: &str) -> Result<Nats> {
    let dir = ctx.fresh_dir(name)?;
    Nats::start(&ctx.nats, &dir, true, &ctx.log(name)).await
}

/// Core request-reply: sequential latency and 64-in-flight throughput.
pub async fn request_reply(ctx: &Ctx, name: &str) -> Result<(Metrics, Metrics)> {
    let s = &ctx.sizes;
    let nats = fresh_nats(ctx, name).await?;
    let result = async {
        let responder = client(&nats.url).await?;
        let mut sub = responder.subscribe("rr").await?;
        responder.flush().await?;
        let echo = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    if responder.publish(reply, msg.payload).await.is_err() {
                        return;
                    }
                }
            }
        });
        let requester = client(&nats.url).await?;
        let body = payload();
        let mut lat = Samples::with_capacity(s.push_measured);
        let cpu = CpuMeter::start(nats.pid())?;
        for i in 0..s.push_warmup + s.push_measured {
            let t0 = now_ns();
            tokio::time::timeout(MSG_TIMEOUT, requester.request("rr", body.clone()))
                .await
                .context("request timed out")??;
            if i >= s.push_warmup {
                lat.push(now_ns() - t0);
            }
        }
        let cpu_us = cpu.used_us()?;
        let mut seq = Metrics::default();
        seq.put("count", s.push_measured as f64);
        lat.sorted().put(&mut seq, "rtt");
        seq.put(
            "server_cpu_us_per_op",
            cpu_us as f64 / (s.push_warmup + s.push_measured) as f64,
        );

        // Pipelined: `inflight` requesters share the count.
        let count = s.push_pipelined;
        let next = Arc::new(AtomicU64::new(0));
        let cpu = CpuMeter::start(nats.pid())?;
        let t0 = now_ns();
        let mut workers = Vec::new();
        for _ in 0..s.inflight {
            let requester = requester.clone();
            let next = next.clone();
            let body = body.clone();
            workers.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                    tokio::time::timeout(MSG_TIMEOUT, requester.request("rr", body.clone()))
                        .await
                        .context("request timed out")??;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for w in workers {
            tokio::time::timeout(ctx.limit, w)
                .await
                .context("request-reply timed out")???;
        }
        let t1 = now_ns();
        let cpu_us = cpu.used_us()?;
        echo.abort();
        let mut piped = Metrics::default();
        let secs = (t1 - t0) as f64 / 1e9;
        crate::util::pipelined_metrics(&mut piped, count, s.inflight, secs, cpu_us);
        Ok::<_, anyhow::Error>((seq, piped))
    }
    .await;
    nats.stop().await;
    ctx.remove_dir(name);
    result
}

/// The `i` at the start of a `{"i":N,...}` payload.
fn payload_index(p: &[u8]) -> Option<u64> {
    let rest = p.strip_prefix(br#"{"i":"#)?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Core fan-out: one publisher, `subscribers` subscribers each on its own
/// connection, the publisher never more than 1,000 messages ahead.
pub async fn fanout(ctx: &Ctx, name: &str, subscribers: usize, events: usize) -> Result<Metrics> {
    let nats = fresh_nats(ctx, name).await?;
    let result = async {
        let shared = Fanout::new(events, subscribers);
        let mut tasks = Vec::with_capacity(subscribers);
        for w in 0..subscribers {
            let c = client(&nats.url).await?;
            let mut sub = c.subscribe("fan").await?;
            c.flush().await?;
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let _keep = c;
                let mut t = FanoutTally {
                    lat: Samples::with_capacity(events),
                    lost: 0,
                    dup: 0,
                    last_ns: 0,
                };
                let mut expected = 0u64;
                let mut count = 0u64;
                while count < events as u64 {
                    let msg = match tokio::time::timeout(Duration::from_secs(10), sub.next()).await
                    {
                        Ok(Some(m)) => m,
                        _ => {
                            t.lost += events as u64 - count;
                            break;
                        }
                    };
                    let Some(i) = payload_index(&msg.payload) else {
                        continue;
                    };
                    if i < expected {
                        t.dup += 1;
                        continue;
                    }
                    t.lost += i - expected;
                    expected = i + 1;
                    count += 1;
                    shared.record(w, i, count, &mut t.lat);
                    t.last_ns = now_ns();
                }
                t
            }));
        }
        let publisher = client(&nats.url).await?;
        let cpu = CpuMeter::start(nats.pid())?;
        let t0 = now_ns();
        for i in 0..events as u64 {
            if !shared.fits(i) {
                publisher.flush().await?;
                shared.admit(i).await?;
            }
            let body = Bytes::from(padded(&format!(r#"{{"i":{i},"#), "}"));
            shared.sent_ns[i as usize].store(now_ns(), Ordering::Relaxed);
            publisher.publish("fan", body).await?;
        }
        publisher.flush().await?;
        let mut tallies = Vec::with_capacity(subscribers);
        for t in tasks {
            tallies.push(t.await?);
        }
        let cpu_us = cpu.used_us()?;
        let mut m = shared.metrics(tallies, t0);
        m.put(
            "server_cpu_us_per_delivery",
            cpu_us as f64 / (events * subscribers) as f64,
        );
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    nats.stop().await;
    ctx.remove_dir(name);
    result
}

/// JetStream durable round trip on one fresh server: see [`roundtrip_on`].
pub async fn roundtrip(ctx: &Ctx, name: &str) -> Result<(Metrics, Metrics)> {
    let nats = fresh_nats(ctx, name).await?;
    let result = roundtrip_on(ctx, &nats.url, &[nats.pid()], 1).await;
    nats.stop().await;
    ctx.remove_dir(name);
    result
}

/// JetStream R3 durable round trip on the 3-node cluster (the `js-cluster`
/// group): the same workloads as [`roundtrip`] with `num_replicas: 3`, the
/// clients connected through the cluster's URL list. Server CPU is summed
/// over the three servers. The stream is deleted afterwards, so the cluster
/// goes on to the `cluster` group clean.
pub async fn roundtrip_cluster(ctx: &Ctx, cluster: &NatsCluster) -> Result<(Metrics, Metrics)> {
    let url = cluster.url_list();
    let result = roundtrip_on(ctx, &url, &cluster.pids(), 3).await;
    let js = js_context(client(&url).await?);
    let _ = js.delete_stream("WQ").await;
    result
}

/// JetStream durable round trip: publish to a work-queue stream of
/// `replicas` replicas (await the PubAck), a pull consumer on another
/// connection receives it and double-acks (awaits the server's
/// confirmation). Sequential latency, then throughput with 64 messages in
/// flight. `url` may list several servers; `pids` are the servers whose CPU
/// is counted.
async fn roundtrip_on(
    ctx: &Ctx,
    url: &str,
    pids: &[u32],
    replicas: usize,
) -> Result<(Metrics, Metrics)> {
    let s = &ctx.sizes;
    let js_pub = js_context(client(url).await?);
    let js_con = js_context(client(url).await?);
    js_pub
        .create_stream(stream::Config {
            name: "WQ".into(),
            subjects: vec!["wq".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let mut consumer = js_con
        .get_stream("WQ")
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some("worker".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;
    // A replicated stream and consumer answer only once their RAFT groups
    // have leaders: wait for them before measuring.
    let ready_by = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stream_led = js_con
            .get_stream("WQ")
            .await?
            .info()
            .await
            .ok()
            .and_then(|i| i.cluster.clone())
            .is_none_or(|c| c.leader.is_some());
        let consumer_led = consumer
            .info()
            .await
            .ok()
            .and_then(|i| i.cluster.clone())
            .is_none_or(|c| c.leader.is_some());
        if stream_led && consumer_led {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < ready_by,
            "the WQ stream or its consumer has no leader after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut messages = consumer.messages().await?;
    let body = payload();
    // A fresh cluster may answer a publish with "no stream" for a moment
    // after the stream has a leader (its subject's interest is still
    // spreading): one message, retried until it is stored, then taken.
    loop {
        let stored = match js_pub.publish("wq", body.clone()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        match stored {
            true => break,
            false => {
                anyhow::ensure!(
                    std::time::Instant::now() < ready_by,
                    "the WQ stream takes no message after 30 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tokio::time::timeout(MSG_TIMEOUT, messages.next())
        .await
        .context("consumer timed out")?
        .context("consumer ended")?
        .map_err(|e| anyhow::anyhow!("consumer: {e}"))?
        .double_ack()
        .await
        .map_err(|e| anyhow::anyhow!("double ack: {e}"))?;

    let mut to_puback = Samples::with_capacity(s.push_measured);
    let mut to_deliver = Samples::with_capacity(s.push_measured);
    let mut to_done = Samples::with_capacity(s.push_measured);
    let mut cpu = None;
    for i in 0..s.js_warmup + s.js_measured {
        if i == s.js_warmup {
            cpu = Some(CpuMeter::start_all(pids)?);
        }
        let t0 = now_ns();
        let (puback, side) = tokio::join!(
            async {
                js_pub.publish("wq", body.clone()).await?.await?;
                Ok::<_, anyhow::Error>(now_ns())
            },
            async {
                let msg = tokio::time::timeout(MSG_TIMEOUT, messages.next())
                    .await
                    .context("consumer timed out")?
                    .context("consumer ended")?
                    .map_err(|e| anyhow::anyhow!("consumer: {e}"))?;
                let t_deliver = now_ns();
                msg.double_ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("double ack: {e}"))?;
                Ok::<_, anyhow::Error>((t_deliver, now_ns()))
            }
        );
        let t_puback = puback?;
        let (t_deliver, t_done) = side?;
        if i >= s.js_warmup {
            to_puback.push(t_puback - t0);
            to_deliver.push(t_deliver - t0);
            to_done.push(t_done - t0);
        }
    }
    let cpu_us = cpu.context("no measured round trips")?.used_us()?;
    let mut seq = Metrics::default();
    seq.put("count", s.js_measured as f64);
    to_done.sorted().put(&mut seq, "publish_to_double_ack");
    to_deliver.sorted().put(&mut seq, "publish_to_deliver");
    to_puback.sorted().put(&mut seq, "publish_to_puback");
    seq.put("server_cpu_us_per_op", cpu_us as f64 / s.js_measured as f64);

    // Pipelined.
    let count = s.js_pipelined;
    let window = Arc::new(Semaphore::new(s.inflight));
    let cpu = CpuMeter::start_all(pids)?;
    let t0 = now_ns();
    let side = {
        let window = window.clone();
        tokio::spawn(async move {
            let done = Arc::new(AtomicU64::new(0));
            let finished = Arc::new(tokio::sync::Notify::new());
            let mut received = 0usize;
            while received < count {
                let msg = tokio::time::timeout(MSG_TIMEOUT, messages.next())
                    .await
                    .context("consumer timed out")?
                    .context("consumer ended")?
                    .map_err(|e| anyhow::anyhow!("consumer: {e}"))?;
                received += 1;
                let (window, done, finished) = (window.clone(), done.clone(), finished.clone());
                tokio::spawn(async move {
                    if msg.double_ack().await.is_ok() {
                        window.add_permits(1);
                        if done.fetch_add(1, Ordering::AcqRel) + 1 == count as u64 {
                            finished.notify_one();
                        }
                    }
                });
            }
            if done.load(Ordering::Acquire) < count as u64 {
                tokio::time::timeout(MSG_TIMEOUT, finished.notified())
                    .await
                    .context("double acks timed out")?;
            }
            Ok::<_, anyhow::Error>(now_ns())
        })
    };
    let publisher = async {
        let mut acks = VecDeque::new();
        for _ in 0..count {
            window.acquire().await?.forget();
            acks.push_back(js_pub.publish("wq", body.clone()).await?);
            while acks.len() > s.inflight {
                acks.pop_front().expect("non-empty").await?;
            }
        }
        for a in acks {
            a.await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(ctx.limit, publisher)
        .await
        .context("pipelined publish timed out")??;
    let t1 = tokio::time::timeout(ctx.limit, side)
        .await
        .context("pipelined consume timed out")???;
    let cpu_us = cpu.used_us()?;
    let mut piped = Metrics::default();
    let secs = (t1 - t0) as f64 / 1e9;
    crate::util::pipelined_metrics(&mut piped, count, s.inflight, secs, cpu_us);
    Ok((seq, piped))
}

/// Publish `per_publisher` messages from each of `publishers` connections to
/// `subject_prefix.{k}`, at most [`INGEST_WINDOW`] PubAcks outstanding each.
/// Returns (messages, seconds).
async fn publish_all(
    url: &str,
    publishers: usize,
    per_publisher: usize,
    subject_prefix: &str,
    limit: Duration,
) -> Result<(usize, f64)> {
    let mut contexts = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        contexts.push(js_context(client(url).await?));
    }
    let start = Arc::new(tokio::sync::Barrier::new(publishers + 1));
    let mut tasks = Vec::with_capacity(publishers);
    for (k, js) in contexts.into_iter().enumerate() {
        let start = start.clone();
        let subject = format!("{subject_prefix}.{k}");
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut acks = VecDeque::with_capacity(INGEST_WINDOW + 1);
            for i in 0..per_publisher {
                let body = Bytes::from(padded(&format!(r#"{{"i":{i},"#), "}"));
                acks.push_back(js.publish(subject.clone(), body).await?);
                if acks.len() >= INGEST_WINDOW {
                    acks.pop_front().expect("non-empty").await?;
                }
            }
            for a in acks {
                a.await?;
            }
            Ok::<_, anyhow::Error>(now_ns())
        }));
    }
    start.wait().await;
    let t0 = now_ns();
    let last = crate::util::latest_finish(tasks, limit, "publishing")
        .await?
        .max(t0);
    Ok((publishers * per_publisher, (last - t0) as f64 / 1e9))
}

async fn create_limits_stream(url: &str, name: &str, subject: &str) -> Result<()> {
    let js = js_context(client(url).await?);
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// JetStream ingest: 100 publishers, each awaiting PubAcks: durable msgs/s.
pub async fn ingest(ctx: &Ctx, name: &str) -> Result<Metrics> {
    let s = &ctx.sizes;
    let nats = fresh_nats(ctx, name).await?;
    let result = async {
        create_limits_stream(&nats.url, "ING", "ing.*").await?;
        let cpu = CpuMeter::start(nats.pid())?;
        let (n, secs) = publish_all(
            &nats.url,
            s.ingest_sidecars,
            s.ingest_per_sidecar,
            "ing",
            ctx.limit,
        )
        .await?;
        let cpu_us = cpu.used_us()?;
        let mut m = Metrics::default();
        m.put("publishers", s.ingest_sidecars as f64);
        m.put("window", INGEST_WINDOW as f64);
        m.put("events", n as f64);
        m.put("events_per_s", n as f64 / secs);
        m.put("server_cpu_us_per_event", cpu_us as f64 / n as f64);
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    nats.stop().await;
    ctx.remove_dir(name);
    result
}

/// Store `events` messages in stream `REPLAY` (once per bench run). The
/// server that writes them runs with the default sync interval, only to save
/// time: the files are the same, and every replay rep reads them through a
/// fresh `sync_interval: always` server.
pub async fn prepare_replay(ctx: &Ctx, events: usize) -> Result<()> {
    let name = "js-replay-data";
    let dir = ctx.fresh_dir(name)?;
    let nats = Nats::start(&ctx.nats, &dir, false, &ctx.log("js-replay-prepare")).await?;
    let result = async {
        create_limits_stream(&nats.url, "REPLAY", "replay.*").await?;
        let publishers = ctx.sizes.ingest_sidecars;
        let (n, secs) = publish_all(
            &nats.url,
            publishers,
            events.div_ceil(publishers),
            "replay",
            ctx.limit * 10,
        )
        .await?;
        eprintln!(
            "  replay data: {n} JetStream messages stored ({:.0} msgs/s)",
            n as f64 / secs
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    nats.stop().await;
    result
}

/// JetStream replay: a fresh server process on the prepared store; an
/// ordered pull consumer reads every message.
pub async fn replay(ctx: &Ctx, name: &str) -> Result<Metrics> {
    let dir = ctx.dir("js-replay-data");
    let nats = Nats::start(&ctx.nats, &dir, true, &ctx.log(name)).await?;
    let result = async {
        let js = js_context(client(&nats.url).await?);
        let mut stream = js.get_stream("REPLAY").await?;
        let total = stream.info().await?.state.messages;
        if total == 0 {
            bail!("replay stream is empty");
        }
        let cpu = CpuMeter::start(nats.pid())?;
        let t0 = now_ns();
        let mut messages = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?
            .messages()
            .await?;
        let mut count = 0u64;
        while count < total {
            tokio::time::timeout(MSG_TIMEOUT, messages.next())
                .await
                .context("replay stalled")?
                .context("replay ended")?
                .map_err(|e| anyhow::anyhow!("ordered consumer: {e}"))?;
            count += 1;
        }
        let t1 = now_ns();
        let cpu_us = cpu.used_us()?;
        let mut m = Metrics::default();
        m.put("events", count as f64);
        m.put("events_per_s", count as f64 / ((t1 - t0) as f64 / 1e9));
        m.put("server_cpu_us_per_event", cpu_us as f64 / count as f64);
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    nats.stop().await;
    result
}
