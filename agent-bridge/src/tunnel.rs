//! One client connection carried by one SSM session: StartSession, the data channel, timeouts,
//! and the metrics of it all. Used by `serve` (one session per accepted connection) and `proxy`
//! (standard input and output as the connection).

use std::{sync::Arc, time::Duration};

use fleet_access_crds::ssm_documents::ACCOUNT_SHELL_DOCUMENT;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    budget::{Lease, MemoryBudget},
    driver::{
        DataKeySource, DriverConfig, DriverError, Encryption, TerminalSize, Tunnel,
        signing::UpgradeSigner,
    },
    metrics::{self, Metrics},
    protocol::{CloseCause, Stats},
    ssm::{ControlPlane, ControlPlaneError, StartSessionRequest},
};

/// What every session of a bridge shares.
pub struct SessionContext<C> {
    /// StartSession, ResumeSession, TerminateSession.
    pub control: Arc<C>,
    /// Signs WebSocket upgrades (absent for the emulator and presigned URLs).
    pub signer: Option<Arc<dyn UpgradeSigner>>,
    /// Data-channel tunables.
    pub driver: DriverConfig,
    /// Where sessions are counted and timed.
    pub metrics: Metrics,
    /// End sessions that carry no byte for this long.
    pub idle_timeout: Option<Duration>,
    /// End sessions after this long whatever they do.
    pub max_duration: Option<Duration>,
    /// StartSession's Reason for the sessions of `serve` (the replica's mark, see
    /// [`crate::replica`]).
    pub reason: String,
    /// Where a shell's KMS data keys come from (`shell` only).
    pub data_keys: Option<Arc<dyn DataKeySource>>,
    /// The memory budget every session's buffers draw from (`serve`); none: each session is
    /// bounded on its own only.
    pub budget: Option<MemoryBudget>,
}

/// The Reason of `serve`'s sessions when the replica has no mark (outside a pod).
pub const UNMARKED_REASON: &str = "fleet-access agent bridge";

impl<C> SessionContext<C> {
    /// One session per local connection, ended when that connection ends (the serve path,
    /// `proxy`, the demo): the default data-channel tunables, no idle or duration limit.
    pub fn per_connection(
        control: Arc<C>,
        signer: Option<Arc<dyn UpgradeSigner>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            control,
            signer,
            driver: DriverConfig {
                end_on_local_eof: true,
                ..DriverConfig::default()
            },
            metrics,
            idle_timeout: None,
            max_duration: None,
            reason: UNMARKED_REASON.to_owned(),
            data_keys: None,
            budget: None,
        }
    }
}

/// How a carried connection ended.
#[derive(Debug)]
pub enum Ending {
    /// The client closed its side.
    ClientClosed,
    /// The instance's side ended the session (the agent, or SSM's `channel_closed`).
    TargetClosed,
    /// The bridge ended it (`stop`: shutdown, the endpoint removed).
    Terminated,
    /// A timeout of the tunnel ended it.
    Expired(Expiry),
    /// StartSession failed; no session exists. The error says what to do.
    NotStarted(ControlPlaneError),
    /// The data channel failed.
    Failed(ChannelFailure),
}

/// Which timeout ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No byte for the idle timeout.
    Idle,
    /// The maximum duration.
    MaxDuration,
}

/// A data channel that failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelFailure {
    /// The driver could not carry the session (connect, upgrade, resume budget).
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The protocol ended the session (handshake, keepalive, a malformed stream).
    #[error("the session broke: {0:?}")]
    Protocol(CloseCause),
}

/// What became of one connection.
#[derive(Debug)]
pub struct Carried {
    /// The session, when StartSession gave one.
    pub session_id: Option<String>,
    /// How it ended.
    pub ending: Ending,
    /// SSM's `channel_closed` output, when sent.
    pub output: Option<String>,
    /// The final counters (the last known ones when the channel failed).
    pub stats: Stats,
}

/// Carries `connection` through a new session until either side closes it, `stop` fires, or a
/// timeout ends it. `connected_at` is when the client connected (for the total setup time).
/// A shell session's `terminal` gives the sizes of the person's terminal; a `lease` of the
/// bridge's memory budget bounds what the session holds.
pub async fn carry<C, L>(
    context: &SessionContext<C>,
    request: &StartSessionRequest,
    connection: L,
    connected_at: Instant,
    stop: CancellationToken,
    terminal: Option<watch::Receiver<TerminalSize>>,
    lease: Option<Lease>,
) -> Carried
where
    C: ControlPlane,
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    let document = request
        .document_name
        .clone()
        .unwrap_or_else(|| ACCOUNT_SHELL_DOCUMENT.into());
    let metrics = &context.metrics;
    // Boxed: the SDK's future is several KiB and would otherwise stay in the task for its life.
    let target = match Box::pin(context.control.start_session(request)).await {
        Ok(target) => target,
        Err(error) => {
            metrics.session_failed_to_start(&document);
            return Carried {
                session_id: None,
                ending: Ending::NotStarted(error),
                output: None,
                stats: Stats::default(),
            };
        }
    };
    let opened_at = Instant::now();
    metrics.observe_setup("start_session", opened_at - connected_at);
    metrics.session_started(&document);
    let session_id = target.session_id.clone();
    // The caller's span (one per tunnel) declares the field; the token is never logged.
    tracing::Span::current().record("session_id", session_id.as_str());
    info!(session_id, "session started");

    let (connections, incoming) = mpsc::channel(1);
    // Capacity 1 and nothing else sent: this cannot fail.
    let _ = connections.try_send(connection);
    drop(connections);

    let (stats_tx, stats_rx) = watch::channel(Stats::default());
    let last_stats = stats_tx.subscribe();
    let timers = tokio::spawn(watch_session(
        stats_rx,
        metrics.clone(),
        connected_at,
        opened_at,
        context.idle_timeout,
        context.max_duration,
        stop.clone(),
    ));
    let mut tunnel = Tunnel::new(
        &*context.control,
        context.signer.as_deref(),
        context.driver.clone(),
    )
    .with_stats(stats_tx);
    if let Some(sizes) = terminal {
        tunnel = tunnel.with_terminal(sizes);
    }
    if let Some(keys) = &context.data_keys {
        tunnel = tunnel.with_encryption(Encryption {
            keys: keys.clone(),
            target: request.target.clone(),
        });
    }
    let result = tunnel.run(target, incoming, stop.cancelled(), lease).await;
    timers.abort();
    // A timer that fired has finished, and says which; an aborted one says nothing.
    let expired = timers.await.ok().flatten();
    let lasted = opened_at.elapsed();
    let (ending, output, stats) = match result {
        Ok(outcome) => {
            let ending = match &outcome.cause {
                CloseCause::LocalTerminate => match expired {
                    Some(expiry) => Ending::Expired(expiry),
                    None if stop.is_cancelled() => Ending::Terminated,
                    None => Ending::ClientClosed,
                },
                CloseCause::ChannelClosed | CloseCause::AgentTerminated => Ending::TargetClosed,
                cause => Ending::Failed(ChannelFailure::Protocol(cause.clone())),
            };
            // Terminated when the bridge ended it (shutdown, endpoint removed, a timeout);
            // closed when the client or the instance did.
            let label = match ending {
                Ending::Terminated | Ending::Expired(_) => metrics::Outcome::Terminated,
                _ => metrics::Outcome::Closed,
            };
            metrics.session_ended(&document, label, lasted, &outcome.stats);
            info!(session_id, cause = ?outcome.cause, bytes_in = outcome.stats.bytes_received, bytes_out = outcome.stats.bytes_sent, "session ended");
            debug!(session_id, stats = ?outcome.stats, "session stats");
            (ending, outcome.output, outcome.stats)
        }
        Err(error) => {
            metrics.session_ended(
                &document,
                metrics::Outcome::ChannelFailed,
                lasted,
                &Stats::default(),
            );
            warn!(session_id, %error, "session failed");
            let stats = last_stats.borrow().clone();
            (Ending::Failed(error.into()), None, stats)
        }
    };
    Carried {
        session_id: Some(session_id),
        ending,
        output,
        stats,
    }
}

/// Watches a session's counters: records when the first byte arrives, and fires `stop` when the
/// session is idle or too old.
async fn watch_session(
    mut stats: watch::Receiver<Stats>,
    metrics: Metrics,
    connected_at: Instant,
    opened_at: Instant,
    idle_timeout: Option<Duration>,
    max_duration: Option<Duration>,
    stop: CancellationToken,
) -> Option<Expiry> {
    const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
    let deadline = opened_at + max_duration.unwrap_or(FOREVER);
    let idle = idle_timeout.unwrap_or(FOREVER);
    let mut last_activity = Instant::now();
    let mut last_bytes = 0;
    // Each phase runs from the end of the one before (`mark`); a session without a handshake
    // (a shell) goes from the first frame to the first byte.
    let mut mark = opened_at;
    let mut first_frame_seen = false;
    let mut handshake_seen = false;
    let mut first_byte_seen = false;
    loop {
        let idle_deadline = last_activity + idle;
        tokio::select! {
            changed = stats.changed() => {
                if changed.is_err() {
                    return None;
                }
                let now = Instant::now();
                let current = stats.borrow_and_update().clone();
                if !first_frame_seen && current.frames_received > 0 {
                    first_frame_seen = true;
                    metrics.observe_setup("websocket_connect", now - mark);
                    mark = now;
                }
                if !handshake_seen && current.handshakes_completed > 0 {
                    handshake_seen = true;
                    metrics.observe_setup("handshake", now - mark);
                    mark = now;
                }
                if !first_byte_seen && current.bytes_received > 0 {
                    first_byte_seen = true;
                    metrics.observe_setup("first_byte", now - mark);
                    metrics.observe_setup("total", now - connected_at);
                }
                let bytes = current.bytes_received + current.bytes_sent;
                if bytes != last_bytes {
                    last_bytes = bytes;
                    last_activity = now;
                }
            }
            () = tokio::time::sleep_until(idle_deadline) => {
                info!("session idle too long; ending it");
                stop.cancel();
                return Some(Expiry::Idle);
            }
            () = tokio::time::sleep_until(deadline) => {
                info!("session reached its maximum duration; ending it");
                stop.cancel();
                return Some(Expiry::MaxDuration);
            }
        }
    }
}
