//! Unknown and malformed input, a lossy channel, bounded ack queues.

use super::*;

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
        while let Some(Transmit { frame, .. }) = p.session.poll_transmit(p.now) {
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
