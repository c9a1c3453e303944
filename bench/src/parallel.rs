//! Parallel downloads: eight connections downloading at once through one client, on the
//! realistic emulator, whose agent reads each session's target in a 1 KiB / 1 ms loop. Through
//! one session every connection shares that loop; `agent-bridge forward`'s pool gives each a
//! session of its own. Measured side by side in each run: `forward` with its default pool,
//! `forward --max-sessions 1`, and the official plugin (one mux session), the reference.

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
    time::Instant,
};

use crate::{
    figures::ClientKind,
    figures::{RateRow, median_rate, rates_against_plugin},
    roles::{CHUNK, DOWNLOAD, Target},
    scenarios::{Client, Options, open},
    support::{Emulator, Mode, Workspace},
};

/// Connections downloading at once.
pub const CONNECTIONS: usize = 8;
/// The goal: `forward`'s pool against the plugin, in aggregate.
const GOAL: f64 = 6.0;
const WARM_UP: Duration = Duration::from_millis(500);

/// One client's aggregate download rates (bytes per second), one per run.
#[derive(Clone, Debug)]
pub struct ParallelRow {
    /// Through what.
    pub client: ClientKind,
    /// The rate of each run.
    pub rates: Vec<f64>,
    /// Why a run was not measured.
    pub error: Option<String>,
}

impl ParallelRow {}

/// The part's figures.
#[derive(Clone, Debug)]
pub struct Parallel {
    /// The measuring window of each run.
    pub window: Duration,
    /// One row per client.
    pub rows: Vec<ParallelRow>,
}

/// Runs the part: each run measures every client in turn on one realistic emulator.
pub async fn run(ws: &Workspace, options: &Options, target: &Target) -> anyhow::Result<Parallel> {
    let emulator = Emulator::start_with(ws, Mode::Realistic, target.addr, "parallel", "").await?;
    let mut kinds = vec![ClientKind::Forward, ClientKind::ForwardOneSession];
    if ws.plugin.is_some() {
        kinds.push(ClientKind::Plugin);
    }
    let mut rows: Vec<ParallelRow> = (kinds.iter())
        .map(|&client| ParallelRow {
            client,
            rates: Vec::new(),
            error: None,
        })
        .collect();
    for run in 0..options.runs {
        for row in &mut rows {
            let tag = format!("parallel-{run}");
            let measured = match Client::start(row.client, ws, &emulator, target.addr, &tag).await {
                Ok(client) => {
                    let rate = download_together(&client, options.window).await;
                    client.stop().await;
                    rate
                }
                Err(error) => Err(error),
            };
            match measured {
                Ok(rate) => {
                    eprintln!(
                        "bench: {CONNECTIONS} parallel downloads, {}: {:.2} MB/s",
                        row.client.name(),
                        rate / 1e6
                    );
                    row.rates.push(rate);
                }
                Err(error) => {
                    eprintln!(
                        "bench: parallel downloads, {}: {error:#}",
                        row.client.name()
                    );
                    row.error = Some(format!("{error:#}"));
                }
            }
        }
    }
    Ok(Parallel {
        window: options.window,
        rows,
    })
}

/// Opens [`CONNECTIONS`] connections through `client`, downloads on all of them, and returns
/// the bytes per second they received together over `window` after a warm-up.
async fn download_together(client: &Client, window: Duration) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let limit = WARM_UP + window + Duration::from_secs(5);
    let mut readers = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = open(client.addr).await?;
        stream.write_all(&[DOWNLOAD]).await?;
        let (received, stop) = (received.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
                {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    let (b0, t0) = (received.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let (b1, t1) = (received.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.abort();
        let _ = reader.await;
    }
    Ok((b1 - b0) as f64 / (t1 - t0).as_secs_f64())
}

/// The report's section.
pub fn render(part: &Parallel, section: usize, out: &mut String) {
    let _ = writeln!(
        out,
        "## {section}. {CONNECTIONS} parallel downloads (realistic emulator)\n\n\
         {CONNECTIONS} connections through one client, each downloading at once; bytes counted together at the \
         receiving end over {} s after a 0.5 s warm-up. `agent-bridge forward` with its default pool opens a \
         session per connection (up to 8); with `--max-sessions 1` every connection is a smux stream of one \
         session, as with the official plugin (the reference). The emulated agent reads each session's target in \
         a 1,024-byte loop with a 1 ms pause, so the connections of one session share that loop. Runs interleave \
         the clients; median of {} runs (min, max). Goal: the pool at least {GOAL}x the plugin.\n",
        part.window.as_secs_f64(),
        part.rows.iter().map(|r| r.rates.len()).max().unwrap_or(0),
    );
    let rows: Vec<_> = (part.rows.iter())
        .map(|row| RateRow {
            name: row.client.name(),
            rates: &row.rates,
            error: row.error.as_deref(),
            is_plugin: row.client == ClientKind::Plugin,
        })
        .collect();
    let reference = rates_against_plugin(out, "together (MB/s)", 1e6, 2, &rows);
    let pool = (part.rows.iter())
        .find(|r| r.client == ClientKind::Forward)
        .and_then(|r| median_rate(&r.rates));
    let verdict = match (pool, reference) {
        (Some(pool), Some(reference)) if pool / reference >= GOAL => {
            format!("Goal met: {:.1}x the plugin.", pool / reference)
        }
        (Some(pool), Some(reference)) => {
            format!("**Goal not met**: {:.1}x the plugin.", pool / reference)
        }
        _ => "The goal cannot be judged in this run.".to_owned(),
    };
    let _ = writeln!(out, "\n{verdict}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(client: ClientKind, rates: &[f64]) -> ParallelRow {
        ParallelRow {
            client,
            rates: rates.to_vec(),
            error: rates.is_empty().then(|| "did not start".to_owned()),
        }
    }

    #[test]
    fn the_pool_is_judged_against_the_plugin_or_not_at_all() {
        let mut part = Parallel {
            window: Duration::from_secs(3),
            rows: vec![
                row(ClientKind::Forward, &[7.0e6, 8.0e6, 7.5e6]),
                row(ClientKind::ForwardOneSession, &[1.0e6]),
                row(ClientKind::Plugin, &[1.0e6, 1.1e6, 0.9e6]),
            ],
        };
        let mut out = String::new();
        render(&part, 6, &mut out);
        assert!(
            out.contains("| agent-bridge forward | 7.50 | 7.00 | 8.00 | 7.50 |"),
            "{out}"
        );
        assert!(out.contains("| reference |"), "{out}");
        assert!(out.contains("Goal met: 7.5x the plugin."), "{out}");
        part.rows[2] = row(ClientKind::Plugin, &[]);
        let mut out = String::new();
        render(&part, 6, &mut out);
        assert!(out.contains("cannot be judged"), "{out}");
        assert!(out.contains("not measured: did not start"), "{out}");
    }
}
