//! Mux (smux) forwarding: streams, FIN, port errors, keepalives.

use super::*;

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
