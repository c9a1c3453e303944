//! Whether the serve path takes one more connection: limits on concurrent sessions across the
//! bridge, per client namespace (each tenant's share, so that one tenant's clients cannot take
//! every session the bridge has) and per instance, and the memory budget's floor for the new
//! session. Pure bookkeeping: what a connection is admitted with is held for as long as it is
//! carried and given back when dropped.
//!
//! ```text
//!  connection ─▶ total ─▶ client namespace ─▶ instance ─▶ memory floor (the namespace's
//!                  │            │                  │          share, then the bridge's) ─▶ Admitted
//!                  └────────────┴──────────────────┴───────────────┴─▶ Refusal (the first full)
//! ```

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    sync::{Arc, Mutex},
};

use crate::{
    budget::{Lease, MemoryBudget, Spent},
    clients::Client,
};

/// Limits on concurrent sessions.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sessions across the whole bridge.
    pub total: usize,
    /// Sessions whose clients are in one namespace (see [`Share`]).
    pub per_client_namespace: usize,
    /// Sessions to one instance.
    pub per_instance: usize,
}

/// The share of the bridge's sessions a connection counts against: its client pod's namespace,
/// or, for a client no single pod is known for (a host-network pod, a port-forward), the one
/// share of all such clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Share {
    /// The client pod's namespace.
    Namespace(String),
    /// Clients the pod watch does not resolve.
    Unresolved,
}

impl Share {
    /// The share of `client`; none when clients are not attributed at all (`attributed` false:
    /// the demo, benchmarks), where there is no tenant to tell apart.
    pub fn of(client: &Client, attributed: bool) -> Option<Share> {
        match client {
            Client::Pod(pod) => Some(Share::Namespace(pod.namespace.clone())),
            Client::Unresolved { .. } => attributed.then_some(Share::Unresolved),
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Namespace(namespace) => write!(f, "clients in namespace {namespace}"),
            Share::Unresolved => f.write_str("clients no single pod is known for"),
        }
    }
}

/// Why a client connection was refused before it became a session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The bridge carries its limit of sessions.
    #[error("the bridge already carries its limit of {0} sessions")]
    BridgeFull(usize),
    /// The connection's share holds its limit of sessions.
    #[error("{share} already hold their limit of {limit} sessions on this bridge")]
    ShareFull {
        /// The share.
        share: Share,
        /// Its limit.
        limit: usize,
    },
    /// The instance has its limit of sessions.
    #[error("{instance} already has its limit of {limit} sessions")]
    InstanceFull {
        /// The instance.
        instance: String,
        /// Its limit.
        limit: usize,
    },
    /// The memory budget cannot give a new session its floor.
    #[error(
        "the bridge's memory budget ({}) is spent on what other sessions' clients have not read \
         yet",
        crate::budget::in_units(*.0)
    )]
    MemorySpent(usize),
    /// No grant's NetworkPolicy admits the client to the endpoint (the message names neither
    /// the instance nor the grants: the client is nobody's).
    #[error(
        "no grant admits this client here: a grant's spec.bridge.clients must select its pod \
         (or hold its address)"
    )]
    ClientNotAdmitted,
    /// The endpoint closed while the connection waited for a grant to admit it: its grants
    /// withdrew it, or the bridge is stopping.
    #[error("the endpoint closed before a grant admitted this client")]
    EndpointClosed,
    /// The connection's share of the memory budget cannot give a new session its floor.
    #[error(
        "{share} hold their share of the bridge's memory budget ({}) in what they have not read yet",
        crate::budget::in_units(*.limit)
    )]
    ShareMemorySpent {
        /// The share.
        share: Share,
        /// What its sessions may hold together.
        limit: usize,
    },
}

impl Refusal {
    /// The refusal's label in `connections_refused_total` (one of
    /// [`metrics::REFUSAL_REASONS`](crate::metrics::REFUSAL_REASONS)).
    pub fn metric_label(&self) -> &'static str {
        let [
            total,
            namespace,
            instance,
            memory,
            namespace_memory,
            not_admitted,
            closed,
        ] = crate::metrics::REFUSAL_REASONS;
        match self {
            Refusal::ClientNotAdmitted => not_admitted,
            Refusal::EndpointClosed => closed,
            Refusal::BridgeFull(_) => total,
            Refusal::ShareFull { .. } => namespace,
            Refusal::InstanceFull { .. } => instance,
            Refusal::MemorySpent(_) => memory,
            Refusal::ShareMemorySpent { .. } => namespace_memory,
        }
    }
}

/// Sessions counted per key, each key up to `limit`; a key's count goes when it reaches zero.
struct PerKey<K> {
    limit: usize,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Clone + Eq + Hash> PerKey<K> {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Arc::default(),
        }
    }

    /// One more session of `key`, unless it holds its limit.
    fn take(&self, key: &K) -> Option<Held<K>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key.clone()).or_default();
        if *count >= self.limit {
            if *count == 0 {
                held.remove(key);
            }
            return None;
        }
        *count += 1;
        Some(Held {
            held: self.held.clone(),
            key: key.clone(),
        })
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One session counted against its key until dropped.
struct Held<K: Eq + Hash> {
    held: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Eq + Hash> Drop for Held<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl<K: Eq + Hash> fmt::Debug for Held<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Held")
    }
}

/// Every connection's admission: the counts of what is carried now, and the memory budget.
pub(crate) struct Admission {
    limits: Limits,
    total: PerKey<()>,
    per_share: PerKey<Share>,
    per_instance: PerKey<String>,
    /// Each session's floor comes from here.
    budget: Option<MemoryBudget>,
}

/// What an admitted connection holds while it is carried.
#[derive(Debug)]
pub(crate) struct Admitted {
    _total: Held<()>,
    _share: Option<Held<Share>>,
    _instance: Held<String>,
    /// The session's floor in the memory budget, for the session to take.
    pub(crate) lease: Option<Lease>,
}

impl Admission {
    pub(crate) fn new(limits: Limits, budget: Option<MemoryBudget>) -> Self {
        Self {
            limits,
            total: PerKey::new(limits.total),
            per_share: PerKey::new(limits.per_client_namespace),
            per_instance: PerKey::new(limits.per_instance),
            budget,
        }
    }

    /// Admits one more session to `instance` for a client of `share` (none: not counted per
    /// share), or says which limit refuses it.
    pub(crate) fn admit(&self, instance: &str, share: Option<&Share>) -> Result<Admitted, Refusal> {
        let total = (self.total.take(&())).ok_or(Refusal::BridgeFull(self.limits.total))?;
        let share_held = match share {
            Some(share) => Some(
                self.per_share
                    .take(share)
                    .ok_or_else(|| Refusal::ShareFull {
                        share: share.clone(),
                        limit: self.limits.per_client_namespace,
                    })?,
            ),
            None => None,
        };
        let instance_held = (self.per_instance.take(&instance.to_owned())).ok_or_else(|| {
            Refusal::InstanceFull {
                instance: instance.to_owned(),
                limit: self.limits.per_instance,
            }
        })?;
        let lease = match &self.budget {
            Some(budget) => {
                let tenant = share.map(ToString::to_string);
                let lease = budget
                    .lease_for(tenant.as_deref())
                    .map_err(|spent| match spent {
                        Spent::Bridge => Refusal::MemorySpent(budget.limit()),
                        Spent::Tenant => Refusal::ShareMemorySpent {
                            share: share.cloned().unwrap_or(Share::Unresolved),
                            limit: budget.tenant_limit().unwrap_or(budget.limit()),
                        },
                    })?;
                Some(lease)
            }
            None => None,
        };
        Ok(Admitted {
            _total: total,
            _share: share_held,
            _instance: instance_held,
            lease,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{budget::SESSION_FLOOR, clients::ClientPod};

    fn limits(total: usize, per_client_namespace: usize, per_instance: usize) -> Limits {
        Limits {
            total,
            per_client_namespace,
            per_instance,
        }
    }

    fn namespace(name: &str) -> Option<Share> {
        Some(Share::Namespace(name.to_owned()))
    }

    #[test]
    fn admission_refuses_past_each_limit() {
        let admission = Admission::new(limits(3, 10, 2), None);
        let a1 = admission.admit("i-a", None).unwrap();
        let _a2 = admission.admit("i-a", None).unwrap();
        let refusal = admission.admit("i-a", None).unwrap_err();
        assert_eq!(refusal.metric_label(), "limit_instance");
        assert!(
            refusal
                .to_string()
                .contains("i-a already has its limit of 2")
        );
        let _b1 = admission.admit("i-b", None).unwrap();
        let refusal = admission.admit("i-c", None).unwrap_err();
        assert_eq!(refusal, Refusal::BridgeFull(3));
        assert_eq!(refusal.metric_label(), "limit_total");
        assert!(refusal.to_string().contains("limit of 3 sessions"));
        drop(a1);
        assert!(admission.admit("i-c", None).is_ok());
    }

    #[test]
    fn one_namespaces_clients_take_their_share_and_leave_the_rest_to_others() {
        let admission = Admission::new(limits(10, 2, 10), None);
        let busy = namespace("busy");
        let first = admission.admit("i-a", busy.as_ref()).unwrap();
        let _second = admission.admit("i-b", busy.as_ref()).unwrap();
        let refusal = admission.admit("i-c", busy.as_ref()).unwrap_err();
        assert_eq!(refusal.metric_label(), "limit_namespace");
        assert_eq!(
            refusal.to_string(),
            "clients in namespace busy already hold their limit of 2 sessions on this bridge"
        );
        // Refused by its share, the connection took nothing: another tenant gets in.
        let _other = admission.admit("i-c", namespace("quiet").as_ref()).unwrap();
        let _unresolved = admission.admit("i-c", Some(&Share::Unresolved)).unwrap();
        let _unattributed = admission.admit("i-c", None).unwrap();
        drop(first);
        assert!(admission.admit("i-c", busy.as_ref()).is_ok());

        let unresolved = Admission::new(limits(10, 1, 10), None);
        let _held = unresolved.admit("i-a", Some(&Share::Unresolved)).unwrap();
        let refusal = unresolved
            .admit("i-b", Some(&Share::Unresolved))
            .unwrap_err();
        assert!(
            (refusal.to_string()).starts_with("clients no single pod is known for already hold"),
            "{refusal}"
        );
    }

    #[test]
    fn counts_of_keys_with_nothing_held_are_not_kept() {
        let admission = Admission::new(limits(100, 100, 100), None);
        let held: Vec<Admitted> = (0..50)
            .map(|i| {
                let share = namespace(&format!("ns-{i}"));
                admission.admit(&format!("i-{i}"), share.as_ref()).unwrap()
            })
            .collect();
        assert_eq!(
            (admission.per_share.keys(), admission.per_instance.keys()),
            (50, 50)
        );
        drop(held);
        assert_eq!(
            (admission.per_share.keys(), admission.per_instance.keys()),
            (0, 0)
        );
        // A refusal leaves no count behind either.
        let none = Admission::new(limits(1, 0, 1), None);
        assert!(none.admit("i-a", namespace("ns").as_ref()).is_err());
        assert_eq!((none.per_share.keys(), none.total.keys()), (0, 0));
    }

    #[test]
    fn the_share_of_a_client_is_its_pods_namespace() {
        let pod = Client::Pod(ClientPod {
            namespace: "ci".into(),
            name: "runner-0".into(),
            service_account: "runner".into(),
            ..ClientPod::default()
        });
        let unresolved = Client::Unresolved {
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            candidates: 0,
        };
        assert_eq!(Share::of(&pod, true), namespace("ci"));
        assert_eq!(Share::of(&unresolved, true), Some(Share::Unresolved));
        assert_eq!(Share::of(&unresolved, false), None);
    }

    #[test]
    fn a_namespace_whose_share_of_the_memory_budget_is_spent_is_refused_alone() {
        let budget = MemoryBudget::new(10 * SESSION_FLOOR).with_tenant_limit(2 * SESSION_FLOOR);
        let admission = Admission::new(limits(10, 10, 10), Some(budget));
        let busy = namespace("busy");
        let _first = admission.admit("i-a", busy.as_ref()).unwrap();
        let _second = admission.admit("i-a", busy.as_ref()).unwrap();
        let refusal = admission.admit("i-a", busy.as_ref()).unwrap_err();
        assert_eq!(refusal.metric_label(), "memory_budget_namespace");
        assert_eq!(
            refusal.to_string(),
            format!(
                "clients in namespace busy hold their share of the bridge's memory budget ({}) in what they have not read yet",
                crate::budget::in_units(2 * SESSION_FLOOR)
            )
        );
        assert!(admission.admit("i-a", namespace("quiet").as_ref()).is_ok());
        assert!(admission.admit("i-a", None).is_ok());
    }

    #[test]
    fn admission_refuses_a_session_the_memory_budget_has_no_floor_for() {
        let budget = MemoryBudget::new(2 * SESSION_FLOOR + SESSION_FLOOR / 2);
        let admission = Admission::new(limits(10, 10, 10), Some(budget.clone()));
        let first = admission.admit("i-a", None).unwrap();
        assert_eq!(first.lease.as_ref().map(Lease::held), Some(SESSION_FLOOR));
        let _second = admission.admit("i-b", None).unwrap();
        let refusal = admission.admit("i-c", None).unwrap_err();
        assert_eq!(refusal.metric_label(), "memory_budget");
        let limit = crate::budget::in_units(budget.limit());
        assert!(
            (refusal.to_string()).contains(&format!("memory budget ({limit}) is spent")),
            "{refusal}"
        );
        drop(first);
        assert_eq!(budget.in_use(), SESSION_FLOOR);
        assert!(admission.admit("i-c", None).is_ok());
    }
}
