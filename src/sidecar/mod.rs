//! The reference sidecar (`agenthub sidecar -- CMD [ARGS...]`): holds a
//! WebSocket to the hub and runs `CMD` once for every task it is given.
//!
//! - [`conn`]: connect, identify, heartbeats, reconnect with backoff.
//! - [`core`]: the task table and every reaction to the hub and to commands.
//! - [`runner`]: one command as a child process: env contract, wrapper,
//!   cancellation (SIGTERM, then SIGKILL).
//! - [`output`]: progress lines and output tails.
//! - [`procs`]: process liveness and identity, process-group signals.
//! - [`state`]: the state file, written before the hub is told anything.
//!
//! The main loop here owns [`core::Sidecar`] and feeds it, one at a time,
//! frames from the connection task and events from the command watchers. See
//! `docs/sidecar.md` for the contract commands see and the recovery rules.

mod conn;
mod core;
mod output;
mod procs;
mod runner;
mod state;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::parse_duration;

pub use output::parse_progress;

/// How long a draining sidecar waits for the hub to ack its last reports.
pub const REPORT_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bytes of stdout (on success) or stderr (on failure) in a report.
pub const DEFAULT_TAIL_BYTES: usize = 16 * 1024;
/// Largest `--output-tail-bytes`: a report must stay well under the hub's
/// message limit (1 MiB by default), or the hub closes the socket on it.
pub const MAX_TAIL_BYTES: usize = 256 * 1024;

/// `agenthub sidecar`: connect to a hub and run CMD for every task.
#[derive(Args, Debug, Clone)]
pub struct SidecarArgs {
    /// WebSocket URL of the hub (ws:// or wss://). Several, comma-separated
    /// (the nodes of a cluster): each reconnect tries the next one in turn.
    #[arg(
        long,
        env = "AGENTHUB_WS_URL",
        default_value = "ws://127.0.0.1:4000/ws"
    )]
    pub hub: String,
    /// Agent id; must match the agent token.
    #[arg(long, env = "AGENTHUB_AGENT_ID")]
    pub agent: String,
    /// Agent token (`agenthub token issue --agent ID`). Not passed on to CMD.
    /// Prefer the environment or --token-file: argv is visible to `ps`.
    #[arg(
        long,
        env = "AGENTHUB_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the agent token from this file (surrounding whitespace ignored).
    #[arg(long, env = "AGENTHUB_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify a wss:// hub with (default: system roots).
    #[arg(long, env = "AGENTHUB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a hub that requires one (`serve --client-ca`).
    #[arg(long, env = "AGENTHUB_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "AGENTHUB_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Display name sent in identify (default: the agent id).
    #[arg(long)]
    pub name: Option<String>,
    /// Capabilities this agent offers (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// Tasks run at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_concurrency: u32,
    /// Where held tasks are recorded [default: ./agenthub-sidecar-<AGENT>.json].
    #[arg(long, env = "AGENTHUB_SIDECAR_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Application-level ping interval; a hub silent for 3 intervals is dropped.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub heartbeat: Duration,
    /// First reconnect delay; doubles (with jitter) up to --backoff-max.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub backoff_max: Duration,
    /// Between SIGTERM and SIGKILL when a command is cancelled or stopped.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub kill_grace: Duration,
    /// On SIGTERM: how long running commands may go on before they are stopped.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// Bytes of stdout (success) or stderr (failure) kept in the report: the last ones.
    #[arg(long, default_value_t = DEFAULT_TAIL_BYTES)]
    pub output_tail_bytes: usize,
    /// The command run for every task, with the task in its environment.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl SidecarArgs {
    /// The agent token, from the environment / --token or --token-file.
    fn read_token(&self) -> anyhow::Result<String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("read --token-file {}", path.display()))?
                .trim()
                .to_string(),
            (None, None) => String::new(),
        };
        if token.is_empty() {
            bail!("the agent token is empty");
        }
        Ok(token)
    }

    /// TLS settings for a wss:// hub.
    fn tls(&self) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        if !parse_hub_urls(&self.hub)?
            .iter()
            .any(|u| u.starts_with("wss://"))
        {
            return Ok(None);
        }
        let identity = self.client_cert.as_deref().zip(self.client_key.as_deref());
        Ok(Some(crate::tls::client_config(
            self.ca_file.as_deref(),
            identity,
        )?))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.agent.is_empty() {
            bail!("--agent must not be empty");
        }
        if self.token.is_none() && self.token_file.is_none() {
            bail!("give the agent token in AGENTHUB_TOKEN or --token-file");
        }
        if self.command.is_empty() {
            bail!("give the command to run after `--`");
        }
        if self.heartbeat.is_zero() || self.backoff_initial.is_zero() {
            bail!("--heartbeat and --backoff-initial must be positive");
        }
        if self.backoff_max < self.backoff_initial {
            bail!("--backoff-max must be at least --backoff-initial");
        }
        if self.output_tail_bytes > MAX_TAIL_BYTES {
            bail!("--output-tail-bytes must be at most {MAX_TAIL_BYTES}");
        }
        parse_hub_urls(&self.hub)?;
        Ok(())
    }

    fn state_path(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "agenthub-sidecar-{}.json",
                state::path_safe(&self.agent)
            ))
        })
    }
}

/// The hub URLs of `--hub`: one or several, comma-separated, each a
/// `ws://` or `wss://` URL with a host.
fn parse_hub_urls(list: &str) -> anyhow::Result<Vec<String>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut urls = Vec::new();
    for url in list.split(',').map(str::trim) {
        if url.is_empty() {
            bail!(
                "--hub {list:?} has an empty entry; give ws:// or wss:// URLs separated by commas"
            );
        }
        let valid = url.into_client_request().is_ok_and(|req| {
            matches!(req.uri().scheme_str(), Some("ws" | "wss")) && req.uri().host().is_some()
        });
        if !valid {
            bail!("--hub: {url:?} is not a ws:// or wss:// URL, e.g. ws://127.0.0.1:4000/ws");
        }
        urls.push(url.to_string());
    }
    Ok(urls)
}

/// Run the sidecar until SIGTERM/SIGINT (after draining) or a fatal error.
pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    args.validate()?;
    let span = crate::telemetry::sidecar_span(Some(&args.agent), None);
    main_loop(args).instrument(span).await
}

async fn main_loop(args: SidecarArgs) -> anyhow::Result<()> {
    let state_path = args.state_path();
    let state = state::StateFile::load(&state_path, &args.agent)?;
    tracing::info!(
        hub = %args.hub,
        state_file = %state_path.display(),
        held = state.data.tasks.len(),
        max_concurrency = args.max_concurrency,
        "sidecar starting"
    );

    let (conn_tx, mut conn_rx) = mpsc::channel(1024);
    let (run_tx, mut run_rx) = mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let conn_cfg = conn::ConnConfig {
        urls: parse_hub_urls(&args.hub)?,
        agent_id: args.agent.clone(),
        token: args.read_token()?,
        tls: args.tls()?,
        name: args.name.clone(),
        capabilities: args.capabilities.clone(),
        max_concurrency: args.max_concurrency,
        heartbeat: args.heartbeat,
        backoff_initial: args.backoff_initial,
        backoff_max: args.backoff_max,
    };
    let conn_task = tokio::spawn(conn::run(conn_cfg, conn_tx, shutdown_rx).in_current_span());
    let run_cfg = runner::RunConfig {
        command: args.command.clone(),
        tail_bytes: args.output_tail_bytes,
        kill_grace: args.kill_grace,
    };
    let mut sidecar = core::Sidecar::new(run_cfg, args.max_concurrency, state, run_tx);

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut grace_deadline = far();
    let mut grace_over = false;
    let mut ack_deadline: Option<Instant> = None;
    let result = loop {
        if sidecar.draining && sidecar.running() == 0 {
            let deadline = *ack_deadline.get_or_insert_with(|| Instant::now() + REPORT_ACK_TIMEOUT);
            if sidecar.held() == 0 || Instant::now() >= deadline {
                if sidecar.held() > 0 {
                    tracing::warn!(
                        held = sidecar.held(),
                        "exiting with unacknowledged tasks; they stay in the state file"
                    );
                }
                break Ok(());
            }
        }
        tokio::select! {
            ev = conn_rx.recv() => match ev {
                Some(conn::ConnEvent::Connected(out)) => sidecar.on_connected(out),
                Some(conn::ConnEvent::Frame(v)) => sidecar.on_frame(v).await,
                Some(conn::ConnEvent::Disconnected) => sidecar.on_disconnected(),
                Some(conn::ConnEvent::Fatal(e)) => break Err(anyhow::anyhow!(e)),
                None => break Err(anyhow::anyhow!("connection task ended")),
            },
            Some(ev) = run_rx.recv() => sidecar.on_run_event(ev).await,
            sig = async { tokio::select! { _ = sigterm.recv() => "SIGTERM", _ = sigint.recv() => "SIGINT" } } => {
                if !sidecar.draining {
                    tracing::info!(signal = sig, running = sidecar.running(), grace = ?args.shutdown_grace, "draining: no new tasks; waiting for running ones");
                    sidecar.draining = true;
                    sidecar.announce_draining();
                    grace_deadline = Instant::now() + args.shutdown_grace;
                } else if !grace_over {
                    tracing::warn!(signal = sig, "second signal: stopping running commands now");
                    grace_over = true;
                    sidecar.stop_all();
                }
            }
            _ = tokio::time::sleep_until(grace_deadline), if sidecar.draining && !grace_over => {
                grace_over = true;
                sidecar.stop_all();
            }
            _ = tokio::time::sleep_until(ack_deadline.unwrap_or_else(far)), if ack_deadline.is_some() => {}
        }
    };
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn_task).await;
    if result.is_ok() {
        tracing::info!("sidecar stopped");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::parse_hub_urls;

    #[test]
    fn hub_takes_one_or_several_urls_and_names_a_bad_one() {
        assert_eq!(
            parse_hub_urls("ws://127.0.0.1:4000/ws").unwrap(),
            ["ws://127.0.0.1:4000/ws"]
        );
        assert_eq!(
            parse_hub_urls("ws://h1:4000/ws, wss://h2:4000/ws").unwrap(),
            ["ws://h1:4000/ws", "wss://h2:4000/ws"]
        );
        let err = parse_hub_urls("ws://h1:4000/ws,http://h2:4000/ws")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"http://h2:4000/ws\""), "{err}");
        assert!(parse_hub_urls("ws://h1:4000/ws,").is_err());
        assert!(parse_hub_urls("ws://").is_err());
    }
}
