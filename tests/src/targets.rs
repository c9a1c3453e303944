//! TCP targets for data-path tests: an echo server (plain, or greeting first), and a sink that takes nothing until a gate
//! opens, then reads everything until its peer closes and hands it over (the target that does
//! not read).

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::oneshot;

/// A TCP echo server on 127.0.0.1, serving until the test's runtime ends.
pub async fn echo_server() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    Ok(address)
}

/// A TCP server on 127.0.0.1 that says `greeting` on each connection, then echoes: tells apart
/// which of several servers a path leads to.
pub async fn greeting_echo_server(greeting: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                if stream.write_all(greeting.as_bytes()).await.is_ok() {
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                }
            });
        }
    });
    Ok(address)
}

/// The sink's socket receive buffer (the kernel may double it).
pub const RECEIVE_BUFFER: u32 = 64 * 1024;

/// A sink for one connection on 127.0.0.1.
#[derive(Debug)]
pub struct GatedSink {
    /// Where it listens.
    pub address: SocketAddr,
    gate: Option<oneshot::Sender<()>>,
    received: oneshot::Receiver<Vec<u8>>,
}

impl GatedSink {
    /// Listens; the first connection is accepted and left unread until [`GatedSink::open`].
    /// Its receive buffer is small ([`RECEIVE_BUFFER`]), so that what a writer has to hold
    /// while the gate is shut does not vanish into the kernel.
    pub async fn bind() -> std::io::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(16)?;
        let address = listener.local_addr()?;
        let (gate, gated) = oneshot::channel::<()>();
        let (deliver, received) = oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let _ = gated.await;
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes).await;
            let _ = deliver.send(bytes);
        });
        Ok(Self {
            address,
            gate: Some(gate),
            received,
        })
    }

    /// Starts reading.
    pub fn open(&mut self) {
        if let Some(gate) = self.gate.take() {
            let _ = gate.send(());
        }
    }

    /// Opens the gate and waits for what the connection carried until its peer closed it;
    /// `None` when no connection came or the sink task is gone.
    pub async fn received(mut self) -> Option<Vec<u8>> {
        self.open();
        self.received.await.ok()
    }
}
