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
    /// Transport security and abuse limits; shared with the listeners.
    pub limits: std::sync::Arc<LimitMetrics>,
    reclaims: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram>,
}

/// Counters and gauges of the transport limits (docs/operations.md, "Limits").
#[derive(Default)]
pub struct LimitMetrics {
    pub http_connections_open: AtomicU64,
    pub grpc_connections_open: AtomicU64,
    /// Sockets closed at once because `--max-connections` was reached.
    pub connections_refused: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: AtomicU64,
    /// HTTP/1 connections closed by `--header-timeout`.
    pub header_timeouts: AtomicU64,
    /// WebSockets not identified yet.
    pub ws_unidentified: AtomicU64,
    /// Upgrades refused because `--max-unidentified` was reached.
    pub unidentified_refused: AtomicU64,
    /// Identifies that failed (bad token or agent mismatch).
    pub identify_failures: AtomicU64,
    /// Sockets closed 4429 (too many failed identifies from their address).
    pub identify_blocked: AtomicU64,
    /// `/ws` upgrades refused for their `Origin` (403).
    pub origin_refused: AtomicU64,
    /// `/ws` upgrades refused for lack of a client certificate (403).
    pub client_cert_refused: AtomicU64,
    /// Watch streams refused by `--max-watches-per-token`.
    pub watches_refused: AtomicU64,
    /// Sessions and streams ended because their token was revoked.
    pub revoked_ended: AtomicU64,
    /// gRPC requests over the message size limit.
    pub grpc_too_large: AtomicU64,
    /// gRPC calls answered DEADLINE_EXCEEDED.
    pub grpc_deadline_exceeded: AtomicU64,
}

impl LimitMetrics {
    fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP agenthub_connections_open Open connections, by listener.\n# TYPE agenthub_connections_open gauge\nagenthub_connections_open{{listener=\"http\"}} {}\nagenthub_connections_open{{listener=\"grpc\"}} {}",
            get(&self.http_connections_open),
            get(&self.grpc_connections_open)
        );
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "agenthub_connections_refused_total",
                "Sockets closed at once: --max-connections reached.",
                &self.connections_refused,
            ),
            (
                "agenthub_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out.",
                &self.tls_failures,
            ),
            (
                "agenthub_header_timeouts_total",
                "HTTP connections closed by --header-timeout.",
                &self.header_timeouts,
            ),
            (
                "agenthub_unidentified_refused_total",
                "WebSocket upgrades refused: --max-unidentified reached.",
                &self.unidentified_refused,
            ),
            (
                "agenthub_identify_failures_total",
                "Failed identifies (bad token or agent mismatch).",
                &self.identify_failures,
            ),
            (
                "agenthub_identify_blocked_total",
                "Sockets closed 4429: too many failed identifies from their address.",
                &self.identify_blocked,
            ),
            (
                "agenthub_origin_refused_total",
                "WebSocket upgrades refused for their Origin.",
                &self.origin_refused,
            ),
            (
                "agenthub_client_cert_refused_total",
                "WebSocket upgrades refused without a client certificate.",
                &self.client_cert_refused,
            ),
            (
                "agenthub_watches_refused_total",
                "Watch streams refused: --max-watches-per-token reached.",
                &self.watches_refused,
            ),
            (
                "agenthub_revoked_ended_total",
                "Sessions and streams ended because their token was revoked.",
                &self.revoked_ended,
            ),
            (
                "agenthub_grpc_too_large_total",
                "gRPC requests over the message size limit.",
                &self.grpc_too_large,
            ),
            (
                "agenthub_grpc_deadline_exceeded_total",
                "gRPC calls answered DEADLINE_EXCEEDED.",
                &self.grpc_deadline_exceeded,
            ),
        ];
        for (name, help, c) in counters {
            counter(out, name, help, get(c));
        }
        gauge(
            out,
            "agenthub_ws_unidentified",
            "WebSockets open but not identified yet.",
            get(&self.ws_unidentified),
        );
    }
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
        self.limits.render(out);
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
