//! The tokio driver of one SSM data channel: the only place that awaits.
//!
//! One loop `select!`s over the WebSocket, the local connections, the session's timer (which
//! covers its pacing), the ping timer and shutdown; after every input it drains the sans-IO
//! [`Session`](crate::protocol::Session)'s outputs. Local connections arrive on a channel: in
//! basic mode they are served one at a time (DisconnectToPort between them), in mux mode each
//! becomes an smux stream. The same task reads and writes them ([`local`]): one task carries
//! a whole tunnel, with no hand-off between tasks on the byte path. On a lost WebSocket it calls
//! ResumeSession, dials the new StreamUrl with the new token, and keeps the sequence state,
//! within a retry budget far above the official plugin's few seconds. This file holds the
//! tunnel's set-up and its WebSocket; `run.rs` the loop.
//!
//! ```text
//!   incoming conns ──► Locals ──read──►┐
//!                        ▲             │             ┌─► ws.send (paced)
//!   ws.next() ───────────┼───────────► Session ──────┤
//!   timers / ping / shutdown ─────────►│             └─► events ─► Locals ──write──► conns
//!                        │  ResumeSession + dial ◄── lost ws
//!                  (one task)
//! ```

mod dial;
pub mod lifecycle;
mod local;
mod run;
mod share;
pub mod signing;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::protocol::handshake::OpenDataChannel;
use crate::protocol::kms::DataKey;
use crate::protocol::{CloseCause, HandshakeInfo, Session, Stats};

use crate::budget::Lease;
use crate::ssm::{ControlPlane, ControlPlaneError, StreamTarget};
use dial::{dial_error, tls_config};
pub use lifecycle::{Deadlines, Expiry, Milestone, Milestones, SetupObserver};
use run::Run;
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
        let share = lease.map(Share::new);
        let mut run = Run::new(self, start, session, ws, target, incoming, share);
        let result = run.drive(shutdown).await;
        // The session is over: TerminateSession, while its connections write out what the
        // instance sent them.
        let ended = async {
            self.terminate(&run.target.session_id).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), run.ws.close(None)).await;
        };
        futures::future::join(ended, run.locals.finish(LOCAL_FLUSH_GRACE)).await;
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

fn rand_seed() -> u64 {
    let id = uuid::Uuid::new_v4().as_u128();
    (id >> 64) as u64 ^ id as u64
}
