//! TLS on both listeners: the reference sidecar, Node.js and Python over TLS,
//! clients that get TLS wrong, reload (in process and by SIGHUP), client
//! certificates.

use super::*;

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
