//! SSM Agent and client versions, and the gates that depend on them: one comparison for the
//! operator (whether a grant's instances can carry SSH) and the bridge (its handshake, and its
//! explanation of a refused session). A version is dotted numbers; a shorter one is padded with
//! zeros (`2.3.672` is `2.3.672.0`); one with a part that is not a number is no version, and
//! passes no gate.

use std::cmp::Ordering;

/// A dotted version, compared part by part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(Vec<u64>);

impl Version {
    /// `None` when a part is not a number (or the text is empty).
    pub fn parse(text: &str) -> Option<Self> {
        text.trim()
            .split('.')
            .map(|part| part.parse::<u64>().ok())
            .collect::<Option<Vec<u64>>>()
            .map(Self)
    }

    /// Whether `text` is a version at least `minimum`.
    pub fn at_least(text: &str, minimum: &str) -> bool {
        compare(text, minimum).is_some_and(Ordering::is_ge)
    }

    /// Whether `text` is a version strictly above `threshold`.
    pub fn above(text: &str, threshold: &str) -> bool {
        compare(text, threshold) == Some(Ordering::Greater)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.0.len().max(other.0.len());
        let part = |v: &Self, i: usize| v.0.get(i).copied().unwrap_or(0);
        (0..len)
            .map(|i| part(self, i).cmp(&part(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

/// Compares two versions; `None` when either is none.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    Some(Version::parse(a)?.cmp(&Version::parse(b)?))
}

/// The first agent that carries SSH (`AWS-StartSSHSession`).
pub const SSH_MIN_AGENT: &str = "2.3.672.0";
/// The first agent whose Port plugin forwards to a remote host (the `host` parameter); an older
/// one forwards to the instance's own port instead.
pub const REMOTE_HOST_MIN_AGENT: &str = "3.1.1188.0";
/// Agents above this understand the TerminateSession flag.
pub const TERMINATE_FLAG_ABOVE_AGENT: &str = "2.3.722.0";
/// Agents above this multiplex port-forwarding sessions (smux).
pub const MUX_ABOVE_AGENT: &str = "3.0.196.0";
/// Agents above this leave smux keepalive off on the client's side.
pub const KEEPALIVE_OFF_ABOVE_AGENT: &str = "3.1.1511.0";

/// Whether an agent of version `agent` can carry SSH sessions.
pub fn supports_ssh(agent: &str) -> bool {
    Version::at_least(agent, SSH_MIN_AGENT)
}

/// Whether an agent of version `agent` forwards to remote hosts (and not to its own port).
pub fn supports_remote_hosts(agent: &str) -> bool {
    Version::at_least(agent, REMOTE_HOST_MIN_AGENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically_with_missing_parts_as_zero() {
        assert!(supports_ssh("2.3.672.0"));
        assert!(supports_ssh("2.3.672"), "padded, as 2.3.672.0");
        assert!(supports_ssh("2.3.1000.0"));
        assert!(supports_ssh("3.0"));
        assert!(!supports_ssh("2.3.671.9"));
        assert!(!supports_ssh("2.2.999.0"));
        assert!(!supports_ssh("garbage"));
        assert!(!supports_ssh(""));
        assert!(supports_remote_hosts("3.1.1188.0") && supports_remote_hosts("3.3.4851.0"));
        assert!(!supports_remote_hosts("3.1.1080.0") && !supports_remote_hosts("3.0.1390.0"));
        assert!(Version::above("3.0.197.0", MUX_ABOVE_AGENT));
        assert!(!Version::above("3.0.196.0", MUX_ABOVE_AGENT));
        assert!(!Version::above("3.0.196", MUX_ABOVE_AGENT));
        assert!(Version::above("3.1", "3.0.999.0"));
        assert!(!Version::above("x.1", "1.0"));
        assert_eq!(compare("1.2.0.0", "1.2"), Some(Ordering::Equal));
        assert_eq!(compare("1.10", "1.9"), Some(Ordering::Greater));
        assert_eq!(compare("1.a", "1.0"), None);
    }
}
