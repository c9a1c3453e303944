//! The Kubernetes part of the test environment: a real kube-apiserver + etcd answers,
//! hands out namespaces, applies YAML (CRDs and custom resources, rejecting invalid
//! ones), and works with kubectl.

use std::time::Duration;

use fleet_access_tests::{ControlPlane, Locations};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject, ObjectMeta, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

async fn control_plane() -> &'static ControlPlane {
    ControlPlane::shared()
        .await
        .expect("control plane starts (run tests/env/setup.sh first)")
}

#[tokio::test]
async fn apiserver_is_ready_and_reports_the_pinned_version() {
    let control_plane = control_plane().await;
    assert!(control_plane.server_url().starts_with("https://127.0.0.1:"));
    let client = control_plane.client().await.expect("client");
    let readyz = client
        .request_text(
            http::Request::get("/readyz?verbose")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("readyz answers");
    assert!(readyz.contains("readyz check passed"), "{readyz}");
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        version.git_version,
        Locations::get().expect("locations").kube_version
    );
}

#[tokio::test]
async fn each_test_works_in_its_own_namespace() {
    let control_plane = control_plane().await;
    let first = control_plane
        .namespace("env-kube")
        .await
        .expect("namespace");
    let second = control_plane
        .namespace("env-kube")
        .await
        .expect("namespace");
    assert_ne!(first.name(), second.name());
    let namespaces = Api::<Namespace>::all(first.client());
    assert!(
        namespaces
            .get_opt(first.name())
            .await
            .expect("get")
            .is_some()
    );

    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("settings".into()),
            ..ObjectMeta::default()
        },
        data: Some([("greeting".to_owned(), "hello".to_owned())].into()),
        ..ConfigMap::default()
    };
    first
        .api::<ConfigMap>()
        .create(&PostParams::default(), &config_map)
        .await
        .expect("create");
    let read = first
        .api::<ConfigMap>()
        .get("settings")
        .await
        .expect("read back");
    assert_eq!(read.data.expect("data")["greeting"], "hello");
    assert!(
        second
            .api::<ConfigMap>()
            .get_opt("settings")
            .await
            .expect("get")
            .is_none(),
        "namespaces are separate"
    );
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.env-test.fleetaccess.io
spec:
  group: env-test.fleetaccess.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
"#;

#[tokio::test]
async fn apply_yaml_installs_a_crd_and_validates_its_objects() {
    let control_plane = control_plane().await;
    let namespace = control_plane
        .namespace("env-apply")
        .await
        .expect("namespace");
    control_plane
        .apply_yaml(WIDGET_CRD, None)
        .await
        .expect("CRD applies");
    control_plane
        .wait_for_crd_established("widgets.env-test.fleetaccess.io", Duration::from_secs(30))
        .await
        .expect("CRD established");

    let valid = "apiVersion: env-test.fleetaccess.io/v1\nkind: Widget\nmetadata:\n  name: small\nspec:\n  size: 3\n";
    let applied = control_plane
        .apply_yaml(valid, Some(namespace.name()))
        .await
        .expect("valid widget applies");
    assert_eq!(applied.len(), 1);
    assert_eq!(
        applied[0].metadata.namespace.as_deref(),
        Some(namespace.name())
    );

    let gvk = GroupVersionKind::gvk("env-test.fleetaccess.io", "v1", "Widget");
    let widgets: Api<DynamicObject> = Api::namespaced_with(
        namespace.client(),
        namespace.name(),
        &ApiResource::from_gvk_with_plural(&gvk, "widgets"),
    );
    let stored = widgets.get("small").await.expect("read back");
    assert_eq!(stored.data["spec"]["size"], 3);

    let invalid = valid
        .replace("name: small", "name: empty")
        .replace("size: 3", "size: 0");
    let error = control_plane
        .apply_yaml(&invalid, Some(namespace.name()))
        .await
        .expect_err("size 0 is below the minimum");
    assert!(error.to_string().contains("spec.size"), "{error}");
}

#[tokio::test]
async fn kubectl_talks_to_the_control_plane() {
    let control_plane = control_plane().await;
    let namespace = control_plane
        .namespace("env-kubectl")
        .await
        .expect("namespace");
    let output = control_plane
        .run_kubectl(["get", "namespace", namespace.name(), "-o", "name"])
        .expect("kubectl runs");
    assert_eq!(output.trim(), format!("namespace/{}", namespace.name()));
}
