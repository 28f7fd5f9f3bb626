//! Transport security and abuse limits (SPEC §10): TLS on both listeners
//! with certificates made at test time, client certificates, reload, origin
//! checks, live revocation, each limit's refused case beside a well-behaved
//! agent, protocol-violation close codes and gRPC status codes.

mod access;
pub mod lab;
mod limits;
mod tls;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use agenthub::auth::Role;
use agenthub::client::connect_with_ca;
use agenthub::pb;
use agenthub::tls::{connect_websocket, ClientWebSocket};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{eventually, pinned, ClientExt, Sidecar, TestHub, WAIT};
use lab::{handshake, write, Lab, TlsHub};

/// Revocation must reach live sessions and streams within this (SPEC §10).
const REVOKE_BOUND: Duration = Duration::from_secs(2);

// ---- small WebSocket helpers (TLS or not) ------------------------------------

async fn send(ws: &mut ClientWebSocket, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON text frame; None on close or error.
async fn recv(ws: &mut ClientWebSocket) -> Option<Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame within WAIT")?
        {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// The close code the hub sends next (skipping other frames).
async fn close_code(ws: &mut ClientWebSocket) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close within WAIT")
        {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

async fn identify(ws: &mut ClientWebSocket, agent: &str, token: &str) -> Value {
    send(
        ws,
        json!({"type": "identify", "agent_id": agent, "token": token, "protocol_version": 1}),
    )
    .await;
    recv(ws).await.expect("identify reply")
}

async fn ping_pong(ws: &mut ClientWebSocket) {
    send(ws, json!({"type": "ping"})).await;
    loop {
        let v = recv(ws).await.expect("session still open");
        if v["type"] == "pong" {
            return;
        }
    }
}

async fn wss_session(hub: &TlsHub, lab: &Lab, agent: &str) -> ClientWebSocket {
    let (token, _) = hub.token(Role::Agent, Some(agent));
    let mut ws = connect_websocket(&hub.wss_url(), None, Some(lab.client()))
        .await
        .unwrap();
    assert_eq!(identify(&mut ws, agent, &token).await["type"], "identified");
    ws
}

async fn sidecar_ping(s: &mut Sidecar) {
    s.send(json!({"type": "ping"})).await;
    s.recv_type("pong").await;
}

fn metrics(hub: &agenthub::Hub) -> &agenthub::metrics::LimitMetrics {
    &hub.metrics().limits
}
