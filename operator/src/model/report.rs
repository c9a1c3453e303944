//! How `plan` shows what grants stand for: text for people, JSON (stable) for scripts.

use std::fmt::Write as _;

use fleet_access_crds::bridge_contract;
use serde::Serialize;

use std::collections::BTreeMap;

use crate::{
    aws::Principal,
    model::{
        desired::{BridgePort, Desired},
        identity::PolicySet,
        naming::POLICY_PATH,
        policy::{MANAGED_POLICY_MAX_CHARS, PolicyDocument, Statement},
    },
};

/// The version of the JSON plan format; bumped on incompatible changes (v2: policies are
/// per identity, merged across grants, no longer per grant).
pub const PLAN_FORMAT: &str = "fleetaccess.io/plan/v2";

/// One identity's policy set in the plan.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityPlan<'a> {
    /// `user`, `role` or `group`.
    principal_type: &'static str,
    principal: &'a str,
    policy_path: &'static str,
    #[serde(flatten)]
    set: &'a PolicySet,
}

#[derive(Serialize)]
struct Plan<'a> {
    format: &'static str,
    grants: &'a [Desired],
    identities: Vec<IdentityPlan<'a>>,
}

/// The plan as pretty JSON.
pub fn json(grants: &[Desired], sets: &BTreeMap<Principal, PolicySet>) -> String {
    let plan = Plan {
        format: PLAN_FORMAT,
        grants,
        identities: (sets.iter())
            .map(|(identity, set)| IdentityPlan {
                principal_type: identity.kind.as_str(),
                principal: &identity.name,
                policy_path: POLICY_PATH,
                set,
            })
            .collect(),
    };
    // Plain data always serializes.
    serde_json::to_string_pretty(&plan).unwrap_or_default() + "\n"
}

/// The plan as text for people: each grant, then each identity's policy set.
pub fn text(grants: &[Desired], sets: &BTreeMap<Principal, PolicySet>) -> String {
    let mut out = String::new();
    for desired in grants {
        let _ = writeln!(
            out,
            "SessionAccess {} ({:?})",
            desired.grant, desired.effect
        );
        section(
            &mut out,
            "IAM statements, in the policy set of each principal",
        );
        let principals = principal_list(desired);
        if desired.statements.is_empty() {
            let _ = writeln!(out, "  (none: the grant names no principal)");
        } else {
            let _ = writeln!(out, "  for {}", principals.join(", "));
            statements(&mut out, &desired.statements);
        }
        if let Some(bridge) = &desired.bridge {
            section(
                &mut out,
                &format!(
                    "IAM statements, in the policy set of the bridge role {}",
                    bridge.role
                ),
            );
            statements(&mut out, &bridge.statements);
        }
        section(&mut out, "Session documents");
        for document in &desired.documents {
            let _ = writeln!(out, "  {} ({})", document.name, document.session_type);
            let pretty = serde_json::to_string_pretty(&document.content).unwrap_or_default();
            for line in pretty.lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        if desired.documents.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        section(&mut out, "How to connect");
        for connection in &desired.connect {
            let _ = writeln!(out, "  {}", connection.document);
            for command in connection.agent_bridge.iter().chain([&connection.aws_cli]) {
                let _ = writeln!(out, "    {command}");
            }
        }
        if desired.connect.is_empty() {
            let _ = writeln!(
                out,
                "  (no session for people: the grant names no principal, or denies)"
            );
        }
        section(&mut out, "Bridge endpoints");
        match &desired.bridge {
            None => {
                let _ = writeln!(out, "  (none)");
            }
            Some(bridge) => {
                for instance in &bridge.instances {
                    for port in &bridge.ports {
                        let service = bridge_contract::service_name(instance, port.host.as_deref());
                        let to = match port.host {
                            Some(_) => format!(" (to {} through {instance})", port.destination()),
                            None => String::new(),
                        };
                        let _ =
                            writeln!(out, "  {service}:{}{to} via {}", port.port, port.document);
                    }
                }
                if !bridge.tags.is_empty() {
                    let tags: Vec<String> = bridge
                        .tags
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let ports: Vec<String> =
                        bridge.ports.iter().map(BridgePort::destination).collect();
                    let _ = writeln!(
                        out,
                        "  instances tagged {} (resolved when applied), ports {}",
                        tags.join(","),
                        ports.join(",")
                    );
                }
                let _ = writeln!(
                    out,
                    "  clients: {} NetworkPolicy peer(s)",
                    bridge.clients.len()
                );
            }
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "IAM managed policies per identity, merged across the grants above, path {POLICY_PATH}:"
    );
    for (identity, set) in sets {
        let _ = writeln!(out, "\n  {} {}:", identity.kind.as_str(), identity.name);
        for policy in &set.policies {
            let _ = writeln!(
                out,
                "    {} ({} of {MANAGED_POLICY_MAX_CHARS} characters)",
                policy.name, policy.size
            );
            for line in policy.document.0.to_pretty_json().lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
        for grant in &set.left_out {
            let _ = writeln!(
                out,
                "    left out, over the quota of managed policies per identity: {grant}"
            );
        }
    }
    if sets.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    out
}

/// `user alice`, `role ci`, …: the grant's principals.
fn principal_list(desired: &Desired) -> Vec<String> {
    let p = &desired.principals;
    (p.users.iter().map(|n| format!("user {n}")))
        .chain(p.roles.iter().map(|n| format!("role {n}")))
        .chain(p.groups.iter().map(|n| format!("group {n}")))
        .collect()
}

fn statements(out: &mut String, statements: &[Statement]) {
    let document = PolicyDocument {
        statements: statements.to_vec(),
    };
    for line in document.to_pretty_json().lines() {
        let _ = writeln!(out, "    {line}");
    }
}

fn section(out: &mut String, title: &str) {
    let _ = writeln!(out, "\n{title}:");
}
