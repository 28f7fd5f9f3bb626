//! TLS with rustls (the `ring` provider): certificate loading and reload for
//! both listeners, and the client side used by the CLI's gRPC client and the
//! reference sidecar.
//!
//! The hub's certificate sits behind a [`CertResolver`] shared by the two
//! listeners' `ServerConfig`s: [`Tls::reload`] (on SIGHUP) swaps it, new
//! handshakes get the new one, and live connections keep theirs. With a
//! client CA, the HTTP listener asks every client for a certificate but lets
//! connections without one through: only `/ws` requires it (see
//! `ws::upgrade`), and a certificate that is offered must verify.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use crate::config::TlsConfig;
use crate::error::{Error, Result};

/// The one crypto provider: `ring` (no C toolchain beyond a C compiler, no cmake).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("TLS {what} {}: {e}", path.display()))
}

/// Every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err("certificate", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("certificate", path, e))?;
    if certs.is_empty() {
        return Err(tls_err("certificate", path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_err("key", path, e))
}

/// A root store holding every certificate of a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| tls_err("CA", path, e))?;
    }
    Ok(roots)
}

fn certified_key(files: &TlsConfig) -> Result<Arc<CertifiedKey>> {
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let ck = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| tls_err("key (does it match the certificate?)", &files.key, e))?;
    Ok(Arc::new(ck))
}

/// Hands every handshake the current certificate; [`Tls::reload`] swaps it.
#[derive(Debug)]
pub struct CertResolver {
    /// Read by every handshake, written by reload; never held across `.await`.
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert resolver").clone())
    }
}

/// The hub's TLS state, shared by both listeners.
pub struct Tls {
    files: TlsConfig,
    /// The swappable certificate, shared by both acceptors' configs.
    certs: Arc<CertResolver>,
    http: TlsAcceptor,
    grpc: TlsAcceptor,
}

impl Tls {
    /// Read the certificate, key and optional client CA; fail before binding.
    pub fn load(files: &TlsConfig) -> Result<Arc<Tls>> {
        let certs = Arc::new(CertResolver {
            current: RwLock::new(certified_key(files)?),
        });
        let builder = || {
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))
        };
        let mut http = match &files.client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(load_roots(ca)?),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_err("client CA", ca, e))?;
                builder()?
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(certs.clone())
            }
            None => builder()?
                .with_no_client_auth()
                .with_cert_resolver(certs.clone()),
        };
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut grpc = builder()?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(Tls {
            files: files.clone(),
            certs,
            http: TlsAcceptor::from(Arc::new(http)),
            grpc: TlsAcceptor::from(Arc::new(grpc)),
        }))
    }

    /// Re-read the certificate and key. New handshakes use them; live
    /// connections are untouched. On error the old certificate stays.
    pub fn reload(&self) -> Result<()> {
        let ck = certified_key(&self.files)?;
        *self.certs.current.write().expect("cert resolver") = ck;
        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// For the HTTP/WebSocket listener (ALPN `http/1.1`; client CA if configured).
    pub fn http_acceptor(&self) -> TlsAcceptor {
        self.http.clone()
    }

    /// For the gRPC listener (ALPN `h2`).
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        self.grpc.clone()
    }

    /// Whether `/ws` requires a verified client certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

// ---- client side --------------------------------------------------------------

/// A client config trusting `ca_file` (PEM), or the system's roots without one.
/// With `identity` (certificate, key), it presents a client certificate.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>> {
    let roots = match ca_file {
        Some(path) => load_roots(path)?,
        None => {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| tls_err("client key", key, e))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A socket that may or may not be wrapped in TLS.
pub trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

/// A WebSocket over plain TCP or TLS.
pub type ClientWebSocket = WebSocketStream<Box<dyn AsyncIo>>;

/// Open a `ws://` or `wss://` URL. `wss://` uses `tls`, or the system's
/// roots when `None`.
pub async fn connect_websocket(
    url: &str,
    config: Option<WebSocketConfig>,
    tls: Option<Arc<ClientConfig>>,
) -> std::result::Result<ClientWebSocket, String> {
    let request = url.into_client_request().map_err(|e| e.to_string())?;
    let uri = request.uri().clone();
    let secure = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err(format!("{url}: not a ws:// or wss:// URL")),
    };
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn AsyncIo> = if secure {
        let tls = match tls {
            Some(t) => t,
            None => client_config(None, None).map_err(|e| e.to_string())?,
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, io, config)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}
