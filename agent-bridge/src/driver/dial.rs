//! Dialing a stream URL: the TLS client configuration for `wss://` and what a failed dial
//! means (a refused certificate is not retried).

use std::sync::Arc;

use tokio_tungstenite::tungstenite;
use tracing::warn;

use super::{ConnectError, DriverError, TlsSetupError};

/// A failed WebSocket dial: a refused certificate apart (it is not retried).
pub(super) fn dial_error(error: tungstenite::Error) -> DriverError {
    if let tungstenite::Error::Io(io) = &error
        && let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        && matches!(
            tls,
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
        )
    {
        return DriverError::CertificateRefused(tls.clone());
    }
    DriverError::Connect(ConnectError::WebSocket(error))
}

/// The TLS client configuration for `wss://` stream URLs: the system's root certificates
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` replace them), loaded once per process. Certificates
/// that cannot be loaded or parsed are reported once; none at all is an error at every dial.
pub(super) fn tls_config() -> Result<Arc<rustls::ClientConfig>, DriverError> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, TlsSetupError>> =
        std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(build_tls_config).clone();
    Ok(config.map_err(ConnectError::Tls)?)
}

fn build_tls_config() -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let loaded = rustls_native_certs::load_native_certs();
    for error in &loaded.errors {
        warn!(%error, "a root certificate could not be loaded");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        warn!(
            ignored,
            "root certificates that could not be parsed were ignored"
        );
    }
    if added == 0 {
        return Err(TlsSetupError::NoRootCertificates);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
