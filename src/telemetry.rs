//! Logs (and, with `--otlp-endpoint`, traces) for the hub, the reference
//! sidecar and the CLI: one setup, done once by the binary.
//!
//! - Text lines are coloured only when stderr is a terminal and `NO_COLOR`
//!   is unset; a pipe or a file gets plain text.
//! - JSON lines are one object per line: `timestamp`, `level`, `target`,
//!   `message`, the event's fields, and the fields of every span it is in
//!   (`task_id`, `agent_id`, `node_id`, ...) at the top level, inner spans
//!   winning over outer ones and the event over both.
//! - The filter is `--log-level` (`AGENTHUB_LOG`), else `RUST_LOG`, else
//!   [`DEFAULT_FILTER`]; any `EnvFilter` directive works (`debug`,
//!   `agenthub=debug,info`).
//! - Traces: with `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) the
//!   `task` spans (one per task event) are exported over OTLP/gRPC, each a
//!   child of the W3C `traceparent` the task was pushed with. Without it no
//!   exporter, no layer and no context parsing exist: [`exporting`] is false
//!   and the task path only checks that flag.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

/// The filter when neither `--log-level` / `AGENTHUB_LOG` nor `RUST_LOG` is
/// set. The NATS client logs every reconnect attempt at info: warnings are enough.
pub const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for a log shipper.
    Json,
}

/// Logging options shared by every subcommand.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log line format: text or json.
    #[arg(
        long,
        env = "AGENTHUB_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter: a level (debug, info, warn) or EnvFilter directives
    /// (`agenthub=debug,info`). Default: RUST_LOG, else `info`.
    #[arg(long, env = "AGENTHUB_LOG", global = true)]
    pub log_level: Option<String>,
    /// Export traces over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317). Off when unset. The other OTEL_* variables
    /// (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_HEADERS, ...) are honoured.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

impl LogArgs {
    /// The filter these options ask for; a bad directive is an error that
    /// names where it came from.
    pub fn filter(&self) -> anyhow::Result<EnvFilter> {
        let (source, directives) = match (&self.log_level, std::env::var("RUST_LOG")) {
            (Some(d), _) => ("--log-level / AGENTHUB_LOG", d.clone()),
            (None, Ok(d)) if !d.trim().is_empty() => ("RUST_LOG", d),
            _ => ("default", DEFAULT_FILTER.to_string()),
        };
        EnvFilter::try_new(&directives)
            .map_err(|e| anyhow::anyhow!("{source}: bad log filter {directives:?}: {e}"))
    }
}

/// The span of one sidecar connection (hub side) or of the reference
/// sidecar itself: `agent_id` (recorded once known), `session`, and
/// `node_id` in cluster mode.
pub fn sidecar_span(agent_id: Option<&str>, node_id: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "sidecar",
        agent_id = tracing::field::Empty,
        session = tracing::field::Empty,
        node_id = tracing::field::Empty,
    );
    if let Some(a) = agent_id {
        span.record("agent_id", a);
    }
    if let Some(n) = node_id {
        span.record("node_id", n);
    }
    span
}

/// The span of one change to a task: `task_id`, `agent_id` (when it has
/// one), `node_id` in cluster mode. Every line about the change is logged
/// in it; when exporting it is also the change's span in the task's trace.
pub fn task_span(task_id: &str, agent_id: &str, node_id: Option<&str>) -> tracing::Span {
    // A root: a task's spans belong to its own trace, not to whatever
    // connection or call happened to cause the change.
    let span = tracing::info_span!(
        parent: None,
        "task",
        task_id,
        agent_id = tracing::field::Empty,
        node_id = tracing::field::Empty,
        otel.name = tracing::field::Empty,
    );
    if !agent_id.is_empty() {
        span.record("agent_id", agent_id);
    }
    if let Some(n) = node_id {
        span.record("node_id", n);
    }
    span
}

/// Colour only for a terminal, and never when `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Set once an exporter is installed; read on every task event.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Are spans exported (was `--otlp-endpoint` given)?
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// What `init` set up; [`Telemetry::shutdown`] flushes spans not yet sent.
#[must_use = "call shutdown() before exiting, or spans are lost"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Export the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "trace export did not finish");
            }
        }
    }
}

/// Install the process-wide subscriber: logs to stderr as `args` ask, and
/// span export if an OTLP endpoint is given (call inside a tokio runtime).
/// `service`: the `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub fn init(args: &LogArgs, service: &'static str) -> anyhow::Result<Telemetry> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let filter = args.filter()?;
    let fmt_layer = match args.log_format {
        LogFormat::Text => {
            let colour = use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour)
                .boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine)
            .boxed(),
    };
    let mut layers: Vec<Boxed> = vec![fmt_layer.with_filter(filter).boxed()];
    let mut provider = None;
    if let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        let (p, layer) = otlp_layer(endpoint, service)?;
        layers.push(layer);
        provider = Some(p);
    }
    tracing_subscriber::registry().with(layers).try_init()?;
    if provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}

/// The OTLP/gRPC exporter and the layer that feeds it: agenthub's `task`
/// spans at info and the lines logged in them (as span events).
fn otlp_layer(
    endpoint: &str,
    service: &'static str,
) -> anyhow::Result<(
    opentelemetry_sdk::trace::SdkTracerProvider,
    Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>,
)> {
    use anyhow::Context as _;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("agenthub");
    let only_tasks = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target().starts_with("agenthub")
            && *meta.level() <= tracing::Level::INFO
            && (!meta.is_span() || meta.name() == "task")
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(only_tasks)
        .boxed();
    Ok((provider, layer))
}

/// Is `s` a W3C `traceparent` this hub passes on: version `00`, a non-zero
/// 32-hex-digit trace id, a non-zero 16-hex-digit parent id, 2 hex flag
/// digits (lower case, as the spec writes them)?
pub fn valid_traceparent(s: &str) -> bool {
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = s.split('-').collect();
    matches!(parts.as_slice(), [v, t, p, f]
        if *v == "00" && hex(t, 32) && hex(p, 16) && hex(f, 2)
            && t.bytes().any(|b| b != b'0') && p.bytes().any(|b| b != b'0'))
}

/// Name a task span after its event and, if the task came with a
/// `traceparent`, make the span its child. Only while [`exporting`].
pub fn trace_task_span(span: &tracing::Span, event: &str, traceparent: Option<&str>) {
    span.record("otel.name", format!("task {event}"));
    if let Some(tp) = traceparent {
        set_remote_parent(span, tp);
    }
}

/// Make `span` (not entered yet) a child of the remote span `traceparent`.
/// Does nothing unless [`exporting`].
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !exporting() {
        return;
    }
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// The JSON line format: span fields flattened to the top level (what a log
/// shipper indexes), unlike `tracing_subscriber`'s own JSON, which nests them.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        let meta = event.metadata();
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(scope) = ctx.event_scope() {
            let mut names = Vec::new();
            for span in scope.from_root() {
                names.push(Value::String(span.name().to_string()));
                let ext = span.extensions();
                // `JsonFields` keeps each span's fields as a JSON object.
                let Some(fields) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str(fields.as_str()) {
                    line.extend(fields);
                }
            }
            line.insert("spans".into(), Value::Array(names));
        }
        event.record(&mut JsonVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Event fields into a JSON object: numbers and booleans stay typed,
/// everything else is its `Display` / `Debug` text.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn a_bad_log_level_is_a_clear_error() {
        let args = LogArgs {
            log_level: Some("agenthub=loud".into()),
            ..LogArgs::default()
        };
        let e = args.filter().unwrap_err().to_string();
        assert!(e.contains("--log-level"), "{e}");
        assert!(e.contains("agenthub=loud"), "{e}");
    }

    #[test]
    fn traceparents_are_checked() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(ok));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn json_lines_carry_span_fields_at_the_top_level() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("sidecar", agent_id = "a1", session = 3u64);
            let _o = outer.enter();
            let inner = tracing::info_span!("task", task_id = "t1", agent_id = "a2");
            let _i = inner.enter();
            tracing::info!(generation = 2u64, note = "x \"quoted\"", "task accepted");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["task_id"], "t1");
        assert_eq!(v["agent_id"], "a2", "the inner span wins");
        assert_eq!(v["session"], 3);
        assert_eq!(v["generation"], 2);
        assert_eq!(v["note"], "x \"quoted\"");
        assert_eq!(v["message"], "task accepted");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["spans"], serde_json::json!(["sidecar", "task"]));
    }
}
