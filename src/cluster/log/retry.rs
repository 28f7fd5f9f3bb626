//! Retrying a start-up step: a NATS cluster that is starting or electing
//! may time out the first requests, so each step of a node's start (and of
//! `agenthub token ... --nats`) is retried with backoff for a while.

use std::time::{Duration, Instant};

use crate::error::Result;

/// How long a node retries setting up the stream and buckets at start.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `attempt` until it succeeds, with backoff (100 ms doubling to 2 s),
/// or until `give_up` passes: a NATS cluster that is starting or electing
/// may time out the first requests.
pub(super) async fn retrying<T, F, Fut>(give_up: Instant, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < give_up => {
                tracing::warn!(error = %e, "{what}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
