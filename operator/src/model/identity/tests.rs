//! Unit tests of merging and packing identities' policy sets.

use super::*;
use crate::{
    aws::PrincipalKind,
    model::policy::{MANAGED_POLICY_MAX_CHARS, counted_chars},
};

const START: &[&str] = &["ssm:StartSession"];

fn instance(i: usize) -> String {
    format!("arn:aws:ec2:eu-west-1:123456789012:instance/i-{i:017x}")
}

fn allow(sid: &str, resources: Vec<String>) -> Statement {
    Statement::new(sid, Effect::Allow, START, resources)
}

fn names(suffix: &str) -> String {
    format!("set{suffix}")
}

/// Grant `c/ns/g<i>` contributes `statements[i]`.
fn grant_names(count: usize) -> Vec<String> {
    (0..count).map(|g| format!("c/ns/g{g}")).collect()
}

fn contributions<'a>(
    grants: &'a [String],
    statements: &'a [Vec<Statement>],
) -> Vec<Contribution<'a>> {
    (grants.iter().zip(statements))
        .map(|(grant, statements)| Contribution { grant, statements })
        .collect()
}

#[test]
fn statements_differing_only_in_resources_merge_into_one() {
    let window = Statement::new("Windowed", Effect::Allow, START, vec![instance(3)])
        .with_condition(
            "DateLessThan",
            "aws:CurrentTime",
            vec!["2027-01-01T00:00:00Z".into()],
        );
    let deny = Statement::new("Deny", Effect::Deny, START, vec![instance(1)]);
    let merged = merge(&[
        allow("StartB", vec![instance(2), instance(1)]),
        window.clone(),
        allow("StartA", vec![instance(1)]),
        deny.clone(),
    ]);
    assert_eq!(merged.len(), 3, "{merged:#?}");
    let plain = &merged[0];
    assert_eq!(
        plain.sid, "StartA",
        "the first Sid of its kind, whatever the order"
    );
    assert_eq!(
        plain.resources,
        [instance(1), instance(2)],
        "deduplicated and sorted"
    );
    assert!(merged.contains(&Statement {
        sid: "Windowed".into(),
        ..window
    }));
    assert!(merged.contains(&deny));
}

#[test]
fn merged_sids_stay_unique() {
    let windowed = |until: &str| {
        allow("Start", vec![instance(1)]).with_condition(
            "DateLessThan",
            "aws:CurrentTime",
            vec![until.into()],
        )
    };
    let merged = merge(&[
        windowed("2027-01-01T00:00:00Z"),
        windowed("2028-01-01T00:00:00Z"),
        allow("Start", vec![instance(2)]),
    ]);
    let sids: BTreeSet<&str> = merged.iter().map(|s| s.sid.as_str()).collect();
    assert_eq!(sids.len(), 3, "{merged:#?}");
}

#[test]
fn a_thousand_grants_of_fifty_instances_take_one_policy() {
    let statements: Vec<Vec<Statement>> = (0..1000)
        .map(|g| vec![allow("StartSessionOnInstances", vec![instance(g % 50)])])
        .collect();
    let grants = grant_names(1000);
    let contributions = contributions(&grants, &statements);
    let set = policy_set(&contributions, 10, &names).expect("packs");
    assert_eq!(set.policies.len(), 1);
    assert!(set.left_out.is_empty());
    assert_eq!(set.policies[0].document.0.statements[0].resources.len(), 50);
}

#[test]
fn long_resource_lists_split_into_policies_under_the_size_quota() {
    let statement = allow("Start", (0..1000).map(instance).collect());
    let policies = pack(vec![statement], &names).expect("packs");
    assert!(policies.len() > 1);
    let mut seen = Vec::new();
    for policy in &policies {
        assert!(
            policy.size <= MANAGED_POLICY_MAX_CHARS,
            "{} is {}",
            policy.name,
            policy.size
        );
        assert_eq!(policy.size, counted_chars(&policy.document.0.to_json()));
        for s in &policy.document.0.statements {
            seen.extend(s.resources.iter().cloned());
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 1000, "every instance exactly once");
    let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names[..2], ["set", "set-2"]);
}

#[test]
fn no_policy_exceeds_the_size_quota_whatever_the_sid() {
    // The Sids of split statements (`<sid>Part<n>`) count too: every Sid length from 1 to 100
    // moves the split by one character, so that some split fills a policy to within a few
    // characters of the quota.
    let resources: Vec<String> = (0..300).map(instance).collect();
    for length in 1..100 {
        let sid = "S".repeat(length);
        for policy in pack(vec![allow(&sid, resources.clone())], &names).expect("packs") {
            let counted = counted_chars(&policy.document.0.to_json());
            assert!(
                counted <= MANAGED_POLICY_MAX_CHARS,
                "Sid of {length}: {counted}"
            );
            assert_eq!(policy.size, counted);
        }
    }
}

#[test]
fn grants_beyond_the_budget_are_left_out_from_the_first_that_does_not_fit() {
    // Each grant brings 60 instances of its own: about 4,000 characters, so two grants'
    // statements cannot share one policy.
    let statements: Vec<Vec<Statement>> = (0..5)
        .map(|g| {
            vec![allow(
                "Start",
                (g * 60..(g + 1) * 60).map(instance).collect(),
            )]
        })
        .collect();
    let grants = grant_names(5);
    let contributions = contributions(&grants, &statements);
    let all = policy_set(&contributions, 10, &names).expect("packs");
    assert!(all.left_out.is_empty());
    let needed = all.policies.len();
    assert!(needed >= 3, "{needed}");

    let set = policy_set(&contributions, 2, &names).expect("packs");
    assert!(set.policies.len() <= 2);
    assert!(!set.left_out.is_empty());
    let kept = 5 - set.left_out.len();
    assert_eq!(set.left_out, grants[kept..], "the latest grants wait");
    let resources: usize = (set.policies.iter())
        .flat_map(|p| p.document.0.statements.iter())
        .map(|s| s.resources.len())
        .sum();
    assert_eq!(resources, kept * 60, "the kept grants are whole");

    let none = policy_set(&contributions, 0, &names).expect("packs");
    assert!(none.policies.is_empty());
    assert_eq!(none.left_out, grants);
}

#[test]
fn namespaces_take_turns_and_each_keeps_its_order() {
    let created = ["c/a/1", "c/a/2", "c/a/3", "c/b/1", "c/c/1", "c/b/2"];
    let turns = in_turns(created.to_vec(), |g| naming::owner_namespace(g));
    assert_eq!(
        turns,
        ["c/a/1", "c/b/1", "c/c/1", "c/a/2", "c/b/2", "c/a/3"]
    );
    assert_eq!(naming::owner_namespace("c.with.dots/ns/name"), "ns");
    let one_namespace = in_turns(grant_names(4), |g| naming::owner_namespace(g).to_owned());
    assert_eq!(one_namespace, grant_names(4), "alone, creation order");
}

/// A tenant that fills a shared identity first (the bridge's role) loses its own latest grants
/// when another tenant's grant arrives, not the other tenant's.
#[test]
fn a_tenant_filling_a_shared_identity_leaves_out_its_own_grants_first() {
    // Each grant brings 60 instances of its own (about 4,000 characters): one policy each.
    let big = |g: usize| {
        vec![allow(
            "Start",
            (g * 60..(g + 1) * 60).map(instance).collect(),
        )]
    };
    let flood: Vec<String> = (0..4).map(|g| format!("c/flood/g{g}")).collect();
    let late = ["c/late/first".to_owned()];
    let grants: Vec<String> = flood.iter().chain(&late).cloned().collect();
    let statements: Vec<Vec<Statement>> = (0..grants.len()).map(big).collect();
    let contributions = contributions(&grants, &statements);
    let budget = policy_set(&contributions[..4], 10, &names)
        .expect("packs")
        .policies
        .len()
        - 1;
    assert!(budget >= 2, "{budget}");

    let set = policy_set(&contributions, budget, &names).expect("packs");
    assert!(set.policies.len() <= budget);
    assert!(
        !set.left_out.iter().any(|g| g.starts_with("c/late/")),
        "the late tenant's first grant is in: {:?}",
        set.left_out
    );
    assert!(!set.left_out.is_empty());
    let kept = flood.len() - set.left_out.len();
    assert_eq!(
        set.left_out,
        flood[kept..],
        "the flooding tenant's latest wait"
    );
    let documents: String = (set.policies.iter())
        .map(|p| p.document.0.to_json())
        .collect();
    assert!(
        documents.contains(&instance(4 * 60)),
        "the late grant's instances"
    );
}

#[test]
fn policy_names_follow_the_identity() {
    let ci = Principal::new(PrincipalKind::Role, "ci");
    let name = policy_name("prod", &ci);
    assert_eq!(name(""), "fleet-access.prod.role@ci");
    assert_eq!(name("-2"), "fleet-access.prod.role-2@ci");
}
