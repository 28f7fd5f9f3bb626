//! The gRPC floor: a tonic server whose only method answers `GetTask` with
//! a 200-byte task at once (no hub, no store), and the client loops that
//! measure it. Same transport settings as the hub (HTTP/2, TCP_NODELAY).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agenthub::pb;
use anyhow::Result;
use tokio::sync::Semaphore;
use tonic::codegen::{http, Body, StdError};

use crate::util::{now_ns, Metrics, Samples, PAYLOAD_BYTES};

/// Answers `/agenthub.v1.TaskHub/GetTask`; every other path is UNIMPLEMENTED.
#[derive(Clone)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "agenthub.v1.TaskHub";
}

#[derive(Clone)]
struct GetTaskEcho;

impl tonic::server::UnaryService<pb::GetTaskRequest> for GetTaskEcho {
    type Response = pb::Task;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<pb::Task>, tonic::Status>> + Send>>;

    fn call(&mut self, req: tonic::Request<pb::GetTaskRequest>) -> Self::Future {
        let task_id = req.into_inner().task_id;
        Box::pin(async move {
            Ok(tonic::Response::new(pb::Task {
                task_id,
                description: "x".repeat(PAYLOAD_BYTES),
                ..Default::default()
            }))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for EchoService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == "/agenthub.v1.TaskHub/GetTask" {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(GetTaskEcho, req).await)
            })
        } else {
            Box::pin(async move {
                Ok(tonic::Status::unimplemented("echo server: GetTask only").into_http())
            })
        }
    }
}

/// Run the echo server until killed; prints `addr=HOST:PORT`.
pub async fn echo_server() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("addr={}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(EchoService)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

async fn client(
    addr: &str,
) -> Result<pb::task_hub_client::TaskHubClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(pb::task_hub_client::TaskHubClient::new(channel))
}

/// Sequential unary round trips: warm-up, then measured.
pub async fn sequential(addr: &str, warmup: usize, measured: usize) -> Result<Metrics> {
    let mut c = client(addr).await?;
    let mut lat = Samples::with_capacity(measured);
    for i in 0..warmup + measured {
        let t0 = now_ns();
        c.get_task(pb::GetTaskRequest {
            task_id: format!("t{i}"),
        })
        .await?;
        if i >= warmup {
            lat.push(now_ns() - t0);
        }
    }
    let mut m = Metrics::default();
    m.put("count", measured as f64);
    lat.sorted().put(&mut m, "rtt");
    Ok(m)
}

/// `count` calls with `inflight` outstanding on one connection: calls/s.
pub async fn pipelined(
    addr: &str,
    count: usize,
    inflight: usize,
    limit: Duration,
) -> Result<Metrics> {
    let c = client(addr).await?;
    let window = Arc::new(Semaphore::new(inflight));
    let t0 = now_ns();
    let run = async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let permit = window.clone().acquire_owned().await?;
            let mut c = c.clone();
            tasks.spawn(async move {
                let r = c
                    .get_task(pb::GetTaskRequest {
                        task_id: format!("t{i}"),
                    })
                    .await;
                drop(permit);
                r.map(|_| ())
            });
            while let Some(done) = tasks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(limit, run).await??;
    let secs = (now_ns() - t0) as f64 / 1e9;
    let mut m = Metrics::default();
    m.put("count", count as f64);
    m.put("inflight", inflight as f64);
    m.put("msgs_per_s", count as f64 / secs);
    Ok(m)
}
