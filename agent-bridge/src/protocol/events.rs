//! What the session core tells its caller: the forwarding mode and handshake it settled on,
//! the events to act on, the errors of its calls, why it closed, and its counters.

use std::time::Duration;

use bytes::Bytes;

use super::handshake::SessionProperties;
use super::message::DecodeError;
use super::smux::{MuxError, StreamCloseReason, StreamId};

/// How local bytes travel, decided at HandshakeComplete (docs/protocol.md §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardingMode {
    /// One raw byte stream (SSH, old agents, non-LocalPortForwarding): use
    /// [`Session::handle_local_data`] and [`Session::disconnect_local`].
    Basic,
    /// smux v1 streams: use [`Session::open_stream`], [`Session::write_stream`],
    /// [`Session::close_stream`].
    Mux,
}

/// What the handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInfo {
    /// AgentVersion; `None` for a legacy agent that streamed Output without a handshake.
    pub agent_version: Option<String>,
    /// Session type and Port properties from the request.
    pub properties: SessionProperties,
    /// Basic or mux.
    pub mode: ForwardingMode,
    /// Whether smux NOP keepalive runs (AgentVersion ≤ 3.1.1511.0).
    pub smux_keepalive: bool,
    /// Whether the agent understands the TerminateSession flag (AgentVersion > 2.3.722.0).
    pub terminate_flag_supported: bool,
    /// HandshakeComplete's CustomerMessage, when non-empty.
    pub customer_message: Option<String>,
}

/// Why the session closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseCause {
    /// MGS sent `channel_closed` (see the event's `output`).
    ChannelClosed,
    /// The agent sent the TerminateSession flag.
    AgentTerminated,
    /// [`Session::terminate`] was called.
    LocalTerminate,
    /// No HandshakeComplete within [`Config::handshake_timeout`].
    HandshakeTimeout,
    /// The HandshakeRequest could not be parsed.
    HandshakeInvalid(String),
    /// smux keepalive: nothing arrived for 30 s.
    KeepaliveTimeout,
    /// The agent's smux stream was malformed.
    MuxProtocol(MuxError),
    /// A shell's KMS encryption failed: an agent payload or its challenge did not decrypt.
    Encryption(String),
}

/// Something the caller must act on, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session is open; local data may flow.
    HandshakeComplete(HandshakeInfo),
    /// Basic mode: bytes for the local connection.
    Data(Bytes),
    /// Mux mode: bytes for one stream's local connection.
    StreamData {
        /// The stream.
        stream: StreamId,
        /// The bytes.
        data: Bytes,
    },
    /// Mux mode: a stream ended; close its local connection. Not reported for streams the
    /// caller closed itself.
    StreamClosed {
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: StreamCloseReason,
    },
    /// A shell's agent asks for KMS session encryption: get a data key for `key_id` (KMS
    /// `GenerateDataKey`, 64 bytes, with the session's encryption context) and hand it to
    /// [`Session::provide_data_key`].
    DataKeyRequired {
        /// The document's `kmsKeyId`.
        key_id: String,
    },
    /// The agent reported ConnectToPortError (the failed stream follows as `StreamClosed`
    /// with [`StreamCloseReason::ConnectFailed`]).
    ConnectToPortError,
    /// The session is over; close the WebSocket. `output` is `channel_closed`'s `Output`.
    Closed {
        /// Why.
        cause: CloseCause,
        /// The service's explanation, when it sent one.
        output: Option<String>,
    },
}

/// An error from a session call. `Decode` and `DigestMismatch` are non-fatal: the frame was
/// dropped and the session carries on; the caller may log and count them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A malformed frame was dropped.
    #[error("dropped malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// A frame whose digest does not match its payload was dropped without an ack; the sender
    /// will retransmit.
    #[error("dropped {message_type} seq {sequence_number}: payload digest mismatch")]
    DigestMismatch {
        /// The message type.
        message_type: String,
        /// Its sequence number.
        sequence_number: i64,
    },
    /// The session is closing or closed: stop feeding it.
    #[error("session is closed")]
    Closed,
    /// The handshake has not completed: wait for [`Event::HandshakeComplete`].
    #[error("session is not open yet")]
    NotOpen,
    /// The call does not fit the session's forwarding mode.
    #[error("operation not available in {mode:?} mode")]
    WrongMode {
        /// The session's mode.
        mode: ForwardingMode,
    },
    /// No such open stream (it was closed by either side).
    #[error("unknown stream {0}")]
    UnknownStream(StreamId),
    /// [`Config::max_streams`] streams are open; close one first.
    #[error("too many open streams")]
    TooManyStreams,
    /// All 2^31 client stream ids were used; open a new session.
    #[error("smux stream ids exhausted")]
    StreamIdsExhausted,
    /// Terminal sizes are for shell sessions ([`Config::shell`]).
    #[error("not a shell session")]
    NotShell,
    /// The send window is full; retry when [`Session::send_capacity`] is non-zero.
    #[error("send window full")]
    WouldBlock,
}

/// Counters and gauges, plain data for the driver to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed out by `poll_transmit` (including retransmissions and acks).
    pub frames_sent: u64,
    /// Frames given to `handle_ws_message` that decoded.
    pub frames_received: u64,
    /// Local payload bytes accepted for sending (basic data or smux wire bytes).
    pub bytes_sent: u64,
    /// Payload bytes delivered as `Data`/`StreamData` events.
    pub bytes_received: u64,
    /// Retransmitted frames.
    pub retransmissions: u64,
    /// Acks we sent (including re-acks).
    pub acks_sent: u64,
    /// Acks not queued because [`MAX_PENDING_ACKS`] were already waiting.
    pub acks_dropped: u64,
    /// Acks we received that released a message.
    pub acks_received: u64,
    /// RTT samples taken.
    pub rtt_samples: u64,
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Current retransmission timeout.
    pub rto: Duration,
    /// Duplicate stream messages received (re-acked).
    pub duplicates_received: u64,
    /// Frames dropped for a digest mismatch.
    pub digest_mismatches: u64,
    /// Frames that did not decode.
    pub malformed_frames: u64,
    /// Stream messages dropped unacked for lack of buffer room (reorder bound or receive
    /// backpressure).
    pub dropped_no_room: u64,
    /// Messages of types or payload types this client ignores.
    pub ignored_messages: u64,
    /// `reset_transport` calls.
    pub reconnects: u64,
    /// HandshakeComplete messages acted on (one per session; the setup metrics time it).
    pub handshakes_completed: u64,
    /// Unacked outgoing messages now.
    pub unacked_messages: usize,
    /// Unacked outgoing payload bytes now.
    pub unacked_bytes: usize,
    /// Early messages held now.
    pub reorder_buffered: usize,
    /// Whether MGS paused publication.
    pub paused: bool,
    /// Open smux streams now.
    pub open_streams: usize,
    /// The sequence number our next `input_stream_data` gets (survives reconnects).
    pub next_send_sequence: i64,
    /// The agent sequence number we expect next (survives reconnects).
    pub next_receive_sequence: i64,
}
