//! Operating the binaries as an operator would: logs on pipes (no colour),
//! JSON logs a shipper can parse, readiness for a service manager.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use agenthub::client::connect;
use agenthub::pb;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::helpers::{admin_token, WAIT};

/// An `agenthub` process with stdout and stderr on pipes, both collected.
pub struct Piped {
    pub child: tokio::process::Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Piped {
    /// Run `agenthub ARGS` with `env` (and no `NO_COLOR`, `RUST_LOG` or
    /// `AGENTHUB_LOG*` from the test's own environment).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Piped {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(args)
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .env_remove("AGENTHUB_LOG")
            .env_remove("AGENTHUB_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            tokio::spawn(collect(child.stdout.take().unwrap(), stdout.clone())),
            tokio::spawn(collect(child.stderr.take().unwrap(), stderr.clone())),
        ];
        Piped {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Wait for a stdout line starting with `prefix`; returns the rest.
    pub async fn stdout_line(&self, prefix: &str) -> String {
        crate::helpers::eventually(|| async {
            let out = String::from_utf8_lossy(&self.stdout.lock().unwrap()).to_string();
            out.lines()
                .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
        })
        .await
    }

    /// SIGTERM, wait for the exit, and return (stdout, stderr).
    pub async fn stop(mut self) -> (Vec<u8>, Vec<u8>) {
        let pid = self.child.id().expect("running");
        crate::smoke::harness::signal(pid, "TERM");
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(WAIT, r).await;
        }
        let out = std::mem::take(&mut *self.stdout.lock().unwrap());
        let err = std::mem::take(&mut *self.stderr.lock().unwrap());
        (out, err)
    }
}

async fn collect(mut from: impl AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        into.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// A hub process on `dir` (port 0) with extra args and env; its addresses.
pub async fn hub(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Piped, String, String) {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["serve", "--ws-addr", "127.0.0.1:0", "--grpc-addr"];
    args.extend(["127.0.0.1:0", "--print-addrs", "--data-dir", dir]);
    args.extend(extra);
    let p = Piped::spawn(&args, env);
    let addrs = p.stdout_line("ws=").await;
    let (ws, grpc) = addrs.split_once(" grpc=").unwrap();
    (p, ws.to_string(), grpc.to_string())
}

/// Issue an agent token through the CLI (its own log on pipes too).
fn agent_token(data: &Path, agent: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
        .args(["token", "issue", "--agent", agent, "--data-dir"])
        .arg(data)
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(out.status.success(), "token issue: {out:?}");
    assert!(!out.stderr.contains(&0x1b), "CLI wrote an escape byte");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A reference sidecar for `agent` on `ws` running `script` per task.
fn sidecar(tmp: &Path, data: &Path, ws: &str, agent: &str, script: &str, extra: &[&str]) -> Piped {
    let token = agent_token(data, agent);
    let url = format!("ws://{ws}/ws");
    let state: PathBuf = tmp.join(format!("{agent}.state.json"));
    let mut args = vec!["sidecar", "--hub", &url, "--agent", agent, "--state-file"];
    args.push(state.to_str().unwrap());
    args.extend(extra);
    args.extend(["--", "sh", "-c", script]);
    Piped::spawn(&args, &[("AGENTHUB_TOKEN", &token)])
}

/// Push one task for `agent` and wait until it COMPLETED.
async fn push_and_wait(grpc: &str, data: &Path, agent: &str) -> String {
    let mut client = connect(grpc, &admin_token(data)).await.unwrap();
    let resp = client
        .push_task(pb::PushTaskRequest {
            agent_id: agent.into(),
            description: "say hi".into(),
            queue_if_offline: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let task = client
        .wait_task(pb::WaitTaskRequest {
            task_id: resp.task_id.clone(),
            timeout_ms: WAIT.as_millis() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.state, pb::task::State::Completed as i32, "{task:?}");
    resp.task_id
}

/// Hub and sidecar with stdout and stderr on pipes (and `NO_COLOR` unset):
/// not one ANSI escape byte in what they write.
#[tokio::test]
async fn logs_on_pipes_have_no_escape_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (hub, ws, grpc) = hub(&data, &[], &[("AGENTHUB_LOG", "debug")]).await;
    let sc = sidecar(tmp.path(), &data, &ws, "a1", "echo hi", &[]);
    push_and_wait(&grpc, &data, "a1").await;
    let (_, sc_err) = sc.stop().await;
    let (out, err) = hub.stop().await;
    let hub_err = String::from_utf8_lossy(&err);
    assert!(hub_err.contains("task COMPLETED"), "{hub_err}");
    assert!(!String::from_utf8_lossy(&sc_err).is_empty());
    for (name, bytes) in [
        ("hub stdout", &out),
        ("hub stderr", &err),
        ("sidecar", &sc_err),
    ] {
        assert!(
            !bytes.contains(&0x1b),
            "{name} has an escape byte:\n{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// Parse every line as a JSON object (panics on one that is not).
fn json_lines(bytes: &[u8], who: &str) -> Vec<serde_json::Map<String, Value>> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => o,
            _ => panic!("{who}: not a JSON object: {l:?}"),
        })
        .collect()
}

/// `--log-format json`: every line of the hub and the sidecar parses as a
/// JSON object; every line of the hub about the task (created, assigned,
/// accepted, completed) carries its `task_id` and `agent_id` from the task's
/// span; the sidecar's lines carry its `agent_id`, and those about the task
/// its `task_id`.
#[tokio::test]
async fn json_logs_parse_and_task_lines_carry_task_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let env = [("AGENTHUB_LOG_FORMAT", "json")];
    let (hub, ws, grpc) = hub(&data, &[], &env).await;
    let sc = sidecar(
        tmp.path(),
        &data,
        &ws,
        "a1",
        "echo hi",
        &["--log-format", "json"],
    );
    let task_id = push_and_wait(&grpc, &data, "a1").await;
    let (_, sc_err) = sc.stop().await;
    let (_, err) = hub.stop().await;

    let hub_lines = json_lines(&err, "hub");
    let about_task: Vec<_> = hub_lines
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or("").starts_with("task "))
        .collect();
    let said: Vec<&str> = about_task
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    for kind in ["CREATED", "ASSIGNED", "ACCEPTED", "COMPLETED"] {
        assert!(said.contains(&&*format!("task {kind}")), "{said:?}");
    }
    for l in &about_task {
        assert_eq!(l["task_id"], task_id.as_str(), "{l:?}");
        assert_eq!(l["agent_id"], "a1", "{l:?}");
    }
    let identified = hub_lines
        .iter()
        .find(|l| l["message"] == "sidecar identified")
        .expect("identify logged");
    assert_eq!(identified["agent_id"], "a1");

    let sc_lines = json_lines(&sc_err, "sidecar");
    assert!(!sc_lines.is_empty());
    for l in &sc_lines {
        assert_eq!(l["agent_id"], "a1", "{l:?}");
    }
    let succeeded = sc_lines
        .iter()
        .find(|l| l["message"] == "command succeeded")
        .expect("sidecar logs the command's end");
    assert_eq!(succeeded["task_id"], task_id.as_str());
}

/// Under `Type=notify`, systemd hears `READY=1` once both listeners accept
/// and the store is open (a push succeeds right after it), and
/// `STOPPING=1` when the hub begins to shut down.
#[tokio::test]
async fn the_hub_notifies_readiness_and_stopping_on_notify_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let path = tmp.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    let (hub, ws, grpc) = hub(&data, &[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]).await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("READY=1 in time")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1");
    tokio::net::TcpStream::connect(&ws)
        .await
        .expect("ws listener accepts");
    let mut client = connect(&grpc, &admin_token(&data)).await.unwrap();
    client
        .push_task(pb::PushTaskRequest {
            description: "after ready".into(),
            queue_if_offline: true,
            ..Default::default()
        })
        .await
        .expect("the store takes a push");
    let pid = hub.child.id().unwrap();
    crate::smoke::harness::signal(pid, "TERM");
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("STOPPING=1 in time")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "STOPPING=1");
    hub.stop().await;
}

/// `deploy/agenthub.service` passes `systemd-analyze verify` (with
/// `ExecStart` pointed at this build). Skipped where systemd-analyze is
/// not installed.
#[test]
fn the_service_unit_passes_systemd_analyze_verify() {
    let found = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("systemd-analyze not installed; unit not verified");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/agenthub.service"
    ))
    .unwrap();
    assert!(unit.contains("\nType=notify\n"));
    assert!(unit.contains("\nStateDirectory=agenthub\n"));
    let unit = unit.replace("/usr/local/bin/agenthub", env!("CARGO_BIN_EXE_agenthub"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agenthub.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on some problems (an unknown value is "ignored"):
    // any complaint about the unit itself fails the test.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("agenthub.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );
}

/// One task's trace, end to end: a real OTLP/gRPC receiver (Python grpcio
/// serving opentelemetry-proto's TraceService), the hub exporting to it, the
/// reference sidecar running a command that records `$TRACEPARENT`, and the
/// Python client pushing one task with `traceparent=` and one inside a
/// current OpenTelemetry context. Each task's hub spans (created, assigned,
/// accepted, completed) are children of the orchestrator's span in its
/// trace, the sidecar's span for the run is in that trace, and the command
/// saw a traceparent of that trace.
#[tokio::test]
async fn a_task_is_one_trace_from_orchestrator_to_agent_command() {
    use tokio::io::AsyncBufReadExt;
    let (python, interop) = crate::interop::require_deps();
    let mut receiver = tokio::process::Command::new(&python)
        .arg(interop.join("otlp_receiver.py"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut spans_out = tokio::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, spans_out.next_line())
        .await
        .expect("receiver listening in time")
        .unwrap()
        .unwrap();
    let port = first.strip_prefix("port=").expect("port line").to_string();

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let endpoint = format!("http://127.0.0.1:{port}");
    let (hub, ws, grpc) = hub(&data, &["--otlp-endpoint", &endpoint], &[]).await;
    let seen = tmp.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let script = format!(
        r#"printf '%s' "$TRACEPARENT" > "{}/$AGENTHUB_TASK_ID""#,
        seen.display()
    );
    let sc = sidecar(
        tmp.path(),
        &data,
        &ws,
        "a1",
        &script,
        &["--otlp-endpoint", &endpoint],
    );

    let explicit = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let current = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let out = tokio::process::Command::new(&python)
        .arg(interop.join("trace_push.py"))
        .args([
            "--grpc",
            &grpc,
            "--token",
            &admin_token(&data),
            "--agent",
            "a1",
        ])
        .args(["--traceparent", explicit, "--current", current])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    sc.stop().await;
    // The hub exports what it still holds as it stops: after its exit the
    // receiver has printed every span.
    hub.stop().await;
    receiver.start_kill().unwrap();
    let mut spans = Vec::new();
    while let Ok(Some(line)) = spans_out.next_line().await {
        spans.push(serde_json::from_str::<Value>(&line).unwrap());
    }

    for (which, tp) in [("explicit", explicit), ("current", current)] {
        let task_id = ids[which].as_str().unwrap();
        let (_, rest) = tp.split_once('-').unwrap();
        let (trace_id, rest) = rest.split_once('-').unwrap();
        let (parent_id, _) = rest.split_once('-').unwrap();
        let of_task: Vec<&Value> = spans
            .iter()
            .filter(|s| s["attributes"]["task_id"] == task_id && s["service"] == "agenthub")
            .collect();
        let names: Vec<&str> = of_task
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        for kind in ["CREATED", "ASSIGNED", "ACCEPTED", "COMPLETED"] {
            assert!(
                names.contains(&&*format!("task {kind}")),
                "{which}: {names:?}"
            );
        }
        for s in &of_task {
            assert_eq!(s["trace_id"], trace_id, "{which}: {s}");
            assert_eq!(s["parent_span_id"], parent_id, "{which}: {s}");
        }
        // The sidecar's span for the command's run is in the trace too.
        let run = spans
            .iter()
            .find(|s| s["service"] == "agenthub-sidecar" && s["attributes"]["task_id"] == task_id)
            .unwrap_or_else(|| panic!("{which}: no sidecar span in {spans:?}"));
        assert_eq!(run["trace_id"], trace_id, "{which}: {run}");
        let saw = std::fs::read_to_string(seen.join(task_id)).unwrap();
        assert!(
            saw.starts_with(&format!("00-{trace_id}-")),
            "{which}: the command saw {saw:?}"
        );
    }
}

/// Cluster mode: a node's JSON lines about a task and about a sidecar
/// carry its `node_id` (from the task and sidecar spans).
#[tokio::test]
async fn cluster_json_logs_carry_node_id() {
    let nats = crate::cluster::nats::NatsCluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("n0");
    let urls = nats.url_list();
    let args = ["--nats", &urls, "--node-id", "n0", "--log-format", "json"];
    let (hub, ws, grpc) = hub(&data, &args, &[]).await;
    let admin = crate::helpers::eventually(|| async {
        std::fs::read_to_string(data.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
    })
    .await;
    let mut client = connect(&grpc, &admin).await.unwrap();
    // Until the node leads, pushes are refused as unavailable.
    let task_id = crate::helpers::eventually(|| {
        let mut client = client.clone();
        async move {
            let req = pb::PushTaskRequest {
                agent_id: "a1".into(),
                task_id: "cluster-log-task".into(),
                queue_if_offline: true,
                ..Default::default()
            };
            client
                .push_task(req)
                .await
                .ok()
                .map(|r| r.into_inner().task_id)
        }
    })
    .await;
    let token = client
        .issue_token(pb::IssueTokenRequest {
            role: "agent".into(),
            agent_id: "a1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let url = format!("ws://{ws}/ws");
    let mut sc =
        crate::helpers::Sidecar::send_identify(&url, "a1", &token, serde_json::json!({})).await;
    sc.recv_type("identified").await;
    let (id, generation) = sc.next_assign().await;
    assert_eq!(id, task_id);
    sc.accept(&id, generation).await;
    drop(sc);
    let (_, err) = hub.stop().await;
    let lines = json_lines(&err, "cluster node");
    let about_task: Vec<_> = lines
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or("").starts_with("task "))
        .collect();
    assert!(about_task.len() >= 3, "{about_task:?}");
    for l in &about_task {
        assert_eq!(l["node_id"], "n0", "{l:?}");
        assert_eq!(l["task_id"], task_id.as_str(), "{l:?}");
    }
    let identified = lines
        .iter()
        .find(|l| l["message"] == "sidecar identified")
        .expect("identify logged");
    assert_eq!(identified["node_id"], "n0", "{identified:?}");
    assert_eq!(identified["agent_id"], "a1", "{identified:?}");
}
