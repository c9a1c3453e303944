//! Bridge endpoints as Kubernetes objects, rendered purely: one `Service` per destination in the
//! bridge namespace (the contract in `fleet_access_crds::bridge_contract`): per instance, and per
//! remote host reached through an instance. Each merges the ports of every grant on that
//! destination. One `NetworkPolicy` per grant admits only the grant's clients to the grant's
//! target ports. No I/O.
//!
//! Which grant contributed which ports is recorded on the Service itself
//! ([`GRANT_PORTS_ANNOTATION`]), so a grant can withdraw its ports without reading the others.
//! [`endpoint_changes`] plans one grant's endpoints against what is observed: it keeps every
//! other grant's ports, reuses a (Service, port)'s target port and allocates new ones, never one
//! that a NetworkPolicy still admits someone to, and never merges two destinations into one
//! Service.

use std::collections::{BTreeMap, BTreeSet};

use fleet_access_crds::bridge_contract::{
    self, EndpointAnnotations, EndpointPort, bridge_pod_selector, managed_labels,
};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        networking::v1::{
            NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
            NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{ResourceExt, api::ObjectMeta};
use sha2::{Digest, Sha256};

use crate::model::{
    desired::{BridgePort, Desired},
    naming,
    plan::Change,
};

pub use bridge_contract::{GRANT_PORTS_ANNOTATION, GrantPorts};

/// The first target port handed out on the bridge pods; the range stays clear of the
/// bridge's own admin port and of well-known ports.
pub const FIRST_TARGET_PORT: u16 = 20_000;

/// The grants' ports recorded on a Service (empty when the annotation is absent or unreadable).
pub fn grant_ports(service: &Service) -> GrantPorts {
    (service.metadata.annotations.as_ref())
        .map(bridge_contract::grant_ports)
        .unwrap_or_default()
}

/// Where a Service's sessions go: an instance, or a remote host reached through it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Destination {
    /// The instance the sessions start on.
    pub instance: String,
    /// The remote host they forward to, if not the instance itself.
    pub remote_host: Option<String>,
}

impl Destination {
    /// The instance itself.
    pub fn instance(instance: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            remote_host: None,
        }
    }

    /// The name of its Service.
    pub fn service_name(&self) -> String {
        bridge_contract::service_name(&self.instance, self.remote_host.as_deref())
    }

    /// What an observed Service reaches, by its annotations; by its name (an instance ID) when
    /// they are unreadable.
    pub fn of_service(service: &Service) -> Self {
        Self::recorded(service).unwrap_or_else(|| Self::instance(&service.name_any()))
    }

    /// What an observed Service's annotations say it reaches, when they can be read.
    fn recorded(service: &Service) -> Option<Self> {
        let endpoint = (service.metadata.annotations.as_ref())
            .and_then(|a| EndpointAnnotations::parse(a).ok())?;
        Some(Self {
            instance: endpoint.instance_id,
            remote_host: endpoint.remote_host,
        })
    }
}

/// The Service for `destination` carrying the union of the grants' ports (the first grant, in
/// name order, decides a port's document; grants on one destination agree on it, since
/// documents are per destination and port).
pub fn render_service(namespace: &str, destination: &Destination, grants: &GrantPorts) -> Service {
    let mut ports: BTreeMap<u16, EndpointPort> = BTreeMap::new();
    for exposed in grants.values().flatten() {
        ports.entry(exposed.port).or_insert_with(|| exposed.clone());
    }
    let endpoint = EndpointAnnotations {
        instance_id: destination.instance.clone(),
        remote_host: destination.remote_host.clone(),
        ports: ports.values().cloned().collect(),
    };
    let mut annotations = endpoint.render();
    // Plain maps of plain structs always serialize.
    annotations.insert(
        GRANT_PORTS_ANNOTATION.to_owned(),
        serde_json::to_string(grants).unwrap_or_default(),
    );
    Service {
        metadata: ObjectMeta {
            name: Some(destination.service_name()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(bridge_pod_selector()),
            ports: Some(
                ports
                    .values()
                    .map(|p| ServicePort {
                        name: Some(format!("p{}", p.port)),
                        port: i32::from(p.port),
                        target_port: Some(IntOrString::Int(i32::from(p.target_port))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Whether an existing Service still says what `rendered` says: the same selector and ports,
/// and every label and annotation of the render with the same value (the API server's defaults
/// and other tools' additions aside). A Service edited behind the operator's back does not.
pub fn service_matches(existing: &Service, rendered: &Service) -> bool {
    let subset = |mine: &Option<BTreeMap<String, String>>,
                  theirs: &Option<BTreeMap<String, String>>| {
        mine.iter()
            .flatten()
            .all(|(k, v)| theirs.as_ref().and_then(|t| t.get(k)) == Some(v))
    };
    let ports = |service: &Service| -> Vec<(Option<String>, i32, Option<IntOrString>, String)> {
        service
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| {
                (
                    p.name.clone(),
                    p.port,
                    p.target_port.clone(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                )
            })
            .collect()
    };
    let selector = |service: &Service| service.spec.as_ref().and_then(|s| s.selector.clone());
    subset(&rendered.metadata.labels, &existing.metadata.labels)
        && subset(
            &rendered.metadata.annotations,
            &existing.metadata.annotations,
        )
        && selector(existing) == selector(rendered)
        && ports(existing) == ports(rendered)
}

/// What one grant wants on the bridge: ports per destination, and the clients its
/// NetworkPolicy admits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WantedEndpoints {
    /// Destination → the grant's ports on it.
    pub services: Vec<(Destination, Vec<BridgePort>)>,
    /// The peers admitted to the grant's target ports.
    pub clients: Vec<NetworkPolicyPeer>,
}

impl WantedEndpoints {
    /// The grant's endpoints: its ports on the instances it lists and on those its tags
    /// resolved to (`resolved`), and on the remote hosts behind each; none when it asks for no
    /// bridge or has expired.
    pub fn of(desired: &Desired, resolved: &[String], expired: bool) -> Self {
        let Some(bridge) = desired.bridge.as_ref().filter(|_| !expired) else {
            return Self::default();
        };
        let mut instances: BTreeSet<&String> = bridge.instances.iter().collect();
        if !bridge.tags.is_empty() {
            instances.extend(resolved);
        }
        let mut by_host: BTreeMap<Option<&String>, Vec<BridgePort>> = BTreeMap::new();
        for port in &bridge.ports {
            by_host
                .entry(port.host.as_ref())
                .or_default()
                .push(port.clone());
        }
        let services = instances
            .into_iter()
            .flat_map(|instance| {
                by_host.iter().map(|(host, ports)| {
                    let destination = Destination {
                        instance: instance.clone(),
                        remote_host: host.cloned(),
                    };
                    (destination, ports.clone())
                })
            })
            .collect();
        Self {
            services,
            clients: bridge.clients.clone(),
        }
    }
}

/// The endpoint objects observed in the bridge namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedEndpoints {
    /// Every Service the operator manages there, by name.
    pub services: BTreeMap<String, Service>,
    /// The grant's NetworkPolicy, when it exists.
    pub network_policy: Option<NetworkPolicy>,
    /// The target ports any grant's NetworkPolicy admits clients to. A port a Service no longer
    /// uses stays taken while one lists it: handed to another grant, it would admit the old
    /// grant's clients to the new one's destination (say its policy's update failed).
    pub admitted_ports: BTreeSet<u16>,
}

/// Why a grant's endpoints cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Every target port on the bridge pods is taken.
    #[error(
        "no free target port on the bridge pods (ports {FIRST_TARGET_PORT} to 65535 are all taken): remove unused grants' bridge ports"
    )]
    NoFreeTargetPort,
    /// The grants of one namespace would hold more bridge ports than one namespace may.
    #[error(
        "the bridge grants of namespace {namespace} would hold {ports} ports on the bridge, over the limit of {limit} per namespace (the operator's --max-bridge-ports-per-namespace): list fewer ports, remote hosts or instances in this namespace's bridge grants"
    )]
    NamespacePortLimit {
        /// The grant's namespace.
        namespace: String,
        /// The (Service, port) pairs its grants would hold with this change.
        ports: usize,
        /// What one namespace may hold.
        limit: usize,
    },
    /// The Service name of one of the grant's destinations is another destination's.
    #[error(
        "the bridge Service {service} already serves {theirs}, not {ours}: one name for two destinations is refused"
    )]
    ServiceNameTaken {
        /// The Service.
        service: String,
        /// What it serves.
        theirs: String,
        /// What the grant wants it to serve.
        ours: String,
    },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.remote_host {
            Some(host) => write!(f, "{host} through {}", self.instance),
            None => write!(f, "{}", self.instance),
        }
    }
}

/// The target ports a NetworkPolicy admits clients to.
pub fn admitted_ports(policy: &NetworkPolicy) -> impl Iterator<Item = u16> + '_ {
    (policy.spec.iter())
        .flat_map(|spec| spec.ingress.iter().flatten())
        .flat_map(|rule| rule.ports.iter().flatten())
        .filter_map(|p| match p.port {
            Some(IntOrString::Int(port)) => u16::try_from(port).ok(),
            _ => None,
        })
}

/// The changes that bring the bridge namespace to what grant `owner` (`<namespace>/<name>`)
/// wants, keeping every other grant's ports. A Service whose recorded ports do not change and
/// that still says what they say is left alone; one stripped of every grant's record is left
/// to its grants. Refused when the grants of the owner's namespace would hold more than
/// `namespace_limit` (Service, port) pairs, and more than they do now: one tenant cannot take
/// the target-port range (or the cluster's Services) from the others.
pub fn endpoint_changes(
    namespace: &str,
    owner: &str,
    wanted: &WantedEndpoints,
    observed: &ObservedEndpoints,
    namespace_limit: usize,
) -> Result<Vec<Change>, EndpointError> {
    let before: BTreeMap<&String, GrantPorts> = (observed.services.iter())
        .map(|(name, service)| (name, grant_ports(service)))
        .collect();
    let mut used: BTreeSet<u16> = (before.values())
        .flat_map(|g| g.values().flatten().map(|p| p.target_port))
        .chain(observed.admitted_ports.iter().copied())
        .collect();
    let mut after: BTreeMap<String, (Destination, GrantPorts)> = (observed.services.iter())
        .map(|(name, service)| {
            let mut others = before[name].clone();
            others.remove(owner);
            (name.clone(), (Destination::of_service(service), others))
        })
        .collect();
    let mut target_ports = BTreeSet::new();
    for (destination, ports) in &wanted.services {
        let name = destination.service_name();
        // A Service whose annotations were edited away says nothing: it is rendered again as
        // ours. One that says it serves another destination is not ours to take.
        let readable =
            (observed.services.get(&name)).is_none_or(|s| Destination::recorded(s).is_some());
        if let Some((theirs, _)) = after.get_mut(&name)
            && theirs != destination
        {
            if readable {
                return Err(EndpointError::ServiceNameTaken {
                    service: name,
                    theirs: theirs.to_string(),
                    ours: destination.to_string(),
                });
            }
            *theirs = destination.clone();
        }
        let previous = before.get(&name);
        let mut mine = Vec::new();
        for port in ports {
            // Reuse the target port this (Service, port) already has, from any grant.
            let reused = (previous.into_iter())
                .flat_map(|grants| grants.values().flatten())
                .find(|p| p.port == port.port)
                .map(|p| p.target_port);
            let target = match reused {
                Some(target) => target,
                None => {
                    let target =
                        allocate_target_port(&used).ok_or(EndpointError::NoFreeTargetPort)?;
                    used.insert(target);
                    target
                }
            };
            target_ports.insert(target);
            mine.push(EndpointPort {
                port: port.port,
                target_port: target,
                document: port.document.clone(),
                port_parameter: port.port_parameter,
            });
        }
        let (_, grants) = after
            .entry(name)
            .or_insert_with(|| (destination.clone(), GrantPorts::new()));
        grants.insert(owner.to_owned(), mine);
    }
    let tenant = naming::parse_grant_key(owner).map_or(owner, |(ns, _)| ns);
    let held_before = ports_of_namespace(before.iter().map(|(n, g)| (n.as_str(), g)), tenant);
    let held_after = ports_of_namespace(after.iter().map(|(n, (_, g))| (n.as_str(), g)), tenant);
    if held_after > namespace_limit && held_after > held_before {
        return Err(EndpointError::NamespacePortLimit {
            namespace: tenant.to_owned(),
            ports: held_after,
            limit: namespace_limit,
        });
    }
    // The grant's policy changes first: it admits its clients to a new target port before a
    // listener opens there (the bridge checks each connection against it), and a policy no
    // longer wanted stops admitting them even if a Service change then fails. A target port it
    // admitted to is not handed out again while a Service still holds it.
    let existing = observed.network_policy.as_ref();
    let mut changes = Vec::new();
    if wanted.services.is_empty() {
        changes.extend(existing.map(|existing| Change::DeleteNetworkPolicy {
            namespace: namespace.to_owned(),
            name: existing.name_any(),
        }));
    } else {
        let policy = render_network_policy(namespace, owner, &wanted.clients, &target_ports);
        if existing.and_then(|p| p.spec.as_ref()) != policy.spec.as_ref() {
            changes.push(Change::ApplyNetworkPolicy(Box::new(policy)));
        }
    }
    for (name, (destination, grants)) in &after {
        let rendered = render_service(namespace, destination, grants);
        let unchanged = before.get(name) == Some(grants)
            && (grants.is_empty()
                || (observed.services.get(name))
                    .is_some_and(|existing| service_matches(existing, &rendered)));
        if unchanged {
            continue;
        }
        changes.push(if grants.is_empty() {
            Change::DeleteService {
                namespace: namespace.to_owned(),
                name: name.clone(),
            }
        } else {
            Change::ApplyService(Box::new(rendered))
        });
    }
    Ok(changes)
}

/// How many (Service, port) pairs the grants of `namespace` hold on `services`.
fn ports_of_namespace<'a>(
    services: impl Iterator<Item = (&'a str, &'a GrantPorts)>,
    namespace: &str,
) -> usize {
    let of_namespace =
        |grant: &str| naming::parse_grant_key(grant).is_some_and(|(ns, _)| ns == namespace);
    let held: BTreeSet<(&str, u16)> = services
        .flat_map(|(name, grants)| {
            (grants.iter())
                .filter(|(grant, _)| of_namespace(grant))
                .flat_map(move |(_, ports)| ports.iter().map(move |p| (name, p.port)))
        })
        .collect();
    held.len()
}

/// The smallest target port from [`FIRST_TARGET_PORT`] not in `used`.
pub fn allocate_target_port(used: &BTreeSet<u16>) -> Option<u16> {
    (FIRST_TARGET_PORT..=u16::MAX).find(|p| !used.contains(p))
}

/// The name of a grant's NetworkPolicy: stable, a valid DNS label, unique per grant.
pub fn network_policy_name(grant: &str) -> String {
    let hash = Sha256::digest(grant.as_bytes());
    let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("fleet-access-{hex}")
}

/// The NetworkPolicy that admits only `clients` to the grant's target ports on the bridge pods.
pub fn render_network_policy(
    namespace: &str,
    grant: &str,
    clients: &[NetworkPolicyPeer],
    target_ports: &BTreeSet<u16>,
) -> NetworkPolicy {
    let mut annotations = BTreeMap::new();
    annotations.insert(
        bridge_contract::NETWORK_POLICY_GRANT_ANNOTATION.to_owned(),
        grant.to_owned(),
    );
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(grant)),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(bridge_pod_selector()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                // No clients: an empty `from` would admit everyone, so the rule then names no
                // ports at all and admits nothing.
                from: Some(clients.to_vec()),
                ports: (!clients.is_empty()).then(|| {
                    target_ports
                        .iter()
                        .map(|p| NetworkPolicyPort {
                            port: Some(IntOrString::Int(i32::from(*p))),
                            protocol: Some("TCP".into()),
                            ..NetworkPolicyPort::default()
                        })
                        .collect()
                }),
            }])
            .filter(|_| !clients.is_empty()),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The grants (namespace, name) whose ports a Service carries: the ones to reconcile when the
/// Service changes or disappears behind the operator's back.
pub fn grants_of_service(service: &Service) -> Vec<(String, String)> {
    grant_ports(service)
        .keys()
        .filter_map(|owner| split_owner(owner))
        .collect()
}

/// The grant (namespace, name) a NetworkPolicy belongs to.
pub fn grant_of_network_policy(policy: &NetworkPolicy) -> Option<(String, String)> {
    policy
        .metadata
        .annotations
        .as_ref()?
        .get(bridge_contract::NETWORK_POLICY_GRANT_ANNOTATION)
        .and_then(|owner| split_owner(owner))
}

fn split_owner(owner: &str) -> Option<(String, String)> {
    let (namespace, name) = naming::parse_grant_key(owner)?;
    (!namespace.is_empty() && !name.is_empty()).then(|| (namespace.to_owned(), name.to_owned()))
}

/// The contract's label selector for listing managed objects.
pub fn managed_selector() -> String {
    format!(
        "{}={}",
        bridge_contract::MANAGED_BY_LABEL,
        bridge_contract::MANAGED_BY_VALUE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: u16, target: u16) -> EndpointPort {
        EndpointPort {
            port,
            target_port: target,
            document: "AWS-StartSSHSession".into(),
            port_parameter: Some(port),
        }
    }

    #[test]
    fn a_service_merges_the_ports_of_every_grant_and_follows_the_contract() {
        let grants = GrantPorts::from([
            ("a/one".to_owned(), vec![port(22, 20000)]),
            ("b/two".to_owned(), vec![port(22, 20000), port(5432, 20001)]),
        ]);
        let service = render_service(
            "fleet-access",
            &Destination::instance("i-0123456789abcdef0"),
            &grants,
        );
        let annotations = service.metadata.annotations.clone().expect("annotations");
        let endpoint = EndpointAnnotations::parse(&annotations).expect("contract");
        assert_eq!(endpoint.ports.len(), 2);
        assert_eq!(grant_ports(&service), grants);
        let spec = service.spec.expect("spec");
        assert_eq!(spec.selector, Some(bridge_pod_selector()));
        assert_eq!(spec.ports.expect("ports").len(), 2);
    }

    #[test]
    fn target_ports_are_the_lowest_free() {
        assert_eq!(allocate_target_port(&BTreeSet::new()), Some(20000));
        assert_eq!(
            allocate_target_port(&BTreeSet::from([20000, 20002])),
            Some(20001)
        );
    }

    #[test]
    fn without_clients_the_policy_admits_nobody() {
        let policy = render_network_policy("ns", "a/one", &[], &BTreeSet::from([20000]));
        let spec = policy.spec.expect("spec");
        assert_eq!(spec.policy_types, Some(vec!["Ingress".into()]));
        assert_eq!(spec.ingress, None);
    }

    #[test]
    fn owned_objects_map_back_to_their_grants() {
        let grants = GrantPorts::from([
            ("a/one".to_owned(), vec![port(22, 20000)]),
            ("b/two".to_owned(), vec![port(22, 20000)]),
        ]);
        let service = render_service(
            "fleet-access",
            &Destination::instance("i-0123456789abcdef0"),
            &grants,
        );
        assert_eq!(
            grants_of_service(&service),
            vec![
                ("a".to_owned(), "one".to_owned()),
                ("b".to_owned(), "two".to_owned())
            ]
        );
        let mut edited = service.clone();
        assert!(service_matches(&edited, &service));
        if let Some(spec) = edited.spec.as_mut() {
            spec.selector = Some(BTreeMap::from([("app".to_owned(), "other".to_owned())]));
        }
        assert!(!service_matches(&edited, &service));
        let mut stripped = service.clone();
        stripped
            .metadata
            .annotations
            .as_mut()
            .map(|a| a.remove(GRANT_PORTS_ANNOTATION));
        assert!(!service_matches(&stripped, &service));
        assert_eq!(grants_of_service(&stripped), Vec::new());
        let policy = render_network_policy("ns", "a/one", &[], &BTreeSet::new());
        assert_eq!(
            grant_of_network_policy(&policy),
            Some(("a".to_owned(), "one".to_owned()))
        );
        assert_eq!(grants_of_service(&Service::default()), Vec::new());
    }

    #[test]
    fn a_namespaces_grants_hold_at_most_their_limit_of_bridge_ports_and_others_still_get_theirs() {
        // Namespace a holds 3 of its 4: Service I1 ports 22 and 80, I2 port 22.
        let first = endpoint_changes(
            "fa",
            "a/one",
            &wanted(&[I1], &[22, 80]),
            &Default::default(),
            4,
        )
        .expect("within the limit");
        let held = applied(ObservedEndpoints::default(), &first);
        let second = endpoint_changes("fa", "a/two", &wanted(&[I2], &[22]), &held, 4)
            .expect("within the limit");
        let held = applied(held, &second);
        // A port another grant of the namespace already holds on a Service counts once.
        endpoint_changes("fa", "a/three", &wanted(&[I1], &[22]), &held, 4).expect("shared");
        // Two more would make 5.
        let error = endpoint_changes("fa", "a/three", &wanted(&[I2], &[80, 443]), &held, 4)
            .expect_err("over the limit");
        assert_eq!(
            error,
            EndpointError::NamespacePortLimit {
                namespace: "a".into(),
                ports: 5,
                limit: 4
            }
        );
        assert!(error.to_string().contains("list fewer ports"), "{error}");
        // Another namespace has a limit of its own, on the same Services.
        endpoint_changes("fa", "b/one", &wanted(&[I1, I2], &[22, 80]), &held, 4)
            .expect("another namespace");
        // Over a lowered limit, a grant may still shrink or stay, never grow.
        endpoint_changes("fa", "a/one", &wanted(&[I1], &[22, 80]), &held, 1).expect("the same");
        endpoint_changes("fa", "a/one", &wanted(&[I1], &[22]), &held, 1).expect("smaller");
        endpoint_changes("fa", "a/one", &wanted(&[I1], &[22, 80, 443]), &held, 1)
            .expect_err("larger");
    }

    fn wanted(instances: &[&str], ports: &[u16]) -> WantedEndpoints {
        let ports: Vec<BridgePort> = (ports.iter())
            .map(|&port| BridgePort {
                host: None,
                port,
                document: "AWS-StartPortForwardingSession".into(),
                port_parameter: Some(port),
            })
            .collect();
        WantedEndpoints {
            services: (instances.iter())
                .map(|i| (Destination::instance(i), ports.clone()))
                .collect(),
            clients: Vec::new(),
        }
    }

    /// What the namespace holds after `changes`, starting from `observed`.
    fn applied(mut observed: ObservedEndpoints, changes: &[Change]) -> ObservedEndpoints {
        for change in changes {
            match change {
                Change::ApplyService(service) => {
                    observed
                        .services
                        .insert(service.name_any(), service.as_ref().clone());
                }
                Change::DeleteService { name, .. } => {
                    observed.services.remove(name);
                }
                Change::ApplyNetworkPolicy(policy) => {
                    observed.network_policy = Some(policy.as_ref().clone());
                }
                Change::DeleteNetworkPolicy { .. } => observed.network_policy = None,
                other => panic!("not an endpoint change: {other:?}"),
            }
        }
        observed
    }

    const I1: &str = "i-0123456789abcdef0";
    const I2: &str = "i-0123456789abcdef1";

    #[test]
    fn grants_share_an_instances_service_and_its_target_ports_and_withdraw_only_their_own() {
        let one = endpoint_changes(
            "fa",
            "a/one",
            &wanted(&[I1], &[22, 5432]),
            &Default::default(),
            usize::MAX,
        )
        .expect("planned");
        assert!(
            matches!(
                one.as_slice(),
                [Change::ApplyNetworkPolicy(_), Change::ApplyService(_)]
            ),
            "the grant's NetworkPolicy, before the Service a listener opens for: {one:?}"
        );
        let after_one = applied(ObservedEndpoints::default(), &one);
        let ports = grant_ports(&after_one.services[I1]);
        let targets: Vec<u16> = ports["a/one"].iter().map(|p| p.target_port).collect();
        assert_eq!(targets, vec![20000, 20001]);

        // A second grant on the same instance and another: port 22 keeps its target port.
        let other = ObservedEndpoints {
            network_policy: None,
            ..after_one.clone()
        };
        let two = endpoint_changes(
            "fa",
            "b/two",
            &wanted(&[I1, I2], &[22, 80]),
            &other,
            usize::MAX,
        )
        .expect("planned");
        let after_two = applied(other, &two);
        let on_i1 = grant_ports(&after_two.services[I1]);
        let two_on_i1: Vec<(u16, u16)> = on_i1["b/two"]
            .iter()
            .map(|p| (p.port, p.target_port))
            .collect();
        assert_eq!(two_on_i1, vec![(22, 20000), (80, 20002)]);
        assert_eq!(
            on_i1["a/one"], ports["a/one"],
            "the first grant's ports stay"
        );
        assert!(after_two.services.contains_key(I2));

        // Planning again against the result changes nothing.
        let steady = ObservedEndpoints {
            network_policy: after_two.network_policy.clone(),
            ..after_two.clone()
        };
        let again = endpoint_changes(
            "fa",
            "b/two",
            &wanted(&[I1, I2], &[22, 80]),
            &steady,
            usize::MAX,
        )
        .expect("planned");
        assert_eq!(again, Vec::new());

        // Withdrawing: I2 had only this grant (deleted), I1 keeps the first grant's ports.
        let gone = endpoint_changes(
            "fa",
            "b/two",
            &WantedEndpoints::default(),
            &steady,
            usize::MAX,
        )
        .expect("planned");
        assert!(
            matches!(gone.first(), Some(Change::DeleteNetworkPolicy { .. })),
            "the policy goes first: {gone:?}"
        );
        let after_gone = applied(steady, &gone);
        assert!(!after_gone.services.contains_key(I2));
        assert_eq!(grant_ports(&after_gone.services[I1]), ports);
        assert_eq!(after_gone.network_policy, None);
    }

    #[test]
    fn a_remote_host_gets_a_service_of_its_own_beside_its_instances() {
        let yaml = format!(
            "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionAccess\nmetadata: {{name: g, namespace: ns}}\nspec:
  targets: {{instanceIds: [{I1}, {I2}]}}
  sessions: {{ports: [5432], remoteHosts: [{{host: db.internal, port: 5432}}]}}
  bridge: {{ports: [5432], remoteHosts: [{{host: db.internal, port: 5432}}]}}
"
        );
        let grant = fleet_access_crds::validation::parse_session_accesses(&yaml)
            .expect("valid grant")
            .remove(0);
        let settings = crate::settings::Settings {
            bridge_role: Some("bridge".into()),
            ..Default::default()
        };
        let desired = crate::model::desired::compute(&grant, &settings).expect("computes");
        let wanted = WantedEndpoints::of(&desired, &[], false);
        assert_eq!(wanted.services.len(), 4, "{wanted:?}");
        let changes = endpoint_changes("fa", "a/one", &wanted, &Default::default(), usize::MAX)
            .expect("planned");
        let after = applied(ObservedEndpoints::default(), &changes);
        let db_service = bridge_contract::service_name(I1, Some("db.internal"));
        let (own, db) = (&after.services[I1], &after.services[&db_service]);
        let parse = |service: &Service| {
            EndpointAnnotations::parse(service.metadata.annotations.as_ref().expect("annotations"))
                .expect("contract")
        };
        let (own, db) = (parse(own), parse(db));
        assert_eq!((own.instance_id.as_str(), own.remote_host), (I1, None));
        assert_eq!(
            (db.instance_id.as_str(), db.remote_host.as_deref()),
            (I1, Some("db.internal"))
        );
        // Same port number, each its own document and target port.
        assert_eq!(
            (own.ports[0].port, own.ports[0].document.as_str()),
            (5432, "fleet-access.default.port5432")
        );
        assert_eq!(
            (db.ports[0].port, db.ports[0].document.as_str()),
            (5432, "fleet-access.default.to-db.internal-port5432")
        );
        assert_ne!(own.ports[0].target_port, db.ports[0].target_port);
        // Observed again, each Service says where it leads; planning again changes nothing.
        assert_eq!(
            Destination::of_service(&after.services[&db_service])
                .remote_host
                .as_deref(),
            Some("db.internal")
        );
        let again = endpoint_changes("fa", "a/one", &wanted, &after, usize::MAX).expect("planned");
        assert_eq!(again, Vec::new());
    }

    #[test]
    fn a_target_port_a_network_policy_still_admits_to_is_not_handed_out() {
        // Another grant's policy still lists 20000 and 20001 (its update failed after its
        // Services let the ports go): given to this grant, they would admit its clients here.
        let observed = ObservedEndpoints {
            admitted_ports: BTreeSet::from([20000, 20001]),
            ..ObservedEndpoints::default()
        };
        let changes = endpoint_changes("fa", "a/one", &wanted(&[I1], &[22]), &observed, usize::MAX)
            .expect("planned");
        let after = applied(observed, &changes);
        let targets: Vec<u16> = grant_ports(&after.services[I1])["a/one"]
            .iter()
            .map(|p| p.target_port)
            .collect();
        assert_eq!(targets, [20002]);
        // What a policy admits to is what the next plan keeps clear.
        let client = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        };
        let policy = render_network_policy("fa", "a/one", &[client], &BTreeSet::from([20002]));
        assert_eq!(admitted_ports(&policy).collect::<Vec<_>>(), [20002]);
    }

    #[test]
    fn one_service_name_for_two_destinations_is_refused() {
        let ours = Destination {
            instance: I1.into(),
            remote_host: Some("db.internal".into()),
        };
        let theirs = Destination {
            instance: I1.into(),
            remote_host: Some("db.other".into()),
        };
        // A Service that carries our destination's name but leads elsewhere (as a colliding
        // name would): our ports must not join it.
        let mut grants = GrantPorts::new();
        grants.insert("z/theirs".into(), vec![port(5432, 20000)]);
        let mut service = render_service("fa", &theirs, &grants);
        service.metadata.name = Some(ours.service_name());
        let observed = ObservedEndpoints {
            services: BTreeMap::from([(ours.service_name(), service)]),
            ..ObservedEndpoints::default()
        };
        let wanted = WantedEndpoints {
            services: vec![(ours.clone(), vec![])],
            clients: Vec::new(),
        };
        let error =
            endpoint_changes("fa", "a/one", &wanted, &observed, usize::MAX).expect_err("refused");
        assert_eq!(
            error.to_string(),
            format!(
                "the bridge Service {} already serves db.other through {I1}, not db.internal through {I1}: one name for two destinations is refused",
                ours.service_name()
            )
        );
        // One whose annotations were edited away says nothing: it is rendered again as ours.
        let mut stripped = observed.clone();
        if let Some(service) = stripped.services.values_mut().next() {
            service.metadata.annotations = None;
        }
        let changes =
            endpoint_changes("fa", "a/one", &wanted, &stripped, usize::MAX).expect("planned");
        let after = applied(stripped, &changes);
        assert_eq!(
            Destination::of_service(&after.services[&ours.service_name()]),
            ours
        );
    }

    #[test]
    fn a_full_range_of_target_ports_is_refused_with_advice() {
        let mut grants = GrantPorts::new();
        grants.insert(
            "z/full".into(),
            (FIRST_TARGET_PORT..=u16::MAX).map(|t| port(t, t)).collect(),
        );
        let service = render_service("fa", &Destination::instance(I2), &grants);
        let observed = ObservedEndpoints {
            services: BTreeMap::from([(I2.to_owned(), service)]),
            ..ObservedEndpoints::default()
        };
        let error = endpoint_changes("fa", "a/one", &wanted(&[I1], &[22]), &observed, usize::MAX)
            .expect_err("no port left");
        assert!(
            error.to_string().contains("remove unused grants"),
            "{error}"
        );
    }
}
