//! Child processes of the fixtures: started under `tests/env/supervise.sh` in their own
//! process group, logged to a file, stopped on drop, and never outliving the test
//! process (the supervisor stops them when the process that started them is gone).
//! Also: free loopback ports and readiness polling.

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

use crate::error::{FixtureError, FixtureResult};
use crate::locations::env_scripts_dir;

/// How long a stopped process gets between TERM and KILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often readiness is probed.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A program running under the supervisor, killed (with its process group) on drop.
#[derive(Debug)]
pub struct SupervisedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl SupervisedProcess {
    /// Starts `command` under the supervisor, which watches the current process.
    /// Its stdout and stderr go to `log_path`.
    pub fn spawn(name: &str, command: &Command, log_path: &Path) -> FixtureResult<Self> {
        Self::spawn_watching(name, command, log_path, std::process::id())
    }

    /// Like [`SupervisedProcess::spawn`], but the supervisor stops the program when
    /// process `watch_pid` is gone (instead of the current process).
    pub fn spawn_watching(
        name: &str,
        command: &Command,
        log_path: &Path,
        watch_pid: u32,
    ) -> FixtureResult<Self> {
        Self::spawn_supervised(name, command, log_path, watch_pid, None)
    }

    /// Like [`SupervisedProcess::spawn`], and the supervisor removes `dir` once the
    /// program has stopped: for services kept in statics, whose temporary folders are
    /// never dropped.
    pub fn spawn_removing_dir(
        name: &str,
        command: &Command,
        log_path: &Path,
        dir: &Path,
    ) -> FixtureResult<Self> {
        Self::spawn_supervised(name, command, log_path, std::process::id(), Some(dir))
    }

    fn spawn_supervised(
        name: &str,
        command: &Command,
        log_path: &Path,
        watch_pid: u32,
        remove_dir: Option<&Path>,
    ) -> FixtureResult<Self> {
        let log = File::create(log_path)
            .map_err(FixtureError::io(format!("creating {}", log_path.display())))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(FixtureError::io("duplicating a log file handle"))?;
        let mut supervised = Command::new(env_scripts_dir().join("supervise.sh"));
        supervised
            .arg(watch_pid.to_string())
            .arg(command.get_program())
            .args(command.get_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .process_group(0);
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => supervised.env(key, value),
                None => supervised.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            supervised.current_dir(dir);
        }
        if let Some(dir) = remove_dir {
            supervised.env("SUPERVISE_REMOVE_DIR", dir);
        }
        let child = supervised
            .spawn()
            .map_err(FixtureError::io(format!("starting {name}")))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log_path: log_path.to_path_buf(),
        })
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The supervisor's process id, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file (stdout and stderr of the program).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// `Some(status)` once the program has exited.
    pub fn exit_status(&mut self) -> FixtureResult<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(FixtureError::io(format!("checking on {}", self.name)))
    }

    /// Fails with [`FixtureError::ExitedEarly`] when the program has exited.
    pub fn ensure_running(&mut self) -> FixtureResult<()> {
        match self.exit_status()? {
            None => Ok(()),
            Some(status) => Err(FixtureError::ExitedEarly {
                name: self.name.clone(),
                status: status.to_string(),
                log_tail: self.log_tail(30),
            }),
        }
    }

    /// Stops the program and everything it forked: TERM to the process group, then
    /// KILL after a grace period. Idempotent.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let Some(group) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) else {
            return;
        };
        // Errors mean the group is already gone.
        let _ = kill_process_group(group, Signal::TERM);
        let step = Duration::from_millis(20);
        for _ in 0..(STOP_GRACE.as_millis() / step.as_millis()) {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                // The supervisor has gone; make sure nothing of its group is left.
                kill_group_and_wait(group);
                return;
            }
            std::thread::sleep(step);
        }
        kill_group_and_wait(group);
        let _ = self.child.wait();
    }

    /// Kills the program and everything it forked at once (SIGKILL to the process group, as
    /// an OOM kill or a lost node would end it: no handler runs), and waits for it.
    pub fn kill(&mut self) {
        if let Some(group) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) {
            let _ = kill_process_group(group, Signal::KILL);
        }
        let _ = self.child.wait();
    }

    /// Waits until `probe` answers true, failing early when the program exits and
    /// after `timeout` otherwise.
    pub async fn wait_until<F, Fut>(&mut self, timeout: Duration, mut probe: F) -> FixtureResult<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if probe().await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FixtureError::NotReady {
                    name: self.name.clone(),
                    seconds: timeout.as_secs(),
                    log_tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Sends SIGKILL to a process group and waits (at most [`STOP_GRACE`]) until none of its
/// members is left: a killed process exists until it has been reaped, so a return right after
/// the signal could leave members behind for a moment.
fn kill_group_and_wait(group: Pid) {
    let _ = kill_process_group(group, Signal::KILL);
    let step = Duration::from_millis(10);
    for _ in 0..(STOP_GRACE.as_millis() / step.as_millis()) {
        if test_kill_process_group(group).is_err() {
            return;
        }
        std::thread::sleep(step);
    }
}

impl Drop for SupervisedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `attempt` again (up to three more times) when it failed because a program
/// found its port taken: ports are picked free, but another process may bind one
/// before the program does.
pub async fn retry_on_port_clash<T, F, Fut>(mut attempt: F) -> FixtureResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = FixtureResult<T>>,
{
    let mut retries = 0;
    loop {
        match attempt().await {
            Err(FixtureError::ExitedEarly { ref log_tail, .. })
                if retries < 3 && is_port_clash(log_tail) =>
            {
                retries += 1;
            }
            other => return other,
        }
    }
}

/// True when a log says a listen address was taken.
fn is_port_clash(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use") || log.contains("bind: address in use")
}

/// The last `lines` lines of a log file (empty when it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a program that must be told its port
/// before it binds it (a Service's target port, a third-party server's flag).
///
/// The port is drawn at random from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): ports there are never handed out by a `bind` to port 0 or
/// by an outgoing connection, so between this check and the program's own bind only another
/// explicit bind to the same port could take it (another test drawing the same one of ~20,000
/// ports within that moment), not the hundreds of connections the suite makes meanwhile. Where
/// the listener is ours, bind port 0 and hand the socket over instead.
pub fn free_loopback_port() -> FixtureResult<u16> {
    let high = ephemeral_range_start();
    let span = u32::from(high.saturating_sub(LOWEST_CHOSEN_PORT)).max(1);
    let start = (uuid::Uuid::new_v4().as_u128() % u128::from(span)) as u32;
    (0..span)
        .map(|offset| LOWEST_CHOSEN_PORT + ((start + offset) % span) as u16)
        .find(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).is_ok())
        .ok_or_else(|| {
            FixtureError::io(format!(
                "finding a free loopback port in {LOWEST_CHOSEN_PORT}..{high}"
            ))(std::io::ErrorKind::AddrInUse.into())
        })
}

/// The lowest port [`free_loopback_port`] draws: above the well-known and common service ports.
const LOWEST_CHOSEN_PORT: u16 = 12_000;

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The loopback address with `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// How long [`http_get`] waits for a whole answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain HTTP/1.1 GET of `path` on `address` (an admin endpoint: /metrics, /healthz, ...),
/// asking the server to close the connection after answering. Returns the status code and the
/// body; `None` when nothing answers or the answer is not HTTP (within 10 s).
pub async fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(HTTP_TIMEOUT, stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// True when something accepts TCP connections on `address`.
pub async fn accepts_connections(address: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(address).await.is_ok()
}

/// Runs a short helper command to completion without blocking the runtime, failing
/// on a non-zero exit.
pub(crate) async fn run_command_async(
    command: &mut tokio::process::Command,
) -> FixtureResult<std::process::Output> {
    let description = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(FixtureError::io(format!("running {description}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(FixtureError::CommandFailed {
            command: description,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs a short helper command to completion, failing on a non-zero exit.
pub(crate) fn run_command(command: &mut Command) -> FixtureResult<std::process::Output> {
    let description = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(FixtureError::io(format!("running {description}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(FixtureError::CommandFailed {
            command: description,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        std::fs::write(&path, "one\ntwo\nthree\n").expect("write");
        assert_eq!(log_tail(&path, 2), "two\nthree");
        assert_eq!(log_tail(&path, 10), "one\ntwo\nthree");
        assert_eq!(log_tail(&dir.path().join("missing"), 3), "");
    }

    #[tokio::test]
    async fn a_port_clash_is_retried_and_other_errors_are_not() {
        let mut calls = 0;
        let result = retry_on_port_clash(|| {
            calls += 1;
            let outcome = if calls < 3 {
                Err(FixtureError::ExitedEarly {
                    name: "x".into(),
                    status: "exit 1".into(),
                    log_tail: "listen tcp 127.0.0.1:1: bind: Address already in use".into(),
                })
            } else {
                Ok(calls)
            };
            async move { outcome }
        })
        .await;
        assert_eq!(result.expect("third attempt succeeds"), 3);

        let mut calls = 0;
        let result: FixtureResult<()> = retry_on_port_clash(|| {
            calls += 1;
            async {
                Err(FixtureError::ExitedEarly {
                    name: "x".into(),
                    status: "exit 1".into(),
                    log_tail: "bad flag".into(),
                })
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn free_ports_are_bindable_on_loopback() {
        let port = free_loopback_port().expect("port");
        TcpListener::bind(loopback(port)).expect("still free");
    }
}
