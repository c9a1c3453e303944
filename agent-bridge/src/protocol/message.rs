//! The `ClientMessage` binary codec (docs/protocol.md §2): one whole WebSocket binary
//! message in, one `ClientMessage` out, and back.
//!
//! Owns the wire layout (offsets defined once below), the message and payload type enums, the
//! UUID half swap, the SHA-256 payload digest and the receive-side validation rules. Pure and
//! total: `decode` never panics, whatever the input; it returns a typed [`DecodeError`].
//!
//! ```text
//!  0        4                          36       40          48        56      64          80          112       116       120
//!  | HL u32 | MessageType (32, spaces) | Schema | Created ms | Seq i64 | Flags | MessageId | SHA-256    | PayType | PayLen  | Payload..
//!                                                                               (halves    (of payload)
//!                                                                                swapped)
//! ```

use bytes::{BufMut, Bytes};
use uuid::Uuid;

// === layout ===

/// Offset of HeaderLength (u32).
pub const HEADER_LENGTH_OFFSET: usize = 0;
const HEADER_LENGTH_LEN: usize = 4;
/// Offset of MessageType (32 ASCII bytes, space padded).
pub const MESSAGE_TYPE_OFFSET: usize = HEADER_LENGTH_OFFSET + HEADER_LENGTH_LEN;
/// Width of the MessageType field.
pub const MESSAGE_TYPE_LEN: usize = 32;
/// Offset of SchemaVersion (u32).
pub const SCHEMA_VERSION_OFFSET: usize = MESSAGE_TYPE_OFFSET + MESSAGE_TYPE_LEN;
const SCHEMA_VERSION_LEN: usize = 4;
/// Offset of CreatedDate (u64, epoch milliseconds).
pub const CREATED_DATE_OFFSET: usize = SCHEMA_VERSION_OFFSET + SCHEMA_VERSION_LEN;
const CREATED_DATE_LEN: usize = 8;
/// Offset of SequenceNumber (i64).
pub const SEQUENCE_NUMBER_OFFSET: usize = CREATED_DATE_OFFSET + CREATED_DATE_LEN;
const SEQUENCE_NUMBER_LEN: usize = 8;
/// Offset of Flags (u64).
pub const FLAGS_OFFSET: usize = SEQUENCE_NUMBER_OFFSET + SEQUENCE_NUMBER_LEN;
const FLAGS_LEN: usize = 8;
/// Offset of MessageId (16 bytes, halves swapped).
pub const MESSAGE_ID_OFFSET: usize = FLAGS_OFFSET + FLAGS_LEN;
const MESSAGE_ID_LEN: usize = 16;
/// Offset of PayloadDigest (SHA-256 of the payload).
pub const PAYLOAD_DIGEST_OFFSET: usize = MESSAGE_ID_OFFSET + MESSAGE_ID_LEN;
const PAYLOAD_DIGEST_LEN: usize = 32;
/// Offset of PayloadType (u32); absent when HeaderLength is 112.
pub const PAYLOAD_TYPE_OFFSET: usize = PAYLOAD_DIGEST_OFFSET + PAYLOAD_DIGEST_LEN;
const PAYLOAD_TYPE_LEN: usize = 4;
/// Offset of PayloadLength (u32) in a frame with HeaderLength 116.
pub const PAYLOAD_LENGTH_OFFSET: usize = PAYLOAD_TYPE_OFFSET + PAYLOAD_TYPE_LEN;
const PAYLOAD_LENGTH_LEN: usize = 4;
/// Offset of the payload in a frame with HeaderLength 116.
pub const PAYLOAD_OFFSET: usize = PAYLOAD_LENGTH_OFFSET + PAYLOAD_LENGTH_LEN;

/// The HeaderLength every writer puts on the wire: the offset of PayloadLength (docs/protocol.md §2.2).
pub const HEADER_LENGTH: u32 = PAYLOAD_LENGTH_OFFSET as u32;
/// The short HeaderLength reported for MGS's `channel_closed` (no PayloadType field).
pub const SHORT_HEADER_LENGTH: u32 = PAYLOAD_TYPE_OFFSET as u32;
/// Fixed bytes before the payload in every frame we write (116 + 4).
pub const FIXED_HEADER_LEN: usize = PAYLOAD_OFFSET;
/// SchemaVersion written on every message.
pub const SCHEMA_VERSION: u32 = 1;

/// Flags bit 0, written by the agent on its stream's first message and on acks.
pub const FLAG_SYN: u64 = 1;
/// Flags bit 1, written on acks.
pub const FLAG_FIN: u64 = 2;

// === types ===

/// The MessageType field (docs/protocol.md §2.3). Unknown strings are kept, not rejected (docs/protocol.md §9.3 item 2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Client to agent stream data; sequenced and acked.
    InputStreamData,
    /// Agent to client stream data; sequenced and acked.
    OutputStreamData,
    /// An acknowledgement (JSON payload, docs/protocol.md §4.2); never acked.
    Acknowledge,
    /// MGS says the session is over; the JSON payload carries `Output`.
    ChannelClosed,
    /// MGS flow control: resume sending.
    StartPublication,
    /// MGS flow control: stop sending data.
    PausePublication,
    /// Agent to MGS session state; a client may see it and ignores it.
    AgentSessionState,
    /// Any other type; ignored by the session. At most 32 bytes, trimmed.
    Other(String),
}

impl MessageType {
    /// The wire string, before padding.
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

    /// Parses a trimmed wire string.
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

    /// True for the two flow-control types whose header and digest are not validated (docs/protocol.md §2.5).
    pub fn is_publication(&self) -> bool {
        matches!(self, Self::StartPublication | Self::PausePublication)
    }
}

/// The PayloadType field (docs/protocol.md §3.2). Unknown values are kept as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadType {
    /// 0: acks, channel_closed, publication messages.
    Unset,
    /// 1: data bytes.
    Output,
    /// 2: agent error text.
    Error,
    /// 3: terminal size JSON.
    Size,
    /// 4: parameter.
    Parameter,
    /// 5: agent's HandshakeRequest JSON.
    HandshakeRequest,
    /// 6: client's HandshakeResponse JSON.
    HandshakeResponse,
    /// 7: agent's HandshakeComplete JSON.
    HandshakeComplete,
    /// 8: KMS challenge from the agent.
    EncChallengeRequest,
    /// 9: KMS challenge answer.
    EncChallengeResponse,
    /// 10: a 4-byte big-endian [`PortFlag`].
    Flag,
    /// 11: separated stderr.
    StdErr,
    /// 12: exit code.
    ExitCode,
    /// Anything else.
    Other(u32),
}

impl PayloadType {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::Unset => 0,
            Self::Output => 1,
            Self::Error => 2,
            Self::Size => 3,
            Self::Parameter => 4,
            Self::HandshakeRequest => 5,
            Self::HandshakeResponse => 6,
            Self::HandshakeComplete => 7,
            Self::EncChallengeRequest => 8,
            Self::EncChallengeResponse => 9,
            Self::Flag => 10,
            Self::StdErr => 11,
            Self::ExitCode => 12,
            Self::Other(v) => v,
        }
    }

    /// From the wire value; never fails.
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Unset,
            1 => Self::Output,
            2 => Self::Error,
            3 => Self::Size,
            4 => Self::Parameter,
            5 => Self::HandshakeRequest,
            6 => Self::HandshakeResponse,
            7 => Self::HandshakeComplete,
            8 => Self::EncChallengeRequest,
            9 => Self::EncChallengeResponse,
            10 => Self::Flag,
            11 => Self::StdErr,
            12 => Self::ExitCode,
            other => Self::Other(other),
        }
    }
}

/// The Flag payload values (docs/protocol.md §3.3), carried as a 4-byte big-endian u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortFlag {
    /// 1, client to agent: basic mode, the local connection closed.
    DisconnectToPort,
    /// 2, client to agent: end the session.
    TerminateSession,
    /// 3, agent to client: mux mode, the agent could not dial for a new stream.
    ConnectToPortError,
    /// Any other value.
    Other(u32),
}

impl PortFlag {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::DisconnectToPort => 1,
            Self::TerminateSession => 2,
            Self::ConnectToPortError => 3,
            Self::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::DisconnectToPort,
            2 => Self::TerminateSession,
            3 => Self::ConnectToPortError,
            other => Self::Other(other),
        }
    }

    /// The 4-byte payload.
    pub fn to_payload(self) -> Bytes {
        Bytes::copy_from_slice(&self.to_u32().to_be_bytes())
    }

    /// Parses a Flag payload; `None` unless it is exactly 4 bytes.
    pub fn from_payload(payload: &[u8]) -> Option<Self> {
        let bytes: [u8; 4] = payload.try_into().ok()?;
        Some(Self::from_u32(u32::from_be_bytes(bytes)))
    }
}

/// One SSM data-channel message, as the session sees it (the digest and lengths are computed by
/// [`ClientMessage::encode`] and checked by [`decode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// MessageType.
    pub message_type: MessageType,
    /// SchemaVersion (1 when written; not checked on read).
    pub schema_version: u32,
    /// CreatedDate, Unix epoch milliseconds.
    pub created_date: u64,
    /// SequenceNumber (docs/protocol.md §4.1); 0 for acks and control messages.
    pub sequence_number: i64,
    /// Flags (docs/protocol.md §2.6); recorded, never interpreted.
    pub flags: u64,
    /// The logical (RFC 4122 order) MessageId.
    pub message_id: Uuid,
    /// PayloadType (0 when the header is 112 bytes long).
    pub payload_type: PayloadType,
    /// The payload bytes as transmitted.
    pub payload: Bytes,
}

/// What [`decode`] returns: the message plus the header facts a strict peer may want to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message.
    pub message: ClientMessage,
    /// HeaderLength as read (112 or 116).
    pub header_length: u32,
    /// PayloadLength as read at offset HL; advisory (docs/protocol.md §2.2).
    pub declared_payload_length: u32,
    /// The digest as read from the wire.
    pub digest: [u8; 32],
}

impl Decoded {
    /// True when the wire digest is the SHA-256 of the payload.
    pub fn digest_matches(&self) -> bool {
        payload_digest(&self.message.payload) == self.digest
    }

    /// True when PayloadLength agrees with the payload actually present.
    pub fn payload_length_matches(&self) -> bool {
        usize::try_from(self.declared_payload_length).ok() == Some(self.message.payload.len())
    }
}

/// Why a frame could not be decoded. Every malformed input maps to exactly one variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is shorter than the fixed header it announces; the caller drops it.
    #[error("frame of {len} bytes is shorter than the {needed} bytes its header requires")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes required.
        needed: usize,
    },
    /// HeaderLength is neither 112 nor 116; the caller drops the frame.
    #[error("unsupported HeaderLength {0} (expected 112 or 116)")]
    HeaderLength(u32),
    /// MessageType is empty after trimming NULs and whitespace.
    #[error("empty MessageType")]
    EmptyMessageType,
    /// MessageType is not printable ASCII.
    #[error("MessageType is not printable ASCII")]
    MessageTypeNotAscii,
    /// CreatedDate is zero (docs/protocol.md §2.5), on a message that is validated.
    #[error("CreatedDate is zero")]
    ZeroCreatedDate,
}

// === impl ClientMessage ===

impl ClientMessage {
    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + self.payload.len()
    }

    /// Writes the frame with the docs/protocol.md §2.1 writer rules: HL 116, space padding, swapped UUID
    /// halves, SHA-256 digest, correct PayloadLength. A MessageType longer than 32 bytes is cut.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(HEADER_LENGTH);
        let mut message_type = [b' '; MESSAGE_TYPE_LEN];
        let name = self.message_type.as_str().as_bytes();
        let n = name.len().min(MESSAGE_TYPE_LEN);
        message_type[..n].copy_from_slice(&name[..n]);
        buf.put_slice(&message_type);
        buf.put_u32(self.schema_version);
        buf.put_u64(self.created_date);
        buf.put_i64(self.sequence_number);
        buf.put_u64(self.flags);
        buf.put_slice(&swap_uuid_halves(*self.message_id.as_bytes()));
        buf.put_slice(&payload_digest(&self.payload));
        buf.put_u32(self.payload_type.to_u32());
        // Payloads are bounded by the session's chunk size; a length beyond u32 cannot be framed
        // by SSM at all, so saturate rather than wrap.
        buf.put_u32(u32::try_from(self.payload.len()).unwrap_or(u32::MAX));
        buf.put_slice(&self.payload);
    }

    /// Encodes into a fresh buffer, ready for a WebSocket binary message.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        Bytes::from(out)
    }
}

/// Decodes one whole WebSocket binary message with the docs/protocol.md §2.2 reader rule.
///
/// Accepts HeaderLength 112 or 116, takes the payload as `frame[HL + 4 ..]`, reads PayloadType
/// only when HL is 116, treats PayloadLength as advisory, trims NULs then whitespace from
/// MessageType, and (except for start/pause_publication) requires a non-zero CreatedDate.
/// The digest is *not* judged here: see [`Decoded::digest_matches`], which the session applies
/// per message type.
pub fn decode(frame: &[u8]) -> Result<Decoded, DecodeError> {
    let header_length = read_u32(frame, HEADER_LENGTH_OFFSET).ok_or(DecodeError::Truncated {
        len: frame.len(),
        needed: HEADER_LENGTH_OFFSET + HEADER_LENGTH_LEN,
    })?;
    if header_length != HEADER_LENGTH && header_length != SHORT_HEADER_LENGTH {
        return Err(DecodeError::HeaderLength(header_length));
    }
    // HL is 112 or 116 here, so this cannot overflow.
    let payload_offset = header_length as usize + PAYLOAD_LENGTH_LEN;
    if frame.len() < payload_offset {
        return Err(DecodeError::Truncated {
            len: frame.len(),
            needed: payload_offset,
        });
    }
    let (header, payload) = frame.split_at(payload_offset);

    let raw_type = &header[MESSAGE_TYPE_OFFSET..MESSAGE_TYPE_OFFSET + MESSAGE_TYPE_LEN];
    let message_type = parse_message_type(raw_type)?;
    let created_date = read_u64(header, CREATED_DATE_OFFSET).unwrap_or_default();
    if created_date == 0 && !message_type.is_publication() {
        return Err(DecodeError::ZeroCreatedDate);
    }
    let payload_type = if header_length == HEADER_LENGTH {
        PayloadType::from_u32(read_u32(header, PAYLOAD_TYPE_OFFSET).unwrap_or_default())
    } else {
        PayloadType::Unset
    };
    let mut id = [0u8; MESSAGE_ID_LEN];
    id.copy_from_slice(&header[MESSAGE_ID_OFFSET..MESSAGE_ID_OFFSET + MESSAGE_ID_LEN]);
    let mut digest = [0u8; PAYLOAD_DIGEST_LEN];
    digest.copy_from_slice(
        &header[PAYLOAD_DIGEST_OFFSET..PAYLOAD_DIGEST_OFFSET + PAYLOAD_DIGEST_LEN],
    );

    Ok(Decoded {
        message: ClientMessage {
            message_type,
            schema_version: read_u32(header, SCHEMA_VERSION_OFFSET).unwrap_or_default(),
            created_date,
            sequence_number: read_u64(header, SEQUENCE_NUMBER_OFFSET).unwrap_or_default() as i64,
            flags: read_u64(header, FLAGS_OFFSET).unwrap_or_default(),
            message_id: Uuid::from_bytes(swap_uuid_halves(id)),
            payload_type,
            // Copied on purpose: a slice of the WebSocket message would keep its whole read
            // buffer alive while the payload waits for a slow reader, memory the budget does not
            // count (docs/benchmark-analysis.md, session 17).
            payload: Bytes::copy_from_slice(payload),
        },
        header_length,
        declared_payload_length: read_u32(header, header_length as usize).unwrap_or_default(),
        digest,
    })
}

/// SHA-256 of the payload bytes as transmitted.
pub fn payload_digest(payload: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The docs/protocol.md §2.4 MessageId order: the second 8 bytes first. Its own inverse.
pub fn swap_uuid_halves(bytes: [u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&bytes[8..]);
    out[8..].copy_from_slice(&bytes[..8]);
    out
}

fn parse_message_type(raw: &[u8]) -> Result<MessageType, DecodeError> {
    let trimmed_nul = trim_bytes(raw, |b| b == 0);
    let trimmed = trim_bytes(trimmed_nul, |b| b.is_ascii_whitespace());
    if trimmed.is_empty() {
        return Err(DecodeError::EmptyMessageType);
    }
    if !trimmed.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(DecodeError::MessageTypeNotAscii);
    }
    let text = std::str::from_utf8(trimmed).map_err(|_| DecodeError::MessageTypeNotAscii)?;
    Ok(MessageType::parse(text))
}

fn trim_bytes(bytes: &[u8], strip: impl Fn(u8) -> bool) -> &[u8] {
    let start = bytes.iter().position(|b| !strip(*b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !strip(*b))
        .map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}

fn read_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(offset..offset.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

fn read_u64(buf: &[u8], offset: usize) -> Option<u64> {
    let bytes: [u8; 8] = buf.get(offset..offset.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn layout_offsets_match_section_2_1() {
        assert_eq!(MESSAGE_TYPE_OFFSET, 4);
        assert_eq!(SCHEMA_VERSION_OFFSET, 36);
        assert_eq!(CREATED_DATE_OFFSET, 40);
        assert_eq!(SEQUENCE_NUMBER_OFFSET, 48);
        assert_eq!(FLAGS_OFFSET, 56);
        assert_eq!(MESSAGE_ID_OFFSET, 64);
        assert_eq!(PAYLOAD_DIGEST_OFFSET, 80);
        assert_eq!(PAYLOAD_TYPE_OFFSET, 112);
        assert_eq!(PAYLOAD_LENGTH_OFFSET, 116);
        assert_eq!(PAYLOAD_OFFSET, 120);
        assert_eq!(HEADER_LENGTH, 116);
    }

    /// Hand-built golden frame: input_stream_data, seq 5, payload "hi".
    /// SHA-256("hi") = 8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4.
    #[test]
    fn golden_input_stream_data() {
        let message = ClientMessage {
            message_type: MessageType::InputStreamData,
            schema_version: 1,
            created_date: 0x0000_0190_0000_0001,
            sequence_number: 5,
            flags: 0,
            message_id: Uuid::parse_str("812ef34f-87bd-449e-a3de-282f478ba6e6").unwrap(),
            payload_type: PayloadType::Output,
            payload: Bytes::from_static(b"hi"),
        };
        let expected = hex(concat!(
            "00000074",
            // "input_stream_data" then 15 spaces
            "696e7075745f73747265616d5f64617461",
            "202020202020202020202020202020",
            "00000001",
            "0000019000000001",
            "0000000000000005",
            "0000000000000000",
            // wire order of the GIM example: a3de282f-478b-a6e6-812e-f34f87bd449e
            "a3de282f478ba6e6812ef34f87bd449e",
            "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4",
            "00000001",
            "00000002",
            "6869",
        ));
        let bytes = message.to_bytes();
        assert_eq!(bytes.as_ref(), expected.as_slice());
        let decoded = decode(&expected).unwrap();
        assert_eq!(decoded.message, message);
        assert!(decoded.digest_matches());
        assert!(decoded.payload_length_matches());
        assert_eq!(decoded.header_length, 116);
    }

    /// Empty payload: the digest is SHA-256 of zero bytes (docs/protocol.md §2.5).
    #[test]
    fn golden_empty_payload_digest() {
        let message = ClientMessage {
            message_type: MessageType::Acknowledge,
            schema_version: 1,
            created_date: 1,
            sequence_number: 0,
            flags: FLAG_SYN | FLAG_FIN,
            message_id: Uuid::nil(),
            payload_type: PayloadType::Unset,
            payload: Bytes::new(),
        };
        let bytes = message.to_bytes();
        assert_eq!(bytes.len(), 120);
        assert_eq!(
            &bytes[80..112],
            hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855").as_slice()
        );
        assert_eq!(&bytes[4..15], b"acknowledge");
        assert!(bytes[15..36].iter().all(|b| *b == b' '));
        assert_eq!(&bytes[56..64], &[0, 0, 0, 0, 0, 0, 0, 3]);
    }

    /// The GIM worked example of the half swap (docs/protocol.md §2.4).
    #[test]
    fn uuid_half_swap_matches_worked_example() {
        let wire = Uuid::parse_str("a3de282f-478b-a6e6-812e-f34f87bd449e").unwrap();
        let logical = Uuid::from_bytes(swap_uuid_halves(*wire.as_bytes()));
        assert_eq!(
            logical.hyphenated().to_string(),
            "812ef34f-87bd-449e-a3de-282f478ba6e6"
        );
    }

    /// MGS's channel_closed as SSC/GIM describe it: HL 112, NUL padding, PayloadLength at 112.
    #[test]
    fn short_header_channel_closed_is_read() {
        let payload = br#"{"Output":"bye"}"#;
        let mut frame = Vec::new();
        frame.extend_from_slice(&112u32.to_be_bytes());
        let mut t = [0u8; 32];
        t[..14].copy_from_slice(b"channel_closed");
        frame.extend_from_slice(&t);
        frame.extend_from_slice(&1u32.to_be_bytes());
        frame.extend_from_slice(&7u64.to_be_bytes());
        frame.extend_from_slice(&0i64.to_be_bytes());
        frame.extend_from_slice(&0u64.to_be_bytes());
        frame.extend_from_slice(&[0u8; 16]);
        frame.extend_from_slice(&payload_digest(payload));
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        let decoded = decode(&frame).unwrap();
        assert_eq!(decoded.message.message_type, MessageType::ChannelClosed);
        assert_eq!(decoded.message.payload_type, PayloadType::Unset);
        assert_eq!(decoded.message.payload.as_ref(), payload);
        assert!(decoded.payload_length_matches());
    }

    #[test]
    fn publication_skips_created_date_check() {
        let mut frame = ClientMessage {
            message_type: MessageType::StartPublication,
            schema_version: 1,
            created_date: 0,
            sequence_number: 0,
            flags: 0,
            message_id: Uuid::nil(),
            payload_type: PayloadType::Unset,
            payload: Bytes::new(),
        }
        .to_bytes()
        .to_vec();
        assert!(decode(&frame).is_ok());
        frame[4..21].copy_from_slice(b"output_stream_dat");
        assert_eq!(decode(&frame), Err(DecodeError::ZeroCreatedDate));
    }

    #[test]
    fn flag_payload_round_trip() {
        assert_eq!(
            PortFlag::TerminateSession.to_payload().as_ref(),
            &[0, 0, 0, 2]
        );
        assert_eq!(
            PortFlag::from_payload(&[0, 0, 0, 3]),
            Some(PortFlag::ConnectToPortError)
        );
        assert_eq!(PortFlag::from_payload(&[0, 3]), None);
    }

    fn arb_message_type() -> impl Strategy<Value = MessageType> {
        prop_oneof![
            Just(MessageType::InputStreamData),
            Just(MessageType::OutputStreamData),
            Just(MessageType::Acknowledge),
            Just(MessageType::ChannelClosed),
            Just(MessageType::StartPublication),
            Just(MessageType::PausePublication),
            Just(MessageType::AgentSessionState),
            "[a-z_]{1,32}".prop_map(|s| MessageType::parse(&s)),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(
            message_type in arb_message_type(),
            created_date in 1u64..,
            sequence_number in any::<i64>(),
            flags in any::<u64>(),
            id in any::<u128>(),
            payload_type in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let message = ClientMessage {
                message_type,
                schema_version: 1,
                created_date,
                sequence_number,
                flags,
                message_id: Uuid::from_u128(id),
                payload_type: PayloadType::from_u32(payload_type),
                payload: Bytes::from(payload),
            };
            let decoded = decode(&message.to_bytes()).unwrap();
            prop_assert!(decoded.digest_matches());
            prop_assert!(decoded.payload_length_matches());
            prop_assert_eq!(decoded.message, message);
        }

        #[test]
        fn decode_is_total(frame in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&frame);
        }

        #[test]
        fn decode_is_total_near_valid_headers(
            hl in prop_oneof![Just(112u32), Just(116u32), any::<u32>()],
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut frame = hl.to_be_bytes().to_vec();
            frame.extend_from_slice(&rest);
            if let Ok(d) = decode(&frame) {
                prop_assert_eq!(d.message.payload.len(), frame.len() - hl as usize - 4);
            }
        }
    }
}
