//! gRPC calls made to a follower, carried to the leader over core NATS.
//!
//! A follower's `TaskHub` service forwards every call but `WatchTaskEvents`
//! (which each node serves from its own copy of the log): the request's
//! path, metadata and body go to the subject of the current leadership
//! ([`rpc_subject`](crate::cluster::rpc_subject): only that leader listens, so a deposed one never runs
//! a call meant for its successor); the leader runs the call through its
//! own service (authentication included) and streams back the response
//! head, each body frame and the trailers to the caller's inbox.
//! Server-streaming calls (`WatchAgents`, `WatchTaskOutput`) work the same
//! way; when the caller goes away, the follower tells the leader to stop.
//!
//! A call that arrives while the node is not ready (an election under way)
//! waits for a leader, within its deadline and at most about 2 × the lease,
//! before it answers `UNAVAILABLE`. A call that reached no leader, or whose
//! leader went away before answering, is sent again to the next one when
//! sending it twice is harmless: reads, and `PushTask`, which the follower
//! gives a `task_id` before it forwards it (a second run answers
//! `created=false`).
//!
//! **Files.** `forward.rs` is a follower's side ([`Forward`]: each call
//! carried to the leader, and its answer back); `serve.rs` is the leader's
//! ([`serve`]: the calls followers forward, run through its own service).
//! This one holds the wire both sides speak: its headers, keep-alives and
//! how HTTP headers ride in NATS headers.

mod forward;
mod serve;

use std::sync::Arc;

use async_nats::HeaderMap;
use axum::http;
use bytes::Bytes;

use super::Node;

pub use forward::Forward;
pub use serve::serve;

pub(super) const HDR_PATH: &str = "Agenthub-Path";
pub(super) const HDR_KIND: &str = "Agenthub-Kind";
pub(super) const HDR_NODE: &str = "Agenthub-Node";
pub(super) const HDR_STATUS: &str = "Agenthub-Status";
/// Every message of an answer after its head: 1, 2, 3, ... A gap means
/// NATS lost part of the answer (a connection broke).
pub(super) const HDR_SEQ: &str = "Agenthub-Seq";
/// Prefix of carried HTTP headers (and trailers).
pub(super) const HTTP_PREFIX: &str = "Http-";

/// Kind of the keep-alives each side of a forwarded call sends every third
/// of a lease while the call runs (not numbered: they carry no answer).
/// A side that hears nothing from the other for 2 × the lease ends the
/// call: the leader frees what a follower that died held (a watch slot),
/// the follower answers UNAVAILABLE instead of waiting for an answer whose
/// end was lost.
pub(super) const KIND_ALIVE: &str = "alive";

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publish a keep-alive to `subject` every third of a lease until dropped.
pub(super) fn keep_alive(node: &Arc<Node>, subject: String) -> AbortOnDrop {
    let client = node.client.clone();
    let every = node.options.lease / 3;
    let mut h = HeaderMap::new();
    h.insert(HDR_KIND, KIND_ALIVE);
    h.insert(HDR_NODE, node.node_id());
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = client
                .publish_with_headers(subject.clone(), h.clone(), Bytes::new())
                .await;
        }
    }))
}

/// Copy HTTP headers into NATS headers (prefixed).
pub(super) fn carry(from: &http::HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if matches!(
            name.as_str(),
            "te" | "content-length" | "host" | "connection" | "transfer-encoding" | "authorization"
        ) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            to.append(format!("{HTTP_PREFIX}{}", name.as_str()).as_str(), v);
        }
    }
}

/// The HTTP headers carried in NATS headers.
pub(super) fn uncarry(from: &Option<HeaderMap>) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    if let Some(h) = from {
        for (name, values) in h.iter() {
            let name = name.to_string();
            let Some(http_name) = name.strip_prefix(HTTP_PREFIX) else {
                continue;
            };
            let Ok(n) = http::HeaderName::from_bytes(http_name.to_ascii_lowercase().as_bytes())
            else {
                continue;
            };
            for v in values {
                if let Ok(v) = http::HeaderValue::from_str(v.as_str()) {
                    out.append(n.clone(), v);
                }
            }
        }
    }
    out
}
