//! Who is connected now: the account's active sessions, as one DescribeSessions listing gives
//! them, counted per grant. Pure: the controller's census passes the listing and each grant's
//! owners and instances.
//!
//! A session counts for a grant when one of its principals opened it on one of its instances,
//! or when the bridge's role opened it and its Reason names the grant first (`grant=<ns>/<name>`,
//! as `agent-bridge serve` writes it: a connection through an endpoint that several grants
//! share names the first of them). A person's session on an instance that two grants cover
//! counts for both: either would let it start.

use std::collections::BTreeSet;

use crate::{
    aws::ActiveSession,
    model::plan::{Owner, SessionOwners, named_grant, owner_of},
};

/// The instances a grant covers, as the census sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Covered {
    /// Every instance.
    All,
    /// These (resolved) instances.
    Instances(BTreeSet<String>),
}

/// The sessions open through one grant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// All of them.
    pub count: usize,
    /// The bridge's, for the grant's endpoints.
    pub through_bridge: usize,
}

/// Counts the sessions of `open` that are the grant's (`owners.grant`).
pub fn count(open: &[ActiveSession], owners: &SessionOwners, covered: &Covered) -> Counted {
    let mut counted = Counted::default();
    for session in open {
        let owner = (session.owner.as_deref()).and_then(|o| owner_of(o, &owners.account));
        let on_covered = match covered {
            Covered::All => true,
            Covered::Instances(instances) => instances.contains(&session.target),
        };
        let named = (session.reason.as_deref())
            .and_then(named_grant)
            .is_some_and(|n| n.key == owners.grant);
        let bridge = |role: &str| owners.bridge_role.as_deref() == Some(role);
        match owner {
            Some(Owner::Role(role)) if bridge(role) && named => {
                counted.count += 1;
                counted.through_bridge += 1;
            }
            Some(Owner::Role(role)) if bridge(role) => {}
            Some(Owner::Role(role)) if on_covered && owners.roles.contains(role) => {
                counted.count += 1
            }
            Some(Owner::User(user)) if on_covered && owners.users.contains(user) => {
                counted.count += 1
            }
            _ => {}
        }
    }
    counted
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "123456789012";

    fn session(target: &str, owner: &str, reason: Option<&str>) -> ActiveSession {
        ActiveSession {
            id: format!("{owner}@{target}"),
            target: target.into(),
            owner: Some(owner.into()),
            document: Some("AWS-StartSSHSession".into()),
            reason: reason.map(str::to_owned),
        }
    }

    fn owners() -> SessionOwners {
        SessionOwners {
            account: ACCOUNT.into(),
            grant: "team/db".into(),
            users: BTreeSet::from(["alice".to_owned()]),
            roles: BTreeSet::from(["ci".to_owned()]),
            bridge_role: Some("bridge".into()),
        }
    }

    #[test]
    fn principals_on_covered_instances_and_the_bridge_for_the_grant_count() {
        let user = |name: &str| format!("arn:aws:iam::{ACCOUNT}:user/{name}");
        let role = |name: &str| format!("arn:aws:sts::{ACCOUNT}:assumed-role/{name}/s");
        let open = [
            session("i-1", &user("alice"), None),
            session("i-1", &role("ci"), None),
            // Elsewhere, or someone else, or another account: not the grant's.
            session("i-9", &user("alice"), None),
            session("i-1", &user("mallory"), None),
            session("i-1", "arn:aws:iam::999999999999:user/alice", None),
            // The bridge: for this grant first, alone or shared; for another; without a reason.
            session(
                "i-1",
                &role("bridge"),
                Some("fa/abc for=tools/ansible-0 sa=ci grant=team/db"),
            ),
            session(
                "i-9",
                &role("bridge"),
                Some("fa/abc for=unresolved:10.0.0.9 grant=team/db+2"),
            ),
            session(
                "i-1",
                &role("bridge"),
                Some("fa/abc for=tools/x sa=y grant=team/db-old"),
            ),
            session(
                "i-1",
                &role("bridge"),
                Some("fa/abc for=tools/x sa=y grant=other/z+1"),
            ),
            session("i-1", &role("bridge"), None),
        ];
        let covered = Covered::Instances(BTreeSet::from(["i-1".to_owned()]));
        assert_eq!(
            count(&open, &owners(), &covered),
            Counted {
                count: 4,
                through_bridge: 2
            }
        );
        assert_eq!(count(&open, &owners(), &Covered::All).count, 5);
        assert_eq!(count(&[], &owners(), &covered), Counted::default());
    }
}
