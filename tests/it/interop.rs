//! Interop: clients that share no code with the hub. A Node.js sidecar
//! written with the npm `ws` package speaks the JSON protocol
//! (`tests/interop/sidecar.js`); a Python client whose stubs are generated
//! here from `proto/agenthub/v1/hub.proto` by grpcio-tools pushes the task
//! and watches its events (`tests/interop/client.py`).
//!
//! Needs `scripts/test-deps.sh` (npm `ws` in tests/interop/node_modules,
//! grpcio + grpcio-tools in .venv). Without them the test fails, saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agenthub::pb;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use crate::helpers::{admin_token, ClientExt, HubProcess};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interop toolchain, or a failure that says how to get it.
pub(crate) fn require_deps() -> (PathBuf, PathBuf) {
    let python = root().join(".venv/bin/python");
    let ws = root().join("tests/interop/node_modules/ws/package.json");
    let mut missing = Vec::new();
    if !python.exists() {
        missing.push(format!(
            "{} (Python venv with grpcio, grpcio-tools)",
            python.display()
        ));
    }
    if !ws.exists() {
        missing.push(format!("{} (npm `ws`)", ws.display()));
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("`node` on PATH".to_string());
    }
    assert!(
        missing.is_empty(),
        "interop test dependencies are missing: {}. Run scripts/test-deps.sh (scripts/test.sh does) first.",
        missing.join("; ")
    );
    (python, root().join("tests/interop"))
}

/// Generate the Python gRPC stubs from the proto into `out`.
pub(crate) fn generate_stubs(python: &Path, out: &Path) {
    let status = std::process::Command::new(python)
        .current_dir(root())
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("proto/agenthub/v1/hub.proto")
        .status()
        .expect("run grpc_tools.protoc");
    assert!(status.success(), "grpc_tools.protoc failed: {status}");
    assert!(out.join("agenthub/v1/hub_pb2_grpc.py").exists());
}

/// Every number as an f64, so `7` and `7.0` compare equal.
fn as_f64(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.into_iter().map(as_f64).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, as_f64(v))).collect()),
        other => other,
    }
}

#[tokio::test]
async fn node_ws_sidecar_and_python_grpc_client_interoperate() {
    let (python, interop) = require_deps();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let stubs = tmp.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    generate_stubs(&python, &stubs);

    let hub = HubProcess::spawn(&data, &[]).await;
    let admin = admin_token(&data);
    let token = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agenthub"))
            .args(["token", "issue", "--agent", "node-agent", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };

    // The Node sidecar: connect, identify, wait for one task.
    let mut node = tokio::process::Command::new("node")
        .arg(interop.join("sidecar.js"))
        .env("AGENTHUB_WS_URL", format!("ws://{}/ws", hub.ws_addr))
        .env("AGENTHUB_AGENT_ID", "node-agent")
        .env("AGENTHUB_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let mut node_out = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(15), node_out.next_line())
        .await
        .expect("node sidecar identifies in time")
        .unwrap();
    assert_eq!(
        first.as_deref(),
        Some("identified"),
        "node sidecar said {first:?}"
    );

    // The Python client: push pinned to node-agent, watch until COMPLETED.
    let client = tokio::process::Command::new(&python)
        .arg(interop.join("client.py"))
        .args(["--grpc", &hub.grpc_addr.to_string(), "--token", &admin])
        .args(["--agent", "node-agent", "--task-id", "interop-task-1"])
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
    // google.protobuf.Struct carries numbers as doubles: compare them as such.
    let summary = as_f64(serde_json::from_slice(&client.stdout).expect("python prints JSON"));

    let node_done = tokio::time::timeout(Duration::from_secs(15), node_out.next_line())
        .await
        .expect("node sidecar reports done")
        .unwrap();
    assert_eq!(node_done.as_deref(), Some(r#"{"done":"interop-task-1"}"#));
    let status = tokio::time::timeout(Duration::from_secs(10), node.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "node sidecar exited with {status}");

    assert_eq!(summary["task_id"], "interop-task-1");
    assert_eq!(summary["created"], true);
    assert_eq!(
        summary["retry_created"], false,
        "an identical PushTask is a safe retry"
    );
    assert_eq!(summary["unauthenticated_without_token"], true);
    assert_eq!(
        summary["kinds"],
        json!([
            "CREATED",
            "ASSIGNED",
            "ACCEPTED",
            "PROGRESS",
            "PROGRESS",
            "COMPLETED"
        ])
    );
    let seqs: Vec<f64> = serde_json::from_value(summary["seqs"].clone()).unwrap();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs increase: {seqs:?}"
    );
    assert_eq!(
        summary["progress"],
        as_f64(json!([50, {"stage": "almost", "percent": 90}]))
    );
    assert_eq!(summary["state"], "COMPLETED");
    assert_eq!(summary["generation"], 1.0);
    let metadata = as_f64(json!({"lang": "python", "n": 7, "nested": {"ok": true}}));
    assert_eq!(summary["metadata"], metadata);
    assert_eq!(summary["result"]["echoed"], "interop: hello from python");
    assert_eq!(
        summary["result"]["metadata"], metadata,
        "metadata crossed gRPC → hub → WebSocket → hub → gRPC"
    );
    assert!(summary["result"]["runtime"]
        .as_str()
        .unwrap()
        .starts_with("node v"));

    // The hub's own client sees the same task.
    let mut rust_client = agenthub::client::connect(&hub.grpc_addr.to_string(), &admin)
        .await
        .unwrap();
    let task = rust_client.task("interop-task-1").await;
    assert_eq!(task.agent_id, "node-agent");
    assert_eq!(task.priority, pb::Priority::High as i32);
}
