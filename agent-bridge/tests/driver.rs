//! Black-box tests of the tokio driver against a scripted SSM agent: a tokio-tungstenite server
//! on 127.0.0.1 built on our own codec, plus a fake control plane. Local connections are
//! in-memory duplex pipes.

// The scripted agent is test code: a broken expectation should fail loudly.
#![allow(clippy::unwrap_used, clippy::panic, clippy::result_large_err)]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleet_access_agent_bridge::driver::signing::{SignedHeaders, SigningError, UpgradeSigner};
use fleet_access_agent_bridge::driver::{DriverConfig, DriverError, Outcome, Tunnel};
use fleet_access_agent_bridge::protocol::handshake::AcknowledgeContent;
use fleet_access_agent_bridge::protocol::message::{self, FLAG_FIN, FLAG_SYN};
use fleet_access_agent_bridge::protocol::smux::{self, Command, Frame};
use fleet_access_agent_bridge::protocol::{
    ClientMessage, CloseCause, ForwardingMode, MessageType, PayloadType, PortFlag,
};
use fleet_access_agent_bridge::ssm::{
    ControlPlane, ControlPlaneError, Resumed, StartSessionRequest, StreamTarget,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use uuid::Uuid;

const SSH: &str = r#"{"portNumber":"22"}"#;
const LFW: &str = r#"{"portNumber":"80","type":"LocalPortForwarding"}"#;

// === scripted agent ===

#[derive(Default)]
struct AgentLog {
    /// Open messages received, in order.
    opens: Vec<serde_json::Value>,
    /// Upgrade request `authorization` headers.
    authorizations: Vec<Option<String>>,
    /// Every input_stream_data frame received, raw, by sequence number (first copy).
    inputs: BTreeMap<i64, Bytes>,
    /// Frames received again under a seq already seen: (seq, identical?).
    repeats: Vec<(i64, bool)>,
    /// Flags the client sent.
    flags: Vec<u32>,
    /// The frame that arrived just before the agent dropped the WebSocket.
    dropped: Option<(i64, Bytes)>,
}

/// Agent behaviours a test can switch on.
#[derive(Debug, Clone, Copy, Default)]
struct Script {
    /// Drop the first WebSocket right after the first Output message arrives (not acked).
    drop_first_after_data: bool,
    /// On the first WebSocket, stop reading (and so stop answering pings) after the handshake.
    silent_first_after_handshake: bool,
    /// On the first WebSocket, keep reading (so pings are answered) but ignore every frame
    /// after the handshake: no acks, no data.
    deaf_first_after_handshake: bool,
    /// Mux: answer every SYN with ConnectToPortError and a FIN.
    refuse_streams: bool,
    /// Send channel_closed with this Output right after HandshakeComplete.
    close_after_handshake: Option<&'static str>,
    /// Basic mode: answer the first Output with this many bytes (1 KiB messages), then
    /// channel_closed at once.
    answer_then_close: Option<usize>,
}

struct AgentState {
    script: Script,
    properties: &'static str,
    next_seq: i64,
    expected: i64,
    handshake_done: bool,
    connections: u32,
    smux_in: BytesMut,
    log: AgentLog,
}

type Shared = Arc<Mutex<AgentState>>;

fn agent_frame(state: &mut AgentState, payload_type: PayloadType, payload: &[u8]) -> Bytes {
    let seq = state.next_seq;
    state.next_seq += 1;
    ClientMessage {
        message_type: MessageType::OutputStreamData,
        schema_version: 1,
        created_date: 1_700_000_000_000,
        sequence_number: seq,
        flags: if seq == 0 { FLAG_SYN } else { 0 },
        message_id: Uuid::new_v4(),
        payload_type,
        payload: Bytes::copy_from_slice(payload),
    }
    .to_bytes()
}

fn control_frame(message_type: MessageType, payload: Vec<u8>) -> Bytes {
    ClientMessage {
        message_type,
        schema_version: 1,
        created_date: 1_700_000_000_000,
        sequence_number: 0,
        flags: FLAG_SYN | FLAG_FIN,
        message_id: Uuid::new_v4(),
        payload_type: PayloadType::Unset,
        payload: Bytes::from(payload),
    }
    .to_bytes()
}

fn ack_for(m: &ClientMessage) -> Bytes {
    let content = AcknowledgeContent {
        message_type: "input_stream_data".into(),
        message_id: m.message_id.hyphenated().to_string(),
        sequence_number: m.sequence_number,
        is_sequential_message: true,
    };
    control_frame(
        MessageType::Acknowledge,
        serde_json::to_vec(&content).unwrap(),
    )
}

enum Reaction {
    Send(Vec<Bytes>),
    Drop,
    /// Send these, then never read again.
    SendThenSilence(Vec<Bytes>),
}

/// The agent's reaction to one client frame.
fn react(state: &mut AgentState, frame: &[u8]) -> Reaction {
    let decoded = message::decode(frame).expect("client frame decodes");
    assert!(decoded.digest_matches(), "client digest");
    assert!(decoded.payload_length_matches(), "client PayloadLength");
    assert_eq!(decoded.header_length, 116);
    let m = decoded.message;
    if m.message_type != MessageType::InputStreamData {
        return Reaction::Send(Vec::new());
    }
    let seq = m.sequence_number;
    if state.script.deaf_first_after_handshake && state.connections == 1 && state.handshake_done {
        return Reaction::Send(Vec::new());
    }
    if let Some(first) = state.log.inputs.get(&seq) {
        let same = first.as_ref() == frame;
        state.log.repeats.push((seq, same));
        return Reaction::Send(vec![ack_for(&m)]);
    }
    assert_eq!(seq, state.expected, "client sequence must be contiguous");
    state.log.inputs.insert(seq, Bytes::copy_from_slice(frame));
    if m.payload_type == PayloadType::Output
        && state.script.drop_first_after_data
        && state.connections == 1
    {
        state.log.inputs.remove(&seq);
        state.log.dropped = Some((seq, Bytes::copy_from_slice(frame)));
        return Reaction::Drop;
    }
    if let Some((dropped_seq, dropped)) = &state.log.dropped
        && *dropped_seq == seq
    {
        let same = dropped.as_ref() == frame;
        state.log.repeats.push((seq, same));
    }
    state.expected += 1;
    let mut out = vec![ack_for(&m)];
    match m.payload_type {
        PayloadType::HandshakeResponse => {
            let response: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(response["ClientVersion"], "1.2.764.0");
            state.handshake_done = true;
            out.push(agent_frame(
                state,
                PayloadType::HandshakeComplete,
                br#"{"HandshakeTimeToComplete":1000000,"CustomerMessage":""}"#,
            ));
            if let Some(output) = state.script.close_after_handshake {
                let body = serde_json::json!({"SessionId": "s-1", "Output": output});
                out.push(control_frame(
                    MessageType::ChannelClosed,
                    serde_json::to_vec(&body).unwrap(),
                ));
            }
            if state.script.silent_first_after_handshake && state.connections == 1 {
                return Reaction::SendThenSilence(out);
            }
        }
        PayloadType::Flag => {
            let flag = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
            state.log.flags.push(flag);
            if flag == PortFlag::TerminateSession.to_u32() {
                out.push(control_frame(
                    MessageType::ChannelClosed,
                    br#"{"SessionId":"s-1","MessageType":"channel_closed","SchemaVersion":1,"Output":"bye"}"#
                        .to_vec(),
                ));
            }
        }
        PayloadType::Output if state.properties == LFW => {
            state.smux_in.extend_from_slice(&m.payload);
            let mut reply = BytesMut::new();
            while let Some(f) = smux::decode_frame(&mut state.smux_in).unwrap() {
                match f.command {
                    Command::Syn if state.script.refuse_streams => {
                        let flag = PortFlag::ConnectToPortError.to_payload();
                        out.push(agent_frame(state, PayloadType::Flag, &flag));
                        Frame {
                            command: Command::Fin,
                            stream_id: f.stream_id,
                            data: Bytes::new(),
                        }
                        .encode(&mut reply);
                    }
                    Command::Psh => Frame {
                        command: Command::Psh,
                        stream_id: f.stream_id,
                        data: f.data,
                    }
                    .encode(&mut reply),
                    Command::Fin => Frame {
                        command: Command::Fin,
                        stream_id: f.stream_id,
                        data: Bytes::new(),
                    }
                    .encode(&mut reply),
                    Command::Syn | Command::Nop => {}
                }
            }
            if !reply.is_empty() {
                out.push(agent_frame(state, PayloadType::Output, &reply));
            }
        }
        PayloadType::Output => match state.script.answer_then_close.take() {
            Some(bytes) => {
                for chunk in answer(bytes).chunks(1024) {
                    out.push(agent_frame(state, PayloadType::Output, chunk));
                }
                out.push(control_frame(
                    MessageType::ChannelClosed,
                    br#"{"SessionId":"s-1","MessageType":"channel_closed","SchemaVersion":1,"Output":""}"#
                        .to_vec(),
                ));
            }
            // Basic echo.
            None => out.push(agent_frame(state, PayloadType::Output, &m.payload)),
        },
        _ => {}
    }
    Reaction::Send(out)
}

/// Serves WebSocket connections on 127.0.0.1 until the test ends; returns the base URL.
async fn spawn_agent(state: Shared) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let auth = Arc::new(Mutex::new(None));
                let auth_seen = auth.clone();
                let callback = move |req: &Request, resp: Response| {
                    *auth_seen.lock().unwrap() = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    Ok(resp)
                };
                let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
                    .await
                    .unwrap();
                let open = match ws.next().await {
                    Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str()).unwrap(),
                    other => panic!("first frame must be the text open message: {other:?}"),
                };
                let greeting = {
                    let mut s = state.lock().unwrap();
                    s.connections += 1;
                    s.log.opens.push(open);
                    s.log.authorizations.push(auth.lock().unwrap().clone());
                    if s.connections == 1 {
                        let properties = s.properties;
                        let body = format!(
                            r#"{{"AgentVersion":"3.3.1345.0","RequestedClientActions":[{{"ActionType":"SessionType","ActionParameters":{{"SessionType":"Port","Properties":{properties}}}}}]}}"#
                        );
                        vec![agent_frame(
                            &mut s,
                            PayloadType::HandshakeRequest,
                            body.as_bytes(),
                        )]
                    } else {
                        vec![control_frame(MessageType::StartPublication, Vec::new())]
                    }
                };
                for f in greeting {
                    ws.send(Message::Binary(f)).await.unwrap();
                }
                while let Some(Ok(msg)) = ws.next().await {
                    let frame = match msg {
                        Message::Binary(b) => b,
                        Message::Close(_) => return,
                        _ => continue,
                    };
                    let reaction = react(&mut state.lock().unwrap(), &frame);
                    match reaction {
                        Reaction::Drop => return,
                        Reaction::SendThenSilence(frames) => {
                            for f in frames {
                                let _ = ws.send(Message::Binary(f)).await;
                            }
                            // Hold the socket open, never read: no pongs, no acks.
                            std::future::pending::<()>().await;
                        }
                        Reaction::Send(frames) => {
                            for f in frames {
                                if ws.send(Message::Binary(f)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    format!("ws://{addr}/v1/data-channel/s-1?role=publish_subscribe")
}

// === fake control plane and signer ===

/// How the fake ResumeSession answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ResumeAnswer {
    /// A token and the stream URL.
    Resumed,
    /// A token but no stream URL: the last one is to be used again.
    WithoutStreamUrl,
    /// No token: the session expired.
    Expired,
}

struct FakeControl {
    url: String,
    resume: ResumeAnswer,
    resumes: AtomicU32,
    terminated: Mutex<Vec<String>>,
}

impl ControlPlane for FakeControl {
    async fn start_session(
        &self,
        _request: &StartSessionRequest,
    ) -> Result<StreamTarget, ControlPlaneError> {
        Ok(StreamTarget {
            session_id: "s-1".into(),
            stream_url: self.url.clone(),
            token_value: "tok-0".into(),
        })
    }

    async fn resume_session(
        &self,
        _session_id: &str,
    ) -> Result<Option<Resumed>, ControlPlaneError> {
        let n = self.resumes.fetch_add(1, Ordering::SeqCst) + 1;
        let stream_url = match self.resume {
            ResumeAnswer::Expired => return Ok(None),
            ResumeAnswer::Resumed => Some(self.url.clone()),
            ResumeAnswer::WithoutStreamUrl => None,
        };
        Ok(Some(Resumed {
            token_value: format!("tok-{n}"),
            stream_url,
        }))
    }

    async fn terminate_session(&self, session_id: &str) -> Result<(), ControlPlaneError> {
        self.terminated.lock().unwrap().push(session_id.into());
        Ok(())
    }
}

struct FakeSigner;

impl UpgradeSigner for FakeSigner {
    fn sign<'a>(
        &'a self,
        _url: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<SignedHeaders, SigningError>> + Send + 'a>> {
        Box::pin(async {
            Ok(vec![(
                "authorization".to_owned(),
                "AWS4-HMAC-SHA256 test".to_owned(),
            )])
        })
    }
}

struct Setup {
    state: Shared,
    control: FakeControl,
}

impl Setup {
    /// StartSession on the fake control plane: the scripted agent's stream.
    async fn start(&self) -> StreamTarget {
        self.control
            .start_session(&StartSessionRequest::default())
            .await
            .unwrap()
    }
}

async fn setup(properties: &'static str, drop_first_after_data: bool) -> Setup {
    setup_with(
        properties,
        Script {
            drop_first_after_data,
            ..Script::default()
        },
        ResumeAnswer::Resumed,
    )
    .await
}

async fn setup_with(properties: &'static str, script: Script, resume: ResumeAnswer) -> Setup {
    let state = Arc::new(Mutex::new(AgentState {
        script,
        properties,
        next_seq: 0,
        expected: 0,
        handshake_done: false,
        connections: 0,
        smux_in: BytesMut::new(),
        log: AgentLog::default(),
    }));
    let url = spawn_agent(state.clone()).await;
    Setup {
        state,
        control: FakeControl {
            url,
            resume,
            resumes: AtomicU32::new(0),
            terminated: Mutex::new(Vec::new()),
        },
    }
}

fn config() -> DriverConfig {
    DriverConfig {
        reconnect_initial_backoff: Duration::from_millis(20),
        ..DriverConfig::default()
    }
}

/// What the agent answers with `answer_then_close`: a pattern, so that a lost or reordered
/// chunk shows.
fn answer(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i % 251) as u8).collect()
}

/// A local connection that takes a millisecond for every write (a slow client) and records what
/// it was given and whether it was shut down. Reads come from `input`.
struct SlowLocal {
    input: DuplexStream,
    written: Arc<Mutex<Vec<u8>>>,
    shut_down: Arc<std::sync::atomic::AtomicBool>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for SlowLocal {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlowLocal {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let pause = self
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(1))));
        std::task::ready!(pause.as_mut().poll(cx));
        self.pause = None;
        self.written.lock().unwrap().extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.shut_down.store(true, Ordering::SeqCst);
        std::task::Poll::Ready(Ok(()))
    }
}

/// `tunnel` carrying the connections of `conns` until `stop` resolves.
async fn run_until<L>(
    tunnel: &Tunnel<'_, FakeControl>,
    target: StreamTarget,
    conns: mpsc::Receiver<L>,
    stop: impl Future<Output = impl Sized>,
) -> Result<Outcome, DriverError>
where
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let shutdown = async {
        let _ = stop.await;
    };
    tunnel.run(target, conns, shutdown, None).await
}

async fn echo(local: &mut DuplexStream, data: &[u8]) -> Vec<u8> {
    local.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    local.read_exact(&mut got).await.unwrap();
    got
}

const LIMIT: Duration = Duration::from_secs(20);

// === tests ===

#[tokio::test]
async fn basic_echo_signed_upgrade_and_terminate() {
    let s = setup(SSH, false).await;
    let target = s.start().await;
    let signer = FakeSigner;
    let tunnel = Tunnel::new(&s.control, Some(&signer), config());
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let body = async {
        let (mut local, remote) = tokio::io::duplex(64 * 1024);
        conn_tx.send(remote).await.unwrap();
        // A lone LF and bytes above 1 KiB travel unchanged.
        assert_eq!(echo(&mut local, b"\n").await, b"\n");
        let big: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        assert!(echo(&mut local, &big).await == big);
        stop_tx.send(()).unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(run_until(&tunnel, target, conn_rx, stop_rx), body)
    })
    .await
    .expect("test finished in time");
    let outcome = outcome.unwrap();
    assert_eq!(outcome.cause, CloseCause::LocalTerminate);
    assert_eq!(outcome.output.as_deref(), Some("bye"));
    assert_eq!(outcome.handshake.unwrap().mode, ForwardingMode::Basic);
    assert_eq!(
        *s.control.terminated.lock().unwrap(),
        vec!["s-1".to_owned()]
    );
    let state = s.state.lock().unwrap();
    assert_eq!(state.log.flags, vec![2]);
    assert_eq!(state.log.opens[0]["TokenValue"], "tok-0");
    assert_eq!(state.log.opens[0]["ClientVersion"], "1.2.764.0");
    assert_eq!(
        state.log.authorizations[0].as_deref(),
        Some("AWS4-HMAC-SHA256 test")
    );
    // Chunks above 1 KiB were used (docs/protocol.md §6.2).
    let max_payload = state
        .log
        .inputs
        .values()
        .map(|f| message::decode(f).unwrap().message.payload.len())
        .max()
        .unwrap();
    assert!(max_payload > 1024, "{max_payload}");
}

#[tokio::test]
async fn mux_streams_echo_concurrently() {
    let s = setup(LFW, false).await;
    let target = s.start().await;
    let tunnel = Tunnel::new(&s.control, None, config());
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let body = async {
        let (mut a, ra) = tokio::io::duplex(64 * 1024);
        let (mut b, rb) = tokio::io::duplex(64 * 1024);
        conn_tx.send(ra).await.unwrap();
        conn_tx.send(rb).await.unwrap();
        let data_a: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
        let data_b = b"stream b".to_vec();
        let (ga, gb) = tokio::join!(echo(&mut a, &data_a), echo(&mut b, &data_b));
        assert!(ga == data_a);
        assert_eq!(gb, data_b);
        // Closing a local connection sends FIN; the agent FINs back and the pipe closes.
        drop(a);
        stop_tx.send(()).unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(run_until(&tunnel, target, conn_rx, stop_rx), body)
    })
    .await
    .expect("test finished in time");
    let outcome = outcome.unwrap();
    assert_eq!(outcome.handshake.unwrap().mode, ForwardingMode::Mux);
    assert_eq!(outcome.output.as_deref(), Some("bye"));
    // Both streams' SYNs reached the agent with ids 3 and 5.
    let state = s.state.lock().unwrap();
    let mut wire = BytesMut::new();
    for f in state.log.inputs.values() {
        let m = message::decode(f).unwrap().message;
        if m.payload_type == PayloadType::Output {
            wire.extend_from_slice(&m.payload);
        }
    }
    let mut syns = Vec::new();
    while let Some(f) = smux::decode_frame(&mut wire).unwrap() {
        if f.command == Command::Syn {
            syns.push(f.stream_id);
        }
    }
    assert_eq!(syns, vec![3, 5]);
}

/// Runs a tunnel of `s` with one local connection that echoes each of `messages` in turn (each
/// must come back whole), then stops it.
async fn echo_through(s: &Setup, messages: &[&[u8]]) -> Result<Outcome, DriverError> {
    let target = s.start().await;
    let tunnel = Tunnel::new(&s.control, None, config());
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let body = async {
        let (mut local, remote) = tokio::io::duplex(64 * 1024);
        conn_tx.send(remote).await.unwrap();
        for message in messages {
            assert_eq!(echo(&mut local, message).await, *message);
        }
        stop_tx.send(()).unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(run_until(&tunnel, target, conn_rx, stop_rx), body)
    })
    .await
    .expect("test finished in time");
    outcome
}

#[tokio::test]
async fn lost_websocket_resumes_with_new_token_and_same_sequence() {
    let s = setup(SSH, true).await;
    let outcome = echo_through(&s, &[b"across the drop", b"after"])
        .await
        .unwrap();
    assert_eq!(outcome.stats.reconnects, 1);
    assert_eq!(s.control.resumes.load(Ordering::SeqCst), 1);
    let state = s.state.lock().unwrap();
    assert_eq!(state.connections, 2);
    assert_eq!(state.log.opens[1]["TokenValue"], "tok-1");
    assert_eq!(
        state.log.opens[0]["ClientId"],
        state.log.opens[1]["ClientId"]
    );
    assert_ne!(
        state.log.opens[0]["RequestId"],
        state.log.opens[1]["RequestId"]
    );
    // Sequence numbers continued: 0 handshake, 1 data (resent after the drop), 2, 3 flag.
    let seqs: Vec<i64> = state.log.inputs.keys().copied().collect();
    assert_eq!(seqs, (0..seqs.len() as i64).collect::<Vec<_>>());
    let dropped_seq = state.log.dropped.as_ref().unwrap().0;
    assert_eq!(dropped_seq, 1);
    assert!(
        state.log.repeats.contains(&(dropped_seq, true)),
        "{:?}",
        state.log.repeats
    );
    assert!(
        state.log.repeats.iter().all(|(_, same)| *same),
        "retransmissions are byte-identical"
    );
}

#[tokio::test]
async fn a_resume_without_a_stream_url_dials_the_last_one_again() {
    let script = Script {
        drop_first_after_data: true,
        ..Script::default()
    };
    let s = setup_with(SSH, script, ResumeAnswer::WithoutStreamUrl).await;
    let outcome = echo_through(&s, &[b"across the drop"]).await.unwrap();
    assert_eq!(outcome.stats.reconnects, 1);
    let state = s.state.lock().unwrap();
    assert_eq!(state.connections, 2, "the same URL dialled again");
    assert_eq!(state.log.opens[1]["TokenValue"], "tok-1");
}

#[tokio::test]
async fn silent_gateway_is_detected_by_ping_and_resumed() {
    let script = Script {
        silent_first_after_handshake: true,
        ..Script::default()
    };
    let s = setup_with(SSH, script, ResumeAnswer::Resumed).await;
    let target = s.start().await;
    let config = DriverConfig {
        ping_interval: Duration::from_millis(100),
        dead_peer_timeout: DEAD_PEER_TIMEOUT,
        ..config()
    };
    let tunnel = Tunnel::new(&s.control, None, config);
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let body = async {
        let (mut local, remote) = tokio::io::duplex(64 * 1024);
        conn_tx.send(remote).await.unwrap();
        assert_eq!(echo(&mut local, b"hello").await, b"hello");
        stop_tx.send(()).unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(run_until(&tunnel, target, conn_rx, stop_rx), body)
    })
    .await
    .expect("test finished in time");
    let outcome = outcome.unwrap();
    assert_dead_peer_resumed(&outcome, &s);
}

/// How long the dead-peer tests let a gateway be silent. A live gateway on a loaded machine can
/// pause too, so the tests accept further resumes after the one the script forces.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// The first connection was judged dead and the session resumed (once, or more when a live
/// connection also paused past [`DEAD_PEER_TIMEOUT`]).
fn assert_dead_peer_resumed(outcome: &Outcome, s: &Setup) {
    assert!(outcome.stats.reconnects >= 1, "{outcome:?}");
    assert_eq!(
        u64::from(s.state.lock().unwrap().connections),
        outcome.stats.reconnects + 1
    );
}

/// A caller may exit as soon as the tunnel returns (`proxy` does): by then every byte the agent
/// sent before closing must have been written to the local connection, and the connection shut
/// down, however slowly it takes writes.
#[tokio::test]
async fn the_last_bytes_reach_a_slow_client_before_the_tunnel_returns() {
    const ANSWER: usize = 64 * 1024;
    let script = Script {
        answer_then_close: Some(ANSWER),
        ..Script::default()
    };
    let s = setup_with(SSH, script, ResumeAnswer::Resumed).await;
    let target = s.start().await;
    let tunnel = Tunnel::new(&s.control, None, config());
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (mut input, theirs) = tokio::io::duplex(1024);
    let local = SlowLocal {
        input: theirs,
        written: Arc::default(),
        shut_down: Arc::default(),
        pause: None,
    };
    let (written, shut_down) = (local.written.clone(), local.shut_down.clone());
    conn_tx.send(local).await.unwrap();
    input.write_all(b"go").await.unwrap();
    let outcome = tokio::time::timeout(
        LIMIT,
        run_until(&tunnel, target, conn_rx, std::future::pending::<()>()),
    )
    .await
    .expect("test finished in time")
    .unwrap();
    assert_eq!(outcome.cause, CloseCause::ChannelClosed);
    let written = written.lock().unwrap();
    assert_eq!(
        written.len(),
        ANSWER,
        "every byte written before the return"
    );
    assert!(*written == answer(ANSWER), "in order and intact");
    assert!(
        shut_down.load(Ordering::SeqCst),
        "and the connection shut down"
    );
}

#[tokio::test]
async fn expired_session_on_resume_is_an_error() {
    let script = Script {
        drop_first_after_data: true,
        ..Script::default()
    };
    let s = setup_with(SSH, script, ResumeAnswer::Expired).await;
    let target = s.start().await;
    let tunnel = Tunnel::new(&s.control, None, config());
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (mut local, remote) = tokio::io::duplex(1024);
    conn_tx.send(remote).await.unwrap();
    local.write_all(b"data").await.unwrap();
    let result = tokio::time::timeout(
        LIMIT,
        run_until(&tunnel, target, conn_rx, std::future::pending::<()>()),
    )
    .await
    .expect("test finished in time");
    assert!(
        matches!(result, Err(DriverError::SessionExpired(ref id)) if id == "s-1"),
        "{result:?}"
    );
    // TerminateSession is still attempted on the way out.
    assert_eq!(
        *s.control.terminated.lock().unwrap(),
        vec!["s-1".to_owned()]
    );
}

#[tokio::test]
async fn channel_closed_output_ends_the_tunnel() {
    let script = Script {
        close_after_handshake: Some("Plugin with name Port is not supported"),
        ..Script::default()
    };
    let s = setup_with(SSH, script, ResumeAnswer::Resumed).await;
    let target = s.start().await;
    let tunnel = Tunnel::new(&s.control, None, config());
    let (_conn_tx, conn_rx) = mpsc::channel::<DuplexStream>(4);
    let outcome = tokio::time::timeout(
        LIMIT,
        run_until(&tunnel, target, conn_rx, std::future::pending::<()>()),
    )
    .await
    .expect("test finished in time")
    .unwrap();
    assert_eq!(outcome.cause, CloseCause::ChannelClosed);
    assert_eq!(
        outcome.output.as_deref(),
        Some("Plugin with name Port is not supported")
    );
}

#[tokio::test]
async fn refused_stream_closes_its_local_connection() {
    let script = Script {
        refuse_streams: true,
        ..Script::default()
    };
    let s = setup_with(LFW, script, ResumeAnswer::Resumed).await;
    let target = s.start().await;
    let tunnel = Tunnel::new(&s.control, None, config());
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let body = async {
        let (mut local, remote) = tokio::io::duplex(1024);
        conn_tx.send(remote).await.unwrap();
        let mut buf = [0u8; 16];
        // The agent could not dial: the local connection sees EOF, no data.
        assert_eq!(local.read(&mut buf).await.unwrap(), 0);
        stop_tx.send(()).unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(run_until(&tunnel, target, conn_rx, stop_rx), body)
    })
    .await
    .expect("test finished in time");
    let outcome = outcome.unwrap();
    assert_eq!(outcome.handshake.unwrap().mode, ForwardingMode::Mux);
    assert_eq!(outcome.stats.open_streams, 0);
}

#[tokio::test]
async fn gateway_that_pongs_but_never_acks_is_resumed() {
    let script = Script {
        deaf_first_after_handshake: true,
        ..Script::default()
    };
    let s = setup_with(SSH, script, ResumeAnswer::Resumed).await;
    let target = s.start().await;
    let config = DriverConfig {
        ping_interval: Duration::from_millis(100),
        dead_peer_timeout: DEAD_PEER_TIMEOUT,
        ..config()
    };
    let tunnel = Tunnel::new(&s.control, None, config);
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let body = async {
        let (mut local, remote) = tokio::io::duplex(64 * 1024);
        conn_tx.send(remote).await.unwrap();
        assert_eq!(echo(&mut local, b"are you there").await, b"are you there");
        stop_tx.send(()).unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(run_until(&tunnel, target, conn_rx, stop_rx), body)
    })
    .await
    .expect("test finished in time");
    let outcome = outcome.unwrap();
    assert_dead_peer_resumed(&outcome, &s);
    assert!(outcome.stats.retransmissions > 0);
}
