//! gRPC-Web calls carried over one WebSocket per page.
//!
//! A browser holds at most six HTTP/1.1 connections per origin, shared by
//! all its tabs, and every open gRPC-Web stream holds one: a few tabs with a
//! live task open would use them all and the next call would wait forever.
//! WebSockets are not counted against that limit, so the page sends its
//! gRPC-Web calls, unchanged, through one socket: each call is handed to the
//! same gRPC-Web service as `/agenthub.v1.TaskHub/<Method>` (same auth, same
//! limits), and its response comes back in pieces tagged with the call's id.
//!
//! Frames are binary, `[kind: u8][call id: u32 BE][rest]`:
//!
//! - page → hub: `0` call, rest = `[json length: u32 BE][{"path","headers"}][request body]`;
//!   `1` cancel (the page stopped reading; the call is dropped).
//! - hub → page: `0` head, rest = `{"status","headers"}` (JSON); `1` body
//!   bytes; `2` end of body; `3` failure (a UTF-8 message).
//!
//! The socket itself carries no credentials (a browser cannot set headers on
//! it): every call carries its own `authorization` header, checked as on any
//! other gRPC-Web call. An `Origin` other than the hub's own is refused.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::sync::Arc;

use futures_util::stream::SplitSink;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tower::{Service, ServiceExt};

/// Where the page opens the socket.
pub const PATH: &str = "/agenthub.v1.TaskHub.socket";
/// Calls one socket may have open at once (a page needs a handful).
pub const MAX_CALLS: usize = 64;
/// The socket's sending half, shared by its calls: each writes its own
/// frames (no hop through another task on the way to the page), and waits
/// while the page reads slowly.
type Out = Arc<Mutex<SplitSink<WebSocket, Message>>>;

/// False once the socket is gone.
async fn send(out: &Out, m: Message) -> bool {
    out.lock().await.send(m).await.is_ok()
}

const CALL: u8 = 0;
const CANCEL: u8 = 1;
const HEAD: u8 = 0;
const DATA: u8 = 1;
const END: u8 = 2;
const FAIL: u8 = 3;

#[derive(Deserialize)]
struct CallHead {
    path: String,
    #[serde(default)]
    headers: HashMap<String, String>,
}

/// Upgrade, unless the page comes from another origin.
pub fn upgrade<S>(
    ws: WebSocketUpgrade,
    headers: &HeaderMap,
    service: S,
    max_message: usize,
    shutdown: watch::Receiver<bool>,
) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    if !own_origin(headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    ws.max_message_size(max_message)
        .on_upgrade(move |socket| run(socket, service, shutdown))
}

/// No `Origin` (not a browser), or the one the request was sent to.
fn own_origin(headers: &HeaderMap) -> bool {
    use crate::config::normalize_origin;
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().and_then(normalize_origin) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    host.and_then(|h| normalize_origin(&format!("{}://{h}", origin.0)))
        .is_some_and(|own| own == origin)
}

fn frame(kind: u8, id: u32, rest: &[u8]) -> Message {
    let mut b = Vec::with_capacity(5 + rest.len());
    b.push(kind);
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(rest);
    Message::Binary(b.into())
}

async fn run<S>(socket: WebSocket, service: S, mut shutdown: watch::Receiver<bool>)
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let (sink, mut stream) = socket.split();
    let out: Out = Arc::new(Mutex::new(sink));
    let mut calls: HashMap<u32, JoinHandle<()>> = HashMap::new();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let data = match msg {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => break,
        };
        if data.len() < 5 {
            break;
        }
        let id = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
        calls.retain(|_, h| !h.is_finished());
        match data[0] {
            CANCEL => {
                if let Some(h) = calls.remove(&id) {
                    h.abort();
                }
            }
            CALL => {
                let request = match parse_call(&data[5..]) {
                    Ok(r) => r,
                    Err(e) => {
                        send(&out, frame(FAIL, id, e.as_bytes())).await;
                        continue;
                    }
                };
                if calls.len() >= MAX_CALLS || calls.contains_key(&id) {
                    send(&out, frame(FAIL, id, b"too many calls on this socket")).await;
                    continue;
                }
                let handle = tokio::spawn(call(service.clone(), request, id, out.clone()));
                calls.insert(id, handle);
            }
            _ => break,
        }
    }
    for (_, h) in calls {
        h.abort();
    }
    let _ = out.lock().await.close().await;
}

/// A call frame as the request the gRPC-Web service would have received.
fn parse_call(rest: &[u8]) -> Result<Request<Body>, String> {
    let len = rest
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("short call frame")?;
    let head = rest.get(4..4 + len).ok_or("short call frame")?;
    let head: CallHead = serde_json::from_slice(head).map_err(|e| format!("bad call: {e}"))?;
    let Some(method) = head.path.strip_prefix("/agenthub.v1.TaskHub/") else {
        return Err("only agenthub.v1.TaskHub calls".into());
    };
    if method.is_empty() || !method.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err("bad method".into());
    }
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(&head.path)
        .body(Body::from(rest[4 + len..].to_vec()))
        .map_err(|e| e.to_string())?;
    for (k, v) in head.headers {
        let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) else {
            return Err("bad header".into());
        };
        if k != header::HOST && k != header::CONNECTION && k != header::CONTENT_LENGTH {
            request.headers_mut().insert(k, v);
        }
    }
    Ok(request)
}

async fn call<S>(service: S, request: Request<Body>, id: u32, out: Out)
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let Ok(response) = service.oneshot(request).await;
    let headers: HashMap<&str, &str> = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let head = serde_json::json!({ "status": response.status().as_u16(), "headers": headers });
    if !send(&out, frame(HEAD, id, head.to_string().as_bytes())).await {
        return;
    }
    let mut body = response.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        let m = match chunk {
            Ok(b) => frame(DATA, id, &b),
            Err(e) => {
                send(&out, frame(FAIL, id, e.to_string().as_bytes())).await;
                return;
            }
        };
        if !send(&out, m).await {
            return;
        }
    }
    send(&out, frame(END, id, &[])).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_hubs_own_origin_may_open_the_socket() {
        assert!(own_origin(&headers(None, "hub:8080")));
        assert!(own_origin(&headers(Some("http://hub:8080"), "hub:8080")));
        assert!(own_origin(&headers(Some("https://hub"), "hub:443")));
        assert!(!own_origin(&headers(Some("http://evil:8080"), "hub:8080")));
        assert!(!own_origin(&headers(Some("null"), "hub:8080")));
    }

    #[test]
    fn a_call_frame_names_a_taskhub_method_only() {
        let call = |path: &str| {
            let head = serde_json::json!({"path": path, "headers": {"authorization": "Bearer x"}})
                .to_string();
            let mut b = (head.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(head.as_bytes());
            b.extend_from_slice(b"body");
            parse_call(&b)
        };
        let r = call("/agenthub.v1.TaskHub/GetTask").unwrap();
        assert_eq!(r.uri().path(), "/agenthub.v1.TaskHub/GetTask");
        assert_eq!(r.headers()["authorization"], "Bearer x");
        assert!(call("/health").is_err());
        assert!(call("/agenthub.v1.TaskHub/../x").is_err());
        assert!(parse_call(&[0, 0, 0, 9, b'{']).is_err());
    }
}
