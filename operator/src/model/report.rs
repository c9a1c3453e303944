//! How `plan` shows what grants stand for: text for people, JSON (stable) for scripts.

use std::fmt::Write as _;

use serde::Serialize;

use crate::model::{desired::Desired, naming::POLICY_PATH, policy::MANAGED_POLICY_MAX_CHARS};

/// The version of the JSON plan format; bumped on incompatible changes.
pub const PLAN_FORMAT: &str = "fleetaccess.io/plan/v1";

/// One attachment of a managed policy to a principal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The policy name.
    pub policy: String,
    /// `user`, `role` or `group`.
    pub principal_type: &'static str,
    /// The principal's name.
    pub principal: String,
}

/// Every attachment a grant needs: each policy to each principal, the bridge policy to the
/// bridge role.
pub fn attachments(desired: &Desired) -> Vec<Attachment> {
    let p = &desired.principals;
    let principals = p
        .users
        .iter()
        .map(|n| ("user", n))
        .chain(p.roles.iter().map(|n| ("role", n)))
        .chain(p.groups.iter().map(|n| ("group", n)));
    let mut out: Vec<Attachment> = principals
        .flat_map(|(kind, principal)| {
            desired.policies.iter().map(move |policy| Attachment {
                policy: policy.name.clone(),
                principal_type: kind,
                principal: principal.clone(),
            })
        })
        .collect();
    if let Some(bridge) = &desired.bridge {
        out.push(Attachment {
            policy: bridge.policy.name.clone(),
            principal_type: "role",
            principal: bridge.role.clone(),
        });
    }
    out
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GrantPlan<'a> {
    #[serde(flatten)]
    desired: &'a Desired,
    policy_path: &'static str,
    attachments: Vec<Attachment>,
}

#[derive(Serialize)]
struct Plan<'a> {
    format: &'static str,
    grants: Vec<GrantPlan<'a>>,
}

/// The plan as pretty JSON.
pub fn json(grants: &[Desired]) -> String {
    let plan = Plan {
        format: PLAN_FORMAT,
        grants: grants
            .iter()
            .map(|desired| GrantPlan {
                desired,
                policy_path: POLICY_PATH,
                attachments: attachments(desired),
            })
            .collect(),
    };
    // Plain data always serializes.
    serde_json::to_string_pretty(&plan).unwrap_or_default() + "\n"
}

/// The plan as text for people.
pub fn text(grants: &[Desired]) -> String {
    let mut out = String::new();
    for desired in grants {
        let _ = writeln!(
            out,
            "SessionAccess {} ({:?})",
            desired.grant, desired.effect
        );
        section(
            &mut out,
            &format!("IAM managed policies, path {POLICY_PATH}"),
        );
        for policy in desired
            .policies
            .iter()
            .chain(desired.bridge.as_ref().map(|b| &b.policy))
        {
            let _ = writeln!(
                out,
                "  {} ({} of {MANAGED_POLICY_MAX_CHARS} characters)",
                policy.name, policy.size
            );
            for line in policy.document.0.to_pretty_json().lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        if desired.policies.is_empty() && desired.bridge.is_none() {
            let _ = writeln!(out, "  (none: the grant names no principal)");
        }
        section(&mut out, "Attachments");
        let attachments = attachments(desired);
        for a in &attachments {
            let _ = writeln!(
                out,
                "  {} -> {} {}",
                a.policy, a.principal_type, a.principal
            );
        }
        if attachments.is_empty() {
            let _ = writeln!(out, "  (none)");
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
                        let _ = writeln!(out, "  {instance}:{} via {}", port.port, port.document);
                    }
                }
                if !bridge.tags.is_empty() {
                    let tags: Vec<String> = bridge
                        .tags
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let ports: Vec<String> =
                        bridge.ports.iter().map(|p| p.port.to_string()).collect();
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
    out
}

fn section(out: &mut String, title: &str) {
    let _ = writeln!(out, "\n{title}:");
}
