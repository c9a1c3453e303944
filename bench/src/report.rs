//! BENCHMARKS.md: machine facts, commands, and each figure as median (min–max) with its ratio
//! against the reference measured in the same run.

use std::fmt::Write as _;

use crate::{
    operator::{CREATE_CONCURRENCY, FLEET_SIZE, IAM_DEFAULT_QUOTA, Operator, OperatorRun, Phase},
    scenarios::{ClientKind, Direction, Options},
    slow_reader::SlowReader,
    support::{Mode, Spread, Workspace, machine_facts},
};

/// What the emulated agent allows downstream in realistic mode: 1,024 bytes per read, then a
/// 1 ms pause (docs/protocol.md §8).
pub const AGENT_REALISTIC_BYTES_PER_SECOND: f64 = 1024.0 * 1000.0;

/// One throughput figure.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Emulator mode.
    pub mode: Mode,
    /// Which way.
    pub direction: Direction,
    /// Through what.
    pub client: ClientKind,
    /// Bytes per second at the receiving end.
    pub bytes_per_second: Spread,
    /// The last error, when a run failed.
    pub error: Option<String>,
}

/// One row of the setup table (seconds).
#[derive(Clone, Debug)]
pub struct SetupRow {
    /// The phase.
    pub phase: String,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Measured per session (true) or read from histogram buckets (false).
    pub exact: bool,
}

/// Session setup figures: one run's, or the median of several runs'.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Sessions opened one after another in each run.
    pub sessions: usize,
    /// Runs.
    pub runs: usize,
    /// Sessions that showed no banner in time (all runs).
    pub failures: usize,
    /// Floor sessions that failed (all runs).
    pub floor_failures: usize,
    /// The bridge's figures.
    pub rows: Vec<SetupRow>,
    /// The emulator's floor for the same steps.
    pub reference: Vec<SetupRow>,
    /// Per run: the bridge's total p50 minus the floor's.
    pub added_p50: Spread,
    /// Per run: the bridge's total p99 minus the floor's.
    pub added_p99: Spread,
    /// The share of the machine's CPU time the hypervisor took away during the runs (during
    /// the run, for one run's figures).
    pub steal: Option<f64>,
    /// What the bridge adds in the runs the hypervisor left alone (steal under
    /// [`CALM_STEAL`]), when some were.
    pub calm: Option<CalmRuns>,
    /// The calm runs the part asked for.
    pub wanted_calm_runs: usize,
}

/// Steal under this share of the CPU time makes a run calm: its p99 is the bridge's, not the
/// hypervisor's.
pub const CALM_STEAL: f64 = 0.02;

/// What the bridge adds over the floor, in the calm runs only.
#[derive(Clone, Debug)]
pub struct CalmRuns {
    /// How many runs were calm.
    pub runs: usize,
    /// Per calm run: the bridge's total p50 minus the floor's.
    pub added_p50: Spread,
    /// Per calm run: the bridge's total p99 minus the floor's.
    pub added_p99: Spread,
}

impl Setup {
    /// Each row the median of the runs' rows of the same phase; what the bridge adds, per run.
    pub fn median_of(runs: &[Setup]) -> Setup {
        let median_rows = |pick: fn(&Setup) -> &Vec<SetupRow>| {
            let Some(first) = runs.first() else {
                return Vec::new();
            };
            pick(first)
                .iter()
                .map(|row| {
                    let same: Vec<&SetupRow> = runs
                        .iter()
                        .filter_map(|r| pick(r).iter().find(|o| o.phase == row.phase))
                        .collect();
                    let of = |f: fn(&SetupRow) -> f64| {
                        Spread::of(&same.iter().map(|r| f(r)).collect::<Vec<_>>()).median
                    };
                    SetupRow {
                        phase: row.phase.clone(),
                        p50: of(|r| r.p50),
                        p99: of(|r| r.p99),
                        mean: of(|r| r.mean),
                        exact: row.exact,
                    }
                })
                .collect()
        };
        let added = |f: fn(&SetupRow) -> f64| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| Some(f(r.rows.first()?) - f(r.reference.first()?)))
                .collect();
            Spread::of(&values)
        };
        Setup {
            sessions: runs.first().map_or(0, |r| r.sessions),
            runs: runs.len(),
            failures: runs.iter().map(|r| r.failures).sum(),
            floor_failures: runs.iter().map(|r| r.floor_failures).sum(),
            rows: median_rows(|r| &r.rows),
            reference: median_rows(|r| &r.reference),
            added_p50: added(|r| r.p50),
            added_p99: added(|r| r.p99),
            steal: None,
            calm: None,
            wanted_calm_runs: 0,
        }
    }

    /// [`Setup::median_of`] every run, with the calm runs' figures apart, and the steal over
    /// the whole part.
    pub fn of_runs(runs: &[Setup], steal: Option<f64>, wanted_calm_runs: usize) -> Setup {
        let calm: Vec<Setup> = (runs.iter())
            .filter(|r| r.steal.is_some_and(|s| s < CALM_STEAL))
            .cloned()
            .collect();
        let calm = (!calm.is_empty()).then(|| {
            let median = Setup::median_of(&calm);
            CalmRuns {
                runs: calm.len(),
                added_p50: median.added_p50,
                added_p99: median.added_p99,
            }
        });
        Setup {
            steal,
            calm,
            wanted_calm_runs,
            ..Setup::median_of(runs)
        }
    }
}

/// Scale figures.
#[derive(Clone, Debug)]
pub struct Scale {
    /// Tunnels open at once.
    pub idle_tunnels: usize,
    /// Tunnels that did not open.
    pub failures: usize,
    /// Seconds to open them all.
    pub open_seconds: f64,
    /// RSS with no tunnel.
    pub base_rss_kib: u64,
    /// RSS with every tunnel open and idle.
    pub idle_rss_kib: u64,
    /// CPU seconds per second while idle.
    pub idle_cpu_per_second: f64,
    /// Tunnels downloading at once.
    pub active_tunnels: usize,
    /// RSS while they download.
    pub active_rss_kib: u64,
    /// CPU seconds per second while they download.
    pub active_cpu_per_second: f64,
    /// Their combined download rate.
    pub active_bytes_per_second: f64,
    /// RSS of one official plugin process (one session), over the sample.
    pub plugin_rss_kib: Spread,
    /// Its CPU seconds per second while idle.
    pub plugin_idle_cpu_per_second: Spread,
    /// Why the plugin sample is short, if it is.
    pub plugin_error: Option<String>,
}

/// Everything measured in one run.
pub struct Report {
    facts: Vec<(String, String)>,
    command: String,
    options: Options,
    plugin: Option<String>,
    /// Throughput figures.
    pub throughput: Vec<Throughput>,
    /// Setup figures.
    pub setup: Option<Setup>,
    /// Scale figures.
    pub scale: Option<Scale>,
    /// Operator figures.
    pub operator: Option<Operator>,
    /// Parts that failed, and why.
    pub missing: Vec<String>,
    /// perf profiles: what was profiled, and the top symbols by self time.
    pub profiles: Vec<(String, String)>,
    /// Slow-reader figures.
    pub slow_reader: Option<SlowReader>,
    /// Parallel downloads through one client.
    pub parallel: Option<crate::parallel::Parallel>,
    /// A paste into a shell, against the plugin.
    pub shell_paste: Option<crate::shell_paste::ShellPaste>,
    /// Memory under a thousand slow readers.
    pub memory: Option<crate::memory::Memory>,
}

/// The median of some runs' rates.
pub(crate) fn median_rate(rates: &[f64]) -> Option<f64> {
    let mut rates = rates.to_vec();
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied()
}

/// One client's row in a table of rates against the official plugin.
pub(crate) struct RateRow<'a> {
    /// The client's name.
    pub name: &'a str,
    /// Its runs' rates (bytes per second).
    pub rates: &'a [f64],
    /// Why it was not measured.
    pub error: Option<&'a str>,
    /// It is the plugin, the reference.
    pub is_plugin: bool,
}

/// Writes a table of `rows` (median, min, max in `unit`, bytes per second divided by `scale`,
/// with `decimals`), each against the plugin's median; returns that reference.
pub(crate) fn rates_against_plugin(
    out: &mut String,
    unit: &str,
    scale: f64,
    decimals: usize,
    rows: &[RateRow<'_>],
) -> Option<f64> {
    let reference = (rows.iter())
        .find(|r| r.is_plugin)
        .and_then(|r| median_rate(r.rates))
        .filter(|r| *r > 0.0);
    let _ = writeln!(
        out,
        "| client | {unit} | min | max | vs the plugin |\n|---|---|---|---|---|"
    );
    for row in rows {
        let Some(median) = median_rate(row.rates) else {
            let _ = writeln!(
                out,
                "| {} | not measured: {} | | | |",
                row.name,
                row.error.unwrap_or("no figure")
            );
            continue;
        };
        let min = row.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.rates.iter().copied().fold(0.0, f64::max);
        let ratio = match reference {
            _ if row.is_plugin => "reference".to_owned(),
            Some(reference) => format!("{:.2}", median / reference),
            None => "**the plugin not measured**: cannot be judged".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.decimals$} | {:.decimals$} | {:.decimals$} | {ratio} |",
            row.name,
            median / scale,
            min / scale,
            max / scale
        );
    }
    reference
}

fn shell(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn mb(bytes_per_second: f64) -> String {
    format!("{:.2}", bytes_per_second / 1e6)
}

fn ms(seconds: f64) -> String {
    format!("{:.2}", seconds * 1e3)
}

impl Report {
    /// An empty report with the machine's facts, taken now.
    pub fn new(ws: &Workspace, options: &Options, args: &[String]) -> Self {
        let mut facts = machine_facts();
        facts.insert(
            0,
            (
                "Date (UTC)".into(),
                shell("date", &["-u", "+%Y-%m-%d %H:%M:%S"]),
            ),
        );
        facts.push(("rustc".into(), shell("rustc", &["--version"])));
        facts.push((
            "git commit".into(),
            shell("git", &["rev-parse", "--short", "HEAD"]),
        ));
        Self {
            facts,
            command: format!("fleet-access-bench run {}", args.join(" ")),
            options: options.clone(),
            plugin: ws.plugin.as_ref().map(|p| p.display().to_string()),
            throughput: Vec::new(),
            setup: None,
            scale: None,
            operator: None,
            missing: Vec::new(),
            profiles: Vec::new(),
            slow_reader: None,
            parallel: None,
            shell_paste: None,
            memory: None,
        }
    }

    fn find(&self, mode: Mode, direction: Direction, client: ClientKind) -> Option<&Throughput> {
        self.throughput.iter().find(|t| {
            t.mode == mode
                && t.direction == direction
                && t.client == client
                && t.bytes_per_second.runs > 0
        })
    }

    /// The Markdown text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "Generated by `make bench` (bench/, `{}`); do not edit by hand. The machine is shared and noisy: \
             read the ratios, which compare figures measured side by side in the same run (runs interleave the \
             clients), more than the absolute values. Each figure is the median of the runs, with min and max. \
             What limited each figure, written by hand after a run: `docs/benchmark-analysis.md` (it names the \
             commit it analysed).\n",
            self.command.trim()
        );
        let _ = writeln!(out, "## Machine\n\n| | |\n|---|---|");
        for (k, v) in &self.facts {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        let _ = writeln!(
            out,
            "| session-manager-plugin | {} |",
            self.plugin
                .as_deref()
                .unwrap_or("not found (figures missing)")
        );
        let _ = writeln!(
            out,
            "\nCommands: `make bench` = `cargo build --release -p fleet-access-agent-bridge -p fleet-access-ssm-emulator -p fleet-access-operator -p fleet-access-bench` \
             then `target/release/{}`. Runs per figure: {}; window per run: {} s after a 0.5 s warm-up; bytes counted at the receiving end.\n",
            self.command.trim(),
            self.options.runs,
            self.options.window.as_secs_f64()
        );
        self.render_throughput(&mut out);
        self.render_setup(&mut out);
        self.render_scale(&mut out);
        self.render_operator(&mut out);
        if let Some(part) = &self.slow_reader {
            crate::slow_reader::render(part, 5, &mut out);
        }
        if let Some(part) = &self.parallel {
            crate::parallel::render(part, 6, &mut out);
        }
        if let Some(part) = &self.shell_paste {
            crate::shell_paste::render(part, 7, &mut out);
        }
        if let Some(part) = &self.memory {
            crate::memory::render(part, 8, &mut out);
        }
        for (what, text) in &self.profiles {
            let _ = writeln!(
                out,
                "## Profile: {what}\n\n`perf record -F 999 -g -p PID` over one run, `perf report --no-children --sort dso,symbol` \
                 (self time, symbols at 1 % or more):\n\n```\n{text}\n```\n"
            );
        }
        if !self.missing.is_empty() {
            let _ = writeln!(out, "## Missing or failed in this run\n");
            for m in &self.missing {
                let _ = writeln!(out, "- {m}");
            }
            let _ = writeln!(out);
        }
        out
    }

    fn render_throughput(&self, out: &mut String) {
        if self.throughput.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "## 1. Throughput per session (MB/s = 10^6 bytes/s)\n\n\
             Path: harness client → client under test (its own process) → ssm-emulator (its own process; gateway + \
             strict agent) → harness target, all on 127.0.0.1. `agent-bridge forward`: one session, an smux stream \
             per connection. Serve path: `fleet-access-bench serve-listeners`, the bridge library's endpoint \
             listener as `agent-bridge serve` runs it (one AWS-StartSSHSession session per connection, basic mode), \
             without the Kubernetes watch. Plugin: the official session-manager-plugin, port forwarding (mux), argv \
             as the AWS CLI builds it. Raw relay: two chained TCP relay processes standing in for bridge and emulator. \
             Digesting relay: the same two relays, each computing the bridge's SHA-256 of every chunk it carries (at \
             most 32 KiB, a message), because each end of the SSM protocol hashes every message it sends or receives \
             (sender and receiver: every byte is hashed twice on its way); with only the far relay hashing (the \
             emulator's share), it is the ceiling of a client whose own digests cost nothing. The emulated agent's read loop alone: one relay process that reads what the target sends 1,024 bytes \
             at a time with a 1 ms pause, as the emulated agent does in realistic mode (downloads only).\n"
        );
        let _ = writeln!(
            out,
            "| Mode | Direction | Client | Median | Min | Max | Runs | Ratio | Goal |\n|---|---|---|---:|---:|---:|---:|---|---|"
        );
        for t in &self.throughput {
            let (ratio, goal) = self.ratio(t);
            let s = t.bytes_per_second;
            if s.runs == 0 {
                let _ = writeln!(
                    out,
                    "| {} | {:?} | {} | failed | | | 0 | | {} |",
                    t.mode.name(),
                    t.direction,
                    t.client.name(),
                    t.error.as_deref().unwrap_or("").replace('|', "/")
                );
                continue;
            }
            let _ = writeln!(
                out,
                "| {} | {:?} | {} | {} | {} | {} | {} | {} | {} |",
                t.mode.name(),
                t.direction,
                t.client.name(),
                mb(s.median),
                mb(s.min),
                mb(s.max),
                s.runs,
                ratio,
                goal
            );
        }
        let measured = self
            .find(
                Mode::Realistic,
                Direction::Download,
                ClientKind::AgentReadLoop,
            )
            .filter(|t| t.bytes_per_second.runs > 0);
        let _ = writeln!(
            out,
            "\nRealistic download reference (\"of agent\"): {}. Nominally the agent reads 1,024 bytes, then pauses 1 ms: at most {} MB/s.\n",
            match (measured, self.agent_download_ceiling()) {
                (Some(_), Some(ceiling)) => format!(
                    "the emulated agent's read loop alone, measured in the same runs: {} MB/s (a relay \
                     that reads the target exactly as the emulated agent does, with no data channel)",
                    mb(ceiling)
                ),
                _ =>
                    "**not measured** (the read-loop reference did not run: no realistic download \
                      ratio or verdict below)"
                        .to_owned(),
            },
            mb(AGENT_REALISTIC_BYTES_PER_SECOND)
        );
    }

    /// What the emulated agent allows in a realistic download: its read loop measured alone in
    /// the same runs. A verdict is never drawn against a nominal rate.
    fn agent_download_ceiling(&self) -> Option<f64> {
        self.find(
            Mode::Realistic,
            Direction::Download,
            ClientKind::AgentReadLoop,
        )
        .map(|t| t.bytes_per_second.median)
        .filter(|m| *m > 0.0)
    }

    /// The ratio against the reference of the figure's mode and direction, and the goal verdict.
    fn ratio(&self, t: &Throughput) -> (String, String) {
        let ours = matches!(t.client, ClientKind::Forward | ClientKind::Serve);
        let median = t.bytes_per_second.median;
        let plugin = self
            .find(t.mode, t.direction, ClientKind::Plugin)
            .map(|p| p.bytes_per_second.median);
        let relay = self
            .find(t.mode, t.direction, ClientKind::RawRelay)
            .map(|p| p.bytes_per_second.median);
        let vs_plugin = plugin
            .filter(|p| *p > 0.0)
            .map(|p| format!("{:.2}x plugin", median / p));
        match (t.mode, t.direction) {
            (Mode::Realistic, Direction::Upload) => match (ours, plugin) {
                (true, Some(p)) if p > 0.0 => {
                    let r = median / p;
                    (
                        format!("{r:.2}x plugin"),
                        format!("≥ 8x plugin: {}", if r >= 8.0 { "met" } else { "not met" }),
                    )
                }
                (true, _) => unmeasured("≥ 8x plugin", "the plugin"),
                _ => (String::new(), String::new()),
            },
            (Mode::Realistic, Direction::Download) => {
                if t.client == ClientKind::AgentReadLoop {
                    return (String::new(), String::new());
                }
                let Some(ceiling) = self.agent_download_ceiling() else {
                    return unmeasured("≥ 0.95 of agent", "the agent's read loop");
                };
                let r = median / ceiling;
                let text = format!(
                    "{r:.2} of agent{}",
                    vs_plugin.map(|v| format!("; {v}")).unwrap_or_default()
                );
                let goal = if ours {
                    format!(
                        "≥ 0.95 of agent: {}",
                        if r >= 0.95 { "met" } else { "not met" }
                    )
                } else {
                    String::new()
                };
                (text, goal)
            }
            (Mode::Fast, _) => match relay.filter(|r| *r > 0.0) {
                Some(relay) if t.client != ClientKind::RawRelay => {
                    let r = median / relay;
                    let of_digesting = self
                        .find(t.mode, t.direction, ClientKind::DigestingRelay)
                        .map(|d| d.bytes_per_second.median)
                        .filter(|d| {
                            *d > 0.0
                                && !matches!(
                                    t.client,
                                    ClientKind::DigestingRelay | ClientKind::FarDigestingRelay
                                )
                        })
                        .map(|d| median / d);
                    let text = format!(
                        "{r:.2} of relay{}{}",
                        of_digesting
                            .map(|d| format!("; {d:.2} of digesting relay"))
                            .unwrap_or_default(),
                        vs_plugin
                            .filter(|_| ours)
                            .map(|v| format!("; {v}"))
                            .unwrap_or_default()
                    );
                    let verdict = |met: bool| if met { "met" } else { "not met" };
                    let mut goal = String::new();
                    if ours {
                        goal = format!("≥ 0.5 of relay: {}", verdict(r >= 0.5));
                        // Both ends hash every message: downloads are judged against the
                        // relays that hash too (uploads are paced by design).
                        if t.direction == Direction::Download {
                            let digesting = match of_digesting {
                                Some(d) => verdict(d >= 0.9),
                                None => "cannot be judged",
                            };
                            goal.push_str(&format!("; ≥ 0.9 of digesting relay: {digesting}"));
                        }
                    }
                    (text, goal)
                }
                None if ours => unmeasured("≥ 0.5 of relay", "the raw relay"),
                _ => (String::new(), String::new()),
            },
        }
    }

    fn render_setup(&self, out: &mut String) {
        let Some(setup) = &self.setup else { return };
        let _ = writeln!(
            out,
            "## 2. Session setup (ms), serve path, realistic emulator\n\n\
             {} runs of {} sessions one after another ({} failed), each run with a fresh serve path; every figure \
             below is the median of the runs' figures. The client connects to the bridge's endpoint listener; the \
             session is up when the target's first byte (a banner, like sshd's) reaches the client. Per-phase figures \
             come from the bridge's own `agent_bridge_session_setup_seconds{{phase}}` histogram: p50/p99 are \
             interpolated inside its buckets (1, 2.5, 5, 10, 25 ms ...), so they are coarse; the mean is exact. \
             Phases, each from the end of the one before: `start_session` from connect to the StartSession response; \
             `websocket_connect` until the agent's first frame; `handshake` until HandshakeComplete; `first_byte` \
             until the target's first byte; `total` from connect to first byte.\n\n\
             The floor: after each bridge session, one session by a straight-line client in the harness \
             (`bench/src/floor.rs`; {} failed): StartSession as raw HTTP/1.1 on a new connection, the WebSocket \
             upgrade and open message, the handshake, the first byte, in one task with no driver, pacer, SDK or \
             metrics, its phases cut where the bridge's are. It is the emulator's own minimum for the same steps. \
             Each session is followed by a 5 ms pause, so that its teardown (TerminateSession, the WebSocket close) \
             does not overlap the next one's setup.\n",
            setup.runs, setup.sessions, setup.failures, setup.floor_failures
        );
        let _ = writeln!(out, "| Measured | p50 | p99 | mean |\n|---|---:|---:|---:|");
        for row in setup.rows.iter().chain(&setup.reference) {
            let _ = writeln!(
                out,
                "| {}{} | {} | {} | {} |",
                row.phase,
                if row.exact { "" } else { " ~" },
                ms(row.p50),
                ms(row.p99),
                ms(row.mean)
            );
        }
        if let (Some(total), Some(floor)) = (setup.rows.first(), setup.reference.first()) {
            let added = &setup.added_p99;
            let _ = writeln!(
                out,
                "\nThe bridge's total p99 is {} ms against the floor's {} ms. **Added at p99: {} ms** (median of the \
                 runs; min {}, max {}; goal: at most 2 ms: {}); at p50: {} ms.\n",
                ms(total.p99),
                ms(floor.p99),
                ms(added.median),
                ms(added.min),
                ms(added.max),
                if added.median <= 0.002 {
                    "met"
                } else {
                    "not met"
                },
                ms(setup.added_p50.median),
            );
            if let Some(steal) = setup.steal {
                let _ = writeln!(
                    out,
                    "During these runs the hypervisor took {:.1} % of the machine's CPU time away (steal, /proc/stat), \
                     in slices that stall whatever runs on the vCPU at the time: with 200 sessions, two stalled \
                     sessions set the p99.\n",
                    steal * 100.0
                );
            }
            let _ = writeln!(out, "{}\n", calm_words(setup));
        } else if !setup.rows.is_empty() {
            let _ = writeln!(
                out,
                "\n**The floor was not measured** in these runs: what the bridge adds cannot be judged \
                 (goal: at most 2 ms at p99).\n"
            );
        }
    }

    fn render_scale(&self, out: &mut String) {
        let Some(s) = &self.scale else { return };
        let n = s.idle_tunnels.max(1) as f64;
        let per_idle = (s.idle_rss_kib.saturating_sub(s.base_rss_kib)) as f64 / n;
        let _ = writeln!(
            out,
            "## 3. Scale: one serve-path process, realistic emulator\n\n\
             {} tunnels open at once ({} failed to open; opened in batches of 50 in {:.1} s), each one SSM session \
             with its own WebSocket, then idle for 10 s; then {} of them download at once for 5 s. The official \
             plugin runs one process per session: {} processes were sampled, each with one idle forwarded connection.\n",
            s.idle_tunnels, s.failures, s.open_seconds, s.active_tunnels, s.plugin_rss_kib.runs
        );
        let _ = writeln!(out, "| Measured | Value |\n|---|---:|");
        let _ = writeln!(out, "| bridge RSS, no tunnel | {} KiB |", s.base_rss_kib);
        let _ = writeln!(
            out,
            "| bridge RSS, {} idle tunnels | {} KiB |",
            s.idle_tunnels, s.idle_rss_kib
        );
        let _ = writeln!(
            out,
            "| **bridge RSS per idle tunnel** (goal ≤ 100 KiB: {}) | **{:.1} KiB** |",
            if per_idle <= 100.0 { "met" } else { "not met" },
            per_idle
        );
        let _ = writeln!(
            out,
            "| bridge CPU while idle, all tunnels | {:.2} % of a core ({:.1} µs/s per tunnel) |",
            s.idle_cpu_per_second * 100.0,
            s.idle_cpu_per_second * 1e6 / n
        );
        let _ = writeln!(
            out,
            "| bridge RSS with {} active (+ {} idle) | {} KiB |",
            s.active_tunnels,
            s.idle_tunnels.saturating_sub(s.active_tunnels),
            s.active_rss_kib
        );
        let _ = writeln!(
            out,
            "| bridge CPU with {} active | {:.1} % of a core |",
            s.active_tunnels,
            s.active_cpu_per_second * 100.0
        );
        let _ = writeln!(
            out,
            "| download, {} active combined | {} MB/s ({} MB/s per tunnel) |",
            s.active_tunnels,
            mb(s.active_bytes_per_second),
            mb(s.active_bytes_per_second / s.active_tunnels.max(1) as f64)
        );
        if s.active_bytes_per_second > 0.0 {
            let _ = writeln!(
                out,
                "| bridge CPU per MB/s carried | {:.2} ms/s |",
                s.active_cpu_per_second * 1e3 / (s.active_bytes_per_second / 1e6)
            );
        }
        if s.plugin_rss_kib.runs > 0 {
            let p = s.plugin_rss_kib;
            let _ = writeln!(
                out,
                "| official plugin RSS per session (median, min–max of {}) | {:.0} KiB ({:.0}–{:.0}) |",
                p.runs, p.median, p.min, p.max
            );
            let _ = writeln!(
                out,
                "| official plugin, extrapolated to {} sessions (median × {}) | {:.0} MiB vs the bridge's {:.1} MiB above its base |",
                s.idle_tunnels,
                s.idle_tunnels,
                p.median * n / 1024.0,
                per_idle * n / 1024.0
            );
            let _ = writeln!(
                out,
                "| **ratio: plugin memory per session / bridge per idle tunnel** | **{:.0}x** |",
                p.median / per_idle.max(0.001)
            );
            let _ = writeln!(
                out,
                "| official plugin idle CPU per session (median) | {:.2} % of a core |",
                s.plugin_idle_cpu_per_second.median * 100.0
            );
        } else {
            let _ = writeln!(
                out,
                "| official plugin | not measured: {} |",
                s.plugin_error.as_deref().unwrap_or("plugin not found")
            );
        }
        let _ = writeln!(
            out,
            "\nExtrapolation: each plugin session is its own process with its own Go runtime and heap, so memory grows \
             linearly with sessions; the sample's median RSS times the number of sessions. RSS counts shared pages \
             (the binary's text) in every process, so the real sum is somewhat lower; the AWS CLI (Python) process \
             that starts each plugin and waits for it is not counted either, and would add more than the plugin.\n"
        );
    }
}

fn seconds_row(out: &mut String, what: &str, grants: usize, values: &[f64]) {
    let s = Spread::of(values);
    if s.runs == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "| {what} | {grants} | {:.2} | {:.2} | {:.2} | {} | {:.1} ms |",
        s.median,
        s.min,
        s.max,
        s.runs,
        s.median * 1e3 / grants.max(1) as f64
    );
}

/// The median over `runs` of `figure` per grant.
fn per_grant(runs: &[OperatorRun], figure: impl Fn(&OperatorRun) -> f64) -> Spread {
    let values: Vec<f64> = runs
        .iter()
        .map(|r| figure(r) / r.grants.max(1) as f64)
        .collect();
    Spread::of(&values)
}

fn kube_writes(phase: &Phase) -> String {
    if phase.kube_writes.is_empty() {
        return "none".into();
    }
    phase
        .kube_writes
        .iter()
        .map(|(what, n)| format!("{what} {n:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    fn render_operator(&self, out: &mut String) {
        let Some(op) = &self.operator else { return };
        let (grants, reference) = (op.grants, op.reference_grants);
        let _ = writeln!(
            out,
            "## 4. Operator: {grants} grants at once, real kube-apiserver + etcd, IAM on moto, SSM through the emulator\n\n\
             The operator's release binary (one process per run, one replica leading alone, `--resync-seconds {}`) \
             against the fixtures' kube-apiserver + etcd and moto ({}); SSM is the project's emulator (moto \
             upstream, a fleet of {FLEET_SIZE} managed instances), as the operator's own tests wire it. Each grant \
             lets one IAM role, the same for every grant, start SSH sessions and forward port 5432 to one \
             instance: the role's policy set merges them all (IAM's default quota: {IAM_DEFAULT_QUOTA} managed \
             policies per identity), and the grants share one Port document. The \
             grants are created {CREATE_CONCURRENCY} in flight at once; Ready means every grant's current \
             generation has Ready=True (seen through a watch). AWS calls are the operator's \
             `fleet_access_operator_aws_calls_total`; Kubernetes writes are the API server's \
             `apiserver_request_total` (write verbs; left out: Leases, which the leader renews every few \
             seconds, and the API server's own writes of the `kubernetes` Service's endpoints). Side by side in each run: the same grants created into a namespace no operator watches \
             (the API server's own floor), and a run with {reference} grants (how the time scales). Runs: {} at \
             {grants} grants, {} at {reference}; each run deletes everything it created.\n",
            op.resync.as_secs(),
            op.services,
            op.runs.len(),
            op.reference.len()
        );
        let _ = writeln!(
            out,
            "| Measured (s) | Grants | Median | Min | Max | Runs | Per grant |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for runs in [&op.runs, &op.reference] {
            let Some(first) = runs.first() else { continue };
            let n = first.grants;
            let values = |f: fn(&OperatorRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
            seconds_row(
                out,
                "create, no operator watching (API server floor)",
                n,
                &values(|r| r.floor_create_seconds),
            );
            seconds_row(
                out,
                "create, operator running",
                n,
                &values(|r| r.create_seconds),
            );
            seconds_row(
                out,
                "**first create to every grant Ready**",
                n,
                &values(|r| r.ready_seconds),
            );
            seconds_row(
                out,
                "every grant deleted (finalizer: IAM and SSM cleaned)",
                n,
                &values(|r| r.delete.seconds),
            );
        }
        let ready = per_grant(&op.runs, |r| r.ready_seconds);
        let ready_reference = per_grant(&op.reference, |r| r.ready_seconds);
        let floor = per_grant(&op.runs, |r| r.floor_create_seconds);
        if ready.runs > 0 && ready_reference.runs > 0 && floor.runs > 0 {
            let _ = writeln!(
                out,
                "\nReady time per grant at {grants} grants is {:.2}x that at {reference} ({}; 1.00 = linear), and \
                 {:.1}x the API server's own create time per grant.\n",
                ready.median / ready_reference.median.max(1e-9),
                if ready.median <= ready_reference.median * 1.1 {
                    "linear or better"
                } else {
                    "worse than linear"
                },
                ready.median / floor.median.max(1e-9)
            );
        }
        let resync_writes = op
            .runs
            .iter()
            .chain(&op.reference)
            .map(|r| r.resync.writes());
        let max_resync_writes = resync_writes.fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "AWS calls per grant at {grants} grants (median of the runs). Apply: from the operator's start until it \
             settled after every grant was Ready (no reconcile for 3 s). Resync: one full resync of every grant in \
             steady state, from then until the reconcile counter grew by {grants}. Delete: from the deletion of every \
             grant until they were all gone.\n"
        );
        let _ = writeln!(
            out,
            "| Service | Operation | Outcome | Apply | Resync | Delete |\n|---|---|---|---:|---:|---:|"
        );
        let mut keys = std::collections::BTreeSet::new();
        for run in &op.runs {
            for phase in [&run.apply, &run.resync, &run.delete] {
                keys.extend(phase.calls.keys().cloned());
            }
        }
        let cell = |spread: Spread| {
            if spread.median == 0.0 {
                String::new()
            } else {
                format!("{:.2}", spread.median)
            }
        };
        for key in &keys {
            let of = |phase: fn(&OperatorRun) -> &Phase| {
                per_grant(&op.runs, |r| {
                    phase(r).calls.get(key).copied().unwrap_or(0.0)
                })
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                key.0,
                key.1,
                key.2,
                cell(of(|r| &r.apply)),
                cell(of(|r| &r.resync)),
                cell(of(|r| &r.delete))
            );
        }
        let total = |phase: fn(&OperatorRun) -> &Phase| per_grant(&op.runs, |r| phase(r).total());
        let writes = |phase: fn(&OperatorRun) -> &Phase| per_grant(&op.runs, |r| phase(r).writes());
        let reconciles =
            |phase: fn(&OperatorRun) -> &Phase| per_grant(&op.runs, |r| phase(r).reconciles);
        let _ = writeln!(
            out,
            "| **all** | | | **{:.2}** | **{:.2}** | **{:.2}** |\n\
             | **writes** | | | **{:.2}** | **{:.2}** | **{:.2}** |\n\
             | reconciles per grant | | | {:.2} | {:.2} | {:.2} |\n",
            total(|r| &r.apply).median,
            total(|r| &r.resync).median,
            total(|r| &r.delete).median,
            writes(|r| &r.apply).median,
            writes(|r| &r.resync).median,
            writes(|r| &r.delete).median,
            reconciles(|r| &r.apply).median,
            reconciles(|r| &r.resync).median,
            reconciles(|r| &r.delete).median,
        );
        let _ = writeln!(
            out,
            "**Steady-state resync: {:.0} AWS writes** (most in any run, either size; goal zero: {}).\n",
            max_resync_writes,
            if max_resync_writes == 0.0 {
                "met"
            } else {
                "not met"
            }
        );
        let _ = writeln!(
            out,
            "Per run and phase (POST and DELETE of sessionaccesses are the bench's own creates and delete-collection):\n"
        );
        let _ = writeln!(
            out,
            "| Run | Phase | Seconds | Reconciles | AWS reads | AWS writes | Kubernetes writes |\n|---|---|---:|---:|---:|---:|---|"
        );
        for (i, run) in op.reference.iter().chain(&op.runs).enumerate() {
            for (name, phase) in [
                ("apply", &run.apply),
                ("resync", &run.resync),
                ("delete", &run.delete),
            ] {
                let _ = writeln!(
                    out,
                    "| {} grants #{} | {name} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
                    run.grants,
                    i,
                    phase.seconds,
                    phase.reconciles,
                    phase.total() - phase.writes(),
                    phase.writes(),
                    kube_writes(phase)
                );
            }
        }
        let all = || op.runs.iter().chain(&op.reference);
        for runs in [&op.runs, &op.reference] {
            let Some(first) = runs.first() else { continue };
            let most = runs.iter().map(|r| r.role_policies).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "\nManaged policies attached to the one role at {} grants (most in any run): **{most}** \
                 (IAM's default quota: {IAM_DEFAULT_QUOTA}; goal: within it).",
                first.grants
            );
        }
        let attachments: usize = all().map(|r| r.leftover_attachments).sum();
        let documents: usize = all().map(|r| r.leftover_documents).sum();
        let _ = writeln!(
            out,
            "\nAfter the deletions: {attachments} policies still attached to the runs' roles, {documents} of the \
             grants' session documents still in SSM (the bench then deletes both, and the roles).\n"
        );
        if !op.failures.is_empty() {
            let _ = writeln!(out, "Failed runs:\n");
            for failure in &op.failures {
                let _ = writeln!(out, "- {}", failure.replace('\n', " "));
            }
            let _ = writeln!(out);
        }
        if let Some(profile) = &op.profile {
            let _ = writeln!(
                out,
                "Profile of the operator during the first {grants}-grant apply (`perf record -F 999 -g -p PID` from the \
                 first create until every grant was Ready; self time, symbols at 1 % or more):\n\n```\n{profile}\n```\n"
            );
        }
    }
}

/// The ratio and verdict cells of a row whose reference did not run in the same runs: said in
/// the row, never replaced by a nominal figure.
fn unmeasured(goal: &str, reference: &str) -> (String, String) {
    (
        format!("**{reference} not measured**"),
        format!("{goal}: cannot be judged"),
    )
}

/// What the runs the hypervisor left alone show, or that there were none.
fn calm_words(setup: &Setup) -> String {
    let limit = CALM_STEAL * 100.0;
    match &setup.calm {
        Some(calm) => format!(
            "Runs with steal under {limit:.0} % (calm): {} of {} (the part runs until {} are calm, for at most three \
             times as many runs or {} minutes). **Among the calm runs, added at p99: {} ms** (min {}, max {}; goal: \
             at most 2 ms: {}); at p50: {} ms.",
            calm.runs,
            setup.runs,
            setup.wanted_calm_runs,
            crate::scenarios::SETUP_LIMIT.as_secs() / 60,
            ms(calm.added_p99.median),
            ms(calm.added_p99.min),
            ms(calm.added_p99.max),
            if calm.added_p99.median <= 0.002 {
                "met"
            } else {
                "not met"
            },
            ms(calm.added_p50.median),
        ),
        None => format!(
            "**No run had steal under {limit:.0} %** ({} runs): the p99 cannot be told apart from the hypervisor's \
             stalls in this run.",
            setup.runs
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(throughput: Vec<Throughput>) -> Report {
        Report {
            facts: Vec::new(),
            command: String::new(),
            options: Options::parse(&[]).expect("the default options"),
            plugin: None,
            throughput,
            setup: None,
            scale: None,
            operator: None,
            missing: Vec::new(),
            profiles: Vec::new(),
            slow_reader: None,
            parallel: None,
            shell_paste: None,
            memory: None,
        }
    }

    fn figure(mode: Mode, direction: Direction, client: ClientKind, median: f64) -> Throughput {
        Throughput {
            mode,
            direction,
            client,
            bytes_per_second: Spread {
                median,
                min: median,
                max: median,
                runs: 3,
            },
            error: None,
        }
    }

    #[test]
    fn a_verdict_needs_its_reference_measured_in_the_same_run() {
        let cases = [
            (
                Mode::Realistic,
                Direction::Upload,
                ClientKind::Plugin,
                "≥ 8x plugin",
            ),
            (
                Mode::Realistic,
                Direction::Download,
                ClientKind::AgentReadLoop,
                "≥ 0.95 of agent",
            ),
            (
                Mode::Fast,
                Direction::Upload,
                ClientKind::RawRelay,
                "≥ 0.5 of relay",
            ),
        ];
        for (mode, direction, reference, goal) in cases {
            let ours = figure(mode, direction, ClientKind::Forward, 30e6);
            let (ratio, verdict) = report(vec![ours.clone()]).ratio(&ours);
            assert!(ratio.contains("not measured"), "{goal}: {ratio}");
            assert_eq!(verdict, format!("{goal}: cannot be judged"));
            let measured = report(vec![ours.clone(), figure(mode, direction, reference, 1e6)]);
            assert_eq!(measured.ratio(&ours).1, format!("{goal}: met"));
        }
    }

    #[test]
    fn fast_downloads_are_judged_against_the_digesting_relay_too() {
        let (fast, down) = (Mode::Fast, Direction::Download);
        let ours = figure(fast, down, ClientKind::Serve, 450e6);
        let relay = figure(fast, down, ClientKind::RawRelay, 800e6);
        let digesting = |median| figure(fast, down, ClientKind::DigestingRelay, median);
        let verdict = |figures: Vec<Throughput>| report(figures).ratio(&ours).1;
        assert_eq!(
            verdict(vec![ours.clone(), relay.clone()]),
            "≥ 0.5 of relay: met; ≥ 0.9 of digesting relay: cannot be judged"
        );
        assert_eq!(
            verdict(vec![ours.clone(), relay.clone(), digesting(600e6)]),
            "≥ 0.5 of relay: met; ≥ 0.9 of digesting relay: not met"
        );
        assert_eq!(
            verdict(vec![ours.clone(), relay, digesting(480e6)]),
            "≥ 0.5 of relay: met; ≥ 0.9 of digesting relay: met"
        );
    }

    /// One run's figures: the bridge's total p99 and the floor's, with its steal.
    fn run(ours_p99: f64, floor_p99: f64, steal: f64) -> Setup {
        let row = |phase: &str, p99: f64| SetupRow {
            phase: phase.into(),
            p50: p99 / 2.0,
            p99,
            mean: p99 / 2.0,
            exact: true,
        };
        Setup {
            sessions: 200,
            runs: 1,
            failures: 0,
            floor_failures: 0,
            rows: vec![row("total", ours_p99)],
            reference: vec![row("total (floor client)", floor_p99)],
            added_p50: Spread::of(&[]),
            added_p99: Spread::of(&[]),
            steal: Some(steal),
            calm: None,
            wanted_calm_runs: 0,
        }
    }

    #[test]
    fn calm_runs_are_judged_apart_or_said_to_be_missing() {
        let runs = [
            run(0.010, 0.002, 0.08),
            run(0.0035, 0.002, 0.01),
            run(0.0040, 0.002, 0.0),
        ];
        let setup = Setup::of_runs(&runs, Some(0.03), 2);
        let calm = setup.calm.as_ref().expect("two calm runs");
        assert_eq!(calm.runs, 2);
        // 1.5 and 2.0 ms added: the stormy run's 8 ms is left out.
        assert!((calm.added_p99.median - 0.00175).abs() < 1e-9, "{calm:?}");
        let words = calm_words(&setup);
        assert!(words.contains("2 of 3"), "{words}");
        assert!(words.contains("added at p99: 1.75 ms"), "{words}");
        let stormy = Setup::of_runs(&runs[..1], Some(0.08), 2);
        assert!(calm_words(&stormy).contains("No run had steal under 2 %"));
    }
}
