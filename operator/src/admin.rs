//! The admin endpoint: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (200 while this replica holds the leader Lease and its controllers run; 503 on a
//! standby, so a Service or a person sees which replica works). A deliberately small HTTP/1.1 responder: one request per
//! connection, GET only.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use prometheus::{Encoder, Registry, TextEncoder};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// Largest request head read; anything longer is answered from what was read.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Registry, ready: Arc<AtomicBool>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; MAX_REQUEST];
            let Ok(n) = stream.read(&mut buffer).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buffer[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = respond(path, &registry, ready.load(Ordering::Relaxed));
            let response = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

fn respond(path: &str, registry: &Registry, ready: bool) -> (&'static str, String) {
    match path {
        "/metrics" => {
            let mut out = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut out) {
                Ok(()) => ("200 OK", String::from_utf8_lossy(&out).into_owned()),
                Err(e) => ("500 Internal Server Error", e.to_string()),
            }
        }
        "/healthz" => ("200 OK", "ok\n".into()),
        "/readyz" if ready => ("200 OK", "leading\n".into()),
        "/readyz" => ("503 Service Unavailable", "standby\n".into()),
        _ => ("404 Not Found", "not found\n".into()),
    }
}
