//! Names of what the operator creates in AWS, derived from the grant's namespace and name so
//! that they are stable, unique per grant, and recognisable as the operator's own.
//!
//! IAM policy names allow `[A-Za-z0-9+=,.@_-]` up to 128 characters and SSM document names
//! `[A-Za-z0-9_.-]` from 3 to 128; Kubernetes names fit both alphabets but not always the
//! length, so long names are cut and end in a hash of the full name.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// Prefix of every IAM policy and SSM document the operator owns.
pub const NAME_PREFIX: &str = "fleet-access";

/// The IAM path of every policy the operator creates: a namespace in IAM that says who owns it.
pub const POLICY_PATH: &str = "/fleet-access/";

/// The key of the tag that marks an AWS object as owned by a grant; its value is
/// `<namespace>/<name>`.
pub const OWNER_TAG: &str = "fleetaccess.io/grant";

/// Longest name IAM and SSM both accept.
const MAX_NAME: usize = 128;

/// Characters of the hash that ends a shortened name.
const HASH_CHARS: usize = 10;

/// `fleet-access.<namespace>.<name><suffix>`, shortened with a hash when too long.
pub fn grant_object_name(namespace: &str, name: &str, suffix: &str) -> String {
    let full = format!("{NAME_PREFIX}.{namespace}.{name}{suffix}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = Sha256::digest(full.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let keep = MAX_NAME - suffix.len() - HASH_CHARS - 1;
    let head = &format!("{NAME_PREFIX}.{namespace}.{name}")[..keep];
    format!("{head}-{}{suffix}", &hex[..HASH_CHARS])
}

/// The ARN of the operator's managed policy `name` (under [`POLICY_PATH`]).
pub fn policy_arn(partition: &str, account: &str, name: &str) -> String {
    format!("arn:{partition}:iam::{account}:policy{POLICY_PATH}{name}")
}

/// An IAM resource pattern that matches the name of every grant's object ending in `suffix`
/// ([`grant_object_name`] keeps the suffix when it shortens a name).
pub fn any_grant_object_name(suffix: &str) -> String {
    format!("{NAME_PREFIX}.*{suffix}")
}

/// The owner tag's value for a grant.
pub fn owner_tag_value(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Whether an AWS object with these tags is the grant `owner`'s (its owner tag names the grant).
pub fn owned_by(tags: &BTreeMap<String, String>, owner: &str) -> bool {
    tags.get(OWNER_TAG).is_some_and(|value| value == owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_read_plainly() {
        assert_eq!(
            grant_object_name("ops", "web", "-1"),
            "fleet-access.ops.web-1"
        );
    }

    #[test]
    fn only_the_owner_tag_naming_the_grant_makes_it_the_grants() {
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(owned_by(&tags(&[(OWNER_TAG, "ops/web")]), "ops/web"));
        assert!(!owned_by(&tags(&[(OWNER_TAG, "ops/other")]), "ops/web"));
        assert!(!owned_by(&tags(&[("team", "ops/web")]), "ops/web"));
        assert!(!owned_by(&tags(&[]), "ops/web"));
    }

    #[test]
    fn long_names_are_cut_with_a_distinguishing_hash() {
        let long = "a".repeat(200);
        let a = grant_object_name("ops", &long, "-shell");
        let b = grant_object_name("ops", &format!("{long}b"), "-shell");
        assert_eq!(a.len(), MAX_NAME);
        assert!(a.ends_with("-shell"));
        assert_ne!(a, b);
    }
}
