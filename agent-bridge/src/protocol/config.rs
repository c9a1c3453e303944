//! The session core's tunables ([`Config`]) and their defaults, each with why it is what it is.

use std::time::Duration;

use super::{handshake, pacer};

/// Payload bytes per outgoing Output message. SMP and the agent use 1024 with a 1 ms sleep
/// (docs/protocol.md §6.2); aws-ssm-bridge reports 8 KiB and 32 KiB work against agent 3.3.3572.0. 32 KiB cuts the
/// message rate 32-fold, so bulk uploads stay far under the gateway's ~1000 msg/s: the pacer,
/// not the chunk, bounds throughput.
pub const DEFAULT_CHUNK_SIZE: usize = 32 * 1024;
/// Unacked messages before local reads stop (the reference buffers 10,000, then evicts).
pub const DEFAULT_MAX_UNACKED_MESSAGES: usize = 2048;
/// Unacked payload bytes before local reads stop: bounds memory per session.
pub const DEFAULT_MAX_UNACKED_BYTES: usize = 4 * 1024 * 1024;
/// RTO floor: below this, scheduling jitter alone triggers spurious retransmissions (docs/protocol.md §9.3).
pub const DEFAULT_RTO_FLOOR: Duration = Duration::from_millis(50);
/// RTO ceiling (with exponential backoff): the reference's 1 s cap retransmits too eagerly on a
/// slow path; 3 s still recovers a lost message quickly on a healthy one.
pub const DEFAULT_RTO_CEILING: Duration = Duration::from_secs(3);
/// Early (out-of-order) messages kept; beyond this they are dropped unacked (reference: 10,000).
pub const DEFAULT_MAX_REORDER_MESSAGES: usize = 1024;
/// Received payload bytes held for the caller, and, apart, early messages held until a gap
/// fills. A driver stops reading the WebSocket while less than [`INBOUND_HEADROOM`] of the
/// first is free ([`Session::wants_frames`]): receive backpressure goes through the transport.
/// Only an in-order message that still does not fit (larger than the headroom) is dropped
/// unacked, for the agent to resend. Early messages beyond their bound are dropped unacked; a
/// gap never stops reading, since what fills it comes through the same transport. When a gap
/// fills, the reorder buffer drains into events, so at most twice this is held.
pub const DEFAULT_MAX_INBOUND_BYTES: usize = 4 * 1024 * 1024;
/// Room kept for one more message when [`Session::wants_frames`] says to read: more than any
/// agent message carries (its port plugin reads 1,024 bytes at a time).
pub const INBOUND_HEADROOM: usize = 64 * 1024;
/// Time from session start (or reconnect) to HandshakeComplete. The agent itself waits 15 s
/// for our response; a slow gateway can delay its request.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// After sending the TerminateSession flag, how long to wait for `channel_closed` (the agent
/// drains its own buffers for at most 2 s, docs/protocol.md §5.7).
pub const DEFAULT_CLOSE_LINGER: Duration = Duration::from_secs(3);
/// How long a `pause_publication` holds sequenced messages back at most when nothing from the
/// agent lifts it sooner (its data or ack does, as in the agent's own data channel). The
/// plugin ignores pauses altogether; waiting for the agent alone could wait for ever when the
/// agent in turn waits for the client (a new smux stream, a request).
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(3);
/// Acks queued for sending at most; beyond this new acks are dropped (the agent retransmits).
/// Acks are not paced, so this only fills when the transport stalls.
pub const MAX_PENDING_ACKS: usize = 4096;
/// Concurrent smux streams per session.
pub const DEFAULT_MAX_STREAMS: usize = 256;

/// Session tunables. Plain data; every field has a documented default.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: usize,
    /// See [`DEFAULT_MAX_UNACKED_MESSAGES`].
    pub max_unacked_messages: usize,
    /// See [`DEFAULT_MAX_UNACKED_BYTES`].
    pub max_unacked_bytes: usize,
    /// See [`DEFAULT_RTO_FLOOR`].
    pub rto_floor: Duration,
    /// See [`DEFAULT_RTO_CEILING`].
    pub rto_ceiling: Duration,
    /// See [`DEFAULT_MAX_REORDER_MESSAGES`].
    pub max_reorder_messages: usize,
    /// See [`DEFAULT_MAX_INBOUND_BYTES`].
    pub max_inbound_bytes: usize,
    /// See [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// See [`DEFAULT_CLOSE_LINGER`].
    pub close_linger: Duration,
    /// See [`DEFAULT_MAX_PAUSE`].
    pub max_pause: Duration,
    /// See [`DEFAULT_MAX_STREAMS`].
    pub max_streams: usize,
    /// ClientVersion in the HandshakeResponse; see [`handshake::CLIENT_VERSION`].
    pub client_version: String,
    /// Sequenced messages per second at most; see [`pacer::DEFAULT_MESSAGES_PER_SECOND`].
    pub messages_per_second: u32,
    /// Sequenced messages back to back at most; see [`pacer::DEFAULT_BURST`].
    pub burst: u32,
    /// The session runs a shell (a Standard_Stream document): the agent's shell plugin takes
    /// Output and Size payloads and ignores flags, so the end of local input is typed as the
    /// terminal's end-of-file (^D) and [`Session::terminate`](super::Session::terminate) sends
    /// no flag. Default false (Port sessions).
    pub shell: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_unacked_messages: DEFAULT_MAX_UNACKED_MESSAGES,
            max_unacked_bytes: DEFAULT_MAX_UNACKED_BYTES,
            rto_floor: DEFAULT_RTO_FLOOR,
            rto_ceiling: DEFAULT_RTO_CEILING,
            max_reorder_messages: DEFAULT_MAX_REORDER_MESSAGES,
            max_inbound_bytes: DEFAULT_MAX_INBOUND_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            close_linger: DEFAULT_CLOSE_LINGER,
            max_pause: DEFAULT_MAX_PAUSE,
            max_streams: DEFAULT_MAX_STREAMS,
            client_version: handshake::CLIENT_VERSION.to_owned(),
            messages_per_second: pacer::DEFAULT_MESSAGES_PER_SECOND,
            burst: pacer::DEFAULT_BURST,
            shell: false,
        }
    }
}
