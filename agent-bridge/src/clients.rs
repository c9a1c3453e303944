//! Who is on the other end of a connection: the client pod, found by the connection's source
//! address in a watch of the cluster's pods, and what a session's `Reason` says about it.
//!
//! ```text
//!  pods (watch, slimmed to namespace, name, uid, labels, service account, host network,
//!        phase, IPs) ──▶ store ──(each change)──▶ Changes (wakes connections awaiting admission)
//!  accepted connection ──source address──▶ resolve ──▶ Client::Pod | Client::Unresolved
//!                                                   └─▶ reason(mark, client, grants) ≤ 256
//! ```
//!
//! An address that no running pod has, or that several have (host-network pods share their
//! node's), is not guessed: the connection is still carried, and says it is unresolved.
//! [`resolve_in`] and [`reason`] are pure; [`PodDirectory`] holds the watch.

use std::{collections::BTreeMap, future::Future, net::IpAddr};

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::{
    Api,
    api::ObjectMeta,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use prometheus::IntCounter;
use serde::Serialize;

use crate::metrics::Metrics;

/// StartSession's limit on `Reason`.
pub const REASON_LIMIT: usize = 256;

/// A client pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its service account.
    pub service_account: String,
    /// Its labels (what NetworkPolicies select it by; not in records).
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    /// Whether it runs in its node's network (then no pod selector matches it; not in records).
    #[serde(skip)]
    pub host_network: bool,
}

/// Who a connection came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Client {
    /// The one running pod with the connection's source address.
    Pod(ClientPod),
    /// No running pod has the address, or several do (`candidates`), or pods are not watched.
    Unresolved {
        /// The source address.
        address: IpAddr,
        /// How many running pods have it.
        candidates: usize,
    },
}

/// The client among `pods` whose (running or pending) pod has `address`. Pure.
pub fn resolve_in<'a>(pods: impl IntoIterator<Item = &'a Pod>, address: IpAddr) -> Client {
    let address = address.to_canonical();
    let mut found: Vec<&Pod> = (pods.into_iter())
        .filter(|pod| holds(pod, address))
        .collect();
    match found.as_mut_slice() {
        [pod] => Client::Pod(ClientPod {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            service_account: (pod.spec.as_ref())
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            host_network: (pod.spec.as_ref()).is_some_and(|s| s.host_network == Some(true)),
        }),
        others => Client::Unresolved {
            address,
            candidates: others.len(),
        },
    }
}

/// Whether a running or pending `pod` has `address` (canonical).
fn holds(pod: &Pod, address: IpAddr) -> bool {
    is_live(pod) && pod_addresses(pod).any(|a| a == address)
}

fn is_live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Running" | "Pending"))
}

fn pod_addresses(pod: &Pod) -> impl Iterator<Item = IpAddr> + '_ {
    let status = pod.status.as_ref();
    let first = status.and_then(|s| s.pod_ip.as_deref());
    let all = (status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten())
    .map(|p| p.ip.as_str());
    (first.into_iter().chain(all)).filter_map(|ip| ip.parse::<IpAddr>().ok())
}

/// StartSession's `Reason` for one connection: the replica's `mark`, then through which grants,
/// then who asked, cut to [`REASON_LIMIT`] characters. The mark comes first (the sweep of a dead
/// run's sessions reads it), the grants next (the operator reads them to end a revoked grant's
/// sessions, and a long pod name must not cut them off). Only characters AWS accepts in a
/// Reason. Pure.
pub fn reason(mark: &str, client: &Client, grants: &[String]) -> String {
    let who = match client {
        Client::Pod(pod) => format!(
            "for={}/{} sa={}",
            pod.namespace, pod.name, pod.service_account
        ),
        Client::Unresolved {
            address,
            candidates: 0,
        } => format!("for=unresolved:{address}"),
        Client::Unresolved {
            address,
            candidates,
        } => {
            format!("for=ambiguous:{address}({candidates} pods)")
        }
    };
    let grants = match grants {
        [] => String::new(),
        [one] => format!(" grant={one}"),
        [first, rest @ ..] => format!(" grant={first}+{}", rest.len()),
    };
    let full = format!("{mark}{grants} {who}");
    let clean: String = (full.chars())
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(REASON_LIMIT)
        .collect();
    clean
}

/// Counts the changes of what the bridge watches to admit clients (pods, namespaces, the
/// grants' NetworkPolicies), so that a connection awaiting admission wakes when one comes.
#[derive(Clone, Debug)]
pub struct Changes(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Default for Changes {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl Changes {
    /// One more change.
    pub fn note(&self) {
        self.0.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver that sees the changes from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Drives `stream` (a watch kept in a store) until it ends, noting in `changes` each change
/// the store shows (an object applied or deleted, a listing complete; not each object of a
/// listing, which the store shows only once it is complete), and logging and counting in
/// `failures` each failure (the stream retries with back-off) as `what`.
pub(crate) async fn drive<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    changes: Changes,
    failures: IntCounter,
    what: &'static str,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(next) = futures::StreamExt::next(&mut stream).await {
        match next {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changes.note()
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => {
                failures.inc();
                tracing::warn!(%error, "watching {what} failed; retrying");
            }
        }
    }
}

/// Resolves once `store`'s watch has listed: never, if the watch is dropped first.
pub(crate) async fn until_ready<K: kube::Resource + Clone + 'static>(store: &Store<K>)
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    if store.wait_until_ready().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The running pods of the cluster, by their addresses; or nothing, when pods are not watched.
#[derive(Clone, Default)]
pub struct PodDirectory {
    store: Option<Store<Pod>>,
}

impl PodDirectory {
    /// A directory that resolves nobody (attribution off).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A directory kept by a watch of every namespace's pods, noting each change in `changes`;
    /// the returned future drives the watch and runs until dropped. A watch that fails (no
    /// permission, say) is retried with back-off, and counted in `metrics`; until it lists,
    /// every client is unresolved.
    pub fn watch(
        client: kube::Client,
        changes: Changes,
        metrics: &Metrics,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(Api::<Pod>::all(client), Default::default()).modify(slim),
        )
        .default_backoff();
        let failures = metrics.watch_failures("pods");
        let driven = drive(stream, changes, failures, "pods (to attribute connections)");
        (Self { store: Some(store) }, driven)
    }

    /// Resolves once the watch has listed the pods (at once when pods are not watched).
    pub async fn listed(&self) {
        if let Some(store) = &self.store {
            until_ready(store).await;
        }
    }

    /// Whether pods are watched (attribution on).
    pub fn is_watching(&self) -> bool {
        self.store.is_some()
    }

    /// Who has `address`.
    pub fn resolve(&self, address: IpAddr) -> Client {
        match &self.store {
            // Only the pods with the address are cloned out of the store (per connection).
            Some(store) => {
                let canonical = address.to_canonical();
                let holders = store.state_filter(|pod| holds(pod, canonical));
                resolve_in(holders.iter().map(|p| p.as_ref()), address)
            }
            None => Client::Unresolved {
                address: address.to_canonical(),
                candidates: 0,
            },
        }
    }
}

/// Keeps of a pod only what attribution and the NetworkPolicy check read (a pod's spec can be
/// large and hold secrets in its environment; none of it stays in memory).
fn slim(pod: &mut Pod) {
    let metadata = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        labels: metadata.labels,
        resource_version: metadata.resource_version,
        ..ObjectMeta::default()
    };
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        service_account_name: spec.service_account_name,
        host_network: spec.host_network,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodIP;

    fn pod(namespace: &str, name: &str, ip: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([("app".into(), "ansible".into())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(format!("{name}-sa")),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![
                    PodIP { ip: ip.into() },
                    PodIP {
                        ip: "fd00::7".into(),
                    },
                ]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn a_running_pod_is_found_by_any_of_its_addresses_and_no_guess_is_made() {
        let pods = [
            pod("ci", "ansible-7", "10.1.0.7", "Running"),
            pod("ci", "old-job", "10.1.0.8", "Succeeded"),
            pod("kube-system", "node-agent", "10.0.0.1", "Running"),
            pod("other", "host-net", "10.0.0.1", "Running"),
        ];
        let ansible = Client::Pod(ClientPod {
            namespace: "ci".into(),
            name: "ansible-7".into(),
            service_account: "ansible-7-sa".into(),
            labels: BTreeMap::from([("app".into(), "ansible".into())]),
            host_network: false,
        });
        assert_eq!(resolve_in(&pods, "10.1.0.7".parse().unwrap()), ansible);
        assert_eq!(
            resolve_in(&pods, "fd00::7".parse().unwrap()),
            Client::Unresolved {
                address: "fd00::7".parse().unwrap(),
                candidates: 3,
            },
            "every pod here has fd00::7 too"
        );
        // IPv4 seen through an IPv6 socket.
        assert_eq!(
            resolve_in(&pods[..2], "::ffff:10.1.0.7".parse().unwrap()),
            ansible
        );
        // A finished pod's address is nobody's; a shared one is ambiguous.
        assert!(matches!(
            resolve_in(&pods, "10.1.0.8".parse().unwrap()),
            Client::Unresolved { candidates: 0, .. }
        ));
        assert!(matches!(
            resolve_in(&pods, "10.0.0.1".parse().unwrap()),
            Client::Unresolved { candidates: 2, .. }
        ));
    }

    #[test]
    fn the_reason_keeps_the_mark_first_and_fits_aws_limits() {
        let replica = crate::replica::ReplicaMark::for_this_run(
            "prod",
            "fleet-access",
            "agent-bridge-0",
            "0b6f6a5e-2d1c-4d8e-9a51-3f0c1e2d4b5a",
        )
        .expect("a mark");
        let mark = replica.reason();
        let mark = mark.as_str();
        let client = Client::Pod(ClientPod {
            namespace: "ci".into(),
            name: "ansible-7".into(),
            service_account: "deployer".into(),
            ..ClientPod::default()
        });
        assert_eq!(
            reason(mark, &client, &["ci/web-ssh".into()]),
            format!("{mark} grant=ci/web-ssh for=ci/ansible-7 sa=deployer")
        );
        let unresolved = Client::Unresolved {
            address: "10.0.0.1".parse().unwrap(),
            candidates: 2,
        };
        assert_eq!(
            reason(mark, &unresolved, &["a/b".into(), "c/d".into()]),
            format!("{mark} grant=a/b+1 for=ambiguous:10.0.0.1(2 pods)")
        );
        let long = Client::Pod(ClientPod {
            namespace: "n".repeat(63),
            name: "p\n".repeat(120),
            service_account: "s".into(),
            ..ClientPod::default()
        });
        let cut = reason(mark, &long, &["n/grant".into()]);
        assert_eq!(cut.chars().count(), REASON_LIMIT);
        assert!(cut.starts_with(mark) && !cut.contains('\n'), "{cut}");
        // A long pod name does not cut off the grant the operator reads.
        assert!(cut.contains(" grant=n/grant "), "{cut}");
        // The sweep of a dead run still reads the mark.
        assert_eq!(crate::replica::ReplicaMark::parse(&cut), Some(replica));
    }
}
