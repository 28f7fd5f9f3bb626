//! The HTTP listener: `/ws` (sidecars), `/health`, `/metrics`, and
//! `POST /api/admin/push-task` (the original HTTP push endpoint).

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::Access;
use crate::error::Error;
use crate::hub::{Hub, PushRequest};
use crate::listener::ConnInfo;
use crate::model::JsonObject;
use crate::ws::upgrade::UpgradeGate;

/// tungstenite's default read buffer is 128 KiB per connection; sidecar
/// frames are small (the buffer grows for a bigger frame). 1 KiB keeps an
/// idle sidecar under 7 KiB of hub memory (docs/benchmarks.md).
pub const WS_READ_BUFFER: usize = 1024;
pub const WS_WRITE_BUFFER: usize = 1024;
/// The largest frame the hub writes: a `task_assign` carrying a PushTask of
/// up to the gRPC message limit (4 MiB). Backpressure beyond one frame is the
/// bounded outbound queue's job.
pub const WS_MAX_WRITE_BUFFER: usize = 8 * 1024 * 1024;

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
    /// Origin, client certificate and identify limits for `/ws`.
    gate: Arc<UpgradeGate>,
    /// Every upgraded socket's task, so shutdown can wait for them to close.
    sessions: TaskTracker,
}

/// The HTTP routes. Upgraded WebSocket sessions are tracked in `sessions`
/// (they outlive the HTTP request); they end when `shutdown` turns true.
pub fn router(hub: Arc<Hub>, shutdown: watch::Receiver<bool>, sessions: TaskTracker) -> Router {
    let gate = Arc::new(UpgradeGate::new(&hub));
    Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/admin/push-task", post(push_task))
        .with_state(AppState {
            hub,
            shutdown,
            gate,
            sessions,
        })
}

async fn ws_upgrade(
    State(st): State<AppState>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let admission = match st.gate.check(&headers, conn.as_ref().map(|c| &c.0)) {
        Ok(a) => a,
        Err(refused) => return refused.respond(ws),
    };
    let max = st.hub.config().max_message_bytes;
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let token = st.sessions.token();
            let start = Box::new(crate::ws::session::Start {
                socket,
                hub: st.hub,
                shutdown: st.shutdown,
                admission,
            });
            async move {
                crate::ws::session::run(start).await;
                drop(token);
            }
        })
}

/// 200 `{"status":"ok",...}`, or 503 `{"status":"degraded","reason":..}`
/// while the store refuses writes. Cluster mode adds `node_id`, `role` and
/// `leader`, and answers 503 `{"status":"unavailable","reason":..}` while
/// the node cannot serve (no known leader, or its copy is catching up).
async fn health(State(st): State<AppState>) -> Response {
    let h = st.hub.health();
    let mut body = json!({
        "status": if h.degraded.is_some() { "degraded" } else { "ok" },
        "agents_connected": h.agents_connected,
        "tasks_queued": h.tasks_queued,
        "last_seq": h.last_seq,
        "log_id": st.hub.log_id(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(node_id) = &h.node_id {
        body["node_id"] = Value::from(node_id.clone());
        body["leader"] = h.leader.clone().map(Value::from).unwrap_or(Value::Null);
        body["role"] = h.role.map(Value::from).unwrap_or(Value::Null);
    }
    if let (None, Some(reason)) = (h.degraded, h.not_ready) {
        body["status"] = Value::from("unavailable");
        body["reason"] = Value::from(reason);
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    match h.degraded {
        Some(reason) => {
            body["reason"] = Value::from(reason);
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        None => Json(body).into_response(),
    }
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.hub.render_metrics(),
    )
}

#[derive(Deserialize)]
struct PushBody {
    agent_id: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: Option<JsonObject>,
    #[serde(default)]
    task_id: Option<String>,
}

fn error_response(e: Error) -> Response {
    let (status, msg) = e.http();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({"error": msg}))).into_response()
}

async fn push_task(State(st): State<AppState>, headers: HeaderMap, body: String) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = match st.hub.verifier().verify_bearer(auth) {
        Ok(p) => p,
        Err(e) => return error_response(e),
    };
    if let Err(e) = principal.allow(Access::Write) {
        return error_response(e);
    }
    let body: PushBody = match serde_json::from_str(&body) {
        Ok(b) => b,
        Err(e) => return error_response(Error::InvalidArgument(format!("invalid body: {e}"))),
    };
    if body.agent_id.is_empty() {
        return error_response(Error::InvalidArgument("agent_id is required".into()));
    }
    let req = PushRequest {
        agent_id: Some(body.agent_id),
        description: body.description,
        metadata: body.metadata.unwrap_or_default(),
        task_id: body.task_id,
        ..PushRequest::default()
    };
    match st.hub.push_task(req).await {
        Ok(out) => Json(json!({
            "status": "pushed",
            "task_id": out.task.task_id,
            "agent_id": out.task.agent_id,
        }))
        .into_response(),
        Err(e) => error_response(e),
    }
}
