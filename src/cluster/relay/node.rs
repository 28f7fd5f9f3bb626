//! Every node's side of the relay: its sidecar sessions identified with
//! the leader, their frames sent on, and the leader's messages and closes
//! dispatched back to them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::intake::intake;
use super::{HDR_INCARNATION, HDR_KIND, HDR_MORE, HDR_NODE, HDR_PIECE, HDR_SESSION};
use crate::cluster::nats_header as header;
use crate::cluster::{
    agent_in_subject, agent_out_subject, encode_principal, Node, HDR_PRINCIPAL, NODE_ALIVE_SUBJECT,
};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::link::{CloseReason, FromAgent, Link, ToAgent};
use crate::ws::protocol;

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
