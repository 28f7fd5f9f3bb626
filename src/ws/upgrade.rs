//! What a `/ws` upgrade must pass before it becomes a session (SPEC §10):
//! its `Origin` (none, the hub's own, or one of `--allowed-origins`; else
//! 403), a verified client certificate when `--client-ca` is set (else 403),
//! and the identify limits of [`WsLimits`] (503, or close 4429).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::normalize_origin;
use crate::hub::Hub;
use crate::listener::ConnInfo;
use crate::metrics::LimitMetrics;
use crate::ws::limits::{Admission, Refusal, WsLimits, CLOSE_TOO_MANY_FAILURES};

/// Why an upgrade was refused, and how to say it.
pub enum Refused {
    Status(StatusCode, &'static str),
    /// Upgrade, then close with this code at once.
    Close(u16, &'static str),
}

impl Refused {
    pub fn respond(self, ws: WebSocketUpgrade) -> Response {
        match self {
            Refused::Status(status, msg) => (status, msg).into_response(),
            Refused::Close(code, reason) => ws.on_upgrade(move |mut socket| async move {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let _ = socket.send(Message::Close(Some(frame))).await;
            }),
        }
    }
}

/// The checks, shared by every `/ws` request.
pub struct UpgradeGate {
    allowed: Vec<(String, String, u16)>,
    require_client_cert: bool,
    limits: Arc<WsLimits>,
    metrics: Arc<LimitMetrics>,
}

impl UpgradeGate {
    pub fn new(hub: &Hub) -> UpgradeGate {
        let cfg = hub.config();
        let metrics = hub.metrics().limits.clone();
        UpgradeGate {
            allowed: cfg
                .allowed_origins
                .iter()
                .filter_map(|o| normalize_origin(o))
                .collect(),
            require_client_cert: cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            limits: WsLimits::new(cfg, metrics.clone()),
            metrics,
        }
    }

    /// Admit the upgrade or say why not.
    pub fn check(
        &self,
        headers: &HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Admission, Refused> {
        let tls = conn.is_some_and(|c| c.tls);
        if !self.origin_allowed(headers, tls) {
            self.metrics.origin_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Status(StatusCode::FORBIDDEN, "origin not allowed"));
        }
        if self.require_client_cert && !conn.is_some_and(|c| c.client_cert) {
            self.metrics
                .client_cert_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Status(
                StatusCode::FORBIDDEN,
                "a client certificate is required",
            ));
        }
        let ip = conn.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.peer.ip());
        match self.limits.try_admit(ip) {
            Ok(a) => Ok(a.hold_slot(conn.and_then(|c| c.slot.clone()))),
            Err(Refusal::Blocked) => Err(Refused::Close(
                CLOSE_TOO_MANY_FAILURES,
                "too many failed identifies",
            )),
            Err(Refusal::TooManyUnidentified) => Err(Refused::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many unidentified connections",
            )),
        }
    }

    fn origin_allowed(&self, headers: &HeaderMap, tls: bool) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Some(origin) = origin.to_str().ok().and_then(normalize_origin) else {
            return false;
        };
        let scheme = if tls { "https" } else { "http" };
        let own = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| normalize_origin(&format!("{scheme}://{h}")));
        own.as_ref() == Some(&origin) || self.allowed.contains(&origin)
    }
}
