//! The pure diff: what is observed in AWS against what a grant stands for, as a list of
//! changes in the order they must be applied. No I/O.
//!
//! Policies: create, or (when the default version means something else) delete the oldest
//! non-default version at IAM's limit of 5 and create a new default version; then attach and
//! detach to match the principals. Removing a policy detaches it everywhere, deletes its
//! non-default versions, then the policy. Documents: create, update, delete, and delete the
//! orphans a listing by the owner tag finds. Nothing without the grant's ownership tag is ever
//! changed.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    aws::{PolicyVersion, Principal},
    model::policy,
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
        }
    }
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
