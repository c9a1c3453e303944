//! A stand-in for AWS service hosts, for a client that cannot be pointed at another endpoint
//! (the official plugin calls KMS at `kms.<region>.amazonaws.com` whatever its environment
//! says): an HTTPS proxy on loopback (`HTTPS_PROXY`) that accepts `CONNECT` only for the host
//! names it was given, answers their TLS with a certificate a test CA signed for them (trust it
//! with `SSL_CERT_FILE`), and relays what comes through to a loopback endpoint (moto). It never
//! dials anything else, so no request leaves the machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::certificates::NamedTls;
use crate::error::{FixtureError, FixtureResult};

/// The proxy; it stops when dropped.
pub struct ServiceProxy {
    address: SocketAddr,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

fn io_error(context: &str) -> impl FnOnce(std::io::Error) -> FixtureError + '_ {
    move |source| FixtureError::Io {
        context: context.to_owned(),
        source,
    }
}

impl ServiceProxy {
    /// A proxy for `hosts` (port 443) that relays to `upstream`.
    pub async fn start(hosts: &[&str], upstream: SocketAddr) -> FixtureResult<Self> {
        let tls = NamedTls::generate(hosts)?;
        let dir = tempfile::tempdir().map_err(io_error("creating the proxy's directory"))?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &tls.ca_cert_pem).map_err(io_error("writing the proxy's CA"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth().with_single_cert(
                    vec![CertificateDer::from(tls.cert_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls.key_der.clone())),
                )
            })
            .map_err(|e| FixtureError::Io {
                context: "the proxy's TLS configuration".to_owned(),
                source: std::io::Error::other(e),
            })?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io_error("binding the proxy"))?;
        let address = listener
            .local_addr()
            .map_err(io_error("the proxy's address"))?;
        let allowed: Vec<String> = hosts.iter().map(|h| format!("{h}:443")).collect();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, acceptor.clone(), allowed.clone(), upstream));
            }
        });
        Ok(Self {
            address,
            ca_file,
            _dir: dir,
            task,
        })
    }

    /// `HTTPS_PROXY` for the client.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The CA that signed the hosts' certificate (`SSL_CERT_FILE` for the client).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One proxied connection: `CONNECT <allowed host>:443`, TLS, then bytes both ways to
/// `upstream`; anything else is refused.
async fn relay(
    client: TcpStream,
    acceptor: TlsAcceptor,
    allowed: Vec<String>,
    upstream: SocketAddr,
) {
    let mut client = BufReader::new(client);
    let mut request = String::new();
    if client.read_line(&mut request).await.is_err() {
        return;
    }
    // The rest of the request's head.
    loop {
        let mut line = String::new();
        match client.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut words = request.split_whitespace();
    let allowed_connect = matches!(
        (words.next(), words.next()),
        (Some("CONNECT"), Some(target)) if allowed.iter().any(|a| a == target)
    );
    if !allowed_connect {
        let _ = client
            .get_mut()
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    }
    let mut client = client.into_inner();
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let Ok(mut tls) = acceptor.accept(client).await else {
        return;
    };
    let Ok(mut service) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut service).await;
}
