//! The data channel's binary frame (`ClientMessage` / `AgentMessage`, docs/protocol.md §2):
//! encoding, decoding with the lenient reader rule, and the strict checks the emulator applies
//! to every client frame. Also the JSON payloads carried inside frames (§3.4, §4.2, §5.2).
//!
//! This codec re-implements what `agent-bridge`'s `protocol::message` also implements, on
//! purpose: the emulator is the independent oracle the bridge is tested against, so it shares
//! no protocol code with it (a bug copied into both would pass every test). It is written from
//! docs/protocol.md and the agent's sources, and is itself checked against the official plugin.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

// === Layout (§2.1): each offset is the previous offset plus the previous length ===

const HL_OFFSET: usize = 0;
const HL_LEN: usize = 4;
const TYPE_OFFSET: usize = HL_OFFSET + HL_LEN;
const TYPE_LEN: usize = 32;
const SCHEMA_OFFSET: usize = TYPE_OFFSET + TYPE_LEN;
const SCHEMA_LEN: usize = 4;
const DATE_OFFSET: usize = SCHEMA_OFFSET + SCHEMA_LEN;
const DATE_LEN: usize = 8;
const SEQ_OFFSET: usize = DATE_OFFSET + DATE_LEN;
const SEQ_LEN: usize = 8;
const FLAGS_OFFSET: usize = SEQ_OFFSET + SEQ_LEN;
const FLAGS_LEN: usize = 8;
const ID_OFFSET: usize = FLAGS_OFFSET + FLAGS_LEN;
const ID_LEN: usize = 16;
const DIGEST_OFFSET: usize = ID_OFFSET + ID_LEN;
const DIGEST_LEN: usize = 32;
const PAYLOAD_TYPE_OFFSET: usize = DIGEST_OFFSET + DIGEST_LEN;
const PAYLOAD_TYPE_LEN: usize = 4;
const PAYLOAD_LENGTH_OFFSET: usize = PAYLOAD_TYPE_OFFSET + PAYLOAD_TYPE_LEN;
const PAYLOAD_LENGTH_LEN: usize = 4;

/// The HeaderLength every writer puts on the wire: the offset of PayloadLength.
pub const HEADER_LENGTH: u32 = PAYLOAD_LENGTH_OFFSET as u32;
/// The HeaderLength of the legacy `channel_closed` form (no PayloadType field).
pub const LEGACY_HEADER_LENGTH: u32 = PAYLOAD_TYPE_OFFSET as u32;
/// Size of the fixed header on the wire, PayloadLength included.
pub const FRAME_HEADER_SIZE: usize = PAYLOAD_LENGTH_OFFSET + PAYLOAD_LENGTH_LEN;

/// Flags bit 0.
pub const FLAG_SYN: u64 = 1;
/// Flags bit 1.
pub const FLAG_FIN: u64 = 2;

/// PayloadType values (§3.2).
pub mod payload_type {
    /// Acks, `channel_closed`, publication messages.
    pub const UNSET: u32 = 0;
    /// Data, both directions.
    pub const OUTPUT: u32 = 1;
    /// Agent error text.
    pub const ERROR: u32 = 2;
    /// Terminal size (shell sessions).
    pub const SIZE: u32 = 3;
    /// Agent → client, first message of a Port session.
    pub const HANDSHAKE_REQUEST: u32 = 5;
    /// Client → agent answer to the request.
    pub const HANDSHAKE_RESPONSE: u32 = 6;
    /// Agent → client, ends the handshake.
    pub const HANDSHAKE_COMPLETE: u32 = 7;
    /// KMS challenge (shell sessions only).
    pub const ENC_CHALLENGE_REQUEST: u32 = 8;
    /// KMS challenge answer.
    pub const ENC_CHALLENGE_RESPONSE: u32 = 9;
    /// 4-byte big-endian flag value (§3.3).
    pub const FLAG: u32 = 10;
}

/// Flag payload values (§3.3).
pub mod flag {
    /// Basic mode: the client's local connection closed.
    pub const DISCONNECT_TO_PORT: u32 = 1;
    /// End the session.
    pub const TERMINATE_SESSION: u32 = 2;
    /// Mux mode: the agent could not dial the destination.
    pub const CONNECT_TO_PORT_ERROR: u32 = 3;
}

/// The MessageType strings of the data channel (§2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageType {
    /// Client → agent stream.
    InputStreamData,
    /// Agent → client stream.
    OutputStreamData,
    /// Ack, either direction.
    Acknowledge,
    /// Session end, from the gateway.
    ChannelClosed,
    /// Flow control from the gateway.
    StartPublication,
    /// Flow control from the gateway.
    PausePublication,
    /// Agent → gateway state.
    AgentSessionState,
    /// Anything else, as read.
    Other(String),
}

impl MessageType {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InputStreamData => "input_stream_data",
            Self::OutputStreamData => "output_stream_data",
            Self::Acknowledge => "acknowledge",
            Self::ChannelClosed => "channel_closed",
            Self::StartPublication => "start_publication",
            Self::PausePublication => "pause_publication",
            Self::AgentSessionState => "agent_session_state",
            Self::Other(s) => s,
        }
    }

    /// Parses a trimmed wire spelling.
    pub fn parse(s: &str) -> Self {
        match s {
            "input_stream_data" => Self::InputStreamData,
            "output_stream_data" => Self::OutputStreamData,
            "acknowledge" => Self::Acknowledge,
            "channel_closed" => Self::ChannelClosed,
            "start_publication" => Self::StartPublication,
            "pause_publication" => Self::PausePublication,
            "agent_session_state" => Self::AgentSessionState,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One data-channel message, as its sender meant it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// MessageType.
    pub message_type: MessageType,
    /// SchemaVersion (always 1 when written).
    pub schema_version: u32,
    /// CreatedDate, epoch milliseconds.
    pub created_date: u64,
    /// SequenceNumber.
    pub sequence_number: i64,
    /// Flags.
    pub flags: u64,
    /// The logical MessageId (the wire swaps its halves, §2.4).
    pub message_id: Uuid,
    /// PayloadType.
    pub payload_type: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// How the MessageType field was padded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypePadding {
    /// Spaces only (what SMP and the agent write).
    Spaces,
    /// NUL bytes only (the legacy `channel_closed`).
    Nuls,
    /// The name fills all 32 bytes.
    None,
    /// A mix, or other bytes after the name.
    Mixed,
}

/// A frame as read, with the raw details the strict checks look at.
#[derive(Debug, Clone)]
pub struct DecodedFrame {
    /// The message.
    pub message: ClientMessage,
    /// HeaderLength as read.
    pub header_length: u32,
    /// PayloadLength as read (advisory).
    pub payload_length_field: u32,
    /// PayloadDigest as read.
    pub digest: [u8; 32],
    /// How the type field was padded.
    pub type_padding: TypePadding,
}

/// Why a frame could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed header.
    #[error("frame of {0} bytes is shorter than a header")]
    TooShort(usize),
    /// HeaderLength below 112.
    #[error("HeaderLength {0} is below 112")]
    BadHeaderLength(u32),
    /// HeaderLength points past the frame.
    #[error("HeaderLength {header_length} does not fit a frame of {frame_len} bytes")]
    HeaderPastEnd {
        /// HL as read.
        header_length: u32,
        /// Frame size.
        frame_len: usize,
    },
    /// MessageType empty or not text.
    #[error("MessageType is empty or not ASCII")]
    BadMessageType,
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// SHA-256 of a payload.
pub fn payload_digest(payload: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

fn write_uuid(out: &mut [u8], id: &Uuid) {
    let b = id.as_bytes();
    out[..8].copy_from_slice(&b[8..16]);
    out[8..16].copy_from_slice(&b[..8]);
}

fn read_uuid(b: &[u8]) -> Uuid {
    let mut u = [0u8; 16];
    u[8..16].copy_from_slice(&b[..8]);
    u[..8].copy_from_slice(&b[8..16]);
    Uuid::from_bytes(u)
}

impl ClientMessage {
    /// A new message created now with a random id and SchemaVersion 1.
    pub fn new(
        message_type: MessageType,
        sequence_number: i64,
        flags: u64,
        payload_type: u32,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            message_type,
            schema_version: 1,
            created_date: now_millis(),
            sequence_number,
            flags,
            message_id: Uuid::new_v4(),
            payload_type,
            payload,
        }
    }

    /// An `acknowledge` message for `acked` (§4.2): seq 0, flags 3, PayloadType 0.
    pub fn acknowledge(acked_type: &MessageType, acked_id: Uuid, acked_seq: i64) -> Self {
        let content = AcknowledgeContent {
            acknowledged_message_type: acked_type.as_str().to_owned(),
            acknowledged_message_id: acked_id.hyphenated().to_string(),
            acknowledged_message_sequence_number: acked_seq,
            is_sequential_message: true,
        };
        Self::new(
            MessageType::Acknowledge,
            0,
            FLAG_SYN | FLAG_FIN,
            payload_type::UNSET,
            serde_json::to_vec(&content).unwrap_or_default(),
        )
    }

    /// Writes the frame: HL 116, space padding, swapped id, correct digest and PayloadLength.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_header_length(HEADER_LENGTH)
    }

    /// The legacy `channel_closed` form: HL 112, NUL-padded type, no PayloadType (§2.2).
    pub fn encode_legacy(&self) -> Vec<u8> {
        self.encode_with_header_length(LEGACY_HEADER_LENGTH)
    }

    fn encode_with_header_length(&self, hl: u32) -> Vec<u8> {
        let legacy = hl == LEGACY_HEADER_LENGTH;
        let header_end = hl as usize + PAYLOAD_LENGTH_LEN;
        // The header is written in place; the payload is appended (not zeroed first).
        let mut out = Vec::with_capacity(header_end + self.payload.len());
        out.resize(header_end, 0);
        out[HL_OFFSET..HL_OFFSET + HL_LEN].copy_from_slice(&hl.to_be_bytes());
        let name = self.message_type.as_str().as_bytes();
        let pad = if legacy { 0u8 } else { b' ' };
        for (i, slot) in out[TYPE_OFFSET..TYPE_OFFSET + TYPE_LEN]
            .iter_mut()
            .enumerate()
        {
            *slot = name.get(i).copied().unwrap_or(pad);
        }
        out[SCHEMA_OFFSET..SCHEMA_OFFSET + SCHEMA_LEN]
            .copy_from_slice(&self.schema_version.to_be_bytes());
        out[DATE_OFFSET..DATE_OFFSET + DATE_LEN].copy_from_slice(&self.created_date.to_be_bytes());
        out[SEQ_OFFSET..SEQ_OFFSET + SEQ_LEN].copy_from_slice(&self.sequence_number.to_be_bytes());
        out[FLAGS_OFFSET..FLAGS_OFFSET + FLAGS_LEN].copy_from_slice(&self.flags.to_be_bytes());
        write_uuid(&mut out[ID_OFFSET..ID_OFFSET + ID_LEN], &self.message_id);
        out[DIGEST_OFFSET..DIGEST_OFFSET + DIGEST_LEN]
            .copy_from_slice(&payload_digest(&self.payload));
        let len = (self.payload.len() as u32).to_be_bytes();
        if legacy {
            out[PAYLOAD_TYPE_OFFSET..PAYLOAD_TYPE_OFFSET + 4].copy_from_slice(&len);
        } else {
            out[PAYLOAD_TYPE_OFFSET..PAYLOAD_TYPE_OFFSET + PAYLOAD_TYPE_LEN]
                .copy_from_slice(&self.payload_type.to_be_bytes());
            out[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + PAYLOAD_LENGTH_LEN]
                .copy_from_slice(&len);
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// The SequenceNumber of a raw frame, without decoding the rest; `None` when the frame is too
/// short to hold one.
pub fn peek_sequence_number(frame: &[u8]) -> Option<i64> {
    let bytes: [u8; SEQ_LEN] = frame
        .get(SEQ_OFFSET..SEQ_OFFSET + SEQ_LEN)?
        .try_into()
        .ok()?;
    Some(i64::from_be_bytes(bytes))
}

/// Reads a frame with the §2.2 reader rule: HL ∈ {112, 116, ...}, payload = `frame[HL+4..]`,
/// PayloadType read only when HL ≥ 116.
pub fn decode(frame: &[u8]) -> Result<DecodedFrame, DecodeError> {
    if frame.len() < FRAME_HEADER_SIZE - PAYLOAD_TYPE_LEN {
        return Err(DecodeError::TooShort(frame.len()));
    }
    let header_length = read_u32(frame, HL_OFFSET);
    if header_length < LEGACY_HEADER_LENGTH {
        return Err(DecodeError::BadHeaderLength(header_length));
    }
    let header_end = header_length as usize + PAYLOAD_LENGTH_LEN;
    if frame.len() < header_end {
        return Err(DecodeError::HeaderPastEnd {
            header_length,
            frame_len: frame.len(),
        });
    }
    let raw_type = &frame[TYPE_OFFSET..TYPE_OFFSET + TYPE_LEN];
    let name_end = raw_type
        .iter()
        .position(|b| *b == 0 || *b == b' ')
        .unwrap_or(TYPE_LEN);
    let name =
        std::str::from_utf8(&raw_type[..name_end]).map_err(|_| DecodeError::BadMessageType)?;
    if name.is_empty() || !name.is_ascii() {
        return Err(DecodeError::BadMessageType);
    }
    let rest = &raw_type[name_end..];
    let type_padding = if rest.is_empty() {
        TypePadding::None
    } else if rest.iter().all(|b| *b == b' ') {
        TypePadding::Spaces
    } else if rest.iter().all(|b| *b == 0) {
        TypePadding::Nuls
    } else {
        TypePadding::Mixed
    };
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&frame[DIGEST_OFFSET..DIGEST_OFFSET + DIGEST_LEN]);
    let payload_type = if header_length >= HEADER_LENGTH {
        read_u32(frame, PAYLOAD_TYPE_OFFSET)
    } else {
        0
    };
    let payload_length_field = read_u32(frame, header_length as usize);
    Ok(DecodedFrame {
        message: ClientMessage {
            message_type: MessageType::parse(name),
            schema_version: read_u32(frame, SCHEMA_OFFSET),
            created_date: read_u64(frame, DATE_OFFSET),
            sequence_number: read_u64(frame, SEQ_OFFSET) as i64,
            flags: read_u64(frame, FLAGS_OFFSET),
            message_id: read_uuid(&frame[ID_OFFSET..ID_OFFSET + ID_LEN]),
            payload_type,
            payload: frame[header_end..].to_vec(),
        },
        header_length,
        payload_length_field,
        digest,
        type_padding,
    })
}

impl DecodedFrame {
    /// Whether the digest is the SHA-256 of the payload.
    pub fn digest_valid(&self) -> bool {
        self.digest == payload_digest(&self.message.payload)
    }

    /// The §9.1 item 4 strict checks for a client frame; empty when it passes.
    pub fn strict_issues(&self) -> Vec<String> {
        let mut issues = Vec::new();
        let m = &self.message;
        if self.header_length != HEADER_LENGTH {
            issues.push(format!("HeaderLength is {}, not 116", self.header_length));
        }
        if !matches!(self.type_padding, TypePadding::Spaces | TypePadding::None) {
            issues.push(format!(
                "MessageType {:?} is padded with {:?}, not spaces",
                m.message_type.as_str(),
                self.type_padding
            ));
        }
        if m.schema_version != 1 {
            issues.push(format!("SchemaVersion is {}, not 1", m.schema_version));
        }
        if m.created_date == 0 {
            issues.push("CreatedDate is 0".to_owned());
        }
        if self.payload_length_field as usize != m.payload.len() {
            issues.push(format!(
                "PayloadLength is {} but the payload has {} bytes",
                self.payload_length_field,
                m.payload.len()
            ));
        }
        if !self.digest_valid() {
            issues.push(format!(
                "PayloadDigest does not match the payload ({} seq {})",
                m.message_type.as_str(),
                m.sequence_number
            ));
        }
        issues
    }
}

// === JSON payloads ===

/// The payload of an `acknowledge` message (§4.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcknowledgeContent {
    /// Type of the acked message.
    #[serde(rename = "AcknowledgedMessageType")]
    pub acknowledged_message_type: String,
    /// Logical id of the acked message, hyphenated lowercase.
    #[serde(rename = "AcknowledgedMessageId")]
    pub acknowledged_message_id: String,
    /// Sequence number of the acked message.
    #[serde(rename = "AcknowledgedMessageSequenceNumber")]
    pub acknowledged_message_sequence_number: i64,
    /// Always true.
    #[serde(rename = "IsSequentialMessage")]
    pub is_sequential_message: bool,
}

/// The open message, the first (text) WebSocket frame of a data channel (§1.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenDataChannelInput {
    /// "1.0".
    #[serde(rename = "MessageSchemaVersion", default)]
    pub message_schema_version: String,
    /// A fresh UUID.
    #[serde(rename = "RequestId", default)]
    pub request_id: String,
    /// The token from StartSession or ResumeSession.
    #[serde(rename = "TokenValue", default)]
    pub token_value: String,
    /// One UUID per client process.
    #[serde(rename = "ClientId", default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The client's version string.
    #[serde(
        rename = "ClientVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_version: Option<String>,
}

/// One requested client action in a HandshakeRequest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestedClientAction {
    /// `SessionType` or `KMSEncryption`.
    #[serde(rename = "ActionType")]
    pub action_type: String,
    /// The action's parameters.
    #[serde(rename = "ActionParameters")]
    pub action_parameters: serde_json::Value,
}

/// HandshakeRequest payload (§5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandshakeRequest {
    /// The agent's version.
    #[serde(rename = "AgentVersion")]
    pub agent_version: String,
    /// What the client must do.
    #[serde(rename = "RequestedClientActions")]
    pub requested_client_actions: Vec<RequestedClientAction>,
}

/// One processed action in a HandshakeResponse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessedClientAction {
    /// Same as requested.
    #[serde(rename = "ActionType")]
    pub action_type: String,
    /// 1 success, 2 failed, 3 unsupported.
    #[serde(rename = "ActionStatus")]
    pub action_status: i64,
    /// Action-specific result.
    #[serde(rename = "ActionResult", default)]
    pub action_result: serde_json::Value,
    /// Error text.
    #[serde(rename = "Error", default)]
    pub error: Option<String>,
}

/// HandshakeResponse payload (§5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandshakeResponse {
    /// The client's version; gates agent behaviour.
    #[serde(rename = "ClientVersion")]
    pub client_version: String,
    /// One per requested action, in order.
    #[serde(rename = "ProcessedClientActions")]
    pub processed_client_actions: Vec<ProcessedClientAction>,
    /// Errors, if any.
    #[serde(rename = "Errors", default)]
    pub errors: Option<Vec<String>>,
}

/// HandshakeComplete payload (§5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandshakeComplete {
    /// Nanoseconds.
    #[serde(rename = "HandshakeTimeToComplete")]
    pub handshake_time_to_complete: i64,
    /// Printed by the client when non-empty.
    #[serde(rename = "CustomerMessage")]
    pub customer_message: String,
}

/// `channel_closed` payload (§3.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelClosed {
    /// A UUID.
    #[serde(rename = "MessageId")]
    pub message_id: String,
    /// A date string.
    #[serde(rename = "CreatedDate")]
    pub created_date: String,
    /// The target.
    #[serde(rename = "DestinationId")]
    pub destination_id: String,
    /// The session.
    #[serde(rename = "SessionId")]
    pub session_id: String,
    /// "channel_closed".
    #[serde(rename = "MessageType")]
    pub message_type: String,
    /// 1.
    #[serde(rename = "SchemaVersion")]
    pub schema_version: i64,
    /// Text for the user; may be empty.
    #[serde(rename = "Output")]
    pub output: String,
}

/// Encodes a flag payload.
pub fn flag_payload(value: u32) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

/// Decodes a flag payload (exactly 4 bytes).
pub fn parse_flag(payload: &[u8]) -> Option<u32> {
    let b: [u8; 4] = payload.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let m = ClientMessage::new(
            MessageType::InputStreamData,
            42,
            FLAG_SYN,
            payload_type::OUTPUT,
            b"hello".to_vec(),
        );
        let wire = m.encode();
        assert_eq!(wire.len(), FRAME_HEADER_SIZE + 5);
        assert_eq!(read_u32(&wire, 0), 116);
        let d = decode(&wire).expect("decodes");
        assert_eq!(d.message, m);
        assert!(d.strict_issues().is_empty(), "{:?}", d.strict_issues());
        assert_eq!(d.type_padding, TypePadding::Spaces);
    }

    #[test]
    fn message_id_halves_are_swapped_on_the_wire() {
        // The worked example of §2.4.
        let logical = Uuid::parse_str("812ef34f-87bd-449e-a3de-282f478ba6e6").expect("uuid");
        let mut m = ClientMessage::new(MessageType::Acknowledge, 0, 3, 0, vec![]);
        m.message_id = logical;
        let wire = m.encode();
        let on_wire = Uuid::from_slice(&wire[ID_OFFSET..ID_OFFSET + 16]).expect("uuid");
        assert_eq!(on_wire.to_string(), "a3de282f-478b-a6e6-812e-f34f87bd449e");
        assert_eq!(decode(&wire).expect("decodes").message.message_id, logical);
    }

    #[test]
    fn legacy_channel_closed_is_read_with_the_lenient_rule() {
        let m = ClientMessage::new(MessageType::ChannelClosed, 0, 3, 0, b"{}".to_vec());
        let wire = m.encode_legacy();
        let d = decode(&wire).expect("decodes");
        assert_eq!(d.header_length, 112);
        assert_eq!(d.message.payload, b"{}");
        assert_eq!(d.message.payload_type, 0);
        assert_eq!(d.type_padding, TypePadding::Nuls);
        let issues = d.strict_issues();
        assert!(
            issues.iter().any(|i| i.contains("HeaderLength")),
            "{issues:?}"
        );
        assert!(issues.iter().any(|i| i.contains("padded")), "{issues:?}");
    }

    #[test]
    fn strict_checks_catch_each_defect() {
        let m = ClientMessage::new(MessageType::InputStreamData, 1, 0, 1, b"abc".to_vec());
        let mut wire = m.encode();
        wire[DIGEST_OFFSET] ^= 1;
        let d = decode(&wire).expect("decodes");
        assert!(!d.digest_valid());
        assert_eq!(d.strict_issues().len(), 1);

        let mut wire = m.encode();
        wire[PAYLOAD_LENGTH_OFFSET + 3] = 9;
        assert!(decode(&wire).expect("decodes").strict_issues()[0].contains("PayloadLength"));

        let mut wire = m.encode();
        wire[DATE_OFFSET..DATE_OFFSET + 8].fill(0);
        assert!(decode(&wire).expect("decodes").strict_issues()[0].contains("CreatedDate"));
    }

    #[test]
    fn short_or_broken_frames_are_rejected() {
        assert!(matches!(decode(&[0u8; 10]), Err(DecodeError::TooShort(10))));
        let m = ClientMessage::new(MessageType::InputStreamData, 1, 0, 1, vec![]);
        let mut wire = m.encode();
        wire[..4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(decode(&wire).err(), Some(DecodeError::BadHeaderLength(100)));
        let mut wire = m.encode();
        wire[..4].copy_from_slice(&400u32.to_be_bytes());
        assert!(matches!(
            decode(&wire),
            Err(DecodeError::HeaderPastEnd { .. })
        ));
    }

    #[test]
    fn the_sequence_number_is_peeked_from_a_raw_frame() {
        let m = ClientMessage::new(MessageType::InputStreamData, 77, 0, 1, b"x".to_vec());
        assert_eq!(peek_sequence_number(&m.encode()), Some(77));
        assert_eq!(peek_sequence_number(&[0u8; 20]), None);
    }

    #[test]
    fn ack_payload_has_exactly_the_four_keys() {
        let id = Uuid::new_v4();
        let ack = ClientMessage::acknowledge(&MessageType::OutputStreamData, id, 7);
        let v: serde_json::Value = serde_json::from_slice(&ack.payload).expect("json");
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), 4);
        assert_eq!(obj["AcknowledgedMessageSequenceNumber"], 7);
        assert_eq!(obj["AcknowledgedMessageId"], id.to_string());
        assert_eq!(ack.flags, 3);
    }
}
