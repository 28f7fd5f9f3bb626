//! Results: one JSON line per phase, and the Markdown summary of medians and
//! same-run ratios (a ratio is taken within each rep, then the median of the
//! reps' ratios is reported).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::util::{median, now_ns, Metrics};

/// Which phase a result line is for.
pub struct Record {
    rep: u32,
    phase: String,
    system: String,
    param: Option<u64>,
}

impl Record {
    pub fn new(rep: u32, phase: &str, system: &str, param: Option<u64>) -> Record {
        Record {
            rep,
            phase: phase.into(),
            system: system.into(),
            param,
        }
    }
}

/// Appends result lines to the results file as phases finish.
pub struct Recorder {
    file: File,
    run: String,
}

impl Recorder {
    pub fn create(path: &Path, run: &str) -> Result<Recorder> {
        Ok(Recorder {
            file: File::create(path).with_context(|| format!("create {}", path.display()))?,
            run: run.into(),
        })
    }

    fn line(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }

    pub fn machine(&mut self, info: &Value) -> Result<()> {
        let v = json!({"run": self.run, "phase": "machine", "machine": info});
        self.line(&v)
    }

    /// One phase's outcome; `started` is when it began (`now_ns`).
    pub fn write(&mut self, r: Record, out: Result<Metrics>, started: u64) -> Result<()> {
        let secs = (now_ns() - started) as f64 / 1e9;
        let (metrics, error) = match out {
            Ok(m) => (m, None),
            Err(e) => (Metrics::default(), Some(format!("{e:#}"))),
        };
        let map: serde_json::Map<String, Value> = metrics
            .0
            .iter()
            .map(|(k, v)| (k.clone(), json!(round(*v))))
            .collect();
        let lost = map.get("lost").and_then(Value::as_f64).unwrap_or(0.0);
        let dup = map.get("duplicated").and_then(Value::as_f64).unwrap_or(0.0);
        let error = error.or_else(|| {
            (lost > 0.0 || dup > 0.0).then(|| format!("{lost} events lost, {dup} duplicated"))
        });
        let valid = error.is_none();
        let v = json!({
            "run": self.run, "rep": r.rep, "phase": r.phase, "system": r.system,
            "param": r.param, "valid": valid, "error": error, "secs": round(secs),
            "metrics": map,
        });
        let shown: Vec<String> = metrics
            .0
            .iter()
            .take(6)
            .map(|(k, v)| format!("{k}={}", round(*v)))
            .collect();
        match &error {
            None => eprintln!(
                "  {}{}: {}",
                r.phase,
                param_suffix(r.param),
                shown.join(" ")
            ),
            Some(e) => eprintln!("  {}{}: INVALID: {e}", r.phase, param_suffix(r.param)),
        }
        self.line(&v)
    }

    /// A phase this machine cannot run (e.g. too few open files allowed):
    /// recorded with `why` and `not_run`, shown as not run rather than as a
    /// failure.
    pub fn not_run(&mut self, r: Record, why: &str) -> Result<()> {
        eprintln!("  {}{}: {why}", r.phase, param_suffix(r.param));
        let v = json!({
            "run": self.run, "rep": r.rep, "phase": r.phase, "system": r.system,
            "param": r.param, "valid": false, "not_run": true, "error": why,
            "secs": 0.0, "metrics": {},
        });
        self.line(&v)
    }

    /// Two phases measured by one function.
    pub fn write_pair(
        &mut self,
        a: Record,
        b: Record,
        out: Result<(Metrics, Metrics)>,
        started: u64,
    ) -> Result<()> {
        match out {
            Ok((ma, mb)) => {
                self.write(a, Ok(ma), started)?;
                self.write(b, Ok(mb), started)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.write(a, Err(anyhow::anyhow!("{msg}")), started)?;
                self.write(b, Err(anyhow::anyhow!("{msg}")), started)
            }
        }
    }
}

fn param_suffix(p: Option<u64>) -> String {
    p.map(|n| format!("[{n}]")).unwrap_or_default()
}

/// Three significant decimals is plenty.
fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        (v * 10.0).round() / 10.0
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

/// A results file, parsed.
pub struct Data {
    machine: Option<Value>,
    recs: Vec<Rec>,
}

struct Rec {
    rep: u32,
    phase: String,
    system: String,
    param: Option<u64>,
    valid: bool,
    /// The machine could not run the phase (`error` says why): neither a
    /// result nor a failure.
    not_run: bool,
    error: Option<String>,
    metrics: BTreeMap<String, f64>,
}

pub fn load(path: &Path) -> Result<Data> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut data = Data {
        machine: None,
        recs: Vec::new(),
    };
    for line in BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)?;
        if v["phase"] == "machine" {
            data.machine = Some(v["machine"].clone());
            continue;
        }
        let metrics = v["metrics"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, x)| x.as_f64().map(|x| (k.clone(), x)))
                    .collect()
            })
            .unwrap_or_default();
        data.recs.push(Rec {
            rep: v["rep"].as_u64().unwrap_or(0) as u32,
            phase: v["phase"].as_str().unwrap_or("").into(),
            system: v["system"].as_str().unwrap_or("").into(),
            param: v["param"].as_u64(),
            valid: v["valid"].as_bool().unwrap_or(false),
            not_run: v["not_run"].as_bool().unwrap_or(false),
            error: v["error"].as_str().map(String::from),
            metrics,
        });
    }
    Ok(data)
}

impl Data {
    fn reps(&self) -> Vec<u32> {
        let mut r: Vec<u32> = self.recs.iter().map(|r| r.rep).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// A metric of a valid phase in one rep.
    fn get(&self, rep: u32, phase: &str, param: Option<u64>, metric: &str) -> Option<f64> {
        self.recs
            .iter()
            .find(|r| r.rep == rep && r.phase == phase && r.param == param && r.valid)
            .and_then(|r| r.metrics.get(metric).copied())
    }

    /// Largest parameter a phase ran with (e.g. the most watchers).
    fn max_param(&self, phase: &str) -> Option<u64> {
        self.max_param_where(phase, |_| true)
    }

    /// Largest parameter a phase ran with among those `keep` accepts.
    fn max_param_where(&self, phase: &str, keep: impl Fn(u64) -> bool) -> Option<u64> {
        self.recs
            .iter()
            .filter(|r| r.phase == phase)
            .filter_map(|r| r.param)
            .filter(|&p| keep(p))
            .max()
    }

    /// Median over reps of `f(rep)`.
    fn median_of(&self, f: impl Fn(u32) -> Option<f64>) -> (Option<f64>, usize) {
        let v: Vec<f64> = self.reps().into_iter().filter_map(f).collect();
        let n = v.len();
        (median(v), n)
    }
}

/// Reads one figure of one rep.
type Figure = Box<dyn Fn(&Data, u32) -> Option<f64>>;

/// One target: a hub figure against a baseline figure (or an absolute bound).
struct Target {
    what: String,
    /// The hub phase (and parameter) behind the figure: its invalid reps
    /// (errors, lost or duplicated events) fail the target.
    phase: (&'static str, Option<u64>),
    hub: Figure,
    base: Option<Figure>,
    base_label: String,
    /// `(is_upper_bound, bound)`: ratio ≤ bound, or ratio ≥ bound;
    /// [`NO_GOAL`] for a figure reported without a goal.
    bound: (bool, f64),
    unit: &'static str,
}

/// The bound of a figure reported without a goal.
const NO_GOAL: (bool, f64) = (true, f64::INFINITY);

fn metric(phase: &'static str, param: Option<u64>, m: &'static str) -> Figure {
    Box::new(move |d, rep| d.get(rep, phase, param, m))
}

/// The protocol's CPU floor per task: one tonic echo (the push) plus five
/// WebSocket echoes (the frames a task takes: `task_assign`,
/// `task_accepted` and its ack, `task_complete` and its ack), CPU per op,
/// in the `mode` (`seq` or `pipelined`) phases.
fn protocol_cpu(mode: &'static str) -> Figure {
    Box::new(move |d, rep| {
        let unary = d.get(
            rep,
            &format!("grpc_echo_{mode}"),
            None,
            "server_cpu_us_per_op",
        )?;
        let echo = d.get(
            rep,
            &format!("ws_echo_{mode}"),
            None,
            "server_cpu_us_per_op",
        )?;
        Some(unary + 5.0 * echo)
    })
}

/// Hub CPU per task of the `hub-push` phase `phase` (`hub_push_seq`,
/// `hub_push_pipelined`) against its storage floor: `hub-bound`'s CPU per
/// task in the same mode plus the hub's commits per task times the CPU of
/// one durable append. Reported, no goal.
fn storage_floor_target(phase: &'static str, bound_phase: &'static str, mode: &str) -> Target {
    Target {
        what: format!("hub CPU per {mode} task"),
        phase: (phase, None),
        hub: metric(phase, None, "server_cpu_us_per_task"),
        base: Some(Box::new(move |d, rep| {
            let bound = d.get(rep, bound_phase, None, "server_cpu_us_per_task")?;
            let commits = d.get(rep, phase, None, "commits_per_task")?;
            let append = d.get(rep, "fsync", None, "log_append_cpu_us")?;
            Some(bound + commits * append)
        })),
        base_label: format!(
            "the storage floor: `hub-bound`'s + the hub's commits per task × CPU of one durable append (pwrite + fdatasync), {mode}"
        ),
        bound: NO_GOAL,
        unit: "µs",
    }
}

fn targets(d: &Data) -> Vec<Target> {
    let fan = d.max_param("hub_fanout").unwrap_or(100);
    // The 10k row (1k with quick sizes), and the 100k row.
    let conns = d
        .max_param_where("hub_connections", |n| n <= 10_000)
        .unwrap_or(10_000);
    let many = d
        .max_param_where("hub_connections", |n| n > 10_000)
        .unwrap_or(100_000);
    vec![
        Target {
            what: "push round trip p50 (PushTask → task_ack of task_accepted)".into(),
            phase: ("hub_push_seq", None),
            hub: metric("hub_push_seq", None, "push_to_accept_ack_p50_us"),
            base: Some(metric(
                "js_roundtrip_seq",
                None,
                "publish_to_double_ack_p50_us",
            )),
            base_label: "JetStream publish → PubAck + pull → double-ack, p50".into(),
            bound: (true, 1.0),
            unit: "µs",
        },
        Target {
            what: "push round trip p50".into(),
            phase: ("hub_push_seq", None),
            hub: metric("hub_push_seq", None, "push_to_accept_ack_p50_us"),
            base: Some(Box::new(|d, rep| {
                let unary = d.get(rep, "grpc_echo_seq", None, "rtt_p50_us")?;
                let echo = d.get(rep, "ws_echo_seq", None, "rtt_p50_us")?;
                let fsync = d.get(rep, "fsync", None, "p50_us")?;
                Some(0.5 * unary + 1.5 * echo + 2.0 * fsync)
            })),
            base_label: "½ × tonic unary p50 + 1.5 × WS echo p50 + 2 × fsync p50".into(),
            bound: (true, 1.3),
            unit: "µs",
        },
        Target {
            what: "pipelined push vs NATS core request-reply, 64 in flight".into(),
            phase: ("hub_push_pipelined", None),
            hub: metric("hub_push_pipelined", None, "tasks_per_s"),
            base: Some(metric("nats_rr_pipelined", None, "msgs_per_s")),
            base_label: "NATS core request-reply, 64 in flight".into(),
            bound: (false, 0.12),
            unit: "/s",
        },
        Target {
            what: "hub CPU per pipelined task".into(),
            phase: ("hub_push_pipelined", None),
            hub: metric("hub_push_pipelined", None, "server_cpu_us_per_task"),
            base: Some(metric(
                "hub_bound_pipelined",
                None,
                "server_cpu_us_per_task",
            )),
            base_label: "the hub without storage (`hub-bound`), the same".into(),
            bound: (true, 1.3),
            unit: "µs",
        },
        Target {
            what: "hub CPU per pipelined task".into(),
            phase: ("hub_push_pipelined", None),
            hub: metric("hub_push_pipelined", None, "server_cpu_us_per_task"),
            base: Some(protocol_cpu("pipelined")),
            base_label: "tonic echo + 5 × WS echo, CPU per op, pipelined".into(),
            bound: (true, 2.0),
            unit: "µs",
        },
        Target {
            what: "hub CPU per sequential task".into(),
            phase: ("hub_push_seq", None),
            hub: metric("hub_push_seq", None, "server_cpu_us_per_task"),
            base: Some(protocol_cpu("seq")),
            base_label: "tonic echo + 5 × WS echo, CPU per op, sequential".into(),
            bound: (true, 2.0),
            unit: "µs",
        },
        storage_floor_target("hub_push_pipelined", "hub_bound_pipelined", "pipelined"),
        storage_floor_target("hub_push_seq", "hub_bound_seq", "sequential"),
        Target {
            what: "pipelined push, 64 in flight".into(),
            phase: ("hub_push_pipelined", None),
            hub: metric("hub_push_pipelined", None, "tasks_per_s"),
            base: Some(metric("js_roundtrip_pipelined", None, "msgs_per_s")),
            base_label: "JetStream durable round trips, 64 in flight".into(),
            bound: (false, 1.0),
            unit: "/s",
        },
        Target {
            what: format!("fan-out to {fan} watchers, zero drops"),
            phase: ("hub_fanout", Some(fan)),
            hub: Box::new(move |d, rep| d.get(rep, "hub_fanout", Some(fan), "delivered_per_s")),
            base: Some(Box::new(move |d, rep| {
                d.get(rep, "nats_fanout", Some(fan), "delivered_per_s")
            })),
            base_label: format!("NATS core fan-out to {fan} subscribers"),
            bound: (false, 0.5),
            unit: "events/s",
        },
        Target {
            what: format!("hub RSS per idle identified sidecar at {conns}"),
            phase: ("hub_connections", Some(conns)),
            hub: Box::new(move |d, rep| {
                d.get(rep, "hub_connections", Some(conns), "rss_per_sidecar_kib")
            }),
            base: None,
            base_label: "absolute bound (KiB)".into(),
            bound: (true, 7.0),
            unit: "KiB",
        },
        Target {
            what: format!("hub RSS per idle identified sidecar at {many}"),
            phase: ("hub_connections", Some(many)),
            hub: Box::new(move |d, rep| {
                d.get(rep, "hub_connections", Some(many), "rss_per_sidecar_kib")
            }),
            base: None,
            base_label: "absolute bound (KiB)".into(),
            bound: (true, 10.0),
            unit: "KiB",
        },
        Target {
            what: format!("hub idle CPU with {many} identified sidecars, heartbeats running"),
            phase: ("hub_connections", Some(many)),
            hub: Box::new(move |d, rep| d.get(rep, "hub_connections", Some(many), "idle_cpu_pct")),
            base: None,
            base_label: "reported, no goal (% of one core)".into(),
            bound: NO_GOAL,
            unit: "%",
        },
        Target {
            what: "ingest, 100 sidecars (durable)".into(),
            phase: ("hub_ingest", None),
            hub: metric("hub_ingest", None, "events_per_s"),
            base: Some(metric("js_ingest", None, "events_per_s")),
            base_label: "JetStream ingest with PubAck, 100 publishers".into(),
            bound: (false, 38.0),
            unit: "events/s",
        },
        Target {
            what: "history: hub RSS above an empty hub".into(),
            phase: ("hub_history", None),
            hub: metric("hub_history", None, "rss_above_empty_mib"),
            base: None,
            base_label: "absolute bound (MiB)".into(),
            bound: (true, 64.0),
            unit: "MiB",
        },
        Target {
            what: "history: restart to serving".into(),
            phase: ("hub_history", None),
            hub: metric("hub_history", None, "restart_to_serving_ms"),
            base: None,
            base_label: "absolute bound (ms)".into(),
            bound: (true, 1000.0),
            unit: "ms",
        },
        Target {
            what: "history: GetTask of a finished task p50".into(),
            phase: ("hub_history", None),
            hub: metric("hub_history", None, "get_task_p50_us"),
            base: None,
            base_label: "absolute bound (µs)".into(),
            bound: (true, 1000.0),
            unit: "µs",
        },
        Target {
            what: "history: ListTasks page of 100, worst filter p50".into(),
            phase: ("hub_history", None),
            hub: metric("hub_history", None, "list_worst_filter_p50_us"),
            base: None,
            base_label: "absolute bound (µs)".into(),
            bound: (true, 5000.0),
            unit: "µs",
        },
        Target {
            what: "history: disk per finished task / payload bytes".into(),
            phase: ("hub_history", None),
            hub: metric("hub_history", None, "disk_ratio_to_payload"),
            base: None,
            base_label: "absolute bound (ratio)".into(),
            bound: (true, 1.5),
            unit: "×",
        },
        Target {
            what: "history: push round trip p50 vs an empty hub".into(),
            phase: ("hub_history_push_seq", None),
            hub: metric("hub_history_push_seq", None, "push_to_accept_ack_p50_us"),
            base: Some(metric("hub_push_seq", None, "push_to_accept_ack_p50_us")),
            base_label: "the same on an empty hub".into(),
            bound: (true, 1.1),
            unit: "µs",
        },
        Target {
            what: "history: pipelined push vs an empty hub".into(),
            phase: ("hub_history_push_pipelined", None),
            hub: metric("hub_history_push_pipelined", None, "tasks_per_s"),
            base: Some(metric("hub_push_pipelined", None, "tasks_per_s")),
            base_label: "the same on an empty hub".into(),
            bound: (false, 0.9),
            unit: "/s",
        },
        Target {
            what: "push round trip p50 while another agent floods 10 MB/s of output".into(),
            phase: ("hub_output_flood", None),
            hub: metric("hub_output_flood", None, "push_p50_flood_us"),
            base: Some(metric("hub_output_flood", None, "push_p50_calm_us")),
            base_label: "the same without the flood, same hub".into(),
            bound: (true, 1.2),
            unit: "µs",
        },
        Target {
            what: "push round trip p50 while another agent floods 1 MB task_progress frames".into(),
            phase: ("hub_progress_flood", None),
            hub: metric("hub_progress_flood", None, "push_p50_flood_us"),
            base: Some(metric("hub_progress_flood", None, "push_p50_calm_us")),
            base_label: "the same without the flood, same hub".into(),
            bound: (true, 2.0),
            unit: "µs",
        },
        Target {
            what: "cluster: push round trip p50, through the leader".into(),
            phase: ("cluster_push_seq", None),
            hub: metric("cluster_push_seq", None, "push_to_accept_ack_p50_us"),
            base: Some(metric(
                "js_cluster_roundtrip_seq",
                None,
                "publish_to_double_ack_p50_us",
            )),
            base_label: "JetStream R3 publish → PubAck + pull → double-ack, p50".into(),
            bound: (true, 1.5),
            unit: "µs",
        },
        Target {
            what: "cluster: pipelined push through the leader, 64 in flight".into(),
            phase: ("cluster_push_pipelined", None),
            hub: metric("cluster_push_pipelined", None, "tasks_per_s"),
            base: Some(metric("js_cluster_roundtrip_pipelined", None, "msgs_per_s")),
            base_label: "JetStream R3 durable round trips, 64 in flight".into(),
            bound: (false, 1.2),
            unit: "/s",
        },
        Target {
            what: "cluster: failover after leader SIGKILL, p50".into(),
            phase: ("cluster_failover", None),
            hub: metric("cluster_failover", None, "failover_p50_ms"),
            base: None,
            base_label: "absolute bound: lease 3 s + 1 s (ms)".into(),
            bound: (true, 4000.0),
            unit: "ms",
        },
        Target {
            what: "cluster: failover after leader SIGKILL, max".into(),
            phase: ("cluster_failover", None),
            hub: metric("cluster_failover", None, "failover_max_ms"),
            base: None,
            base_label: "absolute bound: lease 3 s + 1 s (ms)".into(),
            bound: (true, 4000.0),
            unit: "ms",
        },
        Target {
            what: "replay from seq 0".into(),
            phase: ("hub_replay", None),
            hub: metric("hub_replay", None, "events_per_s"),
            base: Some(metric("js_replay", None, "events_per_s")),
            base_label: "JetStream ordered consumer replay".into(),
            bound: (false, 2.6),
            unit: "events/s",
        },
    ]
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// The Markdown summary.
pub fn summarize(d: &Data) -> String {
    let mut md = String::new();
    let reps = d.reps();
    let _ = writeln!(md, "# agenthub benchmark summary\n");
    if let Some(m) = &d.machine {
        let s = |k: &str| {
            m[k].as_str()
                .map(String::from)
                .unwrap_or_else(|| m[k].to_string())
        };
        let _ = writeln!(
            md,
            "Machine: {} ({} cores, {} GiB), Linux {}, filesystem `{}`. Hub: `{}`; baseline: `{}`. Reps: {}{}.\n",
            s("cpu"),
            s("cores"),
            s("mem_gib"),
            s("kernel"),
            s("filesystem"),
            s("agenthub"),
            s("nats_server"),
            reps.len(),
            if m["quick"].as_bool() == Some(true) { " (quick sizes)" } else { "" },
        );
    }
    let _ = writeln!(
        md,
        "## Targets (medians over reps; ratio = median of the per-rep hub/baseline ratios)\n"
    );
    let _ = writeln!(
        md,
        "| target | agenthub | baseline | ratio | goal | holds |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|:-:|");
    for t in targets(d) {
        let (hub, _) = d.median_of(|rep| (t.hub)(d, rep));
        let (base, ratio) = match &t.base {
            Some(b) => {
                let (base, _) = d.median_of(|rep| b(d, rep));
                let (ratio, _) = d.median_of(|rep| Some((t.hub)(d, rep)? / b(d, rep)?));
                (base, ratio)
            }
            None => (None, hub),
        };
        let (upper, bound) = t.bound;
        let has_goal = bound.is_finite();
        let goal = if has_goal {
            format!(
                "{} {bound}{}",
                if upper { "≤" } else { "≥" },
                if t.base.is_some() { "×" } else { "" }
            )
        } else {
            "—".into()
        };
        let recs: Vec<&Rec> = d
            .recs
            .iter()
            .filter(|r| r.phase == t.phase.0 && r.param == t.phase.1)
            .collect();
        let invalid = recs.iter().filter(|r| !r.valid && !r.not_run).count();
        let not_run = recs
            .iter()
            .find(|r| r.not_run)
            .and_then(|r| r.error.as_deref());
        let holds = match ratio {
            _ if invalid > 0 => format!("**no** ({invalid} invalid reps)"),
            None => match not_run {
                Some(why) => why.replace('|', "/"),
                None => "n/a".into(),
            },
            Some(_) if !has_goal => "n/a".into(),
            Some(r) if (upper && r <= bound) || (!upper && r >= bound) => "yes".into(),
            Some(_) => "**no**".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} {} | {} ({}) | {} | {goal} | {holds} |",
            t.what,
            fmt(hub),
            t.unit,
            fmt(base),
            t.base_label,
            if t.base.is_some() {
                format!("{}×", fmt(ratio))
            } else {
                fmt(ratio)
            },
        );
    }

    let _ = writeln!(
        md,
        "\n## Every phase (median over valid reps, then each rep)\n"
    );
    let _ = writeln!(md, "| phase | system | N | metric | median | per rep |");
    let _ = writeln!(md, "|---|---|---:|---|---:|---|");
    let mut seen: Vec<(String, Option<u64>)> = Vec::new();
    for r in &d.recs {
        let key = (r.phase.clone(), r.param);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let all: Vec<&Rec> = d
            .recs
            .iter()
            .filter(|x| x.phase == r.phase && x.param == r.param)
            .collect();
        let invalid: Vec<(bool, String)> = all
            .iter()
            .filter(|x| !x.valid)
            .map(|x| {
                let why = x.error.as_deref().unwrap_or("invalid");
                (x.not_run, format!("rep {}: {why}", x.rep))
            })
            .collect();
        let n = r.param.map(|p| p.to_string()).unwrap_or_default();
        let names: Vec<String> = all
            .iter()
            .find(|x| x.valid)
            .map(|x| x.metrics.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let per: Vec<String> = reps
                .iter()
                .map(|&rep| fmt(d.get(rep, &r.phase, r.param, &name)))
                .collect();
            let (med, _) = d.median_of(|rep| d.get(rep, &r.phase, r.param, &name));
            let _ = writeln!(
                md,
                "| {} | {} | {n} | {name} | {} | {} |",
                r.phase,
                r.system,
                fmt(med),
                per.join(" / ")
            );
        }
        for (not_run, e) in invalid {
            let _ = writeln!(
                md,
                "| {} | {} | {n} | {} | | {} |",
                r.phase,
                r.system,
                if not_run {
                    "**NOT RUN**"
                } else {
                    "**INVALID**"
                },
                e.replace('|', "/")
            );
        }
    }
    md
}
