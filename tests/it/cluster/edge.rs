//! Authenticate at the edge: a follower verifies tokens itself and carries
//! the principal to the leader, never the token; and a cluster on NATS
//! with TLS and a user and password, and on NATS in operator mode with a
//! creds file.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::creds::Operator;
use super::hubs::{HubCluster, DEADLINE};
use super::nats::NatsCluster;
use super::ready::serving;
use crate::helpers::{kind, pinned, take_events, ClientExt};
use crate::security::lab::{self, Ca};
use agenthub::pb;
use agenthub::pb::task_event::Kind as K;

/// A message the spy saw: its subject, and its headers and payload.
type Seen = (String, Vec<u8>);

/// Everything on NATS (every subject, headers and payload) while sidecars
/// and clients work through a follower: no token's bytes in any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_crosses_nats() {
    let c = HubCluster::start(3, &[]).await;
    let spy = async_nats::connect(c.nats.urls()[0].as_str())
        .await
        .unwrap();
    let mut sub = spy.subscribe(">").await.unwrap();
    spy.flush().await.unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let sink = seen.clone();
    let spying = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let mut bytes = Vec::new();
            if let Some(h) = &m.headers {
                for (k, vs) in h.iter() {
                    for v in vs {
                        bytes.extend_from_slice(format!("{k}: {}\n", v.as_str()).as_bytes());
                    }
                }
            }
            bytes.extend_from_slice(&m.payload);
            sink.lock().unwrap().push((m.subject.to_string(), bytes));
        }
    });
    // The spy's interest reaches every NATS server before the work starts:
    // a message published through each server reaches it.
    for (i, url) in c.nats.urls().iter().enumerate() {
        let probe = async_nats::connect(url.as_str()).await.unwrap();
        let subject = format!("edge.probe.{i}");
        crate::helpers::eventually(|| {
            let (probe, subject, seen) = (probe.clone(), subject.clone(), seen.clone());
            async move {
                probe.publish(subject.clone(), "probe".into()).await.ok()?;
                probe.flush().await.ok()?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lock()
                    .unwrap()
                    .iter()
                    .any(|(s, _)| *s == subject)
                    .then_some(())
            }
        })
        .await;
    }

    // Through a follower: if the lease moves while the work runs (a loaded
    // machine can delay a renewal past the 3 s lease), the node worked
    // through may have become the leader, and nothing was forwarded; the
    // work is done again through a node that is a follower throughout.
    let mut tokens = Vec::new();
    let mut attempts = Vec::new();
    loop {
        let leader = c.leader().await;
        let via = (leader + 1) % 3;
        let agent = format!("edge-agent-{}", attempts.len());
        let agent_token = c.agent_token(&agent);
        tokens.push(agent_token.clone());
        let mut sc = c.identify(via, &agent, &agent_token).await;
        let mut client = c.client(via).await;
        let pushed = client.push(pinned(&agent, "through a follower")).await;
        let (task, generation) = sc.next_assign().await;
        assert_eq!(task, pushed.task_id);
        sc.accept(&task, generation).await;
        // A report that carries the token too (sidecars may send it): it is
        // stored without it, and relayed without it.
        sc.send(
            json!({"type": "task_progress", "task_id": task, "generation": generation,
                       "progress": 50, "token": agent_token}),
        )
        .await;
        sc.complete(&task, generation, json!({"ok": true})).await;
        assert_eq!(client.task(&task).await.task_id, task);
        let mut agents = client
            .watch_agents(pb::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(DEADLINE, agents.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drop(agents);
        let after = c.leader().await;
        attempts.push((leader, via, after));
        if after == leader {
            break;
        }
        eprintln!("edge: the lease moved during the work: {attempts:?}");
        assert!(attempts.len() < 3, "the lease kept moving: {attempts:?}");
    }
    // What was sent before the complete's ack reached the spy's server
    // before it: a message of the spy's own after that marks the end.
    spy.publish("edge.end", "end".into()).await.unwrap();
    spy.flush().await.unwrap();
    crate::helpers::eventually(|| async {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(s, _)| s == "edge.end")
            .then_some(())
    })
    .await;
    spying.abort();

    let seen = seen.lock().unwrap().clone();
    let forwarded = seen
        .iter()
        .filter(|(s, _)| s.starts_with("agenthub.rpc.") || s.starts_with("agenthub.agent.in."))
        .count();
    if forwarded == 0 {
        let subjects: std::collections::BTreeSet<&str> =
            seen.iter().map(|(s, _)| s.as_str()).collect();
        panic!(
            "the spy saw no forwarded call or relayed frame (leader, via, leader after: {attempts:?}); subjects: {subjects:?}{}",
            c.diagnose().await
        );
    }
    for secret in std::iter::once(&c.admin).chain(&tokens) {
        let leak = seen
            .iter()
            .find(|(_, bytes)| bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(
            leak.is_none(),
            "a token crossed NATS on {:?}",
            leak.map(|(s, _)| s)
        );
    }
}

/// A cluster on NATS servers that require TLS and a user and password,
/// through `--nats-ca`, `--nats-user` and `--nats-password`: it elects a
/// leader, takes a push through a follower and relays a sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_nats_with_tls_and_user_credentials() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("nats test CA");
    let ca_file = lab::write(certs.path(), "ca.pem", &ca.pem());
    let (cert, key, _) = ca.leaf("nats", &["127.0.0.1", "localhost"], false);
    let cert_file = lab::write(certs.path(), "nats.pem", &cert);
    let key_file = lab::write(certs.path(), "nats.key", &key);
    let conf = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n\
         authorization {{\n  users: [ {{ user: agenthub, password: \"s3cret-pass\" }} ]\n}}\n",
        cert_file.display(),
        key_file.display()
    );
    let nats = NatsCluster::start_with(&conf).await;
    // Without the credentials, nothing gets in.
    let refused = async_nats::ConnectOptions::new()
        .add_root_certificates(ca_file.clone())
        .require_tls(true)
        .connect(nats.urls()[0].as_str())
        .await;
    assert!(refused.is_err(), "connected without credentials");

    let ca_arg = ca_file.display().to_string();
    let c = HubCluster::start_on(
        nats,
        3,
        &[
            "--nats-ca",
            &ca_arg,
            "--nats-user",
            "agenthub",
            "--nats-password",
            "s3cret-pass",
        ],
    )
    .await;
    let leader = c.leader().await;
    let via = (leader + 1) % 3;
    let mut client = c.client(via).await;
    let issued = client
        .issue_token(pb::IssueTokenRequest {
            role: "agent".into(),
            agent_id: "tls-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut sc = c.identify(via, "tls-agent", &issued.token).await;
    let pushed = client.push(pinned("tls-agent", "over TLS")).await;
    let (task, _) = tokio::time::timeout(Duration::from_secs(20), sc.next_assign())
        .await
        .unwrap();
    assert_eq!(task, pushed.task_id);
}

/// A cluster on NATS servers in operator mode (decentralized JWT
/// authentication: an operator, an account with JetStream, a user), through
/// `--nats-creds`: every node reports SERVING under one leader, a push
/// through one node reaches a sidecar on another and a watch on the third
/// sees it complete. A node whose user belongs to an account the servers
/// do not know never serves and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_nats_with_a_creds_file() {
    let operator = Operator::new();
    let account = operator.account("agenthub", true);
    let stranger = operator.account("stranger", true);
    let dir = tempfile::tempdir().unwrap();
    let creds = lab::write(dir.path(), "agenthub.creds", &account.user_creds("hub"));
    let stranger_creds = lab::write(dir.path(), "stranger.creds", &stranger.user_creds("hub"));
    let nats = NatsCluster::start_with(&operator.server_conf(&[&account])).await;
    // Without a user JWT, or with one of an account the servers do not know,
    // nothing gets in.
    let refused = async_nats::connect(nats.urls()[0].as_str()).await;
    assert!(refused.is_err(), "connected without credentials");
    let refused = async_nats::ConnectOptions::with_credentials_file(&stranger_creds)
        .await
        .unwrap()
        .connect(nats.urls()[0].as_str())
        .await;
    assert!(
        refused.is_err(),
        "connected as a user of an unknown account"
    );

    let creds_arg = creds.display().to_string();
    let c = HubCluster::start_on(nats, 3, &["--nats-creds", &creds_arg]).await;
    for i in 0..3 {
        serving(c.node(i)).await;
    }
    let leader = c.leader().await;
    let (agent_node, push_node) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut client = c.client(push_node).await;
    let issued = client
        .issue_token(pb::IssueTokenRequest {
            role: "agent".into(),
            agent_id: "creds-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut sc = c.identify(agent_node, "creds-agent", &issued.token).await;
    let mut watch = c.client(leader).await.watch_after(0).await;
    let pushed = client
        .push(pinned("creds-agent", "over a creds file"))
        .await;
    let (task, generation) = tokio::time::timeout(DEADLINE, sc.next_assign())
        .await
        .unwrap();
    assert_eq!(task, pushed.task_id);
    sc.accept(&task, generation).await;
    sc.complete(&task, generation, json!({"ok": true})).await;
    let events = take_events(&mut watch, 4).await;
    let kinds: Vec<_> = events.iter().map(kind).collect();
    assert_eq!(kinds, [K::Created, K::Assigned, K::Accepted, K::Completed]);
    assert!(events.iter().all(|e| e.task_id == task));

    // A fourth node as a user of the unknown account: NATS refuses it, so
    // it never opens its listeners (prints no addresses); it says why and
    // keeps trying.
    let stranger_arg = stranger_creds.display().to_string();
    let urls = c.nats.url_list();
    let mut stranger = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["serve", "--print-addrs", "--ws-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("stranger"))
        .args(["--nats", &urls, "--node-id", "stranger"])
        .args(["--nats-creds", &stranger_arg])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(stranger.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(stranger.stderr.take().unwrap()).lines();
    let expected = [
        "authorization violation",
        "cannot set up the log in NATS yet; retrying",
    ];
    let mut said: Vec<String> = Vec::new();
    let saying = async {
        while !expected.iter().all(|e| said.iter().any(|l| l.contains(e))) {
            tokio::select! {
                line = stderr.next_line() => said.push(line.unwrap().expect("the node runs on")),
                line = stdout.next_line() => panic!("a node NATS refused printed {line:?}"),
            }
        }
    };
    let said_it = tokio::time::timeout(DEADLINE, saying).await.is_ok();
    assert!(said_it, "the refused node said: {said:#?}");
    assert!(stranger.try_wait().unwrap().is_none(), "{said:#?}");
}
