//! The `agenthub` binary: parse the command line, set up logging, dispatch.

use std::io::Write;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::Value;

use agenthub::auth::{issue_token, Role};
use agenthub::cli::{
    Cli, ClientArgs, Command, LogsArgs, PushArgs, TasksCommand, TokenCommand, TokenTarget,
    WatchArgs,
};
use agenthub::client::{connect_with_ca, HubClient};
use agenthub::pb;
use agenthub::store::sqlite::SqliteStore;
use agenthub::store::Store;
use agenthub::Server;

/// mimalloc instead of glibc's malloc: the hub allocates a request's buffers on
/// one thread and frees them on another (a tokio worker builds a commit, the
/// log's commit drops it, often on another thread), which glibc serves under its arenas' locks.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let service = match cli.command {
        Command::Sidecar(_) => "agenthub-sidecar",
        _ => "agenthub",
    };
    let telemetry = agenthub::telemetry::init(&cli.log, service)?;
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Token(cmd) => token(cmd).await,
        Command::Push(args) => push(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Tasks(cmd) => tasks(cmd).await,
        Command::Agents(args) => agents(args).await,
        Command::Logs(args) => logs(args).await,
        Command::Sidecar(args) => agenthub::sidecar::run(args).await,
        Command::Backup { data_dir, to } => backup(&data_dir, &to),
        Command::Check { data_dir } => check(&data_dir),
    };
    telemetry.shutdown();
    result
}

fn backup(data_dir: &std::path::Path, to: &std::path::Path) -> Result<()> {
    if to.exists() {
        bail!("{} exists; give a new file", to.display());
    }
    if !data_dir.join("agenthub.db").exists() {
        bail!("no store in {}", data_dir.display());
    }
    let records = agenthub::store::file::backup(data_dir, to)?;
    println!(
        "backed up {} to {} ({records} log records past the copy applied)",
        data_dir.display(),
        to.display()
    );
    Ok(())
}

fn check(data_dir: &std::path::Path) -> Result<()> {
    if !data_dir.join("agenthub.db").exists() && !agenthub::store::file::log_dir(data_dir).exists()
    {
        bail!("no store in {}", data_dir.display());
    }
    let report = agenthub::store::file::check(data_dir)?;
    for note in &report.notes {
        println!("note: {note}");
    }
    if report.problems.is_empty() {
        println!("ok: {} is sound", data_dir.display());
        return Ok(());
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    std::process::exit(1);
}

async fn serve(args: agenthub::cli::ServeArgs) -> Result<()> {
    let config = args.to_config();
    let server = match &args.nats.nats {
        Some(_) => {
            let node_id = args
                .node_id
                .clone()
                .ok_or_else(|| anyhow!("--nats needs --node-id NAME (unique in the cluster)"))?;
            let mut options = args.nats.options(&node_id).expect("--nats is set");
            options.lease = args.lease;
            options.max_forwarded_calls = args.max_forwarded_calls.max(1);
            Server::build_cluster(config.clone(), options).await?
        }
        None => build_single(&args, config.clone()).await?,
    };
    if let Some(token) = server.hub().take_bootstrap_token() {
        println!(
            "admin token (shown once; also in {}): {token}",
            config.data_dir.join("admin.token").display()
        );
    }
    tracing::info!(ws = %server.ws_addr(), grpc = %server.grpc_addr(), data_dir = %config.data_dir.display(), "agenthub listening");
    // Always handled, and installed before the hub says it is up: SIGHUP's
    // default action would end a hub without TLS.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tokio::spawn(reload_on_sighup(hup, server.tls()));
    if args.print_addrs {
        println!("ws={} grpc={}", server.ws_addr(), server.grpc_addr());
    }
    std::io::stdout().flush()?;
    // `run` polls this first once both listeners accept; the store is open.
    let shutdown = async {
        agenthub::notify::notify("READY=1");
        shutdown_signal().await;
        agenthub::notify::notify("STOPPING=1");
    };
    server.run(shutdown).await?;
    Ok(())
}

/// A single-node server on the embedded store.
async fn build_single(
    args: &agenthub::cli::ServeArgs,
    config: agenthub::config::Config,
) -> Result<Server> {
    #[cfg(feature = "bench")]
    if args.bench_discard_writes {
        let faults = std::sync::Arc::new(agenthub::store::Faults::default());
        faults.discard_writes();
        tracing::warn!("--bench-discard-writes: nothing is stored");
        let store = agenthub::store::file::FileStore::open_with_faults(
            &config.data_dir,
            config.event_retention,
            Some(faults),
        )?;
        return Ok(Server::build_on(config, std::sync::Arc::new(store)).await?);
    }
    let _ = args;
    Ok(Server::build(config).await?)
}

/// SIGHUP: re-read the TLS certificate and key (live connections keep
/// theirs); without TLS there is nothing to re-read, and the hub goes on.
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    tls: Option<std::sync::Arc<agenthub::tls::Tls>>,
) {
    let Ok(mut hup) = hup else {
        tracing::error!("cannot install a SIGHUP handler; TLS reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        match &tls {
            Some(tls) => {
                if let Err(e) = tls.reload() {
                    tracing::error!(error = %e, "TLS reload failed; keeping the current certificate");
                }
            }
            None => tracing::info!("SIGHUP: no TLS certificate to re-read"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn token(cmd: TokenCommand) -> Result<()> {
    let target = match &cmd {
        TokenCommand::Issue { target, .. }
        | TokenCommand::List { target }
        | TokenCommand::Revoke { target, .. } => target.clone(),
    };
    if let Some(options) = target.nats.options("token-cli") {
        return token_nats(cmd, &options).await;
    }
    match (&target.data_dir, &target.grpc_addr) {
        (None, Some(addr)) => token_grpc(cmd, addr, &target).await,
        (dir, _) => {
            let dir = dir
                .clone()
                .unwrap_or_else(|| agenthub::config::DEFAULT_DATA_DIR.into());
            token_local(cmd, &dir)
        }
    }
}

fn issue_role(agent: &Option<String>, role: Option<&str>) -> Result<Role> {
    match (agent, role) {
        (Some(_), None | Some("agent")) => Ok(Role::Agent),
        (None, Some(r)) => Role::parse(r)
            .ok_or_else(|| anyhow!("unknown role `{r}` (agent, orchestrator, viewer, admin)")),
        (None, None) => bail!("give --agent ID or --role ROLE"),
        (Some(_), Some(_)) => bail!("--agent issues an agent token; drop --role"),
    }
}

/// Token management directly in the data directory. A running hub sees a
/// revocation made here within `Config::revocation_poll` (1 s).
fn token_local(cmd: TokenCommand, data_dir: &std::path::Path) -> Result<()> {
    let store = SqliteStore::open(data_dir, None, false)?;
    match cmd {
        TokenCommand::Issue { agent, role, .. } => {
            let role = issue_role(&agent, role.as_deref())?;
            let (secret, _) = issue_token(&store, role, agent)?;
            println!("{secret}");
        }
        TokenCommand::List { .. } => {
            for t in store.list_tokens()? {
                println!("{}", serde_json::to_string(&t)?);
            }
        }
        TokenCommand::Revoke { id, .. } => {
            if !store.revoke_token(&id)? {
                bail!("no token with id {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// Token management on a cluster's token bucket (no node needs to run).
async fn token_nats(cmd: TokenCommand, options: &agenthub::cluster::ClusterOptions) -> Result<()> {
    let admin = agenthub::cluster::log::TokenAdmin::connect(options).await?;
    match cmd {
        TokenCommand::Issue { agent, role, .. } => {
            let role = issue_role(&agent, role.as_deref())?;
            let (secret, record) = agenthub::auth::new_token(role, agent)?;
            admin.insert(&record).await?;
            println!("{secret}");
        }
        TokenCommand::List { .. } => {
            for t in admin.list().await? {
                println!("{}", serde_json::to_string(&t)?);
            }
        }
        TokenCommand::Revoke { id, .. } => {
            if !admin.revoke(&id).await? {
                bail!("no token with id {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// Token management on a running hub (IssueToken, ListTokens, RevokeToken).
async fn token_grpc(cmd: TokenCommand, addr: &str, target: &TokenTarget) -> Result<()> {
    let token = target
        .token
        .as_deref()
        .ok_or_else(|| anyhow!("--grpc-addr needs an admin token in AGENTHUB_TOKEN"))?;
    let mut c = connect_with_ca(addr, token, target.ca_file.as_deref())
        .await
        .with_context(|| format!("connect to {addr}"))?;
    match cmd {
        TokenCommand::Issue { agent, role, .. } => {
            let role = issue_role(&agent, role.as_deref())?;
            let resp = c
                .issue_token(pb::IssueTokenRequest {
                    role: role.as_str().to_string(),
                    agent_id: agent.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?;
            println!("{}", resp.get_ref().token);
        }
        TokenCommand::List { .. } => {
            let resp = c
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(status_err)?;
            for t in &resp.get_ref().tokens {
                let agent = (!t.agent_id.is_empty()).then_some(&t.agent_id);
                println!(
                    "{}",
                    serde_json::json!({"id": t.id, "role": t.role, "agent_id": agent,
                        "created_at_ms": t.created_at_ms, "revoked": t.revoked})
                );
            }
        }
        TokenCommand::Revoke { id, .. } => {
            c.revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(status_err)?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn client(args: &ClientArgs) -> Result<HubClient> {
    connect_with_ca(&args.grpc_addr, &args.token, args.ca_file.as_deref())
        .await
        .with_context(|| format!("connect to {}", args.grpc_addr))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", s.code(), s.message())
}

async fn push(args: PushArgs) -> Result<()> {
    let metadata = match &args.metadata {
        Some(m) => match serde_json::from_str::<Value>(m).context("--metadata must be JSON")? {
            Value::Object(o) => Some(pb::json_to_struct(&o)),
            _ => bail!("--metadata must be a JSON object"),
        },
        None => None,
    };
    let priority = pb::Priority::from_str_name(&args.priority.to_uppercase())
        .ok_or_else(|| anyhow!("unknown priority `{}`", args.priority))?;
    let mut c = client(&args.client).await?;
    let resp = c
        .push_task(pb::PushTaskRequest {
            agent_id: args.agent.unwrap_or_default(),
            description: args.description,
            metadata,
            task_id: args.task_id.unwrap_or_default(),
            needed_capabilities: args.capabilities,
            priority: priority as i32,
            queue_if_offline: args.queue_if_offline,
            max_attempts: args.max_attempts,
            depends_on: args.depends_on,
            queue_ttl_ms: args.queue_ttl.map(|d| d.as_millis() as u64).unwrap_or(0),
            deadline_ms: args
                .deadline
                .map(|d| agenthub::model::now_ms() + d.as_millis() as i64)
                .unwrap_or(0),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let state = pb::task::State::try_from(resp.state)
        .map(|s| s.as_str_name())
        .unwrap_or("?");
    if !args.wait {
        println!(
            "{}",
            serde_json::json!({"task_id": resp.task_id, "agent_id": resp.agent_id, "state": state, "created": resp.created})
        );
        return Ok(());
    }
    let task = c
        .wait_task(pb::WaitTaskRequest {
            task_id: resp.task_id,
            timeout_ms: args.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    println!("{}", pb::task_to_json(&task));
    std::io::stdout().flush()?;
    if task.state != pb::task::State::Completed as i32 {
        std::process::exit(1);
    }
    Ok(())
}

async fn logs(args: LogsArgs) -> Result<()> {
    let mut stream = client(&args.client)
        .await?
        .watch_task_output(pb::WatchTaskOutputRequest {
            task_id: args.task_id,
            after_offset: args.offset,
            stored_only: !args.follow,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(chunk) = stream.message().await.map_err(status_err)? {
        if chunk.stream == "stderr" {
            err.write_all(chunk.data.as_bytes())?;
            err.flush()?;
        } else {
            out.write_all(chunk.data.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

async fn watch(args: WatchArgs) -> Result<()> {
    let kinds = args
        .kinds
        .iter()
        .map(|k| {
            pb::task_event::Kind::from_str_name(&k.to_uppercase())
                .map(|k| k as i32)
                .ok_or_else(|| anyhow!("unknown event kind `{k}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut c = client(&args.client).await?;
    let mut stream = c
        .watch_task_events(pb::WatchTaskEventsRequest {
            after_seq: args.after,
            task_id: args.task.unwrap_or_default(),
            agent_id: args.agent.unwrap_or_default(),
            kinds,
            log_id: None,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream.message().await.map_err(status_err)? {
        writeln!(out, "{}", pb::event_to_json(&ev))?;
        out.flush()?;
    }
    Ok(())
}

async fn tasks(cmd: TasksCommand) -> Result<()> {
    match cmd {
        TasksCommand::List {
            client: ca,
            state,
            agent,
            limit,
        } => {
            let state = match state {
                Some(s) => pb::task::State::from_str_name(&s.to_uppercase())
                    .ok_or_else(|| anyhow!("unknown state `{s}`"))?
                    as i32,
                None => 0,
            };
            let mut c = client(&ca).await?;
            let mut token = String::new();
            let mut shown = 0;
            loop {
                let page = c
                    .list_tasks(pb::ListTasksRequest {
                        state,
                        agent_id: agent.clone().unwrap_or_default(),
                        page_size: 500,
                        page_token: token,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                for t in &page.tasks {
                    if limit > 0 && shown == limit {
                        return Ok(());
                    }
                    println!("{}", pb::task_to_json(t));
                    shown += 1;
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                token = page.next_page_token;
            }
        }
        TasksCommand::Get {
            client: ca,
            task_id,
        } => {
            let t = client(&ca)
                .await?
                .get_task(pb::GetTaskRequest { task_id })
                .await
                .map_err(status_err)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&pb::task_to_json(t.get_ref()))?
            );
        }
        TasksCommand::Cancel {
            client: ca,
            task_id,
        } => {
            let t = client(&ca)
                .await?
                .cancel_task(pb::CancelTaskRequest { task_id })
                .await
                .map_err(status_err)?;
            println!("{}", pb::task_to_json(t.get_ref()));
        }
        TasksCommand::Retry {
            client: ca,
            task_id,
        } => {
            let t = client(&ca)
                .await?
                .retry_task(pb::RetryTaskRequest { task_id })
                .await
                .map_err(status_err)?;
            println!("{}", pb::task_to_json(t.get_ref()));
        }
    }
    Ok(())
}

async fn agents(args: ClientArgs) -> Result<()> {
    let resp = client(&args)
        .await?
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map_err(status_err)?;
    for a in &resp.get_ref().agents {
        println!(
            "{}",
            serde_json::json!({
                "agent_id": a.agent_id, "name": a.name, "capabilities": a.capabilities,
                "status": a.status, "connected": a.connected, "connected_at": a.connected_at,
                "presence": a.presence().as_str_name().to_ascii_lowercase(),
                "away_since_ms": a.away_since_ms,
                "active_task_ids": a.active_task_ids, "max_concurrency": a.max_concurrency,
                "resources": a.resources.as_ref().map(|r| serde_json::json!({
                    "cpu_percent": r.cpu_percent, "ram_used_bytes": r.ram_used_bytes,
                    "ram_total_bytes": r.ram_total_bytes, "vram_used_bytes": r.vram_used_bytes,
                    "vram_total_bytes": r.vram_total_bytes, "reported_at_ms": r.reported_at_ms,
                })),
            })
        );
    }
    Ok(())
}
