//! The person's terminal in `agent-bridge shell`: raw mode for as long as the session runs
//! (restored however it ends), its size now and on every SIGWINCH, and the `~.` escape that
//! leaves a session, recognised as ssh recognises it (pure: [`EscapeScanner`]).

use std::io::{self, IsTerminal};
use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::driver::TerminalSize;

/// The terminal in raw mode; dropping it restores the mode it had.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts standard input's terminal in raw mode: keys go to the remote shell as typed (^C
    /// included), and the remote terminal echoes them. `None` when standard input is no
    /// terminal (a script piped in).
    pub fn enter() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

/// Standard output's terminal size, `None` when it is no terminal.
pub fn size() -> Option<TerminalSize> {
    let stdout = io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let size = termios::tcgetwinsize(stdout.as_fd()).ok()?;
    Some(TerminalSize {
        cols: size.ws_col,
        rows: size.ws_row,
    })
}

/// The terminal's size, updated on every SIGWINCH until `stop`; `None` when standard output is
/// no terminal (then the shell keeps the agent's default).
pub fn sizes(stop: CancellationToken) -> io::Result<Option<watch::Receiver<TerminalSize>>> {
    let Some(now) = size() else {
        return Ok(None);
    };
    let mut window_changes =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let (tx, rx) = watch::channel(now);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = window_changes.recv() => {
                    if changed.is_none() {
                        return;
                    }
                    if let Some(size) = size() {
                        tx.send_if_modified(|s| std::mem::replace(s, size) != size);
                    }
                }
            }
        }
    });
    Ok(Some(rx))
}

/// What the escape scanner makes of typed bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Scanned {
    /// The bytes for the remote shell.
    pub keys: Vec<u8>,
    /// `~.` was typed: leave the session (nothing after it is sent).
    pub leave: bool,
}

/// Finds ssh's escape in typed bytes: `~` at the start of a line, then `.` to leave, or `~` to
/// send one `~`; any other byte after it goes out with the `~`.
#[derive(Debug)]
pub struct EscapeScanner {
    at_line_start: bool,
    tilde: bool,
}

impl Default for EscapeScanner {
    fn default() -> Self {
        Self {
            at_line_start: true,
            tilde: false,
        }
    }
}

impl EscapeScanner {
    /// Scans one read of typed bytes.
    pub fn scan(&mut self, typed: &[u8]) -> Scanned {
        let mut keys = Vec::with_capacity(typed.len());
        for &byte in typed {
            if self.tilde {
                self.tilde = false;
                match byte {
                    b'.' => return Scanned { keys, leave: true },
                    b'~' => {
                        keys.push(b'~');
                        self.at_line_start = false;
                        continue;
                    }
                    _ => keys.push(b'~'),
                }
            } else if self.at_line_start && byte == b'~' {
                self.tilde = true;
                continue;
            }
            keys.push(byte);
            self.at_line_start = matches!(byte, b'\r' | b'\n');
        }
        Scanned { keys, leave: false }
    }
}

/// Carries standard input to `keys` through the escape scanner until standard input ends
/// (then `keys` closes: the session types the terminal's end-of-file) or `~.` is typed (then
/// `leave` fires).
pub async fn type_keys(mut keys: tokio::io::DuplexStream, leave: CancellationToken) {
    let mut stdin = tokio::io::stdin();
    let mut scanner = EscapeScanner::default();
    let mut buf = vec![0; 4096];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let scanned = scanner.scan(&buf[..n]);
        if keys.write_all(&scanned.keys).await.is_err() {
            return;
        }
        if scanned.leave {
            leave.cancel();
            // Keep `keys` open: the session ends by TerminateSession, not by end-of-file.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(inputs: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut scanner = EscapeScanner::default();
        let mut keys = Vec::new();
        for input in inputs {
            let scanned = scanner.scan(input);
            keys.extend(scanned.keys);
            if scanned.leave {
                return (keys, true);
            }
        }
        (keys, false)
    }

    #[test]
    fn tilde_dot_at_the_start_of_a_line_leaves() {
        assert_eq!(scan_all(&[b"~."]), (Vec::new(), true));
        assert_eq!(scan_all(&[b"ls\r~.rest"]), (b"ls\r".to_vec(), true));
        // Split across reads.
        assert_eq!(scan_all(&[b"ls\n~", b"."]), (b"ls\n".to_vec(), true));
    }

    #[test]
    fn other_tildes_are_typed() {
        assert_eq!(scan_all(&[b"cd ~.", b"\r"]), (b"cd ~.\r".to_vec(), false));
        assert_eq!(scan_all(&[b"~~.\r"]), (b"~.\r".to_vec(), false));
        assert_eq!(scan_all(&[b"~/bin\r"]), (b"~/bin\r".to_vec(), false));
        assert_eq!(scan_all(&[b"\r~", b"x"]), (b"\r~x".to_vec(), false));
    }
}
