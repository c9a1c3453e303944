//! Tenancy against real parts: a tenant that may manage grants in its own namespace only (a
//! ServiceAccount bound to the shipped `fleet-access-grant-editor` ClusterRole) gets what its
//! `SessionAccessPolicy` allows and nothing else, refused first by the shipped admission policy
//! (`deploy/tenancy/`) and, with that policy removed, by the operator, which then writes nothing
//! to AWS. Narrowing the boundary revokes what no longer fits.
//!
//! On a control plane of its own: the admission policy is cluster-wide, and the test removes
//! it halfway.

mod support;

use std::{path::Path, time::Duration};

use fleet_access_crds::{fixtures::GrantFixture, ssm_documents};
use fleet_access_operator::model::naming;
use fleet_access_tests::ControlPlane;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use support::*;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const TENANT: &str = "tenant";
const INSIDE_INSTANCE: &str = "i-0000000000000000a";
const OUTSIDE_INSTANCE: &str = "i-0000000000000000c";

/// The tenant's boundary: its CI roles, two instances or staging tags, SSH, shells that stream
/// to its log group as `deploy` (encrypted with its own keys only), PostgreSQL, two-hour windows, bridge clients from `tools`.
fn boundary(namespace: &str, ssh: bool) -> Value {
    json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessPolicy",
        "metadata": {"name": TENANT},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "principals": {"roles": ["tenant-ci-*"]},
            "targets": {
                "instanceIds": [INSIDE_INSTANCE, "i-0000000000000000b"],
                "tags": {"Environment": ["staging"]},
            },
            "sessions": {"ssh": ssh, "shell": true, "ports": [5432], "runAsUsers": ["deploy"],
                "remoteHosts": [{"host": "*.tenant.internal", "ports": [5432]}]},
            "shellLogging": {"cloudWatchLogGroups": ["/fleet-access/tenant*"], "requireStreaming": true,
                "kmsKeys": ["alias/tenant-*"]},
            "window": {"maxDuration": "2h", "requireExpiresAt": true},
            "bridge": {"clientNamespaces": ["tools"]},
        },
    })
}

/// In `hours` from now, as RFC 3339.
fn hours_from_now(hours: i64) -> String {
    (Timestamp::now() + SignedDuration::from_hours(hours)).to_string()
}

/// `user/<name>`, `role/<name>`, `group/<name>`: the identities a grant spec names.
fn identities_named(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (field, kind) in [("users", "user"), ("roles", "role"), ("groups", "group")] {
        for name in spec["principals"][field].as_array().into_iter().flatten() {
            out.push(format!("{kind}/{}", name.as_str().unwrap_or_default()));
        }
    }
    out
}

/// A grant spec inside the boundary for `role`.
fn inside(role: &str) -> Value {
    json!({
        "principals": {"roles": [role]},
        "targets": {"instanceIds": [INSIDE_INSTANCE]},
        "sessions": {"ssh": true},
        "window": {"expiresAt": hours_from_now(1)},
    })
}

/// Grants each outside the boundary in one way: (name, the field refused, the spec).
fn outside(role: &str) -> Vec<(&'static str, &'static str, Value)> {
    let with = |change: &dyn Fn(&mut Value)| {
        let mut spec = inside(role);
        change(&mut spec);
        spec
    };
    let logged = json!({"cloudWatch": {"logGroupName": "/fleet-access/tenant", "streaming": true}});
    vec![
        (
            "foreign-instance",
            "spec.targets.instanceIds",
            with(&|s| s["targets"] = json!({"instanceIds": [OUTSIDE_INSTANCE]})),
        ),
        (
            "foreign-tag",
            "spec.targets.tags",
            with(&|s| s["targets"] = json!({"tags": {"Environment": "production"}})),
        ),
        (
            "all-instances",
            "spec.targets.allInstances",
            with(&|s| s["targets"] = json!({"allInstances": true})),
        ),
        (
            "foreign-role",
            "spec.principals.roles",
            with(&|s| s["principals"] = json!({"roles": ["intern-ci"]})),
        ),
        (
            "deny-break-glass",
            "spec.principals.roles",
            json!({
                "effect": "Deny",
                "principals": {"roles": ["break-glass"]},
                "targets": {"instanceIds": [INSIDE_INSTANCE]},
                "window": {"expiresAt": hours_from_now(1)},
            }),
        ),
        (
            "root-shell",
            "spec.logging.runAs.defaultUser",
            with(&|s| {
                s["sessions"] = json!({"shell": true});
                s["logging"] = logged.clone();
                s["logging"]["runAs"] = json!({"enabled": true, "defaultUser": "root"});
            }),
        ),
        (
            "foreign-kms-key",
            "spec.logging.kmsKeyId",
            with(&|s| {
                s["sessions"] = json!({"shell": true});
                s["logging"] = logged.clone();
                s["logging"]["kmsKeyId"] = json!("alias/payroll");
            }),
        ),
        (
            "unlogged-shell",
            "spec.logging.cloudWatch",
            with(&|s| s["sessions"] = json!({"shell": true})),
        ),
        (
            "mysql",
            "spec.sessions.ports",
            with(&|s| s["sessions"] = json!({"ssh": true, "ports": [3306]})),
        ),
        (
            "other-db",
            "spec.sessions.remoteHosts",
            with(&|s| {
                s["sessions"] =
                    json!({"remoteHosts": [{"host": "orders.other.internal", "port": 5432}]})
            }),
        ),
        (
            "open-bridge",
            "spec.bridge.clients",
            with(&|s| {
                s["bridge"] =
                    json!({"ports": [22], "clients": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
            }),
        ),
        (
            "foreign-clients",
            "spec.bridge.clients",
            with(&|s| {
                s["bridge"] = json!({"ports": [22], "clients": [{"namespaceSelector":
                {"matchLabels": {"kubernetes.io/metadata.name": "other-team"}}}]});
            }),
        ),
        (
            "too-long",
            "spec.window.expiresAt",
            with(&|s| s["window"] = json!({"expiresAt": hours_from_now(5)})),
        ),
        (
            "endless",
            "spec.window.expiresAt",
            with(&|s| {
                s.as_object_mut().map(|o| o.remove("window"));
            }),
        ),
    ]
}

fn grant_yaml(namespace: &str, name: &str, spec: &Value) -> String {
    (GrantFixture::new(namespace, name).spec_json(spec.clone())).yaml()
}

/// Waits until the admission policy refuses (`enforced`) or admits a grant outside the
/// boundary, in a server-side dry run: the API server loads policies and bindings a moment
/// after they are written.
async fn wait_admission(control_plane: &ControlPlane, namespace: &str, role: &str, enforced: bool) {
    let probe = grant_yaml(namespace, "probe", &outside(role)[0].2);
    wait_for(&format!("admission enforced={enforced}"), || async {
        let result = kubectl_apply(control_plane, None, &probe, &["--dry-run=server"]).await;
        match (enforced, result) {
            (true, Err(error)) if error.contains("fleet-access-boundaries") => Some(()),
            (false, Ok(_)) => Some(()),
            _ => None,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_gets_only_what_its_boundary_allows() {
    let control_plane = Harness::own_control_plane().await;
    let h = Harness::start_on(&control_plane, "tenancy", Duration::from_secs(300)).await;
    let ns = h.namespace.name().to_owned();
    let role = format!("tenant-ci-{ns}");
    h.role(&role).await;

    // A grant the operator refuses grants nothing, so its end ends nothing: a tenant cannot end
    // the sessions of principals it names by saying the grant's window has ended, however often
    // it moves that end.
    let roles_session = h
        .start_session_as(
            &format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/ops"),
            INSIDE_INSTANCE,
        )
        .await;
    let ended_ago = |seconds: i64| {
        let mut spec = inside(&role);
        let expires_at = Timestamp::now() - SignedDuration::from_secs(seconds);
        spec["window"] = json!({"expiresAt": expires_at.to_string()});
        spec
    };
    h.create("ended", ended_ago(3600)).await;
    for moved in [false, true] {
        if moved {
            h.set_spec("ended", ended_ago(1)).await;
        }
        let ended = h.wait_condition("ended", "Expired", "True").await;
        assert_eq!(
            find(&ended, "Admitted").map(|c| c.status.as_str()),
            Some("False")
        );
        assert!(
            h.active_sessions(INSIDE_INSTANCE)
                .await
                .contains(&roles_session),
            "a refused grant ended a session: {}",
            h.calls()
        );
        assert_eq!(h.terminated(), 0, "{}", h.calls());
    }
    h.delete("ended").await;

    // No boundary selects the namespace yet: the operator refuses the grant, writes nothing.
    h.create("ci", inside(&role)).await;
    let refused = h.wait_condition("ci", "Admitted", "False").await;
    let message = &find(&refused, "Admitted").expect("Admitted").message;
    assert!(
        message.contains(&format!("no SessionAccessPolicy selects namespace {ns}")),
        "{message}"
    );
    assert_eq!(h.policies_in_namespace().await, Vec::<String>::new());
    let events: kube::Api<Event> = h.namespace.api();
    let warning = wait_for("an OutsideBoundary Event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("OutsideBoundary")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ci")
        })
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(
        warning
            .note
            .unwrap_or_default()
            .contains("no SessionAccessPolicy selects")
    );

    // The boundary admits it: the boundary's watch reconciles the grant to Ready.
    control_plane
        .apply_yaml(&boundary(&ns, true).to_string(), None)
        .await
        .expect("the boundary");
    h.wait_condition("ci", "Ready", "True").await;
    let arn = h.set_arn(&format!("role/{role}"));
    assert!(h.policy_document(&arn).await.is_some());

    // The shipped admission policy, and a tenant bound to the shipped ClusterRole in its
    // namespace only.
    let tenancy = Path::new(REPO).join("deploy/tenancy");
    for file in [
        "validating-admission-policy.yaml",
        "grant-editor.yaml",
        "boundary-reader.yaml",
    ] {
        control_plane
            .apply_yaml_file(&tenancy.join(file), None)
            .await
            .expect("deploy/tenancy");
    }
    let tenant_rbac = format!(
        r#"{{"apiVersion": "v1", "kind": "List", "items": [
            {{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {{"name": "{TENANT}", "namespace": "{ns}"}}}},
            {{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {{"name": "{TENANT}-grants", "namespace": "{ns}"}},
              "roleRef": {{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fleet-access-grant-editor"}},
              "subjects": [{{"kind": "ServiceAccount", "name": "{TENANT}", "namespace": "{ns}"}}]}}]}}"#
    );
    kubectl_apply(&control_plane, None, &tenant_rbac, &[])
        .await
        .expect("tenant RBAC");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("tenant.kubeconfig");
    control_plane
        .service_account_kubeconfig(&ns, TENANT, Duration::from_secs(3600), &kubeconfig)
        .expect("the tenant's kubeconfig");
    wait_admission(&control_plane, &ns, &role, true).await;

    // Every grant outside the boundary is refused at once, naming the field and the boundary.
    let cases = outside(&role);
    assert!(cases.len() >= 10);
    for (name, field, spec) in &cases {
        let error = kubectl_apply(
            &control_plane,
            Some(&kubeconfig),
            &grant_yaml(&ns, name, spec),
            &[],
        )
        .await
        .expect_err(&format!("{name} must be refused at admission"));
        assert!(error.contains(field), "{name}: {error}");
        assert!(
            error.contains("SessionAccessPolicy tenant"),
            "{name}: {error}"
        );
    }
    // A shell grant may name a KMS key its boundary lists, and none when the boundary lists
    // none (its principals would get kms:GenerateDataKey on any key of the account).
    let mut keyed = inside(&role);
    keyed["sessions"] = json!({"shell": true});
    keyed["logging"] = json!({"cloudWatch": {"logGroupName": "/fleet-access/tenant", "streaming": true},
        "kmsKeyId": "alias/tenant-sessions"});
    let keyed = grant_yaml(&ns, "keyed", &keyed);
    let dry_run = || {
        kubectl_apply(
            &control_plane,
            Some(&kubeconfig),
            &keyed,
            &["--dry-run=server"],
        )
    };
    dry_run().await.expect("a key the boundary lists");
    let mut keyless = boundary(&ns, true);
    keyless["spec"]["shellLogging"]["kmsKeys"] = json!([]);
    for (spec, admitted) in [(keyless, false), (boundary(&ns, true), true)] {
        control_plane
            .apply_yaml(&spec.to_string(), None)
            .await
            .expect("the boundary");
        let refusal = wait_for("the admission policy to judge by the boundary", || async {
            match dry_run().await {
                Ok(_) => admitted.then_some(None),
                Err(error) => {
                    (!admitted && error.contains("spec.logging.kmsKeyId")).then_some(Some(error))
                }
            }
        })
        .await;
        if let Some(error) = refusal {
            assert!(error.contains("accepts no KMS key"), "{error}");
        }
    }

    // The tenant reads the boundaries once bound cluster-wide to the shipped reader (a
    // RoleBinding cannot reach them), and may not widen its boundary, nor grant elsewhere.
    let read_boundary = || {
        (control_plane.kubectl_with(&kubeconfig).expect("kubectl"))
            .args(["get", "sessionaccesspolicy", TENANT, "-o", "name"])
            .output()
            .expect("kubectl runs")
    };
    let denied = read_boundary();
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("forbidden"),
        "{denied:?}"
    );
    let reader = format!(
        r#"{{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {{"name": "{TENANT}-{ns}-boundaries"}},
            "roleRef": {{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fleet-access-boundary-reader"}},
            "subjects": [{{"kind": "ServiceAccount", "name": "{TENANT}", "namespace": "{ns}"}}]}}"#
    );
    kubectl_apply(&control_plane, None, &reader, &[])
        .await
        .expect("the reader's binding");
    let read = wait_for("the tenant to read its boundary", || async {
        let read = read_boundary();
        read.status.success().then_some(read)
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        format!("sessionaccesspolicy.fleetaccess.io/{TENANT}")
    );
    let widened = boundary(&ns, true).to_string().replace("tenant-ci-*", "*");
    let error = kubectl_apply(&control_plane, Some(&kubeconfig), &widened, &[])
        .await
        .expect_err("boundaries are the admins'");
    assert!(error.contains("forbidden"), "{error}");
    let elsewhere = grant_yaml("default", "ci", &inside(&role));
    let error = kubectl_apply(&control_plane, Some(&kubeconfig), &elsewhere, &[])
        .await
        .expect_err("only its namespace");
    assert!(error.contains("forbidden"), "{error}");
    // A grant inside the boundary is admitted. (Not Ready: one of the staging instances runs an
    // agent too old for remote hosts, and the grant says so.)
    let second = GrantFixture::new(&ns, "ci-staging")
        .roles([role.as_str()])
        .tag("Environment", "staging")
        .ssh()
        .remote_host("orders.tenant.internal", 5432)
        .expires_at(&hours_from_now(1))
        .yaml();
    kubectl_apply(&control_plane, Some(&kubeconfig), &second, &[])
        .await
        .expect("inside the boundary");
    let staging = h.wait_condition("ci-staging", "PolicySynced", "True").await;
    assert_eq!(
        find(&staging, "Admitted").map(|c| c.status.as_str()),
        Some("True")
    );
    let targets = find(&staging, "TargetsResolved").expect("TargetsResolved");
    assert_eq!(targets.reason, "AgentTooOld", "{targets:?}");
    assert!(
        targets.message.contains("i-0000000000000000b (2.3.500.0)"),
        "{}",
        targets.message
    );

    // Without the admission policy, the same grants get in, and the operator refuses each,
    // naming the field, with nothing written to AWS.
    control_plane
        .run_kubectl([
            "delete",
            "validatingadmissionpolicybinding",
            "fleet-access-boundaries",
        ])
        .expect("the binding goes");
    wait_admission(&control_plane, &ns, &role, false).await;
    for (name, _, spec) in &cases {
        kubectl_apply(
            &control_plane,
            Some(&kubeconfig),
            &grant_yaml(&ns, name, spec),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{name} is admitted without the policy: {e}"));
    }
    for (name, field, spec) in &cases {
        let grant = h.wait_condition(name, "Admitted", "False").await;
        let admitted = find(&grant, "Admitted").expect("Admitted");
        assert!(
            admitted.message.contains(field),
            "{name}: {}",
            admitted.message
        );
        assert!(
            admitted.message.contains("(SessionAccessPolicy tenant)"),
            "{name}: {}",
            admitted.message
        );
        assert_eq!(
            find(&grant, "Ready").map(|c| c.reason.as_str()),
            Some("OutsideBoundary")
        );
        for identity in identities_named(spec) {
            if identity != format!("role/{role}") {
                assert!(
                    h.policy_document(&h.set_arn(&identity)).await.is_none(),
                    "{name} wrote a policy for {identity}"
                );
            }
        }
    }
    // The role's set holds the admitted grants' statements only, in one policy.
    let policies = h.policies_in_namespace().await;
    assert_eq!(
        policies,
        [naming::identity_policy_name(
            &h.settings.cluster,
            "role",
            &role,
            ""
        )],
        "only the admitted grants' set"
    );
    let (document, _) = h.policy_document(&arn).await.expect("the role's set");
    assert!(
        !document.contains(OUTSIDE_INSTANCE),
        "no refused grant's instance: {document}"
    );
    assert_eq!(
        h.documents_tagged_in_namespace().await,
        Vec::<String>::new()
    );
    // Nor any of the documents the cluster's grants share (a Port document per port, one per
    // remote host): a refused grant writes nothing to AWS, shared or not.
    let cluster = &h.settings.cluster;
    for shared in [
        ssm_documents::port_document_name(cluster, 3306),
        ssm_documents::remote_host_document_name(cluster, "orders.other.internal", 5432),
    ] {
        assert!(
            !h.document_exists(&shared).await,
            "a refused grant created {shared}"
        );
    }

    // Narrowing the boundary (no more SSH) revokes both grants: detached and deleted. (A fresh
    // session of the role: the emulator ends one whose data channel never connects after a
    // minute.)
    let granted_session = h
        .start_session_as(
            &format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/ops"),
            INSIDE_INSTANCE,
        )
        .await;
    control_plane
        .apply_yaml(&boundary(&ns, false).to_string(), None)
        .await
        .expect("the narrowed boundary");
    for name in ["ci", "ci-staging"] {
        let grant = h.wait_condition(name, "Admitted", "False").await;
        let message = &find(&grant, "Admitted").expect("Admitted").message;
        assert!(message.contains("spec.sessions.ssh"), "{message}");
    }
    wait_for("the role's set to go", || async {
        h.policy_document(&arn).await.is_none().then_some(())
    })
    .await;
    assert_eq!(h.policies_in_namespace().await, Vec::<String>::new());
    // And what they granted ends: the role's session on the instance they granted it.
    wait_for("the operator to end the role's session", || async {
        (h.terminated() >= 1).then_some(())
    })
    .await;
    assert!(
        !h.active_sessions(INSIDE_INSTANCE)
            .await
            .contains(&granted_session),
        "{}",
        h.calls()
    );
    h.stop().await;
    control_plane.stop();
}
