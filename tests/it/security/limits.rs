//! One test per limit: the refused case beside a well-behaved agent.

use super::*;

// ---- limits ---------------------------------------------------------------------------

/// Read until EOF; true if the hub closed the socket within [`WAIT`].
async fn closed_by_hub(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn a_request_head_trickling_in_is_cut_off_by_the_header_timeout() {
    let hub = TestHub::start_with(|c| c.header_timeout = Duration::from_millis(300)).await;
    let mut agent = hub.sidecar("steady-agent").await;
    let mut slow = TcpStream::connect(hub.ws_addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_by_hub(&mut slow).await);
    let mut silent = TcpStream::connect(hub.ws_addr).await.unwrap();
    assert!(closed_by_hub(&mut silent).await);
    assert_eq!(metrics(&hub.hub).header_timeouts.load(Ordering::Relaxed), 2);
    // The upgraded sidecar socket is past its head: the timeout never touches it.
    sidecar_ping(&mut agent).await;
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_at_once() {
    let hub = TestHub::start_with(|c| c.max_connections = 3).await;
    let mut agent = hub.sidecar("agent-c").await;
    let _held1 = TcpStream::connect(hub.ws_addr).await.unwrap();
    let held2 = TcpStream::connect(hub.ws_addr).await.unwrap();
    let mut over = TcpStream::connect(hub.ws_addr).await.unwrap();
    assert!(closed_by_hub(&mut over).await);
    assert_eq!(
        metrics(&hub.hub)
            .connections_refused
            .load(Ordering::Relaxed),
        1
    );
    sidecar_ping(&mut agent).await;
    // A freed slot is taken again.
    drop(held2);
    eventually(|| async {
        let mut tcp = TcpStream::connect(hub.ws_addr).await.ok()?;
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        let _ = tcp.read_to_string(&mut body).await;
        body.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}

#[tokio::test]
async fn sockets_waiting_to_identify_are_capped_by_max_unidentified() {
    let hub = TestHub::start_with(|c| c.max_unidentified = 2).await;
    let mut first = Sidecar::connect(&hub.ws_url()).await;
    let _second = Sidecar::connect(&hub.ws_url()).await;
    let third = tokio_tungstenite::connect_async(hub.ws_url()).await;
    match third {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        metrics(&hub.hub)
            .unidentified_refused
            .load(Ordering::Relaxed),
        1
    );
    // Identifying frees the place: a well-behaved agent gets in.
    let token = hub.agent_token("agent-u");
    first
        .send(json!({"type": "identify", "agent_id": "agent-u", "token": token}))
        .await;
    assert_eq!(first.recv().await["type"], "identified");
    let mut next = hub.sidecar("agent-v").await;
    sidecar_ping(&mut next).await;
    assert_eq!(metrics(&hub.hub).ws_unidentified.load(Ordering::Relaxed), 1);
}

/// A WebSocket from another loopback address (127.0.0.2).
async fn connect_from(src: &str, hub: &TestHub) -> ClientWebSocket {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let tcp = sock.connect(hub.ws_addr).await.unwrap();
    let io: Box<dyn agenthub::tls::AsyncIo> = Box::new(tcp);
    tokio_tungstenite::client_async(hub.ws_url(), io)
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn an_address_with_too_many_failed_identifies_is_closed_4429() {
    let hub = TestHub::start_with(|c| c.max_failed_identifies = 2).await;
    let mut attacker = connect_from("127.0.0.2", &hub).await;
    for _ in 0..2 {
        let reply = identify(&mut attacker, "victim", &"0".repeat(64)).await;
        assert_eq!(reply["error"], "invalid_token");
    }
    let reply = identify(&mut attacker, "victim", &"1".repeat(64)).await;
    assert_eq!(reply["error"], "invalid_token");
    assert_eq!(close_code(&mut attacker).await, Some(4429));
    let mut again = connect_from("127.0.0.2", &hub).await;
    assert_eq!(close_code(&mut again).await, Some(4429));
    assert_eq!(
        metrics(&hub.hub).identify_blocked.load(Ordering::Relaxed),
        2
    );
    // An agent from another address is unaffected.
    let mut agent = hub.sidecar("agent-f").await;
    sidecar_ping(&mut agent).await;
}

#[tokio::test]
async fn watch_streams_per_token_are_capped_with_resource_exhausted() {
    let hub = TestHub::start_with(|c| c.max_watches_per_token = 2).await;
    let viewer = hub.token(Role::Viewer, None);
    let mut c = hub.client_with(&viewer).await;
    let w1 = c.watch_after(0).await;
    let _w2 = c.watch_after(0).await;
    let over = c
        .watch_task_events(pb::WatchTaskEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::ResourceExhausted);
    assert_eq!(metrics(&hub.hub).watches_refused.load(Ordering::Relaxed), 1);
    // Another token is unaffected, and a closed stream frees its place.
    let mut admin = hub.client().await;
    let _w3 = admin.watch_after(0).await;
    drop(w1);
    eventually(|| {
        let mut c = c.clone();
        async move {
            c.watch_task_events(pb::WatchTaskEventsRequest::default())
                .await
                .ok()
        }
    })
    .await;
}

/// Forward `client` ↔ `upstream` until `freeze` turns true, then hold both
/// sockets open without moving a byte: a peer that is gone without a FIN.
async fn freezable_pipe(
    client: TcpStream,
    upstream: TcpStream,
    mut freeze: tokio::sync::watch::Receiver<bool>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut a = [0u8; 16 * 1024];
    let mut b = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = cr.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if uw.write_all(&a[..n]).await.is_err() { return },
            },
            n = ur.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if cw.write_all(&b[..n]).await.is_err() { return },
            },
            _ = async { let _ = freeze.wait_for(|f| *f).await; } => break,
        }
    }
    let _hold = (cr, cw, ur, uw);
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn http2_keepalive_frees_the_watch_of_a_dashboard_that_went_silent() {
    let hub = TestHub::start_with(|c| {
        c.max_watches_per_token = 1;
        c.grpc_keepalive_interval = Duration::from_millis(200);
        c.grpc_keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let viewer = hub.token(Role::Viewer, None);
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let (freeze_tx, freeze_rx) = tokio::sync::watch::channel(false);
    let upstream = hub.grpc_addr;
    tokio::spawn(async move {
        let (client, _) = proxy.accept().await.unwrap();
        let up = TcpStream::connect(upstream).await.unwrap();
        freezable_pipe(client, up, freeze_rx).await;
    });
    let mut dashboard = hub.client_with(&viewer).await;
    let mut through_proxy = agenthub::client::connect(&proxy_addr.to_string(), &viewer)
        .await
        .unwrap();
    let _stream = through_proxy.watch_after(0).await;
    let held = dashboard
        .watch_task_events(pb::WatchTaskEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(held.code(), tonic::Code::ResourceExhausted);

    // The dashboard's machine vanishes: no FIN, no more bytes.
    freeze_tx.send(true).unwrap();
    eventually(|| {
        let mut c = dashboard.clone();
        async move {
            c.watch_task_events(pb::WatchTaskEventsRequest::default())
                .await
                .ok()
        }
    })
    .await;
}
