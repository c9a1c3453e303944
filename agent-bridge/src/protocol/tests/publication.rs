//! Flow control from the agent: pause_publication and start_publication.

use super::*;

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
    // Garbage digest and length on start_publication are tolerated (docs/protocol.md §2.5, §6.1).
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
