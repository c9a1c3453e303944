//! The agent's TCP side: dialing the instance's targets (a session's smux streams one at a
//! time), the read loops (with the real agent's 1,024-byte reads and 1 ms pause in realistic
//! mode), the writes towards the targets and what waits for them (the backlog that stalls the
//! agent's receive path), and the mux plumbing that stands in for the agent's
//! smux-over-unix-socket (frames written into a pipe, read back in message-sized chunks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinHandle;

use crate::agent::AgentInput;
use crate::config::Mode;
use crate::smux;

/// What the port tasks tell the agent.
#[derive(Debug)]
pub(crate) enum PortEvent {
    /// The basic connection of `generation` is up: what was sent to its writer goes out.
    BasicUp {
        generation: u64,
    },
    BasicDialFailed {
        generation: u64,
        error: String,
    },
    BasicData {
        generation: u64,
        data: Vec<u8>,
        room: InTransit,
    },
    BasicClosed {
        generation: u64,
    },
    MuxDialFailed {
        stream_id: u32,
        error: String,
    },
    MuxClosed {
        stream_id: u32,
    },
    MuxOutput {
        data: Vec<u8>,
        room: InTransit,
    },
    /// The mux plumbing runs: the smux server takes the client's bytes.
    MuxReady,
}

/// The room one read of target output takes in the [`TransportBuffer`]; given back when
/// dropped: once the gateway has written the message to the client's socket, or whenever the
/// output is discarded.
pub(crate) type InTransit = OwnedSemaphorePermit;

/// The transport between the agent and the client (`Config::gateway_buffer_bytes`). The real
/// agent has no send window: it sends whatever its targets give it, and only its blocking
/// WebSocket write holds it back once the path to a client that does not read is full. A read
/// loop takes room here before it hands output to the agent and waits while there is none; the
/// gateway gives the room back when it has written the message to the client's WebSocket.
/// Acknowledgements play no part.
#[derive(Clone)]
pub(crate) struct TransportBuffer(Arc<Semaphore>);

impl TransportBuffer {
    pub(crate) fn new(bytes: u32) -> Self {
        Self(Arc::new(Semaphore::new(bytes as usize)))
    }

    /// Waits until `n` bytes fit; `None` once the agent is gone.
    pub(crate) async fn reserve(&self, n: usize) -> Option<InTransit> {
        let n = u32::try_from(n).ok()?;
        self.0.clone().acquire_many_owned(n).await.ok()
    }
}

/// The real agent's read size.
pub const REALISTIC_CHUNK: usize = 1024;
/// Read size in fast mode.
pub(crate) const FAST_CHUNK: usize = 32 * 1024;
/// The real agent's pause after each read.
pub const REALISTIC_PAUSE: Duration = Duration::from_millis(1);

fn chunk_size(mode: Mode) -> usize {
    match mode {
        Mode::Realistic => REALISTIC_CHUNK,
        Mode::Fast => FAST_CHUNK,
    }
}

fn send(inbox: &UnboundedSender<AgentInput>, event: PortEvent) -> bool {
    inbox.send(AgentInput::Port(event)).is_ok()
}

/// Client bytes handed to the target connections and not yet written to their sockets: what
/// the agent holds between the data channel and a target that does not read (its smux
/// receive buffer in mux mode, a blocked socket write in basic mode). Past a limit the agent's
/// receive path stops (see the agent's `receive_stalled`).
#[derive(Clone, Debug, Default)]
pub(crate) struct TargetBacklog {
    bytes: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl TargetBacklog {
    /// Counts `data` until it is written or dropped.
    pub(crate) fn hold(&self, data: Vec<u8>) -> ToTarget {
        self.bytes.fetch_add(data.len(), Ordering::Relaxed);
        ToTarget {
            data,
            backlog: self.clone(),
        }
    }

    /// Bytes counted now.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Resolves after some bytes were written (or dropped) since the last call.
    pub(crate) async fn drained(&self) {
        self.drained.notified().await;
    }
}

/// Client bytes on their way to a target, counted in the [`TargetBacklog`] until dropped.
#[derive(Debug)]
pub(crate) struct ToTarget {
    data: Vec<u8>,
    backlog: TargetBacklog,
}

impl ToTarget {
    /// The client's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for ToTarget {
    fn drop(&mut self) {
        self.backlog
            .bytes
            .fetch_sub(self.data.len(), Ordering::Relaxed);
        self.backlog.drained.notify_one();
    }
}

/// Writes everything received on `rx` to `w`; shuts the write side down when the channel
/// closes, and then the returned task ends.
fn spawn_writer(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut rx: UnboundedReceiver<ToTarget>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if w.write_all(&chunk.data).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    })
}

/// Basic mode: dials `addr`, then writes what arrives on `writes` to it and reports data and
/// EOF tagged with `generation`.
pub(crate) fn spawn_basic(
    addr: SocketAddr,
    generation: u64,
    writes: UnboundedReceiver<ToTarget>,
    mode: Mode,
    transport: TransportBuffer,
    inbox: UnboundedSender<AgentInput>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                send(
                    &inbox,
                    PortEvent::BasicDialFailed {
                        generation,
                        error: e.to_string(),
                    },
                );
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut r, w) = stream.into_split();
        spawn_writer(w, writes);
        if !send(&inbox, PortEvent::BasicUp { generation }) {
            return;
        }
        loop {
            // Each read lands in a buffer of its own, which becomes the message's payload.
            let mut data = Vec::with_capacity(chunk_size(mode));
            match r.read_buf(&mut data).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let Some(room) = transport.reserve(n).await else {
                        return;
                    };
                    if !send(
                        &inbox,
                        PortEvent::BasicData {
                            generation,
                            data,
                            room,
                        },
                    ) {
                        return;
                    }
                }
            }
            if mode == Mode::Realistic {
                tokio::time::sleep(REALISTIC_PAUSE).await;
            }
        }
        send(&inbox, PortEvent::BasicClosed { generation });
    })
}

/// The mux plumbing of one session: a writer task that serialises smux frames into a pipe
/// and a pump that reads the pipe in message-sized chunks (pausing 1 ms in realistic mode).
pub(crate) struct MuxPlumbing {
    /// Frames from the agent itself (FIN, NOP).
    pub(crate) control: UnboundedSender<Vec<u8>>,
    /// Frames from the stream readers (bounded: backpressure to the target sockets).
    pub(crate) data: mpsc::Sender<Vec<u8>>,
    /// The streams' dials, in the order they were opened: the agent accepts streams and dials
    /// their targets one at a time, so a slow dial delays the streams opened after it.
    dialer: UnboundedSender<Dial>,
    tasks: Vec<JoinHandle<()>>,
}

/// A target to dial, and where the connection goes.
type Dial = (SocketAddr, oneshot::Sender<std::io::Result<TcpStream>>);

impl MuxPlumbing {
    pub(crate) fn spawn(
        mode: Mode,
        transport: TransportBuffer,
        inbox: UnboundedSender<AgentInput>,
    ) -> Self {
        let (mut pipe_w, mut pipe_r) = tokio::io::duplex(64 * 1024);
        let (control, mut control_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (data, mut data_rx) = mpsc::channel::<Vec<u8>>(16);
        let ready = inbox.clone();
        let writer = tokio::spawn(async move {
            // The agent sets its mux up in tasks of its own after the handshake; the session
            // takes data only once they run.
            if mode == Mode::Realistic {
                tokio::time::sleep(REALISTIC_PAUSE).await;
            }
            if !send(&ready, PortEvent::MuxReady) {
                return;
            }
            loop {
                let frame = tokio::select! {
                    biased;
                    f = control_rx.recv() => f,
                    f = data_rx.recv() => f,
                };
                let Some(frame) = frame else { break };
                if pipe_w.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let pump = tokio::spawn(async move {
            loop {
                let mut data = Vec::with_capacity(chunk_size(mode));
                match pipe_r.read_buf(&mut data).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Some(room) = transport.reserve(n).await else {
                            break;
                        };
                        if !send(&inbox, PortEvent::MuxOutput { data, room }) {
                            break;
                        }
                    }
                }
                if mode == Mode::Realistic {
                    tokio::time::sleep(REALISTIC_PAUSE).await;
                }
            }
        });
        let (dialer, mut dials) = mpsc::unbounded_channel::<Dial>();
        let dial_one_at_a_time = tokio::spawn(async move {
            while let Some((addr, reply)) = dials.recv().await {
                let _ = reply.send(TcpStream::connect(addr).await);
            }
        });
        Self {
            control,
            data,
            dialer,
            tasks: vec![writer, pump, dial_one_at_a_time],
        }
    }
}

impl Drop for MuxPlumbing {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the agent hands one smux stream's task.
#[derive(Debug)]
pub(crate) enum StreamInput {
    /// The client's bytes for the target (kept until the dial is done).
    Data(ToTarget),
    /// The client's FIN.
    Fin,
}

/// Mux mode: dials `addr` for one smux stream, writes the client's bytes (`input`) to it and
/// copies target bytes into PSH frames. As the agent's stream copies: the client's FIN ends
/// the copy to the target once what came before it is written, and then the connection is
/// closed, whatever the target still had to say; the target's EOF ends the copy from it. Either
/// way the stream's FIN follows its last PSH frame on `data`, and the close is reported.
pub(crate) fn spawn_mux_stream(
    addr: SocketAddr,
    stream_id: u32,
    plumbing: &MuxPlumbing,
    mut input: UnboundedReceiver<StreamInput>,
    inbox: UnboundedSender<AgentInput>,
) -> JoinHandle<()> {
    let data = plumbing.data.clone();
    let (reply, dialled) = oneshot::channel();
    let _ = plumbing.dialer.send((addr, reply));
    tokio::spawn(async move {
        let Ok(dialled) = dialled.await else {
            return;
        };
        let stream = match dialled {
            Ok(s) => s,
            Err(e) => {
                send(
                    &inbox,
                    PortEvent::MuxDialFailed {
                        stream_id,
                        error: e.to_string(),
                    },
                );
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut r, w) = stream.into_split();
        let (writer, writes) = mpsc::unbounded_channel();
        let written = spawn_writer(w, writes);
        let (mut writer, mut written) = (Some(writer), Some(written));
        let mut buf = vec![0u8; smux::MAX_FRAME_SIZE];
        loop {
            tokio::select! {
                read = r.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let frame = smux::Frame::psh(stream_id, buf[..n].to_vec()).encode();
                        if data.send(frame).await.is_err() {
                            return;
                        }
                    }
                },
                next = input.recv(), if writer.is_some() => match next {
                    Some(StreamInput::Data(d)) => {
                        if let Some(w) = &writer {
                            let _ = w.send(d);
                        }
                    }
                    Some(StreamInput::Fin) | None => {
                        writer = None;
                        if let Some(written) = written.take() {
                            let _ = written.await;
                        }
                        break;
                    }
                },
            }
        }
        drop(writer);
        let fin = smux::Frame::control(smux::Command::Fin, stream_id).encode();
        let _ = data.send(fin).await;
        send(&inbox, PortEvent::MuxClosed { stream_id });
    })
}
