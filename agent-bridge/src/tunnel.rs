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

pub use crate::driver::Expiry;

use crate::{
    budget::{Lease, MemoryBudget},
    driver::{
        DataKeySource, Deadlines, DriverConfig, DriverError, Encryption, Milestone, Milestones,
        SetupObserver, TerminalSize, Tunnel, signing::UpgradeSigner,
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
    /// The final counters (none when the channel failed).
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

    let deadlines = Deadlines {
        idle: context.idle_timeout,
        max_duration: context.max_duration,
    };
    let mut tunnel = Tunnel::new(
        &*context.control,
        context.signer.as_deref(),
        context.driver.clone(),
    )
    .with_deadlines(deadlines)
    .with_setup_observer(setup_observer(metrics, connected_at, opened_at));
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
    let lasted = opened_at.elapsed();
    let (ending, output, stats) = match result {
        Ok(outcome) => {
            let ending = match &outcome.cause {
                CloseCause::LocalTerminate => match outcome.expired {
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
            (Ending::Failed(error.into()), None, Stats::default())
        }
    };
    Carried {
        session_id: Some(session_id),
        ending,
        output,
        stats,
    }
}

/// Observes each setup phase in the session setup histogram the moment it ends, each from the
/// end of the one before: `websocket_connect` from the StartSession response to the agent's
/// first frame, `handshake` to HandshakeComplete, `first_byte` to the instance's first byte (a
/// session without a handshake, a shell, goes from the first frame), and `total` from the
/// client's connect.
fn setup_observer(metrics: &Metrics, connected_at: Instant, opened_at: Instant) -> SetupObserver {
    let metrics = metrics.clone();
    Arc::new(move |milestone: Milestone, reached: &Milestones| {
        let since = |earlier: Option<Instant>, at: Option<Instant>| {
            at.map(|at| at.saturating_duration_since(earlier.unwrap_or(opened_at)))
        };
        match milestone {
            Milestone::FirstFrame => {
                if let Some(took) = since(None, reached.first_frame) {
                    metrics.observe_setup("websocket_connect", took);
                }
            }
            Milestone::Handshake => {
                if let Some(took) = since(reached.first_frame, reached.handshake) {
                    metrics.observe_setup("handshake", took);
                }
            }
            Milestone::FirstByte => {
                let mark = reached.handshake.or(reached.first_frame);
                if let Some(took) = since(mark, reached.first_byte) {
                    metrics.observe_setup("first_byte", took);
                }
                if let Some(at) = reached.first_byte {
                    metrics.observe_setup("total", at.saturating_duration_since(connected_at));
                }
            }
        }
    })
}
