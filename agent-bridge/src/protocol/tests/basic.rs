//! Basic (single-connection) forwarding: chunking and exact bytes.

use super::*;

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
    // A lone LF must travel as LF (docs/protocol.md §6.2 hazard).
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
    // One frame is out (on its way to the WebSocket); the writes after it wait, uncut.
    p.session.handle_local_data(b"first").unwrap();
    let held = p.session.poll_transmit(p.now).expect("a frame").frame;
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

#[test]
fn sequenced_messages_are_paced_and_acks_are_not() {
    // Pacing as configured (the harness turns it off): 1,000 a second, 3 back to back.
    let mut p = Pair::new(Config::default());
    p.session = Session::new(
        Config {
            messages_per_second: 1000,
            burst: 3,
            chunk_size: 10,
            ..Config::default()
        },
        p.now,
        START_MS,
        42,
    );
    p.basic_open();
    p.session.handle_local_data(&[1u8; 100]).unwrap();
    let burst = p.transmit();
    assert_eq!(burst.data.len(), 2, "the burst, less the HandshakeResponse");
    // The pacer's deadline is the session's next timeout; an ack is not held meanwhile.
    let next = p.session.poll_timeout().expect("a deadline");
    assert_eq!(next, p.now + ms(1));
    let output = p.agent.send(PayloadType::Output, b"x");
    p.deliver(&output).unwrap();
    let acks_only = p.transmit();
    assert_eq!((acks_only.acks.len(), acks_only.data.len()), (1, 0));
    // Then one message per millisecond.
    for _ in 0..3 {
        p.advance(ms(1));
        assert_eq!(p.transmit().data.len(), 1);
    }
}
