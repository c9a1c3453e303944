//! The local connections a tunnel carries: each is a reader task that hands the driver what it
//! reads, and a writer task that writes out what the instance sent, in order, then shuts the
//! connection down. Under a memory budget a reader reads on the session's read credit, and a
//! writer reports what it wrote out.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use super::share::Unwritten;

/// A local connection's first read room (it grows to the read size under load).
const MIN_READ_ROOM: usize = 4 * 1024;

/// What a local connection's reader task reports.
#[derive(Debug)]
pub(super) enum LocalInput {
    /// Bytes read, and the read credit they took (under a memory budget).
    Data(u32, Bytes, Option<OwnedSemaphorePermit>),
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

fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// How a local connection's tasks take part in a memory budget.
pub(super) struct Budgeted {
    /// What reads take before they read.
    pub(super) read_credit: Arc<Semaphore>,
    /// What writers report written to.
    pub(super) unwritten: Arc<Unwritten>,
}

/// Starts the reader and writer tasks of local connection `key`.
pub(super) fn spawn_conn<L>(
    key: u32,
    conn: L,
    to_driver: mpsc::Sender<LocalInput>,
    read_size: usize,
    write_queue: usize,
    budgeted: Option<Budgeted>,
) -> Conn
where
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(conn);
    let (writer, mut rx) = mpsc::channel::<Bytes>(write_queue.max(1));
    let (read_credit, unwritten) = budgeted.map(|b| (b.read_credit, b.unwritten)).unzip();
    let reader = tokio::spawn(async move {
        // Reads land in spare capacity and leave as `Bytes` without a copy or a memset. The
        // room grows from MIN_READ_ROOM to `read_size` while reads fill it, so an idle or
        // interactive connection holds a small block and a bulk one reads whole frames.
        let mut read_size = read_size.max(1);
        if read_credit.is_some() {
            read_size = read_size.min(crate::budget::READ_CREDIT);
        }
        let mut room = MIN_READ_ROOM.min(read_size);
        let mut buf = BytesMut::new();
        loop {
            let mut credit = match &read_credit {
                Some(credit) => match credit.clone().acquire_many_owned(permits(room)).await {
                    Ok(credit) => Some(credit),
                    Err(_) => return,
                },
                None => None,
            };
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
                    // What the read did not fill goes back at once.
                    if let Some(credit) = &mut credit {
                        drop(credit.split(credit.num_permits().saturating_sub(n)));
                    }
                    if (to_driver.send(LocalInput::Data(key, data, credit)).await).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let written = tokio::spawn(async move {
        let report = |bytes: usize| {
            if let Some(unwritten) = &unwritten {
                unwritten.written(bytes);
            }
        };
        let mut failed = false;
        while let Some(data) = rx.recv().await {
            failed = wr.write_all(&data).await.is_err();
            report(data.len());
            // Buffered writers (standard output is line-buffered) hold binary data until a
            // flush; flush whenever the queue runs dry (a no-op on sockets).
            failed = failed || (rx.is_empty() && wr.flush().await.is_err());
            if failed {
                break;
            }
        }
        if failed {
            // What is still queued will never be written: it is no longer held for anyone.
            rx.close();
            while let Ok(data) = rx.try_recv() {
                report(data.len());
            }
        } else {
            let _ = wr.shutdown().await;
        }
    });
    Conn {
        writer,
        _reader: AbortOnDropHandle::new(reader),
        written,
    }
}
