//! Runs the `ClientMessage` decoder, and a whole `Session`, over a corpus of malformed frames:
//! every one must give its typed error, and nothing may panic. The cargo-fuzz target in
//! `agent-bridge/fuzz/` explores further; this test is what CI runs.

use std::time::Instant;

use bytes::Bytes;
use fleet_access_agent_bridge::protocol::message::{self, DecodeError};
use fleet_access_agent_bridge::protocol::{
    ClientMessage, Config, MessageType, PayloadType, Session, SessionError,
};
use uuid::Uuid;

/// An arbitrary origin for simulated time; only differences from it matter.
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

fn valid(message_type: MessageType, payload: &'static [u8]) -> Vec<u8> {
    ClientMessage {
        message_type,
        schema_version: 1,
        created_date: 1_700_000_000_000,
        sequence_number: 0,
        flags: 0,
        message_id: Uuid::from_u128(7),
        payload_type: PayloadType::Output,
        payload: Bytes::from_static(payload),
    }
    .to_bytes()
    .to_vec()
}

fn with(mut frame: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
    frame
}

/// (name, frame, expected error)
fn corpus() -> Vec<(String, Vec<u8>, DecodeError)> {
    let base = valid(MessageType::OutputStreamData, b"payload");
    let mut cases = vec![
        (
            "empty".to_owned(),
            Vec::new(),
            DecodeError::Truncated { len: 0, needed: 4 },
        ),
        (
            "header length 120".to_owned(),
            with(base.clone(), 0, &120u32.to_be_bytes()),
            DecodeError::HeaderLength(120),
        ),
        (
            "header length 0".to_owned(),
            with(base.clone(), 0, &0u32.to_be_bytes()),
            DecodeError::HeaderLength(0),
        ),
        (
            "header length u32::MAX".to_owned(),
            with(base.clone(), 0, &u32::MAX.to_be_bytes()),
            DecodeError::HeaderLength(u32::MAX),
        ),
        (
            "header length 111".to_owned(),
            with(base.clone(), 0, &111u32.to_be_bytes()),
            DecodeError::HeaderLength(111),
        ),
        (
            "all-space message type".to_owned(),
            with(base.clone(), 4, &[b' '; 32]),
            DecodeError::EmptyMessageType,
        ),
        (
            "all-NUL message type".to_owned(),
            with(base.clone(), 4, &[0; 32]),
            DecodeError::EmptyMessageType,
        ),
        (
            "non-ASCII message type".to_owned(),
            with(base.clone(), 4, "ütput_stream_data".as_bytes()),
            DecodeError::MessageTypeNotAscii,
        ),
        (
            "control byte in message type".to_owned(),
            with(base.clone(), 6, &[0x07]),
            DecodeError::MessageTypeNotAscii,
        ),
        (
            "zero created date".to_owned(),
            with(base.clone(), 40, &[0; 8]),
            DecodeError::ZeroCreatedDate,
        ),
        (
            "short header, truncated".to_owned(),
            with(base[..115].to_vec(), 0, &112u32.to_be_bytes()),
            DecodeError::Truncated {
                len: 115,
                needed: 116,
            },
        ),
    ];
    // Every truncation of a valid frame below its fixed header.
    for len in 4..120 {
        cases.push((
            format!("truncated to {len}"),
            base[..len].to_vec(),
            DecodeError::Truncated { len, needed: 120 },
        ));
    }
    cases
}

#[test]
fn every_malformed_frame_gives_its_typed_error() {
    for (name, frame, expected) in corpus() {
        assert_eq!(message::decode(&frame), Err(expected), "case {name}");
    }
}

#[test]
fn a_session_survives_the_corpus() {
    let now = origin();
    let mut session = Session::new(Config::default(), now, 1_700_000_000_000, 1);
    let cases = corpus();
    for (name, frame, expected) in &cases {
        assert_eq!(
            session.handle_ws_message(now, frame),
            Err(SessionError::Decode(expected.clone())),
            "case {name}"
        );
    }
    assert!(!session.is_closed());
    assert_eq!(session.stats().malformed_frames, cases.len() as u64);
    assert!(session.poll_transmit(now).is_none());
}

#[test]
fn digest_and_length_lies_are_detected_but_decode() {
    let base = valid(MessageType::OutputStreamData, b"payload");
    let wrong_digest = with(base.clone(), 80, &[0xaa; 32]);
    let decoded = message::decode(&wrong_digest).unwrap();
    assert!(!decoded.digest_matches());
    let wrong_length = with(base, 116, &999u32.to_be_bytes());
    let decoded = message::decode(&wrong_length).unwrap();
    assert!(decoded.digest_matches());
    assert!(!decoded.payload_length_matches());
    assert_eq!(decoded.message.payload.as_ref(), b"payload");
}

/// Single-bit flips anywhere in valid frames of each type never panic the decoder or a session.
#[test]
fn bit_flips_never_panic() {
    let now = origin();
    let frames = [
        valid(
            MessageType::OutputStreamData,
            b"\x01\x02\x00\x00\x03\x00\x00\x00",
        ),
        valid(
            MessageType::Acknowledge,
            br#"{"AcknowledgedMessageSequenceNumber":0}"#,
        ),
        valid(MessageType::ChannelClosed, br#"{"Output":"x"}"#),
        valid(MessageType::StartPublication, b""),
    ];
    for frame in frames {
        for bit in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            let _ = message::decode(&f);
            let mut session = Session::new(Config::default(), now, 1, 1);
            let _ = session.handle_ws_message(now, &f);
            while session.poll_transmit(now).is_some() {}
            while session.poll_event().is_some() {}
        }
    }
}
