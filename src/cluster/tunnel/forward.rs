//! A follower's side of the tunnel: every gRPC call but `WatchTaskEvents`
//! carried to the leader of the moment, within the caller's deadline, and
//! sent again to the next leader when sending it twice is harmless.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::HeaderMap;
use axum::http;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::{Service, ServiceExt};

use crate::cluster::{encode_principal, rpc_subject, Node, HDR_PRINCIPAL};
use crate::hub::Hub;

use super::{
    carry, keep_alive, uncarry, HDR_KIND, HDR_NODE, HDR_PATH, HDR_SEQ, HDR_STATUS, KIND_ALIVE,
};
use crate::cluster::nats_header as header;

/// Calls every node serves itself.
fn served_locally(path: &str) -> bool {
    path.ends_with("/WatchTaskEvents")
}

/// Calls that may run twice with the same outcome: sent again to the next
/// leader when the one they went to went away before it answered.
fn resendable(path: &str) -> bool {
    const SAFE: [&str; 8] = [
        "/PushTask",
        "/GetTask",
        "/ListTasks",
        "/ListAgents",
        "/WatchAgents",
        "/WaitTask",
        "/WatchTaskOutput",
        "/ListTokens",
    ];
    SAFE.iter().any(|m| path.ends_with(m))
}

/// The caller's deadline (`grpc-timeout`), if it set one.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `PushTask` body with a `task_id` (a fresh one if it had none), so that
/// the leader running it twice creates one task. `None`: not a body this
/// node can read (compressed, malformed): forwarded as it is, for the
/// leader to answer.
fn with_task_id(body: &Bytes) -> Option<Bytes> {
    use prost::Message;
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes(body[1..5].try_into().ok()?) as usize;
    if body.len() != 5 + len {
        return None;
    }
    let mut req = crate::pb::PushTaskRequest::decode(&body[5..]).ok()?;
    if !req.task_id.is_empty() {
        return Some(body.clone());
    }
    req.task_id = crate::model::new_task_id();
    let proto = req.encode_to_vec();
    let mut out = Vec::with_capacity(5 + proto.len());
    out.push(0);
    out.extend_from_slice(&(proto.len() as u32).to_be_bytes());
    out.extend_from_slice(&proto);
    Some(Bytes::from(out))
}

/// The `TaskHub` service of a node: itself on the leader (or a single
/// hub), forwarded to the leader on a follower.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    /// Cluster mode: this node, and its hub (to verify tokens at the edge).
    cluster: Option<(Arc<Node>, Arc<Hub>)>,
}

impl<S> Forward<S> {
    pub fn new(inner: S, hub: &Arc<Hub>) -> Forward<S> {
        Forward {
            inner,
            cluster: hub.cluster_node().map(|n| (n.clone(), hub.clone())),
        }
    }
}

impl<S: NamedService> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let local = |req| async move {
            let Ok(resp) = inner.oneshot(req).await;
            Ok(resp.map(Body::new))
        };
        match &self.cluster {
            Some((node, hub)) if !served_locally(req.uri().path()) => {
                let (node, hub) = (node.clone(), hub.clone());
                Box::pin(async move {
                    match forward(node, hub, req).await {
                        Routed::Answered(resp) => Ok(resp),
                        Routed::Local(req) => local(req).await,
                    }
                })
            }
            _ => Box::pin(local(req)),
        }
    }
}

fn unavailable(msg: &str) -> http::Response<Body> {
    tonic::Status::unavailable(msg.to_string()).into_http()
}

/// Where a call went.
enum Routed {
    /// Answered (by the leader, or UNAVAILABLE without one).
    Answered(http::Response<Body>),
    /// This node leads: its own service runs the call.
    Local(http::Request<Body>),
}

/// Wait (within the caller's deadline, at most about 2 × the lease) until
/// this node is ready, then run the call here if it leads, or carry it to
/// the leader, again to the next one if that one went away before it
/// answered and the call is [`resendable`].
async fn forward(node: Arc<Node>, hub: Arc<Hub>, req: http::Request<Body>) -> Routed {
    let started = tokio::time::Instant::now();
    let deadline = grpc_timeout(req.headers());
    let wait = node.leader_wait(deadline);
    if !node.wait_ready(wait).await {
        return Routed::Answered(unavailable(&format!(
            "{} after {wait:?}; retry",
            node.not_ready(true).unwrap_or("no cluster leader")
        )));
    }
    if node.is_leader() {
        return Routed::Local(req);
    }
    // Authenticate at the edge, against the replicated token set: the
    // leader gets the principal, the token never crosses NATS.
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let principal = match hub.verifier().verify_bearer(bearer) {
        Ok(p) => p,
        Err(e) => return Routed::Answered(tonic::Status::from(e).into_http()),
    };
    let (parts, body) = req.into_parts();
    // As strict as the front door, before anything else: a body larger
    // than one NATS message could not be forwarded anyway, and is not
    // buffered past that.
    let max = node.client.server_info().max_payload;
    let bytes = http_body_util::Limited::new(body, max).collect().await;
    let mut bytes = match bytes {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Routed::Answered(
                tonic::Status::resource_exhausted(format!(
                    "the request is more than the {max} bytes a follower forwards to the \
                     leader (NATS max_payload); send it to the leader"
                ))
                .into_http(),
            );
        }
        Err(_) => {
            return Routed::Answered(
                tonic::Status::invalid_argument("unreadable request body").into_http(),
            );
        }
    };
    let path = parts.uri.path().to_string();
    if path.ends_with("/PushTask") {
        if let Some(b) = with_task_id(&bytes) {
            bytes = b;
        }
    }
    let resend = resendable(&path);
    loop {
        let outcome = forward_once(&node, &parts, &principal, bytes.clone()).await;
        let again = match outcome {
            Attempt::Answered(resp) => return Routed::Answered(resp),
            Attempt::Unreached(resp) => resp,
            Attempt::Lost(resp) if resend => resp,
            Attempt::Lost(resp) => return Routed::Answered(resp),
        };
        // The leader it went to is gone, or not listening yet: wait for
        // the next (or for that one to listen), within the deadline.
        let left = match deadline {
            Some(d) => d.saturating_sub(started.elapsed()),
            None => node.options.lease * 2,
        };
        tokio::time::sleep(Duration::from_millis(20).min(left)).await;
        if left.is_zero() || !node.wait_ready(node.leader_wait(Some(left))).await {
            return Routed::Answered(again);
        }
        if node.is_leader() {
            let mut req =
                http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            req.headers_mut().remove("content-length");
            return Routed::Local(req);
        }
    }
}

/// One try at carrying a call to the leader.
enum Attempt {
    /// The leader's answer (or a final error).
    Answered(http::Response<Body>),
    /// It reached no leader: safe to send again.
    Unreached(http::Response<Body>),
    /// The leader it reached went away before answering.
    Lost(http::Response<Body>),
}

async fn forward_once(
    node: &Arc<Node>,
    parts: &http::request::Parts,
    principal: &crate::auth::Principal,
    bytes: Bytes,
) -> Attempt {
    // Sent only to a known leader, and abandoned only if that leadership
    // ends: a call is answered UNAVAILABLE without having reached anyone,
    // or because the leader it reached is gone.
    let mut leadership = node.leader.subscribe();
    let asked = leadership.borrow_and_update().leadership.clone();
    let Some(subject) = asked.as_deref().map(rpc_subject) else {
        return Attempt::Unreached(unavailable(
            "no cluster leader (an election is under way); retry",
        ));
    };
    let mut h = HeaderMap::new();
    h.insert(HDR_PATH, parts.uri.path());
    h.insert(HDR_PRINCIPAL, encode_principal(principal).as_str());
    carry(&parts.headers, &mut h);
    let inbox = node.client.new_inbox();
    let Ok(mut sub) = node.client.subscribe(inbox.clone()).await else {
        return Attempt::Answered(unavailable("cannot reach the cluster"));
    };
    let size = bytes.len();
    match node
        .client
        .publish_with_reply_and_headers(subject, inbox.clone(), h, bytes)
        .await
    {
        Ok(()) => {}
        Err(e) if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
            // Retrying it here would fail again: say what to do instead.
            return Attempt::Answered(
                tonic::Status::resource_exhausted(format!(
                    "the request is {size} bytes, more than a follower forwards to the leader \
                     (NATS max_payload {}); send it to the leader",
                    node.client.server_info().max_payload
                ))
                .into_http(),
            );
        }
        Err(_) => return Attempt::Answered(unavailable("cannot reach the cluster")),
    }
    // Tell the leader this follower is still there while the call runs.
    let pinger = keep_alive(node, format!("{inbox}.alive"));
    let silence = node.options.lease * 2;
    // The leader may die with the call in flight: give up as soon as its
    // leadership ends (the client retries and reaches the next leader).
    let head = loop {
        let m = tokio::select! {
            m = tokio::time::timeout(silence, sub.next()) => m,
            _ = async { let _ = leadership.wait_for(|v| v.leadership != asked).await; } => {
                return Attempt::Lost(unavailable(
                    "the cluster leader changed while the call was in flight; retry",
                ));
            }
        };
        match m {
            // The leader is working on it (a WaitTask, a slow store).
            Ok(Some(m)) if header(&m.headers, HDR_KIND) == KIND_ALIVE => continue,
            other => break other,
        }
    };
    let head = match head {
        Ok(Some(m)) if header(&m.headers, HDR_KIND) == "head" => m,
        Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => {
            return Attempt::Unreached(unavailable(
                "the cluster leader is gone (an election is under way); retry",
            ))
        }
        other => {
            tracing::warn!(
                path = parts.uri.path(),
                got = ?other.map(|o| o.map(|m| m.headers)),
                "no answer from the cluster leader"
            );
            return Attempt::Lost(unavailable(
                "no cluster leader answered (an election may be under way); retry",
            ));
        }
    };
    let responder = header(&head.headers, HDR_NODE).to_string();
    let status = header(&head.headers, HDR_STATUS)
        .parse::<u16>()
        .ok()
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or(http::StatusCode::OK);
    let headers = uncarry(&head.headers);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let client = node.client.clone();
    tokio::spawn(async move {
        let _pinger = pinger;
        let mut expected = 1u64;
        let mut lost = false;
        loop {
            let next = tokio::select! {
                m = tokio::time::timeout(silence, sub.next()) => match m {
                    Ok(m) => m,
                    Err(_) => {
                        // Nothing from the leader for 2 × the lease: the
                        // end of the answer was lost. Say so.
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                        trailers.insert(
                            "grpc-message",
                            http::HeaderValue::from_static(
                                "the cluster leader stopped answering; retry",
                            ),
                        );
                        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                        lost = true;
                        None
                    }
                },
                _ = tx.closed() => None,
                _ = async { let _ = leadership.wait_for(|v| v.leadership != asked).await; } => {
                    // The leader serving this stream is gone: end it, so the
                    // client re-subscribes (to the next leader).
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                    trailers.insert(
                        "grpc-message",
                        http::HeaderValue::from_static("cluster leader changed; retry"),
                    );
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                    None
                }
            };
            let Some(m) = next else { break };
            // A deposed leader may answer too: only the first responder counts.
            if header(&m.headers, HDR_NODE) != responder
                || header(&m.headers, HDR_KIND) == KIND_ALIVE
            {
                continue;
            }
            if header(&m.headers, HDR_SEQ).parse::<u64>().ok() != Some(expected) {
                // Part of the answer is gone: end the call rather than pass
                // on a stream with a hole in it (the client retries).
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                trailers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static(
                        "part of the answer from the cluster leader was lost; retry",
                    ),
                );
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                lost = true;
                break;
            }
            expected += 1;
            let frame = match header(&m.headers, HDR_KIND) {
                "data" => Frame::data(m.payload),
                "trailers" => Frame::trailers(uncarry(&m.headers)),
                _ => break,
            };
            if tx.send(Ok(frame)).await.is_err() {
                break;
            }
        }
        if !tx.is_closed() && !lost {
            return;
        }
        // The caller went away, or the answer broke: stop the leader's side.
        let _ = client
            .publish(format!("{inbox}.cancel"), Bytes::new())
            .await;
    });
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = http::Response::new(Body::new(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Attempt::Answered(resp)
}
