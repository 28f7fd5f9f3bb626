//! A small gRPC client for the CLI, the tests and the benchmark.

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pb::task_hub_client::TaskHubClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl BearerAuth {
    pub fn new(token: &str) -> BearerAuth {
        BearerAuth {
            header: format!("Bearer {token}").parse().ok(),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The generated client with bearer auth.
pub type HubClient = TaskHubClient<InterceptedService<Channel, BearerAuth>>;

/// Connect to `addr` (`host:port` or `http://host:port`).
pub async fn connect(addr: &str, token: &str) -> Result<HubClient, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(
        TaskHubClient::with_interceptor(channel, BearerAuth::new(token))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}
