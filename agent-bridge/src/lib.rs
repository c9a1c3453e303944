//! fleet-access agent bridge: turns TCP connections into SSM Session Manager sessions.
//!
//! `protocol` is the sans-IO data-channel core (no sockets, no clock).

pub mod protocol;
