//! The leader's side of the tunnel: the calls followers forward, run
//! through this node's own `TaskHub` service (authentication included),
//! their answers streamed back; at most `--max-forwarded-calls` at once.

use std::convert::Infallible;
use std::sync::Arc;

use async_nats::HeaderMap;
use axum::http;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::cluster::{decode_principal, rpc_subject, Node, HDR_PRINCIPAL};

use super::{
    carry, keep_alive, uncarry, AbortOnDrop, HDR_KIND, HDR_NODE, HDR_PATH, HDR_SEQ, HDR_STATUS,
};
use crate::cluster::nats_header as header;

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
        let Some(leadership) = crate::cluster::next_leadership(&mut leader).await else {
            return;
        };
        // Calls that arrive before this node's hub takes writes wait in
        // the subscription, and then in `answer` for the node to be ready.
        let Ok(mut sub) = node.client.subscribe(rpc_subject(&leadership)).await else {
            continue;
        };
        let most = node.options.max_forwarded_calls;
        let slots = Arc::new(tokio::sync::Semaphore::new(most));
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let answering = answer(node.clone(), svc.clone(), msg);
                            tokio::spawn(async move {
                                answering.await;
                                drop(slot);
                            });
                        }
                        Err(_) => refuse_busy(&node, msg, most).await,
                    }
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

/// Answer a forwarded call with `UNAVAILABLE` without running it: a
/// trailers-only gRPC response, then the end.
async fn refuse_busy(node: &Node, msg: async_nats::Message, most: usize) {
    let Some(reply) = msg.reply else { return };
    tracing::warn!(
        "{most} forwarded calls are running (--max-forwarded-calls); one more is refused"
    );
    let mut grpc = http::HeaderMap::new();
    grpc.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    grpc.insert("grpc-status", http::HeaderValue::from_static("14"));
    grpc.insert(
        "grpc-message",
        http::HeaderValue::from_static("the leader is answering too many forwarded calls; retry"),
    );
    let mut head = HeaderMap::new();
    head.insert(HDR_KIND, "head");
    head.insert(HDR_NODE, node.node_id());
    head.insert(HDR_STATUS, "200");
    carry(&grpc, &mut head);
    let mut end = HeaderMap::new();
    end.insert(HDR_KIND, "end");
    end.insert(HDR_NODE, node.node_id());
    end.insert(HDR_SEQ, "1");
    for (h, kind) in [(head, "head"), (end, "end")] {
        if node
            .client
            .publish_with_headers(reply.clone(), h, Bytes::new())
            .await
            .is_err()
        {
            tracing::debug!(kind, "could not refuse a forwarded call");
            return;
        }
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
    // Tell the follower the call is being worked on, and end it if the
    // follower goes silent (it died, or lost NATS): what it holds (a watch
    // slot) is freed within 2 × the lease.
    let _pinger = keep_alive(&node, reply.to_string());
    let Ok(mut alive) = node.client.subscribe(format!("{reply}.alive")).await else {
        return;
    };
    let silence = node.options.lease * 2;
    let follower_gone = tokio_util::sync::CancellationToken::new();
    let _watcher = {
        let gone = follower_gone.clone();
        AbortOnDrop(tokio::spawn(async move {
            while let Ok(Some(_)) = tokio::time::timeout(silence, alive.next()).await {}
            gone.cancel();
        }))
    };
    // Won the lease a moment ago: the hub takes writes once it reloaded.
    node.wait_ready(node.options.lease * 2).await;
    if !node.is_leader() {
        // No longer the leader: say nothing; the follower sees this
        // leadership end and asks the next one.
        return;
    }
    let path = header(&msg.headers, HDR_PATH).to_string();
    let mut req = http::Request::new(Body::new(http_body_util::Full::new(msg.payload.clone())));
    *req.method_mut() = http::Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    *req.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(_) => return,
    };
    *req.headers_mut() = uncarry(&msg.headers);
    // The follower verified the caller's token; its principal stands in
    // for it. (No principal: the call is unauthenticated.)
    if let Some(p) = decode_principal(header(&msg.headers, HDR_PRINCIPAL)) {
        req.extensions_mut().insert(crate::cluster::Forwarded(p));
    }
    let Ok(cancel) = node.client.subscribe(format!("{reply}.cancel")).await else {
        return;
    };
    let resp = tokio::select! {
        r = svc.oneshot(req) => r,
        _ = follower_gone.cancelled() => return,
    };
    let Ok(resp) = resp;
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
    let max = crate::cluster::piece_size(&node.client);
    let mut cancel = cancel;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = cancel.next() => break,
            _ = follower_gone.cancelled() => {
                tracing::info!(path, "the follower of a forwarded call went silent; ending it");
                break;
            }
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
        for piece in crate::cluster::pieces(payload, max) {
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
