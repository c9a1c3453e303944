//! The strict agent of one session (protocol reference §9.1): the handshake with its version
//! gates and timeout, the reliability layer (acks, its own retransmission with the agent's RTO,
//! acceptance of client retransmissions, checks that the client acks everything and numbers
//! its stream correctly), basic and mux port forwarding, flags, timeouts and `channel_closed`.
//! One tokio task per session; it outlives WebSocket connections so that resumes continue the
//! sequence numbers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{Config, Faults, Mode};
use crate::message::{
    self, AcknowledgeContent, ChannelClosed, ClientMessage, DecodedFrame, FLAG_FIN, FLAG_SYN,
    HandshakeComplete, HandshakeRequest, HandshakeResponse, MessageType, RequestedClientAction,
    flag, payload_type,
};
use crate::port::{self, MuxPlumbing, OutputBudget, PortEvent};
use crate::registry::{SessionInfo, Shared, lock};
use crate::report::{SessionReport, SessionStatus, Transfer};
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
    /// That WebSocket is gone.
    Detach { conn_id: u32 },
    /// A frame from the client.
    ClientFrame {
        conn_id: u32,
        data: Vec<u8>,
        text: bool,
    },
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
    /// A binary frame; `stream` marks `output_stream_data` (subject to transit faults).
    Frame { data: Vec<u8>, stream: bool },
    /// Close the WebSocket.
    Close { code: u16, reason: String },
    /// A connection fault now.
    Inject(Injection),
}

const TICK: Duration = Duration::from_millis(100);
const MAX_RTO: Duration = Duration::from_secs(1);
const REORDER_LIMIT: usize = 100_000;
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
    /// Target output bytes this message took from the output budget.
    charged: usize,
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

enum BasicState {
    Idle,
    Dialing,
    Up { writer: UnboundedSender<Vec<u8>> },
}

struct BasicPort {
    generation: u64,
    state: BasicState,
    task: Option<JoinHandle<()>>,
    ever_connected: bool,
}

struct MuxStream {
    writer: Option<UnboundedSender<Vec<u8>>>,
    pending: Vec<Vec<u8>>,
    task: JoinHandle<()>,
}

struct MuxPort {
    plumbing: MuxPlumbing,
    decoder: smux::Decoder,
    streams: HashMap<u32, MuxStream>,
    closed: HashSet<u32>,
    keepalive: bool,
    last_rx: Instant,
    last_nop: Instant,
}

enum PortState {
    None,
    Basic(BasicPort),
    Mux(MuxPort),
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
    conn_id: Option<u32>,
    outbound: Option<UnboundedSender<ToClient>>,
    detached_since: Option<Instant>,
    // Sending.
    next_seq: i64,
    unacked: VecDeque<Outgoing>,
    unsent: usize,
    output_budget: OutputBudget,
    /// Target output in `unacked` (what it took from `output_budget`).
    unacked_output_bytes: usize,
    rto: RtoEstimator,
    // Receiving.
    expected_seq: i64,
    reorder: BTreeMap<i64, Buffered>,
    seen: VecDeque<[u8; message::FRAME_HEADER_SIZE]>,
    seen_base: i64,
    gap_since: Option<Instant>,
    gap_reported: bool,
    client_frames: u64,
    in_order_accepted: u64,
    // Session.
    handshake: Handshake,
    client_version: Option<String>,
    port: PortState,
    last_activity: Instant,
    ending: Option<(Instant, SessionStatus, String)>,
    finished: bool,
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
            faults: info.faults.clone(),
            mode: config.mode,
            strict: config.strict,
            shared: shared.clone(),
            info,
            report,
            inbox,
            conn_id: None,
            outbound: None,
            detached_since: Some(now),
            next_seq: 0,
            unacked: VecDeque::new(),
            unsent: 0,
            output_budget: OutputBudget::new(config.output_budget_bytes),
            unacked_output_bytes: 0,
            rto: RtoEstimator::default(),
            expected_seq: 0,
            reorder: BTreeMap::new(),
            seen: VecDeque::new(),
            seen_base: 0,
            gap_since: None,
            gap_reported: false,
            client_frames: 0,
            in_order_accepted: 0,
            handshake: Handshake::NotStarted,
            client_version: None,
            port: PortState::None,
            last_activity: now,
            ending: None,
            finished: false,
        }
    }

    /// Runs the agent until the session ends.
    pub(crate) async fn run(mut self, mut inbox: UnboundedReceiver<AgentInput>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.finished {
            tokio::select! {
                input = inbox.recv() => match input {
                    Some(i) => self.handle(i),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(Instant::now()),
            }
        }
        if !self.finished {
            self.finish(SessionStatus::Terminated, "emulator shut down".to_owned());
        }
    }

    fn handle(&mut self, input: AgentInput) {
        match input {
            AgentInput::Attach { conn_id, outbound } => self.on_attach(conn_id, outbound),
            AgentInput::Detach { conn_id } => {
                if self.conn_id == Some(conn_id) {
                    self.conn_id = None;
                    self.outbound = None;
                    self.detached_since = Some(Instant::now());
                    if !self.is_closing() {
                        lock(&self.report).status = SessionStatus::Disconnected;
                    }
                }
            }
            AgentInput::ClientFrame {
                conn_id,
                data,
                text,
            } => {
                if self.conn_id == Some(conn_id) && !self.is_closing() {
                    self.on_client_frame(&data, text);
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
            AgentInput::Inject(i) => self.to_client(ToClient::Inject(i)),
            AgentInput::Port(event) => {
                if !self.is_closing() {
                    self.on_port_event(event);
                }
            }
        }
    }

    fn is_closing(&self) -> bool {
        self.finished || self.ending.is_some()
    }

    // === impl Agent: connection ===

    fn on_attach(&mut self, conn_id: u32, outbound: UnboundedSender<ToClient>) {
        self.conn_id = Some(conn_id);
        self.outbound = Some(outbound);
        self.detached_since = None;
        {
            let mut r = lock(&self.report);
            r.connections += 1;
            if !r.status.is_ended() {
                r.status = SessionStatus::Connected;
            }
        }
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

    fn to_client(&self, item: ToClient) {
        if let Some(o) = &self.outbound {
            let _ = o.send(item);
        }
    }

    fn send_control(&self, message: &ClientMessage) {
        self.to_client(ToClient::Frame {
            data: message.encode(),
            stream: false,
        });
    }

    fn start_handshake(&mut self) {
        if self.faults.start_publication_first {
            self.send_control(&ClientMessage::new(
                MessageType::StartPublication,
                0,
                FLAG_SYN | FLAG_FIN,
                payload_type::UNSET,
                Vec::new(),
            ));
        }
        if self.faults.legacy_no_handshake {
            self.handshake = Handshake::Skipped;
            lock(&self.report).transfer = Some(Transfer::Basic);
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
        );
        self.handshake = Handshake::Awaiting {
            since: Instant::now(),
        };
    }

    // === impl Agent: sending ===

    fn send_stream(&mut self, payload_type: u32, payload: Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let flags = if seq == 0 { FLAG_SYN } else { 0 };
        let mut charged = 0;
        if payload_type == payload_type::OUTPUT {
            charged = payload.len();
            self.unacked_output_bytes += charged;
            self.last_activity = Instant::now();
            let mut r = lock(&self.report);
            r.bytes_to_client += payload.len() as u64;
            r.peak_unacked_output_bytes = r
                .peak_unacked_output_bytes
                .max(self.unacked_output_bytes as u64);
        }
        let m = ClientMessage::new(
            MessageType::OutputStreamData,
            seq,
            flags,
            payload_type,
            payload,
        );
        self.unacked.push_back(Outgoing {
            seq,
            id: m.message_id,
            bytes: m.encode(),
            charged,
            last_sent: None,
            retransmits: 0,
            client_frames_mark: None,
            reported: false,
        });
        self.unsent += 1;
        lock(&self.report).messages_to_client += 1;
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
            });
            o.last_sent = Some(now);
        }
        self.unsent = 0;
    }

    fn ack(&mut self, m: &ClientMessage) {
        let ack = ClientMessage::acknowledge(&m.message_type, m.message_id, m.sequence_number);
        self.send_control(&ack);
        lock(&self.report).acks_to_client += 1;
    }

    // === impl Agent: receiving ===

    fn on_client_frame(&mut self, data: &[u8], text: bool) {
        self.client_frames += 1;
        if text {
            self.violation("text WebSocket frame after the open message".to_owned());
            if self.is_closing() {
                return;
            }
        }
        let frame = match message::decode(data) {
            Ok(f) => f,
            Err(e) => {
                self.violation(format!("undecodable client frame: {e}"));
                return;
            }
        };
        let issues = frame.strict_issues();
        let digest_ok = frame.digest_valid();
        for issue in issues {
            self.violation(issue);
            if self.is_closing() {
                return;
            }
        }
        if !digest_ok {
            // Not acked: the client must retransmit.
            return;
        }
        match frame.message.message_type {
            MessageType::InputStreamData => self.on_input(&frame, data),
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
                self.unacked_output_bytes -= o.charged;
                self.output_budget.give_back(o.charged);
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
            None => {} // a repeated ack
        }
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

    fn on_input(&mut self, frame: &DecodedFrame, raw: &[u8]) {
        let m = &frame.message;
        let seq = m.sequence_number;
        lock(&self.report).messages_from_client += 1;
        let mut header = [0u8; message::FRAME_HEADER_SIZE];
        let n = raw.len().min(message::FRAME_HEADER_SIZE);
        header[..n].copy_from_slice(&raw[..n]);
        if seq < 0 {
            self.violation(format!("negative sequence number {seq}"));
            return;
        }
        if seq < self.expected_seq || self.reorder.contains_key(&seq) {
            lock(&self.report).duplicates_from_client += 1;
            self.check_identical(seq, &header);
            if !self.is_closing() {
                self.ack(m); // the agent re-acks duplicates
            }
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
        // The real agent acks on its receive path and sends HandshakeComplete from its handshake
        // task afterwards, so the client sees the ack first. (The plugin depends on that order:
        // a message arriving between HandshakeComplete and its mux setup crashes its reader.)
        let acked_early = m.payload_type == payload_type::HANDSHAKE_RESPONSE;
        if acked_early {
            self.ack(m);
        }
        match self.process(m) {
            Processed::NotReady => {}
            Processed::Done => {
                self.in_order_accepted += 1;
                let withhold = self
                    .faults
                    .withhold_ack_every
                    .is_some_and(|n| n > 0 && self.in_order_accepted.is_multiple_of(u64::from(n)));
                if !withhold && !self.finished && !acked_early {
                    self.ack(m);
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
        while !self.is_closing() {
            let Some(b) = self.reorder.remove(&self.expected_seq) else {
                break;
            };
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
                let r = self.port_output(&m.payload);
                if matches!(r, Processed::Done) {
                    self.last_activity = Instant::now();
                    lock(&self.report).bytes_from_client += m.payload.len() as u64;
                }
                r
            }
            payload_type::FLAG => {
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
        if !matches!(self.handshake, Handshake::Awaiting { .. }) {
            self.violation("HandshakeResponse outside the handshake".to_owned());
            return;
        }
        let since = match self.handshake {
            Handshake::Awaiting { since } => since,
            _ => Instant::now(),
        };
        let response: HandshakeResponse = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                self.violation(format!("HandshakeResponse is not valid JSON: {e}"));
                if !self.is_closing() {
                    self.end(
                        SessionStatus::Failed,
                        "invalid HandshakeResponse".to_owned(),
                        false,
                    );
                }
                return;
            }
        };
        if version::parse(&response.client_version).is_none() {
            self.violation(format!(
                "ClientVersion {:?} is not a dotted version",
                response.client_version
            ));
            if self.is_closing() {
                return;
            }
        }
        let actions = &response.processed_client_actions;
        if actions.len() != 1 || actions[0].action_type != "SessionType" {
            let got: Vec<&str> = actions.iter().map(|a| a.action_type.as_str()).collect();
            self.violation(format!(
                "HandshakeResponse must process exactly [SessionType], got {got:?}"
            ));
            if self.is_closing() {
                return;
            }
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
        let client_version = response.client_version.clone();
        let agent_version = self.info.instance.agent_version.clone();
        let mux = version::agent_uses_mux(
            &agent_version,
            &client_version,
            self.info.properties.local_port_forwarding,
        );
        let keepalive = mux && version::agent_smux_keepalive(&agent_version, &client_version);
        {
            let mut r = lock(&self.report);
            r.client_version = Some(client_version.clone());
            r.transfer = Some(if mux { Transfer::Mux } else { Transfer::Basic });
            r.smux_keepalive = keepalive;
        }
        self.client_version = Some(client_version);
        let complete = HandshakeComplete {
            handshake_time_to_complete: since.elapsed().as_nanos() as i64,
            customer_message: String::new(),
        };
        self.send_stream(
            payload_type::HANDSHAKE_COMPLETE,
            serde_json::to_vec(&complete).unwrap_or_default(),
        );
        self.handshake = Handshake::Complete;
        self.after_handshake_faults();
        if mux {
            self.start_mux(keepalive);
        } else {
            self.start_basic();
        }
    }

    fn after_handshake_faults(&mut self) {
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
            self.to_client(ToClient::Frame {
                data: bytes,
                stream: false,
            });
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
            self.send_control(&ClientMessage::new(
                MessageType::AgentSessionState,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                serde_json::to_vec(&state).unwrap_or_default(),
            ));
            self.send_control(&ClientMessage::new(
                MessageType::Other("future_message_type".to_owned()),
                0,
                0,
                99,
                b"ignore me".to_vec(),
            ));
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
            flag::DISCONNECT_TO_PORT => match &mut self.port {
                PortState::Basic(b) => {
                    if let Some(t) = b.task.take() {
                        t.abort();
                    }
                    b.state = BasicState::Idle;
                }
                _ => self.violation("DisconnectToPort flag outside basic mode".to_owned()),
            },
            flag::TERMINATE_SESSION => {
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
        let mut b = BasicPort {
            generation: 0,
            state: BasicState::Idle,
            task: None,
            ever_connected: false,
        };
        self.dial_basic(&mut b);
        self.port = PortState::Basic(b);
    }

    fn dial_basic(&mut self, b: &mut BasicPort) {
        b.generation += 1;
        b.state = BasicState::Dialing;
        match self.target() {
            Some(addr) => {
                b.task = Some(port::spawn_basic(
                    addr,
                    b.generation,
                    self.mode,
                    self.output_budget.clone(),
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
            plumbing: MuxPlumbing::spawn(self.mode, self.output_budget.clone(), self.inbox.clone()),
            decoder: smux::Decoder::default(),
            streams: HashMap::new(),
            closed: HashSet::new(),
            keepalive,
            last_rx: now,
            last_nop: now,
        });
    }

    fn port_output(&mut self, data: &[u8]) -> Processed {
        let mut port = std::mem::replace(&mut self.port, PortState::None);
        let r = match &mut port {
            PortState::None => Processed::NotReady,
            PortState::Basic(b) => match &b.state {
                BasicState::Up { writer } => {
                    let _ = writer.send(data.to_vec());
                    Processed::Done
                }
                BasicState::Dialing => Processed::NotReady,
                BasicState::Idle => {
                    self.dial_basic(b);
                    Processed::NotReady
                }
            },
            PortState::Mux(mx) => {
                mx.last_rx = Instant::now();
                match mx.decoder.push(data) {
                    Ok(frames) => {
                        for f in frames {
                            self.on_smux_frame(mx, f);
                        }
                    }
                    Err(e) => {
                        self.violation(format!("fatal smux error: {e}"));
                        if !self.is_closing() {
                            self.end(
                                SessionStatus::Failed,
                                format!("smux session died: {e}"),
                                false,
                            );
                        }
                    }
                }
                Processed::Done
            }
        };
        if !self.finished {
            self.port = port;
        }
        r
    }

    fn on_smux_frame(&mut self, mx: &mut MuxPort, f: smux::Frame) {
        let sid = f.stream_id;
        match f.command {
            smux::Command::Nop => {}
            smux::Command::Syn => {
                if sid == 0 || sid.is_multiple_of(2) {
                    self.violation(format!(
                        "smux SYN with stream id {sid} (client ids are odd)"
                    ));
                    return;
                }
                if mx.streams.contains_key(&sid) || mx.closed.contains(&sid) {
                    self.violation(format!("smux stream id {sid} reused"));
                    return;
                }
                lock(&self.report).smux_streams_opened += 1;
                match self.target() {
                    Some(addr) => {
                        let task = port::spawn_mux_stream(
                            addr,
                            sid,
                            mx.plumbing.data.clone(),
                            self.inbox.clone(),
                        );
                        mx.streams.insert(
                            sid,
                            MuxStream {
                                writer: None,
                                pending: Vec::new(),
                                task,
                            },
                        );
                    }
                    None => {
                        let _ = self.inbox.send(AgentInput::Port(PortEvent::MuxDialFailed {
                            stream_id: sid,
                            error: "no target configured for this port".to_owned(),
                        }));
                        mx.streams.insert(
                            sid,
                            MuxStream {
                                writer: None,
                                pending: Vec::new(),
                                task: tokio::spawn(async {}),
                            },
                        );
                    }
                }
            }
            smux::Command::Psh => {
                if let Some(s) = mx.streams.get_mut(&sid) {
                    match &s.writer {
                        Some(w) => {
                            let _ = w.send(f.data);
                        }
                        None => s.pending.push(f.data),
                    }
                } else if !mx.closed.contains(&sid) {
                    self.violation(format!("smux PSH for stream {sid}, which was never opened"));
                }
            }
            smux::Command::Fin => {
                if let Some(s) = mx.streams.remove(&sid) {
                    s.task.abort();
                    mx.closed.insert(sid);
                    let fin = smux::Frame::control(smux::Command::Fin, sid).encode();
                    let _ = mx.plumbing.control.send(fin);
                }
            }
        }
    }

    fn on_port_event(&mut self, event: PortEvent) {
        let mut port = std::mem::replace(&mut self.port, PortState::None);
        match (&mut port, event) {
            (PortState::Basic(b), PortEvent::BasicUp { generation, writer })
                if generation == b.generation =>
            {
                b.state = BasicState::Up { writer };
                b.ever_connected = true;
                self.port = port;
                self.drain_reorder();
                return;
            }
            (PortState::Basic(b), PortEvent::BasicDialFailed { generation, error })
                if generation == b.generation =>
            {
                let output = format!("Unable to connect to specified port: {error}");
                self.port = port;
                self.end(SessionStatus::Failed, output, false);
                return;
            }
            (PortState::Basic(b), PortEvent::BasicData { generation, data })
                if generation == b.generation =>
            {
                self.port = port;
                self.send_stream(payload_type::OUTPUT, data);
                return;
            }
            (PortState::Basic(b), PortEvent::BasicClosed { generation })
                if generation == b.generation =>
            {
                if self.info.properties.local_port_forwarding {
                    b.state = BasicState::Idle;
                    b.task = None;
                } else {
                    self.port = port;
                    self.end(
                        SessionStatus::Terminated,
                        "the target closed the connection".to_owned(),
                        true,
                    );
                    return;
                }
            }
            (PortState::Mux(mx), PortEvent::MuxUp { stream_id, writer }) => {
                if let Some(s) = mx.streams.get_mut(&stream_id) {
                    for d in s.pending.drain(..) {
                        let _ = writer.send(d);
                    }
                    s.writer = Some(writer);
                }
            }
            (PortState::Mux(mx), PortEvent::MuxDialFailed { stream_id, error }) => {
                tracing::debug!(session = %self.info.id, stream_id, "dial failed: {error}");
                mx.streams.remove(&stream_id);
                mx.closed.insert(stream_id);
                lock(&self.report).smux_dial_failures += 1;
                let fin = smux::Frame::control(smux::Command::Fin, stream_id).encode();
                let _ = mx.plumbing.control.send(fin);
                self.port = port;
                self.send_stream(
                    payload_type::FLAG,
                    message::flag_payload(flag::CONNECT_TO_PORT_ERROR),
                );
                return;
            }
            (PortState::Mux(mx), PortEvent::MuxClosed { stream_id }) => {
                mx.streams.remove(&stream_id);
                mx.closed.insert(stream_id);
            }
            (PortState::Mux(_), PortEvent::MuxOutput(data)) => {
                self.port = port;
                self.send_stream(payload_type::OUTPUT, data);
                return;
            }
            // A stale event from an earlier connection: what it read goes back to the budget.
            (_, stale) => self.output_budget.give_back(stale.output_len()),
        }
        self.port = port;
    }

    // === impl Agent: timers ===

    fn on_tick(&mut self, now: Instant) {
        if let Some((deadline, status, reason)) = self.ending.clone()
            && (self.unacked.is_empty() || now >= deadline || self.outbound.is_none())
        {
            self.finish(status, reason);
            return;
        }
        self.retransmit_head(now);
        if self.finished {
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
        if now.duration_since(self.last_activity) > Config::duration(config.idle_timeout_ms) {
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
            if self.finished {
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
                let _ = mx
                    .plumbing
                    .control
                    .send(smux::Frame::control(smux::Command::Nop, 0).encode());
            }
            keepalive_dead = now.duration_since(mx.last_rx) > timeout;
        }
        if keepalive_dead {
            self.end(
                SessionStatus::Failed,
                "smux keepalive timeout: nothing arrived from the client's smux".to_owned(),
                false,
            );
            return;
        }
        if !self.reorder.is_empty() {
            self.drain_reorder();
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

    fn violation(&mut self, reason: String) {
        if self.finished {
            return;
        }
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
        if self.finished {
            return;
        }
        if drain && !self.unacked.is_empty() && self.outbound.is_some() {
            if self.ending.is_none() {
                self.ending = Some((Instant::now() + DRAIN_LIMIT, status, reason));
            }
            return;
        }
        self.finish(status, reason);
    }

    fn finish(&mut self, status: SessionStatus, reason: String) {
        if self.finished {
            return;
        }
        self.finished = true;
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
        let data = if self.faults.legacy_channel_closed {
            m.encode_legacy()
        } else {
            m.encode()
        };
        self.to_client(ToClient::Frame {
            data,
            stream: false,
        });
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
                for s in mx.streams.values() {
                    s.task.abort();
                }
            }
            PortState::None => {}
        }
        self.outbound = None;
        self.shared.mark_ended(&self.info.id, status);
    }
}

fn chrono_like_now() -> String {
    // RFC 3339 in UTC, from epoch milliseconds (no calendar crate needed for tests).
    let ms = message::now_millis();
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
