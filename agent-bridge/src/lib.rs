//! fleet-access agent bridge: turns TCP connections into SSM Session Manager sessions.
//!
//! `protocol` is the sans-IO data-channel core (no sockets, no clock); `driver` runs it over
//! tokio and a WebSocket.

pub mod admin;
pub mod cli;
#[cfg(feature = "demo")]
pub mod demo;
pub mod driver;
pub mod listener;
pub mod metrics;
pub mod protocol;
pub mod replica;
pub mod serve;
pub mod ssm;
pub mod stream_url;
pub mod tunnel;

/// AWS's document for SSH (a Port document whose port defaults to 22).
pub const SSH_DOCUMENT: &str = "AWS-StartSSHSession";
