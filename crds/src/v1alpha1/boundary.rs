//! `SessionAccessPolicy`: the cluster-scoped boundary a cluster admin sets on what the
//! `SessionAccess` grants of the namespaces it selects may contain.
//!
//! A boundary is a constraint, not a permission: every boundary that selects a grant's
//! namespace must admit the grant, and a grant in a namespace that no boundary selects is
//! refused. Each section is closed by default: a boundary that says nothing of sessions admits
//! no Allow grant of any session, one without `bridge` admits no bridge endpoint.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{ApprovalRequirement, Effect};
use crate::names::{
    HostPattern, HoursMinutes, InstanceId, Pattern, Port, TAG_KEY_MESSAGE, TAG_KEY_RULE,
};

/// What the SessionAccess grants in the selected namespaces may contain. Owned by cluster
/// admins; a tenant who may create grants should not be able to change it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetaccess.io",
    version = "v1alpha1",
    kind = "SessionAccessPolicy",
    plural = "sessionaccesspolicies",
    singular = "sessionaccesspolicy",
    shortname = "fapol",
    category = "fleet-access",
    derive = "PartialEq",
    printcolumn(
        name = "Namespaces",
        type_ = "string",
        description = "The namespace selector",
        json_path = ".spec.namespaceSelector"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SessionAccessPolicySpec {
    /// The namespaces whose grants this policy bounds, by label (kubernetes.io/metadata.name
    /// selects by name). An empty selector ({}) selects every namespace.
    pub namespace_selector: LabelSelector,

    /// The IAM identities grants may name, per kind. None by default.
    #[serde(default)]
    pub principals: PrincipalPatterns,

    /// The instances grants may cover.
    #[serde(default)]
    pub targets: TargetBounds,

    /// The sessions Allow grants may allow. None by default.
    #[serde(default)]
    pub sessions: SessionBounds,

    /// Logging every Allow grant of shell sessions must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_logging: Option<ShellLoggingRequirement>,

    /// How long grants may last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowBounds>,

    /// Bridge endpoints, and who may connect to them. Without it, grants may not open any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeBounds>,

    /// Which grants need a second person's approval (a SessionAccessApproval) before they are
    /// in force. Without it, none do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRequirement>,
}

/// Names or name prefixes (`ci-*`) of IAM identities, per kind.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrincipalPatterns {
    /// IAM user names grants may name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub users: Vec<Pattern>,

    /// IAM role names grants may name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub roles: Vec<Pattern>,

    /// IAM group names grants may name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub groups: Vec<Pattern>,
}

/// The instances grants may cover.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetBounds {
    /// Instances grants may list by ID. A grant's instanceIds must all be here, unless its
    /// effect may target allInstances (then any instances are inside).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub instance_ids: Vec<InstanceId>,

    /// Tags a grant's tag targets must carry: each key listed here, with a value matching one
    /// of its patterns (the grant may add more tags, which only narrow it). Without it, grants
    /// may not target by tag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 10))]
    #[x_kube(validation = Rule::new(TAG_KEY_RULE).message(TAG_KEY_MESSAGE))]
    pub tags: BTreeMap<String, TagValuePatterns>,

    /// The effects a grant on allInstances may have; a grant of such an effect may target any
    /// instances. Defaults to [Deny]: a tenant may deny its own principals anywhere, and allow
    /// them only on the instances and tags listed here.
    #[serde(default = "deny_only")]
    #[schemars(length(max = 2))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub all_instances: Vec<Effect>,
}

impl Default for TargetBounds {
    fn default() -> Self {
        Self {
            instance_ids: Vec::new(),
            tags: BTreeMap::new(),
            all_instances: deny_only(),
        }
    }
}

fn deny_only() -> Vec<Effect> {
    vec![Effect::Deny]
}

/// The value patterns of one tag key: a grant's value must match one of them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct TagValuePatterns(pub Vec<Pattern>);

impl schemars::JsonSchema for TagValuePatterns {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TagValuePatterns".into()
    }

    fn inline_schema() -> bool {
        true
    }

    // Bounded, so that the API server's CEL cost estimate of the patterns' rule stays in budget.
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": generator.subschema_for::<Pattern>(),
        })
    }
}

/// The sessions Allow grants may allow.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionBounds {
    /// Whether grants may allow SSH.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh: bool,

    /// Whether grants may allow shells.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shell: bool,

    /// Ports grants may allow forwarding to (and expose through the bridge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<Port>,

    /// Grants may allow forwarding to any port (ports is then moot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_port: bool,

    /// Remote hosts grants may allow forwarding to through their instances, each with the
    /// ports allowed on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub remote_hosts: Vec<RemoteHostBound>,

    /// Grants may allow forwarding to any remote host and port (remoteHosts is then moot); the
    /// grant's own validation still refuses the instance itself and the metadata and
    /// credential endpoints.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_remote_host: bool,

    /// OS users (names or prefixes) shells may run as (spec.logging.runAs). Without it, grants
    /// may not use runAs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub run_as_users: Vec<Pattern>,
}

/// Destinations grants may forward to through their instances.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteHostBound {
    /// A host, or `*.` and a domain: every host in it.
    pub host: HostPattern,
    /// The ports allowed on those hosts.
    #[schemars(length(min = 1, max = 50))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<Port>,
}

/// Logging that every Allow grant of shell sessions must carry in spec.logging.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ShellLoggingRequirement {
    /// When set, shells must log to a CloudWatch log group matching one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub cloud_watch_log_groups: Vec<Pattern>,

    /// Shells must stream to CloudWatch (spec.logging.cloudWatch.streaming: true).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_streaming: bool,

    /// When set, shells must upload to an S3 bucket matching one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub s3_buckets: Vec<Pattern>,

    /// A shell grant's spec.logging.kmsKeyId (as the grant writes it: key ARN, key ID or
    /// alias) must match one of these: its principals are given kms:GenerateDataKey on that
    /// key. None (or no shellLogging): grants may name no key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub kms_keys: Vec<Pattern>,
}

/// How long grants may last.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WindowBounds {
    /// The longest window, from notBefore (or the grant's creation) to expiresAt, in hours
    /// and minutes (8h, 90m, 1h30m). Setting it requires expiresAt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<HoursMinutes>,

    /// Grants must set spec.window.expiresAt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_expires_at: bool,
}

impl WindowBounds {
    /// `max_duration` in seconds; `None` when unset (the schema admits only what parses).
    pub fn max_duration_seconds(&self) -> Option<i64> {
        self.max_duration.as_ref()?.seconds()
    }
}

/// Bridge endpoints grants may open.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BridgeBounds {
    /// Namespaces, besides the grant's own, whose pods grants may admit as bridge clients
    /// (names or prefixes). A client peer reaches another namespace only by name:
    /// namespaceSelector.matchLabels with the one label kubernetes.io/metadata.name. The one
    /// pattern * admits any namespaceSelector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub client_namespaces: Vec<Pattern>,

    /// Whether grants may admit clients by IP block (any address in the block, pod or not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_ip_blocks: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(max: &str) -> WindowBounds {
        WindowBounds {
            max_duration: Some(HoursMinutes::from(max)),
            require_expires_at: false,
        }
    }

    #[test]
    fn max_durations_parse_in_hours_and_minutes() {
        assert_eq!(window("8h").max_duration_seconds(), Some(8 * 3600));
        assert_eq!(window("90m").max_duration_seconds(), Some(90 * 60));
        assert_eq!(window("1h30m").max_duration_seconds(), Some(5400));
        assert_eq!(window("1d").max_duration_seconds(), None);
        assert_eq!(WindowBounds::default().max_duration_seconds(), None);
    }
}
