//! fleet-access agent bridge: turns TCP connections into SSM Session Manager sessions.
//!
//! `protocol` is the sans-IO data-channel core (no sockets, no clock); `driver` runs it over
//! tokio and a WebSocket.

pub mod admin;
pub mod cli;
pub mod driver;
pub mod listener;
pub mod metrics;
pub mod protocol;
pub mod replica;
pub mod serve;
pub mod ssm;
pub mod stream_url;
pub mod tunnel;

pub use fleet_access_crds::ssm_documents::SSH_DOCUMENT;
