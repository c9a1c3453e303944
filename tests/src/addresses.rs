//! Loopback addresses that no other process can take from a test: the address a program of the
//! workspace reports it bound (it binds port 0, so no port is chosen in advance), and an address
//! that refuses every connection for as long as the test holds it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpSocket;

use crate::error::{FixtureError, FixtureResult};
use crate::process::{SupervisedProcess, log_tail};

/// A loopback address of its own for this run, in 127.0.0.0/8 but not 127.0.0.1: for a
/// listener whose fixed ports must not clash with another test's, or a client that must be
/// told apart by its source address.
pub fn own_loopback_address() -> std::net::IpAddr {
    let [a, b, c, ..] = *uuid::Uuid::new_v4().as_bytes();
    std::net::IpAddr::V4(Ipv4Addr::new(127, a.max(1), b, c.clamp(2, 254)))
}

/// A connection to `to` from `source` (a client pod's own loopback address, say).
pub async fn connect_from(
    source: std::net::IpAddr,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match source {
        std::net::IpAddr::V4(_) => TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// What the workspace's servers print on standard error once they listen:
/// `<what> listening on <address>` (`fleet-access-operator run` and `agent-bridge serve` for their
/// admin endpoint, as `admin listening on 127.0.0.1:40123`).
const LISTENING_ON: &str = " listening on ";

/// How often a log is read again while waiting for the address.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The address a program reported in `log` for `what` (`admin`): the last such line, in case a
/// log file is reused.
pub fn reported_address(log: &str, what: &str) -> Option<SocketAddr> {
    let prefix = format!("{what}{LISTENING_ON}");
    log.lines()
        .rev()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
}

/// Waits until the log at `log_path` reports the address `what` listens on. `exit_status` says
/// whether the program `name` has exited (`Some(status)`): then, and after `timeout`, this
/// fails with the end of the log.
pub async fn wait_for_reported_address<F>(
    name: &str,
    log_path: &Path,
    what: &str,
    timeout: Duration,
    mut exit_status: F,
) -> FixtureResult<SocketAddr>
where
    F: FnMut() -> Option<String>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Some(address) = reported_address(&log, what) {
            return Ok(address);
        }
        if let Some(status) = exit_status() {
            return Err(FixtureError::ExitedEarly {
                name: name.to_owned(),
                status,
                log_tail: log_tail(log_path, 30),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FixtureError::NotReady {
                name: format!("{name} ({what} address)"),
                seconds: timeout.as_secs(),
                log_tail: log_tail(log_path, 30),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

impl SupervisedProcess {
    /// The address the program reports in its log for `what` (it bound port 0), once it has.
    pub async fn reported_address(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> FixtureResult<SocketAddr> {
        let (name, log_path) = (self.name().to_owned(), self.log_path().to_path_buf());
        wait_for_reported_address(&name, &log_path, what, timeout, || {
            match self.exit_status() {
                Ok(status) => status.map(|s| s.to_string()),
                Err(error) => Some(error.to_string()),
            }
        })
        .await
    }
}

/// A loopback address where every connection is refused for as long as this value lives: its
/// port is bound by a socket that never listens (so the kernel answers a connection with a
/// reset) and, without `SO_REUSEADDR`, no other socket can bind it meanwhile. (A port that was
/// merely free a moment ago can be bound by another test at any time.)
#[derive(Debug)]
pub struct RefusingAddress {
    address: SocketAddr,
    _socket: TcpSocket,
}

impl RefusingAddress {
    /// Binds a port on 127.0.0.1 (chosen by the system) without listening on it.
    pub fn bind() -> FixtureResult<Self> {
        let socket = TcpSocket::new_v4().map_err(FixtureError::io("creating a socket"))?;
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .map_err(FixtureError::io("binding a loopback port"))?;
        let address = socket
            .local_addr()
            .map_err(FixtureError::io("reading a bound port"))?;
        Ok(Self {
            address,
            _socket: socket,
        })
    }

    /// The address (`127.0.0.1:<port>`).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The address as an HTTP URL (`http://127.0.0.1:<port>`), for an endpoint that must fail.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_reported_address_is_read_from_a_log() {
        let log = "starting\nadmin listening on 127.0.0.1:4000\n\
                   INFO something else listening on 127.0.0.1:1\n\
                   admin listening on 127.0.0.1:4001\n";
        assert_eq!(
            reported_address(log, "admin"),
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 4001)))
        );
        assert_eq!(reported_address(log, "metrics"), None);
        assert_eq!(
            reported_address("admin listening on nowhere\n", "admin"),
            None
        );
        assert_eq!(reported_address("", "admin"), None);
    }

    #[tokio::test]
    async fn waiting_for_an_address_ends_with_the_program() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("log");
        std::fs::write(&log, "bad flag\n").expect("write");
        let error = wait_for_reported_address("p", &log, "admin", Duration::from_secs(60), || {
            Some("exit status: 2".to_owned())
        })
        .await
        .expect_err("exited");
        assert!(
            matches!(&error, FixtureError::ExitedEarly { status, log_tail, .. }
                if status == "exit status: 2" && log_tail == "bad flag"),
            "{error}"
        );
        std::fs::write(&log, "admin listening on 127.0.0.1:4002\n").expect("write");
        let address = wait_for_reported_address("p", &log, "admin", Duration::ZERO, || None)
            .await
            .expect("reported");
        assert_eq!(address.port(), 4002);
    }

    #[tokio::test]
    async fn a_refusing_address_refuses_and_cannot_be_taken() {
        let refusing = RefusingAddress::bind().expect("bound");
        let error = tokio::net::TcpStream::connect(refusing.address())
            .await
            .expect_err("nothing listens");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
        // What servers do (std and tokio listeners set SO_REUSEADDR) cannot take the port.
        let taken = std::net::TcpListener::bind(refusing.address()).expect_err("the port is held");
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
        assert!(refusing.url().starts_with("http://127.0.0.1:"));
    }
}
