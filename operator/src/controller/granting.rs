//! Which grants grant now: of the grants listed, those that are live, inside a boundary,
//! approved where a boundary asks for approval, valid, within their window, apart from the
//! earlier grants of other scopes that name their principals (`model::combination`), and
//! within their namespace's share of session documents, each judged as its own reconcile
//! judges it (same boundaries, same clock rules, the approved generation's spec). What the
//! cluster's shared objects hold (identities' policy sets, the shared session documents) is
//! the union of what these grants ask, never of a grant that is refused, waiting, invalid,
//! over, combined or past its namespace's documents: such a grant writes nothing to AWS,
//! shared or not.
//!
//! Every sync of a shared object (the shared documents, each identity's policy set) starts from
//! `GrantingNow::now`: the grants listed and judged once for every sync that asks while none
//! has started yet, so syncs that run together read the grants, boundaries, namespaces,
//! approvals and group members once, not once each.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use fleet_access_crds::{SessionAccess, SessionAccessApproval};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::{
    Error, Result,
    controller::{Context, coalesce::Coalesced, observe},
    model::{
        approval,
        boundary::{self, Admission},
        combination::{self, GroupMembers, Scope},
        desired::{self, Desired},
        documents,
        status::Withheld,
    },
};

/// The grants that grant now, and those left out only because of the grants before them: an
/// earlier grant of another scope names one of their principals, or their namespace's grants
/// would hold too many session documents with them.
pub(crate) struct Granting {
    /// What each grant that grants stands for, in order of creation (then owner).
    pub granting: Vec<Desired>,
    /// The grants left out (by owner tag value), with why.
    pub left_out: BTreeMap<String, Withheld>,
    /// The members of the groups the grants were judged with (none when every grant in force
    /// comes from one scope: see `combination::groups_to_resolve`).
    pub members: GroupMembers,
}

/// The grants as listed, and which of them grant.
pub(crate) struct Listed {
    /// Every grant the operator watches, as listed.
    pub grants: Vec<SessionAccess>,
    /// Which of them grant.
    pub granting: Granting,
}

/// The grants as they are now, listed and judged once for all the syncs that ask together.
#[derive(Default)]
pub struct GrantingNow {
    listings: Coalesced<(), Listed>,
    /// The group members of the last listing.
    judged_with: Mutex<GroupMembers>,
}

impl GrantingNow {
    /// The grants, listed (and judged) after this call was made: shared with every call made
    /// before that listing started (see [`Coalesced`]), so it is as fresh as a listing of
    /// one's own.
    pub(crate) async fn now(&self, ctx: &Context) -> Result<Arc<Listed>> {
        let listed = (self.listings)
            .run(&(), || async {
                let grants = observe::grants(ctx).await?;
                let granting = granting(&grants, ctx).await?;
                let judged_with = granting.members.clone();
                *self.judged_with.lock().unwrap_or_else(|p| p.into_inner()) = judged_with;
                Ok(Listed { grants, granting })
            })
            .await;
        listed.map_err(|source| Error::SharedSync {
            what: "listing the grants".into(),
            source,
        })
    }

    /// The groups whose members the last listing judged the grants with, and that `read` (read
    /// since) says have other members now: the grants must be judged again.
    pub(crate) fn groups_changed(&self, read: &GroupMembers) -> BTreeSet<String> {
        let judged_with = self.judged_with.lock().unwrap_or_else(|p| p.into_inner());
        combination::groups_changed(&judged_with, read)
    }
}

/// Which of `grants` grant now ([`Granting`]). Lists the boundaries and namespaces, and the
/// approvals when a grant needs them.
pub(crate) async fn granting(grants: &[SessionAccess], ctx: &Context) -> Result<Granting> {
    let (boundaries, labels) = observe::all_boundaries(ctx).await?;
    let now = Timestamp::now();
    let no_labels = BTreeMap::new();
    let mut approvals: Option<Vec<SessionAccessApproval>> = None;
    let mut granting: Vec<(Option<Timestamp>, Scope, Desired)> = Vec::new();
    for grant in grants {
        if grant.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let namespace = grant.namespace().unwrap_or_default();
        let created = grant.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let judged = boundary::Grant {
            spec: &grant.spec,
            namespace: &namespace,
            namespace_labels: labels.get(&namespace).unwrap_or(&no_labels),
            created,
        };
        if let Admission::Refused(_) = boundary::admit(&judged, &boundaries, now) {
            continue;
        }
        let required = approval::required_by(&judged, &boundaries);
        let verdict = match required.is_empty() {
            true => approval::Verdict::NotRequired,
            false => {
                let approvals = match &mut approvals {
                    Some(listed) => listed,
                    None => approvals.insert(observe::approvals(None, ctx).await?),
                };
                approval::judge(grant, required, approvals, now)
            }
        };
        if !verdict.allows() {
            continue;
        }
        let Ok(desired) = desired::compute(&approval::effective(grant, &verdict), &ctx.settings)
        else {
            continue;
        };
        if desired.expired(now) {
            continue;
        }
        let scope = Scope {
            namespace,
            approval: verdict.record().map(|record| record.name.clone()),
        };
        granting.push((created, scope, desired));
    }
    granting.sort_by(|a, b| (a.0, &a.2.grant).cmp(&(b.0, &b.2.grant)));
    let granting: Vec<(Scope, Desired)> = (granting.into_iter())
        .map(|(_, scope, desired)| (scope, desired))
        .collect();
    let members = observe::group_members(combination::groups_to_resolve(&granting), ctx).await?;
    let (granting, combined) = combination::apart(granting, &members);
    let limit = ctx.settings.max_documents_per_namespace;
    let (granting, over_limit) = documents::within_namespace_limit(granting, limit);
    let left_out = (combined.into_iter())
        .map(|(grant, why)| (grant, Withheld::CombinesWith(why)))
        .chain(
            (over_limit.into_iter()).map(|(grant, why)| (grant, Withheld::OverDocumentLimit(why))),
        )
        .collect();
    Ok(Granting {
        granting,
        left_out,
        members,
    })
}
