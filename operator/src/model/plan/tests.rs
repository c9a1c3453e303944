//! The pure diff: creation, new versions at IAM's limit, attachments, removal, ownership,
//! documents.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::aws::PrincipalKind;

const OWNER: &str = "ops/web";
const ARN: &str = "arn:aws:iam::123456789012:policy/fleet-access/fleet-access.ops.web";

fn doc(resource: &str) -> String {
    format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Sid":"S","Effect":"Allow","Action":"ssm:StartSession","Resource":"{resource}"}}]}}"#
    )
}

fn user(name: &str) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        name: name.into(),
    }
}

fn wanted(resource: &str, principals: &[&str]) -> WantedPolicy {
    WantedPolicy {
        name: "fleet-access.ops.web".into(),
        arn: ARN.into(),
        document: doc(resource),
        principals: principals.iter().map(|p| user(p)).collect(),
    }
}

fn observed(resource: &str, versions: u64, attached: &[&str]) -> ObservedPolicy {
    ObservedPolicy {
        arn: ARN.into(),
        owner: Some(OWNER.into()),
        document: doc(resource),
        versions: (1..=versions)
            .map(|n| PolicyVersion {
                id: format!("v{n}"),
                is_default: n == versions,
            })
            .collect(),
        attached: attached.iter().map(|p| user(p)).collect(),
    }
}

#[test]
fn a_missing_policy_is_created_then_attached() {
    let changes = policy_changes(OWNER, Some(&wanted("a", &["alice"])), None).expect("owned");
    assert_eq!(
        changes,
        vec![
            Change::CreatePolicy {
                name: "fleet-access.ops.web".into(),
                document: doc("a"),
            },
            Change::Attach {
                arn: ARN.into(),
                principal: user("alice"),
            },
        ]
    );
}

#[test]
fn an_equal_policy_needs_nothing_even_rewritten_by_aws() {
    let mut seen = observed("a", 1, &["alice"]);
    seen.document = percent_encoding::utf8_percent_encode(
        &seen
            .document
            .replace(r#""Resource":"a""#, r#""Resource":["a"]"#),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .to_string();
    assert_eq!(
        policy_changes(OWNER, Some(&wanted("a", &["alice"])), Some(&seen)),
        Ok(vec![])
    );
}

#[test]
fn a_changed_document_gets_a_new_version_and_the_oldest_goes_at_five() {
    let changes = policy_changes(
        OWNER,
        Some(&wanted("b", &["alice"])),
        Some(&observed("a", 2, &["alice"])),
    )
    .expect("owned");
    assert_eq!(
        changes,
        vec![Change::CreatePolicyVersion {
            arn: ARN.into(),
            document: doc("b"),
        }]
    );
    let mut full = observed("a", 5, &["alice"]);
    // The default is not the newest: the oldest non-default goes.
    full.versions[4].is_default = false;
    full.versions[0].is_default = true;
    let changes =
        policy_changes(OWNER, Some(&wanted("b", &["alice"])), Some(&full)).expect("owned");
    assert_eq!(
        changes[0],
        Change::DeletePolicyVersion {
            arn: ARN.into(),
            version: "v2".into(),
        }
    );
    assert_eq!(changes.len(), 2);
}

#[test]
fn attachments_follow_the_principals() {
    let changes = policy_changes(
        OWNER,
        Some(&wanted("a", &["alice", "bob"])),
        Some(&observed("a", 1, &["bob", "mallory"])),
    )
    .expect("owned");
    assert_eq!(
        changes,
        vec![
            Change::Attach {
                arn: ARN.into(),
                principal: user("alice"),
            },
            Change::Detach {
                arn: ARN.into(),
                principal: user("mallory"),
            },
        ]
    );
}

#[test]
fn removal_detaches_deletes_old_versions_then_the_policy() {
    let changes = policy_changes(OWNER, None, Some(&observed("a", 3, &["alice"]))).expect("owned");
    assert_eq!(
        changes,
        vec![
            Change::Detach {
                arn: ARN.into(),
                principal: user("alice"),
            },
            Change::DeletePolicyVersion {
                arn: ARN.into(),
                version: "v1".into(),
            },
            Change::DeletePolicyVersion {
                arn: ARN.into(),
                version: "v2".into(),
            },
            Change::DeletePolicy { arn: ARN.into() },
        ]
    );
}

#[test]
fn a_policy_without_the_grants_tag_is_never_touched() {
    let mut foreign = observed("x", 1, &[]);
    foreign.owner = None;
    assert!(policy_changes(OWNER, Some(&wanted("a", &["alice"])), Some(&foreign)).is_err());
    foreign.owner = Some("other/grant".into());
    assert_eq!(policy_changes(OWNER, None, Some(&foreign)), Ok(vec![]));
}

#[test]
fn documents_are_created_updated_and_deleted() {
    let wanted = vec![
        WantedDocument {
            name: "new".into(),
            content: r#"{"a":1}"#.into(),
        },
        WantedDocument {
            name: "same".into(),
            content: r#"{"a":1,"b":2}"#.into(),
        },
        WantedDocument {
            name: "changed".into(),
            content: r#"{"a":2}"#.into(),
        },
    ];
    let observed = BTreeMap::from([
        ("same".to_owned(), r#"{"b":2, "a":1}"#.to_owned()),
        ("changed".to_owned(), r#"{"a":1}"#.to_owned()),
        ("gone".to_owned(), r#"{}"#.to_owned()),
    ]);
    let changes = document_changes(&wanted, &observed, &BTreeSet::new()).expect("owned");
    assert_eq!(
        changes,
        vec![
            Change::CreateDocument {
                name: "new".into(),
                content: r#"{"a":1}"#.into(),
            },
            Change::UpdateDocument {
                name: "changed".into(),
                content: r#"{"a":2}"#.into(),
            },
            Change::DeleteDocument {
                name: "gone".into()
            },
        ]
    );
    let foreign = BTreeSet::from(["new".to_owned()]);
    assert!(document_changes(&wanted, &observed, &foreign).is_err());
}

#[test]
fn a_listing_finds_orphans_only_under_names_not_wanted_and_not_yet_deleted() {
    let wanted = vec![WantedDocument {
        name: "shell".into(),
        content: "{}".into(),
    }];
    let listed = ["shell", "port80", "port443", "port80"].map(str::to_owned);
    assert_eq!(
        orphan_documents(&wanted, &listed, &BTreeSet::new()),
        vec![
            Change::DeleteDocument {
                name: "port443".into()
            },
            Change::DeleteDocument {
                name: "port80".into()
            },
        ],
        "each orphan once, the wanted document kept"
    );
    let deleted = BTreeSet::from(["port443".to_owned(), "port80".to_owned()]);
    assert!(orphan_documents(&wanted, &listed, &deleted).is_empty());
    assert_eq!(
        orphan_documents(&[], &listed[..1], &BTreeSet::new()),
        vec![Change::DeleteDocument {
            name: "shell".into()
        }],
        "nothing wanted: everything listed goes"
    );
}

mod sessions_at_expiry {
    use super::*;
    use crate::aws::ActiveSession;

    const ACCOUNT: &str = "123456789012";

    fn session(id: &str, owner: &str, reason: Option<&str>) -> ActiveSession {
        ActiveSession {
            id: id.into(),
            target: "i-1".into(),
            owner: Some(owner.into()),
            document: Some("AWS-StartSSHSession".into()),
            reason: reason.map(str::to_owned),
        }
    }

    fn ended(changes: &[Change]) -> Vec<&str> {
        (changes.iter())
            .map(|c| match c {
                Change::TerminateSession { session, .. } => session.as_str(),
                other => panic!("not a termination: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn only_the_grants_principals_and_its_bridge_sessions_end() {
        let owners = SessionOwners {
            account: ACCOUNT.into(),
            grant: "ops/db".into(),
            users: BTreeSet::from(["alice".to_owned(), "member".to_owned()]),
            roles: BTreeSet::from(["ci".to_owned()]),
            bridge_role: Some("fleet-access-bridge".into()),
        };
        let user = |name: &str| format!("arn:aws:iam::{ACCOUNT}:user/{name}");
        let bridge = "arn:aws:sts::123456789012:assumed-role/fleet-access-bridge/b";
        let open = vec![
            (
                "i-1".to_owned(),
                vec![
                    session("alice-1", &user("alice"), None),
                    session("alice-path", &user("team/alice"), None),
                    session("member-1", &user("member"), None),
                    session(
                        "ci-1",
                        "arn:aws:sts::123456789012:assumed-role/ci/run-7",
                        None,
                    ),
                    session("bob-1", &user("bob"), None),
                    session(
                        "other-ci",
                        "arn:aws:sts::123456789012:assumed-role/cid/x",
                        None,
                    ),
                    session("foreign", "arn:aws:iam::999999999999:user/alice", None),
                    // The bridge: through this grant's endpoint alone; through an endpoint it
                    // shares with another grant that still serves the instance; for another
                    // grant (whatever document it used); without a reason.
                    session(
                        "bridge-own",
                        bridge,
                        Some("fa/1 for=tools/a sa=x grant=ops/db"),
                    ),
                    session(
                        "bridge-shared",
                        bridge,
                        Some("fa/2 for=tools/a grant=ops/db+1"),
                    ),
                    session(
                        "bridge-other",
                        bridge,
                        Some("fa/3 for=tools/a grant=team/db"),
                    ),
                    session(
                        "bridge-older",
                        bridge,
                        Some("fa/4 for=tools/a grant=ops/db-old"),
                    ),
                    session("bridge-unnamed", bridge, None),
                ],
            ),
            (
                "i-2".to_owned(),
                vec![
                    // A shared endpoint no grant serves any more.
                    session("bridge-unserved", bridge, Some("fa/5 grant=ops/db+2")),
                    session("bridge-other-unserved", bridge, Some("fa/6 grant=other/x")),
                ],
            ),
        ];
        let served = BTreeSet::from(["i-1".to_owned()]);
        assert_eq!(
            ended(&sessions_to_end(&open, &owners, &served)),
            vec![
                "alice-1",
                "alice-path",
                "member-1",
                "ci-1",
                "bridge-own",
                "bridge-unserved"
            ]
        );
    }

    #[test]
    fn a_session_without_an_owner_is_never_the_grants() {
        let owners = SessionOwners {
            account: ACCOUNT.into(),
            users: BTreeSet::from(["alice".to_owned()]),
            ..SessionOwners::default()
        };
        let open = vec![(
            "i-1".to_owned(),
            vec![ActiveSession {
                id: "s".into(),
                target: "i-1".into(),
                owner: None,
                document: None,
                reason: None,
            }],
        )];
        assert!(sessions_to_end(&open, &owners, &BTreeSet::new()).is_empty());
    }
}

#[test]
fn the_budget_counts_every_policy_but_this_clusters_own() {
    let policy = |name: &str| format!("arn:aws:iam::123456789012:policy{POLICY_PATH}{name}");
    let attached = vec![
        "arn:aws:iam::aws:policy/ReadOnlyAccess".to_owned(),
        "arn:aws:iam::123456789012:policy/team/admin".to_owned(),
        policy("fleet-access.other.user@alice"),
        policy("fleet-access.prod.user@alice"),
        policy("fleet-access.prod.user-2@alice"),
        policy("fleet-access.prod.ops.web"),
    ];
    // Three others (another cluster's set counts): seven left of ten.
    assert_eq!(policy_budget(&attached, "prod", 10), 7);
    assert_eq!(policy_budget(&attached, "prod", 2), 0);
    let alice = user("alice");
    let set: Vec<&String> = attached_set(&attached, "prod", &alice).collect();
    assert_eq!(set, [&attached[3], &attached[4]]);
    let bob = user("bob");
    assert_eq!(attached_set(&attached, "prod", &bob).count(), 0);
    // Another identity whose name extends alice's is not alice's.
    let other = vec![policy("fleet-access.prod.user@alice-2")];
    assert_eq!(attached_set(&other, "prod", &alice).count(), 0);
}
