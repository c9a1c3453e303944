//! The handshake: the response, the transfer mode chosen by the agent version, timeouts.

use super::*;

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
