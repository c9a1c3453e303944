//! NetworkPolicy peers, both ways. What the API server would refuse in a grant's
//! `spec.bridge.clients` once the operator puts them into a NetworkPolicy: label keys and
//! values, selector operators, peers that name nothing or mix an `ipBlock` with selectors, CIDRs
//! and their exceptions. The CRD's schema carries the NetworkPolicyPeer's structure but not these
//! rules, so a grant with a bad selector would get in and fail only when its NetworkPolicy is
//! written. Checked offline (`plan`) and by the operator before it writes anything, each problem
//! naming the grant's field. And whether a written policy admits a connection's source
//! ([`policy_admits`]): the bridge's own check, for a CNI that does not enforce policies. Pure.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};

use crate::validation::{FieldError, is_dns_subdomain};

/// Every problem with `clients` (a grant's `spec.bridge.clients`).
pub fn client_problems(clients: &[NetworkPolicyPeer]) -> Vec<FieldError> {
    let mut problems = Vec::new();
    for (i, peer) in clients.iter().enumerate() {
        let path = format!("spec.bridge.clients[{i}]");
        let selects = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match (&peer.ip_block, selects) {
            (None, false) => problems.push(problem(
                &path,
                "names no client: set podSelector, namespaceSelector or ipBlock",
            )),
            (Some(_), true) => problems.push(problem(
                &path,
                "ipBlock cannot be combined with podSelector or namespaceSelector: make them two entries",
            )),
            _ => {}
        }
        for (field, selector) in [
            ("podSelector", &peer.pod_selector),
            ("namespaceSelector", &peer.namespace_selector),
        ] {
            if let Some(selector) = selector {
                selector_problems(selector, &format!("{path}.{field}"), &mut problems);
            }
        }
        if let Some(block) = &peer.ip_block {
            ip_block_problems(block, &format!("{path}.ipBlock"), &mut problems);
        }
    }
    problems
}

fn problem(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn selector_problems(selector: &LabelSelector, path: &str, problems: &mut Vec<FieldError>) {
    for (key, value) in selector.match_labels.iter().flatten() {
        let at = format!("{path}.matchLabels[{key:?}]");
        if let Err(why) = label_key(key) {
            problems.push(problem(&at, format!("the key {key:?} {why}")));
        }
        if let Err(why) = label_value(value) {
            problems.push(problem(&at, format!("the value {value:?} {why}")));
        }
    }
    for (j, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{j}]");
        if let Err(why) = label_key(&requirement.key) {
            problems.push(problem(
                &format!("{at}.key"),
                format!("{:?} {why}", requirement.key),
            ));
        }
        let values = requirement.values.as_deref().unwrap_or_default();
        match requirement.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => problems.push(problem(
                &format!("{at}.values"),
                format!("{} needs at least one value", requirement.operator),
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => problems.push(problem(
                &format!("{at}.values"),
                format!("{} takes no values: remove them", requirement.operator),
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => problems.push(problem(
                &format!("{at}.operator"),
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            )),
        }
        for (k, value) in values.iter().enumerate() {
            if let Err(why) = label_value(value) {
                problems.push(problem(
                    &format!("{at}.values[{k}]"),
                    format!("{value:?} {why}"),
                ));
            }
        }
    }
}

/// A label key: a name of at most 63 characters (alphanumerics, `-`, `_`, `.`, starting and
/// ending with an alphanumeric), with an optional DNS subdomain prefix and `/`.
fn label_key(key: &str) -> Result<(), String> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return Err(format!(
                    "has a prefix {prefix:?} that is not a DNS subdomain (lowercase letters, digits, '-' and '.')"
                ));
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("has an empty name".to_owned());
    }
    label_name(name).map_err(|why| format!("is not a valid label key: its name {why}"))
}

/// A label value: empty, or a name as in [`label_key`].
fn label_value(value: &str) -> Result<(), String> {
    match value.is_empty() {
        true => Ok(()),
        false => label_name(value).map_err(|why| format!("is not a valid label value: it {why}")),
    }
}

fn label_name(name: &str) -> Result<(), String> {
    const LIMIT: usize = 63;
    if name.len() > LIMIT {
        return Err(format!("has more than {LIMIT} characters"));
    }
    let alphanumeric = |c: char| c.is_ascii_alphanumeric();
    if !name.starts_with(alphanumeric) || !name.ends_with(alphanumeric) {
        return Err("must start and end with a letter or digit".to_owned());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(c) => Err(format!(
            "holds {c:?}: only letters, digits, '-', '_' and '.' may appear"
        )),
        None => Ok(()),
    }
}

fn ip_block_problems(block: &IPBlock, path: &str, problems: &mut Vec<FieldError>) {
    let Some(cidr) = Cidr::parse(&block.cidr) else {
        problems.push(problem(
            &format!("{path}.cidr"),
            format!(
                "{:?} is not a CIDR such as 10.0.0.0/16 or fd00::/64",
                block.cidr
            ),
        ));
        return;
    };
    for (k, except) in block.except.iter().flatten().enumerate() {
        let at = format!("{path}.except[{k}]");
        match Cidr::parse(except) {
            None => problems.push(problem(&at, format!("{except:?} is not a CIDR"))),
            Some(inner) if !cidr.strictly_contains(&inner) => problems.push(problem(
                &at,
                format!("{except} is not inside {} (and smaller)", block.cidr),
            )),
            Some(_) => {}
        }
    }
}

/// An address block: an address and the length of its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A block as the API server reads it: an IPv4-mapped IPv6 block (`::ffff:10.9.0.0/112`)
    /// is the IPv4 block it maps (`10.9.0.0/16`), as Go's `IPNet` takes it.
    fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = text.split_once('/')?;
        let address: IpAddr = address.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let bits = match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return None;
        }
        Some(match (address, address.to_canonical()) {
            (IpAddr::V6(_), IpAddr::V4(mapped)) => Self {
                address: IpAddr::V4(mapped),
                prefix: prefix.saturating_sub(96),
            },
            _ => Self { address, prefix },
        })
    }

    /// Whether `address` is in this block (an IPv4 address seen through an IPv6 socket counts
    /// as the IPv4 address).
    fn contains(&self, address: IpAddr) -> bool {
        let (outer, inner, bits) = match (self.address, address.to_canonical()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        let network = |address: u128| address.checked_shr(shift).unwrap_or(0);
        network(outer) == network(inner)
    }

    /// Whether `inner` is a smaller block of the same family inside this one.
    fn strictly_contains(&self, inner: &Cidr) -> bool {
        inner.prefix > self.prefix && self.contains(inner.address)
    }
}

/// A connection's source as a NetworkPolicy sees it: its address, and the pod that has it when
/// exactly one pod does (not a host-network pod: selectors never match those).
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The source address.
    pub address: IpAddr,
    /// The pod with that address.
    pub pod: Option<SourcePod<'a>>,
}

/// The pod a connection comes from, with what selectors read of it.
#[derive(Clone, Copy, Debug)]
pub struct SourcePod<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its namespace's labels; none when not known yet (then no namespace selector matches).
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
}

/// Whether `policy` admits `source` to TCP `port` of a pod with `target_labels` in the policy's
/// namespace, as the NetworkPolicy API defines it: the policy selects that pod, and some
/// ingress rule's ports hold `port` (no ports: every port) and its peers hold the source (no
/// peers: every source). Named ports never match (the bridge's listeners have no names), nor
/// does anything the API server would have refused: a selector that does not parse admits
/// nobody.
pub fn policy_admits(
    policy: &NetworkPolicy,
    target_labels: &BTreeMap<String, String>,
    port: u16,
    source: &Source<'_>,
) -> bool {
    let Some(spec) = &policy.spec else {
        return false;
    };
    let ingress_policy = match &spec.policy_types {
        Some(types) => types.iter().any(|t| t == "Ingress"),
        None => true,
    };
    let selects_target =
        (spec.pod_selector.as_ref()).is_none_or(|s| selects_labels(s, target_labels));
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    ingress_policy
        && selects_target
        && (spec.ingress.iter().flatten()).any(|rule| rule_admits(rule, namespace, port, source))
}

fn rule_admits(
    rule: &NetworkPolicyIngressRule,
    namespace: &str,
    port: u16,
    source: &Source<'_>,
) -> bool {
    let ports = rule.ports.as_deref().unwrap_or_default();
    let peers = rule.from.as_deref().unwrap_or_default();
    (ports.is_empty() || ports.iter().any(|p| port_holds(p, port)))
        && (peers.is_empty() || peers.iter().any(|p| peer_admits(p, namespace, source)))
}

fn port_holds(entry: &NetworkPolicyPort, port: u16) -> bool {
    if entry.protocol.as_deref().unwrap_or("TCP") != "TCP" {
        return false;
    }
    match &entry.port {
        None => true,
        Some(IntOrString::Int(first)) => {
            let last = entry.end_port.unwrap_or(*first);
            (*first..=last).contains(&i32::from(port))
        }
        Some(IntOrString::String(_)) => false,
    }
}

/// Whether `peer`, in a policy of namespace `namespace`, admits `source`: an `ipBlock` by its
/// address; selectors by its pod (a `podSelector` alone: pods of the policy's own namespace).
pub fn peer_admits(peer: &NetworkPolicyPeer, namespace: &str, source: &Source<'_>) -> bool {
    let selects = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.ip_block, selects, &source.pod) {
        (Some(block), false, _) => {
            Cidr::parse(&block.cidr).is_some_and(|cidr| cidr.contains(source.address))
                && !(block.except.iter().flatten())
                    .any(|e| Cidr::parse(e).is_none_or(|cidr| cidr.contains(source.address)))
        }
        (None, true, Some(pod)) => {
            let in_namespace = match &peer.namespace_selector {
                Some(selector) => {
                    (pod.namespace_labels).is_some_and(|l| selects_labels(selector, l))
                }
                None => pod.namespace == namespace,
            };
            in_namespace
                && (peer.pod_selector.as_ref()).is_none_or(|s| selects_labels(s, pod.labels))
        }
        _ => false,
    }
}

/// Whether `selector` selects `labels`; a selector that does not parse selects nothing.
fn selects_labels(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    use kube::core::SelectorExt as _;
    kube::core::Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(json: serde_json::Value) -> Vec<NetworkPolicyPeer> {
        serde_json::from_value(json).expect("peers")
    }

    fn paths(problems: &[FieldError]) -> Vec<&str> {
        problems.iter().map(|p| p.path.as_str()).collect()
    }

    #[test]
    fn the_peers_the_api_server_takes_have_no_problems() {
        let good = peers(serde_json::json!([
            {"podSelector": {"matchLabels": {"app": "ansible", "app.kubernetes.io/name": "ci-runner_1"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tools"}},
             "podSelector": {"matchExpressions": [
                 {"key": "tier", "operator": "In", "values": ["jobs", ""]},
                 {"key": "example.com/canary", "operator": "DoesNotExist"}]}},
            {"podSelector": {}},
            {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.5.0/24"]}},
            {"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::1/128"]}},
        ]));
        assert_eq!(client_problems(&good), Vec::new());
    }

    #[test]
    fn bad_labels_and_operators_are_named_by_their_field() {
        let bad = peers(serde_json::json!([
            {"podSelector": {"matchLabels": {"app name": "x", "Example.com/app": "y", "tier": "-jobs"}}},
            {"namespaceSelector": {"matchExpressions": [
                {"key": "tier", "operator": "In"},
                {"key": "tier", "operator": "Exists", "values": ["a"]},
                {"key": "tier", "operator": "Equals", "values": ["a"]},
                {"key": "/tier", "operator": "NotIn", "values": ["x".repeat(64)]}]}},
        ]));
        let problems = client_problems(&bad);
        assert_eq!(
            paths(&problems),
            [
                r#"spec.bridge.clients[0].podSelector.matchLabels["Example.com/app"]"#,
                r#"spec.bridge.clients[0].podSelector.matchLabels["app name"]"#,
                r#"spec.bridge.clients[0].podSelector.matchLabels["tier"]"#,
                "spec.bridge.clients[1].namespaceSelector.matchExpressions[0].values",
                "spec.bridge.clients[1].namespaceSelector.matchExpressions[1].values",
                "spec.bridge.clients[1].namespaceSelector.matchExpressions[2].operator",
                "spec.bridge.clients[1].namespaceSelector.matchExpressions[3].key",
                "spec.bridge.clients[1].namespaceSelector.matchExpressions[3].values[0]",
            ],
            "{problems:#?}"
        );
        let said = |i: usize| problems[i].message.as_str();
        assert!(said(0).contains("DNS subdomain"), "{}", said(0));
        assert!(said(1).contains("holds ' '"), "{}", said(1));
        assert!(
            said(2).contains("start and end with a letter or digit"),
            "{}",
            said(2)
        );
        assert_eq!(said(3), "In needs at least one value");
        assert_eq!(said(4), "Exists takes no values: remove them");
        assert!(said(5).contains("\"Equals\" is not one of"), "{}", said(5));
        assert!(said(7).contains("more than 63 characters"), "{}", said(7));
    }

    #[test]
    fn peers_name_one_kind_of_client_and_blocks_hold_their_exceptions() {
        let bad = peers(serde_json::json!([
            {},
            {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
            {"ipBlock": {"cidr": "10.0.0.0"}},
            {"ipBlock": {"cidr": "10.0.0.0/33"}},
            {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24", "10.0.0.0/16", "fd00::/120", "nope"]}},
        ]));
        let problems = client_problems(&bad);
        assert_eq!(
            paths(&problems),
            [
                "spec.bridge.clients[0]",
                "spec.bridge.clients[1]",
                "spec.bridge.clients[2].ipBlock.cidr",
                "spec.bridge.clients[3].ipBlock.cidr",
                "spec.bridge.clients[4].ipBlock.except[0]",
                "spec.bridge.clients[4].ipBlock.except[1]",
                "spec.bridge.clients[4].ipBlock.except[2]",
                "spec.bridge.clients[4].ipBlock.except[3]",
            ],
            "{problems:#?}"
        );
        assert!(problems[0].message.contains("names no client"));
        assert!(problems[1].message.contains("cannot be combined"));
        assert!(problems[4].message.contains("not inside 10.0.0.0/16"));
    }

    /// A policy in namespace `fleet-access` as the operator writes one (and as a hand might).
    fn policy(spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "fleet-access"},
            "spec": spec,
        }))
        .expect("a policy")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        (pairs.iter())
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_policy_admits_its_peers_to_its_ports_only() {
        let grant = policy(serde_json::json!({
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "agent-bridge"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": "ansible"}},
                     "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}},
                    {"namespaceSelector": {"matchExpressions": [
                        {"key": "team", "operator": "In", "values": ["ops"]}]}},
                    {"podSelector": {"matchLabels": {"role": "probe"}}},
                    {"ipBlock": {"cidr": "10.9.0.0/16", "except": ["10.9.9.0/24"]}},
                ],
                "ports": [{"port": 20001, "protocol": "TCP"}, {"port": 20010, "endPort": 20012}],
            }],
        }));
        let ansible = labels(&[("app", "ansible")]);
        let ci = labels(&[("kubernetes.io/metadata.name", "ci")]);
        let ops = labels(&[("kubernetes.io/metadata.name", "tools"), ("team", "ops")]);
        let none = BTreeMap::new();
        let address: IpAddr = "10.1.0.7".parse().unwrap();
        let pod = |namespace: &'static str, labels, namespace_labels| Source {
            address,
            pod: Some(SourcePod {
                namespace,
                labels,
                namespace_labels: Some(namespace_labels),
            }),
        };
        let bridge = labels(&[("app.kubernetes.io/name", "agent-bridge")]);
        let admits = |source: &Source<'_>, port| policy_admits(&grant, &bridge, port, source);
        // Pod and namespace selectors of one peer are both needed.
        assert!(admits(&pod("ci", &ansible, &ci), 20001));
        assert!(!admits(&pod("ci", &none, &ci), 20001));
        assert!(!admits(&pod("tools", &ansible, &none), 20001));
        // A namespace selector alone takes every pod of the namespaces it selects.
        assert!(admits(&pod("tools", &none, &ops), 20001));
        // A pod selector alone: pods of the policy's own namespace only.
        let probe = labels(&[("role", "probe")]);
        assert!(admits(&pod("fleet-access", &probe, &none), 20001));
        assert!(!admits(&pod("ci", &probe, &ci), 20001));
        // The rule's ports, ranges included; nothing else.
        assert!(admits(&pod("ci", &ansible, &ci), 20011));
        for port in [20000, 20002, 20009, 20013] {
            assert!(!admits(&pod("ci", &ansible, &ci), port), "{port}");
        }
        // An address in the block, outside its exception; no pod needed. A pod's labels do
        // not make up for an address outside it.
        let at = |address: &str| Source {
            address: address.parse().unwrap(),
            pod: None,
        };
        assert!(admits(&at("10.9.1.1"), 20001));
        assert!(admits(&at("::ffff:10.9.1.1"), 20001), "IPv4 through IPv6");
        assert!(!admits(&at("10.9.9.1"), 20001));
        assert!(!admits(&at("10.8.1.1"), 20001));
        // An address no single pod has is admitted by no selector.
        assert!(!admits(&at("10.1.0.7"), 20001));
        // A namespace not known yet matches no namespace selector, even one that asks for a
        // label to be absent.
        let not_ops = policy(
            serde_json::json!({"ingress": [{"from": [{"namespaceSelector":
            {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["ops"]}]}}]}]}),
        );
        let unknown = Source {
            address,
            pod: Some(SourcePod {
                namespace: "new",
                labels: &none,
                namespace_labels: None,
            }),
        };
        assert!(!policy_admits(&not_ops, &bridge, 20001, &unknown));
        assert!(policy_admits(
            &not_ops,
            &bridge,
            20001,
            &pod("new", &none, &ci)
        ));
        // Only on the pods the policy selects.
        assert!(!policy_admits(
            &grant,
            &ansible,
            20001,
            &pod("ci", &ansible, &ci)
        ));
    }

    #[test]
    fn what_the_api_would_refuse_or_cannot_name_admits_nobody() {
        let source = Source {
            address: "10.0.0.1".parse().unwrap(),
            pod: None,
        };
        let target = BTreeMap::new();
        let admits = |spec| policy_admits(&policy(spec), &target, 20001, &source);
        let everyone = serde_json::json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}]);
        assert!(admits(serde_json::json!({"ingress": [{"from": everyone}]})));
        // No rule, an Egress-only policy, a UDP port, a named port.
        assert!(!admits(serde_json::json!({})));
        assert!(!admits(
            serde_json::json!({"policyTypes": ["Egress"], "ingress": [{"from": everyone}]})
        ));
        assert!(!admits(
            serde_json::json!({"ingress": [{"from": everyone, "ports": [{"port": 20001, "protocol": "UDP"}]}]})
        ));
        assert!(!admits(
            serde_json::json!({"ingress": [{"from": everyone, "ports": [{"port": "ssh"}]}]})
        ));
        // A block with a selector, an unreadable block or exception, a bad operator.
        assert!(!admits(
            serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}, "podSelector": {}}]}]})
        ));
        assert!(!admits(
            serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}]})
        ));
        assert!(!admits(
            serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["nope"]}}]}]})
        ));
        // An IPv4-mapped exception excludes the IPv4 block it maps, as the API server reads it.
        assert!(!admits(
            serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["::ffff:10.0.0.0/112"]}}]}]})
        ));
        let (labels, namespace_labels) = (BTreeMap::new(), BTreeMap::new());
        let pod = Source {
            pod: Some(SourcePod {
                namespace: "fleet-access",
                labels: &labels,
                namespace_labels: Some(&namespace_labels),
            }),
            ..source
        };
        let bad_operator = policy(serde_json::json!({"ingress": [{"from": [
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}}]}]}));
        assert!(!policy_admits(&bad_operator, &target, 20001, &pod));
        // As the API defines them: no peers is everyone, no ports every port, `{}` every pod.
        assert!(admits(
            serde_json::json!({"ingress": [{"ports": [{"port": 20001}]}]})
        ));
        let every_pod = policy(serde_json::json!({"ingress": [{"from": [{"podSelector": {}}]}]}));
        assert!(policy_admits(&every_pod, &target, 20001, &pod));
        assert!(
            !policy_admits(&every_pod, &target, 20001, &source),
            "no pod"
        );
    }
}
