//! The admin port: `/healthz` (the process runs), `/readyz` (it serves endpoints, can judge who
//! may connect, and is not draining) and `/metrics` (Prometheus text format). A deliberately tiny HTTP/1.1 server: one
//! request per connection, GET only.

use std::sync::Arc;

use prometheus::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// Largest request head read; admin requests are a line and a few headers.
const MAX_REQUEST: usize = 8 * 1024;

/// Readiness, flipped by the server's owner; watched by whoever waits for a change.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<watch::Sender<bool>>);

impl Readiness {
    /// Sets whether the bridge is ready for traffic.
    pub fn set(&self, ready: bool) {
        self.0.send_replace(ready);
    }

    /// Whether it is.
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the bridge is (or is not) ready, as `ready` says.
    pub async fn reached(&self, ready: bool) {
        let mut changes = self.0.subscribe();
        // The sender lives as long as `self`: the wait ends only by the value.
        let _ = changes.wait_for(|now| *now == ready).await;
    }
}

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (registry, readiness) = (registry.clone(), readiness.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &registry, &readiness).await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    registry: &Registry,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if readiness.get() => ("200 OK", "text/plain", "ready\n".to_owned()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_owned(),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics::encode(registry),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_wait_for_readiness_ends_when_it_is_set() {
        let readiness = Readiness::default();
        assert!(!readiness.get());
        assert!(readiness.reached(false).now_or_never().is_some());
        let waiting = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.reached(true).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        readiness.set(true);
        waiting.await.expect("the wait ends");
        assert!(readiness.get());
    }
}
