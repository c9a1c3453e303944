//! The crate's error type at its boundary (starting the emulator, reading its config).

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
