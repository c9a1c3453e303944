//! The agent's check of a remote-host destination before it forwards (the Port plugin's
//! parameter validation): the host's addresses must not be ones it refuses. Pure.
//!
//! Every agent that forwards to remote hosts refuses its default deny list (instance
//! metadata, Amazon Time Sync, Windows license activation, the VPC's reserved resolver address
//! on IPv6). From 3.3.4851.0 it also refuses loopback (the instance itself: forward its own
//! ports with a Port session without a host) and the ECS and EKS credential endpoints. The
//! VPC's DNS resolver (the VPC's base address + 2) is refused as well, but the emulated
//! instances have no VPC.

use std::net::IpAddr;

use crate::version;

/// Refused by every agent that forwards to remote hosts (its default deny list).
const DENIED: &[&str] = &[
    "169.254.169.254",
    "fd00:ec2::254",
    "169.254.169.253",
    "fd00:ec2::253",
    "169.254.169.123",
    "fd00:ec2::123",
    "169.254.169.250",
    "169.254.169.251",
    "fd00:ec2::240",
];

/// Also refused from 3.3.4851.0: the ECS task and EKS Pod Identity credential endpoints.
const DENIED_SINCE_LOOPBACK_GATE: &[&str] = &["169.254.170.2", "169.254.170.23", "fd00:ec2::23"];

/// Whether the agent of `agent_version` forwards to `host`, whose addresses are `addresses`;
/// the error is what the agent says.
pub(crate) fn check(host: &str, addresses: &[IpAddr], agent_version: &str) -> Result<(), String> {
    let strict = version::agent_refuses_loopback_forwarding(agent_version);
    let denied = |address: &IpAddr| {
        let listed = |list: &[&str]| {
            list.iter()
                .any(|d| d.parse::<IpAddr>().ok() == Some(*address))
        };
        listed(DENIED) || (strict && (address.is_loopback() || listed(DENIED_SINCE_LOOPBACK_GATE)))
    };
    match addresses.iter().any(denied) {
        true => Err(format!("Forwarding to IP address {host} is forbidden.")),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().expect("address")).collect()
    }

    const NEW: &str = "3.3.4851.0";
    const OLD: &str = "3.3.1142.0";

    #[test]
    fn metadata_is_refused_by_every_agent() {
        for agent in [OLD, NEW] {
            let refused = check("169.254.169.254", &addresses(&["169.254.169.254"]), agent);
            assert_eq!(
                refused,
                Err("Forwarding to IP address 169.254.169.254 is forbidden.".to_owned())
            );
            assert!(check("imds.example", &addresses(&["fd00:ec2::254"]), agent).is_err());
        }
    }

    #[test]
    fn loopback_and_credential_endpoints_are_refused_from_the_gate_on() {
        for (host, resolved) in [
            ("localhost", &["127.0.0.1", "::1"][..]),
            ("127.0.0.53", &["127.0.0.53"][..]),
            ("169.254.170.2", &["169.254.170.2"][..]),
            ("fd00:ec2::23", &["fd00:ec2::23"][..]),
        ] {
            assert!(check(host, &addresses(resolved), NEW).is_err(), "{host}");
            assert!(
                check(host, &addresses(resolved), OLD).is_ok(),
                "{host} before the gate"
            );
        }
    }

    #[test]
    fn other_hosts_and_unresolved_names_pass() {
        assert!(check("db.internal", &addresses(&["10.0.3.17"]), NEW).is_ok());
        assert!(check("unknown.internal", &[], NEW).is_ok());
    }
}
