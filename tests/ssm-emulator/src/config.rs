//! The emulator's configuration: the simulated fleet, the mode (realistic or fast), strictness,
//! timeouts and fault injection. Read from YAML (the `ssm-emulator --config FILE` format) or
//! built in code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Agent version the simulated instances report unless they say otherwise.
pub const DEFAULT_AGENT_VERSION: &str = "3.3.1142.0";

/// Realistic (agent reads 1,024 bytes then pauses 1 ms; gateway rate limit) or fast (none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The real agent's pacing and the gateway's rate limit.
    #[default]
    Realistic,
    /// No artificial limits.
    Fast,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (loopback only). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Region reported in ARNs and used by clients.
    pub region: String,
    /// Account id used in ARNs.
    pub account_id: String,
    /// Realistic or fast.
    pub mode: Mode,
    /// Strict mode: every client protocol violation fails its session.
    pub strict: bool,
    /// Upstream SSM endpoint (e.g. moto) for every other operation and custom documents.
    pub upstream: Option<String>,
    /// Principal used in session ids (`<principal>-<17 hex>`).
    pub session_principal: String,
    /// The gateway waits this long for a new WebSocket's open message.
    pub open_timeout_ms: u64,
    /// Agent waits this long for HandshakeResponse, and in a KMS shell again for the answer to
    /// its encryption challenge (the agent's value is 15 s).
    pub handshake_timeout_ms: u64,
    /// Session ends after this long without data in either direction (counted from the end
    /// of the handshake).
    pub idle_timeout_ms: u64,
    /// How long one minute of a shell document's `idleSessionTimeout` and
    /// `maxSessionDuration` lasts (60,000; tests shorten it).
    pub session_minute_ms: u64,
    /// A detached session (no WebSocket) ends after this long without a resume.
    pub reconnect_timeout_ms: u64,
    /// Gateway limit on client stream messages per second (realistic mode).
    pub rate_limit_per_second: u32,
    /// smux keepalive interval (NOP) when the agent's keepalive is on.
    pub smux_keepalive_interval_ms: u64,
    /// smux keepalive timeout when the agent's keepalive is on.
    pub smux_keepalive_timeout_ms: u64,
    /// Agent retransmissions of one message, with the client alive, before its missing ack
    /// counts as a violation.
    pub unacked_retransmit_limit: u32,
    /// Target output (payload bytes) on its way from the agent to the client's socket at
    /// most: the agent's read loops wait while the transport is full. The real agent has no
    /// send window and ignores acknowledgements here; only its blocking WebSocket write holds
    /// it back when a client does not read. This is the buffer of the emulator's gateway
    /// queue, which does not block by itself.
    pub gateway_buffer_bytes: u32,
    /// How long a gap in the client's sequence numbers may stay open before it counts as a
    /// violation.
    pub sequence_gap_timeout_ms: u64,
    /// Faults applied to every session (instances and sessions can override).
    pub faults: Faults,
    /// The simulated fleet.
    pub instances: Vec<InstanceConfig>,
    /// Which the agent sends first after an in-order HandshakeResponse: its ack, or
    /// HandshakeComplete. The real agent races them (two goroutines), so either may come first.
    pub handshake_ack: HandshakeAck,
    /// Serve the data channel over TLS (`wss://` stream URLs) with this certificate, as the
    /// real gateway does. Without it the stream URLs are `ws://`. The JSON API stays plain
    /// HTTP on the same port either way.
    pub tls: Option<TlsFiles>,
}

/// The order of the HandshakeResponse's ack and HandshakeComplete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandshakeAck {
    /// Either, per session (from its id: the same session always gets the same), as the
    /// agent's race does.
    #[default]
    Either,
    /// The ack first (the agent's usual winner; the official plugin's mux session needs it).
    AckFirst,
    /// HandshakeComplete first.
    CompleteFirst,
}

impl HandshakeAck {
    /// Whether the ack goes first for session `session_id`.
    pub(crate) fn ack_first(self, session_id: &str) -> bool {
        match self {
            Self::AckFirst => true,
            Self::CompleteFirst => false,
            // FNV-1a of the id: stable per session, about even over many.
            Self::Either => {
                let hash = session_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                hash & 1 == 0
            }
        }
    }
}

/// The gateway's TLS identity: PEM files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (it must name the listen address).
    pub certificate: std::path::PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            region: "us-east-1".to_owned(),
            account_id: "123456789012".to_owned(),
            mode: Mode::Realistic,
            strict: true,
            upstream: None,
            session_principal: "fleet-access".to_owned(),
            open_timeout_ms: 10_000,
            handshake_timeout_ms: 15_000,
            idle_timeout_ms: 20 * 60 * 1000,
            session_minute_ms: 60_000,
            reconnect_timeout_ms: 60_000,
            rate_limit_per_second: 1000,
            smux_keepalive_interval_ms: 10_000,
            smux_keepalive_timeout_ms: 30_000,
            unacked_retransmit_limit: 30,
            gateway_buffer_bytes: 256 * 1024,
            sequence_gap_timeout_ms: 10_000,
            faults: Faults::default(),
            instances: Vec::new(),
            handshake_ack: HandshakeAck::default(),
            tls: None,
        }
    }
}

/// One simulated managed instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// `i-…` or `mi-…`.
    pub id: String,
    /// `Online`, `ConnectionLost` or `Inactive`; only Online instances accept sessions.
    #[serde(default = "default_ping_status")]
    pub ping_status: String,
    /// The SSM agent version it reports (and whose gates the agent models).
    #[serde(default = "default_agent_version")]
    pub agent_version: String,
    /// `Linux`, `Windows` or `MacOS`.
    #[serde(default = "default_platform")]
    pub platform_type: String,
    /// Tags, for `tag:Key` filters.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Where ports lead: keys are `"PORT"` or `"HOST:PORT"` (remote-host documents); values
    /// are loopback socket addresses.
    #[serde(default)]
    pub ports: BTreeMap<String, SocketAddr>,
    /// The instance's DNS: the addresses each name resolves to, which the agent checks before
    /// it forwards to a remote host (an IP address resolves to itself, `localhost` to the
    /// loopback addresses; other names to nothing, and are dialled unchecked).
    #[serde(default)]
    pub hosts: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Faults for sessions to this instance (replace the global ones when set).
    #[serde(default)]
    pub faults: Option<Faults>,
}

fn default_ping_status() -> String {
    "Online".to_owned()
}
fn default_agent_version() -> String {
    DEFAULT_AGENT_VERSION.to_owned()
}
fn default_platform() -> String {
    "Linux".to_owned()
}

impl InstanceConfig {
    /// An Online Linux instance with the default agent version and no ports.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ping_status: default_ping_status(),
            agent_version: default_agent_version(),
            platform_type: default_platform(),
            tags: BTreeMap::new(),
            ports: BTreeMap::new(),
            hosts: BTreeMap::new(),
            faults: None,
        }
    }

    /// Adds a port mapping (`"22"` or `"host:22"`).
    pub fn with_port(mut self, key: impl Into<String>, to: SocketAddr) -> Self {
        self.ports.insert(key.into(), to);
        self
    }

    /// Lets the instance resolve `name` to `addresses`.
    pub fn with_host(mut self, name: impl Into<String>, addresses: Vec<std::net::IpAddr>) -> Self {
        self.hosts.insert(name.into(), addresses);
        self
    }

    /// The addresses `host` resolves to on the instance.
    pub fn addresses_of(&self, host: &str) -> Vec<std::net::IpAddr> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        if let Ok(address) = host.parse::<IpAddr>() {
            return vec![address];
        }
        if host == "localhost" {
            return vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ];
        }
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    /// Adds a tag.
    pub fn with_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// Sets the agent version.
    pub fn with_agent_version(mut self, v: impl Into<String>) -> Self {
        self.agent_version = v.into();
        self
    }

    /// Sets per-instance faults.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Where `host:port` leads; `host` is `None` for the instance's own ports.
    pub fn resolve(&self, host: Option<&str>, port: u16) -> Option<SocketAddr> {
        match host {
            None | Some("") | Some("localhost") | Some("127.0.0.1") => {
                self.ports.get(&port.to_string()).copied()
            }
            Some(h) => self.ports.get(&format!("{h}:{port}")).copied(),
        }
    }
}

/// Fault injection (docs/protocol.md §9.2). Counters are per session and deterministic:
/// "every N" means the Nth, 2Nth, … occurrence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Drop every Nth `output_stream_data` transmission to the client.
    pub drop_every: Option<u32>,
    /// Send every Nth `output_stream_data` twice.
    pub duplicate_every: Option<u32>,
    /// Hold `output_stream_data` in groups of N and send each group in reverse order.
    pub reorder_window: Option<u32>,
    /// Delay every frame to the client by this many milliseconds.
    pub delay_ms: Option<u64>,
    /// Corrupt the digest of every Nth `output_stream_data` transmission.
    pub corrupt_digest_every: Option<u32>,
    /// Flip a payload bit of every Nth non-empty `output_stream_data` transmission.
    pub flip_payload_bit_every: Option<u32>,
    /// Lose every Nth client `input_stream_data` frame before it reaches the agent.
    pub drop_client_every: Option<u32>,
    /// The agent processes but does not ack every Nth in-order client message.
    pub withhold_ack_every: Option<u32>,
    /// Close the WebSocket with 1000 "Bye" after this many frames to the client.
    pub recycle_after_frames: Option<u64>,
    /// Go silent in both directions after this many frames to the client.
    pub black_hole_after_frames: Option<u64>,
    /// Reset the TCP connection after this many frames to the client.
    pub reset_after_frames: Option<u64>,
    /// How many connections of a session the three connection faults above hit (default 1).
    pub connection_faults: Option<u32>,
    /// Send `start_publication` before the HandshakeRequest.
    pub start_publication_first: bool,
    /// Send `pause_publication` (garbage digest and length) then `start_publication` after the
    /// handshake.
    pub garbage_publication: bool,
    /// Send `pause_publication` after the handshake and never `start_publication` (the
    /// agent's own data channel lifts a pause at its peer's next data or ack).
    pub lasting_pause: bool,
    /// Acknowledge the client's TerminateSession flag and carry on as if it had not come (a
    /// peer that never closes: only the TerminateSession API ends the session).
    pub ignore_terminate_flag: bool,
    /// Send `agent_session_state` and an unknown message type after the handshake.
    pub extra_message_types: bool,
    /// Send `channel_closed` in the legacy form (HL 112, NUL padding).
    pub legacy_channel_closed: bool,
    /// Behave like a legacy agent: no handshake, basic mode.
    pub legacy_no_handshake: bool,
}

impl Config {
    /// Parses YAML.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let config: Self = serde_yaml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a YAML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_yaml(&text)
    }

    /// Checks that every address is loopback and ids are unique.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "listen address {} is not loopback",
                self.listen
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for i in &self.instances {
            if !seen.insert(i.id.as_str()) {
                return Err(Error::Config(format!("instance {} is listed twice", i.id)));
            }
            for (k, addr) in &i.ports {
                if !addr.ip().is_loopback() {
                    return Err(Error::Config(format!(
                        "instance {} port {k} leads to {addr}, which is not loopback",
                        i.id
                    )));
                }
            }
        }
        if (self.gateway_buffer_bytes as usize) < crate::port::FAST_CHUNK {
            return Err(Error::Config(format!(
                "gateway_buffer_bytes {} is less than one read of the target ({} bytes)",
                self.gateway_buffer_bytes,
                crate::port::FAST_CHUNK
            )));
        }
        if let Some(u) = &self.upstream {
            let ok = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| u.starts_with(p));
            if !ok {
                return Err(Error::Config(format!(
                    "upstream {u} is not a loopback http URL"
                )));
            }
        }
        Ok(())
    }

    /// Looks up an instance.
    pub fn instance(&self, id: &str) -> Option<&InstanceConfig> {
        self.instances.iter().find(|i| i.id == id)
    }

    pub(crate) fn duration(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::HandshakeAck;

    #[test]
    fn either_order_is_stable_per_session_and_both_occur() {
        let ids: Vec<String> = (0..64).map(|i| format!("fleet-access-{i:017x}")).collect();
        let firsts: Vec<bool> = ids
            .iter()
            .map(|id| HandshakeAck::Either.ack_first(id))
            .collect();
        assert!(
            firsts.iter().any(|f| *f) && firsts.iter().any(|f| !*f),
            "{firsts:?}"
        );
        for (id, first) in ids.iter().zip(&firsts) {
            assert_eq!(HandshakeAck::Either.ack_first(id), *first);
        }
        assert!(HandshakeAck::AckFirst.ack_first("s"));
        assert!(!HandshakeAck::CompleteFirst.ack_first("s"));
    }

    use super::*;

    #[test]
    fn example_yaml_parses() {
        let c = Config::from_yaml(
            r#"
mode: fast
strict: true
instances:
  - id: i-0123456789abcdef0
    tags: { Name: web-1 }
    ports: { "22": "127.0.0.1:2222", "db.internal:5432": "127.0.0.1:15432" }
    faults: { drop_every: 5 }
"#,
        )
        .expect("valid");
        assert_eq!(c.mode, Mode::Fast);
        let i = c.instance("i-0123456789abcdef0").expect("instance");
        assert_eq!(i.agent_version, DEFAULT_AGENT_VERSION);
        assert_eq!(
            i.resolve(None, 22),
            Some("127.0.0.1:2222".parse().expect("addr"))
        );
        assert_eq!(
            i.resolve(Some("db.internal"), 5432),
            Some("127.0.0.1:15432".parse().expect("addr"))
        );
        assert_eq!(i.resolve(None, 80), None);
        assert_eq!(i.faults.as_ref().and_then(|f| f.drop_every), Some(5));
    }

    #[test]
    fn non_loopback_targets_are_refused() {
        let err =
            Config::from_yaml("instances:\n  - id: i-1\n    ports: { \"22\": \"10.0.0.1:22\" }\n");
        assert!(err.is_err());
        assert!(Config::from_yaml("bogus_key: 1\n").is_err());
    }

    #[test]
    fn a_gateway_buffer_under_one_read_is_refused() {
        let err = Config::from_yaml("gateway_buffer_bytes: 1024\n").expect_err("too small");
        assert!(
            err.to_string().contains("gateway_buffer_bytes 1024"),
            "{err}"
        );
        assert!(Config::from_yaml("gateway_buffer_bytes: 32768\n").is_ok());
    }
}
