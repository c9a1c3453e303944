//! The error type of the fixture library: every way starting or talking to a test
//! component can fail.

use std::path::PathBuf;

/// Why a fixture could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A program the fixture needs is not installed or not built.
    #[error("{program} not found at {path} ({hint})")]
    MissingProgram {
        /// The program's name.
        program: String,
        /// Where it was looked for.
        path: PathBuf,
        /// What to run to get it.
        hint: String,
    },
    /// Reading or writing a file, or spawning a process, failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A started process exited before it became ready.
    #[error("{name} exited before it was ready ({status}); last log lines:\n{log_tail}")]
    ExitedEarly {
        /// The component's name.
        name: String,
        /// Its exit status.
        status: String,
        /// The end of its log file.
        log_tail: String,
    },
    /// A started process did not become ready in time.
    #[error("{name} was not ready after {seconds} s; last log lines:\n{log_tail}")]
    NotReady {
        /// The component's name.
        name: String,
        /// How long the fixture waited.
        seconds: u64,
        /// The end of its log file.
        log_tail: String,
    },
    /// A helper command (ssh-keygen, promtool, kubectl...) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// Generating a certificate or key failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Building or using the Kubernetes client failed.
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// Reading the generated kubeconfig failed.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// A YAML document could not be parsed.
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A JSON answer could not be parsed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// `cargo build` of the workspace's binaries failed (every caller in the process gets the
    /// first attempt's error: fix the build and rerun).
    #[error("building the workspace's binaries: {0}")]
    WorkspaceBuild(String),
    /// An answer did not have the expected shape.
    #[error("unexpected answer from {component}: {detail}")]
    UnexpectedAnswer {
        /// Who answered.
        component: String,
        /// What was wrong.
        detail: String,
    },
}

impl FixtureError {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Result of a fixture operation.
pub type FixtureResult<T> = Result<T, FixtureError>;
