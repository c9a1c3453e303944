//! Memory under a thousand slow readers: the serve path (with its shipped memory budget) carries
//! a thousand downloads whose clients read 10 KB/s each, on a realistic-mode emulator that
//! sends each at the agent's own pace. The bridge's resident set is sampled every second
//! against the bound the budget promises (its size plus what the open sessions cost idle);
//! the budget's own metrics say how much of it was held, how often sessions waited for it, and
//! how many of the connections opened once it was spent were refused.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::{
    figures::ClientKind,
    roles::{DOWNLOAD, Target},
    scenarios::{Client, Options, open},
    support::{Emulator, Mode, Workspace, http_get, rss_kib},
};
use fleet_access_agent_bridge::budget::SESSION_FLOOR;

/// What each reader takes per tick, and the tick: 10 KB/s.
const SLOW_READ: usize = 1000;
const SLOW_TICK: Duration = Duration::from_millis(100);
/// How long the slow readers go on once the budget is spent (within three times the asked-for
/// phase).
const SPENT_FOR: Duration = Duration::from_secs(10);
/// Connections opened once the slow readers have spent the budget.
const LATE_CONNECTIONS: usize = 50;

/// One run's figures.
#[derive(Clone, Debug)]
pub struct MemoryRun {
    /// Through what: the serve path with its budget, or without one.
    pub client: ClientKind,
    /// Slow readers carried at once.
    pub sessions: usize,
    /// Of them, opens that failed.
    pub failed: usize,
    /// How long they read slowly.
    pub lasted: Duration,
    /// The serve path's budget (`agent_bridge_memory_budget_bytes`; 0 without one).
    pub budget_bytes: u64,
    /// RSS with no tunnel.
    pub base_rss_kib: u64,
    /// RSS with every tunnel open and idle.
    pub idle_rss_kib: u64,
    /// The largest RSS sampled while they read slowly.
    pub peak_rss_kib: u64,
    /// The largest `agent_bridge_memory_budget_in_use_bytes` sampled meanwhile.
    pub peak_in_use: u64,
    /// When the budget was first seen spent (no room for another session's floor).
    pub spent_after: Option<Duration>,
    /// `agent_bridge_memory_budget_waits_total` at the end.
    pub waits: u64,
    /// Connections opened once the budget was spent.
    pub late_opened: usize,
    /// Of them, refused for the budget (the bridge's metric).
    pub late_refused: u64,
    /// `agent_bridge_memory_budget_overdrawn_total` at the end.
    pub overdrawn: u64,
    /// Bytes the slow readers read together.
    pub read: u64,
}

/// The part's figures: the serve path with its budget, and without one as the reference.
#[derive(Clone, Debug)]
pub struct Memory {
    /// How long the readers were asked to read slowly at least.
    pub slow_phase: Duration,
    /// With the budget `agent-bridge serve` ships.
    pub budgeted: MemoryRun,
    /// Without a budget.
    pub unbudgeted: Option<MemoryRun>,
}

/// Runs the part: without a budget first (the reference), then with it, on one emulator.
pub async fn run(ws: &Workspace, options: &Options, target: &Target) -> anyhow::Result<Memory> {
    let emulator = Emulator::start(ws, Mode::Realistic, target.addr).await?;
    let unbudgeted = (measure(
        ws,
        options,
        target,
        &emulator,
        ClientKind::ServeWithoutBudget,
    )
    .await)
        .ok();
    let budgeted = measure(ws, options, target, &emulator, ClientKind::Serve).await?;
    Ok(Memory {
        slow_phase: options.slow_phase,
        budgeted,
        unbudgeted,
    })
}

async fn measure(
    ws: &Workspace,
    options: &Options,
    target: &Target,
    emulator: &Emulator,
    client: ClientKind,
) -> anyhow::Result<MemoryRun> {
    let serve = Client::start(client, ws, emulator, target.addr, "memory").await?;
    let admin = serve
        .admin
        .ok_or_else(|| anyhow::anyhow!("no admin address"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_rss_kib = rss_kib(serve.pid)?;
    let sessions = options.idle_tunnels;
    let (streams, failed) = open_many(serve.addr, sessions).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss_kib = rss_kib(serve.pid)?;

    let read = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (streams.into_iter())
        .map(|stream| tokio::spawn(read_slowly(stream, stop.clone(), read.clone())))
        .collect();
    let mut peak_rss_kib = idle_rss_kib;
    let mut peak_in_use = 0;
    let mut late = Vec::new();
    let mut spent_after = None;
    let started = Instant::now();
    // The asked-for phase, and then until the budget has been spent for a while (bounded).
    let longest = options.slow_phase * 3;
    loop {
        let elapsed = started.elapsed();
        let spent_long_enough = spent_after.is_some_and(|at| elapsed >= at + SPENT_FOR);
        let budgeted = client == ClientKind::Serve;
        if elapsed >= longest || (elapsed >= options.slow_phase && (spent_long_enough || !budgeted))
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss_kib = peak_rss_kib.max(rss_kib(serve.pid)?);
        if !budgeted {
            continue;
        }
        let metrics = http_get(admin, "/metrics").await?;
        let in_use = value(&metrics, "agent_bridge_memory_budget_in_use_bytes");
        peak_in_use = peak_in_use.max(in_use);
        let limit = value(&metrics, "agent_bridge_memory_budget_bytes");
        if spent_after.is_none() && in_use + SESSION_FLOOR as u64 > limit {
            spent_after = Some(started.elapsed());
            // Refused connections get a line and are closed; admitted ones are held.
            for _ in 0..LATE_CONNECTIONS {
                if let Ok(stream) = TcpStream::connect(serve.addr).await {
                    late.push(stream);
                }
            }
        }
    }
    let lasted = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let _ = reader.await;
    }
    let metrics = http_get(admin, "/metrics").await?;
    let run = MemoryRun {
        client,
        sessions,
        failed,
        lasted,
        budget_bytes: value(&metrics, "agent_bridge_memory_budget_bytes"),
        base_rss_kib,
        idle_rss_kib,
        peak_rss_kib,
        peak_in_use,
        spent_after,
        waits: value(&metrics, "agent_bridge_memory_budget_waits_total"),
        late_opened: late.len(),
        late_refused: value(
            &metrics,
            r#"agent_bridge_connections_refused_total{reason="memory_budget"}"#,
        ),
        overdrawn: value(&metrics, "agent_bridge_memory_budget_overdrawn_total"),
        read: read.load(Ordering::Relaxed),
    };
    drop(late);
    serve.stop().await;
    Ok(run)
}

/// Opens `n` tunnels in batches of 50 (a burst of clients, bounded); returns them and how many
/// failed.
async fn open_many(addr: std::net::SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut streams = Vec::with_capacity(n);
    let mut failed = 0;
    let started = Instant::now();
    while streams.len() + failed < n && started.elapsed() < Duration::from_secs(600) {
        let batch = (n - streams.len() - failed).min(50);
        let opens: Vec<_> = (0..batch).map(|_| tokio::spawn(open(addr))).collect();
        for handle in opens {
            match handle.await {
                Ok(Ok(stream)) => streams.push(stream),
                _ => failed += 1,
            }
        }
    }
    (streams, failed)
}

/// Asks the target for a download and reads it at 10 KB/s until `stop`.
async fn read_slowly(mut stream: TcpStream, stop: Arc<AtomicBool>, read: Arc<AtomicU64>) {
    if stream.write_all(&[DOWNLOAD]).await.is_err() {
        return;
    }
    let mut buf = [0u8; SLOW_READ];
    let mut tick = tokio::time::interval(SLOW_TICK);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        match tokio::time::timeout(SLOW_TICK, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => {
                read.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
}

/// A sample's value in the Prometheus text format (0 when absent).
fn value(metrics: &str, name: &str) -> u64 {
    (metrics.lines())
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The part as a BENCHMARKS.md section.
pub fn render(part: &Memory, section: usize, out: &mut String) {
    let ours = &part.budgeted;
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let budget_kib = ours.budget_bytes / 1024;
    let bound = ours.idle_rss_kib + budget_kib;
    let _ = writeln!(
        out,
        "## {section}. Memory under {} slow readers (serve path, realistic emulator)\n",
        ours.sessions
    );
    let _ = writeln!(
        out,
        "{} tunnels through the serve path ({} failed to open), each asking the target for a \
         download and reading it at 10 KB/s (1,000 bytes every 100 ms) for {} s, while the \
         emulated agent sends each at its own pace (1 KiB reads with a 1 ms pause); with the \
         budget, on until it has been spent for {} s (at most three times as long). The \
         bridge's RSS is sampled every second; the bound is what the budget promises: the RSS \
         with every tunnel open and idle, plus the budget. When the budget is first seen \
         spent, {LATE_CONNECTIONS} more connections are opened: a connection whose floor (room \
         for one message and its reads) the spent budget cannot give is refused. The reference, \
         run first on the same emulator: the same serve path without a budget, each session \
         bounded on its own only. The kernel's socket buffers on the way (the client's receive \
         buffer, the bridge's send buffer) hold the first of each download: outside the \
         process, and outside its budget. One run each.\n",
        ours.sessions,
        ours.failed,
        part.slow_phase.as_secs(),
        SPENT_FOR.as_secs()
    );
    let reference = part.unbudgeted.as_ref();
    let cell = |f: &dyn Fn(&MemoryRun) -> String| reference.map_or("not measured".to_owned(), f);
    let _ = writeln!(
        out,
        "| Measured | with the budget | without a budget (reference) |\n|---|---:|---:|"
    );
    let per_reader = |run: &MemoryRun| {
        format!(
            "{:.1} MB ({:.1} KB/s each)",
            run.read as f64 / 1e6,
            run.read as f64 / 1e3 / run.lasted.as_secs_f64() / run.sessions.max(1) as f64
        )
    };
    let rows: [(&str, String, String); 10] = [
        ("memory budget", mib(budget_kib), "none".to_owned()),
        (
            "slow readers read for",
            format!("{} s", ours.lasted.as_secs()),
            cell(&|r| format!("{} s", r.lasted.as_secs())),
        ),
        (
            "bridge RSS, no tunnel",
            mib(ours.base_rss_kib),
            cell(&|r| mib(r.base_rss_kib)),
        ),
        (
            "bridge RSS, every tunnel open and idle",
            mib(ours.idle_rss_kib),
            cell(&|r| mib(r.idle_rss_kib)),
        ),
        (
            "**peak RSS while they read slowly**",
            format!("**{}**", mib(ours.peak_rss_kib)),
            cell(&|r| format!("**{}**", mib(r.peak_rss_kib))),
        ),
        (
            "budget in use at its peak (sampled each second)",
            format!("{:.1} MiB", ours.peak_in_use as f64 / 1_048_576.0),
            String::new(),
        ),
        (
            "budget first seen spent",
            ours.spent_after.map_or("never".to_owned(), |t| {
                format!("after {} s of slow reading", t.as_secs())
            }),
            String::new(),
        ),
        (
            "waits for the budget (`memory_budget_waits_total`)",
            ours.waits.to_string(),
            String::new(),
        ),
        (
            "connections opened once it was spent: refused for the budget",
            format!("{} of {}", ours.late_refused, ours.late_opened),
            String::new(),
        ),
        (
            "read by the slow readers together",
            per_reader(ours),
            cell(&|r| per_reader(r)),
        ),
    ];
    for (name, with, without) in rows {
        let _ = writeln!(out, "| {name} | {with} | {without} |");
    }
    let _ = writeln!(
        out,
        "| overdrawn (`memory_budget_overdrawn_total`) | {} | |",
        ours.overdrawn
    );
    let met = if ours.peak_rss_kib <= bound {
        "met"
    } else {
        "not met"
    };
    let _ = writeln!(
        out,
        "\nGoal (RSS under the budget plus the idle cost, {}): **{met}**, peak {}.\n",
        mib(bound),
        mib(ours.peak_rss_kib)
    );
}
