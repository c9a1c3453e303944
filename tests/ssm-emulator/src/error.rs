//! The crate's error types at its boundary: starting and configuring the emulator, and waiting
//! for its sessions to end.

use std::time::Duration;

use crate::report::SessionReport;

/// What can go wrong starting or configuring the emulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid emulator configuration: {0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("emulator I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Why waiting for sessions to end gave no final report. A report read before its session
/// ended may still miss violations, so the caller should fail rather than use one.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// No session with this id was started on this emulator: check the id.
    #[error("session {session_id} is unknown to the emulator")]
    UnknownSession {
        /// The id asked for.
        session_id: String,
    },
    /// The session was still running (or still closing) when the limit passed: the client
    /// did not end it, or the limit is too short.
    #[error(
        "session {} has not ended within {limit:?} (status {:?}, close reason {:?}, violations so far {:?})",
        .report.session_id, .report.status, .report.close_reason, .report.violations
    )]
    NotEnded {
        /// The limit that passed.
        limit: Duration,
        /// Its report so far (incomplete).
        report: Box<SessionReport>,
    },
    /// Some sessions were still running (or still closing) when the limit passed.
    #[error(
        "{} of {total} sessions have not ended within {limit:?}: {}",
        .pending.len(),
        .pending.iter().map(|r| format!("{} ({:?})", r.session_id, r.status)).collect::<Vec<_>>().join(", ")
    )]
    NotAllEnded {
        /// The limit that passed.
        limit: Duration,
        /// How many sessions the emulator knows.
        total: usize,
        /// The reports so far (incomplete) of those that had not ended.
        pending: Vec<SessionReport>,
    },
}
