//! Who may open what: the origin check on `/ws`, token management over gRPC
//! and the CLI, and live revocation.

use super::*;

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
    let mut output = viewer
        .watch_task_output(pb::WatchTaskOutputRequest {
            task_id: task.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

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
    let status = loop {
        match tokio::time::timeout(WAIT, output.message())
            .await
            .expect("output stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("output stream ended without a status"),
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
        let store = agenthub::store::sqlite::SqliteStore::open(&hub.dir, None, false).unwrap();
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
