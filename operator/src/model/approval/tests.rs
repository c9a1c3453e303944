use std::collections::BTreeMap;

use fleet_access_crds::{
    SessionAccess, SessionAccessApproval, SessionAccessPolicy, fixtures::GrantFixture,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::{Pending, Verdict, effective, judge, required_by};
use crate::model::boundary::Grant;

const UID: &str = "3f1c0b9e-uid";

fn at(text: &str) -> Timestamp {
    text.parse().expect("a time")
}

/// Grant `deploy` of team-a at `generation`: SSH for role ci until the evening, on the targets
/// each test gives it.
fn ssh_grant(generation: i64) -> GrantFixture {
    GrantFixture::new("team-a", "deploy")
        .uid(UID)
        .generation(generation)
        .roles(["ci"])
        .ssh()
        .expires_at("2026-12-06T20:00:00Z")
}

fn boundary(name: &str, approval: Value) -> SessionAccessPolicy {
    serde_json::from_value(json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessPolicy",
        "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "approval": approval},
    }))
    .expect("a boundary")
}

fn approval(
    name: &str,
    by: &str,
    generation: i64,
    created: &str,
    duration: Option<&str>,
) -> SessionAccessApproval {
    serde_json::from_value(json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessApproval",
        "metadata": {"name": name, "namespace": "team-a", "creationTimestamp": created},
        "spec": {"grant": {"name": "deploy", "uid": UID, "generation": generation},
                 "approvedBy": by, "duration": duration},
    }))
    .expect("an approval")
}

fn required(grant: &SessionAccess, boundaries: &[SessionAccessPolicy]) -> Vec<String> {
    let labels = BTreeMap::from([("team".to_owned(), "a".to_owned())]);
    let judged = Grant {
        spec: &grant.spec,
        namespace: "team-a",
        namespace_labels: &labels,
        created: None,
    };
    required_by(&judged, boundaries)
}

#[test]
fn boundaries_require_approval_of_allow_grants_that_may_reach_their_instances() {
    let always = boundary("always", json!({"always": true}));
    let prod = boundary("prod", json!({"instanceIds": ["i-0000000000000000c"]}));
    let none = boundary("none", json!({}));
    let listed = ssh_grant(1).instance_ids(["i-0000000000000000c"]).build();
    let other = ssh_grant(1).instance_ids(["i-0000000000000000a"]).build();
    let tagged = ssh_grant(1).tag("Environment", "staging").build();
    let everywhere = GrantFixture::new("team-a", "deploy")
        .uid(UID)
        .generation(1)
        .deny()
        .roles(["ci"])
        .all_instances()
        .ssh()
        .build();
    assert_eq!(required(&listed, &[prod.clone(), none.clone()]), ["prod"]);
    assert_eq!(
        required(&other, &[prod.clone(), none.clone()]),
        Vec::<String>::new()
    );
    // A tag can be put on the listed instance at any time.
    assert_eq!(required(&tagged, std::slice::from_ref(&prod)), ["prod"]);
    assert_eq!(
        required(&other, &[always.clone(), prod.clone()]),
        ["always"]
    );
    // A Deny only takes access away.
    assert_eq!(required(&everywhere, &[always, prod]), Vec::<String>::new());
    // A boundary that does not select the namespace requires nothing.
    let elsewhere: SessionAccessPolicy = serde_json::from_value(json!({
        "apiVersion": "fleetaccess.io/v1alpha1", "kind": "SessionAccessPolicy",
        "metadata": {"name": "b"},
        "spec": {"namespaceSelector": {"matchLabels": {"team": "b"}}, "approval": {"always": true}},
    }))
    .expect("a boundary");
    assert_eq!(required(&listed, &[elsewhere]), Vec::<String>::new());
}

#[test]
fn an_approval_by_someone_else_of_the_current_generation_puts_the_grant_in_force() {
    let now = at("2026-12-06T12:00:00Z");
    let g = (ssh_grant(2).instance_ids(["i-0000000000000000c"]))
        .requested_by("alice")
        .build();
    let approvals = [
        approval("old", "bob", 1, "2026-12-06T09:00:00Z", None),
        approval("by-bob", "bob", 2, "2026-12-06T10:00:00Z", Some("4h")),
    ];
    let verdict = judge(&g, vec!["prod".into()], &approvals, now);
    let Verdict::Approved { record, .. } = &verdict else {
        panic!("{verdict:?}")
    };
    assert_eq!(record.name, "by-bob");
    assert_eq!(record.approved_by, "bob");
    assert_eq!(record.requested_by, "alice");
    assert_eq!(record.approved_at.0, at("2026-12-06T10:00:00Z"));
    assert_eq!(verdict.until(), Some(at("2026-12-06T14:00:00Z")));
    assert!(verdict.allows());

    // The window ends when the approval does (IAM enforces it); a shorter window stays.
    let narrowed = effective(&g, &verdict);
    let ends = |g: &SessionAccess| g.spec.window.as_ref().and_then(|w| w.expires_at.clone());
    assert_eq!(
        ends(&narrowed).map(|t| t.0),
        Some(at("2026-12-06T14:00:00Z"))
    );
    let mut short = g.clone();
    short.spec.window.as_mut().expect("window").expires_at = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at("2026-12-06T13:00:00Z")),
    );
    assert_eq!(
        ends(&effective(&short, &verdict)).map(|t| t.0),
        Some(at("2026-12-06T13:00:00Z"))
    );

    // At its end, the grant waits again.
    let later = judge(
        &g,
        vec!["prod".into()],
        &approvals,
        at("2026-12-06T14:00:00Z"),
    );
    assert_eq!(
        later,
        Verdict::Pending {
            required_by: vec!["prod".into()],
            why: Pending::Lapsed {
                approval: "by-bob".into(),
                by: "bob".into(),
                at: at("2026-12-06T14:00:00Z"),
            }
        }
    );
}

#[test]
fn the_longest_approval_counts() {
    let now = at("2026-12-06T12:00:00Z");
    let g = ssh_grant(1).all_instances().requested_by("alice").build();
    let approvals = [
        approval("short", "bob", 1, "2026-12-06T11:00:00Z", Some("2h")),
        approval("open", "carol", 1, "2026-12-06T11:30:00Z", None),
    ];
    let verdict = judge(&g, vec!["always".into()], &approvals, now);
    assert_eq!(verdict.record().map(|r| r.name.as_str()), Some("open"));
    assert_eq!(verdict.until(), None);
}

#[test]
fn no_approval_counts_from_the_requester_another_generation_or_another_grant() {
    let now = at("2026-12-06T12:00:00Z");
    let g = ssh_grant(3).all_instances().requested_by("alice").build();
    let required = || vec!["always".to_owned()];
    let own = approval("own", "alice", 3, "2026-12-06T10:00:00Z", None);
    assert_eq!(
        judge(&g, required(), std::slice::from_ref(&own), now),
        Verdict::Pending {
            required_by: required(),
            why: Pending::SelfApproved {
                approval: "own".into(),
                by: "alice".into()
            }
        }
    );
    // An approver of another namespace approves nothing here.
    let mut elsewhere = approval("elsewhere", "bob", 3, "2026-12-06T10:00:00Z", None);
    elsewhere.metadata.namespace = Some("team-b".into());
    assert!(!judge(&g, required(), &[elsewhere], now).allows());
    let stale = approval("stale", "bob", 2, "2026-12-06T10:00:00Z", None);
    let mut recreated = approval("recreated", "bob", 3, "2026-12-06T10:00:00Z", None);
    recreated.spec.grant.uid = "another-uid".into();
    assert_eq!(
        judge(&g, required(), &[stale, recreated], now),
        Verdict::Pending {
            required_by: required(),
            why: Pending::Awaiting {
                requested_by: "alice".into(),
                generation: 3,
                uid: UID.into(),
                other_generations: vec![2],
            }
        }
    );
    // Without a requester no approval can be told from self-approval.
    let anonymous = ssh_grant(3).all_instances().build();
    let bobs = approval("bobs", "bob", 3, "2026-12-06T10:00:00Z", None);
    assert_eq!(
        judge(&anonymous, required(), std::slice::from_ref(&bobs), now),
        Verdict::Pending {
            required_by: required(),
            why: Pending::RequesterUnknown
        }
    );
    // Nothing required: in force whatever the approvals.
    assert_eq!(
        judge(&anonymous, Vec::new(), &[bobs], now),
        Verdict::NotRequired
    );
}
