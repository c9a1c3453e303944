//! The bridge end to end with real parts: OpenSSH client → bridge listener → the strict SSM
//! emulator → the real sshd, scraped by the real Prometheus; and `forward` carrying parallel HTTP
//! requests over one session.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use fleet_access_agent_bridge::{
    admin::{self, Readiness},
    cli::forward_request,
    driver::DriverConfig,
    listener::Limits,
    metrics::Metrics,
    ssm::SdkControlPlane,
    tunnel::SessionContext,
};
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running};
use fleet_access_tests::{Prometheus, Sshd, free_loopback_port};
use prometheus::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

const WEB: &str = "i-0123456789abcdef0";
const DB: &str = "i-0fedcba9876543210";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The emulator with two instances whose port 22 leads to `sshd`.
async fn emulator(sshd: &Sshd, mode: Mode, extra: &[(&str, u16, SocketAddr)]) -> Running {
    let sshd_address = SocketAddr::new(LOOPBACK, sshd.port());
    let mut config = Config {
        mode,
        ..Config::default()
    };
    for id in [WEB, DB] {
        let mut instance = InstanceConfig::new(id).with_port("22", sshd_address);
        for (extra_id, port, to) in extra {
            if *extra_id == id {
                instance = instance.with_port(port.to_string(), *to);
            }
        }
        config.instances.push(instance);
    }
    Emulator::start(config).await.expect("emulator starts")
}

fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    fleet_access_tests::moto::sdk_config_for(endpoint)
}

fn context(emulator: &Running, registry: &Registry) -> Arc<SessionContext<SdkControlPlane>> {
    Arc::new(SessionContext {
        control: Arc::new(SdkControlPlane::new(&sdk_config(&emulator.endpoint_url()))),
        signer: None,
        driver: DriverConfig {
            end_on_local_eof: true,
            ..DriverConfig::default()
        },
        metrics: Metrics::register(registry).expect("metrics"),
        idle_timeout: None,
        max_duration: None,
    })
}

/// `ssh` to the bridge listener on `port`, trusting sshd's host key under its own name.
fn ssh_via(sshd: &Sshd, port: u16) -> Command {
    let mut command = Command::new("ssh");
    command
        .args(sshd.client_options())
        .arg("-o")
        .arg(format!("HostKeyAlias=[127.0.0.1]:{}", sshd.port()))
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("{}@127.0.0.1", sshd.user()));
    command
}

fn run_ok(command: &mut Command) -> String {
    let output = command.stdin(Stdio::null()).output().expect("runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A tiny HTTP server answering every request with its own path.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&head)
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_owned();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{path}",
                    path.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forward_carries_parallel_http_requests_over_one_session() {
    let sshd = Sshd::start().await.expect("sshd");
    let web = http_server().await;
    let emulator = emulator(&sshd, Mode::Fast, &[(WEB, 8080, web)]).await;
    let control = SdkControlPlane::new(&sdk_config(&emulator.endpoint_url()));
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let local = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let request = forward_request(WEB, 8080, None);
    let forwarding = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            fleet_access_agent_bridge::cli::forward(&control, None, &request, listener, shutdown)
                .await
        })
    };
    let mut requests = Vec::new();
    for i in 0..20 {
        requests.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(local).await.expect("connect");
            stream
                .write_all(format!("GET /request-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            response
        }));
    }
    for (i, request) in requests.into_iter().enumerate() {
        let response = request.await.expect("join");
        assert!(
            response.starts_with("HTTP/1.1 200 OK") && response.ends_with(&format!("/request-{i}")),
            "{response}"
        );
    }
    shutdown.cancel();
    forwarding
        .await
        .expect("join")
        .expect("forward ends cleanly");
    let sessions = emulator.session_reports();
    assert_eq!(sessions.len(), 1, "one session carried every connection");
    assert!(
        emulator.violations().is_empty(),
        "{:?}",
        emulator.violations()
    );
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_what_a_session_caused() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(&sshd, Mode::Fast, &[]).await;
    let registry = Registry::new();
    let context = context(&emulator, &registry);
    let admin_listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let admin_address = admin_listener.local_addr().expect("address");
    let stop = CancellationToken::new();
    tokio::spawn(admin::serve(
        admin_listener,
        registry.clone(),
        Readiness::default(),
        stop.clone(),
    ));
    let prometheus = Prometheus::start(&[admin_address])
        .await
        .expect("prometheus");

    let endpoint = fleet_access_agent_bridge::listener::Endpoint {
        instance_id: WEB.into(),
        port: 22,
        listen_port: free_loopback_port().expect("port"),
        document: "AWS-StartSSHSession".into(),
        port_parameter: Some(22),
    };
    let mut listeners = fleet_access_agent_bridge::listener::Listeners::new(
        context,
        Limits {
            total: 10,
            per_instance: 10,
        },
        LOOPBACK,
    );
    let desired = BTreeMap::from([((WEB.to_owned(), 22), endpoint.clone())]);
    assert!(listeners.apply(&desired).await.is_empty());
    let output = run_ok(ssh_via(&sshd, endpoint.listen_port).arg("head -c 100000 /dev/zero"));
    assert_eq!(output.len(), 100_000);

    let sessions = prometheus
        .query_until_present(
            r#"agent_bridge_session_setup_seconds_count{phase="total"}"#,
            Duration::from_secs(30),
        )
        .await
        .expect("scraped");
    assert_eq!(sessions[0].value, 1.0);
    let received = prometheus
        .query_until_present(
            r#"agent_bridge_transferred_bytes_total{direction="from_instance"} > 100000"#,
            Duration::from_secs(30),
        )
        .await
        .expect("bytes scraped");
    assert!(received[0].value > 100_000.0);
    listeners.shutdown(Duration::from_secs(1)).await;
    stop.cancel();
}
