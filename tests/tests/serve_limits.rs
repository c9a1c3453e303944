//! The serve path's limits against the strict emulator. The memory budget: clients that read
//! nothing while their instances send spend the budget and no more; a connection the budget has
//! no room for is refused with a reason; then every download arrives whole, and the budget is
//! all given back. The deadlines: an idle session and one past its maximum duration are ended,
//! and their records say which deadline did it.

#![allow(clippy::panic)]

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use fleet_access_agent_bridge::{
    audit::{AuditSink, ConnectionRecord, Ended},
    budget::{MemoryBudget, SESSION_FLOOR, in_units},
    listener::{Clients, Endpoint, Limits, Listeners},
    metrics::{self, Metrics},
    ssm::SdkControlPlane,
    stream_url::StreamUrls,
    tunnel::SessionContext,
};
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running};
use fleet_access_tests::free_loopback_port;
use prometheus::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const INSTANCE: &str = "i-0123456789abcdef0";
/// The budget: six sessions' floors and as much again to share.
const BUDGET: usize = 12 * SESSION_FLOOR;
const CLIENTS: usize = 6;
/// What each client downloads: more than the kernel's socket buffers on the way hold (up to
/// 4 MiB of send buffer on the bridge's side), so that the rest waits in the bridge.
const DOWNLOAD: usize = 8_000_000;

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A target on a loopback port that runs `serve` on each connection it accepts.
async fn target_serving<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    address
}

/// Sends `len` bytes of [`pattern`] to every connection, then closes it (`close`) or holds it
/// open, silent, until the far end closes.
async fn target(len: usize, close: bool) -> SocketAddr {
    let data = Arc::new(pattern(len));
    target_serving(move |mut stream| {
        let data = data.clone();
        async move {
            let _ = stream.write_all(&data).await;
            if close {
                let _ = stream.shutdown().await;
            }
            // Hold the connection until the far end closes.
            let _ = stream.read(&mut [0u8; 1]).await;
        }
    })
    .await
}

/// Sends [`DOWNLOAD`] bytes of [`pattern`] to each connection once it has sent a byte (so that a
/// test can open several sessions before any carries data), then closes it.
async fn requested_download() -> SocketAddr {
    let data = Arc::new(pattern(DOWNLOAD));
    target_serving(move |mut stream| {
        let data = data.clone();
        async move {
            if stream.read_exact(&mut [0u8; 1]).await.is_ok() {
                let _ = stream.write_all(&data).await;
            }
            let _ = stream.shutdown().await;
            let _ = stream.read(&mut [0u8; 1]).await;
        }
    })
    .await
}

/// Polls `condition` every 10 ms until it holds; fails the test after `limit`.
async fn until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let waited = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(limit, waited)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"));
}

/// A client whose receive buffer holds little: what it does not read stays in the bridge.
async fn connect(port: u16) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    socket
        .connect(SocketAddr::new(LOOPBACK, port))
        .await
        .expect("connect")
}

/// Each connection's audit record.
#[derive(Default)]
struct Records(Mutex<Vec<ConnectionRecord>>);

impl AuditSink for Records {
    fn record(&self, record: &ConnectionRecord) {
        self.0.lock().expect("records").push(record.clone());
    }
}

/// The serve path's endpoint listener for one instance whose port sends [`DOWNLOAD`] bytes,
/// through the emulator in fast mode.
struct Bridge {
    emulator: Running,
    listeners: Listeners<SdkControlPlane>,
    registry: Registry,
    records: Arc<Records>,
    port: u16,
}

impl Bridge {
    /// Each connection downloads [`DOWNLOAD`] bytes, then the target closes it.
    async fn start(budget: Option<&MemoryBudget>) -> Self {
        Self::start_with(target(DOWNLOAD, true).await, budget, None, None).await
    }

    async fn start_with(
        source: SocketAddr,
        budget: Option<&MemoryBudget>,
        idle_timeout: Option<Duration>,
        max_duration: Option<Duration>,
    ) -> Self {
        let mut config = Config {
            mode: Mode::Fast,
            ..Config::default()
        };
        config
            .instances
            .push(InstanceConfig::new(INSTANCE).with_port("22", source));
        let emulator = Emulator::start(config).await.expect("emulator starts");
        let registry = Registry::new();
        if let Some(budget) = budget {
            budget.register(&registry).expect("register");
        }
        let control = SdkControlPlane::new(&fleet_access_tests::moto::sdk_config_for(
            &emulator.endpoint_url(),
        ))
        .with_stream_urls(StreamUrls::Any);
        let context = Arc::new(SessionContext {
            budget: budget.cloned(),
            idle_timeout,
            max_duration,
            ..SessionContext::per_connection(
                Arc::new(control),
                None,
                Metrics::register(&registry).expect("metrics"),
            )
        });
        let endpoint = Endpoint {
            instance_id: INSTANCE.into(),
            remote_host: None,
            port: 22,
            listen_port: free_loopback_port().expect("port"),
            document: "AWS-StartSSHSession".into(),
            port_parameter: Some(22),
            grants: Vec::new(),
        };
        let limits = Limits {
            total: 100,
            per_client_namespace: 100,
            per_instance: 100,
        };
        let records = Arc::new(Records::default());
        let clients = Clients {
            sink: Some(records.clone()),
            ..Clients::none()
        };
        let mut listeners = Listeners::new(context, limits, LOOPBACK, clients);
        let port = endpoint.listen_port;
        let endpoints = BTreeMap::from([(port, endpoint)]);
        assert!(listeners.apply(&endpoints).await.is_empty());
        Self {
            emulator,
            listeners,
            registry,
            records,
            port,
        }
    }

    /// Every connection's record so far.
    fn records(&self) -> Vec<ConnectionRecord> {
        self.records.0.lock().expect("records").clone()
    }

    /// The bridge's own count of open sessions.
    fn sessions_active(&self) -> String {
        let exported = metrics::encode(&self.registry);
        (exported.lines())
            .find_map(|line| line.strip_prefix("agent_bridge_sessions_active "))
            .unwrap_or_default()
            .to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_spend_the_memory_budget_and_no_more_and_lose_nothing() {
    let budget = MemoryBudget::new(BUDGET);
    let bridge = Bridge::start_with(requested_download().await, Some(&budget), None, None).await;
    let port = bridge.port;

    // Every session is admitted first (each with its floor); then the clients ask for their
    // downloads and read nothing: their sessions fill what the budget has, then hold back.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(port).await);
    }
    until("every session open", Duration::from_secs(30), || {
        bridge.sessions_active() == CLIENTS.to_string()
    })
    .await;
    for client in &mut clients {
        client.write_all(b"D").await.expect("ask for the download");
    }
    // No room for another session's floor: refused, with the reason. (While the kernel's
    // socket buffers still take what the writers write, a lease may shrink between the check
    // and the connection; a connection admitted then is dropped, and the check made again.)
    let refusal = b"fleet-access: refused: ";
    let mut answer = Vec::new();
    for _ in 0..20 {
        until("the budget being spent", Duration::from_secs(60), || {
            budget.limit() - budget.in_use() < SESSION_FLOOR && budget.waits() > 0
        })
        .await;
        let mut extra = connect(port).await;
        // Refused, the connection may be closed already.
        let _ = extra.write_all(b"D").await;
        answer = vec![0; refusal.len()];
        tokio::time::timeout(Duration::from_secs(30), extra.read_exact(&mut answer))
            .await
            .expect("the connection is answered")
            .expect("read the answer");
        if answer == refusal {
            extra
                .read_to_end(&mut answer)
                .await
                .expect("read the refusal");
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let reason = format!(
        "fleet-access: refused: the bridge's memory budget ({}) is spent",
        in_units(BUDGET)
    );
    assert!(answer.starts_with(&reason), "{answer:?}");

    // Every byte arrives, in order, once the clients read.
    let expected = pattern(DOWNLOAD);
    let reads: Vec<_> = (clients.into_iter())
        .map(|mut client| {
            tokio::spawn(async move {
                let mut received = Vec::with_capacity(DOWNLOAD);
                client.read_to_end(&mut received).await.expect("read");
                received
            })
        })
        .collect();
    let mut received = Vec::new();
    for read in reads {
        let bytes = tokio::time::timeout(Duration::from_secs(120), read)
            .await
            .expect("the download ends")
            .expect("the reader finishes");
        received.push(bytes);
    }
    for (client, received) in received.iter().enumerate() {
        assert!(
            *received == expected,
            "client {client}: {} of {DOWNLOAD} bytes, differing",
            received.len()
        );
    }

    let emulator = &bridge.emulator;
    let reports = emulator
        .wait_for_all_ended(Duration::from_secs(60))
        .await
        .expect("every session ends");
    assert!(
        emulator.violations().is_empty(),
        "{:?}",
        emulator.violations()
    );
    for report in &reports {
        assert!(
            report.retransmissions_to_client * 10 < report.messages_to_client,
            "the agent resent {} of {} messages: the bridge dropped what it could not hold",
            report.retransmissions_to_client,
            report.messages_to_client
        );
    }
    let exported = metrics::encode(&bridge.registry);
    bridge.listeners.shutdown(Duration::from_secs(10)).await;
    assert_eq!(budget.overdrawn(), 0, "no session held more than its share");
    assert_eq!(budget.in_use(), 0, "every session gave its share back");
    assert!(
        exported.contains(r#"agent_bridge_connections_refused_total{reason="memory_budget"} 1"#),
        "{exported}"
    );
    assert!(exported.contains(&format!("agent_bridge_memory_budget_bytes {BUDGET}")));
    assert!(exported.contains("agent_bridge_memory_budget_overdrawn_total 0"));
}

/// A client that leaves in the middle of a download ends its session at once, even while the
/// session has stopped reading for want of budget: what the instance still sends for it is
/// discarded, not held in front of the session's close until the transport times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_download_ends_its_session() {
    let budget = MemoryBudget::new(2 * SESSION_FLOOR);
    let bridge = Bridge::start(Some(&budget)).await;
    let mut client = connect(bridge.port).await;
    let mut head = vec![0; 100_000];
    client.read_exact(&mut head).await.expect("read");
    assert!(head == pattern(head.len()));
    until(
        "the session waiting for the budget",
        Duration::from_secs(60),
        || budget.waits() > 0,
    )
    .await;
    assert_eq!(bridge.sessions_active(), "1");
    drop(client);
    until("the session ending", Duration::from_secs(30), || {
        bridge.sessions_active() == "0"
    })
    .await;
    bridge
        .emulator
        .wait_for_all_ended(Duration::from_secs(30))
        .await
        .expect("the emulator saw the session end");
    assert!(bridge.emulator.violations().is_empty());
    bridge.listeners.shutdown(Duration::from_secs(10)).await;
    assert_eq!(budget.in_use(), 0);
}

/// A session that carries no byte for its idle timeout is ended by the bridge, and its record
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_ended_at_its_idle_timeout() {
    let greeting = 1000;
    let silent_after_greeting = target(greeting, false).await;
    let idle = Some(Duration::from_millis(300));
    let bridge = Bridge::start_with(silent_after_greeting, None, idle, None).await;
    let mut client = connect(bridge.port).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut received));
    read.await
        .expect("the bridge closes the connection")
        .expect("read");
    assert!(received == pattern(greeting));
    until("the record", Duration::from_secs(30), || {
        !bridge.records().is_empty()
    })
    .await;
    let record = &bridge.records()[0];
    assert_eq!(record.ended, Ended::Expired, "{record:?}");
    assert_eq!(record.detail.as_deref(), Some("Idle"));
    bridge.listeners.shutdown(Duration::from_secs(10)).await;
}

/// Sends [`pattern`] to every connection for as long as it stays open.
async fn endless_target() -> SocketAddr {
    let chunk = Arc::new(pattern(64 * 1024));
    target_serving(move |mut stream| {
        let chunk = chunk.clone();
        async move { while stream.write_all(&chunk).await.is_ok() {} }
    })
    .await
}

/// A session past its maximum duration is ended whatever it carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_session_is_ended_at_its_maximum_duration() {
    let idle = Some(Duration::from_secs(3600));
    let max = Some(Duration::from_millis(300));
    let bridge = Bridge::start_with(endless_target().await, None, idle, max).await;
    // The download never ends and the client reads it as fast as it comes: the session is
    // never idle.
    let mut client = connect(bridge.port).await;
    let mut sink = tokio::io::sink();
    let read = tokio::io::copy(&mut client, &mut sink);
    let copied = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the bridge closes the connection");
    assert!(copied.is_ok_and(|bytes| bytes > 0));
    until("the record", Duration::from_secs(30), || {
        !bridge.records().is_empty()
    })
    .await;
    let record = &bridge.records()[0];
    assert_eq!(record.ended, Ended::Expired, "{record:?}");
    assert_eq!(record.detail.as_deref(), Some("MaxDuration"));
    bridge.listeners.shutdown(Duration::from_secs(10)).await;
}

/// The instance sends a download and closes at once: the agent's channel_closed and the end of
/// its WebSocket come while the client is still reading. Every byte still reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_arrived_before_the_channel_closed_reaches_a_client_still_reading() {
    let bridge = Bridge::start(None).await;
    for _ in 0..3 {
        let mut client = connect(bridge.port).await;
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut received));
        read.await.expect("the download ends").expect("read");
        assert!(
            received == pattern(DOWNLOAD),
            "{} of {DOWNLOAD} bytes arrived",
            received.len()
        );
    }
    bridge
        .emulator
        .wait_for_all_ended(Duration::from_secs(30))
        .await
        .expect("every session ends");
    assert!(bridge.emulator.violations().is_empty());
    bridge.listeners.shutdown(Duration::from_secs(10)).await;
}
