//! fleet-access agent bridge: turns TCP connections into SSM Session Manager sessions.
//!
//! ```text
//!  protocol/   the sans-IO data-channel core: messages, reliability, handshake, smux (no
//!              sockets, no clock)
//!  driver/     runs the core over tokio and a WebSocket; signs the upgrade
//!  ssm/        the control plane (StartSession, ResumeSession, TerminateSession) as a trait,
//!              and its aws-sdk-ssm implementation
//!  tunnel      one connection through one session, with metrics
//!  budget      the memory budget every session's buffers draw from
//!  forward     local port forwarding over a pool of sessions
//!  terminal    `shell`'s terminal: raw mode, its size, the `~.` escape
//!  listener, admission, serve, replica   the in-cluster mode: endpoints from Services, limits
//!              on sessions per bridge, client namespace and instance, the sweep of dead
//!              replicas' sessions
//!  clients, client_policy, audit   who each connection came from (its pod), whether a grant's
//!              NetworkPolicy admits it, and one record per connection
//!  cli, admin, metrics, stream_url   the command line, /metrics and probes, the stream URL policy
//! ```

pub mod admin;
pub mod admission;
pub mod audit;
pub mod budget;
pub mod cli;
pub mod client_policy;
pub mod clients;
pub mod driver;
pub mod forward;
pub mod listener;
pub mod metrics;
pub mod protocol;
pub mod replica;
pub mod serve;
pub mod ssm;
pub mod stream_url;
pub mod terminal;
pub mod tunnel;

pub use fleet_access_crds::ssm_documents::SSH_DOCUMENT;
