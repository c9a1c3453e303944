//! Test helpers: an echo target, an aws-sdk-ssm client for the emulator, a minimal data
//! channel client built from the emulator's own codec (acks, re-acks, reorder buffer,
//! retransmission, resume after a lost WebSocket, a tiny smux client), and a raw client that
//! sends hand-made frames.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fleet_access_ssm_emulator::message::{
    self, ClientMessage, HandshakeRequest, HandshakeResponse, MessageType, OpenDataChannelInput,
    ProcessedClientAction, flag, payload_type,
};
use fleet_access_ssm_emulator::smux;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP echo server on 127.0.0.1.
pub async fn echo_server() -> SocketAddr {
    fleet_access_tests::targets::echo_server()
        .await
        .expect("bind echo")
}

/// An aws-sdk-ssm client pointed at `endpoint`.
pub fn ssm_client(endpoint: &str) -> aws_sdk_ssm::Client {
    let config = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            "AKIATESTEMULATOR",
            "secret",
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_ssm::Client::from_conf(config)
}

/// A fresh directory under the system's temporary directory, removed when the test passes.
pub fn tempfile_dir() -> fleet_access_tests::Scratch {
    fleet_access_tests::Scratch::new("ssm-emulator-test-")
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

pub struct Started {
    pub session_id: String,
    pub token: String,
    pub url: String,
}

pub async fn start_session(
    ssm: &aws_sdk_ssm::Client,
    target: &str,
    document: &str,
    params: &[(&str, &str)],
) -> Result<Started> {
    let mut req = ssm.start_session().target(target).document_name(document);
    for (k, v) in params {
        req = req.parameters(*k, vec![(*v).to_owned()]);
    }
    let out = req.send().await.context("StartSession")?;
    Ok(Started {
        session_id: out.session_id().context("no SessionId")?.to_owned(),
        token: out.token_value().context("no token")?.to_owned(),
        url: out.stream_url().context("no url")?.to_owned(),
    })
}

/// What the test client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    HandshakeComplete { agent_version: String },
    Flag(u32),
    ChannelClosed(String),
    Reconnected,
    Gone(String),
}

pub struct ClientOptions {
    pub client_version: String,
    pub expect_handshake: bool,
    /// Treat the connection as dead after this long without any frame while data is unacked.
    pub dead_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_version: "1.2.764.0".to_owned(),
            expect_handshake: true,
            dead_after: Duration::from_secs(3),
        }
    }
}

/// Handle to a running test client.
pub struct Client {
    pub upload: mpsc::Sender<Upload>,
    pub download: mpsc::UnboundedReceiver<Vec<u8>>,
    pub events: mpsc::UnboundedReceiver<ClientEvent>,
}

pub enum Upload {
    Data(Vec<u8>),
    Flag(u32),
    /// Answered once everything sent so far is acknowledged.
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub async fn open_ws(url: &str, token: &str, client_version: &str) -> Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .context("dial data channel")?;
    let open = OpenDataChannelInput {
        message_schema_version: "1.0".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        token_value: token.into(),
        client_id: Some(uuid::Uuid::new_v4().to_string()),
        client_version: Some(client_version.into()),
    };
    ws.send(Message::Text(serde_json::to_string(&open)?.into()))
        .await?;
    Ok(ws)
}

impl Client {
    /// Connects and runs the client; `ssm` is used for ResumeSession after a lost WebSocket.
    pub async fn start(
        started: &Started,
        ssm: aws_sdk_ssm::Client,
        options: ClientOptions,
    ) -> Result<Self> {
        let ws = open_ws(&started.url, &started.token, &options.client_version).await?;
        let (upload, upload_rx) = mpsc::channel(64);
        let (download_tx, download) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let driver = Driver {
            ssm,
            session_id: started.session_id.clone(),
            options,
            next_seq: 0,
            expected: 0,
            unacked: BTreeMap::new(),
            flushes: Vec::new(),
            reorder: BTreeMap::new(),
            ready: false,
            download: download_tx,
            events: events_tx,
            last_frame: Instant::now(),
        };
        tokio::spawn(driver.run(ws, upload_rx));
        Ok(Self {
            upload,
            download,
            events,
        })
    }

    pub async fn send(&self, data: Vec<u8>) -> Result<()> {
        self.upload
            .send(Upload::Data(data))
            .await
            .map_err(|_| anyhow::anyhow!("client gone"))
    }

    /// Waits until the agent has acknowledged everything the client sent (retransmitting what
    /// it has to).
    pub async fn flush(&self) -> Result<()> {
        let (done, flushed) = tokio::sync::oneshot::channel();
        self.upload
            .send(Upload::Flush(done))
            .await
            .map_err(|_| anyhow::anyhow!("client gone"))?;
        tokio::time::timeout(TEST_TIMEOUT, flushed)
            .await
            .context("timed out waiting for acks")?
            .context("client gone")
    }

    pub async fn flag(&self, value: u32) -> Result<()> {
        self.upload
            .send(Upload::Flag(value))
            .await
            .map_err(|_| anyhow::anyhow!("client gone"))
    }

    /// Reads exactly `len` downloaded bytes.
    pub async fn read_exact(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let chunk = tokio::time::timeout(TEST_TIMEOUT, self.download.recv())
                .await
                .context("timed out reading")?
                .context("download closed")?;
            out.extend(chunk);
        }
        Ok(out)
    }

    pub async fn next_event(&mut self) -> Result<ClientEvent> {
        tokio::time::timeout(TEST_TIMEOUT, self.events.recv())
            .await
            .context("timed out waiting for an event")?
            .context("events closed")
    }

    pub async fn wait_event(&mut self, want: impl Fn(&ClientEvent) -> bool) -> Result<ClientEvent> {
        loop {
            let e = self.next_event().await?;
            if want(&e) {
                return Ok(e);
            }
        }
    }

    pub async fn handshake(&mut self) -> Result<String> {
        match self
            .wait_event(|e| !matches!(e, ClientEvent::Reconnected))
            .await?
        {
            ClientEvent::HandshakeComplete { agent_version } => Ok(agent_version),
            other => bail!("expected the handshake, got {other:?}"),
        }
    }
}

struct Driver {
    ssm: aws_sdk_ssm::Client,
    session_id: String,
    options: ClientOptions,
    next_seq: i64,
    expected: i64,
    unacked: BTreeMap<i64, (Vec<u8>, Instant)>,
    /// Waiting for `unacked` to empty.
    flushes: Vec<tokio::sync::oneshot::Sender<()>>,
    reorder: BTreeMap<i64, ClientMessage>,
    ready: bool,
    download: mpsc::UnboundedSender<Vec<u8>>,
    events: mpsc::UnboundedSender<ClientEvent>,
    last_frame: Instant,
}

enum Outcome {
    Closed,
    Lost(String),
}

impl Driver {
    async fn run(mut self, mut ws: Ws, mut upload: mpsc::Receiver<Upload>) {
        if !self.options.expect_handshake {
            self.ready = true;
        }
        loop {
            match self.serve(&mut ws, &mut upload).await {
                Outcome::Closed => return,
                Outcome::Lost(why) => {
                    let _ = ws.close(None).await;
                    match self.resume().await {
                        Ok(new_ws) => {
                            ws = new_ws;
                            self.last_frame = Instant::now();
                            let _ = self.events.send(ClientEvent::Reconnected);
                        }
                        Err(e) => {
                            let _ = self
                                .events
                                .send(ClientEvent::Gone(format!("{why}; resume failed: {e:#}")));
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn resume(&self) -> Result<Ws> {
        let out = self
            .ssm
            .resume_session()
            .session_id(&self.session_id)
            .send()
            .await?;
        let token = out.token_value().context("session expired")?;
        let url = out.stream_url().context("no url")?;
        open_ws(url, token, &self.options.client_version).await
    }

    async fn serve(&mut self, ws: &mut Ws, upload: &mut mpsc::Receiver<Upload>) -> Outcome {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // Retransmit everything unacked right away on a new connection.
        for (bytes, sent) in self.unacked.values_mut() {
            if ws
                .send(Message::Binary(bytes.clone().into()))
                .await
                .is_err()
            {
                return Outcome::Lost("send failed".into());
            }
            *sent = Instant::now();
        }
        loop {
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Message::Binary(b))) => {
                        self.last_frame = Instant::now();
                        match self.on_frame(ws, &b).await {
                            Ok(true) => return Outcome::Closed,
                            Ok(false) => {}
                            Err(e) => return Outcome::Lost(e.to_string()),
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        return Outcome::Lost("websocket closed".into());
                    }
                    Some(Ok(_)) => {}
                },
                up = upload.recv(), if self.ready => match up {
                    Some(Upload::Data(data)) => {
                        for chunk in data.chunks(1024) {
                            if let Err(e) = self.send_stream(ws, payload_type::OUTPUT, chunk.to_vec()).await {
                                return Outcome::Lost(e.to_string());
                            }
                        }
                    }
                    Some(Upload::Flag(v)) => {
                        if let Err(e) = self.send_stream(ws, payload_type::FLAG, message::flag_payload(v)).await {
                            return Outcome::Lost(e.to_string());
                        }
                    }
                    Some(Upload::Flush(done)) => {
                        self.flushes.push(done);
                        self.answer_flushes();
                    }
                    None => return Outcome::Closed,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    if !self.unacked.is_empty() && now.duration_since(self.last_frame) > self.options.dead_after {
                        return Outcome::Lost("no frames while data is unacked".into());
                    }
                    for (bytes, sent) in self.unacked.values_mut() {
                        if now.duration_since(*sent) > Duration::from_millis(300) {
                            *sent = now;
                            if ws.send(Message::Binary(bytes.clone().into())).await.is_err() {
                                return Outcome::Lost("send failed".into());
                            }
                        }
                    }
                }
            }
        }
    }

    fn answer_flushes(&mut self) {
        if self.unacked.is_empty() {
            for done in self.flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    async fn send_stream(&mut self, ws: &mut Ws, pt: u32, payload: Vec<u8>) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let m = ClientMessage::new(
            MessageType::InputStreamData,
            seq,
            u64::from(seq == 0),
            pt,
            payload,
        );
        let bytes = m.encode();
        self.unacked.insert(seq, (bytes.clone(), Instant::now()));
        ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    async fn ack(&self, ws: &mut Ws, m: &ClientMessage) -> Result<()> {
        let ack = ClientMessage::acknowledge(&m.message_type, m.message_id, m.sequence_number);
        ws.send(Message::Binary(ack.encode().into())).await?;
        Ok(())
    }

    /// Returns true when the channel closed for good.
    async fn on_frame(&mut self, ws: &mut Ws, bytes: &[u8]) -> Result<bool> {
        let frame = message::decode(bytes)?;
        let m = frame.message.clone();
        match m.message_type {
            MessageType::Acknowledge => {
                let c: message::AcknowledgeContent = serde_json::from_slice(&m.payload)?;
                self.unacked.remove(&c.acknowledged_message_sequence_number);
                self.answer_flushes();
            }
            MessageType::ChannelClosed => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
                let out = v["Output"].as_str().unwrap_or("").to_owned();
                let _ = self.events.send(ClientEvent::ChannelClosed(out));
                return Ok(true);
            }
            MessageType::OutputStreamData => {
                if !frame.digest_valid() {
                    return Ok(false); // no ack: the agent retransmits
                }
                let seq = m.sequence_number;
                if seq < self.expected {
                    self.ack(ws, &m).await?;
                } else if seq > self.expected {
                    self.ack(ws, &m).await?;
                    self.reorder.insert(seq, m);
                } else {
                    self.ack(ws, &m).await?;
                    self.process(ws, m).await?;
                    self.expected += 1;
                    while let Some(next) = self.reorder.remove(&self.expected) {
                        self.process(ws, next).await?;
                        self.expected += 1;
                    }
                }
            }
            _ => {} // publication control, session state, unknown: ignored
        }
        Ok(false)
    }

    async fn process(&mut self, ws: &mut Ws, m: ClientMessage) -> Result<()> {
        match m.payload_type {
            payload_type::HANDSHAKE_REQUEST => {
                let req: HandshakeRequest = serde_json::from_slice(&m.payload)?;
                let response = HandshakeResponse {
                    client_version: self.options.client_version.clone(),
                    processed_client_actions: req
                        .requested_client_actions
                        .iter()
                        .map(|a| ProcessedClientAction {
                            action_type: a.action_type.clone(),
                            action_status: 1,
                            action_result: serde_json::Value::Null,
                            error: Some(String::new()),
                        })
                        .collect(),
                    errors: None,
                };
                self.send_stream(
                    ws,
                    payload_type::HANDSHAKE_RESPONSE,
                    serde_json::to_vec(&response)?,
                )
                .await?;
                let _ = self.events.send(ClientEvent::HandshakeComplete {
                    agent_version: req.agent_version,
                });
            }
            payload_type::HANDSHAKE_COMPLETE => self.ready = true,
            payload_type::OUTPUT => {
                let _ = self.download.send(m.payload);
            }
            payload_type::FLAG => {
                if let Some(v) = message::parse_flag(&m.payload) {
                    let _ = self.events.send(ClientEvent::Flag(v));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A tiny smux client over [`Client`]: opens streams, sends, and sorts received frames by stream.
pub struct MuxClient {
    pub client: Client,
    decoder: smux::Decoder,
    pub received: BTreeMap<u32, Vec<u8>>,
    pub finished: std::collections::BTreeSet<u32>,
    next_id: u32,
}

impl MuxClient {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            decoder: smux::Decoder::default(),
            received: BTreeMap::new(),
            finished: Default::default(),
            next_id: 1,
        }
    }

    pub async fn open(&mut self) -> Result<u32> {
        self.next_id += 2;
        let id = self.next_id;
        self.client
            .send(smux::Frame::control(smux::Command::Syn, id).encode())
            .await?;
        Ok(id)
    }

    pub async fn write(&mut self, id: u32, data: &[u8]) -> Result<()> {
        let mut out = Vec::new();
        smux::encode_data(id, data, &mut out);
        self.client.send(out).await
    }

    pub async fn close(&mut self, id: u32) -> Result<()> {
        self.client
            .send(smux::Frame::control(smux::Command::Fin, id).encode())
            .await
    }

    /// Reads until every stream in `want` has at least the given number of bytes.
    pub async fn read_until(&mut self, want: &[(u32, usize)]) -> Result<()> {
        while want
            .iter()
            .any(|(id, n)| self.received.get(id).map_or(0, Vec::len) < *n)
        {
            let chunk = tokio::time::timeout(TEST_TIMEOUT, self.client.download.recv())
                .await
                .context("timed out reading smux")?
                .context("download closed")?;
            self.take(&chunk)?;
        }
        Ok(())
    }

    /// Sorts one chunk of the agent's smux bytes. Data after a stream's FIN is an error: the
    /// agent closes a stream only after its last write.
    fn take(&mut self, chunk: &[u8]) -> Result<()> {
        for f in self.decoder.push(chunk)? {
            match f.command {
                smux::Command::Psh if self.finished.contains(&f.stream_id) => {
                    anyhow::bail!("PSH for stream {} after its FIN", f.stream_id)
                }
                smux::Command::Psh => self.received.entry(f.stream_id).or_default().extend(f.data),
                smux::Command::Fin => {
                    self.finished.insert(f.stream_id);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads until the agent has sent FIN for `id`.
    pub async fn wait_fin(&mut self, id: u32) -> Result<()> {
        while !self.finished.contains(&id) {
            let chunk = tokio::time::timeout(TEST_TIMEOUT, self.client.download.recv())
                .await
                .context("timed out waiting for FIN")?
                .context("download closed")?;
            self.take(&chunk)?;
        }
        Ok(())
    }
}

/// Copies between a TCP stream and nothing else: connects to `addr`, writes `data`, reads it back.
pub async fn tcp_round_trip(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(data).await?;
    let mut out = vec![0u8; data.len()];
    tokio::time::timeout(TEST_TIMEOUT, s.read_exact(&mut out)).await??;
    Ok(out)
}

pub const FLAG_TERMINATE: u32 = flag::TERMINATE_SESSION;

/// `m` as a binary WebSocket frame.
pub fn binary(m: &ClientMessage) -> Message {
    Message::Binary(m.encode().into())
}

/// A data-channel client for tests that send exact frames. A background task reads everything
/// the gateway sends, so that a close is answered at once as a real client does, and hands the
/// frames out in order.
pub struct RawClient {
    sink: SplitSink<Ws, Message>,
    frames: mpsc::UnboundedReceiver<Message>,
}

impl RawClient {
    /// Dials `url`, with an `Authorization` header when given; sends nothing.
    pub async fn dial(url: &str, authorization: Option<&str>) -> Result<Self> {
        let mut request = url.into_client_request()?;
        if let Some(a) = authorization {
            request.headers_mut().insert("authorization", a.parse()?);
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .context("dial data channel")?;
        Ok(Self::from_ws(ws))
    }

    /// Dials the session and sends a valid open message.
    pub async fn open(started: &Started, client_version: &str) -> Result<Self> {
        Ok(Self::from_ws(
            open_ws(&started.url, &started.token, client_version).await?,
        ))
    }

    pub fn from_ws(ws: Ws) -> Self {
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let _ = tx.send(m);
            }
        });
        Self { sink, frames }
    }

    /// Sends `messages` in one write: they reach the gateway together, before any answer.
    pub async fn send_all(&mut self, messages: Vec<Message>) -> Result<()> {
        for m in messages {
            self.sink.feed(m).await?;
        }
        self.sink.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, m: &ClientMessage) -> Result<()> {
        self.send_all(vec![binary(m)]).await
    }

    /// Acknowledges the agent's `m`.
    pub async fn ack(&mut self, m: &ClientMessage) -> Result<()> {
        self.send(&ClientMessage::acknowledge(
            &m.message_type,
            m.message_id,
            m.sequence_number,
        ))
        .await
    }

    /// The next data-channel message from the gateway; `None` once the WebSocket closed.
    pub async fn next_message(&mut self) -> Result<Option<ClientMessage>> {
        loop {
            let frame = tokio::time::timeout(TEST_TIMEOUT, self.frames.recv())
                .await
                .context("timed out waiting for a frame")?;
            match frame {
                None | Some(Message::Close(_)) => return Ok(None),
                Some(Message::Binary(b)) => return Ok(Some(message::decode(&b)?.message)),
                Some(_) => {}
            }
        }
    }

    /// The next `output_stream_data` of `payload_type` (others, such as retransmissions of
    /// earlier messages, are skipped).
    pub async fn next_output(&mut self, payload_type: u32) -> Result<ClientMessage> {
        loop {
            match self.next_message().await? {
                Some(m)
                    if m.message_type == MessageType::OutputStreamData
                        && m.payload_type == payload_type =>
                {
                    return Ok(m);
                }
                Some(_) => {}
                None => bail!("the WebSocket closed before PayloadType {payload_type}"),
            }
        }
    }
}
