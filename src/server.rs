//! Binding and running both listeners around one [`Hub`].
//!
//! `Server::build` binds (port 0 picks a free port) and reports the bound
//! addresses; `run` serves until the shutdown future resolves, then closes
//! sockets with a close frame, lets in-flight writes finish and closes the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::grpc::{auth_interceptor, TaskHubServer, TaskHubService};
use crate::hub::Hub;
use crate::listener::{ListenerOptions, Protocol};
use crate::store::file::FileStore;
use crate::store::Store;
use crate::tls::Tls;

/// A hub with its listeners bound.
pub struct Server {
    hub: Arc<Hub>,
    ws_listener: TcpListener,
    grpc_listener: TcpListener,
    ws_addr: SocketAddr,
    grpc_addr: SocketAddr,
    tls: Option<Arc<Tls>>,
}

/// Listen backlog: a burst of reconnecting sidecars must not overflow it.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr)> {
    let err = |e: std::io::Error| {
        Error::InvalidArgument(format!("cannot bind {what} address {addr}: {e}"))
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(err)?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok((listener, local))
}

impl Server {
    /// Open the embedded store and bind both listeners.
    pub async fn build(config: Config) -> Result<Server> {
        config.validate()?;
        let store = FileStore::open(&config.data_dir, config.event_retention)?;
        Self::build_on(config, Arc::new(store)).await
    }

    /// Bind both listeners around a hub on `store` (any backend; tests use
    /// a store with fault injection).
    pub async fn build_on(config: Config, store: Arc<dyn Store>) -> Result<Server> {
        let tls = config.tls.as_ref().map(Tls::load).transpose()?;
        let (ws_listener, ws_addr) = bind(config.ws_addr, "WebSocket").await?;
        let (grpc_listener, grpc_addr) = bind(config.grpc_addr, "gRPC").await?;
        let hub = Hub::with_store(config, store)?;
        Ok(Server {
            hub,
            ws_listener,
            grpc_listener,
            ws_addr,
            grpc_addr,
            tls,
        })
    }

    /// Cluster mode (SPEC §9): a node of the hub whose log is the JetStream
    /// stream on `options`' NATS servers. `config.data_dir` holds this
    /// node's local copy of the log and `admin.token`.
    pub async fn build_cluster(
        config: Config,
        options: crate::cluster::ClusterOptions,
    ) -> Result<Server> {
        config.validate()?;
        let node = crate::cluster::Node::connect(options).await?;
        let store = crate::cluster::log::ClusterStore::open(
            node.clone(),
            &config.data_dir.join("log-copy"),
        )
        .await?;
        let server = Self::build_on(config, store.clone()).await?;
        let hub = server.hub.clone();
        store.set_bus(hub.bus());
        let weak = Arc::downgrade(&hub);
        let deposed_node = node.clone();
        store.on_deposed(Box::new(move |why| {
            deposed_node.forget_leader();
            if let Some(hub) = weak.upgrade() {
                hub.step_down(why);
            }
        }));
        let relay = crate::cluster::relay::Relay::start(node.clone(), &hub);
        hub.set_cluster(Arc::new(crate::cluster::Member {
            node: node.clone(),
            relay,
        }));
        let ready_hub = Arc::downgrade(&hub);
        tokio::spawn(crate::cluster::track_ready(node.clone(), move || {
            Hub::writable(&ready_hub)
        }));
        tokio::spawn(crate::cluster::lease::run(
            node,
            store,
            Arc::downgrade(&hub),
        ));
        Ok(server)
    }

    /// The TLS state, for [`Tls::reload`] (SIGHUP); `None` when plaintext.
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Serve until `shutdown` resolves. `shutdown` is first polled once both
    /// listeners accept (the binary sends its readiness there).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server {
            hub,
            ws_listener,
            grpc_listener,
            tls,
            ..
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let timers = tokio::spawn(hub.clone().run_timers(stop_rx.clone()));
        let recovery = tokio::spawn(hub.clone().run_recovery(stop_rx.clone()));
        let retention = tokio::spawn(hub.clone().run_retention(stop_rx.clone()));
        let sessions = TaskTracker::new();

        let revocations = tokio::spawn(crate::auth::poll_revocations(
            hub.verifier().clone(),
            hub.config().revocation_poll,
            stop_rx.clone(),
        ));
        let app = crate::http::router(hub.clone(), stop_rx.clone(), sessions.clone())
            .merge(crate::web::router(hub.clone(), stop_rx.clone()));
        let http = tokio::spawn(crate::listener::serve(
            ws_listener,
            app,
            listener_options(&hub, tls.as_deref(), "http"),
            stop_rx.clone(),
        ));

        let (health, health_svc) = tonic_health::server::health_reporter();
        match hub.cluster_node() {
            // Cluster mode: SERVING only while the node is ready (it knows
            // the leader and its copy caught up; see docs/cluster.md).
            Some(node) => {
                let mut ready = node.ready.subscribe();
                let health = health.clone();
                tokio::spawn(async move {
                    loop {
                        if *ready.borrow_and_update() {
                            health.set_serving::<TaskHubServer<TaskHubService>>().await;
                            health
                                .set_service_status("", tonic_health::ServingStatus::Serving)
                                .await;
                        } else {
                            health
                                .set_not_serving::<TaskHubServer<TaskHubService>>()
                                .await;
                            health
                                .set_service_status("", tonic_health::ServingStatus::NotServing)
                                .await;
                        }
                        if ready.changed().await.is_err() {
                            return;
                        }
                    }
                });
            }
            None => health.set_serving::<TaskHubServer<TaskHubService>>().await,
        }
        // Both reflection versions: v1 for current tools, v1alpha for older ones.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder()
            .build_v1()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let reflection_alpha = reflection_builder()
            .build_v1alpha()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let svc = TaskHubServer::with_interceptor(
            TaskHubService::new(hub.clone(), stop_rx.clone()),
            auth_interceptor(hub.clone()),
        );
        if let Some(node) = hub.cluster_node() {
            tokio::spawn(crate::cluster::tunnel::serve(node.clone(), svc.clone()));
        }
        let svc = crate::cluster::tunnel::Forward::new(svc, &hub);
        let routes = tonic::service::Routes::new(health_svc)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(svc)
            .prepare()
            .into_axum_router();
        let routes = crate::grpc_limits::with_edge_layers(routes, hub.metrics().limits.clone());
        let grpc = tokio::spawn(crate::listener::serve(
            grpc_listener,
            routes,
            listener_options(&hub, tls.as_deref(), "grpc"),
            stop_rx.clone(),
        ));

        shutdown.await;
        tracing::info!("shutting down");
        if let Some(node) = hub.cluster_node() {
            node.stop(std::time::Duration::from_secs(2)).await;
        }
        let _ = stop_tx.send(true);
        let grace = hub.config().shutdown_grace;
        sessions.close();
        let drained = tokio::time::timeout(grace, async {
            let _ = http.await;
            let _ = grpc.await;
            let _ = timers.await;
            let _ = revocations.await;
            let _ = recovery.await;
            let _ = retention.await;
            // Every socket has sent its close frame and ended its handshake.
            sessions.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = sessions.len(),
                "shutdown grace over; closing with sessions still open"
            );
        }
        let closing = hub.clone();
        let _ = tokio::task::spawn_blocking(move || closing.close()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How a listener accepts: TLS if configured, the connection limit on the
/// HTTP listener, HTTP/1 head timeout or HTTP/2 keepalive.
fn listener_options(hub: &Hub, tls: Option<&Tls>, name: &'static str) -> ListenerOptions {
    let cfg = hub.config();
    let http = name == "http";
    ListenerOptions {
        protocol: if http {
            Protocol::Http1 {
                header_timeout: cfg.header_timeout,
            }
        } else {
            Protocol::Http2 {
                keepalive_interval: cfg.grpc_keepalive_interval,
                keepalive_timeout: cfg.grpc_keepalive_timeout,
            }
        },
        tls: tls.map(|t| {
            if http {
                t.http_acceptor()
            } else {
                t.grpc_acceptor()
            }
        }),
        max_connections: if http { cfg.max_connections } else { 0 },
        handshake_timeout: cfg.header_timeout,
        metrics: hub.metrics().limits.clone(),
        name,
    }
}
