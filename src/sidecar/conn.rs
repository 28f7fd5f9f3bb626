//! The sidecar's connection to the hub: connect, identify, then pass frames
//! both ways until the socket dies; reconnect with exponential backoff
//! (doubling from `backoff_initial` up to `backoff_max`, with jitter), each
//! attempt to the next of the hub's URLs in turn (round robin).
//! Sends an application `ping` every heartbeat and drops a socket that has
//! been silent for three heartbeats. WebSocket pings from the hub are
//! answered by tungstenite as long as this task keeps reading.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How long connecting plus identifying may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for the hub per connection.
const OUTBOUND_QUEUE: usize = 1024;
/// Largest frame accepted from the hub.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Who the sidecar is and how it reaches the hub.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// The hub's URLs (at least one); attempts go through them in turn.
    pub urls: Vec<String>,
    pub agent_id: String,
    pub token: String,
    /// For a `wss://` hub (`None`: the system's roots).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub name: Option<String>,
    pub capabilities: Vec<String>,
    pub max_concurrency: u32,
    pub heartbeat: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// What the connection tells the main loop.
#[derive(Debug)]
pub enum ConnEvent {
    /// Identified; frames for the hub go to this sender until `Disconnected`.
    Connected(mpsc::Sender<String>),
    /// A JSON frame from the hub (other than `identified` and `pong`).
    Frame(Value),
    /// The socket is gone; a reconnect is scheduled.
    Disconnected,
    /// The hub refused the token: retrying cannot help.
    Fatal(String),
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            next: initial,
            initial,
            max,
        }
    }

    /// The next delay: the current step scaled by a random factor in
    /// [0.5, 1.0]; the step doubles up to `max`.
    fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn jump_to_max(&mut self) {
        self.next = self.max;
    }
}

/// Why one connection ended.
enum End {
    /// Reconnect after a backoff delay.
    Retry,
    /// Reconnect, but only after the longest delay (another sidecar took our place).
    Replaced,
    /// The sidecar is shutting down.
    Shutdown,
    /// Do not reconnect.
    Fatal(String),
}

/// Keep a connection up until `shutdown` turns true.
pub async fn run(
    cfg: ConnConfig,
    events: mpsc::Sender<ConnEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    // Index into `cfg.urls` of the next attempt.
    let mut next = 0;
    loop {
        let url = &cfg.urls[next];
        let end = connect_once(&cfg, url, &events, &mut backoff, &mut shutdown).await;
        let _ = events.send(ConnEvent::Disconnected).await;
        match end {
            End::Shutdown => return,
            End::Fatal(e) => {
                let _ = events.send(ConnEvent::Fatal(e)).await;
                return;
            }
            End::Replaced => backoff.jump_to_max(),
            End::Retry => {}
        }
        next = (next + 1) % cfg.urls.len();
        let delay = backoff.next_delay();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            url = %cfg.urls[next],
            "reconnecting after a delay"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn identify_msg(cfg: &ConnConfig) -> Value {
    let mut msg = json!({
        "type": "identify",
        "agent_id": cfg.agent_id,
        "token": cfg.token,
        "protocol_version": 1,
        "client_type": "agenthub-sidecar",
        "capabilities": cfg.capabilities,
        "max_concurrency": cfg.max_concurrency,
    });
    if let Some(name) = &cfg.name {
        msg["name"] = json!(name);
    }
    msg
}

async fn connect_once(
    cfg: &ConnConfig,
    url: &str,
    events: &mpsc::Sender<ConnEvent>,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let handshake = async {
        let mut ws = crate::tls::connect_websocket(url, Some(ws_config), cfg.tls.clone())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        ws.send(Message::Text(identify_msg(cfg).to_string().into()))
            .await
            .map_err(|e| format!("send identify: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    match v["type"].as_str() {
                        Some("identified") => return Ok(Ok(ws)),
                        Some("error") => {
                            let code = v["error"].as_str().unwrap_or("unknown").to_string();
                            return Ok(Err(code));
                        }
                        _ => continue,
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    return Err(format!("closed during identify: {f:?}"))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("closed during identify".into()),
            }
        }
    };
    let ws = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => r,
        _ = shutdown.changed() => return End::Shutdown,
    };
    let ws = match ws {
        Err(_) => {
            tracing::warn!(url = %url, "hub did not answer identify in time");
            return End::Retry;
        }
        Ok(Err(e)) => {
            tracing::warn!(url = %url, error = %e, "cannot reach the hub");
            return End::Retry;
        }
        Ok(Ok(Err(code))) if code == "invalid_token" || code == "token_agent_mismatch" => {
            return End::Fatal(format!("the hub refused this sidecar's token: {code}"));
        }
        Ok(Ok(Err(code))) => {
            tracing::warn!(url = %url, error = %code, "identify refused");
            return End::Retry;
        }
        Ok(Ok(Ok(ws))) => ws,
    };
    backoff.reset();
    tracing::info!(url = %url, agent_id = %cfg.agent_id, "connected to the hub");
    let (tx, mut out) = mpsc::channel::<String>(OUTBOUND_QUEUE);
    if events.send(ConnEvent::Connected(tx)).await.is_err() {
        return End::Shutdown;
    }

    let (mut sink, mut stream) = ws.split();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.tick().await;
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            frame = stream.next() => {
                last_seen = Instant::now();
                match frame {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(v) = serde_json::from_str::<Value>(&t) else {
                            tracing::warn!(frame = %t, "hub sent invalid JSON");
                            continue;
                        };
                        match v["type"].as_str() {
                            Some("pong") => {}
                            Some("error") if v["error"] == "session_replaced" => {
                                tracing::error!(agent_id = %cfg.agent_id, "another sidecar connected as this agent; backing off");
                                break End::Replaced;
                            }
                            _ => {
                                if events.send(ConnEvent::Frame(v)).await.is_err() {
                                    break End::Shutdown;
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        tracing::warn!(?frame, "hub closed the connection");
                        break End::Retry;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "connection error");
                        break End::Retry;
                    }
                    None => break End::Retry,
                }
            }
            msg = out.recv() => {
                let Some(text) = msg else { break End::Shutdown };
                if let Err(e) = sink.send(Message::Text(text.into())).await {
                    tracing::warn!(error = %e, "send failed");
                    break End::Retry;
                }
            }
            _ = heartbeat.tick() => {
                if last_seen.elapsed() > cfg.heartbeat * 3 {
                    tracing::warn!(silent_ms = last_seen.elapsed().as_millis() as u64, "hub went silent; reconnecting");
                    break End::Retry;
                }
                if sink.send(Message::Text(json!({"type": "ping"}).to_string().into())).await.is_err() {
                    break End::Retry;
                }
            }
            _ = shutdown.changed() => {
                // Flush what the main loop queued before it asked us to stop.
                while let Ok(text) = out.try_recv() {
                    let _ = sink.feed(Message::Text(text.into())).await;
                }
                let _ = sink.send(Message::Close(None)).await;
                break End::Shutdown;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut steps = Vec::new();
        for _ in 0..8 {
            steps.push(b.next_delay());
        }
        let upper = [1, 2, 4, 8, 16, 32, 60, 60];
        for (d, up) in steps.iter().zip(upper) {
            let up = Duration::from_secs(up);
            assert!(
                *d >= up / 2 && *d <= up,
                "{d:?} not in [{:?}, {up:?}]",
                up / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
