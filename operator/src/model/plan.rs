//! The pure diff: what is observed in AWS against what a grant stands for, as a list of
//! changes in the order they must be applied. No I/O.
//!
//! Policies: create, or (when the default version means something else) delete the oldest
//! non-default version at IAM's limit of 5 and create a new default version; then attach and
//! detach to match the principals. Removing a policy detaches it everywhere, deletes its
//! non-default versions, then the policy. Documents: create, update, delete, and delete the
//! orphans a listing by the owner tag finds. Nothing without the grant's ownership tag is ever
//! changed. Endpoint Services and NetworkPolicies are planned in `endpoints`, sessions to end at
//! expiry here; all of them are [`Change`]s, which the controller's one applier applies.

use std::collections::{BTreeMap, BTreeSet};

use fleet_access_crds::SessionAccess;
use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};
use kube::ResourceExt;

use crate::{
    aws::{ActiveSession, PolicyVersion, Principal},
    model::{
        desired::{self, Desired, MAX_POLICIES_PER_PRINCIPAL, SessionDocument},
        identity::PolicySet,
        naming::{self, POLICY_PATH, policy_arn},
        policy, status,
    },
};

/// IAM keeps at most this many versions of a managed policy.
pub const MAX_POLICY_VERSIONS: usize = 5;

/// A managed policy as the grant wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedPolicy {
    /// The policy name.
    pub name: String,
    /// Its ARN (derived from the name, path and account).
    pub arn: String,
    /// The document, as JSON.
    pub document: String,
    /// Who it must be attached to.
    pub principals: BTreeSet<Principal>,
}

/// How many more managed policies `identity`'s set may have: `limit` less the policies
/// attached to it (`attached`, ARNs) that are neither this cluster's set for it nor this
/// cluster's own per-grant policies of an earlier release (which the grants remove).
pub fn policy_budget(attached: &[String], cluster: &str, limit: usize) -> usize {
    let ours = format!("{POLICY_PATH}{}", naming::cluster_prefix(cluster));
    let others = attached.iter().filter(|arn| !arn.contains(&ours)).count();
    limit.saturating_sub(others)
}

/// The policies of an identity's set as they must be in IAM, attached to it alone.
pub fn wanted_policies(
    identity: &Principal,
    set: &PolicySet,
    partition: &str,
    account: &str,
) -> Vec<WantedPolicy> {
    (set.policies.iter())
        .map(|policy| WantedPolicy {
            name: policy.name.clone(),
            arn: policy_arn(partition, account, &policy.name),
            document: policy.document.0.to_json(),
            principals: BTreeSet::from([identity.clone()]),
        })
        .collect()
}

/// The policy ARNs of this cluster's set for an identity among those attached to it.
pub fn attached_set<'a>(
    attached: &'a [String],
    cluster: &str,
    identity: &Principal,
) -> impl Iterator<Item = &'a String> {
    let name = crate::model::identity::policy_name(cluster, identity);
    let names: BTreeSet<String> = (1..=MAX_POLICIES_PER_PRINCIPAL)
        .map(|i| match i {
            1 => name(""),
            i => name(&format!("-{i}")),
        })
        .collect();
    attached.iter().filter(move |arn| {
        (arn.rsplit_once(POLICY_PATH)).is_some_and(|(_, name)| names.contains(name))
    })
}

/// A managed policy as observed in IAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedPolicy {
    /// Its ARN.
    pub arn: String,
    /// The owner tag's value, if the tag is there.
    pub owner: Option<String>,
    /// The default version's document (possibly URL-encoded).
    pub document: String,
    /// Every version.
    pub versions: Vec<PolicyVersion>,
    /// Who it is attached to.
    pub attached: BTreeSet<Principal>,
}

/// A session document as the grant wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedDocument {
    /// The document name.
    pub name: String,
    /// Its content, as JSON.
    pub content: String,
}

/// One change to apply.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Create a policy (tagged as the grant's).
    CreatePolicy {
        /// Name.
        name: String,
        /// Document.
        document: String,
    },
    /// Delete a non-default version.
    DeletePolicyVersion {
        /// Policy ARN.
        arn: String,
        /// Version ID.
        version: String,
    },
    /// Create a new default version.
    CreatePolicyVersion {
        /// Policy ARN.
        arn: String,
        /// Document.
        document: String,
    },
    /// Attach a policy.
    Attach {
        /// Policy ARN.
        arn: String,
        /// To whom.
        principal: Principal,
    },
    /// Detach a policy.
    Detach {
        /// Policy ARN.
        arn: String,
        /// From whom.
        principal: Principal,
    },
    /// Delete a detached policy with only its default version left.
    DeletePolicy {
        /// Policy ARN.
        arn: String,
    },
    /// Create a session document (tagged as the grant's).
    CreateDocument {
        /// Name.
        name: String,
        /// Content.
        content: String,
    },
    /// New content and default version.
    UpdateDocument {
        /// Name.
        name: String,
        /// Content.
        content: String,
    },
    /// Delete a document.
    DeleteDocument {
        /// Name.
        name: String,
    },
    /// End an open session (at expiry).
    TerminateSession {
        /// The session ID.
        session: String,
        /// The instance it is open on.
        instance: String,
    },
    /// Create or update an endpoint Service in the bridge namespace.
    ApplyService(Box<Service>),
    /// Delete an endpoint Service that no grant exposes ports on any more.
    DeleteService {
        /// Its namespace.
        namespace: String,
        /// Its name (the instance ID).
        name: String,
    },
    /// Create or update the grant's NetworkPolicy.
    ApplyNetworkPolicy(Box<NetworkPolicy>),
    /// Delete the grant's NetworkPolicy.
    DeleteNetworkPolicy {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Change {
    /// A short PascalCase verb for Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Change::CreatePolicy { .. } => "PolicyCreated",
            Change::DeletePolicyVersion { .. } => "PolicyVersionDeleted",
            Change::CreatePolicyVersion { .. } => "PolicyVersionCreated",
            Change::Attach { .. } => "PolicyAttached",
            Change::Detach { .. } => "PolicyDetached",
            Change::DeletePolicy { .. } => "PolicyDeleted",
            Change::CreateDocument { .. } => "DocumentCreated",
            Change::UpdateDocument { .. } => "DocumentUpdated",
            Change::DeleteDocument { .. } => "DocumentDeleted",
            Change::TerminateSession { .. } => "SessionTerminated",
            Change::ApplyService(_) => "EndpointApplied",
            Change::DeleteService { .. } => "EndpointDeleted",
            Change::ApplyNetworkPolicy(_) => "NetworkPolicyApplied",
            Change::DeleteNetworkPolicy { .. } => "NetworkPolicyDeleted",
        }
    }

    /// What changed, for people.
    pub fn describe(&self) -> String {
        match self {
            Change::CreatePolicy { name, .. } => format!("created IAM policy {name}"),
            Change::DeletePolicyVersion { arn, version } => {
                format!("deleted version {version} of {arn} (IAM keeps at most 5)")
            }
            Change::CreatePolicyVersion { arn, .. } => {
                format!("set a new default version of {arn}")
            }
            Change::Attach { arn, principal } => format!("attached {arn} to {principal}"),
            Change::Detach { arn, principal } => format!("detached {arn} from {principal}"),
            Change::DeletePolicy { arn } => format!("deleted IAM policy {arn}"),
            Change::CreateDocument { name, .. } => format!("created session document {name}"),
            Change::UpdateDocument { name, .. } => format!("updated session document {name}"),
            Change::DeleteDocument { name } => format!("deleted session document {name}"),
            Change::TerminateSession { session, instance } => {
                format!("terminated session {session} on {instance} at expiry")
            }
            Change::ApplyService(service) => format!(
                "applied endpoint Service {}/{}",
                service.namespace().unwrap_or_default(),
                service.name_any()
            ),
            Change::DeleteService { namespace, name } => {
                format!("deleted endpoint Service {namespace}/{name}")
            }
            Change::ApplyNetworkPolicy(policy) => format!(
                "applied NetworkPolicy {}/{}",
                policy.namespace().unwrap_or_default(),
                policy.name_any()
            ),
            Change::DeleteNetworkPolicy { namespace, name } => {
                format!("deleted NetworkPolicy {namespace}/{name}")
            }
        }
    }
}

/// The session documents the grant owns as they must be in SSM (shared ones are the
/// cluster's, see [`wanted_shared_documents`]).
pub fn wanted_documents(desired: &Desired) -> Vec<WantedDocument> {
    (SessionDocument::owned(&desired.documents))
        .map(|d| WantedDocument {
            name: d.name.clone(),
            content: d.content.to_string(),
        })
        .collect()
}

/// The documents the cluster's grants share, by name, for `grants` (each grant's
/// `session_documents`): the union of what the live ones need.
pub fn wanted_shared_documents<'a>(
    grants: impl IntoIterator<Item = &'a [SessionDocument]>,
) -> Vec<WantedDocument> {
    let mut wanted: BTreeMap<&str, &SessionDocument> = BTreeMap::new();
    for documents in grants {
        for document in documents.iter().filter(|d| d.shared) {
            wanted.entry(document.name.as_str()).or_insert(document);
        }
    }
    (wanted.into_values())
        .map(|d| WantedDocument {
            name: d.name.clone(),
            content: d.content.to_string(),
        })
        .collect()
}

/// What the grant may own in AWS besides what it wants now: looked up, and removed when no
/// longer wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// Policies of its own from an earlier release, when its status records them (grants
    /// now share their identities' policy sets, which are not the grant's to remove).
    pub policy_arns: BTreeSet<String>,
    /// Session documents: the names its spec derives, each looked up by name. Never found only
    /// through a listing: a paged listing misses documents while others are being deleted.
    pub document_names: BTreeSet<String>,
    /// Whether documents under names of an earlier spec may exist, so that a listing by the
    /// owner tag must look for them: after a spec change until a sync of the new generation
    /// succeeds. A steady grant is never listed, nor deleted through a listing.
    pub sweep_documents: bool,
}

/// When the grant is looked at: while it lives, or as it is deleted (which bumps its
/// generation once without a spec change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// Apply.
    Living,
    /// Cleanup.
    Deleted,
}

/// What the grant may own, from its status and its spec; policy ARNs and document names in
/// `(partition, account, cluster)`.
pub fn known_objects(
    grant: &SessionAccess,
    (partition, account, cluster): (&str, &str, &str),
    moment: Moment,
) -> Known {
    let own = |arn: &str| {
        let name = arn.rsplit('/').next().unwrap_or_default();
        arn.starts_with(&format!(
            "arn:{partition}:iam::{account}:policy{POLICY_PATH}"
        )) && name.starts_with(&naming::cluster_prefix(cluster))
            && !naming::is_identity_policy_name(name)
    };
    let policy_arns: BTreeSet<String> = (grant.status.iter())
        .flat_map(|s| s.policies.iter().map(|p| p.arn.clone()))
        .filter(|arn| own(arn))
        .collect();
    let (status, generation) = (grant.status.as_ref(), grant.metadata.generation);
    let follows_spec = match moment {
        Moment::Living => status::documents_follow_spec(status, generation),
        Moment::Deleted => status::documents_follow_spec_at_deletion(status, generation),
    };
    // A status that records a policy of its own was written by an earlier release, which also
    // gave the grant Port documents of its own: looked up until a sync of this release
    // succeeds (and records the grant's identity sets instead).
    let earlier_release = !policy_arns.is_empty();
    let earlier_documents = (earlier_release
        .then(|| desired::earlier_port_document_names(grant, cluster)))
    .into_iter()
    .flatten();
    Known {
        policy_arns,
        document_names: (desired::session_documents(grant, cluster).iter())
            .filter(|d| !d.shared)
            .map(|d| d.name.clone())
            .chain(earlier_documents)
            .collect(),
        sweep_documents: !follows_spec,
    }
}

/// Whose open sessions are a grant's: its principals', and the bridge's through its endpoints.
/// Nobody else's: other grants may cover the same instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOwners {
    /// The account: an owner of another account is never the grant's.
    pub account: String,
    /// `<namespace>/<name>` of the grant: a bridge session whose Reason names it was opened
    /// through the grant's endpoint.
    pub grant: String,
    /// IAM user names: the grant's users and its groups' members.
    pub users: BTreeSet<String>,
    /// IAM role names: their sessions are the grant's.
    pub roles: BTreeSet<String>,
    /// The bridge's role.
    pub bridge_role: Option<String>,
}

/// The grant a bridge session was opened for, as its Reason names it: a `grant=<key>` word,
/// with `+<n>` when n other grants share the endpoint (`agent-bridge serve` names the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NamedGrant<'a> {
    /// `<namespace>/<name>` of the grant named first.
    pub key: &'a str,
    /// Whether other grants share the endpoint.
    pub shared: bool,
}

/// The grant a bridge session's Reason names, if it names one.
pub(crate) fn named_grant(reason: &str) -> Option<NamedGrant<'_>> {
    let grants = reason
        .split(' ')
        .find_map(|word| word.strip_prefix("grant="))?;
    Some(match grants.split_once('+') {
        Some((key, _)) => NamedGrant { key, shared: true },
        None => NamedGrant {
            key: grants,
            shared: false,
        },
    })
}

/// Who an owner ARN of DescribeSessions names, in `account`: `arn:…:iam::<acct>:user/[path/]name`
/// or `arn:…:sts::<acct>:assumed-role/<role>/<session>`.
pub(crate) enum Owner<'a> {
    User(&'a str),
    Role(&'a str),
}

pub(crate) fn owner_of<'a>(arn: &'a str, account: &str) -> Option<Owner<'a>> {
    let mut parts = arn.splitn(6, ':');
    let (_arn, _partition, service, _region, owner_account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if owner_account != account {
        return None;
    }
    match (service, resource.split_once('/')?) {
        ("iam", ("user", path_and_name)) => path_and_name.rsplit('/').next().map(Owner::User),
        ("sts", ("assumed-role", role_and_session)) => {
            role_and_session.split('/').next().map(Owner::Role)
        }
        _ => None,
    }
}

/// The sessions the end of a grant ends, of those open on the instances it granted: its
/// principals', and the bridge's whose Reason names it, unless the endpoint is shared with
/// other grants and still serves the instance (`served`: the instances that still have an
/// endpoint Service, of any grant).
pub fn sessions_to_end(
    open: &[(String, Vec<ActiveSession>)],
    owners: &SessionOwners,
    served: &BTreeSet<String>,
) -> Vec<Change> {
    let is_grants = |instance: &String, session: &ActiveSession| {
        let owner = session
            .owner
            .as_deref()
            .and_then(|o| owner_of(o, &owners.account));
        match owner {
            Some(Owner::User(name)) => owners.users.contains(name),
            Some(Owner::Role(role)) if owners.bridge_role.as_deref() == Some(role) => {
                let named = (session.reason.as_deref()).and_then(named_grant);
                named.is_some_and(|n| {
                    n.key == owners.grant && (!n.shared || !served.contains(instance))
                })
            }
            Some(Owner::Role(role)) => owners.roles.contains(role),
            None => false,
        }
    };
    (open.iter())
        .flat_map(|(instance, sessions)| {
            (sessions.iter())
                .filter(move |s| is_grants(instance, s))
                .map(move |s| Change::TerminateSession {
                    session: s.id.clone(),
                    instance: instance.clone(),
                })
        })
        .collect()
}

/// A policy or document that exists under the grant's name but is not the grant's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {name} already exists without the {tag} tag naming this grant: the operator does not adopt it; rename or delete it",
    tag = crate::model::naming::OWNER_TAG
)]
pub struct NotOwned {
    /// `IAM policy` or `session document`.
    pub what: &'static str,
    /// Its name or ARN.
    pub name: String,
}

/// Changes that bring one policy from `observed` to `wanted` (`None` = remove it).
pub fn policy_changes(
    owner: &str,
    wanted: Option<&WantedPolicy>,
    observed: Option<&ObservedPolicy>,
) -> Result<Vec<Change>, NotOwned> {
    if let Some(observed) = observed
        && observed.owner.as_deref() != Some(owner)
    {
        return match wanted {
            Some(_) => Err(NotOwned {
                what: "IAM policy",
                name: observed.arn.clone(),
            }),
            // Not ours and not wanted: leave it alone.
            None => Ok(Vec::new()),
        };
    }
    let mut changes = Vec::new();
    match (wanted, observed) {
        (None, None) => {}
        (Some(wanted), None) => {
            changes.push(Change::CreatePolicy {
                name: wanted.name.clone(),
                document: wanted.document.clone(),
            });
            changes.extend(wanted.principals.iter().map(|p| Change::Attach {
                arn: wanted.arn.clone(),
                principal: p.clone(),
            }));
        }
        (Some(wanted), Some(observed)) => {
            let same = policy::same_meaning(&wanted.document, &observed.document).unwrap_or(false);
            if !same {
                if observed.versions.len() >= MAX_POLICY_VERSIONS
                    && let Some(oldest) = observed
                        .versions
                        .iter()
                        .filter(|v| !v.is_default)
                        .min_by_key(|v| v.number())
                {
                    changes.push(Change::DeletePolicyVersion {
                        arn: observed.arn.clone(),
                        version: oldest.id.clone(),
                    });
                }
                changes.push(Change::CreatePolicyVersion {
                    arn: observed.arn.clone(),
                    document: wanted.document.clone(),
                });
            }
            changes.extend(wanted.principals.difference(&observed.attached).map(|p| {
                Change::Attach {
                    arn: observed.arn.clone(),
                    principal: p.clone(),
                }
            }));
            changes.extend(observed.attached.difference(&wanted.principals).map(|p| {
                Change::Detach {
                    arn: observed.arn.clone(),
                    principal: p.clone(),
                }
            }));
        }
        (None, Some(observed)) => {
            changes.extend(observed.attached.iter().map(|p| Change::Detach {
                arn: observed.arn.clone(),
                principal: p.clone(),
            }));
            let mut old: Vec<&PolicyVersion> =
                observed.versions.iter().filter(|v| !v.is_default).collect();
            old.sort_by_key(|v| v.number());
            changes.extend(old.into_iter().map(|v| Change::DeletePolicyVersion {
                arn: observed.arn.clone(),
                version: v.id.clone(),
            }));
            changes.push(Change::DeletePolicy {
                arn: observed.arn.clone(),
            });
        }
    }
    Ok(changes)
}

/// Changes that bring the grant's documents from `observed` (name → content of the owned
/// documents) to `wanted`. `foreign` names documents that exist but are not the grant's.
pub fn document_changes(
    wanted: &[WantedDocument],
    observed: &BTreeMap<String, String>,
    foreign: &BTreeSet<String>,
) -> Result<Vec<Change>, NotOwned> {
    let mut changes = Vec::new();
    for document in wanted {
        if foreign.contains(&document.name) {
            return Err(NotOwned {
                what: "session document",
                name: document.name.clone(),
            });
        }
        match observed.get(&document.name) {
            None => changes.push(Change::CreateDocument {
                name: document.name.clone(),
                content: document.content.clone(),
            }),
            Some(content) if !same_json(content, &document.content) => {
                changes.push(Change::UpdateDocument {
                    name: document.name.clone(),
                    content: document.content.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let wanted_names: BTreeSet<&str> = wanted.iter().map(|d| d.name.as_str()).collect();
    changes.extend(
        observed
            .keys()
            .filter(|name| !wanted_names.contains(name.as_str()))
            .map(|name| Change::DeleteDocument { name: name.clone() }),
    );
    Ok(changes)
}

/// Deletions of the grant's documents that a listing by its owner tag found under names the grant
/// does not want (documents of an earlier spec). `deleted` names the documents already deleted,
/// which a listing may still show for a moment: they are not found again.
pub fn orphan_documents(
    wanted: &[WantedDocument],
    listed: &[String],
    deleted: &BTreeSet<String>,
) -> Vec<Change> {
    let wanted_names: BTreeSet<&str> = wanted.iter().map(|d| d.name.as_str()).collect();
    let orphans: BTreeSet<&String> = listed
        .iter()
        .filter(|name| !wanted_names.contains(name.as_str()) && !deleted.contains(*name))
        .collect();
    orphans
        .into_iter()
        .map(|name| Change::DeleteDocument { name: name.clone() })
        .collect()
}

/// JSON texts equal as values (key order and whitespace do not matter).
fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests;
