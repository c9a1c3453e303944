//! One bounded set of managed policies per IAM identity: the statements of every grant that
//! names a user, role or group (or that the bridge role serves), merged and packed into as few
//! policies as IAM's size quota allows, so that a thousand grants naming one role need a few
//! policies, not a thousand.
//!
//! Merging is exact: statements with the same effect, actions and conditions become one
//! statement with the union of their resources, which IAM evaluates the same way (a request
//! matches a statement when it matches one of its resources). An identity's set is named after
//! the identity (`fleet-access.<cluster>.<kind>@<name>`, `-2`, …) and tagged
//! [`IDENTITY_TAG`](naming::IDENTITY_TAG). When the set would exceed the identity's budget of
//! attached policies, the grants are taken in order and the longest run that fits is kept: the
//! rest are left out, and say so. The order takes turns between namespaces ([`in_turns`]): a
//! tenant that fills a shared identity (the bridge's role, above all) with grants leaves out
//! its own later grants, not another tenant's first.

pub mod pack;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    Result,
    aws::Principal,
    model::{
        desired::Desired,
        naming,
        policy::{Conditions, Effect, PolicyDocument, Statement},
    },
};

pub use pack::pack;

/// A customer managed policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedPolicy {
    /// The policy name (under [`naming::POLICY_PATH`]).
    pub name: String,
    /// The document.
    pub document: PolicyDocumentJson,
    /// Characters counted against IAM's 6,144 quota.
    pub size: usize,
}

/// A policy document that serializes as its JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDocumentJson(pub PolicyDocument);

impl Serialize for PolicyDocumentJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// What one grant asks of one identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution<'a> {
    /// The grant, `<cluster>/<namespace>/<name>`.
    pub grant: &'a str,
    /// Its statements for the identity.
    pub statements: &'a [Statement],
}

/// An identity's managed policies, and the grants left out of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySet {
    /// The policies, in order of their names.
    pub policies: Vec<ManagedPolicy>,
    /// The grants whose statements would not fit the identity's budget, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

/// The names of `identity`'s policies in `cluster`, by index suffix (`""`, `"-2"`, …).
pub fn policy_name(cluster: &str, identity: &Principal) -> impl Fn(&str) -> String {
    let (cluster, kind, name) = (
        cluster.to_owned(),
        identity.kind.as_str(),
        identity.name.clone(),
    );
    move |suffix| naming::identity_policy_name(&cluster, kind, &name, suffix)
}

/// The set of policies for `contributions` (in order of creation) within `budget` policies,
/// their namespaces taking turns.
pub fn policy_set(
    contributions: &[Contribution<'_>],
    budget: usize,
    name: &dyn Fn(&str) -> String,
) -> Result<PolicySet> {
    let contributions = in_turns(contributions.to_vec(), |c| naming::owner_namespace(c.grant));
    let packed = |n: usize| {
        let statements = merge(contributions[..n].iter().flat_map(|c| c.statements));
        pack(statements, name)
    };
    let all = packed(contributions.len())?;
    if all.len() <= budget {
        return Ok(PolicySet {
            policies: all,
            left_out: Vec::new(),
        });
    }
    // The longest run that fits: a run of grants needs no fewer policies than a shorter one.
    let (mut fits, mut too_many) = (0, contributions.len());
    while too_many - fits > 1 {
        let middle = (fits + too_many) / 2;
        match packed(middle)?.len() <= budget {
            true => fits = middle,
            false => too_many = middle,
        }
    }
    Ok(PolicySet {
        policies: packed(fits)?,
        left_out: (contributions[fits..].iter())
            .map(|c| c.grant.to_owned())
            .collect(),
    })
}

/// `items` (in order of creation) reordered to take turns between their owners (`owner` of an
/// item: its namespace): every owner's first item in order of creation, then every owner's
/// second, and so on. Whoever holds the most items is the first to lose them when not all fit,
/// and an owner's own items keep their order. Pure.
pub fn in_turns<T, K: Ord>(items: Vec<T>, owner: impl Fn(&T) -> K) -> Vec<T> {
    let mut seen: BTreeMap<K, usize> = BTreeMap::new();
    let mut turns: Vec<(usize, usize, T)> = (items.into_iter().enumerate())
        .map(|(created, item)| {
            let count = seen.entry(owner(&item)).or_default();
            *count += 1;
            (*count, created, item)
        })
        .collect();
    turns.sort_by_key(|(turn, created, _)| (*turn, *created));
    turns.into_iter().map(|(_, _, item)| item).collect()
}

/// Every identity's policy set for `grants`, taken in order of precedence, each within
/// `budget` policies.
pub fn policy_sets(
    grants: &[Desired],
    cluster: &str,
    budget: usize,
) -> Result<BTreeMap<Principal, PolicySet>> {
    let contributed: Vec<(&str, BTreeMap<Principal, Vec<Statement>>)> = (grants.iter())
        .map(|d| (d.grant.as_str(), d.contributions()))
        .collect();
    let identities: BTreeSet<&Principal> = contributed.iter().flat_map(|(_, c)| c.keys()).collect();
    let mut sets = BTreeMap::new();
    for identity in identities {
        let contributions: Vec<Contribution<'_>> = (contributed.iter())
            .filter_map(|(grant, by_identity)| {
                let statements = by_identity.get(identity)?;
                Some(Contribution { grant, statements })
            })
            .collect();
        let name = policy_name(cluster, identity);
        sets.insert(identity.clone(), policy_set(&contributions, budget, &name)?);
    }
    Ok(sets)
}

/// Merges statements that differ only in their resources, in a deterministic order (by effect,
/// actions and conditions); each keeps the first Sid of its kind, made unique with a number.
pub fn merge<'a>(statements: impl IntoIterator<Item = &'a Statement>) -> Vec<Statement> {
    type Key = (Effect, Vec<String>, Conditions);
    let mut merged: BTreeMap<Key, (String, BTreeSet<String>)> = BTreeMap::new();
    for statement in statements {
        let key = (
            statement.effect,
            statement.actions.clone(),
            statement.conditions.clone(),
        );
        let (sid, resources) = merged
            .entry(key)
            .or_insert_with(|| (statement.sid.clone(), BTreeSet::new()));
        if statement.sid < *sid {
            sid.clone_from(&statement.sid);
        }
        resources.extend(statement.resources.iter().cloned());
    }
    let mut sids: BTreeMap<String, usize> = BTreeMap::new();
    merged
        .into_iter()
        .map(|((effect, actions, conditions), (sid, resources))| {
            let seen = sids.entry(sid.clone()).or_insert(0);
            *seen += 1;
            let sid = match *seen {
                1 => sid,
                n => format!("{sid}{n}"),
            };
            Statement {
                sid,
                effect,
                actions,
                resources: resources.into_iter().collect(),
                conditions,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
