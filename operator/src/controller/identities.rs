//! Each IAM identity's policy set: brings the managed policies of one user, role or group to
//! what every live, admitted grant naming it asks (and, for the bridge role, every bridge
//! grant), as `model::identity` merges and packs them.
//!
//! ```text
//!  grant reconciles ─request─▶ Identities::sync(identity) ─┬─ LIST grants, boundaries, namespaces
//!   (many at once)  ◀─outcome─┘   one sync at a time       ├─ desired::compute + admit, per grant
//!                                 per identity, coalesced  ├─ ListAttached*Policies (the budget)
//!                                                          └─ plan ─▶ apply (create, update,
//!                                                              attach, then detach and delete)
//! ```
//!
//! A sync reads the grants afresh from the API server, after the requests it answers were made,
//! so it sees every change that caused them: requests that arrive while a sync runs share the
//! next one, and a thousand grants naming one role cost a handful of syncs, not a thousand.
//! A grant is judged here as its own reconcile judges it (same boundaries, same clock rules),
//! so a grant outside its boundary, waiting for approval, expired, invalid or being deleted
//! contributes nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use fleet_access_crds::{SessionAccess, v1alpha1::PolicyStatus};
use k8s_openapi::api::core::v1::ObjectReference;

use crate::{
    Error, Result,
    aws::{Principal, PrincipalKind, with_retry},
    controller::{Context, apply::Applier, coalesce::Coalesced, granting, observe},
    model::{
        desired::Desired,
        identity::{self, Contribution},
        naming::{self, OwnerTag},
        plan,
        policy::Statement,
    },
};

/// What one sync of an identity's set did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentitySynced {
    /// The set's policies with their default versions.
    pub policies: Vec<PolicyStatus>,
    /// The grants (owner tag values) left out of the set: it would exceed the budget.
    pub left_out: BTreeSet<String>,
    /// Policies attached to the identity that are not this cluster's.
    pub others: usize,
}

/// Every identity's syncs, one at a time per identity.
#[derive(Default)]
pub struct Identities {
    syncs: Coalesced<Principal, IdentitySynced>,
    /// The grants each identity's last sync left out.
    left_out: Mutex<HashMap<Principal, BTreeSet<String>>>,
}

impl Identities {
    /// Records what `identity`'s sync left out, and tells of the grants whose place changed.
    fn note_left_out(&self, identity: &Principal, now: &BTreeSet<String>, ctx: &Context) {
        let before = (self.left_out.lock().unwrap_or_else(|e| e.into_inner()))
            .insert(identity.clone(), now.clone())
            .unwrap_or_default();
        ctx.moved_grants.note(&before, now);
    }

    /// Brings `identity`'s set up to date with every grant as it is now, and returns what the
    /// sync did; `subject` is the grant its Events are about (none for the sweep: it logs).
    pub async fn sync(
        &self,
        identity: &Principal,
        subject: Option<&ObjectReference>,
        ctx: &Context,
    ) -> Result<Arc<IdentitySynced>> {
        let outcome = (self.syncs)
            .run(identity, || async {
                let synced = sync_now(identity, subject, ctx).await?;
                self.note_left_out(identity, &synced.left_out, ctx);
                Ok(synced)
            })
            .await;
        outcome.map_err(|source| Error::SharedSync {
            what: format!("the policy set of {identity}"),
            source,
        })
    }
}

/// One sync of `identity`'s set.
async fn sync_now(
    identity: &Principal,
    subject: Option<&ObjectReference>,
    ctx: &Context,
) -> Result<IdentitySynced> {
    let listed = ctx.granting.now(ctx).await?;
    let grants = contributions(&listed.granting.granting)
        .remove(identity)
        .unwrap_or_default();
    apply_set(identity, &grants, subject, ctx).await
}

/// Brings `identity`'s set in IAM to what `grants` (owner tag values with their statements,
/// in order of precedence) ask, within the identity's budget.
pub(crate) async fn apply_set(
    identity: &Principal,
    grants: &[(String, Vec<Statement>)],
    subject: Option<&ObjectReference>,
    ctx: &Context,
) -> Result<IdentitySynced> {
    let (cluster, limit) = (
        &ctx.settings.cluster,
        ctx.settings.max_policies_per_identity,
    );
    let contributions: Vec<Contribution<'_>> = (grants.iter())
        .map(|(grant, statements)| Contribution {
            grant: grant.as_str(),
            statements,
        })
        .collect();
    let attached = with_retry(|| ctx.iam.attached_policies(identity)).await?;
    let budget = plan::policy_budget(&attached, cluster, limit);
    let set = identity::policy_set(
        &contributions,
        budget,
        &identity::policy_name(cluster, identity),
    )?;
    let (partition, account) = (&ctx.settings.partition, &ctx.account);
    let wanted = plan::wanted_policies(identity, &set, partition, account);

    let owner_value = naming::identity_tag_value(cluster, identity.kind.as_str(), &identity.name);
    let owner = OwnerTag::identity(&owner_value);
    let applier = Applier::new(ctx, subject.cloned(), owner);
    let mut policies = Vec::new();
    for policy in &wanted {
        let observed = observe::policy(&policy.arn, owner, ctx).await?;
        let mut version = (observed.iter())
            .flat_map(|o| o.versions.iter())
            .find(|v| v.is_default)
            .map(|v| v.id.clone());
        for change in plan::policy_changes(owner.value, Some(policy), observed.as_ref())? {
            if let Some(made) = applier.apply(&change).await? {
                version = Some(made);
            }
        }
        policies.push(PolicyStatus {
            arn: policy.arn.clone(),
            version_id: version.unwrap_or_else(|| "v1".into()),
        });
    }
    // Then what the set no longer needs: policies of a larger set, or of no set at all.
    let wanted_arns: BTreeSet<&str> = wanted.iter().map(|p| p.arn.as_str()).collect();
    let stale: Vec<&String> = plan::attached_set(&attached, cluster, identity)
        .filter(|arn| !wanted_arns.contains(arn.as_str()))
        .collect();
    for arn in stale {
        let observed = observe::policy(arn, owner, ctx).await?;
        for change in plan::policy_changes(owner.value, None, observed.as_ref())? {
            applier.apply(&change).await?;
        }
    }
    Ok(IdentitySynced {
        policies,
        left_out: set.left_out.into_iter().collect(),
        others: limit.saturating_sub(budget),
    })
}

/// Each identity's contributing grants, in order of creation (then owner), with their
/// statements, from the grants that [grant](granting::granting).
fn contributions(granting: &[Desired]) -> BTreeMap<Principal, Vec<(String, Vec<Statement>)>> {
    let mut by_identity: BTreeMap<Principal, Vec<(String, Vec<Statement>)>> = BTreeMap::new();
    for desired in granting {
        for (identity, statements) in desired.contributions() {
            (by_identity.entry(identity).or_default()).push((desired.grant.clone(), statements));
        }
    }
    by_identity
}

/// The identities of this cluster that have a policy set in IAM, found among the policies
/// under the operator's path: by the policy's name, or by its identity tag when a hash
/// shortened the name.
pub async fn identities_with_sets(ctx: &Context) -> Result<BTreeSet<Principal>> {
    let cluster = &ctx.settings.cluster;
    let prefix = naming::cluster_prefix(cluster);
    let listed = with_retry(|| ctx.iam.list_policies(naming::POLICY_PATH)).await?;
    let mut with_sets = BTreeSet::new();
    let principal =
        |(kind, name): (&str, &str)| Some(Principal::new(PrincipalKind::parse(kind)?, name));
    for (name, arn) in &listed {
        if !name.starts_with(&prefix) || !naming::is_identity_policy_name(name) {
            continue;
        }
        // The name tells whose set it is, unless a hash shortened it: then the tag does.
        if let Some(identity) = naming::parse_identity_policy_name(cluster, name) {
            with_sets.extend(principal(identity));
            continue;
        }
        let Some(policy) = with_retry(|| ctx.iam.get_policy(arn)).await? else {
            continue;
        };
        let identity = (policy.tags.get(naming::IDENTITY_TAG))
            .and_then(|value| naming::parse_identity_tag_value(cluster, value))
            .and_then(principal);
        with_sets.extend(identity);
    }
    Ok(with_sets)
}

/// Removes the policy sets of identities (among `with_sets`) that none of `grants` names any
/// more, which no grant's reconcile would touch: a grant deleted while its finalizer was
/// stripped (anyone who may edit the grant can strip it), or while an earlier operator had
/// crashed between syncing identities and recording them. `grants` must be listed after
/// `with_sets`; each removal is a fresh sync, so a grant created since still keeps its set.
/// Returns the identities swept.
pub async fn sweep_orphans(
    with_sets: BTreeSet<Principal>,
    grants: &[SessionAccess],
    ctx: &Context,
) -> Result<Vec<Principal>> {
    let named = contributions(&granting::granting(grants, ctx).await?.granting);
    let orphans: Vec<Principal> = (with_sets.into_iter())
        .filter(|identity| !named.contains_key(identity))
        .collect();
    for identity in &orphans {
        tracing::info!(%identity, "no grant names this identity any more: removing its policy set");
        ctx.identities.sync(identity, None, ctx).await?;
    }
    Ok(orphans)
}
