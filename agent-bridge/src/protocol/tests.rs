//! Pair-style tests: a client [`Session`] against a scripted agent built on our own codec, with
//! a simulated clock that jumps to the session's next timeout. No I/O, no real time.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use uuid::Uuid;

use super::handshake::{AcknowledgeContent, HandshakeResponse};
use super::message::{self, ClientMessage, FLAG_FIN, FLAG_SYN, MessageType, PayloadType, PortFlag};
use super::smux::{self, Command, Frame, StreamCloseReason};
use super::*;

const START_MS: u64 = 1_700_000_000_000;

/// An arbitrary origin for simulated time; only differences from it matter.
#[allow(clippy::disallowed_methods)]
pub(super) fn origin() -> Instant {
    Instant::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// === scripted agent ===

/// The agent (and MGS) side: numbers its own stream, records what the client sent.
struct Agent {
    next_seq: i64,
    ids: u128,
}

impl Agent {
    fn new() -> Self {
        Self {
            next_seq: 0,
            ids: 1,
        }
    }

    fn message(&mut self, seq: i64, payload_type: PayloadType, payload: &[u8]) -> ClientMessage {
        self.ids += 1;
        ClientMessage {
            message_type: MessageType::OutputStreamData,
            schema_version: 1,
            created_date: START_MS,
            sequence_number: seq,
            flags: if seq == 0 { FLAG_SYN } else { 0 },
            message_id: Uuid::from_u128(self.ids),
            payload_type,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    /// The next output_stream_data frame.
    fn send(&mut self, payload_type: PayloadType, payload: &[u8]) -> Bytes {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.message(seq, payload_type, payload).to_bytes()
    }

    fn ack(&mut self, acked: &ClientMessage) -> Bytes {
        let content = AcknowledgeContent {
            message_type: "input_stream_data".into(),
            message_id: acked.message_id.hyphenated().to_string(),
            sequence_number: acked.sequence_number,
            is_sequential_message: true,
        };
        self.control(
            MessageType::Acknowledge,
            serde_json::to_vec(&content).unwrap(),
        )
    }

    fn control(&mut self, message_type: MessageType, payload: Vec<u8>) -> Bytes {
        self.ids += 1;
        ClientMessage {
            message_type,
            schema_version: 1,
            created_date: START_MS,
            sequence_number: 0,
            flags: FLAG_SYN | FLAG_FIN,
            message_id: Uuid::from_u128(self.ids),
            payload_type: PayloadType::Unset,
            payload: Bytes::from(payload),
        }
        .to_bytes()
    }

    fn handshake_request(&mut self, agent_version: &str, properties: &str) -> Bytes {
        let body = format!(
            r#"{{"AgentVersion":"{agent_version}","RequestedClientActions":[{{"ActionType":"SessionType","ActionParameters":{{"SessionType":"Port","Properties":{properties}}}}}]}}"#
        );
        self.send(PayloadType::HandshakeRequest, body.as_bytes())
    }

    fn handshake_complete(&mut self) -> Bytes {
        self.send(
            PayloadType::HandshakeComplete,
            br#"{"HandshakeTimeToComplete":1500000,"CustomerMessage":""}"#,
        )
    }
}

// === harness ===

/// What the client put on the wire, split by kind.
#[derive(Debug, Default)]
struct Sent {
    data: Vec<ClientMessage>,
    acks: Vec<AcknowledgeContent>,
}

struct Pair {
    now: Instant,
    session: Session,
    agent: Agent,
    events: Vec<Event>,
}

const LFW: &str = r#"{"portNumber":"80","type":"LocalPortForwarding"}"#;
const SSH: &str = r#"{"portNumber":"22"}"#;

impl Pair {
    fn new(config: Config) -> Self {
        let now = origin();
        Self {
            now,
            session: Session::new(config, now, START_MS, 42),
            agent: Agent::new(),
            events: Vec::new(),
        }
    }

    fn deliver(&mut self, frame: &[u8]) -> Result<(), SessionError> {
        self.session.handle_ws_message(self.now, frame)
    }

    /// Drains everything the client wants to send, decoding it with our codec.
    fn transmit(&mut self) -> Sent {
        let mut sent = Sent::default();
        while let Some(frame) = self.session.poll_transmit(self.now) {
            let decoded = message::decode(&frame).unwrap();
            assert!(decoded.digest_matches());
            assert!(decoded.payload_length_matches());
            assert_eq!(decoded.header_length, 116);
            assert_eq!(
                &frame[4 + decoded.message.message_type.as_str().len()..36],
                vec![b' '; 32 - decoded.message.message_type.as_str().len()].as_slice()
            );
            let m = decoded.message;
            assert!(m.created_date >= START_MS);
            match m.message_type {
                MessageType::InputStreamData => sent.data.push(m),
                MessageType::Acknowledge => {
                    assert_eq!(m.sequence_number, 0);
                    assert_eq!(m.flags, 3);
                    sent.acks.push(serde_json::from_slice(&m.payload).unwrap())
                }
                other => panic!("client sent {other:?}"),
            }
        }
        sent
    }

    fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.session.poll_event() {
            out.push(e);
        }
        self.events.extend(out.clone());
        out
    }

    /// MGS pauses publication.
    fn pause(&mut self) {
        let pause = self
            .agent
            .control(MessageType::PausePublication, Vec::new());
        self.deliver(&pause).unwrap();
        assert!(self.session.is_paused());
    }

    /// Jumps the clock to the next timeout and runs it.
    fn step(&mut self) -> bool {
        match self.session.poll_timeout() {
            Some(t) => {
                assert!(t >= self.now, "timeout in the past");
                self.now = t;
                self.session.handle_timeout(self.now);
                true
            }
            None => false,
        }
    }

    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(t) = self.session.poll_timeout() {
            if t > target {
                break;
            }
            self.now = t;
            self.session.handle_timeout(self.now);
        }
        self.now = target;
        self.session.handle_timeout(self.now);
    }

    fn ack_all(&mut self, data: &[ClientMessage]) {
        for m in data {
            let ack = self.agent.ack(m);
            self.deliver(&ack).unwrap();
        }
    }

    /// Full handshake; returns the HandshakeInfo.
    fn handshake(&mut self, agent_version: &str, properties: &str) -> HandshakeInfo {
        let req = self.agent.handshake_request(agent_version, properties);
        self.deliver(&req).unwrap();
        let sent = self.transmit();
        assert_eq!(sent.acks.len(), 1);
        assert_eq!(sent.data.len(), 1);
        let response = &sent.data[0];
        assert_eq!(response.sequence_number, 0);
        assert_eq!(response.payload_type, PayloadType::HandshakeResponse);
        self.ack_all(&sent.data);
        let complete = self.agent.handshake_complete();
        self.deliver(&complete).unwrap();
        let sent = self.transmit();
        assert_eq!(sent.acks.len(), 1);
        assert!(sent.data.is_empty());
        match self.drain_events().as_slice() {
            [Event::HandshakeComplete(info)] => info.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn mux_open(&mut self) -> HandshakeInfo {
        let info = self.handshake("3.3.1345.0", LFW);
        assert_eq!(info.mode, ForwardingMode::Mux);
        info
    }

    fn basic_open(&mut self) -> HandshakeInfo {
        let info = self.handshake("3.3.1345.0", SSH);
        assert_eq!(info.mode, ForwardingMode::Basic);
        info
    }

    fn closed(&self) -> Option<(CloseCause, Option<String>)> {
        self.events.iter().find_map(|e| match e {
            Event::Closed { cause, output } => Some((cause.clone(), output.clone())),
            _ => None,
        })
    }
}

fn payloads(sent: &[ClientMessage]) -> Vec<u8> {
    sent.iter().flat_map(|m| m.payload.to_vec()).collect()
}

fn smux_frames(bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = smux::decode_frame(&mut buf).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty(), "trailing partial smux frame");
    frames
}

fn smux_bytes(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    out.to_vec()
}

// === handshake ===

#[test]
fn handshake_response_reports_client_version_and_acks_request() {
    let mut p = Pair::new(Config::default());
    let req = p.agent.handshake_request("3.3.1345.0", LFW);
    p.deliver(&req).unwrap();
    let sent = p.transmit();
    assert_eq!(sent.acks[0].sequence_number, 0);
    assert_eq!(sent.acks[0].message_type, "output_stream_data");
    assert!(sent.acks[0].is_sequential_message);
    let response: HandshakeResponse = serde_json::from_slice(&sent.data[0].payload).unwrap();
    assert_eq!(response.client_version, "1.2.764.0");
    assert_eq!(response.processed_client_actions.len(), 1);
    assert_eq!(response.processed_client_actions[0].action_status, 1);
    // Nothing but the HandshakeResponse before HandshakeComplete.
    assert_eq!(p.session.send_capacity(), 0);
    assert_eq!(
        p.session.handle_local_data(b"early"),
        Err(SessionError::NotOpen)
    );
    assert!(p.transmit().data.is_empty());
}

/// The agent races the HandshakeResponse's ack against HandshakeComplete: the session opens on
/// HandshakeComplete whichever comes first, and the late ack only releases the response.
#[test]
fn handshake_complete_before_the_ack_of_the_response_opens_the_session() {
    let mut p = Pair::new(Config::default());
    let req = p.agent.handshake_request("3.3.1345.0", SSH);
    p.deliver(&req).unwrap();
    let response = p.transmit().data;
    assert_eq!(response[0].payload_type, PayloadType::HandshakeResponse);
    let complete = p.agent.handshake_complete();
    p.deliver(&complete).unwrap();
    assert!(matches!(
        p.drain_events().as_slice(),
        [Event::HandshakeComplete(info)] if info.mode == ForwardingMode::Basic
    ));
    assert_eq!(p.session.stats().unacked_messages, 1);
    p.ack_all(&response);
    assert_eq!(p.session.stats().unacked_messages, 0);
    // Data flows both ways, numbered after the response.
    assert_eq!(p.session.handle_local_data(b"up").unwrap(), 2);
    let up = p.transmit().data;
    assert_eq!((up[0].sequence_number, &up[0].payload[..]), (1, &b"up"[..]));
    let down = p.agent.send(PayloadType::Output, b"down");
    p.deliver(&down).unwrap();
    assert_eq!(p.drain_events(), [Event::Data(Bytes::from_static(b"down"))]);
    assert!(p.closed().is_none());
}

#[test]
fn mux_chosen_for_new_agent_with_keepalive_off() {
    let mut p = Pair::new(Config::default());
    let info = p.mux_open();
    assert!(!info.smux_keepalive);
    assert!(info.terminate_flag_supported);
    assert_eq!(info.agent_version.as_deref(), Some("3.3.1345.0"));
    assert_eq!(info.properties.port_number.as_deref(), Some("80"));
    // No keepalive: nothing pending, no timer.
    assert_eq!(p.session.poll_timeout(), None);
}

#[test]
fn basic_for_ssh_and_for_old_agents() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let mut p = Pair::new(Config::default());
    let info = p.handshake("3.0.196.0", LFW);
    assert_eq!(info.mode, ForwardingMode::Basic);
    assert_eq!(
        p.session.open_stream(),
        Err(SessionError::WrongMode {
            mode: ForwardingMode::Basic
        })
    );
}

#[test]
fn handshake_timeout_without_request() {
    let mut p = Pair::new(Config::default());
    assert!(p.step());
    p.drain_events();
    assert_eq!(p.closed(), Some((CloseCause::HandshakeTimeout, None)));
    assert!(p.session.is_closed());
    assert_eq!(p.session.poll_timeout(), None);
}

#[test]
fn handshake_timeout_without_complete_despite_acks() {
    let mut p = Pair::new(Config::default());
    let req = p.agent.handshake_request("3.3.1345.0", LFW);
    p.deliver(&req).unwrap();
    let sent = p.transmit();
    p.ack_all(&sent.data);
    p.advance(ms(29_000));
    p.drain_events();
    assert_eq!(p.closed(), None);
    p.advance(ms(1_000));
    p.drain_events();
    assert_eq!(p.closed(), Some((CloseCause::HandshakeTimeout, None)));
}

#[test]
fn invalid_handshake_request_closes() {
    let mut p = Pair::new(Config::default());
    let frame = p.agent.send(PayloadType::HandshakeRequest, b"{not json");
    p.deliver(&frame).unwrap();
    p.drain_events();
    assert!(matches!(
        p.closed(),
        Some((CloseCause::HandshakeInvalid(_), None))
    ));
}

#[test]
fn legacy_agent_without_handshake_streams_basic() {
    let mut p = Pair::new(Config::default());
    let frame = p.agent.send(PayloadType::Output, b"hello");
    p.deliver(&frame).unwrap();
    let events = p.drain_events();
    assert!(
        matches!(&events[0], Event::HandshakeComplete(i) if i.agent_version.is_none() && i.mode == ForwardingMode::Basic)
    );
    assert_eq!(events[1], Event::Data(Bytes::from_static(b"hello")));
    assert_eq!(p.transmit().acks.len(), 1);
}

// === acks, loss, reorder, duplicates ===

#[test]
fn lost_data_is_retransmitted_with_identical_bytes() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    assert_eq!(p.session.handle_local_data(b"abc").unwrap(), 3);
    let first: Vec<Bytes> = std::iter::from_fn(|| p.session.poll_transmit(p.now)).collect();
    assert_eq!(first.len(), 1);
    // Lost. The RTO (initial 200 ms, the handshake ack gave one sample) fires:
    let before = p.now;
    assert!(p.step());
    assert!(p.now > before);
    let again: Vec<Bytes> = std::iter::from_fn(|| p.session.poll_transmit(p.now)).collect();
    assert_eq!(again, first);
    assert_eq!(p.session.stats().retransmissions, 1);
    let m = message::decode(&again[0]).unwrap().message;
    assert_eq!(m.sequence_number, 1);
    p.ack_all(&[m]);
    assert_eq!(p.session.stats().unacked_messages, 0);
    assert_eq!(p.session.poll_timeout(), None);
}

#[test]
fn out_of_order_messages_are_acked_at_once_and_delivered_in_order() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let base = p.agent.next_seq;
    let m1 = p
        .agent
        .message(base, PayloadType::Output, b"one")
        .to_bytes();
    let m2 = p
        .agent
        .message(base + 1, PayloadType::Output, b"two")
        .to_bytes();
    let m3 = p
        .agent
        .message(base + 2, PayloadType::Output, b"three")
        .to_bytes();
    p.deliver(&m3).unwrap();
    p.deliver(&m2).unwrap();
    let acks: Vec<i64> = p
        .transmit()
        .acks
        .iter()
        .map(|a| a.sequence_number)
        .collect();
    assert_eq!(acks, vec![base + 2, base + 1]);
    assert!(p.drain_events().is_empty());
    assert_eq!(p.session.stats().reorder_buffered, 2);
    p.deliver(&m1).unwrap();
    assert_eq!(
        p.drain_events(),
        vec![
            Event::Data(Bytes::from_static(b"one")),
            Event::Data(Bytes::from_static(b"two")),
            Event::Data(Bytes::from_static(b"three")),
        ]
    );
    assert_eq!(p.session.stats().next_receive_sequence, base + 3);
}

#[test]
fn duplicates_are_re_acked_not_redelivered() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let frame = p.agent.send(PayloadType::Output, b"x");
    p.deliver(&frame).unwrap();
    p.deliver(&frame).unwrap();
    let early = p
        .agent
        .message(p.agent.next_seq + 1, PayloadType::Output, b"z")
        .to_bytes();
    p.deliver(&early).unwrap();
    p.deliver(&early).unwrap();
    let acks = p.transmit().acks;
    assert_eq!(acks.len(), 4);
    assert_eq!(acks[0].sequence_number, acks[1].sequence_number);
    assert_eq!(acks[2].sequence_number, acks[3].sequence_number);
    assert_eq!(
        p.drain_events(),
        vec![Event::Data(Bytes::from_static(b"x"))]
    );
    assert_eq!(p.session.stats().duplicates_received, 2);
}

#[test]
fn digest_mismatch_is_dropped_without_ack() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let good = p.agent.send(PayloadType::Output, b"payload");
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    let seq = p.agent.next_seq - 1;
    assert_eq!(
        p.deliver(&bad),
        Err(SessionError::DigestMismatch {
            message_type: "output_stream_data".into(),
            sequence_number: seq
        })
    );
    assert!(p.transmit().acks.is_empty());
    assert!(p.drain_events().is_empty());
    p.deliver(&good).unwrap();
    assert_eq!(p.transmit().acks.len(), 1);
    assert_eq!(
        p.drain_events(),
        vec![Event::Data(Bytes::from_static(b"payload"))]
    );
    assert_eq!(p.session.stats().digest_mismatches, 1);
}

#[test]
fn withheld_acks_back_off_and_never_evict() {
    let config = Config {
        chunk_size: 4,
        max_unacked_messages: 3,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    assert_eq!(p.session.send_capacity(), 12);
    assert_eq!(
        p.session.handle_local_data(b"0123456789abcdef").unwrap(),
        12
    );
    assert_eq!(p.session.send_capacity(), 0);
    assert_eq!(p.session.handle_local_data(b"more").unwrap(), 0);
    let sent = p.transmit().data;
    assert_eq!(payloads(&sent), b"0123456789ab");
    // The agent withholds acks: retransmissions keep coming, spaced by a growing RTO up to
    // the ceiling, and nothing is dropped.
    let mut gaps = Vec::new();
    let mut last = p.now;
    for _ in 0..8 {
        assert!(p.step());
        let again = p.transmit().data;
        assert!(!again.is_empty());
        gaps.push(p.now - last);
        last = p.now;
    }
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
    assert_eq!(*gaps.last().unwrap(), session::DEFAULT_RTO_CEILING);
    assert_eq!(p.session.stats().unacked_messages, 3);
    p.ack_all(&sent);
    assert_eq!(p.session.send_capacity(), 12);
    assert_eq!(p.session.handle_local_data(b"more").unwrap(), 4);
}

#[test]
fn reconnect_keeps_sequence_and_resends_in_flight() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.session.handle_local_data(b"before").unwrap();
    let lost = p.transmit().data;
    assert_eq!(lost[0].sequence_number, 1);
    p.session.reset_transport(p.now);
    let resent = p.transmit().data;
    assert_eq!(resent, lost);
    p.ack_all(&resent);
    p.session.handle_local_data(b"after").unwrap();
    let next = p.transmit().data;
    assert_eq!(next[0].sequence_number, 2);
    // The agent's numbering also continues, and an already-processed message is re-acked.
    let frame = p.agent.send(PayloadType::Output, b"agent");
    p.deliver(&frame).unwrap();
    p.deliver(&frame).unwrap();
    assert_eq!(p.transmit().acks.len(), 2);
    assert_eq!(p.session.stats().reconnects, 1);
}

#[test]
fn receive_backpressure_withholds_acks_until_drained() {
    let config = Config {
        max_inbound_bytes: 8,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    let a = p.agent.send(PayloadType::Output, b"12345678");
    let b = p.agent.send(PayloadType::Output, b"abc");
    p.deliver(&a).unwrap();
    p.deliver(&b).unwrap();
    // b does not fit while a is undrained: not acked.
    assert_eq!(p.transmit().acks.len(), 1);
    assert_eq!(p.session.stats().dropped_no_room, 1);
    assert_eq!(
        p.drain_events(),
        vec![Event::Data(Bytes::from_static(b"12345678"))]
    );
    p.deliver(&b).unwrap();
    assert_eq!(p.transmit().acks.len(), 1);
    assert_eq!(
        p.drain_events(),
        vec![Event::Data(Bytes::from_static(b"abc"))]
    );
}

#[test]
fn the_session_asks_for_no_frames_while_what_it_holds_leaves_no_headroom() {
    let config = Config {
        max_inbound_bytes: session::INBOUND_HEADROOM + 4096,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    let chunk = [7u8; 1024];
    let mut delivered = 0;
    while p.session.wants_frames() {
        let frame = p.agent.send(PayloadType::Output, &chunk);
        p.deliver(&frame).unwrap();
        delivered += 1;
        assert!(
            delivered <= 5,
            "still asking for frames with {delivered} KiB held"
        );
    }
    // A driver that stops reading here never makes the session drop: every message was
    // accepted and acknowledged.
    assert_eq!(delivered, 5);
    assert_eq!(p.transmit().acks.len(), 5);
    assert_eq!(p.session.stats().dropped_no_room, 0);
    assert_eq!(p.drain_events().len(), 5);
    assert!(p.session.wants_frames(), "draining makes room again");
}

#[test]
fn a_full_reorder_buffer_still_admits_the_message_that_fills_its_gap() {
    let config = Config {
        max_inbound_bytes: 8,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    let base = p.agent.next_seq;
    // The first message is lost; the next one waits, and with it the gap would exceed the budget.
    let gap = p.agent.message(base, PayloadType::Output, b"123456");
    let early = p.agent.message(base + 1, PayloadType::Output, b"5678");
    p.deliver(&early.to_bytes()).unwrap();
    assert_eq!(p.transmit().acks.len(), 1);
    assert_eq!(p.session.stats().reorder_buffered, 1);
    // The retransmitted gap is accepted, acked, and both arrive in order.
    p.deliver(&gap.to_bytes()).unwrap();
    assert_eq!(p.transmit().acks.len(), 1);
    assert_eq!(p.session.stats().dropped_no_room, 0);
    assert_eq!(
        p.drain_events(),
        vec![
            Event::Data(Bytes::from_static(b"123456")),
            Event::Data(Bytes::from_static(b"5678"))
        ]
    );
}

#[test]
fn reorder_buffer_is_bounded() {
    let config = Config {
        max_reorder_messages: 2,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    let base = p.agent.next_seq;
    for k in 1..=3 {
        let f = p
            .agent
            .message(base + k, PayloadType::Output, b"e")
            .to_bytes();
        p.deliver(&f).unwrap();
    }
    assert_eq!(p.transmit().acks.len(), 2);
    assert_eq!(p.session.stats().reorder_buffered, 2);
    assert_eq!(p.session.stats().dropped_no_room, 1);
}

// === publication control ===

#[test]
fn pause_holds_data_and_retransmission_until_the_agent_is_heard_again() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.session.handle_local_data(b"first").unwrap();
    let in_flight = p.transmit().data;
    p.pause();
    p.session.handle_local_data(b"second").unwrap();
    assert!(p.transmit().data.is_empty());
    assert_eq!(
        p.session.poll_timeout(),
        Some(p.now + session::DEFAULT_MAX_PAUSE),
        "no retransmit timer while paused, only the pause's own"
    );
    assert!(
        p.session.ack_wait_since().is_some(),
        "a pause with data waiting still counts toward the dead-peer check"
    );
    // The agent's next data lifts the pause, as in the agent's own data channel: a pause that
    // is never lifted by start_publication does not stop the session.
    let frame = p.agent.send(PayloadType::Output, b"in");
    p.deliver(&frame).unwrap();
    assert!(!p.session.is_paused());
    let sent = p.transmit();
    assert_eq!(sent.acks.len(), 1);
    assert_eq!(payloads(&sent.data), b"second");
    // Both were sent at the same instant, so both are overdue together.
    assert!(p.step());
    let mut expected = in_flight.clone();
    expected.extend(sent.data);
    assert_eq!(p.transmit().data, expected);
}

#[test]
fn a_pause_nothing_lifts_lapses_after_its_limit() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.pause();
    p.session.handle_local_data(b"waiting").unwrap();
    p.advance(session::DEFAULT_MAX_PAUSE - Duration::from_millis(1));
    assert!(p.session.is_paused());
    assert!(p.transmit().data.is_empty());
    p.advance(Duration::from_millis(1));
    assert!(!p.session.is_paused(), "the pause lapsed");
    assert_eq!(payloads(&p.transmit().data), b"waiting");
}

#[test]
fn an_ack_lifts_a_pause_and_acks_flow_while_paused() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.session.handle_local_data(b"first").unwrap();
    let in_flight = p.transmit().data;
    p.pause();
    p.session.handle_local_data(b"second").unwrap();
    assert!(p.transmit().data.is_empty());
    p.ack_all(&in_flight);
    assert!(!p.session.is_paused());
    assert_eq!(payloads(&p.transmit().data), b"second");
}

#[test]
fn start_publication_with_a_garbage_digest_lifts_a_pause() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.pause();
    p.session.handle_local_data(b"second").unwrap();
    assert!(p.transmit().data.is_empty());
    // Garbage digest and length on start_publication are tolerated (docs/data-channel.md).
    let mut start = p
        .agent
        .control(MessageType::StartPublication, b"junk".to_vec())
        .to_vec();
    start[80] ^= 0xff;
    start[116..120].copy_from_slice(&0x0400_0000u32.to_be_bytes());
    p.deliver(&start).unwrap();
    assert!(!p.session.is_paused());
    assert_eq!(payloads(&p.transmit().data), b"second");
}

#[test]
fn text_frame_publication_words_are_honoured() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.deliver(b"pause_publication").unwrap();
    assert!(p.session.is_paused());
    p.deliver(b"start_publication\n").unwrap();
    assert!(!p.session.is_paused());
}

// === closing and flags ===

#[test]
fn channel_closed_surfaces_output() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let c = p.agent.control(
        MessageType::ChannelClosed,
        br#"{"MessageId":"m","CreatedDate":"2026","DestinationId":"d","SessionId":"s","MessageType":"channel_closed","SchemaVersion":1,"Output":"Plugin with name Port is not supported"}"#.to_vec(),
    );
    p.deliver(&c).unwrap();
    p.drain_events();
    assert_eq!(
        p.closed(),
        Some((
            CloseCause::ChannelClosed,
            Some("Plugin with name Port is not supported".into())
        ))
    );
    assert_eq!(p.session.handle_local_data(b"x"), Err(SessionError::Closed));
    assert!(p.session.poll_transmit(p.now).is_none());
}

#[test]
fn short_header_channel_closed_with_nul_padding_is_understood() {
    let mut p = Pair::new(Config::default());
    p.mux_open();
    let stream = p.session.open_stream().unwrap();
    let payload = br#"{"Output":""}"#;
    let mut frame = Vec::new();
    frame.extend_from_slice(&112u32.to_be_bytes());
    let mut t = [0u8; 32];
    t[..14].copy_from_slice(b"channel_closed");
    frame.extend_from_slice(&t);
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&START_MS.to_be_bytes());
    frame.extend_from_slice(&[0u8; 32]);
    frame.extend_from_slice(&message::payload_digest(payload));
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    p.deliver(&frame).unwrap();
    let events = p.drain_events();
    assert_eq!(
        events,
        vec![
            Event::StreamClosed {
                stream,
                reason: StreamCloseReason::SessionClosed
            },
            Event::Closed {
                cause: CloseCause::ChannelClosed,
                output: None
            }
        ]
    );
}

#[test]
fn terminate_sends_flag_then_waits_for_channel_closed() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.session.terminate(p.now);
    let sent = p.transmit().data;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].payload_type, PayloadType::Flag);
    assert_eq!(sent[0].payload.as_ref(), &[0, 0, 0, 2]);
    assert!(!p.session.is_closed());
    let c = p
        .agent
        .control(MessageType::ChannelClosed, br#"{"Output":"done"}"#.to_vec());
    p.deliver(&c).unwrap();
    p.drain_events();
    assert_eq!(
        p.closed(),
        Some((CloseCause::LocalTerminate, Some("done".into())))
    );
}

#[test]
fn terminate_linger_expires() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.session.terminate(p.now);
    let flag = p.transmit().data;
    p.ack_all(&flag);
    assert!(p.step());
    p.drain_events();
    assert_eq!(p.closed(), Some((CloseCause::LocalTerminate, None)));
}

#[test]
fn terminate_before_handshake_closes_at_once() {
    let mut p = Pair::new(Config::default());
    p.session.terminate(p.now);
    p.drain_events();
    assert_eq!(p.closed(), Some((CloseCause::LocalTerminate, None)));
}

#[test]
fn old_agent_without_terminate_flag_closes_at_once() {
    let mut p = Pair::new(Config::default());
    p.handshake("2.3.722.0", SSH);
    p.session.terminate(p.now);
    assert!(p.transmit().data.is_empty());
    assert!(p.session.is_closed());
}

#[test]
fn agent_terminate_flag_closes() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let f = p
        .agent
        .send(PayloadType::Flag, &PortFlag::TerminateSession.to_payload());
    p.deliver(&f).unwrap();
    p.drain_events();
    assert_eq!(p.closed(), Some((CloseCause::AgentTerminated, None)));
}

#[test]
fn disconnect_local_sends_flag_one() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    p.session.disconnect_local(p.now).unwrap();
    let sent = p.transmit().data;
    assert_eq!(sent[0].payload_type, PayloadType::Flag);
    assert_eq!(sent[0].payload.as_ref(), &[0, 0, 0, 1]);
}

// === basic forwarding ===

#[test]
fn basic_data_round_trip_is_chunked_and_never_rewritten() {
    let config = Config {
        chunk_size: 1000,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(p.session.handle_local_data(&data).unwrap(), 2500);
    let mut sent = p.transmit().data;
    // A lone LF must travel as LF (section 6.2 hazard).
    assert_eq!(p.session.handle_local_data(b"\n").unwrap(), 1);
    sent.extend(p.transmit().data);
    let sizes: Vec<usize> = sent.iter().map(|m| m.payload.len()).collect();
    assert_eq!(sizes, vec![1000, 1000, 500, 1]);
    assert!(sent.iter().all(|m| m.payload_type == PayloadType::Output));
    let mut expected = data.clone();
    expected.push(b'\n');
    assert_eq!(payloads(&sent), expected);
    let seqs: Vec<i64> = sent.iter().map(|m| m.sequence_number).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(p.session.stats().bytes_sent, 2501);
}

#[test]
fn writes_made_while_a_frame_waits_fill_one_message() {
    let config = Config {
        chunk_size: 1000,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    // The driver holds one frame for the pacer; the writes after it wait, uncut.
    p.session.handle_local_data(b"first").unwrap();
    let held = p.session.poll_transmit(p.now).expect("a frame");
    for _ in 0..30 {
        p.session.handle_local_data(&[7u8; 50]).unwrap();
    }
    assert_eq!(p.session.stats().unacked_bytes, 5 + 1500);
    p.session.disconnect_local(p.now).unwrap();
    let mut sent = vec![message::decode(&held).unwrap().message];
    sent.extend(p.transmit().data);
    let sizes: Vec<usize> = sent.iter().map(|m| m.payload.len()).collect();
    // 1,500 bytes in two messages instead of 30, and the flag after them.
    assert_eq!(sizes, vec![5, 1000, 500, 4]);
    assert_eq!(sent[3].payload_type, PayloadType::Flag);
}

// === mux ===

#[test]
fn mux_stream_round_trip() {
    let mut p = Pair::new(Config::default());
    p.mux_open();
    let s = p.session.open_stream().unwrap();
    assert_eq!(s, 3);
    assert_eq!(p.session.write_stream(s, b"GET /").unwrap(), 5);
    let sent = p.transmit().data;
    let frames = smux_frames(&payloads(&sent));
    assert_eq!(frames[0].command, Command::Syn);
    assert_eq!(frames[1].command, Command::Psh);
    assert_eq!(frames[1].data.as_ref(), b"GET /");
    // Agent reply split across two messages at an odd boundary.
    let reply = smux_bytes(&[Frame {
        command: Command::Psh,
        stream_id: s,
        data: Bytes::from_static(b"HTTP/1.1 200"),
    }]);
    let (a, b) = reply.split_at(5);
    let fa = p.agent.send(PayloadType::Output, a);
    let fb = p.agent.send(PayloadType::Output, b);
    p.deliver(&fa).unwrap();
    assert!(p.drain_events().is_empty());
    p.deliver(&fb).unwrap();
    assert_eq!(
        p.drain_events(),
        vec![Event::StreamData {
            stream: s,
            data: Bytes::from_static(b"HTTP/1.1 200")
        }]
    );
    let fin = smux_bytes(&[Frame {
        command: Command::Fin,
        stream_id: s,
        data: Bytes::new(),
    }]);
    let f = p.agent.send(PayloadType::Output, &fin);
    p.deliver(&f).unwrap();
    assert_eq!(
        p.drain_events(),
        vec![Event::StreamClosed {
            stream: s,
            reason: StreamCloseReason::RemoteClosed
        }]
    );
    assert_eq!(
        p.session.write_stream(s, b"late"),
        Err(SessionError::UnknownStream(s))
    );
}

#[test]
fn mux_local_close_sends_fin() {
    let mut p = Pair::new(Config::default());
    p.mux_open();
    let s = p.session.open_stream().unwrap();
    p.session.close_stream(s).unwrap();
    let frames = smux_frames(&payloads(&p.transmit().data));
    assert_eq!(frames.last().unwrap().command, Command::Fin);
    assert_eq!(frames.last().unwrap().stream_id, s);
    assert_eq!(
        p.session.close_stream(s),
        Err(SessionError::UnknownStream(s))
    );
}

#[test]
fn connect_to_port_error_fails_the_pending_stream() {
    let mut p = Pair::new(Config::default());
    p.mux_open();
    let ok = p.session.open_stream().unwrap();
    let bad = p.session.open_stream().unwrap();
    let data = smux_bytes(&[Frame {
        command: Command::Psh,
        stream_id: ok,
        data: Bytes::from_static(b"banner"),
    }]);
    let f = p.agent.send(PayloadType::Output, &data);
    p.deliver(&f).unwrap();
    let flag = p.agent.send(
        PayloadType::Flag,
        &PortFlag::ConnectToPortError.to_payload(),
    );
    p.deliver(&flag).unwrap();
    let fin = smux_bytes(&[Frame {
        command: Command::Fin,
        stream_id: bad,
        data: Bytes::new(),
    }]);
    let f = p.agent.send(PayloadType::Output, &fin);
    p.deliver(&f).unwrap();
    let events = p.drain_events();
    assert_eq!(
        events[1..],
        [
            Event::ConnectToPortError,
            Event::StreamClosed {
                stream: bad,
                reason: StreamCloseReason::ConnectFailed
            }
        ]
    );
    assert_eq!(p.session.stats().open_streams, 1);
}

#[test]
fn mux_protocol_error_closes_session() {
    let mut p = Pair::new(Config::default());
    p.mux_open();
    let f = p.agent.send(PayloadType::Output, &[2, 0, 0, 0, 0, 0, 0, 0]);
    p.deliver(&f).unwrap();
    p.drain_events();
    assert_eq!(
        p.closed(),
        Some((CloseCause::MuxProtocol(smux::MuxError::Version(2)), None))
    );
}

#[test]
fn old_mux_agent_gets_keepalive_nops_and_silence_closes() {
    let mut p = Pair::new(Config::default());
    let info = p.handshake("3.1.1511.0", LFW);
    assert_eq!(info.mode, ForwardingMode::Mux);
    assert!(info.smux_keepalive);
    p.advance(smux::KEEPALIVE_INTERVAL);
    let sent = p.transmit().data;
    let frames = smux_frames(&payloads(&sent));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].command, Command::Nop);
    p.ack_all(&sent);
    // The agent's NOP counts as traffic for the first window...
    let nop = smux_bytes(&[Frame {
        command: Command::Nop,
        stream_id: 0,
        data: Bytes::new(),
    }]);
    let f = p.agent.send(PayloadType::Output, &nop);
    p.deliver(&f).unwrap();
    p.advance(smux::KEEPALIVE_TIMEOUT - smux::KEEPALIVE_INTERVAL);
    p.drain_events();
    assert_eq!(p.closed(), None);
    // ...then 30 s of silence ends the session.
    p.advance(smux::KEEPALIVE_TIMEOUT);
    p.drain_events();
    assert_eq!(p.closed(), Some((CloseCause::KeepaliveTimeout, None)));
}

// === robustness ===

#[test]
fn unknown_types_are_ignored() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let f = p
        .agent
        .control(MessageType::AgentSessionState, b"{}".to_vec());
    p.deliver(&f).unwrap();
    let f = p
        .agent
        .control(MessageType::Other("future_type".into()), Vec::new());
    p.deliver(&f).unwrap();
    let f = p.agent.send(PayloadType::Other(99), b"?");
    p.deliver(&f).unwrap();
    assert_eq!(
        p.transmit().acks.len(),
        1,
        "stream data is acked whatever its payload type"
    );
    assert!(p.drain_events().is_empty());
    assert_eq!(p.session.stats().ignored_messages, 3);
}

#[test]
fn malformed_frames_are_typed_errors() {
    let mut p = Pair::new(Config::default());
    assert!(matches!(
        p.deliver(&[0, 0, 0, 116, 1, 2]),
        Err(SessionError::Decode(DecodeError::Truncated { .. }))
    ));
    assert_eq!(p.session.stats().malformed_frames, 1);
    assert!(!p.session.is_closed());
}

/// A deterministic lossy, duplicating, reordering channel in both directions; the byte streams
/// must arrive intact and in order.
#[test]
fn lossy_channel_delivers_exact_bytes_both_ways() {
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }
    let config = Config {
        chunk_size: 700,
        max_unacked_messages: 64,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    p.basic_open();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let upload: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let download: Vec<u8> = (0..40_000u32).map(|i| (i * 11 % 241) as u8).collect();
    let mut up_offset = 0;
    let mut agent_expected = 1i64; // seq 0 was the HandshakeResponse
    let mut agent_received = Vec::new();
    let mut agent_pending: Vec<ClientMessage> = Vec::new();
    let mut down_frames: Vec<(i64, Bytes)> = Vec::new();
    for chunk in download.chunks(900) {
        let seq = p.agent.next_seq;
        down_frames.push((seq, p.agent.send(PayloadType::Output, chunk)));
    }
    let mut agent_unacked: std::collections::BTreeMap<i64, Bytes> =
        down_frames.into_iter().collect();
    let mut got_down = Vec::new();
    for round in 0..5_000 {
        if up_offset < upload.len() {
            up_offset += p.session.handle_local_data(&upload[up_offset..]).unwrap();
        }
        // client -> agent
        while let Some(frame) = p.session.poll_transmit(p.now) {
            if rng.chance(25) {
                continue;
            }
            let m = message::decode(&frame).unwrap().message;
            match m.message_type {
                MessageType::InputStreamData => {
                    // the agent acks everything it accepts, re-acks duplicates
                    if rng.chance(20) {
                        continue; // ack lost
                    }
                    let ack = p.agent.ack(&m);
                    let copies = if rng.chance(10) { 2 } else { 1 };
                    for _ in 0..copies {
                        agent_pending.push(m.clone());
                        let _ = p.session.handle_ws_message(p.now, &ack);
                    }
                }
                MessageType::Acknowledge => {
                    let a: AcknowledgeContent = serde_json::from_slice(&m.payload).unwrap();
                    agent_unacked.remove(&a.sequence_number);
                }
                _ => {}
            }
        }
        // agent processes what arrived in order
        agent_pending.sort_by_key(|m| m.sequence_number);
        agent_pending.retain(|m| {
            if m.sequence_number == agent_expected {
                agent_received.extend_from_slice(&m.payload);
                agent_expected += 1;
                false
            } else {
                m.sequence_number > agent_expected
            }
        });
        // agent -> client: resend every unacked frame each few rounds, in a shuffled order
        if round % 3 == 0 {
            let mut batch: Vec<Bytes> = agent_unacked.values().take(20).cloned().collect();
            if batch.len() > 1 && rng.chance(50) {
                batch.swap(0, 1);
            }
            for f in batch {
                if !rng.chance(25) {
                    let _ = p.session.handle_ws_message(p.now, &f);
                }
            }
        }
        for e in p.drain_events() {
            if let Event::Data(d) = e {
                got_down.extend_from_slice(&d);
            }
        }
        if agent_received.len() == upload.len()
            && got_down.len() == download.len()
            && agent_unacked.is_empty()
        {
            break;
        }
        p.advance(ms(100));
    }
    assert_eq!(agent_received.len(), upload.len());
    assert!(agent_received == upload);
    assert!(got_down == download);
    let stats = p.session.stats();
    assert!(stats.retransmissions > 0);
    assert!(stats.duplicates_received > 0);
}

#[test]
fn pending_acks_are_bounded() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let frame = p.agent.send(PayloadType::Output, b"x");
    for _ in 0..session::MAX_PENDING_ACKS + 4 {
        p.deliver(&frame).unwrap();
    }
    assert_eq!(p.session.stats().acks_dropped, 4);
    assert_eq!(p.transmit().acks.len(), session::MAX_PENDING_ACKS);
    // Once drained, acks flow again.
    p.deliver(&frame).unwrap();
    assert_eq!(p.transmit().acks.len(), 1);
}
