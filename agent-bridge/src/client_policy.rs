//! Which connections some grant admits: the bridge's own check of the NetworkPolicies the
//! operator writes, one per grant (`spec.bridge.clients` to the grant's target ports). The CNI
//! enforces them where it can; this check makes a cluster whose CNI does not (or a pod that
//! reaches the bridge around it) no more open than one where it does.
//!
//! ```text
//!  the operator's NetworkPolicies (bridge namespace) ─┐
//!  namespaces (name, labels) ─────────────────────────┼─▶ stores ─▶ admit(address, port)
//!  pods (clients::PodDirectory) ──────────────────────┘     no policy admits it yet: look again
//!                                                           at each change, for a bounded while
//! ```
//!
//! A source is admitted by an `ipBlock` holding its address, or, when exactly one pod has the
//! address (not a host-network pod), by selectors of that pod and its namespace. What no policy
//! admits is refused. [`admitting_grants`] is pure; [`ClientPolicies`] holds the watches.

use std::{collections::BTreeMap, future::Future, net::IpAddr, time::Duration};

use fleet_access_crds::{
    bridge_contract::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, NETWORK_POLICY_GRANT_ANNOTATION},
    peers::{Source, SourcePod, policy_admits},
};
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api,
    api::ObjectMeta,
    runtime::{WatchStreamExt, reflector, reflector::ObjectRef, reflector::Store, watcher},
};

use crate::clients::{Changes, Client, PodDirectory, drive};

/// How long a connection that no policy admits yet waits for the watches to catch up: a grant's
/// policy written a moment after its Service, a new client pod whose address the watch has not
/// seen yet.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(3);

/// At most this many looks per connection (the first, then one per batch of changes): a busy
/// cluster's changes do not make a refused connection cost more.
const ADMISSION_LOOKS: usize = 12;

/// The label every namespace carries with its own name (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What the check says of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some grant's policy admits the client: those grants (`namespace/name`), sorted.
    Admitted {
        /// Who the client is, as last resolved.
        client: Client,
        /// The grants whose policies admit it.
        grants: Vec<String>,
    },
    /// No policy admits the client.
    NotAdmitted {
        /// Who the client is, as last resolved.
        client: Client,
    },
}

/// The grants whose `policies` admit the connection from `address` (resolved to `client`,
/// whose namespace has `namespace_labels`) to listen port `port`; none when no policy does.
/// Pure.
pub fn admitting_grants<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    port: u16,
    address: IpAddr,
    client: &Client,
    namespace_labels: &BTreeMap<String, String>,
) -> Option<Vec<String>> {
    let pod = match client {
        Client::Pod(pod) if !pod.host_network => Some(SourcePod {
            namespace: &pod.namespace,
            labels: &pod.labels,
            namespace_labels,
        }),
        _ => None,
    };
    let source = Source { address, pod };
    let mut grants = Vec::new();
    let mut admitted = false;
    for policy in policies {
        if policy_admits(policy, port, &source) {
            admitted = true;
            let grant = (policy.metadata.annotations.as_ref())
                .and_then(|a| a.get(NETWORK_POLICY_GRANT_ANNOTATION));
            grants.extend(grant.cloned());
        }
    }
    grants.sort();
    grants.dedup();
    admitted.then_some(grants)
}

/// The operator's NetworkPolicies in the bridge's namespace and the cluster's namespaces, kept
/// by watches.
#[derive(Clone)]
pub struct ClientPolicies {
    policies: Store<NetworkPolicy>,
    namespaces: Store<Namespace>,
    changes: Changes,
}

impl ClientPolicies {
    /// The policies of `namespace` (the bridge's) and every namespace's labels, kept by watches
    /// that note each change in `changes`; the returned future drives them and runs until
    /// dropped. A watch that fails (no permission, say) is retried with back-off; until the
    /// policies are listed, no connection is admitted.
    pub fn watch(
        client: kube::Client,
        namespace: &str,
        changes: Changes,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
        let (policies, policy_writer) = reflector::store();
        let policy_stream = reflector(
            policy_writer,
            watcher(
                Api::<NetworkPolicy>::namespaced(client.clone(), namespace),
                watcher::Config::default().labels(&selector),
            ),
        )
        .default_backoff()
        .applied_objects();
        let (namespaces, namespace_writer) = reflector::store();
        let namespace_stream = reflector(
            namespace_writer,
            watcher(Api::<Namespace>::all(client), Default::default()).modify(slim),
        )
        .default_backoff()
        .applied_objects();
        let driven = {
            let changes = changes.clone();
            async move {
                futures::join!(
                    drive(
                        policy_stream,
                        changes.clone(),
                        "the grants' NetworkPolicies"
                    ),
                    drive(namespace_stream, changes, "namespaces (their labels)"),
                );
            }
        };
        let policies = Self {
            policies,
            namespaces,
            changes,
        };
        (policies, driven)
    }

    /// Waits until both watches have listed once, for at most `limit`: whether they have.
    pub async fn wait_listed(&self, limit: Duration) -> bool {
        let both = async {
            let policies = self.policies.wait_until_ready().await;
            let namespaces = self.namespaces.wait_until_ready().await;
            policies.is_ok() && namespaces.is_ok()
        };
        matches!(tokio::time::timeout(limit, both).await, Ok(true))
    }

    /// Whether some grant admits the connection from `address` to listen port `port`, with the
    /// client as `pods` resolve it. When none does, looks again at each change of what is
    /// watched, for up to [`ADMISSION_WAIT`].
    pub async fn admit(&self, pods: &PodDirectory, address: IpAddr, port: u16) -> Verdict {
        let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
        let mut changes = self.changes.subscribe();
        let mut looks = 0;
        loop {
            changes.borrow_and_update();
            looks += 1;
            let client = pods.resolve(address);
            if let Some(grants) = self.grants_admitting(&client, address, port) {
                return Verdict::Admitted { client, grants };
            }
            let changed = tokio::time::timeout_at(deadline, changes.changed());
            if looks >= ADMISSION_LOOKS || !matches!(changed.await, Ok(Ok(()))) {
                return Verdict::NotAdmitted { client };
            }
        }
    }

    fn grants_admitting(&self, client: &Client, address: IpAddr, port: u16) -> Option<Vec<String>> {
        let namespace_labels = match client {
            Client::Pod(pod) => self.namespace_labels(&pod.namespace),
            Client::Unresolved { .. } => BTreeMap::new(),
        };
        let policies = self.policies.state();
        admitting_grants(
            policies.iter().map(AsRef::as_ref),
            port,
            address,
            client,
            &namespace_labels,
        )
    }

    /// The labels of namespace `name`; before the watch has it, the one label every namespace
    /// has (its name).
    fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        match self.namespaces.get(&ObjectRef::new(name)) {
            Some(namespace) => namespace.metadata.labels.clone().unwrap_or_default(),
            None => BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned())]),
        }
    }
}

/// Keeps of a namespace only its name and labels.
fn slim(namespace: &mut Namespace) {
    let metadata = std::mem::take(&mut namespace.metadata);
    *namespace = Namespace {
        metadata: ObjectMeta {
            name: metadata.name,
            labels: metadata.labels,
            resource_version: metadata.resource_version,
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::ClientPod;
    use kube::runtime::reflector::store::Writer;

    /// A grant's policy as the operator writes it: `clients` to `ports`.
    fn grant_policy(grant: &str, clients: serde_json::Value, ports: &[u16]) -> NetworkPolicy {
        let ports: Vec<_> = (ports.iter())
            .map(|p| serde_json::json!({"port": p, "protocol": "TCP"}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("fleet-access-{}", grant.replace('/', "-")),
                "namespace": "fleet-access",
                "annotations": {NETWORK_POLICY_GRANT_ANNOTATION: grant},
            },
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "agent-bridge"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": clients, "ports": ports}],
            },
        }))
        .expect("a policy")
    }

    fn ansible_in(namespace: &str, host_network: bool) -> Client {
        Client::Pod(ClientPod {
            namespace: namespace.into(),
            name: "ansible-0".into(),
            service_account: "deployer".into(),
            labels: BTreeMap::from([("app".into(), "ansible".into())]),
            host_network,
        })
    }

    fn namespace_named(name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), name.into())])
    }

    #[test]
    fn the_grants_whose_policies_admit_a_client_are_named_once_each() {
        let ansible_of = |namespace: &str| {
            serde_json::json!([{"podSelector": {"matchLabels": {"app": "ansible"}},
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}])
        };
        let policies = [
            grant_policy("ci/deploy", ansible_of("ci"), &[20001, 20002]),
            grant_policy("ci/backup", ansible_of("ci"), &[20001]),
            grant_policy("ops/web", ansible_of("ops"), &[20001]),
            grant_policy(
                "ci/vpn",
                serde_json::json!([{"ipBlock": {"cidr": "10.0.0.0/8"}}]),
                &[20003],
            ),
        ];
        let address: IpAddr = "10.1.0.7".parse().unwrap();
        let grants = |client: &Client, namespace: &str, port| {
            admitting_grants(
                &policies,
                port,
                address,
                client,
                &namespace_named(namespace),
            )
        };
        let ansible = ansible_in("ci", false);
        assert_eq!(
            grants(&ansible, "ci", 20001),
            Some(vec!["ci/backup".into(), "ci/deploy".into()])
        );
        assert_eq!(
            grants(&ansible, "ci", 20002),
            Some(vec!["ci/deploy".into()])
        );
        // Not on a port no policy of its namespace names; not as another namespace's pod.
        assert_eq!(grants(&ansible, "ci", 20004), None);
        assert_eq!(grants(&ansible_in("tools", false), "tools", 20001), None);
        // A host-network pod shares its node's address: selectors never match it, blocks do.
        assert_eq!(grants(&ansible_in("ci", true), "ci", 20001), None);
        assert_eq!(
            grants(&ansible_in("ci", true), "ci", 20003),
            Some(vec!["ci/vpn".into()])
        );
        let unresolved = Client::Unresolved {
            address,
            candidates: 0,
        };
        assert_eq!(grants(&unresolved, "", 20001), None);
    }

    /// Policies kept in stores the test writes, with no pods watched.
    fn policies_in_stores() -> (ClientPolicies, Writer<NetworkPolicy>) {
        let writer = Writer::<NetworkPolicy>::default();
        let namespaces = Writer::<Namespace>::default();
        let policies = ClientPolicies {
            policies: writer.as_reader(),
            namespaces: namespaces.as_reader(),
            changes: Changes::default(),
        };
        (policies, writer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_no_policy_admits_yet_is_admitted_by_the_policy_that_comes() {
        let (policies, mut writer) = policies_in_stores();
        let pods = PodDirectory::disabled();
        let address: IpAddr = "127.0.0.9".parse().unwrap();
        let mut admit = std::pin::pin!(policies.admit(&pods, address, 20001));
        assert!(futures::poll!(admit.as_mut()).is_pending(), "it waits");
        let loopback = serde_json::json!([{"ipBlock": {"cidr": "127.0.0.0/8"}}]);
        writer.apply_watcher_event(&watcher::Event::Apply(grant_policy(
            "ci/deploy",
            loopback,
            &[20001],
        )));
        policies.changes.note();
        let started = tokio::time::Instant::now();
        assert_eq!(
            admit.await,
            Verdict::Admitted {
                client: pods.resolve(address),
                grants: vec!["ci/deploy".into()],
            }
        );
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "on the change, not a timer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_no_policy_admits_is_refused_within_the_wait() {
        let (policies, _writer) = policies_in_stores();
        let pods = PodDirectory::disabled();
        let address: IpAddr = "127.0.0.9".parse().unwrap();
        let started = tokio::time::Instant::now();
        let mut admit = std::pin::pin!(policies.admit(&pods, address, 20001));
        assert!(futures::poll!(admit.as_mut()).is_pending());
        // Changes that admit nothing wake it a bounded number of times, then it is refused
        // without waiting out the rest.
        let mut changes = 0;
        let verdict = loop {
            policies.changes.note();
            changes += 1;
            if let std::task::Poll::Ready(verdict) = futures::poll!(admit.as_mut()) {
                break verdict;
            }
            assert!(
                changes < 2 * ADMISSION_LOOKS,
                "still waiting after {changes} changes"
            );
        };
        assert!(
            matches!(verdict, Verdict::NotAdmitted { .. }),
            "{verdict:?}"
        );
        assert_eq!(
            changes,
            ADMISSION_LOOKS - 1,
            "one look at first, one per change"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Without changes, it is refused when the wait is over.
        let started = tokio::time::Instant::now();
        let verdict = policies.admit(&pods, address, 20001).await;
        assert!(
            matches!(verdict, Verdict::NotAdmitted { .. }),
            "{verdict:?}"
        );
        assert_eq!(started.elapsed(), ADMISSION_WAIT);
    }
}
