//! Acknowledgements, loss, reordering, duplicates and bounded buffers.

use super::*;

#[test]
fn lost_data_is_retransmitted_with_identical_bytes() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    assert_eq!(p.session.handle_local_data(b"abc").unwrap(), 3);
    let first: Vec<Bytes> =
        std::iter::from_fn(|| p.session.poll_transmit(p.now).map(|t| t.frame)).collect();
    assert_eq!(first.len(), 1);
    // Lost. The RTO (initial 200 ms, the handshake ack gave one sample) fires:
    let before = p.now;
    assert!(p.step());
    assert!(p.now > before);
    let again: Vec<Bytes> =
        std::iter::from_fn(|| p.session.poll_transmit(p.now).map(|t| t.frame)).collect();
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
fn an_inbound_budget_below_the_session_bound_withholds_acks_and_stops_reading() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let chunk = [7u8; 1024];
    // Room for one more message of the headroom's size, and 2 KiB besides.
    p.session
        .set_inbound_budget(session::INBOUND_HEADROOM + 2048);
    let mut delivered = 0;
    while p.session.wants_frames() {
        let frame = p.agent.send(PayloadType::Output, &chunk);
        p.deliver(&frame).unwrap();
        delivered += 1;
        assert!(delivered <= 3, "still reading with {delivered} KiB held");
    }
    assert_eq!(delivered, 3);
    assert_eq!(p.session.inbound_bytes(), 3 * 1024);
    // A message past the budget is not acked: the agent resends it.
    p.session.set_inbound_budget(3 * 1024);
    let frame = p.agent.send(PayloadType::Output, &chunk);
    p.deliver(&frame).unwrap();
    assert_eq!(p.transmit().acks.len(), 3);
    assert_eq!(p.session.stats().dropped_no_room, 1);
    assert_eq!(p.drain_events().len(), 3);
    assert!(
        !p.session.wants_frames(),
        "no room for a message even with nothing undrained"
    );
    p.session.set_inbound_budget(session::INBOUND_HEADROOM);
    assert!(p.session.wants_frames());
}

#[test]
fn early_messages_keep_room_within_the_inbound_budget_for_the_one_that_fills_their_gap() {
    let mut p = Pair::new(Config::default());
    p.basic_open();
    let base = p.agent.next_seq;
    let first = p.agent.message(base, PayloadType::Output, b"1234");
    let gap = p.agent.message(base + 1, PayloadType::Output, b"5678");
    let early = p.agent.message(base + 2, PayloadType::Output, b"9abc");
    let later = p.agent.message(base + 3, PayloadType::Output, b"def0");
    p.session.set_inbound_budget(session::INBOUND_HEADROOM + 8);
    p.deliver(&first.to_bytes()).unwrap();
    p.deliver(&early.to_bytes()).unwrap();
    assert_eq!(p.session.inbound_bytes(), 8);
    // Another early message would eat the room kept for the gap: dropped unacked.
    p.deliver(&later.to_bytes()).unwrap();
    assert_eq!(p.session.stats().dropped_no_room, 1);
    assert!(p.session.wants_frames(), "a gap keeps the session reading");
    // The gap is taken, with what waited behind it.
    p.deliver(&gap.to_bytes()).unwrap();
    assert_eq!(p.session.stats().dropped_no_room, 1);
    assert_eq!(p.session.inbound_bytes(), 12);
    assert!(!p.session.wants_frames(), "past the budget, with no gap");
    assert_eq!(
        p.drain_events(),
        vec![
            Event::Data(Bytes::from_static(b"1234")),
            Event::Data(Bytes::from_static(b"5678")),
            Event::Data(Bytes::from_static(b"9abc"))
        ]
    );
    assert!(p.session.wants_frames());
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
