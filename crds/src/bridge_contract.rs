//! The operator-bridge contract: how the operator describes a bridge endpoint on a `Service`
//! and how the bridge reads it back. Both crates use this module, so the keys and the format
//! live in one place.
//!
//! In the bridge namespace the operator writes one `Service` per instance:
//!
//! ```text
//! metadata:
//!   name: i-0123456789abcdef0                       # the instance ID (a valid DNS label)
//!   labels:
//!     app.kubernetes.io/managed-by: fleet-access-operator
//!   annotations:
//!     fleetaccess.io/instance-id: i-0123456789abcdef0
//!     fleetaccess.io/ports: '[{"port":22,"targetPort":20001,"document":"AWS-StartSSHSession","portParameter":22}]'
//! spec:
//!   selector: {app.kubernetes.io/name: agent-bridge}
//!   ports: [{name: p22, port: 22, targetPort: 20001}]
//! ```
//!
//! A remote host reached through an instance gets a Service of its own, named by
//! [`service_name`] (`<instance>-<host>-<hash>`), with a [`REMOTE_HOST_ANNOTATION`]: its ports
//! are the host's, and its documents pin host and port. So the instance's port 5432 and a
//! database's port 5432 behind it never meet in one Service.
//!
//! The bridge keeps exactly one listener per `targetPort` (target ports are unique across all
//! Services) and starts sessions to the instance with `document` (passing `portNumber =
//! portParameter` when set). Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Label on every endpoint Service (and NetworkPolicy) the operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "fleet-access-operator";

/// The label that selects the bridge pods; endpoint Services select on it.
pub const BRIDGE_POD_LABEL: &str = "app.kubernetes.io/name";

/// The value of [`BRIDGE_POD_LABEL`] on bridge pods.
pub const BRIDGE_POD_VALUE: &str = "agent-bridge";

/// Annotation with the instance the Service reaches.
pub const INSTANCE_ID_ANNOTATION: &str = "fleetaccess.io/instance-id";

/// Annotation with the exposed ports, as a JSON list of [`EndpointPort`].
pub const PORTS_ANNOTATION: &str = "fleetaccess.io/ports";

/// Annotation: grant (`namespace/name`) → the ports it exposes on this Service (a JSON object
/// of lists of [`EndpointPort`]): lets a grant withdraw its ports without reading the others,
/// and tells the bridge which grants a connection came through.
pub const GRANT_PORTS_ANNOTATION: &str = "fleetaccess.io/grant-ports";

/// Each grant's ports on one Service, by grant (`namespace/name`).
pub type GrantPorts = BTreeMap<String, Vec<EndpointPort>>;

/// The grants' ports recorded in a Service's annotations (empty when absent or unreadable).
pub fn grant_ports(annotations: &BTreeMap<String, String>) -> GrantPorts {
    (annotations.get(GRANT_PORTS_ANNOTATION))
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

/// Annotation on a grant's NetworkPolicy: the grant (`namespace/name`) it belongs to. The bridge
/// names, in each session's `Reason`, the grants whose policies admitted the connection.
pub const NETWORK_POLICY_GRANT_ANNOTATION: &str = "fleetaccess.io/grant";

/// Annotation with the remote host a Service's sessions forward to, on a remote host's Service.
pub const REMOTE_HOST_ANNOTATION: &str = "fleetaccess.io/remote-host";

/// The longest Service name (a DNS label).
const MAX_SERVICE_NAME: usize = 63;

/// The name of the Service for `instance`, or for `remote_host` reached through it: the instance
/// ID, or `<instance>-<host>-<hash>` with each run of the host's dots and colons as one `-`, cut to fit a DNS
/// label, and a hash of the whole host that keeps `db.example` and `db-example` apart (and every
/// host another tenant may choose: 64 bits of SHA-256).
pub fn service_name(instance: &str, remote_host: Option<&str>) -> String {
    let Some(host) = remote_host else {
        return instance.to_owned();
    };
    let mut label = String::new();
    for c in host.chars().map(|c| c.to_ascii_lowercase()) {
        match c {
            'a'..='z' | '0'..='9' => label.push(c),
            _ if !label.ends_with('-') => label.push('-'),
            _ => {}
        }
    }
    let hash = crate::ssm_documents::name_hash(host);
    let room = MAX_SERVICE_NAME - instance.len() - hash.len() - 2;
    let cut: String = label.chars().take(room).collect();
    let cut = cut.trim_matches('-');
    format!("{instance}-{cut}-{hash}")
}

/// One exposed port of an instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    /// The port on the instance (and the Service's port).
    pub port: u16,
    /// The port the bridge pods listen on for it (the Service's targetPort).
    pub target_port: u16,
    /// The SSM session document the bridge starts sessions with.
    pub document: String,
    /// The `portNumber` parameter to pass, for documents that do not pin the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_parameter: Option<u16>,
}

/// What an endpoint Service's annotations say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointAnnotations {
    /// The instance ID.
    pub instance_id: String,
    /// The remote host reached through the instance, on a remote host's Service.
    pub remote_host: Option<String>,
    /// The exposed ports, sorted by port.
    pub ports: Vec<EndpointPort>,
}

/// Annotations that do not describe an endpoint.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// A required annotation is absent.
    #[error("annotation {0} is missing")]
    Missing(&'static str),
    /// The ports annotation is not the expected JSON.
    #[error("annotation {PORTS_ANNOTATION} is not a JSON list of ports: {0}")]
    BadPorts(String),
    /// Two entries expose the same port or share a target port.
    #[error("annotation {PORTS_ANNOTATION} repeats port or targetPort {0}")]
    DuplicatePort(u16),
}

impl EndpointAnnotations {
    /// The annotations to put on the Service.
    pub fn render(&self) -> BTreeMap<String, String> {
        let mut ports = self.ports.clone();
        ports.sort();
        // A list of plain structs always serializes.
        let ports = serde_json::to_string(&ports).unwrap_or_default();
        let mut annotations = BTreeMap::from([
            (INSTANCE_ID_ANNOTATION.to_owned(), self.instance_id.clone()),
            (PORTS_ANNOTATION.to_owned(), ports),
        ]);
        if let Some(host) = &self.remote_host {
            annotations.insert(REMOTE_HOST_ANNOTATION.to_owned(), host.clone());
        }
        annotations
    }

    /// Reads the annotations of a Service; other annotations are ignored.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, ContractError> {
        let instance_id = annotations
            .get(INSTANCE_ID_ANNOTATION)
            .ok_or(ContractError::Missing(INSTANCE_ID_ANNOTATION))?
            .clone();
        let text = annotations
            .get(PORTS_ANNOTATION)
            .ok_or(ContractError::Missing(PORTS_ANNOTATION))?;
        let mut ports: Vec<EndpointPort> =
            serde_json::from_str(text).map_err(|e| ContractError::BadPorts(e.to_string()))?;
        ports.sort();
        let mut seen_ports = std::collections::BTreeSet::new();
        let mut seen_targets = std::collections::BTreeSet::new();
        for p in &ports {
            if !seen_ports.insert(p.port) {
                return Err(ContractError::DuplicatePort(p.port));
            }
            if !seen_targets.insert(p.target_port) {
                return Err(ContractError::DuplicatePort(p.target_port));
            }
        }
        Ok(Self {
            instance_id,
            remote_host: annotations.get(REMOTE_HOST_ANNOTATION).cloned(),
            ports,
        })
    }
}

/// The labels every managed endpoint Service carries.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned())])
}

/// The selector of endpoint Services: the bridge pods.
pub fn bridge_pod_selector() -> BTreeMap<String, String> {
    BTreeMap::from([(BRIDGE_POD_LABEL.to_owned(), BRIDGE_POD_VALUE.to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EndpointAnnotations {
        EndpointAnnotations {
            instance_id: "i-0123456789abcdef0".into(),
            remote_host: None,
            ports: vec![
                EndpointPort {
                    port: 5432,
                    target_port: 20002,
                    document: "fleet-access.ops.db-port5432".into(),
                    port_parameter: None,
                },
                EndpointPort {
                    port: 22,
                    target_port: 20001,
                    document: "AWS-StartSSHSession".into(),
                    port_parameter: Some(22),
                },
            ],
        }
    }

    #[test]
    fn render_then_parse_gives_back_the_endpoint_sorted_by_port() {
        let rendered = sample().render();
        assert_eq!(
            rendered[PORTS_ANNOTATION],
            r#"[{"port":22,"targetPort":20001,"document":"AWS-StartSSHSession","portParameter":22},{"port":5432,"targetPort":20002,"document":"fleet-access.ops.db-port5432"}]"#
        );
        let parsed = EndpointAnnotations::parse(&rendered).expect("parses");
        assert_eq!(parsed.instance_id, "i-0123456789abcdef0");
        assert_eq!(parsed.ports[0].port, 22);
        assert_eq!(parsed.ports[1].port_parameter, None);
    }

    #[test]
    fn a_remote_host_has_its_own_service_named_after_instance_and_host() {
        let instance = "i-0123456789abcdef0";
        assert_eq!(service_name(instance, None), instance);
        let db = service_name(instance, Some("db.internal.example"));
        assert!(
            db.starts_with("i-0123456789abcdef0-db-internal-example-"),
            "{db}"
        );
        // Hosts that read alike stay apart; every name is a DNS label.
        let other = service_name(instance, Some("db-internal.example"));
        assert_ne!(db, other);
        let long = "a".repeat(200) + ".example";
        for name in [
            db,
            other,
            service_name(instance, Some(&long)),
            service_name("mi-0123456789abcdef0", Some("fd12::1")),
        ] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
            assert!(!name.ends_with('-') && !name.contains("--"), "{name}");
        }
        let mut remote = sample();
        remote.remote_host = Some("db.internal.example".into());
        let parsed = EndpointAnnotations::parse(&remote.render()).expect("parses");
        assert_eq!(parsed.remote_host.as_deref(), Some("db.internal.example"));
    }

    #[test]
    fn parse_names_what_is_wrong() {
        let mut annotations = sample().render();
        annotations.remove(INSTANCE_ID_ANNOTATION);
        assert_eq!(
            EndpointAnnotations::parse(&annotations),
            Err(ContractError::Missing(INSTANCE_ID_ANNOTATION))
        );
        let mut annotations = sample().render();
        annotations.insert(PORTS_ANNOTATION.into(), "{".into());
        assert!(matches!(
            EndpointAnnotations::parse(&annotations),
            Err(ContractError::BadPorts(_))
        ));
        let mut annotations = sample().render();
        annotations.insert(
            PORTS_ANNOTATION.into(),
            r#"[{"port":22,"targetPort":1,"document":"d"},{"port":23,"targetPort":1,"document":"d"}]"#.into(),
        );
        assert_eq!(
            EndpointAnnotations::parse(&annotations),
            Err(ContractError::DuplicatePort(1))
        );
    }
}
