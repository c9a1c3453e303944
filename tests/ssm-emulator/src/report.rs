//! What the emulator tells tests: protocol violations, per-session reports (with the faults it
//! injected and what they caused), global stats, and the check that every configured fault left
//! a trace in the reports.

use serde::Serialize;

use crate::config::Faults;

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
    /// A shell on a pseudo-terminal (a Standard_Stream session).
    Shell,
}

/// Where a shell session's transcript went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TranscriptReport {
    /// CloudWatch Logs events put in the session's log stream (streamed or at the end).
    pub cloud_watch_events: u64,
    /// The S3 object written, as `bucket/key`.
    pub s3_object: Option<String>,
    /// What the agent skipped or failed, in its words (a missing log group, a failed upload).
    pub notes: Vec<String>,
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
    /// StartSession's Reason, as received.
    pub reason: Option<String>,
    /// Current status. An ended status (see [`SessionStatus::is_ended`]) means the session is
    /// over for good: every WebSocket of it is closed and every client frame it received has
    /// been checked, so `violations` is complete.
    pub status: SessionStatus,
    /// Basic or mux, once the handshake decided it.
    pub transfer: Option<Transfer>,
    /// The ClientVersion from the HandshakeResponse.
    pub client_version: Option<String>,
    /// Whether the agent's smux keepalive is on.
    pub smux_keepalive: bool,
    /// Times the agent's receive path stopped because the targets did not take the client's
    /// bytes (its smux receive buffer full, its socket write blocked): no frame, not even an
    /// ack, was read until they did.
    pub receive_stalls: u64,
    /// Most client bytes waiting for the targets at once.
    pub peak_target_backlog_bytes: u64,
    /// Most client frames waiting, unread, for a stalled receive path at once.
    pub peak_held_frames: u64,
    /// Whether the HandshakeResponse's ack went out before HandshakeComplete (see
    /// `Config::handshake_ack`).
    pub handshake_ack_first: bool,
    /// smux NOPs the agent sent (its keepalive).
    pub smux_nops_to_client: u64,
    /// Violations, in order (complete once `status` is ended).
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
    /// Acks for output the client had already acknowledged (it re-acked a duplicate or a
    /// retransmission).
    pub repeated_acks_from_client: u64,
    /// Acks for output sent after an older message that was still unacknowledged (output
    /// delivered out of order, lost or corrupted).
    pub out_of_order_acks_from_client: u64,
    /// Acks the agent sent.
    pub acks_to_client: u64,
    /// Client retransmissions (duplicate sequence numbers) received.
    pub duplicates_from_client: u64,
    /// Client messages lost on purpose before the agent (`drop_client_every`) that a later
    /// frame of the client carried again.
    pub lost_input_resent: u64,
    /// Agent retransmissions.
    pub retransmissions_to_client: u64,
    /// smux streams the client opened.
    pub smux_streams_opened: u64,
    /// smux streams the client closed (its FIN for an open stream).
    pub smux_streams_closed_by_client: u64,
    /// smux streams whose dial failed (Flag 3 sent).
    pub smux_dial_failures: u64,
    /// Agent messages still unacked when the session ended.
    pub unacked_at_close: u64,
    /// The most target output the agent held sent but unacknowledged at once (the agent has
    /// no window: a client that acks late makes this grow).
    pub peak_unacked_output_bytes: u64,
    /// Client frames received after the session began to end (during the closing drain or
    /// after `channel_closed`); each was checked like any other.
    pub client_frames_after_end: u64,
    /// Client frames that arrived on a WebSocket a newer one had replaced; each was checked
    /// like any other.
    pub client_frames_on_replaced_connections: u64,
    /// What the fault injection actually did to this session.
    pub injected: InjectedFaults,
    /// Shell sessions: the user the shell runs as (the emulator runs it as itself: see
    /// `docs/protocol.md`).
    pub run_as_user: Option<String>,
    /// Shell sessions: the KMS handshake completed, and every Output payload both ways is
    /// encrypted with the session's data key.
    pub encrypted: bool,
    /// Shell sessions: the terminal sizes the client's Size payloads set, in order.
    pub terminal_sizes: Vec<(u32, u32)>,
    /// Shell sessions that keep a transcript: where it went, once it has (before the session
    /// ends for good).
    pub transcript: Option<TranscriptReport>,
}

/// What the configured [`Faults`] did to one session, counted where they happen: each counter
/// shows that its fault fired (a fault configured but never counted did nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InjectedFaults {
    /// `output_stream_data` transmissions the gateway dropped (`drop_every`).
    pub output_dropped: u64,
    /// `output_stream_data` transmissions the gateway sent twice (`duplicate_every`).
    pub output_duplicated: u64,
    /// `output_stream_data` transmissions sent in a reversed group of two or more
    /// (`reorder_window`).
    pub output_reordered: u64,
    /// Frames to the client held back by `delay_ms`.
    pub output_delayed: u64,
    /// Transmissions whose digest the gateway damaged (`corrupt_digest_every`).
    pub digests_corrupted: u64,
    /// Transmissions whose first payload byte the gateway damaged (`flip_payload_bit_every`).
    pub payload_bits_flipped: u64,
    /// Client `input_stream_data` frames the gateway lost before the agent
    /// (`drop_client_every`).
    pub input_dropped: u64,
    /// In-order client messages the agent processed without acknowledging
    /// (`withhold_ack_every`).
    pub acks_withheld: u64,
    /// WebSockets closed with 1000 "Bye" (`recycle_after_frames` or [`crate::Injection::Recycle`]).
    pub websocket_recycles: u64,
    /// WebSockets that went silent both ways (`black_hole_after_frames` or
    /// [`crate::Injection::BlackHole`]).
    pub black_holes: u64,
    /// TCP connections reset (`reset_after_frames` or [`crate::Injection::Reset`]).
    pub tcp_resets: u64,
    /// `start_publication` messages sent before the HandshakeRequest
    /// (`start_publication_first`).
    pub early_start_publications: u64,
    /// `pause_publication` messages with a garbage digest and length sent
    /// (`garbage_publication`).
    pub garbage_publications: u64,
    /// `pause_publication` messages sent never to be lifted (`lasting_pause`).
    pub lasting_pauses: u64,
    /// TerminateSession flags acknowledged and ignored (`ignore_terminate_flag`).
    pub terminate_flags_ignored: u64,
    /// `agent_session_state` and unknown-type messages sent (`extra_message_types`).
    pub extra_messages: u64,
    /// `channel_closed` messages sent in the legacy HL 112 form (`legacy_channel_closed`).
    pub legacy_channels_closed: u64,
    /// Sessions run as a legacy agent without a handshake (`legacy_no_handshake`).
    pub handshakes_skipped: u64,
}

/// For every fault `faults` configures, checks that `reports` (taken together) show it fired,
/// and the effect the protocol forces on any conforming client where there is one: a dropped
/// or damaged message is retransmitted by the agent, a duplicate is acknowledged again, a
/// reordered one is acknowledged out of order, a lost or unacknowledged client message is sent
/// again (provided the session outlives the client's retransmission timeout), a connection
/// fault is followed by a resume. Returns one line per fault that left no such trace; empty
/// when every configured fault observably happened.
///
/// Only one connection fault fires per connection (reset, then black hole, then recycle): when
/// several are configured, the others are reported as unobserved.
pub fn unobserved_faults(faults: &Faults, reports: &[SessionReport]) -> Vec<String> {
    let total = |count: fn(&SessionReport) -> u64| reports.iter().map(count).sum::<u64>();
    let every = |n: Option<u32>| n.is_some_and(|n| n > 0);
    let after = |n: Option<u64>| n.is_some();
    let reconnected = reports.iter().any(|r| r.connections > 1);
    let retransmitted = total(|r| r.retransmissions_to_client) > 0;
    let checks = [
        (
            every(faults.drop_every),
            total(|r| r.injected.output_dropped) > 0 && retransmitted,
            "drop_every: no output was dropped and then retransmitted by the agent",
        ),
        (
            every(faults.duplicate_every),
            total(|r| r.injected.output_duplicated) > 0
                && total(|r| r.repeated_acks_from_client) > 0,
            "duplicate_every: no output was duplicated and acknowledged again",
        ),
        (
            every(faults.reorder_window.filter(|w| *w > 1)),
            total(|r| r.injected.output_reordered) > 0
                && total(|r| r.out_of_order_acks_from_client) > 0,
            "reorder_window: no output was reordered and acknowledged out of order",
        ),
        (
            faults.delay_ms.is_some_and(|ms| ms > 0),
            total(|r| r.injected.output_delayed) > 0,
            "delay_ms: no frame was delayed",
        ),
        (
            every(faults.corrupt_digest_every),
            total(|r| r.injected.digests_corrupted) > 0 && retransmitted,
            "corrupt_digest_every: no digest was corrupted and the message retransmitted",
        ),
        (
            every(faults.flip_payload_bit_every),
            total(|r| r.injected.payload_bits_flipped) > 0 && retransmitted,
            "flip_payload_bit_every: no payload was damaged and the message retransmitted",
        ),
        (
            every(faults.drop_client_every),
            total(|r| r.injected.input_dropped) > 0 && total(|r| r.lost_input_resent) > 0,
            "drop_client_every: no client message was lost and then sent again",
        ),
        (
            every(faults.withhold_ack_every),
            total(|r| r.injected.acks_withheld) > 0 && total(|r| r.duplicates_from_client) > 0,
            "withhold_ack_every: no ack was withheld and the message retransmitted by the client",
        ),
        (
            after(faults.recycle_after_frames),
            total(|r| r.injected.websocket_recycles) > 0 && reconnected,
            "recycle_after_frames: no WebSocket was recycled and then resumed",
        ),
        (
            after(faults.black_hole_after_frames),
            total(|r| r.injected.black_holes) > 0 && reconnected,
            "black_hole_after_frames: no WebSocket went silent and then resumed",
        ),
        (
            after(faults.reset_after_frames),
            total(|r| r.injected.tcp_resets) > 0 && reconnected,
            "reset_after_frames: no TCP connection was reset and then resumed",
        ),
        (
            faults.start_publication_first,
            total(|r| r.injected.early_start_publications) > 0,
            "start_publication_first: no start_publication was sent before the handshake",
        ),
        (
            faults.garbage_publication,
            total(|r| r.injected.garbage_publications) > 0,
            "garbage_publication: no garbage pause_publication was sent",
        ),
        (
            faults.lasting_pause,
            total(|r| r.injected.lasting_pauses) > 0,
            "lasting_pause: no pause_publication was sent",
        ),
        (
            faults.ignore_terminate_flag,
            total(|r| r.injected.terminate_flags_ignored) > 0,
            "ignore_terminate_flag: no TerminateSession flag came to be ignored",
        ),
        (
            faults.extra_message_types,
            total(|r| r.injected.extra_messages) > 0,
            "extra_message_types: no agent_session_state or unknown message was sent",
        ),
        (
            faults.legacy_channel_closed,
            total(|r| r.injected.legacy_channels_closed) > 0,
            "legacy_channel_closed: no legacy channel_closed was sent",
        ),
        (
            faults.legacy_no_handshake,
            total(|r| r.injected.handshakes_skipped) > 0,
            "legacy_no_handshake: no session skipped the handshake",
        ),
    ];
    checks
        .into_iter()
        .filter(|(configured, observed, _)| *configured && !*observed)
        .map(|(_, _, what)| what.to_owned())
        .collect()
}

impl SessionReport {
    pub(crate) fn new(session_id: &str, target: &str, document_name: &str) -> Self {
        Self {
            session_id: session_id.to_owned(),
            target: target.to_owned(),
            document_name: document_name.to_owned(),
            reason: None,
            status: SessionStatus::Connecting,
            transfer: None,
            client_version: None,
            smux_keepalive: false,
            handshake_ack_first: false,
            receive_stalls: 0,
            peak_target_backlog_bytes: 0,
            peak_held_frames: 0,
            smux_nops_to_client: 0,
            violations: Vec::new(),
            close_reason: None,
            connections: 0,
            bytes_from_client: 0,
            bytes_to_client: 0,
            messages_from_client: 0,
            messages_to_client: 0,
            acks_from_client: 0,
            repeated_acks_from_client: 0,
            out_of_order_acks_from_client: 0,
            acks_to_client: 0,
            duplicates_from_client: 0,
            lost_input_resent: 0,
            retransmissions_to_client: 0,
            smux_streams_opened: 0,
            smux_streams_closed_by_client: 0,
            smux_dial_failures: 0,
            unacked_at_close: 0,
            peak_unacked_output_bytes: 0,
            client_frames_after_end: 0,
            client_frames_on_replaced_connections: 0,
            injected: InjectedFaults::default(),
            run_as_user: None,
            encrypted: false,
            terminal_sizes: Vec::new(),
            transcript: None,
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
    /// Connections that completed a TLS handshake (with a configured certificate).
    pub tls_connections: u64,
    /// Plain-text data-channel upgrades refused because the gateway serves `wss://`.
    pub plain_upgrades_refused: u64,
    /// Open messages read after their session had ended: refused (close 1008), not a
    /// violation, since a client's TerminateSession and its open message can cross.
    pub opens_after_end: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SessionReport {
        SessionReport::new("s-1", "i-1", "AWS-StartSSHSession")
    }

    #[test]
    fn a_configured_fault_without_a_trace_is_reported() {
        let faults = Faults {
            drop_every: Some(3),
            withhold_ack_every: Some(2),
            ..Faults::default()
        };
        let mut r = report();
        assert_eq!(unobserved_faults(&faults, &[r.clone()]).len(), 2);
        // Dropped, but never retransmitted: the drop had no visible effect yet.
        r.injected.output_dropped = 1;
        let missing = unobserved_faults(&faults, &[r.clone()]);
        assert!(missing[0].starts_with("drop_every"), "{missing:?}");
        r.retransmissions_to_client = 1;
        let missing = unobserved_faults(&faults, &[r.clone()]);
        assert_eq!(missing.len(), 1);
        assert!(missing[0].starts_with("withhold_ack_every"), "{missing:?}");
        // The evidence may come from different sessions of one scenario.
        let mut other = report();
        other.injected.acks_withheld = 2;
        other.duplicates_from_client = 1;
        assert!(unobserved_faults(&faults, &[r, other]).is_empty());
    }

    #[test]
    fn no_faults_need_no_evidence() {
        assert!(unobserved_faults(&Faults::default(), &[]).is_empty());
        let one_frame_windows = Faults {
            reorder_window: Some(1),
            drop_every: Some(0),
            ..Faults::default()
        };
        assert!(unobserved_faults(&one_frame_windows, &[report()]).is_empty());
    }
}
