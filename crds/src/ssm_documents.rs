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

/// The longest SSM document name.
const MAX_DOCUMENT_NAME: usize = 128;

/// The Port document every grant of `cluster` that allows `port` shares:
/// `fleet-access.<cluster>.port<N>`. It pins the port, so IAM permission on the document is
/// permission on that port alone.
pub fn port_document_name(cluster: &str, port: u16) -> String {
    format!("fleet-access.{cluster}.port{port}")
}

/// The Port document every grant of `cluster` that allows forwarding to `host`:`port` through
/// an instance shares: `fleet-access.<cluster>.to-<host>-port<N>`, the `:` of an IPv6 address
/// written `_` (SSM names allow letters, digits, `_`, `.` and `-`). A host too long for SSM's
/// 128 characters is cut, and a hash of the whole host keeps names apart.
pub fn remote_host_document_name(cluster: &str, host: &str, port: u16) -> String {
    let host_part = host.replace(':', "_");
    let name = format!("fleet-access.{cluster}.to-{host_part}-port{port}");
    if name.len() <= MAX_DOCUMENT_NAME {
        return name;
    }
    let hash = name_hash(host);
    let fixed = name.len() - host_part.len();
    let keep = MAX_DOCUMENT_NAME - fixed - hash.len() - 1;
    let cut: String = host_part.chars().take(keep).collect();
    format!("fleet-access.{cluster}.to-{cut}-{hash}-port{port}")
}

/// 16 hex digits of the SHA-256 of `text`, for a name that must stay apart from every other
/// one: a tenant who picks a host cannot find another that gives the same name (64 bits of a
/// cryptographic hash, where a non-cryptographic one can be inverted in seconds).
pub(crate) fn name_hash(text: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_document_names_say_what_they_forward_to() {
        assert_eq!(
            port_document_name("prod", 5432),
            "fleet-access.prod.port5432"
        );
        assert_eq!(
            remote_host_document_name("prod", "db.internal", 5432),
            "fleet-access.prod.to-db.internal-port5432"
        );
        assert_eq!(
            remote_host_document_name("prod", "fd00:1::5", 443),
            "fleet-access.prod.to-fd00_1__5-port443"
        );
    }

    #[test]
    fn long_hosts_are_cut_and_kept_apart() {
        let long = format!("{}.example.com", "a".repeat(200));
        let a = remote_host_document_name("prod", &long, 5432);
        let b = remote_host_document_name("prod", &format!("b{long}"), 5432);
        assert!(a.len() <= MAX_DOCUMENT_NAME, "{a}");
        assert!(a.ends_with("-port5432"));
        assert_ne!(a, b);
    }
}
