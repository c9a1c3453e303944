//! The manifests in `deploy/` against the real kube-apiserver: `kubectl kustomize` builds the
//! base (`deploy/`, with the CRDs), the EKS overlay (`deploy/overlays/eks`) and the monitoring
//! kustomization (`deploy/monitoring`), and every object is applied with server-side dry-run, so
//! the API server validates each one (schemas, RBAC escalation, Pod Security "restricted" on the
//! namespace). Nothing is stored except the namespace, which must exist for namespaced objects
//! to be dry-run at all.
//!
//! The test API server has no Prometheus Operator: the PodMonitors and the PrometheusRule of
//! `deploy/monitoring` are set apart (and their kinds checked), the rest of it is dry-run too.
//! `tests/deploy_monitoring.rs` checks the rules themselves.
//!
//! Static checks that the API server cannot make follow: the contract's pod labels, the drain
//! grace, security contexts, least-privilege RBAC, IRSA annotations.

#![allow(clippy::panic, clippy::unwrap_used)]

use fleet_access_crds::bridge_contract;
use fleet_access_tests::{
    ControlPlane,
    manifests::{deploy_dir, documents, kind, kustomize, name},
};
use serde_json::Value;

fn find<'a>(objects: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == kind_ && name(o) == name_)
        .unwrap_or_else(|| panic!("no {kind_} {name_}"))
}

async fn control_plane() -> &'static ControlPlane {
    ControlPlane::shared().await.expect("control plane")
}

#[tokio::test]
async fn the_base_is_valid_on_a_real_api_server() {
    let control_plane = control_plane().await;
    let objects = kustomize(&deploy_dir()).unwrap();
    let kinds: Vec<&str> = objects.iter().map(kind).collect();
    for expected in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(&expected), "the base has a {expected}");
    }
    assert!(
        !kinds
            .iter()
            .any(|k| ["PodMonitor", "ServiceMonitor", "PrometheusRule"].contains(k)),
        "the base needs no Prometheus Operator CRDs"
    );
    control_plane.dry_run(&objects).unwrap();
}

#[tokio::test]
async fn the_eks_overlay_is_valid_on_a_real_api_server() {
    let control_plane = control_plane().await;
    let overlay = kustomize(&deploy_dir().join("overlays/eks")).unwrap();
    assert!(
        !overlay
            .iter()
            .any(|o| kind(o) == "CustomResourceDefinition"),
        "the overlay leaves the CRDs to `kubectl apply -f deploy/crds/`"
    );
    // The CRDs as documented for overlays: applied first (server-side dry-run here too).
    let mut objects =
        documents(&std::fs::read_to_string(deploy_dir().join("crds/fleet-access.yaml")).unwrap())
            .unwrap();
    objects.extend(overlay.iter().cloned());
    control_plane.dry_run(&objects).unwrap();

    for (account, role) in [
        ("fleet-access-operator", "fleet-access-operator"),
        ("agent-bridge", "fleet-access-bridge"),
    ] {
        let annotation = &find(&overlay, "ServiceAccount", account)["metadata"]["annotations"]["eks.amazonaws.com/role-arn"];
        assert_eq!(
            annotation.as_str(),
            Some(format!("arn:aws:iam::111122223333:role/{role}").as_str()),
            "IRSA annotation on {account}"
        );
    }
    let bridge = find(&overlay, "Deployment", "agent-bridge");
    assert_eq!(bridge["spec"]["replicas"], 3);
    let image = bridge["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert!(image.contains(".dkr.ecr."), "{image}");
}

#[tokio::test]
async fn monitoring_objects_are_valid_apart_from_the_prometheus_operator_kinds() {
    let control_plane = control_plane().await;
    let objects = kustomize(&deploy_dir().join("monitoring")).unwrap();
    let (operator_kinds, plain): (Vec<Value>, Vec<Value>) = objects
        .into_iter()
        .partition(|o| o["apiVersion"] == "monitoring.coreos.com/v1");
    let mut kinds: Vec<&str> = operator_kinds.iter().map(kind).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["PodMonitor", "PodMonitor", "PrometheusRule"]);
    assert!(
        plain.iter().any(|o| kind(o) == "ConfigMap"),
        "the Grafana dashboard ConfigMap"
    );
    // The dashboard ConfigMap goes to the namespace of the base.
    let base = kustomize(&deploy_dir()).unwrap();
    let mut objects: Vec<Value> = base
        .into_iter()
        .filter(|o| kind(o) == "Namespace")
        .collect();
    objects.extend(plain);
    control_plane.dry_run(&objects).unwrap();
}

// === static checks ===

fn base_objects() -> Vec<Value> {
    kustomize(&deploy_dir()).unwrap()
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

#[test]
fn endpoint_services_select_the_bridge_pods_and_only_them() {
    let objects = base_objects();
    let selector = bridge_contract::bridge_pod_selector();
    let matches = |deployment: &Value| {
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        selector
            .iter()
            .all(|(k, v)| labels[k].as_str() == Some(v.as_str()))
    };
    assert!(matches(find(&objects, "Deployment", "agent-bridge")));
    assert!(!matches(find(
        &objects,
        "Deployment",
        "fleet-access-operator"
    )));
}

#[test]
fn the_bridge_drains_within_its_termination_grace() {
    let objects = base_objects();
    let bridge = find(&objects, "Deployment", "agent-bridge");
    let spec = pod_spec(bridge);
    let args: Vec<&str> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[0], "serve");
    let drain: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-seconds="))
        .expect("--drain-seconds is explicit")
        .parse()
        .unwrap();
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > drain && grace <= drain + 10,
        "grace {grace} s leaves the {drain} s drain a few seconds to terminate and exit"
    );
    assert!(bridge["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pdb = find(&objects, "PodDisruptionBudget", "agent-bridge");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        spec["topologySpreadConstraints"].as_array().unwrap().len(),
        2
    );
    let admin = args
        .iter()
        .find_map(|a| a.strip_prefix("--admin-address="))
        .unwrap();
    let port = spec["containers"][0]["ports"][0]["containerPort"]
        .as_u64()
        .unwrap();
    assert!(admin.ends_with(&format!(":{port}")), "probes on {admin}");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(spec["containers"][0][probe]["httpGet"]["port"], "admin");
    }
}

#[test]
fn a_standby_operator_replica_is_ready() {
    // The operator's /readyz is 503 while a replica stands by for the leader Lease; gating
    // readiness on it would leave one of two replicas unready for good (stalled rollouts, a PDB
    // that allows no disruption).
    let objects = base_objects();
    let operator = find(&objects, "Deployment", "fleet-access-operator");
    assert_eq!(operator["spec"]["replicas"], 2);
    let container = &pod_spec(operator)["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let env = container["env"].as_array().unwrap();
    for name in ["POD_NAME", "POD_NAMESPACE"] {
        assert!(
            env.iter().any(|e| e["name"] == name),
            "{name}: the replica's identity and the Lease's namespace"
        );
    }
}

#[test]
fn every_container_is_locked_down() {
    let objects = base_objects();
    let deployments: Vec<&Value> = objects.iter().filter(|o| kind(o) == "Deployment").collect();
    assert_eq!(deployments.len(), 2);
    for deployment in deployments {
        let spec = pod_spec(deployment);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        for container in spec["containers"].as_array().unwrap() {
            let context = &container["securityContext"];
            assert_eq!(context["allowPrivilegeEscalation"], false, "{container}");
            assert_eq!(context["readOnlyRootFilesystem"], true, "{container}");
            assert_eq!(context["capabilities"]["drop"], serde_json::json!(["ALL"]));
            assert!(container["resources"]["requests"].is_object());
            assert!(container["resources"]["limits"]["memory"].is_string());
        }
    }
}

#[test]
fn rbac_is_least_privilege() {
    let objects = base_objects();
    // The bridge: get/list/watch Services and the grants' NetworkPolicies and get Pods in its
    // namespace; cluster-wide only list/watch of Pods and Namespaces (to attribute connections
    // and match them against the grants' selectors), through one binding.
    let bridge = find(&objects, "Role", "agent-bridge");
    assert_eq!(bridge["metadata"]["namespace"], "fleet-access");
    assert_eq!(
        bridge["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]}
        ])
    );
    let cluster_bindings: Vec<&Value> = (objects.iter())
        .filter(|o| kind(o) == "ClusterRoleBinding" && o["subjects"][0]["name"] == "agent-bridge")
        .collect();
    let [binding] = cluster_bindings.as_slice() else {
        panic!("one cluster-wide binding for the bridge: {cluster_bindings:?}");
    };
    let role = find(
        &objects,
        "ClusterRole",
        binding["roleRef"]["name"].as_str().unwrap(),
    );
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]}])
    );
    // The operator: no wildcards, no Secrets, and cluster-wide only its own API group, its
    // Events, and reading namespaces (whose labels select the boundaries of their grants).
    for (kind_, name_) in [
        ("ClusterRole", "fleet-access-operator"),
        ("Role", "fleet-access-operator"),
    ] {
        for rule in find(&objects, kind_, name_)["rules"].as_array().unwrap() {
            let text = rule.to_string();
            assert!(!text.contains('*'), "{kind_} {name_}: {text}");
            assert!(!text.contains("secrets"), "{kind_} {name_}: {text}");
        }
    }
    let cluster = find(&objects, "ClusterRole", "fleet-access-operator");
    for rule in cluster["rules"].as_array().unwrap() {
        let group = rule["apiGroups"][0].as_str().unwrap();
        let reads_namespaces = *rule
            == serde_json::json!({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]});
        assert!(
            ["fleetaccess.io", "events.k8s.io"].contains(&group) || reads_namespaces,
            "cluster-wide only grants, boundaries, their events and reading namespaces: {rule}"
        );
    }
    let namespaced = find(&objects, "Role", "fleet-access-operator");
    assert!(
        namespaced.to_string().contains("coordination.k8s.io"),
        "leader election Lease"
    );
    // The controller watches the endpoint Services and NetworkPolicies it owns, in the bridge
    // namespace only (operator/src/controller/reconcile.rs).
    for resource in ["services", "networkpolicies"] {
        let rule = namespaced["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resources"][0] == resource)
            .unwrap();
        for verb in ["list", "watch", "patch", "delete"] {
            assert!(
                rule["verbs"].as_array().unwrap().iter().any(|v| v == verb),
                "{resource}: {verb}"
            );
        }
    }
}

#[test]
fn the_namespace_denies_by_default() {
    let objects = base_objects();
    let deny = find(&objects, "NetworkPolicy", "default-deny");
    assert_eq!(deny["spec"]["podSelector"], serde_json::json!({}));
    assert_eq!(
        deny["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    for policy in objects.iter().filter(|o| kind(o) == "NetworkPolicy") {
        for rule in policy["spec"]["egress"].as_array().into_iter().flatten() {
            let ports: Vec<u64> = rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            assert!(
                ports.iter().all(|p| [53, 443].contains(p)),
                "egress only to DNS and HTTPS: {policy}"
            );
        }
    }
}
