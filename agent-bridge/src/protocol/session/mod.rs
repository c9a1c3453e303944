//! The data-channel `Session` state machine: handshake, acks, retransmission, publication
//! control, basic and smux forwarding, closing. Sans-IO: the caller feeds WebSocket messages,
//! local bytes and timeouts in, and drains frames, events and the next deadline out.
//!
//! ```text
//!   new ──> AwaitingHandshake ──HandshakeRequest──> AwaitingComplete ──HandshakeComplete──> Open
//!               │  (Output first: legacy agent) ─────────────────────────────────────────────^ │
//!               │                                                                             │ terminate()
//!               └──── handshake timeout / channel_closed / flag 2 / smux error ──> Closed <── Closing
//! ```
//!
//! After every `handle_*` call the caller drains [`Session::poll_transmit`] (WebSocket binary
//! frames), [`Session::poll_event`], then sleeps until [`Session::poll_timeout`] and calls
//! [`Session::handle_timeout`].

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fleet_access_crds::agent_version::{self, Version};
use uuid::Uuid;

use super::handshake::{AcknowledgeContent, ChannelClosed, HandshakeComplete, HandshakeRequest};
use super::kms::{self, Cipher, DataKey};
use super::message::{self, ClientMessage, FLAG_FIN, FLAG_SYN, MessageType, PayloadType, PortFlag};
use super::pacer::Pacer;
use super::reliability::{AckOutcome, Arrival, ReceiveBuffer, SendBuffer};
use super::rtt::RttEstimator;
use super::smux::{MuxClient, MuxEvent, OpenError, StreamId};

mod receive;

// The tunables and what callers read were split out of this file; their paths stay.
pub use super::config::*;
pub use super::events::*;

/// What a terminal sends for ^D: end of file, at the start of a line.
const END_OF_FILE: u8 = 0x04;

// === Session ===

/// Private lifecycle; see the module diagram.
#[derive(Debug)]
enum State {
    AwaitingHandshake { deadline: Instant },
    AwaitingComplete { deadline: Instant },
    Open,
    Closing { deadline: Instant },
    Closed,
}

/// Maps `Instant`s to the epoch milliseconds CreatedDate needs, from one reading the driver
/// took at start.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    base: Instant,
    base_epoch_ms: u64,
}

impl WallClock {
    fn epoch_ms(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.base).as_millis();
        let ms = self
            .base_epoch_ms
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX));
        ms.max(1)
    }
}

/// Deterministic v4-shaped MessageIds from a seed (the driver seeds it randomly).
#[derive(Debug, Clone)]
struct MessageIds {
    state: u64,
}

impl MessageIds {
    fn next(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.step().to_le_bytes());
        bytes[8..].copy_from_slice(&self.step().to_le_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// splitmix64.
    fn step(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One SSM data channel, client side. See the module docs for the calling contract.
#[derive(Debug)]
pub struct Session {
    config: Config,
    state: State,
    send: SendBuffer,
    /// Output accepted but not yet cut into messages. It is cut when the transport asks for the
    /// next frame, so while the pacer holds messages back, later writes fill one message
    /// instead of queueing many small ones.
    unsent_output: BytesMut,
    recv: ReceiveBuffer,
    /// Unsequenced frames (acks); sent before sequenced ones, even while paused.
    control: VecDeque<Bytes>,
    events: VecDeque<Event>,
    /// Payload bytes inside queued Data/StreamData events.
    event_bytes: usize,
    /// Received bytes (undrained events and early messages together) the caller's share of a
    /// memory budget allows ([`Session::set_inbound_budget`]); unbounded by default.
    inbound_budget: usize,
    /// Since when MGS has paused publication. The agent's own data channel lifts a pause at
    /// the next data or ack from its peer, and so does this one; a pause also lapses after
    /// [`Config::max_pause`]: one that is never lifted must not stop a session for ever.
    paused_since: Option<Instant>,
    clock: WallClock,
    ids: MessageIds,
    request: Option<HandshakeRequest>,
    info: Option<HandshakeInfo>,
    mux: Option<MuxClient>,
    /// Paces sequenced messages under the gateway's rate limit (acks are not paced: their
    /// rate is the agent's own, and delaying them only causes retransmissions).
    pacer: Pacer,
    /// Set when the last [`Session::poll_transmit`] had something to send but the pacer held
    /// it: when it may go.
    paced_until: Option<Instant>,
    /// A shell's KMS encryption: the HandshakeResponse waits for the caller's data key
    /// ([`Session::provide_data_key`]).
    data_key_pending: bool,
    /// A shell's KMS encryption, once the data key is in: Output payloads both ways.
    cipher: Option<Cipher>,
    /// Where the cipher's nonces start (from the id seed: a different start per session).
    nonce_start: u128,
    stats: Stats,
}

/// A frame for the WebSocket, from [`Session::poll_transmit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// One whole binary WebSocket message.
    pub frame: Bytes,
    /// What it is.
    pub kind: TransmitKind,
}

/// What a [`Transmit`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransmitKind {
    /// An `acknowledge`: never paced, never retransmitted.
    Acknowledge,
    /// A sequenced message (stream data, a flag, the handshake): paced, kept until acked.
    Sequenced,
}

impl Session {
    /// A new session that starts waiting for the agent's handshake.
    ///
    /// `now_epoch_ms` is the wall clock (Unix milliseconds) at `now`, used for CreatedDate;
    /// `id_seed` seeds the MessageIds (use a random value; tests use a constant).
    pub fn new(config: Config, now: Instant, now_epoch_ms: u64, id_seed: u64) -> Self {
        let rtt = RttEstimator::new(config.rto_floor, config.rto_ceiling);
        Self {
            state: State::AwaitingHandshake {
                deadline: now + config.handshake_timeout,
            },
            send: SendBuffer::new(rtt),
            unsent_output: BytesMut::new(),
            recv: ReceiveBuffer::new(config.max_reorder_messages),
            control: VecDeque::new(),
            events: VecDeque::new(),
            event_bytes: 0,
            inbound_budget: usize::MAX,
            paused_since: None,
            clock: WallClock {
                base: now,
                base_epoch_ms: now_epoch_ms,
            },
            ids: MessageIds { state: id_seed },
            request: None,
            info: None,
            mux: None,
            pacer: Pacer::new(now, config.messages_per_second, config.burst),
            paced_until: None,
            data_key_pending: false,
            cipher: None,
            nonce_start: u128::from(id_seed) << 32,
            stats: Stats::default(),
            config,
        }
    }

    // --- inputs ---

    /// Feeds one WebSocket message (binary, or a text frame's bytes). A malformed frame or a
    /// digest mismatch returns an error and changes nothing else; the session carries on.
    pub fn handle_ws_message(&mut self, now: Instant, frame: &[u8]) -> Result<(), SessionError> {
        if matches!(self.state, State::Closed) {
            return Ok(());
        }
        let decoded = match message::decode(frame) {
            Ok(decoded) => decoded,
            Err(error) => {
                if self.handle_text_control(now, frame) {
                    return Ok(());
                }
                self.stats.malformed_frames += 1;
                return Err(error.into());
            }
        };
        self.stats.frames_received += 1;
        let digest_ok = decoded.digest_matches();
        let message = decoded.message;
        match message.message_type {
            MessageType::OutputStreamData | MessageType::Acknowledge if !digest_ok => {
                self.stats.digest_mismatches += 1;
                Err(SessionError::DigestMismatch {
                    message_type: message.message_type.as_str().to_owned(),
                    sequence_number: message.sequence_number,
                })
            }
            MessageType::OutputStreamData => {
                self.paused_since = None;
                self.handle_stream_message(now, message);
                Ok(())
            }
            MessageType::Acknowledge => {
                self.paused_since = None;
                self.handle_ack(now, &message.payload);
                Ok(())
            }
            MessageType::ChannelClosed => {
                // Accepted whatever its digest: it is final, and MGS's own form is odd (docs/protocol.md §2.2).
                let output = serde_json::from_slice::<ChannelClosed>(&message.payload)
                    .ok()
                    .map(|c| c.output)
                    .filter(|o| !o.is_empty());
                self.channel_closed(output);
                Ok(())
            }
            MessageType::StartPublication => {
                self.paused_since = None;
                Ok(())
            }
            MessageType::PausePublication => {
                self.pause(now);
                Ok(())
            }
            MessageType::InputStreamData
            | MessageType::AgentSessionState
            | MessageType::Other(_) => {
                self.stats.ignored_messages += 1;
                Ok(())
            }
        }
    }

    /// Basic mode: offers local bytes; returns how many were accepted (the rest must be offered
    /// again later: backpressure). Accepts at most [`Session::send_capacity`] bytes.
    pub fn handle_local_data(&mut self, data: &[u8]) -> Result<usize, SessionError> {
        self.require_mode(ForwardingMode::Basic)?;
        let n = data.len().min(self.send_capacity());
        self.push_output(&data[..n]);
        Ok(n)
    }

    /// Basic mode: the local connection ended; sends DisconnectToPort so the agent closes its
    /// side and re-dials on the next data. In a shell session ([`Config::shell`]) it types the
    /// terminal's end-of-file (^D) instead, as a terminal would: the shell reads it as the end
    /// of its input and exits, which ends the session.
    pub fn disconnect_local(&mut self, now: Instant) -> Result<(), SessionError> {
        self.require_mode(ForwardingMode::Basic)?;
        if self.config.shell {
            self.push_output(&[END_OF_FILE]);
            self.cut_output(now, true);
            return Ok(());
        }
        self.push_sequenced(
            now,
            PayloadType::Flag,
            PortFlag::DisconnectToPort.to_payload(),
        );
        Ok(())
    }

    /// A shell session ([`Config::shell`]): sends the terminal's size as a Size payload
    /// (`{"cols": …, "rows": …}`), in sequence with the keystrokes around it.
    pub fn send_terminal_size(
        &mut self,
        now: Instant,
        cols: u16,
        rows: u16,
    ) -> Result<(), SessionError> {
        self.require_mode(ForwardingMode::Basic)?;
        if !self.config.shell {
            return Err(SessionError::NotShell);
        }
        let size = serde_json::json!({"cols": cols, "rows": rows}).to_string();
        self.push_sequenced(now, PayloadType::Size, Bytes::from(size));
        Ok(())
    }

    /// Mux mode: opens a stream (sends SYN). Its data then flows with [`Session::write_stream`].
    pub fn open_stream(&mut self) -> Result<StreamId, SessionError> {
        self.require_mode(ForwardingMode::Mux)?;
        if self.send_capacity() == 0 {
            return Err(SessionError::WouldBlock);
        }
        let mut out = BytesMut::new();
        let mux = self.mux.as_mut().ok_or(SessionError::NotOpen)?;
        let id = mux.open(&mut out).map_err(|e| match e {
            OpenError::TooMany => SessionError::TooManyStreams,
            OpenError::IdsExhausted => SessionError::StreamIdsExhausted,
        })?;
        self.push_output(&out);
        Ok(id)
    }

    /// Mux mode: offers bytes for one stream; returns how many were accepted (backpressure as
    /// in [`Session::handle_local_data`]).
    pub fn write_stream(&mut self, stream: StreamId, data: &[u8]) -> Result<usize, SessionError> {
        self.require_mode(ForwardingMode::Mux)?;
        let capacity = self.send_capacity();
        let mux = self.mux.as_mut().ok_or(SessionError::NotOpen)?;
        if !mux.is_open(stream) {
            return Err(SessionError::UnknownStream(stream));
        }
        let n = data.len().min(MuxClient::data_fitting(capacity));
        if n == 0 {
            return Ok(0);
        }
        let mut out = BytesMut::with_capacity(MuxClient::framed_len(n));
        mux.write(stream, &data[..n], &mut out);
        self.push_output(&out);
        Ok(n)
    }

    /// Mux mode: the local connection of `stream` ended; sends FIN and forgets the stream.
    pub fn close_stream(&mut self, stream: StreamId) -> Result<(), SessionError> {
        self.require_mode(ForwardingMode::Mux)?;
        let mut out = BytesMut::new();
        let mux = self.mux.as_mut().ok_or(SessionError::NotOpen)?;
        if !mux.close(stream, &mut out) {
            return Err(SessionError::UnknownStream(stream));
        }
        self.push_output(&out);
        Ok(())
    }

    /// Ends the session from our side: sends the TerminateSession flag when the agent
    /// understands it and waits up to [`Config::close_linger`] for `channel_closed`; otherwise
    /// closes at once. Either way the caller should also call the TerminateSession API.
    pub fn terminate(&mut self, now: Instant) {
        // The agent's shell plugin ignores flags: a shell ends by the API alone.
        let flag_ok = !self.config.shell
            && self
                .info
                .as_ref()
                .is_some_and(|i| i.terminate_flag_supported);
        match self.state {
            State::Open if flag_ok => {
                self.push_sequenced(
                    now,
                    PayloadType::Flag,
                    PortFlag::TerminateSession.to_payload(),
                );
                self.state = State::Closing {
                    deadline: now + self.config.close_linger,
                };
            }
            State::Closed | State::Closing { .. } => {}
            _ => self.close(CloseCause::LocalTerminate, None),
        }
    }

    /// The WebSocket was replaced (ResumeSession + new open message): sequence state is kept,
    /// every in-flight message is sent again, publication resumes, and handshake and keepalive
    /// timers restart from `now`.
    pub fn reset_transport(&mut self, now: Instant) {
        self.stats.reconnects += 1;
        self.paused_since = None;
        self.send.requeue_in_flight(now);
        match &mut self.state {
            State::AwaitingHandshake { deadline } | State::AwaitingComplete { deadline } => {
                *deadline = now + self.config.handshake_timeout;
            }
            _ => {}
        }
        if let Some(mux) = &mut self.mux {
            mux.reset_timers(now);
        }
    }

    /// Runs expired timers: handshake timeout, close linger, retransmission, smux keepalive.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitingHandshake { deadline } | State::AwaitingComplete { deadline }
                if now >= deadline =>
            {
                self.close(CloseCause::HandshakeTimeout, None);
                return;
            }
            State::Closing { deadline } if now >= deadline => {
                self.close(CloseCause::LocalTerminate, None);
                return;
            }
            State::Closed => return,
            _ => {}
        }
        if self
            .paused_since
            .is_some_and(|since| now >= since + self.config.max_pause)
        {
            self.paused_since = None;
        }
        // The pacer lets the held message go: the next poll_transmit sends it.
        if self.paced_until.is_some_and(|until| now >= until) {
            self.paced_until = None;
        }
        if !self.is_paused() {
            self.send.handle_timeout(now);
        }
        if let Some(mux) = &mut self.mux {
            let mut out = BytesMut::new();
            if mux.handle_timeout(now, &mut out).is_err() {
                self.close(CloseCause::KeepaliveTimeout, None);
                return;
            }
            // A NOP is skipped rather than queued past a full window.
            if !out.is_empty() && self.send_capacity() >= out.len() {
                self.push_output(&out);
            }
        }
    }

    // --- outputs ---

    /// The next frame to send as a WebSocket binary message, if any. Acks go first and flow
    /// even while paused; sequenced messages wait while MGS has paused publication, and for
    /// the pacer ([`Session::poll_timeout`] says until when).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if matches!(self.state, State::Closed) {
            return None;
        }
        let transmit = match self.control.pop_front() {
            Some(frame) => Some(Transmit {
                frame,
                kind: TransmitKind::Acknowledge,
            }),
            None if self.is_paused() => None,
            None => {
                let ready = self.pacer.ready_at(now);
                if ready > now {
                    // Something to send waits for the pacer: that is when to look again.
                    let due = self.send.poll_timeout().is_some_and(|at| at <= now);
                    if due || self.send.has_unsent() || !self.unsent_output.is_empty() {
                        self.paced_until = Some(ready);
                    }
                    return None;
                }
                self.paced_until = None;
                if !self.send.has_unsent() {
                    self.cut_output(now, false);
                }
                let frame = self.send.poll_transmit(now);
                if frame.is_some() {
                    self.pacer.consume(now);
                }
                frame.map(|frame| Transmit {
                    frame,
                    kind: TransmitKind::Sequenced,
                })
            }
        };
        if transmit.is_some() {
            self.stats.frames_sent += 1;
        }
        transmit
    }

    /// The next event for the caller, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        match &event {
            Event::Data(data) | Event::StreamData { data, .. } => {
                self.event_bytes -= data.len();
            }
            _ => {}
        }
        Some(event)
    }

    /// When to call [`Session::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = match self.state {
            State::AwaitingHandshake { deadline }
            | State::AwaitingComplete { deadline }
            | State::Closing { deadline } => Some(deadline),
            State::Open => None,
            State::Closed => return None,
        };
        let send = match (self.paused_since, self.paced_until) {
            (Some(since), _) => Some(since + self.config.max_pause),
            // Something due waits for the pacer: it is the next deadline.
            (None, Some(until)) => Some(until),
            (None, None) => self.send.poll_timeout(),
        };
        let mux = self.mux.as_ref().and_then(MuxClient::poll_timeout);
        [state, send, mux].into_iter().flatten().min()
    }

    /// Local bytes the session accepts right now (0 before HandshakeComplete, while the send
    /// window is full, and once closing). In mux mode this counts smux framing too.
    pub fn send_capacity(&self) -> usize {
        if !matches!(self.state, State::Open) {
            return 0;
        }
        let chunk = self.config.chunk_size.max(1);
        let unsent = self.unsent_output.len();
        let messages = self
            .config
            .max_unacked_messages
            .saturating_sub(self.send.len() + unsent.div_ceil(chunk));
        let bytes = self
            .config
            .max_unacked_bytes
            .saturating_sub(self.send.payload_bytes() + unsent);
        bytes.min(messages.saturating_mul(chunk))
    }

    /// What the handshake established, once complete.
    pub fn handshake(&self) -> Option<&HandshakeInfo> {
        self.info.as_ref()
    }

    /// True once [`Event::Closed`] has been queued.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True once HandshakeComplete arrived and until closing starts.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Since when sent messages have waited for an ack without any progress, or, while MGS
    /// has paused publication, since when what there is to send has waited for the pause to
    /// lift (`None` when there is nothing to wait for). A driver treats a long wait as a dead
    /// transport even when the WebSocket still answers pings.
    pub fn ack_wait_since(&self) -> Option<Instant> {
        let waiting = self.send.waiting_since();
        match self.paused_since {
            Some(since) if self.send.len() > 0 || !self.unsent_output.is_empty() => {
                Some(waiting.map_or(since, |w| w.min(since)))
            }
            _ => waiting,
        }
    }

    /// True while MGS has paused publication.
    pub fn is_paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// Whether the caller should read the next WebSocket frame. False while the data held for
    /// the caller (undrained events) leaves no room for one more message of up to
    /// [`INBOUND_HEADROOM`] bytes. The agent has no send window and resends only its oldest
    /// unacknowledged message, about once per 100 ms, so a message dropped for lack of room
    /// costs a tick each: a driver pushes back by not reading instead, and the transport holds
    /// the agent back.
    pub fn wants_frames(&self) -> bool {
        self.event_bytes.saturating_add(INBOUND_HEADROOM) <= self.config.max_inbound_bytes
            && (self.within_inbound_budget(INBOUND_HEADROOM) || self.awaits_gap())
    }

    /// Caps the received bytes held for the caller (undrained events and early messages
    /// together) at `bytes`, below [`Config::max_inbound_bytes`]: a driver passes what its
    /// share of a memory budget leaves room for. The session then asks for frames only while
    /// one more message fits, drops unacked (for the agent to resend) a message that does not,
    /// and keeps early messages only with room left for the one that fills their gap, so that
    /// a gap never stops it.
    pub fn set_inbound_budget(&mut self, bytes: usize) {
        self.inbound_budget = bytes;
    }

    /// Received payload bytes held for the caller: undrained events and early messages.
    pub fn inbound_bytes(&self) -> usize {
        self.event_bytes + self.recv.buffered_bytes()
    }

    /// Payload bytes the session holds in memory, both ways: received ones not yet drained
    /// ([`Session::inbound_bytes`]) and local ones sent but not acknowledged, or not yet sent.
    pub fn buffered_bytes(&self) -> usize {
        self.inbound_bytes() + self.send.payload_bytes() + self.unsent_output.len()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let rtt = self.send.rtt();
        Stats {
            retransmissions: self.send.retransmissions(),
            rtt_samples: rtt.samples(),
            srtt: rtt.srtt(),
            rto: rtt.rto(),
            unacked_messages: self.send.len(),
            unacked_bytes: self.send.payload_bytes() + self.unsent_output.len(),
            reorder_buffered: self.recv.buffered_messages(),
            paused: self.is_paused(),
            open_streams: self.mux.as_ref().map_or(0, MuxClient::stream_count),
            next_send_sequence: self.send.next_sequence(),
            next_receive_sequence: self.recv.expected(),
            ..self.stats.clone()
        }
    }

    // --- internals ---

    fn require_mode(&self, wanted: ForwardingMode) -> Result<(), SessionError> {
        match self.state {
            State::Closed | State::Closing { .. } => return Err(SessionError::Closed),
            State::Open => {}
            _ => return Err(SessionError::NotOpen),
        }
        match self.info.as_ref().map(|i| i.mode) {
            Some(mode) if mode == wanted => Ok(()),
            Some(mode) => Err(SessionError::WrongMode { mode }),
            None => Err(SessionError::NotOpen),
        }
    }

    /// aws-ssm-bridge saw text frames whose whole body is a control word (docs/protocol.md §1.4).
    fn handle_text_control(&mut self, now: Instant, frame: &[u8]) -> bool {
        match frame.trim_ascii() {
            b"start_publication" => self.paused_since = None,
            b"pause_publication" => self.pause(now),
            b"channel_closed" => self.channel_closed(None),
            _ => return false,
        }
        true
    }

    fn pause(&mut self, now: Instant) {
        self.paused_since.get_or_insert(now);
    }

    fn channel_closed(&mut self, output: Option<String>) {
        let cause = if matches!(self.state, State::Closing { .. }) {
            CloseCause::LocalTerminate
        } else {
            CloseCause::ChannelClosed
        };
        self.close(cause, output);
    }

    fn close(&mut self, cause: CloseCause, output: Option<String>) {
        if matches!(self.state, State::Closed) {
            return;
        }
        if let Some(mux) = &mut self.mux {
            let mut closed = Vec::new();
            mux.close_all(&mut closed);
            self.push_mux_events(closed);
        }
        self.control.clear();
        self.events.push_back(Event::Closed { cause, output });
        self.state = State::Closed;
    }

    /// Buffers one `input_stream_data` message after all output written before it.
    fn push_sequenced(&mut self, now: Instant, payload_type: PayloadType, payload: Bytes) {
        self.cut_output(now, true);
        self.sequence(now, payload_type, payload);
    }

    /// Allocates a sequence number and buffers one `input_stream_data` message.
    fn sequence(&mut self, now: Instant, payload_type: PayloadType, payload: Bytes) {
        let payload = match (&mut self.cipher, payload_type) {
            (Some(cipher), PayloadType::Output) => Bytes::from(cipher.seal(&payload)),
            _ => payload,
        };
        let created = self.clock.epoch_ms(now);
        let id = self.ids.next();
        let len = payload.len();
        self.send.push(len, |seq| {
            ClientMessage {
                message_type: MessageType::InputStreamData,
                schema_version: message::SCHEMA_VERSION,
                created_date: created,
                sequence_number: seq,
                flags: 0,
                message_id: id,
                payload_type,
                payload,
            }
            .to_bytes()
        });
    }

    /// Accepts stream bytes; they become Output messages in [`Session::cut_output`].
    fn push_output(&mut self, bytes: &[u8]) {
        self.stats.bytes_sent += bytes.len() as u64;
        self.unsent_output.extend_from_slice(bytes);
    }

    /// Cuts unsent output into Output messages of at most `chunk_size`: one message, or with
    /// `all` every byte (before a flag or a response that must follow the data).
    fn cut_output(&mut self, now: Instant, all: bool) {
        while !self.unsent_output.is_empty() {
            let n = self.unsent_output.len().min(self.config.chunk_size.max(1));
            let payload = self.unsent_output.split_to(n).freeze();
            self.sequence(now, PayloadType::Output, payload);
            if !all {
                break;
            }
        }
    }
}
