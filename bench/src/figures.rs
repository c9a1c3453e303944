//! What the benchmarks measure, apart from how they measure it and how it is written: the
//! clients compared, the figures each part returns, and the table of rates against the official
//! plugin that several parts write.

use std::fmt::Write as _;

use crate::support::{Mode, Spread};

/// The clients compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// `agent-bridge forward` as shipped: a smux stream per connection, over a pool of
    /// sessions for parallel connections.
    Forward,
    /// `agent-bridge forward --max-sessions 1`: every connection a smux stream of one session.
    ForwardOneSession,
    /// The serve path: one basic (AWS-StartSSHSession) session per connection, within the
    /// memory budget `agent-bridge serve` ships with.
    Serve,
    /// The serve path without a memory budget (each session bounded on its own only).
    ServeWithoutBudget,
    /// The official session-manager-plugin, port forwarding, as the AWS CLI starts it.
    Plugin,
    /// Two chained raw TCP relays (stand-ins for the bridge and the emulator): the upper limit.
    RawRelay,
    /// The same two relays, each computing the SHA-256 of every chunk it carries: what the
    /// protocol's digests alone (each end hashes every message) leave of the relay.
    DigestingRelay,
    /// The two relays with only the far one (the emulator's stand-in) hashing: the ceiling of a
    /// client whose own digests cost nothing.
    FarDigestingRelay,
    /// The two relays doing the rest of what the protocol asks of each message, and nothing
    /// else: both hash it, the receiving one acknowledges it to the sender (an acknowledgement
    /// the size of an SSM one), and the sender reads the acknowledgements. No WebSocket, no
    /// sequence numbers, no resend buffer: what any data channel costs at the least.
    AcknowledgingRelay,
    /// One relay that reads what comes back as the emulated agent reads its target in
    /// realistic mode: the agent's own download ceiling on this machine, measured.
    AgentReadLoop,
}

impl ClientKind {
    /// Whether it carries bytes that way (the agent's read loop bounds downloads only).
    pub fn measures(self, direction: Direction) -> bool {
        self != ClientKind::AgentReadLoop || direction == Direction::Download
    }

    /// Whether it is one of the relays the clients are set against.
    pub fn is_relay(self) -> bool {
        matches!(
            self,
            ClientKind::RawRelay
                | ClientKind::DigestingRelay
                | ClientKind::FarDigestingRelay
                | ClientKind::AcknowledgingRelay
        )
    }

    /// The short name of a profile's files.
    pub(crate) fn profile_label(self) -> &'static str {
        match self {
            ClientKind::Serve | ClientKind::ServeWithoutBudget => "serve",
            _ => "forward",
        }
    }

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Forward => "agent-bridge forward",
            ClientKind::ForwardOneSession => "agent-bridge forward --max-sessions 1",
            ClientKind::Serve => "agent-bridge serve path",
            ClientKind::ServeWithoutBudget => "agent-bridge serve path without a memory budget",
            ClientKind::Plugin => "session-manager-plugin",
            ClientKind::RawRelay => "raw TCP relay x2",
            ClientKind::DigestingRelay => "raw TCP relay x2, SHA-256 of every chunk",
            ClientKind::FarDigestingRelay => "raw TCP relay x2, only the far one hashing",
            ClientKind::AcknowledgingRelay => {
                "raw TCP relay x2, SHA-256 of every chunk, each acknowledged"
            }
            ClientKind::AgentReadLoop => "emulated agent's read loop alone",
        }
    }
}

/// Which way the bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to instance.
    Upload,
    /// Instance to client.
    Download,
}

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
    /// CPU seconds the client's process spent per 10^9 bytes.
    pub near_cpu_per_gb: Spread,
    /// CPU seconds the far end (emulator or far relay) spent per 10^9 bytes.
    pub far_cpu_per_gb: Spread,
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
