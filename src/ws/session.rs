//! One sidecar socket: a reader (this task) and a writer task joined by the
//! session's bounded outbound queue. The reader parses frames and calls the
//! hub; the writer sends queued frames, WebSocket pings, and the close frame.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::hub::session::{SessionCtl, SessionHandle};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::now_ms;
use crate::ws::limits::{Admission, CLOSE_REVOKED, CLOSE_TOO_MANY_FAILURES};
use crate::ws::protocol::{self, Inbound};

/// Close code for a message over the size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a socket that did not identify in time.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code when the hub shuts down or a peer stops answering pings.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Drive one upgraded socket until it closes.
pub async fn run(
    socket: WebSocket,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
    mut admission: Admission,
) {
    Metrics::inc(&hub.metrics().ws_connections);
    let cfg = hub.config().clone();
    let (handle, out_rx, ctl) = SessionHandle::new(cfg.outbound_queue);
    let (sink, mut stream) = socket.split();
    let last_seen = Arc::new(AtomicI64::new(now_ms()));
    let writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        ctl.clone(),
        last_seen.clone(),
        cfg.ws_ping_interval,
        cfg.ws_ping_timeout,
    ));

    let identify_deadline = tokio::time::sleep(cfg.identify_timeout);
    tokio::pin!(identify_deadline);
    let mut agent_id: Option<String> = None;
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            _ = &mut identify_deadline, if agent_id.is_none() => {
                handle.close(CLOSE_POLICY, "identify timeout");
                break;
            }
            _ = ctl.closed() => break,
            _ = shutdown.changed() => {
                handle.close(CLOSE_GOING_AWAY, "hub shutting down");
                break;
            }
            _ = admission.revoked() => {
                handle.close(CLOSE_REVOKED, "token revoked");
                break;
            }
        };
        last_seen.store(now_ms(), Ordering::Relaxed);
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                handle.send(protocol::error(
                    "invalid_json",
                    None,
                    Some("binary frames are not supported; send JSON text"),
                ));
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(e)) => {
                if let Some((code, reason)) = crate::ws::close::close_code_for(&e) {
                    handle.close(code, reason);
                }
                break;
            }
        };
        match protocol::parse(&text) {
            Err(e) => {
                handle.send(protocol::error(e.code, None, Some(&e.detail)));
            }
            Ok(Inbound::Ping) if agent_id.is_some() => {
                handle.send(protocol::pong(now_ms()));
            }
            Ok(Inbound::Identify(ident)) => {
                if agent_id.is_some() {
                    handle.send(protocol::error(
                        "invalid_message",
                        None,
                        Some("this socket is already identified"),
                    ));
                    continue;
                }
                match hub.identify(&ident, &handle) {
                    Ok(id) => {
                        agent_id = Some(id);
                        admission.identified(&hub, &ident.token);
                    }
                    Err(e) => {
                        handle.send(protocol::error(e.ws_code(), None, None));
                        if admission.failed_identify(&e) {
                            handle.close(CLOSE_TOO_MANY_FAILURES, "too many failed identifies");
                            break;
                        }
                    }
                }
            }
            Ok(report) => match &agent_id {
                Some(agent) => hub.report(agent, &handle, report),
                None => {
                    handle.send(protocol::error("not_identified", None, None));
                }
            },
        }
    }
    if let Some(agent) = &agent_id {
        hub.session_closed(agent, handle.id);
    }
    // Let the writer flush what is queued and send the close frame.
    if ctl.close_reason().is_none() {
        handle.close(1000, "");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<String>,
    ctl: Arc<SessionCtl>,
    last_seen: Arc<AtomicI64>,
    ping_interval: Duration,
    ping_timeout: Duration,
) {
    let mut ping = tokio::time::interval(ping_interval);
    ping.tick().await;
    let silent_limit = (ping_interval + ping_timeout).as_millis() as i64;
    loop {
        tokio::select! {
            msg = out.recv() => match msg {
                Some(text) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            _ = ping.tick() => {
                if now_ms() - last_seen.load(Ordering::Relaxed) > silent_limit {
                    ctl_close(&ctl, CLOSE_GOING_AWAY, "ping timeout");
                    break;
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            _ = ctl.closed() => break,
        }
    }
    // Flush what was queued before the close was asked for (e.g. `session_replaced`).
    while let Ok(text) = out.try_recv() {
        if sink.feed(Message::Text(text.into())).await.is_err() {
            return;
        }
    }
    let reason = ctl.close_reason();
    let frame = reason.map(|r| CloseFrame {
        code: r.code,
        reason: r.reason.into(),
    });
    let _ = sink.send(Message::Close(frame)).await;
    let _ = sink.close().await;
}

fn ctl_close(ctl: &SessionCtl, code: u16, reason: &'static str) {
    ctl.request_close(code, reason);
}
