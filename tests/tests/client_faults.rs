//! This project's SSM client (the driver under `agent-bridge`) against the strict emulator in every
//! fault-injection scenario of the emulator's fault injection (tests/ssm-emulator/README.md), in basic and in mux mode, each
//! transfer compared by SHA-256. Each scenario also shows from the emulator's reports that its
//! fault fired and had its effect, and reads violations only once every session has ended.
//!
//! The instance's port leads to a loopback transfer server. Like sshd, it speaks first (a greeting
//! byte `R`), which is what lets a legacy agent without a handshake carry it: such an agent's first
//! Output stands for the handshake. The client then sends `U` or `D` and an 8-byte big-endian length; for `U` the server reads that many bytes and answers their SHA-256
//! (hex), for `D` it sends that many bytes of a fixed pattern and closes.

#![allow(clippy::panic)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use fleet_access_agent_bridge::driver::{DriverConfig, Tunnel};
use fleet_access_agent_bridge::protocol::Stats;
use fleet_access_agent_bridge::ssm::{ControlPlane, SdkControlPlane, StartSessionRequest};
use fleet_access_agent_bridge::stream_url::StreamUrls;
use fleet_access_ssm_emulator::{
    Config, Emulator, Faults, InstanceConfig, Mode, Running, SessionReport, unobserved_faults,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const CURRENT_AGENT: &str = "i-0123456789abcdef0";
/// Agent 3.0.196.0: port forwarding falls back to basic mode.
const OLD_AGENT: &str = "i-0fedcba9876543210";
const TRANSFER_PORT: u16 = 7000;
/// The transfer server's first byte.
const GREETING: u8 = b'R';

/// Byte `i` of every download.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn pattern_chunk(start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64).map(pattern).collect()
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn pattern_digest(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(64 * 1024) as usize;
        hasher.update(pattern_chunk(at, n));
        at += n as u64;
    }
    hex(&hasher.finalize())
}

/// The transfer server the instance's port leads to.
async fn transfer_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = serve_transfer(stream).await;
            });
        }
    });
    address
}

async fn serve_transfer(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.write_u8(GREETING).await?;
    let op = stream.read_u8().await?;
    let len = stream.read_u64().await?;
    let mut at = 0u64;
    if op == b'U' {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        while at < len {
            let want = (len - at).min(buf.len() as u64) as usize;
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        stream.write_all(hex(&hasher.finalize()).as_bytes()).await?;
    } else {
        while at < len {
            let n = (len - at).min(64 * 1024) as usize;
            stream.write_all(&pattern_chunk(at, n)).await?;
            at += n as u64;
        }
    }
    stream.shutdown().await
}

/// One transfer over one local connection of the tunnel.
#[derive(Clone, Copy, Debug)]
enum Transfer {
    Upload(u64),
    Download(u64),
}

impl Transfer {
    /// Runs the transfer over `local` and checks what arrived by SHA-256.
    async fn run(self, mut local: impl AsyncRead + AsyncWrite + Unpin) {
        let greeting = local.read_u8().await.expect("the server's greeting");
        assert_eq!(greeting, GREETING, "the first byte from the instance");
        match self {
            Self::Upload(len) => {
                local.write_u8(b'U').await.expect("op");
                local.write_u64(len).await.expect("length");
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(64 * 1024) as usize;
                    local
                        .write_all(&pattern_chunk(at, n))
                        .await
                        .expect("upload");
                    at += n as u64;
                }
                let mut answer = vec![0u8; 64];
                local
                    .read_exact(&mut answer)
                    .await
                    .expect("the instance's digest");
                assert_eq!(
                    String::from_utf8_lossy(&answer),
                    pattern_digest(len),
                    "upload of {len} bytes"
                );
            }
            Self::Download(len) => {
                local.write_u8(b'D').await.expect("op");
                local.write_u64(len).await.expect("length");
                let mut hasher = Sha256::new();
                let mut received = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while received < len {
                    let n = local.read(&mut buf).await.expect("download");
                    assert!(n > 0, "download ended after {received} of {len} bytes");
                    hasher.update(&buf[..n]);
                    received += n as u64;
                }
                assert_eq!(received, len);
                assert_eq!(
                    hex(&hasher.finalize()),
                    pattern_digest(len),
                    "download of {len} bytes"
                );
            }
        }
    }
}

async fn emulator(mode: Mode, target: SocketAddr, faults: Faults) -> Running {
    let mut config = Config {
        mode,
        ..Config::default()
    };
    let port = TRANSFER_PORT.to_string();
    config.instances = vec![
        InstanceConfig::new(CURRENT_AGENT)
            .with_port(port.clone(), target)
            .with_faults(faults.clone()),
        InstanceConfig::new(OLD_AGENT)
            .with_agent_version("3.0.196.0")
            .with_port(port, target)
            .with_faults(faults),
    ];
    Emulator::start(config).await.expect("emulator starts")
}

fn control(emulator: &Running) -> SdkControlPlane {
    let sdk = fleet_access_tests::moto::sdk_config_for(&emulator.endpoint_url());
    SdkControlPlane::new(&sdk).with_stream_urls(StreamUrls::Any)
}

/// The port-forwarding document: mux with a current agent, basic with an old one.
fn forwarding(instance: &str) -> StartSessionRequest {
    StartSessionRequest::forwarding(instance, TRANSFER_PORT, None, "agent-bridge forward")
}

/// A bound on waiting for the emulator to see sessions end (they normally end at once).
const END_LIMIT: Duration = Duration::from_secs(120);

/// Starts a session for `request`, runs `transfers` each over its own local connection (all at
/// once), then terminates the session; checks that the emulator saw it end without a violation
/// and returns its final report.
async fn session(
    emulator: &Running,
    request: &StartSessionRequest,
    transfers: &[Transfer],
) -> SessionReport {
    let control = Arc::new(control(emulator));
    let target = control.start_session(request).await.expect("StartSession");
    let session_id = target.session_id.clone();
    let (connections, incoming) = mpsc::channel::<DuplexStream>(transfers.len().max(1));
    let shutdown = CancellationToken::new();
    let (stats_tx, stats) = watch::channel(Stats::default());
    let tunnel = {
        let (control, shutdown) = (control.clone(), shutdown.clone());
        tokio::spawn(async move {
            let config = DriverConfig {
                // Generous: a black hole must be detected and survived, never fatal.
                reconnect_budget: Duration::from_secs(120),
                // A black hole is noticed within seconds, not the production minute and more.
                ping_interval: Duration::from_secs(2),
                dead_peer_timeout: Duration::from_secs(10),
                ..DriverConfig::default()
            };
            Tunnel::new(&*control, None, config)
                .with_stats(stats_tx)
                .run(target, incoming, shutdown.cancelled(), None)
                .await
        })
    };
    let mut jobs = Vec::new();
    for transfer in transfers {
        let (near, far) = tokio::io::duplex(256 * 1024);
        connections
            .send(far)
            .await
            .expect("the tunnel takes connections");
        jobs.push(tokio::spawn(transfer.run(near)));
    }
    for job in jobs {
        let timeout = Duration::from_secs(600);
        let failure = match tokio::time::timeout(timeout, job).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("a transfer failed: {e}"),
            Err(_) => "no transfer within 10 minutes".to_owned(),
        };
        panic!(
            "{failure}\nthe client: {:?}\nthe emulator: {:?}",
            *stats.borrow(),
            emulator.session_reports()
        );
    }
    // Like a careful client, wait for the acks of everything sent before closing: what a fault
    // held back (a withheld ack, a lost upload) is retransmitted first, so that its effect
    // shows in the emulator's report.
    let mut client = stats.clone();
    if tokio::time::timeout(END_LIMIT, client.wait_for(|s| s.unacked_messages == 0))
        .await
        .is_err()
    {
        panic!(
            "the client's messages were never all acknowledged: {:?}\nthe emulator: {:?}",
            *stats.borrow(),
            emulator.session_reports()
        );
    }
    drop(connections);
    shutdown.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(60), tunnel)
        .await
        .expect("the tunnel ends")
        .expect("join")
        .expect("the data channel ends cleanly");
    let report = emulator
        .wait_for_end(&session_id, END_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("the emulator saw the session end: {e}"));
    assert!(
        report.violations.is_empty(),
        "{session_id}: {:?} (client stats {:?})",
        report.violations,
        outcome.stats
    );
    report
}

/// Waits until every session of `emulator` has ended, then checks that none saw a violation
/// and that each of `faults` fired and had its effect; returns the final reports.
async fn assert_survived(name: &str, emulator: &Running, faults: &Faults) -> Vec<SessionReport> {
    let reports = emulator
        .wait_for_all_ended(END_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let violations = emulator.violations();
    assert!(violations.is_empty(), "{name}: {violations:?}");
    let unobserved = unobserved_faults(faults, &reports);
    assert!(
        unobserved.is_empty(),
        "{name}: {unobserved:?}\n{reports:#?}"
    );
    reports
}

/// Every scenario: a small upload and download in mux mode (two streams at once) and in basic mode
/// (two sessions), bytes intact, zero violations. Without a handshake there is no mux, so a legacy
/// agent runs basic sessions only.
async fn scenario(name: &str, faults: Faults) -> Vec<SessionReport> {
    init_logging();
    let mux = !faults.legacy_no_handshake;
    let target = transfer_server().await;
    let emulator = emulator(Mode::Fast, target, faults.clone()).await;
    let size = 256 * 1024;
    if mux {
        eprintln!("scenario {name}: mux");
        session(
            &emulator,
            &forwarding(CURRENT_AGENT),
            &[Transfer::Upload(size), Transfer::Download(size)],
        )
        .await;
    }
    for transfer in [Transfer::Upload(size), Transfer::Download(size)] {
        eprintln!("scenario {name}: basic {transfer:?}");
        session(&emulator, &forwarding(OLD_AGENT), &[transfer]).await;
    }
    assert_survived(name, &emulator, &faults).await
}

/// `RUST_LOG=debug` shows what the driver did (off by default).
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One test per fault of docs/protocol.md §9.2, so that a failure names its scenario.
macro_rules! fault_scenarios {
    ($($test:ident: $faults:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let _ = scenario(stringify!($test), $faults).await;
        }
    )*};
}

fault_scenarios! {
    clean: Faults::default();
    dropped_frames: Faults { drop_every: Some(7), ..Faults::default() };
    duplicated_frames: Faults { duplicate_every: Some(5), ..Faults::default() };
    reordered_frames: Faults { reorder_window: Some(4), ..Faults::default() };
    delayed_frames: Faults { delay_ms: Some(30), ..Faults::default() };
    corrupt_digests: Faults { corrupt_digest_every: Some(9), ..Faults::default() };
    flipped_payload_bits: Faults { flip_payload_bit_every: Some(11), ..Faults::default() };
    lost_uploads: Faults { drop_client_every: Some(7), ..Faults::default() };
    withheld_acks: Faults { withhold_ack_every: Some(5), ..Faults::default() };
    // A session carries only some 15 to 35 frames to the client (large messages), so the
    // connection faults come after 8.
    recycled_websockets: Faults {
        recycle_after_frames: Some(8),
        connection_faults: Some(3),
        ..Faults::default()
    };
    black_hole: Faults { black_hole_after_frames: Some(8), ..Faults::default() };
    tcp_resets: Faults {
        reset_after_frames: Some(8),
        connection_faults: Some(2),
        ..Faults::default()
    };
    start_publication_first: Faults { start_publication_first: true, ..Faults::default() };
    garbage_publication: Faults { garbage_publication: true, ..Faults::default() };
    extra_message_types: Faults { extra_message_types: true, ..Faults::default() };
    legacy_channel_closed: Faults { legacy_channel_closed: true, ..Faults::default() };
    legacy_agent_without_handshake: Faults { legacy_no_handshake: true, ..Faults::default() };
}

/// A `pause_publication` that no `start_publication` follows is lifted by the agent's next data
/// or ack, as in the agent's own data channel, or lapses after a few seconds when the agent in
/// turn waits for the client: no session needs the dead-peer check and a new WebSocket to get
/// going again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lasting_pause_neither_stops_a_session_nor_costs_its_websocket() {
    let faults = Faults {
        lasting_pause: true,
        ..Faults::default()
    };
    for report in scenario("lasting_pause", faults).await {
        assert_eq!(report.connections, 1, "{report:?}");
    }
}

const MIB: u64 = 1024 * 1024;

/// 5% loss of the client's messages, 0.3% of the agent's, reordering, 1% duplication and a
/// WebSocket recycle every few seconds. (A transmission both faults hit is dropped: the periods
/// are coprime so that duplicates happen.) The agent resends only its oldest unacknowledged
/// message, once per 100 ms tick, while it goes on sending new ones at 1 KiB per millisecond:
/// it recovers from about ten losses a second, so a higher loss of its messages would
/// overwhelm it with any client.
fn lossy() -> Faults {
    Faults {
        drop_every: Some(300),
        drop_client_every: Some(20),
        reorder_window: Some(3),
        duplicate_every: Some(97),
        recycle_after_frames: Some(400),
        connection_faults: Some(1_000),
        ..Faults::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_each_way_through_a_lossy_channel_in_mux_mode() {
    init_logging();
    let target = transfer_server().await;
    let emulator = emulator(Mode::Realistic, target, lossy()).await;
    session(
        &emulator,
        &forwarding(CURRENT_AGENT),
        &[Transfer::Upload(16 * MIB), Transfer::Download(16 * MIB)],
    )
    .await;
    let reports = assert_survived("lossy mux", &emulator, &lossy()).await;
    assert!(
        reports[0].connections > 1,
        "the WebSocket was recycled: {:?}",
        reports[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_each_way_through_a_lossy_channel_in_basic_mode() {
    init_logging();
    let target = transfer_server().await;
    let emulator = emulator(Mode::Realistic, target, lossy()).await;
    for transfer in [Transfer::Upload(16 * MIB), Transfer::Download(16 * MIB)] {
        session(&emulator, &forwarding(OLD_AGENT), &[transfer]).await;
    }
    for report in assert_survived("lossy basic", &emulator, &lossy()).await {
        assert!(
            report.connections > 1,
            "the WebSocket was recycled: {report:?}"
        );
    }
}

/// A black hole while only the agent sends: the client has nothing in flight to miss an ack for,
/// so only the unanswered pings can tell it the WebSocket is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_during_a_download_is_noticed_and_survived() {
    init_logging();
    let target = transfer_server().await;
    let faults = Faults {
        black_hole_after_frames: Some(20),
        ..Faults::default()
    };
    let emulator = emulator(Mode::Fast, target, faults.clone()).await;
    let report = session(
        &emulator,
        &forwarding(CURRENT_AGENT),
        &[Transfer::Download(4 * MIB)],
    )
    .await;
    assert!(report.connections > 1, "the client resumed: {report:?}");
    assert_survived("black hole during a download", &emulator, &faults).await;
}

/// Mux mode at the agent's own pace (1 KiB reads, 1 ms pauses) with its smux keepalive on (an
/// agent of 3.1.1511.0 keeps it on; here a NOP every 100 ms): both ways intact, zero violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_at_the_agents_pace_with_its_smux_keepalive_on() {
    init_logging();
    let target = transfer_server().await;
    let port = TRANSFER_PORT.to_string();
    let mut config = Config {
        mode: Mode::Realistic,
        smux_keepalive_interval_ms: 100,
        ..Config::default()
    };
    config.instances = vec![
        InstanceConfig::new(CURRENT_AGENT)
            .with_agent_version("3.1.1511.0")
            .with_port(port, target),
    ];
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let report = session(
        &emulator,
        &forwarding(CURRENT_AGENT),
        &[Transfer::Upload(2 * MIB), Transfer::Download(2 * MIB)],
    )
    .await;
    assert!(report.smux_keepalive, "{report:?}");
    assert!(report.smux_nops_to_client > 0, "{report:?}");
    assert_survived("keepalive", &emulator, &Faults::default()).await;
}
