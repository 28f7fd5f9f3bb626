//! Cluster mode (SPEC §9): several hub nodes on one NATS JetStream cluster
//! act as one hub.
//!
//! - [`log`]: the event log is a JetStream stream; every node follows it
//!   into a local copy (hot standby), and only the leader appends, fenced by
//!   the stream's expected last sequence.
//! - [`lease`]: the leader lease, a KV entry that expires unless renewed
//!   by compare-and-set.
//! - [`tunnel`]: gRPC calls made to a follower are carried to the leader
//!   over core NATS (all but `WatchTaskEvents`, which every node serves from
//!   its own copy of the log).
//! - [`relay`]: a sidecar's session stays on the node it connected to; its
//!   messages reach the leader and the leader's replies come back over core
//!   NATS subjects.
//!
//! The design and what an operator sees are in docs/cluster.md.

pub mod lease;
pub mod log;
pub mod relay;
pub mod tunnel;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use self::relay::Relay;
use crate::error::{Error, Result};
use crate::hub::Hub;

/// The stream that holds the log.
pub const STREAM: &str = "AGENTHUB_LOG";
/// Subject of event entries.
pub const EVENT_SUBJECT: &str = "agenthub.log.event";
/// Subject of term entries (a new leader's first append: it fences out the
/// previous leader; not an event, so event seqs skip its number).
pub const TERM_SUBJECT: &str = "agenthub.log.term";
/// KV bucket of the leader lease.
pub const LEASE_BUCKET: &str = "agenthub_lease";
/// KV bucket of the token set.
pub const TOKEN_BUCKET: &str = "agenthub_tokens";
/// Node heartbeats (the leader closes the sessions of a node that stops).
pub const NODE_ALIVE_SUBJECT: &str = "agenthub.node.alive";

/// Messages from the leader to the sessions on node `node`.
pub fn agent_out_subject(node: &str) -> String {
    format!("agenthub.node.{node}.out")
}

/// gRPC calls carried to the leader of `leadership` (the lease's value,
/// `node/nonce`): only that leadership listens on it, so a deposed leader
/// never takes a call meant for the next one.
pub fn rpc_subject(leadership: &str) -> String {
    format!("agenthub.rpc.{}", leadership.replace('/', "."))
}

/// Sidecar messages carried to the leader of `leadership` (as [`rpc_subject`]).
pub fn agent_in_subject(leadership: &str) -> String {
    format!("agenthub.agent.in.{}", leadership.replace('/', "."))
}

/// Forwarded calls a leader answers at once, by default.
pub const DEFAULT_MAX_FORWARDED_CALLS: usize = 4096;

/// `agenthub serve --nats ...` settings.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub urls: Vec<String>,
    pub node_id: String,
    pub replicas: usize,
    pub lease: Duration,
    /// NATS credentials file (`.creds`).
    pub creds: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// CA certificate to verify the NATS servers with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for NATS servers that require one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// While leading: forwarded calls answered at once (streams included);
    /// one more is refused with `UNAVAILABLE`.
    pub max_forwarded_calls: usize,
}

impl ClusterOptions {
    /// Options for `urls` (comma-separated) with defaults.
    pub fn new(urls: &str, node_id: &str) -> ClusterOptions {
        ClusterOptions {
            urls: split_urls(urls),
            node_id: node_id.to_string(),
            replicas: 3,
            lease: Duration::from_secs(3),
            creds: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            max_forwarded_calls: DEFAULT_MAX_FORWARDED_CALLS,
            tls_cert: None,
            tls_key: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.urls.is_empty() {
            return Err(Error::InvalidArgument(
                "--nats needs at least one URL".into(),
            ));
        }
        let valid_id = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_id {
            return Err(Error::InvalidArgument(
                "--node-id must be 1-64 letters, digits, '-' or '_'".into(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(Error::InvalidArgument(
                "--nats-replicas must be between 1 and 5".into(),
            ));
        }
        if self.lease < Duration::from_millis(500) {
            return Err(Error::InvalidArgument(
                "--lease must be at least 500ms".into(),
            ));
        }
        Ok(())
    }

    /// Connect to NATS.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("agenthub-{}", self.node_id))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)));
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| Error::InvalidArgument(format!("NATS credentials: {e}")))?;
        }
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            opts = opts.add_client_certificate(c.clone(), k.clone());
        }
        let urls: Vec<async_nats::ServerAddr> = self
            .urls
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| Error::InvalidArgument(format!("NATS URL {u}: {e}")))
            })
            .collect::<Result<_>>()?;
        tracing::info!(urls = ?self.urls, node_id = %self.node_id, "connecting to NATS");
        opts.connect(urls)
            .await
            .map_err(|e| Error::storage(format!("cannot connect to NATS: {e}")))
    }
}

/// Split `--nats` into URLs.
pub fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Who leads, as this node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderView {
    /// Node id of the current lease holder, if any.
    pub leader: Option<String>,
    /// The lease's value: the holder and a nonce of its term (a leader
    /// that restarts and wins again is a new leadership).
    pub leadership: Option<String>,
    /// Does this node hold the lease and has it fenced the log?
    pub is_self: bool,
}

/// Wait until this node leads: the leadership (lease value) it leads
/// under, or `None` once the node is gone.
pub(crate) async fn next_leadership(leader: &mut watch::Receiver<LeaderView>) -> Option<String> {
    let view = leader
        .wait_for(|v| v.is_self && v.leadership.is_some())
        .await
        .ok()?;
    view.leadership.clone()
}

/// What every part of a cluster node shares.
pub struct Node {
    pub options: ClusterOptions,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// Changes whenever the leader (or this node's part) changes.
    pub leader: watch::Sender<LeaderView>,
    /// True once the node shuts down: a leader hands its lease back.
    pub stopping: watch::Sender<bool>,
    /// The leadership (lease value) of the last term entry in the local
    /// copy: a follower has caught up with a leader once it holds that
    /// leader's term entry.
    pub applied_term: watch::Sender<Option<String>>,
    /// False while applying the log to the local copy fails (it is retried).
    pub copy_ok: watch::Sender<bool>,
    /// Ready to serve (see [`Node::not_ready`]), kept by [`track_ready`].
    pub ready: watch::Sender<bool>,
    /// Leaderships (lease values) this node has seen since it started.
    pub leaderships: std::sync::atomic::AtomicU64,
}

impl Node {
    pub async fn connect(options: ClusterOptions) -> Result<Arc<Node>> {
        options.validate()?;
        let client = options.connect().await?;
        let js = async_nats::jetstream::new(client.clone());
        Ok(Arc::new(Node {
            options,
            client,
            js,
            leader: watch::Sender::new(LeaderView::default()),
            stopping: watch::Sender::new(false),
            applied_term: watch::Sender::new(None),
            copy_ok: watch::Sender::new(true),
            ready: watch::Sender::new(false),
            leaderships: Default::default(),
        }))
    }

    pub fn node_id(&self) -> &str {
        &self.options.node_id
    }

    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_self
    }

    pub fn leader_id(&self) -> Option<String> {
        self.leader.borrow().leader.clone()
    }

    /// "leader" or "follower" (`/health`'s `role`).
    pub fn role(&self) -> &'static str {
        if self.is_leader() {
            "leader"
        } else {
            "follower"
        }
    }

    /// Why this node cannot serve now, or `None` when it can: it knows the
    /// current leader and, leading, its hub takes writes (`writable`) or,
    /// following, its copy holds the leader's term entry and applies the
    /// log without failing.
    pub fn not_ready(&self, writable: bool) -> Option<&'static str> {
        let view = self.leader.borrow().clone();
        let Some(leadership) = view.leadership else {
            return Some("no cluster leader (an election is under way)");
        };
        if view.is_self {
            return (!writable).then_some("taking over as the cluster leader");
        }
        if self.applied_term.borrow().as_deref() != Some(leadership.as_str())
            || !*self.copy_ok.borrow()
        {
            return Some("the local copy of the log is catching up");
        }
        None
    }

    /// The most a call waits for a leader (about 2 × the lease), capped
    /// by the caller's own deadline.
    pub fn leader_wait(&self, deadline: Option<Duration>) -> Duration {
        let cap = self.options.lease * 2;
        deadline.map_or(cap, |d| d.min(cap))
    }

    /// Wait up to `limit` for this node to be ready. False: it is not.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        let ready = tokio::time::timeout(limit, rx.wait_for(|r| *r)).await;
        matches!(ready, Ok(Ok(_)))
    }

    /// Who leads now, as the lease says (counted when it is a leadership
    /// this node had not seen).
    pub fn see_leader(&self, next: LeaderView) {
        self.leader.send_if_modified(|v| {
            if next.leadership.is_some() && v.leadership != next.leadership {
                self.leaderships
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let changed = *v != next;
            *v = next;
            changed
        });
    }

    /// This node does not lead, and who does is unknown until the lease is
    /// read again.
    pub fn forget_leader(&self) {
        self.leader.send_modify(|v| *v = LeaderView::default());
    }

    /// Shutting down: stop leading and hand the lease back, so another node
    /// takes over at once rather than after the lease (waits up to `limit`).
    pub async fn stop(&self, limit: Duration) {
        self.stopping.send_replace(true);
        let mut view = self.leader.subscribe();
        let _ = tokio::time::timeout(limit, view.wait_for(|v| !v.is_self)).await;
    }
}

/// A hub's part in the cluster: this node and the relay its sidecar
/// sessions go through. The hub holds it as a [`crate::hub::Cluster`].
pub struct Member {
    pub node: Arc<Node>,
    pub relay: Arc<Relay>,
}

impl crate::hub::Cluster for Member {
    fn node_id(&self) -> &str {
        self.node.node_id()
    }

    fn leader_id(&self) -> Option<String> {
        self.node.leader_id()
    }

    fn is_leader(&self) -> bool {
        self.node.is_leader()
    }

    fn role(&self) -> &'static str {
        self.node.role()
    }

    fn not_ready(&self, writable: bool) -> Option<&'static str> {
        self.node.not_ready(writable)
    }

    fn leaderships(&self) -> u64 {
        self.node
            .leaderships
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Cluster mode's handles on a hub that is a [`Member`] (the hub itself
/// knows only the [`crate::hub::Cluster`] calls it makes).
impl Hub {
    /// Cluster mode: the session relay.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.member().map(|m| &m.relay)
    }

    /// Cluster mode: this node.
    pub fn cluster_node(&self) -> Option<&Arc<Node>> {
        self.member().map(|m| &m.node)
    }

    fn member(&self) -> Option<&Member> {
        let cluster: &dyn std::any::Any = &**self.cluster()?;
        cluster.downcast_ref()
    }
}

/// Keep [`Node::ready`] equal to what `not_ready` says, with the hub's
/// writability from `writable` (checked on every change of leader or copy,
/// and every 20 ms: a leader's hub takes writes a moment after it won).
pub async fn track_ready(node: Arc<Node>, writable: impl Fn() -> Option<bool> + Send + 'static) {
    let mut leader = node.leader.subscribe();
    let mut applied = node.applied_term.subscribe();
    let mut copy = node.copy_ok.subscribe();
    loop {
        let Some(w) = writable() else { return };
        let ready = node.not_ready(w).is_none();
        node.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
        tokio::select! {
            _ = leader.changed() => {}
            _ = applied.changed() => {}
            _ = copy.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// A principal a follower verified at the edge, carried to the leader with
/// a forwarded call or relayed identify instead of the token (which never
/// crosses NATS). The leader's authentication takes it as verified: only
/// the cluster's own forwarding puts it on a request.
#[derive(Clone, Debug)]
pub struct Forwarded(pub crate::auth::Principal);

/// Header carrying a [`Forwarded`] principal: `role/token_id/agent_id`.
pub(crate) const HDR_PRINCIPAL: &str = "Agenthub-Principal";

pub(crate) fn encode_principal(p: &crate::auth::Principal) -> String {
    format!(
        "{}/{}/{}",
        p.role.as_str(),
        p.token_id,
        p.agent_id.as_deref().unwrap_or("")
    )
}

pub(crate) fn decode_principal(s: &str) -> Option<crate::auth::Principal> {
    let mut parts = s.splitn(3, '/');
    let role = crate::model::Role::parse(parts.next()?)?;
    let token_id = parts.next()?.to_string();
    let agent_id = parts.next().filter(|a| !a.is_empty()).map(str::to_string);
    Some(crate::auth::Principal {
        token_id,
        role,
        agent_id,
    })
}

/// The most payload bytes one NATS message carries: the server's
/// `max_payload`, less room for headers. A log append must fit in it; a
/// larger relayed frame or answer goes in pieces of this size.
pub(crate) fn piece_size(client: &async_nats::Client) -> usize {
    client
        .server_info()
        .max_payload
        .saturating_sub(4096)
        .max(4096)
}

/// `data` in pieces of at most `max` bytes (one, possibly empty, if it fits).
pub(crate) fn pieces(mut data: bytes::Bytes, max: usize) -> Vec<bytes::Bytes> {
    let mut out = Vec::with_capacity(data.len() / max + 1);
    while data.len() > max {
        out.push(data.split_to(max));
    }
    out.push(data);
    out
}

/// A NATS message header's value, or "" when it is absent.
pub(crate) fn nats_header<'a>(h: &'a Option<async_nats::HeaderMap>, name: &str) -> &'a str {
    h.as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or("")
}

/// A NATS error as a storage error.
pub(crate) fn nats_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::storage(format!("{what}: {e}"))
}

/// Run `fut` to completion from synchronous code (the store's reads and
/// token writes are blocking calls; NATS is async).
pub(crate) fn block_on<F>(rt: &tokio::runtime::Handle, fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| rt.block_on(fut))
        }
        Ok(_) => std::thread::scope(|s| {
            s.spawn(|| rt.block_on(fut))
                .join()
                .expect("blocking NATS call panicked")
        }),
        Err(_) => rt.block_on(fut),
    }
}
