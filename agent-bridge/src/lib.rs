//! fleet-access agent bridge: turns TCP connections into SSM Session Manager sessions.
//!
//! `protocol` is the sans-IO data-channel core (no sockets, no clock); `driver` runs it over
//! tokio and a WebSocket.

pub mod driver;
pub mod protocol;
