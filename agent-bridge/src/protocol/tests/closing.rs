//! How sessions end: channel_closed, the terminate flag, disconnect flags.

use super::*;

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
