//! Operator settings that shape the desired AWS state: where the grants apply (partition,
//! account, Region) and the agent bridge's identity and namespace.

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            partition: "aws".into(),
            account: None,
            region: None,
            bridge_role: Some("fleet-access-bridge".into()),
            bridge_namespace: "fleet-access".into(),
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
