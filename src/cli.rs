//! Command line: clap definitions with env fallbacks. Secrets are never shown
//! in `--help` (`hide_env_values`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, parse_duration, Config};

#[derive(Parser, Debug)]
#[command(
    name = "agenthub",
    version,
    about = "A durable task hub for AI-agent sidecars"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: crate::telemetry::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub (WebSocket + HTTP and gRPC listeners, embedded store).
    Serve(Box<ServeArgs>),
    /// Manage tokens in the data directory (no server needed) or over gRPC.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Push a task (gRPC PushTask).
    Push(PushArgs),
    /// Follow task events as JSON lines (gRPC WatchTaskEvents).
    Watch(WatchArgs),
    /// List or show tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// List agents.
    Agents(ClientArgs),
    /// Print a task's output (gRPC WatchTaskOutput); -f follows it live.
    Logs(LogsArgs),
    /// Run the reference sidecar: connect to a hub and run CMD for every task.
    Sidecar(crate::sidecar::SidecarArgs),
    /// Copy the store consistently to FILE, also while the hub runs.
    Backup {
        #[arg(long, env = "AGENTHUB_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Where to write the copy (a SQLite database file).
        #[arg(long)]
        to: PathBuf,
    },
    /// Verify the store: SQLite integrity, seq continuity, every live task's
    /// latest event present. Exit 0 if sound, 1 if not.
    Check {
        #[arg(long, env = "AGENTHUB_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

/// Connection to a NATS JetStream cluster (cluster mode, SPEC §9).
#[derive(Args, Debug, Clone, Default)]
pub struct NatsArgs {
    /// Cluster mode: NATS server URLs, comma-separated (nats://h1:4222,nats://h2:4222).
    #[arg(long, env = "AGENTHUB_NATS")]
    pub nats: Option<String>,
    /// Replicas of the log stream and the KV buckets (when this node creates them).
    #[arg(long, env = "AGENTHUB_NATS_REPLICAS", default_value_t = 3)]
    pub nats_replicas: usize,
    /// NATS credentials file (.creds: JWT and NKey seed).
    #[arg(long, env = "AGENTHUB_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "AGENTHUB_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "AGENTHUB_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "AGENTHUB_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// CA certificate (PEM) to verify TLS NATS servers with (turns TLS on).
    #[arg(long, env = "AGENTHUB_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for NATS servers that require one.
    #[arg(long, env = "AGENTHUB_NATS_CERT", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    #[arg(long, env = "AGENTHUB_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
}

impl NatsArgs {
    /// Cluster options for `node_id`, if `--nats` is given.
    pub fn options(&self, node_id: &str) -> Option<crate::cluster::ClusterOptions> {
        let urls = self.nats.as_deref()?;
        let mut o = crate::cluster::ClusterOptions::new(urls, node_id);
        o.replicas = self.nats_replicas;
        o.creds = self.nats_creds.clone();
        o.user = self.nats_user.clone();
        o.password = self.nats_password.clone();
        o.token = self.nats_token.clone();
        o.tls_ca = self.nats_ca.clone();
        o.tls_cert = self.nats_cert.clone();
        o.tls_key = self.nats_key.clone();
        Some(o)
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Cluster mode: this node's name (letters, digits, '-', '_'; unique in the cluster).
    #[arg(long, env = "AGENTHUB_NODE_ID", requires = "nats")]
    pub node_id: Option<String>,
    /// Cluster mode: the leader lease; a leader silent this long is replaced.
    #[arg(long, env = "AGENTHUB_LEASE", value_parser = parse_duration, default_value = "3s")]
    pub lease: Duration,
    /// Cluster mode: calls forwarded by followers that the leader answers at
    /// once (watch streams included); one more gets UNAVAILABLE.
    #[arg(long, env = "AGENTHUB_MAX_FORWARDED_CALLS", default_value_t = crate::cluster::DEFAULT_MAX_FORWARDED_CALLS)]
    pub max_forwarded_calls: usize,
    #[arg(long, env = "AGENTHUB_WS_ADDR", default_value = config::DEFAULT_WS_ADDR)]
    pub ws_addr: SocketAddr,
    #[arg(long, env = "AGENTHUB_GRPC_ADDR", default_value = config::DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    #[arg(long, env = "AGENTHUB_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Print the bound addresses as `ws=ADDR grpc=ADDR` on stdout once listening.
    #[arg(long)]
    pub print_addrs: bool,
    /// Benchmark builds only: acknowledge every commit without writing it,
    /// to measure the hub without its storage. Keeps nothing.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true)]
    pub bench_discard_writes: bool,
    /// Reclaim a task not accepted within this (e.g. 60s, 500ms).
    #[arg(long, env = "AGENTHUB_ACCEPT_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub accept_timeout: Duration,
    /// Reclaim a running task silent for this long; 0 = off.
    #[arg(long, env = "AGENTHUB_PROGRESS_TIMEOUT", value_parser = parse_duration, default_value = "0")]
    pub progress_timeout: Duration,
    /// How long a disconnected agent keeps its tasks.
    #[arg(long, env = "AGENTHUB_RECONNECT_GRACE", value_parser = parse_duration, default_value = "60s")]
    pub reconnect_grace: Duration,
    /// A sidecar back after the grace gets no new tasks until it reports what it still runs, or this long.
    #[arg(long, env = "AGENTHUB_RECONNECT_SETTLE", value_parser = parse_duration, default_value = "5s")]
    pub reconnect_settle: Duration,
    /// After a `busy` rejection, no new task for the agent for this long (or until a slot frees).
    #[arg(long, env = "AGENTHUB_BUSY_BACKOFF", value_parser = parse_duration, default_value = "10s")]
    pub busy_backoff: Duration,
    /// Close sockets that do not identify within this.
    #[arg(long, env = "AGENTHUB_IDENTIFY_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub identify_timeout: Duration,
    /// WebSocket ping interval; a socket silent for interval + ping timeout is closed.
    #[arg(long, env = "AGENTHUB_PING_INTERVAL", value_parser = parse_duration, default_value = "20s")]
    pub ping_interval: Duration,
    #[arg(long, env = "AGENTHUB_PING_TIMEOUT", value_parser = parse_duration, default_value = "20s")]
    pub ping_timeout: Duration,
    /// Attempts per task when PushTask does not say.
    #[arg(long, env = "AGENTHUB_MAX_ATTEMPTS", default_value_t = config::DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: u32,
    /// Largest WebSocket message in bytes.
    #[arg(long, env = "AGENTHUB_MAX_MESSAGE_BYTES", default_value_t = config::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Messages queued per sidecar before it is disconnected as too slow.
    #[arg(long, env = "AGENTHUB_OUTBOUND_QUEUE", default_value_t = config::DEFAULT_OUTBOUND_QUEUE)]
    pub outbound_queue: usize,
    /// Bytes a second one sidecar's frames are read at, at most (0: no limit).
    #[arg(long, env = "AGENTHUB_SIDECAR_BYTES_PER_S", default_value_t = config::DEFAULT_SIDECAR_BYTES_PER_S)]
    pub sidecar_bytes_per_s: u64,
    /// Keep only the newest N events (0 = keep all).
    #[arg(long, env = "AGENTHUB_EVENT_RETENTION", default_value_t = 0)]
    pub event_retention: u64,
    /// Finished tasks kept in memory; older ones are read from the store.
    #[arg(long, env = "AGENTHUB_FINISHED_CACHE", default_value_t = config::DEFAULT_FINISHED_CACHE)]
    pub finished_cache: usize,
    /// TLS certificate chain (PEM) for both listeners; re-read on SIGHUP.
    #[arg(long, env = "AGENTHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); re-read on SIGHUP.
    #[arg(long, env = "AGENTHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) for sidecar client certificates: `/ws` then requires one.
    #[arg(long, env = "AGENTHUB_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Origins (scheme://host:port, comma-separated) allowed to open /ws besides the hub's own.
    #[arg(long, env = "AGENTHUB_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// A TLS handshake or HTTP request head must arrive within this.
    #[arg(long, env = "AGENTHUB_HEADER_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub header_timeout: Duration,
    /// Open connections on the HTTP/WebSocket listener (0 = no limit).
    #[arg(long, env = "AGENTHUB_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// WebSockets open without having identified (0 = no limit).
    #[arg(long, env = "AGENTHUB_MAX_UNIDENTIFIED", default_value_t = config::DEFAULT_MAX_UNIDENTIFIED)]
    pub max_unidentified: usize,
    /// Live WatchTaskEvents streams per token (0 = no limit).
    #[arg(long, env = "AGENTHUB_MAX_WATCHES_PER_TOKEN", default_value_t = config::DEFAULT_MAX_WATCHES_PER_TOKEN)]
    pub max_watches_per_token: usize,
    /// Failed identifies per source address per minute before it is refused (0 = no limit).
    #[arg(long, env = "AGENTHUB_MAX_FAILED_IDENTIFIES", default_value_t = config::DEFAULT_MAX_FAILED_IDENTIFIES)]
    pub max_failed_identifies: u32,
    /// How long an address over --max-failed-identifies is refused.
    #[arg(long, env = "AGENTHUB_IDENTIFY_BLOCK", value_parser = parse_duration, default_value = "60s")]
    pub identify_block: Duration,
    /// HTTP/2 ping interval on gRPC connections.
    #[arg(long, env = "AGENTHUB_GRPC_KEEPALIVE", value_parser = parse_duration, default_value = "20s")]
    pub grpc_keepalive: Duration,
    /// Drop a gRPC connection whose ping is not answered within this.
    #[arg(long, env = "AGENTHUB_GRPC_KEEPALIVE_TIMEOUT", value_parser = parse_duration, default_value = "20s")]
    pub grpc_keepalive_timeout: Duration,
    /// Output bytes kept per task (task_output); older output is dropped.
    #[arg(long, env = "AGENTHUB_OUTPUT_CAP", default_value_t = config::DEFAULT_OUTPUT_CAP_BYTES)]
    pub output_cap: u64,
    /// Remove finished tasks and their events this long after they
    /// finished (e.g. 30d, 12h); 0 keeps everything.
    #[arg(long, env = "AGENTHUB_RETENTION", value_parser = parse_duration, default_value = "30d")]
    pub retention: Duration,
}

impl ServeArgs {
    pub fn to_config(&self) -> Config {
        let mut c = Config::for_data_dir(&self.data_dir);
        c.ws_addr = self.ws_addr;
        c.grpc_addr = self.grpc_addr;
        c.accept_timeout = self.accept_timeout;
        c.progress_timeout = (!self.progress_timeout.is_zero()).then_some(self.progress_timeout);
        c.reconnect_grace = self.reconnect_grace;
        c.reconnect_settle = self.reconnect_settle;
        c.busy_backoff = self.busy_backoff;
        c.identify_timeout = self.identify_timeout;
        c.ws_ping_interval = self.ping_interval;
        c.ws_ping_timeout = self.ping_timeout;
        c.default_max_attempts = self.max_attempts;
        c.max_message_bytes = self.max_message_bytes;
        c.outbound_queue = self.outbound_queue;
        c.sidecar_bytes_per_s = self.sidecar_bytes_per_s;
        c.event_retention = (self.event_retention > 0).then_some(self.event_retention);
        c.finished_cache = self.finished_cache;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.tls = Some(config::TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            });
        }
        c.allowed_origins = self.allowed_origins.clone();
        c.header_timeout = self.header_timeout;
        c.max_connections = self.max_connections;
        c.max_unidentified = self.max_unidentified;
        c.max_watches_per_token = self.max_watches_per_token;
        c.max_failed_identifies = self.max_failed_identifies;
        c.identify_block = self.identify_block;
        c.grpc_keepalive_interval = self.grpc_keepalive;
        c.grpc_keepalive_timeout = self.grpc_keepalive_timeout;
        c.retention = (!self.retention.is_zero()).then_some(self.retention);
        c.output_cap_bytes = self.output_cap;
        c
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issue a token; prints the token alone on stdout (it is not stored).
    Issue {
        /// An agent token bound to this agent id.
        #[arg(long, conflicts_with = "role")]
        agent: Option<String>,
        /// orchestrator, viewer or admin.
        #[arg(long)]
        role: Option<String>,
        #[command(flatten)]
        target: TokenTarget,
    },
    /// List tokens as JSON lines (ids, roles, agents; never the secrets).
    List {
        #[command(flatten)]
        target: TokenTarget,
    },
    /// Revoke a token by id; its live sessions and streams end within 2 s.
    Revoke {
        id: String,
        #[command(flatten)]
        target: TokenTarget,
    },
}

/// Where tokens are managed: a data directory (no server needed), or a
/// running hub over gRPC with an admin token. A data directory given
/// (`--data-dir` / AGENTHUB_DATA_DIR) wins; else a hub address given
/// (`--grpc-addr` / AGENTHUB_GRPC_ADDR) means gRPC; else `./agenthub-data`.
#[derive(Args, Debug, Clone)]
pub struct TokenTarget {
    #[arg(long, env = "AGENTHUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC address of a running hub (`host:port`, `https://host:port`).
    #[arg(long = "grpc-addr", env = "AGENTHUB_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// Admin token, for --grpc-addr.
    #[arg(long, env = "AGENTHUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify an https:// hub with.
    #[arg(long, env = "AGENTHUB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Work on a cluster's token set in NATS (see `serve --nats`).
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// gRPC address of the hub.
    #[arg(long = "grpc-addr", env = "AGENTHUB_GRPC_ADDR", default_value = config::DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,
    /// Bearer token (orchestrator, viewer or admin); prefer the environment.
    #[arg(long, env = "AGENTHUB_TOKEN", hide_env_values = true)]
    pub token: String,
    /// CA certificate (PEM) to verify an https:// hub with (default: system roots).
    #[arg(long, env = "AGENTHUB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Pin to this agent; omit to let the scheduler pick.
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long, short = 'd', default_value = "")]
    pub description: String,
    /// Metadata as a JSON object.
    #[arg(long)]
    pub metadata: Option<String>,
    #[arg(long)]
    pub task_id: Option<String>,
    /// Needed capability (repeatable or comma-separated).
    #[arg(long = "capability", value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// low, normal, high or urgent.
    #[arg(long, default_value = "normal")]
    pub priority: String,
    #[arg(long)]
    pub queue_if_offline: bool,
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// A task that must COMPLETE first (repeatable or comma-separated).
    #[arg(long = "depends-on", value_delimiter = ',')]
    pub depends_on: Vec<String>,
    /// FAIL the task if still queued this long after the push (e.g. 10m).
    #[arg(long, value_parser = parse_duration)]
    pub queue_ttl: Option<Duration>,
    /// FAIL the task if not finished this long from now (e.g. 1h).
    #[arg(long, value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// Wait for the task to finish, print it, and exit 0 if it COMPLETED, 1 otherwise.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (exit 1 with the task as it is).
    #[arg(long, value_parser = parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Follow live output until the task is finished.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Start at this byte offset of the task's output.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    pub task_id: String,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Replay every stored event after this seq first.
    #[arg(long)]
    pub after: Option<u64>,
    #[arg(long)]
    pub task: Option<String>,
    #[arg(long)]
    pub agent: Option<String>,
    /// Only these kinds (repeatable or comma-separated), e.g. COMPLETED,FAILED.
    #[arg(long = "kind", value_delimiter = ',')]
    pub kinds: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum TasksCommand {
    /// List tasks as JSON lines.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// Stop after this many tasks (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Show one task as JSON.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        task_id: String,
    },
    /// Cancel a task.
    Cancel {
        #[command(flatten)]
        client: ClientArgs,
        task_id: String,
    },
    /// Re-queue a FAILED or CANCELLED task.
    Retry {
        #[command(flatten)]
        client: ClientArgs,
        task_id: String,
    },
}
