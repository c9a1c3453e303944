//! Who is on the other end of a connection: the client pod, found by the connection's source
//! address in a watch of the cluster's pods, and what a session's `Reason` says about it.
//!
//! ```text
//!  pods (watch, slimmed to namespace, name, uid, labels, service account, host network,
//!        phase, IPs) ──▶ index by address ──(each change)──▶ Changes (wakes connections
//!                                                             awaiting admission)
//!  accepted connection ──source address──▶ resolve ──▶ Client::Pod | Client::Unresolved
//!                                                   └─▶ reason(mark, client, grants) ≤ 256
//! ```
//!
//! An address that no running pod has, or that several have (host-network pods share their
//! node's), is not guessed: the connection is still carried, and says it is unresolved.
//! [`resolve_in`] and [`reason`] are pure; [`PodDirectory`] holds the watch.

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    future::Future,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::{
    Api,
    api::ObjectMeta,
    runtime::{WatchStreamExt, reflector::ObjectRef, reflector::Store, watcher},
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
    watched: Option<Watched>,
}

/// The index a watch keeps, and whether it has listed.
#[derive(Clone)]
struct Watched {
    index: Arc<RwLock<PodIndex>>,
    listed: tokio::sync::watch::Receiver<bool>,
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
        let (mut writer, directory) = IndexWriter::new();
        let stream = watcher(Api::<Pod>::all(client), Default::default())
            .modify(slim)
            .default_backoff()
            .inspect(move |event| {
                if let Ok(event) = event {
                    writer.apply(event);
                }
            });
        let failures = metrics.watch_failures("pods");
        let driven = drive(stream, changes, failures, "pods (to attribute connections)");
        (directory, driven)
    }

    /// Resolves once the watch has listed the pods (at once when pods are not watched; never,
    /// if the watch is dropped first).
    pub async fn listed(&self) {
        if let Some(watched) = &self.watched {
            let mut listed = watched.listed.clone();
            if listed.wait_for(|listed| *listed).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A directory of `pods` as a watch that listed them would hold, never changing: for
    /// benchmarks and tests.
    pub fn listing(pods: impl IntoIterator<Item = Pod>) -> Self {
        let (mut writer, directory) = IndexWriter::new();
        writer.apply(&watcher::Event::Init);
        for pod in pods {
            writer.apply(&watcher::Event::InitApply(pod));
        }
        writer.apply(&watcher::Event::InitDone);
        directory
    }

    /// Whether pods are watched (attribution on).
    pub fn is_watching(&self) -> bool {
        self.watched.is_some()
    }

    /// Who has `address`: a lookup in the index, whatever the number of pods.
    pub fn resolve(&self, address: IpAddr) -> Client {
        let canonical = address.to_canonical();
        match &self.watched {
            Some(watched) => {
                let index = watched.index.read().unwrap_or_else(|p| p.into_inner());
                resolve_in(index.holders(canonical), canonical)
            }
            None => Client::Unresolved {
                address: canonical,
                candidates: 0,
            },
        }
    }
}

/// Pods by their addresses, as a watch's events leave them. Pure.
#[derive(Debug, Default)]
pub(crate) struct PodIndex {
    pods: HashMap<ObjectRef<Pod>, Arc<Pod>>,
    by_address: HashMap<IpAddr, Vec<ObjectRef<Pod>>>,
}

impl PodIndex {
    /// Adds `pod`, or replaces what the index held of it.
    pub(crate) fn insert(&mut self, pod: &Pod) {
        let key = key_of(pod);
        self.remove(&key);
        for address in addresses_of(pod) {
            (self.by_address.entry(address).or_default()).push(key.clone());
        }
        self.pods.insert(key, Arc::new(pod.clone()));
    }

    /// Forgets the pod `key` names.
    pub(crate) fn remove(&mut self, key: &ObjectRef<Pod>) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        for address in addresses_of(&pod) {
            if let Entry::Occupied(mut holders) = self.by_address.entry(address) {
                holders.get_mut().retain(|held| held != key);
                if holders.get().is_empty() {
                    holders.remove();
                }
            }
        }
    }

    /// The pods (live or not) that have `address` (canonical).
    pub(crate) fn holders(&self, address: IpAddr) -> impl Iterator<Item = &Pod> {
        (self.by_address.get(&address).into_iter().flatten())
            .filter_map(|key| self.pods.get(key))
            .map(AsRef::as_ref)
    }
}

/// A pod's namespace and name (without its version and uid, which the index need not hold once
/// per address).
fn key_of(pod: &Pod) -> ObjectRef<Pod> {
    let mut key = ObjectRef::from_obj(pod);
    key.extra = Default::default();
    key
}

/// A pod's distinct addresses, canonical.
fn addresses_of(pod: &Pod) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = pod_addresses(pod).map(|a| a.to_canonical()).collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

/// Keeps a [`PodIndex`] as a watch's events say: a listing is built aside and takes the
/// index's place whole when it is done, as a reflector's store does.
struct IndexWriter {
    index: Arc<RwLock<PodIndex>>,
    listing: Option<PodIndex>,
    listed: tokio::sync::watch::Sender<bool>,
}

impl IndexWriter {
    /// A writer, and the directory that reads what it writes.
    fn new() -> (Self, PodDirectory) {
        let index = Arc::new(RwLock::new(PodIndex::default()));
        let (listed, listed_now) = tokio::sync::watch::channel(false);
        let directory = PodDirectory {
            watched: Some(Watched {
                index: index.clone(),
                listed: listed_now,
            }),
        };
        let writer = Self {
            index,
            listing: None,
            listed,
        };
        (writer, directory)
    }

    fn apply(&mut self, event: &watcher::Event<Pod>) {
        let index = || self.index.write().unwrap_or_else(|p| p.into_inner());
        match event {
            watcher::Event::Apply(pod) => index().insert(pod),
            watcher::Event::Delete(pod) => index().remove(&key_of(pod)),
            watcher::Event::Init => self.listing = Some(PodIndex::default()),
            watcher::Event::InitApply(pod) => self.listing.get_or_insert_default().insert(pod),
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                *index() = listed;
                self.listed.send_replace(true);
            }
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
    use futures::FutureExt as _;
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
    fn the_directory_follows_the_watch_and_a_relisting_replaces_what_it_held() {
        let (mut writer, directory) = IndexWriter::new();
        let address = |a: &str| a.parse::<IpAddr>().unwrap();
        let name_at = |a: &str| match directory.resolve(address(a)) {
            Client::Pod(pod) => Some(pod.name),
            Client::Unresolved { .. } => None,
        };
        assert!(directory.listed().now_or_never().is_none());
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(pod(
            "ci", "a", "10.1.0.1", "Running",
        )));
        writer.apply(&watcher::Event::InitApply(pod(
            "ci", "gone", "10.1.0.2", "Running",
        )));
        assert_eq!(
            name_at("10.1.0.1"),
            None,
            "a listing counts once it is done"
        );
        writer.apply(&watcher::Event::InitDone);
        assert!(directory.listed().now_or_never().is_some());
        // Its pod_ip is among its pod_ips too: one pod, not two.
        assert_eq!(name_at("10.1.0.1").as_deref(), Some("a"));
        assert_eq!(name_at("::ffff:10.1.0.1").as_deref(), Some("a"));
        // A pod that moves to another address leaves its old one.
        writer.apply(&watcher::Event::Apply(pod(
            "ci", "a", "10.1.0.9", "Running",
        )));
        assert_eq!(name_at("10.1.0.1"), None);
        assert_eq!(name_at("10.1.0.9").as_deref(), Some("a"));
        // Two pods with one address are nobody; one of them gone, the other is found.
        writer.apply(&watcher::Event::Apply(pod(
            "ci", "b", "10.1.0.9", "Running",
        )));
        assert!(matches!(
            directory.resolve(address("10.1.0.9")),
            Client::Unresolved { candidates: 2, .. }
        ));
        writer.apply(&watcher::Event::Delete(pod(
            "ci", "a", "10.1.0.9", "Running",
        )));
        assert_eq!(name_at("10.1.0.9").as_deref(), Some("b"));
        // A finished pod's address is nobody's.
        writer.apply(&watcher::Event::Apply(pod(
            "ci",
            "b",
            "10.1.0.9",
            "Succeeded",
        )));
        assert_eq!(name_at("10.1.0.9"), None);
        // A relisting (after the watch lost its place) holds what it lists, and nothing else.
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(pod(
            "ci", "c", "10.1.0.3", "Running",
        )));
        assert_eq!(
            name_at("10.1.0.2").as_deref(),
            Some("gone"),
            "until it is done"
        );
        writer.apply(&watcher::Event::InitDone);
        assert_eq!(name_at("10.1.0.2"), None);
        assert_eq!(name_at("10.1.0.3").as_deref(), Some("c"));
        assert!(directory.watched.as_ref().is_some_and(|w| {
            let index = w.index.read().unwrap();
            index.pods.len() == 1 && index.by_address.len() == 2
        }));
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
