//! A certificate lab made at test time (rcgen): a CA, server and client
//! certificates signed by it, written as PEM files into a temp dir; and TLS
//! clients that trust the lab CA.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agenthub::config::TlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// A certificate authority for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate `(cert_pem, key_pem, der)` for these names
    /// (IP literals become IP SANs); `expired` dates it in the past.
    pub fn leaf(&self, cn: &str, names: &[&str], expired: bool) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// PEM files of a lab in one directory.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// DER of the certificate the hub serves now.
    pub cert_der: Vec<u8>,
}

pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

impl Lab {
    /// A CA and a server certificate for 127.0.0.1 only.
    pub fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("agenthub test CA");
        let ca_file = write(dir.path(), "ca.pem", &ca.pem());
        let (cert, key, cert_der) = ca.leaf("hub", &["127.0.0.1"], false);
        let cert_file = write(dir.path(), "hub.pem", &cert);
        let key_file = write(dir.path(), "hub.key", &key);
        Lab {
            dir,
            ca,
            ca_file,
            cert_file,
            key_file,
            cert_der,
        }
    }

    /// Replace the hub's certificate files (the hub sees them on reload).
    pub fn swap_server_cert(&mut self, cn: &str, names: &[&str], expired: bool) {
        let (cert, key, der) = self.ca.leaf(cn, names, expired);
        // Key first, then cert, each by rename: a reload never sees half a file.
        let tmp = self.dir.path().join("swap.tmp");
        std::fs::write(&tmp, key).unwrap();
        std::fs::rename(&tmp, &self.key_file).unwrap();
        std::fs::write(&tmp, cert).unwrap();
        std::fs::rename(&tmp, &self.cert_file).unwrap();
        self.cert_der = der;
    }

    pub fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            cert: self.cert_file.clone(),
            key: self.key_file.clone(),
            client_ca: None,
        }
    }

    /// A client certificate signed by the lab CA: (cert file, key file).
    pub fn client_identity(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key, _) = self.ca.leaf(name, &[name], false);
        (
            write(self.dir.path(), &format!("{name}.pem"), &cert),
            write(self.dir.path(), &format!("{name}.key"), &key),
        )
    }

    /// A client config trusting the lab CA.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        agenthub::tls::client_config(Some(&self.ca_file), None).unwrap()
    }
}

/// A TLS handshake to `addr` as `name`: the server's leaf certificate, or the error.
pub async fn handshake(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<CertificateDer<'static>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
}

/// A hub in this process with TLS, keeping its [`agenthub::tls::Tls`] handle.
pub struct TlsHub {
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub admin_token: String,
    pub dir: PathBuf,
    pub hub: Arc<agenthub::Hub>,
    pub tls: Arc<agenthub::tls::Tls>,
    _tmp: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TlsHub {
    pub async fn start(tls: TlsConfig, tweak: impl FnOnce(&mut agenthub::Config)) -> TlsHub {
        crate::helpers::init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let mut config = crate::helpers::test_config(tmp.path());
        config.tls = Some(tls);
        tweak(&mut config);
        let server = agenthub::Server::build(config).await.expect("hub starts");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let hub = TlsHub {
            ws_addr: server.ws_addr(),
            grpc_addr: server.grpc_addr(),
            admin_token: crate::helpers::admin_token(tmp.path()),
            dir: tmp.path().to_path_buf(),
            hub: server.hub().clone(),
            tls: server.tls().expect("TLS configured"),
            _tmp: tmp,
            _stop: stop,
        };
        tokio::spawn(async move {
            let _ = server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        hub
    }

    pub fn wss_url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.ws_addr.port())
    }

    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_addr.port())
    }

    pub fn token(&self, role: agenthub::auth::Role, agent: Option<&str>) -> (String, String) {
        let store = agenthub::store::sqlite::SqliteStore::open(&self.dir, None, false).unwrap();
        let (secret, record) =
            agenthub::auth::issue_token(&store, role, agent.map(str::to_string)).unwrap();
        (secret, record.id)
    }
}
