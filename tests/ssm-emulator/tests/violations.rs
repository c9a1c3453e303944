//! Strictness: every check the emulator applies to a client fires on exactly the input that
//! breaks it, with its own reason; in strict mode it fails the session, in lenient mode the
//! session goes on. Violations in a session's last frames (after the TerminateSession flag, on
//! a replaced WebSocket) are recorded too, and legal late frames are not violations. Driven by
//! a raw client that sends hand-made frames; every report is read after its session ended.
//! Section numbers (§) are those of docs/protocol.md.
//!
//! Each `violation` string below is the reason one `violation(...)`/`record_violation(...)` call
//! in the emulator's source produces: together the tables cover every one of them.

#![allow(clippy::panic)] // test helpers report failures by panicking

mod common;

use common::*;
use fleet_access_ssm_emulator::message::{
    AcknowledgeContent, ClientMessage, HandshakeResponse, MessageType, OpenDataChannelInput,
    ProcessedClientAction, flag, flag_payload, payload_type,
};
use fleet_access_ssm_emulator::smux::{self, Command, Frame};
use fleet_access_ssm_emulator::{
    Config, Emulator, InstanceConfig, Mode, Running, SessionReport, SessionStatus,
};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const INSTANCE: &str = "i-0bbbbbbbbbbbbbbb1";
const CLIENT_VERSION: &str = "1.2.764.0";
/// Basic mode, port 22 (an echo target).
const SSH: &str = "AWS-StartSSHSession";
/// Mux mode, port 80 (an echo target).
const FORWARD: &str = "AWS-StartPortForwardingSession";
/// A shell: the account's default document (no handshake).
const SHELL: &str = "SSM-SessionManagerRunShell";

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

fn defaults(_: &mut Config) {}

fn input(seq: i64, pt: u32, payload: &[u8]) -> ClientMessage {
    ClientMessage::new(
        MessageType::InputStreamData,
        seq,
        u64::from(seq == 0),
        pt,
        payload.to_vec(),
    )
}

fn response_with(client_version: &str, actions: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&HandshakeResponse {
        client_version: client_version.into(),
        processed_client_actions: actions
            .iter()
            .map(|a| ProcessedClientAction {
                action_type: (*a).into(),
                action_status: 1,
                action_result: serde_json::Value::Null,
                error: None,
            })
            .collect(),
        errors: None,
    })
    .expect("json")
}

fn response() -> Vec<u8> {
    response_with(CLIENT_VERSION, &["SessionType"])
}

fn smux_bytes(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.encode_into(&mut out);
    }
    out
}

/// The client's seq 1 carrying `payload_type` and `payload`, as a frame.
fn next(pt: u32, payload: &[u8]) -> Message {
    binary(&input(1, pt, payload))
}

/// The client's seq 1 Output, with its bytes damaged by `corrupt`.
fn corrupted(corrupt: fn(&mut Vec<u8>)) -> Message {
    let mut bytes = input(1, payload_type::OUTPUT, b"hello").encode();
    corrupt(&mut bytes);
    Message::Binary(bytes.into())
}

/// How far a case's session gets before the offending input.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// The open message went out; the HandshakeRequest came back and was acknowledged.
    Opened,
    /// The handshake is complete; the HandshakeComplete (agent seq 1) is not acknowledged and
    /// the client's next seq is 1.
    Handshaken,
    /// A shell session (no handshake) whose shell runs: its first output arrived and was
    /// acknowledged; the client's next seq is 0.
    Shell,
}

/// A session driven by a raw client up to a [`Stage`].
struct Session {
    started: Started,
    raw: RawClient,
    /// HandshakeComplete, at [`Stage::Handshaken`].
    complete: Option<ClientMessage>,
}

impl Session {
    fn complete(&self) -> &ClientMessage {
        self.complete.as_ref().expect("a handshaken session")
    }
}

async fn session(ssm: &aws_sdk_ssm::Client, document: &str, stage: Stage) -> Session {
    let started = start_session(ssm, INSTANCE, document, &[])
        .await
        .expect("start");
    let mut raw = RawClient::open(&started, CLIENT_VERSION)
        .await
        .expect("open");
    if let Stage::Shell = stage {
        let prompt = raw
            .next_output(payload_type::OUTPUT)
            .await
            .expect("the shell's prompt");
        raw.ack(&prompt).await.expect("ack");
        return Session {
            started,
            raw,
            complete: None,
        };
    }
    let request = raw
        .next_output(payload_type::HANDSHAKE_REQUEST)
        .await
        .expect("HandshakeRequest");
    raw.ack(&request).await.expect("ack");
    let mut complete = None;
    if let Stage::Handshaken = stage {
        raw.send(&input(0, payload_type::HANDSHAKE_RESPONSE, &response()))
            .await
            .expect("response");
        complete = Some(
            raw.next_output(payload_type::HANDSHAKE_COMPLETE)
                .await
                .expect("HandshakeComplete"),
        );
    }
    Session {
        started,
        raw,
        complete,
    }
}

/// Waits for the session's end; it must have failed on a first violation containing `needle`,
/// named in its close reason and in the emulator's global list.
async fn fails_with(running: &Running, session_id: &str, needle: &str) -> SessionReport {
    let report = running
        .wait_for_end(session_id, TEST_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{needle}: {e}"));
    assert_eq!(report.status, SessionStatus::Failed, "{needle}: {report:?}");
    let first = report.violations.first().map_or("", String::as_str);
    assert!(
        first.contains(needle),
        "want {needle:?} first, got {:?}",
        report.violations
    );
    assert!(
        report
            .close_reason
            .as_deref()
            .is_some_and(|r| r.contains(needle)),
        "{needle}: {report:?}"
    );
    assert!(
        running
            .violations()
            .iter()
            .any(|v| v.session_id.as_deref() == Some(session_id) && v.reason.contains(needle)),
        "{needle}: {:?}",
        running.violations()
    );
    report
}

/// A check of the agent: at `stage` of a `document` session, the client sends `frames` (in one
/// write); the session must fail on `violation`.
struct FrameCase {
    violation: &'static str,
    document: &'static str,
    stage: Stage,
    config: fn(&mut Config),
    frames: fn(&Session) -> Vec<Message>,
}

const fn case(violation: &'static str, frames: fn(&Session) -> Vec<Message>) -> FrameCase {
    FrameCase {
        violation,
        document: SSH,
        stage: Stage::Handshaken,
        config: defaults,
        frames,
    }
}

const fn mux_case(violation: &'static str, frames: fn(&Session) -> Vec<Message>) -> FrameCase {
    FrameCase {
        document: FORWARD,
        ..case(violation, frames)
    }
}

const fn handshake_case(
    violation: &'static str,
    frames: fn(&Session) -> Vec<Message>,
) -> FrameCase {
    FrameCase {
        stage: Stage::Opened,
        ..case(violation, frames)
    }
}

const fn shell_case(violation: &'static str, frames: fn(&Session) -> Vec<Message>) -> FrameCase {
    FrameCase {
        document: SHELL,
        stage: Stage::Shell,
        ..case(violation, frames)
    }
}

const FRAME_CASES: &[FrameCase] = &[
    // Framing.
    case("text WebSocket frame after the open message", |_| {
        vec![Message::Text("{}".into())]
    }),
    case(
        "undecodable client frame: frame of 10 bytes is shorter than a header",
        |_| vec![Message::Binary(vec![0u8; 10].into())],
    ),
    // Header checks (§9.1 item 4).
    case("HeaderLength is 120, not 116", |_| {
        // HL 120, with the payload still read from HL+4: a shifted frame.
        vec![corrupted(|b| {
            b[..4].copy_from_slice(&120u32.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]);
        })]
    }),
    case("is padded with Mixed, not spaces", |_| {
        vec![corrupted(|b| b[4 + 17] = 0)]
    }),
    case("SchemaVersion is 2, not 1", |_| {
        vec![corrupted(|b| {
            b[36..40].copy_from_slice(&2u32.to_be_bytes())
        })]
    }),
    case("CreatedDate is 0", |_| {
        vec![corrupted(|b| b[40..48].fill(0))]
    }),
    case("PayloadLength is 999 but the payload has 5 bytes", |_| {
        vec![corrupted(|b| {
            b[116..120].copy_from_slice(&999u32.to_be_bytes())
        })]
    }),
    case(
        "PayloadDigest does not match the payload (input_stream_data seq 1)",
        |_| vec![corrupted(|b| b[80] ^= 0xFF)],
    ),
    case("client sent a channel_closed message", |_| {
        vec![binary(&ClientMessage::new(
            MessageType::ChannelClosed,
            0,
            3,
            payload_type::UNSET,
            b"{}".to_vec(),
        ))]
    }),
    // Acknowledgements (§4.2).
    case("acknowledge payload is not the §4.2 JSON", |_| {
        vec![binary(&ClientMessage::new(
            MessageType::Acknowledge,
            0,
            3,
            payload_type::UNSET,
            b"not json".to_vec(),
        ))]
    }),
    case("acknowledge with PayloadType 1", |s| {
        let c = s.complete();
        let mut ack = ClientMessage::acknowledge(&c.message_type, c.message_id, 1);
        ack.payload_type = payload_type::OUTPUT;
        vec![binary(&ack)]
    }),
    case("acknowledge for message type \"input_stream_data\"", |s| {
        let c = s.complete();
        vec![binary(&ClientMessage::acknowledge(
            &MessageType::InputStreamData,
            c.message_id,
            1,
        ))]
    }),
    case("acknowledge with IsSequentialMessage false", |s| {
        let content = AcknowledgeContent {
            acknowledged_message_type: "output_stream_data".into(),
            acknowledged_message_id: s.complete().message_id.to_string(),
            acknowledged_message_sequence_number: 1,
            is_sequential_message: false,
        };
        vec![binary(&ClientMessage::new(
            MessageType::Acknowledge,
            0,
            3,
            payload_type::UNSET,
            serde_json::to_vec(&content).expect("json"),
        ))]
    }),
    case("acknowledge for seq 1 names message id", |s| {
        vec![binary(&ClientMessage::acknowledge(
            &s.complete().message_type,
            uuid::Uuid::new_v4(),
            1,
        ))]
    }),
    case("acknowledge for seq 40, which the agent never sent", |s| {
        let c = s.complete();
        vec![binary(&ClientMessage::acknowledge(
            &c.message_type,
            c.message_id,
            40,
        ))]
    }),
    // The client's stream (§4.1, §9.1 item 5).
    case("negative sequence number -1", |_| {
        vec![binary(&input(-1, payload_type::OUTPUT, b"x"))]
    }),
    mux_case(
        "client sent a different message under already-used seq 1",
        |_| {
            let nop = smux_bytes(&[Frame::control(Command::Nop, 0)]);
            let syn = smux_bytes(&[Frame::control(Command::Syn, 3)]);
            vec![
                next(payload_type::OUTPUT, &nop),
                next(payload_type::OUTPUT, &syn),
            ]
        },
    ),
    FrameCase {
        config: |c| c.sequence_gap_timeout_ms = 300,
        ..case(
            "client sequence gap: expected seq 1 but only later ones (from 2) arrived",
            |_| vec![binary(&input(2, payload_type::OUTPUT, b"seq 1 skipped"))],
        )
    },
    FrameCase {
        config: |c| {
            c.mode = Mode::Realistic;
            c.rate_limit_per_second = 10;
        },
        ..case(
            "client exceeded the gateway's 10 stream messages per second",
            |_| {
                (1..=30)
                    .map(|seq| binary(&input(seq, payload_type::OUTPUT, b".")))
                    .collect()
            },
        )
    },
    // Payload types (§3.2).
    handshake_case(
        "Output (seq 0) before HandshakeComplete; the agent discards it",
        |_| vec![binary(&input(0, payload_type::OUTPUT, b"too early"))],
    ),
    handshake_case(
        "Flag (seq 0) before HandshakeComplete; the agent drops it",
        |_| {
            vec![binary(&input(
                0,
                payload_type::FLAG,
                &flag_payload(flag::TERMINATE_SESSION),
            ))]
        },
    ),
    case(
        "client sent Size (terminal size) in a Port session (PayloadType 3) as seq 1",
        |_| vec![next(payload_type::SIZE, b"{\"cols\":80,\"rows\":24}")],
    ),
    // Shell sessions: what the shell plugin cannot take.
    shell_case(
        "Size payload's cols -1 is not a uint32 (seq 0): the agent never acknowledges it",
        |_| {
            vec![binary(&input(
                0,
                payload_type::SIZE,
                b"{\"cols\":-1,\"rows\":24}",
            ))]
        },
    ),
    shell_case("Size payload is not JSON", |_| {
        vec![binary(&input(0, payload_type::SIZE, b"80x24"))]
    }),
    shell_case(
        "Flag (seq 0) in a Standard_Stream session: the shell plugin ignores flags",
        |_| {
            vec![binary(&input(
                0,
                payload_type::FLAG,
                &flag_payload(flag::TERMINATE_SESSION),
            ))]
        },
    ),
    case(
        "client sent EncChallengeResponse in a session without KMS (PayloadType 9) as seq 1",
        |_| vec![next(payload_type::ENC_CHALLENGE_RESPONSE, b"{}")],
    ),
    case(
        "client sent an unexpected PayloadType (PayloadType 42) as seq 1",
        |_| vec![next(42, b"?")],
    ),
    // The handshake (§5.2).
    case("HandshakeResponse outside the handshake", |_| {
        vec![next(payload_type::HANDSHAKE_RESPONSE, &response())]
    }),
    handshake_case("HandshakeResponse is not valid JSON", |_| {
        vec![binary(&input(0, payload_type::HANDSHAKE_RESPONSE, b"nope"))]
    }),
    handshake_case("ClientVersion \"latest\" is not a dotted version", |_| {
        let r = response_with("latest", &["SessionType"]);
        vec![binary(&input(0, payload_type::HANDSHAKE_RESPONSE, &r))]
    }),
    handshake_case(
        "HandshakeResponse must process exactly [\"SessionType\"], got [\"SessionType\", \"KMSEncryption\"]",
        |_| {
            let r = response_with(CLIENT_VERSION, &["SessionType", "KMSEncryption"]);
            vec![binary(&input(0, payload_type::HANDSHAKE_RESPONSE, &r))]
        },
    ),
    // Flags (§3.3).
    case("Flag payload of 3 bytes, expected 4", |_| {
        vec![next(payload_type::FLAG, &[0, 0, 2])]
    }),
    mux_case("DisconnectToPort flag outside basic mode", |_| {
        vec![next(
            payload_type::FLAG,
            &flag_payload(flag::DISCONNECT_TO_PORT),
        )]
    }),
    case("client sent Flag 7", |_| {
        vec![next(payload_type::FLAG, &flag_payload(7))]
    }),
    FrameCase {
        config: |c| c.instances[0].agent_version = "2.3.672.0".into(),
        ..case(
            "TerminateSession flag sent to agent 2.3.672.0 (needs > 2.3.722.0)",
            |_| {
                vec![next(
                    payload_type::FLAG,
                    &flag_payload(flag::TERMINATE_SESSION),
                )]
            },
        )
    },
    // smux (§5.5).
    mux_case("fatal smux error: smux version byte 2, expected 1", |_| {
        vec![next(payload_type::OUTPUT, &[2, 0, 0, 0, 3, 0, 0, 0])]
    }),
    mux_case("fatal smux error: smux command 5 is unknown", |_| {
        vec![next(
            payload_type::OUTPUT,
            &[smux::VERSION, 5, 0, 0, 3, 0, 0, 0],
        )]
    }),
    mux_case(
        "smux UPD for stream 3: a version 2 window update in a version 1 session",
        |_| {
            vec![next(
                payload_type::OUTPUT,
                &[smux::VERSION, 4, 8, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
            )]
        },
    ),
    mux_case(
        "fatal smux error: smux Syn for stream 3 declares 2 bytes of payload",
        |_| {
            vec![next(
                payload_type::OUTPUT,
                &[smux::VERSION, 0, 2, 0, 3, 0, 0, 0, 9, 9],
            )]
        },
    ),
    mux_case("smux SYN with stream id 2 (client ids are odd)", |_| {
        let syn = smux_bytes(&[Frame::control(Command::Syn, 2)]);
        vec![next(payload_type::OUTPUT, &syn)]
    }),
    mux_case("smux SYN with stream id 0 (client ids are odd)", |_| {
        let syn = smux_bytes(&[Frame::control(Command::Syn, 0)]);
        vec![next(payload_type::OUTPUT, &syn)]
    }),
    mux_case("smux stream id 3 reused", |_| {
        let reuse = smux_bytes(&[
            Frame::control(Command::Syn, 3),
            Frame::control(Command::Fin, 3),
            Frame::control(Command::Syn, 3),
        ]);
        vec![next(payload_type::OUTPUT, &reuse)]
    }),
    mux_case(
        "smux PSH for stream 3 after the client's own FIN for it",
        |_| {
            let after_fin = smux_bytes(&[
                Frame::control(Command::Syn, 3),
                Frame::control(Command::Fin, 3),
                Frame::psh(3, b"late".to_vec()),
            ]);
            vec![next(payload_type::OUTPUT, &after_fin)]
        },
    ),
    mux_case("smux PSH for stream 5, which was never opened", |_| {
        let psh = smux_bytes(&[Frame::psh(5, b"orphan".to_vec())]);
        vec![next(payload_type::OUTPUT, &psh)]
    }),
];

#[tokio::test]
async fn each_check_of_the_agent_fires_on_its_input() {
    for case in FRAME_CASES {
        let (running, ssm) = emulator(case.config).await;
        let mut s = session(&ssm, case.document, case.stage).await;
        let frames = (case.frames)(&s);
        s.raw.send_all(frames).await.expect("send");
        fails_with(&running, &s.started.session_id, case.violation).await;
    }
}

/// What a client does instead of a correct open message.
enum Opening {
    Send(Message),
    /// Sends nothing and waits.
    Nothing,
    /// Closes the TCP connection without a word.
    Drop,
}

/// A check of the gateway's upgrade and open message: the client dials `url(started)` with
/// `authorization` and opens with `opening`; the session must fail on `violation`.
struct OpenCase {
    violation: &'static str,
    config: fn(&mut Config),
    url: fn(&Started) -> String,
    authorization: Option<&'static str>,
    opening: fn(&Started) -> Opening,
}

fn stream_url(started: &Started) -> String {
    started.url.clone()
}

fn open_json(started: &Started) -> serde_json::Value {
    serde_json::to_value(OpenDataChannelInput {
        message_schema_version: "1.0".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        token_value: started.token.clone(),
        client_id: Some(uuid::Uuid::new_v4().to_string()),
        client_version: Some(CLIENT_VERSION.into()),
    })
    .expect("json")
}

fn remove_fields(open: &mut serde_json::Value, fields: &[&str]) {
    if let Some(o) = open.as_object_mut() {
        for f in fields {
            o.remove(*f);
        }
    }
}

/// A valid open message changed by `change`.
fn open_text(started: &Started, change: fn(&mut serde_json::Value)) -> Opening {
    let mut open = open_json(started);
    change(&mut open);
    Opening::Send(Message::Text(open.to_string().into()))
}

const fn open_case(violation: &'static str, opening: fn(&Started) -> Opening) -> OpenCase {
    OpenCase {
        violation,
        config: defaults,
        url: stream_url,
        authorization: None,
        opening,
    }
}

const OPEN_CASES: &[OpenCase] = &[
    OpenCase {
        url: |s| s.url.replace("role=publish_subscribe&", ""),
        ..open_case("lacks role=publish_subscribe", |s| open_text(s, |_| {}))
    },
    OpenCase {
        authorization: Some(
            "AWS4-HMAC-SHA256 Credential=AKIATEST/20260101/us-east-1/ssm/aws4_request, SignedHeaders=host, Signature=00",
        ),
        ..open_case(
            "signed WebSocket upgrade does not name service ssmmessages",
            |s| open_text(s, |_| {}),
        )
    },
    open_case("the open message came as a binary frame, not text", |s| {
        Opening::Send(Message::Binary(
            open_json(s).to_string().into_bytes().into(),
        ))
    }),
    open_case("first frame is Close", |_| {
        Opening::Send(Message::Close(None))
    }),
    open_case("the WebSocket ended before the open message", |_| {
        Opening::Drop
    }),
    OpenCase {
        config: |c| c.open_timeout_ms = 200,
        ..open_case("no open message within 200ms", |_| Opening::Nothing)
    },
    open_case("open message is not JSON", |_| {
        Opening::Send(Message::Text("hello".into()))
    }),
    open_case(
        "open message MessageSchemaVersion \"2.0\", expected \"1.0\"",
        |s| open_text(s, |o| o["MessageSchemaVersion"] = "2.0".into()),
    ),
    open_case("open message RequestId shorter than 16 characters", |s| {
        open_text(s, |o| o["RequestId"] = "short".into())
    }),
    open_case("open message lacks ClientId", |s| {
        open_text(s, |o| remove_fields(o, &["ClientId"]))
    }),
    open_case("open message lacks ClientVersion", |s| {
        open_text(s, |o| remove_fields(o, &["ClientVersion"]))
    }),
    open_case("TokenValue does not match the session's live token", |s| {
        open_text(s, |o| o["TokenValue"] = "AAEAAnot-the-token".into())
    }),
];

#[tokio::test]
async fn each_check_of_the_gateway_fires_on_its_input() {
    for case in OPEN_CASES {
        let (running, ssm) = emulator(case.config).await;
        let started = start_session(&ssm, INSTANCE, SSH, &[])
            .await
            .expect("start");
        let url = (case.url)(&started);
        // Held until the session ended: the gateway, not the client, closes it.
        let mut _raw = None;
        match (case.opening)(&started) {
            Opening::Drop => {
                let (ws, _) = tokio_tungstenite::connect_async(&url).await.expect("dial");
                drop(ws);
            }
            opening => {
                let mut raw = RawClient::dial(&url, case.authorization)
                    .await
                    .expect("dial");
                if let Opening::Send(m) = opening {
                    raw.send_all(vec![m]).await.expect("send");
                }
                _raw = Some(raw);
            }
        }
        fails_with(&running, &started.session_id, case.violation).await;
    }
}

#[tokio::test]
async fn a_reused_token_is_rejected() {
    let (running, ssm) = emulator(defaults).await;
    let started = start_session(&ssm, INSTANCE, SSH, &[])
        .await
        .expect("start");
    let _first = RawClient::open(&started, CLIENT_VERSION)
        .await
        .expect("open");
    let _second = RawClient::open(&started, CLIENT_VERSION)
        .await
        .expect("open");
    fails_with(
        &running,
        &started.session_id,
        "TokenValue was already used (tokens are single-use; call ResumeSession)",
    )
    .await;
}

/// Opens `url` with `token` and waits until the gateway closed the WebSocket.
async fn rejected_open(url: &str, token: &str) {
    let started = Started {
        session_id: String::new(),
        token: token.to_owned(),
        url: url.to_owned(),
    };
    let mut raw = RawClient::open(&started, CLIENT_VERSION)
        .await
        .expect("open");
    assert!(raw.next_message().await.expect("close").is_none());
}

/// An open message for a session the emulator never started is a violation. One for a session
/// that has ended is refused but is none: a client's TerminateSession and the open message it
/// sent just before travel on different connections, and may be read in either order.
#[tokio::test]
async fn opening_an_unknown_session_is_a_violation_and_an_ended_one_is_refused() {
    let (running, ssm) = emulator(defaults).await;
    let started = start_session(&ssm, INSTANCE, SSH, &[])
        .await
        .expect("start");
    let unknown = started
        .url
        .replace(&started.session_id, "fleet-access-00000000000000000");
    rejected_open(&unknown, &started.token).await;
    assert_eq!(
        running.violations(),
        [fleet_access_ssm_emulator::Violation {
            session_id: Some("fleet-access-00000000000000000".into()),
            reason: "open message for unknown session fleet-access-00000000000000000".into(),
        }]
    );

    ssm.terminate_session()
        .session_id(&started.session_id)
        .send()
        .await
        .expect("terminate");
    let report = running
        .wait_for_end(&started.session_id, TEST_TIMEOUT)
        .await
        .expect("ended");
    assert!(report.violations.is_empty(), "{report:?}");
    rejected_open(&started.url, &started.token).await;
    let report = running.session_report(&started.session_id).expect("report");
    assert!(report.violations.is_empty(), "{report:?}");
    assert_eq!(running.stats().opens_after_end, 1);
    assert_eq!(running.violations().len(), 1, "{:?}", running.violations());
}

#[tokio::test]
async fn a_client_that_never_acks_is_a_violation() {
    let (running, ssm) = emulator(|c| c.unacked_retransmit_limit = 4).await;
    let started = start_session(&ssm, INSTANCE, SSH, &[])
        .await
        .expect("start");
    let mut raw = RawClient::open(&started, CLIENT_VERSION)
        .await
        .expect("open");
    // The HandshakeRequest (agent seq 0) is never acknowledged.
    raw.send(&input(0, payload_type::HANDSHAKE_RESPONSE, &response()))
        .await
        .expect("response");
    // The client stays visibly alive: each retransmission of seq 0 is answered with yet another
    // ack of the HandshakeComplete.
    let mut complete = None;
    while let Some(m) = raw.next_message().await.expect("frame") {
        match (m.message_type.as_str(), m.sequence_number) {
            // A failed send only means the gateway is closing the WebSocket.
            ("output_stream_data", 1) => {
                let _ = raw.ack(&m).await;
                complete = Some(m);
            }
            ("output_stream_data", 0) => {
                if let Some(c) = &complete {
                    let _ = raw.ack(c).await;
                }
            }
            _ => {}
        }
    }
    fails_with(
        &running,
        &started.session_id,
        "client never acknowledged output seq 0 after 4 retransmissions while it kept sending",
    )
    .await;
}

#[tokio::test]
async fn lenient_mode_records_violations_but_keeps_the_session() {
    let (running, ssm) = emulator(|c| c.strict = false).await;
    let started = start_session(&ssm, INSTANCE, FORWARD, &[])
        .await
        .expect("start");
    // A correctly signed upgrade and what ssm-session-client sends (no ClientId, no
    // ClientVersion): no violation in lenient mode. The open message as a binary frame is one,
    // but the session goes on.
    let mut raw = RawClient::dial(
        &started.url,
        Some(
            "AWS4-HMAC-SHA256 Credential=AKIATEST/20260101/us-east-1/ssmmessages/aws4_request, SignedHeaders=host, Signature=00",
        ),
    )
    .await
    .expect("dial");
    let mut open = open_json(&started);
    remove_fields(&mut open, &["ClientId", "ClientVersion"]);
    raw.send_all(vec![Message::Binary(open.to_string().into_bytes().into())])
        .await
        .expect("open");
    let request = raw
        .next_output(payload_type::HANDSHAKE_REQUEST)
        .await
        .expect("request");
    raw.ack(&request).await.expect("ack");
    raw.send(&input(0, payload_type::HANDSHAKE_RESPONSE, &response()))
        .await
        .expect("response");
    let complete = raw
        .next_output(payload_type::HANDSHAKE_COMPLETE)
        .await
        .expect("complete");
    raw.ack(&complete).await.expect("ack");

    let hello = smux_bytes(&[
        Frame::control(Command::Syn, 3),
        Frame::psh(3, b"hello".to_vec()),
    ]);
    let mut bad = input(1, payload_type::OUTPUT, &hello).encode();
    bad[80] ^= 0xFF; // bad digest: recorded, not acked
    raw.send_all(vec![Message::Binary(bad.into())])
        .await
        .expect("send");
    raw.send(&input(1, payload_type::OUTPUT, &hello))
        .await
        .expect("send");
    let echo = raw
        .next_output(payload_type::OUTPUT)
        .await
        .expect("the session goes on");
    raw.ack(&echo).await.expect("ack");
    let frames = smux::Decoder::default().push(&echo.payload).expect("smux");
    assert_eq!(frames, [Frame::psh(3, b"hello".to_vec())]);

    raw.send(&input(
        2,
        payload_type::FLAG,
        &flag_payload(flag::TERMINATE_SESSION),
    ))
    .await
    .expect("flag");
    let report = running
        .wait_for_end(&started.session_id, TEST_TIMEOUT)
        .await
        .expect("ended");
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(
        report.violations,
        [
            "the open message came as a binary frame, not text",
            "PayloadDigest does not match the payload (input_stream_data seq 1)"
        ]
    );
}

/// A session past its handshake (HandshakeComplete acknowledged) that the client ends with the
/// TerminateSession flag, followed at once, in the same write, by `after(flag)`.
async fn terminated_then(
    running: &Running,
    ssm: &aws_sdk_ssm::Client,
    after: impl FnOnce(&Message) -> Vec<Message>,
) -> SessionReport {
    let mut s = session(ssm, SSH, Stage::Handshaken).await;
    let complete = s.complete().clone();
    s.raw.ack(&complete).await.expect("ack");
    let terminate = binary(&input(
        1,
        payload_type::FLAG,
        &flag_payload(flag::TERMINATE_SESSION),
    ));
    let mut frames = after(&terminate);
    frames.insert(0, terminate);
    s.raw.send_all(frames).await.expect("send");
    let report = running
        .wait_for_end(&s.started.session_id, TEST_TIMEOUT)
        .await
        .expect("ended");
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(
        report.close_reason.as_deref(),
        Some("client sent the TerminateSession flag")
    );
    assert!(report.client_frames_after_end >= 1, "{report:?}");
    report
}

#[tokio::test]
async fn a_violation_after_the_terminate_flag_is_recorded() {
    let (running, ssm) = emulator(defaults).await;
    let report = terminated_then(&running, &ssm, |_| {
        let mut late = input(2, payload_type::OUTPUT, b"late").encode();
        late[80] ^= 0xFF;
        vec![Message::Binary(late.into())]
    })
    .await;
    let expected = "PayloadDigest does not match the payload (input_stream_data seq 2)";
    assert_eq!(report.violations, [expected]);
    assert_eq!(running.violations().len(), 1);
    assert_eq!(running.violations()[0].reason, expected);
}

#[tokio::test]
async fn legal_frames_after_the_terminate_flag_are_no_violations() {
    let (running, ssm) = emulator(defaults).await;
    // A retransmission of the flag and a repeated ack: what a client may still send while its
    // channel_closed is on the way.
    let report = terminated_then(&running, &ssm, |flag| {
        let repeated_ack = binary(&ClientMessage::acknowledge(
            &MessageType::OutputStreamData,
            uuid::Uuid::new_v4(),
            0,
        ));
        vec![flag.clone(), repeated_ack]
    })
    .await;
    assert!(report.violations.is_empty(), "{report:?}");
    assert_eq!(report.duplicates_from_client, 1);
    assert_eq!(report.repeated_acks_from_client, 1);
    assert!(running.violations().is_empty());
}

#[tokio::test]
async fn a_violation_on_a_replaced_websocket_is_recorded() {
    let (running, ssm) = emulator(defaults).await;
    let started = start_session(&ssm, INSTANCE, FORWARD, &[])
        .await
        .expect("start");
    // The first WebSocket is written to but never read until the end: the gateway's close of it
    // stays unanswered, so it still carries the client's late frame.
    let mut old = open_ws(&started.url, &started.token, CLIENT_VERSION)
        .await
        .expect("open");
    old.send(binary(&input(
        0,
        payload_type::HANDSHAKE_RESPONSE,
        &response(),
    )))
    .await
    .expect("response");
    let resumed = ssm
        .resume_session()
        .session_id(&started.session_id)
        .send()
        .await
        .expect("resume");
    let resumed = Started {
        session_id: started.session_id.clone(),
        token: resumed.token_value().expect("token").to_owned(),
        url: resumed.stream_url().expect("url").to_owned(),
    };
    let mut new = RawClient::open(&resumed, CLIENT_VERSION)
        .await
        .expect("open");
    // An echo on the new WebSocket: it has replaced the old one.
    let hello = smux_bytes(&[
        Frame::control(Command::Syn, 3),
        Frame::psh(3, b"hello".to_vec()),
    ]);
    new.send(&input(1, payload_type::OUTPUT, &hello))
        .await
        .expect("send");
    new.next_output(payload_type::OUTPUT).await.expect("echo");

    let mut late = input(2, payload_type::OUTPUT, b"late").encode();
    late[80] ^= 0xFF;
    old.send(Message::Binary(late.into())).await.expect("late");
    tokio::spawn(async move { while old.next().await.is_some() {} });
    let report = fails_with(
        &running,
        &started.session_id,
        "PayloadDigest does not match the payload (input_stream_data seq 2)",
    )
    .await;
    assert_eq!(
        report.client_frames_on_replaced_connections, 1,
        "{report:?}"
    );
    assert_eq!(report.connections, 2);
}
