//! WebSocket clients: a minimal sidecar speaking the hub's JSON protocol, and
//! the raw tokio-tungstenite echo server and its workloads (the floor).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::util::{now_ns, padded, Metrics, Samples};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for one expected frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Small buffers: thousands of these sockets live in one bench process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// The fields of a hub → sidecar frame that the bench looks at.
#[derive(Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub task_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub status: Option<Cow<'a, str>>,
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default, borrow)]
    pub error: Option<Cow<'a, str>>,
}

impl<'a> Frame<'a> {
    pub fn parse(text: &'a str) -> Result<Frame<'a>> {
        serde_json::from_str(text).with_context(|| format!("bad frame from hub: {text}"))
    }

    pub fn task(&self) -> &str {
        self.task_id.as_deref().unwrap_or("")
    }

    /// Fail on a hub `error` frame.
    pub fn check(&self) -> Result<()> {
        if self.kind == "error" {
            bail!(
                "hub error `{}` for task `{}`",
                self.error.as_deref().unwrap_or("?"),
                self.task()
            );
        }
        Ok(())
    }
}

/// Open a WebSocket to `ws://{addr}{path}` with TCP_NODELAY.
pub async fn connect(addr: &str, path: &str) -> Result<Ws> {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
        .await
        .with_context(|| format!("connect ws://{addr}{path}"))?;
    Ok(ws)
}

/// The next text frame (pings are answered by tungstenite while reading).
pub async fn recv_text(ws: &mut Ws) -> Result<String> {
    loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .context("timed out waiting for a frame")?;
        match msg {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => bail!("socket closed: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket closed"),
        }
    }
}

/// Open a WebSocket to `ws://{addr}{path}` from the local address
/// `source` (bound with port 0: the kernel picks a free port of
/// `net.ipv4.ip_local_port_range` on that address), with TCP_NODELAY.
pub async fn connect_from(source: IpAddr, addr: &str, path: &str) -> Result<Ws> {
    let server: SocketAddr = addr
        .parse()
        .with_context(|| format!("server address {addr}"))?;
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("bind {source}:0"))?;
    let stream = socket
        .connect(server)
        .await
        .with_context(|| format!("connect {addr} from {source}"))?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        MaybeTlsStream::Plain(stream),
        Some(ws_config()),
    )
    .await
    .with_context(|| format!("WebSocket handshake with ws://{addr}{path} from {source}"))?;
    Ok(ws)
}

/// Connect to the hub and identify as `agent_id`.
pub async fn sidecar(
    ws_addr: &str,
    agent_id: &str,
    token: &str,
    max_concurrency: u32,
) -> Result<Ws> {
    let ws = connect(ws_addr, "/ws").await?;
    identify(ws, agent_id, token, max_concurrency).await
}

/// [`sidecar`] connecting from the local address `source`.
pub async fn sidecar_from(
    source: IpAddr,
    ws_addr: &str,
    agent_id: &str,
    token: &str,
    max_concurrency: u32,
) -> Result<Ws> {
    let ws = connect_from(source, ws_addr, "/ws").await?;
    identify(ws, agent_id, token, max_concurrency).await
}

/// Send `identify` and wait for `identified`.
async fn identify(mut ws: Ws, agent_id: &str, token: &str, max_concurrency: u32) -> Result<Ws> {
    let identify = serde_json::json!({
        "type": "identify", "agent_id": agent_id, "token": token,
        "protocol_version": 1, "client_type": "sidecar",
        "max_concurrency": max_concurrency,
    });
    ws.send(Message::text(identify.to_string())).await?;
    loop {
        let text = recv_text(&mut ws).await?;
        let f = Frame::parse(&text)?;
        f.check()?;
        if f.kind == "identified" {
            return Ok(ws);
        }
    }
}

/// `task_accepted` / `task_complete` for a task.
pub fn report(kind: &str, task_id: &str, generation: u64) -> String {
    match kind {
        "task_complete" => format!(
            r#"{{"type":"task_complete","task_id":"{task_id}","generation":{generation},"result":{{"ok":true}}}}"#
        ),
        _ => format!(r#"{{"type":"{kind}","task_id":"{task_id}","generation":{generation}}}"#),
    }
}

/// Read frames until `task_assign` for `task_id`; returns its generation.
pub async fn wait_assign(ws: &mut Ws, task_id: &str) -> Result<u64> {
    loop {
        let text = recv_text(ws).await?;
        let f = Frame::parse(&text)?;
        f.check()?;
        if f.kind == "task_assign" && f.task() == task_id {
            return f.generation.context("task_assign without generation");
        }
    }
}

/// Read frames until the `task_ack` with `status` for `task_id`.
pub async fn wait_ack(ws: &mut Ws, task_id: &str, status: &str) -> Result<()> {
    loop {
        let text = recv_text(ws).await?;
        let f = Frame::parse(&text)?;
        f.check()?;
        if f.kind == "task_ack" && f.task() == task_id && f.status.as_deref() == Some(status) {
            return Ok(());
        }
    }
}

// ---- the raw echo server: the floor --------------------------------------

/// Run the echo server until killed; prints `addr=HOST:PORT`.
pub async fn echo_server() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("addr={}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        return;
                    }
                } else if msg.is_close() {
                    return;
                }
            }
        });
    }
}

/// Sequential round trips of a 200-byte text frame: warm-up, then measured.
pub async fn echo_sequential(addr: &str, warmup: usize, measured: usize) -> Result<Metrics> {
    let mut ws = connect(addr, "/").await?;
    let frame = padded("{", "}");
    let mut lat = Samples::with_capacity(measured);
    for i in 0..warmup + measured {
        let t0 = now_ns();
        ws.send(Message::text(frame.clone())).await?;
        let back = recv_text(&mut ws).await?;
        if back.len() != frame.len() {
            bail!("echo changed the frame");
        }
        if i >= warmup {
            lat.push(now_ns() - t0);
        }
    }
    let mut m = Metrics::default();
    m.put("count", measured as f64);
    lat.sorted().put(&mut m, "rtt");
    Ok(m)
}

/// `count` frames with `inflight` outstanding on one socket: frames/s.
pub async fn echo_pipelined(
    addr: &str,
    count: usize,
    inflight: usize,
    limit: Duration,
) -> Result<Metrics> {
    let ws = connect(addr, "/").await?;
    let (mut sink, mut stream) = ws.split();
    let frame = padded("{", "}");
    let window = Arc::new(Semaphore::new(inflight));
    let received = Arc::new(AtomicU64::new(0));
    let t0 = now_ns();
    let reader = {
        let window = window.clone();
        let received = received.clone();
        tokio::spawn(async move {
            while received.load(Ordering::Relaxed) < count as u64 {
                match stream.next().await {
                    Some(Ok(Message::Text(_))) => {
                        received.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            now_ns()
        })
    };
    let writer = async {
        for _ in 0..count {
            window.acquire().await?.forget();
            sink.send(Message::text(frame.clone())).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(limit, writer)
        .await
        .context("echo pipelined timed out")??;
    let t1 = tokio::time::timeout(limit, reader)
        .await
        .context("echo pipelined timed out")??;
    let n = received.load(Ordering::Relaxed);
    let mut m = Metrics::default();
    m.put("count", n as f64);
    m.put("msgs_per_s", n as f64 / ((t1 - t0) as f64 / 1e9));
    Ok(m)
}
