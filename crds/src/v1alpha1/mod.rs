//! `fleetaccess.io/v1alpha1`: the `SessionAccess` grant (namespaced), the account-wide
//! `SessionPreferences` and the `SessionAccessPolicy` boundaries on grants (both
//! cluster-scoped, the latter in `boundary`), and the `SessionAccessApproval` of a grant that
//! needs one (namespaced, in `approval`).
//!
//! Every field's `///` comment becomes its `kubectl explain` text. Rules that span several fields
//! are CEL rules on the struct that owns those fields, each with a message that says what to fix.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::NetworkPolicyPeer,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::names::{
    BucketName, IamGroupName, IamRoleName, IamUserName, InstanceId, KmsKeyId, LogGroupName,
    OsUserName, Port, RemoteHostName, S3KeyPrefix, TAG_KEY_MESSAGE, TAG_KEY_RULE, TagValue,
};

mod approval;
mod boundary;

pub use approval::{
    ApprovalRequirement, ApprovalStatus, ApprovedGrant, REQUESTED_BY_ANNOTATION,
    SessionAccessApproval, SessionAccessApprovalSpec,
};
pub use boundary::{
    BridgeBounds, PrincipalPatterns, SessionAccessPolicy, SessionAccessPolicySpec, SessionBounds,
    ShellLoggingRequirement, TagValuePatterns, TargetBounds, WindowBounds,
};

/// The API group of every fleet-access resource.
pub const GROUP: &str = "fleetaccess.io";

// === SessionAccess ===

/// A grant of Session Manager access to EC2 instances: who may start which kinds of sessions on
/// which instances, when, with what logging, and whether in-cluster tools reach the instances
/// through the agent bridge.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetaccess.io",
    version = "v1alpha1",
    kind = "SessionAccess",
    plural = "sessionaccesses",
    singular = "sessionaccess",
    namespaced,
    status = "SessionAccessStatus",
    shortname = "sacc",
    shortname = "fasa",
    category = "fleet-access",
    derive = "PartialEq",
    printcolumn(name = "Effect", type_ = "string", json_path = ".spec.effect"),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        description = "Instances the grant resolved to",
        json_path = ".status.targetCount"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Approval",
        type_ = "string",
        description = "Approved, Pending, or NotRequired",
        json_path = ".status.conditions[?(@.type==\"Approved\")].reason"
    ),
    printcolumn(
        name = "Sessions",
        type_ = "integer",
        description = "Sessions open through the grant now",
        json_path = ".status.openSessions.count"
    ),
    printcolumn(name = "Expires", type_ = "date", json_path = ".spec.window.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.targets.allInstances) && self.targets.allInstances || (has(self.targets.instanceIds) && size(self.targets.instanceIds) > 0) || (has(self.targets.tags) && size(self.targets.tags) > 0)")
        .message("spec.targets must name at least one instance: list instanceIds, give tags, or set allInstances: true")
        .field_path(".targets"),
    validation = Rule::new("(has(self.principals) && ((has(self.principals.users) && size(self.principals.users) > 0) || (has(self.principals.roles) && size(self.principals.roles) > 0) || (has(self.principals.groups) && size(self.principals.groups) > 0))) || (has(self.bridge) && (!has(self.bridge.enabled) || self.bridge.enabled))")
        .message("spec.principals must name at least one IAM user, role or group, unless the grant only asks for bridge endpoints (spec.bridge)")
        .field_path(".principals"),
    validation = Rule::new("self.effect == 'Deny' || (has(self.sessions) && ((has(self.sessions.ssh) && self.sessions.ssh) || (has(self.sessions.shell) && self.sessions.shell) || (has(self.sessions.ports) && size(self.sessions.ports) > 0) || (has(self.sessions.remoteHosts) && size(self.sessions.remoteHosts) > 0)))")
        .message("an Allow grant must allow at least one kind of session: set spec.sessions.ssh, spec.sessions.shell, spec.sessions.ports or spec.sessions.remoteHosts")
        .field_path(".sessions"),
    validation = Rule::new("self.effect != 'Deny' || !has(self.bridge)")
        .message("spec.bridge is for Allow grants only: a Deny grant cannot open bridge endpoints")
        .field_path(".bridge"),
    validation = Rule::new("self.effect != 'Deny' || has(self.targets.allInstances) && self.targets.allInstances || !has(self.sessions)")
        .message("a Deny grant on chosen instances denies every session to them: remove spec.sessions, or set spec.targets.allInstances to deny only these kinds of session everywhere")
        .field_path(".sessions"),
    validation = Rule::new("self.effect != 'Deny' || !(has(self.targets.allInstances) && self.targets.allInstances) || (has(self.sessions) && ((has(self.sessions.ssh) && self.sessions.ssh) || (has(self.sessions.shell) && self.sessions.shell) || (has(self.sessions.ports) && size(self.sessions.ports) > 0)))")
        .message("a Deny grant on allInstances must name the kinds of session to deny in spec.sessions (ssh, shell or ports)")
        .field_path(".sessions"),
    validation = Rule::new("self.effect != 'Deny' || !has(self.sessions) || !has(self.sessions.ports) || size(self.sessions.ports) == 0")
        .message("a Deny grant cannot deny single ports (AWS's port forwarding documents accept any port): deny the instances instead, or allow only chosen ports with an Allow grant")
        .field_path(".sessions.ports"),
    validation = Rule::new("self.effect != 'Deny' || !has(self.sessions) || !has(self.sessions.remoteHosts) || size(self.sessions.remoteHosts) == 0")
        .message("a Deny grant cannot deny single remote hosts (AWS-StartPortForwardingSessionToRemoteHost accepts any host): deny the instances instead, or allow only chosen hosts with an Allow grant")
        .field_path(".sessions.remoteHosts"),
    validation = Rule::new("!(has(self.targets.allInstances) && self.targets.allInstances) || ((!has(self.targets.instanceIds) || size(self.targets.instanceIds) == 0) && (!has(self.targets.tags) || size(self.targets.tags) == 0))")
        .message("spec.targets.allInstances already covers every instance: remove instanceIds and tags")
        .field_path(".targets"),
    validation = Rule::new("!has(self.logging) || (has(self.sessions) && has(self.sessions.shell) && self.sessions.shell && self.effect == 'Allow')")
        .message("spec.logging applies to shell sessions only (AWS does not log SSH or port forwarding): set spec.sessions.shell: true or remove spec.logging")
        .field_path(".logging"),
    validation = Rule::new("!has(self.bridge) || !has(self.bridge.ports) || self.bridge.ports.all(p, (p == 22 && has(self.sessions) && has(self.sessions.ssh) && self.sessions.ssh) || (has(self.sessions) && has(self.sessions.ports) && p in self.sessions.ports))")
        .message("every spec.bridge.ports entry must be allowed by the grant: port 22 needs spec.sessions.ssh: true, any other port must be listed in spec.sessions.ports")
        .field_path(".bridge.ports"),
    validation = Rule::new("!has(self.bridge) || has(self.bridge.ports) || (has(self.bridge.remoteHosts) && size(self.bridge.remoteHosts) > 0) || (has(self.sessions) && has(self.sessions.ssh) && self.sessions.ssh)")
        .message("spec.bridge exposes port 22 unless it lists ports or remoteHosts, and port 22 needs spec.sessions.ssh: true: set spec.bridge.ports or spec.bridge.remoteHosts")
        .field_path(".bridge"),
    validation = Rule::new("!has(self.bridge) || !has(self.bridge.ports) || size(self.bridge.ports) > 0 || (has(self.bridge.remoteHosts) && size(self.bridge.remoteHosts) > 0)")
        .message("spec.bridge must expose something: list ports or remoteHosts, or remove spec.bridge")
        .field_path(".bridge.ports"),
    validation = Rule::new("!has(self.bridge) || !has(self.bridge.remoteHosts) || self.bridge.remoteHosts.all(r, has(self.sessions) && has(self.sessions.remoteHosts) && self.sessions.remoteHosts.exists(s, s.host == r.host && s.port == r.port))")
        .message("every spec.bridge.remoteHosts entry must be allowed by the grant: list the same host and port in spec.sessions.remoteHosts")
        .field_path(".bridge.remoteHosts"),
)]
pub struct SessionAccessSpec {
    /// Allow grants access; Deny takes it away, whatever other policies allow (an explicit IAM
    /// Deny always wins). Defaults to Allow.
    #[serde(default)]
    pub effect: Effect,

    /// The IAM identities the grant applies to. The operator attaches the grant's managed
    /// policies to each of them.
    #[serde(default, skip_serializing_if = "Principals::is_empty")]
    pub principals: Principals,

    /// The instances the grant covers. Instance IDs and tags are alternatives (either matches);
    /// several tags must all match.
    pub targets: Targets,

    /// The kinds of session allowed (or, for Deny on allInstances, denied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Sessions>,

    /// When the grant is in force. IAM enforces the window on every StartSession; at expiresAt
    /// the operator also revokes the policy and terminates the grant's open sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,

    /// Logging and limits for this grant's shell sessions, rendered into the grant's own
    /// Standard_Stream session document. AWS does not log SSH or port forwarding sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<SessionLogging>,

    /// In-cluster endpoints: one Service per instance, served by the agent bridge, reachable
    /// only from the listed clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<Bridge>,
}

/// Whether a grant allows or denies.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Effect {
    /// Grant access.
    #[default]
    Allow,
    /// Take access away, overriding any Allow.
    Deny,
}

/// IAM identities, by name, in the operator's account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Principals {
    /// IAM user names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub users: Vec<IamUserName>,

    /// IAM role names. Roles get the statements for federated identities (their own sessions
    /// are matched by the session tag AWS applies, not by user name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub roles: Vec<IamRoleName>,

    /// IAM group names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub groups: Vec<IamGroupName>,
}

impl Principals {
    /// No user, role or group named.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.roles.is_empty() && self.groups.is_empty()
    }
}

/// The instances a grant covers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    /// Instances by ID: EC2 instances (i-…) or managed on-premises nodes (mi-…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub instance_ids: Vec<InstanceId>,

    /// Instances by resource tag: an instance matches when it carries every listed tag. IAM
    /// checks them as ssm:resourceTag conditions; the operator resolves them to instances for
    /// the bridge. Values may use the IAM wildcards * and ?.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 10))]
    #[x_kube(validation = Rule::new(TAG_KEY_RULE).message(TAG_KEY_MESSAGE))]
    pub tags: BTreeMap<String, TagValue>,

    /// Every instance in the account and Region. Meant for Deny grants (deny SSH everywhere);
    /// cannot be combined with instanceIds or tags.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_instances: bool,
}

/// The kinds of session a grant allows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Sessions {
    /// SSH and SCP through the AWS-StartSSHSession document (needs SSM Agent 2.3.672.0 or later).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh: bool,

    /// Interactive shells through the grant's own Standard_Stream session document, which
    /// carries spec.logging.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shell: bool,

    /// Ports that may be forwarded. The operator generates one Port session document per port
    /// that pins the port number, so IAM restricts forwarding to exactly these ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<Port>,

    /// Hosts the instances may forward to (databases, caches, internal HTTP services they
    /// reach), each on one port: the model of AWS-StartPortForwardingSessionToRemoteHost, with
    /// the host and port pinned in a session document, so IAM restricts forwarding to exactly
    /// these destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "map"))]
    #[schemars(extend("x-kubernetes-list-map-keys" = ["host", "port"]))]
    pub remote_hosts: Vec<RemoteHost>,
}

/// A destination an instance forwards to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct RemoteHost {
    /// A DNS name or IP address the instance reaches.
    pub host: RemoteHostName,
    /// The port on that host.
    pub port: Port,
}

/// A time window, in RFC 3339 UTC.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.notBefore) || !has(self.expiresAt) || self.notBefore < self.expiresAt")
        .message("spec.window.notBefore must be before spec.window.expiresAt")
)]
pub struct Window {
    /// The grant is not in force before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,

    /// The grant ends at this time: IAM refuses new sessions and the operator revokes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// Session logging and limits, as in the Session Manager preferences.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionLogging {
    /// Send session output to CloudWatch Logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_watch: Option<CloudWatchLogging>,

    /// Upload session output to S3 when the session ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Logging>,

    /// Encrypt session data end to end with this KMS key. Principals then also get
    /// kms:GenerateDataKey on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<KmsKeyId>,

    /// End sessions idle for this many minutes (1 to 60; AWS's default is 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 60").message("must be from 1 to 60 minutes"))]
    pub idle_session_timeout_minutes: Option<u32>,

    /// End sessions after this many minutes whatever they do (1 to 1440).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1440").message("must be from 1 to 1440 minutes (24 hours)"))]
    pub max_session_duration_minutes: Option<u32>,

    /// Start Linux sessions as this OS user instead of ssm-user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<RunAs>,

    /// Commands run at the start of every session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_profile: Option<ShellProfile>,
}

/// CloudWatch Logs destination.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CloudWatchLogging {
    /// An existing log group.
    pub log_group_name: LogGroupName,
    /// Require the log group to be encrypted (sessions fail if it is not).
    #[serde(default)]
    pub encryption_enabled: bool,
    /// Stream session data continuously instead of uploading it when the session ends.
    #[serde(default)]
    pub streaming: bool,
}

/// S3 destination.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct S3Logging {
    /// An existing bucket.
    pub bucket_name: BucketName,
    /// A key prefix for the session logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<S3KeyPrefix>,
    /// Require the bucket to have default encryption (sessions fail if it has none).
    #[serde(default)]
    pub encryption_enabled: bool,
}

/// Run As support for Linux instances.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.defaultUser)").message("runAs.enabled needs runAs.defaultUser: the OS user sessions start as"))]
pub struct RunAs {
    /// Start sessions as defaultUser (it must exist on the instances).
    pub enabled: bool,
    /// The OS user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<OsUserName>,
}

/// Shell profile commands, per platform.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ShellProfile {
    /// Commands run at the start of a Linux session.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 4096))]
    pub linux: String,
    /// Commands run at the start of a Windows session.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 4096))]
    pub windows: String,
}

/// Bridge endpoints for in-cluster clients.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Bridge {
    /// Open the endpoints (default true). Set false to keep the spec but close them.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Ports on the instances to expose, each allowed by spec.sessions (22 through ssh).
    /// Defaults to [22] when remoteHosts is empty, and to none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Option<Vec<Port>>,

    /// Remote hosts to expose, each listed in spec.sessions.remoteHosts. Each (instance, host)
    /// gets its own Service, `<instance>-<host>-<hash>`, whose ports are the host's ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[schemars(extend("x-kubernetes-list-type" = "map"))]
    #[schemars(extend("x-kubernetes-list-map-keys" = ["host", "port"]))]
    pub remote_hosts: Vec<RemoteHost>,

    /// Who may connect, as NetworkPolicy peers (pod and namespace selectors). A podSelector
    /// without a namespaceSelector selects pods in the grant's own namespace. Empty means no
    /// in-cluster client may connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub clients: Vec<NetworkPolicyPeer>,
}

fn default_true() -> bool {
    true
}

impl Bridge {
    /// The instance ports exposed: those listed, or, when none are listed, 22 unless the grant
    /// exposes remote hosts.
    pub fn instance_ports(&self) -> Vec<Port> {
        match &self.ports {
            Some(ports) => ports.clone(),
            None if self.remote_hosts.is_empty() => vec![Port(22)],
            None => Vec::new(),
        }
    }
}

/// What the operator observed and did. Written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionAccessStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Admitted, Approved, PolicySynced, TargetsResolved, BridgeReady and Expired, each
    /// with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The approval the grant is in force by, when its boundary requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStatus>,

    /// The managed policies that carry the grant, with their default versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyStatus>,

    /// Principals the policies are attached to, as IAM ARNs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_principals: Vec<String>,

    /// How many instances the targets resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_count: Option<i32>,

    /// The resolved instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,

    /// How the grant's principals start each kind of session it allows: the session document
    /// its policy allows, and the commands (while the grant is in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect: Vec<ConnectStatus>,

    /// The sessions ended when the window or the approval ended: those the grant's
    /// principals had open on its instances, and the bridge's through the grant's endpoints.
    /// Done once per end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_ended: Option<SessionsEnded>,

    /// Who is connected now: the sessions open through the grant, as AWS lists them, counted
    /// at every census of the account's active sessions (`--sessions-census-seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_sessions: Option<OpenSessions>,
}

/// The sessions open through a grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OpenSessions {
    /// All of them: its principals' on its instances, and the bridge's for its endpoints.
    pub count: i32,
    /// Those the bridge opened for in-cluster clients of the grant's endpoints (its Reason
    /// names the grant first).
    pub through_bridge: i32,
    /// Since when the counts are these.
    pub since: Time,
}

/// How to start one kind of session a grant allows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectStatus {
    /// The session document to start.
    pub document: String,
    /// The remote host it forwards to, if not the instance itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port on the instance, or on the remote host (0 for a shell).
    pub port: i32,
    /// With fleet-access's `agent-bridge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_bridge: Option<String>,
    /// With the AWS CLI and the session-manager-plugin.
    pub aws_cli: String,
}

/// The sessions a grant's expiry ended.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionsEnded {
    /// When.
    pub at: Time,
    /// How many sessions were terminated.
    pub count: i32,
}

/// One managed policy of a grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The policy ARN.
    pub arn: String,
    /// The default version, such as v3.
    pub version_id: String,
}

/// One resolved instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The instance ID.
    pub instance_id: String,
    /// The agent's ping status: Online, ConnectionLost or Inactive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ping_status: Option<String>,
    /// The SSM Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Whether the agent can carry SSH (2.3.672.0 or later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_capable: Option<bool>,
    /// The bridge endpoint's DNS name, when the grant exposes ports of the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The bridge endpoints of the remote hosts the grant exposes through the instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_endpoints: Vec<RemoteEndpointStatus>,
}

/// The bridge endpoint of a remote host reached through one instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteEndpointStatus {
    /// The remote host.
    pub host: String,
    /// The endpoint's DNS name; its ports are the host's.
    pub endpoint: String,
}

// === SessionPreferences ===

/// The account's default Session Manager preferences (the SSM-SessionManagerRunShell document).
/// One per cluster, named `default`. Deleting it restores what the document held before.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetaccess.io",
    version = "v1alpha1",
    kind = "SessionPreferences",
    plural = "sessionpreferences",
    singular = "sessionpreferences",
    status = "SessionPreferencesStatus",
    shortname = "faprefs",
    category = "fleet-access",
    derive = "PartialEq",
    validation = Rule::new("self.metadata.name == 'default'").message("SessionPreferences is a singleton: name it default"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.documentVersion"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SessionPreferencesSpec {
    /// Logging and limits for every session that uses the account default document.
    #[serde(flatten)]
    pub logging: SessionLogging,
}

/// What the operator observed and did to the preferences document.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionPreferencesStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The default version of SSM-SessionManagerRunShell the operator wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_version: Option<String>,
    /// Whether the document existed before the operator took it over (it is restored on delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub had_previous_content: Option<bool>,
}
