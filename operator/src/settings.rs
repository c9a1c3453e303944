//! Operator settings that shape the desired AWS state: where the grants apply (partition,
//! account, Region) and the agent bridge's identity and namespace.

/// IAM's default quota of managed policies attached to one user, role or group (an account can
/// have it raised to 20).
pub const DEFAULT_MAX_POLICIES_PER_IDENTITY: u8 = 10;

/// The default of [`Settings::max_bridge_ports_per_namespace`]: of the bridge's 45,536 target
/// ports, enough for a namespace's hundreds of instances, and no tenant takes the range from
/// the others.
pub const DEFAULT_MAX_BRIDGE_PORTS_PER_NAMESPACE: u16 = 2_000;

/// The default of [`Settings::max_documents_per_namespace`]: an account holds at most 500
/// session documents of its own (SSM's quota, `DocumentLimitExceeded`), shared by every tenant
/// and whatever else the account runs; one namespace's grants hold at most a fifth of it, room
/// for a hundred grants' own shell documents, or as many ports and remote hosts.
pub const DEFAULT_MAX_DOCUMENTS_PER_NAMESPACE: u16 = 100;

/// The cluster name when none is set (the bridge's default too).
pub const DEFAULT_CLUSTER: &str = "default";

/// Whether `name` can name a cluster: 1 to 40 lowercase letters, digits and hyphens, starting
/// and ending with a letter or digit (it becomes part of IAM and SSM names).
pub fn valid_cluster_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (1..=40).contains(&bytes.len())
        && bytes.iter().all(inner)
        && edge(bytes.first())
        && edge(bytes.last())
}

/// Where and for whom the operator renders grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The AWS partition: `aws`, `aws-cn`, `aws-us-gov`.
    pub partition: String,
    /// The 12-digit account ID, or `None` to render `*` (any account) as the classic setup does.
    pub account: Option<String>,
    /// The Region, or `None` to render `*` (any Region).
    pub region: Option<String>,
    /// The IAM role the agent bridge runs as; grants with bridge endpoints give it permissions.
    pub bridge_role: Option<String>,
    /// The namespace the bridge runs in, where endpoint Services live.
    pub bridge_namespace: String,
    /// This cluster's name, in the names and owner tags of what the operator creates in AWS:
    /// operators of clusters that share an account must have different names, so that none
    /// adopts, changes or deletes another's objects.
    pub cluster: String,
    /// The account's quota of managed policies attached to one identity: a grant that would
    /// exceed it on any principal is refused before anything is written.
    pub max_policies_per_identity: usize,
    /// The most (Service, port) pairs the bridge grants of one namespace may hold together:
    /// each takes a target port on the bridge pods, from one range shared by every tenant.
    pub max_bridge_ports_per_namespace: usize,
    /// The most session documents the grants of one namespace may hold together (their own
    /// and the shared ones they use): the account's quota of documents is shared by every
    /// tenant. A grant that would go over grants nothing (`model::documents`).
    pub max_documents_per_namespace: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            partition: "aws".into(),
            account: None,
            region: None,
            bridge_role: Some("fleet-access-bridge".into()),
            bridge_namespace: "fleet-access".into(),
            cluster: DEFAULT_CLUSTER.into(),
            max_policies_per_identity: usize::from(DEFAULT_MAX_POLICIES_PER_IDENTITY),
            max_bridge_ports_per_namespace: usize::from(DEFAULT_MAX_BRIDGE_PORTS_PER_NAMESPACE),
            max_documents_per_namespace: usize::from(DEFAULT_MAX_DOCUMENTS_PER_NAMESPACE),
        }
    }
}

impl Settings {
    /// The account for ARNs: the configured one or `*`.
    pub fn account_or_any(&self) -> &str {
        self.account.as_deref().unwrap_or("*")
    }

    /// The Region for ARNs: the configured one or `*`.
    pub fn region_or_any(&self) -> &str {
        self.region.as_deref().unwrap_or("*")
    }
}
