//! The local connections a tunnel carries, polled by the tunnel's own task: no task and no
//! channel per connection. Each open connection is read when the driver has room for its bytes
//! (taking turns, so one busy stream does not starve the others), and written from a queue of
//! what the instance sent, in order, flushed whenever the queue runs dry. A connection that
//! stops reading (its client's end-of-file, the stream closed by the agent, the session ended)
//! is *closing*: it writes out what it holds, then shuts its write side down and is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;
use tracing::warn;

/// A local connection's first read room (it grows to the read size under load).
const MIN_READ_ROOM: usize = 4 * 1024;
/// Queued chunks handed to one vectored write.
const WRITE_SLICES: usize = 16;

/// What polling the local connections found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LocalEvent {
    /// Bytes read from an open connection.
    Data(u32, Bytes),
    /// An open connection's read side ended (end-of-file or an error): it reads no more.
    Eof(u32),
    /// Writing to an open connection failed: its client has gone. What it held is dropped, and
    /// it is neither read nor written any more.
    Gone(u32),
    /// Queued bytes were written out: room for more.
    Wrote,
}

struct Conn<L> {
    io: Pin<Box<L>>,
    /// What the instance sent and the connection has not taken yet.
    queue: VecDeque<Bytes>,
    /// Bytes were written since the last flush.
    unflushed: bool,
    /// The read side ended.
    read_done: bool,
    /// How much the next read may take (grows while reads fill it).
    read_room: usize,
    buf: BytesMut,
}

/// Why a connection's writes stopped.
struct WriteFailed;

impl<L: AsyncWrite> Conn<L> {
    /// Writes the queue out until the connection takes no more; returns the bytes written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Result<usize, WriteFailed> {
        let mut written = 0;
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let count = self.queue.len().min(WRITE_SLICES);
            for (slice, chunk) in slices.iter_mut().zip(&self.queue) {
                *slice = IoSlice::new(chunk);
            }
            match self.io.as_mut().poll_write_vectored(cx, &slices[..count]) {
                Poll::Pending => break,
                Poll::Ready(Ok(0) | Err(_)) => return Err(WriteFailed),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    self.unflushed = true;
                    self.consume(n);
                }
            }
        }
        // Buffered writers (standard output is line-buffered) hold binary data until a flush;
        // flush whenever the queue runs dry (a no-op on sockets).
        if self.queue.is_empty() && self.unflushed {
            match self.io.as_mut().poll_flush(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(_)) => return Err(WriteFailed),
            }
        }
        Ok(written)
    }
}

impl<L> Conn<L> {
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }

    fn queued(&self) -> usize {
        self.queue.iter().map(Bytes::len).sum()
    }
}

impl<L: AsyncRead> Conn<L> {
    /// Reads at most `limit` bytes.
    fn poll_read_some(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<Option<Bytes>> {
        let room = self.read_room.min(limit);
        if self.buf.capacity() < room {
            self.buf.reserve(room);
        }
        // Reads land in spare capacity and leave as `Bytes` without a copy or a memset.
        let read = ready!(poll_read_buf(
            self.io.as_mut(),
            cx,
            &mut (&mut self.buf).limit(room)
        ));
        Poll::Ready(match read {
            Ok(n) if n > 0 => Some(self.buf.split().freeze()),
            _ => None,
        })
    }
}

/// The open and closing local connections of one tunnel, and what they hold.
pub(super) struct Locals<L> {
    open: BTreeMap<u32, Conn<L>>,
    closing: Vec<Conn<L>>,
    /// Largest read.
    read_size: usize,
    /// Chunks queued toward one connection before the driver stops handing it more.
    write_queue: usize,
    /// Bytes queued toward all connections, open and closing.
    queued: usize,
    /// Reads take turns: the next read starts after this connection.
    last_read: u32,
    /// The connection whose queue a delivery filled last. Only a delivery fills a queue, and
    /// none comes while that one is full, so no other queue can be full meanwhile.
    filled: Option<u32>,
}

impl<L> Locals<L> {
    pub(super) fn new(read_size: usize, write_queue: usize) -> Self {
        Self {
            open: BTreeMap::new(),
            closing: Vec::new(),
            read_size: read_size.max(1),
            write_queue: write_queue.max(1),
            queued: 0,
            last_read: 0,
            filled: None,
        }
    }

    pub(super) fn insert(&mut self, key: u32, io: L) {
        let conn = Conn {
            io: Box::pin(io),
            queue: VecDeque::new(),
            unflushed: false,
            read_done: false,
            read_room: MIN_READ_ROOM.min(self.read_size),
            buf: BytesMut::new(),
        };
        if let Some(old) = self.open.insert(key, conn) {
            self.queued -= old.queued();
        }
    }

    /// Queues `data` toward connection `key`; false when no such connection is open.
    pub(super) fn deliver(&mut self, key: u32, data: Bytes) -> bool {
        let Some(conn) = self.open.get_mut(&key) else {
            return false;
        };
        self.queued += data.len();
        conn.queue.push_back(data);
        if conn.queue.len() >= self.write_queue {
            self.filled = Some(key);
        }
        true
    }

    /// True while some open connection holds a full queue: the driver hands out no more.
    pub(super) fn backlogged(&self) -> bool {
        let full = |conn: &Conn<L>| conn.queue.len() >= self.write_queue;
        (self.filled).is_some_and(|key| self.open.get(&key).is_some_and(full))
    }

    pub(super) fn is_open(&self, key: u32) -> bool {
        self.open.contains_key(&key)
    }

    pub(super) fn no_open(&self) -> bool {
        self.open.is_empty()
    }

    /// The open connection with the lowest key (basic mode has at most one).
    pub(super) fn first_open(&self) -> Option<u32> {
        self.open.keys().next().copied()
    }

    /// Bytes queued toward the connections and not yet written out.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }

    /// Connection `key` reads no more: it writes out what it holds, then shuts down. False
    /// when no such connection was open.
    pub(super) fn close(&mut self, key: u32) -> bool {
        match self.open.remove(&key) {
            Some(conn) => {
                self.closing.push(conn);
                true
            }
            None => false,
        }
    }

    /// Every open connection closes (the session ended).
    pub(super) fn close_all(&mut self) {
        let open = std::mem::take(&mut self.open);
        self.closing.extend(open.into_values());
    }

    /// Drops connection `key` and what it holds, now.
    pub(super) fn drop_conn(&mut self, key: u32) {
        if let Some(conn) = self.open.remove(&key) {
            self.queued -= conn.queued();
        }
    }

    /// Drops the closing connections that have not written out what they hold.
    fn abandon_closing(&mut self) {
        for conn in self.closing.drain(..) {
            self.queued -= conn.queued();
        }
    }

    /// True when there is nothing to poll: no connection open or closing.
    pub(super) fn is_idle(&self) -> bool {
        self.open.is_empty() && self.closing.is_empty()
    }
}

impl<L> Locals<L>
where
    L: AsyncRead + AsyncWrite,
{
    /// Writes out what the connections hold, shuts closing ones down once written out, and
    /// reads one chunk of at most `read_limit` bytes from the next open connection that has one.
    pub(super) fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        read_limit: usize,
    ) -> Poll<LocalEvent> {
        let mut wrote = false;
        let mut gone = None;
        for (&key, conn) in &mut self.open {
            match conn.poll_write_out(cx) {
                Ok(n) => {
                    self.queued -= n;
                    wrote |= n > 0;
                }
                Err(WriteFailed) => {
                    gone = Some(key);
                    break;
                }
            }
        }
        if let Some(key) = gone {
            // Nothing more is written or read; the driver closes or drops it.
            if let Some(conn) = self.open.get_mut(&key) {
                self.queued -= conn.queued();
                conn.queue.clear();
                conn.unflushed = false;
                conn.read_done = true;
            }
            return Poll::Ready(LocalEvent::Gone(key));
        }
        wrote |= self.poll_closing_conns(cx);
        if wrote {
            return Poll::Ready(LocalEvent::Wrote);
        }
        if read_limit == 0 {
            return Poll::Pending;
        }
        // Take turns: start after the connection read last.
        let start = self.last_read.wrapping_add(1);
        let (read_size, open) = (self.read_size, &mut self.open);
        let read = read_first(open.range_mut(start..), cx, read_limit, read_size)
            .or_else(|| read_first(open.range_mut(..start), cx, read_limit, read_size));
        match read {
            Some(event) => {
                if let LocalEvent::Data(key, _) | LocalEvent::Eof(key) = event {
                    self.last_read = key;
                }
                Poll::Ready(event)
            }
            None => Poll::Pending,
        }
    }

    /// Drives the closing connections: writes, then shutdowns. True when bytes went out.
    fn poll_closing_conns(&mut self, cx: &mut Context<'_>) -> bool {
        let mut wrote = false;
        let mut queued = self.queued;
        self.closing.retain_mut(|conn| {
            let done = match conn.poll_write_out(cx) {
                Ok(n) => {
                    queued -= n;
                    wrote |= n > 0;
                    conn.queue.is_empty()
                        && !conn.unflushed
                        && conn.io.as_mut().poll_shutdown(cx).is_ready()
                }
                Err(WriteFailed) => {
                    queued -= conn.queued();
                    true
                }
            };
            !done
        });
        self.queued = queued;
        wrote
    }

    /// The session ended: every connection closes, and has up to `grace` to write out what the
    /// instance sent it (a caller that exits right after the tunnel, such as `proxy`, must not
    /// cut the last bytes). Then the ones still writing are cut: they close now rather than
    /// whenever their clients read the rest.
    pub(super) async fn finish(&mut self, grace: Duration) {
        self.close_all();
        let closed = std::future::poll_fn(|cx| {
            self.poll_closing_conns(cx);
            if self.closing.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        if tokio::time::timeout(grace, closed).await.is_err() {
            warn!("a local connection did not take the session's last bytes in time");
            self.abandon_closing();
        }
    }
}

/// Reads from the first of `conns` that has bytes (or its end) for at most `limit` bytes.
fn read_first<'c, L: AsyncRead + 'c>(
    conns: impl Iterator<Item = (&'c u32, &'c mut Conn<L>)>,
    cx: &mut Context<'_>,
    limit: usize,
    read_size: usize,
) -> Option<LocalEvent> {
    for (&key, conn) in conns {
        if conn.read_done {
            continue;
        }
        let Poll::Ready(read) = conn.poll_read_some(cx, limit) else {
            continue;
        };
        return Some(match read {
            Some(data) => {
                if data.len() == conn.read_room {
                    conn.read_room = (conn.read_room * 2).min(read_size);
                }
                LocalEvent::Data(key, data)
            }
            None => {
                conn.read_done = true;
                LocalEvent::Eof(key)
            }
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    fn locals(read_size: usize, write_queue: usize) -> Locals<DuplexStream> {
        Locals::new(read_size, write_queue)
    }

    /// Polls until an event other than `Wrote`, or nothing more happens.
    async fn next_event(
        locals: &mut Locals<DuplexStream>,
        read_limit: usize,
    ) -> Option<LocalEvent> {
        loop {
            match poll_fn(|cx| locals.poll_event(cx, read_limit)).now_or_never()? {
                LocalEvent::Wrote => continue,
                event => return Some(event),
            }
        }
    }

    #[tokio::test]
    async fn queued_bytes_go_out_in_order_and_are_counted_until_written() {
        let mut locals = locals(1024, 4);
        let (ours, mut client) = duplex(64 * 1024);
        locals.insert(1, ours);
        assert!(locals.deliver(1, Bytes::from_static(b"hello ")));
        assert!(locals.deliver(1, Bytes::from_static(b"world")));
        assert!(!locals.deliver(2, Bytes::from_static(b"nobody")));
        assert_eq!(locals.queued(), 11);
        assert_eq!(
            poll_fn(|cx| locals.poll_event(cx, 0)).await,
            LocalEvent::Wrote
        );
        assert_eq!(locals.queued(), 0);
        let mut got = [0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_connection_that_does_not_read_backlogs_and_keeps_every_byte() {
        let mut locals = locals(1024, 2);
        // Room for 8 bytes in the pipe: the rest stays queued.
        let (ours, mut client) = duplex(8);
        locals.insert(1, ours);
        for chunk in [&b"0123"[..], b"4567", b"89ab", b"cdef"] {
            locals.deliver(1, Bytes::copy_from_slice(chunk));
        }
        assert!(locals.backlogged());
        assert_eq!(next_event(&mut locals, 0).await, None);
        assert_eq!(locals.queued(), 8);
        assert!(locals.backlogged(), "two chunks still queued");
        let mut got = vec![0u8; 16];
        let reading = tokio::spawn(async move {
            client.read_exact(&mut got).await.unwrap();
            got
        });
        while locals.queued() > 0 {
            poll_fn(|cx| locals.poll_event(cx, 0)).await;
        }
        assert!(!locals.backlogged());
        assert_eq!(reading.await.unwrap(), b"0123456789abcdef");
    }

    #[tokio::test]
    async fn reads_take_turns_and_stay_within_the_limit() {
        let mut locals = locals(1024, 4);
        let (a, mut client_a) = duplex(1024);
        let (b, mut client_b) = duplex(1024);
        locals.insert(1, a);
        locals.insert(2, b);
        client_a.write_all(&[b'a'; 300]).await.unwrap();
        client_b.write_all(&[b'b'; 300]).await.unwrap();
        let mut order = Vec::new();
        for _ in 0..4 {
            match next_event(&mut locals, 100).await {
                Some(LocalEvent::Data(key, data)) => {
                    assert!(data.len() <= 100, "{}", data.len());
                    order.push(key);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(order, [1, 2, 1, 2]);
        // No read credit: nothing is read.
        assert_eq!(next_event(&mut locals, 0).await, None);
    }

    #[tokio::test]
    async fn an_end_of_file_is_reported_once() {
        let mut locals = locals(1024, 4);
        let (ours, client) = duplex(1024);
        locals.insert(7, ours);
        let (_read, mut write) = tokio::io::split(client);
        write.shutdown().await.unwrap();
        assert_eq!(
            next_event(&mut locals, 1024).await,
            Some(LocalEvent::Eof(7))
        );
        assert_eq!(next_event(&mut locals, 1024).await, None);
        assert!(
            locals.is_open(7),
            "still written to until the driver closes it"
        );
    }

    #[tokio::test]
    async fn a_client_that_left_is_gone_and_what_it_held_is_no_longer_counted() {
        let mut locals = locals(1024, 4);
        let (ours, client) = duplex(1024);
        locals.insert(3, ours);
        drop(client);
        locals.deliver(3, Bytes::from_static(b"for nobody"));
        assert_eq!(next_event(&mut locals, 0).await, Some(LocalEvent::Gone(3)));
        assert_eq!(locals.queued(), 0);
        assert_eq!(
            next_event(&mut locals, 1024).await,
            None,
            "neither read nor written"
        );
        assert!(locals.close(3));
        locals.finish(Duration::from_secs(1)).await;
        assert!(locals.is_idle());
    }

    #[tokio::test]
    async fn a_closing_connection_writes_out_then_shuts_down() {
        let mut locals = locals(1024, 4);
        let (ours, mut client) = duplex(1024);
        locals.insert(1, ours);
        locals.deliver(1, Bytes::from_static(b"last words"));
        assert!(locals.close(1));
        assert!(locals.no_open());
        locals.finish(Duration::from_secs(5)).await;
        assert!(locals.is_idle());
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_cut_after_the_grace() {
        let mut locals = locals(1024, 4);
        let (ours, _client) = duplex(4);
        locals.insert(1, ours);
        locals.deliver(1, Bytes::from_static(b"more than the pipe holds"));
        let started = tokio::time::Instant::now();
        locals.finish(Duration::from_secs(10)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(locals.is_idle());
        assert_eq!(locals.queued(), 0);
    }
}
