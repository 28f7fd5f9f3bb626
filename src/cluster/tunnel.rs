//! gRPC calls made to a follower, carried to the leader over core NATS.
//!
//! A follower's `TaskHub` service forwards every call but `WatchTaskEvents`
//! (which each node serves from its own copy of the log): the request's
//! path, metadata and body go to [`RPC_SUBJECT`]; the leader runs the call
//! through its own service (authentication included) and streams back the
//! response head, each body frame and the trailers to the caller's inbox.
//! Server-streaming calls (`WatchAgents`, `WatchTaskOutput`) work the same
//! way; when the caller goes away, the follower tells the leader to stop.
//! With no leader (an election under way) a call fails `UNAVAILABLE`: the
//! client retries.

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

use super::{Node, RPC_SUBJECT};

const HDR_PATH: &str = "Agenthub-Path";
const HDR_KIND: &str = "Agenthub-Kind";
const HDR_NODE: &str = "Agenthub-Node";
const HDR_STATUS: &str = "Agenthub-Status";
/// Every message of an answer after its head: 1, 2, 3, ... A gap means
/// NATS lost part of the answer (a connection broke).
const HDR_SEQ: &str = "Agenthub-Seq";
/// Prefix of carried HTTP headers (and trailers).
const HTTP_PREFIX: &str = "Http-";

/// How long a follower waits for the leader to start answering.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls every node serves itself.
fn served_locally(path: &str) -> bool {
    path.ends_with("/WatchTaskEvents")
}

/// The `TaskHub` service of a node: itself on the leader (or a single
/// hub), forwarded to the leader on a follower.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    node: Option<Arc<Node>>,
}

impl<S> Forward<S> {
    pub fn new(inner: S, node: Option<Arc<Node>>) -> Forward<S> {
        Forward { inner, node }
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
        match &self.node {
            Some(node) if !node.is_leader() && !served_locally(req.uri().path()) => {
                Box::pin(forward(node.clone(), req))
            }
            _ => {
                let inner = self.inner.clone();
                Box::pin(async move {
                    let Ok(resp) = inner.oneshot(req).await;
                    Ok(resp.map(Body::new))
                })
            }
        }
    }
}

fn unavailable(msg: &str) -> http::Response<Body> {
    tonic::Status::unavailable(msg.to_string()).into_http()
}

fn header<'a>(h: &'a Option<HeaderMap>, name: &str) -> &'a str {
    h.as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or("")
}

/// Copy HTTP headers into NATS headers (prefixed).
fn carry(from: &http::HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if matches!(
            name.as_str(),
            "te" | "content-length" | "host" | "connection" | "transfer-encoding"
        ) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            to.append(format!("{HTTP_PREFIX}{}", name.as_str()).as_str(), v);
        }
    }
}

/// The HTTP headers carried in NATS headers.
fn uncarry(from: &Option<HeaderMap>) -> http::HeaderMap {
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

async fn forward(
    node: Arc<Node>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = body.collect().await.map(|c| c.to_bytes()) else {
        return Ok(tonic::Status::invalid_argument("unreadable request body").into_http());
    };
    // Sent only to a known leader, and abandoned only if that leadership
    // ends: a call is answered UNAVAILABLE without having reached anyone,
    // or because the leader it reached is gone.
    let mut leadership = node.leader.subscribe();
    let asked = leadership.borrow_and_update().leadership.clone();
    if asked.is_none() {
        return Ok(unavailable(
            "no cluster leader (an election is under way); retry",
        ));
    }
    let mut h = HeaderMap::new();
    h.insert(HDR_PATH, parts.uri.path());
    carry(&parts.headers, &mut h);
    let inbox = node.client.new_inbox();
    let Ok(mut sub) = node.client.subscribe(inbox.clone()).await else {
        return Ok(unavailable("cannot reach the cluster"));
    };
    let size = bytes.len();
    match node
        .client
        .publish_with_reply_and_headers(RPC_SUBJECT, inbox.clone(), h, bytes)
        .await
    {
        Ok(()) => {}
        Err(e) if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
            // Retrying it here would fail again: say what to do instead.
            return Ok(tonic::Status::resource_exhausted(format!(
                "the request is {size} bytes, more than a follower forwards to the leader \
                 (NATS max_payload {}); send it to the leader",
                node.client.server_info().max_payload
            ))
            .into_http());
        }
        Err(_) => return Ok(unavailable("cannot reach the cluster")),
    }
    // The leader may die with the call in flight: give up as soon as its
    // leadership ends (the client retries and reaches the next leader).
    let head = tokio::select! {
        m = tokio::time::timeout(HEAD_TIMEOUT, sub.next()) => m,
        _ = async { let _ = leadership.wait_for(|v| v.leadership != asked).await; } => {
            return Ok(unavailable(
                "the cluster leader changed while the call was in flight; retry",
            ));
        }
    };
    let head = match head {
        Ok(Some(m)) if header(&m.headers, HDR_KIND) == "head" => m,
        Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => {
            return Ok(unavailable(
                "the cluster leader is gone (an election is under way); retry",
            ))
        }
        other => {
            tracing::warn!(
                path = parts.uri.path(),
                got = ?other.map(|o| o.map(|m| m.headers)),
                "no answer from the cluster leader"
            );
            return Ok(unavailable(
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
        let mut expected = 1u64;
        let mut lost = false;
        loop {
            let next = tokio::select! {
                m = sub.next() => m,
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
            if header(&m.headers, HDR_NODE) != responder {
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
    Ok(resp)
}

/// While this node leads: answer the calls followers forward, with `svc`
/// (this node's own `TaskHub` service).
pub async fn serve<S, B>(node: Arc<Node>, svc: S)
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    let mut leader = node.leader.subscribe();
    loop {
        if leader.wait_for(|v| v.is_self).await.is_err() {
            return;
        }
        let Ok(mut sub) = node.client.subscribe(RPC_SUBJECT).await else {
            continue;
        };
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    tokio::spawn(answer(node.clone(), svc.clone(), msg));
                }
                changed = leader.changed() => {
                    if changed.is_err() || !leader.borrow().is_self {
                        break;
                    }
                }
            }
        }
        let _ = sub.unsubscribe().await;
    }
}

async fn answer<S, B>(node: Arc<Node>, svc: S, msg: async_nats::Message)
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let path = header(&msg.headers, HDR_PATH).to_string();
    let mut req = http::Request::new(Body::new(http_body_util::Full::new(msg.payload.clone())));
    *req.method_mut() = http::Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    *req.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(_) => return,
    };
    *req.headers_mut() = uncarry(&msg.headers);
    let Ok(cancel) = node.client.subscribe(format!("{reply}.cancel")).await else {
        return;
    };
    let Ok(resp) = svc.oneshot(req).await;
    let (parts, body) = resp.into_parts();
    let mut body = Body::new(body);
    // Numbers every message after the head (see HDR_SEQ).
    let mut sent = 0u64;
    let base = |kind: &str| {
        let mut h = HeaderMap::new();
        h.insert(HDR_KIND, kind);
        h.insert(HDR_NODE, node.node_id());
        h
    };
    let mut numbered = |mut h: HeaderMap| {
        sent += 1;
        h.insert(HDR_SEQ, sent.to_string().as_str());
        h
    };
    let mut head = base("head");
    head.insert(HDR_STATUS, parts.status.as_u16().to_string().as_str());
    carry(&parts.headers, &mut head);
    if node
        .client
        .publish_with_headers(reply.clone(), head, Bytes::new())
        .await
        .is_err()
    {
        return;
    }
    let max = super::piece_size(&node.client);
    let mut cancel = cancel;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = cancel.next() => break,
        };
        let (h, payload) = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => (base("data"), data),
                Err(f) => match f.into_trailers() {
                    Ok(trailers) => {
                        let mut h = base("trailers");
                        carry(&trailers, &mut h);
                        (h, Bytes::new())
                    }
                    Err(_) => continue,
                },
            },
            Some(Err(_)) | None => {
                let _ = node
                    .client
                    .publish_with_headers(reply.clone(), numbered(base("end")), Bytes::new())
                    .await;
                break;
            }
        };
        // A response larger than one NATS message (a page of big tasks)
        // goes in pieces: HTTP/2 data may be split anywhere.
        let mut sent = true;
        for piece in super::pieces(payload, max) {
            if node
                .client
                .publish_with_headers(reply.clone(), numbered(h.clone()), piece)
                .await
                .is_err()
            {
                sent = false;
                break;
            }
        }
        if !sent {
            // Tell the caller the answer ends here, if NATS still takes that.
            let _ = node
                .client
                .publish_with_headers(reply.clone(), numbered(base("end")), Bytes::new())
                .await;
            break;
        }
    }
    let _ = cancel.unsubscribe().await;
}
