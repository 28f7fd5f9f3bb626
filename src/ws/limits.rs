//! Limits on sidecar sockets before and around identify: how many may be
//! open without having identified (`--max-unidentified`), how many failed
//! identifies one source address may make per minute
//! (`--max-failed-identifies`; then its sockets are closed 4429 for
//! `Config::identify_block`), and the end of a session whose token is
//! revoked (4401).
//!
//! [`WsLimits`] is shared by every upgrade; each admitted socket carries an
//! [`Admission`] that gives its place back when dropped.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::LimitMetrics;

/// Close code: the token was revoked.
pub const CLOSE_REVOKED: u16 = 4401;
/// Close code: too many failed identifies from this address.
pub const CLOSE_TOO_MANY_FAILURES: u16 = 4429;
/// The window `--max-failed-identifies` counts over.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; older entries are dropped past it.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// Why an upgrade is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed identifies from this address lately (close 4429).
    Blocked,
    /// `--max-unidentified` sockets are already waiting to identify (HTTP 503).
    TooManyUnidentified,
}

#[derive(Debug)]
struct Failures {
    window_start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// The shared policy.
pub struct WsLimits {
    max_unidentified: usize,
    max_failed: u32,
    block: Duration,
    unidentified: AtomicUsize,
    /// Failed identifies per source address; never held across `.await`.
    failures: Mutex<HashMap<IpAddr, Failures>>,
    metrics: Arc<LimitMetrics>,
}

impl WsLimits {
    pub fn new(cfg: &Config, metrics: Arc<LimitMetrics>) -> Arc<WsLimits> {
        Arc::new(WsLimits {
            max_unidentified: cfg.max_unidentified,
            max_failed: cfg.max_failed_identifies,
            block: cfg.identify_block,
            unidentified: AtomicUsize::new(0),
            failures: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Let a socket from `ip` in, or say why not.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        if self.is_blocked(ip) {
            self.metrics
                .identify_blocked
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Blocked);
        }
        let admitted = self
            .unidentified
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (self.max_unidentified == 0 || n < self.max_unidentified).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.metrics
                .unidentified_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::TooManyUnidentified);
        }
        self.metrics.ws_unidentified.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            limits: self.clone(),
            ip,
            unidentified: true,
            revoked: None,
            slot: None,
        })
    }

    fn is_blocked(&self, ip: IpAddr) -> bool {
        let failures = self.failures.lock().expect("ws limits");
        failures
            .get(&ip)
            .and_then(|f| f.blocked_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Count one failed identify from `ip`; true if the address is now blocked.
    pub fn record_failed_identify(&self, ip: IpAddr) -> bool {
        self.metrics
            .identify_failures
            .fetch_add(1, Ordering::Relaxed);
        if self.max_failed == 0 {
            return false;
        }
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("ws limits");
        if failures.len() >= MAX_TRACKED_ADDRESSES {
            let keep = FAILURE_WINDOW.max(self.block);
            failures.retain(|_, f| {
                now.duration_since(f.window_start) < keep
                    || f.blocked_until.is_some_and(|u| now < u)
            });
        }
        let f = failures.entry(ip).or_insert(Failures {
            window_start: now,
            count: 0,
            blocked_until: None,
        });
        if now.duration_since(f.window_start) >= FAILURE_WINDOW {
            f.window_start = now;
            f.count = 0;
        }
        f.count += 1;
        if f.count > self.max_failed {
            f.blocked_until = Some(now + self.block);
            tracing::warn!(%ip, failures = f.count, "too many failed identifies; refusing this address for a while");
            return true;
        }
        false
    }

    fn release_unidentified(&self) {
        self.unidentified.fetch_sub(1, Ordering::AcqRel);
        self.metrics.ws_unidentified.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admitted socket's standing; dropped with the session.
pub struct Admission {
    limits: Arc<WsLimits>,
    ip: IpAddr,
    unidentified: bool,
    /// Resolves when the identified token is revoked.
    revoked: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The connection's `--max-connections` slot, kept after the upgrade.
    slot: Option<Arc<OwnedSemaphorePermit>>,
}

impl Admission {
    /// Keep the connection's slot for as long as the session lives.
    pub fn hold_slot(mut self, slot: Option<Arc<OwnedSemaphorePermit>>) -> Admission {
        self.slot = slot;
        self
    }

    /// The socket identified with `token`: it no longer counts as
    /// unidentified, and it now ends when that token is revoked.
    pub fn identified(&mut self, hub: &Hub, token: &str) {
        if std::mem::take(&mut self.unidentified) {
            self.limits.release_unidentified();
        }
        let revoked: Pin<Box<dyn Future<Output = ()> + Send>> = match hub.verifier().verify(token) {
            Ok(p) => Box::pin(hub.verifier().revocations().revoked(&p.token_id)),
            // Revoked between identify and now.
            Err(_) => Box::pin(std::future::ready(())),
        };
        self.revoked = Some(revoked);
    }

    /// An identify failed; true if the socket must now be closed with 4429.
    /// Only token failures count (not, say, a hub shutting down).
    pub fn failed_identify(&mut self, e: &crate::error::Error) -> bool {
        use crate::error::Error;
        if !matches!(e, Error::InvalidToken | Error::TokenAgentMismatch) {
            return false;
        }
        let blocked = self.limits.record_failed_identify(self.ip);
        if blocked {
            self.limits
                .metrics
                .identify_blocked
                .fetch_add(1, Ordering::Relaxed);
        }
        blocked
    }

    /// Resolves when the identified token is revoked (never before identify).
    pub async fn revoked(&mut self) {
        match self.revoked.as_mut() {
            Some(f) => {
                f.as_mut().await;
                self.limits
                    .metrics
                    .revoked_ended
                    .fetch_add(1, Ordering::Relaxed);
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.unidentified {
            self.limits.release_unidentified();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_unidentified: usize, max_failed: u32) -> Arc<WsLimits> {
        let mut cfg = Config::for_data_dir("unused");
        cfg.max_unidentified = max_unidentified;
        cfg.max_failed_identifies = max_failed;
        WsLimits::new(&cfg, Arc::default())
    }

    #[tokio::test]
    async fn unidentified_sockets_are_capped_and_released_on_drop() {
        let l = limits(2, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.try_admit(ip).unwrap();
        let _b = l.try_admit(ip).unwrap();
        assert_eq!(l.try_admit(ip).err(), Some(Refusal::TooManyUnidentified));
        drop(a);
        assert!(l.try_admit(ip).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_identifies_block_an_address_for_a_while() {
        let l = limits(0, 2);
        let bad: IpAddr = "10.0.0.2".parse().unwrap();
        let good: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(!l.record_failed_identify(bad));
        assert!(!l.record_failed_identify(bad));
        assert!(l.record_failed_identify(bad));
        assert_eq!(l.try_admit(bad).err(), Some(Refusal::Blocked));
        assert!(l.try_admit(good).is_ok());
        tokio::time::advance(crate::config::DEFAULT_IDENTIFY_BLOCK + Duration::from_secs(1)).await;
        assert!(l.try_admit(bad).is_ok());
    }
}
