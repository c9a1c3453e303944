//! The strict agent of one session (docs/protocol.md §9.1): the handshake with its version
//! gates and timeout, the reliability layer (acks, its own retransmission with the agent's RTO,
//! acceptance of client retransmissions, checks that the client acks everything and numbers
//! its stream correctly), basic and mux port forwarding, flags, timeouts and `channel_closed`.
//!
//! [`Agent`] is the session's core and does no I/O: it is handed each input with the time it
//! happened at (`handle`, `on_deadline`), says when it next needs the time (`next_deadline`),
//! and asks for every I/O the session does in [`Effect`]s: frames for the client's WebSocket,
//! dials and writes towards the targets, the shell and KMS. Its task (`task.rs`) is the thin
//! driver that owns the channels, the target tasks and the clock, and performs the effects in
//! order. So everything the agent decides can be driven input by input, at any time, in tests.
//!
//! One task per session. It outlives WebSocket connections, so that resumes continue the
//! sequence numbers, and it outlives the session's end until the last WebSocket of the session
//! has closed: every client frame that arrives is checked, whether on a connection a newer one
//! replaced, during the closing drain, or after `channel_closed` (as the real agent still parses
//! what reaches it). Once the session has begun to end, client data is checked but no longer
//! forwarded to the targets, and checks that depend on the session still running (a sequence
//! gap, a late HandshakeResponse) no longer apply.
//!
//! ```text
//!  mod.rs          the core: inputs, connections, the session's end (channel_closed)
//!  reliability.rs  sending, retransmitting, receiving, acks and their strict checks
//!  handshake.rs    the handshake, its version gates, flags
//!  ports.rs        basic and mux forwarding to the targets, smux checks
//!  shell.rs        a Standard_Stream session: the shell's terminal, its end after the transcript
//!  timers.rs       every timeout as a deadline
//!  faults.rs       fault injection
//!  task.rs         the driver: the session's task, its channels and target tasks, the clock
//! ```

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{Config, Faults, Mode};
use crate::message::{
    self, AcknowledgeContent, ChannelClosed, ClientMessage, FLAG_FIN, FLAG_SYN, HandshakeComplete,
    HandshakeRequest, HandshakeResponse, MessageType, RequestedClientAction, flag, payload_type,
};
use crate::port::{InTransit, PortEvent, StreamInput, TargetBacklog, ToTarget};
use crate::registry::{SessionInfo, SessionKind, Shared, lock};
use crate::report::{InjectedFaults, SessionReport, SessionStatus, Transfer};
use crate::shell::aws::{AgentAws, DataKeyContext};
use crate::shell::process::{ShellInput, ShellSetup};
use crate::smux;
use crate::version;

mod faults;
mod handshake;
mod ports;
mod reliability;
mod shell;
mod task;
#[cfg(test)]
mod tests;
mod timers;

pub(crate) use task::spawn;

/// What the agent task receives.
#[derive(Debug)]
pub(crate) enum AgentInput {
    /// A client WebSocket passed the open message: frames for it go to `outbound` (which
    /// the driver keeps; the core only learns the connection's id).
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
    /// From a shell session's task.
    Shell(crate::shell::process::ShellEvent),
    /// The gateway wrote a frame the core asked to hear about (`ToClient::Frame::on_written`).
    Written(Written),
}

/// A frame whose write the core waits for, as the agent waits for its own write to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// HandshakeComplete: the agent marks its handshake complete only once the write of it
    /// returned (`datachannel.go`), and drops the client's data until then.
    HandshakeComplete,
    /// A shell's first Output, while the handshake's skip is pending: the client may send
    /// from then on.
    FirstOutput,
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
        data: Bytes,
        stream: bool,
        room: Option<InTransit>,
        /// Reported back as [`AgentInput::Written`] once the gateway wrote this frame.
        on_written: Option<Written>,
    },
    /// Close the WebSocket.
    Close { code: u16, reason: String },
    /// A connection fault now.
    Inject(Injection),
}

/// An I/O the agent's core asks its driver for; the driver performs them in order.
pub(crate) enum Effect {
    /// For the client's WebSocket `conn_id`.
    Client { conn_id: u32, item: ToClient },
    /// Dial the basic connection of `generation` (an earlier one is closed by then); without
    /// a target the dial fails, reported as a `PortEvent` like any failed dial.
    DialBasic {
        generation: u64,
        target: Option<SocketAddr>,
    },
    /// Client bytes for the basic connection.
    ToBasic(ToTarget),
    /// Close the basic connection: its write side shuts down once what it holds is written.
    CloseBasic,
    /// Set the mux plumbing up (it reports `PortEvent::MuxReady` once it runs).
    StartMux,
    /// Dial the target of the client's smux stream `id`, after the dials before it; without
    /// a target the dial fails.
    OpenStream { id: u32, target: Option<SocketAddr> },
    /// The client's bytes or FIN for smux stream `id`.
    ToStream { id: u32, input: StreamInput },
    /// Smux stream `id` is over.
    ForgetStream { id: u32 },
    /// A frame of the agent's own smux (a NOP, a failed stream's FIN) towards the client.
    SmuxControl(Vec<u8>),
    /// Start the shell.
    StartShell(Box<ShellSetup>),
    /// Keys or a size for the shell's terminal.
    ToShell(ShellInput),
    /// Have KMS decrypt the client's data key; the answer comes back as a `ShellEvent`.
    DecryptDataKey {
        aws: Option<Arc<AgentAws>>,
        blob: Vec<u8>,
        context: DataKeyContext,
    },
    /// The session has ended: stop every target (a shell is cancelled, and its task still
    /// uploads the transcript).
    StopTargets,
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
    bytes: Bytes,
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
    Awaiting {
        since: Instant,
    },
    /// HandshakeComplete (sequence number `seq`) is on its way: the gateway has not written
    /// it yet, so the client cannot have seen it.
    CompleteSent {
        seq: i64,
    },
    Complete,
    /// A shell without KMS, whose handshake the agent skips just after its data channel
    /// opens; until then it acknowledges and drops the client's input ("Handshake still in
    /// progress", `datachannel.go`). The client cannot see that moment: the first Output
    /// written to it (`first_output`, once queued) is the earliest sign it has.
    SkipPending {
        first_output: Option<i64>,
    },
    Skipped,
}

impl Handshake {
    /// What the gateway reports back once it wrote the agent's message `seq`: only
    /// HandshakeComplete's write, while it is on its way.
    fn written_for(self, seq: i64) -> Option<Written> {
        match self {
            Self::CompleteSent { seq: sent } if sent == seq => Some(Written::HandshakeComplete),
            Self::SkipPending {
                first_output: Some(first),
            } if first == seq => Some(Written::FirstOutput),
            _ => None,
        }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BasicState {
    Idle,
    Dialing,
    Up,
}

struct BasicPort {
    generation: u64,
    state: BasicState,
}

/// The forwarding side of mux mode (what the checks see is in [`SmuxLedger`]).
struct MuxPort {
    /// The smux server is set up: until then, as in the agent (which sets it up only after the
    /// handshake, in tasks of its own), client data and flags are not acknowledged.
    ready: bool,
    /// The streams whose targets the driver dialled (or is dialling) and not yet forgotten.
    streams: HashSet<u32>,
    keepalive: bool,
    last_rx: Instant,
    last_nop: Instant,
}

enum PortState {
    None,
    Basic(BasicPort),
    Mux(MuxPort),
    Shell(Box<shell::ShellPort>),
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
    /// Those the client sent FIN for: it may write on them no more.
    fin_from_client: HashSet<u32>,
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

/// The agent of one session, without I/O: see the module's comment.
pub(crate) struct Agent {
    shared: Arc<Shared>,
    info: Arc<SessionInfo>,
    report: Arc<Mutex<SessionReport>>,
    faults: Faults,
    mode: Mode,
    strict: bool,
    /// The time of the input being handled.
    now: Instant,
    /// What the driver is to do, in order.
    effects: Vec<Effect>,
    // Connections.
    /// The connection output goes to.
    conn_id: Option<u32>,
    /// The newest connection attached; older ones have been replaced.
    latest_conn: Option<u32>,
    /// Connections that may still deliver client frames.
    connections: HashSet<u32>,
    detached_since: Option<Instant>,
    // Sending.
    next_seq: i64,
    unacked: VecDeque<Outgoing>,
    unsent: usize,
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
    /// The client Output last checked while the session ends (it is resent, never taken).
    checked_while_closing: Option<i64>,
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
    /// The HandshakeResponse's ack goes out before HandshakeComplete (else after it); in a KMS
    /// shell, before the EncChallengeRequest, and the EncChallengeResponse's before
    /// HandshakeComplete.
    handshake_ack_first: bool,
    /// A KMS shell's HandshakeResponse, acknowledged once KMS has decrypted its data key: the
    /// agent calls KMS on its receive path, and acks what it received only after.
    response_to_ack: Option<ClientMessage>,
    transfer: Option<Transfer>,
    port: PortState,
    smux: Option<SmuxLedger>,
    last_activity: Instant,
    /// The origin of the resend checks' grid: the agent's resend scheduler looks every
    /// [`TICK`], whatever else happens.
    resend_grid: Instant,
    /// The last resend check: the next is on the grid after it, so that at most one message is
    /// resent per [`TICK`], as by the agent's scheduler.
    resend_checked: Option<Instant>,
    ending: Option<Drain>,
    /// The status the session ended with, once `channel_closed` went out.
    finished: Option<SessionStatus>,
    /// When the client first attached (a shell's maximum duration counts from it).
    started: Option<Instant>,
    /// A shell session's transcript has yet to go where its document says: the session is
    /// not over before it has.
    transcript_pending: bool,
    /// The shell exited by itself: the session ends once its transcript is uploaded.
    shell_exited: bool,
}

impl Agent {
    pub(crate) fn new(
        shared: Arc<Shared>,
        info: Arc<SessionInfo>,
        report: Arc<Mutex<SessionReport>>,
        now: Instant,
    ) -> Self {
        let config: &Config = &shared.config;
        Self {
            handshake_ack_first: config.handshake_ack.ack_first(&info.id),
            response_to_ack: None,
            faults: info.faults.clone(),
            mode: config.mode,
            strict: config.strict,
            shared: shared.clone(),
            info,
            report,
            now,
            effects: Vec::new(),
            conn_id: None,
            latest_conn: None,
            connections: HashSet::new(),
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
            checked_while_closing: None,
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
            resend_grid: now,
            resend_checked: None,
            ending: None,
            finished: None,
            started: None,
            transcript_pending: false,
            shell_exited: false,
        }
    }

    /// The I/O asked for since the last call, in order (the buffer is kept for the next).
    pub(crate) fn take_effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effects.drain(..)
    }

    /// The session's status once it has ended (`Terminated` when it had not: the emulator is
    /// shutting down).
    pub(crate) fn shut_down(&mut self, now: Instant) -> SessionStatus {
        self.now = now;
        if self.finished.is_none() {
            self.finish(SessionStatus::Terminated, "emulator shut down".to_owned());
        }
        self.finished.unwrap_or(SessionStatus::Terminated)
    }

    /// Finished, and no connection can deliver another client frame.
    pub(crate) fn is_over(&self) -> bool {
        self.finished.is_some()
            && self.connections.is_empty()
            && self.held.is_empty()
            && !self.transcript_pending
    }

    /// The agent's receive path is blocked: it processes client frames synchronously and
    /// writes their bytes towards the targets, and stops reading the WebSocket altogether
    /// (acks included) while they do not take them: in mux mode once its smux receive buffer
    /// is full, in basic mode once its socket write blocks. Never once the session is over:
    /// then frames are only checked.
    /// So is it while KMS decrypts a shell's data key: the agent calls KMS from its receive path.
    fn receive_stalled(&self) -> bool {
        let limit = match &self.port {
            _ if self.finished.is_some() => return false,
            _ if self.decrypting_data_key() => return true,
            PortState::Mux(_) => MUX_RECEIVE_BUFFER,
            PortState::Basic(_) | PortState::Shell(_) => BASIC_WRITE_BUFFER,
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

    /// The connection output goes to, if any.
    pub(crate) fn connection(&self) -> Option<u32> {
        self.conn_id
    }

    /// Client frames wait for the targets to take what the agent gave them.
    pub(crate) fn holds_frames(&self) -> bool {
        !self.held.is_empty()
    }

    /// The bytes given to the targets and not yet written.
    pub(crate) fn target_backlog(&self) -> &TargetBacklog {
        &self.target_backlog
    }

    /// The targets took some of what they were given: held frames are read if they fit now.
    pub(crate) fn on_backlog_drained(&mut self, now: Instant) {
        self.now = now;
        self.release_held();
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

    /// Handles one input that happened at `now`.
    pub(crate) fn handle(&mut self, input: AgentInput, now: Instant) {
        self.now = now;
        match input {
            AgentInput::Attach { conn_id, .. } => self.on_attach(conn_id),
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
                self.send_to_client(ToClient::Inject(i));
            }
            AgentInput::Port(event) => self.on_port_event(event),
            AgentInput::Shell(event) => self.on_shell_event(event),
            AgentInput::Written(Written::HandshakeComplete) => {
                if matches!(self.handshake, Handshake::CompleteSent { .. }) {
                    self.handshake = Handshake::Complete;
                }
            }
            AgentInput::Written(Written::FirstOutput) => {
                if matches!(self.handshake, Handshake::SkipPending { .. }) {
                    self.handshake = Handshake::Skipped;
                }
            }
        }
        self.release_held();
    }

    fn on_attach(&mut self, conn_id: u32) {
        self.connections.insert(conn_id);
        self.latest_conn = Some(self.latest_conn.map_or(conn_id, |l| l.max(conn_id)));
        lock(&self.report).connections += 1;
        if self.finished.is_some() {
            // Opened just as the session ended: close it (its frames are still checked).
            self.effects.push(Effect::Client {
                conn_id,
                item: ToClient::Close {
                    code: 1000,
                    reason: String::new(),
                },
            });
            return;
        }
        self.conn_id = Some(conn_id);
        self.detached_since = None;
        lock(&self.report).status = SessionStatus::Connected;
        // What went out on the old connection may never have reached the client (a black hole
        // swallows it), so its unacknowledged output is judged afresh on the new one.
        for out in &mut self.unacked {
            out.retransmits = 0;
            out.client_frames_mark = None;
        }
        if self.handshake == Handshake::NotStarted {
            self.started = Some(self.now);
            match self.info.kind {
                SessionKind::Port(_) => self.start_handshake(),
                SessionKind::Shell(_) => self.start_shell(),
            }
        }
        self.flush_unsent();
    }

    fn on_detach(&mut self, conn_id: u32) {
        if self.conn_id != Some(conn_id) {
            return;
        }
        self.conn_id = None;
        self.detached_since = Some(self.now);
        if !self.is_closing() {
            lock(&self.report).status = SessionStatus::Disconnected;
        }
    }

    /// Hands `item` to the current connection; false when there is none.
    fn send_to_client(&mut self, item: ToClient) -> bool {
        let Some(conn_id) = self.conn_id else {
            return false;
        };
        self.effects.push(Effect::Client { conn_id, item });
        true
    }

    fn send_control(&mut self, message: &ClientMessage) -> bool {
        self.send_to_client(ToClient::Frame {
            data: message.encode().into(),
            stream: false,
            room: None,
            on_written: None,
        })
    }

    fn set_transfer(&mut self, transfer: Transfer) {
        self.transfer = Some(transfer);
        lock(&self.report).transfer = Some(transfer);
    }

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
        if drain && !self.unacked.is_empty() && self.conn_id.is_some() {
            if self.ending.is_none() {
                self.ending = Some(Drain {
                    deadline: self.now + DRAIN_LIMIT,
                    status,
                    reason,
                });
            }
            return;
        }
        self.ending = None;
        self.finish(status, reason);
    }

    /// Ends the session once the message being processed is acknowledged and the client has
    /// acknowledged the agent's output (at most [`DRAIN_LIMIT`]): the agent's end on the
    /// TerminateSession flag, which it acknowledges after handing it over, then closes its data
    /// channel after resending what the client has not acknowledged.
    fn end_after_ack(&mut self, status: SessionStatus, reason: String) {
        if self.finished.is_some() || self.ending.is_some() {
            return;
        }
        if self.conn_id.is_none() {
            self.finish(status, reason);
            return;
        }
        self.ending = Some(Drain {
            deadline: self.now + DRAIN_LIMIT,
            status,
            reason,
        });
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
        let output = if status == SessionStatus::Failed || reason.starts_with("Session ") {
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
        let data = Bytes::from(data);
        if self.send_to_client(ToClient::Frame {
            data,
            stream: false,
            room: None,
            on_written: None,
        }) && legacy
        {
            self.count(|f| f.legacy_channels_closed += 1);
        }
        self.send_to_client(ToClient::Close {
            code: 1000,
            reason: String::new(),
        });
        self.port = PortState::None;
        self.effects.push(Effect::StopTargets);
        self.conn_id = None;
        self.shared.mark_finished(&self.info.id);
    }
}

fn chrono_like_now() -> String {
    // RFC 3339 in UTC, from epoch milliseconds (no calendar crate needed for tests).
    let ms = message::now_millis();
    format!("{}.{:03}", ms / 1000, ms % 1000)
}
