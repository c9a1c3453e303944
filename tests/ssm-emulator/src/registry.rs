//! The emulator's shared state: the sessions (token, life cycle, agent handle, report), the
//! violation log and the counters. Everything here is behind short-lived locks; a watch channel
//! tells waiters when a session has ended for good.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::agent::AgentInput;
use crate::config::{Config, Faults, InstanceConfig};
use crate::report::{SessionReport, SessionStatus, Stats, Violation};

/// The port properties a Port document resolved to (the handshake's `Properties`).
#[derive(Debug, Clone)]
pub(crate) struct PortProperties {
    /// Exactly what the HandshakeRequest carries.
    pub(crate) json: serde_json::Map<String, serde_json::Value>,
    /// Destination port.
    pub(crate) port: u16,
    /// Remote host, if any.
    pub(crate) host: Option<String>,
    /// `type == LocalPortForwarding`.
    pub(crate) local_port_forwarding: bool,
}

/// What runs behind a session, as its document says.
#[derive(Debug, Clone)]
pub(crate) enum SessionKind {
    /// A Port session: forwarding to a port of the instance or a remote host.
    Port(PortProperties),
    /// A Standard_Stream session: a shell.
    Shell(crate::shell::ShellInputs),
}

/// What a session is, fixed at StartSession.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    pub(crate) id: String,
    pub(crate) document_name: String,
    pub(crate) owner: String,
    pub(crate) reason: Option<String>,
    pub(crate) kind: SessionKind,
    pub(crate) instance: InstanceConfig,
    pub(crate) faults: Faults,
}

impl SessionInfo {
    /// A Port session's properties.
    pub(crate) fn port(&self) -> Option<&PortProperties> {
        match &self.kind {
            SessionKind::Port(p) => Some(p),
            SessionKind::Shell(_) => None,
        }
    }
}

pub(crate) struct SessionEntry {
    pub(crate) info: Arc<SessionInfo>,
    /// The live, unused token; `None` once used or after the end.
    pub(crate) token: Option<String>,
    pub(crate) started: SystemTime,
    /// The agent has finished the session (sent `channel_closed`); its WebSockets may still be
    /// closing and their last frames still being checked.
    pub(crate) finished: bool,
    /// When the session ended for good: every WebSocket closed, every frame checked.
    pub(crate) ended: Option<SystemTime>,
    pub(crate) agent: Option<UnboundedSender<AgentInput>>,
    pub(crate) report: Arc<Mutex<SessionReport>>,
    pub(crate) next_connection: u32,
}

impl SessionEntry {
    /// No client may open or resume it any more.
    pub(crate) fn is_over(&self) -> bool {
        self.finished || self.ended.is_some()
    }
}

/// What a client's WebSocket gets from a successful open message.
pub(crate) struct Opened {
    /// The session's agent.
    pub(crate) agent: UnboundedSender<AgentInput>,
    /// The index of this connection in the session (0 for the first).
    pub(crate) conn_id: u32,
    pub(crate) info: Arc<SessionInfo>,
    /// The session's report, for the transit-fault counters.
    pub(crate) report: Arc<Mutex<SessionReport>>,
}

/// State shared by the API, the gateway and the agents.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) addr: OnceLock<SocketAddr>,
    pub(crate) sessions: Mutex<HashMap<String, SessionEntry>>,
    pub(crate) instance_faults: Mutex<HashMap<String, Faults>>,
    /// Session owners (ARNs) by the caller's access key ID.
    pub(crate) owners: Mutex<HashMap<String, String>>,
    pub(crate) violations: Mutex<Vec<Violation>>,
    pub(crate) sessions_started: AtomicU64,
    pub(crate) sessions_failed: AtomicU64,
    pub(crate) violation_count: AtomicU64,
    pub(crate) api_requests: AtomicU64,
    pub(crate) forwarded_requests: AtomicU64,
    pub(crate) data_channel_connections: AtomicU64,
    /// Connections that completed a TLS handshake.
    pub(crate) tls_connections: AtomicU64,
    /// Plain-text data-channel upgrades refused because the gateway serves TLS.
    pub(crate) plain_upgrades_refused: AtomicU64,
    /// Open messages read after their session ended (refused, no violation).
    pub(crate) opens_after_end: AtomicU64,
    /// Bumped whenever a session ends for good.
    pub(crate) sessions_ended: watch::Sender<u64>,
}

/// Locks a mutex, recovering from poisoning (a panicked test task must not hide reports).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a WebSocket's open message opened nothing.
#[derive(Debug)]
pub(crate) enum OpenRefused {
    /// The client broke the protocol.
    Violation(String),
    /// The session ended before the open message was read. No violation: a client may end a
    /// session (TerminateSession) right after sending its open message, and the two travel on
    /// different connections, so the gateway can read them in either order.
    SessionEnded,
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            addr: OnceLock::new(),
            sessions: Mutex::new(HashMap::new()),
            instance_faults: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            sessions_started: AtomicU64::new(0),
            sessions_failed: AtomicU64::new(0),
            violation_count: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            forwarded_requests: AtomicU64::new(0),
            data_channel_connections: AtomicU64::new(0),
            tls_connections: AtomicU64::new(0),
            plain_upgrades_refused: AtomicU64::new(0),
            opens_after_end: AtomicU64::new(0),
            sessions_ended: watch::Sender::new(0),
        }
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr.get().copied().unwrap_or(self.config.listen)
    }

    /// The faults for a new session to `instance`.
    pub(crate) fn faults_for(&self, instance: &InstanceConfig) -> Faults {
        if let Some(f) = lock(&self.instance_faults).get(&instance.id) {
            return f.clone();
        }
        instance
            .faults
            .clone()
            .unwrap_or_else(|| self.config.faults.clone())
    }

    pub(crate) fn stream_url(&self, session_id: &str) -> String {
        format!(
            "{}://{}/v1/data-channel/{session_id}?role=publish_subscribe&cell-number=AAEAAQ",
            if self.config.tls.is_some() {
                "wss"
            } else {
                "ws"
            },
            self.local_addr()
        )
    }

    /// Records a violation (logged, counted, attached to the session's report).
    pub(crate) fn record_violation(&self, session_id: Option<&str>, reason: &str) {
        tracing::warn!(
            session = session_id.unwrap_or("-"),
            "client protocol violation: {reason}"
        );
        self.violation_count.fetch_add(1, Ordering::Relaxed);
        lock(&self.violations).push(Violation {
            session_id: session_id.map(str::to_owned),
            reason: reason.to_owned(),
        });
        if let Some(sid) = session_id
            && let Some(e) = lock(&self.sessions).get(sid)
        {
            lock(&e.report).violations.push(reason.to_owned());
        }
    }

    /// Consumes a session's live token for a new connection.
    pub(crate) fn open(&self, session_id: &str, token: &str) -> Result<Opened, OpenRefused> {
        let mut sessions = lock(&self.sessions);
        let violation = |reason: &str| OpenRefused::Violation(reason.to_owned());
        let entry = sessions
            .get_mut(session_id)
            .ok_or_else(|| violation(&format!("open message for unknown session {session_id}")))?;
        let agent = match &entry.agent {
            Some(agent) if !entry.is_over() => agent.clone(),
            _ => return Err(OpenRefused::SessionEnded),
        };
        match &entry.token {
            Some(t) if t == token => {}
            Some(_) => {
                return Err(violation(
                    "TokenValue does not match the session's live token",
                ));
            }
            None => {
                return Err(violation(
                    "TokenValue was already used (tokens are single-use; call ResumeSession)",
                ));
            }
        }
        entry.token = None;
        let conn_id = entry.next_connection;
        entry.next_connection += 1;
        Ok(Opened {
            agent,
            conn_id,
            info: entry.info.clone(),
            report: entry.report.clone(),
        })
    }

    /// Marks a session finished (called by its agent when it sends `channel_closed`): no more
    /// opens, resumes or API inputs.
    pub(crate) fn mark_finished(&self, session_id: &str) {
        if let Some(e) = lock(&self.sessions).get_mut(session_id) {
            e.token = None;
            e.agent = None;
            e.finished = true;
        }
    }

    /// Marks a session ended for good (called by its agent once its last WebSocket closed and
    /// its last frame was checked) and wakes the waiters.
    pub(crate) fn mark_ended(&self, session_id: &str, status: SessionStatus) {
        if let Some(e) = lock(&self.sessions).get_mut(session_id) {
            e.token = None;
            e.agent = None;
            e.finished = true;
            e.ended = Some(SystemTime::now());
            lock(&e.report).status = status;
        }
        if status == SessionStatus::Failed {
            self.sessions_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.sessions_ended.send_modify(|n| *n += 1);
    }

    pub(crate) fn stats(&self) -> Stats {
        let sessions = lock(&self.sessions);
        Stats {
            sessions_started: self.sessions_started.load(Ordering::Relaxed),
            sessions_active: sessions.values().filter(|e| e.ended.is_none()).count() as u64,
            sessions_failed: self.sessions_failed.load(Ordering::Relaxed),
            violations: self.violation_count.load(Ordering::Relaxed),
            api_requests: self.api_requests.load(Ordering::Relaxed),
            forwarded_requests: self.forwarded_requests.load(Ordering::Relaxed),
            data_channel_connections: self.data_channel_connections.load(Ordering::Relaxed),
            tls_connections: self.tls_connections.load(Ordering::Relaxed),
            plain_upgrades_refused: self.plain_upgrades_refused.load(Ordering::Relaxed),
            opens_after_end: self.opens_after_end.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn report(&self, session_id: &str) -> Option<SessionReport> {
        lock(&self.sessions)
            .get(session_id)
            .map(|e| lock(&e.report).clone())
    }

    /// Every session's report, oldest session first.
    pub(crate) fn reports(&self) -> Vec<SessionReport> {
        let sessions = lock(&self.sessions);
        let mut entries: Vec<&SessionEntry> = sessions.values().collect();
        entries.sort_by_key(|e| e.started);
        entries.iter().map(|e| lock(&e.report).clone()).collect()
    }

    pub(crate) fn agent(&self, session_id: &str) -> Option<UnboundedSender<AgentInput>> {
        lock(&self.sessions)
            .get(session_id)
            .and_then(|e| e.agent.clone())
    }
}
