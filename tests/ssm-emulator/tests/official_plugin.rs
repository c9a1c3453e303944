//! Conformance: the official session-manager-plugin (built by `tests/env` into the cache), run
//! exactly as the AWS CLI runs it, works through the emulator with no violation: an SSH session
//! (stdio, basic mode, over `wss://` with certificate verification) carrying a real `ssh` to the
//! test sshd, and a port-forwarding session
//! (mux) carrying several concurrent connections. The tests fail when the plugin is missing.
//! Reports and violations are read after the session ended.

#![allow(clippy::panic)] // test helpers report failures by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use fleet_access_ssm_emulator::{
    Config, Emulator, HandshakeAck, InstanceConfig, Mode, Running, SessionStatus, TlsFiles,
    Transfer,
};
use fleet_access_tests::certificates::LoopbackTls;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const INSTANCE: &str = "i-0aaaaaaaaaaaaaaa1";
const REGION: &str = "us-east-1";

fn plugin() -> PathBuf {
    fleet_access_tests::session_manager_plugin_path().expect(
        "the official session-manager-plugin must be built (make test builds it via tests/env)",
    )
}

/// argv exactly as the AWS CLI builds it, after the plugin: response JSON, region,
/// "StartSession", profile, request parameters JSON, endpoint URL.
fn cli_args(
    response: &serde_json::Value,
    request: &serde_json::Value,
    endpoint: &str,
) -> Vec<String> {
    fleet_access_tests::plugin_command_line(Path::new(""), response, REGION, request, endpoint)
        .split_off(1)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn plugin_env(cmd: &mut tokio::process::Command, home: &Path) {
    cmd.env("AWS_ACCESS_KEY_ID", "AKIATESTEMULATOR")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", REGION)
        .env("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE", "true")
        .env("HOME", home)
        // The plugin's mux socket goes to the temporary directory; a killed plugin leaves it.
        .env("TMPDIR", home);
}

async fn start(
    ssm: &aws_sdk_ssm::Client,
    document: &str,
    params: serde_json::Value,
) -> (Started, serde_json::Value, serde_json::Value) {
    let pairs: Vec<(String, String)> = params
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v[0].as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let started = start_session(ssm, INSTANCE, document, &refs)
        .await
        .expect("StartSession");
    let response = serde_json::json!({
        "SessionId": started.session_id,
        "TokenValue": started.token,
        "StreamUrl": started.url,
        "ResponseMetadata": {"HTTPStatusCode": 200},
    });
    let request =
        serde_json::json!({"Target": INSTANCE, "DocumentName": document, "Parameters": params});
    (started, response, request)
}

/// Waits until the client has closed `streams` smux streams and the agent has acknowledged
/// every message the client sent: nothing of the client's is in flight.
async fn wait_until_quiet(running: &Running, session_id: &str, streams: u64) {
    let quiet = running
        .wait_for_report(TEST_TIMEOUT, |r| {
            r.session_id == session_id
                && r.smux_streams_closed_by_client == streams
                && r.acks_to_client >= r.messages_from_client
        })
        .await;
    assert!(
        quiet.is_some(),
        "the plugin did not close its streams: {:?}",
        running.session_report(session_id)
    );
}

/// Ctrl-C: the plugin sends the TerminateSession flag and exits.
async fn interrupt(plugin: &mut Child) {
    let pid = plugin.id().expect("pid");
    std::process::Command::new("kill")
        .arg("-INT")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    tokio::time::timeout(TEST_TIMEOUT, plugin.wait())
        .await
        .expect("the plugin exits")
        .expect("wait");
}

/// Waits for the session's end; neither it nor any other session saw a violation.
async fn assert_clean(
    running: &Running,
    session_id: &str,
) -> fleet_access_ssm_emulator::SessionReport {
    let report = running
        .wait_for_end(session_id, TEST_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.violations.is_empty(),
        "violations: {:?}\n{report:?}",
        report.violations
    );
    let all = running.violations();
    assert!(all.is_empty(), "emulator violations: {all:?}");
    report
}

/// ssh through the plugin as its ProxyCommand, over a `wss://` data channel whose certificate
/// the plugin verifies (against a test CA given in `SSL_CERT_FILE`, as Go reads it), as it does
/// against AWS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_the_official_plugin() {
    let plugin = plugin();
    let sshd = fleet_access_tests::Sshd::start().await.expect("sshd");
    let scratch = tempfile_dir();
    let dir = scratch.path();
    let tls = LoopbackTls::generate("ssm-emulator gateway").expect("certificates");
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let trusted_ca = write("ca.pem", &tls.ca_cert_pem);
    let mut config = Config {
        // The less usual order of the agent's race: a basic session copes with it.
        handshake_ack: HandshakeAck::CompleteFirst,
        tls: Some(TlsFiles {
            certificate: write("gateway.pem", &tls.cert_pem),
            private_key: write("gateway-key.pem", &tls.key_pem),
        }),
        mode: Mode::Realistic,
        // When ssh is done the plugin just exits (stdin EOF): unless sshd's close comes first,
        // the session then ends because its client does not come back.
        reconnect_timeout_ms: 2_000,
        ..Config::default()
    };
    config
        .instances
        .push(InstanceConfig::new(INSTANCE).with_port(
            "22",
            format!("127.0.0.1:{}", sshd.port()).parse().expect("addr"),
        ));
    let running = Emulator::start(config).await.expect("emulator");
    let ssm = ssm_client(&running.endpoint_url());
    let (started, response, request) = start(
        &ssm,
        "AWS-StartSSHSession",
        serde_json::json!({"portNumber": ["22"]}),
    )
    .await;
    assert!(started.url.starts_with("wss://"), "{}", started.url);

    let wrapper = dir.join("proxy.sh");
    let args: Vec<String> = cli_args(&response, &request, &running.endpoint_url())
        .iter()
        .map(|a| shell_quote(a))
        .collect();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport AWS_ACCESS_KEY_ID=AKIATESTEMULATOR AWS_SECRET_ACCESS_KEY=secret SSM_PLUGIN_SKIP_CLIENT_CONFIGURE=true HOME={} SSL_CERT_FILE={}\nunset SSL_CERT_DIR\nexec {} {}\n",
            shell_quote(&dir.display().to_string()),
            shell_quote(&trusted_ca.display().to_string()),
            shell_quote(&plugin.display().to_string()),
            args.join(" ")
        ),
    )
    .expect("write wrapper");
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .expect("chmod");

    let mut ssh = tokio::process::Command::new("ssh");
    ssh.args(sshd.client_options())
        .arg("-o")
        .arg(format!("ProxyCommand={}", wrapper.display()))
        // The proxy ignores host and port; they only select the known_hosts entry.
        .arg("-p")
        .arg(sshd.port().to_string())
        .arg(format!("{}@127.0.0.1", sshd.user()))
        .arg("echo through-ssm; head -c 200000 /dev/zero | tr '\\0' x")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(TEST_TIMEOUT, ssh.output())
        .await
        .expect("ssh in time")
        .expect("ssh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed: {}\n{stdout}\n{}\n{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        running.session_report(&started.session_id),
        std::fs::read_to_string(&wrapper).unwrap_or_default()
    );
    assert!(stdout.contains("through-ssm"), "{stdout}");
    assert!(
        stdout.matches('x').count() == 200_000,
        "{} bytes of output",
        stdout.len()
    );

    let report = assert_clean(&running, &started.session_id).await;
    eprintln!("{report:?}");
    // Whichever comes first: sshd's close, or the plugin's exit without coming back.
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert!(
        matches!(
            report.close_reason.as_deref(),
            Some("the target closed the connection" | "the client did not reconnect")
        ),
        "{report:?}"
    );
    assert_eq!(report.transfer, Some(Transfer::Basic));
    assert!(!report.handshake_ack_first);
    assert_eq!(report.client_version.as_deref(), Some("1.2.0.0"));
    assert!(report.bytes_to_client > 200_000, "{report:?}");
    assert_eq!(
        u64::from(report.connections),
        running.stats().tls_connections
    );
}

/// The plugin forwarding a local port to an echo target through its own emulator, listening.
struct Forwarding {
    running: Running,
    started: Started,
    child: Child,
    local_port: u16,
    scratch: fleet_access_tests::Scratch,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// How often a local port is chosen again when another process took it first.
const PORT_ATTEMPTS: u32 = 5;

/// Starts the plugin as the AWS CLI would for a port-forwarding session, and waits until it
/// listens. The local port is chosen free but bound only by the plugin: when another process
/// took it in between, the whole start is repeated with a new port.
/// An agent old enough (3.1.1511.0) that the plugin keeps its own smux keepalive on. The
/// agent's is on with every agent version here: a plugin built from source reports 1.2.0.0,
/// at most 1.2.331.0 (here a NOP every 100 ms).
const KEEPALIVE_AGENT: &str = "3.1.1511.0";

async fn start_forwarding(
    plugin: &Path,
    mode: Mode,
    plugin_keepalive: bool,
    target: std::net::SocketAddr,
) -> Forwarding {
    let mut attempt = 1;
    loop {
        let mut config = Config {
            mode,
            // The plugin's TerminateSession flag can be lost when it exits at once (see
            // `port_forwarding_through_the_official_plugin`): the session then ends because its
            // client does not come back.
            reconnect_timeout_ms: 2_000,
            smux_keepalive_interval_ms: 100,
            // The agent's usual order. With HandshakeComplete first, the plugin's mux session
            // crashes its reader on the ack arriving before its mux client is set up (tried:
            // 2 of 3 runs hung), a plugin bug the agent's race rarely triggers.
            handshake_ack: HandshakeAck::AckFirst,
            ..Config::default()
        };
        let mut instance = InstanceConfig::new(INSTANCE).with_port("8080", target);
        if plugin_keepalive {
            instance = instance.with_agent_version(KEEPALIVE_AGENT);
        }
        config.instances.push(instance);
        let running = Emulator::start(config).await.expect("emulator");
        let ssm = ssm_client(&running.endpoint_url());
        let local_port = fleet_access_tests::free_loopback_port().expect("free port");
        let (started, response, request) = start(
            &ssm,
            "AWS-StartPortForwardingSession",
            serde_json::json!({"portNumber": ["8080"], "localPortNumber": [local_port.to_string()]}),
        )
        .await;
        let scratch = tempfile_dir();
        let dir = scratch.path();
        let mut cmd = tokio::process::Command::new(plugin);
        cmd.args(cli_args(&response, &request, &running.endpoint_url()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("plugin.stderr")).expect("stderr file"))
            .kill_on_drop(true);
        plugin_env(&mut cmd, dir);
        let mut child = cmd.spawn().expect("plugin starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut output = String::new();
        let listening = tokio::time::timeout(TEST_TIMEOUT, async {
            while let Ok(Some(line)) = stdout.next_line().await {
                output.push_str(&line);
                output.push('\n');
                if line.contains("Waiting for connections") {
                    return true;
                }
            }
            false
        })
        .await
        .expect("plugin ready in time");
        if listening {
            return Forwarding {
                running,
                started,
                child,
                local_port,
                scratch,
                stdout,
            };
        }
        let _ = child.wait().await;
        output.push_str(&std::fs::read_to_string(dir.join("plugin.stderr")).unwrap_or_default());
        assert!(
            output.contains("address already in use") && attempt < PORT_ATTEMPTS,
            "{mode:?}: the plugin exited before listening (attempt {attempt}):\n{output}"
        );
        eprintln!("{mode:?}: local port {local_port} was taken; starting again");
        attempt += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forwarding_through_the_official_plugin() {
    let plugin = plugin();
    for (mode, plugin_keepalive) in [
        (Mode::Realistic, false),
        (Mode::Fast, false),
        (Mode::Realistic, true),
    ] {
        let Forwarding {
            running,
            started,
            mut child,
            local_port,
            scratch,
            mut stdout,
        } = start_forwarding(&plugin, mode, plugin_keepalive, echo_server().await).await;
        let stdout_log = scratch.path().join("plugin.stdout");
        let mut stdout_logger = tokio::spawn(async move {
            let mut text = String::new();
            while let Ok(Some(line)) = stdout.next_line().await {
                text.push_str(&line);
                text.push('\n');
                let _ = std::fs::write(&stdout_log, &text);
            }
        });

        let addr: std::net::SocketAddr = format!("127.0.0.1:{local_port}").parse().expect("addr");
        let mut tasks = Vec::new();
        for i in 0..4u8 {
            tasks.push(tokio::spawn(async move {
                let data = pattern(60_000, i);
                match tcp_round_trip(addr, &data).await {
                    Ok(back) if back == data => Ok(()),
                    Ok(_) => Err("echo differs".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }));
        }
        for t in tasks {
            let r = t.await.expect("task");
            assert!(
                r.is_ok(),
                "{mode:?}: {r:?}\n{:?}\nplugin output in {}",
                running.session_report(&started.session_id),
                scratch.path().display()
            );
        }
        // A second wave after the first closed: streams are reopened per connection.
        assert!(tcp_round_trip(addr, b"again").await.expect("again") == b"again");

        // The plugin numbers its messages without a lock (`SendInputDataMessage` reads and
        // increments `StreamDataSequenceNumber` unguarded), and its Ctrl-C handler sends the
        // TerminateSession flag from another goroutine than its smux writer: a stream's FIN
        // still on its way then goes out under the flag's sequence number, which the emulator
        // rightly reports. Ctrl-C only once the plugin has closed all five streams and every
        // message it sent was acknowledged.
        wait_until_quiet(&running, &started.session_id, 5).await;

        interrupt(&mut child).await;
        // Its output ends with it: the log is written before the scratch directory goes (a
        // write racing the removal would leave the directory behind).
        if tokio::time::timeout(TEST_TIMEOUT, &mut stdout_logger)
            .await
            .is_err()
        {
            stdout_logger.abort();
        }

        let report = assert_clean(&running, &started.session_id).await;
        assert_eq!(report.transfer, Some(Transfer::Mux), "{mode:?}: {report:?}");
        assert_eq!(report.smux_streams_opened, 5, "{mode:?}: {report:?}");
        assert!(
            report.smux_keepalive && report.smux_nops_to_client > 0,
            "{mode:?}, plugin keepalive {plugin_keepalive}: {report:?}"
        );
        // The flag ends the session, unless the plugin's exit lost it: it exits right after
        // writing it, and a socket closed with unread data is reset, which can discard the
        // flag on its way. Then the session ends because the plugin does not come back.
        assert_eq!(
            report.status,
            SessionStatus::Terminated,
            "{mode:?}: {report:?}"
        );
        assert!(
            matches!(
                report.close_reason.as_deref(),
                Some("client sent the TerminateSession flag" | "the client did not reconnect")
            ),
            "{mode:?}: {report:?}"
        );
    }
}

/// The agent stops reading the data channel (acks included) while a target does not take what
/// it was given: the plugin's upload waits it out and loses nothing, so the emulator's stall is
/// one the official client lives with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_plugin_waits_out_an_agent_stalled_by_its_target() {
    let plugin = plugin();
    let mut sink = fleet_access_tests::GatedSink::bind().await.expect("a sink");
    let mut forwarding = start_forwarding(&plugin, Mode::Fast, false, sink.address).await;
    let (running, session_id) = (&forwarding.running, forwarding.started.session_id.clone());
    let local_port = forwarding.local_port;
    let upload = pattern(12 * 1024 * 1024, 9);
    let sent = upload.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
            .await
            .expect("connect");
        stream.write_all(&sent).await.expect("write");
        stream.shutdown().await.expect("half-close");
        stream
    });
    let stalled = running
        .wait_for_report(TEST_TIMEOUT, |r| r.peak_held_frames >= 16)
        .await;
    assert!(
        stalled.is_some(),
        "no stall: {:?}",
        running.session_report(&session_id)
    );
    sink.open();
    let delivered = tokio::time::timeout(TEST_TIMEOUT, sink.received())
        .await
        .expect("the upload completes")
        .expect("the target read it");
    assert!(
        delivered == upload,
        "{} of {} bytes; plugin output in {}",
        delivered.len(),
        upload.len(),
        forwarding.scratch.path().display()
    );
    drop(writer.await.expect("the writer ends"));
    wait_until_quiet(running, &session_id, 1).await;
    interrupt(&mut forwarding.child).await;
    let report = assert_clean(&forwarding.running, &session_id).await;
    assert!(report.receive_stalls >= 1, "{report:?}");
}

/// A shell session (the account's default document) through the official plugin in a real
/// terminal: what is typed runs, the window's size follows it, and `exit` ends the session,
/// with no violation: the emulator's shell is what the plugin expects of the agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_through_the_official_plugin() {
    let plugin = plugin();
    let mut config = Config {
        mode: Mode::Realistic,
        ..Config::default()
    };
    config.instances.push(InstanceConfig::new(INSTANCE));
    let running = Emulator::start(config).await.expect("emulator");
    let ssm = ssm_client(&running.endpoint_url());
    let (started, response, request) =
        start(&ssm, "SSM-SessionManagerRunShell", serde_json::json!({})).await;
    let scratch = tempfile_dir();
    let home = scratch.path();
    let argv = fleet_access_tests::plugin_command_line(
        &plugin,
        &response,
        REGION,
        &request,
        &running.endpoint_url(),
    );
    let home_text = home.display().to_string();
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIATESTEMULATOR"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
        ("AWS_REGION", REGION),
        ("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE", "true"),
        ("HOME", home_text.as_str()),
    ];
    let terminal = fleet_access_tests::Terminal::start(&argv, &env, 100, 30).expect("tmux");
    let typed = |command: &str| {
        terminal.type_text(command).expect("typed");
        terminal.press("Enter").expect("typed");
    };
    let shows = |expected: &'static str| {
        let terminal = &terminal;
        async move {
            terminal
                .wait_for_screen(TEST_TIMEOUT, |s| s.contains(expected))
                .await
                .unwrap_or_else(|screen| panic!("{expected:?} never appeared:\n{screen}"))
        }
    };
    typed("echo plugin-$((2*3))");
    shows("plugin-6").await;
    typed("stty size");
    shows("30 100").await;
    terminal.resize(120, 40).expect("resized");
    let resized = running
        .wait_for_report(TEST_TIMEOUT, |r| r.terminal_sizes.contains(&(120, 40)))
        .await;
    assert!(
        resized.is_some(),
        "{:?}",
        running.session_report(&started.session_id)
    );
    typed("stty size");
    shows("40 120").await;
    typed("exit");
    let status = terminal.wait_for_exit(TEST_TIMEOUT).await;
    assert_eq!(status, Some(0), "{:?}", terminal.screen());
    let report = assert_clean(&running, &started.session_id).await;
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(report.close_reason.as_deref(), Some("the shell exited"));
    assert_eq!(report.transfer, Some(Transfer::Shell));
    assert_eq!(
        report.terminal_sizes.first(),
        Some(&(100, 30)),
        "{report:?}"
    );
}
