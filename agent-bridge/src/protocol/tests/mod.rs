//! Pair-style tests: a client [`Session`] against a scripted agent built on our own codec, with
//! a simulated clock that jumps to the session's next timeout. No I/O, no real time.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use uuid::Uuid;

use super::handshake::{AcknowledgeContent, HandshakeResponse};
use super::message::{self, ClientMessage, FLAG_FIN, FLAG_SYN, MessageType, PayloadType, PortFlag};
use super::smux::{self, Command, Frame, StreamCloseReason};
use super::*;

mod basic;
mod closing;
mod handshake;
mod mux;
mod publication;
mod reliability;
mod robustness;
mod shell;

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
    /// A session with `config`, unpaced (pacing has its own tests): the simulated clock does
    /// not move while a test drains what the session sends.
    fn new(config: Config) -> Self {
        let now = origin();
        let config = Config {
            messages_per_second: u32::MAX,
            burst: u32::MAX,
            ..config
        };
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
        while let Some(Transmit { frame, .. }) = self.session.poll_transmit(self.now) {
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
