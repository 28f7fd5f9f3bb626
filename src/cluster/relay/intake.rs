//! The leader's side of the relay: every node's sidecar messages taken in,
//! each relayed session a [`RemoteLink`] of the leader's hub, and sessions
//! of nodes that stop sending heartbeats closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{HDR_INCARNATION, HDR_KIND, HDR_MORE, HDR_NODE, HDR_PIECE, HDR_SESSION};
use crate::cluster::nats_header as header;
use crate::cluster::{
    agent_in_subject, agent_out_subject, decode_principal, Node, HDR_PRINCIPAL, NODE_ALIVE_SUBJECT,
};
use crate::hub::Hub;
use crate::link::{AgentLink, CloseReason, FromAgent, Link, ToAgent};
use crate::ws::protocol;

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
pub(super) async fn intake(node: Arc<Node>, hub: Weak<Hub>) {
    let mut leader = node.leader.subscribe();
    loop {
        let Some(leadership) = crate::cluster::next_leadership(&mut leader).await else {
            return;
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
        let max = crate::cluster::piece_size(&client);
        while let Some((h, payload)) = rx.recv().await {
            // A frame larger than one NATS message (a task with a big
            // description) goes in pieces, put together again by `dispatch`.
            let pieces = crate::cluster::pieces(payload, max);
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
