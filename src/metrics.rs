//! `/metrics`: every figure is kept as it changes (prometheus-client
//! counters, gauges and histograms), or read in O(1) from a counter the hub
//! keeps (tasks by state, queue depth): a scrape never scans tasks.
//! Exposed in the OpenMetrics text format, which Prometheus scrapes natively.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::store::{Store, COMMIT_BUCKETS_US};

/// Upper bounds (s) of the assignment-wait histogram buckets.
const WAIT_BUCKETS_S: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabel {
    pub priority: &'static str,
}

/// The hub's metrics. Cheap handles (atomics inside); the registry owns the
/// descriptions.
pub struct Metrics {
    registry: Registry,
    pub tasks_pushed: Counter,
    /// What the token verifier asked the store.
    pub tokens: crate::auth::VerifierCounters,
    pub reports: Counter,
    pub ws_connections: Counter,
    /// Times a sidecar's socket was left unread for its byte rate.
    pub ws_paced: Counter,
    pub storage_faults: Counter,
    /// WebSocket sessions whose task is still running.
    pub ws_sessions_open: Gauge<i64, AtomicI64>,
    pub reclaims: Family<ReasonLabel, Counter>,
    pub assignment_wait: Histogram,
    /// Set at scrape time from counters the hub keeps as states change.
    pub tasks: Family<StateLabel, Gauge<i64, AtomicI64>>,
    pub queue_depth: Family<PriorityLabel, Gauge<i64, AtomicI64>>,
    pub agents_connected: Gauge<i64, AtomicI64>,
    pub last_event_seq: Gauge<i64, AtomicI64>,
    pub watchers: Gauge<i64, AtomicI64>,
    pub tasks_in_memory: Gauge<i64, AtomicI64>,
    /// Timers armed (reclaims, TTLs, deadlines, grace): bounded by live work.
    pub timers: Gauge<i64, AtomicI64>,
    /// Tasks whose output someone follows.
    pub output_watched: Gauge<i64, AtomicI64>,
    /// Cluster mode: 1 on the node that leads, 0 on the others.
    pub cluster_leader: Gauge<i64, AtomicI64>,
    /// Cluster mode: leaderships seen since start.
    pub cluster_leaderships: Gauge<i64, AtomicI64>,
    pub finished_stored: Gauge<i64, AtomicI64>,
    pub data_dir_bytes: Gauge<i64, AtomicI64>,
    pub retention_purged_tasks: Counter,
    pub retention_purged_events: Counter,
    /// `task_output` bytes accepted (from the task's current assignee).
    pub task_output_bytes: Counter,
    /// `task_output` messages dropped (the agent did not hold the task).
    pub task_output_dropped: Counter,
    /// Transport security and abuse limits; shared with the listeners.
    pub limits: Arc<LimitMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            tasks_pushed: Counter::default(),
            tokens: Default::default(),
            reports: Counter::default(),
            ws_connections: Counter::default(),
            ws_paced: Counter::default(),
            storage_faults: Counter::default(),
            ws_sessions_open: Gauge::default(),
            reclaims: Family::default(),
            assignment_wait: Histogram::new(WAIT_BUCKETS_S),
            tasks: Family::default(),
            queue_depth: Family::default(),
            agents_connected: Gauge::default(),
            last_event_seq: Gauge::default(),
            watchers: Gauge::default(),
            tasks_in_memory: Gauge::default(),
            timers: Gauge::default(),
            output_watched: Gauge::default(),
            cluster_leader: Gauge::default(),
            cluster_leaderships: Gauge::default(),
            finished_stored: Gauge::default(),
            data_dir_bytes: Gauge::default(),
            retention_purged_tasks: Counter::default(),
            retention_purged_events: Counter::default(),
            task_output_bytes: Counter::default(),
            task_output_dropped: Counter::default(),
            limits: Arc::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "agenthub_tasks_pushed",
            "Tasks created by PushTask or the HTTP push endpoint",
            m.tasks_pushed.clone(),
        );
        r.register(
            "agenthub_sidecar_reports",
            "Lifecycle reports received from sidecars",
            m.reports.clone(),
        );
        r.register(
            "agenthub_ws_connections",
            "WebSocket connections accepted",
            m.ws_connections.clone(),
        );
        r.register(
            "agenthub_ws_paced",
            "Times a sidecar's socket was left unread because its frames came faster than --sidecar-bytes-per-s",
            m.ws_paced.clone(),
        );
        r.register(
            "agenthub_ws_sessions_open",
            "WebSocket sessions still open (identified or not)",
            m.ws_sessions_open.clone(),
        );
        r.register(
            "agenthub_storage_faults",
            "Failed commits (each puts the hub in degraded mode until a probe write succeeds)",
            m.storage_faults.clone(),
        );
        r.register(
            "agenthub_reclaims",
            "Tasks taken back from agents, by reason",
            m.reclaims.clone(),
        );
        r.register(
            "agenthub_assignment_wait_seconds",
            "Time from queueing to assignment",
            m.assignment_wait.clone(),
        );
        r.register("agenthub_tasks", "Tasks by state", m.tasks.clone());
        r.register(
            "agenthub_task_output_bytes",
            "Task output bytes accepted from sidecars (task_output)",
            m.task_output_bytes.clone(),
        );
        r.register(
            "agenthub_task_output_dropped",
            "task_output messages dropped: the agent did not hold the task",
            m.task_output_dropped.clone(),
        );
        r.register(
            "agenthub_queue_depth",
            "Queued tasks by priority",
            m.queue_depth.clone(),
        );
        r.register(
            "agenthub_agents_connected",
            "Sidecars connected and identified",
            m.agents_connected.clone(),
        );
        r.register(
            "agenthub_last_event_seq",
            "Highest event seq assigned",
            m.last_event_seq.clone(),
        );
        r.register(
            "agenthub_watchers",
            "Open WatchTaskEvents streams",
            m.watchers.clone(),
        );
        r.register(
            "agenthub_cluster_leader",
            "Cluster mode: 1 on the leading node (its task and agent gauges are the cluster's), 0 on the others",
            m.cluster_leader.clone(),
        );
        r.register(
            "agenthub_cluster_leaderships",
            "Cluster mode: leaderships (terms) this node has seen since it started; a rise is a change of leader",
            m.cluster_leaderships.clone(),
        );
        r.register(
            "agenthub_tasks_in_memory",
            "Tasks held in memory: live ones and a bounded cache of finished ones",
            m.tasks_in_memory.clone(),
        );
        r.register(
            "agenthub_token_lookups",
            "Token look-ups that reached the store (tokens not in memory)",
            m.tokens.lookups.clone(),
        );
        r.register(
            "agenthub_token_lookups_refused",
            "Tokens not in memory refused without a store look-up (look-up budget spent)",
            m.tokens.refused.clone(),
        );
        r.register(
            "agenthub_timers",
            "Timers armed (accept and progress timeouts, queue TTLs, deadlines, reconnect grace): they go with their task",
            m.timers.clone(),
        );
        r.register(
            "agenthub_output_watched_tasks",
            "Tasks whose output a WatchTaskOutput stream follows",
            m.output_watched.clone(),
        );
        r.register(
            "agenthub_finished_tasks_stored",
            "Finished tasks in the store (COMPLETED, FAILED, CANCELLED)",
            m.finished_stored.clone(),
        );
        r.register(
            "agenthub_data_dir_bytes",
            "Bytes the store occupies on disk (database, WAL)",
            m.data_dir_bytes.clone(),
        );
        r.register(
            "agenthub_retention_purged_tasks",
            "Finished tasks removed by retention",
            m.retention_purged_tasks.clone(),
        );
        r.register(
            "agenthub_retention_purged_events",
            "Events removed by retention with their tasks",
            m.retention_purged_events.clone(),
        );
        r.register_collector(Box::new(LimitsCollector(m.limits.clone())));
        Metrics { registry, ..m }
    }

    pub fn inc(counter: &Counter) {
        counter.inc();
    }

    /// A commit failed and the hub went degraded.
    pub fn storage_fault(&self) {
        self.storage_faults.inc();
    }

    pub fn reclaimed(&self, reason: &str) {
        self.reclaims
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Time a task waited in the queue before this assignment.
    pub fn assigned_after(&self, waited_ms: u64) {
        self.assignment_wait.observe(waited_ms as f64 / 1e3);
    }

    /// The whole exposition.
    pub fn render(&self, out: &mut String) {
        if prometheus_client::encoding::text::encode(out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
    }
}

/// Set a gauge from an unsigned figure.
pub(crate) fn gauge_set(g: &Gauge<i64, AtomicI64>, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// The store's own figures, read at scrape time (the store counts them as
/// it commits; reading them is O(1)).
struct StoreCollector(Arc<dyn Store>);

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.commit_stats();
        let events = ConstGauge::new(i64::try_from(self.0.event_count()).unwrap_or(i64::MAX));
        events.encode(encoder.encode_descriptor(
            "agenthub_events_stored",
            "Events currently in the store",
            None,
            events.metric_type(),
        )?)?;
        let batches = ConstCounter::new(stats.batches);
        batches.encode(encoder.encode_descriptor(
            "agenthub_store_batches",
            "Changes committed (one per hub operation)",
            None,
            batches.metric_type(),
        )?)?;
        let failed = ConstCounter::new(stats.failed_commits);
        failed.encode(encoder.encode_descriptor(
            "agenthub_store_commits_failed",
            "Group commits that failed",
            None,
            failed.metric_type(),
        )?)?;
        let buckets: Vec<(f64, u64)> = COMMIT_BUCKETS_US
            .iter()
            .zip(stats.buckets.iter())
            .map(|(us, n)| (*us as f64 / 1e6, *n))
            .chain(std::iter::once((f64::INFINITY, stats.commits)))
            .collect();
        let mut m = encoder.encode_descriptor(
            "agenthub_store_commit_seconds",
            "Group commits, including the fsync",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(stats.total_us as f64 / 1e6, stats.commits, &buckets, None)
    }
}

impl Metrics {
    /// Expose the store's figures too.
    pub fn register_store(&mut self, store: Arc<dyn Store>) {
        self.registry
            .register_collector(Box::new(StoreCollector(store)));
    }
}

/// Counters and gauges of the transport limits (docs/operations.md,
/// "Limits"): plain atomics, so the listeners and sessions that own the
/// limits bump them without touching the registry.
#[derive(Debug, Default)]
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// Encodes [`LimitMetrics`] at scrape time.
#[derive(Debug)]
struct LimitsCollector(Arc<LimitMetrics>);

impl Collector for LimitsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let l = &self.0;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "agenthub_connections_refused",
                "Sockets closed at once: --max-connections reached",
                &l.connections_refused,
            ),
            (
                "agenthub_tls_handshake_failures",
                "TLS handshakes that failed or timed out",
                &l.tls_failures,
            ),
            (
                "agenthub_header_timeouts",
                "HTTP connections closed by --header-timeout",
                &l.header_timeouts,
            ),
            (
                "agenthub_unidentified_refused",
                "WebSocket upgrades refused: --max-unidentified reached",
                &l.unidentified_refused,
            ),
            (
                "agenthub_identify_failures",
                "Failed identifies (bad token or agent mismatch)",
                &l.identify_failures,
            ),
            (
                "agenthub_identify_blocked",
                "Sockets closed 4429: too many failed identifies from their address",
                &l.identify_blocked,
            ),
            (
                "agenthub_origin_refused",
                "WebSocket upgrades refused for their Origin",
                &l.origin_refused,
            ),
            (
                "agenthub_client_cert_refused",
                "WebSocket upgrades refused without a client certificate",
                &l.client_cert_refused,
            ),
            (
                "agenthub_watches_refused",
                "Watch streams refused: --max-watches-per-token reached",
                &l.watches_refused,
            ),
            (
                "agenthub_revoked_ended",
                "Sessions and streams ended because their token was revoked",
                &l.revoked_ended,
            ),
            (
                "agenthub_grpc_too_large",
                "gRPC requests over the message size limit",
                &l.grpc_too_large,
            ),
            (
                "agenthub_grpc_deadline_exceeded",
                "gRPC calls answered DEADLINE_EXCEEDED",
                &l.grpc_deadline_exceeded,
            ),
        ];
        for (name, help, c) in counters {
            let c = ConstCounter::new(get(c));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let unidentified =
            ConstGauge::new(i64::try_from(get(&l.ws_unidentified)).unwrap_or(i64::MAX));
        unidentified.encode(encoder.encode_descriptor(
            "agenthub_ws_unidentified",
            "WebSockets open but not identified yet",
            None,
            unidentified.metric_type(),
        )?)?;
        let mut open = encoder.encode_descriptor(
            "agenthub_connections_open",
            "Open connections, by listener",
            None,
            MetricType::Gauge,
        )?;
        for (listener, c) in [
            ("http", &l.http_connections_open),
            ("grpc", &l.grpc_connections_open),
        ] {
            let g = ConstGauge::new(i64::try_from(get(c)).unwrap_or(i64::MAX));
            g.encode(open.encode_family(&ListenerLabel { listener })?)?;
        }
        Ok(())
    }
}
