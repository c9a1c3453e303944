//! The emulator's own minimum for a session's setup: a straight-line client that does only the
//! steps no session can skip (StartSession over raw HTTP, the WebSocket upgrade and open
//! message, the agent's handshake, the target's first byte), in one task, with no driver, pacer,
//! metrics or SDK. Its phases are cut exactly where the bridge's histogram cuts them, so the two
//! compare phase by phase; whatever the bridge takes beyond it is the bridge's own share.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use fleet_access_agent_bridge::protocol::{
    ClientMessage, MessageType, PayloadType,
    handshake::{AcknowledgeContent, HandshakeRequest, OpenDataChannel},
    message::{self, FLAG_FIN, FLAG_SYN},
};
use futures::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::Emulator;

/// How long one floor session may take before it counts as failed.
const SESSION_LIMIT: Duration = Duration::from_secs(10);

/// One session's phases (seconds), each from the end of the one before, as the bridge's
/// `agent_bridge_session_setup_seconds{phase}` cuts them.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloorPhases {
    /// The StartSession call (raw HTTP/1.1 on a new connection).
    pub start_session: f64,
    /// From the response to the agent's first frame (TCP connect, upgrade, open message).
    pub websocket_connect: f64,
    /// Until HandshakeComplete (the response sent as the client's sequence 0).
    pub handshake: f64,
    /// Until the first byte from the instance.
    pub first_byte: f64,
    /// The whole of it.
    pub total: f64,
}

/// Opens one `AWS-StartSSHSession` session straight through and times it; the WebSocket is
/// dropped once the target's first byte has arrived.
pub async fn open_session(emulator: &Emulator) -> anyhow::Result<FloorPhases> {
    tokio::time::timeout(SESSION_LIMIT, open_session_inner(emulator))
        .await
        .context("the floor session took more than 10 s")?
}

async fn open_session_inner(emulator: &Emulator) -> anyhow::Result<FloorPhases> {
    let started = Instant::now();
    let response = emulator
        .start_session(
            "AWS-StartSSHSession",
            serde_json::json!({"portNumber": ["22"]}),
        )
        .await?;
    let field = |name: &str| {
        response[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("StartSession response without {name}"))
    };
    let (url, token) = (field("StreamUrl")?, field("TokenValue")?);
    let opened = Instant::now();

    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let open = OpenDataChannel::new(&token, uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    ws.send(Message::text(open.to_json())).await?;

    let mut phases = FloorPhases {
        start_session: (opened - started).as_secs_f64(),
        ..FloorPhases::default()
    };
    let mut mark = opened;
    let mut first_frame = true;
    let mut handshake_done = false;
    while let Some(frame) = ws.next().await {
        let Message::Binary(frame) = frame? else {
            continue;
        };
        let now = Instant::now();
        if first_frame {
            first_frame = false;
            phases.websocket_connect = (now - mark).as_secs_f64();
            mark = now;
        }
        let received = message::decode(&frame)?.message;
        if received.message_type != MessageType::OutputStreamData {
            continue;
        }
        ws.send(Message::binary(ack(&received))).await?;
        match received.payload_type {
            PayloadType::HandshakeRequest => {
                let request: HandshakeRequest = serde_json::from_slice(&received.payload)?;
                let response = request.response(
                    fleet_access_agent_bridge::protocol::handshake::CLIENT_VERSION,
                    None,
                );
                let body = Bytes::from(serde_json::to_vec(&response)?);
                let frame = input(0, PayloadType::HandshakeResponse, body);
                ws.send(Message::binary(frame)).await?;
            }
            PayloadType::HandshakeComplete => {
                handshake_done = true;
                phases.handshake = (now - mark).as_secs_f64();
                mark = now;
            }
            PayloadType::Output if handshake_done && !received.payload.is_empty() => {
                phases.first_byte = (now - mark).as_secs_f64();
                phases.total = (now - started).as_secs_f64();
                return Ok(phases);
            }
            _ => {}
        }
    }
    bail!("the data channel closed before the target's first byte")
}

/// The client's `input_stream_data` message `seq`.
fn input(seq: i64, payload_type: PayloadType, payload: Bytes) -> Bytes {
    frame(MessageType::InputStreamData, seq, 0, payload_type, payload)
}

/// The acknowledge of `received`.
fn ack(received: &ClientMessage) -> Bytes {
    let content = AcknowledgeContent {
        message_type: received.message_type.as_str().to_owned(),
        message_id: received.message_id.hyphenated().to_string(),
        sequence_number: received.sequence_number,
        is_sequential_message: true,
    };
    let payload = Bytes::from(serde_json::to_vec(&content).unwrap_or_default());
    frame(
        MessageType::Acknowledge,
        0,
        FLAG_SYN | FLAG_FIN,
        PayloadType::Unset,
        payload,
    )
}

fn frame(
    message_type: MessageType,
    sequence_number: i64,
    flags: u64,
    payload_type: PayloadType,
    payload: Bytes,
) -> Bytes {
    let created_date = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ClientMessage {
        message_type,
        schema_version: message::SCHEMA_VERSION,
        created_date,
        sequence_number,
        flags,
        message_id: uuid::Uuid::new_v4(),
        payload_type,
        payload,
    }
    .to_bytes()
}
