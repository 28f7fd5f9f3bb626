//! One sidecar socket: a reader (this task) and a writer task joined by the
//! session's bounded outbound queue. The reader parses frames and calls the
//! hub; the writer encodes queued [`ToAgent`] messages, sends WebSocket pings
//! and the close frame. This function owns both: it ends the writer (or
//! aborts it when a write hangs) before it returns, so no task outlives the
//! session and the TCP connection is closed when it returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::hub::Hub;
use crate::link::{AgentLink, CloseReason, FromAgent, Link, ToAgent};
use crate::model::now_ms;
use crate::ws::close;
use crate::ws::limits::{self, Admission};
use crate::ws::protocol;

/// Close code for a message over the size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a socket that did not identify in time or let its queue fill.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code when the hub shuts down or a peer stops answering pings.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code when a cluster's leadership changed: reconnect and identify again.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
/// Close code for a socket replaced by a newer identify for the same agent.
pub const CLOSE_SESSION_REPLACED: u16 = 4000;

/// The close code and reason text for a [`CloseReason`].
pub fn close_code(why: CloseReason) -> (u16, &'static str) {
    match why {
        CloseReason::Normal => (1000, ""),
        CloseReason::SessionReplaced => (CLOSE_SESSION_REPLACED, "session replaced"),
        CloseReason::QueueFull => (CLOSE_POLICY, "outbound queue full"),
        CloseReason::IdentifyTimeout => (CLOSE_POLICY, "identify timeout"),
        CloseReason::TooBig => (CLOSE_TOO_BIG, "message too big"),
        CloseReason::PingTimeout => (CLOSE_GOING_AWAY, "ping timeout"),
        CloseReason::ShuttingDown => (CLOSE_GOING_AWAY, "hub shutting down"),
        CloseReason::ProtocolError => (close::CLOSE_PROTOCOL_ERROR, "protocol error"),
        CloseReason::InvalidPayload => (close::CLOSE_INVALID_PAYLOAD, "invalid UTF-8"),
        CloseReason::TokenRevoked => (limits::CLOSE_REVOKED, "token revoked"),
        CloseReason::TooManyFailedIdentifies => (
            limits::CLOSE_TOO_MANY_FAILURES,
            "too many failed identifies",
        ),
        CloseReason::LeaderChanged => (CLOSE_SERVICE_RESTART, "leader changed; reconnect"),
    }
}

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// Reports one session may have received and not yet seen committed; at
/// the limit it stops reading its socket (TCP pushes back on the sidecar).
pub const MAX_REPORTS_IN_FLIGHT: usize = 1024;
/// The same bound in bytes of the frames.
pub const MAX_REPORT_BYTES_IN_FLIGHT: usize = 1024 * 1024;

/// A session's reports whose commits are not done yet, oldest first.
#[derive(Default)]
struct InFlight {
    reports: std::collections::VecDeque<(tokio::sync::oneshot::Receiver<()>, usize)>,
    bytes: usize,
}

impl InFlight {
    /// Wait until a report of `bytes` more fits.
    async fn room_for(&mut self, bytes: usize) {
        while !self.reports.is_empty()
            && (self.reports.len() >= MAX_REPORTS_IN_FLIGHT
                || self.bytes + bytes > MAX_REPORT_BYTES_IN_FLIGHT)
        {
            self.pop().await;
        }
    }

    /// Wait until every report received so far is committed and answered
    /// (an error about a later frame never overtakes their replies).
    async fn drain(&mut self) {
        while !self.reports.is_empty() {
            self.pop().await;
        }
    }

    async fn pop(&mut self) {
        if let Some((done, bytes)) = self.reports.pop_front() {
            let _ = done.await;
            self.bytes -= bytes;
        }
    }

    fn push(&mut self, done: tokio::sync::oneshot::Receiver<()>, bytes: usize) {
        self.bytes += bytes;
        self.reports.push_back((done, bytes));
    }
}

/// A sidecar's byte rate: frames are read at most `rate` bytes a second on
/// average, after a burst of one second's worth (a token bucket on
/// `tokio::time`). Its debt is paid by not reading the socket.
struct Pace {
    rate: f64,
    credit: f64,
    at: tokio::time::Instant,
}

impl Pace {
    fn new(bytes_per_s: u64) -> Option<Pace> {
        (bytes_per_s > 0).then(|| Pace {
            rate: bytes_per_s as f64,
            credit: bytes_per_s as f64,
            at: tokio::time::Instant::now(),
        })
    }

    /// Charge a frame of `bytes`; how long to leave the socket unread.
    fn charge(&mut self, bytes: usize) -> Duration {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.credit = (self.credit + earned).min(self.rate) - bytes as f64;
        self.at = now;
        match self.credit < 0.0 {
            true => Duration::from_secs_f64(-self.credit / self.rate),
            false => Duration::ZERO,
        }
    }
}

/// Shared between the hub's handle, the reader and the writer.
struct SessionCtl {
    close: Mutex<Option<CloseReason>>,
    notify: Notify,
    /// The queue to the writer (bounded: full means the peer stopped
    /// reading). A deque behind the session's own lock rather than a tokio
    /// channel, whose padded state and first block of slots cost an idle
    /// session about 800 bytes.
    out: Mutex<Outbox>,
    out_ready: Notify,
    out_cap: usize,
}

#[derive(Default)]
struct Outbox {
    /// Boxed: an idle session keeps the deque's slots, which should be
    /// pointers, not whole messages.
    queue: VecDeque<Box<ToAgent>>,
    /// The writer takes no more messages.
    closed: bool,
    /// Every handle on the session is gone: nothing more will come.
    senders_gone: bool,
}

/// Why a message was not queued.
enum Refused {
    Full,
    Closed,
}

impl SessionCtl {
    fn new(out_cap: usize) -> SessionCtl {
        SessionCtl {
            close: Mutex::default(),
            notify: Notify::new(),
            out: Mutex::default(),
            out_ready: Notify::new(),
            out_cap,
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, msg: ToAgent) -> Result<(), Refused> {
        let mut out = self.outbox();
        if out.closed {
            return Err(Refused::Closed);
        }
        if out.queue.len() >= self.out_cap {
            return Err(Refused::Full);
        }
        out.queue.push_back(Box::new(msg));
        drop(out);
        self.out_ready.notify_one();
        Ok(())
    }

    fn try_pop(&self) -> Option<Box<ToAgent>> {
        let mut out = self.outbox();
        let msg = out.queue.pop_front();
        if out.queue.is_empty() && out.queue.capacity() > SHRINK_ABOVE {
            out.queue.shrink_to(SHRINK_ABOVE);
        }
        msg
    }

    /// The next message; `None` once every handle is gone and the queue
    /// is empty. One consumer (the writer): `notify_one` keeps a wake-up
    /// for it when it is not waiting, and the queue is read before every wait.
    async fn pop(&self) -> Option<Box<ToAgent>> {
        loop {
            let ready = self.out_ready.notified();
            if let Some(msg) = self.try_pop() {
                return Some(msg);
            }
            if self.outbox().senders_gone {
                return None;
            }
            ready.await;
        }
    }

    /// Take no more messages (those queued can still be popped).
    fn stop_taking(&self) {
        self.outbox().closed = true;
    }

    fn close_reason(&self) -> Option<CloseReason> {
        *self.close.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// First request wins.
    fn request_close(&self, why: CloseReason) {
        let mut close = self.close.lock().unwrap_or_else(|e| e.into_inner());
        if close.is_none() {
            *close = Some(why);
        }
        drop(close);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    async fn closed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.close_reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// The hub's handle on one WebSocket session.
pub struct WsLink {
    id: u64,
    /// Its queue to the writer task is in here.
    ctl: Arc<SessionCtl>,
}

impl Drop for WsLink {
    fn drop(&mut self) {
        self.ctl.outbox().senders_gone = true;
        self.ctl.out_ready.notify_one();
    }
}

impl AgentLink for WsLink {
    fn id(&self) -> u64 {
        self.id
    }

    fn send(&self, msg: ToAgent) -> bool {
        match self.ctl.push(msg) {
            Ok(()) => true,
            Err(Refused::Full) => {
                tracing::warn!(session = self.id, "outbound queue full; disconnecting");
                self.ctl.request_close(CloseReason::QueueFull);
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    fn close(&self, why: CloseReason) {
        self.ctl.request_close(why);
    }
}

/// Timeouts of one session.
#[derive(Clone, Copy)]
struct Timing {
    ping_interval: Duration,
    ping_timeout: Duration,
    /// Longest a single frame write may take before the peer is dropped.
    write_timeout: Duration,
    /// Longest the close handshake may take.
    close_timeout: Duration,
}

/// What a session starts from. Boxed by the caller: a future keeps its
/// arguments for as long as it runs, beside the locals they move into, so
/// passed by value the socket alone (368 bytes) would sit in every idle
/// session's future once per layer that passes it on.
pub struct Start {
    pub socket: WebSocket,
    pub hub: Arc<Hub>,
    pub shutdown: watch::Receiver<bool>,
    pub admission: Admission,
}

/// Drive one upgraded socket until it closes, in a `sidecar` span whose
/// `agent_id` is filled in once the socket identifies.
pub async fn run(start: Box<Start>) {
    let span = {
        let node_id = start.hub.cluster_node().map(|n| n.node_id().to_string());
        crate::telemetry::sidecar_span(None, node_id.as_deref())
    };
    run_in_span(start, span.clone()).instrument(span).await
}

async fn run_in_span(start: Box<Start>, span: tracing::Span) {
    let Start {
        socket,
        hub,
        mut shutdown,
        mut admission,
    } = *start;
    hub.metrics().ws_connections.inc();
    let _open = OpenGuard::new(hub.clone());
    // Only what the session needs: a clone of the whole configuration
    // would live in every session's future.
    let (timing, outbound_queue, identify_timeout, bytes_per_s) = {
        let cfg = hub.config();
        let timing = Timing {
            ping_interval: cfg.ws_ping_interval,
            ping_timeout: cfg.ws_ping_timeout,
            write_timeout: cfg.ws_write_timeout,
            close_timeout: cfg.ws_close_timeout,
        };
        (
            timing,
            cfg.outbound_queue,
            cfg.identify_timeout,
            cfg.sidecar_bytes_per_s,
        )
    };
    let ctl = Arc::new(SessionCtl::new(outbound_queue));
    let link = Arc::new(WsLink {
        id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
        ctl: ctl.clone(),
    });
    let session_id = link.id;
    span.record("session", session_id);
    let dyn_link: Link = link.clone();
    let (sink, mut stream) = socket.split();
    let last_seen = Arc::new(AtomicI64::new(now_ms()));
    let mut writer = tokio::spawn(write_loop(Box::new(WriterStart {
        sink,
        ctl: ctl.clone(),
        last_seen: last_seen.clone(),
        timing,
    })));

    // Boxed: a timer is 112 bytes, held by every session for its life.
    let mut identify_deadline = Box::pin(tokio::time::sleep(identify_timeout));
    let mut agent_id: Option<String> = None;
    // Cluster mode: the session's messages go to the leader through the relay.
    let mut relayed = false;
    // The peer sent its close frame (or the connection is gone).
    let mut peer_closed = false;
    let mut in_flight = InFlight::default();
    let mut pace = Pace::new(bytes_per_s);
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            _ = &mut identify_deadline, if agent_id.is_none() => {
                link.close(CloseReason::IdentifyTimeout);
                break;
            }
            _ = ctl.closed() => break,
            _ = shutdown.changed() => {
                link.close(CloseReason::ShuttingDown);
                break;
            }
            _ = admission.revoked() => {
                link.close(CloseReason::TokenRevoked);
                break;
            }
        };
        last_seen.store(now_ms(), Ordering::Relaxed);
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                Box::pin(in_flight.drain()).await;
                link.send(ToAgent::error(
                    "invalid_json",
                    None,
                    Some("binary frames are not supported; send JSON text".into()),
                ));
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None => {
                peer_closed = true;
                break;
            }
            Some(Err(e)) => {
                peer_closed = true;
                if let Some(why) = crate::ws::close::close_reason_for(&e) {
                    link.close(why);
                }
                break;
            }
        };
        // A sidecar past its byte rate: its socket is left unread for a
        // while (TCP pushes back), so its volume cannot take the log's time
        // from everyone else's writes.
        if let Some(wait) = pace
            .as_mut()
            .filter(|_| agent_id.is_some())
            .map(|p| p.charge(text.len()))
            .filter(|w| !w.is_zero())
        {
            hub.metrics().ws_paced.inc();
            // Boxed: rarely awaited, and a session's future is held by
            // every idle sidecar.
            let closed = Box::pin(async {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = ctl.closed() => true,
                }
            });
            if closed.await {
                break;
            }
        }
        // Boxed while the drain is awaited: a parsed message is large, and
        // what lives across an await sizes every session's future.
        let parsed = protocol::parse(&text).map(Box::new);
        if parsed.is_err() || agent_id.is_none() {
            Box::pin(in_flight.drain()).await;
        }
        match parsed.map(|m| *m) {
            Err(e) => {
                link.send(ToAgent::error(e.code, None, Some(e.detail)));
            }
            Ok(FromAgent::Ping) if agent_id.is_some() => {
                link.send(ToAgent::Pong {
                    timestamp: now_ms(),
                });
            }
            Ok(FromAgent::Identify(ident)) => {
                if agent_id.is_some() {
                    link.send(ToAgent::error(
                        "invalid_message",
                        None,
                        Some("this socket is already identified".into()),
                    ));
                    continue;
                }
                // Cluster mode: through the node's relay (which says whether
                // the session talks to this node's hub or to the leader's).
                let identified = match hub.relay() {
                    Some(relay) => Box::pin(relay.identify(&text, &dyn_link)).await,
                    None => hub.identify(&ident, &dyn_link).map(|id| (id, false)),
                };
                match identified {
                    Err(crate::error::Error::ShuttingDown) if hub.relay().is_some() => {
                        // Cluster mode and no leader to answer: reconnect later.
                        link.close(CloseReason::LeaderChanged);
                        break;
                    }
                    Ok((id, through_relay)) => {
                        span.record("agent_id", id.as_str());
                        agent_id = Some(id);
                        relayed = through_relay;
                        admission.identified(&hub, &ident.token);
                    }
                    Err(e) => {
                        link.send(ToAgent::error(e.ws_code(), None, None));
                        if admission.failed_identify(&e) {
                            link.close(CloseReason::TooManyFailedIdentifies);
                            break;
                        }
                    }
                }
            }
            Ok(report) => match &agent_id {
                Some(_) if relayed => {
                    if let Some(relay) = hub.relay() {
                        if let Err(reply) = Box::pin(relay.frame(session_id, &text)).await {
                            link.send(reply);
                        }
                    }
                }
                Some(agent) => {
                    Box::pin(in_flight.room_for(text.len())).await;
                    let room = Box::pin(hub.report_room(text.len())).await;
                    if let Some(done) = Box::pin(hub.report(agent, &dyn_link, report, room)).await {
                        in_flight.push(done, text.len());
                    }
                }
                None => {
                    link.send(ToAgent::error("not_identified", None, None));
                }
            },
        }
    }
    if let Some(agent) = &agent_id {
        if let Some(relay) = hub.relay() {
            Box::pin(relay.closed(session_id)).await;
        }
        if !relayed {
            hub.session_closed(agent, session_id);
        }
    }
    link.close(CloseReason::Normal);
    // The writer flushes what is queued and sends the close frame; a writer
    // stuck on a peer that does not read is aborted.
    let clean = match tokio::time::timeout(timing.close_timeout, &mut writer).await {
        Ok(Ok(clean)) => clean,
        _ => {
            writer.abort();
            false
        }
    };
    // Close handshake: wait (bounded) for the peer's close frame, so the
    // connection ends in order and the peer reads everything we sent.
    if clean && !peer_closed {
        let _ = tokio::time::timeout(timing.close_timeout, wait_for_close(&mut stream)).await;
    }
}

async fn wait_for_close(stream: &mut SplitStream<WebSocket>) {
    while let Some(Ok(msg)) = stream.next().await {
        if matches!(msg, Message::Close(_)) {
            return;
        }
    }
}

/// Counts the session in `agenthub_ws_sessions_open` while it runs.
struct OpenGuard(Arc<Hub>);

impl OpenGuard {
    fn new(hub: Arc<Hub>) -> OpenGuard {
        hub.metrics().ws_sessions_open.inc();
        OpenGuard(hub)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.metrics().ws_sessions_open.dec();
    }
}

/// Send one frame within the write timeout. False: the peer is gone or stuck.
async fn send_bounded(
    sink: &mut SplitSink<WebSocket, Message>,
    msg: Message,
    timeout: Duration,
) -> bool {
    matches!(
        tokio::time::timeout(timeout, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Most frames written with one flush.
const WRITE_BATCH: usize = 64;
/// An emptied outbound queue keeps at most this many slots.
const SHRINK_ABOVE: usize = 8;

/// Whichever way the writer ends, its queue takes no more messages (they
/// would wait for nobody): `send` then answers false, as to a closed session.
struct StopTaking(Arc<SessionCtl>);

impl Drop for StopTaking {
    fn drop(&mut self) {
        self.0.stop_taking();
    }
}

/// Feed `msgs` and flush once, within the write timeout. False: the peer is
/// gone or stuck.
async fn write_all(
    sink: &mut SplitSink<WebSocket, Message>,
    msgs: Vec<ToAgent>,
    timeout: Duration,
) -> bool {
    let write = async {
        for msg in msgs {
            sink.feed(Message::Text(protocol::encode(&msg).into()))
                .await?;
        }
        sink.flush().await
    };
    matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(())))
}

/// What a session's writer starts from (boxed, as [`Start`]).
struct WriterStart {
    sink: SplitSink<WebSocket, Message>,
    ctl: Arc<SessionCtl>,
    last_seen: Arc<AtomicI64>,
    timing: Timing,
}

/// Returns true if it ended with a close frame sent (a clean close).
async fn write_loop(start: Box<WriterStart>) -> bool {
    let WriterStart {
        mut sink,
        ctl,
        last_seen,
        timing,
    } = *start;
    let _stop = StopTaking(ctl.clone());
    let mut ping = tokio::time::interval(timing.ping_interval);
    ping.tick().await;
    let silent_limit = (timing.ping_interval + timing.ping_timeout).as_millis() as i64;
    loop {
        tokio::select! {
            msg = ctl.pop() => match msg {
                Some(msg) => {
                    // Everything queued goes out with one flush (one write
                    // syscall under load instead of one per frame).
                    let mut batch = vec![*msg];
                    while batch.len() < WRITE_BATCH {
                        match ctl.try_pop() {
                            Some(m) => batch.push(*m),
                            None => break,
                        }
                    }
                    // Boxed here and below: an idle session's writer holds
                    // only what its select waits on, not a write's timer.
                    if !Box::pin(write_all(&mut sink, batch, timing.write_timeout)).await {
                        ctl.request_close(CloseReason::Normal);
                        return false;
                    }
                }
                None => break,
            },
            _ = ping.tick() => {
                if now_ms() - last_seen.load(Ordering::Relaxed) > silent_limit {
                    ctl.request_close(CloseReason::PingTimeout);
                    break;
                }
                if !Box::pin(send_bounded(&mut sink, Message::Ping(Default::default()), timing.write_timeout)).await {
                    ctl.request_close(CloseReason::Normal);
                    return false;
                }
            }
            _ = ctl.closed() => break,
        }
    }
    Box::pin(close_out(sink, ctl, timing)).await
}

/// Flush what was queued before the close was asked for (e.g.
/// `session_replaced`), then send the close frame.
async fn close_out(
    mut sink: SplitSink<WebSocket, Message>,
    ctl: Arc<SessionCtl>,
    timing: Timing,
) -> bool {
    ctl.stop_taking();
    while let Some(msg) = ctl.try_pop() {
        let text = protocol::encode(&msg);
        if !send_bounded(&mut sink, Message::Text(text.into()), timing.write_timeout).await {
            return false;
        }
    }
    let (code, reason) = close_code(ctl.close_reason().unwrap_or(CloseReason::Normal));
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    send_bounded(&mut sink, Message::Close(Some(frame)), timing.write_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        (d.as_secs_f64() * 1e6).round() / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn pace_allows_a_second_of_burst_then_the_rate() {
        let mut pace = Pace::new(1000).unwrap();
        assert_eq!(secs(pace.charge(600)), 0.0);
        assert_eq!(secs(pace.charge(400)), 0.0);
        // In debt by 500 bytes: half a second unread.
        assert_eq!(secs(pace.charge(500)), 0.5);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(secs(pace.charge(100)), 0.1);
        // Credit never grows past one second's worth.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(secs(pace.charge(1000)), 0.0);
        assert_eq!(secs(pace.charge(1)), 0.001);
        assert!(Pace::new(0).is_none());
    }
}
