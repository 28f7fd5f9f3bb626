//! `agenthub-bench`: the hub against its baselines, measured in one run.
//!
//! Every server runs as its own process on loopback and is started fresh
//! for each phase: the hub (`agenthub serve`), `nats-server` (core and
//! JetStream with `sync_interval: always`), and a raw tokio-tungstenite echo
//! server (`agenthub-bench echo-server`, the WebSocket floor). Each rep runs
//! every workload once, hub and baseline back to back, so the reps interleave.
//! The cluster groups (`js-cluster`, `cluster`) share one 3-node NATS
//! cluster per rep, started before the first of them.
//! Every phase writes one JSON line; the Markdown summary holds medians and
//! same-run ratios (`scripts/bench.sh`, `docs/benchmarks.md`).
//!
//! # Layout
//! - `main.rs`: command line, sizes, the run loop, the fsync floor.
//! - `procs.rs`: server processes and token setup.
//! - `ws.rs`: sidecar client, echo server and echo workloads.
//! - `hub.rs`: hub workloads.
//! - `cluster.rs`: cluster-mode workloads (three hub nodes on NATS).
//! - `nats.rs`: NATS core and JetStream baselines.
//! - `report.rs`: JSON lines and the Markdown summary.
//! - `util.rs`: clock, percentiles, `/proc` readings.

mod cluster;
mod flood;
mod grpc_echo;
mod history;
mod hub;
mod nats;
mod procs;
mod report;
mod util;
mod ws;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::report::{Record, Recorder};
use crate::util::{now_ns, Metrics, Samples, PAYLOAD_BYTES};

#[derive(Parser)]
#[command(
    name = "agenthub-bench",
    about = "Benchmark agenthub against its baselines in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the workloads (all, or those named with --only).
    Run(RunArgs),
    /// The raw tokio-tungstenite echo server; prints `addr=HOST:PORT`.
    EchoServer,
    /// The tonic unary echo server (GetTask only); prints `addr=HOST:PORT`.
    GrpcEchoServer,
    /// Rewrite the Markdown summary from a results file.
    Summarize {
        /// A `results-*.jsonl` file.
        results: PathBuf,
        /// Where to write the summary (stdout if omitted).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The hub binary (release build).
    #[arg(long)]
    agenthub: PathBuf,
    /// The nats-server binary.
    #[arg(long)]
    nats_server: PathBuf,
    /// Results directory (JSON lines, summary, server logs).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Scratch directory for data directories (on the disk under test).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Interleaved repetitions.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Shrink every count ~10-20x (for development).
    #[arg(long)]
    quick: bool,
    /// Only these groups (comma-separated): fsync, echo, grpc-echo, nats-rr, js-roundtrip,
    /// hub-push, hub-bound, fanout, ingest, replay, connections, history, output-flood, js-cluster,
    /// cluster; and `hub-ingest` (the hub's side of `ingest` alone, for comparing builds).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Longest time one measured loop may take, in seconds.
    #[arg(long, default_value_t = 300)]
    phase_limit_secs: u64,
    /// The `connections` group's sidecar counts (comma-separated), instead
    /// of the size's (e.g. `--only connections --connections 3000`).
    #[arg(long, value_delimiter = ',')]
    connections: Vec<usize>,
    /// Sidecars per loopback source address in the `connections` group
    /// (127.0.0.1, then 127.0.0.2, ...); at most 9/10 of
    /// `net.ipv4.ip_local_port_range`.
    #[arg(long, default_value_t = 25_000)]
    sidecars_per_address: usize,
    /// The command line to print in the summary.
    #[arg(long, default_value = "scripts/bench.sh")]
    command_line: String,
}

/// Every group, in the order a rep runs them.
const GROUPS: &[&str] = &[
    "fsync",
    "echo",
    "grpc-echo",
    "nats-rr",
    "js-roundtrip",
    "hub-push",
    "hub-bound",
    "fanout",
    "ingest",
    "replay",
    "connections",
    "history",
    "output-flood",
    "js-cluster",
    "cluster",
];

/// Groups run only when named in `--only`, for comparing two builds: one
/// side of a group without its baseline.
const HUB_ONLY_GROUPS: &[&str] = &["hub-ingest"];

/// Workload sizes.
pub struct Sizes {
    pub fsync: usize,
    pub push_warmup: usize,
    pub push_measured: usize,
    pub push_pipelined: usize,
    pub js_warmup: usize,
    pub js_measured: usize,
    pub js_pipelined: usize,
    pub inflight: usize,
    /// (watchers, events sent).
    pub fanout: Vec<(usize, usize)>,
    pub connections: Vec<usize>,
    /// Sidecars per loopback source address in `connections`.
    pub conn_per_address: usize,
    pub idle_secs: u64,
    pub idle_ping_secs: u64,
    pub ingest_sidecars: usize,
    pub ingest_per_sidecar: usize,
    pub replay_events: usize,
    /// Finished tasks in the `history` group's store.
    pub history_tasks: usize,
    /// `cluster` fan-out: watchers on each of the three nodes.
    pub cluster_watchers_per_node: usize,
    /// `cluster` fan-out: events sent.
    pub cluster_fanout_events: usize,
    /// `cluster` failover: leader kills.
    pub failover_rounds: usize,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            fsync: 2_000,
            push_warmup: 2_000,
            push_measured: 20_000,
            push_pipelined: 200_000,
            js_warmup: 2_000,
            js_measured: 20_000,
            js_pipelined: 50_000,
            inflight: 64,
            fanout: vec![(1, 100_000), (10, 50_000), (100, 10_000)],
            connections: vec![1_000, 5_000, 10_000, 100_000],
            conn_per_address: 25_000,
            idle_secs: 10,
            idle_ping_secs: 5,
            ingest_sidecars: 100,
            ingest_per_sidecar: 2_000,
            replay_events: 1_000_000,
            history_tasks: 1_000_000,
            cluster_watchers_per_node: 33,
            cluster_fanout_events: 10_000,
            failover_rounds: 5,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            fsync: 200,
            push_warmup: 200,
            push_measured: 1_000,
            push_pipelined: 10_000,
            js_warmup: 200,
            js_measured: 1_000,
            js_pipelined: 5_000,
            inflight: 64,
            fanout: vec![(1, 10_000), (10, 5_000), (100, 1_000)],
            connections: vec![100, 500, 1_000],
            conn_per_address: 25_000,
            idle_secs: 3,
            idle_ping_secs: 1,
            ingest_sidecars: 100,
            ingest_per_sidecar: 200,
            replay_events: 50_000,
            history_tasks: 50_000,
            cluster_watchers_per_node: 33,
            cluster_fanout_events: 1_000,
            failover_rounds: 2,
        }
    }
}

/// What every workload needs: binaries, directories, sizes, time limit.
pub struct Ctx {
    pub agenthub: PathBuf,
    pub nats: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    pub sizes: Sizes,
    pub limit: Duration,
}

impl Ctx {
    pub fn dir(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// An empty directory `name` under the scratch directory.
    pub fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    pub fn remove_dir(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.dir(name));
        let _ = std::fs::remove_file(self.dir(name).with_extension("conf"));
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Two workers: the machine the numbers are for has two cores, shared
    // with the server under test.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::EchoServer => rt.block_on(ws::echo_server()),
        Cmd::GrpcEchoServer => rt.block_on(grpc_echo::echo_server()),
        Cmd::Summarize { results, out } => {
            let md = report::summarize(&report::load(&results)?);
            match out {
                Some(p) => std::fs::write(p, md)?,
                None => print!("{md}"),
            }
            Ok(())
        }
        Cmd::Run(args) => rt.block_on(run(args)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    for g in &args.only {
        if !GROUPS.contains(&g.as_str()) && !HUB_ONLY_GROUPS.contains(&g.as_str()) {
            bail!(
                "unknown group `{g}` (one of {}, {})",
                GROUPS.join(", "),
                HUB_ONLY_GROUPS.join(", ")
            );
        }
    }
    if args.connections.contains(&0) {
        bail!("--connections: counts must be at least 1");
    }
    if args.sidecars_per_address == 0 {
        bail!("--sidecars-per-address must be at least 1");
    }
    let groups: Vec<&str> = GROUPS
        .iter()
        .copied()
        .filter(|g| args.only.is_empty() || args.only.iter().any(|o| o == g))
        .chain(
            HUB_ONLY_GROUPS
                .iter()
                .copied()
                .filter(|g| args.only.iter().any(|o| o == g)),
        )
        .collect();
    let stamp = utc_stamp();
    std::fs::create_dir_all(&args.out)?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.out.join("work"));
    let logs = args.out.join("logs").join(&stamp);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&logs)?;
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if !args.connections.is_empty() {
        sizes.connections = args.connections.clone();
    }
    sizes.conn_per_address = args.sidecars_per_address;
    let ctx = Ctx {
        agenthub: std::fs::canonicalize(&args.agenthub).context("--agenthub")?,
        nats: std::fs::canonicalize(&args.nats_server).context("--nats-server")?,
        work: std::fs::canonicalize(&work)?,
        logs,
        sizes,
        limit: Duration::from_secs(args.phase_limit_secs),
    };
    let results_path = args.out.join(format!("results-{stamp}.jsonl"));
    let mut rec = Recorder::create(&results_path, &stamp)?;
    rec.machine(&machine_info(&ctx, &args).await)?;
    eprintln!("results: {}", results_path.display());

    // Data the replay and connection phases read, made once per run.
    let mut prepared = Prepared::default();
    if groups.contains(&"replay") {
        eprintln!(
            "preparing replay data ({} events each)",
            ctx.sizes.replay_events
        );
        match prepare_replay(&ctx).await {
            Ok(last) => prepared.replay_last_seq = Some(last),
            Err(e) => eprintln!("  replay preparation failed: {e:#}"),
        }
    }
    if groups.contains(&"history") {
        eprintln!(
            "preparing history data ({} finished tasks)",
            ctx.sizes.history_tasks
        );
        match history::prepare(&ctx, ctx.sizes.history_tasks).await {
            Ok(admin) => prepared.history_admin = Some(admin),
            Err(e) => eprintln!("  history preparation failed: {e:#}"),
        }
    }
    if groups.contains(&"connections") {
        // Tokens for the largest count the open-file limit lets run.
        let mut max = 0;
        for &n in &ctx.sizes.connections {
            match hub::connections_not_run(n) {
                Some(why) => eprintln!("  connections[{n}]: {why}"),
                None => max = max.max(n),
            }
        }
        if max > 0 {
            eprintln!("issuing {} agent tokens", max + 1);
            let t = now_ns();
            prepared.conn_tokens =
                tokio::task::block_in_place(|| hub::prepare_connections(&ctx, max + 1))?;
            eprintln!("  {:.1}s", (now_ns() - t) as f64 / 1e9);
        }
    }

    let t_run = now_ns();
    for rep in 1..=args.reps {
        let mut nats_cluster = RepCluster::default();
        for &group in &groups {
            let t = now_ns();
            eprintln!("rep {rep}/{}: {group}", args.reps);
            run_group(&ctx, &mut rec, rep, group, &prepared, &mut nats_cluster).await?;
            eprintln!("  {:.1}s", (now_ns() - t) as f64 / 1e9);
        }
        nats_cluster.stop(&ctx, rep).await;
    }
    eprintln!("all reps: {:.0}s", (now_ns() - t_run) as f64 / 1e9);
    let _ = std::fs::remove_dir_all(&ctx.work);

    let mut md = report::summarize(&report::load(&results_path)?);
    md.push_str(&format!("\nCommand: `{}`\n", args.command_line));
    let summary = args.out.join(format!("summary-{stamp}.md"));
    std::fs::write(&summary, &md)?;
    std::fs::copy(&summary, args.out.join("latest.md"))?;
    std::fs::copy(&results_path, args.out.join("latest.jsonl"))?;
    std::io::stdout().write_all(md.as_bytes())?;
    eprintln!("summary: {}", summary.display());
    Ok(())
}

/// Data some groups read, made once per run before the reps.
#[derive(Default)]
struct Prepared {
    /// The last seq of the hub's replay store.
    replay_last_seq: Option<u64>,
    /// `(agent_id, token)` for the connection counts.
    conn_tokens: Vec<(String, String)>,
    /// The admin token of the history store.
    history_admin: Option<String>,
}

/// The rep's 3-node NATS cluster, started by the first cluster group that
/// needs it and stopped at the end of the rep.
#[derive(Default)]
enum RepCluster {
    #[default]
    NotStarted,
    Running(procs::NatsCluster),
    /// It did not start: every cluster group of the rep fails with this.
    Failed(String),
}

impl RepCluster {
    async fn get(&mut self, ctx: &Ctx, rep: u32) -> Result<&procs::NatsCluster> {
        if let RepCluster::NotStarted = self {
            let name = format!("r{rep}-nats-cluster");
            let started = match ctx.fresh_dir(&name) {
                Ok(dir) => {
                    procs::NatsCluster::start(&ctx.nats, &dir, |i| {
                        ctx.log(&format!("{name}-n{}", i + 1))
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            *self = match started {
                Ok(c) => RepCluster::Running(c),
                Err(e) => RepCluster::Failed(format!("{e:#}")),
            };
        }
        match self {
            RepCluster::Running(c) => Ok(c),
            RepCluster::Failed(e) => bail!("the NATS cluster did not start: {e}"),
            RepCluster::NotStarted => unreachable!("started above"),
        }
    }

    async fn stop(self, ctx: &Ctx, rep: u32) {
        if let RepCluster::Running(c) = self {
            c.stop().await;
        }
        ctx.remove_dir(&format!("r{rep}-nats-cluster"));
    }
}

async fn prepare_replay(ctx: &Ctx) -> Result<u64> {
    let n = ctx.sizes.replay_events;
    nats::prepare_replay(ctx, n).await?;
    hub::prepare_replay(ctx, n).await
}

/// Run one group of one rep; failures are recorded, not fatal.
async fn run_group(
    ctx: &Ctx,
    rec: &mut Recorder,
    rep: u32,
    group: &str,
    prepared: &Prepared,
    nats_cluster: &mut RepCluster,
) -> Result<()> {
    let replay_last_seq = prepared.replay_last_seq;
    let conn_tokens = &prepared.conn_tokens;
    let history_admin = prepared.history_admin.as_deref();
    let r = |phase: &str, system: &str, param: Option<u64>| Record::new(rep, phase, system, param);
    let name = |s: &str| format!("r{rep}-{s}");
    match group {
        "fsync" => {
            let t = now_ns();
            let out = fsync_floor(ctx, &name("fsync")).await;
            rec.write(r("fsync", "disk", None), out, t)?;
        }
        "echo" => {
            let t = now_ns();
            let out = echo_floor(ctx, &name("echo"), EchoKind::Ws).await;
            rec.write_pair(
                r("ws_echo_seq", "ws-echo", None),
                r("ws_echo_pipelined", "ws-echo", None),
                out,
                t,
            )?;
        }
        "grpc-echo" => {
            let t = now_ns();
            let out = echo_floor(ctx, &name("grpc-echo"), EchoKind::Grpc).await;
            rec.write_pair(
                r("grpc_echo_seq", "tonic-echo", None),
                r("grpc_echo_pipelined", "tonic-echo", None),
                out,
                t,
            )?;
        }
        "nats-rr" => {
            let t = now_ns();
            let out = nats::request_reply(ctx, &name("nats-rr")).await;
            rec.write_pair(
                r("nats_rr_seq", "nats", None),
                r("nats_rr_pipelined", "nats", None),
                out,
                t,
            )?;
        }
        "js-roundtrip" => {
            let t = now_ns();
            let out = nats::roundtrip(ctx, &name("js-roundtrip")).await;
            rec.write_pair(
                r("js_roundtrip_seq", "jetstream", None),
                r("js_roundtrip_pipelined", "jetstream", None),
                out,
                t,
            )?;
        }
        "hub-push" => {
            let t = now_ns();
            let out = hub::push(ctx, &name("hub-push"), &[]).await;
            rec.write_pair(
                r("hub_push_seq", "agenthub", None),
                r("hub_push_pipelined", "agenthub", None),
                out,
                t,
            )?;
        }
        "hub-bound" => {
            let t = now_ns();
            let out = hub::push(ctx, &name("hub-bound"), &["--bench-discard-writes"]).await;
            rec.write_pair(
                r("hub_bound_seq", "agenthub-no-store", None),
                r("hub_bound_pipelined", "agenthub-no-store", None),
                out,
                t,
            )?;
        }
        "fanout" => {
            for &(n, events) in &ctx.sizes.fanout {
                let t = now_ns();
                let out = nats::fanout(ctx, &name(&format!("nats-fanout-{n}")), n, events).await;
                rec.write(r("nats_fanout", "nats", Some(n as u64)), out, t)?;
                let t = now_ns();
                let out = hub::fanout(ctx, &name(&format!("hub-fanout-{n}")), n, events).await;
                rec.write(r("hub_fanout", "agenthub", Some(n as u64)), out, t)?;
            }
        }
        "ingest" | "hub-ingest" => {
            if group == "ingest" {
                let t = now_ns();
                let out = nats::ingest(ctx, &name("js-ingest")).await;
                rec.write(r("js_ingest", "jetstream", None), out, t)?;
            }
            let t = now_ns();
            let out = hub::ingest(ctx, &name("hub-ingest")).await;
            rec.write(r("hub_ingest", "agenthub", None), out, t)?;
        }
        "replay" => {
            let t = now_ns();
            let out = nats::replay(ctx, &name("js-replay")).await;
            rec.write(r("js_replay", "jetstream", None), out, t)?;
            let t = now_ns();
            let out = match replay_last_seq {
                Some(last) => hub::replay(ctx, &name("hub-replay"), last).await,
                None => Err(anyhow::anyhow!("replay data was not prepared")),
            };
            rec.write(r("hub_replay", "agenthub", None), out, t)?;
        }
        "connections" => {
            for &n in &ctx.sizes.connections {
                let t = now_ns();
                let record = r("hub_connections", "agenthub", Some(n as u64));
                if let Some(why) = hub::connections_not_run(n) {
                    rec.not_run(record, &why)?;
                    continue;
                }
                let out = if conn_tokens.len() > n {
                    hub::connections(ctx, &name(&format!("hub-conn-{n}")), conn_tokens, n).await
                } else {
                    Err(anyhow::anyhow!("agent tokens were not prepared"))
                };
                rec.write(record, out, t)?;
            }
        }
        "history" => {
            let t = now_ns();
            let out = match history_admin {
                Some(admin) => {
                    history::run(ctx, &name("hub-history"), ctx.sizes.history_tasks, admin).await
                }
                None => Err(anyhow::anyhow!("no history data")),
            };
            match out {
                Ok((h, seq, piped)) => {
                    rec.write(r("hub_history", "agenthub", None), Ok(h), t)?;
                    rec.write(r("hub_history_push_seq", "agenthub", None), Ok(seq), t)?;
                    rec.write(
                        r("hub_history_push_pipelined", "agenthub", None),
                        Ok(piped),
                        t,
                    )?;
                }
                Err(e) => {
                    rec.write(r("hub_history", "agenthub", None), Err(e), t)?;
                }
            }
        }
        "output-flood" => {
            let t = now_ns();
            let out = flood::run(ctx, &name("hub-output-flood"), flood::Flood::Output).await;
            rec.write(r("hub_output_flood", "agenthub", None), out, t)?;
            let t = now_ns();
            let out = flood::run(ctx, &name("hub-progress-flood"), flood::Flood::Progress).await;
            rec.write(r("hub_progress_flood", "agenthub", None), out, t)?;
        }
        "js-cluster" => {
            let t = now_ns();
            let out = match nats_cluster.get(ctx, rep).await {
                Ok(c) => nats::roundtrip_cluster(ctx, c).await,
                Err(e) => Err(e),
            };
            rec.write_pair(
                r("js_cluster_roundtrip_seq", "jetstream-r3", None),
                r("js_cluster_roundtrip_pipelined", "jetstream-r3", None),
                out,
                t,
            )?;
        }
        "cluster" => {
            let t = now_ns();
            let out = match nats_cluster.get(ctx, rep).await {
                Ok(c) => cluster::run(ctx, &name("cluster"), c).await,
                Err(e) => Err(e),
            };
            let sys = "agenthub-cluster";
            let (leader, follower, fanout, failover) = match out {
                Ok(o) => (o.leader_push, o.follower_push, o.fanout, o.failover),
                Err(e) => {
                    let e = format!("{e:#}");
                    (failed(&e), failed(&e), failed(&e), failed(&e))
                }
            };
            rec.write_pair(
                r("cluster_push_seq", sys, None),
                r("cluster_push_pipelined", sys, None),
                leader,
                t,
            )?;
            rec.write_pair(
                r("cluster_follower_push_seq", sys, None),
                r("cluster_follower_push_pipelined", sys, None),
                follower,
                t,
            )?;
            let watchers = (3 * ctx.sizes.cluster_watchers_per_node) as u64;
            rec.write(r("cluster_fanout", sys, Some(watchers)), fanout, t)?;
            rec.write(r("cluster_failover", sys, None), failover, t)?;
        }
        other => bail!("unknown group {other}"),
    }
    Ok(())
}

/// The same error for each of several phases.
fn failed<T>(e: &str) -> Result<T> {
    Err(anyhow::anyhow!("{e}"))
}

/// The disk's floor: write 200 bytes and fsync, in the scratch directory.
async fn fsync_floor(ctx: &Ctx, name: &str) -> Result<Metrics> {
    let dir = ctx.fresh_dir(name)?;
    let count = ctx.sizes.fsync;
    let (lat, log_sync) = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::create(dir.join("fsync.bin"))?;
        let block = [b'x'; PAYLOAD_BYTES];
        let mut lat = Samples::with_capacity(count);
        for _ in 0..count {
            let t0 = now_ns();
            f.write_all(&block)?;
            f.sync_all()?;
            lat.push(now_ns() - t0);
        }
        // The hub log's own durable append: a record written into blocks
        // that already exist (zero-filled ahead), then `fdatasync`. Its
        // CPU (this thread's, kernel time included) is what every
        // commit costs the hub at least.
        use std::os::unix::fs::FileExt;
        let g = std::fs::File::create(dir.join("log.bin"))?;
        g.write_all_at(&vec![0u8; count * PAYLOAD_BYTES], 0)?;
        g.sync_all()?;
        let cpu0 = thread_cpu_ns();
        let mut log = Samples::with_capacity(count);
        for i in 0..count {
            let t0 = now_ns();
            g.write_all_at(&block, (i * PAYLOAD_BYTES) as u64)?;
            g.sync_data()?;
            log.push(now_ns() - t0);
        }
        let cpu_us = (thread_cpu_ns() - cpu0) as f64 / 1e3 / count as f64;
        Ok::<_, anyhow::Error>((lat, (log, cpu_us)))
    })
    .await??;
    ctx.remove_dir(name);
    let mut m = Metrics::default();
    m.put("count", count as f64);
    let lat = lat.sorted();
    m.put("p50_us", lat.pct_us(0.50));
    m.put("p99_us", lat.pct_us(0.99));
    m.put("log_append_p50_us", log_sync.0.sorted().pct_us(0.50));
    m.put("log_append_cpu_us", log_sync.1);
    Ok(m)
}

/// CPU time of the calling thread (user and system), in nanoseconds: the
/// first field of `/proc/thread-self/schedstat` (time on a CPU).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Which echo server a floor phase runs against.
#[derive(Clone, Copy)]
enum EchoKind {
    /// Raw tokio-tungstenite WebSocket echo.
    Ws,
    /// tonic unary echo (GetTask).
    Grpc,
}

/// An echo floor: sequential round trips, then pipelined throughput, with
/// the server's CPU per operation.
async fn echo_floor(ctx: &Ctx, name: &str, kind: EchoKind) -> Result<(Metrics, Metrics)> {
    let s = &ctx.sizes;
    let subcommand = match kind {
        EchoKind::Ws => "echo-server",
        EchoKind::Grpc => "grpc-echo-server",
    };
    let server = procs::Echo::start_with(&ctx.log(name), subcommand).await?;
    let result = async {
        let addr = &server.addr;
        let cpu = util::CpuMeter::start(server.pid())?;
        let mut seq = match kind {
            EchoKind::Ws => ws::echo_sequential(addr, s.push_warmup, s.push_measured).await?,
            EchoKind::Grpc => grpc_echo::sequential(addr, s.push_warmup, s.push_measured).await?,
        };
        seq.put(
            "server_cpu_us_per_op",
            cpu.used_us()? as f64 / (s.push_warmup + s.push_measured) as f64,
        );
        let cpu = util::CpuMeter::start(server.pid())?;
        let (n, inflight, limit) = (s.push_pipelined, s.inflight, ctx.limit);
        let mut piped = match kind {
            EchoKind::Ws => ws::echo_pipelined(addr, n, inflight, limit).await?,
            EchoKind::Grpc => grpc_echo::pipelined(addr, n, inflight, limit).await?,
        };
        piped.put("server_cpu_us_per_op", cpu.used_us()? as f64 / n as f64);
        Ok::<_, anyhow::Error>((seq, piped))
    }
    .await;
    server.stop().await;
    result
}

/// Machine, versions and sizes, for the summary header.
async fn machine_info(ctx: &Ctx, args: &RunArgs) -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let version = |bin: &Path| {
        std::process::Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let fs = std::process::Command::new("df")
        .arg("--output=fstype,source")
        .arg(&ctx.work)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_gib": (mem_kib as f64 / 1048576.0).round(),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "filesystem": fs,
        "agenthub": version(&ctx.agenthub),
        "nats_server": version(&ctx.nats),
        "reps": args.reps,
        "quick": args.quick,
        "local_port_range": read("/proc/sys/net/ipv4/ip_local_port_range").split_whitespace().collect::<Vec<_>>().join("-"),
        "nofile_limit": read("/proc/self/limits").lines().find(|l| l.starts_with("Max open files")).map(|l| l.split_whitespace().nth(3).unwrap_or("").to_string()).unwrap_or_default(),
    })
}

/// `YYYYmmddTHHMMSSZ` from the system clock.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
