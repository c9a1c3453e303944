//! What the emulator tells tests: protocol violations, per-session reports and global stats.

use serde::Serialize;

/// Where a session is in its life (the values DescribeSessions reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SessionStatus {
    /// Started, no client attached yet.
    Connecting,
    /// A client is attached.
    Connected,
    /// The client's WebSocket is gone; a resume may follow.
    Disconnected,
    /// Ended normally.
    Terminated,
    /// Ended by an error or a violation.
    Failed,
}

impl SessionStatus {
    /// The DescribeSessions spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "Connecting",
            Self::Connected => "Connected",
            Self::Disconnected => "Disconnected",
            Self::Terminated => "Terminated",
            Self::Failed => "Failed",
        }
    }

    /// Ended (terminated or failed).
    pub fn is_ended(self) -> bool {
        matches!(self, Self::Terminated | Self::Failed)
    }
}

/// How the agent carries port data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Transfer {
    /// One raw TCP connection.
    Basic,
    /// smux v1 streams.
    Mux,
}

/// One protocol violation by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The session, when known.
    pub session_id: Option<String>,
    /// What was wrong.
    pub reason: String,
}

/// Everything the emulator observed about one session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    /// Session id.
    pub session_id: String,
    /// Instance id.
    pub target: String,
    /// Document name.
    pub document_name: String,
    /// Current status.
    pub status: SessionStatus,
    /// Basic or mux, once the handshake decided it.
    pub transfer: Option<Transfer>,
    /// The ClientVersion from the HandshakeResponse.
    pub client_version: Option<String>,
    /// Whether the agent's smux keepalive is on.
    pub smux_keepalive: bool,
    /// Violations, in order.
    pub violations: Vec<String>,
    /// Why the session ended.
    pub close_reason: Option<String>,
    /// WebSocket connections accepted (1 + resumes).
    pub connections: u32,
    /// Output payload bytes accepted from the client.
    pub bytes_from_client: u64,
    /// Output payload bytes the agent produced for the client.
    pub bytes_to_client: u64,
    /// `input_stream_data` frames received (duplicates included).
    pub messages_from_client: u64,
    /// `output_stream_data` messages the agent produced (retransmissions excluded).
    pub messages_to_client: u64,
    /// Acks received from the client.
    pub acks_from_client: u64,
    /// Acks the agent sent.
    pub acks_to_client: u64,
    /// Client retransmissions (duplicate sequence numbers) received.
    pub duplicates_from_client: u64,
    /// Agent retransmissions.
    pub retransmissions_to_client: u64,
    /// smux streams the client opened.
    pub smux_streams_opened: u64,
    /// smux streams whose dial failed (Flag 3 sent).
    pub smux_dial_failures: u64,
    /// Agent messages still unacked when the session ended.
    pub unacked_at_close: u64,
    /// The most target output the agent held sent but unacknowledged at once (bounded by
    /// `Config::output_budget_bytes`).
    pub peak_unacked_output_bytes: u64,
}

impl SessionReport {
    pub(crate) fn new(session_id: &str, target: &str, document_name: &str) -> Self {
        Self {
            session_id: session_id.to_owned(),
            target: target.to_owned(),
            document_name: document_name.to_owned(),
            status: SessionStatus::Connecting,
            transfer: None,
            client_version: None,
            smux_keepalive: false,
            violations: Vec::new(),
            close_reason: None,
            connections: 0,
            bytes_from_client: 0,
            bytes_to_client: 0,
            messages_from_client: 0,
            messages_to_client: 0,
            acks_from_client: 0,
            acks_to_client: 0,
            duplicates_from_client: 0,
            retransmissions_to_client: 0,
            smux_streams_opened: 0,
            smux_dial_failures: 0,
            unacked_at_close: 0,
            peak_unacked_output_bytes: 0,
        }
    }
}

/// Emulator-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Sessions started.
    pub sessions_started: u64,
    /// Sessions not yet ended.
    pub sessions_active: u64,
    /// Sessions that failed.
    pub sessions_failed: u64,
    /// Violations recorded.
    pub violations: u64,
    /// API requests handled locally.
    pub api_requests: u64,
    /// API requests forwarded upstream.
    pub forwarded_requests: u64,
    /// Data-channel WebSocket connections accepted.
    pub data_channel_connections: u64,
}
