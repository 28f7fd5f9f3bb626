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

use std::fmt;
use std::io::IsTerminal;

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
/// in it.
pub fn task_span(task_id: &str, agent_id: &str, node_id: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "task",
        task_id,
        agent_id = tracing::field::Empty,
        node_id = tracing::field::Empty,
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

/// Install the process-wide subscriber: logs to stderr as `args` ask.
pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
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
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .try_init()?;
    Ok(())
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
