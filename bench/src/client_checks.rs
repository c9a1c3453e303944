//! What checking a connection's client costs the bridge, in-process, as the cluster's pods
//! grow: who has the source address (`clients::PodDirectory`, an index by address) and which
//! grant's NetworkPolicy admits it (`client_policy::ClientPolicies::look`). The bridge makes the
//! check once per connection as it arrives, and again for every carried connection after each
//! change of the pods, policies or namespaces it watches (at most once a second). The
//! reference, in the same run: the same check with every pod scanned for the address
//! (`clients::resolve_in`), as the bridge made it before its pods were indexed.

use std::{collections::BTreeMap, fmt::Write as _, hint::black_box, net::IpAddr};

use fleet_access_agent_bridge::{
    client_policy::{ClientPolicies, Verdict, admitting_grants},
    clients::{Client, PodDirectory, resolve_in},
};
use fleet_access_crds::bridge_contract::NETWORK_POLICY_GRANT_ANNOTATION;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};

use crate::{figures::median_rate, scenarios::Options};

/// The cluster sizes measured (running pods).
pub const POD_COUNTS: [usize; 3] = [1_000, 10_000, 50_000];
/// Grants with bridge endpoints, one NetworkPolicy each.
const GRANTS: usize = 200;
/// Client namespaces, the grants' and the pods' alike.
const NAMESPACES: usize = 50;
/// Checks timed per run and cluster size, each from another pod.
const CHECKS: usize = 2_000;

/// One cluster size's figures: microseconds per check, one per run.
#[derive(Clone, Debug)]
pub struct ChecksRow {
    /// Running pods.
    pub pods: usize,
    /// The bridge's check.
    pub indexed: Vec<f64>,
    /// The reference: the pods scanned.
    pub scanned: Vec<f64>,
}

/// The part's figures.
#[derive(Clone, Debug)]
pub struct ClientChecks {
    /// One row per cluster size.
    pub rows: Vec<ChecksRow>,
}

/// Runs the part: for each cluster size, `options.runs` runs of both ways, interleaved.
pub fn run(options: &Options) -> anyhow::Result<ClientChecks> {
    let policies: Vec<NetworkPolicy> = (0..GRANTS).map(grant_policy).collect::<Result<_, _>>()?;
    let namespaces: Vec<Namespace> = (0..NAMESPACES).map(namespace).collect::<Result<_, _>>()?;
    let labels: BTreeMap<String, BTreeMap<String, String>> = (namespaces.iter())
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            (name, n.metadata.labels.clone().unwrap_or_default())
        })
        .collect();
    let checks = ClientPolicies::listing(policies.clone(), namespaces);
    let mut rows = Vec::new();
    for pods in POD_COUNTS {
        let all: Vec<Pod> = (0..pods).map(pod).collect::<Result<_, _>>()?;
        let directory = PodDirectory::listing(all.clone());
        let mut row = ChecksRow {
            pods,
            indexed: Vec::new(),
            scanned: Vec::new(),
        };
        for _ in 0..options.runs {
            row.indexed.push(timed(pods, |address, port| {
                let verdict = checks.look(&directory, address, port);
                matches!(verdict, Verdict::Admitted { .. })
            })?);
            row.scanned.push(timed(pods, |address, port| {
                let client = resolve_in(&all, address);
                let namespace = match &client {
                    Client::Pod(pod) => labels.get(&pod.namespace),
                    Client::Unresolved { .. } => None,
                };
                admitting_grants(&policies, port, address, &client, namespace).is_some()
            })?);
        }
        rows.push(row);
    }
    Ok(ClientChecks { rows })
}

/// Microseconds per check of [`CHECKS`] clients spread over `pods`, each to its grant's port;
/// an error unless `check` admits every one (what is timed must be the whole check).
fn timed(pods: usize, mut check: impl FnMut(IpAddr, u16) -> bool) -> anyhow::Result<f64> {
    let clients: Vec<(IpAddr, u16)> = (0..CHECKS)
        .map(|i| {
            let pod = i * pods / CHECKS;
            (address_of(pod), grant_port(pod % GRANTS))
        })
        .collect();
    let started = tokio::time::Instant::now();
    let admitted = (clients.iter())
        .filter(|(address, port)| black_box(check(*address, *port)))
        .count();
    let took = started.elapsed();
    anyhow::ensure!(
        admitted == CHECKS,
        "{admitted} of {CHECKS} clients admitted"
    );
    Ok(took.as_secs_f64() * 1e6 / CHECKS as f64)
}

fn address_of(pod: usize) -> IpAddr {
    IpAddr::from([10, (pod >> 16) as u8, (pod >> 8) as u8, pod as u8])
}

fn grant_port(grant: usize) -> u16 {
    20_000 + grant as u16
}

/// Pod `i`: in namespace `i % NAMESPACES`, labelled for grant `i % GRANTS`.
fn pod(i: usize) -> serde_json::Result<Pod> {
    let address = address_of(i).to_string();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("client-{i}"), "namespace": format!("team-{}", i % NAMESPACES),
            "labels": {"app": format!("app-{}", i % GRANTS)}},
        "spec": {"serviceAccountName": "deployer", "containers": []},
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    }))
}

fn namespace(i: usize) -> serde_json::Result<Namespace> {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("team-{i}"),
            "labels": {"kubernetes.io/metadata.name": format!("team-{i}")}},
    }))
}

/// Grant `g`'s NetworkPolicy as the operator writes it: its app's pods in its namespace, to
/// its port.
fn grant_policy(g: usize) -> serde_json::Result<NetworkPolicy> {
    let namespace = format!("team-{}", g % NAMESPACES);
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("grant-{g}"), "namespace": "fleet-access",
            "annotations": {NETWORK_POLICY_GRANT_ANNOTATION: format!("{namespace}/grant-{g}")}},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "agent-bridge"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": format!("app-{g}")}},
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}],
                "ports": [{"port": grant_port(g), "protocol": "TCP"}],
            }],
        },
    }))
}

/// Writes the part's section.
pub fn render(part: &ClientChecks, section: usize, out: &mut String) {
    let runs = part.rows.iter().map(|r| r.indexed.len()).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "## {section}. Checking a connection's client (in-process)\n\n\
         What the bridge spends on one connection's check: who has its source address, and which of {GRANTS} \
         grants' NetworkPolicies (pod and namespace selectors, as the operator writes them) admits it, \
         {CHECKS} clients spread over the cluster's running pods. The bridge makes it when a connection \
         arrives, and for every carried connection after each change of what it watches (at most once a \
         second). Reference, in the same run: the same check with every pod scanned for the address. Runs \
         interleave the two; median of {runs} runs.\n\n\
         | Running pods | Bridge (µs per check) | Pods scanned, the reference (µs) | Reference / bridge |\n\
         |---:|---:|---:|---:|"
    );
    for row in &part.rows {
        let (Some(indexed), Some(scanned)) = (median_rate(&row.indexed), median_rate(&row.scanned))
        else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {indexed:.1} | {scanned:.1} | {:.0}x |",
            row.pods,
            scanned / indexed
        );
    }
    let _ = writeln!(out);
}
