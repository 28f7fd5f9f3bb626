//! Protocol-level refusals: WebSocket close codes 1002/1007, gRPC
//! RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED.

use super::*;

// ---- close codes ------------------------------------------------------------------------

/// A WebSocket handshake by hand, so frames can break the rules.
async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// A client frame: `first` byte (FIN, RSV, opcode), masked unless told otherwise.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        f.push(mask_bit | payload.len() as u8);
    } else {
        f.push(mask_bit | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    if masked {
        let key = [1u8, 2, 3, 4];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// The code of the close frame the hub sends.
async fn raw_close_code(tcp: &mut TcpStream) -> Option<u16> {
    let mut hdr = [0u8; 2];
    loop {
        tokio::time::timeout(WAIT, tcp.read_exact(&mut hdr))
            .await
            .ok()?
            .ok()?;
        let len = (hdr[1] & 0x7f) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.ok()?;
        if hdr[0] & 0x0f == 0x8 {
            return (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[tokio::test]
async fn protocol_violations_close_1002_and_bad_utf8_closes_1007() {
    let hub = TestHub::start().await;
    let mut agent = hub.sidecar("agent-p").await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked client frame", frame(0x81, b"{}", false), 1002),
        ("RSV1 without an extension", frame(0xC1, b"{}", true), 1002),
        ("reserved data opcode", frame(0x83, b"{}", true), 1002),
        ("reserved control opcode", frame(0x8B, b"", true), 1002),
        (
            "control frame over 125 bytes",
            frame(0x89, &[0u8; 126], true),
            1002,
        ),
        ("fragmented ping", frame(0x09, b"", true), 1002),
        ("orphan continuation", frame(0x80, b"{}", true), 1002),
        ("invalid UTF-8 text", frame(0x81, &[0xC3, 0x28], true), 1007),
    ];
    for (what, bytes, want) in cases {
        let mut tcp = raw_ws(hub.ws_addr).await;
        tcp.write_all(&bytes).await.unwrap();
        assert_eq!(raw_close_code(&mut tcp).await, Some(want), "{what}");
    }
    sidecar_ping(&mut agent).await;
}

// ---- gRPC status codes ------------------------------------------------------------------

#[tokio::test]
async fn an_oversized_push_is_resource_exhausted() {
    let hub = TestHub::start().await;
    let mut c = hub.client().await;
    let mut req = pinned("nobody", &"x".repeat(5 * 1024 * 1024));
    req.queue_if_offline = true;
    let err = c.push_task(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(metrics(&hub.hub).grpc_too_large.load(Ordering::Relaxed), 1);
    // An old cursor is still OUT_OF_RANGE's business; normal pushes work.
    let mut small = pinned("agent-x", "small");
    small.queue_if_offline = true;
    assert!(c.push(small).await.created);
}

#[tokio::test]
async fn a_push_whose_deadline_has_passed_is_deadline_exceeded_and_makes_nothing() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let hub = TestHub::start().await;
    let req = pb::PushTaskRequest {
        agent_id: "agent-d".into(),
        task_id: "late-task".into(),
        queue_if_offline: true,
        ..Default::default()
    };
    let msg = prost::Message::encode_to_vec(&req);
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let tcp = TcpStream::connect(hub.grpc_addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post(format!(
        "http://{}/agenthub.v1.TaskHub/PushTask",
        hub.grpc_addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "0n")
    .header("authorization", format!("Bearer {}", hub.admin_token))
    .body(Full::new(bytes::Bytes::from(body)))
    .unwrap();
    let resp = send.send_request(request).await.unwrap();
    let (parts, body) = resp.into_parts();
    let trailers = body.collect().await.unwrap().trailers().cloned();
    let status = parts
        .headers
        .get("grpc-status")
        .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    let mut c = hub.client().await;
    let missing = c
        .get_task(pb::GetTaskRequest {
            task_id: "late-task".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "no half-made task");
    assert_eq!(
        metrics(&hub.hub)
            .grpc_deadline_exceeded
            .load(Ordering::Relaxed),
        1
    );
}
