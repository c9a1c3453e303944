//! `agent-bridge shell` end to end against the strict SSM emulator, whose shell sessions run
//! `sh` on a pseudo-terminal as the agent does: a script piped in runs and the session ends
//! when the shell exits; in a real terminal (tmux) the shell follows the window's size and
//! `~.` leaves the session. Every session ends with no protocol violation.

#![allow(clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use fleet_access_ssm_emulator::{
    Config, Emulator, InstanceConfig, Mode, Running, SessionStatus, Transfer,
};
use fleet_access_tests::{Terminal, workspace_binary};

const INSTANCE: &str = "i-0123456789abcdef0";
/// Longest wait for anything a shell session does.
const WAIT: Duration = Duration::from_secs(60);

async fn emulator() -> Running {
    let mut config = Config {
        mode: Mode::Realistic,
        ..Config::default()
    };
    config.instances.push(InstanceConfig::new(INSTANCE));
    Emulator::start(config).await.expect("emulator starts")
}

/// `agent-bridge shell INSTANCE` against `emulator`, with test credentials.
fn shell_command(emulator: &Running) -> Vec<String> {
    let bridge = workspace_binary("agent-bridge").expect("agent-bridge builds");
    vec![
        bridge.display().to_string(),
        "shell".into(),
        INSTANCE.into(),
        "--region".into(),
        "us-east-1".into(),
        "--ssm-endpoint".into(),
        emulator.endpoint_url(),
        "--allow-any-stream-url".into(),
    ]
}

const CREDENTIALS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
];

/// The one session's report once it has ended for good, with no violation anywhere.
async fn ended_cleanly(emulator: &Running) -> fleet_access_ssm_emulator::SessionReport {
    let reports = emulator
        .wait_for_all_ended(WAIT)
        .await
        .expect("the session ends");
    let violations = emulator.violations();
    assert!(violations.is_empty(), "{violations:?}");
    let [report] = reports.as_slice() else {
        panic!("one session expected: {reports:?}");
    };
    assert_eq!(report.transfer, Some(Transfer::Shell), "{report:?}");
    report.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piped_script_runs_and_the_session_ends_when_the_shell_exits() {
    let emulator = emulator().await;
    let argv = shell_command(&emulator);
    let mut shell = tokio::process::Command::new(&argv[0]);
    shell
        .args(&argv[1..])
        .envs(CREDENTIALS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = shell.spawn().expect("agent-bridge shell starts");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"echo piped-$((6*7))\nexit\n")
        .await
        .expect("typed");
    drop(stdin);
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the shell's end ends agent-bridge")
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}: {stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("piped-42"), "{stdout}");
    let report = ended_cleanly(&emulator).await;
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(report.close_reason.as_deref(), Some("the shell exited"));
    // Not a terminal: no size was sent.
    assert!(report.terminal_sizes.is_empty(), "{report:?}");
}

/// Types `command` and Enter, then waits for `expected` on the screen.
async fn run_in(terminal: &Terminal, command: &str, expected: &str) -> String {
    terminal.type_text(command).expect("typed");
    terminal.press("Enter").expect("typed");
    terminal
        .wait_for_screen(WAIT, |screen| screen.contains(expected))
        .await
        .unwrap_or_else(|screen| panic!("{expected:?} never appeared:\n{screen}"))
}

/// Waits (at most [`WAIT`]) until a process runs `argv` in the foreground of its terminal:
/// its process group is the one its terminal delivers ^C to (`/proc/PID/stat`: pgrp = tpgid).
/// The emulator's shells run on this machine, so the remote shell's jobs are visible here.
async fn in_the_foreground(argv: &[&str]) -> bool {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let foreground = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After "(comm)": state, ppid, pgrp, session, tty_nr, tpgid.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        fields.len() > 5 && fields[2] == fields[5]
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let running = (std::fs::read_dir("/proc").into_iter().flatten().flatten())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
            .any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted)
                    && foreground(&pid)
            });
        if running {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_terminal_the_shell_follows_the_window_and_tilde_dot_leaves() {
    let emulator = emulator().await;
    let terminal =
        Terminal::start(&shell_command(&emulator), &CREDENTIALS, 100, 30).expect("tmux starts");
    // The shell echoes what is typed and runs it (the terminal is raw: the remote one echoes).
    run_in(&terminal, "echo typed-$((2*3))", "typed-6").await;
    run_in(&terminal, "stty size", "30 100").await;
    terminal.resize(120, 40).expect("resized");
    let resized = emulator
        .wait_for_report(WAIT, |r| r.terminal_sizes.contains(&(120, 40)))
        .await;
    assert!(resized.is_some(), "{:?}", emulator.session_reports());
    run_in(&terminal, "stty size", "40 120").await;
    // ^C reaches the remote shell as a key: it interrupts what runs there, not agent-bridge.
    // It is pressed once the shell has handed its terminal to `sleep` (a ^C before that goes to
    // the shell, and `sleep` would then run its ten minutes).
    terminal.type_text("sleep 600").expect("typed");
    terminal.press("Enter").expect("typed");
    assert!(
        in_the_foreground(&["sleep", "600"]).await,
        "the remote shell never ran sleep in its terminal's foreground"
    );
    terminal.press("C-c").expect("typed");
    run_in(&terminal, "echo still-$((3*3))", "still-9").await;
    // `~.` at the start of a line leaves.
    terminal.type_text("~.").expect("typed");
    let status = terminal.wait_for_exit(WAIT).await;
    assert_eq!(status, Some(0), "{:?}", terminal.screen());
    let report = ended_cleanly(&emulator).await;
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(
        report.close_reason.as_deref(),
        Some("TerminateSession called"),
        "{report:?}"
    );
    assert_eq!(
        report.terminal_sizes.first(),
        Some(&(100, 30)),
        "{report:?}"
    );
}
