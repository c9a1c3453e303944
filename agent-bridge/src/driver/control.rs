//! The SSM control-plane calls the driver needs (StartSession, ResumeSession,
//! TerminateSession), behind a small trait so the driver can be tested against a scripted
//! peer. The aws-sdk-ssm implementation lives elsewhere; this module has no AWS dependency.

use std::collections::BTreeMap;
use std::future::Future;

/// Where a data channel lives: what StartSession and ResumeSession return.
#[derive(Clone, PartialEq, Eq)]
pub struct StreamTarget {
    /// SessionId.
    pub session_id: String,
    /// StreamUrl (`wss://ssmmessages.<region>.amazonaws.com/v1/data-channel/<id>?role=...`,
    /// or `ws://127.0.0.1:...` for the emulator). Treated as opaque.
    pub stream_url: String,
    /// TokenValue: single use, sent in the open message.
    pub token_value: String,
}

impl std::fmt::Debug for StreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTarget")
            .field("session_id", &self.session_id)
            .field("stream_url", &self.stream_url)
            .field("token_value", &"** REDACTED **")
            .finish()
    }
}

/// What ResumeSession returns for a session that lives on.
#[derive(Clone, PartialEq, Eq)]
pub struct Resumed {
    /// TokenValue for the next open message.
    pub token_value: String,
    /// StreamUrl, when the service sent one; without it the last URL is used again (as the
    /// session-manager-plugin does).
    pub stream_url: Option<String>,
}

impl std::fmt::Debug for Resumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumed")
            .field("stream_url", &self.stream_url)
            .field("token_value", &"** REDACTED **")
            .finish()
    }
}

/// StartSession input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartSessionRequest {
    /// Target instance id.
    pub target: String,
    /// Document name (`AWS-StartSSHSession`, `AWS-StartPortForwardingSession`, ...).
    pub document_name: Option<String>,
    /// Document parameters, e.g. `portNumber -> ["22"]`.
    pub parameters: BTreeMap<String, Vec<String>>,
    /// Optional reason (at most 256 characters).
    pub reason: Option<String>,
}

/// A control-plane call failed.
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed: {message}")]
pub struct ControlPlaneError {
    /// `StartSession`, `ResumeSession` or `TerminateSession`.
    pub operation: &'static str,
    /// The service's or transport's explanation.
    pub message: String,
    /// False when retrying cannot help (e.g. the session is already terminated).
    pub retryable: bool,
}

/// The three SSM calls, in domain verbs.
pub trait ControlPlane: Send + Sync {
    /// StartSession.
    fn start_session(
        &self,
        request: &StartSessionRequest,
    ) -> impl Future<Output = Result<StreamTarget, ControlPlaneError>> + Send;

    /// ResumeSession. `Ok(None)` means the service returned no token: the session expired.
    fn resume_session(
        &self,
        session_id: &str,
    ) -> impl Future<Output = Result<Option<Resumed>, ControlPlaneError>> + Send;

    /// TerminateSession.
    fn terminate_session(
        &self,
        session_id: &str,
    ) -> impl Future<Output = Result<(), ControlPlaneError>> + Send;
}
