//! The accept loops of both listeners: a connection limit, the TLS handshake
//! (when configured) under a timeout, then hyper serving an axum `Router` —
//! HTTP/1.1 with upgrades and a request-head timeout on the HTTP listener,
//! HTTP/2 with keepalive pings on the gRPC listener.
//!
//! Each connection is served by its own task, which owns the connection's
//! slot ([`ConnInfo::slot`]); an upgraded WebSocket takes a clone of the slot
//! with it, so it keeps counting after hyper lets go of the socket. When
//! `shutdown` turns true the loop stops accepting, asks every connection to
//! finish gracefully, and returns once they have.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::LimitMetrics;
use crate::tls::AsyncIo;

/// Concurrent HTTP/2 streams (calls) per gRPC connection. Above
/// `--max-watches-per-token`'s default, so one dashboard connection can carry
/// every watch its token may open.
pub const GRPC_MAX_CONCURRENT_STREAMS: u32 = 4096;

/// What a handler may know about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The connection is TLS.
    pub tls: bool,
    /// The client presented a certificate that verified against `--client-ca`.
    pub client_cert: bool,
    /// This connection's place under `--max-connections`; held as long as a clone lives.
    pub slot: Option<Arc<OwnedSemaphorePermit>>,
}

/// Which protocol a listener speaks, with its settings.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// HTTP/1.1 with upgrades; the request head must arrive within `header_timeout`.
    Http1 { header_timeout: Duration },
    /// HTTP/2 only (gRPC), pinging idle peers.
    Http2 {
        keepalive_interval: Duration,
        keepalive_timeout: Duration,
    },
}

/// How one listener accepts connections.
#[derive(Clone)]
pub struct ListenerOptions {
    pub protocol: Protocol,
    pub tls: Option<TlsAcceptor>,
    /// Open connections at once; 0: no limit. Over it, a new socket is closed at once.
    pub max_connections: usize,
    /// The TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Counters for `/metrics`.
    pub metrics: Arc<LimitMetrics>,
    /// `"http"` or `"grpc"`, for logs and metric labels.
    pub name: &'static str,
}

/// Accept and serve connections until `shutdown` turns true, then drain them.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = (opts.max_connections > 0).then(|| Arc::new(Semaphore::new(opts.max_connections)));
    // Every connection task holds a clone; `recv` returns None once all are gone.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = opts.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let slot = match &slots {
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Some(Arc::new(p)),
                Err(_) => {
                    opts.metrics
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = opts.name, %peer, "connection limit reached; closing");
                    drop(tcp);
                    continue;
                }
            },
            None => None,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let opts = opts.clone();
        let stop = shutdown.clone();
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            serve_one(tcp, peer, slot, app, &opts, stop).await;
            drop(alive);
        });
    }
    drop(alive_tx);
    let _ = alive_rx.recv().await;
}

async fn serve_one(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: Option<Arc<OwnedSemaphorePermit>>,
    app: Router,
    opts: &ListenerOptions,
    mut stop: watch::Receiver<bool>,
) {
    let gauge = match opts.protocol {
        Protocol::Http1 { .. } => &opts.metrics.http_connections_open,
        Protocol::Http2 { .. } => &opts.metrics.grpc_connections_open,
    };
    gauge.fetch_add(1, Ordering::Relaxed);
    let _open = scopeguard(gauge);
    let mut info = ConnInfo {
        peer,
        tls: false,
        client_cert: false,
        slot,
    };
    let io: Box<dyn AsyncIo> = match &opts.tls {
        None => Box::new(tcp),
        Some(acceptor) => {
            match tokio::time::timeout(opts.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    info.tls = true;
                    info.client_cert = stream.get_ref().1.peer_certificates().is_some();
                    Box::new(stream)
                }
                Ok(Err(e)) => {
                    opts.metrics.tls_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = opts.name, %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    opts.metrics.tls_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = opts.name, %peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info.clone());
        req
    });
    let svc = TowerToHyperService::new(svc);
    let io = TokioIo::new(io);
    let result = match opts.protocol {
        Protocol::Http1 { header_timeout } => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Protocol::Http2 {
            keepalive_interval,
            keepalive_timeout,
        } => {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(keepalive_interval)
                .keep_alive_timeout(keepalive_timeout)
                .max_concurrent_streams(GRPC_MAX_CONCURRENT_STREAMS);
            let conn = builder.serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            opts.metrics.header_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = opts.name, %peer, "request head not received in time; closed");
        } else {
            tracing::debug!(listener = opts.name, %peer, error = %e, "connection ended with an error");
        }
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn scopeguard(g: &std::sync::atomic::AtomicU64) -> GaugeGuard<'_> {
    GaugeGuard(g)
}
