//! OpenSSH's `sshd` (Debian's openssh-server) on a free loopback port with its own
//! generated config, host key and authorized user key; nothing of the system's SSH
//! configuration is read or changed. Logs in as the current user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{FixtureError, FixtureResult};
use crate::locations::{debian, require_program};
use crate::process::{
    SupervisedProcess, accepts_connections, free_loopback_port, loopback, retry_on_port_clash,
    run_command,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Where sshd wants its privilege separation folder when started as root.
const PRIVSEP_DIR: &str = "/run/sshd";

/// A running sshd, stopped on drop.
#[derive(Debug)]
pub struct Sshd {
    // Declared in stop order: the process before its folder.
    process: SupervisedProcess,
    port: u16,
    user: String,
    dir: TempDir,
}

impl Sshd {
    /// Generates keys and a config, starts sshd on 127.0.0.1, and waits until it
    /// accepts connections.
    pub async fn start() -> FixtureResult<Self> {
        retry_on_port_clash(Self::start_once).await
    }

    async fn start_once() -> FixtureResult<Self> {
        let sshd = require_program("sshd", Path::new(debian::SSHD))?;
        require_program("ssh-keygen", Path::new(debian::SSH_KEYGEN))?;
        let dir = tempfile::Builder::new()
            .prefix("fleet-access-sshd-")
            .tempdir()
            .map_err(FixtureError::io("creating the sshd folder"))?;
        let user = current_user()?;
        let paths = SshdPaths::new(dir.path());
        generate_key(&paths.host_key, "fleet-access test host")?;
        generate_key(&paths.identity, "fleet-access test user")?;
        let public_key = std::fs::read_to_string(paths.identity.with_extension("pub"))
            .map_err(FixtureError::io("reading the user's public key"))?;
        write_file(&paths.authorized_keys, &public_key)?;
        if rustix::process::geteuid().is_root() {
            std::fs::create_dir_all(PRIVSEP_DIR)
                .map_err(FixtureError::io(format!("creating {PRIVSEP_DIR}")))?;
        }

        let port = free_loopback_port()?;
        write_file(&paths.config, &render_sshd_config(port, &user, &paths))?;
        let host_public_key = std::fs::read_to_string(paths.host_key.with_extension("pub"))
            .map_err(FixtureError::io("reading the host public key"))?;
        write_file(
            &paths.known_hosts,
            &known_hosts_line(port, &host_public_key),
        )?;

        // Check the config first: a clear error instead of an early exit.
        run_command(Command::new(&sshd).arg("-t").arg("-f").arg(&paths.config))?;
        let mut command = Command::new(&sshd);
        command.arg("-D").arg("-e").arg("-f").arg(&paths.config);
        let mut process = SupervisedProcess::spawn("sshd", &command, &dir.path().join("sshd.log"))?;
        process
            .wait_until(READY_TIMEOUT, || accepts_connections(loopback(port)))
            .await?;
        Ok(Self {
            process,
            port,
            user,
            dir,
        })
    }

    /// The port sshd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user to log in as (the current user).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The private key authorized to log in.
    pub fn identity_file(&self) -> PathBuf {
        SshdPaths::new(self.dir.path()).identity
    }

    /// A known_hosts file with this server's host key.
    pub fn known_hosts_file(&self) -> PathBuf {
        SshdPaths::new(self.dir.path()).known_hosts
    }

    /// sshd's log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The supervisor's process id (also the process group of sshd).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Client options (`-o ...`) that use this server's identity and host key and
    /// nothing from the user's or system's SSH configuration.
    pub fn client_options(&self) -> Vec<String> {
        let paths = SshdPaths::new(self.dir.path());
        client_options(&paths.identity, &paths.known_hosts)
    }

    /// `ssh -p PORT ... user@127.0.0.1` ready for the remote command's arguments.
    pub fn ssh_command(&self) -> Command {
        let mut command = Command::new(debian::SSH);
        command
            .args(self.client_options())
            .arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{}@127.0.0.1", self.user));
        command
    }

    /// `ssh` through a relay at `relay` (a bridge endpoint) that leads to this sshd, trusting
    /// its host key under the name it has in the known-hosts file; ready for the remote
    /// command's arguments.
    pub fn ssh_command_via(&self, relay: SocketAddr) -> Command {
        self.ssh_command_from(None, relay)
    }

    /// [`Sshd::ssh_command_via`], connecting from `source` when given (`-b`: a client pod's
    /// own address).
    pub fn ssh_command_from(&self, source: Option<std::net::IpAddr>, relay: SocketAddr) -> Command {
        let mut command = Command::new(debian::SSH);
        if let Some(source) = source {
            command.arg("-b").arg(source.to_string());
        }
        command
            .args(self.client_options())
            .arg("-o")
            .arg(format!("HostKeyAlias=[127.0.0.1]:{}", self.port))
            .arg("-p")
            .arg(relay.port().to_string())
            .arg(format!("{}@{}", self.user, relay.ip()));
        command
    }

    /// `scp -P PORT ...` ready for the source and destination; name remote paths with
    /// [`Sshd::scp_remote`].
    pub fn scp_command(&self) -> Command {
        let mut command = Command::new(debian::SCP);
        command
            .args(self.client_options())
            .arg("-P")
            .arg(self.port.to_string());
        command
    }

    /// `user@127.0.0.1:PATH` for scp.
    pub fn scp_remote(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.user, path.display())
    }

    /// Stops sshd (also done on drop).
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

#[derive(Debug, Clone)]
struct SshdPaths {
    config: PathBuf,
    host_key: PathBuf,
    identity: PathBuf,
    authorized_keys: PathBuf,
    known_hosts: PathBuf,
    pid_file: PathBuf,
}

impl SshdPaths {
    fn new(dir: &Path) -> Self {
        Self {
            config: dir.join("sshd_config"),
            host_key: dir.join("host_ed25519"),
            identity: dir.join("user_ed25519"),
            authorized_keys: dir.join("authorized_keys"),
            known_hosts: dir.join("known_hosts"),
            pid_file: dir.join("sshd.pid"),
        }
    }
}

fn render_sshd_config(port: u16, user: &str, paths: &SshdPaths) -> String {
    format!(
        "# Generated by fleet-access-tests; only this file configures this sshd.\n\
         Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {host_key}\n\
         PidFile {pid_file}\n\
         AuthorizedKeysFile {authorized_keys}\n\
         AllowUsers {user}\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         UseDNS no\n\
         PrintMotd no\n\
         AllowTcpForwarding yes\n\
         X11Forwarding no\n\
         Subsystem sftp internal-sftp\n\
         LogLevel VERBOSE\n\
         # Tests open tens of connections at once; the default (10:30:100) drops some.\n\
         MaxStartups 200\n",
        host_key = paths.host_key.display(),
        pid_file = paths.pid_file.display(),
        authorized_keys = paths.authorized_keys.display(),
    )
}

fn known_hosts_line(port: u16, host_public_key: &str) -> String {
    let mut fields = host_public_key.split_whitespace();
    let key_type = fields.next().unwrap_or_default();
    let key = fields.next().unwrap_or_default();
    format!("[127.0.0.1]:{port} {key_type} {key}\n")
}

fn client_options(identity: &Path, known_hosts: &Path) -> Vec<String> {
    [
        "-F".to_owned(),
        "/dev/null".to_owned(),
        "-i".to_owned(),
        identity.display().to_string(),
    ]
    .into_iter()
    .chain(
        [
            "IdentitiesOnly=yes".to_owned(),
            "BatchMode=yes".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            format!("UserKnownHostsFile={}", known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_owned(),
            "ConnectTimeout=10".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option]),
    )
    .collect()
}

fn generate_key(path: &Path, comment: &str) -> FixtureResult<()> {
    run_command(
        Command::new(debian::SSH_KEYGEN)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
    )?;
    Ok(())
}

fn current_user() -> FixtureResult<String> {
    let output = run_command(Command::new("id").arg("-un"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn write_file(path: &Path, text: &str) -> FixtureResult<()> {
    std::fs::write(path, text).map_err(FixtureError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_listens_on_loopback_and_names_only_its_own_files() {
        let paths = SshdPaths::new(Path::new("/tmp/s"));
        let config = render_sshd_config(2222, "alice", &paths);
        assert!(config.contains("Port 2222\n"));
        assert!(config.contains("ListenAddress 127.0.0.1\n"));
        assert!(config.contains("AllowUsers alice\n"));
        for line in config
            .lines()
            .filter(|l| l.starts_with("HostKey") || l.contains("File "))
        {
            assert!(line.contains("/tmp/s/"), "{line}");
        }
    }

    #[test]
    fn known_hosts_line_names_the_port() {
        let line = known_hosts_line(2222, "ssh-ed25519 AAAAC3Nz host comment\n");
        assert_eq!(line, "[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nz\n");
    }

    #[test]
    fn client_ignores_user_configuration() {
        let options = client_options(Path::new("/k/id"), Path::new("/k/known"));
        assert_eq!(options[..4], ["-F", "/dev/null", "-i", "/k/id"]);
        assert!(options.contains(&"UserKnownHostsFile=/k/known".to_owned()));
        assert!(options.contains(&"BatchMode=yes".to_owned()));
    }
}
