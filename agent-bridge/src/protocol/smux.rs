//! smux protocol version 1, client side (docs/protocol.md §5.4, §5.5), as the agent's
//! xtaci/smux server expects it for `LocalPortForwarding`.
//!
//! Owns the 8-byte frame codec (`ver u8 | cmd u8 | length u16 LE | streamId u32 LE`), the
//! stream table (client ids 3, 5, 7, ...), and the optional NOP keepalive. The smux byte stream
//! rides in Output payloads with no alignment, so [`decode_frame`] returns `Ok(None)` until a
//! whole frame has arrived. No I/O, no clock: timers take `now`.
//!
//! ```text
//!   open -> SYN --> [open] --write--> PSH ...
//!                    |  \--close (local EOF)--> FIN, forgotten
//!                    \---- FIN from agent ----> StreamClosed event, forgotten
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version byte both sides use (v2 is never negotiated).
pub const VERSION: u8 = 1;
/// Frame header length.
pub const HEADER_LEN: usize = 8;
/// Largest data chunk per PSH frame we write: below the reference's 32,768
/// (`DefaultConfig().MaxFrameSize`), so that a frame with its header fills exactly one
/// [`super::session::DEFAULT_CHUNK_SIZE`] message instead of spilling 8 bytes into a second.
pub const MAX_FRAME_DATA: usize = 32 * 1024 - HEADER_LEN;
/// NOP interval when keepalive is on (`DefaultConfig().KeepAliveInterval`).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Close when nothing arrived for this long, keepalive on (`DefaultConfig().KeepAliveTimeout`).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// An smux stream id (odd, chosen by this client).
pub type StreamId = u32;

/// smux commands valid in version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0: open a stream.
    Syn,
    /// 1: close a stream (EOF).
    Fin,
    /// 2: data.
    Psh,
    /// 3: keepalive, stream id 0.
    Nop,
}

impl Command {
    fn to_u8(self) -> u8 {
        match self {
            Self::Syn => 0,
            Self::Fin => 1,
            Self::Psh => 2,
            Self::Nop => 3,
        }
    }
}

/// One smux frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command.
    pub command: Command,
    /// Stream id (0 for NOP).
    pub stream_id: StreamId,
    /// Data (PSH only; at most 65535 bytes).
    pub data: Bytes,
}

/// A fatal smux protocol error: the whole session ends (xtaci `recvLoop` semantics).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The version byte was not 1.
    #[error("smux frame with version {0}, expected 1")]
    Version(u8),
    /// An unknown command (including v2's UPD).
    #[error("smux frame with unknown command {0}")]
    Command(u8),
}

impl Frame {
    /// Writes the frame. `data` longer than 65535 bytes is cut (callers split at
    /// [`MAX_FRAME_DATA`]).
    pub fn encode(&self, buf: &mut impl BufMut) {
        let len = self.data.len().min(usize::from(u16::MAX));
        buf.put_u8(VERSION);
        buf.put_u8(self.command.to_u8());
        buf.put_u16_le(len as u16);
        buf.put_u32_le(self.stream_id);
        buf.put_slice(&self.data[..len]);
    }
}

/// Takes one whole frame off the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, MuxError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let version = buf[0];
    if version != VERSION {
        return Err(MuxError::Version(version));
    }
    let command = match buf[1] {
        0 => Command::Syn,
        1 => Command::Fin,
        2 => Command::Psh,
        3 => Command::Nop,
        other => return Err(MuxError::Command(other)),
    };
    let len = usize::from(u16::from_le_bytes([buf[2], buf[3]]));
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let stream_id = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    buf.advance(HEADER_LEN);
    let data = buf.split_to(len).freeze();
    Ok(Some(Frame {
        command,
        stream_id,
        data,
    }))
}

/// Why a stream ended, as reported to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCloseReason {
    /// The agent closed it (its destination connection ended).
    RemoteClosed,
    /// The agent sent ConnectToPortError and closed this stream before any data: it could not
    /// dial the destination.
    ConnectFailed,
    /// The session ended.
    SessionClosed,
}

/// Something the mux layer reports to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MuxEvent {
    Data(StreamId, Bytes),
    Closed(StreamId, StreamCloseReason),
}

#[derive(Debug)]
struct StreamState {
    /// Any data seen: a connect error cannot concern this stream any more.
    received_data: bool,
}

#[derive(Debug)]
struct Keepalive {
    next_nop: Instant,
    next_check: Instant,
    heard: bool,
}

/// The smux client: stream table, inbound reassembly, keepalive timers.
#[derive(Debug)]
pub(crate) struct MuxClient {
    /// Last id used; starts at 1 so the first stream is 3 (xtaci client).
    last_id: u32,
    streams: BTreeMap<StreamId, StreamState>,
    max_streams: usize,
    inbound: BytesMut,
    keepalive: Option<Keepalive>,
    /// ConnectToPortError flags not yet matched to a FIN.
    pending_connect_errors: u32,
}

/// The stream could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    TooMany,
    IdsExhausted,
}

impl MuxClient {
    pub(crate) fn new(now: Instant, keepalive: bool, max_streams: usize) -> Self {
        Self {
            last_id: 1,
            streams: BTreeMap::new(),
            max_streams,
            inbound: BytesMut::new(),
            keepalive: keepalive.then(|| Keepalive {
                next_nop: now + KEEPALIVE_INTERVAL,
                next_check: now + KEEPALIVE_TIMEOUT,
                heard: false,
            }),
            pending_connect_errors: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn keepalive_enabled(&self) -> bool {
        self.keepalive.is_some()
    }

    pub(crate) fn open(&mut self, out: &mut BytesMut) -> Result<StreamId, OpenError> {
        if self.streams.len() >= self.max_streams {
            return Err(OpenError::TooMany);
        }
        let id = self.last_id.checked_add(2).ok_or(OpenError::IdsExhausted)?;
        self.last_id = id;
        self.streams.insert(
            id,
            StreamState {
                received_data: false,
            },
        );
        Frame {
            command: Command::Syn,
            stream_id: id,
            data: Bytes::new(),
        }
        .encode(out);
        Ok(id)
    }

    pub(crate) fn is_open(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Writes `data` as PSH frames of at most [`MAX_FRAME_DATA`] bytes.
    pub(crate) fn write(&mut self, id: StreamId, data: &[u8], out: &mut BytesMut) {
        for chunk in data.chunks(MAX_FRAME_DATA) {
            Frame {
                command: Command::Psh,
                stream_id: id,
                data: Bytes::copy_from_slice(chunk),
            }
            .encode(out);
        }
    }

    /// Wire bytes needed to carry `n` data bytes.
    pub(crate) fn framed_len(n: usize) -> usize {
        n + HEADER_LEN * n.div_ceil(MAX_FRAME_DATA).max(1)
    }

    /// Data bytes that fit in `wire` bytes of framing.
    pub(crate) fn data_fitting(wire: usize) -> usize {
        let frames = wire.div_ceil(MAX_FRAME_DATA + HEADER_LEN).max(1);
        wire.saturating_sub(frames * HEADER_LEN)
    }

    /// Local close: FIN, and the stream is forgotten (later frames for it are discarded).
    pub(crate) fn close(&mut self, id: StreamId, out: &mut BytesMut) -> bool {
        if self.streams.remove(&id).is_none() {
            return false;
        }
        Frame {
            command: Command::Fin,
            stream_id: id,
            data: Bytes::new(),
        }
        .encode(out);
        true
    }

    pub(crate) fn connect_error(&mut self) {
        // Bounded by the number of streams that could still fail.
        if (self.pending_connect_errors as usize) < self.streams.len() {
            self.pending_connect_errors += 1;
        }
    }

    /// Feeds Output payload bytes; reports stream data and closes.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
        events: &mut Vec<MuxEvent>,
    ) -> Result<(), MuxError> {
        self.inbound.extend_from_slice(bytes);
        while let Some(frame) = decode_frame(&mut self.inbound)? {
            if let Some(k) = &mut self.keepalive {
                k.heard = true;
            }
            match frame.command {
                Command::Psh => {
                    if let Some(stream) = self.streams.get_mut(&frame.stream_id)
                        && !frame.data.is_empty()
                    {
                        stream.received_data = true;
                        events.push(MuxEvent::Data(frame.stream_id, frame.data));
                    }
                }
                Command::Fin => {
                    if let Some(stream) = self.streams.remove(&frame.stream_id) {
                        let reason = if !stream.received_data && self.pending_connect_errors > 0 {
                            self.pending_connect_errors -= 1;
                            StreamCloseReason::ConnectFailed
                        } else {
                            StreamCloseReason::RemoteClosed
                        };
                        events.push(MuxEvent::Closed(frame.stream_id, reason));
                    }
                }
                // The agent never opens streams; a SYN from it is ignored (duplicate SYN rule).
                Command::Syn | Command::Nop => {}
            }
        }
        Ok(())
    }

    /// Every open stream ends with the session.
    pub(crate) fn close_all(&mut self, events: &mut Vec<MuxEvent>) {
        for id in std::mem::take(&mut self.streams).into_keys() {
            events.push(MuxEvent::Closed(id, StreamCloseReason::SessionClosed));
        }
    }

    /// A new transport: give the peer a full keepalive period before judging it silent.
    pub(crate) fn reset_timers(&mut self, now: Instant) {
        if let Some(k) = &mut self.keepalive {
            k.heard = false;
            k.next_check = now + KEEPALIVE_TIMEOUT;
            k.next_nop = k.next_nop.min(now + KEEPALIVE_INTERVAL);
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.keepalive
            .as_ref()
            .map(|k| k.next_nop.min(k.next_check))
    }

    /// Runs keepalive timers: writes NOPs into `out`; `Err(())` when the peer went silent.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut BytesMut) -> Result<(), ()> {
        let Some(k) = &mut self.keepalive else {
            return Ok(());
        };
        if now >= k.next_check {
            if !k.heard {
                return Err(());
            }
            k.heard = false;
            k.next_check = now + KEEPALIVE_TIMEOUT;
        }
        if now >= k.next_nop {
            Frame {
                command: Command::Nop,
                stream_id: 0,
                data: Bytes::new(),
            }
            .encode(out);
            k.next_nop = now + KEEPALIVE_INTERVAL;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frames() {
        let mut out = BytesMut::new();
        Frame {
            command: Command::Psh,
            stream_id: 3,
            data: Bytes::from_static(b"abc"),
        }
        .encode(&mut out);
        assert_eq!(out.as_ref(), &[1, 2, 3, 0, 3, 0, 0, 0, b'a', b'b', b'c']);
        let mut out = BytesMut::new();
        Frame {
            command: Command::Nop,
            stream_id: 0,
            data: Bytes::new(),
        }
        .encode(&mut out);
        assert_eq!(out.as_ref(), &[1, 3, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn decode_waits_for_whole_frame() {
        let wire = [
            1u8, 2, 3, 0, 5, 0, 0, 0, b'x', b'y', b'z', 1, 1, 0, 0, 5, 0, 0, 0,
        ];
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = decode_frame(&mut buf).unwrap();
            if i == 10 {
                let f = got.unwrap();
                assert_eq!(f.command, Command::Psh);
                assert_eq!(f.stream_id, 5);
                assert_eq!(f.data.as_ref(), b"xyz");
            } else if i == 18 {
                assert_eq!(got.unwrap().command, Command::Fin);
            } else {
                assert_eq!(got, None, "byte {i}");
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_version_and_command_are_fatal() {
        let mut buf = BytesMut::from(&[2u8, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buf), Err(MuxError::Version(2)));
        let mut buf = BytesMut::from(&[1u8, 4, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buf), Err(MuxError::Command(4)));
    }

    #[test]
    fn stream_ids_start_at_three_and_step_by_two() {
        let mut m = MuxClient::new(crate::protocol::tests::origin(), false, 8);
        let mut out = BytesMut::new();
        assert_eq!(m.open(&mut out), Ok(3));
        assert_eq!(m.open(&mut out), Ok(5));
        assert_eq!(
            out.as_ref(),
            &[1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0]
        );
    }

    #[test]
    fn stream_limit_is_enforced() {
        let mut m = MuxClient::new(crate::protocol::tests::origin(), false, 1);
        let mut out = BytesMut::new();
        assert_eq!(m.open(&mut out), Ok(3));
        assert_eq!(m.open(&mut out), Err(OpenError::TooMany));
        assert!(m.close(3, &mut out));
        assert_eq!(m.open(&mut out), Ok(5));
    }

    #[test]
    fn write_splits_at_max_frame() {
        let mut m = MuxClient::new(crate::protocol::tests::origin(), false, 8);
        let mut out = BytesMut::new();
        let data = vec![7u8; MAX_FRAME_DATA + 10];
        m.write(3, &data, &mut out);
        assert_eq!(out.len(), MuxClient::framed_len(data.len()));
        assert_eq!(out.len(), data.len() + 16);
        assert_eq!(MuxClient::data_fitting(MuxClient::framed_len(100)), 100);
    }

    #[test]
    fn connect_error_marks_the_stream_that_fins_before_data() {
        let mut m = MuxClient::new(crate::protocol::tests::origin(), false, 8);
        let mut out = BytesMut::new();
        let a = m.open(&mut out).unwrap();
        let b = m.open(&mut out).unwrap();
        let mut events = Vec::new();
        let mut wire = BytesMut::new();
        Frame {
            command: Command::Psh,
            stream_id: a,
            data: Bytes::from_static(b"hi"),
        }
        .encode(&mut wire);
        m.feed(&wire, &mut events).unwrap();
        m.connect_error();
        let mut wire = BytesMut::new();
        Frame {
            command: Command::Fin,
            stream_id: b,
            data: Bytes::new(),
        }
        .encode(&mut wire);
        Frame {
            command: Command::Fin,
            stream_id: a,
            data: Bytes::new(),
        }
        .encode(&mut wire);
        m.feed(&wire, &mut events).unwrap();
        assert_eq!(
            events,
            vec![
                MuxEvent::Data(a, Bytes::from_static(b"hi")),
                MuxEvent::Closed(b, StreamCloseReason::ConnectFailed),
                MuxEvent::Closed(a, StreamCloseReason::RemoteClosed),
            ]
        );
    }

    #[test]
    fn keepalive_sends_nops_and_detects_silence() {
        let t0 = crate::protocol::tests::origin();
        let mut m = MuxClient::new(t0, true, 8);
        let mut out = BytesMut::new();
        assert_eq!(m.poll_timeout(), Some(t0 + KEEPALIVE_INTERVAL));
        m.handle_timeout(t0 + KEEPALIVE_INTERVAL, &mut out).unwrap();
        assert_eq!(out.as_ref(), &[1, 3, 0, 0, 0, 0, 0, 0]);
        let mut events = Vec::new();
        m.feed(&[1, 3, 0, 0, 0, 0, 0, 0], &mut events).unwrap();
        assert!(m.handle_timeout(t0 + KEEPALIVE_TIMEOUT, &mut out).is_ok());
        assert!(
            m.handle_timeout(t0 + KEEPALIVE_TIMEOUT * 2, &mut out)
                .is_err()
        );
    }

    #[test]
    fn keepalive_off_has_no_timer() {
        let m = MuxClient::new(crate::protocol::tests::origin(), false, 8);
        assert_eq!(m.poll_timeout(), None);
        assert!(!m.keepalive_enabled());
    }
}
