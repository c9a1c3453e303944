//! The gateway's data channel (MGS): the WebSocket upgrade at `/v1/data-channel/<session>`, the
//! open message and its token, the per-connection relay between client and agent, the rate
//! limit of realistic mode, and the transit faults (drop, duplicate, reorder, delay, corrupt,
//! recycle, black hole, TCP reset).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::agent::{AgentInput, Injection, ToClient};
use crate::config::{Faults, Mode};
use crate::message::{self, OpenDataChannelInput};
use crate::registry::Shared;

const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const REORDER_FLUSH: Duration = Duration::from_millis(20);

/// Serves one data-channel connection from the upgrade to the close.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    let mut authorization: Option<String> = None;
    // The Err type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        path = req.uri().to_string();
        authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(resp)
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(stream, callback).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!("data-channel upgrade failed: {e}");
            return;
        }
    };
    shared
        .data_channel_connections
        .fetch_add(1, Ordering::Relaxed);
    let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
    let Some(session_id) = route.strip_prefix("/v1/data-channel/").map(str::to_owned) else {
        let _ = ws.close(None).await;
        return;
    };
    let strict = shared.config.strict;
    let mut violations = Vec::new();
    if !query.split('&').any(|kv| kv == "role=publish_subscribe") {
        violations.push(format!(
            "stream URL query {query:?} lacks role=publish_subscribe"
        ));
    }
    if let Some(auth) = &authorization
        && !auth.contains("/ssmmessages/aws4_request")
    {
        violations.push("signed WebSocket upgrade does not name service ssmmessages".to_owned());
    }

    // Control frames (the plugin pings at once) may come before the open message.
    let first = tokio::time::timeout(OPEN_TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                _ => return None,
            }
        }
    })
    .await;
    let Ok(Some(first)) = first else {
        shared.record_violation(Some(&session_id), "no open message within 10 s");
        return;
    };
    let open_text = match first {
        Message::Text(t) => t.as_str().to_owned(),
        Message::Binary(b) => {
            let reason = "the open message came as a binary frame, not text".to_owned();
            if strict {
                fail_open(&shared, &session_id, &reason, ws).await;
                return;
            }
            violations.push(reason);
            String::from_utf8_lossy(&b).into_owned()
        }
        other => {
            let reason = format!("first frame is {other:?}, not the open message");
            fail_open(&shared, &session_id, &reason, ws).await;
            return;
        }
    };
    let open: OpenDataChannelInput = match serde_json::from_str(&open_text) {
        Ok(o) => o,
        Err(e) => {
            fail_open(
                &shared,
                &session_id,
                &format!("open message is not JSON: {e}"),
                ws,
            )
            .await;
            return;
        }
    };
    if open.message_schema_version != "1.0" {
        violations.push(format!(
            "open message MessageSchemaVersion {:?}, expected \"1.0\"",
            open.message_schema_version
        ));
    }
    if open.request_id.len() < 16 {
        violations.push("open message RequestId shorter than 16 characters".to_owned());
    }
    if strict && open.client_id.as_deref().is_none_or(str::is_empty) {
        violations.push("open message lacks ClientId".to_owned());
    }
    if strict && open.client_version.as_deref().is_none_or(str::is_empty) {
        violations.push("open message lacks ClientVersion".to_owned());
    }
    let (agent, conn_index, info) = match shared.open(&session_id, &open.token_value) {
        Ok(x) => x,
        Err(reason) => {
            fail_open(&shared, &session_id, &reason, ws).await;
            return;
        }
    };
    let conn_id = conn_index;
    let (outbound, rx) = mpsc::unbounded_channel();
    let _ = agent.send(AgentInput::Attach { conn_id, outbound });
    for v in violations {
        let _ = agent.send(AgentInput::GatewayViolation {
            reason: v,
            close: false,
        });
    }
    let faults = info.faults.clone();
    let relay = Relay {
        agent: agent.clone(),
        conn_id,
        transit: Transit::new(&faults, conn_index),
        bucket: (shared.config.mode == Mode::Realistic)
            .then(|| TokenBucket::new(shared.config.rate_limit_per_second)),
        drop_client_every: faults.drop_client_every,
        client_stream_frames: 0,
    };
    relay.run(ws, rx).await;
    let _ = agent.send(AgentInput::Detach { conn_id });
}

async fn fail_open(
    shared: &Shared,
    session_id: &str,
    reason: &str,
    mut ws: WebSocketStream<TcpStream>,
) {
    let known = shared.agent(session_id);
    match known {
        Some(agent) => {
            let _ = agent.send(AgentInput::GatewayViolation {
                reason: reason.to_owned(),
                close: false,
            });
        }
        None => shared.record_violation(Some(session_id), reason),
    }
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: "open rejected".into(),
    };
    let _ = ws.close(Some(frame)).await;
}

/// Gateway limit on client stream messages (a token bucket of one second's worth).
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Transit faults on frames to the client.
struct Transit {
    faults: Faults,
    connection_faulted: bool,
    stream_count: u64,
    frames_sent: u64,
    reorder: Vec<Vec<u8>>,
    reorder_since: Option<Instant>,
    delayed: VecDeque<(Instant, Vec<u8>)>,
}

impl Transit {
    fn new(faults: &Faults, conn_index: u32) -> Self {
        Self {
            faults: faults.clone(),
            connection_faulted: conn_index < faults.connection_faults.unwrap_or(1),
            stream_count: 0,
            frames_sent: 0,
            reorder: Vec::new(),
            reorder_since: None,
            delayed: VecDeque::new(),
        }
    }

    fn every(n: Option<u32>, count: u64) -> bool {
        n.is_some_and(|n| n > 0 && count.is_multiple_of(u64::from(n)))
    }

    /// Applies per-frame faults; returns the frames to send now (before the delay).
    fn apply(&mut self, mut data: Vec<u8>, stream: bool) -> Vec<Vec<u8>> {
        if !stream {
            return vec![data];
        }
        self.stream_count += 1;
        let c = self.stream_count;
        if Self::every(self.faults.drop_every, c) {
            return Vec::new();
        }
        if Self::every(self.faults.corrupt_digest_every, c) && data.len() > 112 {
            data[80] ^= 0xFF;
        }
        if Self::every(self.faults.flip_payload_bit_every, c)
            && data.len() > message::FRAME_HEADER_SIZE
        {
            data[message::FRAME_HEADER_SIZE] ^= 0x01;
        }
        let mut out = vec![data];
        if Self::every(self.faults.duplicate_every, c) {
            out.push(out[0].clone());
        }
        match self.faults.reorder_window {
            Some(w) if w > 1 => {
                self.reorder.extend(out);
                self.reorder_since.get_or_insert_with(Instant::now);
                if self.reorder.len() >= w as usize {
                    self.flush_reorder()
                } else {
                    Vec::new()
                }
            }
            _ => out,
        }
    }

    fn flush_reorder(&mut self) -> Vec<Vec<u8>> {
        self.reorder_since = None;
        let mut group = std::mem::take(&mut self.reorder);
        group.reverse();
        group
    }

    fn connection_fault_due(&self) -> Option<Injection> {
        if !self.connection_faulted {
            return None;
        }
        let n = self.frames_sent;
        if self.faults.reset_after_frames.is_some_and(|k| n >= k) {
            return Some(Injection::Reset);
        }
        if self.faults.black_hole_after_frames.is_some_and(|k| n >= k) {
            return Some(Injection::BlackHole);
        }
        if self.faults.recycle_after_frames.is_some_and(|k| n >= k) {
            return Some(Injection::Recycle);
        }
        None
    }
}

struct Relay {
    agent: mpsc::UnboundedSender<AgentInput>,
    conn_id: u32,
    transit: Transit,
    bucket: Option<TokenBucket>,
    drop_client_every: Option<u32>,
    client_stream_frames: u64,
}

enum Step {
    Continue,
    Stop,
}

impl Relay {
    async fn run(
        mut self,
        mut ws: WebSocketStream<TcpStream>,
        mut rx: mpsc::UnboundedReceiver<ToClient>,
    ) {
        let mut black_hole = false;
        loop {
            let next_delay = self.transit.delayed.front().map(|(t, _)| *t);
            let reorder_due = self.transit.reorder_since.map(|t| t + REORDER_FLUSH);
            // A black hole stops reading the socket altogether: no frame is relayed and no ping
            // is answered, as when the network in between fails silently.
            let step = tokio::select! {
                incoming = ws.next(), if !black_hole => match incoming {
                    Some(Ok(Message::Binary(b))) => self.relay_client_frame(b.to_vec(), false),
                    Some(Ok(Message::Text(t))) => self.relay_client_frame(t.as_bytes().to_vec(), true),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Step::Stop,
                    Some(Ok(_)) => Step::Continue,
                },
                out = rx.recv() => match out {
                    Some(_) if black_hole => Step::Continue,
                    None => {
                        let _ = ws.close(None).await;
                        Step::Stop
                    }
                    Some(ToClient::Frame { data, stream }) => {
                        let frames = self.transit.apply(data, stream);
                        self.emit(&mut ws, frames).await
                    }
                    Some(ToClient::Close { code, reason }) => {
                        self.flush_all(&mut ws).await;
                        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                        let _ = ws.close(Some(frame)).await;
                        Step::Stop
                    }
                    Some(ToClient::Inject(i)) => match self.inject(&mut ws, i).await {
                        Some(true) => { black_hole = true; Step::Continue }
                        _ => Step::Stop,
                    },
                },
                _ = sleep_until_opt(next_delay), if next_delay.is_some() && !black_hole => {
                    self.send_due(&mut ws).await
                }
                _ = sleep_until_opt(reorder_due), if reorder_due.is_some() && !black_hole => {
                    let frames = self.transit.flush_reorder();
                    self.emit(&mut ws, frames).await
                }
            };
            if matches!(step, Step::Stop) {
                break;
            }
            if !black_hole && let Some(i) = self.transit.connection_fault_due() {
                self.transit.connection_faulted = false;
                match self.inject(&mut ws, i).await {
                    Some(true) => black_hole = true,
                    _ => break,
                }
            }
        }
    }

    /// Performs a connection fault; `Some(true)` means "now a black hole", otherwise the
    /// connection is gone.
    async fn inject(&mut self, ws: &mut WebSocketStream<TcpStream>, i: Injection) -> Option<bool> {
        tracing::info!(conn = self.conn_id, "injecting {i:?}");
        match i {
            Injection::Recycle => {
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "Bye".into(),
                };
                let _ = ws.close(Some(frame)).await;
                None
            }
            Injection::Reset => {
                let _ = ws.get_ref().set_zero_linger();
                None
            }
            Injection::BlackHole => Some(true),
        }
    }

    fn relay_client_frame(&mut self, data: Vec<u8>, text: bool) -> Step {
        let is_stream = data.len() > 4 + 17 && &data[4..4 + 17] == b"input_stream_data";
        if is_stream {
            self.client_stream_frames += 1;
            if let Some(bucket) = &mut self.bucket
                && !bucket.take()
            {
                let _ = self.agent.send(AgentInput::GatewayViolation {
                    reason: format!(
                        "client exceeded the gateway's {} stream messages per second",
                        bucket.rate
                    ),
                    close: true,
                });
                return Step::Continue;
            }
            if Transit::every(self.drop_client_every, self.client_stream_frames) {
                return Step::Continue;
            }
        }
        let _ = self.agent.send(AgentInput::ClientFrame {
            conn_id: self.conn_id,
            data,
            text,
        });
        Step::Continue
    }

    async fn emit(&mut self, ws: &mut WebSocketStream<TcpStream>, frames: Vec<Vec<u8>>) -> Step {
        match self.transit.faults.delay_ms {
            Some(ms) if ms > 0 => {
                let at = Instant::now() + Duration::from_millis(ms);
                self.transit
                    .delayed
                    .extend(frames.into_iter().map(|f| (at, f)));
                Step::Continue
            }
            _ => {
                for f in frames {
                    if ws.send(Message::Binary(f.into())).await.is_err() {
                        return Step::Stop;
                    }
                    self.transit.frames_sent += 1;
                }
                Step::Continue
            }
        }
    }

    async fn send_due(&mut self, ws: &mut WebSocketStream<TcpStream>) -> Step {
        let now = Instant::now();
        while let Some((t, _)) = self.transit.delayed.front() {
            if *t > now {
                break;
            }
            let Some((_, f)) = self.transit.delayed.pop_front() else {
                break;
            };
            if ws.send(Message::Binary(f.into())).await.is_err() {
                return Step::Stop;
            }
            self.transit.frames_sent += 1;
        }
        Step::Continue
    }

    async fn flush_all(&mut self, ws: &mut WebSocketStream<TcpStream>) {
        let mut frames = self.transit.flush_reorder();
        frames.splice(0..0, self.transit.delayed.drain(..).map(|(_, f)| f));
        for f in frames {
            if ws.send(Message::Binary(f.into())).await.is_err() {
                return;
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
