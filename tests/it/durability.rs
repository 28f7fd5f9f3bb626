//! SIGKILL the hub process mid-traffic: nothing acknowledged is lost, and
//! sequence numbers continue without reuse.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use agenthub::client::connect;
use agenthub::pb;
use serde_json::json;

use crate::helpers::*;

fn issue_agent_token(dir: &std::path::Path, agent: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["token", "issue", "--agent", agent, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn sigkill_loses_nothing_acknowledged_and_seq_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut proc = HubProcess::spawn(dir, &[]).await;
    let admin = admin_token(dir);
    let token = issue_agent_token(dir, "dur");

    let mut sc = Sidecar::connect(&format!("ws://{}/ws", proc.ws_addr)).await;
    sc.send(
        json!({"type": "identify", "agent_id": "dur", "token": token, "max_concurrency": 10000}),
    )
    .await;
    assert_eq!(sc.recv().await["type"], "identified");

    let pushed: Arc<Mutex<HashSet<String>>> = Default::default();
    // task_id -> strongest acked report ("accepted" < "complete").
    let acked: Arc<Mutex<HashMap<String, String>>> = Default::default();
    let max_seen_seq = Arc::new(Mutex::new(0u64));

    // The sidecar accepts every task and completes every other one, as fast as it can.
    let acked2 = acked.clone();
    let sidecar = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(msg) = sc.try_recv(std::time::Duration::from_secs(5)).await {
            match msg["type"].as_str() {
                Some("task_assign") => {
                    let id = msg["task_id"].as_str().unwrap().to_string();
                    let g = msg["generation"].as_u64().unwrap();
                    sc.send(json!({"type": "task_accepted", "task_id": id, "generation": g}))
                        .await;
                    n += 1;
                    if n.is_multiple_of(2) {
                        sc.send(json!({"type": "task_complete", "task_id": id, "generation": g, "result": n}))
                            .await;
                    }
                }
                Some("task_ack") => {
                    let id = msg["task_id"].as_str().unwrap().to_string();
                    let status = msg["status"].as_str().unwrap().to_string();
                    let mut a = acked2.lock().unwrap();
                    let e = a.entry(id).or_default();
                    if status == "complete" || e.is_empty() {
                        *e = status;
                    }
                }
                _ => {}
            }
        }
    });

    // 4 concurrent orchestrators push 1000 tasks in all.
    let grpc = proc.grpc_addr.to_string();
    let mut pushers = Vec::new();
    for p in 0..4 {
        let (grpc, admin, pushed) = (grpc.clone(), admin.clone(), pushed.clone());
        pushers.push(tokio::spawn(async move {
            let mut c = connect(&grpc, &admin).await.unwrap();
            for i in 0..250 {
                let mut req = pinned("dur", "d");
                req.task_id = format!("dur-{p}-{i}");
                match c.push_task(req).await {
                    Ok(r) => {
                        pushed.lock().unwrap().insert(r.into_inner().task_id);
                    }
                    Err(_) => return, // the hub died under us
                }
            }
        }));
    }
    // Kill once a good share of the work is acknowledged.
    eventually(|| {
        let n = pushed.lock().unwrap().len();
        let done = acked
            .lock()
            .unwrap()
            .values()
            .filter(|s| *s == "complete")
            .count();
        async move { (n >= 400 && done >= 100).then_some(()) }
    })
    .await;
    {
        let mut c = connect(&grpc, &admin).await.unwrap();
        let page = c
            .list_tasks(pb::ListTasksRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        *max_seen_seq.lock().unwrap() = page.into_inner().as_of_seq;
    }
    proc.kill9();
    proc.wait_exit().await;
    for p in pushers {
        let _ = p.await;
    }
    let _ = sidecar.await;

    let pushed = pushed.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    assert!(pushed.len() >= 400);
    eprintln!(
        "killed after {} pushes returned, {} reports acked",
        pushed.len(),
        acked.len()
    );

    let mut proc = HubProcess::spawn(dir, &[]).await;
    let mut c = connect(&proc.grpc_addr.to_string(), &admin).await.unwrap();
    // Every pushed task is there; every acked report is reflected.
    let mut tasks = HashMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for t in page.tasks {
            tasks.insert(t.task_id.clone(), t);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    for id in &pushed {
        assert!(tasks.contains_key(id), "pushed task {id} lost");
    }
    for (id, status) in &acked {
        let state = state_of(&tasks[id]);
        match status.as_str() {
            "complete" => assert_eq!(state, pb::task::State::Completed, "{id}"),
            _ => assert!(
                matches!(state, pb::task::State::Running | pb::task::State::Completed),
                "{id} acked accepted but is {state:?}"
            ),
        }
    }
    // The stored history is gap-free and seq continues after it.
    let mut watch = c.watch_after(0).await;
    let page = c
        .list_tasks(pb::ListTasksRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = page.as_of_seq;
    assert!(last >= *max_seen_seq.lock().unwrap());
    let evs = take_events(&mut watch, last as usize).await;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    let mut req = pinned("dur", "after restart");
    req.queue_if_offline = true;
    let fresh = c.push(req).await;
    let t = c.task(&fresh.task_id).await;
    assert_eq!(t.last_seq, last + 1, "seq continues without reuse");
    proc.kill9();
    proc.wait_exit().await;
}

#[tokio::test]
async fn sigterm_closes_sockets_with_a_close_frame_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut proc = HubProcess::spawn(tmp.path(), &[]).await;
    let token = issue_agent_token(tmp.path(), "s");
    let mut sc = Sidecar::connect(&format!("ws://{}/ws", proc.ws_addr)).await;
    sc.send(json!({"type": "identify", "agent_id": "s", "token": token}))
        .await;
    assert_eq!(sc.recv().await["type"], "identified");
    let admin = admin_token(tmp.path());
    let mut c = connect(&proc.grpc_addr.to_string(), &admin).await.unwrap();
    let t = c.push(pinned("s", "x")).await;
    let (id, g) = sc.next_assign().await;
    sc.accept(&id, g).await;

    let pid = proc.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(sc.recv_close().await, Some(1001));
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");

    // Everything acked before the shutdown is there after a restart.
    let proc = HubProcess::spawn(tmp.path(), &[]).await;
    let mut c = connect(&proc.grpc_addr.to_string(), &admin).await.unwrap();
    let task = c.task(&t.task_id).await;
    assert_eq!(state_of(&task), pb::task::State::Running);
}

/// Run the CLI without blocking the runtime the in-process hub runs on.
async fn cli(args: &[&str], token: &str, grpc: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(args)
        .env("AGENTHUB_TOKEN", token)
        .env("AGENTHUB_GRPC_ADDR", grpc)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn cli_pushes_lists_watches_and_manages_tokens() {
    let hub = TestHub::start().await;
    let dir = hub.dir.to_str().unwrap().to_string();
    let grpc = hub.grpc_addr.to_string();
    let admin = hub.admin_token.clone();
    let mut sc = hub.sidecar("cli-agent").await;

    let out = cli(
        &[
            "push",
            "--agent",
            "cli-agent",
            "-d",
            "from cli",
            "--metadata",
            r#"{"k":[1,2]}"#,
        ],
        &admin,
        &grpc,
    )
    .await;
    let pushed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let id = pushed["task_id"].as_str().unwrap().to_string();
    let (got, g) = sc.next_assign().await;
    assert_eq!(got, id);
    sc.accept(&id, g).await;
    sc.complete(&id, g, json!({"ok": true})).await;

    let listed = cli(&["tasks", "list", "--state", "completed"], &admin, &grpc).await;
    let line: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(line["task_id"], id.as_str());
    assert_eq!(line["metadata"], json!({"k": [1, 2]}));
    let shown: serde_json::Value =
        serde_json::from_str(&cli(&["tasks", "get", &id], &admin, &grpc).await).unwrap();
    assert_eq!(shown["result"], json!({"ok": true}));
    let agents = cli(&["agents"], &admin, &grpc).await;
    assert!(agents.contains("\"cli-agent\""));

    // `watch --after 0` replays the history as JSON lines.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["watch", "--after", "0"])
        .env("AGENTHUB_TOKEN", &admin)
        .env("AGENTHUB_GRPC_ADDR", &grpc)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        kinds.push(v["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, ["CREATED", "ASSIGNED", "ACCEPTED", "COMPLETED"]);
    let _ = child.kill().await;

    // Tokens: issue prints only the token; list never shows secrets; revoke locks the agent out.
    let t = cli(
        &["token", "issue", "--agent", "temp", "--data-dir", &dir],
        "",
        "",
    )
    .await;
    let secret = t.trim().to_string();
    assert_eq!(secret.len(), 64);
    let list = cli(&["token", "list", "--data-dir", &dir], "", "").await;
    assert!(!list.contains(&secret));
    let entry = list.lines().find(|l| l.contains("\"temp\"")).unwrap();
    let tok_id = serde_json::from_str::<serde_json::Value>(entry).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    cli(&["token", "revoke", &tok_id, "--data-dir", &dir], "", "").await;
    let mut s = Sidecar::connect(&hub.ws_url()).await;
    s.send(json!({"type": "identify", "agent_id": "temp", "token": secret}))
        .await;
    assert_eq!(s.recv().await["error"], "invalid_token");
}
