//! The controllers and what they share: the grant controller (`reconcile`), which grants grant
//! now (`granting`), each IAM identity's policy set (`identities`), the shared session
//! documents (`shared`), the session preferences controller (`preferences`), what they read
//! from AWS and Kubernetes (`observe`), the one applier of every change, which also publishes
//! its Event (`apply`), leader election (`leader`) and the wiring of `fleet-access-operator
//! run` (`runner`).
//!
//! ```text
//!  grant ─▶ observe ─▶ model::{desired, plan, endpoints} ─▶ apply (AWS, Kubernetes, Events)
//!                  └──────────────▶ model::status ◀───────────────┘
//! ```

pub mod apply;
pub mod census;
pub mod coalesce;
pub mod granting;
pub mod identities;
pub mod leader;
pub mod observe;
pub mod preferences;
pub mod reconcile;
pub mod runner;
pub mod shared;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use fleet_access_crds::SessionAccess;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Client, ResourceExt,
    runtime::events::{Recorder, Reporter},
};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use crate::{
    aws::{IamApi, SsmApi},
    metrics::Metrics,
    model::naming,
    settings::Settings,
};

/// The field manager of everything the operator writes in Kubernetes.
pub const FIELD_MANAGER: &str = "fleet-access-operator";

/// Where grants (owner tag values) go whose place in a shared object changed: a sync while
/// reconciling one grant can leave another out (another namespace's grant took its turn, an
/// earlier grant grew) or let it in again (an earlier grant shrank or went), and nothing else
/// would tell it before its next resync. The grant controller reconciles them, so that their
/// status says so at once.
#[derive(Default)]
pub struct MovedGrants(Mutex<Option<UnboundedSender<String>>>);

impl MovedGrants {
    /// From now on, every grant that moves is sent here.
    pub fn subscribe(&self) -> UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Sends the grants left out `before` or `now`, not both.
    pub fn note(&self, before: &BTreeSet<String>, now: &BTreeSet<String>) {
        let moved = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(moved) = moved.as_ref() {
            for grant in before.symmetric_difference(now) {
                let _ = moved.send(grant.clone());
            }
        }
    }
}

/// What every reconcile needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// IAM.
    pub iam: Arc<dyn IamApi>,
    /// SSM.
    pub ssm: Arc<dyn SsmApi>,
    /// Partition, Region, bridge role and namespace.
    pub settings: Settings,
    /// The account that owns the policies (for their ARNs).
    pub account: String,
    /// Metrics.
    pub metrics: Metrics,
    /// How often a synced grant is checked again for drift.
    pub resync: Duration,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Only this namespace's grants, when set (`--watch-namespace`).
    pub watch_namespace: Option<String>,
    /// How often the census counts open sessions (`--sessions-census-seconds`).
    pub census_period: Duration,
    /// Each IAM identity's policy set, synced one at a time per identity.
    pub identities: identities::Identities,
    /// The session documents the cluster's grants share.
    pub shared_documents: shared::SharedDocuments,
    /// The grants as listed and judged for the shared objects' syncs.
    pub granting: granting::GrantingNow,
    /// Grants that a sync of a shared object left out, or let in again.
    pub moved_grants: MovedGrants,
    /// Each grant's state for the `grants` gauge.
    states: Mutex<BTreeMap<String, &'static str>>,
    /// Serializes endpoint changes: target ports are allocated across every grant.
    endpoints: tokio::sync::Mutex<()>,
    /// Failed reconciles in a row, per object, for the retry backoff.
    failures: Mutex<BTreeMap<String, u32>>,
}

impl Context {
    /// A context; `reporter` names the replica in Events.
    #[allow(clippy::too_many_arguments)] // the context's parts, each named at the call sites
    pub fn new(
        client: Client,
        iam: Arc<dyn IamApi>,
        ssm: Arc<dyn SsmApi>,
        settings: Settings,
        account: String,
        metrics: Metrics,
        resync: Duration,
        reporter: &str,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(reporter.into()),
            },
        );
        Self {
            client,
            iam,
            ssm,
            settings,
            account,
            metrics,
            resync,
            recorder,
            watch_namespace: None,
            census_period: census::DEFAULT_PERIOD,
            identities: identities::Identities::default(),
            shared_documents: shared::SharedDocuments::default(),
            granting: granting::GrantingNow::default(),
            moved_grants: MovedGrants::default(),
            states: Mutex::new(BTreeMap::new()),
            endpoints: tokio::sync::Mutex::new(()),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    /// The context of an operator that watches only `namespace`'s grants.
    pub fn watching(mut self, namespace: Option<String>) -> Self {
        self.watch_namespace = namespace;
        self
    }

    /// The context of an operator whose census counts open sessions every `period`.
    pub fn counting_sessions_every(mut self, period: Duration) -> Self {
        self.census_period = period;
        self
    }

    /// The ARN of the operator's managed policy `name` in this account.
    pub fn policy_arn(&self, name: &str) -> String {
        naming::policy_arn(&self.settings.partition, &self.account, name)
    }

    /// Where the operator's AWS objects live: partition, account and cluster name.
    pub fn scope(&self) -> (&str, &str, &str) {
        (
            &self.settings.partition,
            &self.account,
            &self.settings.cluster,
        )
    }

    /// Counts one more failure in a row for `key`; returns how many there are now.
    pub(crate) fn count_failure(&self, key: &str) -> u32 {
        let Ok(mut failures) = self.failures.lock() else {
            return 1;
        };
        let count = failures.entry(key.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    /// Forgets `key`'s failures after a successful reconcile.
    pub(crate) fn forget_failures(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    /// Exports when `grant`'s window ends, or withdraws the series when it has no end (or the
    /// grant is gone), so that the label set follows the grants.
    pub(crate) fn set_expiry(&self, grant: &SessionAccess, expires_at: Option<Timestamp>) {
        let (namespace, name) = (grant.namespace().unwrap_or_default(), grant.name_any());
        let labels = [namespace.as_str(), name.as_str()];
        match expires_at {
            Some(at) => (self.metrics.grant_expiry.with_label_values(&labels)).set(at.as_second()),
            // Absent already is fine.
            None => {
                let _ = self.metrics.grant_expiry.remove_label_values(&labels);
            }
        }
    }

    /// Sets (or, with `None`, forgets) one grant's state and updates the `grants` gauge.
    pub(crate) fn set_state(&self, grant: &str, state: Option<&'static str>) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        match state {
            Some(s) => states.insert(grant.to_owned(), s),
            None => states.remove(grant),
        };
        for name in ["ready", "failed", "expired"] {
            let count = states.values().filter(|s| **s == name).count();
            self.metrics
                .grants
                .with_label_values(&[name])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// The pause before the first retry of a failed reconcile; it doubles with each further
/// failure in a row.
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// The longest pause between retries of a failing reconcile: a failure that lasts is still
/// retried every few minutes, never in a hot loop.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(300);

/// The pause before retrying after `failures` failed reconciles in a row (1 for the first).
pub fn retry_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY_PAUSE
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_PAUSE)
}

/// The key under which an object's failures in a row are counted.
pub(crate) fn failure_key(kind: &str, id: &str) -> String {
    format!("{kind}/{id}")
}
