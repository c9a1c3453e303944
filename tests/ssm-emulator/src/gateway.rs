//! The gateway's data channel (MGS): the WebSocket upgrade at `/v1/data-channel/<session>`, the
//! open message and its token, the per-connection relay between client and agent, the rate
//! limit of realistic mode, and the transit faults (drop, duplicate, reorder, delay, corrupt,
//! recycle, black hole, TCP reset), each counted in the session's report. A WebSocket the
//! gateway closes keeps relaying client frames to the agent until the client answers the close
//! (or [`CLOSE_LINGER`] passes), so that the last frames are checked too.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::agent::{AgentInput, Injection, ToClient, Written};
use crate::config::{Config, Faults, Mode};
use crate::message::{self, OpenDataChannelInput};
use crate::port::InTransit;
use crate::registry::{OpenRefused, Opened, Shared, lock};
use crate::report::{InjectedFaults, SessionReport};
use crate::tls::Transport;

/// What one WebSocket read takes at most.
const WS_READ_BUFFER: usize = 16 * 1024;

const REORDER_FLUSH: Duration = Duration::from_millis(20);
/// How long a WebSocket the gateway closes waits for the client's answer (reading its last
/// frames meanwhile).
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Serves one data-channel connection from the upgrade to the close.
pub(crate) async fn serve(shared: Arc<Shared>, stream: impl Transport) {
    let _ = stream.tcp().set_nodelay(true);
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
    // Each WebSocket read zeroes a fresh read buffer first: tungstenite's default (128 KiB)
    // costs a 128 KiB memset per client ack.
    let config = WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let mut ws = match accepted.await {
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
    let open_timeout = Config::duration(shared.config.open_timeout_ms);
    let first = tokio::time::timeout(open_timeout, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                _ => return None,
            }
        }
    })
    .await;
    let first = match first {
        Ok(Some(m)) => m,
        Ok(None) => {
            report_open_failure(
                &shared,
                &session_id,
                "the WebSocket ended before the open message",
            );
            return;
        }
        Err(_) => {
            let reason = format!("no open message within {open_timeout:?}");
            report_open_failure(&shared, &session_id, &reason);
            return;
        }
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
    let Opened {
        agent,
        conn_id,
        info,
        report,
    } = match shared.open(&session_id, &open.token_value) {
        Ok(opened) => opened,
        Err(OpenRefused::Violation(reason)) => {
            fail_open(&shared, &session_id, &reason, ws).await;
            return;
        }
        Err(OpenRefused::SessionEnded) => {
            shared.opens_after_end.fetch_add(1, Ordering::Relaxed);
            close_refused(ws, "the session has ended").await;
            return;
        }
    };
    let (outbound, rx) = mpsc::unbounded_channel();
    let _ = agent.send(AgentInput::Attach { conn_id, outbound });
    for v in violations {
        let _ = agent.send(AgentInput::GatewayViolation {
            reason: v,
            close: false,
        });
    }
    let faults = info.faults.clone();
    let mut relay = Relay {
        agent: agent.clone(),
        conn_id,
        transit: Transit::new(&faults, conn_id, report),
        bucket: (shared.config.mode == Mode::Realistic)
            .then(|| TokenBucket::new(shared.config.rate_limit_per_second)),
        drop_client_every: faults.drop_client_every,
        client_stream_frames: 0,
        black_hole: false,
        stuck: Vec::new(),
        awaited: Vec::new(),
    };
    let end = relay.run(&mut ws, rx).await;
    let _ = agent.send(AgentInput::Detach { conn_id });
    if let End::Closing { frame, flush } = end {
        relay.close_and_linger(&mut ws, frame, flush).await;
    }
    let _ = agent.send(AgentInput::Closed { conn_id });
}

/// Records why a WebSocket could not open its session and closes it.
async fn fail_open(
    shared: &Shared,
    session_id: &str,
    reason: &str,
    ws: WebSocketStream<impl Transport>,
) {
    report_open_failure(shared, session_id, reason);
    close_refused(ws, "open rejected").await;
}

/// Closes a WebSocket whose open message opened nothing.
async fn close_refused(mut ws: WebSocketStream<impl Transport>, why: &str) {
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: why.into(),
    };
    let _ = ws.close(Some(frame)).await;
}

/// A violation before any open message was accepted: the session's agent judges it (in strict
/// mode it fails the session); without a live agent it is recorded as it is.
fn report_open_failure(shared: &Shared, session_id: &str, reason: &str) {
    match shared.agent(session_id) {
        Some(agent) => {
            let _ = agent.send(AgentInput::GatewayViolation {
                reason: reason.to_owned(),
                close: false,
            });
        }
        None => shared.record_violation(Some(session_id), reason),
    }
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

/// Transit faults on frames to the client, counted in the session's report.
struct Transit {
    faults: Faults,
    report: Arc<Mutex<SessionReport>>,
    connection_faulted: bool,
    stream_count: u64,
    frames_sent: u64,
    reorder: Vec<Bytes>,
    reorder_since: Option<Instant>,
    delayed: VecDeque<(Instant, Bytes)>,
}

impl Transit {
    fn new(faults: &Faults, conn_index: u32, report: Arc<Mutex<SessionReport>>) -> Self {
        Self {
            faults: faults.clone(),
            report,
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

    /// Counts an injected fault in the report.
    fn count(&self, fault: impl FnOnce(&mut InjectedFaults)) {
        fault(&mut lock(&self.report).injected);
    }

    /// Applies per-frame faults; returns the frames to send now (before the delay).
    fn apply(&mut self, data: Bytes, stream: bool) -> Vec<Bytes> {
        if !stream {
            return vec![data];
        }
        self.stream_count += 1;
        let c = self.stream_count;
        if Self::every(self.faults.drop_every, c) {
            self.count(|f| f.output_dropped += 1);
            return Vec::new();
        }
        // A frame is copied only to be damaged.
        let damage = |data: Bytes, at: usize, mask: u8| {
            let mut damaged = data.to_vec();
            damaged[at] ^= mask;
            Bytes::from(damaged)
        };
        let mut data = data;
        if Self::every(self.faults.corrupt_digest_every, c) && data.len() > 112 {
            data = damage(data, 80, 0xFF);
            self.count(|f| f.digests_corrupted += 1);
        }
        if Self::every(self.faults.flip_payload_bit_every, c)
            && data.len() > message::FRAME_HEADER_SIZE
        {
            data = damage(data, message::FRAME_HEADER_SIZE, 0x01);
            self.count(|f| f.payload_bits_flipped += 1);
        }
        let mut out = vec![data];
        if Self::every(self.faults.duplicate_every, c) {
            out.push(out[0].clone());
            self.count(|f| f.output_duplicated += 1);
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

    fn flush_reorder(&mut self) -> Vec<Bytes> {
        self.reorder_since = None;
        let mut group = std::mem::take(&mut self.reorder);
        if group.len() > 1 {
            let n = group.len() as u64;
            self.count(|f| f.output_reordered += n);
        }
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
    /// Silent both ways: nothing is read or sent any more.
    black_hole: bool,
    /// The transport room of output swallowed by a black hole, held while the connection
    /// lives.
    stuck: Vec<InTransit>,
    /// Frames the agent waits to hear were written (held by a transit fault when not written
    /// at once), reported when they are.
    awaited: Vec<(Bytes, Written)>,
}

/// How a connection's relay loop ended.
enum End {
    /// The gateway closes the WebSocket (with `frame`, after flushing held frames when
    /// `flush`); the client may still send until it answers.
    Closing {
        frame: Option<CloseFrame>,
        flush: bool,
    },
    /// The connection is gone (closed by the client, broken, reset or black-holed).
    Gone,
}

impl Relay {
    /// Relays until the connection ends or the gateway starts to close it.
    async fn run(
        &mut self,
        ws: &mut WebSocketStream<impl Transport>,
        mut rx: mpsc::UnboundedReceiver<ToClient>,
    ) -> End {
        loop {
            let next_delay = self.transit.delayed.front().map(|(t, _)| *t);
            let reorder_due = self.transit.reorder_since.map(|t| t + REORDER_FLUSH);
            let black_hole = self.black_hole;
            // A black hole stops reading the socket altogether: no frame is relayed and no ping
            // is answered, as when the network in between fails silently.
            let end = tokio::select! {
                incoming = ws.next(), if !black_hole => match incoming {
                    Some(Ok(Message::Binary(b))) => {
                        self.relay_client_frame(b.to_vec(), false);
                        None
                    }
                    Some(Ok(Message::Text(t))) => {
                        self.relay_client_frame(t.as_bytes().to_vec(), true);
                        None
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Some(End::Gone),
                    Some(Ok(_)) => None,
                },
                out = rx.recv() => match out {
                    // Nothing gets through, and the agent's writes block: what it sent keeps its
                    // room in the transport.
                    Some(ToClient::Frame { room, .. }) if black_hole => {
                        self.stuck.extend(room);
                        None
                    }
                    Some(_) if black_hole => None,
                    // The agent let this connection go (a newer one replaced it, or the session
                    // ended).
                    None if black_hole => Some(End::Gone),
                    None => Some(End::Closing { frame: None, flush: false }),
                    Some(ToClient::Frame { data, stream, room, on_written }) => {
                        // A resend of a frame still awaited is the same frame.
                        if let Some(written) = on_written
                            && !self.awaited.iter().any(|(f, _)| *f == data)
                        {
                            self.awaited.push((data.clone(), written));
                        }
                        let frames = self.transit.apply(data, stream);
                        let end = self.emit(ws, frames).await;
                        drop(room);
                        end
                    }
                    Some(ToClient::Close { code, reason }) => Some(End::Closing {
                        frame: Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }),
                        flush: true,
                    }),
                    Some(ToClient::Inject(i)) => self.inject(ws, i),
                },
                _ = sleep_until_opt(next_delay), if next_delay.is_some() && !black_hole => {
                    self.send_due(ws).await
                }
                _ = sleep_until_opt(reorder_due), if reorder_due.is_some() && !black_hole => {
                    let frames = self.transit.flush_reorder();
                    self.emit(ws, frames).await
                }
            };
            if let Some(end) = end {
                return end;
            }
            if !self.black_hole
                && let Some(i) = self.transit.connection_fault_due()
            {
                self.transit.connection_faulted = false;
                if let Some(end) = self.inject(ws, i) {
                    return end;
                }
            }
        }
    }

    /// Performs a connection fault (counted); `None` while the connection lives on (as a black
    /// hole).
    fn inject(&mut self, ws: &mut WebSocketStream<impl Transport>, i: Injection) -> Option<End> {
        tracing::info!(conn = self.conn_id, "injecting {i:?}");
        match i {
            Injection::Recycle => {
                self.transit.count(|f| f.websocket_recycles += 1);
                Some(End::Closing {
                    frame: Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "Bye".into(),
                    }),
                    flush: false,
                })
            }
            Injection::Reset => {
                self.transit.count(|f| f.tcp_resets += 1);
                let _ = ws.get_ref().tcp().set_zero_linger();
                Some(End::Gone)
            }
            Injection::BlackHole => {
                self.transit.count(|f| f.black_holes += 1);
                self.black_hole = true;
                None
            }
        }
    }

    /// Sends the close and relays the client's last frames until it answers (bounded by
    /// [`CLOSE_LINGER`]).
    async fn close_and_linger(
        &mut self,
        ws: &mut WebSocketStream<impl Transport>,
        frame: Option<CloseFrame>,
        flush: bool,
    ) {
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            if flush {
                self.flush_all(ws).await;
            }
            if ws.close(frame).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Binary(b) => self.relay_client_frame(b.to_vec(), false),
                    Message::Text(t) => self.relay_client_frame(t.as_bytes().to_vec(), true),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        })
        .await;
    }

    fn relay_client_frame(&mut self, data: Vec<u8>, text: bool) {
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
                return;
            }
            if Transit::every(self.drop_client_every, self.client_stream_frames) {
                let _ = self.agent.send(AgentInput::InputDropped {
                    seq: message::peek_sequence_number(&data),
                });
                return;
            }
        }
        let _ = self.agent.send(AgentInput::ClientFrame {
            conn_id: self.conn_id,
            data,
            text,
        });
    }

    /// Sends `frames` now, or queues them when `delay_ms` is set; `Some` when the connection
    /// broke.
    async fn emit(
        &mut self,
        ws: &mut WebSocketStream<impl Transport>,
        frames: Vec<Bytes>,
    ) -> Option<End> {
        match self.transit.faults.delay_ms {
            Some(ms) if ms > 0 => {
                let at = Instant::now() + Duration::from_millis(ms);
                let n = frames.len() as u64;
                self.transit.count(|f| f.output_delayed += n);
                self.transit
                    .delayed
                    .extend(frames.into_iter().map(|f| (at, f)));
                None
            }
            _ => {
                for f in frames {
                    let awaited = self.awaited_for(&f);
                    if ws.send(Message::Binary(f)).await.is_err() {
                        return Some(End::Gone);
                    }
                    self.wrote(awaited);
                }
                None
            }
        }
    }

    async fn send_due(&mut self, ws: &mut WebSocketStream<impl Transport>) -> Option<End> {
        let now = Instant::now();
        while let Some((t, _)) = self.transit.delayed.front() {
            if *t > now {
                break;
            }
            let Some((_, f)) = self.transit.delayed.pop_front() else {
                break;
            };
            let awaited = self.awaited_for(&f);
            if ws.send(Message::Binary(f)).await.is_err() {
                return Some(End::Gone);
            }
            self.wrote(awaited);
        }
        None
    }

    /// Whether the agent waits to hear that `frame` was written (no longer, once asked).
    fn awaited_for(&mut self, frame: &Bytes) -> Option<Written> {
        let i = self.awaited.iter().position(|(f, _)| f == frame)?;
        Some(self.awaited.swap_remove(i).1)
    }

    /// Counts a frame written to the client, and tells the agent when it waited for it.
    fn wrote(&mut self, awaited: Option<Written>) {
        self.transit.frames_sent += 1;
        if let Some(written) = awaited {
            let _ = self.agent.send(AgentInput::Written(written));
        }
    }

    async fn flush_all(&mut self, ws: &mut WebSocketStream<impl Transport>) {
        let mut frames = self.transit.flush_reorder();
        frames.splice(0..0, self.transit.delayed.drain(..).map(|(_, f)| f));
        for f in frames {
            if ws.send(Message::Binary(f)).await.is_err() {
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
