//! A paste into a shell: how fast what a person pastes reaches the instance's shell, through
//! `agent-bridge shell` and through the official plugin (the reference), each in a real
//! terminal (tmux) on the realistic emulator, side by side in each run. The plugin reads its
//! input 1 KiB at a time with a 1 ms pause between sends; the remote shell reads the paste
//! with `head -c` (no echo, no line discipline in the way) and prints a marker when it has it
//! all, which the terminal's screen shows.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use fleet_access_tests::Terminal;
use tokio::time::Instant;

use crate::{
    figures::{RateRow, rates_against_plugin},
    scenarios::Options,
    support::{Emulator, INSTANCE, Mode, REGION, Workspace},
};

/// Bytes pasted in each run.
pub const PASTE_BYTES: usize = 256 * 1024;
/// What the remote shell prints once it has read the whole paste.
const DONE: &str = "paste-received";
/// Longest a paste may take.
const LIMIT: Duration = Duration::from_secs(120);

/// Who pastes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paster {
    /// `agent-bridge shell`.
    Bridge,
    /// The official plugin (the reference).
    Plugin,
}

impl Paster {
    fn name(self) -> &'static str {
        match self {
            Paster::Bridge => "agent-bridge shell",
            Paster::Plugin => "session-manager-plugin",
        }
    }
}

/// One client's paste rates (bytes per second), one per run.
#[derive(Clone, Debug)]
pub struct PasteRow {
    /// Who.
    pub paster: Paster,
    /// The rate of each run.
    pub rates: Vec<f64>,
    /// Why a run was not measured.
    pub error: Option<String>,
}

impl PasteRow {}

/// The part's figures.
#[derive(Clone, Debug)]
pub struct ShellPaste {
    /// One row per client.
    pub rows: Vec<PasteRow>,
}

/// Runs the part: each run pastes through every client in turn, on one realistic emulator.
pub async fn run(ws: &Workspace, options: &Options) -> anyhow::Result<ShellPaste> {
    let unused = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
    let emulator = Emulator::start_with(ws, Mode::Realistic, unused, "shell-paste", "").await?;
    let mut pasters = vec![Paster::Bridge];
    if ws.plugin.is_some() {
        pasters.push(Paster::Plugin);
    }
    let mut rows: Vec<PasteRow> = (pasters.iter())
        .map(|&paster| PasteRow {
            paster,
            rates: Vec::new(),
            error: None,
        })
        .collect();
    let paste = ws.scratch.join("paste.txt");
    let text: String = "0123456789abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(PASTE_BYTES)
        .collect();
    std::fs::write(&paste, text).context("writing the paste")?;
    for _ in 0..options.runs {
        for row in &mut rows {
            match paste_through(ws, &emulator, row.paster, &paste).await {
                Ok(rate) => {
                    eprintln!(
                        "bench: shell paste, {}: {:.1} KB/s",
                        row.paster.name(),
                        rate / 1e3
                    );
                    row.rates.push(rate);
                }
                Err(error) => {
                    eprintln!("bench: shell paste, {}: {error:#}", row.paster.name());
                    row.error = Some(format!("{error:#}"));
                }
            }
        }
    }
    Ok(ShellPaste { rows })
}

/// Starts `paster`'s shell in a terminal, readies the remote shell to read the paste, pastes
/// and returns the bytes per second until the remote shell had it all.
async fn paste_through(
    ws: &Workspace,
    emulator: &Emulator,
    paster: Paster,
    paste: &std::path::Path,
) -> anyhow::Result<f64> {
    let home = ws.scratch.join("home");
    std::fs::create_dir_all(&home)?;
    let home = home.display().to_string();
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIABENCH"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", REGION),
        ("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE", "true"),
        ("HOME", home.as_str()),
    ];
    let argv = match paster {
        Paster::Bridge => vec![
            ws.bin("agent-bridge").display().to_string(),
            "shell".into(),
            INSTANCE.into(),
            "--region".into(),
            REGION.into(),
            "--ssm-endpoint".into(),
            emulator.url.clone(),
            "--allow-any-stream-url".into(),
        ],
        Paster::Plugin => {
            let plugin = ws.plugin.clone().context("the plugin")?;
            let document = "SSM-SessionManagerRunShell";
            let mut response = emulator
                .start_session(document, serde_json::json!({}))
                .await?;
            response["ResponseMetadata"] = serde_json::json!({"HTTPStatusCode": 200});
            let request = serde_json::json!({"Target": INSTANCE, "DocumentName": document});
            fleet_access_tests::plugin_command_line(
                &plugin,
                &response,
                REGION,
                &request,
                &emulator.url,
            )
        }
    };
    let terminal = Terminal::start(&argv, &env, 120, 40)?;
    let shown = |what: &'static str| {
        let terminal = &terminal;
        async move {
            terminal
                .wait_for_screen(LIMIT, |s| s.contains(what))
                .await
                .map_err(|screen| anyhow::anyhow!("{what:?} never appeared:\n{screen}"))
        }
    };
    terminal.type_text("echo ready-$((1+1))")?;
    terminal.press("Enter")?;
    shown("ready-2").await?;
    terminal.type_text(&format!(
        "stty -echo -icanon min 1; head -c {PASTE_BYTES} > /dev/null; echo {DONE}-$((2+2))"
    ))?;
    terminal.press("Enter")?;
    // The command's echo is the last thing before `stty` turns echo off.
    shown("/dev/null; echo").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    terminal.paste_file(paste)?;
    shown("paste-received-4").await?;
    let rate = PASTE_BYTES as f64 / started.elapsed().as_secs_f64();
    terminal.type_text("exit")?;
    terminal.press("Enter")?;
    let _ = terminal.wait_for_exit(Duration::from_secs(10)).await;
    Ok(rate)
}

/// The report's section.
pub fn render(part: &ShellPaste, section: usize, out: &mut String) {
    let _ = writeln!(
        out,
        "## {section}. A paste into a shell (realistic emulator)\n\n\
         {} KiB pasted (tmux `paste-buffer`) into a shell session's terminal, the remote shell reading it \
         with `head -c` and printing a marker once it has it all; time from the paste to the marker on the \
         screen (screen polled every 50 ms). The official plugin sends what it reads 1 KiB at a time with a \
         1 ms pause; `agent-bridge shell` sends what it has, up to 32 KiB a message, paced under the \
         gateway's message rate. A paste faster than a few polls is only bounded from below. Runs \
         interleave the clients; median of {} runs (min, max).\n",
        PASTE_BYTES / 1024,
        part.rows.iter().map(|r| r.rates.len()).max().unwrap_or(0),
    );
    let rows: Vec<_> = (part.rows.iter())
        .map(|row| RateRow {
            name: row.paster.name(),
            rates: &row.rates,
            error: row.error.as_deref(),
            is_plugin: row.paster == Paster::Plugin,
        })
        .collect();
    rates_against_plugin(out, "paste (KB/s)", 1e3, 1, &rows);
    let _ = writeln!(out);
}
