//! The slow-reader benchmark: a client reads a download at 10 KB/s for a while, then as fast as
//! it can. How fast the rest comes once it speeds up (first what the buffers on the way held,
//! then the steady rate), against the emulated agent's own read loop measured in the same part,
//! and how much memory the client process holds meanwhile.
//!
//! The agent has no send window and resends only its oldest unacknowledged message, once per
//! 100 ms tick: a client that drops what it cannot hold makes the rest crawl at about a message
//! per tick, while one that pushes back (stops reading its WebSocket) resumes at the agent's
//! own pace.

use std::{fmt::Write as _, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

use crate::{
    figures::ClientKind,
    roles::{CHUNK, DOWNLOAD, Target},
    scenarios::{Client, Options, open},
    support::{Emulator, Mode, Workspace, rss_kib},
};

/// What the reader takes per tick while slow, and the tick: 10 KB/s.
const SLOW_READ: usize = 1000;
const SLOW_TICK: Duration = Duration::from_millis(100);

/// One client's figures.
#[derive(Clone, Debug)]
pub struct SlowReaderRow {
    /// Through what.
    pub client: ClientKind,
    /// Bytes per second over the first window after the slow phase (what buffers held, then
    /// new data).
    pub first: Option<f64>,
    /// Bytes per second over the window after that: the steady rate.
    pub after: Option<f64>,
    /// The client process's largest resident set during the slow phase.
    pub peak_rss_kib: Option<u64>,
    /// Why it was not measured.
    pub error: Option<String>,
}

/// The part's figures.
#[derive(Clone, Debug)]
pub struct SlowReader {
    /// How long the reader was slow.
    pub slow_phase: Duration,
    /// How long it then read at full speed.
    pub window: Duration,
    /// One row per client.
    pub rows: Vec<SlowReaderRow>,
}

/// The plugin built from source reports ClientVersion 1.2.0.0, which keeps the agent's smux
/// keepalive on (released plugins, newer than 1.2.331.0, turn it off): the agent then ends a
/// mux session after 30 s in which the client sent nothing, which a download read slowly for
/// 30 s is. The part keeps that timeout beyond its own length.
const KEEPALIVE_TIMEOUT: &str = "smux_keepalive_timeout_ms: 600000\n";

/// Runs the part: every client in turn on one realistic-mode emulator, the agent's read loop
/// last as the reference.
pub async fn run(ws: &Workspace, options: &Options, target: &Target) -> anyhow::Result<SlowReader> {
    let emulator = Emulator::start_with(
        ws,
        Mode::Realistic,
        target.addr,
        "slow-reader",
        KEEPALIVE_TIMEOUT,
    )
    .await?;
    let mut kinds = vec![ClientKind::Forward, ClientKind::Serve];
    if ws.plugin.is_some() {
        kinds.push(ClientKind::Plugin);
    }
    kinds.push(ClientKind::AgentReadLoop);
    let mut rows = Vec::new();
    for kind in kinds {
        let row = match Client::start(kind, ws, &emulator, target.addr, "slow-reader").await {
            Ok(client) => {
                let result = measure(&client, options.slow_phase, options.slow_window).await;
                client.stop().await;
                match result {
                    Ok(Measured {
                        first,
                        after,
                        peak_rss_kib,
                    }) => {
                        eprintln!(
                            "bench: slow reader, {}: {:.2} then {:.2} MB/s after the slow phase, peak RSS {peak_rss_kib} KiB",
                            kind.name(),
                            first / 1e6,
                            after / 1e6
                        );
                        SlowReaderRow {
                            client: kind,
                            first: Some(first),
                            after: Some(after),
                            peak_rss_kib: Some(peak_rss_kib),
                            error: None,
                        }
                    }
                    Err(error) => failed(kind, &error),
                }
            }
            Err(error) => failed(kind, &error),
        };
        rows.push(row);
    }
    Ok(SlowReader {
        slow_phase: options.slow_phase,
        window: options.slow_window,
        rows,
    })
}

fn failed(client: ClientKind, error: &anyhow::Error) -> SlowReaderRow {
    eprintln!("bench: slow reader, {}: {error:#}", client.name());
    SlowReaderRow {
        client,
        first: None,
        after: None,
        peak_rss_kib: None,
        error: Some(format!("{error:#}")),
    }
}

/// What one client showed.
struct Measured {
    first: f64,
    after: f64,
    peak_rss_kib: u64,
}

/// Reads [`SLOW_READ`] bytes per [`SLOW_TICK`] for `slow`, sampling the client's memory each
/// second, then as fast as it can for two windows of `window`: the rate over each, and the peak
/// resident set.
async fn measure(client: &Client, slow: Duration, window: Duration) -> anyhow::Result<Measured> {
    let mut stream = open(client.addr).await?;
    stream.write_all(&[DOWNLOAD]).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut tick = tokio::time::interval(SLOW_TICK);
    let fast_from = Instant::now() + slow;
    let mut peak_rss = rss_kib(client.pid)?;
    let mut sampled = Instant::now();
    while Instant::now() < fast_from {
        tick.tick().await;
        let read = tokio::time::timeout(SLOW_TICK * 10, stream.read(&mut buf[..SLOW_READ])).await;
        anyhow::ensure!(
            !matches!(read, Ok(Ok(0))),
            "the download ended during the slow phase"
        );
        read.map_err(|_| anyhow::anyhow!("no byte within a second during the slow phase"))??;
        if sampled.elapsed() >= Duration::from_secs(1) {
            sampled = Instant::now();
            peak_rss = peak_rss.max(rss_kib(client.pid)?);
        }
    }
    let first = read_for(&mut stream, &mut buf, window).await?;
    let after = read_for(&mut stream, &mut buf, window).await?;
    Ok(Measured {
        first,
        after,
        peak_rss_kib: peak_rss,
    })
}

/// Reads as fast as it can for `window`; the rate.
async fn read_for(
    stream: &mut tokio::net::TcpStream,
    buf: &mut [u8],
    window: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut bytes = 0u64;
    while let Some(left) = window.checked_sub(started.elapsed()) {
        match tokio::time::timeout(left, stream.read(buf)).await {
            Ok(Ok(0)) => anyhow::bail!("the download ended after the slow phase"),
            Ok(Ok(n)) => bytes += n as u64,
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => break,
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}

/// The report's section.
pub fn render(part: &SlowReader, section: usize, out: &mut String) {
    let _ = writeln!(
        out,
        "## {section}. A slow reader (realistic emulator)\n\n\
         A download read at 10 KB/s (1,000 bytes every 100 ms) for {} s, then as fast as the client allows for \
         twice {} s: the rate over the first {} s (mostly what the buffers on the way held) and over the next (the \
         steady rate), against the emulated agent's own read loop (1,024-byte reads with a 1 ms pause) measured in \
         this part. The emulator keeps the agent's smux keepalive timeout beyond the part's length: the \
         plugin built from source reports ClientVersion 1.2.0.0, which keeps that keepalive on, and a download \
         read slowly sends the agent nothing for 30 s. One run per client, the clients one after another on one emulator. The \
         agent has no send window and resends only its oldest unacknowledged message once per 100 ms, so a client \
         that drops what it cannot hold while the reader is slow gets the rest at about a message per tick. Peak \
         RSS: the client process's largest resident set, sampled each second of the slow phase (the serve path: \
         the process serving the listeners).\n",
        part.slow_phase.as_secs(),
        part.window.as_secs(),
        part.window.as_secs(),
    );
    let reference = part
        .rows
        .iter()
        .find(|r| r.client == ClientKind::AgentReadLoop)
        .and_then(|r| r.after)
        .filter(|r| *r > 0.0);
    let _ = writeln!(
        out,
        "| client | first window (MB/s) | next window (MB/s) | next vs the agent's read loop | peak RSS while slow (MiB) |\n|---|---|---|---|---|"
    );
    for row in &part.rows {
        let (rate, ratio) = match (row.after, reference) {
            (None, _) => (
                format!(
                    "not measured: {}",
                    row.error.as_deref().unwrap_or("no figure")
                ),
                String::new(),
            ),
            (Some(after), _) if row.client == ClientKind::AgentReadLoop => {
                (format!("{:.2}", after / 1e6), "reference".to_owned())
            }
            (Some(after), Some(reference)) => (
                format!("{:.2}", after / 1e6),
                format!("{:.2}", after / reference),
            ),
            (Some(after), None) => (
                format!("{:.2}", after / 1e6),
                "**the read-loop reference not measured**: cannot be judged".to_owned(),
            ),
        };
        let first = row
            .first
            .map_or_else(String::new, |first| format!("{:.2}", first / 1e6));
        let rss = row
            .peak_rss_kib
            .map_or_else(String::new, |kib| format!("{:.1}", kib as f64 / 1024.0));
        let _ = writeln!(
            out,
            "| {} | {first} | {rate} | {ratio} | {rss} |",
            row.client.name()
        );
    }
    let _ = writeln!(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(client: ClientKind, after: Option<f64>) -> SlowReaderRow {
        SlowReaderRow {
            client,
            first: after.map(|a| a * 2.0),
            after,
            peak_rss_kib: after.map(|_| 20 * 1024),
            error: after.is_none().then(|| "did not start".to_owned()),
        }
    }

    #[test]
    fn rows_compare_with_the_read_loop_or_say_they_cannot() {
        let mut part = SlowReader {
            slow_phase: Duration::from_secs(30),
            window: Duration::from_secs(10),
            rows: vec![
                row(ClientKind::Forward, Some(0.5e6)),
                row(ClientKind::AgentReadLoop, Some(1.0e6)),
            ],
        };
        let mut out = String::new();
        render(&part, 5, &mut out);
        assert!(
            out.contains("| agent-bridge forward | 1.00 | 0.50 | 0.50 | 20.0 |"),
            "{out}"
        );
        assert!(out.contains("| reference |"), "{out}");
        part.rows[1] = row(ClientKind::AgentReadLoop, None);
        let mut out = String::new();
        render(&part, 5, &mut out);
        assert!(out.contains("cannot be judged"), "{out}");
        assert!(out.contains("not measured: did not start"), "{out}");
    }
}
