//! The processes the benchmarks start: the target behind the emulated instance (in the harness),
//! a raw TCP relay (the upper limit), and the bridge's serve path without Kubernetes.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use fleet_access_agent_bridge::{
    admin::{self, Readiness},
    budget::{DEFAULT_MEMORY_BUDGET, MemoryBudget},
    cli::{AwsArgs, control_plane, load_aws},
    listener::{Clients, Endpoint, Limits, Listeners},
    metrics::Metrics,
    tunnel::SessionContext,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// The longest any role process lives, whatever happens to the harness.
const ROLE_LIFETIME: Duration = Duration::from_secs(3600);
/// The byte the target sends first on every connection, like an sshd banner.
pub const BANNER: u8 = b'@';
/// Command: the client uploads; the target counts.
pub const UPLOAD: u8 = b'U';
/// Command: the target sends until the client closes.
pub const DOWNLOAD: u8 = b'D';
/// Chunk the target and clients move at a time.
pub const CHUNK: usize = 64 * 1024;

// === impl Target ===

/// The service behind the emulated instance: a banner, then upload sink or download source.
#[derive(Clone)]
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bytes uploaded to it so far (all connections).
    pub uploaded: Arc<AtomicU64>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
}

impl Target {
    /// Starts it on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let target = Self {
            addr: listener.local_addr()?,
            uploaded: Arc::default(),
            accepted: Arc::default(),
        };
        let shared = target.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve_target(stream, shared.uploaded.clone()));
            }
        });
        Ok(target)
    }

    /// Bytes uploaded so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }
}

async fn serve_target(mut stream: TcpStream, uploaded: Arc<AtomicU64>) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(&[BANNER]).await.is_err() {
        return;
    }
    let mut command = [0u8; 1];
    if stream.read_exact(&mut command).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    match command[0] {
        UPLOAD => {
            // Bounded by the client: it closes after its window.
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                uploaded.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        DOWNLOAD => {
            let started = tokio::time::Instant::now();
            while started.elapsed() < ROLE_LIFETIME {
                if stream.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
        _ => {}
    }
}

// === relay ===

/// `relay LISTEN_PORT TO [agent-read-loop|digest|ack-near|ack-far]`: copies every connection to
/// `TO`; prints `relay PORT` when listening; ends when standard input closes. With
/// `agent-read-loop`, what comes back from `TO` is read as the emulated agent reads a target in
/// realistic mode (1,024 bytes, then a 1 ms pause): the agent's own ceiling, without any data
/// channel. With `digest`, every chunk is hashed on its way through with the bridge's own
/// SHA-256 (a message at most [`DIGEST_CHUNK`]), as each end of the SSM protocol hashes every
/// message it sends or receives. `ack-near` (towards `TO`) and `ack-far` (towards its
/// clients) speak [acknowledged frames](acknowledging) to each other.
pub async fn relay_main(args: &[String]) -> anyhow::Result<()> {
    let usage = "relay LISTEN_PORT TO [agent-read-loop|digest|ack-near|ack-far]";
    let port: u16 = args.first().context(usage)?.parse()?;
    let to: SocketAddr = args.get(1).context(usage)?.parse()?;
    let style = match args.get(2).map(String::as_str) {
        None => RelayStyle::Copy,
        Some("agent-read-loop") => RelayStyle::AgentReadLoop,
        Some("digest") => RelayStyle::Digest,
        Some("ack-near") => RelayStyle::AcknowledgedTowardsTo,
        Some("ack-far") => RelayStyle::AcknowledgedTowardsClients,
        Some(other) => anyhow::bail!("unknown relay option {other}; {usage}"),
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    println!("relay {}", listener.local_addr()?.port());
    tokio::select! {
        () = relay(listener, to, style) => {}
        () = until_stdin_closes() => {}
    }
    Ok(())
}

/// Carries every connection `listener` accepts to `to`, as `style` says.
async fn relay(listener: TcpListener, to: SocketAddr, style: RelayStyle) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(to).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            match style {
                RelayStyle::Copy => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                RelayStyle::AgentReadLoop => read_back_as_the_agent(inbound, outbound).await,
                RelayStyle::Digest => {
                    let (mut in_r, mut in_w) = inbound.split();
                    let (mut out_r, mut out_w) = outbound.split();
                    tokio::join!(
                        copy_digesting(&mut in_r, &mut out_w),
                        copy_digesting(&mut out_r, &mut in_w)
                    );
                }
                RelayStyle::AcknowledgedTowardsTo => acknowledging(inbound, outbound).await,
                RelayStyle::AcknowledgedTowardsClients => acknowledging(outbound, inbound).await,
            }
        });
    }
}

/// How a relay carries what it reads.
#[derive(Clone, Copy)]
enum RelayStyle {
    /// Straight copies both ways.
    Copy,
    /// Back from the target as the emulated agent reads it.
    AgentReadLoop,
    /// Copies, hashing every chunk.
    Digest,
    /// Plain bytes from the clients, acknowledged frames towards `TO`.
    AcknowledgedTowardsTo,
    /// Acknowledged frames from the clients, plain bytes towards `TO`.
    AcknowledgedTowardsClients,
}

/// Copies `inbound` to `outbound`, and reads what comes back as the emulated agent reads its
/// target in realistic mode: 1,024 bytes, then a 1 ms pause.
async fn read_back_as_the_agent(mut inbound: TcpStream, mut outbound: TcpStream) {
    let (mut in_r, mut in_w) = inbound.split();
    let (mut out_r, mut out_w) = outbound.split();
    let up = async {
        let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
        let _ = out_w.shutdown().await;
    };
    let down = async {
        let mut buf = [0u8; fleet_access_ssm_emulator::REALISTIC_CHUNK];
        while let Ok(n @ 1..) = out_r.read(&mut buf).await {
            if in_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
            tokio::time::sleep(fleet_access_ssm_emulator::REALISTIC_PAUSE).await;
        }
        let _ = in_w.shutdown().await;
    };
    tokio::join!(up, down);
}

/// The most a digesting relay reads (and hashes) at a time: the bridge's largest message.
pub const DIGEST_CHUNK: usize = 32 * 1024;

/// Copies `from` to `to`, computing the SHA-256 of each chunk read, until EOF; then shuts `to`.
async fn copy_digesting(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
) {
    let mut buf = vec![0u8; DIGEST_CHUNK];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        std::hint::black_box(
            fleet_access_agent_bridge::protocol::message::payload_digest(&buf[..n]),
        );
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A frame between acknowledging relays: data, or an acknowledgement.
const FRAME_DATA: u8 = b'd';
const FRAME_ACK: u8 = b'a';
/// A frame's header: its kind, then its length (big-endian u32).
const FRAME_HEADER: usize = 5;
/// An acknowledgement's size on the wire: an SSM acknowledge message (its 120-byte header and
/// JSON payload naming the message) in a WebSocket frame.
pub const ACK_BYTES: usize = 256;
/// What the receiving relay reads from its peer at once (a WebSocket reader's buffer).
const FRAMED_READ_BUFFER: usize = 64 * 1024;

/// Carries `plain` (bytes) over `framed` (to the other acknowledging relay), both ways, doing
/// per message what the protocol asks and nothing else: the sender hashes each chunk (at most
/// [`DIGEST_CHUNK`]) and frames it; the receiver hashes it again, writes it on and
/// acknowledges it with [`ACK_BYTES`] on the same connection; each side reads the other's
/// acknowledgements. Writes to `framed` from both ways share one lock, as the agent's and the
/// bridge's WebSocket writes do.
async fn acknowledging(plain: TcpStream, framed: TcpStream) {
    let (plain_r, plain_w) = plain.into_split();
    let (framed_r, framed_w) = framed.into_split();
    let framed_w = Arc::new(tokio::sync::Mutex::new(framed_w));
    tokio::join!(
        send_framed(plain_r, framed_w.clone()),
        receive_framed(framed_r, plain_w, framed_w)
    );
}

type SharedWriter = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

/// Frames what `from` gives, each chunk hashed, until EOF.
async fn send_framed(mut from: tokio::net::tcp::OwnedReadHalf, to: SharedWriter) {
    let mut buf = vec![0u8; FRAME_HEADER + DIGEST_CHUNK];
    while let Ok(n @ 1..) = from.read(&mut buf[FRAME_HEADER..]).await {
        std::hint::black_box(
            fleet_access_agent_bridge::protocol::message::payload_digest(
                &buf[FRAME_HEADER..FRAME_HEADER + n],
            ),
        );
        buf[0] = FRAME_DATA;
        buf[1..FRAME_HEADER].copy_from_slice(&(n as u32).to_be_bytes());
        if to
            .lock()
            .await
            .write_all(&buf[..FRAME_HEADER + n])
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = to.lock().await.shutdown().await;
}

/// Reads frames from `from` until EOF: data is hashed, written to `to` and acknowledged on
/// `acks`; acknowledgements are read and dropped.
async fn receive_framed(
    from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    acks: SharedWriter,
) {
    let mut from = tokio::io::BufReader::with_capacity(FRAMED_READ_BUFFER, from);
    let mut ack = vec![0u8; FRAME_HEADER + ACK_BYTES];
    ack[0] = FRAME_ACK;
    ack[1..FRAME_HEADER].copy_from_slice(&(ACK_BYTES as u32).to_be_bytes());
    let mut header = [0u8; FRAME_HEADER];
    let mut payload = vec![0u8; DIGEST_CHUNK.max(ACK_BYTES)];
    while from.read_exact(&mut header).await.is_ok() {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let Some(payload) = payload.get_mut(..len) else {
            break;
        };
        if from.read_exact(payload).await.is_err() {
            break;
        }
        if header[0] != FRAME_DATA {
            continue;
        }
        std::hint::black_box(fleet_access_agent_bridge::protocol::message::payload_digest(payload));
        if to.write_all(payload).await.is_err() {
            break;
        }
        // Once this side has sent its last frame (its shutdown), nothing can be acknowledged
        // any more; what still comes is carried all the same.
        let _ = acks.lock().await.write_all(&ack).await;
    }
    let _ = to.shutdown().await;
}

/// Resolves when standard input reaches EOF (the harness went away) or after [`ROLE_LIFETIME`].
async fn until_stdin_closes() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(ROLE_LIFETIME, async {
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

// === serve-listeners ===

/// `serve-listeners SSM_ENDPOINT DOCUMENT PORT [--no-memory-budget]`: the bridge's serve path
/// (endpoint listener, admission, one session per connection, the memory budget, metrics) as
/// `agent-bridge serve` runs it for one endpoint, minus the Kubernetes watch that only decides
/// which endpoints exist. Prints `ready listen=PORT admin=PORT`; ends when standard input
/// closes.
pub async fn serve_listeners_main(args: &[String]) -> anyhow::Result<()> {
    let usage = "serve-listeners SSM_ENDPOINT DOCUMENT PORT [--no-memory-budget]";
    let endpoint_url = args.first().context(usage)?.clone();
    let document = args.get(1).context(usage)?.clone();
    let port: u16 = args.get(2).context(usage)?.parse()?;
    let aws = AwsArgs {
        region: Some(crate::support::REGION.into()),
        ssm_endpoint: Some(endpoint_url),
        kms_endpoint: None,
        allow_any_stream_url: true,
    };
    let sdk = load_aws(&aws).await;
    let registry = prometheus::Registry::new();
    // The memory budget `agent-bridge serve` ships with, unless told otherwise.
    let budget = match args.get(3).map(String::as_str) {
        None => Some(MemoryBudget::new(DEFAULT_MEMORY_BUDGET)),
        Some("--no-memory-budget") => None,
        Some(_) => anyhow::bail!(usage),
    };
    if let Some(budget) = &budget {
        budget.register(&registry)?;
    }
    let context = Arc::new(SessionContext {
        idle_timeout: Some(Duration::from_secs(1200)),
        budget,
        ..SessionContext::per_connection(
            Arc::new(control_plane(&aws, &sdk)),
            None,
            Metrics::register(&registry)?,
        )
    });
    let mut listeners = Listeners::new(
        context,
        Limits {
            total: 5000,
            per_client_namespace: 5000,
            per_instance: 5000,
        },
        Ipv4Addr::LOCALHOST.into(),
        Clients::none(),
    );
    // A free port, released for the listener to take (nothing else binds here meanwhile).
    let listen_port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await?
        .local_addr()?
        .port();
    let endpoint = Endpoint {
        instance_id: crate::support::INSTANCE.into(),
        remote_host: None,
        port,
        listen_port,
        document,
        port_parameter: Some(port),
        grants: Vec::new(),
    };
    let desired = BTreeMap::from([(listen_port, endpoint)]);
    if let Some((_, error)) = listeners.apply(&desired).await.into_iter().next() {
        anyhow::bail!("cannot listen: {error}");
    }
    let admin_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let admin_port = admin_listener.local_addr()?.port();
    let readiness = Readiness::default();
    readiness.set(true);
    let stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        registry,
        readiness,
        stop.clone(),
    ));
    println!("ready listen={listen_port} admin={admin_port}");
    until_stdin_closes().await;
    listeners.shutdown(Duration::from_secs(1)).await;
    stop.cancel();
    let _ = admin_task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `relay` on a free loopback port towards `to`; returns where it listens.
    async fn start(to: SocketAddr, style: RelayStyle) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(relay(listener, to, style));
        addr
    }

    #[tokio::test]
    async fn acknowledging_relays_carry_every_byte_both_ways_and_keep_their_acknowledgements() {
        // The target echoes what it reads until EOF.
        let target = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let target_addr = target.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = target.accept().await.unwrap();
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let far = start(target_addr, RelayStyle::AcknowledgedTowardsClients).await;
        let near = start(far, RelayStyle::AcknowledgedTowardsTo).await;
        // More than a few chunks, and not a whole number of them.
        let sent: Vec<u8> = (0..5 * DIGEST_CHUNK + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut client = TcpStream::connect(near).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(30), async {
            let (mut r, mut w) = client.split();
            let write = async {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut echoed = Vec::new();
            let read = r.read_to_end(&mut echoed);
            let ((), read) = tokio::join!(write, read);
            read.unwrap();
            echoed
        })
        .await
        .expect("the relays carried the bytes back within 30 s");
        assert_eq!(echoed.len(), sent.len());
        assert!(echoed == sent, "the bytes came back changed");
    }
}
