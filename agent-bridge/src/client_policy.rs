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
//! address (not a host-network pod), by selectors of that pod and its namespace (once the
//! namespace is known). Only a policy that names its grant counts. What no policy admits is
//! refused. [`admitting_grants`] is pure; [`ClientPolicies`] holds the watches.

use std::{collections::BTreeMap, future::Future, net::IpAddr, time::Duration};

use fleet_access_crds::{
    bridge_contract::{
        MANAGED_BY_LABEL, MANAGED_BY_VALUE, NETWORK_POLICY_GRANT_ANNOTATION, bridge_pod_selector,
    },
    peers::{Source, SourcePod, policy_admits},
};
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api,
    api::ObjectMeta,
    runtime::{WatchStreamExt, reflector, reflector::ObjectRef, reflector::Store, watcher},
};

use crate::{
    clients::{Changes, Client, PodDirectory, drive, until_ready},
    metrics::Metrics,
};

/// How long a connection that no policy admits yet waits for the watches to catch up: a grant's
/// policy written a moment after its Service, a new client pod whose address the watch has not
/// seen yet.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(3);

/// The least time between two looks of one connection: the changes of a busy cluster come
/// together into one look, and a waiting connection costs at most one look per interval.
pub const LOOK_INTERVAL: Duration = Duration::from_millis(100);

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
/// whose namespace has `namespace_labels`, when known) to listen port `port` of a bridge pod;
/// none when no policy does. A policy that names no grant admits nobody. Pure.
pub fn admitting_grants<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    port: u16,
    address: IpAddr,
    client: &Client,
    namespace_labels: Option<&BTreeMap<String, String>>,
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
    let bridge = bridge_pod_selector();
    let mut grants: Vec<String> = (policies.into_iter())
        .filter(|policy| policy_admits(policy, &bridge, port, &source))
        .filter_map(|policy| {
            let annotations = policy.metadata.annotations.as_ref()?;
            annotations.get(NETWORK_POLICY_GRANT_ANNOTATION).cloned()
        })
        .collect();
    grants.sort();
    grants.dedup();
    (!grants.is_empty()).then_some(grants)
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
    /// dropped. A watch that fails (no permission, say) is retried with back-off, and counted
    /// in `metrics`; until the policies are listed, no connection is admitted.
    pub fn watch(
        client: kube::Client,
        namespace: &str,
        changes: Changes,
        metrics: &Metrics,
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
        .default_backoff();
        let (namespaces, namespace_writer) = reflector::store();
        let namespace_stream = reflector(
            namespace_writer,
            watcher(Api::<Namespace>::all(client), Default::default()).modify(slim),
        )
        .default_backoff();
        let driven = {
            let changes = changes.clone();
            let policy_failures = metrics.watch_failures("network_policies");
            let namespace_failures = metrics.watch_failures("namespaces");
            async move {
                futures::join!(
                    drive(
                        policy_stream,
                        changes.clone(),
                        policy_failures,
                        "the grants' NetworkPolicies"
                    ),
                    drive(
                        namespace_stream,
                        changes,
                        namespace_failures,
                        "namespaces (their labels)"
                    ),
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

    /// Policies and namespaces as watches that listed them would hold, never changing: for
    /// benchmarks and tests.
    pub fn listing(
        policies: impl IntoIterator<Item = NetworkPolicy>,
        namespaces: impl IntoIterator<Item = Namespace>,
    ) -> Self {
        fn listed<K>(objects: impl IntoIterator<Item = K>) -> Store<K>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Default + Eq + std::hash::Hash + Clone,
        {
            let mut writer = reflector::store::Writer::<K>::default();
            writer.apply_watcher_event(&watcher::Event::Init);
            for object in objects {
                writer.apply_watcher_event(&watcher::Event::InitApply(object));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
            writer.as_reader()
        }
        Self {
            policies: listed(policies),
            namespaces: listed(namespaces),
            changes: Changes::default(),
        }
    }

    /// A receiver of the changes of what is watched (pods included), from now on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Resolves once both watches have listed, and `pods` too: from then on, a connection is
    /// judged by what the cluster holds, not refused for want of knowing.
    pub async fn listed(&self, pods: &PodDirectory) {
        until_ready(&self.policies).await;
        until_ready(&self.namespaces).await;
        pods.listed().await;
    }

    /// Whether some grant admits the connection from `address` to listen port `port` now, with
    /// the client as `pods` resolve it.
    pub fn look(&self, pods: &PodDirectory, address: IpAddr, port: u16) -> Verdict {
        let client = pods.resolve(address);
        let namespace = match &client {
            Client::Pod(pod) => self.namespaces.get(&ObjectRef::new(&pod.namespace)),
            Client::Unresolved { .. } => None,
        };
        let namespace_labels = namespace.as_ref().map(|n| labels_of(&n.metadata));
        let policies = self.policies.state();
        let admitting = admitting_grants(
            policies.iter().map(AsRef::as_ref),
            port,
            address,
            &client,
            namespace_labels,
        );
        match admitting {
            Some(grants) => Verdict::Admitted { client, grants },
            None => Verdict::NotAdmitted { client },
        }
    }

    /// [`ClientPolicies::look`], and when no grant admits the connection, looks again after
    /// each change of what is watched (at most once per [`LOOK_INTERVAL`]), for up to
    /// [`ADMISSION_WAIT`].
    pub async fn admit(&self, pods: &PodDirectory, address: IpAddr, port: u16) -> Verdict {
        let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            let verdict = self.look(pods, address, port);
            if matches!(verdict, Verdict::Admitted { .. }) {
                return verdict;
            }
            let next_look = tokio::time::Instant::now() + LOOK_INTERVAL;
            let changed = tokio::time::timeout_at(deadline, changes.changed());
            if !matches!(changed.await, Ok(Ok(()))) {
                return verdict;
            }
            tokio::time::sleep_until(next_look.min(deadline)).await;
        }
    }
}

/// An object's labels (none: empty).
fn labels_of(metadata: &ObjectMeta) -> &BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    metadata.labels.as_ref().unwrap_or(&NONE)
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

    const NAME_LABEL: &str = "kubernetes.io/metadata.name";

    #[test]
    fn the_grants_whose_policies_admit_a_client_are_named_once_each() {
        let ansible_of = |namespace: &str| {
            serde_json::json!([{"podSelector": {"matchLabels": {"app": "ansible"}},
                "namespaceSelector": {"matchLabels": {NAME_LABEL: namespace}}}])
        };
        let vpn = serde_json::json!([{"ipBlock": {"cidr": "10.0.0.0/8"}}]);
        let mut unnamed = grant_policy("ci/unnamed", vpn.clone(), &[20004]);
        unnamed.metadata.annotations = None;
        let policies = [
            grant_policy("ci/deploy", ansible_of("ci"), &[20001, 20002]),
            grant_policy("ci/backup", ansible_of("ci"), &[20001]),
            grant_policy("ops/web", ansible_of("ops"), &[20001]),
            grant_policy("ci/vpn", vpn, &[20003]),
            unnamed,
        ];
        let address: IpAddr = "10.1.0.7".parse().unwrap();
        let grants = |client: &Client, namespace: &str, port| {
            let labels = BTreeMap::from([(NAME_LABEL.to_owned(), namespace.to_owned())]);
            admitting_grants(&policies, port, address, client, Some(&labels))
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
        // Not on a port no policy of its namespace names; not as another namespace's pod; not
        // before its namespace is known.
        assert_eq!(grants(&ansible, "ci", 20005), None);
        assert_eq!(grants(&ansible_in("tools", false), "tools", 20001), None);
        assert_eq!(
            admitting_grants(&policies, 20001, address, &ansible, None),
            None
        );
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
        // A policy that names no grant admits nobody.
        assert_eq!(grants(&unresolved, "", 20004), None);
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
        assert!(
            started.elapsed() <= LOOK_INTERVAL,
            "on the change: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_no_policy_admits_is_refused_when_the_wait_is_over() {
        let (policies, _writer) = policies_in_stores();
        let pods = PodDirectory::disabled();
        let address: IpAddr = "127.0.0.9".parse().unwrap();
        for changing in [false, true] {
            let started = tokio::time::Instant::now();
            let admit = policies.admit(&pods, address, 20001);
            // Changes that admit nothing, all along, or none at all.
            let noise = async {
                if !changing {
                    return std::future::pending().await;
                }
                loop {
                    policies.changes.note();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            let verdict = tokio::select! {
                verdict = admit => verdict,
                () = noise => unreachable!("the noise never ends"),
            };
            assert!(
                matches!(verdict, Verdict::NotAdmitted { .. }),
                "{verdict:?}"
            );
            assert_eq!(started.elapsed(), ADMISSION_WAIT, "changing: {changing}");
        }
    }
}
