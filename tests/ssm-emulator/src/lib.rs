//! A strict local emulator of AWS SSM Session Manager for tests and the demo: the SSM JSON API
//! (StartSession, ResumeSession, TerminateSession, DescribeSessions,
//! DescribeInstanceInformation; everything else forwarded to an upstream such as moto), the
//! gateway's data-channel WebSocket (`ws://`, or `wss://` with a configured certificate), and a strict agent per session (handshake and version
//! gates, reliability layer, basic and smux port forwarding) with fault injection.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig};
//! let mut config = Config::default();
//! config.instances.push(InstanceConfig::new("i-0123456789abcdef0")
//!     .with_port("22", "127.0.0.1:2222".parse().expect("addr")));
//! let running = Emulator::start(config).await?;
//! println!("point aws-sdk-ssm at {}", running.endpoint_url());
//! // ... run the client and end its sessions; then, with final reports only:
//! let reports = running.wait_for_all_ended(std::time::Duration::from_secs(60)).await?;
//! assert!(running.violations().is_empty(), "{reports:?}");
//! # Ok(()) }
//! ```
//!
//! Authentication: any SigV4 `Authorization` header is accepted without verification; tokens
//! and signatures are never logged. See the crate README for the YAML config format.

mod agent;
mod api;
pub mod config;
mod destination;
mod documents;
mod error;
mod gateway;
pub mod message;
mod port;
mod registry;
pub mod report;
mod server;
mod shell;
pub mod smux;
mod tls;
pub mod version;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use agent::Injection;
pub use config::{Config, Faults, HandshakeAck, InstanceConfig, Mode, TlsFiles};
pub use error::{Error, WaitError};
pub use port::{REALISTIC_CHUNK, REALISTIC_PAUSE};
pub use report::{
    InjectedFaults, SessionReport, SessionStatus, Stats, Transfer, Violation, unobserved_faults,
};

use registry::{Shared, lock};

/// Starts emulators.
pub struct Emulator;

impl Emulator {
    /// Validates `config`, binds its listen address and serves until the [`Running`] handle is
    /// shut down or dropped.
    pub async fn start(config: Config) -> Result<Running, Error> {
        config.validate()?;
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let _ = shared.addr.set(addr);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server::accept_loop(listener, shared.clone(), tls, stop_rx));
        tracing::info!("SSM emulator listening on http://{addr}");
        Ok(Running {
            shared,
            addr,
            stop,
            task: Some(task),
        })
    }
}

/// A running emulator.
pub struct Running {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Base URL of the SSM JSON API (`endpoint_url` for aws-sdk-ssm).
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every violation so far, in order. Complete for a session only once it has ended: read it
    /// after [`Running::wait_for_end`] or [`Running::wait_for_all_ended`] returned.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.shared.violations).clone()
    }

    /// The report of one session as it is now (a live session's may still grow; see
    /// [`Running::wait_for_end`]).
    pub fn session_report(&self, session_id: &str) -> Option<SessionReport> {
        self.shared.report(session_id)
    }

    /// Reports of every session as they are now, oldest session first.
    pub fn session_reports(&self) -> Vec<SessionReport> {
        self.shared.reports()
    }

    /// Global counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Sessions that callers with `access_key_id` start are owned by `owner` (an IAM user or
    /// assumed-role ARN), as AWS reports the caller in DescribeSessions' `Owner`. Callers not
    /// registered own theirs as `arn:aws:iam::<account_id>:user/<session_principal>`.
    pub fn set_session_owner(&self, access_key_id: &str, owner: &str) {
        lock(&self.shared.owners).insert(access_key_id.to_owned(), owner.to_owned());
    }

    /// Replaces the faults for new sessions to `instance_id`.
    pub fn set_instance_faults(&self, instance_id: &str, faults: Faults) {
        lock(&self.shared.instance_faults).insert(instance_id.to_owned(), faults);
    }

    /// Triggers a connection fault on a live session's current WebSocket. False when the
    /// session is unknown or ended.
    pub fn inject(&self, session_id: &str, injection: Injection) -> bool {
        self.shared
            .agent(session_id)
            .is_some_and(|a| a.send(agent::AgentInput::Inject(injection)).is_ok())
    }

    /// Waits until the live report of some session satisfies `reached` (checked every 20 ms)
    /// and returns it; `None` when `limit` passed first. For events inside running sessions (a
    /// stall, the client's streams closed); an ended session's final report comes from
    /// [`Running::wait_for_end`].
    pub async fn wait_for_report(
        &self,
        limit: Duration,
        reached: impl Fn(&SessionReport) -> bool,
    ) -> Option<SessionReport> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(report) = self.shared.reports().into_iter().find(&reached) {
                return Some(report);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the session has ended for good (its `channel_closed` sent, every WebSocket
    /// of it closed and every client frame checked) and returns its final report, whose
    /// violations are complete. Fails when the session is unknown or has not ended within
    /// `limit` (a bound on the wait: be generous).
    pub async fn wait_for_end(
        &self,
        session_id: &str,
        limit: Duration,
    ) -> Result<SessionReport, WaitError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut ended = self.shared.sessions_ended.subscribe();
        loop {
            let report =
                self.shared
                    .report(session_id)
                    .ok_or_else(|| WaitError::UnknownSession {
                        session_id: session_id.to_owned(),
                    })?;
            if report.status.is_ended() {
                return Ok(report);
            }
            if !wait_for_change(&mut ended, deadline).await {
                return Err(WaitError::NotEnded {
                    limit,
                    report: Box::new(report),
                });
            }
        }
    }

    /// Waits until every session this emulator has started has ended for good (see
    /// [`Running::wait_for_end`]) and returns their final reports, oldest first. Fails with the
    /// sessions still running when `limit` passes. Read [`Running::violations`] after this to
    /// judge a whole test.
    pub async fn wait_for_all_ended(
        &self,
        limit: Duration,
    ) -> Result<Vec<SessionReport>, WaitError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut ended = self.shared.sessions_ended.subscribe();
        loop {
            let reports = self.shared.reports();
            if reports.iter().all(|r| r.status.is_ended()) {
                return Ok(reports);
            }
            if !wait_for_change(&mut ended, deadline).await {
                let total = reports.len();
                return Err(WaitError::NotAllEnded {
                    limit,
                    total,
                    pending: reports
                        .into_iter()
                        .filter(|r| !r.status.is_ended())
                        .collect(),
                });
            }
        }
    }

    /// Stops accepting connections.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Waits for the next change of `ended` until `deadline`; false when the deadline passed first.
async fn wait_for_change(ended: &mut watch::Receiver<u64>, deadline: tokio::time::Instant) -> bool {
    matches!(
        tokio::time::timeout_at(deadline, ended.changed()).await,
        Ok(Ok(()))
    )
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
