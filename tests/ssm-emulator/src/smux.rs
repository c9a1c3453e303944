//! smux protocol version 1 framing (xtaci/smux, docs/protocol.md §5.5): the 8-byte frame
//! header, an incremental decoder over the byte stream carried in Output payloads, and the
//! checks a strict server applies to a client's frames.

/// The only version spoken on the data channel.
pub const VERSION: u8 = 1;
/// Header size: ver u8, cmd u8, length u16 LE, stream id u32 LE.
pub const HEADER_SIZE: usize = 8;
/// The payload of a UPD frame (consumed, unused, in version 1).
const UPD_SIZE: usize = 8;
/// Largest data block smux's default config writes.
pub const MAX_FRAME_SIZE: usize = 32768;

/// smux commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Open a stream.
    Syn,
    /// Close a stream (EOF).
    Fin,
    /// Data.
    Psh,
    /// Keepalive, stream id 0.
    Nop,
    /// Version 2's window update: 8 bytes (consumed, 4 bytes each), whatever the header's
    /// length says. xtaci v1.5.15 reads and ignores it in a version 1 session too.
    Upd,
}

impl Command {
    fn byte(self) -> u8 {
        match self {
            Self::Syn => 0,
            Self::Fin => 1,
            Self::Psh => 2,
            Self::Nop => 3,
            Self::Upd => 4,
        }
    }
}

/// One smux frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command.
    pub command: Command,
    /// Stream id (0 for NOP).
    pub stream_id: u32,
    /// Data (PSH only).
    pub data: Vec<u8>,
}

/// A fatal smux error: the whole smux session dies (xtaci `recvLoop` semantics).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmuxError {
    /// Version byte other than 1.
    #[error("smux version byte {0}, expected 1")]
    BadVersion(u8),
    /// Unknown command.
    #[error("smux command {0} is unknown")]
    BadCommand(u8),
    /// SYN, FIN or NOP with a non-zero length. xtaci reads no payload for them, so the agent
    /// would take the bytes that follow for the next header.
    #[error(
        "smux {command:?} for stream {stream_id} declares {length} bytes of payload: the agent \
         reads none for it and would take them for the next frame's header"
    )]
    ControlWithLength {
        /// The command.
        command: Command,
        /// Its stream.
        stream_id: u32,
        /// The length it declares.
        length: u16,
    },
}

impl Frame {
    /// A data frame.
    pub fn psh(stream_id: u32, data: Vec<u8>) -> Self {
        Self {
            command: Command::Psh,
            stream_id,
            data,
        }
    }

    /// A control frame without data.
    pub fn control(command: Command, stream_id: u32) -> Self {
        Self {
            command,
            stream_id,
            data: Vec::new(),
        }
    }

    /// Appends the encoded frame to `out`. Data longer than 65535 bytes is the caller's bug;
    /// it is truncated.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = self.data.len().min(u16::MAX as usize);
        out.push(VERSION);
        out.push(self.command.byte());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&self.stream_id.to_le_bytes());
        out.extend_from_slice(&self.data[..len]);
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + self.data.len());
        self.encode_into(&mut out);
        out
    }
}

/// Encodes `data` for `stream_id` as PSH frames of at most [`MAX_FRAME_SIZE`] bytes.
pub fn encode_data(stream_id: u32, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_FRAME_SIZE) {
        out.push(VERSION);
        out.push(Command::Psh.byte());
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.extend_from_slice(&stream_id.to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Incremental decoder: frames are not aligned to message boundaries.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Frame headers read so far: xtaci's receive loop counts a complete header (not any
    /// byte) as the peer's activity for its keepalive.
    headers_read: u64,
    /// The header of the incomplete frame held back is counted already.
    pending_header_counted: bool,
}

impl Decoder {
    /// Feeds bytes and returns every complete frame.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, SmuxError> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= HEADER_SIZE {
            let h = &self.buf[at..at + HEADER_SIZE];
            if h[0] != VERSION {
                return Err(SmuxError::BadVersion(h[0]));
            }
            let command = match h[1] {
                0 => Command::Syn,
                1 => Command::Fin,
                2 => Command::Psh,
                3 => Command::Nop,
                4 => Command::Upd,
                other => return Err(SmuxError::BadCommand(other)),
            };
            let length = u16::from_le_bytes([h[2], h[3]]);
            let stream_id = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            if !(at == 0 && self.pending_header_counted) {
                self.headers_read += 1;
            }
            let len = match command {
                Command::Psh => usize::from(length),
                Command::Upd => UPD_SIZE,
                Command::Syn | Command::Fin | Command::Nop if length == 0 => 0,
                Command::Syn | Command::Fin | Command::Nop => {
                    return Err(SmuxError::ControlWithLength {
                        command,
                        stream_id,
                        length,
                    });
                }
            };
            if self.buf.len() - at < HEADER_SIZE + len {
                self.buf.drain(..at);
                self.pending_header_counted = true;
                return Ok(frames);
            }
            let data = self.buf[at + HEADER_SIZE..at + HEADER_SIZE + len].to_vec();
            frames.push(Frame {
                command,
                stream_id,
                data,
            });
            at += HEADER_SIZE + len;
        }
        self.buf.drain(..at);
        self.pending_header_counted = false;
        Ok(frames)
    }

    /// How many frame headers have been read whole.
    pub fn headers_read(&self) -> u64 {
        self.headers_read
    }

    /// Bytes of an incomplete frame held back.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_read_once_whole_and_a_partial_one_is_not_read() {
        let mut wire = Vec::new();
        encode_data(3, &[7u8; 100], &mut wire);
        wire.extend(Frame::control(Command::Nop, 0).encode());
        let mut d = Decoder::default();
        // An empty push and half a header: nothing read (xtaci's keepalive sees no activity).
        assert!(d.push(&[]).expect("push").is_empty());
        assert!(d.push(&wire[..4]).expect("push").is_empty());
        assert_eq!(d.headers_read(), 0);
        // The header whole, its body not yet: read once, however the body arrives.
        assert!(d.push(&wire[4..20]).expect("push").is_empty());
        assert_eq!(d.headers_read(), 1);
        assert!(d.push(&wire[20..60]).expect("push").is_empty());
        assert_eq!(d.headers_read(), 1);
        // The rest: the PSH completes and the NOP's header is a second one.
        assert_eq!(d.push(&wire[60..]).expect("push").len(), 2);
        assert_eq!(d.headers_read(), 2);
    }

    #[test]
    fn frames_split_across_pushes_are_reassembled() {
        let mut wire = Frame::control(Command::Syn, 3).encode();
        encode_data(3, b"hello world", &mut wire);
        wire.extend(Frame::control(Command::Fin, 3).encode());
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for chunk in wire.chunks(5) {
            got.extend(d.push(chunk).expect("valid"));
        }
        assert_eq!(
            got,
            vec![
                Frame::control(Command::Syn, 3),
                Frame::psh(3, b"hello world".to_vec()),
                Frame::control(Command::Fin, 3)
            ]
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn header_is_little_endian() {
        let wire = Frame::psh(0x0102_0304, vec![9; 0x0105]).encode();
        assert_eq!(&wire[..8], &[1, 2, 0x05, 0x01, 0x04, 0x03, 0x02, 0x01]);
    }

    #[test]
    fn long_data_is_split_at_the_max_frame_size() {
        let mut wire = Vec::new();
        encode_data(5, &vec![7u8; MAX_FRAME_SIZE + 10], &mut wire);
        let frames = Decoder::default().push(&wire).expect("valid");
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].data.len(), MAX_FRAME_SIZE);
        assert_eq!(frames[1].data.len(), 10);
    }

    #[test]
    fn version_two_unknown_commands_and_control_payloads_are_fatal() {
        let mut d = Decoder::default();
        assert_eq!(
            d.push(&[2, 0, 0, 0, 3, 0, 0, 0]),
            Err(SmuxError::BadVersion(2))
        );
        let mut d = Decoder::default();
        assert_eq!(
            d.push(&[1, 5, 0, 0, 3, 0, 0, 0]),
            Err(SmuxError::BadCommand(5))
        );
        let mut d = Decoder::default();
        assert!(matches!(
            d.push(&[1, 0, 2, 0, 3, 0, 0, 0, 9, 9]),
            Err(SmuxError::ControlWithLength {
                length: 2,
                stream_id: 3,
                ..
            })
        ));
    }

    #[test]
    fn upd_is_read_as_eight_bytes_whatever_its_length_says() {
        let mut wire = vec![1, 4, 0, 0, 3, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        wire.extend(Frame::control(Command::Fin, 3).encode());
        let frames = Decoder::default().push(&wire).expect("valid");
        assert_eq!(frames[0].command, Command::Upd);
        assert_eq!(frames[0].data, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(frames[1], Frame::control(Command::Fin, 3));
    }
}
