//! Grants that name one principal, and what IAM makes of them together. IAM judges a
//! StartSession's instance and its session document apart, each against every statement of
//! the principal: a principal that one grant lets reach instance X with SSH, and another lets
//! reach instance Y with a shell, may open a shell on X. Within one namespace's boundaries that
//! stays inside them (a boundary bounds targets and sessions each on its own, so every pair the
//! two allow together is one it admits); across namespaces (other boundaries) or an approval
//! (a person approved one grant's sessions on its instances, not others'), it does not. So of
//! two grants in force that name a principal from different scopes ([`Scope`]), the later one
//! is left out when together they would allow a session on an instance that neither allows on
//! its own ([`apart`]). A user is named by a grant that names it, or a group it belongs to
//! ([`GroupMembers`], read from IAM for the groups [`groups_to_resolve`] lists).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    desired::{Desired, TargetSelection},
    policy::Effect,
};

/// Where a grant's sessions were admitted: its namespace (its boundaries), and the approval
/// that put it in force, if one did (each approval its own scope).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The grant's namespace.
    pub namespace: String,
    /// The name of the approval that put it in force.
    pub approval: Option<String>,
}

/// Why a grant is left out: an earlier grant of another scope reaches one of its principals,
/// and together they would allow more than each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CombinesWith {
    /// The earlier grant (owner tag value).
    pub grant: String,
    /// The principal both reach (`user/…`, `role/…`, `group/…`; `user/… (in group/…)` when
    /// one of them reaches it through a group).
    pub principal: String,
}

/// The user names in each IAM group a grant names, by group name.
pub type GroupMembers = BTreeMap<String, BTreeSet<String>>;

/// The groups whose members [`apart`] must know: those Allow grants name, when the Allow grants
/// come from more than one scope (else nothing can combine across scopes).
pub fn groups_to_resolve(granting: &[(Scope, Desired)]) -> BTreeSet<String> {
    let allow: Vec<&(Scope, Desired)> = (granting.iter())
        .filter(|(_, d)| d.effect == Effect::Allow)
        .collect();
    let one_scope = allow
        .iter()
        .all(|(scope, _)| Some(scope) == allow.first().map(|(s, _)| s));
    match one_scope {
        true => BTreeSet::new(),
        false => (allow.iter())
            .flat_map(|(_, d)| d.principals.groups.iter().cloned())
            .collect(),
    }
}

/// The groups of `judged` (the members the grants were last judged with) whose members `read`
/// (read since) tells otherwise: a user joined or left them, or they are gone. Groups `read` does
/// not hold are not known to have changed.
pub fn groups_changed(judged: &GroupMembers, read: &GroupMembers) -> BTreeSet<String> {
    (judged.iter())
        .filter(|(group, members)| read.get(*group).is_some_and(|now| now != *members))
        .map(|(group, _)| group.clone())
        .collect()
}

/// Of `granting` (in order of precedence, each with its scope), the grants that combine with no
/// earlier grant kept, and the rest with why (by owner tag value). A Deny grant never widens
/// and is always kept. `members` holds the members of [`groups_to_resolve`]'s groups.
///
/// Each grant is compared only with the kept Allow grants that reach one of its principals with
/// other documents (the same documents never widen), so a cluster whose grants all give one role
/// the same sessions compares nothing, whatever their scopes.
pub fn apart(
    granting: Vec<(Scope, Desired)>,
    members: &GroupMembers,
) -> (Vec<Desired>, BTreeMap<String, CombinesWith>) {
    struct Kept {
        scope: Scope,
        desired: Desired,
        reached: Reached,
    }
    let mut kept: Vec<Kept> = Vec::new();
    // Principal → documents → the kept Allow grants (indices into `kept`) that reach the
    // principal with exactly those documents.
    let mut reaching: BTreeMap<String, BTreeMap<Documents, Vec<usize>>> = BTreeMap::new();
    let mut left_out = BTreeMap::new();
    for (scope, desired) in granting {
        let reached = reached(&desired, members);
        let allow = desired.effect == Effect::Allow;
        let own = documents(&desired);
        // A Deny grant never widens: it is compared with nothing.
        let compared = if allow {
            reached.iter().collect()
        } else {
            Vec::new()
        };
        let clash = (compared.into_iter())
            .flat_map(|(principal, via)| {
                let by_documents = reaching.get(principal).into_iter().flatten();
                (by_documents.filter(|(documents, _)| **documents != own)).flat_map(
                    move |(documents, earlier)| {
                        earlier.iter().map(move |&i| (principal, via, documents, i))
                    },
                )
            })
            .find(|&(_, _, documents, i)| {
                let earlier = &kept[i];
                earlier.scope != scope
                    && widens(
                        (&own, &desired.targets),
                        (documents, &earlier.desired.targets),
                    )
            })
            .map(|(principal, via, _, i)| CombinesWith {
                grant: kept[i].desired.grant.clone(),
                principal: describe(
                    principal,
                    via.as_ref()
                        .or(kept[i].reached.get(principal).and_then(Option::as_ref)),
                ),
            });
        match clash {
            Some(why) => {
                left_out.insert(desired.grant.clone(), why);
            }
            None => {
                if allow {
                    for principal in reached.keys() {
                        (reaching.entry(principal.clone()).or_default())
                            .entry(own.clone())
                            .or_default()
                            .push(kept.len());
                    }
                }
                kept.push(Kept {
                    scope,
                    desired,
                    reached,
                });
            }
        }
    }
    (kept.into_iter().map(|k| k.desired).collect(), left_out)
}

/// The principals a grant reaches, as `kind/name`, each with the group it reaches it through
/// (`None`: named itself).
type Reached = BTreeMap<String, Option<String>>;

/// The principals `desired` names, and the members of the groups it names.
fn reached(desired: &Desired, members: &GroupMembers) -> Reached {
    let p = &desired.principals;
    let mut reached = Reached::new();
    for group in &p.groups {
        for user in members.get(group).into_iter().flatten() {
            reached.insert(format!("user/{user}"), Some(format!("group/{group}")));
        }
    }
    let named = (p.users.iter().map(|n| format!("user/{n}")))
        .chain(p.roles.iter().map(|n| format!("role/{n}")))
        .chain(p.groups.iter().map(|n| format!("group/{n}")));
    reached.extend(named.map(|principal| (principal, None)));
    reached
}

/// A principal two grants reach, as the status says it: `user/ivy (in group/oncall)` when
/// one of them reaches it through a group.
fn describe(principal: &str, via: Option<&String>) -> String {
    match via {
        Some(group) => format!("{principal} (in {group})"),
        None => principal.to_owned(),
    }
}

/// The session documents a grant allows its principals.
type Documents = BTreeSet<String>;

/// Whether grants `a` and `b` (each its documents and instances) together allow a session (a
/// document on an instance) that neither allows on its own: one's documents the other lacks, on
/// instances of the other that it does not surely cover.
fn widens(a: (&Documents, &TargetSelection), b: (&Documents, &TargetSelection)) -> bool {
    let ((docs_a, targets_a), (docs_b, targets_b)) = (a, b);
    let extra = |x: &Documents, y: &Documents| x.difference(y).next().is_some();
    (extra(docs_b, docs_a) && !covers(targets_b, targets_a))
        || (extra(docs_a, docs_b) && !covers(targets_a, targets_b))
}

/// The session documents `desired` allows its principals.
fn documents(desired: &Desired) -> Documents {
    (desired.connect.iter())
        .map(|c| c.document.clone())
        .collect()
}

/// Whether every instance `inner` covers is surely one `outer` covers: every instance; the same
/// selection; or listed IDs among its IDs, and tags that narrow its tags. Tag selections are
/// compared as written (whether two differently written tag selections meet depends on the
/// fleet's tags, which the operator does not judge here), so a difference counts as not covered.
fn covers(outer: &TargetSelection, inner: &TargetSelection) -> bool {
    if outer.all_instances || outer == inner {
        return true;
    }
    if inner.all_instances {
        return false;
    }
    let ids: BTreeSet<&String> = outer.instance_ids.iter().collect();
    let ids_covered = inner.instance_ids.iter().all(|id| ids.contains(id));
    let tags_covered = inner.tags.is_empty()
        || (!outer.tags.is_empty()
            && (outer.tags.iter()).all(|(key, value)| inner.tags.get(key) == Some(value)));
    ids_covered && tags_covered
}

#[cfg(test)]
mod tests {
    use fleet_access_crds::fixtures::GrantFixture;

    use super::*;
    use crate::{model::desired, settings::Settings};

    const A: &str = "i-0000000000000000a";
    const B: &str = "i-0000000000000000b";

    fn scoped(grant: GrantFixture, approval: Option<&str>) -> (Scope, Desired) {
        let grant = grant.build();
        let desired = desired::compute(&grant, &Settings::default()).expect("computes");
        let scope = Scope {
            namespace: grant.metadata.namespace.clone().unwrap_or_default(),
            approval: approval.map(str::to_owned),
        };
        (scope, desired)
    }

    /// The grants `apart` keeps, by name, and the ones it leaves out with the earlier grant.
    fn judged(granting: Vec<(Scope, Desired)>) -> (Vec<String>, Vec<(String, String)>) {
        let (kept, left_out) = apart(granting, &GroupMembers::new());
        let name = |owner: &str| owner.rsplit('/').next().unwrap_or_default().to_owned();
        (
            kept.iter().map(|d| name(&d.grant)).collect(),
            (left_out.iter())
                .map(|(grant, why)| (name(grant), name(&why.grant)))
                .collect(),
        )
    }

    #[test]
    fn an_approved_grant_does_not_combine_with_another_grant_of_its_principal() {
        let dev_shell = GrantFixture::new("team", "dev-shell")
            .users(["alice"])
            .instance_ids([A])
            .shell();
        let prod_ssh = GrantFixture::new("team", "prod-ssh")
            .users(["alice"])
            .instance_ids([B])
            .ssh();
        let (kept, left_out) = apart(
            vec![
                scoped(dev_shell.clone(), None),
                scoped(prod_ssh.clone(), Some("prod-ssh-approved")),
            ],
            &GroupMembers::new(),
        );
        assert_eq!(kept.len(), 1);
        let why = left_out.values().next().expect("one left out");
        assert_eq!(
            (
                left_out.keys().next().map(String::as_str),
                why.principal.as_str()
            ),
            (Some("default/team/prod-ssh"), "user/alice")
        );
        assert_eq!(why.grant, "default/team/dev-shell");
        // Without the approval, one namespace's boundaries admit every pair anyway.
        let same_scope = judged(vec![
            scoped(dev_shell.clone(), None),
            scoped(prod_ssh, None),
        ]);
        assert_eq!(same_scope.1, []);
        // Another principal: nothing combines.
        let bob = GrantFixture::new("team", "bob")
            .users(["bob"])
            .instance_ids([B])
            .ssh();
        assert_eq!(
            judged(vec![scoped(dev_shell, None), scoped(bob, Some("ok"))]).1,
            []
        );
    }

    #[test]
    fn a_user_is_reached_through_the_groups_it_belongs_to() {
        let oncall_prod = GrantFixture::new("prod", "oncall")
            .groups(["oncall"])
            .instance_ids([B])
            .ssh();
        let dev_shell = GrantFixture::new("dev", "dev-shell")
            .users(["ivy"])
            .instance_ids([A])
            .shell();
        let granting = vec![scoped(oncall_prod, None), scoped(dev_shell, None)];
        assert_eq!(
            groups_to_resolve(&granting),
            BTreeSet::from(["oncall".to_owned()])
        );
        let members = GroupMembers::from([(
            "oncall".to_owned(),
            BTreeSet::from(["ivy".to_owned(), "jo".to_owned()]),
        )]);
        let (_, left_out) = apart(granting.clone(), &members);
        let why = left_out.get("default/dev/dev-shell").expect("left out");
        assert_eq!(why.principal, "user/ivy (in group/oncall)");
        // Not a member: nothing combines.
        let others = GroupMembers::from([("oncall".to_owned(), BTreeSet::from(["jo".to_owned()]))]);
        assert_eq!(apart(granting.clone(), &others).1, BTreeMap::new());
        // One scope: no group needs resolving.
        let (_, same_scope) = granting.split_at(1);
        assert_eq!(groups_to_resolve(same_scope), BTreeSet::new());
    }

    #[test]
    fn grants_of_other_namespaces_combine_only_where_they_add_nothing() {
        let ssh_on = |namespace: &str, ids: &[&str]| {
            GrantFixture::new(namespace, &format!("{namespace}-ssh"))
                .roles(["deployer"])
                .instance_ids(ids.iter().copied())
                .ssh()
        };
        // The same sessions on other instances: nothing more together.
        let (_, left_out) = judged(vec![
            scoped(ssh_on("one", &[A]), None),
            scoped(ssh_on("two", &[B]), None),
        ]);
        assert_eq!(left_out, []);
        // More sessions on instances the other covers too.
        let shell_and_ssh_on_a = GrantFixture::new("two", "both")
            .roles(["deployer"])
            .instance_ids([A])
            .ssh()
            .shell();
        let (_, left_out) = judged(vec![
            scoped(ssh_on("one", &[A, B]), None),
            scoped(shell_and_ssh_on_a.clone(), None),
        ]);
        assert_eq!(
            left_out,
            [("both".to_owned(), "one-ssh".to_owned())],
            "a shell on B"
        );
        let (_, left_out) = judged(vec![
            scoped(ssh_on("one", &[A]), None),
            scoped(shell_and_ssh_on_a, None),
        ]);
        assert_eq!(left_out, [], "the other's instances are among its own");
        // A grant of every instance covers any; a Deny never widens.
        let everywhere = GrantFixture::new("one", "everywhere")
            .roles(["deployer"])
            .all_instances()
            .ssh()
            .shell();
        let deny = GrantFixture::new("two", "deny")
            .roles(["deployer"])
            .instance_ids([B])
            .deny();
        let (kept, left_out) = judged(vec![
            scoped(everywhere, None),
            scoped(ssh_on("two", &[B]), None),
            scoped(deny, None),
        ]);
        assert_eq!((kept.len(), left_out), (3, vec![]));
    }

    #[test]
    fn tag_selections_cover_only_what_they_surely_cover() {
        let by_tags = |tags: &[(&str, &str)]| TargetSelection {
            tags: (tags.iter())
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..TargetSelection::default()
        };
        let prod = by_tags(&[("env", "prod")]);
        let prod_web = by_tags(&[("env", "prod"), ("role", "web")]);
        assert!(covers(&prod, &prod_web), "more tags narrow");
        assert!(!covers(&prod_web, &prod));
        assert!(!covers(&prod, &by_tags(&[("env", "dev")])));
        let ids = |ids: &[&str]| TargetSelection {
            instance_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            ..TargetSelection::default()
        };
        assert!(covers(&ids(&[A, B]), &ids(&[A])));
        assert!(!covers(&ids(&[A]), &ids(&[A, B])));
        assert!(
            !covers(&prod, &ids(&[A])),
            "whether A is tagged is not judged here"
        );
        let everything = TargetSelection {
            all_instances: true,
            ..TargetSelection::default()
        };
        assert!(covers(&everything, &prod) && !covers(&prod, &everything));
    }

    #[test]
    fn a_group_judged_with_other_members_than_it_has_now_has_changed() {
        let members = |pairs: &[(&str, &[&str])]| -> GroupMembers {
            (pairs.iter())
                .map(|(group, users)| {
                    let users = users.iter().map(|u| u.to_string()).collect();
                    (group.to_string(), users)
                })
                .collect()
        };
        let judged = members(&[("oncall", &["ann"]), ("dba", &[]), ("ops", &["bo"])]);
        let read = members(&[("oncall", &["ann", "ivy"]), ("dba", &[]), ("ops", &[])]);
        let changed: Vec<String> = groups_changed(&judged, &read).into_iter().collect();
        assert_eq!(changed, ["oncall", "ops"], "joined, and left");
        assert!(groups_changed(&judged, &judged).is_empty());
        let unread = members(&[("oncall", &["ann"])]);
        assert!(
            groups_changed(&judged, &unread).is_empty(),
            "a group not read again is not known to have changed"
        );
        assert!(groups_changed(&GroupMembers::new(), &read).is_empty());
    }
}
