//! The fleet-access API on a real kube-apiserver: the generated CRDs install and become
//! Established, every example is accepted, every invalid object of the shared corpus is rejected
//! with a message naming its field, and `kubectl get` shows the printer columns.

use std::path::Path;

use fleet_access_crds::SessionAccess;
use fleet_access_tests::ControlPlane;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, PostParams},
};
use serde::Deserialize;
use serde_json::{Value, json};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

async fn with_crds() -> &'static ControlPlane {
    let control_plane = ControlPlane::shared()
        .await
        .expect("control plane starts (run tests/env/setup.sh first)");
    let crds = std::fs::read_to_string(Path::new(REPO).join("deploy/crds/fleet-access.yaml"))
        .expect("deploy/crds/fleet-access.yaml");
    control_plane
        .install_fleet_access(&crds)
        .await
        .expect("the CRDs apply");
    control_plane
}

/// The object as YAML, moved into `namespace`.
fn in_namespace(mut object: Value, namespace: &str) -> String {
    object["metadata"]["namespace"] = json!(namespace);
    serde_yaml::to_string(&object).expect("yaml")
}

#[tokio::test]
async fn every_example_is_accepted() {
    let control_plane = with_crds().await;
    let namespace = control_plane
        .namespace("api-examples")
        .await
        .expect("namespace");
    let mut accepted = 0;
    for entry in std::fs::read_dir(Path::new(REPO).join("deploy/examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let object: Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("yaml");
        let cluster_scoped = ["SessionPreferences", "SessionAccessPolicy"];
        let yaml = if cluster_scoped.iter().any(|kind| object["kind"] == *kind) {
            serde_yaml::to_string(&object).expect("yaml")
        } else {
            in_namespace(object, namespace.name())
        };
        let stored = control_plane
            .apply_yaml(&yaml, None)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
        assert_eq!(stored.len(), 1);
        accepted += 1;
    }
    assert!(accepted >= 8, "{accepted} examples");
}

#[derive(Deserialize)]
struct InvalidCase {
    case: String,
    field: String,
    message: String,
    spec: Value,
}

#[tokio::test]
async fn invalid_objects_are_rejected_naming_the_field() {
    let control_plane = with_crds().await;
    let namespace = control_plane
        .namespace("api-invalid")
        .await
        .expect("namespace");
    let corpus = std::fs::read_to_string(
        Path::new(REPO).join("crds/tests/data/invalid-session-access.yaml"),
    )
    .expect("corpus");
    let cases: Vec<InvalidCase> = serde_yaml::from_str(&corpus).expect("corpus parses");
    assert!(cases.len() >= 15, "{} cases", cases.len());
    let resource = ApiResource::erase::<SessionAccess>(&());
    let sessions: Api<DynamicObject> =
        Api::namespaced_with(namespace.client(), namespace.name(), &resource);
    for (i, case) in cases.into_iter().enumerate() {
        let object = json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccess",
            "metadata": {"name": format!("invalid-{i}")},
            "spec": case.spec,
        });
        // Created the way a first `kubectl apply` or `kubectl create` sends it: a POST.
        let object: DynamicObject = serde_json::from_value(object).expect("object");
        let result = sessions.create(&PostParams::default(), &object).await;
        let error = match result {
            Ok(_) => panic!("{}: the API server accepted it", case.case),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains(&case.field) && error.contains(&case.message),
            "{}: expected {} and {:?} in the API server's message, got: {error}",
            case.case,
            case.field,
            case.message
        );
    }
}

#[tokio::test]
async fn preferences_are_a_singleton_named_default() {
    let control_plane = with_crds().await;
    let yaml = "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionPreferences\nmetadata: {name: other}\nspec: {idleSessionTimeoutMinutes: 5}\n";
    let error = control_plane
        .apply_yaml(yaml, None)
        .await
        .expect_err("rejected")
        .to_string();
    assert!(error.contains("name it default"), "{error}");
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let control_plane = with_crds().await;
    let namespace = control_plane
        .namespace("api-columns")
        .await
        .expect("namespace");
    let example = std::fs::read_to_string(Path::new(REPO).join("deploy/examples/time-window.yaml"))
        .expect("example");
    let object: Value = serde_yaml::from_str(&example).expect("yaml");
    control_plane
        .apply_yaml(&in_namespace(object, namespace.name()), None)
        .await
        .expect("applies");
    let output = control_plane
        .run_kubectl(["get", "sacc", "-n", namespace.name()])
        .expect("kubectl get");
    let mut lines = output.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "EFFECT", "TARGETS", "READY", "APPROVAL", "SESSIONS", "EXPIRES", "AGE"
        ],
        "{output}"
    );
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(row[..2], ["maintenance-window", "Allow"], "{output}");
}
