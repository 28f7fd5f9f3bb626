//! A small gRPC client for the CLI, the tests and the benchmark.

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
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

/// Connect to `addr` (`host:port` or `http://host:port`; `https://` uses the
/// system's roots).
pub async fn connect(addr: &str, token: &str) -> Result<HubClient, tonic::transport::Error> {
    connect_with_ca(addr, token, None).await
}

/// Connect to `addr`; an `https://` address is verified against `ca_file`
/// (PEM) when given, else against the system's roots.
pub async fn connect_with_ca(
    addr: &str,
    token: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<HubClient, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())?.tcp_nodelay(true);
    if uri.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match ca_file.map(std::fs::read) {
            Some(Ok(pem)) => tls.ca_certificate(Certificate::from_pem(pem)),
            // An unreadable CA file: trust nothing, so the handshake fails saying so.
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot read the CA file");
                tls
            }
            None => tls.with_native_roots(),
        };
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await?;
    Ok(
        TaskHubClient::with_interceptor(channel, BearerAuth::new(token))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}
