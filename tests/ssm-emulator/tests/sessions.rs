//! Data-channel sessions through the emulator with the in-test client: basic and mux port
//! forwarding in both modes, version gates, fault injection (each fault shown to have fired
//! and had its effect), and strict-mode violations. Every report is read after its session
//! ended.

#![allow(clippy::panic)] // test helpers report failures by panicking

mod common;

use common::*;
use fleet_access_ssm_emulator::{
    Config, Emulator, Faults, InstanceConfig, Mode, Running, SessionReport, SessionStatus,
    Transfer, unobserved_faults,
};

const INSTANCE: &str = "i-0123456789abcdef0";

async fn emulator(
    mode: Mode,
    faults: Faults,
    tweak: impl FnOnce(&mut Config),
) -> (Running, aws_sdk_ssm::Client) {
    let echo = echo_server().await;
    let mut config = Config {
        mode,
        faults,
        ..Config::default()
    };
    config.instances.push(
        InstanceConfig::new(INSTANCE)
            .with_port("22", echo)
            .with_port("80", echo),
    );
    tweak(&mut config);
    let running = Emulator::start(config).await.expect("emulator starts");
    let ssm = ssm_client(&running.endpoint_url());
    (running, ssm)
}

/// Ends the session with the TerminateSession flag, once everything the client sent is
/// acknowledged, and returns its final report.
async fn terminate(running: &Running, client: &Client, session_id: &str) -> SessionReport {
    client.flush().await.expect("everything acknowledged");
    client.flag(FLAG_TERMINATE).await.expect("flag");
    ended(running, session_id).await
}

/// The final report of a session that is ending.
async fn ended(running: &Running, session_id: &str) -> SessionReport {
    running
        .wait_for_end(session_id, TEST_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn basic_echo(running: &Running, ssm: &aws_sdk_ssm::Client, len: usize) -> SessionReport {
    let started = start_session(
        ssm,
        INSTANCE,
        "AWS-StartSSHSession",
        &[("portNumber", "22")],
    )
    .await
    .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    let data = pattern(len, 7);
    client.send(data.clone()).await.expect("send");
    let back = client.read_exact(len).await.expect("echo");
    assert!(back == data, "echoed bytes differ");
    let report = terminate(running, &client, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(report.transfer, Some(Transfer::Basic));
    assert_eq!(report.bytes_from_client, len as u64);
    report
}

#[tokio::test]
async fn basic_session_echoes_in_both_modes() {
    for mode in [Mode::Fast, Mode::Realistic] {
        let (running, ssm) = emulator(mode, Faults::default(), |_| {}).await;
        let report = basic_echo(&running, &ssm, 64 * 1024).await;
        assert!(
            report.violations.is_empty(),
            "{mode:?}: {:?}",
            report.violations
        );
        assert!(running.violations().is_empty());
        if mode == Mode::Realistic {
            // The agent's 1,024-byte reads: 64 KiB needs at least 64 Output messages.
            assert!(report.messages_to_client >= 64 + 2, "{report:?}");
        }
    }
}

/// A port-forwarding session to `port` of the instance with a mux client, past the handshake.
async fn port_forwarding(ssm: &aws_sdk_ssm::Client, port: &str) -> (Started, MuxClient) {
    let started = start_session(
        ssm,
        INSTANCE,
        "AWS-StartPortForwardingSession",
        &[("portNumber", port)],
    )
    .await
    .expect("StartSession");
    let client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    let mut mux = MuxClient::new(client);
    mux.client.handshake().await.expect("handshake");
    (started, mux)
}

async fn mux_echo(
    running: &Running,
    ssm: &aws_sdk_ssm::Client,
    streams: usize,
    len: usize,
) -> SessionReport {
    let (started, mut mux) = port_forwarding(ssm, "80").await;
    let mut ids = Vec::new();
    for i in 0..streams {
        let id = mux.open().await.expect("open");
        mux.write(id, &pattern(len, i as u8)).await.expect("write");
        ids.push(id);
    }
    let want: Vec<(u32, usize)> = ids.iter().map(|id| (*id, len)).collect();
    mux.read_until(&want).await.expect("echo");
    for (i, id) in ids.iter().enumerate() {
        assert!(
            mux.received[id] == pattern(len, i as u8),
            "stream {id} differs"
        );
        mux.close(*id).await.expect("fin");
    }
    let report = terminate(running, &mux.client, &started.session_id).await;
    assert_eq!(report.transfer, Some(Transfer::Mux), "{report:?}");
    assert_eq!(report.smux_streams_opened, streams as u64);
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    report
}

#[tokio::test]
async fn mux_session_carries_concurrent_streams_in_both_modes() {
    for mode in [Mode::Fast, Mode::Realistic] {
        let (running, ssm) = emulator(mode, Faults::default(), |_| {}).await;
        let report = mux_echo(&running, &ssm, 4, 40_000).await;
        assert!(
            report.violations.is_empty(),
            "{mode:?}: {:?}",
            report.violations
        );
        assert!(
            !report.smux_keepalive,
            "client 1.2.764.0 turns the agent's keepalive off"
        );
    }
}

/// As the agent's stream copies: a stream the client opens, writes to and closes at once (all
/// before the agent's dial is done) still delivers its bytes to the target, then the agent
/// closes the connection and sends the stream's FIN.
#[tokio::test]
async fn a_client_fin_during_the_dial_still_delivers_what_came_before_it() {
    let sink = fleet_access_tests::GatedSink::bind().await.expect("a sink");
    let address = sink.address;
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |c| {
        c.instances[0].ports.insert("80".into(), address);
    })
    .await;
    let (started, mut mux) = port_forwarding(&ssm, "80").await;
    let id = mux.open().await.expect("open");
    let request = pattern(100_000, 3);
    mux.write(id, &request).await.expect("write");
    mux.close(id).await.expect("close");
    let delivered = tokio::time::timeout(TEST_TIMEOUT, sink.received())
        .await
        .expect("the target sees the close")
        .expect("a connection");
    assert!(
        delivered == request,
        "{} of {} bytes",
        delivered.len(),
        request.len()
    );
    mux.wait_fin(id).await.expect("the agent's FIN");
    let report = terminate(&running, &mux.client, &started.session_id).await;
    assert!(report.violations.is_empty(), "{report:?}");
}

#[tokio::test]
async fn mux_dial_failure_sends_connect_to_port_error() {
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |_| {}).await;
    let (started, mut mux) = port_forwarding(&ssm, "81").await;
    let id = mux.open().await.expect("open");
    let event = mux
        .client
        .wait_event(|e| matches!(e, ClientEvent::Flag(_)))
        .await
        .expect("flag");
    assert_eq!(event, ClientEvent::Flag(3));
    mux.wait_fin(id).await.expect("FIN for the failed stream");
    let report = terminate(&running, &mux.client, &started.session_id).await;
    assert_eq!(report.smux_dial_failures, 1);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[tokio::test]
async fn version_gates_choose_basic_mode_and_keepalive() {
    // A client older than 1.1.70 gets basic mode even for LocalPortForwarding.
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |_| {}).await;
    let started = start_session(
        &ssm,
        INSTANCE,
        "AWS-StartPortForwardingSession",
        &[("portNumber", "80")],
    )
    .await
    .expect("StartSession");
    let options = ClientOptions {
        client_version: "1.1.61.0".into(),
        ..ClientOptions::default()
    };
    let mut client = Client::start(&started, ssm.clone(), options)
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    client.send(b"raw bytes".to_vec()).await.expect("send");
    assert_eq!(client.read_exact(9).await.expect("echo"), b"raw bytes");
    let report = terminate(&running, &client, &started.session_id).await;
    assert_eq!(report.transfer, Some(Transfer::Basic));
    assert!(report.violations.is_empty(), "{:?}", report.violations);

    // A source-built plugin (1.2.0.0) keeps the agent's smux keepalive on.
    let started = start_session(
        &ssm,
        INSTANCE,
        "AWS-StartPortForwardingSession",
        &[("portNumber", "80")],
    )
    .await
    .expect("StartSession");
    let options = ClientOptions {
        client_version: "1.2.0.0".into(),
        ..ClientOptions::default()
    };
    let mut client = Client::start(&started, ssm.clone(), options)
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    let report = terminate(&running, &client, &started.session_id).await;
    assert_eq!(report.transfer, Some(Transfer::Mux));
    assert!(report.smux_keepalive);
    assert!(report.violations.is_empty(), "{:?}", report.violations);

    // An agent ≤ 3.0.196.0 has no mux at all.
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |c| {
        c.instances[0].agent_version = "3.0.196.0".into();
    })
    .await;
    let started = start_session(
        &ssm,
        INSTANCE,
        "AWS-StartPortForwardingSession",
        &[("portNumber", "80")],
    )
    .await
    .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    assert_eq!(client.handshake().await.expect("handshake"), "3.0.196.0");
    let report = terminate(&running, &client, &started.session_id).await;
    assert_eq!(report.transfer, Some(Transfer::Basic));
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[tokio::test]
async fn transit_faults_are_survived_without_violations() {
    let cases = [
        (
            "drop",
            Faults {
                drop_every: Some(3),
                ..Faults::default()
            },
        ),
        (
            "duplicate",
            Faults {
                duplicate_every: Some(2),
                ..Faults::default()
            },
        ),
        (
            "reorder",
            Faults {
                reorder_window: Some(3),
                ..Faults::default()
            },
        ),
        (
            "delay",
            Faults {
                delay_ms: Some(30),
                ..Faults::default()
            },
        ),
        (
            "corrupt digest",
            Faults {
                corrupt_digest_every: Some(4),
                ..Faults::default()
            },
        ),
        (
            "flip payload bit",
            Faults {
                flip_payload_bit_every: Some(5),
                ..Faults::default()
            },
        ),
        (
            "withheld acks",
            Faults {
                withhold_ack_every: Some(3),
                ..Faults::default()
            },
        ),
        (
            "lost client frames",
            Faults {
                drop_client_every: Some(4),
                ..Faults::default()
            },
        ),
        (
            "odd control messages",
            Faults {
                start_publication_first: true,
                garbage_publication: true,
                extra_message_types: true,
                legacy_channel_closed: true,
                ..Faults::default()
            },
        ),
    ];
    // Realistic mode: the agent's 1,024-byte reads make many messages, so that every fault
    // has something to hit.
    for (name, faults) in cases {
        let (running, ssm) = emulator(Mode::Realistic, faults.clone(), |_| {}).await;
        let report = basic_echo(&running, &ssm, 20 * 1024).await;
        assert_survived(name, &faults, &report);
        let (running, ssm) = emulator(Mode::Realistic, faults.clone(), |_| {}).await;
        let report = mux_echo(&running, &ssm, 3, 10_000).await;
        assert_survived(&format!("{name} (mux)"), &faults, &report);
    }
}

/// The session saw no violation, and its report shows that every configured fault fired and
/// had its effect.
fn assert_survived(name: &str, faults: &Faults, report: &SessionReport) {
    assert!(
        report.violations.is_empty(),
        "{name}: {:?}",
        report.violations
    );
    let unobserved = unobserved_faults(faults, std::slice::from_ref(report));
    assert!(unobserved.is_empty(), "{name}: {unobserved:?}\n{report:?}");
}

#[tokio::test]
async fn connection_faults_are_survived_by_resuming() {
    let cases = [
        (
            "recycle",
            Faults {
                recycle_after_frames: Some(6),
                ..Faults::default()
            },
        ),
        (
            "tcp reset",
            Faults {
                reset_after_frames: Some(6),
                ..Faults::default()
            },
        ),
        (
            "black hole",
            Faults {
                black_hole_after_frames: Some(6),
                ..Faults::default()
            },
        ),
    ];
    for (name, faults) in cases {
        let (running, ssm) = emulator(Mode::Fast, faults.clone(), |_| {}).await;
        let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
            .await
            .expect("StartSession");
        let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
            .await
            .expect("client");
        client.handshake().await.expect("handshake");
        let data = pattern(30 * 1024, 1);
        client.send(data.clone()).await.expect("send");
        let back = client.read_exact(data.len()).await.expect(name);
        assert!(back == data, "{name}: echoed bytes differ");
        let report = terminate(&running, &client, &started.session_id).await;
        assert_survived(name, &faults, &report);
    }
}

#[tokio::test]
async fn injected_recycle_on_a_live_session_is_resumed() {
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |_| {}).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    client.send(b"before".to_vec()).await.expect("send");
    assert_eq!(client.read_exact(6).await.expect("echo"), b"before");
    assert!(running.inject(
        &started.session_id,
        fleet_access_ssm_emulator::Injection::Recycle
    ));
    client
        .wait_event(|e| *e == ClientEvent::Reconnected)
        .await
        .expect("reconnect");
    client.send(b"after".to_vec()).await.expect("send");
    assert_eq!(client.read_exact(5).await.expect("echo"), b"after");
    let report = terminate(&running, &client, &started.session_id).await;
    assert_eq!(report.injected.websocket_recycles, 1, "{report:?}");
    assert!(report.connections >= 2, "{report:?}");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

/// A target that writes `len` bytes of `pattern(len, seed)` to every connection, then shuts
/// its write side; what it is sent is read and dropped (unread input would make the close a
/// reset, which discards data in flight).
async fn source_server(len: usize, seed: u8) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let data = std::sync::Arc::new(pattern(len, seed));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let data = data.clone();
            let (mut r, mut w) = s.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            });
            tokio::spawn(async move {
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_black_hole_mid_download_holds_the_agent_back_and_loses_nothing() {
    const LEN: usize = 8 * 1024 * 1024;
    let source = source_server(LEN, 9).await;
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |c| {
        c.instances[0].ports.insert("80".to_owned(), source);
    })
    .await;
    let (started, mut mux) = port_forwarding(&ssm, "80").await;
    let id = mux.open().await.expect("open");
    mux.read_until(&[(id, 512 * 1024)])
        .await
        .expect("first bytes");
    // From here on no ack reaches the agent. The write leaves the client with unacked data,
    // so it gives the connection up and resumes; meanwhile the agent, whose writes go into
    // the hole, stops reading its target once the transport is full.
    assert!(running.inject(
        &started.session_id,
        fleet_access_ssm_emulator::Injection::BlackHole
    ));
    mux.write(id, b"x").await.expect("write");
    if let Err(e) = mux.read_until(&[(id, LEN)]).await {
        let mut events = Vec::new();
        while let Ok(e) = mux.client.events.try_recv() {
            events.push(e);
        }
        panic!(
            "the whole download: {e:#}; received {} bytes; client events {events:?}; {:?}",
            mux.received.get(&id).map_or(0, Vec::len),
            running.session_report(&started.session_id)
        );
    }
    assert!(
        mux.received[&id] == pattern(LEN, 9),
        "downloaded bytes differ"
    );
    let report = terminate(&running, &mux.client, &started.session_id).await;
    assert_eq!(report.injected.black_holes, 1, "{report:?}");
    assert!(report.connections >= 2, "{report:?}");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[tokio::test]
async fn legacy_agent_without_handshake_streams_at_once() {
    let faults = Faults {
        legacy_no_handshake: true,
        ..Faults::default()
    };
    let (running, ssm) = emulator(Mode::Fast, faults.clone(), |_| {}).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession");
    let options = ClientOptions {
        expect_handshake: false,
        ..ClientOptions::default()
    };
    let mut client = Client::start(&started, ssm.clone(), options)
        .await
        .expect("client");
    client.send(b"no handshake".to_vec()).await.expect("send");
    assert_eq!(client.read_exact(12).await.expect("echo"), b"no handshake");
    let report = terminate(&running, &client, &started.session_id).await;
    assert_eq!(report.transfer, Some(Transfer::Basic));
    assert!(report.client_version.is_none());
    assert_survived("legacy agent", &faults, &report);
}

#[tokio::test]
async fn target_eof_in_ssh_mode_ends_the_session_with_channel_closed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"SSH-2.0-fake\r\n").await;
        }
    });
    let (running, ssm) = emulator(Mode::Realistic, Faults::default(), |c| {
        c.instances[0].ports.insert("2022".into(), addr);
    })
    .await;
    let started = start_session(
        &ssm,
        INSTANCE,
        "AWS-StartSSHSession",
        &[("portNumber", "2022")],
    )
    .await
    .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    assert_eq!(
        client.read_exact(14).await.expect("banner"),
        b"SSH-2.0-fake\r\n"
    );
    let closed = client
        .wait_event(|e| matches!(e, ClientEvent::ChannelClosed(_)))
        .await
        .expect("closed");
    assert_eq!(closed, ClientEvent::ChannelClosed(String::new()));
    let report = ended(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Terminated);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[tokio::test]
async fn unreachable_basic_target_fails_with_the_agents_message() {
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |_| {}).await;
    let started = start_session(
        &ssm,
        INSTANCE,
        "AWS-StartSSHSession",
        &[("portNumber", "2200")],
    )
    .await
    .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    let closed = client
        .wait_event(|e| matches!(e, ClientEvent::ChannelClosed(_)))
        .await
        .expect("closed");
    let ClientEvent::ChannelClosed(output) = closed else {
        unreachable!()
    };
    assert!(
        output.starts_with("Unable to connect to specified port"),
        "{output}"
    );
    let report = ended(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Failed);
}

#[tokio::test]
async fn terminate_session_api_sends_channel_closed() {
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |_| {}).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    ssm.terminate_session()
        .session_id(&started.session_id)
        .send()
        .await
        .expect("terminate");
    client
        .wait_event(|e| matches!(e, ClientEvent::ChannelClosed(_)))
        .await
        .expect("closed");
    let report = ended(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Terminated);
    assert_eq!(
        report.close_reason.as_deref(),
        Some("TerminateSession called")
    );
}

#[tokio::test]
async fn handshake_timeout_fails_the_session() {
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |c| {
        c.handshake_timeout_ms = 300
    })
    .await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession");
    // Opens the channel but never answers the HandshakeRequest.
    let _raw = RawClient::open(&started, "1.2.764.0").await.expect("open");
    let report = ended(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Failed);
    assert!(
        report
            .close_reason
            .as_deref()
            .is_some_and(|r| r.contains("Handshake timed out")),
        "{report:?}"
    );
}

#[tokio::test]
async fn realistic_gateway_closes_sessions_over_the_rate_limit() {
    let (running, ssm) = emulator(Mode::Realistic, Faults::default(), |c| {
        c.rate_limit_per_second = 50
    })
    .await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    // 200 messages of 1 KiB sent without pacing.
    client.send(pattern(200 * 1024, 3)).await.expect("send");
    let report = ended(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Failed);
    assert!(
        report.violations.iter().any(|v| v.contains("per second")),
        "{report:?}"
    );
}

#[tokio::test]
async fn idle_sessions_end_with_channel_closed() {
    // Counted from the end of the handshake: a slow handshake cannot run into it.
    let (running, ssm) =
        emulator(Mode::Fast, Faults::default(), |c| c.idle_timeout_ms = 1000).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession");
    let mut client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    client.handshake().await.expect("handshake");
    let closed = client
        .wait_event(|e| matches!(e, ClientEvent::ChannelClosed(_)))
        .await
        .expect("closed");
    assert_eq!(
        closed,
        ClientEvent::ChannelClosed("Session idle timeout".into())
    );
    let report = ended(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Terminated);
}

#[tokio::test]
async fn remote_host_document_leads_to_the_mapped_address() {
    let echo = echo_server().await;
    let (running, ssm) = emulator(Mode::Fast, Faults::default(), |c| {
        c.instances[0].ports.insert("db.internal:5432".into(), echo);
    })
    .await;
    let started = start_session(
        &ssm,
        INSTANCE,
        "AWS-StartPortForwardingSessionToRemoteHost",
        &[("host", "db.internal"), ("portNumber", "5432")],
    )
    .await
    .expect("StartSession");
    let client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    let mut mux = MuxClient::new(client);
    mux.client.handshake().await.expect("handshake");
    let id = mux.open().await.expect("open");
    mux.write(id, b"remote").await.expect("write");
    mux.read_until(&[(id, 6)]).await.expect("echo");
    assert_eq!(mux.received[&id], b"remote");
    let report = terminate(&running, &mux.client, &started.session_id).await;
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}
