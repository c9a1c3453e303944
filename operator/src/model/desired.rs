//! What a grant means: `SessionAccess` + [`Settings`] → the AWS state and bridge endpoints it
//! stands for. Pure: no I/O, no clock, deterministic output.
//!
//! ```text
//!  SessionAccess ─┬─▶ statements ─────────▶ each principal's policy set (model::identity)
//!                 ├─▶ bridge statements ──▶ the bridge role's policy set
//!                 ├─▶ session documents (own shell document, one Port document per port)
//!                 └─▶ bridge endpoints (instance × port → session document)
//! ```
//!
//! A grant's statements alone must fit [`MAX_POLICIES_PER_PRINCIPAL`] policies; merged with
//! other grants' they usually take far fewer. The statements themselves are written in
//! `desired::statements`; this module puts them together with the documents and endpoints.

use std::collections::BTreeMap;

use fleet_access_crds::{
    SessionAccess, ssm_documents,
    v1alpha1::{self, Principals, Targets},
    validation::{Checked, InvalidObject},
};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{
    api::networking::v1::NetworkPolicyPeer, apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::ResourceExt;
use serde::Serialize;
use serde_json::Value;

use crate::{
    Error, Result,
    aws::{Principal, PrincipalKind},
    model::{
        documents::{self, SSH_DOCUMENT},
        identity::pack,
        naming::GrantNames,
        policy::{Conditions, Effect, Statement},
    },
    settings::Settings,
};

mod statements;

use statements::{
    Arns, deny_statements, kms_statement, own_session_statements, role_own_sessions,
    start_session_statements, window_conditions,
};

/// IAM attaches at most 20 managed policies to one user or role (after a quota increase; 10 by
/// default), so a grant may never need more.
pub const MAX_POLICIES_PER_PRINCIPAL: usize = 20;

/// The suffix of a grant's shell document's name.
const SHELL_SUFFIX: &str = "-shell";

/// The suffix of the name a grant's own Port document for `port` had in earlier releases.
fn port_suffix(port: u16) -> String {
    format!("-port{port}")
}

/// The AWS state and endpoints one grant stands for.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Desired {
    /// `<cluster>/<namespace>/<name>` of the grant: the owner tag's value.
    pub grant: String,
    /// Allow or Deny.
    pub effect: Effect,
    /// The statements every principal's policy set carries for the grant.
    pub statements: Vec<Statement>,
    /// The principals the policies are attached to.
    pub principals: PrincipalNames,
    /// Session documents the grant owns.
    pub documents: Vec<SessionDocument>,
    /// Endpoints the bridge serves, and the bridge role's policy for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeGrant>,
    /// How the grant's principals start each kind of session it allows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connect: Vec<Connection>,
    /// The instances the grant covers, for the controller to resolve (the policies already
    /// carry them as ARNs and conditions).
    #[serde(skip)]
    pub targets: TargetSelection,
    /// When the grant's window ends, if it does.
    #[serde(skip)]
    pub expires_at: Option<Timestamp>,
}

/// One kind of session a grant allows, and the exact commands a person runs for it: the
/// document is the one the grant's policy allows, which AWS's defaults are not for ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The session document to start.
    pub document: String,
    /// The remote host the document forwards to, if not the instance itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port on the instance, or on the remote host.
    pub port: u16,
    /// With fleet-access's own client, `agent-bridge`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_bridge: Option<String>,
    /// With the AWS CLI and the session-manager-plugin.
    pub aws_cli: String,
}

/// The instances a grant covers, as plain values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetSelection {
    /// Every instance of the account and Region (never enumerated).
    pub all_instances: bool,
    /// Instances by ID.
    pub instance_ids: Vec<String>,
    /// Instances carrying every one of these tags (values may hold IAM wildcards).
    pub tags: BTreeMap<String, String>,
    /// Whether the grant forwards to remote hosts through them (an Allow grant with
    /// `sessions.remoteHosts`): their agents must support it.
    pub remote_hosts: bool,
}

impl Desired {
    /// Whether the grant's window has ended at `now`.
    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The statements the grant puts in each identity's policy set: its own to each principal,
    /// the bridge's to the bridge role (both, when the bridge role is also a principal).
    pub fn contributions(&self) -> BTreeMap<Principal, Vec<Statement>> {
        let p = &self.principals;
        let mut out: BTreeMap<Principal, Vec<Statement>> = BTreeMap::new();
        if !self.statements.is_empty() {
            let principals = (p
                .users
                .iter()
                .map(|n| Principal::new(PrincipalKind::User, n)))
            .chain(
                p.roles
                    .iter()
                    .map(|n| Principal::new(PrincipalKind::Role, n)),
            )
            .chain(
                p.groups
                    .iter()
                    .map(|n| Principal::new(PrincipalKind::Group, n)),
            );
            for principal in principals {
                out.entry(principal)
                    .or_default()
                    .extend(self.statements.iter().cloned());
            }
        }
        if let Some(bridge) = &self.bridge {
            out.entry(Principal::new(PrincipalKind::Role, &bridge.role))
                .or_default()
                .extend(bridge.statements.iter().cloned());
        }
        out
    }
}

/// Refuses statements that alone would need more than [`MAX_POLICIES_PER_PRINCIPAL`] policies.
fn within_policy_limit(statements: &[Statement], what: &'static str) -> Result<()> {
    let needed = pack(statements.to_vec(), &str::to_owned)?.len();
    if needed > MAX_POLICIES_PER_PRINCIPAL {
        return Err(Error::TooManyPolicies {
            needed,
            limit: MAX_POLICIES_PER_PRINCIPAL,
            what,
        });
    }
    Ok(())
}

/// IAM principals by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrincipalNames {
    /// IAM user names.
    pub users: Vec<String>,
    /// IAM role names.
    pub roles: Vec<String>,
    /// IAM group names.
    pub groups: Vec<String>,
}

/// A session document a grant uses.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionDocument {
    /// The document name.
    pub name: String,
    /// `Standard_Stream` (shell) or `Port`.
    pub session_type: &'static str,
    /// The content, as sent to CreateDocument.
    pub content: Value,
    /// Whether every grant of the cluster that needs it shares it (a Port document, named
    /// after its port) rather than the grant owning it (a shell document, with the grant's
    /// logging). Shared documents keep identity policy sets small: a thousand port grants
    /// name one document.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

impl SessionDocument {
    /// The documents among `all` that the grant owns.
    pub fn owned(all: &[SessionDocument]) -> impl Iterator<Item = &SessionDocument> {
        all.iter().filter(|d| !d.shared)
    }
}

/// What the bridge serves for a grant.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeGrant {
    /// The IAM role the bridge runs as.
    pub role: String,
    /// The statements the grant puts in that role's policy set for these endpoints.
    pub statements: Vec<Statement>,
    /// Instances named by ID.
    pub instances: Vec<String>,
    /// Tags whose instances are resolved when the grant is applied.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Ports exposed on each instance, and on the remote hosts reached through it, with the
    /// session document that reaches each.
    pub ports: Vec<BridgePort>,
    /// Who may connect (NetworkPolicy peers).
    pub clients: Vec<NetworkPolicyPeer>,
}

/// One exposed port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgePort {
    /// The remote host the port is on, when it is not the instance's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port on the instance, or on the remote host.
    pub port: u16,
    /// The session document the bridge starts sessions with.
    pub document: String,
    /// The `portNumber` parameter to pass, for documents that do not pin the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_parameter: Option<u16>,
}

impl BridgePort {
    /// Where it leads: `port` on the instance, or `host:port`.
    pub fn destination(&self) -> String {
        match &self.host {
            Some(host) if host.contains(':') => format!("[{host}]:{}", self.port),
            Some(host) => format!("{host}:{}", self.port),
            None => self.port.to_string(),
        }
    }
}

// === compute ===

/// Computes everything a grant stands for.
pub fn compute(grant: &SessionAccess, settings: &Settings) -> Result<Desired> {
    let namespace = grant.namespace().unwrap_or_else(|| "default".into());
    let name = grant.name_any();
    let spec = &grant.spec;
    let arns = Arns { settings };
    let window = window_conditions(spec.window.as_ref());
    let sessions = spec.sessions.clone().unwrap_or_default();
    let names = GrantNames {
        cluster: &settings.cluster,
        namespace: &namespace,
        name: &name,
    };
    let grant_id = names.owner();
    // What the API server refuses only in what the operator would write (the NetworkPolicy of
    // the bridge's clients), refused before anything is.
    let problems = grant.problems();
    if !problems.is_empty() {
        return Err(Error::InvalidGrant(InvalidObject::Fields(problems)));
    }
    // IAM role names are case-insensitive.
    if let Some(bridge) = settings.bridge_role.as_deref()
        && let Some(role) =
            (spec.principals.roles.iter()).find(|r| r.as_str().eq_ignore_ascii_case(bridge))
    {
        return Err(Error::BridgeRoleNamed {
            role: role.as_str().to_owned(),
        });
    }

    let documents = session_documents(grant, &settings.cluster);
    let effect = match spec.effect {
        v1alpha1::Effect::Allow => Effect::Allow,
        v1alpha1::Effect::Deny => Effect::Deny,
    };

    let statements = match effect {
        Effect::Allow => {
            let mut document_arns: Vec<String> = Vec::new();
            if sessions.ssh {
                document_arns.push(arns.aws_document(SSH_DOCUMENT));
            }
            document_arns.extend(documents.iter().map(|d| arns.own_document(&d.name)));
            let mut statements =
                start_session_statements(&arns, &spec.targets, document_arns, &window);
            statements.extend(own_session_statements(&arns, &spec.principals, &window));
            if sessions.shell
                && let Some(key) = spec.logging.as_ref().and_then(|l| l.kms_key_id.as_ref())
            {
                statements.push(kms_statement(&arns, key.as_str()));
            }
            statements
        }
        Effect::Deny => deny_statements(&arns, spec, &window),
    };
    let statements = match spec.principals.is_empty() {
        true => Vec::new(),
        false => statements,
    };
    within_policy_limit(&statements, "managed policies per principal")?;

    let bridge = match &spec.bridge {
        Some(bridge) if bridge.enabled => Some(bridge_grant(
            &names,
            settings,
            &arns,
            &spec.targets,
            &sessions,
            bridge,
            &documents,
            &window,
        )?),
        _ => None,
    };

    let connect = match effect {
        Effect::Allow if !spec.principals.is_empty() => connections(spec, &sessions, &documents),
        _ => Vec::new(),
    };
    Ok(Desired {
        grant: grant_id,
        effect,
        statements,
        principals: principal_names(&spec.principals),
        documents,
        connect,
        bridge,
        targets: TargetSelection {
            all_instances: spec.targets.all_instances,
            instance_ids: spec
                .targets
                .instance_ids
                .iter()
                .map(ToString::to_string)
                .collect(),
            tags: (spec.targets.tags.iter())
                .map(|(key, value)| (key.clone(), value.to_string()))
                .collect(),
            remote_hosts: spec.effect == v1alpha1::Effect::Allow
                && (spec.sessions.as_ref()).is_some_and(|s| !s.remote_hosts.is_empty()),
        },
        expires_at: spec
            .window
            .as_ref()
            .and_then(|w| w.expires_at.as_ref())
            .map(|t| t.0),
    })
}

/// The commands of each kind of session: for the grant's first instance, or `<instance>`.
fn connections(
    spec: &v1alpha1::SessionAccessSpec,
    sessions: &v1alpha1::Sessions,
    documents: &[SessionDocument],
) -> Vec<Connection> {
    let target =
        (spec.targets.instance_ids.first()).map_or("<instance>".to_owned(), |id| id.to_string());
    let aws_cli = |document: &str, parameters: &str| {
        format!("aws ssm start-session --target {target} --document-name {document}{parameters}")
    };
    let mut out = Vec::new();
    if sessions.ssh {
        out.push(Connection {
            document: SSH_DOCUMENT.into(),
            host: None,
            port: 22,
            agent_bridge: Some(format!(
                "ssh -o ProxyCommand='agent-bridge proxy %h %p' <user>@{target}"
            )),
            aws_cli: aws_cli(SSH_DOCUMENT, " --parameters portNumber=22"),
        });
    }
    for document in documents {
        let properties = &document.content["properties"];
        let port = properties["portNumber"]
            .as_str()
            .and_then(|p| p.parse().ok());
        out.push(match (document.session_type, port) {
            ("Port", Some(port)) => Connection {
                document: document.name.clone(),
                host: properties["host"].as_str().map(str::to_owned),
                port,
                agent_bridge: Some(format!(
                    "agent-bridge forward {target} --document {} --local 127.0.0.1:{port}",
                    document.name
                )),
                aws_cli: aws_cli(
                    &document.name,
                    &format!(" --parameters localPortNumber={port}"),
                ),
            },
            _ => Connection {
                document: document.name.clone(),
                host: None,
                port: 0,
                agent_bridge: Some(format!(
                    "agent-bridge shell {target} --document {}",
                    document.name
                )),
                aws_cli: aws_cli(&document.name, ""),
            },
        });
    }
    out
}

fn principal_names(principals: &Principals) -> PrincipalNames {
    fn names<T: ToString>(list: &[T]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }
    PrincipalNames {
        users: names(&principals.users),
        roles: names(&principals.roles),
        groups: names(&principals.groups),
    }
}

/// The session documents a grant stands for (none for a Deny grant). Unlike [`compute`] this
/// cannot fail, so the documents' names are known even for a grant whose policies cannot be
/// rendered (the operator looks its documents up by these names).
pub fn session_documents(grant: &SessionAccess, cluster: &str) -> Vec<SessionDocument> {
    let namespace = grant.namespace().unwrap_or_else(|| "default".into());
    let name = grant.name_any();
    let spec = &grant.spec;
    if spec.effect == v1alpha1::Effect::Deny {
        return Vec::new();
    }
    let names = GrantNames {
        cluster,
        namespace: &namespace,
        name: &name,
    };
    let grant_id = names.owner();
    let sessions = spec.sessions.clone().unwrap_or_default();
    let mut documents = Vec::new();
    if sessions.shell {
        let logging = spec.logging.clone().unwrap_or_default();
        documents.push(SessionDocument {
            name: names.object(SHELL_SUFFIX),
            session_type: "Standard_Stream",
            content: documents::shell_document(
                &format!("fleet-access: shell sessions of grant {grant_id}"),
                &logging,
            ),
            shared: false,
        });
    }
    for port in &sessions.ports {
        documents.push(port_document(cluster, port.0));
    }
    for remote in &sessions.remote_hosts {
        let (host, port) = (remote.host.as_str(), remote.port.0);
        documents.push(SessionDocument {
            name: ssm_documents::remote_host_document_name(cluster, host, port),
            session_type: "Port",
            content: documents::remote_host_document(
                &format!("fleet-access: forwarding to {host} port {port} only (cluster {cluster})"),
                host,
                port,
            ),
            shared: true,
        });
    }
    documents
}

/// The Port document of `port`, shared by the cluster's grants.
fn port_document(cluster: &str, port: u16) -> SessionDocument {
    SessionDocument {
        name: ssm_documents::port_document_name(cluster, port),
        session_type: "Port",
        content: documents::port_document(
            &format!("fleet-access: forwarding to port {port} only (cluster {cluster})"),
            port,
        ),
        shared: true,
    }
}

/// The names a grant's own Port documents had before Port documents were shared: looked up, and
/// deleted, after an upgrade.
pub fn earlier_port_document_names(grant: &SessionAccess, cluster: &str) -> Vec<String> {
    let namespace = grant.namespace().unwrap_or_else(|| "default".into());
    let name = grant.name_any();
    let names = GrantNames {
        cluster,
        namespace: &namespace,
        name: &name,
    };
    let sessions = grant.spec.sessions.clone().unwrap_or_default();
    (sessions.ports.iter())
        .map(|port| names.object(&port_suffix(port.0)))
        .collect()
}

#[allow(clippy::too_many_arguments)] // one call site; the arguments are the grant's parts
fn bridge_grant(
    names: &GrantNames<'_>,
    settings: &Settings,
    arns: &Arns<'_>,
    targets: &Targets,
    sessions: &v1alpha1::Sessions,
    bridge: &v1alpha1::Bridge,
    documents: &[SessionDocument],
    window: &Conditions,
) -> Result<BridgeGrant> {
    let role = settings.bridge_role.clone().ok_or(Error::NoBridgeRole)?;
    let instance_ports = (bridge.instance_ports().into_iter()).map(|port| {
        if port.0 == 22 && sessions.ssh {
            BridgePort {
                host: None,
                port: 22,
                document: SSH_DOCUMENT.into(),
                port_parameter: Some(22),
            }
        } else {
            BridgePort {
                host: None,
                port: port.0,
                document: port_document(names.cluster, port.0).name,
                port_parameter: None,
            }
        }
    });
    let remote_ports = bridge.remote_hosts.iter().map(|remote| BridgePort {
        host: Some(remote.host.to_string()),
        port: remote.port.0,
        document: ssm_documents::remote_host_document_name(
            names.cluster,
            remote.host.as_str(),
            remote.port.0,
        ),
        port_parameter: None,
    });
    let ports: Vec<BridgePort> = instance_ports.chain(remote_ports).collect();
    let document_arns = ports
        .iter()
        .map(|p| {
            if documents.iter().any(|d| d.name == p.document) {
                arns.own_document(&p.document)
            } else {
                arns.aws_document(&p.document)
            }
        })
        .collect();
    let mut statements = start_session_statements(arns, targets, document_arns, window);
    statements.push(role_own_sessions(
        arns,
        "TerminateAndResumeOwnSessionsAsRole",
        window,
    ));
    within_policy_limit(&statements, "managed policies on the bridge role")?;
    Ok(BridgeGrant {
        role,
        statements,
        instances: targets
            .instance_ids
            .iter()
            .map(ToString::to_string)
            .collect(),
        tags: targets
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        ports,
        clients: (bridge.clients.iter())
            .map(|peer| in_namespace(peer, names.namespace))
            .collect(),
    })
}

/// The label every namespace carries with its own name (set by the API server).
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A client peer as the grant means it: a `podSelector` without a `namespaceSelector` selects
/// pods in the grant's own namespace. (In the NetworkPolicy, which lives in the bridge's
/// namespace, it would select the bridge namespace's pods instead.) `ipBlock` peers and peers
/// with a `namespaceSelector` are kept as written.
fn in_namespace(peer: &NetworkPolicyPeer, namespace: &str) -> NetworkPolicyPeer {
    let mut peer = peer.clone();
    if peer.pod_selector.is_some() && peer.namespace_selector.is_none() {
        peer.namespace_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                namespace.to_owned(),
            )])),
            ..LabelSelector::default()
        });
    }
    peer
}

#[cfg(test)]
mod tests;
