//! Names of what the operator creates in AWS, derived from the cluster's name and the grant's
//! namespace and name so that they are stable, unique per grant and cluster (clusters share
//! accounts), and recognisable as the operator's own.
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
/// `<cluster>/<namespace>/<name>`.
pub const OWNER_TAG: &str = "fleetaccess.io/grant";

/// The key of the tag that marks a managed policy as part of one IAM identity's policy set in
/// one cluster; its value is `<cluster>/<kind>/<name>` ([`identity_tag_value`]).
pub const IDENTITY_TAG: &str = "fleetaccess.io/identity";

/// The key of the tag that marks a session document as shared by every grant of one cluster
/// (a Port document of one port); its value is the cluster's name.
pub const CLUSTER_TAG: &str = "fleetaccess.io/cluster";

/// An owner tag, key and value: what says an AWS object is a grant's or an identity set's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerTag<'a> {
    /// [`OWNER_TAG`], [`IDENTITY_TAG`] or [`CLUSTER_TAG`].
    pub key: &'static str,
    /// Whose it is.
    pub value: &'a str,
}

impl<'a> OwnerTag<'a> {
    /// The tag of grant `owner` ([`owner_tag_value`]).
    pub fn grant(owner: &'a str) -> Self {
        Self {
            key: OWNER_TAG,
            value: owner,
        }
    }

    /// The tag of an identity's policy set ([`identity_tag_value`]).
    pub fn identity(owner: &'a str) -> Self {
        Self {
            key: IDENTITY_TAG,
            value: owner,
        }
    }

    /// The tag of a document every grant of cluster `cluster` shares.
    pub fn cluster(cluster: &'a str) -> Self {
        Self {
            key: CLUSTER_TAG,
            value: cluster,
        }
    }

    /// Whether an AWS object with these tags carries this tag.
    pub fn owns(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(self.key).is_some_and(|value| value == self.value)
    }
}

/// Longest name IAM and SSM both accept.
const MAX_NAME: usize = 128;

/// Characters of the hash that ends a shortened name.
const HASH_CHARS: usize = 10;

/// What one grant's AWS objects are named after.
#[derive(Clone, Copy, Debug)]
pub struct GrantNames<'a> {
    /// The cluster's name.
    pub cluster: &'a str,
    /// The grant's namespace.
    pub namespace: &'a str,
    /// The grant's name.
    pub name: &'a str,
}

impl GrantNames<'_> {
    /// The name of the grant's object ending in `suffix` ([`grant_object_name`]).
    pub fn object(&self, suffix: &str) -> String {
        grant_object_name(self.cluster, self.namespace, self.name, suffix)
    }

    /// The owner tag's value ([`owner_tag_value`]).
    pub fn owner(&self) -> String {
        owner_tag_value(self.cluster, self.namespace, self.name)
    }
}

/// `fleet-access.<cluster>.<namespace>.<name><suffix>`, shortened with a hash when too long.
pub fn grant_object_name(cluster: &str, namespace: &str, name: &str, suffix: &str) -> String {
    fitted(
        &format!("{NAME_PREFIX}.{cluster}.{namespace}.{name}"),
        suffix,
    )
}

/// `fleet-access.<cluster>.<kind><index>@<name>`: the name of an identity's managed policy
/// (`kind` is `user`, `role` or `group`; `index` is `""`, `-2`, `-3`, …), shortened with a
/// hash when too long. The index comes before the name, which may end in anything an index
/// could (user `alice-2`). No grant's object can have it: Kubernetes namespaces have no `@`.
pub fn identity_policy_name(cluster: &str, kind: &str, name: &str, index: &str) -> String {
    fitted(&format!("{NAME_PREFIX}.{cluster}.{kind}{index}@{name}"), "")
}

/// The prefix of every name of this cluster's own policies, a grant's or an identity's.
pub fn cluster_prefix(cluster: &str) -> String {
    format!("{NAME_PREFIX}.{cluster}.")
}

/// Whether a policy name is one of an identity's sets (see [`identity_policy_name`]), not a
/// grant's own policy of an earlier release.
pub fn is_identity_policy_name(name: &str) -> bool {
    name.starts_with(NAME_PREFIX) && name.contains('@')
}

/// The identity tag's value for `kind`/`name` in `cluster`.
pub fn identity_tag_value(cluster: &str, kind: &str, name: &str) -> String {
    format!("{cluster}/{kind}/{name}")
}

/// The kind (`user`, `role`, `group`) and name of the identity whose set policy `name` belongs
/// to, read from the name: `None` when it is not one of `cluster`'s sets, or when it may have
/// been shortened with a hash (IAM's longest names), which only its tag then tells.
pub fn parse_identity_policy_name<'a>(cluster: &str, name: &'a str) -> Option<(&'a str, &'a str)> {
    if name.len() >= MAX_NAME {
        return None;
    }
    let rest = name.strip_prefix(&cluster_prefix(cluster))?;
    let (kind, identity) = rest.split_once('@')?;
    let kind = kind.split_once('-').map_or(kind, |(kind, _index)| kind);
    Some((kind, identity))
}

/// The kind and name an identity tag's value names in `cluster`, if it is one of its.
pub fn parse_identity_tag_value<'a>(cluster: &str, value: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = value.strip_prefix(cluster)?.strip_prefix('/')?;
    rest.split_once('/')
}

/// `head` + `suffix`, or when longer than IAM and SSM allow, `head` cut to fit with a hash of
/// the full name before the suffix (which is always kept).
fn fitted(head: &str, suffix: &str) -> String {
    let full = format!("{head}{suffix}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = Sha256::digest(full.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let keep = MAX_NAME - suffix.len() - HASH_CHARS - 1;
    let mut cut = keep;
    while !head.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{}{suffix}", &head[..cut], &hex[..HASH_CHARS])
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

/// The owner tag's value for a grant of `cluster`.
pub fn owner_tag_value(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{cluster}/{namespace}/{name}")
}

/// The namespace and name of the grant whose owner tag value is `value`
/// (`<cluster>/<namespace>/<name>`; neither a namespace nor a name holds a `/`).
pub fn owner_grant(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.rsplitn(3, '/');
    let (name, namespace, _cluster) = (parts.next()?, parts.next()?, parts.next()?);
    Some((namespace, name))
}

/// The namespace of the grant whose owner tag value is `value` (see [`owner_grant`]).
pub fn owner_namespace(value: &str) -> &str {
    owner_grant(value).map_or("", |(namespace, _)| namespace)
}

/// A grant's key inside its cluster, `<namespace>/<name>`: how the endpoint Services and
/// NetworkPolicies (in Kubernetes, where the cluster goes without saying) name their grants.
pub fn grant_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The namespace and name in a grant's key ([`grant_key`]; neither holds a `/`).
pub fn parse_grant_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_set_is_known_by_its_name_unless_a_hash_shortened_it() {
        for (kind, name, index) in [
            ("user", "alice-2", ""),
            ("role", "deploy", "-3"),
            ("group", "ops@x", ""),
        ] {
            let policy = identity_policy_name("prod", kind, name, index);
            assert_eq!(
                parse_identity_policy_name("prod", &policy),
                Some((kind, name)),
                "{policy}"
            );
            assert_eq!(
                parse_identity_policy_name("staging", &policy),
                None,
                "another cluster's"
            );
        }
        let long = identity_policy_name("prod", "role", &"r".repeat(120), "");
        assert_eq!(long.len(), MAX_NAME);
        assert_eq!(
            parse_identity_policy_name("prod", &long),
            None,
            "only its tag tells"
        );
        assert_eq!(
            parse_identity_tag_value("prod", "prod/role/deploy"),
            Some(("role", "deploy"))
        );
        assert_eq!(
            parse_identity_tag_value("prod", "production/role/deploy"),
            None
        );
    }

    #[test]
    fn short_names_read_plainly() {
        assert_eq!(
            grant_object_name("prod", "ops", "web", "-1"),
            "fleet-access.prod.ops.web-1"
        );
        assert_eq!(owner_tag_value("prod", "ops", "web"), "prod/ops/web");
        assert_eq!(grant_key("ops", "web"), "ops/web");
    }

    #[test]
    fn only_the_owner_tag_naming_the_grant_makes_it_the_grants() {
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mine = "prod/ops/web";
        let owned_by =
            |tags: &BTreeMap<String, String>, owner: &str| OwnerTag::grant(owner).owns(tags);
        assert!(owned_by(&tags(&[(OWNER_TAG, mine)]), mine));
        assert!(!owned_by(&tags(&[(OWNER_TAG, "prod/ops/other")]), mine));
        assert!(
            !owned_by(&tags(&[(OWNER_TAG, "staging/ops/web")]), mine),
            "another cluster's grant of the same name"
        );
        assert!(!owned_by(&tags(&[("team", mine)]), mine));
        assert!(!owned_by(&tags(&[]), mine));
    }

    #[test]
    fn identity_policies_are_named_apart_from_every_grant_object() {
        let name = identity_policy_name("prod", "role", "ansible", "-2");
        assert_eq!(name, "fleet-access.prod.role-2@ansible");
        assert_ne!(
            identity_policy_name("prod", "user", "alice", "-2"),
            identity_policy_name("prod", "user", "alice-2", "")
        );
        assert!(is_identity_policy_name(&name));
        assert!(!is_identity_policy_name(&grant_object_name(
            "prod", "role", "ansible", "-2"
        )));
        let long = identity_policy_name("prod", "user", &"u".repeat(128), "-20");
        assert!(long.len() <= MAX_NAME && is_identity_policy_name(&long));
        assert_ne!(
            long,
            identity_policy_name("prod", "user", &"u".repeat(128), "-19")
        );
    }

    #[test]
    fn long_names_are_cut_with_a_distinguishing_hash() {
        let long = "a".repeat(200);
        let a = grant_object_name("prod", "ops", &long, "-shell");
        let b = grant_object_name("prod", "ops", &format!("{long}b"), "-shell");
        assert_eq!(a.len(), MAX_NAME);
        assert!(a.ends_with("-shell"));
        assert_ne!(a, b);
    }
}
