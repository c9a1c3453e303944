//! `agent-bridge forward`: local connections carried over a pool of SSM sessions.
//!
//! The agent reads each session's local connection in a loop of its own (1 KiB per
//! millisecond in the agent's port plugin), so connections that share one mux session share
//! that loop: parallel downloads through one session get about 1 MB/s together. The pool opens
//! another session when a connection arrives and every open session is carrying one, up to
//! `max_sessions`; beyond that, connections share the least loaded session (smux streams, as
//! one session always does). Sessions other than the first are terminated after `idle` without
//! a connection.
//!
//! ```text
//!  listener ─accept─▶ dispatch ─┬─ an idle session            (its smux stream, or its one
//!                               ├─ a new session (< max)       connection on an old agent)
//!                               └─ the least loaded session
//!  every session: Tunnel::run (driver) until the pool stops it, or the instance ends it
//! ```
//!
//! The first session ending (the instance's side, a failure, the shutdown) ends `forward`, as
//! it did before pools: it is the one whose start `forward` reports.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    driver::{DriverConfig, DriverError, Outcome, Tunnel, signing::UpgradeSigner},
    ssm::{ControlPlane, StartSessionRequest, StreamTarget},
};

/// How `forward` spreads connections over sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    /// The most sessions open at once (1: every connection shares one session).
    pub max_sessions: usize,
    /// How long a session other than the first stays open without a connection.
    pub idle: Duration,
}

impl Default for Pool {
    /// Eight sessions (parallel downloads each get the agent's read loop to themselves), closed
    /// after a minute without a connection.
    fn default() -> Self {
        Self {
            max_sessions: 8,
            idle: Duration::from_secs(60),
        }
    }
}

/// How many connections a session carries, and since when it carries none.
#[derive(Debug)]
struct Load {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Load {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Whether it has carried no connection for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.active() == 0
            && (self.idle_since.lock())
                .map(|since| since.elapsed() >= idle)
                .unwrap_or(false)
    }
}

/// A local connection counted in its session's [`Load`] until the tunnel drops it.
struct Counted {
    stream: TcpStream,
    load: Arc<Load>,
}

impl Counted {
    fn new(stream: TcpStream, load: Arc<Load>) -> Self {
        load.active.fetch_add(1, Ordering::AcqRel);
        Self { stream, load }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.load.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut since) = self.load.idle_since.lock()
        {
            *since = Instant::now();
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// One open session of the pool.
struct Member {
    /// The pool's number for it (0: the first).
    number: usize,
    session_id: String,
    connections: mpsc::Sender<Counted>,
    load: Arc<Load>,
    stop: CancellationToken,
}

/// Starts one session and carries every connection `listener` accepts over it and the sessions
/// `pool` adds, until `shutdown` or the first session ends.
pub async fn forward<C: ControlPlane>(
    control: &C,
    signer: Option<&dyn UpgradeSigner>,
    request: &StartSessionRequest,
    listener: TcpListener,
    shutdown: CancellationToken,
    pool: Pool,
) -> anyhow::Result<()> {
    let tunnel = Tunnel::new(control, signer, DriverConfig::default());
    let mut running = FuturesUnordered::new();
    let mut members: Vec<Member> = Vec::new();
    let mut numbers = 0..;
    let first = control.start_session(request).await?;
    let port = (request.parameters.get("portNumber"))
        .and_then(|p| p.first())
        .map_or("the document's port", String::as_str);
    eprintln!(
        "forwarding {} -> {} port {port} through {} (session {}; up to {} sessions)",
        listener.local_addr()?,
        request.target,
        request
            .document_name
            .as_deref()
            .unwrap_or("the default document"),
        first.session_id,
        pool.max_sessions.max(1),
    );
    let (member, carried) = open(&tunnel, numbers.next().unwrap_or(0), first, &shutdown);
    members.push(member);
    running.push(carried);
    let mut idle_check = tokio::time::interval((pool.idle / 4).max(Duration::from_millis(100)));
    // Every session's data channel is polled by this loop (through `running`), so no arm may
    // wait: StartSession runs in `starting`, and connections are handed over without waiting.
    let mut starting = FuturesUnordered::new();
    let ended: Result<Outcome, DriverError> = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let open_or_starting = members.len() + starting.len();
                match least_loaded(&members) {
                    Some(index) if members[index].load.active() == 0
                        || open_or_starting >= pool.max_sessions.max(1) => {
                        hand_over(&members, index, stream);
                    }
                    _ => starting.push(async move { (stream, control.start_session(request).await) }),
                }
            }
            Some((stream, started)) = starting.next() => match started {
                Ok(target) => {
                    info!(session = %target.session_id, open = members.len() + 1, "another session for parallel connections");
                    let number = numbers.next().unwrap_or(usize::MAX);
                    let (member, carried) = open(&tunnel, number, target, &shutdown);
                    members.push(member);
                    running.push(carried);
                    hand_over(&members, members.len() - 1, stream);
                }
                Err(error) => {
                    warn!(%error, "cannot start another session; sharing an open one");
                    if let Some(index) = least_loaded(&members) {
                        hand_over(&members, index, stream);
                    }
                }
            },
            Some((number, outcome)) = running.next() => {
                members.retain(|m| m.number != number);
                if number == 0 {
                    break outcome;
                }
                if let Err(error) = outcome {
                    warn!(%error, "a pooled session failed");
                }
            }
            _ = idle_check.tick() => {
                for member in members.iter().filter(|m| m.number != 0) {
                    if member.load.idle_for(pool.idle) {
                        info!(session = %member.session_id, "closing a session idle for {:?}", pool.idle);
                        member.stop.cancel();
                    }
                }
            }
        }
    };
    // The first session has ended: stop the others, and wait until each is terminated; a
    // session that was starting meanwhile is terminated as soon as it exists.
    for member in &members {
        member.stop.cancel();
    }
    while running.next().await.is_some() {}
    while let Some((_, started)) = starting.next().await {
        if let Ok(target) = started
            && let Err(error) = control.terminate_session(&target.session_id).await
        {
            warn!(session = %target.session_id, %error, "cannot terminate a session that started as forward stopped");
        }
    }
    let outcome = ended?;
    if let Some(output) = outcome.output.filter(|o| !o.trim().is_empty()) {
        eprintln!("session closed: {}", output.trim());
    }
    Ok(())
}

/// A member for session `target`, and the future that carries its connections until it is
/// stopped (with `shutdown`, or alone) or the session ends.
fn open<'t, C: ControlPlane>(
    tunnel: &'t Tunnel<'_, C>,
    number: usize,
    target: StreamTarget,
    shutdown: &CancellationToken,
) -> (
    Member,
    impl Future<Output = (usize, Result<Outcome, DriverError>)> + 't,
) {
    let (connections, incoming) = mpsc::channel(64);
    let stop = shutdown.child_token();
    let member = Member {
        number,
        session_id: target.session_id.clone(),
        connections,
        load: Load::new(),
        stop: stop.clone(),
    };
    let carried = async move {
        let outcome = tunnel
            .run(target, incoming, stop.cancelled_owned(), None)
            .await;
        (number, outcome)
    };
    (member, carried)
}

/// Gives `stream` to member `index`'s session without waiting (its queue holds 64: a session
/// that has not taken 64 connections is stuck, and the connection is closed).
fn hand_over(members: &[Member], index: usize, stream: TcpStream) {
    let member = &members[index];
    if let Err(error) = member
        .connections
        .try_send(Counted::new(stream, member.load.clone()))
    {
        warn!(session = %member.session_id, %error, "the session cannot take the connection; closing it");
    }
}

/// The member carrying the fewest connections (the earliest opened among equals).
fn least_loaded(members: &[Member]) -> Option<usize> {
    (0..members.len()).min_by_key(|&i| (members[i].load.active(), members[i].number))
}
