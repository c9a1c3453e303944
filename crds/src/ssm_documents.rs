//! The AWS-owned Session Manager documents fleet-access names, and the parameters they take:
//! one home for the operator (which grants them) and the bridge (which starts sessions with
//! them).

/// SSH over a Port session: the port defaults to 22 (`portNumber`).
pub const SSH_DOCUMENT: &str = "AWS-StartSSHSession";

/// Port forwarding to a port of the instance itself (`portNumber`, `localPortNumber`).
pub const PORT_FORWARDING_DOCUMENT: &str = "AWS-StartPortForwardingSession";

/// Port forwarding to a host the instance reaches (`host`, `portNumber`, `localPortNumber`).
pub const REMOTE_HOST_DOCUMENT: &str = "AWS-StartPortForwardingSessionToRemoteHost";

/// The account's default shell document: a StartSession without a document starts it, and its
/// content holds the account's Session Manager preferences.
pub const ACCOUNT_SHELL_DOCUMENT: &str = "SSM-SessionManagerRunShell";

/// The parameter that names the port a Port document connects to.
pub const PORT_PARAMETER: &str = "portNumber";

/// The parameter that names the remote host of [`REMOTE_HOST_DOCUMENT`].
pub const HOST_PARAMETER: &str = "host";
