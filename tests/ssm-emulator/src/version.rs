//! Dotted version strings and the agent/client version gates of docs/protocol.md §5.4.

use std::cmp::Ordering;

/// Parses `a.b.c.d` into numbers; `None` when a part is not a number.
pub fn parse(version: &str) -> Option<Vec<u64>> {
    version
        .trim()
        .split('.')
        .map(|p| p.parse::<u64>().ok())
        .collect()
}

/// Compares two dotted versions numerically, padding the shorter one with zeros.
/// `None` when either is not a dotted number.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (parse(a)?, parse(b)?);
    let n = a.len().max(b.len());
    for i in 0..n {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        match x.cmp(&y) {
            Ordering::Equal => continue,
            other => return Some(other),
        }
    }
    Some(Ordering::Equal)
}

fn greater(a: &str, b: &str) -> bool {
    compare(a, b) == Some(Ordering::Greater)
}

/// The agent supports smux at all (agents ≤ 3.0.196.0 only had basic mode).
pub fn agent_supports_mux(agent_version: &str) -> bool {
    greater(agent_version, "3.0.196.0")
}

/// The agent understands the TerminateSession flag.
pub fn agent_supports_terminate_flag(agent_version: &str) -> bool {
    greater(agent_version, "2.3.722.0")
}

/// The agent refuses to forward to loopback and to the ECS and EKS credential endpoints
/// (3.3.4851.0 and later).
pub fn agent_refuses_loopback_forwarding(agent_version: &str) -> bool {
    matches!(
        compare(agent_version, "3.3.4851.0"),
        Some(Ordering::Greater | Ordering::Equal)
    )
}

/// The agent's Port plugin reads a `host` parameter (3.1.1188.0 and later): an older one knows
/// no such parameter and forwards to the instance's own port (`localhost:portNumber`).
pub fn agent_forwards_to_remote_hosts(agent_version: &str) -> bool {
    matches!(
        compare(agent_version, "3.1.1188.0"),
        Some(Ordering::Greater | Ordering::Equal)
    )
}

/// The agent chooses mux: it supports it, the client is ≥ 1.1.70, and the type is
/// `LocalPortForwarding`.
pub fn agent_uses_mux(
    agent_version: &str,
    client_version: &str,
    local_port_forwarding: bool,
) -> bool {
    local_port_forwarding
        && agent_supports_mux(agent_version)
        && matches!(
            compare(client_version, "1.1.70"),
            Some(Ordering::Greater | Ordering::Equal)
        )
}

/// The agent's smux keepalive is on: old agents always had it; newer ones turn it off for
/// clients > 1.2.331.0.
pub fn agent_smux_keepalive(agent_version: &str, client_version: &str) -> bool {
    !greater(agent_version, "3.1.1511.0") || !greater(client_version, "1.2.331.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_follow_the_reference_table() {
        assert!(agent_uses_mux("3.3.1142.0", "1.2.764.0", true));
        assert!(agent_uses_mux("3.3.1142.0", "1.1.70.0", true));
        assert!(!agent_uses_mux("3.3.1142.0", "1.1.69.0", true));
        assert!(!agent_uses_mux("3.3.1142.0", "1.2.764.0", false));
        assert!(!agent_uses_mux("3.0.196.0", "1.2.764.0", true));
        assert!(agent_smux_keepalive("3.3.1142.0", "1.2.0.0"));
        assert!(agent_smux_keepalive("3.3.1142.0", "1.2.331.0"));
        assert!(!agent_smux_keepalive("3.3.1142.0", "1.2.332.0"));
        assert!(agent_smux_keepalive("3.1.1511.0", "1.2.764.0"));
        assert!(!agent_supports_terminate_flag("2.3.722.0"));
        assert!(agent_supports_terminate_flag("2.3.723.0"));
    }

    #[test]
    fn garbage_versions_do_not_compare() {
        assert_eq!(compare("1.2.x", "1.2.0"), None);
        assert_eq!(compare("1.2", "1.2.0.0"), Some(Ordering::Equal));
    }
}
