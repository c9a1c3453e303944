//! Strictness: each client protocol violation is recorded with a readable reason, and in
//! strict mode fails the session; in lenient mode it is recorded and the session goes on.
//! Driven by a raw client that sends hand-made frames.

mod common;

use std::time::Duration;

use common::*;
use fleet_access_ssm_emulator::message::{
    self, ClientMessage, HandshakeResponse, MessageType, ProcessedClientAction, flag, payload_type,
};
use fleet_access_ssm_emulator::{
    Config, Emulator, InstanceConfig, Mode, Running, SessionReport, SessionStatus,
};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const INSTANCE: &str = "i-0bbbbbbbbbbbbbbb1";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn emulator(tweak: impl FnOnce(&mut Config)) -> (Running, aws_sdk_ssm::Client) {
    let echo = echo_server().await;
    let mut config = Config {
        mode: Mode::Fast,
        ..Config::default()
    };
    config.instances.push(
        InstanceConfig::new(INSTANCE)
            .with_port("22", echo)
            .with_port("80", echo),
    );
    tweak(&mut config);
    let running = Emulator::start(config).await.expect("emulator");
    let ssm = ssm_client(&running.endpoint_url());
    (running, ssm)
}

fn input(seq: i64, pt: u32, payload: &[u8]) -> ClientMessage {
    ClientMessage::new(
        MessageType::InputStreamData,
        seq,
        u64::from(seq == 0),
        pt,
        payload.to_vec(),
    )
}

async fn send(ws: &mut Ws, m: &ClientMessage) {
    ws.send(Message::Binary(m.encode().into()))
        .await
        .expect("send");
}

async fn send_raw(ws: &mut Ws, bytes: Vec<u8>) {
    ws.send(Message::Binary(bytes.into())).await.expect("send");
}

/// Next agent stream message (acks and control messages skipped).
async fn next_output(ws: &mut Ws) -> ClientMessage {
    loop {
        let frame = tokio::time::timeout(TEST_TIMEOUT, ws.next())
            .await
            .expect("frame in time");
        let b = match frame {
            Some(Ok(Message::Binary(b))) => b,
            other => unreachable!("connection ended: {other:?}"),
        };
        let m = message::decode(&b).expect("decodes").message;
        if m.message_type == MessageType::OutputStreamData {
            return m;
        }
    }
}

async fn ack(ws: &mut Ws, m: &ClientMessage) {
    send(
        ws,
        &ClientMessage::acknowledge(&m.message_type, m.message_id, m.sequence_number),
    )
    .await;
}

fn response(client_version: &str) -> Vec<u8> {
    serde_json::to_vec(&HandshakeResponse {
        client_version: client_version.into(),
        processed_client_actions: vec![ProcessedClientAction {
            action_type: "SessionType".into(),
            action_status: 1,
            action_result: serde_json::Value::Null,
            error: None,
        }],
        errors: None,
    })
    .expect("json")
}

/// Opens a session and completes the handshake correctly; the next client seq is 1.
async fn handshaken(ssm: &aws_sdk_ssm::Client, document: &str) -> (Started, Ws) {
    let started = start_session(ssm, INSTANCE, document, &[])
        .await
        .expect("start");
    let mut ws = open_ws(&started.url, &started.token, "1.2.764.0")
        .await
        .expect("open");
    let req = next_output(&mut ws).await;
    assert_eq!(req.payload_type, payload_type::HANDSHAKE_REQUEST);
    ack(&mut ws, &req).await;
    send(
        &mut ws,
        &input(0, payload_type::HANDSHAKE_RESPONSE, &response("1.2.764.0")),
    )
    .await;
    let complete = next_output(&mut ws).await;
    assert_eq!(complete.payload_type, payload_type::HANDSHAKE_COMPLETE);
    ack(&mut ws, &complete).await;
    (started, ws)
}

async fn failed_with(running: &Running, sid: &str, needle: &str) -> SessionReport {
    let report = running
        .wait_for_end(sid, TEST_TIMEOUT)
        .await
        .expect("report");
    assert_eq!(report.status, SessionStatus::Failed, "{report:?}");
    assert!(
        report.violations.iter().any(|v| v.contains(needle)),
        "want {needle:?}: {report:?}"
    );
    assert!(
        report
            .close_reason
            .as_deref()
            .is_some_and(|r| r.contains(needle)),
        "{report:?}"
    );
    assert!(
        running
            .violations()
            .iter()
            .any(|v| v.reason.contains(needle))
    );
    report
}

#[tokio::test]
async fn open_message_without_client_version_fails_in_strict_mode_only() {
    for strict in [true, false] {
        let (running, ssm) = emulator(|c| c.strict = strict).await;
        let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
            .await
            .expect("start");
        let (mut ws, _) = tokio_tungstenite::connect_async(&started.url)
            .await
            .expect("dial");
        // What ssm-session-client sends: no ClientId, no ClientVersion.
        let open = serde_json::json!({
            "MessageSchemaVersion": "1.0",
            "RequestId": uuid::Uuid::new_v4().to_string(),
            "TokenValue": started.token,
        });
        ws.send(Message::Text(open.to_string().into()))
            .await
            .expect("open");
        let req = next_output(&mut ws).await;
        assert_eq!(req.payload_type, payload_type::HANDSHAKE_REQUEST);
        if strict {
            failed_with(&running, &started.session_id, "lacks ClientId").await;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let report = running.session_report(&started.session_id).expect("report");
            assert!(report.violations.is_empty(), "{report:?}");
            assert_eq!(report.status, SessionStatus::Connected);
        }
    }
}

#[tokio::test]
async fn binary_open_message_and_reused_token_are_rejected() {
    let (running, ssm) = emulator(|_| {}).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("start");
    let (mut ws, _) = tokio_tungstenite::connect_async(&started.url)
        .await
        .expect("dial");
    ws.send(Message::Binary(b"{}".to_vec().into()))
        .await
        .expect("send");
    failed_with(&running, &started.session_id, "binary frame").await;

    let (running, ssm) = emulator(|_| {}).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("start");
    let _first = open_ws(&started.url, &started.token, "1.2.764.0")
        .await
        .expect("open");
    let _second = open_ws(&started.url, &started.token, "1.2.764.0")
        .await
        .expect("open");
    failed_with(&running, &started.session_id, "already used").await;
}

#[tokio::test]
async fn data_before_handshake_complete_is_a_violation() {
    let (running, ssm) = emulator(|_| {}).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("start");
    let mut ws = open_ws(&started.url, &started.token, "1.2.764.0")
        .await
        .expect("open");
    send(&mut ws, &input(0, payload_type::OUTPUT, b"too early")).await;
    failed_with(&running, &started.session_id, "before HandshakeComplete").await;
}

type Corruption = fn(&mut Vec<u8>);

#[tokio::test]
async fn malformed_headers_are_violations() {
    let cases: [(&str, Corruption); 4] = [
        ("HeaderLength", |b| {
            // HL 120, with the payload still read from HL+4: a shifted frame.
            b[..4].copy_from_slice(&120u32.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]);
        }),
        ("PayloadDigest", |b| b[80] ^= 0xFF),
        ("padded with", |b| b[4 + 17] = 0),
        ("PayloadLength", |b| {
            b[116..120].copy_from_slice(&999u32.to_be_bytes())
        }),
    ];
    for (needle, corrupt) in cases {
        let (running, ssm) = emulator(|_| {}).await;
        let (started, mut ws) = handshaken(&ssm, "AWS-StartSSHSession").await;
        let mut bytes = input(1, payload_type::OUTPUT, b"hello").encode();
        corrupt(&mut bytes);
        send_raw(&mut ws, bytes).await;
        failed_with(&running, &started.session_id, needle).await;
    }
}

#[tokio::test]
async fn lenient_mode_records_violations_but_keeps_the_session() {
    let (running, ssm) = emulator(|c| c.strict = false).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartSSHSession").await;
    let mut bytes = input(1, payload_type::OUTPUT, b"hello").encode();
    bytes[80] ^= 0xFF; // bad digest: recorded, not acked
    send_raw(&mut ws, bytes).await;
    send(&mut ws, &input(1, payload_type::OUTPUT, b"hello")).await;
    let echo = next_output(&mut ws).await;
    assert_eq!(echo.payload, b"hello");
    let report = running.session_report(&started.session_id).expect("report");
    assert_eq!(report.status, SessionStatus::Connected);
    assert_eq!(report.violations.len(), 1, "{report:?}");
}

#[tokio::test]
async fn a_different_message_under_a_used_seq_is_a_violation() {
    let (running, ssm) = emulator(|_| {}).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartSSHSession").await;
    send(&mut ws, &input(1, payload_type::OUTPUT, b"first")).await;
    let _ = next_output(&mut ws).await;
    send(&mut ws, &input(1, payload_type::OUTPUT, b"other")).await;
    failed_with(
        &running,
        &started.session_id,
        "different message under already-used seq 1",
    )
    .await;
}

#[tokio::test]
async fn a_sequence_gap_is_a_violation() {
    let (running, ssm) = emulator(|c| c.sequence_gap_timeout_ms = 300).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartSSHSession").await;
    send(&mut ws, &input(2, payload_type::OUTPUT, b"skipped seq 1")).await;
    failed_with(&running, &started.session_id, "sequence gap").await;
}

#[tokio::test]
async fn acks_for_unsent_messages_are_violations() {
    let (running, ssm) = emulator(|_| {}).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartSSHSession").await;
    let mut fake = ClientMessage::new(MessageType::OutputStreamData, 40, 0, 1, vec![]);
    fake.sequence_number = 40;
    ack(&mut ws, &fake).await;
    failed_with(&running, &started.session_id, "never sent").await;
}

#[tokio::test]
async fn a_client_that_never_acks_is_a_violation() {
    let (running, ssm) = emulator(|c| c.unacked_retransmit_limit = 4).await;
    let started = start_session(&ssm, INSTANCE, "AWS-StartSSHSession", &[])
        .await
        .expect("start");
    let mut ws = open_ws(&started.url, &started.token, "1.2.764.0")
        .await
        .expect("open");
    let _req = next_output(&mut ws).await; // never acked
    send(
        &mut ws,
        &input(0, payload_type::HANDSHAKE_RESPONSE, &response("1.2.764.0")),
    )
    .await;
    // Keep the client visibly alive with acks for nothing in particular: repeated acks of the
    // HandshakeComplete only.
    let complete = next_output(&mut ws).await;
    let mut seq = 1;
    let report = loop {
        ack(&mut ws, &complete).await;
        send(&mut ws, &input(seq, payload_type::OUTPUT, b".")).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = running.session_report(&started.session_id).expect("report");
        if r.status.is_ended() || seq > 200 {
            break r;
        }
    };
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("never acknowledged output seq 0")),
        "{report:?}"
    );
}

#[tokio::test]
async fn terminate_flag_to_an_old_agent_is_a_violation() {
    let (running, ssm) = emulator(|c| c.instances[0].agent_version = "2.3.672.0".into()).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartSSHSession").await;
    send(
        &mut ws,
        &input(
            1,
            payload_type::FLAG,
            &message::flag_payload(flag::TERMINATE_SESSION),
        ),
    )
    .await;
    failed_with(&running, &started.session_id, "needs > 2.3.722.0").await;
}

#[tokio::test]
async fn even_smux_stream_ids_are_violations() {
    use fleet_access_ssm_emulator::smux;
    let (running, ssm) = emulator(|_| {}).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartPortForwardingSession").await;
    let syn = smux::Frame::control(smux::Command::Syn, 2).encode();
    send(&mut ws, &input(1, payload_type::OUTPUT, &syn)).await;
    failed_with(&running, &started.session_id, "client ids are odd").await;

    let (running, ssm) = emulator(|_| {}).await;
    let (started, mut ws) = handshaken(&ssm, "AWS-StartPortForwardingSession").await;
    let v2 = [2u8, 0, 0, 0, 3, 0, 0, 0];
    send(&mut ws, &input(1, payload_type::OUTPUT, &v2)).await;
    failed_with(&running, &started.session_id, "smux version byte 2").await;
}
