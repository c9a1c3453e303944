use std::time::SystemTime;

use tokio::sync::mpsc;

use super::*;
use crate::config::InstanceConfig;
use crate::registry::{PortProperties, SessionEntry, SessionKind};
use crate::shell::encryption::AgentCipher;
use crate::shell::process::ShellEvent;

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
/// input by input, at times the test chooses, without a task, a clock or a real target.
struct Harness {
    agent: Agent,
    report: Arc<Mutex<SessionReport>>,
    shared: Arc<Shared>,
    /// The time inputs happen at.
    now: Instant,
    /// What each connection was sent and has not been read by the test yet.
    to_client: Vec<VecDeque<ToClient>>,
    /// What was written towards the basic target and not yet taken by it.
    to_target: VecDeque<ToTarget>,
    client_seq: i64,
    /// Whether the gateway writes a frame the agent waits for at once (and says so); when
    /// false, the test says when with [`Harness::gateway_writes`].
    writes_at_once: bool,
    /// Frames the agent waits to hear were written, not written yet.
    unwritten: Vec<Written>,
    /// What the agent asked KMS to decrypt a data key with.
    decrypts: Vec<DataKeyContext>,
}

impl Harness {
    /// An SSH session (basic mode).
    fn new(strict: bool) -> Self {
        let mut json = serde_json::Map::new();
        json.insert("portNumber".into(), "22".into());
        Self::of(
            strict,
            SessionKind::Port(PortProperties {
                json,
                port: 22,
                host: None,
                local_port_forwarding: false,
            }),
        )
    }

    /// A shell session whose document asks for KMS encryption with `key`.
    fn kms_shell(strict: bool, key: &str) -> Self {
        Self::of(
            strict,
            SessionKind::Shell(crate::shell::ShellInputs {
                kms_key_id: key.to_owned(),
                ..Default::default()
            }),
        )
    }

    fn of(strict: bool, kind: SessionKind) -> Self {
        let shared = Arc::new(Shared::new(Config {
            strict,
            mode: Mode::Fast,
            ..Config::default()
        }));
        let info = Arc::new(SessionInfo {
            id: SESSION.to_owned(),
            document_name: "AWS-StartSSHSession".to_owned(),
            owner: "test".to_owned(),
            reason: None,
            kind,
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
        let now = Instant::now();
        lock(&shared.sessions).insert(
            SESSION.to_owned(),
            SessionEntry {
                info: info.clone(),
                token: None,
                started: SystemTime::now(),
                finished: false,
                ended: None,
                agent: Some(inbox),
                report: report.clone(),
                next_connection: 0,
            },
        );
        let agent = Agent::new(shared.clone(), info, report.clone(), now);
        let mut h = Self {
            agent,
            report,
            shared,
            now,
            to_client: Vec::new(),
            to_target: VecDeque::new(),
            client_seq: 0,
            writes_at_once: true,
            unwritten: Vec::new(),
            decrypts: Vec::new(),
        };
        h.attach();
        h
    }

    /// Hands the agent `input` now, and takes what it asks for.
    fn handle(&mut self, input: AgentInput) {
        self.agent.handle(input, self.now);
        self.take_effects();
    }

    /// Moves the time to `at`, and wakes the agent if a deadline is due by then.
    fn advance_to(&mut self, at: Instant) {
        self.now = at;
        if self.agent.next_deadline().is_some_and(|d| d <= at) {
            self.agent.on_deadline(at);
        }
        self.take_effects();
    }

    /// The target takes everything written to it so far; returns how many writes it took.
    fn target_reads(&mut self) -> usize {
        let taken = self.to_target.drain(..).count();
        self.agent.on_backlog_drained(self.now);
        self.take_effects();
        taken
    }

    fn take_effects(&mut self) {
        for effect in self.agent.take_effects() {
            match effect {
                Effect::Client { conn_id, item } => {
                    if let ToClient::Frame {
                        on_written: Some(written),
                        ..
                    } = &item
                    {
                        self.unwritten.push(*written);
                    }
                    self.to_client[conn_id as usize].push_back(item);
                }
                Effect::ToBasic(chunk) => self.to_target.push_back(chunk),
                Effect::DecryptDataKey { context, .. } => self.decrypts.push(context),
                _ => {}
            }
        }
        if self.writes_at_once {
            self.gateway_writes();
        }
    }

    /// The gateway writes the frames the agent waits for, and says so.
    fn gateway_writes(&mut self) {
        for written in std::mem::take(&mut self.unwritten) {
            self.handle(AgentInput::Written(written));
        }
    }

    /// Attaches a new connection; returns its id.
    fn attach(&mut self) -> u32 {
        let conn_id = self.to_client.len() as u32;
        // The core never uses the sender (its driver does).
        let (outbound, _) = mpsc::unbounded_channel();
        self.to_client.push(VecDeque::new());
        self.handle(AgentInput::Attach { conn_id, outbound });
        conn_id
    }

    fn latest(&self) -> u32 {
        self.to_client.len() as u32 - 1
    }

    fn frame_on(&mut self, conn_id: u32, data: Vec<u8>) {
        self.handle(AgentInput::ClientFrame {
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
        if let Some(sent) = self.to_client.last_mut() {
            while let Some(item) = sent.pop_front() {
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
    /// HandshakeComplete (unacknowledged).
    fn open_basic(&mut self) -> ClientMessage {
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
        self.handle(AgentInput::Port(PortEvent::BasicUp { generation: 1 }));
        complete
    }

    /// The target writes `banner` and closes: the SSH session drains, then ends.
    fn target_says_and_closes(&mut self, banner: &[u8]) -> ClientMessage {
        let room = std::sync::Arc::new(tokio::sync::Semaphore::new(banner.len()))
            .try_acquire_many_owned(banner.len() as u32)
            .expect("room");
        self.handle(AgentInput::Port(PortEvent::BasicData {
            generation: 1,
            data: banner.to_vec(),
            room,
        }));
        self.handle(AgentInput::Port(PortEvent::BasicClosed { generation: 1 }));
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
    let complete = h.open_basic();
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
        h.handle(AgentInput::Port(PortEvent::BasicData {
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
fn data_sent_before_handshake_complete_was_written_is_dropped_as_the_agent_does() {
    let mut h = Harness::new(false);
    h.writes_at_once = false;
    let complete = h.open_basic();
    assert_eq!(h.unwritten, [Written::HandshakeComplete]);
    // A client that sends right after its HandshakeResponse, without waiting for
    // HandshakeComplete: the agent acknowledges and drops it.
    let early = h.input(payload_type::OUTPUT, b"early");
    h.frame(early.encode());
    assert!(h.to_target.is_empty(), "{:?}", h.to_target);
    let violations = h.report().violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].contains("Output (seq 1) before HandshakeComplete reached the client"),
        "{violations:?}"
    );
    // Once written, the client's data is the session's.
    h.gateway_writes();
    h.ack(&complete);
    let late = h.input(payload_type::OUTPUT, b"late");
    h.frame(late.encode());
    assert_eq!(h.to_target.len(), 1);
    assert_eq!(h.report().bytes_from_client, 4);
    assert_eq!(h.report().violations.len(), 1, "{:?}", h.report());
}

#[test]
fn handshake_complete_resent_on_a_new_connection_is_awaited_there() {
    let mut h = Harness::new(false);
    h.writes_at_once = false;
    let _ = h.open_basic();
    // The connection went away before the gateway wrote HandshakeComplete: its resend on the
    // next connection is the one the agent waits for.
    h.unwritten.clear();
    h.attach();
    h.advance_to(h.now + Duration::from_secs(1));
    let resent = h.outputs();
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!(resent[0].payload_type, payload_type::HANDSHAKE_COMPLETE);
    assert_eq!(h.unwritten, [Written::HandshakeComplete]);
    h.gateway_writes();
    let data = h.input(payload_type::OUTPUT, b"data");
    h.frame(data.encode());
    assert_eq!(h.to_target.len(), 1);
    assert!(h.report().violations.is_empty(), "{:?}", h.report());
}

#[test]
fn a_target_that_does_not_read_stalls_the_receive_path_until_it_does() {
    let mut h = Harness::new(false);
    let complete = h.open_basic();
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
    drop(h.to_target.pop_front().expect("written towards the target"));
    h.agent.on_backlog_drained(h.now);
    h.take_effects();
    assert_eq!(acks(&mut h), 1);
    assert_eq!(h.target_reads(), 65);
    assert_eq!(acks(&mut h), 14);
    assert!(h.agent.held.is_empty());
    assert_eq!(h.report().bytes_from_client, 80 * 1024);
    assert!(h.report().violations.is_empty(), "{:?}", h.report());
}

#[test]
fn the_closing_drain_checks_client_frames_and_ends_once_all_is_acknowledged() {
    let mut h = Harness::new(false);
    let complete = h.open_basic();
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
fn client_data_during_the_drain_is_neither_acknowledged_nor_forwarded() {
    let mut h = Harness::new(true);
    let complete = h.open_basic();
    h.ack(&complete);
    let _banner = h.target_says_and_closes(b"bye");
    assert!(h.agent.ending.is_some(), "draining");
    let _ = h.received();
    let before = h.report().bytes_from_client;
    // The agent's port plugin has stopped: its write fails, so it acknowledges nothing and
    // the client resends.
    let late = h.input(payload_type::OUTPUT, b"late");
    h.frame(late.encode());
    h.frame(late.encode());
    let acks = h
        .received()
        .into_iter()
        .filter(|(m, _)| m.message_type == MessageType::Acknowledge)
        .count();
    assert_eq!(acks, 0);
    assert_eq!(h.report().bytes_from_client, before);
    assert!(h.report().violations.is_empty(), "{:?}", h.report());
}

#[test]
fn a_violation_during_the_drain_fails_a_strict_session() {
    let mut h = Harness::new(true);
    h.open_basic();
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

/// The agent acknowledges the TerminateSession flag once it has handed it over, resends what
/// the client has not acknowledged for at most two seconds, and only then closes the channel;
/// a second flag (a new one, not a retransmission) is never acknowledged: the agent's receive
/// path blocks on it.
#[test]
fn the_terminate_flag_is_acknowledged_and_unacknowledged_output_resent_before_the_close() {
    let mut h = Harness::new(true);
    let complete = h.open_basic();
    let _ = h.received();
    let start = h.now;
    let terminate = h.input(
        payload_type::FLAG,
        &message::flag_payload(flag::TERMINATE_SESSION),
    );
    h.frame(terminate.encode());
    let sent = h.received();
    let acked: Vec<i64> = (sent.iter())
        .filter(|(m, _)| m.message_type == MessageType::Acknowledge)
        .filter_map(|(m, _)| {
            let ack: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
            ack["AcknowledgedMessageSequenceNumber"].as_i64()
        })
        .collect();
    assert_eq!(
        acked,
        [terminate.sequence_number],
        "the flag is acknowledged"
    );
    assert!(sent.iter().all(|(_, close)| !close), "not closed yet");
    assert_eq!(h.agent.finished, None);

    // A new flag: not acknowledged.
    let again = h.input(
        payload_type::FLAG,
        &message::flag_payload(flag::TERMINATE_SESSION),
    );
    h.frame(again.encode());
    assert!(
        (h.received().iter()).all(|(m, _)| m.message_type != MessageType::Acknowledge),
        "a second TerminateSession is never acknowledged"
    );

    // HandshakeComplete is resent until the drain ends, then the channel closes.
    let end = h.run_until(100, |h| h.agent.finished.is_some());
    assert_eq!(h.agent.finished, Some(SessionStatus::Terminated));
    let sent = h.received();
    assert!(
        (sent.iter()).any(|(m, _)| m.sequence_number == complete.sequence_number
            && m.payload_type == payload_type::HANDSHAKE_COMPLETE),
        "resent while draining: {sent:?}"
    );
    assert!(sent.iter().any(|(_, close)| *close), "then closed");
    assert!(end <= start + DRAIN_LIMIT, "within the drain limit");
    assert!(h.report().violations.is_empty(), "{:?}", h.report());
}

#[test]
fn frames_after_channel_closed_are_checked_and_legal_ones_pass() {
    let mut h = Harness::new(true);
    let complete = h.open_basic();
    let terminate = h.input(
        payload_type::FLAG,
        &message::flag_payload(flag::TERMINATE_SESSION),
    );
    h.frame(terminate.encode());
    // Acknowledged; the end waits for the client's ack of HandshakeComplete.
    assert_eq!(h.agent.finished, None);
    h.ack(&complete);
    assert_eq!(h.agent.finished, Some(SessionStatus::Terminated));
    assert!(!h.agent.is_over(), "its WebSocket is still open");

    // Legal after the end: a repeated ack, a retransmission, more data (checked, not
    // forwarded).
    h.ack(&complete);
    h.frame(terminate.encode());
    let data = h.input(payload_type::OUTPUT, b"crossing");
    h.frame(data.encode());
    let report = h.report();
    assert!(report.violations.is_empty(), "{report:?}");
    assert_eq!(report.repeated_acks_from_client, 1);
    assert_eq!(report.duplicates_from_client, 1);
    assert!(h.to_target.is_empty(), "nothing reaches the target");

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
    assert_eq!(
        report.client_frames_after_end, 5,
        "the drain's ack included"
    );

    h.handle(AgentInput::Closed { conn_id: 0 });
    assert!(h.agent.is_over());
}

#[test]
fn frames_on_a_replaced_connection_are_checked() {
    let mut h = Harness::new(true);
    let complete = h.open_basic();
    let old = h.latest();
    h.attach();
    h.handle(AgentInput::Detach { conn_id: old });
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
    h.handle(AgentInput::Terminate);
    assert!(h.agent.finished.is_some());
    let late = h.attach();
    assert!(h.received().iter().any(|(_, close)| *close));
    assert!(!h.agent.is_over());
    h.handle(AgentInput::Closed { conn_id: 0 });
    h.handle(AgentInput::Closed { conn_id: late });
    assert!(h.agent.is_over());
}

impl Harness {
    /// Moves the time from deadline to deadline until `done` holds (at most `limit` wake-ups);
    /// returns the time it held at.
    fn run_until(&mut self, limit: usize, done: impl Fn(&Self) -> bool) -> Instant {
        for _ in 0..limit {
            if done(self) {
                return self.now;
            }
            let at = self
                .agent
                .next_deadline()
                .expect("a deadline while not done");
            self.advance_to(at);
        }
        panic!("not done after {limit} deadlines: {:?}", self.report());
    }
}

#[test]
fn unacknowledged_output_is_resent_on_the_schedulers_grid_once_its_rto_has_passed() {
    let mut h = Harness::new(true);
    let start = h.now;
    // The HandshakeRequest is acknowledged at once: an RTT sample of 0 takes the RTO from
    // 200 ms to 100 ms × 7/8 + max(10, 4 × 25) ms = 187.5 ms.
    let complete = h.open_basic();
    assert_eq!(h.agent.rto.rto(), Duration::from_micros(187_500));
    // Due 187.5 ms after HandshakeComplete went out; resent at the next check on the 100 ms grid.
    let due = h.agent.next_deadline().expect("a resend is due");
    assert_eq!(due - start, Duration::from_millis(200));
    h.advance_to(due - Duration::from_millis(1));
    assert!(h.outputs().is_empty(), "nothing before the check");
    h.advance_to(due);
    let resent = h.outputs();
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!(resent[0].message_id, complete.message_id);
    assert_eq!(h.report().retransmissions_to_client, 1);
    h.ack(&complete);
    assert!(
        h.agent
            .next_deadline()
            .is_some_and(|d| d - h.now > Duration::from_secs(1)),
        "nothing is due soon once all is acknowledged"
    );
}

#[test]
fn a_client_that_never_answers_the_handshake_is_timed_out_at_its_deadline() {
    let mut h = Harness::new(true);
    let start = h.now;
    let ended = h.run_until(1000, |h| h.agent.finished.is_some());
    let timeout = Config::duration(h.shared.config.handshake_timeout_ms);
    assert!(ended - start > timeout, "ended after {:?}", ended - start);
    assert!(ended - start <= timeout + Duration::from_millis(1));
    let report = h.report();
    assert_eq!(h.agent.finished, Some(SessionStatus::Failed));
    assert!(
        (report.close_reason.as_deref()).is_some_and(|r| r.contains("Handshake timed out")),
        "{report:?}"
    );
    assert!(
        report.retransmissions_to_client > 0,
        "the request was resent meanwhile"
    );
}

#[test]
fn the_closing_drain_gives_up_after_its_limit_when_the_client_never_acknowledges() {
    let mut h = Harness::new(false);
    let _ = h.open_basic();
    h.target_says_and_closes(b"SSH-2.0-test\r\n");
    let began = h.now;
    let ended = h.run_until(1000, |h| h.agent.finished.is_some());
    assert!(
        ended - began >= DRAIN_LIMIT,
        "ended after {:?}",
        ended - began
    );
    assert!(ended - began <= DRAIN_LIMIT + TICK);
    let report = h.report();
    assert_eq!(
        report.close_reason.as_deref(),
        Some("the target closed the connection")
    );
    assert_eq!(
        report.unacked_at_close, 2,
        "HandshakeComplete and the banner"
    );
}

/// A KMS shell's handshake up to the data key: the client's HandshakeResponse with `result` as
/// its KMSEncryption action's result; returns the HandshakeRequest's challenge and the
/// response.
fn kms_handshake(h: &mut Harness, result: serde_json::Value) -> (String, ClientMessage) {
    let request = h.outputs().remove(0);
    assert_eq!(request.payload_type, payload_type::HANDSHAKE_REQUEST);
    h.ack(&request);
    let request: serde_json::Value = serde_json::from_slice(&request.payload).expect("json");
    let challenge = request["RequestedClientActions"][1]["ActionParameters"]["Challenge"]
        .as_str()
        .expect("a challenge")
        .to_owned();
    let response = serde_json::json!({
        "ClientVersion": "1.2.764.0",
        "ProcessedClientActions": [
            {"ActionType": "SessionType", "ActionStatus": 1},
            {"ActionType": "KMSEncryption", "ActionStatus": 1, "ActionResult": result},
        ],
    });
    let m = h.input(
        payload_type::HANDSHAKE_RESPONSE,
        &serde_json::to_vec(&response).expect("json"),
    );
    h.frame(m.encode());
    (challenge, m)
}

/// The agent decrypts the client's data key under the document's key (KMS refuses a blob
/// made under another) and, when the client acknowledged the challenge, with it in the
/// encryption context; a second HandshakeResponse is a violation (the agent's receive path
/// blocks on it).
#[test]
fn a_kms_shell_decrypts_under_the_documents_key_with_the_challenge_when_acknowledged() {
    let blob = "AQIDBA==";
    let mut h = Harness::kms_shell(false, "alias/tenant");
    let (challenge, _) = kms_handshake(
        &mut h,
        serde_json::json!({"KMSCipherTextKey": blob, "KMSCipherTextHash": null}),
    );
    let [decrypt] = h.decrypts.as_slice() else {
        panic!("one decrypt: {:?}", h.decrypts);
    };
    assert_eq!(
        (decrypt.key_id.as_str(), decrypt.random_challenge.as_deref()),
        ("alias/tenant", None)
    );
    assert_eq!(decrypt.target, "i-0123456789abcdef0");
    assert!(h.report().violations.is_empty(), "{:?}", h.report());

    let mut h = Harness::kms_shell(false, "alias/tenant");
    let (challenge_sent, _) = kms_handshake(
        &mut h,
        serde_json::json!({"KMSCipherTextKey": blob, "ChallengeAcknowledgement": true}),
    );
    assert_ne!(challenge_sent, challenge, "a fresh challenge per session");
    assert_eq!(
        h.decrypts[0].random_challenge.as_deref(),
        Some(challenge_sent.as_str())
    );
    let again = serde_json::json!({
        "ClientVersion": "1.2.764.0",
        "ProcessedClientActions": [
            {"ActionType": "SessionType", "ActionStatus": 1},
            {"ActionType": "KMSEncryption", "ActionStatus": 1, "ActionResult": {"KMSCipherTextKey": blob}},
        ],
    });
    let m = h.input(
        payload_type::HANDSHAKE_RESPONSE,
        &serde_json::to_vec(&again).expect("json"),
    );
    h.frame(m.encode());
    // Read once KMS has answered (the receive path waits for it).
    h.handle(AgentInput::Shell(ShellEvent::DataKey(Ok([
        [1u8; 32], [2u8; 32],
    ]
    .concat()))));
    assert_eq!(h.decrypts.len(), 1, "not decrypted again");
    assert!(
        (h.report().violations.iter()).any(|v| v.starts_with("a second HandshakeResponse")),
        "{:?}",
        h.report()
    );

    let mut h = Harness::kms_shell(false, "alias/tenant");
    kms_handshake(
        &mut h,
        serde_json::json!({"KMSCipherTextKey": blob, "ChallengeAcknowledgement": "true"}),
    );
    assert!(h.decrypts.is_empty());
    assert_eq!(
        h.report().violations,
        ["the KMSEncryption action's ChallengeAcknowledgement is \"true\", not a JSON boolean"]
    );
}

/// The agent calls KMS on its receive path: a KMS shell's HandshakeResponse is acknowledged only
/// once KMS has decrypted its data key, and nothing the client sends meanwhile (a
/// retransmission of the response here) is read or acknowledged before then.
#[test]
fn a_kms_shells_receive_path_waits_for_kms() {
    let mut h = Harness::kms_shell(true, "alias/tenant");
    let (_, response) = kms_handshake(&mut h, serde_json::json!({"KMSCipherTextKey": "AQIDBA=="}));
    let acked = |sent: &[(ClientMessage, bool)]| -> Vec<i64> {
        (sent.iter())
            .filter(|(m, _)| m.message_type == MessageType::Acknowledge)
            .filter_map(|(m, _)| {
                let ack: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
                ack["AcknowledgedMessageSequenceNumber"].as_i64()
            })
            .collect()
    };
    let response_seq = response.sequence_number;
    assert_eq!(acked(&h.received()), Vec::<i64>::new(), "not yet");
    h.frame(response.encode());
    assert_eq!(acked(&h.received()), Vec::<i64>::new(), "held, unread");

    h.handle(AgentInput::Shell(ShellEvent::DataKey(Ok([
        [1u8; 32], [2u8; 32],
    ]
    .concat()))));
    let sent = h.received();
    assert_eq!(
        acked(&sent),
        [response_seq, response_seq],
        "the response, then its retransmission"
    );
    assert!(
        (sent.iter()).any(|(m, _)| m.payload_type == payload_type::ENC_CHALLENGE_REQUEST),
        "{sent:?}"
    );
    assert!(h.report().violations.is_empty(), "{:?}", h.report());
}

/// A shell without KMS: the agent skips its handshake just after its data channel opens, and
/// acknowledges and drops what the client sends before that. The client cannot tell that
/// moment before the first Output is written to it, so input until then is a violation,
/// acknowledged and dropped; after it, keys reach the terminal.
#[test]
fn a_plain_shell_takes_input_once_its_first_output_was_written() {
    let mut h = Harness::of(
        false,
        SessionKind::Shell(crate::shell::ShellInputs::default()),
    );
    h.writes_at_once = false;
    let acked = |sent: &[(ClientMessage, bool)], seq: i64| {
        (sent.iter())
            .filter(|(m, _)| m.message_type == MessageType::Acknowledge)
            .any(|(m, _)| {
                serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .is_ok_and(|ack| ack["AcknowledgedMessageSequenceNumber"] == seq)
            })
    };
    let too_early = |seq: i64| {
        format!(
            "Output (seq {seq}) before the agent's first Output reached the client (a shell without KMS drops input until the agent has skipped its handshake, which the client cannot tell before that Output); the agent discards it"
        )
    };

    let before_shell = h.input(payload_type::OUTPUT, b"ls\r");
    h.frame(before_shell.encode());
    assert!(acked(&h.received(), 0), "acknowledged, as the agent does");
    h.handle(AgentInput::Shell(ShellEvent::Started {
        run_as_user: String::new(),
    }));
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(2))
        .try_acquire_many_owned(2)
        .expect("room");
    h.handle(AgentInput::Shell(ShellEvent::Output {
        data: b"$ ".to_vec(),
        room,
    }));
    // The prompt is on its way, not written yet: still too early.
    let before_written = h.input(payload_type::OUTPUT, b"pwd\r");
    h.frame(before_written.encode());
    assert_eq!(h.report().violations, [too_early(0), too_early(1)]);
    assert_eq!(
        h.report().bytes_from_client,
        0,
        "nothing reached the terminal"
    );

    h.gateway_writes();
    let after = h.input(payload_type::OUTPUT, b"id\r");
    h.frame(after.encode());
    assert!(acked(&h.received(), 2));
    assert_eq!(h.report().violations.len(), 2, "{:?}", h.report());
    assert_eq!(
        h.report().bytes_from_client,
        3,
        "the keys reached the terminal"
    );
}

/// A shell without KMS that has written nothing yet still ends at its idle timeout, as the
/// agent's does (its idle timer runs from the start; only a handshake has a timer of its own).
#[test]
fn a_silent_plain_shell_still_ends_at_its_idle_timeout() {
    let mut h = Harness::of(
        true,
        SessionKind::Shell(crate::shell::ShellInputs::default()),
    );
    h.run_until(100, |h| h.agent.finished.is_some());
    assert_eq!(
        h.report().close_reason.as_deref(),
        Some("Session idle timeout")
    );
}

/// The agent gives the client 15 s for its HandshakeResponse (the KMS decrypt included), then
/// a fresh 15 s from the encryption challenge on, each failing in the agent's words.
#[test]
fn the_encryption_challenge_has_a_timeout_of_its_own() {
    let limit = Duration::from_millis(Config::default().handshake_timeout_ms);
    let mut h = Harness::kms_shell(true, "alias/tenant");
    let start = h.now;
    h.now = start + limit - Duration::from_secs(1);
    kms_handshake(&mut h, serde_json::json!({"KMSCipherTextKey": "AQIDBA=="}));
    let data_key = [[1u8; 32], [2u8; 32]].concat();
    h.handle(AgentInput::Shell(ShellEvent::DataKey(Ok(data_key))));
    let challenged = h.now;
    assert!(
        (h.outputs().iter()).any(|m| m.payload_type == payload_type::ENC_CHALLENGE_REQUEST),
        "the challenge went out"
    );
    h.advance_to(challenged + limit - Duration::from_millis(1));
    assert_eq!(
        h.agent.finished, None,
        "past the request's 15 s, within the challenge's"
    );
    let end = h.run_until(100, |h| h.agent.finished.is_some());
    assert!(end > challenged + limit);
    assert_eq!(h.agent.finished, Some(SessionStatus::Failed));
    assert_eq!(
        h.report().close_reason.as_deref(),
        Some(
            "Encountered error while initiating handshake. Timed out waiting for encryption challenge."
        )
    );
}

/// A second answer to the challenge, once the first was right, is a violation; the session
/// stays encrypted (it used to fall back to plaintext in lenient mode).
#[test]
fn a_second_answer_to_the_challenge_leaves_the_session_encrypted() {
    let mut h = Harness::kms_shell(false, "alias/tenant");
    kms_handshake(&mut h, serde_json::json!({"KMSCipherTextKey": "AQIDBA=="}));
    let data_key = [[1u8; 32], [2u8; 32]].concat();
    // The client's side of the same key: it decrypts with the first half, encrypts with the
    // second, the agent the other way round.
    let mut client = AgentCipher::new(&[[2u8; 32], [1u8; 32]].concat()).expect("cipher");
    h.handle(AgentInput::Shell(ShellEvent::DataKey(Ok(data_key))));
    let request = (h.outputs().into_iter())
        .find(|m| m.payload_type == payload_type::ENC_CHALLENGE_REQUEST)
        .expect("the challenge");
    let request: serde_json::Value = serde_json::from_slice(&request.payload).expect("json");
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let sealed = engine
        .decode(request["Challenge"].as_str().expect("challenge"))
        .expect("base64");
    let secret = client
        .open(&sealed)
        .expect("the client decrypts the challenge");
    let answer = serde_json::json!({"Challenge": engine.encode(client.seal(&secret))});
    let answer = serde_json::to_vec(&answer).expect("json");
    let first = h.input(payload_type::ENC_CHALLENGE_RESPONSE, &answer);
    h.frame(first.encode());
    assert!(h.report().violations.is_empty(), "{:?}", h.report());
    assert!(h.report().encrypted);
    let second = h.input(payload_type::ENC_CHALLENGE_RESPONSE, &answer);
    h.frame(second.encode());
    assert_eq!(
        h.report().violations,
        [format!(
            "EncChallengeResponse (seq {}) without an EncChallengeRequest",
            second.sequence_number
        )]
    );
    // Terminal output still goes out encrypted.
    let _ = h.outputs();
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(5))
        .try_acquire_many_owned(5)
        .expect("room");
    h.handle(AgentInput::Shell(ShellEvent::Started {
        run_as_user: String::new(),
    }));
    h.handle(AgentInput::Shell(ShellEvent::Output {
        data: b"hello".to_vec(),
        room,
    }));
    let output = (h.outputs().into_iter())
        .find(|m| m.payload_type == payload_type::OUTPUT)
        .expect("terminal output");
    assert_ne!(output.payload, b"hello");
    assert_eq!(client.open(&output.payload).as_deref(), Some(&b"hello"[..]));
}
