//! `agent-bridge serve`: watches the endpoint Services the operator writes in the bridge's
//! namespace and keeps the listener set equal to what they describe; serves the admin port;
//! drains on SIGTERM.
//!
//! ```text
//!  Service watch ──▶ reflector store ──(any change)──▶ listener::endpoints ──▶ Listeners::apply
//!  Pod watch ──▶ clients::PodDirectory (who each connection is from) ──▶ audit records
//!  NetworkPolicy and namespace watches ──▶ client_policy (whether a grant admits it)
//!  ready ◀── Services applied, and (when checking) policies, namespaces and pods listed
//!  SIGTERM ──▶ not ready ──▶ stop accepting ──grace──▶ terminate the rest ──▶ exit
//! ```

use std::{sync::Arc, time::Duration};

use fleet_access_crds::bridge_contract::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    admin::Readiness,
    audit::AuditSink,
    client_policy::ClientPolicies,
    clients::{Changes, PodDirectory},
    listener::{Clients, Limits, Listeners, endpoints},
    ssm::ControlPlane,
};

/// Where and how `serve` runs.
pub struct ServeConfig {
    /// The namespace whose endpoint Services to serve.
    pub namespace: String,
    /// The address listeners bind (all interfaces in a pod; loopback in tests).
    pub listen_address: std::net::IpAddr,
    /// Limits on concurrent sessions.
    pub limits: Limits,
    /// How long running sessions may continue after SIGTERM.
    pub grace: Duration,
    /// Whether to watch the cluster's pods to attribute connections to their client pods.
    pub attribute_clients: bool,
    /// Whether to carry only the connections some grant's NetworkPolicy admits.
    pub check_client_policies: bool,
    /// Where each connection's record goes.
    pub audit: Arc<dyn AuditSink>,
}

/// How long `serve` waits at start for the first listing of each watch about clients.
const CLIENT_LIST_WAIT: Duration = Duration::from_secs(10);

/// Runs until `shutdown` fires, then drains.
pub async fn run<C: ControlPlane + 'static>(
    client: Client,
    context: Arc<crate::tunnel::SessionContext<C>>,
    config: ServeConfig,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let ServeConfig {
        namespace,
        listen_address,
        limits,
        grace,
        attribute_clients,
        check_client_policies,
        audit,
    } = config;
    let metrics = context.metrics.clone();
    let changes = Changes::default();
    let mut watches = tokio::task::JoinSet::new();
    let pods = match attribute_clients {
        true => {
            let (directory, watch) = PodDirectory::watch(client.clone(), changes.clone(), &metrics);
            watches.spawn(watch);
            directory
        }
        false => PodDirectory::disabled(),
    };
    let policies = match check_client_policies {
        true => {
            let (policies, watch) =
                ClientPolicies::watch(client.clone(), &namespace, changes, &metrics);
            watches.spawn(watch);
            Some(policies)
        }
        false => None,
    };
    // Connections accepted before the pods are listed could not be attributed: wait a little,
    // not forever (without permission to list them, the bridge still serves).
    if tokio::time::timeout(CLIENT_LIST_WAIT, pods.listed())
        .await
        .is_err()
    {
        warn!(
            wait_seconds = CLIENT_LIST_WAIT.as_secs(),
            "pods not listed yet: connections are recorded by address until they are"
        );
    }
    // Nor admitted before the policies are: until then the bridge refuses every connection,
    // so it is not ready (a rollout without the permission to list them stops at its first
    // pod, the old ones still serving).
    let checkable = {
        let (pods, policies) = (pods.clone(), policies.clone());
        async move {
            if let Some(policies) = policies {
                policies.listed(&pods).await;
            }
        }
    };
    let mut checkable = std::pin::pin!(checkable);
    let mut can_check = tokio::time::timeout(CLIENT_LIST_WAIT, &mut checkable)
        .await
        .is_ok();
    if !can_check {
        warn!(
            wait_seconds = CLIENT_LIST_WAIT.as_secs(),
            "the grants' NetworkPolicies, the namespaces or the pods are not listed yet: the \
             bridge is not ready, and refuses every connection, until they are"
        );
    }
    let api: Api<Service> = Api::namespaced(client, &namespace);
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
    let (store, writer) = reflector::store();
    // Every watch event (apply, delete, relist) leads to a full recompute from the store, so a
    // missed event heals on the next one.
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(&selector)),
    )
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let clients = Clients {
        pods,
        policies,
        sink: Some(audit),
    };
    let mut listeners = Listeners::new(context, limits, listen_address, clients);
    let service_failures = metrics.watch_failures("services");
    // Whether the Services have been listed and their listeners opened.
    let mut serving = false;
    info!(namespace, selector, "watching endpoint Services");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut checkable, if !can_check => {
                info!("listed what connections are judged by");
                can_check = true;
                readiness.set(serving);
                continue;
            }
            event = stream.next() => match event {
                None => break,
                Some(Err(error)) => {
                    service_failures.inc();
                    warn!(%error, "watching Services failed; retrying");
                    continue;
                }
                // A (re)list is under way: the store is complete only at `InitDone`. (Awaiting
                // `store.wait_until_ready()` here instead would stop polling the very stream
                // that makes it ready.)
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                Some(Ok(_)) => {}
            },
        }
        let services = store.state();
        let desired = endpoints(services.iter().map(|s| {
            (
                s.metadata.name.as_deref().unwrap_or(""),
                s.metadata.annotations.as_ref().unwrap_or(&EMPTY),
            )
        }));
        for (endpoint, error) in listeners.apply(&desired).await {
            warn!(instance = endpoint.instance_id, port = endpoint.listen_port, %error, "cannot listen");
        }
        serving = true;
        readiness.set(can_check);
    }
    readiness.set(false);
    info!(grace_seconds = grace.as_secs(), "draining");
    listeners.shutdown(grace).await;
    watches.abort_all();
    info!("drained");
}

static EMPTY: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
