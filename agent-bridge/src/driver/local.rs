//! The local connections a tunnel carries: each is a reader task that hands the driver what it
//! reads, and a writer task that writes out what the instance sent, in order, then shuts the
//! connection down.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

/// A local connection's first read room (it grows to the read size under load).
const MIN_READ_ROOM: usize = 4 * 1024;

/// What a local connection's reader task reports.
#[derive(Debug)]
pub(super) enum LocalInput {
    Data(u32, Bytes),
    Eof(u32),
}

pub(super) struct Conn {
    pub(super) writer: mpsc::Sender<Bytes>,
    /// The reader task, held to be aborted when the connection is dropped.
    _reader: AbortOnDropHandle<()>,
    /// The writer task: it ends once the queue is written out and the connection shut down.
    written: JoinHandle<()>,
}

impl Conn {
    /// Stops reading, closes the queue, and returns the writer task that drains it.
    pub(super) fn into_writer_task(self) -> JoinHandle<()> {
        self.written
    }
}

/// Starts the reader and writer tasks of local connection `key`.
pub(super) fn spawn_conn<L>(
    key: u32,
    conn: L,
    to_driver: mpsc::Sender<LocalInput>,
    read_size: usize,
    write_queue: usize,
) -> Conn
where
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(conn);
    let (writer, mut rx) = mpsc::channel::<Bytes>(write_queue.max(1));
    let reader = tokio::spawn(async move {
        // Reads land in spare capacity and leave as `Bytes` without a copy or a memset. The
        // room grows from MIN_READ_ROOM to `read_size` while reads fill it, so an idle or
        // interactive connection holds a small block and a bulk one reads whole frames.
        let read_size = read_size.max(1);
        let mut room = MIN_READ_ROOM.min(read_size);
        let mut buf = BytesMut::new();
        loop {
            if buf.capacity() < room {
                buf.reserve(room);
            }
            match rd.read_buf(&mut (&mut buf).limit(room)).await {
                Ok(0) | Err(_) => {
                    let _ = to_driver.send(LocalInput::Eof(key)).await;
                    return;
                }
                Ok(n) => {
                    if n == room {
                        room = (room * 2).min(read_size);
                    }
                    let data = buf.split().freeze();
                    if to_driver.send(LocalInput::Data(key, data)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let written = tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if wr.write_all(&data).await.is_err() {
                return;
            }
            // Buffered writers (standard output is line-buffered) hold binary data until a
            // flush; flush whenever the queue runs dry (a no-op on sockets).
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    Conn {
        writer,
        _reader: AbortOnDropHandle::new(reader),
        written,
    }
}
