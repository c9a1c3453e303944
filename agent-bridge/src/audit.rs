//! One audit record per client connection of `serve`: a JSON line on standard output (the logs
//! go to standard error), which any log pipeline can ship. A record says who connected (the
//! client pod, or its address), through which grants, to what (instance, remote host, port,
//! document, SSM session), when, how many bytes each way, and how it ended, refusals included.
//!
//! ```text
//! {"record":"connection","client":{"address":"10.1.0.7","pod":{...}},"grants":["ci/web-ssh"],
//!  "instance":"i-0123…","port":22,"document":"AWS-StartSSHSession","sessionId":"…",
//!  "start":"…Z","end":"…Z","bytesFromClient":4210,"bytesToClient":98213,"ended":"client_closed"}
//! ```

use std::{
    io::Write,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::clients::{Client, ClientPod};

/// How a connection ended, as its record says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// The client closed its side.
    ClientClosed,
    /// The instance's side closed (the target port, the agent or SSM ended the session).
    TargetClosed,
    /// The bridge ended it: its endpoint was removed, the bridge shut down, or no grant admits
    /// its client any more (see `detail`).
    Terminated,
    /// It was idle too long, or reached its maximum duration.
    Expired,
    /// Never carried: no grant admits the client, a limit, or StartSession refused (access
    /// denied, say); see `detail`.
    Refused,
    /// The data channel failed; see `detail`.
    Error,
}

/// Who a record is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientRecord {
    /// The connection's source address.
    pub address: IpAddr,
    /// The client pod, when exactly one running pod has the address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<ClientPod>,
}

impl ClientRecord {
    /// The record of a connection from `address`, resolved to `client`.
    pub fn new(address: IpAddr, client: &Client) -> Self {
        Self {
            address: address.to_canonical(),
            pod: match client {
                Client::Pod(pod) => Some(pod.clone()),
                Client::Unresolved { .. } => None,
            },
        }
    }
}

/// One connection's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRecord {
    /// Always `connection`.
    pub record: &'static str,
    /// Who connected.
    pub client: ClientRecord,
    /// The grants (`namespace/name`) that expose the endpoint.
    pub grants: Vec<String>,
    /// The instance.
    pub instance: String,
    /// The remote host reached through the instance, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    /// The port on the instance or the remote host.
    pub port: u16,
    /// The session document.
    pub document: String,
    /// The SSM session, when StartSession gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// When the client connected (RFC 3339).
    pub start: Timestamp,
    /// When the connection ended.
    pub end: Timestamp,
    /// Bytes the client sent to the instance.
    pub bytes_from_client: u64,
    /// Bytes the instance sent to the client.
    pub bytes_to_client: u64,
    /// How it ended.
    pub ended: Ended,
    /// What refused or broke it, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A client connection that counts the bytes the client sent (read from it) and received
/// (written to it): the application's bytes, whatever framing the session adds.
pub struct Counted<S> {
    inner: S,
    counts: Arc<ByteCounts>,
}

/// The bytes a [`Counted`] connection carried so far.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Read from the client.
    pub from_client: AtomicU64,
    /// Written to the client.
    pub to_client: AtomicU64,
}

impl<S> Counted<S> {
    /// `inner`, counted into the returned counts.
    pub fn new(inner: S) -> (Self, Arc<ByteCounts>) {
        let counts = Arc::new(ByteCounts::default());
        (
            Self {
                inner,
                counts: counts.clone(),
            },
            counts,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.counts.from_client.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            (self.counts.to_client).fetch_add(*written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where records go.
pub trait AuditSink: Send + Sync {
    /// Takes one record.
    fn record(&self, record: &ConnectionRecord);
}

/// Standard output, one JSON line per record, each written whole.
pub struct Stdout;

impl AuditSink for Stdout {
    fn record(&self, record: &ConnectionRecord) {
        // A record of plain fields always serializes.
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        if out.write_all(&line).and_then(|()| out.flush()).is_err() {
            tracing::warn!(?record, "cannot write an audit record to standard output");
        }
    }
}

/// Keeps records in memory (tests, and whoever embeds the bridge).
#[derive(Clone, Default)]
pub struct Collected(Arc<Mutex<Vec<ConnectionRecord>>>);

impl Collected {
    /// The records so far.
    pub fn records(&self) -> Vec<ConnectionRecord> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl AuditSink for Collected {
    fn record(&self, record: &ConnectionRecord) {
        (self.0.lock().unwrap_or_else(|e| e.into_inner())).push(record.clone());
    }
}
