//! Counters for `/metrics` (Prometheus text format). Gauges that can be read
//! off the hub's state (tasks by state, queue depth, agents) are computed at
//! scrape time instead of being kept here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use std::collections::BTreeMap;

/// Upper bounds (ms) of the assignment-latency histogram buckets.
const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

#[derive(Default)]
pub struct Metrics {
    pub tasks_pushed: AtomicU64,
    pub reports: AtomicU64,
    pub ws_connections: AtomicU64,
    pub storage_faults: AtomicU64,
    /// WebSocket sessions whose task is still running (a gauge).
    pub ws_sessions_open: AtomicU64,
    reclaims: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS_MS.len()],
    count: u64,
    sum_ms: u64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A commit failed and the hub went degraded.
    pub fn storage_fault(&self) {
        Self::inc(&self.storage_faults);
    }

    pub fn reclaimed(&self, reason: &str) {
        *self
            .reclaims
            .lock()
            .expect("metrics")
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// Time a task waited in the queue before this assignment.
    pub fn assigned_after(&self, waited_ms: u64) {
        let mut h = self.latency.lock().expect("metrics");
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if waited_ms <= *le {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum_ms += waited_ms;
    }

    /// Append the counters kept here.
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            out,
            "agenthub_tasks_pushed_total",
            "Tasks created by PushTask or the HTTP push endpoint.",
            get(&self.tasks_pushed),
        );
        counter(
            out,
            "agenthub_sidecar_reports_total",
            "Lifecycle reports received from sidecars.",
            get(&self.reports),
        );
        counter(
            out,
            "agenthub_ws_connections_total",
            "WebSocket connections accepted.",
            get(&self.ws_connections),
        );
        gauge(
            out,
            "agenthub_ws_sessions_open",
            "WebSocket sessions still open (identified or not).",
            get(&self.ws_sessions_open),
        );
        counter(
            out,
            "agenthub_storage_faults_total",
            "Failed commits (each puts the hub in degraded mode until a probe write succeeds).",
            get(&self.storage_faults),
        );
        let _ = writeln!(
            out,
            "# HELP agenthub_reclaims_total Tasks taken back from agents, by reason.\n# TYPE agenthub_reclaims_total counter"
        );
        for (reason, n) in self.reclaims.lock().expect("metrics").iter() {
            let _ = writeln!(out, "agenthub_reclaims_total{{reason=\"{reason}\"}} {n}");
        }
        let h = self.latency.lock().expect("metrics");
        let bounds: Vec<f64> = LATENCY_BUCKETS_MS
            .iter()
            .map(|ms| *ms as f64 / 1e3)
            .collect();
        histogram(
            out,
            "agenthub_assignment_wait_seconds",
            "Time from queueing to assignment.",
            &bounds,
            &h.buckets,
            h.count,
            h.sum_ms as f64 / 1e3,
        );
    }
}

/// One counter with its HELP and TYPE lines.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// A histogram: `bounds` in seconds, `cumulative[i]` observations ≤ `bounds[i]`.
pub fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[f64],
    cumulative: &[u64],
    count: u64,
    sum: f64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (le, n) in bounds.iter().zip(cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
}

/// One gauge with its HELP and TYPE lines.
pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}
