//! The bridge end to end with real parts: OpenSSH client → bridge (endpoints from Services in a
//! real kube-apiserver, or `proxy`, or `forward`) → the strict SSM emulator → the real sshd, and
//! the real Prometheus scraping the bridge.

#![allow(clippy::panic)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use fleet_access_agent_bridge::{
    admin::{self, Readiness},
    audit::{Collected, ConnectionRecord, Ended},
    budget::{MemoryBudget, SESSION_FLOOR, in_units},
    forward::{Pool, forward},
    listener::Limits,
    metrics::Metrics,
    serve::{self, ServeConfig},
    ssm::SdkControlPlane,
    ssm::{ControlPlane as _, StartSessionRequest},
    stream_url::StreamUrls,
    tunnel::SessionContext,
};
use fleet_access_crds::bridge_contract::{
    EndpointAnnotations, EndpointPort, GRANT_PORTS_ANNOTATION, bridge_pod_selector, managed_labels,
};
use fleet_access_ssm_emulator::{
    Config, Emulator, Faults, HandshakeAck, InstanceConfig, Mode, Running, SessionReport,
    SessionStatus, TlsFiles, Transfer,
};
use fleet_access_tests::{
    ControlPlane, GatedSink, Moto, Prometheus, RefusingAddress, Sshd, TestNamespace,
    certificates::LoopbackTls, free_loopback_port, http_get,
};
use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    networking::v1::{NetworkPolicy, NetworkPolicyPeer},
};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use prometheus::Registry;
use sha2::{Digest, Sha256};
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
    Emulator::start(emulator_config(sshd, mode, extra))
        .await
        .expect("emulator starts")
}

/// The configuration of [`emulator`].
fn emulator_config(sshd: &Sshd, mode: Mode, extra: &[(&str, u16, SocketAddr)]) -> Config {
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
    config
}

fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    fleet_access_tests::moto::sdk_config_for(endpoint)
}

/// The emulator's SSM API; its stream URLs are plain `ws://` on loopback.
fn control_plane(emulator: &Running) -> SdkControlPlane {
    SdkControlPlane::new(&sdk_config(&emulator.endpoint_url())).with_stream_urls(StreamUrls::Any)
}

fn context(emulator: &Running, registry: &Registry) -> Arc<SessionContext<SdkControlPlane>> {
    Arc::new(SessionContext::per_connection(
        Arc::new(control_plane(emulator)),
        None,
        Metrics::register(registry).expect("metrics"),
    ))
}

/// `ssh` to the bridge listener on `port`, trusting sshd's host key under its own name.
fn ssh_via(sshd: &Sshd, port: u16) -> Command {
    sshd.ssh_command_via(SocketAddr::new(LOOPBACK, port))
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

/// An endpoint Service as the operator writes it.
fn endpoint_service(instance: &str, ports: &[(u16, u16)]) -> Service {
    let ports: Vec<EndpointPort> = (ports.iter())
        .map(|(port, target)| ssh_endpoint(*port, *target))
        .collect();
    endpoint_service_of(instance, &ports)
}

/// An endpoint through AWS-StartSSHSession to `port`, served on `target`.
fn ssh_endpoint(port: u16, target: u16) -> EndpointPort {
    EndpointPort {
        port,
        target_port: target,
        document: "AWS-StartSSHSession".into(),
        port_parameter: Some(port),
    }
}

/// The grant the test Services record as exposing their ports.
const TEST_GRANT: &str = "tests/bridge-e2e";

fn endpoint_service_of(instance: &str, ports: &[EndpointPort]) -> Service {
    let endpoint = EndpointAnnotations {
        instance_id: instance.to_owned(),
        remote_host: None,
        ports: ports.to_vec(),
    };
    let mut annotations = endpoint.render();
    annotations.insert(
        GRANT_PORTS_ANNOTATION.to_owned(),
        serde_json::json!({ TEST_GRANT: ports }).to_string(),
    );
    Service {
        metadata: ObjectMeta {
            name: Some(instance.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(bridge_pod_selector()),
            ports: Some(
                ports
                    .iter()
                    .map(|endpoint| ServicePort {
                        name: Some(format!("p{}", endpoint.port)),
                        port: i32::from(endpoint.port),
                        target_port: Some(
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                                i32::from(endpoint.target_port),
                            ),
                        ),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Every loopback address, as a grant's clients.
fn loopback_clients() -> Vec<NetworkPolicyPeer> {
    serde_json::from_value(serde_json::json!([{"ipBlock": {"cidr": "127.0.0.0/8"}}]))
        .expect("peers")
}

/// Writes [`TEST_GRANT`]'s NetworkPolicy in the bridge's `namespace` as the operator renders
/// it: `clients` to `target_ports`.
async fn admit(
    namespace: &TestNamespace,
    clients: &[NetworkPolicyPeer],
    target_ports: impl IntoIterator<Item = u16>,
) {
    let policy = fleet_access_operator::model::endpoints::render_network_policy(
        namespace.name(),
        TEST_GRANT,
        clients,
        &target_ports.into_iter().collect(),
    );
    (namespace.api::<NetworkPolicy>())
        .create(&PostParams::default(), &policy)
        .await
        .expect("the grant's NetworkPolicy");
}

/// Writes an endpoint Service in `namespace` for each of `endpoints` (instance, port, document,
/// portNumber parameter), each to a free loopback target port, and [`TEST_GRANT`]'s
/// NetworkPolicy admitting `clients` to them; returns the target ports by instance.
async fn write_endpoints(
    namespace: &TestNamespace,
    endpoints: &[(&'static str, u16, &str, Option<u16>)],
    clients: &[NetworkPolicyPeer],
) -> BTreeMap<&'static str, u16> {
    let services = namespace.api::<Service>();
    let mut ports = BTreeMap::new();
    for (instance, port, document, port_parameter) in endpoints {
        let target_port = free_loopback_port().expect("port");
        let endpoint = EndpointPort {
            port: *port,
            target_port,
            document: (*document).to_owned(),
            port_parameter: *port_parameter,
        };
        services
            .create(
                &PostParams::default(),
                &endpoint_service_of(instance, &[endpoint]),
            )
            .await
            .expect("service");
        ports.insert(*instance, target_port);
    }
    admit(namespace, clients, ports.values().copied()).await;
    ports
}

/// Waits (up to a minute, on a loaded machine) until `port` accepts connections or refuses them.
async fn wait_listening(port: u16, up: bool) {
    for _ in 0..1200 {
        if TcpStream::connect((LOOPBACK, port)).await.is_ok() == up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "port {port} did not become {}",
        if up { "open" } else { "closed" }
    );
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `agent-bridge`, built with the workspace's other binaries when needed.
fn bridge_binary() -> PathBuf {
    fleet_access_tests::workspace_binary("agent-bridge").expect("agent-bridge builds")
}

/// `agent-bridge serve` (in-process) on a fresh namespace of the real kube-apiserver that holds one
/// endpoint Service per instance (port 22 to a free loopback port each).
struct Served {
    namespace: TestNamespace,
    ports: BTreeMap<&'static str, u16>,
    /// Each connection's audit record.
    audit: Collected,
    readiness: Readiness,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start(
        prefix: &str,
        context: Arc<SessionContext<SdkControlPlane>>,
        instances: &[&'static str],
        limits: Limits,
    ) -> Self {
        let endpoints: Vec<_> = (instances.iter())
            .map(|instance| (*instance, 22, "AWS-StartSSHSession", Some(22)))
            .collect();
        Self::start_endpoints(prefix, context, &endpoints, limits).await
    }

    /// Serves one endpoint per instance: (instance, port, document, portNumber parameter), to
    /// every loopback client.
    async fn start_endpoints(
        prefix: &str,
        context: Arc<SessionContext<SdkControlPlane>>,
        endpoints: &[(&'static str, u16, &str, Option<u16>)],
        limits: Limits,
    ) -> Self {
        Self::start_admitting(prefix, context, endpoints, limits, &loopback_clients()).await
    }

    /// Serves the endpoints, admitting `clients` to them as [`TEST_GRANT`]'s NetworkPolicy.
    async fn start_admitting(
        prefix: &str,
        context: Arc<SessionContext<SdkControlPlane>>,
        endpoints: &[(&'static str, u16, &str, Option<u16>)],
        limits: Limits,
        clients: &[NetworkPolicyPeer],
    ) -> Self {
        let control_plane = ControlPlane::shared().await.expect("control plane");
        let namespace = control_plane.namespace(prefix).await.expect("namespace");
        let ports = write_endpoints(&namespace, endpoints, clients).await;
        let client = namespace.client();
        let served = Self::serve_as(namespace, ports, client, context, limits);
        for port in served.ports.values() {
            wait_listening(*port, true).await;
        }
        // Listening comes first: the bridge is ready once it has applied all it watched.
        tokio::time::timeout(Duration::from_secs(60), served.readiness.reached(true))
            .await
            .expect("the bridge became ready");
        served
    }

    /// Starts `serve` on `namespace`'s endpoint Services (their target `ports` by instance),
    /// with `client`'s identity, and waits for nothing.
    fn serve_as(
        namespace: TestNamespace,
        ports: BTreeMap<&'static str, u16>,
        client: kube::Client,
        context: Arc<SessionContext<SdkControlPlane>>,
        limits: Limits,
    ) -> Self {
        let (readiness, shutdown) = (Readiness::default(), CancellationToken::new());
        let audit = Collected::default();
        let config = ServeConfig {
            namespace: namespace.name().to_owned(),
            listen_address: LOOPBACK,
            limits,
            grace: Duration::from_secs(30),
            attribute_clients: true,
            check_client_policies: true,
            audit: Arc::new(audit.clone()),
        };
        let server = tokio::spawn(serve::run(
            client,
            context,
            config,
            readiness.clone(),
            shutdown.clone(),
        ));
        Self {
            namespace,
            ports,
            audit,
            readiness,
            shutdown,
            server,
        }
    }

    /// The audit records once `enough` holds of them (at most a minute): a record is written
    /// when its connection has ended, which may come after what the test waited for.
    async fn records_when(
        &self,
        enough: impl Fn(&[ConnectionRecord]) -> bool,
    ) -> Vec<ConnectionRecord> {
        let mut records = Vec::new();
        for _ in 0..1200 {
            records = self.audit.records();
            if enough(&records) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        records
    }

    fn port(&self, instance: &str) -> u16 {
        self.ports[instance]
    }

    /// SIGTERM's path: cancel, then wait for the drain to finish.
    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.expect("serve ends");
    }
}

/// `mib` MiB of a fixed pattern (not all zeros, so nothing along the way can shortcut it).
fn test_file(dir: &Path, mib: u32) -> PathBuf {
    let path = dir.join(format!("up-{mib}.bin"));
    let data: Vec<u8> = (0..mib * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).expect("write");
    path
}

/// Copies `file` up through the bridge listener on `port` and back down, and checks both copies
/// against the original by SHA-256.
fn scp_round_trip(sshd: &Sshd, port: u16, file: &Path) {
    let dir = file.parent().expect("parent");
    let (remote, download) = (dir.join("remote.bin"), dir.join("down.bin"));
    let scp = |from: String, to: String| {
        let mut command = Command::new("scp");
        command
            .args(sshd.client_options())
            .arg("-o")
            .arg(format!("HostKeyAlias=[127.0.0.1]:{}", sshd.port()))
            .arg("-P")
            .arg(port.to_string())
            .arg(from)
            .arg(to);
        command
    };
    let user = sshd.user();
    run_ok(&mut scp(
        file.display().to_string(),
        format!("{user}@127.0.0.1:{}", remote.display()),
    ));
    assert_eq!(sha256_file(&remote), sha256_file(file), "upload intact");
    run_ok(&mut scp(
        format!("{user}@127.0.0.1:{}", remote.display()),
        download.display().to_string(),
    ));
    assert_eq!(sha256_file(&download), sha256_file(file), "download intact");
}

/// Waits until every session the emulator started has ended, then checks that none broke the
/// protocol (the emulator judges a session's last frames too, so only an ended session's
/// verdict is final). Returns the sessions' reports.
async fn all_sessions_ended(emulator: &Running) -> Vec<SessionReport> {
    let reports = emulator
        .wait_for_all_ended(Duration::from_secs(60))
        .await
        .expect("every session ends");
    let violations = emulator.violations();
    assert!(violations.is_empty(), "{violations:?}");
    reports
}

/// `ssh` to the sshd behind instance WEB with `agent-bridge proxy` against `emulator` as its
/// ProxyCommand and test credentials; the remote command is the caller's.
fn ssh_through_proxy(sshd: &Sshd, emulator: &Running) -> Command {
    let proxy = format!(
        "{} proxy %h %p --region us-east-1 --ssm-endpoint {} --allow-any-stream-url",
        bridge_binary().display(),
        emulator.endpoint_url()
    );
    let mut ssh = Command::new("ssh");
    ssh.args(sshd.client_options())
        .arg("-o")
        .arg(format!("HostKeyAlias=[127.0.0.1]:{}", sshd.port()))
        .arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .arg(format!("{}@{WEB}", sshd.user()));
    ssh
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ssh_through_proxy_as_proxycommand() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(&sshd, Mode::Realistic, &[]).await;
    let mut ssh = ssh_through_proxy(&sshd, &emulator);
    ssh.arg("echo hello-through-the-bridge");
    assert_eq!(run_ok(&mut ssh).trim(), "hello-through-the-bridge");
    // ssh ends its ProxyCommand with SIGHUP; the proxy then terminates the session.
    let sessions = all_sessions_ended(&emulator).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
}

/// A gateway serving `wss://` with a certificate from a test CA: the proxy carries ssh over TLS
/// when it trusts that CA (through `SSL_CERT_FILE`, as any rustls or OpenSSL client), and refuses
/// the gateway, before any byte of the token or signature is sent, when it trusts another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_speaks_tls_to_a_gateway_it_trusts_and_refuses_any_other() {
    let sshd = Sshd::start().await.expect("sshd");
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = LoopbackTls::generate("ssm-emulator gateway").expect("certificates");
    let stranger = LoopbackTls::generate("another gateway").expect("certificates");
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let mut config = emulator_config(&sshd, Mode::Realistic, &[]);
    config.tls = Some(TlsFiles {
        certificate: write("gateway.pem", &gateway.cert_pem),
        private_key: write("gateway-key.pem", &gateway.key_pem),
    });
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let (trusted, untrusted) = (
        write("trusted-ca.pem", &gateway.ca_cert_pem),
        write("stranger-ca.pem", &stranger.ca_cert_pem),
    );

    let mut ssh = ssh_through_proxy(&sshd, &emulator);
    ssh.env("SSL_CERT_FILE", &trusted)
        .env_remove("SSL_CERT_DIR")
        .arg("echo hello-over-tls");
    assert_eq!(run_ok(&mut ssh).trim(), "hello-over-tls");
    let sessions = all_sessions_ended(&emulator).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let stats = emulator.stats();
    assert_eq!(
        (stats.tls_connections, stats.plain_upgrades_refused),
        (1, 0),
        "{stats:?}"
    );

    let mut refused = proxy_command(&emulator, WEB);
    refused
        .env("SSL_CERT_FILE", &untrusted)
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::piped());
    let mut child = refused.spawn().expect("proxy starts");
    let _held_open = child.stdin.take();
    let output = exits_soon(child, "a refused certificate").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("TLS certificate was refused"), "{stderr}");
    let sessions = all_sessions_ended(&emulator).await;
    let refused = sessions.last().expect("the refused session");
    assert_eq!(refused.connections, 0, "{refused:?}");
    assert_eq!(emulator.stats().tls_connections, 1);
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_explains_what_a_person_can_fix() {
    const OFFLINE: &str = "i-0000000000000aaaa";
    const OLD_AGENT: &str = "i-0000000000000bbbb";
    const NOTHING_LISTENS: &str = "i-0000000000000cccc";
    let refusing = RefusingAddress::bind().expect("a refusing address");
    let closed_port = refusing.address();
    let mut config = Config {
        mode: Mode::Fast,
        ..Config::default()
    };
    let mut offline = InstanceConfig::new(OFFLINE).with_port("22", closed_port);
    offline.ping_status = "ConnectionLost".into();
    config.instances = vec![
        offline,
        InstanceConfig::new(OLD_AGENT)
            .with_agent_version("2.3.0.0")
            .with_port("22", closed_port),
        InstanceConfig::new(NOTHING_LISTENS).with_port("22", closed_port),
    ];
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let no_credentials = tempfile::tempdir().expect("tempdir");
    // (instance, with credentials, dial the emulator's ws:// stream URLs, what stderr says)
    let cases: [(&str, bool, bool, &str); 6] = [
        ("i-00000000000000000", true, true, "i-00000000000000000"),
        (
            OFFLINE,
            true,
            true,
            "is not connected to Systems Manager (ping status ConnectionLost)",
        ),
        (
            OLD_AGENT,
            true,
            true,
            "too old for SSH: update it to 2.3.672.0 or later",
        ),
        (
            NOTHING_LISTENS,
            true,
            true,
            "Unable to connect to specified port",
        ),
        (NOTHING_LISTENS, false, true, "no AWS credentials found"),
        (NOTHING_LISTENS, true, false, "is not encrypted (wss://)"),
    ];
    for (instance, with_credentials, any_stream_url, expected) in cases {
        let mut proxy = Command::new(bridge_binary());
        proxy
            .args(["proxy", instance, "22", "--region", "us-east-1"])
            .args(any_stream_url.then_some("--allow-any-stream-url"))
            .arg("--ssm-endpoint")
            .arg(emulator.endpoint_url())
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            // No instance metadata service: nothing may try an outside address.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", no_credentials.path().join("config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                no_credentials.path().join("credentials"),
            );
        if with_credentials {
            proxy
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing");
        }
        let output = run_as_proxy_command(proxy).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{instance}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{instance}: expected {expected:?} in {stderr}"
        );
    }
    // The session whose stream URL was refused was ended at once, its WebSocket never opened:
    // neither the token nor a signature went to that URL.
    let sessions = all_sessions_ended(&emulator).await;
    let refused = sessions.last().expect("the refused session");
    assert_eq!(refused.connections, 0, "{refused:?}");
}

/// Runs `proxy` as ssh runs a ProxyCommand: its standard input stays open (ssh closes it only
/// when it is done), so the proxy must end on its own when the session does. Fails the test when
/// it has not within a minute.
async fn run_as_proxy_command(proxy: Command) -> std::process::Output {
    let mut proxy = tokio::process::Command::from(proxy);
    let mut child = proxy
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("proxy starts");
    let _held_open = child.stdin.take();
    exits_within(child, Duration::from_secs(60), "its session").await
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_follows_services_and_carries_ssh_and_scp() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(&sshd, Mode::Fast, &[]).await;
    let registry = Registry::new();
    let limits = Limits {
        total: 100,
        per_client_namespace: 100,
        per_instance: 60,
    };
    let served = Served::start(
        "bridge-serve",
        context(&emulator, &registry),
        &[WEB, DB],
        limits,
    )
    .await;
    let (web_port, db_port) = (served.port(WEB), served.port(DB));

    // Commands run on both instances.
    for port in [web_port, db_port] {
        assert_eq!(
            run_ok(ssh_via(&sshd, port).arg("echo via-serve")).trim(),
            "via-serve"
        );
    }

    // 50 MiB each way, byte for byte.
    let dir = tempfile::tempdir().expect("tempdir");
    scp_round_trip(&sshd, web_port, &test_file(dir.path(), 50));

    // Removing the DB Service closes its listener and its open tunnel; WEB is untouched.
    let long = started_remotely(ssh_via(&sshd, db_port).arg("echo started; sleep 60")).await;
    served
        .namespace
        .api::<Service>()
        .delete(DB, &DeleteParams::default())
        .await
        .expect("delete");
    wait_listening(db_port, false).await;
    let output = tokio::task::spawn_blocking(move || long.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(
        !output.status.success() && output.stdout.is_empty(),
        "the tunnel of a removed endpoint is closed before the command ends: {output:?}"
    );
    assert_eq!(
        run_ok(ssh_via(&sshd, web_port).arg("echo still-there")).trim(),
        "still-there"
    );

    served.stop().await;
    let sessions = all_sessions_ended(&emulator).await;
    // Two commands, two copies, one cut and one more command, and the connections the test
    // made to see a listener open or closed (each a session of its own).
    assert!(sessions.len() >= 6, "{sessions:?}");
    let text = fleet_access_agent_bridge::metrics::encode(&registry);
    assert!(
        text.contains(&format!(
            r#"agent_bridge_sessions_started_total{{document="AWS-StartSSHSession"}} {}"#,
            sessions.len()
        )),
        "every session the emulator saw is counted once: {text}"
    );
}

/// Spawns `ssh`, whose remote command prints `started` first, and returns once it has: the
/// session is open end to end. Its standard output is read to the end by `wait_with_output`.
async fn started_remotely(ssh: &mut Command) -> std::process::Child {
    let mut child = ssh
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ssh");
    let mut stdout = child.stdout.take().expect("stdout");
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = [0u8; 8];
        std::io::Read::read_exact(&mut stdout, &mut line).map(|()| (line, stdout))
    });
    let (line, stdout) = tokio::time::timeout(Duration::from_secs(60), first_line)
        .await
        .expect("the remote command starts within 60 s")
        .expect("join")
        .expect("the remote command prints its first line");
    assert_eq!(&line, b"started\n");
    child.stdout = Some(stdout);
    child
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_ssh_sessions_to_several_instances() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(&sshd, Mode::Realistic, &[]).await;
    let registry = Registry::new();
    let limits = Limits {
        total: 100,
        per_client_namespace: 100,
        per_instance: 60,
    };
    let served = Served::start(
        "bridge-fifty",
        context(&emulator, &registry),
        &[WEB, DB],
        limits,
    )
    .await;
    // Each remote command checks in, then waits (up to 2 minutes) until all 50 have: none can
    // answer unless all 50 sessions were open at once.
    const SESSIONS: usize = 50;
    let here = tempfile::tempdir().expect("tempdir");
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let port = served.port(if i % 2 == 0 { WEB } else { DB });
            let mut ssh = ssh_via(&sshd, port);
            ssh.arg(format!(
                "cd {}; touch {i}; n=0; until [ $(ls | wc -l) -ge {SESSIONS} ]; do \
                 n=$((n+1)); [ $n -lt 1200 ] || exit 3; sleep 0.1; done; echo session-{i}",
                here.path().display()
            ));
            tokio::task::spawn_blocking(move || run_ok(&mut ssh))
        })
        .collect();
    for (i, session) in sessions.into_iter().enumerate() {
        assert_eq!(session.await.expect("join").trim(), format!("session-{i}"));
    }
    let probes = served.ports.len();
    served.stop().await;
    // One session per ssh, plus the readiness probe of each listener.
    assert_eq!(all_sessions_ended(&emulator).await.len(), SESSIONS + probes);
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_during_scp_leave_the_file_intact() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(&sshd, Mode::Fast, &[]).await;
    // Loss, reordering and duplicates in both directions, corrupted digests, and three WebSocket
    // recycles per session: the reliability layer and ResumeSession must hide all of it.
    emulator.set_instance_faults(
        WEB,
        Faults {
            drop_every: Some(20),
            reorder_window: Some(4),
            duplicate_every: Some(50),
            corrupt_digest_every: Some(97),
            drop_client_every: Some(20),
            recycle_after_frames: Some(100),
            connection_faults: Some(3),
            ..Faults::default()
        },
    );
    let registry = Registry::new();
    let limits = Limits {
        total: 10,
        per_client_namespace: 10,
        per_instance: 10,
    };
    let served = Served::start(
        "bridge-faults",
        context(&emulator, &registry),
        &[WEB],
        limits,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    scp_round_trip(&sshd, served.port(WEB), &test_file(dir.path(), 8));
    served.stop().await;
    all_sessions_ended(&emulator).await;
    let text = fleet_access_agent_bridge::metrics::encode(&registry);
    let reconnects = text
        .lines()
        .find_map(|line| line.strip_prefix("agent_bridge_reconnects_total "))
        .and_then(|value| value.parse::<f64>().ok())
        .expect("reconnects exported");
    assert!(reconnects >= 1.0, "the faults caused reconnects: {text}");
    let retransmissions = text
        .lines()
        .find_map(|line| line.strip_prefix("agent_bridge_retransmissions_total "))
        .and_then(|value| value.parse::<f64>().ok())
        .expect("retransmissions exported");
    assert!(
        retransmissions >= 1.0,
        "dropped uploads were retransmitted: {text}"
    );
}

// Multi-threaded: the tests run ssh and scp as blocking child processes while the bridge
// serves them on other worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_a_transfer_that_ends_within_the_grace_period() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(&sshd, Mode::Fast, &[]).await;
    let limits = Limits {
        total: 10,
        per_client_namespace: 10,
        per_instance: 10,
    };
    let served = Served::start(
        "bridge-drain",
        context(&emulator, &Registry::new()),
        &[WEB],
        limits,
    )
    .await;
    let (port, readiness) = (served.port(WEB), served.readiness.clone());
    assert!(readiness.get());
    // A command that is running when shutdown starts, and ends 3 s later.
    let running =
        started_remotely(ssh_via(&sshd, port).arg("echo started; sleep 3; echo finished")).await;
    let stopping = tokio::spawn(served.stop());
    wait_listening(port, false).await;
    assert!(!readiness.get(), "not ready while draining");
    let output = tokio::task::spawn_blocking(move || running.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "finished");
    stopping.await.expect("drained");
}

/// `agent-bridge forward` (in-process) from a loopback port to `port` on `instance`.
struct Forwarding {
    local: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Forwarding {
    async fn start(emulator: &Running, instance: &str, port: u16) -> Self {
        let request = StartSessionRequest::forwarding(instance, port, None, "agent-bridge forward");
        Self::start_session(emulator, request).await
    }

    /// `forward` of any request over one session (`--max-sessions 1`): `--document` gives one
    /// of a grant's own documents.
    async fn start_session(emulator: &Running, request: StartSessionRequest) -> Self {
        let one = Pool {
            max_sessions: 1,
            ..Pool::default()
        };
        Self::start_pooled(emulator, request, one).await
    }

    /// `forward` of `request` over a pool of sessions.
    async fn start_pooled(emulator: &Running, request: StartSessionRequest, pool: Pool) -> Self {
        let control = control_plane(emulator);
        let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
        let local = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                forward(&control, None, &request, listener, shutdown, pool).await
            })
        };
        Self {
            local,
            shutdown,
            task,
        }
    }

    /// Ctrl-C's path: cancel, then wait for the session to end.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("join")
            .expect("forward ends cleanly");
    }
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
    // HandshakeComplete before the ack of the HandshakeResponse: the rarer order of the
    // agent's race, which the official plugin's mux session does not survive.
    let config = Config {
        handshake_ack: HandshakeAck::CompleteFirst,
        ..emulator_config(&sshd, Mode::Fast, &[(WEB, 8080, web)])
    };
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let forwarding = Forwarding::start(&emulator, WEB, 8080).await;
    let local = forwarding.local;
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
    forwarding.stop().await;
    let sessions = all_sessions_ended(&emulator).await;
    assert_eq!(sessions.len(), 1, "one session carried every connection");
    assert!(!sessions[0].handshake_ack_first, "{:?}", sessions[0]);
}

/// A server that answers each connection's request (a seed and a length, 4 bytes each, big
/// endian) with that many bytes of the seed's pattern, then closes.
async fn seeded_download_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if stream.read_exact(&mut request).await.is_err() {
                    return;
                }
                let seed = u32::from_be_bytes([request[0], request[1], request[2], request[3]]);
                let length = u32::from_be_bytes([request[4], request[5], request[6], request[7]]);
                let _ = stream.write_all(&pattern(seed, length as usize)).await;
            });
        }
    });
    address
}

/// Asks [`seeded_download_server`] (through `stream`) for `length` bytes of `seed`'s pattern;
/// what came until the end.
async fn seeded_download(mut stream: TcpStream, seed: u32, length: u32) -> Vec<u8> {
    let request = [seed.to_be_bytes(), length.to_be_bytes()].concat();
    stream.write_all(&request).await.expect("request");
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await.expect("download");
    received
}

/// An emulator whose instance WEB has a [`seeded_download_server`] at port 9000.
async fn with_seeded_downloads(sshd: &Sshd) -> Running {
    let downloads = seeded_download_server().await;
    let config = emulator_config(sshd, Mode::Fast, &[(WEB, 9000, downloads)]);
    Emulator::start(config).await.expect("emulator starts")
}

/// `length` bytes of a xorshift sequence from `seed`.
fn pattern(seed: u32, length: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forward_spreads_parallel_downloads_over_a_pool_and_closes_idle_sessions() {
    const PARALLEL: u32 = 8;
    const LENGTH: u32 = 256 * 1024;
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = with_seeded_downloads(&sshd).await;
    let pool = Pool {
        max_sessions: 4,
        idle: Duration::from_millis(300),
    };
    let request = StartSessionRequest::forwarding(WEB, 9000, None, "agent-bridge forward");
    let forwarding = Forwarding::start_pooled(&emulator, request, pool).await;
    let local = forwarding.local;

    // Eight downloads, which ask for their bytes only once the pool holds four sessions: until
    // then no connection can end, so each one that arrives finds every session busy, and the
    // pool opens a session per connection up to four, then shares them.
    let (release, released) = tokio::sync::watch::channel(false);
    let mut downloads = Vec::new();
    for seed in 1..=PARALLEL {
        let mut released = released.clone();
        downloads.push(tokio::spawn(async move {
            let stream = TcpStream::connect(local).await.expect("connect");
            released.wait_for(|r| *r).await.expect("released");
            (seed, seeded_download(stream, seed, LENGTH).await)
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while emulator.session_reports().len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "four sessions started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.send_replace(true);
    for download in downloads {
        let (seed, received) = download.await.expect("join");
        assert_eq!(
            received.len(),
            LENGTH as usize,
            "download {seed}: its length"
        );
        assert!(
            received == pattern(seed, LENGTH as usize),
            "download {seed}: byte-identical"
        );
    }
    let reports = emulator.session_reports();
    assert_eq!(
        reports.len(),
        4,
        "one session per connection, up to the pool's size"
    );
    assert!(reports.iter().all(|r| r.target == WEB));

    // Idle, the pool shrinks to its first session: every other one is terminated.
    let first = &reports[0].session_id;
    for report in &reports[1..] {
        let ended = emulator
            .wait_for_end(&report.session_id, Duration::from_secs(60))
            .await
            .expect("an idle pooled session is terminated");
        assert_eq!(ended.status, SessionStatus::Terminated, "{ended:?}");
    }
    let primary = emulator.session_report(first).expect("the first session");
    assert!(
        !primary.status.is_ended(),
        "the first session stays: {primary:?}"
    );
    // It still carries connections.
    let stream = TcpStream::connect(local).await.expect("connect");
    assert!(seeded_download(stream, 7, 1000).await == pattern(7, 1000));
    assert_eq!(
        emulator.session_reports().len(),
        4,
        "no new session for one connection"
    );

    forwarding.stop().await;
    let sessions = all_sessions_ended(&emulator).await;
    assert_eq!(sessions.len(), 4);
}

/// The emulator's control plane, whose StartSession calls after the first wait until `gate`
/// opens: a slow (or throttled) StartSession.
struct GatedStarts {
    inner: SdkControlPlane,
    started: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl fleet_access_agent_bridge::ssm::ControlPlane for GatedStarts {
    async fn start_session(
        &self,
        request: &StartSessionRequest,
    ) -> Result<
        fleet_access_agent_bridge::ssm::StreamTarget,
        fleet_access_agent_bridge::ssm::ControlPlaneError,
    > {
        if self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            let _ = self.gate.clone().wait_for(|open| *open).await;
        }
        self.inner.start_session(request).await
    }

    async fn resume_session(
        &self,
        session_id: &str,
    ) -> Result<
        Option<fleet_access_agent_bridge::ssm::Resumed>,
        fleet_access_agent_bridge::ssm::ControlPlaneError,
    > {
        self.inner.resume_session(session_id).await
    }

    async fn terminate_session(
        &self,
        session_id: &str,
    ) -> Result<(), fleet_access_agent_bridge::ssm::ControlPlaneError> {
        self.inner.terminate_session(session_id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_start_of_a_pooled_session_stalls_no_open_session() {
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = with_seeded_downloads(&sshd).await;
    let (gate, gated) = tokio::sync::watch::channel(false);
    let control = GatedStarts {
        inner: control_plane(&emulator),
        started: std::sync::atomic::AtomicUsize::new(0),
        gate: gated,
    };
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let local = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let request = StartSessionRequest::forwarding(WEB, 9000, None, "agent-bridge forward");
    let pool = Pool {
        max_sessions: 2,
        ..Pool::default()
    };
    let forwarding = {
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move { forward(&control, None, &request, listener, shutdown, pool).await },
        )
    };
    // A first connection holds the first session; a second asks for another session, whose
    // StartSession hangs.
    let first = TcpStream::connect(local).await.expect("connect");
    let _second = TcpStream::connect(local).await.expect("connect");
    // Meanwhile the first session carries a whole download.
    let received =
        tokio::time::timeout(Duration::from_secs(60), seeded_download(first, 3, 100_000))
            .await
            .expect("the open session carries on while another one starts");
    assert!(received == pattern(3, 100_000));
    assert_eq!(
        emulator.session_reports().len(),
        1,
        "the second start still waits"
    );
    // Stopped while the second session starts: once it exists, it is terminated too.
    shutdown.cancel();
    gate.send_replace(true);
    forwarding
        .await
        .expect("join")
        .expect("forward ends cleanly");
    all_sessions_ended(&emulator).await;
}

/// One HTTP request through `local`: the response.
async fn http_get_through(local: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(local).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

/// Each path's request through `local` is answered with that path.
async fn assert_answered(local: SocketAddr, paths: &[&str]) {
    for path in paths {
        let response = http_get_through(local, path).await;
        assert!(
            response.starts_with("HTTP/1.1 200 OK") && response.ends_with(path),
            "{response}"
        );
    }
}

/// What the operator renders for a grant of `port` on WEB to a person.
fn port_grant(port: u16) -> fleet_access_operator::model::desired::Desired {
    person_grant(&format!("{{ports: [{port}]}}"))
}

/// What the operator renders for a grant of `sessions` on WEB to a person, in a cluster of its
/// own (its shared documents' names are then unique in moto, which every test shares).
fn person_grant(sessions: &str) -> fleet_access_operator::model::desired::Desired {
    use fleet_access_operator::{model::desired, settings::Settings};
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let grant = fleet_access_crds::validation::parse_session_accesses(&format!(
        "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionAccess\n\
         metadata: {{name: db, namespace: data}}\n\
         spec: {{principals: {{users: [dana]}}, targets: {{instanceIds: [{WEB}]}}, sessions: {sessions}}}\n"
    ))
    .expect("a grant")
    .remove(0);
    let settings = Settings {
        cluster: format!("e2e-{}", &unique[..12]),
        ..Settings::default()
    };
    desired::compute(&grant, &settings).expect("renders")
}

/// An emulator with moto as its upstream (where the grants' documents are), whose instance WEB
/// has an HTTP server at port 5432.
async fn behind_port_5432(sshd: &Sshd) -> (&'static Moto, Running) {
    let web = http_server().await;
    let moto = Moto::shared().await.expect("moto");
    let config = Config {
        upstream: Some(moto.endpoint().to_owned()),
        ..emulator_config(sshd, Mode::Fast, &[(WEB, 5432, web)])
    };
    (
        moto,
        Emulator::start(config).await.expect("emulator starts"),
    )
}

/// A database the instance reaches, at a VPC address of its own.
const DB_HOST: &str = "orders.db.internal";

/// The emulator with `instance` alone, its documents in moto.
async fn emulator_with(moto: &Moto, instance: InstanceConfig) -> Running {
    let config = Config {
        upstream: Some(moto.endpoint().to_owned()),
        mode: Mode::Fast,
        instances: vec![instance],
        ..Config::default()
    };
    Emulator::start(config).await.expect("emulator starts")
}

/// `instance`, resolving [`DB_HOST`] to a VPC address whose port 5432 the emulator's network
/// leads to `database`.
fn with_database(instance: InstanceConfig, database: SocketAddr) -> InstanceConfig {
    instance
        .with_host(DB_HOST, vec!["10.0.3.17".parse().expect("address")])
        .with_port(format!("{DB_HOST}:5432"), database)
}

/// A person's grant to [`DB_HOST`] port 5432, with its documents in moto, and the name of the
/// document that pins that destination.
async fn database_grant(moto: &Moto) -> (fleet_access_operator::model::desired::Desired, String) {
    let rendered = person_grant(&format!(
        "{{remoteHosts: [{{host: {DB_HOST}, port: 5432}}]}}"
    ));
    create_documents(moto, &rendered).await;
    let cluster = rendered.grant.split('/').next().expect("the cluster");
    let document =
        fleet_access_crds::ssm_documents::remote_host_document_name(cluster, DB_HOST, 5432);
    (rendered, document)
}

/// Creates the grant's session documents in moto, as the operator does.
async fn create_documents(moto: &Moto, rendered: &fleet_access_operator::model::desired::Desired) {
    let ssm = aws_sdk_ssm::Client::new(&sdk_config(moto.endpoint()));
    for document in &rendered.documents {
        ssm.create_document()
            .name(&document.name)
            .content(document.content.to_string())
            .document_type(aws_sdk_ssm::types::DocumentType::Session)
            .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
            .send()
            .await
            .expect("the document in moto");
    }
}

/// A port grant is usable by a person: `forward --document` with the grant's own Port document
/// (as the operator renders and creates it, here in moto) carries bytes to the pinned port, and
/// SSM refuses the same document with a port of the caller's choosing or a malformed local port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forward_through_a_port_grants_own_document() {
    let sshd = Sshd::start().await.expect("sshd");
    let (moto, emulator) = behind_port_5432(&sshd).await;
    let rendered = port_grant(5432);
    // The document `plan` tells a person to forward through.
    let connection = rendered.connect.first().expect("plan's connection");
    let command = connection
        .agent_bridge
        .as_deref()
        .expect("an agent-bridge command");
    assert!(
        command.contains(&format!("--document {}", connection.document)),
        "{command}"
    );
    create_documents(moto, &rendered).await;
    let document = (rendered.documents.iter())
        .find(|d| d.name == connection.document)
        .expect("the grant's Port document");

    let request = StartSessionRequest::port(WEB, &document.name, None, "agent-bridge forward");
    let forwarding = Forwarding::start_session(&emulator, request).await;
    assert_answered(forwarding.local, &["/first", "/second"]).await;
    forwarding.stop().await;
    let sessions = all_sessions_ended(&emulator).await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].document_name, document.name);

    // The document pins the port: naming one is refused, as is a local port that is not one.
    let control = control_plane(&emulator);
    let other_port = StartSessionRequest::port(WEB, &document.name, Some(22), "widen");
    let error = control
        .start_session(&other_port)
        .await
        .expect_err("portNumber is not defined");
    assert!(
        error
            .message
            .contains("parameter portNumber is not defined"),
        "{error}"
    );
    let mut malformed = StartSessionRequest::port(WEB, &document.name, None, "odd");
    malformed
        .parameters
        .insert("localPortNumber".into(), vec!["80; rm -rf /".into()]);
    let error = control
        .start_session(&malformed)
        .await
        .expect_err("allowedPattern");
    assert!(error.message.contains("allowedPattern"), "{error}");
    let missing =
        StartSessionRequest::port(WEB, "fleet-access.default.data.nothing-port5432", None, "x");
    let error = control
        .start_session(&missing)
        .await
        .expect_err("no such document");
    assert!(error.message.contains("does not exist"), "{error}");
}

/// A remote-host grant is usable: the document it allows pins the host and the port, and
/// `forward` (as `forward --remote-host` starts it) and serve carry bytes through it to the
/// service the instance reaches under that name; the agent's checks hold: another host or port through the document is refused,
/// and an agent of 3.3.4851.0 or later refuses to forward to loopback, as AWS would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forward_through_a_remote_host_grants_document() {
    let web = http_server().await;
    let moto = Moto::shared().await.expect("moto");
    let instance = InstanceConfig::new(WEB).with_agent_version("3.3.4851.0");
    let emulator = emulator_with(moto, with_database(instance, web)).await;
    let (rendered, document) = database_grant(moto).await;
    let cluster = rendered.grant.split('/').next().expect("the cluster");
    let connection = (rendered.connect.iter())
        .find(|c| c.document == document)
        .expect("plan's connection to the database");
    assert_eq!(connection.host.as_deref(), Some(DB_HOST));

    let request = StartSessionRequest::port(WEB, &document, None, "agent-bridge forward");
    let forwarding = Forwarding::start_session(&emulator, request).await;
    assert_answered(forwarding.local, &["/orders", "/customers"]).await;
    forwarding.stop().await;
    // And through serve: an endpoint Service whose port leads to the same document.
    let served = Served::start_endpoints(
        "bridge-remote",
        context(&emulator, &Registry::new()),
        &[(WEB, 5432, &document, None)],
        Limits {
            total: 10,
            per_client_namespace: 10,
            per_instance: 10,
        },
    )
    .await;
    let local = SocketAddr::new(LOOPBACK, served.port(WEB));
    let response = http_get_through(local, "/through-serve").await;
    assert!(response.ends_with("/through-serve"), "{response}");
    served.stop().await;

    // The document pins both: neither another host nor another port gets through it.
    let control = control_plane(&emulator);
    for (name, value) in [("host", "other.db.internal"), ("portNumber", "22")] {
        let mut widened = StartSessionRequest::port(WEB, &document, None, "widen");
        widened.parameters.insert(name.into(), vec![value.into()]);
        let error = control
            .start_session(&widened)
            .await
            .expect_err("the document pins it");
        assert!(
            error
                .message
                .contains(&format!("parameter {name} is not defined")),
            "{error}"
        );
    }
    // A document to loopback (no grant can ask for one, but anyone with ssm:CreateDocument can
    // write it) is refused by the agent: the session fails with its words.
    let loopback =
        fleet_access_crds::ssm_documents::remote_host_document_name(cluster, "127.0.0.2", 5432);
    let content = fleet_access_operator::model::documents::remote_host_document(
        "to the instance itself",
        "127.0.0.2",
        5432,
    );
    aws_sdk_ssm::Client::new(&sdk_config(moto.endpoint()))
        .create_document()
        .name(&loopback)
        .content(content.to_string())
        .document_type(aws_sdk_ssm::types::DocumentType::Session)
        .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
        .send()
        .await
        .expect("the loopback document in moto");
    let request = StartSessionRequest::port(WEB, &loopback, None, "to the instance itself");
    let forwarding = Forwarding::start_session(&emulator, request).await;
    // The session ends by itself: forward returns without being stopped.
    forwarding.task.await.expect("join").expect("forward ends");
    let sessions = all_sessions_ended(&emulator).await;
    let refused = (sessions.iter())
        .find(|s| s.document_name == loopback)
        .expect("the session to loopback");
    assert_eq!(
        refused.close_reason.as_deref(),
        Some("Forwarding to IP address 127.0.0.2 is forbidden."),
        "{refused:?}"
    );
}

/// Agents older than remote-host support (3.1.1188.0) know no `host` parameter: the same
/// remote-host document then leads to the instance's own port. The emulator does as such an
/// agent does, so a client that forgets the version gate is caught here and not in production;
/// the operator's TargetsResolved condition warns of such instances (`AgentTooOld`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_too_old_for_remote_hosts_forwards_to_its_own_port() {
    use fleet_access_tests::targets::greeting_echo_server;
    let own = greeting_echo_server("the instance's own 5432\n")
        .await
        .expect("server");
    let database = greeting_echo_server("the database\n")
        .await
        .expect("server");
    let moto = Moto::shared().await.expect("moto");
    let (rendered, document) = database_grant(moto).await;
    let cluster = rendered.grant.split('/').next().expect("the cluster");
    for (agent, greeting) in [
        ("3.1.1080.0", "the instance's own 5432\n"),
        (
            fleet_access_crds::agent_version::REMOTE_HOST_MIN_AGENT,
            "the database\n",
        ),
    ] {
        let instance = (InstanceConfig::new(WEB).with_agent_version(agent)).with_port("5432", own);
        let emulator = emulator_with(moto, with_database(instance, database)).await;
        let request = StartSessionRequest::port(WEB, &document, None, "agent-bridge forward");
        let forwarding = Forwarding::start_session(&emulator, request).await;
        let mut stream = TcpStream::connect(forwarding.local).await.expect("connect");
        let mut said = vec![0; greeting.len()];
        tokio::time::timeout(Duration::from_secs(60), stream.read_exact(&mut said))
            .await
            .expect("an answer in time")
            .expect("read");
        assert_eq!(String::from_utf8_lossy(&said), greeting, "agent {agent}");
        drop(stream);
        forwarding.stop().await;
        // `agent-bridge forward --remote-host` asks the agent's version first, and refuses an
        // agent that would forward to its own port.
        if agent != "3.1.1080.0" {
            continue;
        }
        let mut forward = tokio::process::Command::new(bridge_binary());
        forward
            .args([
                "forward",
                WEB,
                "--remote-host",
                DB_HOST,
                "--remote-port",
                "5432",
            ])
            .args(["--cluster-name", cluster, "--local", "127.0.0.1:0"])
            .args([
                "--region",
                "us-east-1",
                "--allow-any-stream-url",
                "--ssm-endpoint",
            ])
            .arg(emulator.endpoint_url())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = forward.spawn().expect("forward starts");
        let output = exits_soon(child, "forward to a remote host on an old agent").await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains("too old to forward to a remote host"),
            "{stderr}"
        );
    }
}

/// The serve path through a grant's Port document (mux mode): each connection's session ends
/// with the connection, instead of holding the session and the bridge's slot until the idle
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_ends_a_mux_session_with_its_connection() {
    let sshd = Sshd::start().await.expect("sshd");
    let (moto, emulator) = behind_port_5432(&sshd).await;
    let rendered = port_grant(5432);
    create_documents(moto, &rendered).await;
    let document = rendered.documents[0].name.as_str();
    let limits = Limits {
        total: 10,
        per_client_namespace: 10,
        per_instance: 10,
    };
    let context = context(&emulator, &Registry::new());
    let served = Served::start_endpoints(
        "bridge-mux",
        context,
        &[(WEB, 5432, document, None)],
        limits,
    )
    .await;
    let local = SocketAddr::new(LOOPBACK, served.port(WEB));
    assert_answered(local, &["/one", "/two"]).await;
    // Every session ends while the bridge still serves: with its connection (the two requests',
    // and the readiness probe's of `Served::start`, which sent nothing).
    let sessions = all_sessions_ended(&emulator).await;
    assert!(sessions.len() >= 2, "{sessions:?}");
    for session in &sessions {
        assert_eq!(session.transfer, Some(Transfer::Mux), "{session:?}");
        assert_eq!(session.document_name, document);
    }
    served.stop().await;
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
        remote_host: None,
        port: 22,
        listen_port: free_loopback_port().expect("port"),
        document: "AWS-StartSSHSession".into(),
        port_parameter: Some(22),
        grants: Vec::new(),
    };
    let mut listeners = fleet_access_agent_bridge::listener::Listeners::new(
        context,
        Limits {
            total: 10,
            per_client_namespace: 10,
            per_instance: 10,
        },
        LOOPBACK,
        fleet_access_agent_bridge::listener::Clients::none(),
    );
    let desired = BTreeMap::from([(endpoint.listen_port, endpoint.clone())]);
    assert!(listeners.apply(&desired).await.is_empty());
    let output = run_ok(ssh_via(&sshd, endpoint.listen_port).arg("head -c 100000 /dev/zero"));
    assert_eq!(output.len(), 100_000);
    // The session's counters are final once it has ended (and the listener drained).
    all_sessions_ended(&emulator).await;
    listeners.shutdown(Duration::from_secs(10)).await;
    let exported = fleet_access_agent_bridge::metrics::encode(&registry);
    let received = exported
        .lines()
        .find_map(|line| {
            line.strip_prefix(r#"agent_bridge_transferred_bytes_total{direction="from_instance"} "#)
        })
        .and_then(|value| value.parse::<f64>().ok())
        .expect("bytes from the instance exported");
    assert!(
        received > 100_000.0,
        "the 100,000 bytes and ssh's own framing are counted: {received}"
    );

    // Prometheus scraped the same: one session, and the final byte count.
    let sessions = prometheus
        .query_until_present(
            r#"agent_bridge_session_setup_seconds_count{phase="total"}"#,
            Duration::from_secs(30),
        )
        .await
        .expect("scraped");
    assert_eq!(sessions[0].value, 1.0);
    prometheus
        .query_until_present(
            &format!(
                r#"agent_bridge_transferred_bytes_total{{direction="from_instance"}} == {received}"#
            ),
            Duration::from_secs(30),
        )
        .await
        .expect("Prometheus scrapes the final byte count");

    // Names, units, help texts and types pass Prometheus's own linter on the live scrape.
    let (code, scrape) = fleet_access_tests::http_get(admin_address, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(code, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(
        &mut promtool.stdin.take().expect("stdin"),
        scrape.as_bytes(),
    )
    .expect("feed promtool");
    let checked = promtool.wait_with_output().expect("promtool ends");
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{scrape}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    stop.cancel();
}

/// The download a slow reader takes: 16 MB, about twice what the bridge (4 MiB received and
/// not yet written, its socket's send buffer of up to 4 MiB) and the reader's small receive
/// buffer can hold while the reader is slow.
const DOWNLOAD_LEN: usize = 16_000_000;
/// How long the reader takes 10 KB/s before it reads as fast as it can. At the agent's own
/// pace (1 KiB per millisecond at most) a shorter slow phase is absorbed by buffers.
const SLOW_PHASE: Duration = Duration::from_secs(30);

fn download_pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// A server that sends [`DOWNLOAD_LEN`] bytes of [`download_pattern`] to each connection,
/// then closes it.
async fn download_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let address = listener.local_addr().expect("address");
    let data = Arc::new(download_pattern(DOWNLOAD_LEN));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let data = data.clone();
            let (mut r, mut w) = stream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            });
            tokio::spawn(async move {
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            });
        }
    });
    address
}

/// Reads from `local` to its end, with a 64 KiB receive buffer: 1 KB every 100 ms for
/// [`SLOW_PHASE`], then as fast as it can. Bounded: the whole download must arrive within
/// four minutes (at the agent's pace it takes about one).
async fn read_slowly_then_fast(local: SocketAddr) -> Vec<u8> {
    let read = async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        let mut stream = socket.connect(local).await.expect("connect");
        let mut received = Vec::with_capacity(DOWNLOAD_LEN);
        let fast_from = tokio::time::Instant::now() + SLOW_PHASE;
        let mut slow = tokio::time::interval(Duration::from_millis(100));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let want = if tokio::time::Instant::now() < fast_from {
                slow.tick().await;
                1000
            } else {
                buf.len()
            };
            match stream.read(&mut buf[..want]).await.expect("read") {
                0 => return received,
                n => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(240), read)
        .await
        .expect("the download ends within four minutes")
}

/// What a slow reader's session must show: every byte, in order, and a stream the agent never
/// had to resend message by message (a client that drops what it cannot hold makes the agent,
/// which resends only its oldest unacknowledged message, crawl at one message per tick).
async fn assert_slow_download_intact(received: &[u8], emulator: &Running) {
    assert!(
        received == download_pattern(DOWNLOAD_LEN).as_slice(),
        "the download differs: {} of {DOWNLOAD_LEN} bytes arrived",
        received.len()
    );
    // The newest session is the reader's (serve's start probes its listener with a session
    // of its own).
    let sessions = all_sessions_ended(emulator).await;
    let session = sessions.last().expect("a session");
    assert!(
        session.retransmissions_to_client * 10 < session.messages_to_client,
        "the agent resent {} of {} messages: the client dropped what it could not hold",
        session.retransmissions_to_client,
        session.messages_to_client
    );
}

/// An emulator in realistic mode (the agent's 1 KiB reads and 1 ms pauses) whose instance
/// serves [`download_server`] on ports 22 and 8080.
async fn download_emulator() -> Running {
    let source = download_server().await;
    let mut config = Config {
        mode: Mode::Realistic,
        ..Config::default()
    };
    config.instances.push(
        InstanceConfig::new(WEB)
            .with_port("22", source)
            .with_port("8080", source),
    );
    Emulator::start(config).await.expect("emulator starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_holds_back_for_a_slow_reader_and_loses_nothing() {
    let emulator = download_emulator().await;
    let forwarding = Forwarding::start(&emulator, WEB, 8080).await;
    let local = forwarding.local;
    let received = read_slowly_then_fast(local).await;
    forwarding.stop().await;
    assert_slow_download_intact(&received, &emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_holds_back_for_a_slow_reader_and_loses_nothing() {
    let emulator = download_emulator().await;
    let limits = Limits {
        total: 10,
        per_client_namespace: 10,
        per_instance: 10,
    };
    let registry = Registry::new();
    let served = Served::start(
        "bridge-slow-reader",
        context(&emulator, &registry),
        &[WEB],
        limits,
    )
    .await;
    let received = read_slowly_then_fast(SocketAddr::new(LOOPBACK, served.port(WEB))).await;
    served.stop().await;
    assert_slow_download_intact(&received, &emulator).await;
}

/// A target that accepts connections and holds them, silent, until the test ends.
async fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    address
}

/// `agent-bridge proxy INSTANCE 22` against `emulator`, with test credentials.
fn proxy_command(emulator: &Running, instance: &str) -> tokio::process::Command {
    let mut proxy = tokio::process::Command::new(bridge_binary());
    proxy
        .args(["proxy", instance, "22", "--region", "us-east-1"])
        .args(["--allow-any-stream-url", "--ssm-endpoint"])
        .arg(emulator.endpoint_url())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    proxy
}

/// Waits for the proxy `child` to exit; fails the test after `limit`.
async fn exits_within(
    child: tokio::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the proxy did not end within {limit:?} of {what}"))
        .expect("proxy runs")
}

/// [`exits_within`] 30 s (the session's close linger is 3 s).
async fn exits_soon(child: tokio::process::Child, what: &str) -> std::process::Output {
    exits_within(child, Duration::from_secs(30), what).await
}

/// Against an agent that acknowledges the TerminateSession flag and carries on, and a target
/// that never speaks or closes, the proxy still ends, through the TerminateSession API: when its
/// standard input ends, and on SIGTERM, SIGINT and SIGHUP with its input held open (as ssh does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_ends_when_it_should_even_if_the_peer_never_closes() {
    let faults = Faults {
        ignore_terminate_flag: true,
        ..Faults::default()
    };
    let mut config = Config {
        mode: Mode::Fast,
        ..Config::default()
    };
    config.instances.push(
        InstanceConfig::new(WEB)
            .with_port("22", silent_server().await)
            .with_faults(faults.clone()),
    );
    let emulator = Emulator::start(config).await.expect("emulator starts");

    // Standard input that ends at once.
    let child = proxy_command(&emulator, WEB)
        .stdin(Stdio::null())
        .spawn()
        .expect("proxy starts");
    let output = exits_soon(child, "the end of its input").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    use rustix::process::{Pid, Signal, kill_process};
    for signal in [Signal::TERM, Signal::INT, Signal::HUP] {
        let sessions = emulator.session_reports().len();
        let mut child = proxy_command(&emulator, WEB)
            .stdin(Stdio::piped())
            .spawn()
            .expect("proxy starts");
        let _held_open = child.stdin.take();
        // The session is up once the handshake is: the emulator has the client's version.
        let mut up = false;
        for _ in 0..1200 {
            let reports = emulator.session_reports();
            up = reports.len() > sessions
                && reports.last().is_some_and(|r| r.client_version.is_some());
            if up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "no session came up for {signal:?}");
        let pid = child
            .id()
            .and_then(|id| Pid::from_raw(i32::try_from(id).ok()?))
            .expect("the proxy runs");
        kill_process(pid, signal).expect("signal");
        exits_soon(child, &format!("{signal:?}")).await;
    }

    let reports = all_sessions_ended(&emulator).await;
    assert_eq!(reports.len(), 4, "{reports:?}");
    for report in &reports {
        assert_eq!(
            report.close_reason.as_deref(),
            Some("TerminateSession called"),
            "{report:?}"
        );
    }
    let unobserved = fleet_access_ssm_emulator::unobserved_faults(&faults, &reports);
    assert!(unobserved.is_empty(), "{unobserved:?}");
}

/// Sends a line through `stream` and reads it back from the echo target.
async fn echoes(stream: &mut TcpStream, line: &str) {
    stream.write_all(line.as_bytes()).await.expect("write");
    let mut back = vec![0; line.len()];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut back))
        .await
        .expect("the echo comes back in time")
        .expect("read");
    assert_eq!(back, line.as_bytes());
}

/// One replica of `agent-bridge serve` as a process, with the identity of a pod.
struct Replica {
    process: fleet_access_tests::SupervisedProcess,
    address: SocketAddr,
}

impl Replica {
    async fn start(
        emulator: &Running,
        namespace: &TestNamespace,
        pod: &k8s_openapi::api::core::v1::Pod,
        address: SocketAddr,
        dir: &Path,
    ) -> Self {
        let control_plane = ControlPlane::shared().await.expect("control plane");
        let name = pod.metadata.name.clone().expect("pod name");
        let uid = pod.metadata.uid.clone().expect("pod uid");
        let mut serve = Command::new(bridge_binary());
        serve
            .args(["serve", "--namespace", namespace.name()])
            .args(["--listen-address", &address.ip().to_string()])
            .args(["--admin-address", "127.0.0.1:0"])
            .args(["--region", "us-east-1", "--allow-any-stream-url"])
            .args(["--cluster-name", "test", "--drain-seconds", "0"])
            .arg("--ssm-endpoint")
            .arg(emulator.endpoint_url())
            .env("POD_NAME", &name)
            .env("POD_UID", &uid)
            .env("KUBECONFIG", control_plane.kubeconfig_path())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let log = dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4()));
        let mut process = fleet_access_tests::SupervisedProcess::spawn(&name, &serve, &log)
            .expect("the bridge starts");
        // Ready once its listeners are up (a probe of the listener would start a session).
        let admin = process
            .reported_address("admin", Duration::from_secs(60))
            .await
            .expect("the admin address");
        process
            .wait_until(Duration::from_secs(60), || async move {
                http_get(admin, "/readyz").await.map(|(code, _)| code) == Some(200)
            })
            .await
            .expect("the bridge becomes ready");
        Self { process, address }
    }

    /// A connection through this replica whose session carries an echo.
    async fn connect(&self) -> TcpStream {
        let mut stream = TcpStream::connect(self.address).await.expect("connect");
        echoes(&mut stream, "hello\n").await;
        stream
    }
}

/// The Active sessions at the emulator, by the pod their Reason names.
async fn active_sessions_by_pod(emulator: &Running) -> BTreeMap<String, Vec<String>> {
    let ssm = aws_sdk_ssm::Client::new(&sdk_config(&emulator.endpoint_url()));
    let listed = ssm
        .describe_sessions()
        .state(aws_sdk_ssm::types::SessionState::Active)
        .send()
        .await
        .expect("DescribeSessions");
    let mut by_pod: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for session in listed.sessions() {
        let reason = session.reason().unwrap_or_default();
        let pod = reason
            .strip_prefix("fleet-access bridge test/")
            .and_then(|rest| rest.split([' ', '/']).nth(1))
            .unwrap_or_else(|| panic!("an unmarked session: {reason:?}"));
        by_pod
            .entry(pod.to_owned())
            .or_default()
            .push(session.session_id().expect("id").to_owned());
    }
    by_pod
}

/// A pod object for a bridge replica (nothing runs it: only its name and uid matter).
async fn bridge_pod(namespace: &TestNamespace, name: &str) -> k8s_openapi::api::core::v1::Pod {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": bridge_pod_selector()},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "agent-bridge", "image": "agent-bridge"}]
        }
    }))
    .expect("a pod");
    namespace
        .api()
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the pod")
}

/// A running pod of `namespace`, with service account `account`, at `address`.
async fn client_pod(namespace: &TestNamespace, name: &str, account: &str, address: IpAddr) {
    client_pod_labelled(namespace, name, account, address, serde_json::json!({})).await;
}

/// [`client_pod`] with `labels`.
async fn client_pod_labelled(
    namespace: &TestNamespace,
    name: &str,
    account: &str,
    address: IpAddr,
    labels: serde_json::Value,
) {
    (namespace.running_pod(name, account, address, labels))
        .await
        .expect("a running client pod");
}

/// A fast emulator whose instance WEB serves an echo target on port 7 (and sshd on 22, kept
/// alive by the first value).
async fn echo_on_web() -> (Sshd, Running) {
    let sshd = Sshd::start().await.expect("sshd");
    let echo = fleet_access_tests::targets::echo_server()
        .await
        .expect("echo");
    let emulator = emulator(&sshd, Mode::Fast, &[(WEB, 7, echo)]).await;
    (sshd, emulator)
}

/// A connection to the bridge's listen `port` from `address` (a client pod's own loopback
/// address).
async fn connect_from(address: IpAddr, port: u16) -> TcpStream {
    fleet_access_tests::connect_from(address, SocketAddr::new(LOOPBACK, port))
        .await
        .expect("connect")
}

/// Every connection through `serve` is attributed to its client pod, found by its source address
/// among the cluster's pods: in its session's Reason (the emulator reports what it received) and
/// in one audit record with the bytes each way and how it ended. A connection from an address no
/// pod has is carried and says so; one that StartSession refuses is recorded with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_attributed_to_its_pod_and_recorded() {
    let (_sshd, emulator) = echo_on_web().await;
    let control_plane = ControlPlane::shared().await.expect("control plane");
    let clients = control_plane
        .namespace("audit-clients")
        .await
        .expect("namespace");
    let address = fleet_access_tests::own_loopback_address();
    client_pod(&clients, "ansible-0", "deployer", address).await;

    let refused_document = "fleet-access.nowhere.port8";
    let served = Served::start_endpoints(
        "bridge-audit",
        context(&emulator, &Registry::new()),
        &[
            (WEB, 7, "AWS-StartPortForwardingSession", Some(7)),
            (DB, 8, refused_document, None),
        ],
        Limits {
            total: 10,
            per_client_namespace: 10,
            per_instance: 10,
        },
    )
    .await;
    let connect_from = |to: u16| connect_from(address, to);
    // Carried, from the pod.
    let line = b"hello through the bridge\n";
    let mut stream = connect_from(served.port(WEB)).await;
    echoes(&mut stream, std::str::from_utf8(line).expect("text")).await;
    drop(stream);
    // Refused by StartSession: the document does not exist.
    let mut refused = connect_from(served.port(DB)).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), refused.read_to_end(&mut rest)).await;

    let from_pod = |r: &ConnectionRecord| r.client.address == address;
    let mut records: Vec<ConnectionRecord> = (served
        .records_when(|all| all.iter().filter(|r| from_pod(r)).count() == 2))
    .await
    .into_iter()
    .filter(from_pod)
    .collect();
    // Each written when its connection ended, in whatever order.
    records.sort_by_key(|r| r.port);
    let [carried, refused] = records.as_slice() else {
        panic!("two records from the pod: {records:#?}");
    };
    let pod = carried.client.pod.as_ref().expect("the pod is known");
    assert_eq!(
        (
            pod.namespace.as_str(),
            pod.name.as_str(),
            pod.service_account.as_str()
        ),
        (clients.name(), "ansible-0", "deployer")
    );
    assert_eq!(carried.grants, [TEST_GRANT]);
    assert_eq!((carried.instance.as_str(), carried.port), (WEB, 7));
    assert_eq!(carried.ended, Ended::ClientClosed, "{carried:?}");
    assert_eq!(
        (carried.bytes_from_client, carried.bytes_to_client),
        (line.len() as u64, line.len() as u64)
    );
    assert!(carried.start <= carried.end);
    assert_eq!(
        (refused.ended, refused.session_id.as_ref()),
        (Ended::Refused, None)
    );
    assert!(
        refused
            .detail
            .as_deref()
            .is_some_and(|d| d.contains(refused_document)),
        "{refused:?}"
    );
    // The record is one JSON line as a log pipeline reads it.
    let json = serde_json::to_value(carried).expect("json");
    assert_eq!(json["client"]["pod"]["serviceAccount"], "deployer");
    assert_eq!(json["ended"], "client_closed");

    // What AWS keeps: the emulator received who asked, and through which grant.
    let sessions = all_sessions_ended(&emulator).await;
    let session_id = carried.session_id.as_deref().expect("a session");
    let session = (sessions.iter())
        .find(|s| s.session_id == session_id)
        .expect("the emulator saw the session");
    assert_eq!(
        session.reason.as_deref(),
        Some(
            format!(
                "fleet-access agent bridge grant={TEST_GRANT} for={}/ansible-0 sa=deployer",
                clients.name()
            )
            .as_str()
        )
    );
    // The readiness probes of `Served` came from 127.0.0.1, which no pod has: carried, and said.
    let is_probe = |r: &ConnectionRecord| r.client.address == LOOPBACK && r.port == 7;
    let probe = (served.records_when(|all| all.iter().any(is_probe)).await)
        .into_iter()
        .find(is_probe)
        .expect("the probe's record");
    assert_eq!(probe.client.pod, None);
    let probe_session = (sessions.iter())
        .find(|s| Some(&s.session_id) == probe.session_id.as_ref())
        .expect("the probe's session");
    assert!(
        (probe_session.reason.as_deref()).is_some_and(|r| r.contains("for=unresolved:127.0.0.1")),
        "{probe_session:?}"
    );
    served.stop().await;
}

/// What a line sent from `address` to the bridge's `port` gets back: the line, when the
/// connection is carried to the echo target, or why the bridge refused it.
async fn answer(address: IpAddr, port: u16) -> String {
    let mut stream = connect_from(address, port).await;
    stream.write_all(b"ping\n").await.expect("write");
    let mut said = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while !said.ends_with(b"\n") && stream.read(&mut byte).await.expect("read") == 1 {
            said.push(byte[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&said).trim_end().to_owned()
}

/// Asks until the bridge's answer to `address` satisfies `expected` (for at most a minute: the
/// bridge's watches catch up with what the test changed): the last answer.
async fn answer_when(address: IpAddr, port: u16, expected: impl Fn(&str) -> bool) -> String {
    let mut said = String::new();
    for _ in 0..120 {
        said = answer(address, port).await;
        if expected(&said) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    said
}

/// The bridge carries only the connections some grant's NetworkPolicy admits, whatever the CNI
/// does: the operator's policy for a grant whose clients are the `app=ansible` pods of one
/// namespace (and one address). Such a pod is carried, its session naming the grant; a pod of that namespace
/// without the label and an address no pod has are refused and told why, counted and recorded.
/// The label, once set, admits the second pod; once the policy is gone, nobody is admitted, and
/// a connection still carried is ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_clients_a_grants_network_policy_admits_are_carried() {
    let (_sshd, emulator) = echo_on_web().await;
    let registry = Registry::new();
    let control_plane = ControlPlane::shared().await.expect("control plane");
    let team = control_plane
        .namespace("admit-team")
        .await
        .expect("namespace");
    let own = fleet_access_tests::own_loopback_address;
    let (ansible, other, nobody) = (own(), own(), own());
    let app = serde_json::json!({"app": "ansible"});
    client_pod_labelled(&team, "ansible-0", "deployer", ansible, app.clone()).await;
    client_pod(&team, "other-0", "other", other).await;
    // And the test's own address, which `Served` probes the listeners from.
    let clients: Vec<NetworkPolicyPeer> = serde_json::from_value(serde_json::json!([{
        "podSelector": {"matchLabels": app},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": team.name()}},
    }, {"ipBlock": {"cidr": "127.0.0.1/32"}}]))
    .expect("peers");
    let served = Served::start_admitting(
        "bridge-admit",
        context(&emulator, &registry),
        &[(WEB, 7, "AWS-StartPortForwardingSession", Some(7))],
        Limits {
            total: 10,
            per_client_namespace: 10,
            per_instance: 10,
        },
        &clients,
    )
    .await;
    let port = served.port(WEB);

    assert_eq!(answer(ansible, port).await, "ping");
    let refused = "fleet-access: refused: no grant admits this client here: a grant's spec.bridge.clients must select its pod (or hold its address)";
    assert_eq!(answer(other, port).await, refused);
    assert_eq!(answer(nobody, port).await, refused);
    let exported = fleet_access_agent_bridge::metrics::encode(&registry);
    assert!(
        exported
            .contains(r#"agent_bridge_connections_refused_total{reason="client_not_admitted"} 2"#),
        "{exported}"
    );
    let records = served
        .records_when(|all| {
            all.iter()
                .filter(|r| r.port == 7 && r.client.address != LOOPBACK)
                .count()
                == 3
        })
        .await;
    let from = |address: IpAddr| {
        (records.iter())
            .find(|r| r.client.address == address)
            .unwrap_or_else(|| panic!("a record from {address}: {records:#?}"))
    };
    assert_eq!(
        (from(ansible).ended, from(ansible).grants.as_slice()),
        (Ended::ClientClosed, [TEST_GRANT.to_owned()].as_slice())
    );
    for refused_address in [other, nobody] {
        let record = from(refused_address);
        assert_eq!(record.ended, Ended::Refused, "{record:#?}");
        assert_eq!(record.session_id, None, "{record:#?}");
        assert!(
            (record.detail.as_deref())
                .is_some_and(|d| d.starts_with("no grant admits this client")),
            "{record:#?}"
        );
    }
    assert_eq!(
        from(other).client.pod.as_ref().map(|p| p.name.as_str()),
        Some("other-0")
    );
    let sessions = all_sessions_ended(&emulator).await;
    let session = (sessions.iter())
        .find(|s| Some(&s.session_id) == from(ansible).session_id.as_ref())
        .expect("the admitted pod's session");
    assert!(
        (session.reason.as_deref()).is_some_and(|r| r.contains(&format!(
            " grant={TEST_GRANT} for={}/ansible-0 ",
            team.name()
        ))),
        "{session:?}"
    );

    // The label admits the other pod.
    let pods = team.api::<k8s_openapi::api::core::v1::Pod>();
    let labelled = serde_json::json!({"metadata": {"labels": app}});
    pods.patch(
        "other-0",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&labelled),
    )
    .await
    .expect("label the pod");
    assert_eq!(
        answer_when(other, port, |said| said == "ping").await,
        "ping"
    );

    // Without the policy, nobody is admitted, and a connection carried meanwhile is ended.
    let mut held = connect_from(ansible, port).await;
    echoes(&mut held, "held\n").await;
    let policy = fleet_access_operator::model::endpoints::network_policy_name(TEST_GRANT);
    (served.namespace.api::<NetworkPolicy>())
        .delete(&policy, &DeleteParams::default())
        .await
        .expect("delete the policy");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), held.read_to_end(&mut rest))
        .await
        .expect("the bridge ends the held connection")
        .expect("read to its end");
    assert_eq!(
        answer_when(ansible, port, |said| said != "ping").await,
        refused
    );
    let ended_by_revocation = |r: &ConnectionRecord| {
        r.client.address == ansible
            && r.ended == Ended::Terminated
            && r.detail.as_deref() == Some("no grant admits the client any more")
    };
    let records = served
        .records_when(|all| all.iter().any(ended_by_revocation))
        .await;
    assert!(
        records.iter().any(ended_by_revocation),
        "the held connection's record: {records:#?}"
    );
    served.stop().await;
}

/// One tenant's clients hold at most their share of the bridge's sessions: past it, a client of
/// that namespace is refused with a reason that names the namespace, while a client of another
/// namespace is carried; once one of the first tenant's connections ends (its record written),
/// the tenant gets in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_clients_hold_their_share_of_sessions_and_no_more() {
    let (_sshd, emulator) = echo_on_web().await;
    let [(busy, busy_address), (_quiet, quiet_address)] = two_tenants().await;
    let registry = Registry::new();
    let served = serve_echo("bridge-shares", context(&emulator, &registry), 2).await;
    let connect_from = |address: IpAddr| connect_from(address, served.port(WEB));
    let (first, second, refused) = two_then_refused(&served, busy_address).await;
    assert_eq!(
        refused,
        format!(
            "fleet-access: refused: clients in namespace {} already hold their limit of 2 \
             sessions on this bridge",
            busy.name()
        )
    );
    let mut other = connect_from(quiet_address).await;
    echoes(&mut other, "another tenant\n").await;

    // The busy tenant's first connection ends: its share has room again.
    drop(first);
    let from_busy_ended =
        |r: &ConnectionRecord| r.client.address == busy_address && r.ended == Ended::ClientClosed;
    let records = served
        .records_when(|all| all.iter().any(from_busy_ended))
        .await;
    assert!(records.iter().any(from_busy_ended), "{records:#?}");
    let mut again = connect_from(busy_address).await;
    echoes(&mut again, "again\n").await;

    let refusals: Vec<&ConnectionRecord> = (records.iter())
        .filter(|r| r.ended == Ended::Refused)
        .collect();
    assert!(
        (refusals.iter()).all(|r| r.client.address != quiet_address),
        "{refusals:#?}"
    );
    let exported = fleet_access_agent_bridge::metrics::encode(&registry);
    assert!(
        exported.contains(r#"agent_bridge_connections_refused_total{reason="limit_namespace"} 1"#),
        "{exported}"
    );
    drop((second, other, again));
    served.stop().await;
}

/// One tenant's clients hold at most their share of the memory budget: with room for two
/// sessions' floors in its share, the third connection of a namespace is refused with a reason
/// that names it, while another namespace's connection is carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_clients_hold_their_share_of_the_memory_budget_and_no_more() {
    let (_sshd, emulator) = echo_on_web().await;
    let [(busy, busy_address), (_quiet, quiet_address)] = two_tenants().await;
    let registry = Registry::new();
    let share = 2 * SESSION_FLOOR;
    let budget = MemoryBudget::new(16 * SESSION_FLOOR).with_tenant_limit(share);
    let mut context = SessionContext::per_connection(
        Arc::new(control_plane(&emulator)),
        None,
        Metrics::register(&registry).expect("metrics"),
    );
    context.budget = Some(budget.clone());
    let served = serve_echo("bridge-memory-shares", Arc::new(context), 10).await;
    let (first, second, refused) = two_then_refused(&served, busy_address).await;
    assert_eq!(
        refused,
        format!(
            "fleet-access: refused: clients in namespace {} hold their share of the bridge's \
             memory budget ({}) in what they have not read yet",
            busy.name(),
            in_units(share)
        )
    );
    let mut other = connect_from(quiet_address, served.port(WEB)).await;
    echoes(&mut other, "another tenant\n").await;
    let exported = fleet_access_agent_bridge::metrics::encode(&registry);
    assert!(
        exported.contains(
            r#"agent_bridge_connections_refused_total{reason="memory_budget_namespace"} 1"#
        ),
        "{exported}"
    );
    drop((first, second, other));
    served.stop().await;
    assert_eq!(budget.overdrawn(), 0);
}

/// `serve` of WEB's echo port, with `per_client_namespace` sessions for each namespace (ten in
/// all, ten per instance).
async fn serve_echo(
    prefix: &str,
    context: Arc<SessionContext<SdkControlPlane>>,
    per_client_namespace: usize,
) -> Served {
    let limits = Limits {
        total: 10,
        per_client_namespace,
        per_instance: 10,
    };
    let endpoints = [(WEB, 7, "AWS-StartPortForwardingSession", Some(7))];
    Served::start_endpoints(prefix, context, &endpoints, limits).await
}

/// Two connections from `address` carried (each echoes a line), and what the bridge says to
/// refuse the third.
async fn two_then_refused(served: &Served, address: IpAddr) -> (TcpStream, TcpStream, String) {
    let port = served.port(WEB);
    let mut first = connect_from(address, port).await;
    echoes(&mut first, "first\n").await;
    let mut second = connect_from(address, port).await;
    echoes(&mut second, "second\n").await;
    let refused = refusal(connect_from(address, port).await).await;
    (first, second, refused)
}

/// Two tenants: a namespace each, with one client pod on an address of its own.
async fn two_tenants() -> [(TestNamespace, IpAddr); 2] {
    let control_plane = ControlPlane::shared().await.expect("control plane");
    let mut tenants = Vec::new();
    for prefix in ["share-busy", "share-quiet"] {
        let namespace = control_plane.namespace(prefix).await.expect("namespace");
        let address = fleet_access_tests::own_loopback_address();
        client_pod(&namespace, "job-0", "runner", address).await;
        tenants.push((namespace, address));
    }
    match <[_; 2]>::try_from(tenants) {
        Ok(two) => two,
        Err(_) => unreachable!("two tenants"),
    }
}

/// What the bridge says to a connection it refuses, before it closes it.
async fn refusal(mut stream: TcpStream) -> String {
    let mut said = String::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_string(&mut said))
        .await
        .expect("the refusal comes in time")
        .expect("read");
    said.trim_end().to_owned()
}

/// Replicas sharing one IAM role: a run killed with SIGKILL leaves its sessions open at AWS
/// (the emulator waits for a resume that never comes). The next run of the same pod
/// terminates them at start, and a new pod terminates those of a pod that is gone, while every
/// session of a live replica carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_s_sessions_are_swept_while_live_replicas_keep_theirs() {
    let echo = fleet_access_tests::targets::echo_server()
        .await
        .expect("an echo target");
    let mut config = Config {
        mode: Mode::Fast,
        // Long enough that only the sweep can end a dead run's sessions in the test.
        reconnect_timeout_ms: 600_000,
        ..Config::default()
    };
    config
        .instances
        .push(InstanceConfig::new(WEB).with_port("22", echo));
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let control_plane = ControlPlane::shared().await.expect("control plane");
    let namespace = control_plane
        .namespace("bridge-sweep")
        .await
        .expect("namespace");
    let service_account: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))
            .expect("a service account");
    // No controller manager creates it; pods need it to be admitted.
    let _ = namespace
        .api()
        .create(&PostParams::default(), &service_account)
        .await;
    let target_port = free_loopback_port().expect("port");
    namespace
        .api::<Service>()
        .create(
            &PostParams::default(),
            &endpoint_service(WEB, &[(22, target_port)]),
        )
        .await
        .expect("service");
    admit(&namespace, &loopback_clients(), [target_port]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let address =
        |last: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 3, last)), target_port);
    let (pod_a, pod_b) = (
        bridge_pod(&namespace, "bridge-a").await,
        bridge_pod(&namespace, "bridge-b").await,
    );

    let mut a = Replica::start(&emulator, &namespace, &pod_a, address(1), dir.path()).await;
    let mut b = Replica::start(&emulator, &namespace, &pod_b, address(2), dir.path()).await;
    let _through_a = (a.connect().await, a.connect().await);
    let mut through_b = b.connect().await;
    let before = active_sessions_by_pod(&emulator).await;
    assert_eq!(
        (before["bridge-a"].len(), before["bridge-b"].len()),
        (2, 1),
        "{before:?}"
    );

    // SIGKILL: no handler runs, nothing is terminated. The container restarts in the same pod.
    a.process.kill();
    let a_again = Replica::start(&emulator, &namespace, &pod_a, address(1), dir.path()).await;
    for session in &before["bridge-a"] {
        emulator
            .wait_for_end(session, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("the killed run's session is swept: {e}"));
    }
    echoes(&mut through_b, "b still carries\n").await;
    let mut through_a_again = a_again.connect().await;

    // The pod of B is gone (deleted after SIGKILL), and a new pod C starts.
    b.process.kill();
    namespace
        .api::<k8s_openapi::api::core::v1::Pod>()
        .delete("bridge-b", &DeleteParams::default())
        .await
        .expect("delete the pod");
    let pod_c = bridge_pod(&namespace, "bridge-c").await;
    let c = Replica::start(&emulator, &namespace, &pod_c, address(3), dir.path()).await;
    emulator
        .wait_for_end(&before["bridge-b"][0], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("the gone pod's session is swept: {e}"));
    echoes(&mut through_a_again, "the new run of a still carries\n").await;
    let after = active_sessions_by_pod(&emulator).await;
    assert_eq!(after.keys().collect::<Vec<_>>(), ["bridge-a"], "{after:?}");
    assert_eq!(after["bridge-a"].len(), 1, "{after:?}");

    drop((a_again, c));
    all_sessions_ended(&emulator).await;
}

/// The agent stops reading the data channel (acks included) while a target does not take what
/// it was given: a `forward` upload waits it out, holding its data, and loses nothing once the
/// target reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_waits_out_an_agent_stalled_by_a_target_that_does_not_read() {
    let mut sink = GatedSink::bind().await.expect("a sink");
    let mut config = Config {
        mode: Mode::Fast,
        ..Config::default()
    };
    config
        .instances
        .push(InstanceConfig::new(WEB).with_port("9000", sink.address));
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let forwarding = Forwarding::start(&emulator, WEB, 9000).await;
    let upload = download_pattern(12 * 1024 * 1024);
    let local = forwarding.local;
    let sent = upload.clone();
    let writer = tokio::spawn(async move {
        let mut stream = TcpStream::connect(local).await.expect("connect");
        stream.write_all(&sent).await.expect("write");
        stream.shutdown().await.expect("half-close");
        stream
    });
    // The stall: the agent's smux buffer is full and it reads nothing, while the client keeps
    // offering frames (new data and retransmissions).
    let stalled = emulator
        .wait_for_report(Duration::from_secs(60), |r| r.peak_held_frames >= 16)
        .await;
    assert!(
        stalled.is_some(),
        "no stall: {:?}",
        emulator.session_reports()
    );
    sink.open();
    let delivered = tokio::time::timeout(Duration::from_secs(120), sink.received())
        .await
        .expect("the upload completes")
        .expect("the target read it");
    assert!(
        delivered == upload,
        "{} of {} bytes, intact: {}",
        delivered.len(),
        upload.len(),
        upload.starts_with(&delivered)
    );
    drop(writer.await.expect("the writer ends"));
    forwarding.stop().await;
    let sessions = all_sessions_ended(&emulator).await;
    let report = &sessions[0];
    assert!(report.receive_stalls >= 1, "{report:?}");
    assert!(
        report.peak_target_backlog_bytes > 4 * 1024 * 1024,
        "{report:?}"
    );
}

/// A bridge that may not list the grants' NetworkPolicies (an upgrade whose Role missed them)
/// cannot tell who may connect: it is not ready, so its Service sends it nothing, it refuses
/// what reaches it anyway, and it counts the watch's failures; once its Role allows the list, it
/// becomes ready and carries, without a restart.
#[tokio::test]
async fn a_bridge_that_cannot_list_the_grants_policies_is_not_ready_and_carries_nothing_until_it_can()
 {
    let (_sshd, emulator) = echo_on_web().await;
    let registry = Registry::new();
    let control_plane = ControlPlane::shared().await.expect("control plane");
    let namespace = control_plane
        .namespace("bridge-rbac")
        .await
        .expect("namespace");
    let ns = namespace.name().to_owned();
    let endpoints = [(WEB, 7, "AWS-StartPortForwardingSession", Some(7))];
    let ports = write_endpoints(&namespace, &endpoints, &loopback_clients()).await;
    let port = ports[WEB];
    // The bridge's ServiceAccount may read its Services, and every pod and namespace, but not
    // the NetworkPolicies.
    let cluster_wide = format!("{ns}-client-pods");
    let rbac = |policies: bool| {
        let rules = match policies {
            true => {
                r#"[{apiGroups: [""], resources: [services], verbs: [get, list, watch]}, {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [get, list, watch]}]"#
            }
            false => r#"[{apiGroups: [""], resources: [services], verbs: [get, list, watch]}]"#,
        };
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bridge}}\n---
apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: bridge}}\nrules: {rules}\n---
apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: bridge}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: bridge}}
subjects: [{{kind: ServiceAccount, name: bridge, namespace: {ns}}}]\n---
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {cluster_wide}}}
rules: [{{apiGroups: [\"\"], resources: [pods, namespaces], verbs: [list, watch]}}]\n---
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {cluster_wide}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {cluster_wide}}}
subjects: [{{kind: ServiceAccount, name: bridge, namespace: {ns}}}]\n"
        )
    };
    (control_plane.apply_yaml(&rbac(false), Some(&ns)).await).expect("the bridge's RBAC");
    let client =
        (control_plane.service_account_client(&ns, "bridge").await).expect("the bridge's client");
    let limits = Limits {
        total: 10,
        per_client_namespace: 10,
        per_instance: 10,
    };
    let served = Served::serve_as(
        namespace,
        ports,
        client,
        context(&emulator, &registry),
        limits,
    );
    // It lists its Services and listens...
    wait_listening(port, true).await;
    let failures = |watch: &str| {
        let exported = fleet_access_agent_bridge::metrics::encode(&registry);
        let series = format!("agent_bridge_watch_failures_total{{watch=\"{watch}\"}} ");
        (exported.lines())
            .find_map(|line| line.strip_prefix(series.as_str()))
            .and_then(|value| value.parse::<u64>().ok())
            .expect("the series is exported")
    };
    // ...but refuses, for want of knowing which grant admits whom.
    let own = fleet_access_tests::own_loopback_address;
    assert_eq!(
        answer(own(), port).await,
        "fleet-access: refused: no grant admits this client here: a grant's spec.bridge.clients must select its pod (or hold its address)"
    );
    assert!(!served.readiness.get(), "not ready while it cannot judge");
    assert!(failures("network_policies") > 0);
    assert_eq!(
        (
            failures("services"),
            failures("pods"),
            failures("namespaces")
        ),
        (0, 0, 0)
    );

    (control_plane.apply_yaml(&rbac(true), Some(&ns)).await).expect("the bridge's RBAC");
    tokio::time::timeout(Duration::from_secs(90), served.readiness.reached(true))
        .await
        .expect("ready once it may list the policies");
    assert_eq!(answer(own(), port).await, "ping");
    served.stop().await;
    for kind in ["clusterrolebinding", "clusterrole"] {
        (control_plane.run_kubectl(["delete", kind, &cluster_wide])).expect("deleted");
    }
}
