//! The census of open sessions, for "who is connected now": every period, one DescribeSessions
//! listing of the account's active sessions, counted per grant (`model::census`), and written
//! to each grant's `status.openSessions` when its counts changed.
//!
//! It writes under its own field manager, and the reconcile never applies `openSessions`, so
//! neither takes the other's fields. One listing per period whatever the number of grants;
//! metrics carry no label per session.
//!
//! It reads the members of the grants' IAM groups to count their users' sessions; when a group
//! the grants were last judged with (`GrantingNow`, for the combination rule) has other members
//! now, it has the grants judged again, so that a user joining or leaving a group is seen within
//! a census period rather than at the next resync.

use std::{collections::BTreeSet, time::Duration};

use fleet_access_crds::{
    SessionAccess,
    v1alpha1::{Effect, OpenSessions},
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;

use crate::{
    Error, Result,
    aws::with_retry,
    controller::{Context, observe},
    model::{
        census::{self, Covered},
        naming,
        plan::SessionOwners,
    },
};

/// The default period of the census.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(30);

/// The census's field manager.
pub const FIELD_MANAGER: &str = "fleet-access-operator-census";

/// Counts once the grants are listed, then every `ctx.census_period`, the open sessions of
/// the grants in `store`.
pub async fn run(store: Store<SessionAccess>, ctx: &Context) {
    if store.wait_until_ready().await.is_err() {
        return; // The controller that feeds the store has stopped.
    }
    loop {
        match count_sessions(&store, ctx).await {
            Ok(0) => {}
            Ok(changed) => tracing::debug!(changed, "open sessions counted"),
            Err(error) => {
                tracing::warn!(%error, "cannot count open sessions; trying again at the next census")
            }
        }
        tokio::time::sleep(ctx.census_period).await;
    }
}

/// One census; returns how many grants' counts changed.
async fn count_sessions(store: &Store<SessionAccess>, ctx: &Context) -> Result<usize> {
    let grants = store.state();
    if grants.iter().all(|g| g.status.is_none()) {
        return Ok(0); // Nothing reconciled yet: no call.
    }
    let open = with_retry(|| ctx.ssm.active_sessions()).await?;
    // The grants whose sessions are counted: reconciled, live, Allow.
    let counted: Vec<_> = (grants.iter())
        .filter(|g| g.status.is_some() && g.metadata.deletion_timestamp.is_none())
        .filter(|g| g.spec.effect != Effect::Deny)
        .collect();
    let groups = (counted.iter())
        .flat_map(|g| g.spec.principals.groups.iter().map(|n| n.to_string()))
        .collect();
    let members = observe::group_members(groups, ctx).await?;
    // A group the grants were judged with has other members now: judge them again (the
    // shared sync wakes every grant it leaves out or lets in).
    let regrouped = ctx.granting.groups_changed(&members);
    let naming_one = (counted.iter())
        .find(|g| (g.spec.principals.groups.iter()).any(|n| regrouped.contains(n.as_str())));
    if let Some(grant) = naming_one {
        tracing::info!(groups = ?regrouped, "group members changed: judging the grants again");
        if let Err(error) = ctx.shared_documents.sync(&grant.object_ref(&()), ctx).await {
            tracing::warn!(%error, "cannot judge the grants again; trying at the next census");
        }
    }
    let mut changed = 0;
    for grant in counted {
        let Some(status) = grant.status.as_ref() else {
            continue;
        };
        let principals = &grant.spec.principals;
        let mut users: BTreeSet<String> = principals.users.iter().map(|u| u.to_string()).collect();
        for group in &principals.groups {
            users.extend(members.get(group.as_str()).into_iter().flatten().cloned());
        }
        let namespace = grant.namespace().unwrap_or_default();
        let owners = SessionOwners {
            account: ctx.account.clone(),
            grant: naming::grant_key(&namespace, &grant.name_any()),
            users,
            roles: principals.roles.iter().map(|r| r.to_string()).collect(),
            bridge_role: ctx.settings.bridge_role.clone(),
        };
        let covered = match grant.spec.targets.all_instances {
            true => Covered::All,
            false => Covered::Instances(
                (status.targets.iter())
                    .map(|t| t.instance_id.clone())
                    .collect(),
            ),
        };
        let counted = census::count(&open, &owners, &covered);
        let recorded = status.open_sessions.as_ref();
        let same = |r: &OpenSessions| {
            (r.count, r.through_bridge) == (to_i32(counted.count), to_i32(counted.through_bridge))
        };
        if recorded.map_or(counted.count == 0, same) {
            continue;
        }
        let patch = json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccess",
            "status": {"openSessions": OpenSessions {
                count: to_i32(counted.count),
                through_bridge: to_i32(counted.through_bridge),
                since: Time(Timestamp::now()),
            }},
        });
        Api::<SessionAccess>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(
                &grant.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(Error::Kube)?;
        changed += 1;
    }
    Ok(changed)
}

fn to_i32(count: usize) -> i32 {
    i32::try_from(count).unwrap_or(i32::MAX)
}
