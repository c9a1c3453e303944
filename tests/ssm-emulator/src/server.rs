//! The listening socket: one port serves both the JSON API (plain HTTP/1.1) and the data-channel
//! WebSockets, over TLS when the emulator has a certificate. Each connection is sniffed (peeked,
//! not read) to route it: a TLS ClientHello goes to the TLS gateway, a plain data-channel
//! upgrade to the plain one (refused when TLS is configured, as the real gateway serves only
//! `wss://`), anything else to the API.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::registry::Shared;
use crate::{api, gateway};

const SNIFF_LIMIT: Duration = Duration::from_secs(10);
const DATA_CHANNEL_PREFIX: &[u8] = b"GET /v1/data-channel/";
/// The first byte of a TLS record carrying a handshake message (the ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// A TLS handshake that has not finished by then is given up.
const TLS_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, shared.clone(), tls.clone()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

/// Peeks until the request line is complete (or enough bytes to decide).
async fn is_data_channel(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + SNIFF_LIMIT;
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return false;
        }
        let seen = &buf[..n];
        let cmp = n.min(DATA_CHANNEL_PREFIX.len());
        if seen[..cmp] != DATA_CHANNEL_PREFIX[..cmp] {
            return false;
        }
        if n >= DATA_CHANNEL_PREFIX.len() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Peeks the first byte: a TLS ClientHello starts with a handshake record.
async fn is_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(SNIFF_LIMIT, stream.peek(&mut first)).await;
    matches!(peeked, Ok(Ok(1))) && first[0] == TLS_HANDSHAKE_RECORD
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    if let Some(tls) = tls {
        if is_tls(&stream).await {
            match tokio::time::timeout(TLS_HANDSHAKE_LIMIT, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    shared.tls_connections.fetch_add(1, Ordering::Relaxed);
                    gateway::serve(shared, stream).await;
                }
                Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                Err(_) => tracing::debug!("TLS handshake unfinished after {TLS_HANDSHAKE_LIMIT:?}"),
            }
            return;
        }
        if is_data_channel(&stream).await {
            tracing::warn!("a plain-text data-channel upgrade refused: this gateway serves wss://");
            shared
                .plain_upgrades_refused
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    } else if is_data_channel(&stream).await {
        gateway::serve(shared, stream).await;
        return;
    }
    let service = service_fn(move |req| api::handle(shared.clone(), req));
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!("API connection ended: {e}");
    }
}
