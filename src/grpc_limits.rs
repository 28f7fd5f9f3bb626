//! Limits at the gRPC edge: live watch streams per token
//! (`--max-watches-per-token`, over it `RESOURCE_EXHAUSTED`), the end of a
//! stream whose token is revoked (`UNAUTHENTICATED`), and two status codes
//! the generated code does not give by itself:
//!
//! - a request over the message size limit is `RESOURCE_EXHAUSTED` (tonic
//!   says `OUT_OF_RANGE`, which this API keeps for old watch cursors);
//! - a call whose `grpc-timeout` runs out is `DEADLINE_EXCEEDED`. The
//!   handler then runs to its end in its own task, so a PushTask is either
//!   wholly made or not made at all; a deadline already spent on arrival
//!   never reaches the handler.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::Stream;
use tonic::Status;

use crate::metrics::LimitMetrics;

/// Live watch streams per token id.
pub struct WatchSlots {
    max: usize,
    /// Token id → open streams; never held across `.await`.
    open: Mutex<HashMap<String, usize>>,
    metrics: Arc<LimitMetrics>,
}

/// One stream's place; gives it back when dropped with the stream.
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    token_id: String,
}

impl WatchSlots {
    pub fn new(max: usize, metrics: Arc<LimitMetrics>) -> Arc<WatchSlots> {
        Arc::new(WatchSlots {
            max,
            open: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// A place for one more stream of `token_id`, or `RESOURCE_EXHAUSTED`.
    pub fn acquire(self: &Arc<Self>, token_id: &str) -> Result<WatchSlot, Status> {
        let mut open = self.open.lock().expect("watch slots");
        let n = open.entry(token_id.to_string()).or_default();
        if self.max > 0 && *n >= self.max {
            self.metrics.watches_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "this token already has {} live watch streams (the limit)",
                self.max
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            token_id: token_id.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("watch slots");
        if let Some(n) = open.get_mut(&self.token_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.token_id);
            }
        }
    }
}

/// A watch stream that holds its slot and ends `UNAUTHENTICATED` when its
/// token is revoked.
pub struct Guarded<S> {
    inner: S,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
    done: bool,
    metrics: Arc<LimitMetrics>,
    _slot: WatchSlot,
}

/// Wrap `inner` (see [`Guarded`]).
pub fn guard<S>(
    inner: S,
    slot: WatchSlot,
    revoked: impl Future<Output = ()> + Send + 'static,
) -> Guarded<S> {
    Guarded {
        inner,
        revoked: Box::pin(revoked),
        done: false,
        metrics: slot.slots.metrics.clone(),
        _slot: slot,
    }
}

impl<S, T> Stream for Guarded<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.revoked.as_mut().poll(cx).is_ready() {
            self.done = true;
            self.metrics.revoked_ended.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Status::unauthenticated("token revoked"))));
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The gRPC router with the status-code layers above.
pub fn with_edge_layers(router: axum::Router, metrics: Arc<LimitMetrics>) -> axum::Router {
    let m = metrics.clone();
    router
        .layer(axum::middleware::from_fn(move |req, next| {
            size_status(req, next, m.clone())
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            deadline(req, next, metrics.clone())
        }))
}

/// tonic's message-size refusal, told apart from this API's own OUT_OF_RANGE.
const TOO_LARGE: &str = "message length too large";

async fn size_status(req: Request, next: Next, metrics: Arc<LimitMetrics>) -> Response {
    let mut resp = next.run(req).await;
    let headers = resp.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains(TOO_LARGE));
    if too_large {
        metrics.grpc_too_large.fetch_add(1, Ordering::Relaxed);
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    resp
}

async fn deadline(req: Request, next: Next, metrics: Arc<LimitMetrics>) -> Response {
    let Some(timeout) = grpc_timeout(req.headers()) else {
        return next.run(req).await;
    };
    let exceeded = || {
        metrics
            .grpc_deadline_exceeded
            .fetch_add(1, Ordering::Relaxed);
        Status::deadline_exceeded("deadline exceeded").into_http()
    };
    if timeout.is_zero() {
        return exceeded();
    }
    // Own task: a call under way is never cut in the middle.
    let call = tokio::spawn(next.run(req));
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(_)) => Status::internal("handler failed").into_http(),
        Err(_) => exceeded(),
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses_every_unit() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-timeout", HeaderValue::from_static(v));
            grpc_timeout(&m)
        };
        assert_eq!(h("2S"), Some(Duration::from_secs(2)));
        assert_eq!(h("150m"), Some(Duration::from_millis(150)));
        assert_eq!(h("0n"), Some(Duration::ZERO));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("x"), None);
        assert_eq!(h("123456789S"), None);
    }

    #[test]
    fn watch_slots_are_per_token_and_given_back() {
        let slots = WatchSlots::new(1, Arc::default());
        let a = slots.acquire("tok-a").unwrap();
        assert_eq!(
            slots.acquire("tok-a").err().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        let _b = slots.acquire("tok-b").unwrap();
        drop(a);
        assert!(slots.acquire("tok-a").is_ok());
    }
}
