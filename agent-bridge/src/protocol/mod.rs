//! The SSM Session Manager data-channel protocol, sans-IO.
//!
//! Contract: nothing in this module touches a socket, spawns a task, sleeps, or reads a clock.
//! Time is an argument (`now: Instant`), wall-clock time is given once at construction, and
//! randomness is a seed. The tokio driver feeds inputs in and drains outputs; tests drive the
//! same API with a simulated clock and a scripted agent.
//!
//! ```text
//!            WebSocket binary/text message            local TCP bytes / smux stream ops
//!                        │                                        │
//!                        ▼                                        ▼
//!   handle_ws_message(now, &[u8])                 handle_local_data(now, &[u8]) -> accepted
//!                        │                        open_stream / write_stream / close_stream
//!                        ▼                                        │
//!   ┌───────────────────────────── Session ─────────────────────────────────┐
//!   │ message (codec) · reliability (seq, acks, reorder, resend) · rtt      │
//!   │ handshake (JSON, version gates) · smux (v1 client framing, streams)   │
//!   └───────────────────────────────────────────────────────────────────────┘
//!        │                       │                         │
//!        ▼                       ▼                         ▼
//!   poll_transmit(now)      poll_event()             poll_timeout() ──> handle_timeout(now)
//!   -> WS binary frame      -> Event                 -> Option<Instant>
//! ```
//!
//! Memory is bounded everywhere: the send window ([`session::Config::max_unacked_messages`],
//! [`session::Config::max_unacked_bytes`]) pushes back on local reads, the reorder buffer and
//! undrained received data ([`session::Config::max_inbound_bytes`], at most twice over) push back on the agent by
//! withholding acks, smux frames are at most 64 KiB, and streams are capped. Below those bounds a
//! driver may pass an inbound budget ([`Session::set_inbound_budget`]): its share of a memory
//! budget shared by many sessions (see `crate::budget`).

pub mod config;
pub mod events;
pub mod fuzzing;
pub mod handshake;
pub mod kms;
pub mod message;
pub mod pacer;
pub mod reliability;
pub mod rtt;
pub mod session;
pub mod smux;

#[cfg(test)]
mod tests;

pub use message::{ClientMessage, DecodeError, Decoded, MessageType, PayloadType, PortFlag};
pub use session::{
    CloseCause, Config, Event, ForwardingMode, HandshakeInfo, Session, SessionError, Stats,
    Transmit, TransmitKind,
};
pub use smux::{StreamCloseReason, StreamId};
