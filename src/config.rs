//! Hub configuration: defaults, validation. Built before anything binds; tests
//! construct it directly (`Config::for_data_dir`). Also the one form of an
//! origin ([`normalize_origin`]) that `--allowed-origins` is validated in and
//! that the WebSocket and dashboard upgrades compare `Origin` headers in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

pub const DEFAULT_WS_ADDR: &str = "127.0.0.1:4000";
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
pub const DEFAULT_DATA_DIR: &str = "./agenthub-data";
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_OUTBOUND_QUEUE: usize = 1024;
/// Bytes a second one sidecar's frames are read at, at most (after a burst
/// of one second's worth).
pub const DEFAULT_SIDECAR_BYTES_PER_S: u64 = 16 << 20;
pub const DEFAULT_WS_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_WS_PING_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_RECONNECT_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_RECONNECT_SETTLE: Duration = Duration::from_secs(5);
pub const DEFAULT_BUSY_BACKOFF: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_WATCH_BUFFER: usize = 16 * 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_FINISHED_CACHE: usize = 1024;
/// Output bytes kept per task (the oldest are dropped beyond it).
pub const DEFAULT_OUTPUT_CAP_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_WS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_WS_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
pub const DEFAULT_MAX_UNIDENTIFIED: usize = 4_096;
pub const DEFAULT_MAX_WATCHES_PER_TOKEN: usize = 1024;
pub const DEFAULT_MAX_FAILED_IDENTIFIES: u32 = 10;
pub const DEFAULT_IDENTIFY_BLOCK: Duration = Duration::from_secs(60);
pub const DEFAULT_GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_REVOCATION_POLL: Duration = Duration::from_secs(1);

/// Certificate files for TLS on both listeners (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain, leaf first; re-read on SIGHUP.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1); re-read on SIGHUP.
    pub key: PathBuf,
    /// CA for sidecar client certificates: `/ws` then requires one.
    pub client_ca: Option<PathBuf>,
}

/// Everything a hub needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// WebSocket + HTTP listener (`/ws`, `/health`, `/metrics`, `/api/...`).
    pub ws_addr: SocketAddr,
    /// gRPC listener.
    pub grpc_addr: SocketAddr,
    /// Embedded store and admin token.
    pub data_dir: PathBuf,
    /// Largest WebSocket message accepted; bigger ones close the socket (1009).
    pub max_message_bytes: usize,
    /// A socket that has not identified within this is closed (1008).
    pub identify_timeout: Duration,
    /// Messages queued for one sidecar; a sidecar that lets it fill is disconnected.
    pub outbound_queue: usize,
    /// One sidecar's frames are read at most this many bytes a second, on
    /// average (0: no limit): beyond it its socket is left unread, so one
    /// peer's volume cannot take the log's time from the others.
    pub sidecar_bytes_per_s: u64,
    /// The hub pings every sidecar this often...
    pub ws_ping_interval: Duration,
    /// ...and closes a socket silent for `ws_ping_interval + ws_ping_timeout`.
    pub ws_ping_timeout: Duration,
    /// A frame the peer does not take within this ends the session (it
    /// stopped reading and its TCP window is full).
    pub ws_write_timeout: Duration,
    /// Longest wait for the peer's close frame (and for the writer to finish).
    pub ws_close_timeout: Duration,
    /// No `task_accepted` within this after `task_assign`: the task is reclaimed.
    pub accept_timeout: Duration,
    /// No report within this while running: the task is reclaimed. `None`: off.
    pub progress_timeout: Option<Duration>,
    /// A disconnected agent keeps its tasks this long.
    pub reconnect_grace: Duration,
    /// A sidecar that comes back after tasks were taken from it for its
    /// absence gets no new tasks (and those tasks go to nobody) until it has
    /// said what it still runs (`task_recovering` / `state_report`), or this long.
    pub reconnect_settle: Duration,
    /// After a `busy` rejection the agent gets no new task for this long,
    /// unless one of its tasks ends first.
    pub busy_backoff: Duration,
    /// Attempts per task when `PushTask` does not say.
    pub default_max_attempts: u32,
    /// Finished tasks (and their events) are removed this long after they
    /// finished. `None`: keep everything.
    pub retention: Option<Duration>,
    /// How often retention looks for expired tasks.
    pub retention_interval: Duration,
    /// Finished tasks kept in memory (the rest are read from the store).
    pub finished_cache: usize,
    /// Output bytes kept per task (`task_output`); older output is dropped.
    pub output_cap_bytes: u64,
    /// Keep at most this many events (oldest pruned). `None`: keep all.
    pub event_retention: Option<u64>,
    /// Live events buffered for watchers before a slow one is caught up from the store.
    pub watch_buffer: usize,
    /// How long shutdown waits for in-flight work.
    pub shutdown_grace: Duration,
    /// Create `<data-dir>/admin.token` on first start with an empty token table.
    pub bootstrap_admin_token: bool,
    /// TLS on both listeners; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// Origins (`scheme://host:port`) allowed to open `/ws` besides the hub's own.
    pub allowed_origins: Vec<String>,
    /// A TLS handshake or an HTTP/1 request head must arrive within this.
    pub header_timeout: Duration,
    /// Open connections on the HTTP listener (WebSocket included); 0: no limit.
    pub max_connections: usize,
    /// WebSockets that have not identified yet; 0: no limit.
    pub max_unidentified: usize,
    /// Live `WatchTaskEvents` streams per token; 0: no limit.
    pub max_watches_per_token: usize,
    /// Failed identifies per source address per minute before it is refused (4429); 0: no limit.
    pub max_failed_identifies: u32,
    /// How long an address stays refused after too many failed identifies.
    pub identify_block: Duration,
    /// HTTP/2 pings on gRPC connections this often...
    pub grpc_keepalive_interval: Duration,
    /// ...and the connection is dropped if one is not answered within this.
    pub grpc_keepalive_timeout: Duration,
    /// How often the token table is re-read for revocations made outside the hub.
    pub revocation_poll: Duration,
}

impl Config {
    /// Defaults with the given data directory.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            ws_addr: DEFAULT_WS_ADDR.parse().expect("valid default"),
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("valid default"),
            data_dir: data_dir.into(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            identify_timeout: DEFAULT_IDENTIFY_TIMEOUT,
            outbound_queue: DEFAULT_OUTBOUND_QUEUE,
            sidecar_bytes_per_s: DEFAULT_SIDECAR_BYTES_PER_S,
            ws_ping_interval: DEFAULT_WS_PING_INTERVAL,
            ws_ping_timeout: DEFAULT_WS_PING_TIMEOUT,
            ws_write_timeout: DEFAULT_WS_WRITE_TIMEOUT,
            ws_close_timeout: DEFAULT_WS_CLOSE_TIMEOUT,
            accept_timeout: DEFAULT_ACCEPT_TIMEOUT,
            progress_timeout: None,
            reconnect_grace: DEFAULT_RECONNECT_GRACE,
            reconnect_settle: DEFAULT_RECONNECT_SETTLE,
            busy_backoff: DEFAULT_BUSY_BACKOFF,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
            event_retention: None,
            retention: Some(DEFAULT_RETENTION),
            retention_interval: DEFAULT_RETENTION_INTERVAL,
            finished_cache: DEFAULT_FINISHED_CACHE,
            output_cap_bytes: DEFAULT_OUTPUT_CAP_BYTES,
            watch_buffer: DEFAULT_WATCH_BUFFER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            bootstrap_admin_token: true,
            tls: None,
            allowed_origins: Vec::new(),
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unidentified: DEFAULT_MAX_UNIDENTIFIED,
            max_watches_per_token: DEFAULT_MAX_WATCHES_PER_TOKEN,
            max_failed_identifies: DEFAULT_MAX_FAILED_IDENTIFIES,
            identify_block: DEFAULT_IDENTIFY_BLOCK,
            grpc_keepalive_interval: DEFAULT_GRPC_KEEPALIVE_INTERVAL,
            grpc_keepalive_timeout: DEFAULT_GRPC_KEEPALIVE_TIMEOUT,
            revocation_poll: DEFAULT_REVOCATION_POLL,
        }
    }

    /// Reject settings that cannot work, before anything binds.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        if self.max_message_bytes < 1024 {
            return bad("max message size must be at least 1024 bytes");
        }
        if self.outbound_queue == 0 {
            return bad("outbound queue must hold at least one message");
        }
        if self.watch_buffer < 16 {
            return bad("watch buffer must hold at least 16 events");
        }
        if self.default_max_attempts == 0 {
            return bad("max attempts must be at least 1");
        }
        if self.identify_timeout.is_zero()
            || self.ws_ping_interval.is_zero()
            || self.ws_ping_timeout.is_zero()
            || self.accept_timeout.is_zero()
            || self.ws_write_timeout.is_zero()
            || self.ws_close_timeout.is_zero()
        {
            return bad("timeouts must be greater than zero");
        }
        if self.header_timeout.is_zero()
            || self.grpc_keepalive_interval.is_zero()
            || self.grpc_keepalive_timeout.is_zero()
            || self.revocation_poll.is_zero()
        {
            return bad("header timeout, keepalive and revocation poll must be greater than zero");
        }
        for origin in &self.allowed_origins {
            if normalize_origin(origin).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "allowed origin `{origin}` must be scheme://host[:port]"
                )));
            }
        }
        if self.retention_interval.is_zero() {
            return bad("retention interval must be greater than zero");
        }
        if self.event_retention == Some(0) {
            return bad("event retention must keep at least one event");
        }
        Ok(())
    }
}

/// `scheme://host[:port]` as (scheme, host, port), lowercased, with the
/// scheme's default port filled in; `None` if it is not such an origin.
pub fn normalize_origin(origin: &str) -> Option<(String, String, u16)> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, rest) = origin.split_once("://")?;
    let default_port = match scheme {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal without a port: `[::1]`.
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
        _ => (rest, default_port),
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme.to_string(), host.to_string(), port))
}

/// `500ms`, `10s`, `2m`, `1h`, `30d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration `{s}`"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit in `{s}` (use ms, s, m, h, d)"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_normalize_with_default_ports() {
        let o = |s| normalize_origin(s);
        assert_eq!(o("https://Example.com"), o("https://example.com:443"));
        assert_eq!(o("http://127.0.0.1:4000").unwrap().2, 4000);
        assert_eq!(o("http://[::1]").unwrap().1, "[::1]");
        assert_eq!(o("http://[::1]:8080").unwrap().2, 8080);
        assert!(o("null").is_none());
        assert!(o("https://evil.example/path").is_none());
        assert!(o("ftp://x").is_none());
    }
}
