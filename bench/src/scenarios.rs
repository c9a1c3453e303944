//! The benchmarks' options and clients, and the bridge's own parts: throughput per session,
//! session setup, scale. Each starts its own emulator and clients, measures side by side (runs
//! interleaved across clients), and stops them.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Child,
    time::Instant,
};

use crate::{
    figures::{CALM_STEAL, ClientKind, Direction, Scale, Setup, SetupRow, Throughput},
    floor,
    roles::{BANNER, CHUNK, DOWNLOAD, Target, UPLOAD},
    support::{
        CpuTicks, Emulator, Mode, Spread, Workspace, command, cpu_seconds, drain, http_get,
        quantile, rss_kib, wait_for_line,
    },
};

/// How long a connection may take to show the target's banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most time spent waiting for in-flight upload bytes to land after a run.
const QUIESCE_LIMIT: Duration = Duration::from_secs(20);

/// Options of `run`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runs per figure (median, min, max over them).
    pub runs: usize,
    /// Measuring window per run.
    pub window: Duration,
    /// Sessions for the setup latency.
    pub setup_sessions: usize,
    /// Idle tunnels for the scale figure.
    pub idle_tunnels: usize,
    /// Active tunnels for the scale figure.
    pub active_tunnels: usize,
    /// Official plugin processes sampled for memory.
    pub plugin_sample: usize,
    /// Where the report goes.
    pub out: std::path::PathBuf,
    /// Which parts run.
    pub parts: Vec<String>,
    /// Which emulator modes the throughput part measures.
    pub modes: Vec<Mode>,
    /// Profile `agent-bridge forward` and the serve path with perf during the first fast-mode run
    /// of each direction,
    /// and the operator during its first full-size apply.
    pub perf: bool,
    /// Grants created at once in the operator benchmark.
    pub operator_grants: usize,
    /// Grants of the smaller operator run measured alongside (how the time scales).
    pub operator_reference_grants: usize,
    /// The operator's resync period.
    pub operator_resync: Duration,
    /// How long the slow reader reads at 10 KB/s.
    pub slow_phase: Duration,
    /// How long it then reads at full speed.
    pub slow_window: Duration,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Self {
            runs: 3,
            window: Duration::from_secs(3),
            setup_sessions: 200,
            idle_tunnels: 1000,
            active_tunnels: 100,
            plugin_sample: 10,
            out: "BENCHMARKS.md".into(),
            parts: vec![
                "throughput".into(),
                "slow-reader".into(),
                "parallel".into(),
                "shell-paste".into(),
                "setup".into(),
                "scale".into(),
                "memory".into(),
                "client-checks".into(),
                "operator".into(),
            ],
            modes: vec![Mode::Realistic, Mode::Fast],
            perf: false,
            operator_grants: 1000,
            operator_reference_grants: 100,
            operator_resync: Duration::from_secs(30),
            slow_phase: Duration::from_secs(30),
            slow_window: Duration::from_secs(10),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => {
                    options.runs = 1;
                    options.window = Duration::from_secs(1);
                    options.setup_sessions = 20;
                    options.idle_tunnels = 50;
                    options.active_tunnels = 10;
                    options.plugin_sample = 2;
                    options.operator_grants = 100;
                    options.operator_reference_grants = 10;
                    options.slow_phase = Duration::from_secs(5);
                    options.slow_window = Duration::from_secs(2);
                }
                "--perf" => options.perf = true,
                "--out" => options.out = it.next().context("--out FILE")?.into(),
                "--runs" => options.runs = it.next().context("--runs N")?.parse()?,
                "--operator-grants" => {
                    options.operator_grants = it.next().context("--operator-grants N")?.parse()?;
                }
                "--operator-resync-seconds" => {
                    options.operator_resync = Duration::from_secs(
                        it.next().context("--operator-resync-seconds S")?.parse()?,
                    );
                }
                "--only" => {
                    options.parts = it
                        .next()
                        .context(
                            "--only throughput,slow-reader,parallel,shell-paste,setup,scale,memory,client-checks,operator",
                        )?
                        .split(',')
                        .map(str::to_owned)
                        .collect();
                }
                "--modes" => {
                    let list = it.next().context("--modes realistic,fast")?;
                    options.modes = list
                        .split(',')
                        .map(|m| match m {
                            "realistic" => Ok(Mode::Realistic),
                            "fast" => Ok(Mode::Fast),
                            other => bail!("unknown mode {other} (realistic or fast)"),
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                other => bail!("unknown option {other}"),
            }
        }
        options.runs = options.runs.clamp(1, 50);
        options.operator_grants = options.operator_grants.max(1);
        options.operator_reference_grants = options
            .operator_reference_grants
            .clamp(1, options.operator_grants);
        Ok(options)
    }

    pub(crate) fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

// === impl Client ===

/// A started client: where to connect, and its processes (killed on drop).
pub struct Client {
    /// Which client.
    pub kind: ClientKind,
    /// Its local listener.
    pub addr: SocketAddr,
    /// The process doing the work (for RSS and CPU).
    pub pid: u32,
    /// The far end's process: the emulator, or the relay standing in for it.
    pub far_pid: Option<u32>,
    /// The serve path's admin address (/metrics).
    pub admin: Option<SocketAddr>,
    children: Vec<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

impl Client {
    /// Starts one client of `kind` leading to the emulator's instance (the relay: to `target`).
    pub async fn start(
        kind: ClientKind,
        ws: &Workspace,
        emulator: &Emulator,
        target: SocketAddr,
        tag: &str,
    ) -> anyhow::Result<Self> {
        let log = format!("{}-{tag}", kind.name().replace(' ', "-"));
        match kind {
            ClientKind::Forward | ClientKind::ForwardOneSession => {
                let port = free_port()?;
                let mut cmd = command(&ws.bin("agent-bridge"), ws, &log)?;
                cmd.args([
                    "forward",
                    "--region",
                    crate::support::REGION,
                    "--allow-any-stream-url",
                    "--ssm-endpoint",
                    &emulator.url,
                    crate::support::INSTANCE,
                    "--aws-document",
                    "--remote-port",
                    "9000",
                    "--local",
                    &loopback(port).to_string(),
                ]);
                if kind == ClientKind::ForwardOneSession {
                    cmd.args(["--max-sessions", "1"]);
                }
                let child = cmd.spawn().context("starting agent-bridge forward")?;
                let pid = child.id().context("pid")?;
                wait_for_log(&ws.scratch.join(format!("{log}.stderr")), "forwarding").await?;
                Ok(Self {
                    kind,
                    addr: loopback(port),
                    pid,
                    far_pid: emulator.child.id(),
                    admin: None,
                    children: vec![child],
                })
            }
            ClientKind::Serve | ClientKind::ServeWithoutBudget => {
                let mut cmd = command(&ws.bin("fleet-access-bench"), ws, &log)?;
                cmd.args([
                    "serve-listeners",
                    &emulator.url,
                    "AWS-StartSSHSession",
                    "22",
                ]);
                if kind == ClientKind::ServeWithoutBudget {
                    cmd.arg("--no-memory-budget");
                }
                let mut child = cmd.spawn().context("starting serve-listeners")?;
                let pid = child.id().context("pid")?;
                let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
                let line = wait_for_line(&mut stdout, "ready").await?;
                drain(stdout);
                let field = |name: &str| -> anyhow::Result<u16> {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .context("ready line")?
                        .parse()
                        .context("port")
                };
                Ok(Self {
                    kind,
                    addr: loopback(field("listen=")?),
                    pid,
                    far_pid: emulator.child.id(),
                    admin: Some(loopback(field("admin=")?)),
                    children: vec![child],
                })
            }
            ClientKind::Plugin => {
                let plugin = ws.plugin.clone().context(
                    "session-manager-plugin not built (make setup builds it into ~/.cache/fleet-access)",
                )?;
                let port = free_port()?;
                let document = "AWS-StartPortForwardingSession";
                let parameters = serde_json::json!({
                    "portNumber": ["9000"],
                    "localPortNumber": [port.to_string()],
                });
                let mut response = emulator.start_session(document, parameters.clone()).await?;
                response["ResponseMetadata"] = serde_json::json!({"HTTPStatusCode": 200});
                let request = serde_json::json!({
                    "Target": crate::support::INSTANCE,
                    "DocumentName": document,
                    "Parameters": parameters,
                });
                let mut cmd = command(&plugin, ws, &log)?;
                // The AWS CLI's argv: response, Region, operation, profile, request, endpoint.
                cmd.args([
                    response.to_string(),
                    crate::support::REGION.to_owned(),
                    "StartSession".to_owned(),
                    String::new(),
                    request.to_string(),
                    emulator.url.clone(),
                ])
                .stdin(std::process::Stdio::null());
                let mut child = cmd.spawn().context("starting session-manager-plugin")?;
                let pid = child.id().context("pid")?;
                let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
                wait_for_line(&mut stdout, "Waiting for connections").await?;
                drain(stdout);
                Ok(Self {
                    kind,
                    addr: loopback(port),
                    pid,
                    far_pid: emulator.child.id(),
                    admin: None,
                    children: vec![child],
                })
            }
            ClientKind::RawRelay
            | ClientKind::DigestingRelay
            | ClientKind::FarDigestingRelay
            | ClientKind::AcknowledgingRelay => {
                let digest: &[&str] = &["digest"];
                let (near_options, far_options) = match kind {
                    ClientKind::DigestingRelay => (digest, digest),
                    ClientKind::FarDigestingRelay => (&[][..], digest),
                    ClientKind::AcknowledgingRelay => (&["ack-near"][..], &["ack-far"][..]),
                    _ => (&[][..], &[][..]),
                };
                let (far, far_port) =
                    start_relay(ws, &format!("{log}-2"), target, far_options).await?;
                let (near, near_port) =
                    start_relay(ws, &format!("{log}-1"), loopback(far_port), near_options).await?;
                let pid = near.id().context("pid")?;
                Ok(Self {
                    kind,
                    addr: loopback(near_port),
                    pid,
                    far_pid: far.id(),
                    admin: None,
                    children: vec![near, far],
                })
            }
            ClientKind::AgentReadLoop => {
                let (relay, port) = start_relay(ws, &log, target, &["agent-read-loop"]).await?;
                let pid = relay.id().context("pid")?;
                Ok(Self {
                    kind,
                    addr: loopback(port),
                    pid,
                    far_pid: None,
                    admin: None,
                    children: vec![relay],
                })
            }
        }
    }

    /// Stops its processes.
    pub async fn stop(mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
    }
}

/// Starts `fleet-access-bench relay` to `to`, with `options` after its arguments.
async fn start_relay(
    ws: &Workspace,
    log: &str,
    to: SocketAddr,
    options: &[&str],
) -> anyhow::Result<(Child, u16)> {
    let mut cmd = command(&ws.bin("fleet-access-bench"), ws, log)?;
    cmd.args(["relay", "0", &to.to_string()]).args(options);
    let mut child = cmd.spawn().context("starting a relay")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let line = wait_for_line(&mut stdout, "relay").await?;
    drain(stdout);
    let port = line
        .trim_start_matches("relay")
        .trim()
        .parse()
        .context("relay port")?;
    Ok((child, port))
}

/// Polls a child's log file until a line contains `needle`.
async fn wait_for_log(path: &Path, needle: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + crate::support::READY_TIMEOUT;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{} never said {needle:?}", path.display())
}

/// Connects through a client and waits for the target's banner.
pub(crate) async fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(BANNER_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        if first[0] != BANNER {
            bail!("unexpected first byte {}", first[0]);
        }
        Ok(stream)
    })
    .await
    .context("no banner in time")?
}

// === throughput ===

/// What one run carried over its window.
struct Carried {
    /// Bytes per second at the receiving end.
    rate: f64,
    /// CPU seconds the client's process spent per 10^9 bytes carried.
    near_cpu_per_gb: f64,
    /// The same for the far end (the emulator, or the relay standing in for it).
    far_cpu_per_gb: f64,
}

/// One upload or download run through `client`: bytes per second at the receiving end over the
/// window after a warm-up, and the CPU time each end spent on them (what each end costs, which
/// the rate alone does not tell when both ends and the harness share the machine's CPUs).
async fn transfer(
    client: &Client,
    target: &Target,
    direction: Direction,
    window: Duration,
) -> anyhow::Result<Carried> {
    const WARM_UP: Duration = Duration::from_millis(500);
    let stream = open(client.addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let limit = WARM_UP + window + Duration::from_secs(5);
    let command = match direction {
        Direction::Upload => UPLOAD,
        Direction::Download => DOWNLOAD,
    };
    writer.write_all(&[command]).await?;
    let worker = {
        let stop = stop.clone();
        let received = received.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                match direction {
                    Direction::Upload => {
                        let write = tokio::time::timeout(
                            Duration::from_millis(200),
                            writer.write_all(&buf),
                        );
                        if matches!(write.await, Ok(Err(_))) {
                            break;
                        }
                    }
                    Direction::Download => {
                        match tokio::time::timeout(
                            Duration::from_millis(200),
                            reader.read(&mut buf),
                        )
                        .await
                        {
                            Ok(Ok(0) | Err(_)) => break,
                            Ok(Ok(n)) => {
                                received.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
        })
    };
    let count = || match direction {
        Direction::Upload => target.uploaded(),
        Direction::Download => received.load(Ordering::Relaxed),
    };
    let cpu = |pid: Option<u32>| {
        pid.and_then(|pid| cpu_seconds(pid).ok())
            .unwrap_or(f64::NAN)
    };
    tokio::time::sleep(WARM_UP).await;
    let (b0, t0) = (count(), Instant::now());
    let (near0, far0) = (cpu(Some(client.pid)), cpu(client.far_pid));
    tokio::time::sleep(window).await;
    let (b1, t1) = (count(), Instant::now());
    let (near1, far1) = (cpu(Some(client.pid)), cpu(client.far_pid));
    stop.store(true, Ordering::Relaxed);
    worker.abort();
    let _ = worker.await;
    let bytes = (b1 - b0) as f64;
    let carried = Carried {
        rate: bytes / (t1 - t0).as_secs_f64(),
        near_cpu_per_gb: (near1 - near0) / bytes * 1e9,
        far_cpu_per_gb: (far1 - far0) / bytes * 1e9,
    };
    if direction == Direction::Upload {
        quiesce(target).await;
    } else {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(carried)
}

/// Waits until uploaded bytes stop arriving (what buffers held when the client closed).
async fn quiesce(target: &Target) {
    let started = Instant::now();
    let mut last = target.uploaded();
    while started.elapsed() < QUIESCE_LIMIT {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = target.uploaded();
        if now == last {
            return;
        }
        last = now;
    }
}

pub(crate) async fn throughput(
    ws: &Workspace,
    options: &Options,
    target: &Target,
    mode: Mode,
) -> anyhow::Result<(Vec<Throughput>, Vec<(String, String)>)> {
    let emulator = Emulator::start(ws, mode, target.addr).await?;
    let mut kinds = vec![ClientKind::Forward, ClientKind::Serve];
    if ws.plugin.is_some() {
        kinds.push(ClientKind::Plugin);
    }
    match mode {
        Mode::Fast => kinds.extend([
            ClientKind::RawRelay,
            ClientKind::DigestingRelay,
            ClientKind::FarDigestingRelay,
            ClientKind::AcknowledgingRelay,
        ]),
        Mode::Realistic => kinds.push(ClientKind::AgentReadLoop),
    }
    let mut clients = Vec::new();
    for kind in kinds {
        match Client::start(kind, ws, &emulator, target.addr, mode.name()).await {
            Ok(client) => clients.push(client),
            Err(error) => eprintln!("bench: {} did not start: {error:#}", kind.name()),
        }
    }
    let mut figures = Vec::new();
    let mut profiles = Vec::new();
    for direction in [Direction::Upload, Direction::Download] {
        let mut samples: Vec<Vec<Carried>> = (0..clients.len()).map(|_| Vec::new()).collect();
        let mut errors: Vec<Option<String>> = vec![None; clients.len()];
        // Side by side: each run measures every client in turn.
        for run in 0..options.runs {
            for (i, client) in clients.iter().enumerate() {
                if !client.kind.measures(direction) {
                    continue;
                }
                let label = format!("{}-{direction:?}", client.kind.profile_label());
                let profile = (options.perf
                    && run == 0
                    && mode == Mode::Fast
                    && matches!(client.kind, ClientKind::Forward | ClientKind::Serve))
                .then(|| {
                    start_perf(
                        ws,
                        client.pid,
                        &label,
                        options.window + Duration::from_millis(500),
                    )
                });
                let result = transfer(client, target, direction, options.window).await;
                if let Some(Some(profile)) = profile
                    && let Some(text) = report_perf(ws, profile, &label).await
                {
                    profiles.push((format!("{}, fast, {direction:?}", client.kind.name()), text));
                }
                match result {
                    Ok(carried) => {
                        eprintln!(
                            "bench: {} {:?} {} run {run}: {:.2} MB/s, CPU s/GB {:.2} near, {:.2} far",
                            mode.name(),
                            direction,
                            client.kind.name(),
                            carried.rate / 1e6,
                            carried.near_cpu_per_gb,
                            carried.far_cpu_per_gb,
                        );
                        samples[i].push(carried);
                    }
                    Err(error) => {
                        eprintln!(
                            "bench: {} {direction:?} failed: {error:#}",
                            client.kind.name()
                        );
                        errors[i] = Some(format!("{error:#}"));
                    }
                }
            }
        }
        for (i, client) in clients.iter().enumerate() {
            if !client.kind.measures(direction) {
                continue;
            }
            figures.push(Throughput {
                mode,
                direction,
                client: client.kind,
                bytes_per_second: Spread::of_each(&samples[i], |c| c.rate),
                near_cpu_per_gb: Spread::of_each(&samples[i], |c| c.near_cpu_per_gb),
                far_cpu_per_gb: Spread::of_each(&samples[i], |c| c.far_cpu_per_gb),
                error: errors[i].clone(),
            });
        }
    }
    for client in clients {
        client.stop().await;
    }
    Ok((figures, profiles))
}

/// `perf record -g` on `pid` for `duration` (or until perf gets SIGINT), into
/// `perf-{label}.data`; None when perf is missing.
pub(crate) fn start_perf(
    ws: &Workspace,
    pid: u32,
    label: &str,
    duration: Duration,
) -> Option<Child> {
    let data = ws.scratch.join(format!("perf-{label}.data"));
    tokio::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .args(["--", "sleep", &format!("{:.1}", duration.as_secs_f64())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()
}

/// Waits for the profile and writes `perf report` (self time, top symbols) next to it.
pub(crate) async fn report_perf(ws: &Workspace, mut perf: Child, label: &str) -> Option<String> {
    let _ = tokio::time::timeout(Duration::from_secs(60), perf.wait()).await;
    let data = ws.scratch.join(format!("perf-{label}.data"));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,symbol",
                "-g",
                "none",
                "--percent-limit",
                "1",
                "-i",
            ])
            .arg(&data)
            .output(),
    )
    .await;
    let out = out.ok()?.ok()?;
    let path = ws.scratch.join(format!("perf-{label}.txt"));
    let _ = std::fs::write(&path, &out.stdout);
    eprintln!("bench: perf profile {label} in {}", path.display());
    // The top symbols by self time.
    let text = String::from_utf8_lossy(&out.stdout);
    let top: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(25)
        // Squeeze perf's column padding; drop its empty IPC columns.
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().filter(|w| *w != "-").collect();
            words.join(" ")
        })
        .collect();
    (!top.is_empty()).then(|| top.join("\n"))
}

// === setup ===

/// The longest the setup part goes on looking for calm runs.
pub const SETUP_LIMIT: Duration = Duration::from_secs(600);

/// The pause after each session, so that its teardown (TerminateSession, the WebSocket close)
/// is over before the next session's setup is timed.
const SETUP_GAP: Duration = Duration::from_millis(5);

/// Runs of [`setup_run`], each with a fresh serve path (so its histograms hold that run only);
/// every figure is the median of the runs'.
pub(crate) async fn setup(
    ws: &Workspace,
    options: &Options,
    target: &Target,
) -> anyhow::Result<Setup> {
    let emulator = Emulator::start(ws, Mode::Realistic, target.addr).await?;
    let (ticks_before, started) = (CpuTicks::now(), Instant::now());
    let mut runs: Vec<Setup> = Vec::with_capacity(options.runs);
    let calm = |runs: &[Setup]| {
        (runs.iter())
            .filter(|r| r.steal.is_some_and(|s| s < CALM_STEAL))
            .count()
    };
    // Until `runs` runs are calm (the hypervisor took under 2 % away), bounded in runs and time.
    while runs.len() < options.runs
        || (calm(&runs) < options.runs
            && runs.len() < options.runs * 3
            && started.elapsed() < SETUP_LIMIT)
    {
        let run = runs.len();
        let serve = Client::start(
            ClientKind::Serve,
            ws,
            &emulator,
            target.addr,
            &format!("setup-{run}"),
        )
        .await?;
        let before = CpuTicks::now();
        let result = setup_run(&serve, &emulator, options.setup_sessions, target).await;
        let steal = before
            .zip(CpuTicks::now())
            .map(|(before, after)| after.steal_since(before));
        serve.stop().await;
        let figures = result?;
        eprintln!(
            "bench: setup run {run}: added p99 {:.2} ms, steal {:.1} %",
            (figures.rows.first().zip(figures.reference.first()))
                .map_or(f64::NAN, |(ours, floor)| (ours.p99 - floor.p99) * 1e3),
            steal.unwrap_or(f64::NAN) * 100.0
        );
        runs.push(Setup { steal, ..figures });
    }
    let steal = ticks_before
        .zip(CpuTicks::now())
        .map(|(before, after)| after.steal_since(before));
    Ok(Setup::of_runs(&runs, steal, options.runs))
}

/// One run: `sessions` bridge sessions, each followed by a floor session.
async fn setup_run(
    serve: &Client,
    emulator: &Emulator,
    n: usize,
    target: &Target,
) -> anyhow::Result<Setup> {
    // Bridge and floor sessions alternate, so both see the same machine at the same moments.
    let mut total = Vec::with_capacity(n);
    let mut floor = Vec::with_capacity(n);
    let mut failures = 0;
    let mut floor_failures = 0;
    for _ in 0..n {
        let started = Instant::now();
        match open(serve.addr).await {
            Ok(stream) => {
                total.push(started.elapsed().as_secs_f64());
                drop(stream);
            }
            Err(_) => failures += 1,
        }
        tokio::time::sleep(SETUP_GAP).await;
        match floor::open_session(emulator).await {
            Ok(phases) => floor.push(phases),
            Err(_) => floor_failures += 1,
        }
        tokio::time::sleep(SETUP_GAP).await;
    }
    if floor.is_empty() {
        bail!("no floor session opened ({floor_failures} failed)");
    }
    // Let the last sessions' metrics land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = serve.admin.context("serve path admin address")?;
    let metrics = http_get(admin, "/metrics").await?;
    let mut rows = vec![exact_row(
        "total (client-measured: connect to banner)",
        &total,
    )];
    for phase in fleet_access_agent_bridge::metrics::PHASES {
        if let Some(row) = histogram_row(&metrics, phase) {
            rows.push(row);
        }
    }
    let phase = |pick: fn(&floor::FloorPhases) -> f64| floor.iter().map(pick).collect::<Vec<_>>();
    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let stream = open(target.addr).await?;
        direct.push(started.elapsed().as_secs_f64());
        drop(stream);
    }
    let reference = vec![
        exact_row("total (floor client)", &phase(|p| p.total)),
        exact_row(
            "start_session (floor: raw HTTP/1.1, new connection)",
            &phase(|p| p.start_session),
        ),
        exact_row("websocket_connect (floor)", &phase(|p| p.websocket_connect)),
        exact_row("handshake (floor)", &phase(|p| p.handshake)),
        exact_row("first_byte (floor)", &phase(|p| p.first_byte)),
        exact_row("target connect to banner, direct", &direct),
    ];
    Ok(Setup {
        sessions: n,
        runs: 1,
        failures,
        floor_failures,
        rows,
        reference,
        added_p50: Spread::of(&[]),
        added_p99: Spread::of(&[]),
        steal: None,
        calm: None,
        wanted_calm_runs: 0,
    })
}

/// p50/p99 and mean of per-session samples (seconds).
fn exact_row(phase: &str, samples: &[f64]) -> SetupRow {
    SetupRow {
        phase: phase.into(),
        p50: quantile(samples, 0.5),
        p99: quantile(samples, 0.99),
        mean: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        exact: true,
    }
}

/// p50/p99 of a phase from the histogram's buckets (linear inside a bucket), and its mean.
fn histogram_row(metrics: &str, phase: &str) -> Option<SetupRow> {
    let label = format!("phase=\"{phase}\"");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut sum = None;
    let mut count = None;
    for line in metrics.lines() {
        if !line.starts_with("agent_bridge_session_setup_seconds") || !line.contains(&label) {
            continue;
        }
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        if line.starts_with("agent_bridge_session_setup_seconds_bucket") {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            buckets.push((le, value));
        } else if line.starts_with("agent_bridge_session_setup_seconds_sum") {
            sum = Some(value);
        } else if line.starts_with("agent_bridge_session_setup_seconds_count") {
            count = Some(value);
        }
    }
    let count = count?;
    if count == 0.0 {
        return None;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |q: f64| {
        let rank = q * count;
        let mut previous = (0.0, 0.0);
        for &(le, cumulative) in &buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return previous.0;
                }
                let width = cumulative - previous.1;
                let fraction = if width > 0.0 {
                    (rank - previous.1) / width
                } else {
                    1.0
                };
                return previous.0 + (le - previous.0) * fraction;
            }
            previous = (le, cumulative);
        }
        previous.0
    };
    Some(SetupRow {
        phase: format!("{phase} (bridge histogram)"),
        p50: at(0.5),
        p99: at(0.99),
        mean: sum? / count,
        exact: false,
    })
}

// === scale ===

pub(crate) async fn scale(
    ws: &Workspace,
    options: &Options,
    target: &Target,
) -> anyhow::Result<Scale> {
    let emulator = Emulator::start(ws, Mode::Realistic, target.addr).await?;
    let serve = Client::start(ClientKind::Serve, ws, &emulator, target.addr, "scale").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_rss = rss_kib(serve.pid)?;
    let n = options.idle_tunnels;
    let mut streams = Vec::with_capacity(n);
    let started = Instant::now();
    // Batches of 50 concurrent opens: a burst of clients, bounded.
    let mut failures = 0;
    while streams.len() + failures < n && started.elapsed() < Duration::from_secs(600) {
        let batch = (n - streams.len() - failures).min(50);
        let mut opens = Vec::with_capacity(batch);
        for _ in 0..batch {
            opens.push(tokio::spawn(open(serve.addr)));
        }
        for handle in opens {
            match handle.await {
                Ok(Ok(stream)) => streams.push(stream),
                _ => failures += 1,
            }
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    const IDLE_WINDOW: Duration = Duration::from_secs(10);
    let cpu0 = cpu_seconds(serve.pid)?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let cpu1 = cpu_seconds(serve.pid)?;
    let idle_rss = rss_kib(serve.pid)?;

    // Active: the first `active` tunnels download at once.
    let active = options.active_tunnels.min(streams.len());
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for stream in streams.drain(..active) {
        let received = received.clone();
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let (mut reader, mut writer) = stream.into_split();
            if writer.write_all(&[DOWNLOAD]).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                match tokio::time::timeout(Duration::from_millis(200), reader.read(&mut buf)).await
                {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
            drop(writer);
        }));
    }
    const ACTIVE_WINDOW: Duration = Duration::from_secs(5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a_cpu0, a_bytes0, a_t0) = (
        cpu_seconds(serve.pid)?,
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(ACTIVE_WINDOW).await;
    let (a_cpu1, a_bytes1, a_t1) = (
        cpu_seconds(serve.pid)?,
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    let active_rss = rss_kib(serve.pid)?;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let _ = reader.await;
    }
    drop(streams);

    // The official plugin: one process per session; measure a sample.
    let mut plugin_rss = Vec::new();
    let mut plugin_cpu = Vec::new();
    let mut plugin_error = None;
    if ws.plugin.is_some() {
        let mut plugins = Vec::new();
        for i in 0..options.plugin_sample {
            match Client::start(
                ClientKind::Plugin,
                ws,
                &emulator,
                target.addr,
                &format!("scale-{i}"),
            )
            .await
            {
                Ok(client) => match open(client.addr).await {
                    Ok(stream) => plugins.push((client, stream)),
                    Err(error) => plugin_error = Some(format!("{error:#}")),
                },
                Err(error) => plugin_error = Some(format!("{error:#}")),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0: Vec<f64> = plugins
            .iter()
            .map(|(c, _)| cpu_seconds(c.pid).unwrap_or(f64::NAN))
            .collect();
        tokio::time::sleep(IDLE_WINDOW).await;
        for ((client, _), c0) in plugins.iter().zip(cpu0) {
            if let (Ok(rss), Ok(c1)) = (rss_kib(client.pid), cpu_seconds(client.pid)) {
                plugin_rss.push(rss as f64);
                plugin_cpu.push((c1 - c0) / IDLE_WINDOW.as_secs_f64());
            }
        }
        for (client, stream) in plugins {
            drop(stream);
            client.stop().await;
        }
    }
    serve.stop().await;
    let tunnels = n - failures;
    Ok(Scale {
        idle_tunnels: tunnels,
        failures,
        open_seconds,
        base_rss_kib: base_rss,
        idle_rss_kib: idle_rss,
        idle_cpu_per_second: (cpu1 - cpu0) / IDLE_WINDOW.as_secs_f64(),
        active_tunnels: active,
        active_rss_kib: active_rss,
        active_cpu_per_second: (a_cpu1 - a_cpu0) / (a_t1 - a_t0).as_secs_f64(),
        active_bytes_per_second: (a_bytes1 - a_bytes0) as f64 / (a_t1 - a_t0).as_secs_f64(),
        plugin_rss_kib: Spread::of(&plugin_rss),
        plugin_idle_cpu_per_second: Spread::of(&plugin_cpu),
        plugin_error,
    })
}
