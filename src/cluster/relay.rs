//! Sidecar sessions across nodes.
//!
//! A sidecar's WebSocket stays on the node it connected to. That node
//! relays the sidecar's messages (as the JSON text it sent) to the leader on
//! the subject of the leadership it identified with ([`agent_in_subject`]:
//! a deposed leader never takes the next one's); the leader's hub sees the session as a
//! [`RemoteLink`] and its messages and closes go back on the node's
//! [`agent_out_subject`]. A session that identifies on the leader itself
//! talks to its hub directly.
//!
//! An identify that arrives while the node is not ready (an election under
//! way) waits for a leader (at most about 2 × the lease). When the
//! leadership changes, every node closes its relayed sessions once, with
//! close code 1012 ("service restart"), after the new leader is known (a
//! lease that lapses and comes back to the same leadership closes nothing):
//! the sidecars reconnect (to any node), identify with the new leader and
//! resend what it has not acked.
//! Within the reconnect grace they keep their tasks. The leader closes the
//! sessions of a node that stops sending heartbeats for a lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{
    agent_in_subject, agent_out_subject, decode_principal, encode_principal, Node, HDR_PRINCIPAL,
    NODE_ALIVE_SUBJECT,
};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::link::{AgentLink, CloseReason, FromAgent, Link, ToAgent};
use crate::ws::protocol;

const HDR_NODE: &str = "Agenthub-Node";
const HDR_INCARNATION: &str = "Agenthub-Incarnation";
const HDR_SESSION: &str = "Agenthub-Session";
const HDR_KIND: &str = "Agenthub-Kind";
/// On every piece but the last of a message too large for one NATS message.
const HDR_MORE: &str = "Agenthub-More";
/// On every piece of a message sent in pieces: its index, from 0.
const HDR_PIECE: &str = "Agenthub-Piece";

/// Reports of one relayed session the leader queues for its hub, and their
/// bytes (at least one report): a direct session's bounds
/// ([`crate::ws::session::MAX_REPORTS_IN_FLIGHT`]). Past them, a report is
/// answered `storage_unavailable` (kept and sent again). The intake reads
/// every session's messages in one loop, so a burst of one session (a
/// sidecar answering many assignments at once) is queued before its worker
/// runs: the bound must hold a busy sidecar's burst, not only a flood.
const MAX_QUEUED_REPORTS: usize = crate::ws::session::MAX_REPORTS_IN_FLIGHT;
const MAX_QUEUED_REPORT_BYTES: usize = crate::ws::session::MAX_REPORT_BYTES_IN_FLIGHT;
/// Messages the leader queues for one node's sidecars. A session whose
/// message finds it full is closed, as a sidecar that stops reading is.
const MAX_QUEUED_TO_NODE: usize = 8192;

/// How long an identify waits for the leader's answer.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// The node side: this node's relayed sessions.
pub struct Relay {
    node: Arc<Node>,
    hub: Weak<Hub>,
    /// Changes at every start of the process: sessions of an earlier run
    /// of the same node are never confused with this run's.
    incarnation: String,
    /// Each session and the leadership it identified with (its frames go
    /// to that leader only).
    sessions: Mutex<HashMap<u64, (Link, String)>>,
    /// Sessions that identified while this node led: they talk to this
    /// node's hub directly, without a trip through NATS.
    direct: Mutex<std::collections::HashSet<u64>>,
}

impl Relay {
    /// Start relaying for `hub` on `node`: the dispatcher of messages from
    /// the leader, heartbeats, the leader-change watcher and (while this
    /// node leads) the intake of every node's sidecar messages.
    pub fn start(node: Arc<Node>, hub: &Arc<Hub>) -> Arc<Relay> {
        let relay = Arc::new(Relay {
            node: node.clone(),
            hub: Arc::downgrade(hub),
            direct: Mutex::new(Default::default()),
            incarnation: hex::encode(rand::random::<[u8; 6]>()),
            sessions: Mutex::new(HashMap::new()),
        });
        tokio::spawn(dispatch(relay.clone()));
        tokio::spawn(heartbeat(relay.clone()));
        tokio::spawn(watch_leader(relay.clone()));
        tokio::spawn(intake(node, Arc::downgrade(hub)));
        relay
    }

    fn headers(&self, session: u64, kind: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HDR_NODE, self.node.node_id());
        h.insert(HDR_INCARNATION, self.incarnation.as_str());
        h.insert(HDR_SESSION, session.to_string().as_str());
        h.insert(HDR_KIND, kind);
        h
    }

    /// Identify a session with the leader. `text`: the `identify` frame as
    /// the sidecar sent it. Returns the agent id and whether the session is
    /// relayed (false: this node leads, and the session talks to its hub).
    pub async fn identify(&self, text: &str, link: &Link) -> Result<(String, bool)> {
        let started = Instant::now();
        let limit = self.node.leader_wait(Some(IDENTIFY_TIMEOUT));
        loop {
            match self.identify_once(text, link).await {
                // No leader listened (an election, or it is taking over):
                // wait for the next within the limit.
                Ok(None) if started.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(None) => return Err(Error::ShuttingDown),
                Ok(Some(identified)) => return Ok(identified),
                Err(e) => return Err(e),
            }
        }
    }

    /// One try; `None` if no leader listened.
    async fn identify_once(&self, text: &str, link: &Link) -> Result<Option<(String, bool)>> {
        // Authenticate at the edge, against the replicated token set: the
        // leader gets the principal, the token never crosses NATS.
        let (Some(hub), Ok(FromAgent::Identify(ident))) =
            (self.hub.upgrade(), protocol::parse(text))
        else {
            return Err(Error::ShuttingDown);
        };
        let principal = hub
            .verifier()
            .verify(&ident.token)
            .map_err(|_| Error::InvalidToken)?;
        let limit = self.node.leader_wait(Some(IDENTIFY_TIMEOUT));
        if !self.node.wait_ready(limit).await {
            return Err(Error::ShuttingDown);
        }
        let Some(leadership) = self.node.leader.borrow().leadership.clone() else {
            return Ok(None);
        };
        let session = link.id();
        self.sessions
            .lock()
            .expect("sessions")
            .insert(session, (link.clone(), leadership.clone()));
        if self.node.is_leader() {
            return match hub.identify_as(principal, &ident, link) {
                Ok(agent) => {
                    self.direct.lock().expect("direct").insert(session);
                    Ok(Some((agent, false)))
                }
                Err(e) => {
                    self.forget(session);
                    Err(e)
                }
            };
        }
        let mut headers = self.headers(session, "identify");
        headers.insert(HDR_PRINCIPAL, encode_principal(&principal).as_str());
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(Bytes::from(without_token(text)))
            .timeout(Some(IDENTIFY_TIMEOUT));
        let reply = self
            .node
            .client
            .send_request(agent_in_subject(&leadership), request)
            .await;
        let answer = match reply {
            Ok(m) => String::from_utf8_lossy(&m.payload).to_string(),
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                self.forget(session);
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "no leader answered an identify");
                self.forget(session);
                return Err(Error::ShuttingDown);
            }
        };
        match answer.split_once(':') {
            Some(("ok", agent)) => Ok(Some((agent.to_string(), true))),
            Some(("err", code)) => {
                self.forget(session);
                Err(error_from_code(code))
            }
            _ => {
                self.forget(session);
                Err(Error::ShuttingDown)
            }
        }
    }

    /// Relay one frame of an identified session. On failure, the error
    /// frame to send back (the frame did not reach the leader).
    pub async fn frame(&self, session: u64, text: &str) -> std::result::Result<(), ToAgent> {
        let Some(subject) = self.subject(session) else {
            // Closed for a change of leader a moment ago: the close follows.
            return Ok(());
        };
        self.node
            .client
            .publish_with_headers(
                subject,
                self.headers(session, "frame"),
                Bytes::from(without_token(text)),
            )
            .await
            .map_err(|e| {
                if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
                    // Resending it as it is would fail again.
                    ToAgent::error(
                        "invalid_message",
                        None,
                        Some(format!(
                            "the message is {} bytes, more than this node relays to the leader ({})",
                            text.len(),
                            self.node.client.server_info().max_payload
                        )),
                    )
                } else {
                    // Keep it and send it again (as after any storage fault).
                    ToAgent::error(
                        "storage_unavailable",
                        None,
                        Some(format!("cannot relay to the leader: {e}")),
                    )
                }
            })
    }

    /// The session's socket closed.
    pub async fn closed(&self, session: u64) {
        let subject = self.subject(session);
        if let (true, Some(subject)) = (self.forget(session), subject) {
            let _ = self
                .node
                .client
                .publish_with_headers(subject, self.headers(session, "closed"), Bytes::new())
                .await;
        }
    }

    /// The subject of the leader a session identified with.
    fn subject(&self, session: u64) -> Option<String> {
        self.sessions
            .lock()
            .expect("sessions")
            .get(&session)
            .map(|(_, l)| agent_in_subject(l))
    }

    fn forget(&self, session: u64) -> bool {
        if self.direct.lock().expect("direct").remove(&session) {
            self.sessions.lock().expect("sessions").remove(&session);
            return false;
        }
        self.sessions
            .lock()
            .expect("sessions")
            .remove(&session)
            .is_some()
    }

    /// Close every relayed session (the leadership changed).
    fn close_all(&self, why: CloseReason) {
        let sessions: Vec<Link> = self
            .sessions
            .lock()
            .expect("sessions")
            .drain()
            .map(|(_, (l, _))| l)
            .collect();
        self.direct.lock().expect("direct").clear();
        if !sessions.is_empty() {
            tracing::info!(
                sessions = sessions.len(),
                "leadership changed: closing relayed sessions"
            );
        }
        for l in sessions {
            l.close(why);
        }
    }
}

/// A sidecar frame as relayed: without any `token` field (the identify's
/// is verified on this node; reports ignore it). The identify keeps a
/// placeholder, as the frame's format requires one.
fn without_token(text: &str) -> String {
    if !text.contains("token") {
        return text.to_string();
    }
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_str::<serde_json::Value>(text)
    else {
        return text.to_string();
    };
    if obj.remove("token").is_none() {
        return text.to_string();
    }
    if obj.get("type").and_then(|t| t.as_str()) == Some("identify") {
        obj.insert("token".into(), "verified-at-the-edge".into());
    }
    serde_json::Value::Object(obj).to_string()
}

/// The hub error behind a sidecar `error` code (identify answers).
fn error_from_code(code: &str) -> Error {
    match code {
        "invalid_token" => Error::InvalidToken,
        "token_agent_mismatch" => Error::TokenAgentMismatch,
        "invalid_message" => Error::InvalidArgument("invalid identify".into()),
        _ => Error::ShuttingDown,
    }
}

fn header<'a>(h: &'a Option<HeaderMap>, name: &str) -> &'a str {
    h.as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or("")
}

/// Messages from the leader to this node's sessions.
async fn dispatch(relay: Arc<Relay>) {
    let subject = agent_out_subject(relay.node.node_id());
    let mut sub = match relay.node.client.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to session messages");
            return;
        }
    };
    let mut pieces = Pieces::default();
    while let Some(msg) = sub.next().await {
        if header(&msg.headers, HDR_INCARNATION) != relay.incarnation {
            continue;
        }
        let Ok(session) = header(&msg.headers, HDR_SESSION).parse::<u64>() else {
            continue;
        };
        let index = header(&msg.headers, HDR_PIECE).parse::<u32>().unwrap_or(0);
        let more = !header(&msg.headers, HDR_MORE).is_empty();
        let Some(payload) = pieces.add(session, index, more, msg.payload) else {
            continue;
        };
        let link = relay
            .sessions
            .lock()
            .expect("sessions")
            .get(&session)
            .map(|(l, _)| l.clone());
        let Some(link) = link else { continue };
        match header(&msg.headers, HDR_KIND) {
            "close" => {
                let why = close_reason(&String::from_utf8_lossy(&payload));
                relay.forget(session);
                link.close(why);
            }
            _ => {
                link.send(ToAgent::Relayed(
                    String::from_utf8_lossy(&payload).into_owned(),
                ));
            }
        }
    }
}

/// Frames sent in pieces, put together again per session. NATS keeps the
/// order of one publisher's messages but drops messages while a connection
/// is broken: a piece that does not follow the one before ends its frame,
/// which is dropped whole (as a lost frame is) instead of being joined to
/// the next one.
#[derive(Default)]
struct Pieces {
    /// Per session: the index of the next piece, the bytes so far, and
    /// when the frame's first piece came.
    partial: HashMap<u64, (u32, BytesMut, Instant)>,
}

/// A frame whose pieces have not all come within this is dropped (its
/// other pieces were lost, or its session ended).
const PIECES_EXPIRE: Duration = Duration::from_secs(30);

impl Pieces {
    /// Add piece `index` of a frame for `session` (`more`: pieces follow).
    /// The whole frame once its last piece is in.
    fn add(&mut self, session: u64, index: u32, more: bool, piece: Bytes) -> Option<Bytes> {
        if index == 0 {
            self.partial
                .retain(|_, (_, _, since)| since.elapsed() < PIECES_EXPIRE);
        }
        let held = self.partial.remove(&session);
        let (mut frame, since) = match (index, held) {
            (0, _) if !more => return Some(piece),
            (0, _) => (BytesMut::new(), Instant::now()),
            (i, Some((next, frame, since))) if i == next => (frame, since),
            // A piece of a frame whose earlier pieces were lost.
            _ => return None,
        };
        frame.extend_from_slice(&piece);
        if more {
            self.partial.insert(session, (index + 1, frame, since));
            None
        } else {
            Some(frame.freeze())
        }
    }
}

async fn heartbeat(relay: Arc<Relay>) {
    let every = relay.node.options.lease / 3;
    loop {
        let mut h = HeaderMap::new();
        h.insert(HDR_NODE, relay.node.node_id());
        h.insert(HDR_INCARNATION, relay.incarnation.as_str());
        let _ = relay
            .node
            .client
            .publish_with_headers(NODE_ALIVE_SUBJECT, h, Bytes::new())
            .await;
        tokio::time::sleep(every).await;
    }
}

/// Close the relayed sessions once the next leader is known: a moment
/// without a known leader (a lease read that failed, a renewal late) that
/// ends with the same leadership closes nothing.
async fn watch_leader(relay: Arc<Relay>) {
    let mut rx = relay.node.leader.subscribe();
    let mut current = rx.borrow_and_update().leadership.clone();
    while rx.changed().await.is_ok() {
        let Some(next) = rx.borrow_and_update().leadership.clone() else {
            continue;
        };
        if current.as_ref() != Some(&next) {
            if current.is_some() {
                relay.close_all(CloseReason::LeaderChanged);
            }
            current = Some(next);
        }
    }
}

/// A session on another node (or this one), as the leader's hub sees it.
pub struct RemoteLink {
    id: u64,
    session: u64,
    incarnation: String,
    out: mpsc::Sender<(HeaderMap, Bytes)>,
    gone: std::sync::atomic::AtomicBool,
}

impl RemoteLink {
    fn post(&self, kind: &str, payload: Bytes) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return false;
        }
        match self.out.try_send((self.headers(kind), payload)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The node's queue is full: close this session, as a
                // sidecar that stops reading is (the close waits for room;
                // the node then says "closed" and the hub lets it go).
                self.gone.store(true, Ordering::Release);
                tracing::warn!(
                    session = self.session,
                    "the queue to this session's node is full; closing the session"
                );
                let (out, h) = (self.out.clone(), self.headers("close"));
                tokio::spawn(async move {
                    let why = Bytes::from(CloseReason::QueueFull.as_str());
                    let _ = out.send((h, why)).await;
                });
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn headers(&self, kind: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HDR_INCARNATION, self.incarnation.as_str());
        h.insert(HDR_SESSION, self.session.to_string().as_str());
        h.insert(HDR_KIND, kind);
        h
    }
}

impl AgentLink for RemoteLink {
    fn id(&self) -> u64 {
        self.id
    }

    fn send(&self, msg: ToAgent) -> bool {
        self.post("msg", Bytes::from(protocol::encode(&msg)))
    }

    fn close(&self, why: CloseReason) {
        self.post("close", Bytes::from(why.as_str()));
        self.gone.store(true, Ordering::Release);
    }
}

/// Leader-side link ids: apart from the ids of local WebSocket sessions.
static NEXT_REMOTE_ID: AtomicU64 = AtomicU64::new(1 << 62);

struct RemoteSession {
    agent_id: String,
    link: Arc<RemoteLink>,
    frames: mpsc::Sender<(FromAgent, usize)>,
    /// Bytes of the reports in `frames`.
    queued_bytes: Arc<AtomicUsize>,
    node: String,
}

struct IntakeState {
    /// "node/incarnation/session" → session.
    sessions: HashMap<String, RemoteSession>,
    /// Per node: a publisher of its messages (in order).
    outs: HashMap<String, mpsc::Sender<(HeaderMap, Bytes)>>,
    /// Per node incarnation: last heartbeat.
    alive: HashMap<String, Instant>,
}

/// While this node leads: take every node's sidecar messages.
async fn intake(node: Arc<Node>, hub: Weak<Hub>) {
    let mut leader = node.leader.subscribe();
    loop {
        let leadership = match leader.wait_for(|v| v.is_self).await {
            Ok(view) => view.leadership.clone(),
            Err(_) => return,
        };
        let Some(leadership) = leadership else {
            continue;
        };
        let state = Arc::new(Mutex::new(IntakeState {
            sessions: HashMap::new(),
            outs: HashMap::new(),
            alive: HashMap::new(),
        }));
        let Ok(mut sub) = node.client.subscribe(agent_in_subject(&leadership)).await else {
            continue;
        };
        let Ok(mut alive) = node.client.subscribe(NODE_ALIVE_SUBJECT).await else {
            continue;
        };
        // Messages wait in the subscription until the hub takes writes.
        node.wait_ready(node.options.lease * 2).await;
        tracing::info!("taking sidecar messages from every node");
        let mut sweep = tokio::time::interval(node.options.lease / 2);
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    let Some(hub) = hub.upgrade() else { return };
                    on_agent_message(&node, &hub, &state, msg).await;
                }
                beat = alive.next() => {
                    let Some(beat) = beat else { break };
                    let key = format!(
                        "{}/{}",
                        header(&beat.headers, HDR_NODE),
                        header(&beat.headers, HDR_INCARNATION)
                    );
                    state.lock().expect("intake").alive.insert(key, Instant::now());
                }
                _ = sweep.tick() => {
                    let Some(hub) = hub.upgrade() else { return };
                    sweep_dead_nodes(&node, &hub, &state);
                }
                changed = leader.changed() => {
                    if changed.is_err() || !leader.borrow().is_self {
                        break;
                    }
                }
            }
        }
        let _ = sub.unsubscribe().await;
        let _ = alive.unsubscribe().await;
        // Stepped down: the sessions' nodes close them and they identify
        // with the next leader.
        let sessions: Vec<RemoteSession> = state
            .lock()
            .expect("intake")
            .sessions
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in sessions {
            s.link.gone.store(true, Ordering::Release);
        }
        tracing::info!("no longer taking sidecar messages");
    }
}

fn sweep_dead_nodes(node: &Node, hub: &Arc<Hub>, state: &Mutex<IntakeState>) {
    let limit = node.options.lease;
    let dead: Vec<RemoteSession> = {
        let mut st = state.lock().expect("intake");
        let alive = st.alive.clone();
        let keys: Vec<String> = st
            .sessions
            .iter()
            .filter(|(key, _)| {
                let node_inc = key.rsplit_once('/').map(|(n, _)| n).unwrap_or("");
                alive.get(node_inc).is_none_or(|t| t.elapsed() >= limit)
            })
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| st.sessions.remove(k)).collect()
    };
    for s in dead {
        tracing::warn!(agent_id = %s.agent_id, node = %s.node, "node stopped sending heartbeats; its session is closed");
        s.link.gone.store(true, Ordering::Release);
        hub.session_closed(&s.agent_id, s.link.id);
    }
}

fn out_for(node: &Node, state: &mut IntakeState, target: &str) -> mpsc::Sender<(HeaderMap, Bytes)> {
    if let Some(tx) = state.outs.get(target) {
        if !tx.is_closed() {
            return tx.clone();
        }
    }
    let (tx, mut rx) = mpsc::channel::<(HeaderMap, Bytes)>(MAX_QUEUED_TO_NODE);
    let client = node.client.clone();
    let subject = agent_out_subject(target);
    tokio::spawn(async move {
        let max = super::piece_size(&client);
        while let Some((h, payload)) = rx.recv().await {
            // A frame larger than one NATS message (a task with a big
            // description) goes in pieces, put together again by `dispatch`.
            let pieces = super::pieces(payload, max);
            let last = pieces.len() - 1;
            for (i, piece) in pieces.into_iter().enumerate() {
                let mut h = h.clone();
                if last > 0 {
                    h.insert(HDR_PIECE, i.to_string().as_str());
                }
                if i < last {
                    h.insert(HDR_MORE, "1");
                }
                let _ = client.publish_with_headers(subject.clone(), h, piece).await;
            }
        }
    });
    state.outs.insert(target.to_string(), tx.clone());
    tx
}

async fn on_agent_message(
    node: &Node,
    hub: &Arc<Hub>,
    state: &Arc<Mutex<IntakeState>>,
    msg: async_nats::Message,
) {
    let from = header(&msg.headers, HDR_NODE).to_string();
    let incarnation = header(&msg.headers, HDR_INCARNATION).to_string();
    let Ok(session) = header(&msg.headers, HDR_SESSION).parse::<u64>() else {
        return;
    };
    let key = format!("{from}/{incarnation}/{session}");
    let text = String::from_utf8_lossy(&msg.payload).into_owned();
    state
        .lock()
        .expect("intake")
        .alive
        .insert(format!("{from}/{incarnation}"), Instant::now());
    match header(&msg.headers, HDR_KIND) {
        "identify" => {
            let answer = match protocol::parse(&text) {
                Ok(FromAgent::Identify(ident)) => 'identify: {
                    // The node the sidecar is on verified its token.
                    let Some(principal) = decode_principal(header(&msg.headers, HDR_PRINCIPAL))
                    else {
                        break 'identify "err:invalid_token".to_string();
                    };
                    let out = out_for(node, &mut state.lock().expect("intake"), &from);
                    let link = Arc::new(RemoteLink {
                        id: NEXT_REMOTE_ID.fetch_add(1, Ordering::Relaxed),
                        session,
                        incarnation: incarnation.clone(),
                        out,
                        gone: Default::default(),
                    });
                    let dyn_link: Link = link.clone();
                    match hub.identify_as(principal, &ident, &dyn_link) {
                        Ok(agent_id) => {
                            let (tx, rx) = mpsc::channel(MAX_QUEUED_REPORTS);
                            let queued_bytes = Arc::new(AtomicUsize::new(0));
                            tokio::spawn(report_worker(
                                Arc::downgrade(hub),
                                agent_id.clone(),
                                dyn_link,
                                rx,
                                queued_bytes.clone(),
                            ));
                            let old = state.lock().expect("intake").sessions.insert(
                                key,
                                RemoteSession {
                                    agent_id: agent_id.clone(),
                                    link,
                                    frames: tx,
                                    queued_bytes,
                                    node: from.clone(),
                                },
                            );
                            if let Some(old) = old {
                                hub.session_closed(&old.agent_id, old.link.id);
                            }
                            format!("ok:{agent_id}")
                        }
                        Err(e) => format!("err:{}", e.ws_code()),
                    }
                }
                _ => "err:invalid_message".to_string(),
            };
            if let Some(reply) = msg.reply {
                let _ = node.client.publish(reply, answer.into()).await;
            }
        }
        "frame" => {
            let sender = state
                .lock()
                .expect("intake")
                .sessions
                .get(&key)
                .map(|s| (s.frames.clone(), s.link.clone(), s.queued_bytes.clone()));
            match (sender, protocol::parse(&text)) {
                (Some((tx, link, queued)), Ok(report)) => {
                    let len = text.len();
                    let before = queued.fetch_add(len, Ordering::AcqRel);
                    let refused = if before > 0 && before + len > MAX_QUEUED_REPORT_BYTES {
                        Some(report)
                    } else {
                        match tx.try_send((report, len)) {
                            Err(mpsc::error::TrySendError::Full((report, _))) => Some(report),
                            _ => None,
                        }
                    };
                    if let Some(report) = refused {
                        queued.fetch_sub(len, Ordering::AcqRel);
                        // Bounded, like a direct session: the sidecar keeps
                        // the report and sends it again.
                        let task = crate::hub::report_task_id(&report);
                        link.send(ToAgent::error(
                            "storage_unavailable",
                            task,
                            Some(format!(
                                "the leader has {MAX_QUEUED_REPORTS} reports or \
                                 {MAX_QUEUED_REPORT_BYTES} bytes of this session waiting; \
                                 send it again"
                            )),
                        ));
                    }
                }
                (Some(_), Err(_)) => {}
                (None, _) => {
                    // A session this leader never saw (it identified with
                    // an earlier one): have its node close it, so the
                    // sidecar identifies again here.
                    let out = out_for(node, &mut state.lock().expect("intake"), &from);
                    let mut h = HeaderMap::new();
                    h.insert(HDR_INCARNATION, incarnation.as_str());
                    h.insert(HDR_SESSION, session.to_string().as_str());
                    h.insert(HDR_KIND, "close");
                    let _ = out.try_send((h, Bytes::from(CloseReason::LeaderChanged.as_str())));
                }
            }
        }
        "closed" => {
            let gone = state.lock().expect("intake").sessions.remove(&key);
            if let Some(s) = gone {
                s.link.gone.store(true, Ordering::Release);
                hub.session_closed(&s.agent_id, s.link.id);
            }
        }
        _ => {}
    }
}

/// One session's reports, in order.
async fn report_worker(
    hub: Weak<Hub>,
    agent_id: String,
    link: Link,
    mut rx: mpsc::Receiver<(FromAgent, usize)>,
    queued_bytes: Arc<AtomicUsize>,
) {
    while let Some((report, len)) = rx.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        hub.report(&agent_id, &link, report, None).await;
        queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }
}

fn close_reason(name: &str) -> CloseReason {
    CloseReason::from_name(name).unwrap_or(CloseReason::Normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(p: &mut Pieces, session: u64, index: u32, more: bool, piece: &str) -> Option<String> {
        p.add(session, index, more, Bytes::from(piece.to_string()))
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn a_frame_in_pieces_is_put_together_and_a_whole_one_passes() {
        let mut p = Pieces::default();
        assert_eq!(add(&mut p, 1, 0, false, "whole").as_deref(), Some("whole"));
        assert_eq!(add(&mut p, 1, 0, true, "ab"), None);
        assert_eq!(add(&mut p, 2, 0, false, "other").as_deref(), Some("other"));
        assert_eq!(add(&mut p, 1, 1, true, "cd"), None);
        assert_eq!(add(&mut p, 1, 2, false, "ef").as_deref(), Some("abcdef"));
        assert!(p.partial.is_empty());
    }

    #[test]
    fn a_partial_frame_expires_when_its_pieces_stop_coming() {
        let mut p = Pieces::default();
        assert_eq!(add(&mut p, 1, 0, true, "ab"), None);
        assert_eq!(add(&mut p, 2, 0, true, "cd"), None);
        // Session 1's frame started long ago (its session ended, say).
        let long_ago = Instant::now() - PIECES_EXPIRE - Duration::from_secs(1);
        p.partial.get_mut(&1).unwrap().2 = long_ago;
        assert_eq!(add(&mut p, 3, 0, false, "whole").as_deref(), Some("whole"));
        assert!(!p.partial.contains_key(&1));
        assert_eq!(add(&mut p, 2, 1, false, "ef").as_deref(), Some("cdef"));
    }

    #[test]
    fn a_frame_that_lost_a_piece_is_dropped_and_never_joined_to_the_next() {
        let mut p = Pieces::default();
        // Piece 1 of 3 lost: the rest of that frame goes, the next arrives intact.
        assert_eq!(add(&mut p, 1, 0, true, "ab"), None);
        assert_eq!(add(&mut p, 1, 2, false, "ef"), None);
        assert_eq!(add(&mut p, 1, 0, false, "next").as_deref(), Some("next"));
        // The last piece lost: the next frame, whole or in pieces, is not joined to it.
        assert_eq!(add(&mut p, 1, 0, true, "ab"), None);
        assert_eq!(add(&mut p, 1, 0, false, "next").as_deref(), Some("next"));
        assert_eq!(add(&mut p, 1, 0, true, "ab"), None);
        assert_eq!(add(&mut p, 1, 0, true, "xy"), None);
        assert_eq!(add(&mut p, 1, 1, false, "z").as_deref(), Some("xyz"));
        // The first piece lost: its other pieces are dropped.
        assert_eq!(add(&mut p, 1, 1, true, "cd"), None);
        assert_eq!(add(&mut p, 1, 2, false, "ef"), None);
        assert!(p.partial.is_empty());
    }
}
