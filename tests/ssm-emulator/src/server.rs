//! The listening socket: one port serves both the JSON API (plain HTTP/1.1) and the data-channel
//! WebSockets. Each connection is sniffed (peeked, not read) to route it.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::registry::Shared;
use crate::{api, gateway};

const SNIFF_LIMIT: Duration = Duration::from_secs(10);
const DATA_CHANNEL_PREFIX: &[u8] = b"GET /v1/data-channel/";

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, shared.clone()));
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

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    if is_data_channel(&stream).await {
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
