//! The strict agent of one session (docs/protocol.md §9.1): the handshake with its version
//! gates and timeout, the reliability layer (acks, its own retransmission with the agent's RTO,
//! acceptance of client retransmissions, checks that the client acks everything and numbers
//! its stream correctly), basic and mux port forwarding, flags, timeouts and `channel_closed`.
//!
//! One tokio task per session. It outlives WebSocket connections, so that resumes continue the
//! sequence numbers, and it outlives the session's end until the last WebSocket of the session
//! has closed: every client frame that arrives is checked, whether on a connection a newer one
//! replaced, during the closing drain, or after `channel_closed` (as the real agent still parses
//! what reaches it). Once the session has begun to end, client data is checked but no longer
//! forwarded to the targets, and checks that depend on the session still running (a sequence
//! gap, a late HandshakeResponse) no longer apply.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{Config, Faults, Mode};
use crate::message::{
    self, AcknowledgeContent, ChannelClosed, ClientMessage, FLAG_FIN, FLAG_SYN, HandshakeComplete,
    HandshakeRequest, HandshakeResponse, MessageType, RequestedClientAction, flag, payload_type,
};
use crate::port::{
    self, InTransit, MuxPlumbing, PortEvent, StreamInput, TargetBacklog, ToTarget, TransportBuffer,
};
use crate::registry::{SessionInfo, Shared, lock};
use crate::report::{InjectedFaults, SessionReport, SessionStatus, Transfer};
use crate::smux;
use crate::version;

/// What the agent task receives.
#[derive(Debug)]
pub(crate) enum AgentInput {
    /// A client WebSocket passed the open message.
    Attach {
        conn_id: u32,
        outbound: UnboundedSender<ToClient>,
    },
    /// That WebSocket can carry nothing more to the client (it is closing or gone).
    Detach { conn_id: u32 },
    /// That WebSocket is closed: no more client frames will come from it.
    Closed { conn_id: u32 },
    /// A frame from the client.
    ClientFrame {
        conn_id: u32,
        data: Vec<u8>,
        text: bool,
    },
    /// The gateway lost a client `input_stream_data` frame on purpose (`drop_client_every`);
    /// `seq` is its sequence number when the frame had one.
    InputDropped { seq: Option<i64> },
    /// The TerminateSession API was called.
    Terminate,
    /// The gateway saw a violation; `close` ends the session whatever the strictness.
    GatewayViolation { reason: String, close: bool },
    /// Runtime fault injection on the current connection.
    Inject(Injection),
    /// From the port tasks.
    Port(PortEvent),
}

/// One-shot faults a test can trigger on a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// Close the WebSocket with 1000 "Bye".
    Recycle,
    /// Reset the TCP connection.
    Reset,
    /// Go silent in both directions.
    BlackHole,
}

/// What the agent asks the gateway connection to do.
#[derive(Debug)]
pub(crate) enum ToClient {
    /// A binary frame; `stream` marks `output_stream_data` (subject to transit faults). `room`
    /// is the first sending of target output: its room in the transport, given back once
    /// the gateway has written it.
    Frame {
        data: Vec<u8>,
        stream: bool,
        room: Option<InTransit>,
    },
    /// Close the WebSocket.
    Close { code: u16, reason: String },
    /// A connection fault now.
    Inject(Injection),
}

const TICK: Duration = Duration::from_millis(100);
const MAX_RTO: Duration = Duration::from_secs(1);
const REORDER_LIMIT: usize = 100_000;
/// Sent messages the agent keeps for retransmission (`OutgoingMessageBufferCapacity`); beyond
/// it a message is sent once and never again.
const OUTGOING_BUFFER_CAPACITY: usize = 100_000;
const SEEN_HEADERS: usize = 8192;
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// The agent's RTO estimator (§4.4).
#[derive(Debug, Clone)]
pub(crate) struct RtoEstimator {
    srtt_ms: f64,
    rttvar_ms: f64,
    rto: Duration,
}

impl Default for RtoEstimator {
    fn default() -> Self {
        Self {
            srtt_ms: 100.0,
            rttvar_ms: 0.0,
            rto: Duration::from_millis(200),
        }
    }
}

impl RtoEstimator {
    pub(crate) fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f64() * 1000.0;
        self.rttvar_ms = 0.75 * self.rttvar_ms + 0.25 * (self.srtt_ms - r).abs();
        self.srtt_ms = 0.875 * self.srtt_ms + 0.125 * r;
        let rto_ms = self.srtt_ms + (4.0 * self.rttvar_ms).max(10.0);
        self.rto = Duration::from_secs_f64(rto_ms / 1000.0).min(MAX_RTO);
    }

    pub(crate) fn rto(&self) -> Duration {
        self.rto
    }
}

struct Outgoing {
    seq: i64,
    id: Uuid,
    bytes: Vec<u8>,
    /// Target output bytes this message carries.
    output_len: usize,
    /// Its room in the transport until it is first sent.
    room: Option<InTransit>,
    last_sent: Option<Instant>,
    retransmits: u32,
    client_frames_mark: Option<u64>,
    reported: bool,
}

struct Buffered {
    message: ClientMessage,
    header: [u8; message::FRAME_HEADER_SIZE],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    NotStarted,
    Awaiting { since: Instant },
    Complete,
    Skipped,
}

enum Processed {
    Done,
    NotReady,
}

/// The session is ending but waits (at most [`DRAIN_LIMIT`]) for the client to ack its output.
struct Drain {
    deadline: Instant,
    status: SessionStatus,
    reason: String,
}

enum BasicState {
    Idle,
    Dialing,
    Up { writer: UnboundedSender<ToTarget> },
}

struct BasicPort {
    generation: u64,
    state: BasicState,
    task: Option<JoinHandle<()>>,
}

struct MuxStream {
    /// The client's bytes and FIN, for the stream's task.
    input: UnboundedSender<StreamInput>,
    /// The dial-and-copy task; none when there was no target to dial.
    task: Option<JoinHandle<()>>,
}

/// The forwarding side of mux mode (what the checks see is in [`SmuxLedger`]).
struct MuxPort {
    /// The smux server is set up: until then, as in the agent (which sets it up only after the
    /// handshake, in tasks of its own), client data and flags are not acknowledged.
    ready: bool,
    plumbing: MuxPlumbing,
    streams: HashMap<u32, MuxStream>,
    keepalive: bool,
    last_rx: Instant,
    last_nop: Instant,
}

enum PortState {
    None,
    Basic(BasicPort),
    Mux(MuxPort),
}

/// The client's smux byte stream as the strict checks see it. Kept after the session has
/// ended, so that the last frames are checked too.
#[derive(Default)]
struct SmuxLedger {
    decoder: smux::Decoder,
    /// Opened by the client and not yet closed by either side.
    open: HashSet<u32>,
    /// Closed by either side; their ids may not be used again.
    closed: HashSet<u32>,
}

impl SmuxLedger {
    /// Closes `id`; false when it was not open.
    fn close(&mut self, id: u32) -> bool {
        let was_open = self.open.remove(&id);
        if was_open {
            self.closed.insert(id);
        }
        was_open
    }
}

/// What to do with client Output in basic or mux mode.
enum Delivery {
    /// Written to the basic connection.
    Written,
    /// For the smux streams.
    Mux,
    /// The port is not up: not acked, the client retransmits.
    NotReady,
    /// The basic connection was closed by Flag 1: dial again, then take the retransmission.
    Redial,
}

/// What the agent's smux server takes from the client before it stops reading (xtaci's
/// `MaxReceiveBuffer`, 4 MiB by default), while its streams' targets do not read.
const MUX_RECEIVE_BUFFER: usize = 4 * 1024 * 1024;
/// What the emulator queues for a basic-mode target beyond the socket's own buffers before its
/// receive path stops, as the agent's blocking socket write does.
const BASIC_WRITE_BUFFER: usize = 64 * 1024;

/// A client frame the receive path has not read yet.
struct HeldFrame {
    conn_id: u32,
    data: Vec<u8>,
    text: bool,
}

/// The agent of one session.
pub(crate) struct Agent {
    shared: Arc<Shared>,
    info: Arc<SessionInfo>,
    report: Arc<Mutex<SessionReport>>,
    faults: Faults,
    mode: Mode,
    strict: bool,
    inbox: UnboundedSender<AgentInput>,
    // Connections.
    /// The connection output goes to.
    conn_id: Option<u32>,
    /// The newest connection attached; older ones have been replaced.
    latest_conn: Option<u32>,
    /// Connections that may still deliver client frames.
    connections: HashSet<u32>,
    outbound: Option<UnboundedSender<ToClient>>,
    detached_since: Option<Instant>,
    // Sending.
    next_seq: i64,
    unacked: VecDeque<Outgoing>,
    unsent: usize,
    transport: TransportBuffer,
    /// Target output in `unacked`.
    unacked_output_bytes: usize,
    rto: RtoEstimator,
    /// The outgoing buffer overflowed once (reported once).
    outgoing_full_reported: bool,
    // Receiving.
    expected_seq: i64,
    reorder: BTreeMap<i64, Buffered>,
    seen: VecDeque<[u8; message::FRAME_HEADER_SIZE]>,
    seen_base: i64,
    gap_since: Option<Instant>,
    gap_reported: bool,
    client_frames: u64,
    in_order_accepted: u64,
    /// Sequence numbers of client messages the gateway lost on purpose.
    lost_input: HashSet<i64>,
    /// Client bytes not yet written to the targets.
    target_backlog: TargetBacklog,
    /// Client frames not read yet: the receive path stalls while the targets do not take
    /// what it gave them ([`Agent::receive_stalled`]).
    held: VecDeque<HeldFrame>,
    // Session.
    handshake: Handshake,
    /// The HandshakeResponse's ack goes out before HandshakeComplete (else after it).
    handshake_ack_first: bool,
    transfer: Option<Transfer>,
    port: PortState,
    smux: Option<SmuxLedger>,
    last_activity: Instant,
    ending: Option<Drain>,
    /// The status the session ended with, once `channel_closed` went out.
    finished: Option<SessionStatus>,
}

impl Agent {
    pub(crate) fn new(
        shared: Arc<Shared>,
        info: Arc<SessionInfo>,
        report: Arc<Mutex<SessionReport>>,
        inbox: UnboundedSender<AgentInput>,
    ) -> Self {
        let now = Instant::now();
        let config: &Config = &shared.config;
        Self {
            handshake_ack_first: config.handshake_ack.ack_first(&info.id),
            faults: info.faults.clone(),
            mode: config.mode,
            strict: config.strict,
            transport: TransportBuffer::new(config.gateway_buffer_bytes),
            shared: shared.clone(),
            info,
            report,
            inbox,
            conn_id: None,
            latest_conn: None,
            connections: HashSet::new(),
            outbound: None,
            detached_since: Some(now),
            next_seq: 0,
            unacked: VecDeque::new(),
            unsent: 0,
            unacked_output_bytes: 0,
            rto: RtoEstimator::default(),
            outgoing_full_reported: false,
            expected_seq: 0,
            reorder: BTreeMap::new(),
            seen: VecDeque::new(),
            seen_base: 0,
            gap_since: None,
            gap_reported: false,
            client_frames: 0,
            in_order_accepted: 0,
            lost_input: HashSet::new(),
            target_backlog: TargetBacklog::default(),
            held: VecDeque::new(),
            handshake: Handshake::NotStarted,
            transfer: None,
            port: PortState::None,
            smux: None,
            last_activity: now,
            ending: None,
            finished: None,
        }
    }

    /// Runs the agent until the session is over: finished, and every WebSocket of it closed
    /// (so that every frame it delivered has been checked). Then marks the session ended.
    pub(crate) async fn run(mut self, mut inbox: UnboundedReceiver<AgentInput>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.is_over() {
            let backlog = self.target_backlog.clone();
            tokio::select! {
                input = inbox.recv() => match input {
                    Some(i) => self.handle(i),
                    None => break,
                },
                _ = tick.tick(), if self.finished.is_none() => self.on_tick(Instant::now()),
                () = backlog.drained(), if !self.held.is_empty() => {}
            }
            self.release_held();
        }
        if self.finished.is_none() {
            self.finish(SessionStatus::Terminated, "emulator shut down".to_owned());
        }
        let status = self.finished.unwrap_or(SessionStatus::Terminated);
        self.shared.mark_ended(&self.info.id, status);
    }

    /// Finished, and no connection can deliver another client frame.
    fn is_over(&self) -> bool {
        self.finished.is_some() && self.connections.is_empty() && self.held.is_empty()
    }

    /// The agent's receive path is blocked: it processes client frames synchronously and
    /// writes their bytes towards the targets, and stops reading the WebSocket altogether
    /// (acks included) while they do not take them: in mux mode once its smux receive buffer
    /// is full, in basic mode once its socket write blocks. Never once the session is over:
    /// then frames are only checked.
    fn receive_stalled(&self) -> bool {
        let limit = match &self.port {
            _ if self.finished.is_some() => return false,
            PortState::Mux(_) => MUX_RECEIVE_BUFFER,
            PortState::Basic(_) => BASIC_WRITE_BUFFER,
            PortState::None => return false,
        };
        self.target_backlog.bytes() > limit
    }

    /// A client frame, read now or held while the receive path is stalled.
    fn receive(&mut self, conn_id: u32, data: Vec<u8>, text: bool) {
        if self.held.is_empty() && !self.receive_stalled() {
            self.on_client_frame(conn_id, &data, text);
            return;
        }
        let stall_begins = self.held.is_empty();
        self.held.push_back(HeldFrame {
            conn_id,
            data,
            text,
        });
        let mut report = lock(&self.report);
        report.receive_stalls += u64::from(stall_begins);
        report.peak_held_frames = report.peak_held_frames.max(self.held.len() as u64);
    }

    /// Reads the held frames, in order, while the receive path can take them.
    fn release_held(&mut self) {
        while !self.receive_stalled() {
            let Some(f) = self.held.pop_front() else {
                return;
            };
            self.on_client_frame(f.conn_id, &f.data, f.text);
        }
    }

    /// The session has begun to end (draining) or has ended.
    fn is_closing(&self) -> bool {
        self.finished.is_some() || self.ending.is_some()
    }

    fn handle(&mut self, input: AgentInput) {
        match input {
            AgentInput::Attach { conn_id, outbound } => self.on_attach(conn_id, outbound),
            AgentInput::Detach { conn_id } => self.on_detach(conn_id),
            AgentInput::Closed { conn_id } => {
                self.connections.remove(&conn_id);
            }
            AgentInput::ClientFrame {
                conn_id,
                data,
                text,
            } => self.receive(conn_id, data, text),
            AgentInput::InputDropped { seq } => {
                self.count(|f| f.input_dropped += 1);
                if let Some(seq) = seq {
                    self.lost_input.insert(seq);
                }
            }
            AgentInput::Terminate => self.end(
                SessionStatus::Terminated,
                "TerminateSession called".to_owned(),
                false,
            ),
            AgentInput::GatewayViolation { reason, close } => {
                if close {
                    self.shared.record_violation(Some(&self.info.id), &reason);
                    self.end(SessionStatus::Failed, reason, false);
                } else {
                    self.violation(reason);
                }
            }
            AgentInput::Inject(i) => {
                self.to_client(ToClient::Inject(i));
            }
            AgentInput::Port(event) => self.on_port_event(event),
        }
    }

    /// Counts an injected fault in the report.
    fn count(&self, fault: impl FnOnce(&mut InjectedFaults)) {
        fault(&mut lock(&self.report).injected);
    }

    // === impl Agent: connection ===

    fn on_attach(&mut self, conn_id: u32, outbound: UnboundedSender<ToClient>) {
        self.connections.insert(conn_id);
        self.latest_conn = Some(self.latest_conn.map_or(conn_id, |l| l.max(conn_id)));
        lock(&self.report).connections += 1;
        if self.finished.is_some() {
            // Opened just as the session ended: close it (its frames are still checked).
            let _ = outbound.send(ToClient::Close {
                code: 1000,
                reason: String::new(),
            });
            return;
        }
        self.conn_id = Some(conn_id);
        self.outbound = Some(outbound);
        self.detached_since = None;
        lock(&self.report).status = SessionStatus::Connected;
        // What went out on the old connection may never have reached the client (a black hole
        // swallows it), so its unacknowledged output is judged afresh on the new one.
        for out in &mut self.unacked {
            out.retransmits = 0;
            out.client_frames_mark = None;
        }
        if self.handshake == Handshake::NotStarted {
            self.start_handshake();
        }
        self.flush_unsent();
    }

    fn on_detach(&mut self, conn_id: u32) {
        if self.conn_id != Some(conn_id) {
            return;
        }
        self.conn_id = None;
        self.outbound = None;
        self.detached_since = Some(Instant::now());
        if !self.is_closing() {
            lock(&self.report).status = SessionStatus::Disconnected;
        }
    }

    /// Hands `item` to the current connection; false when there is none.
    fn to_client(&self, item: ToClient) -> bool {
        self.outbound.as_ref().is_some_and(|o| o.send(item).is_ok())
    }

    fn send_control(&self, message: &ClientMessage) -> bool {
        self.to_client(ToClient::Frame {
            data: message.encode(),
            stream: false,
            room: None,
        })
    }

    fn set_transfer(&mut self, transfer: Transfer) {
        self.transfer = Some(transfer);
        lock(&self.report).transfer = Some(transfer);
    }

    fn start_handshake(&mut self) {
        if self.faults.start_publication_first
            && self.send_control(&ClientMessage::new(
                MessageType::StartPublication,
                0,
                FLAG_SYN | FLAG_FIN,
                payload_type::UNSET,
                Vec::new(),
            ))
        {
            self.count(|f| f.early_start_publications += 1);
        }
        if self.faults.legacy_no_handshake {
            self.handshake = Handshake::Skipped;
            self.count(|f| f.handshakes_skipped += 1);
            self.set_transfer(Transfer::Basic);
            self.last_activity = Instant::now();
            self.start_basic();
            return;
        }
        let request = HandshakeRequest {
            agent_version: self.info.instance.agent_version.clone(),
            requested_client_actions: vec![RequestedClientAction {
                action_type: "SessionType".to_owned(),
                action_parameters: serde_json::json!({
                    "SessionType": "Port",
                    "Properties": self.info.properties.json,
                }),
            }],
        };
        self.send_stream(
            payload_type::HANDSHAKE_REQUEST,
            serde_json::to_vec(&request).unwrap_or_default(),
            None,
        );
        self.handshake = Handshake::Awaiting {
            since: Instant::now(),
        };
    }

    // === impl Agent: sending ===

    /// Sends one `output_stream_data` and keeps it for retransmission. Target output carries
    /// its `room` in the transport.
    fn send_stream(&mut self, payload_type: u32, payload: Vec<u8>, room: Option<InTransit>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let flags = if seq == 0 { FLAG_SYN } else { 0 };
        let mut output_len = 0;
        if payload_type == payload_type::OUTPUT {
            output_len = payload.len();
            self.last_activity = Instant::now();
            lock(&self.report).bytes_to_client += payload.len() as u64;
        }
        let m = ClientMessage::new(
            MessageType::OutputStreamData,
            seq,
            flags,
            payload_type,
            payload,
        );
        lock(&self.report).messages_to_client += 1;
        if self.unacked.len() >= OUTGOING_BUFFER_CAPACITY {
            // The agent sends it once and keeps it no more: if the client lost it, it is lost.
            if !self.outgoing_full_reported {
                self.outgoing_full_reported = true;
                self.violation(format!(
                    "the client left {OUTGOING_BUFFER_CAPACITY} messages unacknowledged: the agent keeps no more for retransmission"
                ));
            }
            if let Some(out) = &self.outbound {
                let _ = out.send(ToClient::Frame {
                    data: m.encode(),
                    stream: true,
                    room,
                });
            }
            return;
        }
        self.unacked_output_bytes += output_len;
        {
            let mut r = lock(&self.report);
            r.peak_unacked_output_bytes = r
                .peak_unacked_output_bytes
                .max(self.unacked_output_bytes as u64);
        }
        self.unacked.push_back(Outgoing {
            seq,
            id: m.message_id,
            bytes: m.encode(),
            output_len,
            room,
            last_sent: None,
            retransmits: 0,
            client_frames_mark: None,
            reported: false,
        });
        self.unsent += 1;
        self.flush_unsent();
    }

    fn flush_unsent(&mut self) {
        let Some(out) = &self.outbound else { return };
        let now = Instant::now();
        let start = self.unacked.len() - self.unsent;
        for o in self.unacked.iter_mut().skip(start) {
            let _ = out.send(ToClient::Frame {
                data: o.bytes.clone(),
                stream: true,
                room: o.room.take(),
            });
            o.last_sent = Some(now);
        }
        self.unsent = 0;
    }

    fn ack(&self, m: &ClientMessage) {
        let ack = ClientMessage::acknowledge(&m.message_type, m.message_id, m.sequence_number);
        if self.send_control(&ack) {
            lock(&self.report).acks_to_client += 1;
        }
    }

    // === impl Agent: receiving ===

    fn on_client_frame(&mut self, conn_id: u32, data: &[u8], text: bool) {
        self.client_frames += 1;
        {
            let mut r = lock(&self.report);
            if self.is_closing() {
                r.client_frames_after_end += 1;
            }
            if self.latest_conn.is_some_and(|latest| conn_id < latest) {
                r.client_frames_on_replaced_connections += 1;
            }
        }
        if text {
            self.violation("text WebSocket frame after the open message".to_owned());
        }
        let frame = match message::decode(data) {
            Ok(f) => f,
            Err(e) => {
                self.violation(format!("undecodable client frame: {e}"));
                return;
            }
        };
        for issue in frame.strict_issues() {
            self.violation(issue);
        }
        if !frame.digest_valid() {
            // Not acked: the client must retransmit.
            return;
        }
        match frame.message.message_type {
            MessageType::InputStreamData => self.on_input(&frame.message, data),
            MessageType::Acknowledge => self.on_ack(&frame.message),
            ref other => {
                self.violation(format!("client sent a {} message", other.as_str()));
            }
        }
    }

    fn on_ack(&mut self, m: &ClientMessage) {
        lock(&self.report).acks_from_client += 1;
        let content: AcknowledgeContent = match serde_json::from_slice(&m.payload) {
            Ok(c) => c,
            Err(e) => {
                self.violation(format!("acknowledge payload is not the §4.2 JSON: {e}"));
                return;
            }
        };
        if m.payload_type != payload_type::UNSET {
            self.violation(format!("acknowledge with PayloadType {}", m.payload_type));
        }
        if content.acknowledged_message_type != MessageType::OutputStreamData.as_str() {
            self.violation(format!(
                "acknowledge for message type {:?}",
                content.acknowledged_message_type
            ));
            return;
        }
        if !content.is_sequential_message {
            self.violation("acknowledge with IsSequentialMessage false".to_owned());
        }
        let seq = content.acknowledged_message_sequence_number;
        let sent = self.unacked.len() - self.unsent;
        match self.unacked.iter().take(sent).position(|o| o.seq == seq) {
            Some(i) => {
                let Some(o) = self.unacked.remove(i) else {
                    return;
                };
                if i > 0 {
                    lock(&self.report).out_of_order_acks_from_client += 1;
                }
                self.unacked_output_bytes -= o.output_len;
                if o.id.hyphenated().to_string() != content.acknowledged_message_id {
                    self.violation(format!(
                        "acknowledge for seq {seq} names message id {}, sent as {}",
                        content.acknowledged_message_id,
                        o.id.hyphenated()
                    ));
                }
                if let Some(t) = o.last_sent {
                    self.rto.sample(t.elapsed());
                }
            }
            None if seq >= self.next_seq
                || seq < 0
                || self.unacked.iter().skip(sent).any(|o| o.seq == seq) =>
            {
                self.violation(format!(
                    "acknowledge for seq {seq}, which the agent never sent"
                ));
            }
            None => lock(&self.report).repeated_acks_from_client += 1,
        }
        self.finish_drain_if_acknowledged();
    }

    fn remember(&mut self, header: [u8; message::FRAME_HEADER_SIZE]) {
        self.seen.push_back(header);
        if self.seen.len() > SEEN_HEADERS {
            self.seen.pop_front();
            self.seen_base += 1;
        }
    }

    fn check_identical(&mut self, seq: i64, header: &[u8; message::FRAME_HEADER_SIZE]) {
        let known = if seq >= self.seen_base {
            self.seen.get((seq - self.seen_base) as usize).copied()
        } else {
            None
        };
        let known = known.or_else(|| self.reorder.get(&seq).map(|b| b.header));
        if let Some(k) = known
            && &k != header
        {
            self.violation(format!(
                "client sent a different message under already-used seq {seq} (retransmissions must be byte-identical)"
            ));
        }
    }

    fn on_input(&mut self, m: &ClientMessage, raw: &[u8]) {
        let seq = m.sequence_number;
        lock(&self.report).messages_from_client += 1;
        let mut header = [0u8; message::FRAME_HEADER_SIZE];
        let n = raw.len().min(message::FRAME_HEADER_SIZE);
        header[..n].copy_from_slice(&raw[..n]);
        if seq < 0 {
            self.violation(format!("negative sequence number {seq}"));
            return;
        }
        if self.lost_input.remove(&seq) {
            lock(&self.report).lost_input_resent += 1;
        }
        if seq < self.expected_seq || self.reorder.contains_key(&seq) {
            lock(&self.report).duplicates_from_client += 1;
            self.check_identical(seq, &header);
            self.ack(m); // the agent re-acks duplicates
            return;
        }
        if seq > self.expected_seq {
            if self.reorder.len() >= REORDER_LIMIT {
                return; // dropped without an ack, like the agent
            }
            self.reorder.insert(
                seq,
                Buffered {
                    message: m.clone(),
                    header,
                },
            );
            self.ack(m);
            if self.gap_since.is_none() {
                self.gap_since = Some(Instant::now());
            }
            return;
        }
        // The real agent acks a HandshakeResponse on its receive path after handing it to its
        // handshake task, which sends HandshakeComplete: the two race for the WebSocket, and
        // either may go first (`Config::handshake_ack`). (The official plugin's mux session
        // crashes its reader on a message that arrives between HandshakeComplete and its mux
        // setup, such as the ack coming second.) It is never withheld.
        let handshake_response = m.payload_type == payload_type::HANDSHAKE_RESPONSE;
        let acked_early = handshake_response && self.handshake_ack_first;
        if acked_early {
            self.ack(m);
        }
        match self.process(m) {
            Processed::NotReady => {}
            Processed::Done => {
                self.in_order_accepted += 1;
                let withhold = !handshake_response
                    && self.faults.withhold_ack_every.is_some_and(|n| {
                        n > 0 && self.in_order_accepted.is_multiple_of(u64::from(n))
                    });
                if !acked_early {
                    if withhold {
                        self.count(|f| f.acks_withheld += 1);
                    } else {
                        self.ack(m);
                    }
                }
                self.remember(header);
                self.expected_seq += 1;
                self.gap_since = None;
                self.drain_reorder();
            }
        }
    }

    fn drain_reorder(&mut self) {
        let before = self.expected_seq;
        while let Some(b) = self.reorder.remove(&self.expected_seq) {
            match self.process(&b.message) {
                Processed::NotReady => {
                    self.reorder.insert(self.expected_seq, b);
                    break;
                }
                Processed::Done => {
                    self.remember(b.header);
                    self.expected_seq += 1;
                }
            }
        }
        if self.reorder.is_empty() {
            self.gap_since = None;
        } else if self.expected_seq != before || self.gap_since.is_none() {
            self.gap_since = Some(Instant::now());
        }
    }

    /// Whether the agent's port session takes messages (its `IsConnectionAvailable`): the basic
    /// connection has been dialled once, or the mux is set up.
    fn port_available(&self) -> bool {
        match &self.port {
            PortState::None => false,
            PortState::Basic(b) => !matches!(b.state, BasicState::Dialing),
            PortState::Mux(mx) => mx.ready,
        }
    }

    fn handshake_done(&self) -> bool {
        matches!(self.handshake, Handshake::Complete | Handshake::Skipped)
    }

    fn process(&mut self, m: &ClientMessage) -> Processed {
        match m.payload_type {
            payload_type::HANDSHAKE_RESPONSE => {
                self.on_handshake_response(&m.payload);
                Processed::Done
            }
            payload_type::OUTPUT => {
                if !self.handshake_done() {
                    self.violation(format!(
                        "Output (seq {}) before HandshakeComplete; the agent discards it",
                        m.sequence_number
                    ));
                    return Processed::Done;
                }
                self.on_output(&m.payload)
            }
            payload_type::FLAG => {
                if !self.handshake_done() {
                    // The agent acknowledges it and drops it unread.
                    self.violation(format!(
                        "Flag (seq {}) before HandshakeComplete; the agent drops it",
                        m.sequence_number
                    ));
                    return Processed::Done;
                }
                if !self.port_available() {
                    return Processed::NotReady;
                }
                self.on_flag(&m.payload);
                Processed::Done
            }
            other => {
                let name = match other {
                    payload_type::SIZE => "Size (terminal size) in a Port session",
                    payload_type::ENC_CHALLENGE_RESPONSE => {
                        "EncChallengeResponse in a session without KMS"
                    }
                    _ => "an unexpected PayloadType",
                };
                self.violation(format!(
                    "client sent {name} (PayloadType {other}) as seq {}",
                    m.sequence_number
                ));
                Processed::Done
            }
        }
    }

    fn on_handshake_response(&mut self, payload: &[u8]) {
        let Handshake::Awaiting { since } = self.handshake else {
            self.violation("HandshakeResponse outside the handshake".to_owned());
            return;
        };
        let response: HandshakeResponse = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                self.violation(format!("HandshakeResponse is not valid JSON: {e}"));
                self.end(
                    SessionStatus::Failed,
                    "invalid HandshakeResponse".to_owned(),
                    false,
                );
                return;
            }
        };
        if version::parse(&response.client_version).is_none() {
            self.violation(format!(
                "ClientVersion {:?} is not a dotted version",
                response.client_version
            ));
        }
        let actions = &response.processed_client_actions;
        if actions.len() != 1 || actions[0].action_type != "SessionType" {
            let got: Vec<&str> = actions.iter().map(|a| a.action_type.as_str()).collect();
            self.violation(format!(
                "HandshakeResponse must process exactly [SessionType], got {got:?}"
            ));
        }
        if self.is_closing() {
            // Failed by a violation above, or a late answer to a session that already ended.
            return;
        }
        if let Some(bad) = actions.iter().find(|a| a.action_status != 1) {
            let reason = format!(
                "client reported ActionStatus {} for {}: {}",
                bad.action_status,
                bad.action_type,
                bad.error.clone().unwrap_or_default()
            );
            self.end(SessionStatus::Failed, reason, false);
            return;
        }
        let client_version = response.client_version;
        let agent_version = self.info.instance.agent_version.clone();
        let mux = version::agent_uses_mux(
            &agent_version,
            &client_version,
            self.info.properties.local_port_forwarding,
        );
        let keepalive = mux && version::agent_smux_keepalive(&agent_version, &client_version);
        self.set_transfer(if mux { Transfer::Mux } else { Transfer::Basic });
        {
            let mut r = lock(&self.report);
            r.client_version = Some(client_version);
            r.smux_keepalive = keepalive;
            r.handshake_ack_first = self.handshake_ack_first;
        }
        let complete = HandshakeComplete {
            handshake_time_to_complete: since.elapsed().as_nanos() as i64,
            customer_message: String::new(),
        };
        self.send_stream(
            payload_type::HANDSHAKE_COMPLETE,
            serde_json::to_vec(&complete).unwrap_or_default(),
            None,
        );
        self.handshake = Handshake::Complete;
        self.last_activity = Instant::now();
        self.after_handshake_faults();
        if mux {
            self.start_mux(keepalive);
        } else {
            self.start_basic();
        }
    }

    fn after_handshake_faults(&mut self) {
        if self.faults.lasting_pause {
            let pause = ClientMessage::new(
                MessageType::PausePublication,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                Vec::new(),
            );
            if self.send_control(&pause) {
                self.count(|f| f.lasting_pauses += 1);
            }
        }
        if self.faults.garbage_publication {
            let pause = ClientMessage::new(
                MessageType::PausePublication,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                Vec::new(),
            );
            let mut bytes = pause.encode();
            // Garbage digest and a little-endian "length", as GIM observed.
            for b in &mut bytes[80..112] {
                *b = 0xA5;
            }
            bytes[116..120].copy_from_slice(&120u32.to_le_bytes());
            if self.to_client(ToClient::Frame {
                data: bytes,
                stream: false,
                room: None,
            }) {
                self.count(|f| f.garbage_publications += 1);
            }
            let start = ClientMessage::new(
                MessageType::StartPublication,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                Vec::new(),
            );
            self.send_control(&start);
        }
        if self.faults.extra_message_types {
            let state = serde_json::json!({
                "SchemaVersion": 1, "SessionState": "Connected", "SessionId": self.info.id,
            });
            let extra = [
                ClientMessage::new(
                    MessageType::AgentSessionState,
                    0,
                    FLAG_SYN | FLAG_FIN,
                    0,
                    serde_json::to_vec(&state).unwrap_or_default(),
                ),
                ClientMessage::new(
                    MessageType::Other("future_message_type".to_owned()),
                    0,
                    0,
                    99,
                    b"ignore me".to_vec(),
                ),
            ];
            for m in &extra {
                if self.send_control(m) {
                    self.count(|f| f.extra_messages += 1);
                }
            }
        }
    }

    fn on_flag(&mut self, payload: &[u8]) {
        let Some(value) = message::parse_flag(payload) else {
            self.violation(format!(
                "Flag payload of {} bytes, expected 4",
                payload.len()
            ));
            return;
        };
        match value {
            flag::DISCONNECT_TO_PORT => {
                if self.transfer != Some(Transfer::Basic) {
                    self.violation("DisconnectToPort flag outside basic mode".to_owned());
                    return;
                }
                if self.is_closing() {
                    return;
                }
                if !self.info.properties.local_port_forwarding {
                    // An SSH session's agent closes the connection, its read fails, and the
                    // session fails: there is no reconnecting.
                    self.end(
                        SessionStatus::Failed,
                        "the client disconnected the port of an SSH session (DisconnectToPort)"
                            .to_owned(),
                        true,
                    );
                    return;
                }
                if let PortState::Basic(b) = &mut self.port {
                    if let Some(t) = b.task.take() {
                        t.abort();
                    }
                    b.state = BasicState::Idle;
                }
            }
            flag::TERMINATE_SESSION => {
                if self.faults.ignore_terminate_flag {
                    self.count(|f| f.terminate_flags_ignored += 1);
                    return;
                }
                if !version::agent_supports_terminate_flag(&self.info.instance.agent_version) {
                    self.violation(format!(
                        "TerminateSession flag sent to agent {} (needs > 2.3.722.0)",
                        self.info.instance.agent_version
                    ));
                }
                if !self.is_closing() {
                    self.end(
                        SessionStatus::Terminated,
                        "client sent the TerminateSession flag".to_owned(),
                        false,
                    );
                }
            }
            other => self.violation(format!("client sent Flag {other}")),
        }
    }

    // === impl Agent: ports ===

    fn target(&self) -> Option<std::net::SocketAddr> {
        let p = &self.info.properties;
        self.info.instance.resolve(p.host.as_deref(), p.port)
    }

    fn start_basic(&mut self) {
        self.port = PortState::Basic(BasicPort {
            generation: 0,
            state: BasicState::Idle,
            task: None,
        });
        self.dial_basic();
    }

    /// Dials the basic connection again (a new generation: events of older ones are stale).
    fn dial_basic(&mut self) {
        let target = self.target();
        let PortState::Basic(b) = &mut self.port else {
            return;
        };
        b.generation += 1;
        b.state = BasicState::Dialing;
        match target {
            Some(addr) => {
                b.task = Some(port::spawn_basic(
                    addr,
                    b.generation,
                    self.mode,
                    self.transport.clone(),
                    self.inbox.clone(),
                ));
            }
            None => {
                let _ = self
                    .inbox
                    .send(AgentInput::Port(PortEvent::BasicDialFailed {
                        generation: b.generation,
                        error: "connection refused (no target configured for this port)".to_owned(),
                    }));
            }
        }
    }

    fn start_mux(&mut self, keepalive: bool) {
        let now = Instant::now();
        self.port = PortState::Mux(MuxPort {
            ready: false,
            plumbing: MuxPlumbing::spawn(self.mode, self.transport.clone(), self.inbox.clone()),
            streams: HashMap::new(),
            keepalive,
            last_rx: now,
            last_nop: now,
        });
        self.smux = Some(SmuxLedger::default());
    }

    /// Client Output after the handshake: forwarded while the session runs, only checked once
    /// it has begun to end.
    fn on_output(&mut self, data: &[u8]) -> Processed {
        if self.is_closing() {
            self.on_smux_bytes(data);
            return Processed::Done;
        }
        let delivery = match &mut self.port {
            PortState::None => Delivery::NotReady,
            PortState::Basic(b) => match &b.state {
                BasicState::Up { writer } => {
                    let _ = writer.send(self.target_backlog.hold(data.to_vec()));
                    Delivery::Written
                }
                BasicState::Dialing => Delivery::NotReady,
                BasicState::Idle => Delivery::Redial,
            },
            PortState::Mux(mx) if !mx.ready => Delivery::NotReady,
            PortState::Mux(mx) => {
                mx.last_rx = Instant::now();
                Delivery::Mux
            }
        };
        match delivery {
            Delivery::NotReady => return Processed::NotReady,
            Delivery::Redial => {
                self.dial_basic();
                return Processed::NotReady;
            }
            Delivery::Mux => self.on_smux_bytes(data),
            Delivery::Written => {}
        }
        self.last_activity = Instant::now();
        let backlog = self.target_backlog.bytes() as u64;
        let mut report = lock(&self.report);
        report.bytes_from_client += data.len() as u64;
        report.peak_target_backlog_bytes = report.peak_target_backlog_bytes.max(backlog);
        Processed::Done
    }

    /// Feeds the client's smux byte stream (mux mode only) to the checks and the streams.
    fn on_smux_bytes(&mut self, data: &[u8]) {
        let Some(ledger) = &mut self.smux else {
            return;
        };
        let frames = match ledger.decoder.push(data) {
            Ok(frames) => frames,
            Err(e) => {
                // The whole smux session is dead (xtaci semantics); nothing more is decoded.
                self.smux = None;
                self.violation(format!("fatal smux error: {e}"));
                self.end(
                    SessionStatus::Failed,
                    format!("smux session died: {e}"),
                    false,
                );
                return;
            }
        };
        for f in frames {
            self.on_smux_frame(f);
        }
    }

    fn on_smux_frame(&mut self, f: smux::Frame) {
        let sid = f.stream_id;
        let Some(ledger) = &mut self.smux else {
            return;
        };
        match f.command {
            smux::Command::Nop => {}
            // Read and ignored by the agent's smux (version 1): the client expects a window
            // that no one keeps.
            smux::Command::Upd => self.violation(format!(
                "smux UPD for stream {sid}: a version 2 window update in a version 1 session"
            )),
            smux::Command::Syn => {
                if sid == 0 || sid.is_multiple_of(2) {
                    self.violation(format!(
                        "smux SYN with stream id {sid} (client ids are odd)"
                    ));
                    return;
                }
                if ledger.open.contains(&sid) || ledger.closed.contains(&sid) {
                    self.violation(format!("smux stream id {sid} reused"));
                    return;
                }
                ledger.open.insert(sid);
                lock(&self.report).smux_streams_opened += 1;
                self.open_mux_stream(sid);
            }
            smux::Command::Psh => {
                if ledger.open.contains(&sid) {
                    self.write_mux_stream(sid, f.data);
                } else if !ledger.closed.contains(&sid) {
                    self.violation(format!("smux PSH for stream {sid}, which was never opened"));
                }
            }
            smux::Command::Fin => {
                if ledger.close(sid) {
                    lock(&self.report).smux_streams_closed_by_client += 1;
                    self.close_mux_stream(sid);
                }
            }
        }
    }

    /// Dials the target for a new smux stream (while the session runs).
    fn open_mux_stream(&mut self, sid: u32) {
        if self.is_closing() {
            return;
        }
        let target = self.target();
        let PortState::Mux(mx) = &mut self.port else {
            return;
        };
        let (input, input_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = match target {
            Some(addr) => Some(port::spawn_mux_stream(
                addr,
                sid,
                &mx.plumbing,
                input_rx,
                self.inbox.clone(),
            )),
            None => {
                let _ = self.inbox.send(AgentInput::Port(PortEvent::MuxDialFailed {
                    stream_id: sid,
                    error: "no target configured for this port".to_owned(),
                }));
                None
            }
        };
        mx.streams.insert(sid, MuxStream { input, task });
    }

    fn write_mux_stream(&mut self, sid: u32, data: Vec<u8>) {
        if self.is_closing() {
            return;
        }
        if let PortState::Mux(mx) = &mut self.port
            && let Some(s) = mx.streams.get_mut(&sid)
        {
            let _ = s
                .input
                .send(StreamInput::Data(self.target_backlog.hold(data)));
        }
    }

    /// The client's FIN: the stream's task writes what came before it to the target (after its
    /// dial, when that is still under way), closes the connection, and sends the stream's FIN
    /// after its last data.
    fn close_mux_stream(&mut self, sid: u32) {
        if let PortState::Mux(mx) = &mut self.port
            && let Some(s) = mx.streams.get(&sid)
        {
            let _ = s.input.send(StreamInput::Fin);
        }
    }

    /// A stream whose dial failed: forgotten, and its FIN sent (it never carried data).
    fn fail_mux_stream(&mut self, sid: u32) {
        if let PortState::Mux(mx) = &mut self.port
            && mx.streams.remove(&sid).is_some()
        {
            let fin = smux::Frame::control(smux::Command::Fin, sid).encode();
            let _ = mx.plumbing.control.send(fin);
        }
    }

    /// The basic connection of `generation`, when it is the current one.
    fn basic_port(&mut self, generation: u64) -> Option<&mut BasicPort> {
        match &mut self.port {
            PortState::Basic(b) if b.generation == generation => Some(b),
            _ => None,
        }
    }

    fn on_port_event(&mut self, event: PortEvent) {
        if self.is_closing() {
            // The targets no longer matter (what they read gives its room back as it drops).
            return;
        }
        match event {
            PortEvent::BasicUp { generation, writer } => {
                // Like the agent, early messages wait for the next in-order arrival (the
                // client's retransmission of what was not acknowledged meanwhile).
                if let Some(b) = self.basic_port(generation) {
                    b.state = BasicState::Up { writer };
                }
            }
            PortEvent::MuxReady => {
                if let PortState::Mux(mx) = &mut self.port {
                    mx.ready = true;
                }
            }
            PortEvent::BasicDialFailed { generation, error } => {
                if self.basic_port(generation).is_some() {
                    let output = format!("Unable to connect to specified port: {error}");
                    self.end(SessionStatus::Failed, output, false);
                }
            }
            PortEvent::BasicData {
                generation,
                data,
                room,
            } => {
                if self.basic_port(generation).is_some() {
                    self.send_stream(payload_type::OUTPUT, data, Some(room));
                }
            }
            PortEvent::BasicClosed { generation } => {
                let local_port_forwarding = self.info.properties.local_port_forwarding;
                if let Some(b) = self.basic_port(generation) {
                    if local_port_forwarding {
                        b.state = BasicState::Idle;
                        b.task = None;
                    } else {
                        self.end(
                            SessionStatus::Terminated,
                            "the target closed the connection".to_owned(),
                            true,
                        );
                    }
                }
            }
            PortEvent::MuxDialFailed { stream_id, error } => {
                if !matches!(self.port, PortState::Mux(_)) {
                    return;
                }
                tracing::debug!(session = %self.info.id, stream_id, "dial failed: {error}");
                self.fail_mux_stream(stream_id);
                if let Some(ledger) = &mut self.smux {
                    ledger.close(stream_id);
                }
                lock(&self.report).smux_dial_failures += 1;
                self.send_stream(
                    payload_type::FLAG,
                    message::flag_payload(flag::CONNECT_TO_PORT_ERROR),
                    None,
                );
            }
            PortEvent::MuxClosed { stream_id } => {
                if let PortState::Mux(mx) = &mut self.port {
                    mx.streams.remove(&stream_id);
                }
                if let Some(ledger) = &mut self.smux {
                    ledger.close(stream_id);
                }
            }
            PortEvent::MuxOutput { data, room } => {
                if matches!(self.port, PortState::Mux(_)) {
                    self.send_stream(payload_type::OUTPUT, data, Some(room));
                }
            }
        }
    }

    // === impl Agent: timers ===

    fn on_tick(&mut self, now: Instant) {
        if let Some(drain) = &self.ending {
            if now >= drain.deadline || self.outbound.is_none() {
                self.finish_drain();
            } else {
                self.retransmit_head(now);
            }
            return;
        }
        self.retransmit_head(now);
        if self.is_closing() {
            return;
        }
        let shared = self.shared.clone();
        let config = &shared.config;
        if let Handshake::Awaiting { since } = self.handshake
            && now.duration_since(since) > Config::duration(config.handshake_timeout_ms)
        {
            self.end(
                SessionStatus::Failed,
                "Handshake timed out. Please ensure that you have the latest version of the session manager plugin.".to_owned(),
                false,
            );
            return;
        }
        if let Some(since) = self.detached_since
            && now.duration_since(since) > Config::duration(config.reconnect_timeout_ms)
        {
            self.end(
                SessionStatus::Terminated,
                "the client did not reconnect".to_owned(),
                false,
            );
            return;
        }
        // While the handshake runs, its own timeout applies.
        if self.handshake_done()
            && now.duration_since(self.last_activity) > Config::duration(config.idle_timeout_ms)
        {
            self.end(
                SessionStatus::Terminated,
                "Session idle timeout".to_owned(),
                false,
            );
            return;
        }
        if let Some(since) = self.gap_since
            && !self.gap_reported
            && now.duration_since(since) > Config::duration(config.sequence_gap_timeout_ms)
        {
            self.gap_reported = true;
            let next = self
                .reorder
                .keys()
                .next()
                .copied()
                .unwrap_or(self.expected_seq);
            self.violation(format!(
                "client sequence gap: expected seq {} but only later ones (from {next}) arrived",
                self.expected_seq
            ));
            if self.is_closing() {
                return;
            }
        }
        let interval = Config::duration(config.smux_keepalive_interval_ms);
        let timeout = Config::duration(config.smux_keepalive_timeout_ms);
        let mut keepalive_dead = false;
        if let PortState::Mux(mx) = &mut self.port
            && mx.keepalive
        {
            if now.duration_since(mx.last_nop) >= interval {
                mx.last_nop = now;
                if mx
                    .plumbing
                    .control
                    .send(smux::Frame::control(smux::Command::Nop, 0).encode())
                    .is_ok()
                {
                    lock(&self.report).smux_nops_to_client += 1;
                }
            }
            keepalive_dead = now.duration_since(mx.last_rx) > timeout;
        }
        // xtaci closes on its keepalive tick only while its receive buffer has room: a
        // stalled receive path reads nothing, and the client is not to blame.
        if self.receive_stalled() {
            if let PortState::Mux(mx) = &mut self.port {
                mx.last_rx = now;
            }
            keepalive_dead = false;
        }
        if keepalive_dead {
            self.end(
                SessionStatus::Failed,
                "smux keepalive timeout: nothing arrived from the client's smux".to_owned(),
                false,
            );
        }
    }

    fn retransmit_head(&mut self, now: Instant) {
        let Some(out) = &self.outbound else { return };
        let sent = self.unacked.len() - self.unsent;
        if sent == 0 {
            return;
        }
        let rto = self.rto.rto();
        let limit = self.shared.config.unacked_retransmit_limit;
        let client_frames = self.client_frames;
        let Some(head) = self.unacked.front_mut() else {
            return;
        };
        let Some(last) = head.last_sent else { return };
        if now.duration_since(last) <= rto {
            return;
        }
        let _ = out.send(ToClient::Frame {
            data: head.bytes.clone(),
            stream: true,
            room: None,
        });
        head.last_sent = Some(now);
        head.retransmits += 1;
        if head.retransmits == limit / 2 {
            head.client_frames_mark = Some(client_frames);
        }
        let overdue = head.retransmits >= limit
            && !head.reported
            && head.client_frames_mark.is_some_and(|m| client_frames > m);
        let seq = head.seq;
        let retransmits = head.retransmits;
        if overdue {
            head.reported = true;
        }
        lock(&self.report).retransmissions_to_client += 1;
        if overdue {
            self.violation(format!(
                "client never acknowledged output seq {seq} after {retransmits} retransmissions while it kept sending"
            ));
        }
    }

    // === impl Agent: ending ===

    /// Records a client violation; in strict mode it also fails the session. Violations are
    /// recorded at any time, also after the session ended.
    fn violation(&mut self, reason: String) {
        self.shared.record_violation(Some(&self.info.id), &reason);
        if self.strict {
            self.end(
                SessionStatus::Failed,
                format!("protocol violation: {reason}"),
                false,
            );
        }
    }

    /// Ends the session; with `drain`, first waits (at most 2 s) for the client to ack.
    fn end(&mut self, status: SessionStatus, reason: String, drain: bool) {
        if self.finished.is_some() {
            return;
        }
        if drain && !self.unacked.is_empty() && self.outbound.is_some() {
            if self.ending.is_none() {
                self.ending = Some(Drain {
                    deadline: Instant::now() + DRAIN_LIMIT,
                    status,
                    reason,
                });
            }
            return;
        }
        self.ending = None;
        self.finish(status, reason);
    }

    /// Ends a closing drain now.
    fn finish_drain(&mut self) {
        if let Some(drain) = self.ending.take() {
            self.finish(drain.status, drain.reason);
        }
    }

    /// Ends a closing drain as soon as the client has acknowledged everything.
    fn finish_drain_if_acknowledged(&mut self) {
        if self.unacked.is_empty() {
            self.finish_drain();
        }
    }

    /// Sends `channel_closed`, closes the current WebSocket and stops the targets. The task
    /// goes on checking what the client's WebSockets still deliver until they are closed.
    fn finish(&mut self, status: SessionStatus, reason: String) {
        if self.finished.is_some() {
            return;
        }
        self.finished = Some(status);
        tracing::info!(session = %self.info.id, ?status, "session ended: {reason}");
        {
            let mut r = lock(&self.report);
            r.close_reason = Some(reason.clone());
            r.unacked_at_close = self.unacked.len() as u64;
            tracing::debug!(session = %self.info.id, report = ?*r, "session report");
        }
        let output = if status == SessionStatus::Failed || reason.starts_with("Session idle") {
            reason
        } else {
            String::new()
        };
        let closed = ChannelClosed {
            message_id: Uuid::new_v4().hyphenated().to_string(),
            created_date: chrono_like_now(),
            destination_id: self.info.instance.id.clone(),
            session_id: self.info.id.clone(),
            message_type: "channel_closed".to_owned(),
            schema_version: 1,
            output,
        };
        let m = ClientMessage::new(
            MessageType::ChannelClosed,
            0,
            FLAG_SYN | FLAG_FIN,
            payload_type::UNSET,
            serde_json::to_vec(&closed).unwrap_or_default(),
        );
        let legacy = self.faults.legacy_channel_closed;
        let data = if legacy {
            m.encode_legacy()
        } else {
            m.encode()
        };
        if self.to_client(ToClient::Frame {
            data,
            stream: false,
            room: None,
        }) && legacy
        {
            self.count(|f| f.legacy_channels_closed += 1);
        }
        self.to_client(ToClient::Close {
            code: 1000,
            reason: String::new(),
        });
        match std::mem::replace(&mut self.port, PortState::None) {
            PortState::Basic(b) => {
                if let Some(t) = b.task {
                    t.abort();
                }
            }
            PortState::Mux(mx) => {
                for t in mx.streams.into_values().filter_map(|s| s.task) {
                    t.abort();
                }
            }
            PortState::None => {}
        }
        self.outbound = None;
        self.conn_id = None;
        self.shared.mark_finished(&self.info.id);
    }
}

fn chrono_like_now() -> String {
    // RFC 3339 in UTC, from epoch milliseconds (no calendar crate needed for tests).
    let ms = message::now_millis();
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tokio::sync::mpsc;

    use super::*;
    use crate::config::InstanceConfig;
    use crate::registry::{PortProperties, SessionEntry};

    #[test]
    fn rto_follows_jacobson_karels_and_is_capped() {
        let mut e = RtoEstimator::default();
        assert_eq!(e.rto(), Duration::from_millis(200));
        e.sample(Duration::from_millis(100));
        // rttvar = 0, srtt = 100 → rto = 100 + max(10, 0)
        assert_eq!(e.rto().as_millis(), 110);
        for _ in 0..5 {
            e.sample(Duration::from_secs(5));
        }
        assert_eq!(e.rto(), MAX_RTO);
    }

    const SESSION: &str = "fleet-access-0123456789abcdef0";

    /// An agent of an SSH session (basic mode; the target's EOF ends it with a drain), driven
    /// input by input without its task, its timers or a real target.
    struct Harness {
        agent: Agent,
        report: Arc<Mutex<SessionReport>>,
        shared: Arc<Shared>,
        to_client: Vec<UnboundedReceiver<ToClient>>,
        client_seq: i64,
    }

    impl Harness {
        fn new(strict: bool) -> Self {
            let shared = Arc::new(Shared::new(Config {
                strict,
                mode: Mode::Fast,
                ..Config::default()
            }));
            let mut json = serde_json::Map::new();
            json.insert("portNumber".into(), "22".into());
            let info = Arc::new(SessionInfo {
                id: SESSION.to_owned(),
                document_name: "AWS-StartSSHSession".to_owned(),
                owner: "test".to_owned(),
                reason: None,
                properties: PortProperties {
                    json,
                    port: 22,
                    host: None,
                    local_port_forwarding: false,
                },
                instance: InstanceConfig::new("i-0123456789abcdef0"),
                faults: Faults::default(),
            });
            let report = Arc::new(Mutex::new(SessionReport::new(
                SESSION,
                "i-0123456789abcdef0",
                "AWS-StartSSHSession",
            )));
            // The inbox stays unread: the harness delivers every input itself.
            let (inbox, _) = mpsc::unbounded_channel();
            lock(&shared.sessions).insert(
                SESSION.to_owned(),
                SessionEntry {
                    info: info.clone(),
                    token: None,
                    started: SystemTime::now(),
                    finished: false,
                    ended: None,
                    agent: Some(inbox.clone()),
                    report: report.clone(),
                    next_connection: 0,
                },
            );
            let agent = Agent::new(shared.clone(), info, report.clone(), inbox);
            let mut h = Self {
                agent,
                report,
                shared,
                to_client: Vec::new(),
                client_seq: 0,
            };
            h.attach();
            h
        }

        /// Attaches a new connection; returns its id.
        fn attach(&mut self) -> u32 {
            let conn_id = self.to_client.len() as u32;
            let (outbound, rx) = mpsc::unbounded_channel();
            self.to_client.push(rx);
            self.agent.handle(AgentInput::Attach { conn_id, outbound });
            conn_id
        }

        fn latest(&self) -> u32 {
            self.to_client.len() as u32 - 1
        }

        fn frame_on(&mut self, conn_id: u32, data: Vec<u8>) {
            self.agent.handle(AgentInput::ClientFrame {
                conn_id,
                data,
                text: false,
            });
        }

        fn frame(&mut self, data: Vec<u8>) {
            self.frame_on(self.latest(), data);
        }

        /// The client's next `input_stream_data`.
        fn input(&mut self, payload_type: u32, payload: &[u8]) -> ClientMessage {
            let m = ClientMessage::new(
                MessageType::InputStreamData,
                self.client_seq,
                0,
                payload_type,
                payload.to_vec(),
            );
            self.client_seq += 1;
            m
        }

        fn ack(&mut self, m: &ClientMessage) {
            let ack = ClientMessage::acknowledge(&m.message_type, m.message_id, m.sequence_number);
            self.frame(ack.encode());
        }

        /// Everything the latest connection got so far, decoded.
        fn received(&mut self) -> Vec<(ClientMessage, bool)> {
            let mut out = Vec::new();
            if let Some(rx) = self.to_client.last_mut() {
                while let Ok(item) = rx.try_recv() {
                    match item {
                        ToClient::Frame { data, .. } => {
                            out.push((message::decode(&data).expect("agent frame").message, false))
                        }
                        ToClient::Close { .. } => out.push((
                            ClientMessage::new(MessageType::Other("close".into()), 0, 0, 0, vec![]),
                            true,
                        )),
                        ToClient::Inject(_) => {}
                    }
                }
            }
            out
        }

        fn outputs(&mut self) -> Vec<ClientMessage> {
            self.received()
                .into_iter()
                .map(|(m, _)| m)
                .filter(|m| m.message_type == MessageType::OutputStreamData)
                .collect()
        }

        /// Completes the handshake and brings the basic connection up; returns the
        /// HandshakeComplete (unacknowledged) and the target's writer side.
        fn open_basic(&mut self) -> (ClientMessage, mpsc::UnboundedReceiver<ToTarget>) {
            let request = self.outputs().remove(0);
            assert_eq!(request.payload_type, payload_type::HANDSHAKE_REQUEST);
            self.ack(&request);
            let response = serde_json::json!({
                "ClientVersion": "1.2.764.0",
                "ProcessedClientActions": [{"ActionType": "SessionType", "ActionStatus": 1}],
            });
            let m = self.input(
                payload_type::HANDSHAKE_RESPONSE,
                &serde_json::to_vec(&response).expect("json"),
            );
            self.frame(m.encode());
            let complete = self.outputs().remove(0);
            assert_eq!(complete.payload_type, payload_type::HANDSHAKE_COMPLETE);
            let (writer, target) = mpsc::unbounded_channel();
            self.agent.handle(AgentInput::Port(PortEvent::BasicUp {
                generation: 1,
                writer,
            }));
            (complete, target)
        }

        /// The target writes `banner` and closes: the SSH session drains, then ends.
        fn target_says_and_closes(&mut self, banner: &[u8]) -> ClientMessage {
            let room = std::sync::Arc::new(tokio::sync::Semaphore::new(banner.len()))
                .try_acquire_many_owned(banner.len() as u32)
                .expect("room");
            self.agent.handle(AgentInput::Port(PortEvent::BasicData {
                generation: 1,
                data: banner.to_vec(),
                room,
            }));
            self.agent
                .handle(AgentInput::Port(PortEvent::BasicClosed { generation: 1 }));
            self.outputs().remove(0)
        }

        fn report(&self) -> SessionReport {
            lock(&self.report).clone()
        }

        fn global_violations(&self) -> Vec<String> {
            lock(&self.shared.violations)
                .iter()
                .map(|v| v.reason.clone())
                .collect()
        }
    }

    fn corrupt_digest(m: &ClientMessage) -> Vec<u8> {
        let mut bytes = m.encode();
        bytes[80] ^= 0xFF;
        bytes
    }

    #[test]
    fn disconnect_to_port_fails_an_ssh_session() {
        let mut h = Harness::new(true);
        let (complete, _target) = h.open_basic();
        let disconnect = h.input(
            payload_type::FLAG,
            &message::flag_payload(flag::DISCONNECT_TO_PORT),
        );
        h.frame(disconnect.encode());
        assert!(h.agent.ending.is_some(), "the session drains, then ends");
        h.ack(&complete);
        assert_eq!(h.agent.finished, Some(SessionStatus::Failed));
        assert_eq!(
            h.report().close_reason.as_deref(),
            Some("the client disconnected the port of an SSH session (DisconnectToPort)")
        );
    }

    #[test]
    fn the_agent_keeps_no_more_than_its_outgoing_buffer_and_says_so() {
        let mut h = Harness::new(false);
        let _ = h.open_basic();
        let room = Arc::new(tokio::sync::Semaphore::new(OUTGOING_BUFFER_CAPACITY + 1));
        for _ in 0..=OUTGOING_BUFFER_CAPACITY {
            let room = room.clone().try_acquire_owned().expect("room");
            h.agent.handle(AgentInput::Port(PortEvent::BasicData {
                generation: 1,
                data: vec![b'x'],
                room,
            }));
        }
        assert_eq!(h.agent.unacked.len(), OUTGOING_BUFFER_CAPACITY);
        let violations = h.report().violations;
        assert_eq!(violations.len(), 1, "reported once: {violations:?}");
        assert!(
            violations[0].contains("left 100000 messages unacknowledged"),
            "{violations:?}"
        );
    }

    #[test]
    fn a_target_that_does_not_read_stalls_the_receive_path_until_it_does() {
        let mut h = Harness::new(false);
        let (complete, mut target) = h.open_basic();
        h.ack(&complete);
        let acks = |h: &mut Harness| {
            h.received()
                .into_iter()
                .filter(|(m, _)| m.message_type == MessageType::Acknowledge)
                .count()
        };
        let _ = acks(&mut h);
        let chunk = vec![7u8; 1024];
        for _ in 0..80 {
            let m = h.input(payload_type::OUTPUT, &chunk);
            h.frame(m.encode());
        }
        // 65 KiB is past what a basic target's write may hold: the rest waits, unread, unacked.
        assert_eq!(acks(&mut h), 65);
        assert_eq!(h.agent.held.len(), 15);
        assert_eq!(h.report().receive_stalls, 1);
        // The target takes one chunk: room for one more frame, read and acked.
        drop(target.try_recv().expect("written towards the target"));
        h.agent.release_held();
        assert_eq!(acks(&mut h), 1);
        while let Ok(chunk) = target.try_recv() {
            drop(chunk);
        }
        h.agent.release_held();
        assert_eq!(acks(&mut h), 14);
        assert!(h.agent.held.is_empty());
        assert_eq!(h.report().bytes_from_client, 80 * 1024);
        assert!(h.report().violations.is_empty(), "{:?}", h.report());
    }

    #[test]
    fn the_closing_drain_checks_client_frames_and_ends_once_all_is_acknowledged() {
        let mut h = Harness::new(false);
        let (complete, _target) = h.open_basic();
        let banner = h.target_says_and_closes(b"SSH-2.0-test\r\n");
        assert!(
            h.agent.ending.is_some(),
            "draining: output is unacknowledged"
        );
        assert_eq!(h.report().close_reason, None);

        let bad = h.input(payload_type::OUTPUT, b"late");
        h.frame(corrupt_digest(&bad));
        assert_eq!(h.report().violations.len(), 1, "{:?}", h.report());
        assert!(h.report().violations[0].contains("PayloadDigest"));

        h.ack(&complete);
        assert!(
            h.agent.finished.is_none(),
            "the banner is still unacknowledged"
        );
        h.ack(&banner);
        let report = h.report();
        assert_eq!(h.agent.finished, Some(SessionStatus::Terminated));
        assert_eq!(
            report.close_reason.as_deref(),
            Some("the target closed the connection")
        );
        assert_eq!(report.unacked_at_close, 0, "the drain ended on the acks");
        assert_eq!(report.client_frames_after_end, 3);
        let sent = h.received();
        assert!(
            sent.iter()
                .any(|(m, _)| m.message_type == MessageType::ChannelClosed)
        );
        assert!(sent.last().is_some_and(|(_, close)| *close));
    }

    #[test]
    fn a_violation_during_the_drain_fails_a_strict_session() {
        let mut h = Harness::new(true);
        let (_complete, _target) = h.open_basic();
        h.target_says_and_closes(b"banner");
        let bad = h.input(payload_type::OUTPUT, b"late");
        h.frame(corrupt_digest(&bad));
        assert_eq!(h.agent.finished, Some(SessionStatus::Failed));
        assert!(
            h.report()
                .close_reason
                .is_some_and(|r| r.starts_with("protocol violation: PayloadDigest"))
        );
    }

    #[test]
    fn frames_after_channel_closed_are_checked_and_legal_ones_pass() {
        let mut h = Harness::new(true);
        let (complete, mut target) = h.open_basic();
        let terminate = h.input(
            payload_type::FLAG,
            &message::flag_payload(flag::TERMINATE_SESSION),
        );
        h.frame(terminate.encode());
        assert_eq!(h.agent.finished, Some(SessionStatus::Terminated));
        assert!(!h.agent.is_over(), "its WebSocket is still open");

        // Legal after the end: a late ack, a retransmission, more data (checked, not forwarded).
        h.ack(&complete);
        h.ack(&complete);
        h.frame(terminate.encode());
        let data = h.input(payload_type::OUTPUT, b"crossing");
        h.frame(data.encode());
        let report = h.report();
        assert!(report.violations.is_empty(), "{report:?}");
        assert_eq!(report.repeated_acks_from_client, 1);
        assert_eq!(report.duplicates_from_client, 1);
        assert!(target.try_recv().is_err(), "nothing reaches the target");

        // A broken one is still a violation, recorded in the report and globally.
        let wrong_type = ClientMessage::acknowledge(
            &MessageType::InputStreamData,
            complete.message_id,
            complete.sequence_number,
        );
        h.frame(wrong_type.encode());
        let report = h.report();
        assert!(
            !report.status.is_ended(),
            "not over while its WebSocket is open"
        );
        assert_eq!(
            report.violations,
            vec!["acknowledge for message type \"input_stream_data\"".to_owned()]
        );
        assert_eq!(h.global_violations(), report.violations);
        assert_eq!(report.client_frames_after_end, 5);

        h.agent.handle(AgentInput::Closed { conn_id: 0 });
        assert!(h.agent.is_over());
    }

    #[test]
    fn frames_on_a_replaced_connection_are_checked() {
        let mut h = Harness::new(true);
        let (complete, _target) = h.open_basic();
        let old = h.latest();
        h.attach();
        h.agent.handle(AgentInput::Detach { conn_id: old });
        h.ack(&complete);
        let late = ClientMessage::acknowledge(&MessageType::OutputStreamData, Uuid::new_v4(), 40);
        h.frame_on(old, late.encode());
        let report = h.report();
        assert_eq!(report.client_frames_on_replaced_connections, 1);
        assert_eq!(
            report.violations,
            vec!["acknowledge for seq 40, which the agent never sent".to_owned()]
        );
        assert_eq!(h.agent.finished, Some(SessionStatus::Failed));
        assert!(h.agent.connections.contains(&old), "still delivering");
    }

    #[test]
    fn a_connection_attached_after_the_end_is_closed_at_once() {
        let mut h = Harness::new(true);
        h.agent.handle(AgentInput::Terminate);
        assert!(h.agent.finished.is_some());
        let late = h.attach();
        assert!(h.received().iter().any(|(_, close)| *close));
        assert!(!h.agent.is_over());
        h.agent.handle(AgentInput::Closed { conn_id: 0 });
        h.agent.handle(AgentInput::Closed { conn_id: late });
        assert!(h.agent.is_over());
    }
}
