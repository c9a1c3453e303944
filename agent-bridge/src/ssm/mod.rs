//! The SSM control plane: the calls a session needs (StartSession, ResumeSession,
//! TerminateSession) as a small trait in domain verbs, so the driver can be tested against a
//! scripted peer, and (`sdk`) their implementation over aws-sdk-ssm, the only module that imports
//! the SDK; `kms`, a shell's data keys over aws-sdk-kms.

pub mod kms;
pub mod sdk;

pub use kms::SdkDataKeys;
pub use sdk::SdkControlPlane;

use std::collections::BTreeMap;
use std::future::Future;

use fleet_access_crds::ssm_documents::{
    HOST_PARAMETER, PORT_FORWARDING_DOCUMENT, PORT_PARAMETER, REMOTE_HOST_DOCUMENT,
};

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

impl StartSessionRequest {
    /// A session of the Port document `document` to `port` on `target` (`None`: the document's
    /// default port).
    pub fn port(target: &str, document: &str, port: Option<u16>, reason: &str) -> Self {
        let parameters = port
            .map(|port| (PORT_PARAMETER.to_owned(), vec![port.to_string()]))
            .into_iter()
            .collect();
        Self {
            target: target.to_owned(),
            document_name: Some(document.to_owned()),
            parameters,
            reason: Some(reason.to_owned()),
        }
    }

    /// A shell session on `target` with the shell document `document` (`None`: the account's
    /// default, `SSM-SessionManagerRunShell`).
    pub fn shell(target: &str, document: Option<&str>, reason: &str) -> Self {
        Self {
            target: target.to_owned(),
            document_name: document.map(str::to_owned),
            parameters: Default::default(),
            reason: Some(reason.to_owned()),
        }
    }

    /// A port forwarding session to `port` on `target` itself or, with `host`, on a host the
    /// instance reaches.
    pub fn forwarding(target: &str, port: u16, host: Option<&str>, reason: &str) -> Self {
        let Some(host) = host else {
            return Self::port(target, PORT_FORWARDING_DOCUMENT, Some(port), reason);
        };
        let mut request = Self::port(target, REMOTE_HOST_DOCUMENT, Some(port), reason);
        (request.parameters).insert(HOST_PARAMETER.to_owned(), vec![host.to_owned()]);
        request
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_document_and_its_parameters() {
        let ssh = StartSessionRequest::port("i-1", "AWS-StartSSHSession", Some(2222), "why");
        assert_eq!(ssh.document_name.as_deref(), Some("AWS-StartSSHSession"));
        assert_eq!(ssh.parameters["portNumber"], vec!["2222"]);
        assert_eq!(ssh.reason.as_deref(), Some("why"));
        let pinned = StartSessionRequest::port("i-1", "fleet-access.ops.db-port5432", None, "why");
        assert!(pinned.parameters.is_empty(), "the document pins the port");

        let local = StartSessionRequest::forwarding("i-1", 5432, None, "why");
        assert_eq!(
            local.document_name.as_deref(),
            Some(PORT_FORWARDING_DOCUMENT)
        );
        assert!(!local.parameters.contains_key("host"));
        let remote = StartSessionRequest::forwarding("i-1", 5432, Some("db.internal"), "why");
        assert_eq!(remote.document_name.as_deref(), Some(REMOTE_HOST_DOCUMENT));
        assert_eq!(remote.parameters["host"], vec!["db.internal"]);
        assert_eq!(remote.parameters["portNumber"], vec!["5432"]);
    }
}
