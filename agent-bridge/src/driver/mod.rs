//! The tokio driver of one SSM data channel: the only place that awaits.
//!
//! One loop `select!`s over the WebSocket, the local connections, the session's timer (which
//! covers its pacing), the ping timer and shutdown; after every input it drains the sans-IO
//! [`Session`](crate::protocol::Session)'s outputs. Local connections arrive on a channel: in
//! basic mode they are served one at a time (DisconnectToPort between them), in mux mode each
//! becomes an smux stream. On a lost WebSocket it calls ResumeSession, dials the new StreamUrl
//! with the new token, and keeps the sequence state, within a retry budget far above the
//! official plugin's few seconds.
//!
//! ```text
//!   incoming conns ──► [reader task] ──LocalInput──►┐
//!                                                   │          ┌─► ws.send (paced)
//!   ws.next() ───────────────────────────────────► Session ────┤
//!   timers / ping / shutdown ──────────────────────►│          └─► events ─► [writer task] ─► conn
//!                        ResumeSession + dial ◄── lost ws
//! ```

mod dial;
pub mod lifecycle;
mod local;
mod share;
pub mod signing;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::protocol::handshake::OpenDataChannel;
use crate::protocol::kms::DataKey;
use crate::protocol::{
    CloseCause, Event, ForwardingMode, HandshakeInfo, Session, SessionError, Stats, Transmit,
};

use crate::budget::Lease;
use crate::ssm::{ControlPlane, ControlPlaneError, StreamTarget};
use dial::{dial_error, tls_config};
pub use lifecycle::{Deadlines, Expiry, Milestone, Milestones, SetupObserver};
use local::{Budgeted, Conn, LocalInput, spawn_conn};
use share::Share;
use signing::{SigningError, UpgradeSigner, is_presigned};

/// WebSocket ping interval: within the 30–60 s the reference suggests (the agent pings every 54 s).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// No inbound frame at all (data, acks, pongs) for this long, or no ack progress on sent data
/// for this long, means the transport is dead.
pub const DEFAULT_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(75);
/// One dial (TCP, TLS, upgrade) may take this long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Total time allowed to restore one lost WebSocket. MGS recycles sockets hourly and the
/// plugin's ~3–6 s budget sometimes runs out (docs/protocol.md §4); two minutes rides
/// out a gateway hiccup while the session's idle timeout (minutes) still bounds it.
pub const DEFAULT_RECONNECT_BUDGET: Duration = Duration::from_secs(120);
/// First reconnect backoff.
pub const DEFAULT_RECONNECT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Largest reconnect backoff.
pub const DEFAULT_RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// One WebSocket write may take this long. A gateway that stops reading (a black hole) fills
/// the TCP send buffer and would otherwise block the loop, the ping timer included, for ever.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes read from a local connection at once: one full smux frame, hence one message.
pub const DEFAULT_LOCAL_READ_SIZE: usize = crate::protocol::smux::MAX_FRAME_DATA;
/// Bound on the TerminateSession call that ends every tunnel: a process that exits right after
/// (`proxy`) must not hang on an unresponsive endpoint.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket read buffer: one read takes up to this much (tungstenite's default is 128 KiB per
/// connection, idle or not).
const WS_READ_BUFFER: usize = 8 * 1024;
/// Write coalescing; every message is flushed when sent, so a small buffer costs nothing.
const WS_WRITE_BUFFER: usize = 8 * 1024;
/// Chunks queued toward one local connection before the session stops draining events.
pub const DEFAULT_LOCAL_WRITE_QUEUE: usize = 64;
/// How long a closed session's local writers may take to write out the instance's last bytes.
const LOCAL_FLUSH_GRACE: Duration = Duration::from_secs(10);
/// Largest WebSocket message accepted: far above any SSM frame, small enough to bound memory.
pub const MAX_WS_MESSAGE: usize = 4 * 1024 * 1024;

/// Driver tunables (plain data, documented defaults).
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The protocol core's configuration.
    pub session: crate::protocol::Config,
    /// See [`DEFAULT_PING_INTERVAL`].
    pub ping_interval: Duration,
    /// See [`DEFAULT_DEAD_PEER_TIMEOUT`].
    pub dead_peer_timeout: Duration,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_SEND_TIMEOUT`].
    pub send_timeout: Duration,
    /// See [`DEFAULT_RECONNECT_BUDGET`].
    pub reconnect_budget: Duration,
    /// See [`DEFAULT_RECONNECT_INITIAL_BACKOFF`].
    pub reconnect_initial_backoff: Duration,
    /// See [`DEFAULT_RECONNECT_MAX_BACKOFF`].
    pub reconnect_max_backoff: Duration,
    /// See [`DEFAULT_LOCAL_READ_SIZE`].
    pub local_read_size: usize,
    /// See [`DEFAULT_LOCAL_WRITE_QUEUE`].
    pub local_write_queue: usize,
    /// One connection per session (`serve`, `proxy`): end the whole session when its local
    /// connection ends. Basic mode then terminates instead of sending DisconnectToPort and
    /// serving the next connection; mux mode closes the stream, then terminates once no stream
    /// is left (a FIN alone would keep the session, and the bridge's slot, until the idle
    /// timeout).
    pub end_on_local_eof: bool,
    /// ClientId of the open message: one per process, reused across reconnects.
    pub client_id: uuid::Uuid,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            session: crate::protocol::Config::default(),
            ping_interval: DEFAULT_PING_INTERVAL,
            dead_peer_timeout: DEFAULT_DEAD_PEER_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            reconnect_budget: DEFAULT_RECONNECT_BUDGET,
            reconnect_initial_backoff: DEFAULT_RECONNECT_INITIAL_BACKOFF,
            reconnect_max_backoff: DEFAULT_RECONNECT_MAX_BACKOFF,
            local_read_size: DEFAULT_LOCAL_READ_SIZE,
            local_write_queue: DEFAULT_LOCAL_WRITE_QUEUE,
            end_on_local_eof: false,
            client_id: uuid::Uuid::new_v4(),
        }
    }
}

/// Why a tunnel could not run to a protocol-level close.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Signing the upgrade failed.
    #[error(transparent)]
    Signing(#[from] SigningError),
    /// A dial failed (TCP, TLS, upgrade, or the open message).
    #[error("connecting to the data channel failed: {0}")]
    Connect(#[source] ConnectError),
    /// The gateway's TLS certificate was refused. Not retried: another dial would meet the
    /// same certificate.
    #[error(
        "the data channel's TLS certificate was refused ({0}): check the trusted root \
         certificates (SSL_CERT_FILE, SSL_CERT_DIR) and the stream URL's host"
    )]
    CertificateRefused(#[source] rustls::Error),
    /// ResumeSession returned no token: the session expired; start a new one.
    #[error("session {0} expired (ResumeSession returned no token)")]
    SessionExpired(String),
    /// A control-plane call failed in a way retrying cannot fix.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// A presigned StreamUrl cannot be resumed (as in the official plugin).
    #[error("the WebSocket was lost and a presigned stream URL cannot be resumed")]
    CannotResume,
    /// The reconnect budget ran out.
    #[error("reconnect budget exhausted after {attempts} attempts: {last_error}")]
    ReconnectBudgetExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        last_error: Box<DriverError>,
    },
}

/// Why a dial of the data channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The stream URL or a signed header does not make a valid upgrade request.
    #[error("invalid upgrade request: {0}")]
    InvalidRequest(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A step took longer than its timeout.
    #[error("{0} timed out")]
    TimedOut(&'static str),
    /// TCP, TLS, the HTTP upgrade or a WebSocket write failed.
    #[error(transparent)]
    WebSocket(#[from] tungstenite::Error),
    /// No TLS client could be configured for `wss://`.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

impl From<ConnectError> for DriverError {
    fn from(error: ConnectError) -> Self {
        DriverError::Connect(error)
    }
}

/// The TLS client configuration for `wss://` could not be built.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// Not one root certificate could be loaded.
    #[error("no root certificates could be loaded for TLS (see SSL_CERT_FILE)")]
    NoRootCertificates,
    /// rustls refused the configuration.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// How a tunnel ended at the protocol level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Why.
    pub cause: CloseCause,
    /// `channel_closed`'s `Output`, when sent.
    pub output: Option<String>,
    /// The handshake result, when it completed.
    pub handshake: Option<HandshakeInfo>,
    /// Final counters.
    pub stats: Stats,
    /// The deadline that ended the session, if one did.
    pub expired: Option<Expiry>,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A terminal's size, for a shell session's Size payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// Where a shell's KMS data keys come from: KMS `GenerateDataKey` for `key_id`, 64 bytes, with
/// the encryption context the agent decrypts with (`aws:ssm:SessionId`, `aws:ssm:TargetId`).
pub trait DataKeySource: Send + Sync {
    /// A data key, or what to tell the person when there is none.
    fn generate(
        &self,
        key_id: &str,
        session_id: &str,
        target: &str,
    ) -> futures::future::BoxFuture<'static, Result<DataKey, String>>;
}

/// A shell session's KMS encryption: the data keys, and the instance the session is on.
#[derive(Clone)]
pub struct Encryption {
    /// KMS.
    pub keys: std::sync::Arc<dyn DataKeySource>,
    /// The instance (`aws:ssm:TargetId`).
    pub target: String,
}

/// One tunnel: a control plane, an optional signer, and configuration.
pub struct Tunnel<'a, C> {
    control: &'a C,
    signer: Option<&'a dyn UpgradeSigner>,
    config: DriverConfig,
    stats: Option<watch::Sender<Stats>>,
    terminal: Option<watch::Receiver<TerminalSize>>,
    encryption: Option<Encryption>,
    deadlines: Deadlines,
    setup: Option<SetupObserver>,
}

impl<'a, C: ControlPlane> Tunnel<'a, C> {
    /// A tunnel using `control` for ResumeSession/TerminateSession. With no `signer` the
    /// upgrade is unsigned (emulator, presigned URLs).
    pub fn new(
        control: &'a C,
        signer: Option<&'a dyn UpgradeSigner>,
        config: DriverConfig,
    ) -> Self {
        Self {
            control,
            signer,
            config,
            stats: None,
            terminal: None,
            encryption: None,
            deadlines: Deadlines::default(),
            setup: None,
        }
    }

    /// Ends the session at its idle or maximum-duration deadline (see [`Outcome::expired`]).
    pub fn with_deadlines(mut self, deadlines: Deadlines) -> Self {
        self.deadlines = deadlines;
        self
    }

    /// Tells `observer` of each setup milestone the moment it is reached.
    pub fn with_setup_observer(mut self, observer: SetupObserver) -> Self {
        self.setup = Some(observer);
        self
    }

    /// A shell session that may be KMS-encrypted: where its data key comes from.
    pub fn with_encryption(mut self, encryption: Encryption) -> Self {
        self.encryption = Some(encryption);
        self
    }

    /// A shell session's terminal: its size goes to the agent once the session opens and
    /// again whenever it changes.
    pub fn with_terminal(mut self, sizes: watch::Receiver<TerminalSize>) -> Self {
        self.terminal = Some(sizes);
        self
    }

    /// Publishes the session's [`Stats`] after every loop turn (for tests that watch them).
    pub fn with_stats(mut self, stats: watch::Sender<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Runs the data channel of `target` until the session closes: serves local connections
    /// from `incoming`, and on `shutdown` terminates the session (TerminateSession flag, then
    /// the TerminateSession API). With a `lease` of a memory budget, what the session holds
    /// stays within it (see [`crate::budget`]); without, within the per-session bounds only.
    pub async fn run<L>(
        &self,
        target: StreamTarget,
        incoming: mpsc::Receiver<L>,
        shutdown: impl Future<Output = ()>,
        lease: Option<Lease>,
    ) -> Result<Outcome, DriverError>
    where
        L: AsyncRead + AsyncWrite + Send + 'static,
    {
        let mut target = target;
        let start = Instant::now();
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut session = Session::new(
            self.config.session.clone(),
            start.into_std(),
            epoch_ms,
            rand_seed(),
        );
        // Calls that happen once or rarely are boxed: their futures (the SDK's are several KiB)
        // would otherwise be laid out inline in every tunnel's task for its whole life.
        let first_dial = match Box::pin(self.dial(&target)).await {
            Err(e @ DriverError::CertificateRefused(_)) => Err(e),
            Err(e) => {
                warn!(error = %e, "first dial failed; resuming");
                Box::pin(self.reconnect(&mut session, &mut target)).await
            }
            dialled => dialled,
        };
        let ws = match first_dial {
            Ok(ws) => ws,
            Err(e) => {
                self.terminate(&target.session_id).await;
                return Err(e);
            }
        };
        let terminal = self.terminal.clone().map(|mut sizes| {
            // The size as it is now goes out first.
            sizes.mark_changed();
            sizes
        });
        let mut run = Run {
            tunnel: self,
            terminal,
            data_key: None,
            session,
            ws,
            target,
            incoming,
            conns: HashMap::new(),
            next_basic_key: 0,
            local_tx: None,
            local_rx: None,
            pending_local: None,
            stalled: None,
            unattached: None,
            outgoing: None,
            last_heard: start,
            listening_since: start,
            mode: None,
            finishing: Vec::new(),
            share: lease.map(Share::new),
            started: start,
            last_activity: start,
            milestones: Milestones::default(),
            expired: None,
            ws_gone_at: None,
        };
        let (tx, rx) = mpsc::channel(self.config.local_write_queue.max(1));
        run.local_tx = Some(tx);
        run.local_rx = Some(rx);
        let result = run.drive(shutdown).await;
        self.terminate(&run.target.session_id).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), run.ws.close(None)).await;
        run.finish_local_writes().await;
        if let Some(stats) = &self.stats {
            stats.send_replace(run.session.stats());
        }
        result
    }

    /// Ends the session with the TerminateSession API, bounded in time.
    async fn terminate(&self, session_id: &str) {
        let terminate = Box::pin(self.control.terminate_session(session_id));
        match tokio::time::timeout(TERMINATE_TIMEOUT, terminate).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "TerminateSession after close"),
            Err(_) => warn!("TerminateSession did not answer in time; the session may linger"),
        }
    }

    /// Signs (unless presigned), dials, and sends the open message.
    async fn dial(&self, target: &StreamTarget) -> Result<Ws, DriverError> {
        let headers = match self.signer {
            Some(signer) if !is_presigned(&target.stream_url) => {
                signer.sign(&target.stream_url).await?
            }
            _ => Vec::new(),
        };
        let invalid = |e: Box<dyn std::error::Error + Send + Sync>| ConnectError::InvalidRequest(e);
        let mut request = (target.stream_url.as_str())
            .into_client_request()
            .map_err(|e| invalid(e.into()))?;
        for (name, value) in headers {
            let name =
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.into()))?;
            let value = http::HeaderValue::from_str(&value).map_err(|e| invalid(e.into()))?;
            request.headers_mut().insert(name, value);
        }
        let connector = if target.stream_url.starts_with("wss:") {
            Connector::Rustls(tls_config()?)
        } else {
            Connector::Plain
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(WS_WRITE_BUFFER)
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            true,
            Some(connector),
        );
        let (mut ws, _response) = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::TimedOut("dialling the data channel"))?
            .map_err(dial_error)?;
        let open = OpenDataChannel::new(
            &target.token_value,
            uuid::Uuid::new_v4(),
            self.config.client_id,
        );
        tokio::time::timeout(
            self.config.send_timeout,
            ws.send(Message::text(open.to_json())),
        )
        .await
        .map_err(|_| ConnectError::TimedOut("sending the open message"))?
        .map_err(ConnectError::WebSocket)?;
        info!(session_id = %target.session_id, "data channel open");
        Ok(ws)
    }

    /// ResumeSession + dial, with backoff, within the budget. On success the session's
    /// transport is reset (sequence state kept, in-flight messages resent).
    async fn reconnect(
        &self,
        session: &mut Session,
        target: &mut StreamTarget,
    ) -> Result<Ws, DriverError> {
        if is_presigned(&target.stream_url) {
            return Err(DriverError::CannotResume);
        }
        let started = Instant::now();
        let mut backoff = self.config.reconnect_initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match self.control.resume_session(&target.session_id).await {
                Ok(None) => return Err(DriverError::SessionExpired(target.session_id.clone())),
                Err(e) if !e.retryable => return Err(e.into()),
                Err(e) => DriverError::ControlPlane(e),
                Ok(Some(resumed)) => {
                    if let Some(url) = resumed.stream_url {
                        target.stream_url = url;
                    }
                    target.token_value = resumed.token_value;
                    match self.dial(target).await {
                        Ok(ws) => {
                            session.reset_transport(Instant::now().into_std());
                            info!(attempts, "data channel resumed");
                            return Ok(ws);
                        }
                        Err(e @ DriverError::CertificateRefused(_)) => return Err(e),
                        Err(e) => e,
                    }
                }
            };
            warn!(attempts, error = %error, "reconnect attempt failed");
            if started.elapsed() + backoff > self.config.reconnect_budget {
                return Err(DriverError::ReconnectBudgetExhausted {
                    attempts,
                    last_error: Box::new(error),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.reconnect_max_backoff);
        }
    }
}

/// The mutable state of one running tunnel.
struct Run<'t, 'a, C, L> {
    tunnel: &'t Tunnel<'a, C>,
    /// A shell session's terminal sizes.
    terminal: Option<watch::Receiver<TerminalSize>>,
    /// A shell's KMS data key, on its way from KMS.
    data_key: Option<futures::future::BoxFuture<'static, Result<DataKey, String>>>,
    session: Session,
    ws: Ws,
    target: StreamTarget,
    incoming: mpsc::Receiver<L>,
    conns: HashMap<u32, Conn>,
    next_basic_key: u32,
    local_tx: Option<mpsc::Sender<LocalInput>>,
    local_rx: Option<mpsc::Receiver<LocalInput>>,
    /// Local bytes the session has not accepted yet (backpressure).
    pending_local: Option<(u32, Bytes)>,
    /// Received bytes waiting for room in a local writer queue.
    stalled: Option<(u32, Bytes)>,
    /// Basic mode: bytes the instance sent before a local connection was attached (a server
    /// that speaks first, such as sshd's banner). Events stop draining until one attaches, so
    /// the session's receive window holds the rest: nothing is dropped.
    unattached: Option<Bytes>,
    /// A frame taken from the session, to be written.
    outgoing: Option<Transmit>,
    last_heard: Instant,
    /// Since when the driver has been reading the WebSocket without a pause. While the local
    /// side is too slow the driver stops reading ([`Session::wants_frames`]), and neither
    /// silence nor missing acks say anything about the peer then.
    listening_since: Instant,
    mode: Option<ForwardingMode>,
    /// Writer tasks of connections closed with the session, still writing out.
    finishing: Vec<JoinHandle<()>>,
    /// The session's share of a memory budget, if the bridge has one. Dropped with the run,
    /// after the writers finished.
    share: Option<Share>,
    started: Instant,
    /// When a byte last went either way (the idle deadline runs from here).
    last_activity: Instant,
    milestones: Milestones,
    /// The deadline that ended the session.
    expired: Option<Expiry>,
    /// When the WebSocket went away while the session was ending (what it had received is
    /// still being written out).
    ws_gone_at: Option<Instant>,
}

enum Turn<L> {
    Shutdown,
    Ws(Option<Result<Message, tungstenite::Error>>),
    Send,
    Timer,
    Ping,
    Local(Option<LocalInput>),
    Incoming(Option<L>),
    Unstalled(Option<mpsc::OwnedPermit<Bytes>>),
    /// The terminal's size changed (false: it will not change any more).
    Resized(bool),
    /// KMS answered.
    DataKey(Result<DataKey, String>),
    /// The memory budget gave room, or a writer wrote some out.
    Room,
    /// The idle or maximum-duration deadline.
    Deadline,
}

impl<C: ControlPlane, L> Run<'_, '_, C, L>
where
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    async fn drive(&mut self, shutdown: impl Future<Output = ()>) -> Result<Outcome, DriverError> {
        tokio::pin!(shutdown);
        let mut shutting_down = false;
        let mut ping = keepalive_timer(self.tunnel.config.ping_interval);
        let mut incoming_open = true;
        loop {
            let now = Instant::now();
            self.feed_pending_local();
            if let Some(outcome) = self.drain_events(now) {
                return Ok(outcome);
            }
            if let Some(gone_at) = self.ws_gone_at {
                // Without the WebSocket nothing more arrives: end once what did is out (or,
                // for a connection that does not read it, after the flush grace).
                let flushed = self.stalled.is_none();
                if flushed || now >= gone_at + LOCAL_FLUSH_GRACE {
                    return Ok(self.ended_without_transport());
                }
            } else if self.outgoing.is_none() {
                self.outgoing = self.session.poll_transmit(now.into_std());
            }
            if let Some(stats) = &self.tunnel.stats {
                stats.send_replace(self.session.stats());
            }
            self.settle_share();
            let timer = self.session.poll_timeout().map(Instant::from_std);
            let accepting = incoming_open && self.accepting();
            let reading = self.session.wants_frames();
            if !reading {
                self.listening_since = now;
            }
            let take_local = self.pending_local.is_none();
            let stalled_tx = self
                .stalled
                .as_ref()
                .and_then(|(key, _)| self.conns.get(key))
                .map(|c| c.writer.clone());
            let local_rx = self.local_rx.as_mut();
            let sizes = self.terminal.as_mut().filter(|_| self.session.is_open());
            let resizing = sizes.is_some();
            let data_key = self.data_key.as_mut();
            let generating = data_key.is_some();
            let waiting_for_room = self.share.as_ref().is_some_and(Share::is_waiting);
            let share = self.share.as_mut();
            let flush_by = self.ws_gone_at.map(|at| at + LOCAL_FLUSH_GRACE);
            let deadline = (self.expired.is_none())
                .then(|| (self.tunnel.deadlines).next(self.started, self.last_activity))
                .flatten();
            let turn = tokio::select! {
                biased;
                () = &mut shutdown, if !shutting_down => Turn::Shutdown,
                () = std::future::ready(()), if self.outgoing.is_some() => Turn::Send,
                msg = self.ws.next(), if reading && self.ws_gone_at.is_none() => Turn::Ws(msg),
                () = due(timer.unwrap_or(now), now), if timer.is_some() => Turn::Timer,
                _ = ping.tick(), if self.ws_gone_at.is_none() => Turn::Ping,
                () = due(flush_by.unwrap_or(now), now), if flush_by.is_some() => Turn::Timer,
                permit = async { stalled_tx?.reserve_owned().await.ok() }, if self.stalled.is_some() => Turn::Unstalled(permit),
                input = async { local_rx?.recv().await }, if take_local => Turn::Local(input),
                conn = self.incoming.recv(), if accepting => Turn::Incoming(conn),
                changed = async { sizes?.changed().await.ok() }, if resizing => Turn::Resized(changed.is_some()),
                key = async {
                    match data_key {
                        Some(key) => key.await,
                        None => std::future::pending().await,
                    }
                }, if generating => Turn::DataKey(key),
                () = async { if let Some(share) = share { share.room().await } }, if waiting_for_room => Turn::Room,
                () = due(deadline.unwrap_or(now), now), if deadline.is_some() => Turn::Deadline,
            };
            let now = Instant::now();
            match turn {
                Turn::Shutdown => {
                    shutting_down = true;
                    self.session.terminate(now.into_std());
                }
                Turn::Ws(Some(Ok(message))) => {
                    self.last_heard = now;
                    self.reached(Milestone::FirstFrame, now);
                    self.on_ws_message(now, message);
                }
                Turn::Ws(_) => {
                    if let Some(outcome) = self.transport_lost().await? {
                        return Ok(outcome);
                    }
                }
                Turn::Send => {
                    let Some(Transmit { frame, kind }) = self.outgoing.take() else {
                        continue;
                    };
                    if let Err(e) = self.send_ws(Message::Binary(frame)).await {
                        debug!(error = %e, ?kind, "WebSocket send failed");
                        if let Some(outcome) = self.transport_lost().await? {
                            return Ok(outcome);
                        }
                    }
                }
                Turn::Timer => self.session.handle_timeout(now.into_std()),
                Turn::Ping => {
                    let limit = self.tunnel.config.dead_peer_timeout;
                    let listening = now.duration_since(self.listening_since) > limit;
                    let silent = now.duration_since(self.last_heard) > limit;
                    // A socket that still answers pings but never acks is just as dead.
                    let no_acks = self
                        .session
                        .ack_wait_since()
                        .is_some_and(|since| now.into_std().duration_since(since) > limit);
                    let dead = listening && (silent || no_acks);
                    if dead {
                        warn!(
                            silent,
                            no_acks,
                            "the data channel is not responding; treating the WebSocket as dead"
                        );
                    }
                    let lost = dead
                        || self
                            .send_ws(Message::Ping(Bytes::from_static(b"keepalive")))
                            .await
                            .is_err();
                    if lost && let Some(outcome) = self.transport_lost().await? {
                        return Ok(outcome);
                    }
                }
                Turn::DataKey(key) => {
                    self.data_key = None;
                    if let Err(e) = &key {
                        warn!(error = %e, "no KMS data key for the session's encryption");
                    }
                    self.session.provide_data_key(now.into_std(), key);
                }
                Turn::Resized(false) => self.terminal = None,
                Turn::Resized(true) => {
                    if let Some(sizes) = &mut self.terminal {
                        let size = *sizes.borrow_and_update();
                        let sent =
                            self.session
                                .send_terminal_size(now.into_std(), size.cols, size.rows);
                        if let Err(e) = sent {
                            debug!(error = %e, "terminal size not sent");
                        }
                    }
                }
                Turn::Room => {}
                Turn::Deadline => {
                    let deadlines = self.tunnel.deadlines;
                    if let Some(expiry) = deadlines.expired(now, self.started, self.last_activity) {
                        info!(?expiry, "the session reached its deadline; ending it");
                        self.expired = Some(expiry);
                        self.session.terminate(now.into_std());
                    }
                }
                Turn::Unstalled(permit) => {
                    if let Some((key, data)) = self.stalled.take() {
                        match permit {
                            Some(permit) => {
                                self.handed_to_writer(data.len());
                                permit.send(data);
                            }
                            None => self.local_gone(now, key),
                        }
                    }
                }
                Turn::Local(Some(LocalInput::Data(key, data, credit))) => {
                    if let Some(share) = &mut self.share {
                        share.took_read(credit);
                    }
                    self.last_activity = now;
                    self.pending_local = Some((key, data));
                    self.feed_pending_local();
                }
                Turn::Local(Some(LocalInput::Eof(key))) => self.local_eof(now, key),
                Turn::Local(None) => {}
                Turn::Incoming(Some(conn)) => self.attach(now, conn),
                Turn::Incoming(None) => incoming_open = false,
            }
        }
    }

    /// One WebSocket write, bounded by [`DriverConfig::send_timeout`].
    async fn send_ws(&mut self, message: Message) -> Result<(), ConnectError> {
        tokio::time::timeout(self.tunnel.config.send_timeout, self.ws.send(message))
            .await
            .map_err(|_| ConnectError::TimedOut("a WebSocket write"))?
            .map_err(ConnectError::WebSocket)
    }

    fn accepting(&self) -> bool {
        match self.mode {
            Some(ForwardingMode::Basic) => self.conns.is_empty() && self.session.is_open(),
            Some(ForwardingMode::Mux) => self.session.is_open() && self.session.send_capacity() > 0,
            None => false,
        }
    }

    fn on_ws_message(&mut self, now: Instant, message: Message) {
        let result = match &message {
            Message::Binary(b) => self.session.handle_ws_message(now.into_std(), b),
            Message::Text(t) => self.session.handle_ws_message(now.into_std(), t.as_bytes()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            debug!(error = %e, "dropped a data-channel frame");
        }
    }

    /// The WebSocket failed: resume it, or end here when the session was closing anyway.
    async fn transport_lost(&mut self) -> Result<Option<Outcome>, DriverError> {
        if self.session.is_closed() {
            // The agent closed the channel, and then its WebSocket. What the session received
            // still goes out to the connections: the loop drains the events without the
            // WebSocket, and ends when they are out.
            self.ws_gone_at.get_or_insert_with(Instant::now);
            self.outgoing = None;
            return Ok(None);
        }
        if self.mode.is_some() && !self.session.is_open() {
            // The bridge was ending the session: what is still undelivered is not wanted.
            return Ok(Some(self.ended_without_transport()));
        }
        self.outgoing = None;
        info!(session_id = %self.target.session_id, "WebSocket lost; resuming the session");
        let ws = Box::pin(self.tunnel.reconnect(&mut self.session, &mut self.target)).await?;
        self.ws = ws;
        self.last_heard = Instant::now();
        Ok(None)
    }

    /// The session ends without its WebSocket, once what it received is out.
    fn ended_without_transport(&mut self) -> Outcome {
        if self.stalled.take().is_some() {
            warn!("a local connection did not take the session's last bytes in time");
        }
        self.close_local();
        Outcome {
            cause: CloseCause::LocalTerminate,
            output: None,
            handshake: self.session.handshake().cloned(),
            stats: self.session.stats(),
            expired: self.expired,
        }
    }

    /// Hands pending local bytes to the session as far as its window allows.
    fn feed_pending_local(&mut self) {
        let Some((key, data)) = self.pending_local.take() else {
            return;
        };
        let result = match self.mode {
            Some(ForwardingMode::Mux) => self.session.write_stream(key, &data),
            _ => self.session.handle_local_data(&data),
        };
        match result {
            Ok(n) if n < data.len() => self.pending_local = Some((key, data.slice(n..))),
            Ok(_) => {}
            Err(SessionError::NotOpen) => self.pending_local = Some((key, data)),
            Err(e) => debug!(error = %e, stream = key, "local data dropped"),
        }
    }

    fn local_eof(&mut self, now: Instant, key: u32) {
        if self.tunnel.config.session.shell && self.conns.contains_key(&key) {
            // A shell's output goes on after its input ends: the session types the terminal's
            // end-of-file, and the shell ends the session when it exits.
            let _ = self.session.disconnect_local(now.into_std());
            return;
        }
        if self.conns.remove(&key).is_none() {
            return;
        }
        let now = now.into_std();
        match self.mode {
            Some(ForwardingMode::Mux) => {
                let _ = self.session.close_stream(key);
                self.end_when_no_stream_is_left(now);
            }
            _ if self.tunnel.config.end_on_local_eof => self.session.terminate(now),
            _ => {
                let _ = self.session.disconnect_local(now);
            }
        }
    }

    /// Mux mode, one connection per session: the session ends with its last stream.
    fn end_when_no_stream_is_left(&mut self, now: std::time::Instant) {
        if self.tunnel.config.end_on_local_eof && self.conns.is_empty() {
            self.session.terminate(now);
        }
    }

    /// The local writer went away (the client closed its end).
    fn local_gone(&mut self, now: Instant, key: u32) {
        if self.tunnel.config.session.shell {
            // Nobody sees the shell's output any more.
            self.conns.remove(&key);
            self.session.terminate(now.into_std());
            return;
        }
        self.local_eof(now, key);
    }

    fn attach(&mut self, now: Instant, conn: L) {
        let key = match self.mode {
            Some(ForwardingMode::Mux) => match self.session.open_stream() {
                Ok(id) => id,
                Err(e) => {
                    warn!(error = %e, "cannot open a stream; dropping the connection");
                    return;
                }
            },
            _ => {
                self.next_basic_key = self.next_basic_key.wrapping_add(1);
                self.next_basic_key
            }
        };
        let Some(local_tx) = self.local_tx.clone() else {
            return;
        };
        let config = &self.tunnel.config;
        let budgeted = self.share.as_ref().map(|share| Budgeted {
            read_credit: share.read_credit.clone(),
            unwritten: share.unwritten.clone(),
        });
        let conn = spawn_conn(
            key,
            conn,
            local_tx,
            config.local_read_size,
            config.local_write_queue,
            budgeted,
        );
        self.conns.insert(key, conn);
        if let Some(data) = self.unattached.take() {
            self.deliver_local(now, key, data);
        }
    }

    /// Drains session events; returns the outcome once the session closed.
    fn drain_events(&mut self, now: Instant) -> Option<Outcome> {
        while self.stalled.is_none() && self.unattached.is_none() {
            let event = self.session.poll_event()?;
            match event {
                Event::DataKeyRequired { key_id } => {
                    self.data_key = Some(match &self.tunnel.encryption {
                        Some(encryption) => encryption.keys.generate(
                            &key_id,
                            &self.target.session_id,
                            &encryption.target,
                        ),
                        None => Box::pin(std::future::ready(Err(
                            "this client has no KMS access configured".to_owned(),
                        ))),
                    });
                }
                Event::HandshakeComplete(info) => {
                    info!(agent_version = ?info.agent_version, mode = ?info.mode, "handshake complete");
                    self.mode = Some(info.mode);
                    self.reached(Milestone::Handshake, now);
                }
                Event::Data(data) => {
                    self.received(now);
                    match self.conns.keys().next().copied() {
                        Some(key) => self.deliver_local(now, key, data),
                        // Closing: no connection will attach any more, and the client these bytes
                        // were for has gone. Held, they would stop the events behind them, the
                        // session's close among them.
                        None if !self.session.is_open() && self.mode.is_some() => {
                            debug!(
                                bytes = data.len(),
                                "discarding bytes for a connection that ended"
                            );
                        }
                        None => self.unattached = Some(data),
                    }
                }
                Event::StreamData { stream, data } => {
                    self.received(now);
                    self.deliver_local(now, stream, data);
                }
                Event::StreamClosed { stream, reason } => {
                    debug!(stream, ?reason, "stream closed by the agent");
                    // Its writer goes on until what the agent sent before the close is out.
                    if let Some(conn) = self.conns.remove(&stream) {
                        self.finishing.retain(|writer| !writer.is_finished());
                        self.finishing.push(conn.into_writer_task());
                    }
                    self.end_when_no_stream_is_left(now.into_std());
                }
                Event::ConnectToPortError => {
                    warn!("the agent could not connect to the destination port");
                }
                Event::Closed { cause, output } => {
                    info!(?cause, output = ?output, "session closed");
                    self.close_local();
                    return Some(Outcome {
                        cause,
                        output,
                        handshake: self.session.handshake().cloned(),
                        stats: self.session.stats(),
                        expired: self.expired,
                    });
                }
            }
        }
        None
    }

    /// The session ended: every local connection stops reading, and its writer goes on until
    /// what the instance sent is written out (awaited by [`Run::finish_local_writes`]).
    fn close_local(&mut self) {
        self.finishing
            .extend(self.conns.drain().map(|(_, conn)| conn.into_writer_task()));
    }

    /// Waits, up to [`LOCAL_FLUSH_GRACE`], until every closed connection's writer has written
    /// out what it was handed: a caller that exits right after the tunnel (`proxy`, whose
    /// runtime ends with it) must not cut the instance's last bytes.
    async fn finish_local_writes(&mut self) {
        let writers: Vec<_> = self.finishing.drain(..).collect();
        let aborts: Vec<_> = writers.iter().map(JoinHandle::abort_handle).collect();
        let written = futures::future::join_all(writers);
        if tokio::time::timeout(LOCAL_FLUSH_GRACE, written)
            .await
            .is_err()
        {
            // Cut: the connection closes now rather than whenever its client reads the rest.
            warn!("a local connection did not take the session's last bytes in time");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }

    fn deliver_local(&mut self, now: Instant, key: u32, data: Bytes) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let len = data.len();
        match conn.writer.try_send(data) {
            Ok(()) => self.handed_to_writer(len),
            Err(mpsc::error::TrySendError::Full(data)) => self.stalled = Some((key, data)),
            Err(mpsc::error::TrySendError::Closed(_)) => self.local_gone(now, key),
        }
    }
}

impl<C, L> Run<'_, '_, C, L> {
    /// Settles the session's share of the memory budget against what the run holds now, and
    /// tells the session how much more it may receive.
    fn settle_share(&mut self) {
        let Some(share) = &mut self.share else {
            return;
        };
        let len = |chunk: &Option<(u32, Bytes)>| chunk.as_ref().map_or(0, |(_, data)| data.len());
        let held = self.session.buffered_bytes()
            + len(&self.pending_local)
            + len(&self.stalled)
            + self.unattached.as_ref().map_or(0, Bytes::len)
            + self.outgoing.as_ref().map_or(0, |t| t.frame.len());
        let room = share.settle(held);
        let inbound = self.session.inbound_bytes();
        self.session.set_inbound_budget(inbound + room);
    }

    /// The instance's bytes arrived: activity, and maybe the first byte.
    fn received(&mut self, now: Instant) {
        self.last_activity = now;
        self.reached(Milestone::FirstByte, now);
    }

    /// Records `milestone` and tells the observer, the first time.
    fn reached(&mut self, milestone: Milestone, now: Instant) {
        if self.milestones.reach(milestone, now)
            && let Some(observer) = &self.tunnel.setup
        {
            observer(milestone, &self.milestones);
        }
    }

    /// `bytes` went to a local writer: held by it until written out. (The writer may have
    /// written them, and subtracted, before this adds: the count wraps for that instant, and
    /// only this task reads it, after both.)
    fn handed_to_writer(&self, bytes: usize) {
        if let Some(share) = &self.share {
            share.unwritten.handed(bytes);
        }
    }
}

/// The WebSocket keepalive: first due one period from now. (`tokio::time::interval`'s first
/// tick is "immediate", but awaiting it waits for the timer's next millisecond tick: up to 1 ms
/// added to every session's setup.)
fn keepalive_timer(period: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Resolves at `at`, and at once when `at` is not after `now`. `sleep_until` alone would wait
/// for the timer even then: tokio rounds deadlines up to its next millisecond tick, which would
/// cap acks and paced data at about 1,000 frames per second.
async fn due(at: Instant, now: Instant) {
    if at > now {
        sleep_until(at).await;
    }
}

fn rand_seed() -> u64 {
    let id = uuid::Uuid::new_v4().as_u128();
    (id >> 64) as u64 ^ id as u64
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_deadline_already_reached_is_due_without_a_timer() {
        let now = Instant::now();
        assert_eq!(due(now, now).now_or_never(), Some(()));
        assert_eq!(
            due(now - Duration::from_millis(5), now).now_or_never(),
            Some(())
        );
        assert_eq!(due(now + Duration::from_secs(60), now).now_or_never(), None);
    }

    /// The driver starts turning at once: nothing about the keepalive is due at the start (a
    /// first tick at the start is awaited on the timer's next millisecond, in every session's
    /// setup). The first ping goes one whole period after it.
    #[tokio::test(start_paused = true)]
    async fn the_keepalive_is_first_due_a_period_after_the_start() {
        let period = Duration::from_secs(5);
        let started = Instant::now();
        let mut timer = keepalive_timer(period);
        assert!(timer.tick().now_or_never().is_none());
        timer.tick().await;
        assert_eq!(started.elapsed(), period);
        timer.tick().await;
        assert_eq!(started.elapsed(), 2 * period);
    }
}
