//! Transport security and abuse limits (SPEC §10): TLS on both listeners
//! with certificates made at test time, client certificates, reload, origin
//! checks, live revocation, each limit's refused case beside a well-behaved
//! agent, protocol-violation close codes and gRPC status codes.

mod lab;

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

// ---- TLS ------------------------------------------------------------------------

#[tokio::test]
async fn reference_sidecar_over_wss_runs_a_task_and_bad_tls_clients_fail_cleanly() {
    let lab = Lab::new();
    let hub = TlsHub::start(lab.tls_config(), |_| {}).await;
    let (token, _) = hub.token(Role::Agent, Some("ref-agent"));
    let token_file = write(lab.dir.path(), "agent.token", &format!("{token}\n"));
    let mut sidecar = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["sidecar", "--hub", &hub.wss_url(), "--agent", "ref-agent"])
        .arg("--state-file")
        .arg(lab.dir.path().join("sidecar-state.json"))
        .args(["--", "sh", "-c", "echo hello-over-tls"])
        .env("AGENTHUB_TOKEN_FILE", &token_file)
        .env("AGENTHUB_CA_FILE", &lab.ca_file)
        .env_remove("AGENTHUB_TOKEN")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut client = connect_with_ca(&hub.https_url(), &hub.admin_token, Some(&lab.ca_file))
        .await
        .unwrap();
    eventually(|| {
        let mut c = client.clone();
        async move {
            let agents = c.list_agents(pb::ListAgentsRequest {}).await.ok()?;
            agents
                .into_inner()
                .agents
                .iter()
                .any(|a| a.agent_id == "ref-agent" && a.connected)
                .then_some(())
        }
    })
    .await;
    let mut events = client.watch_after(0).await;
    let pushed = client.push(pinned("ref-agent", "over TLS")).await;
    loop {
        let ev = tokio::time::timeout(WAIT, events.message())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        if ev.task_id == pushed.task_id
            && crate::helpers::kind(&ev) == pb::task_event::Kind::Completed
        {
            break;
        }
    }

    // Clients that get TLS wrong fail, each with its own clear reason.
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/ws", hub.ws_addr)).await;
    assert!(
        plain.is_err(),
        "plaintext WebSocket to a TLS port must fail"
    );
    let plain_grpc = async {
        let mut c = agenthub::client::connect(&hub.grpc_addr.to_string(), &hub.admin_token)
            .await
            .map_err(|e| e.to_string())?;
        c.list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        plain_grpc.await.is_err(),
        "plaintext gRPC to a TLS port must fail"
    );
    let stranger = lab::Ca::new("someone else's CA");
    let other_ca = write(lab.dir.path(), "other-ca.pem", &stranger.pem());
    let untrusted = agenthub::tls::client_config(Some(&other_ca), None).unwrap();
    let err = handshake(hub.ws_addr, "127.0.0.1", untrusted)
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = handshake(hub.ws_addr, "localhost", lab.client())
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    let err = connect_with_ca(
        &format!("https://localhost:{}", hub.grpc_addr.port()),
        "x",
        Some(&lab.ca_file),
    )
    .await
    .map(|_| ())
    .unwrap_err();
    let err = format!("{err:?}").to_lowercase();
    assert!(
        err.contains("notvalidforname") || err.contains("not valid for name"),
        "{err}"
    );
    assert!(metrics(&hub.hub).tls_failures.load(Ordering::Relaxed) >= 3);

    // The hub kept serving: the sidecar is still there, new clients get in.
    let agents = client.list_agents(pb::ListAgentsRequest {}).await.unwrap();
    assert!(agents
        .get_ref()
        .agents
        .iter()
        .any(|a| a.agent_id == "ref-agent" && a.connected));
    let mut ws = wss_session(&hub, &lab, "late-agent").await;
    ping_pong(&mut ws).await;
    assert!(
        sidecar.try_wait().unwrap().is_none(),
        "sidecar still running"
    );
}

#[tokio::test]
async fn certificate_reload_serves_new_handshakes_and_keeps_live_sessions() {
    let mut lab = Lab::new();
    let hub = TlsHub::start(lab.tls_config(), |_| {}).await;
    let mut live = wss_session(&hub, &lab, "live-agent").await;
    let first = handshake(hub.ws_addr, "127.0.0.1", lab.client())
        .await
        .unwrap();
    assert_eq!(first.as_ref(), lab.cert_der.as_slice());

    lab.swap_server_cert("hub-2", &["127.0.0.1"], false);
    hub.tls.reload().unwrap();
    for addr in [hub.ws_addr, hub.grpc_addr] {
        let now = handshake(addr, "127.0.0.1", lab.client()).await.unwrap();
        assert_eq!(
            now.as_ref(),
            lab.cert_der.as_slice(),
            "new handshakes get the new cert"
        );
    }
    ping_pong(&mut live).await;

    // An expired certificate: clients refuse it, and say why.
    lab.swap_server_cert("hub-expired", &["127.0.0.1"], true);
    hub.tls.reload().unwrap();
    let err = handshake(hub.ws_addr, "127.0.0.1", lab.client())
        .await
        .unwrap_err();
    assert!(err.contains("expired"), "{err}");
    ping_pong(&mut live).await;

    // A broken pair is refused and the current certificate stays.
    std::fs::write(&lab.key_file, "not a key").unwrap();
    assert!(hub.tls.reload().is_err());
    lab.swap_server_cert("hub-3", &["127.0.0.1"], false);
    hub.tls.reload().unwrap();
    let mut again = wss_session(&hub, &lab, "next-agent").await;
    ping_pong(&mut again).await;
    ping_pong(&mut live).await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_a_running_hub() {
    let mut lab = Lab::new();
    let data = lab.dir.path().join("data");
    let cert = lab.cert_file.to_str().unwrap().to_string();
    let key = lab.key_file.to_str().unwrap().to_string();
    let hub =
        crate::helpers::HubProcess::spawn(&data, &["--tls-cert", &cert, "--tls-key", &key]).await;
    let token = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["token", "issue", "--agent", "hup-agent", "--data-dir"])
            .arg(&data)
            .env_remove("AGENTHUB_GRPC_ADDR")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let url = format!("wss://127.0.0.1:{}/ws", hub.ws_addr.port());
    let mut live = connect_websocket(&url, None, Some(lab.client()))
        .await
        .unwrap();
    assert_eq!(
        identify(&mut live, "hup-agent", &token).await["type"],
        "identified"
    );

    lab.swap_server_cert("hub-after-hup", &["127.0.0.1"], false);
    let pid = hub.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let want = lab.cert_der.clone();
    eventually(|| {
        let config = lab.client();
        let want = want.clone();
        async move {
            let got = handshake(hub.ws_addr, "127.0.0.1", config).await.ok()?;
            (got.as_ref() == want.as_slice()).then_some(())
        }
    })
    .await;
    ping_pong(&mut live).await;
}

#[tokio::test]
async fn node_wss_sidecar_and_python_grpc_client_interoperate_over_tls() {
    let (python, interop) = crate::interop::require_deps();
    let lab = Lab::new();
    let stubs = lab.dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    crate::interop::generate_stubs(&python, &stubs);
    let hub = TlsHub::start(lab.tls_config(), |_| {}).await;
    let (token, _) = hub.token(Role::Agent, Some("node-agent"));

    let mut node = tokio::process::Command::new("node")
        .arg(interop.join("sidecar.js"))
        .env("AGENTHUB_WS_URL", hub.wss_url())
        .env("AGENTHUB_AGENT_ID", "node-agent")
        .env("AGENTHUB_TOKEN", &token)
        .env("NODE_EXTRA_CA_CERTS", &lab.ca_file)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    use tokio::io::AsyncBufReadExt;
    let mut node_out = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, node_out.next_line())
        .await
        .expect("node sidecar identifies in time")
        .unwrap();
    assert_eq!(first.as_deref(), Some("identified"));

    let client = tokio::process::Command::new(&python)
        .arg(interop.join("client.py"))
        .args(["--grpc", &format!("127.0.0.1:{}", hub.grpc_addr.port())])
        .args(["--token", &hub.admin_token, "--agent", "node-agent"])
        .args(["--task-id", "tls-interop-1"])
        .arg("--ca-file")
        .arg(&lab.ca_file)
        .arg("--stubs")
        .arg(&stubs)
        .output();
    let client = tokio::time::timeout(Duration::from_secs(30), client)
        .await
        .expect("python client finishes in time")
        .unwrap();
    assert!(
        client.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );
    let summary: Value = serde_json::from_slice(&client.stdout).expect("python prints JSON");
    assert_eq!(summary["state"], "COMPLETED");
    let done = tokio::time::timeout(WAIT, node_out.next_line())
        .await
        .expect("node sidecar reports done")
        .unwrap();
    assert_eq!(done.as_deref(), Some(r#"{"done":"tls-interop-1"}"#));
}

#[tokio::test]
async fn ws_needs_a_client_certificate_under_client_ca_and_other_paths_do_not() {
    let lab = Lab::new();
    let mut tls = lab.tls_config();
    tls.client_ca = Some(lab.ca_file.clone());
    let hub = TlsHub::start(tls, |_| {}).await;

    let refused = connect_websocket(&hub.wss_url(), None, Some(lab.client())).await;
    let err = refused.map(|_| ()).unwrap_err();
    assert!(err.contains("403"), "{err}");
    assert_eq!(
        metrics(&hub.hub)
            .client_cert_refused
            .load(Ordering::Relaxed),
        1
    );

    // /health needs no client certificate.
    let tcp = TcpStream::connect(hub.ws_addr).await.unwrap();
    let mut io = tokio_rustls::TlsConnector::from(lab.client())
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    io.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    let _ = io.read_to_string(&mut body).await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");

    // With a certificate from the lab CA, the sidecar gets in.
    let (cert, key) = lab.client_identity("agent-1");
    let with_cert = agenthub::tls::client_config(Some(&lab.ca_file), Some((&cert, &key))).unwrap();
    let (token, _) = hub.token(Role::Agent, Some("agent-1"));
    let mut ws = connect_websocket(&hub.wss_url(), None, Some(with_cert))
        .await
        .unwrap();
    assert_eq!(
        identify(&mut ws, "agent-1", &token).await["type"],
        "identified"
    );

    // A certificate from another CA fails the handshake; the hub goes on.
    let stranger = lab::Ca::new("stranger CA");
    let (c, k, _) = stranger.leaf("intruder", &["intruder"], false);
    let c = write(lab.dir.path(), "intruder.pem", &c);
    let k = write(lab.dir.path(), "intruder.key", &k);
    let bad = agenthub::tls::client_config(Some(&lab.ca_file), Some((&c, &k))).unwrap();
    assert!(connect_websocket(&hub.wss_url(), None, Some(bad))
        .await
        .is_err());
    ping_pong(&mut ws).await;
}

// ---- origin -------------------------------------------------------------------------

async fn upgrade_with_origin(hub: &TestHub, origin: Option<&str>) -> Result<(), u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = hub.ws_url().into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn ws_upgrade_from_a_foreign_origin_gets_403() {
    let hub = TestHub::start_with(|c| {
        c.allowed_origins = vec!["https://dash.example:8443".into()];
    })
    .await;
    assert_eq!(
        upgrade_with_origin(&hub, Some("https://evil.example")).await,
        Err(403)
    );
    assert_eq!(upgrade_with_origin(&hub, Some("null")).await, Err(403));
    assert_eq!(upgrade_with_origin(&hub, None).await, Ok(()));
    let own = format!("http://{}", hub.ws_addr);
    assert_eq!(upgrade_with_origin(&hub, Some(&own)).await, Ok(()));
    assert_eq!(
        upgrade_with_origin(&hub, Some("https://DASH.example:8443")).await,
        Ok(())
    );
    assert_eq!(
        upgrade_with_origin(&hub, Some("https://dash.example")).await,
        Err(403)
    );
    assert_eq!(metrics(&hub.hub).origin_refused.load(Ordering::Relaxed), 3);
    // Sidecars send no Origin and are unaffected.
    let mut s = hub.sidecar("agent-o").await;
    sidecar_ping(&mut s).await;
}

// ---- revocation ---------------------------------------------------------------------

#[tokio::test]
async fn revoking_over_grpc_closes_the_session_4401_and_ends_the_watch_unauthenticated() {
    let hub = TestHub::start().await;
    let mut admin = hub.client().await;
    let agent_tok = admin
        .issue_token(pb::IssueTokenRequest {
            role: "agent".into(),
            agent_id: "rev-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let viewer_tok = admin
        .issue_token(pb::IssueTokenRequest {
            role: "viewer".into(),
            agent_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let listed = admin.list_tokens(pb::ListTokensRequest {}).await.unwrap();
    let listed = &listed.get_ref().tokens;
    let a = listed.iter().find(|t| t.id == agent_tok.id).unwrap();
    assert_eq!(
        (a.role.as_str(), a.agent_id.as_str(), a.revoked),
        ("agent", "rev-agent", false)
    );
    assert!(listed
        .iter()
        .any(|t| t.id == viewer_tok.id && t.role == "viewer"));

    // Only admins manage tokens.
    let mut viewer = hub.client_with(&viewer_tok.token).await;
    let denied = viewer
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        admin
            .revoke_token(pb::RevokeTokenRequest {
                id: "tok-nope".into()
            })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );

    let mut s = Sidecar::connect(&hub.ws_url()).await;
    s.send(json!({"type": "identify", "agent_id": "rev-agent", "token": agent_tok.token}))
        .await;
    assert_eq!(s.recv().await["type"], "identified");
    let task = admin.push(pinned("rev-agent", "held")).await;
    let (task_id, generation) = s.next_assign().await;
    assert_eq!(task_id, task.task_id);
    s.accept(&task_id, generation).await;
    let mut watch = viewer.watch_after(0).await;

    let t0 = Instant::now();
    admin
        .revoke_token(pb::RevokeTokenRequest {
            id: agent_tok.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(s.recv_close().await, Some(4401));
    assert!(t0.elapsed() < REVOKE_BOUND, "{:?}", t0.elapsed());

    let t0 = Instant::now();
    admin
        .revoke_token(pb::RevokeTokenRequest {
            id: viewer_tok.id.clone(),
        })
        .await
        .unwrap();
    let status = loop {
        match tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(t0.elapsed() < REVOKE_BOUND, "{:?}", t0.elapsed());

    // The agent's task takes the reconnect-grace path: it stays with the agent.
    let agent = crate::helpers::disconnected_agent(&admin).await;
    assert_eq!(agent.agent_id, "rev-agent");
    assert_eq!(agent.active_task_ids, vec![task.task_id.clone()]);
    // The revoked tokens get nowhere any more.
    let mut again = Sidecar::connect(&hub.ws_url()).await;
    again
        .send(json!({"type": "identify", "agent_id": "rev-agent", "token": agent_tok.token}))
        .await;
    assert_eq!(again.recv().await["error"], "invalid_token");
    let code = viewer
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn revoking_in_the_data_dir_reaches_live_sessions_within_two_seconds() {
    let hub = TestHub::start().await;
    let issue = |role, agent: Option<&str>| {
        let store = agenthub::store::sqlite::SqliteStore::open(&hub.dir, None, None).unwrap();
        agenthub::auth::issue_token(&store, role, agent.map(str::to_string)).unwrap()
    };
    let (agent_secret, agent_rec) = issue(Role::Agent, Some("dir-agent"));
    let (viewer_secret, viewer_rec) = issue(Role::Viewer, None);
    let mut s = Sidecar::connect(&hub.ws_url()).await;
    s.send(json!({"type": "identify", "agent_id": "dir-agent", "token": agent_secret}))
        .await;
    assert_eq!(s.recv().await["type"], "identified");
    let mut watch = hub.client_with(&viewer_secret).await.watch_after(0).await;

    let revoke = |id: String| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["token", "revoke", &id, "--data-dir"])
            .arg(&hub.dir)
            .env_remove("AGENTHUB_GRPC_ADDR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    revoke(agent_rec.id);
    revoke(viewer_rec.id);
    let t0 = Instant::now();
    assert_eq!(s.recv_close().await, Some(4401));
    let status = loop {
        match tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(t0.elapsed() < REVOKE_BOUND, "{:?}", t0.elapsed());
}

#[tokio::test]
async fn token_cli_manages_tokens_over_grpc_with_tls() {
    let lab = Lab::new();
    let hub = TlsHub::start(lab.tls_config(), |_| {}).await;
    let cli = |args: &'static [&'static str]| {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(args)
            .env_remove("AGENTHUB_DATA_DIR")
            .env("AGENTHUB_GRPC_ADDR", hub.https_url())
            .env("AGENTHUB_TOKEN", &hub.admin_token)
            .env("AGENTHUB_CA_FILE", &lab.ca_file)
            .output();
        async move {
            let out = out.await.unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let secret = cli(&["token", "issue", "--role", "orchestrator"])
        .await
        .trim()
        .to_string();
    assert_eq!(secret.len(), 64);
    let listed: Vec<Value> = cli(&["token", "list"])
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mine = listed
        .iter()
        .find(|t| t["role"] == "orchestrator")
        .expect("the new token is listed");
    let id = mine["id"].as_str().unwrap().to_string();
    assert!(
        !cli(&["token", "list"]).await.contains(&secret),
        "secrets never listed"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["token", "revoke", &id])
        .env_remove("AGENTHUB_DATA_DIR")
        .env("AGENTHUB_GRPC_ADDR", hub.https_url())
        .env("AGENTHUB_TOKEN", &hub.admin_token)
        .env("AGENTHUB_CA_FILE", &lab.ca_file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let mut c = connect_with_ca(&hub.https_url(), &secret, Some(&lab.ca_file))
        .await
        .unwrap();
    let code = c
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::Unauthenticated);
}

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
