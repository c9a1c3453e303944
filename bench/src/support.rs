//! What the scenarios share: child processes with a safe loopback-only environment, the emulator,
//! a raw HTTP/1.1 client for the emulator's API and the bridge's /metrics, /proc readings, and
//! order statistics.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, ChildStdout, Command},
};

/// The instance every scenario reaches.
pub const INSTANCE: &str = "i-0benc0000000000001";
/// The Region passed to every client; nothing leaves loopback.
pub const REGION: &str = "us-east-1";
/// How long a child may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

// === impl Workspace ===

/// Where the binaries are and where logs go.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// target/release (the directory of this binary).
    pub bin_dir: PathBuf,
    /// The official plugin, when built (tests/env/setup.sh).
    pub plugin: Option<PathBuf>,
    /// Child logs and configs.
    pub scratch: PathBuf,
}

impl Workspace {
    /// Finds the binaries next to this one and the plugin in the fixtures' cache.
    pub fn discover() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let bin_dir = exe
            .parent()
            .context("this binary has no directory")?
            .to_path_buf();
        for name in ["agent-bridge", "ssm-emulator"] {
            if !bin_dir.join(name).exists() {
                bail!(
                    "{} missing: build it with cargo build --release",
                    bin_dir.join(name).display()
                );
            }
        }
        let scratch =
            std::env::temp_dir().join(format!("fleet-access-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).context("creating the scratch directory")?;
        Ok(Self {
            bin_dir,
            plugin: find_plugin(),
            scratch,
        })
    }

    /// A binary built next to this one.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// `$SESSION_MANAGER_PLUGIN`, else the newest build in the fixtures' cache
/// (`${XDG_CACHE_HOME:-~/.cache}/fleet-access/session-manager-plugin/*/bin/`).
fn find_plugin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SESSION_MANAGER_PLUGIN") {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let root = cache.join("fleet-access/session-manager-plugin");
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin/session-manager-plugin"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// A command with dummy credentials, no instance metadata, quiet logs and loopback-only
/// endpoints; killed when dropped.
pub fn command(program: &Path, ws: &Workspace, log_name: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(program);
    let log = std::fs::File::create(ws.scratch.join(format!("{log_name}.stderr")))
        .context("creating a child log")?;
    cmd.env("AWS_ACCESS_KEY_ID", "AKIABENCHEMULATOR")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", ws.scratch.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            ws.scratch.join("no-aws-credentials"),
        )
        .env("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE", "true")
        .env("HOME", &ws.scratch)
        // The plugin's mux socket goes to the temporary directory; a killed plugin leaves it.
        .env("TMPDIR", &ws.scratch)
        // The harness's own RUST_LOG, when set, reaches the children (to study a failed run).
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    Ok(cmd)
}

/// Reads `stdout` lines until one contains `needle`; returns that line.
pub async fn wait_for_line(
    stdout: &mut BufReader<ChildStdout>,
    needle: &str,
) -> anyhow::Result<String> {
    tokio::time::timeout(READY_TIMEOUT, async {
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).await? == 0 {
                bail!("the child exited before printing {needle:?}");
            }
            if line.contains(needle) {
                return Ok(line.trim().to_owned());
            }
        }
    })
    .await
    .with_context(|| format!("waiting for {needle:?}"))?
}

/// Keeps draining a child's stdout so it never blocks on a full pipe.
pub fn drain(mut stdout: BufReader<ChildStdout>) {
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink).await;
    });
}

// === impl Emulator ===

/// The emulator's agent modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 1,024-byte agent reads with a 1 ms pause; the gateway's 1,000 messages/s limit.
    Realistic,
    /// 32 KiB reads, no limits.
    Fast,
}

impl Mode {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Realistic => "realistic",
            Mode::Fast => "fast",
        }
    }
}

/// A running `ssm-emulator` child.
pub struct Emulator {
    /// Its API and gateway, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The same as a socket address.
    pub addr: SocketAddr,
    /// The process.
    pub child: Child,
}

impl Emulator {
    /// Starts the emulator with one instance whose ports 22 and 9000 lead to `target`.
    pub async fn start(ws: &Workspace, mode: Mode, target: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(ws, mode, target, mode.name(), "").await
    }

    /// [`Emulator::start`] with more top-level config lines (`settings`, YAML), its files named
    /// after `tag`. The agent acks the HandshakeResponse before HandshakeComplete, its usual
    /// order: the official plugin's mux session can crash on the other (see the conformance
    /// tests), and the benchmarks compare speeds, not that race.
    pub async fn start_with(
        ws: &Workspace,
        mode: Mode,
        target: SocketAddr,
        tag: &str,
        settings: &str,
    ) -> anyhow::Result<Self> {
        let config = ws.scratch.join(format!("emulator-{tag}.yaml"));
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\nmode: {}\nstrict: true\nidle_timeout_ms: 1200000\nhandshake_ack: ack_first\n{settings}instances:\n  - id: {INSTANCE}\n    ports:\n      \"22\": {target}\n      \"9000\": {target}\n",
                mode.name()
            ),
        )
        .context("writing the emulator config")?;
        let mut cmd = command(&ws.bin("ssm-emulator"), ws, &format!("emulator-{tag}"))?;
        cmd.arg("--config").arg(&config);
        let mut child = cmd.spawn().context("starting ssm-emulator")?;
        let mut stdout = BufReader::new(child.stdout.take().context("emulator stdout")?);
        let url = wait_for_line(&mut stdout, "http://").await?;
        drain(stdout);
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("emulator url {url}"))?;
        Ok(Self { url, addr, child })
    }

    /// StartSession through the JSON API (unsigned: the emulator does not verify SigV4).
    pub async fn start_session(
        &self,
        document: &str,
        parameters: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({
            "Target": INSTANCE,
            "DocumentName": document,
            "Parameters": parameters,
        });
        let text = http_request(
            self.addr,
            &format!(
                "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-amz-json-1.1\r\nX-Amz-Target: AmazonSSM.StartSession\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                self.addr,
                body.to_string().len(),
                body
            ),
        )
        .await?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("StartSession said {text}"))?;
        if value.get("SessionId").is_none() {
            bail!("StartSession failed: {text}");
        }
        Ok(value)
    }
}

/// Sends a raw HTTP/1.1 request with `Connection: close` and returns the body.
pub async fn http_request(addr: SocketAddr, request: &str) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("HTTP response without a header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("HTTP error: {head} {body}");
        }
        Ok(body.to_owned())
    })
    .await
    .context("HTTP request timed out")?
}

/// GET `path` from `addr`.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

// === /proc ===

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The machine's CPU time so far, from the first line of /proc/stat (clock ticks): all of it,
/// and the part the hypervisor took away (steal), during which nothing here runs.
#[derive(Clone, Copy, Debug)]
pub struct CpuTicks {
    /// Every state summed.
    pub total: u64,
    /// Steal.
    pub steal: u64,
}

impl CpuTicks {
    /// Now; None where /proc/stat cannot be read.
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        Some(Self {
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            total: ticks.iter().take(8).sum(),
            steal: *ticks.get(7)?,
        })
    }

    /// The share of the machine's CPU time stolen since `earlier`.
    pub fn steal_since(self, earlier: Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}

/// User plus system CPU time of `pid`, in seconds (clock ticks at 100 Hz, Linux's USER_HZ).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .context("utime")?;
    let stime: f64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .context("stime")?;
    Ok((utime + stime) / 100.0)
}

// === statistics ===

/// Median, minimum and maximum of a set of runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest run.
    pub min: f64,
    /// The largest run.
    pub max: f64,
    /// How many runs.
    pub runs: usize,
}

impl Spread {
    /// The spread of one figure of each run.
    pub fn of_each<T>(runs: &[T], figure: impl Fn(&T) -> f64) -> Self {
        Self::of(&runs.iter().map(figure).collect::<Vec<_>>())
    }

    /// The spread of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return Self::default();
        }
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        }
    }
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// nproc, CPU model, memory, kernel, toolchain.
pub fn machine_facts() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    vec![
        ("CPUs (nproc)".into(), cpus.to_string()),
        ("CPU model".into(), model),
        ("Memory".into(), mem),
        ("Kernel".into(), kernel),
        ("Load average at start".into(), load),
    ]
}
