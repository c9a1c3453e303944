//! Approval of grants against real parts: a boundary that requires a second person's approval
//! of grants reaching a production instance; a requester and an approver, each a
//! ServiceAccount with its own kubeconfig and the shipped RBAC (`deploy/tenancy/`); the
//! shipped admission policies; the operator; moto for IAM; the emulator for sessions.
//!
//! Until approved, a grant is Pending and nothing is in AWS; the requester cannot approve its
//! own grant (even holding the approver's role); the approver's approval puts the grant in
//! force; a change of spec needs a new approval; an approval limited in time carries its end
//! into IAM; the census counts the sessions open through the grant (its user's, the bridge's
//! for it); a withdrawal revokes and ends them; and with the admission policies removed, the
//! operator still refuses a self-approval.
//!
//! On a control plane of its own: the admission policies are cluster-wide.

mod support;

use std::{collections::BTreeSet, path::Path, time::Duration};

use fleet_access_crds::{SessionAccessApproval, fixtures::GrantFixture};
use fleet_access_tests::ControlPlane;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Api, api::DeleteParams};
use serde_json::{Value, json};
use support::*;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const PRODUCTION: &str = "i-0000000000000000c";

/// The boundary: one user, SSH to two production instances, bridge endpoints for the
/// namespace's pods, approval for the first instance.
fn boundary(namespace: &str, user: &str) -> Value {
    json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessPolicy",
        "metadata": {"name": format!("prod-{namespace}")},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "principals": {"users": [user]},
            "targets": {"instanceIds": [PRODUCTION, "i-0000000000000000d"]},
            "sessions": {"ssh": true},
            "bridge": {},
            "approval": {"instanceIds": [PRODUCTION]},
        },
    })
}

/// The grant, as YAML: SSH for `user` to the production instance for `hours` from now, and a
/// bridge endpoint for the namespace's ansible pods.
fn grant(namespace: &str, user: &str, requested_by: Option<&str>, hours: i64) -> String {
    let expires = Timestamp::now() + SignedDuration::from_hours(hours);
    let grant = GrantFixture::new(namespace, "oncall")
        .users([user])
        .instance_ids([PRODUCTION])
        .ssh()
        .expires_at(&expires.to_string())
        .spec_json(
            json!({"bridge": {"clients": [{"podSelector": {"matchLabels": {"app": "ansible"}}}]}}),
        );
    match requested_by {
        Some(who) => grant.requested_by(who),
        None => grant,
    }
    .yaml()
}

fn approval(
    namespace: &str,
    name: &str,
    by: &str,
    uid: &str,
    generation: i64,
    duration: Option<&str>,
) -> String {
    json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessApproval",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "grant": {"name": "oncall", "uid": uid, "generation": generation},
            "approvedBy": by,
            "duration": duration,
            "reason": "INC-1234",
        },
    })
    .to_string()
}

/// A ServiceAccount bound to the shipped ClusterRoles `roles` in `namespace`, and its
/// kubeconfig; returns its user name and the kubeconfig's path.
async fn person(
    control_plane: &ControlPlane,
    namespace: &str,
    name: &str,
    roles: &[&str],
    dir: &Path,
) -> (String, std::path::PathBuf) {
    let mut items = vec![json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace}})];
    for role in roles {
        items.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{name}-{role}"), "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        }));
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    kubectl_apply(control_plane, None, &list, &[])
        .await
        .expect("RBAC");
    let path = dir.join(format!("{name}.kubeconfig"));
    control_plane
        .service_account_kubeconfig(namespace, name, Duration::from_secs(3600), &path)
        .expect("a kubeconfig");
    (format!("system:serviceaccount:{namespace}:{name}"), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_waits_for_a_second_persons_approval_which_can_end_and_be_withdrawn() {
    let control_plane = Harness::own_control_plane().await;
    let census = Duration::from_secs(1);
    let h =
        Harness::counting_sessions(&control_plane, "approval", Duration::from_secs(300), census)
            .await;
    let ns = h.namespace.name().to_owned();
    let user = h.unique("oncall");
    h.user(&user).await;
    let bridge_role = h.settings.bridge_role.clone().expect("bridge role");
    h.role(&bridge_role).await;
    let arn = h.set_arn(&format!("user/{user}"));
    control_plane
        .apply_yaml(&boundary(&ns, &user).to_string(), None)
        .await
        .expect("the boundary");
    let tenancy = Path::new(REPO).join("deploy/tenancy");
    for file in [
        "validating-admission-policy.yaml",
        "approval-policy.yaml",
        "grant-editor.yaml",
        "grant-approver.yaml",
    ] {
        control_plane
            .apply_yaml_file(&tenancy.join(file), None)
            .await
            .expect("deploy/tenancy");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // The requester also holds the approver's role: only the rules refuse self-approval.
    let (requester, as_requester) = person(
        &control_plane,
        &ns,
        "requester",
        &["fleet-access-grant-editor", "fleet-access-grant-approver"],
        dir.path(),
    )
    .await;
    let (approver, as_approver) = person(
        &control_plane,
        &ns,
        "approver",
        &["fleet-access-grant-approver"],
        dir.path(),
    )
    .await;
    let apply_with = |kubeconfig: &Path, yaml: String, extra: &'static [&'static str]| {
        let kubeconfig = kubeconfig.to_owned();
        let control_plane = &control_plane;
        async move { kubectl_apply(control_plane, Some(&kubeconfig), &yaml, extra).await }
    };
    let apply = |kubeconfig: &Path, yaml: String| apply_with(kubeconfig, yaml, &[]);

    // What a policy refuses, once the API server has loaded it (probed in server-side dry
    // runs): refused for real, with the policy's words.
    let refused = |kubeconfig: &Path, yaml: String, words: &'static str| {
        let (kubeconfig, apply_with) = (kubeconfig.to_owned(), &apply_with);
        async move {
            wait_for(words, || async {
                let probe = apply_with(&kubeconfig, yaml.clone(), &["--dry-run=server"]).await;
                probe.err().filter(|error| error.contains(words))
            })
            .await;
            let error = (apply_with(&kubeconfig, yaml, &[]).await).expect_err(words);
            assert!(error.contains(words), "{error}");
            error
        }
    };

    // Without saying who asks, the grant is refused, and so is a claim to be someone else.
    let unnamed = grant(&ns, &user, None, 2);
    let error = refused(
        &as_requester,
        unnamed,
        "requires a second person's approval",
    )
    .await;
    assert!(error.contains(&requester), "says what to set: {error}");
    let impostor = grant(&ns, &user, Some(&approver), 2);
    refused(&as_requester, impostor, "fleet-access-requested-by").await;

    // Requested: Pending, and nothing in AWS.
    apply(&as_requester, grant(&ns, &user, Some(&requester), 2))
        .await
        .expect("the grant");
    let pending = h.wait_condition("oncall", "Approved", "False").await;
    let approved = find(&pending, "Approved").expect("Approved");
    assert_eq!(approved.reason, "Pending");
    assert!(
        approved.message.contains(&format!("prod-{ns}")),
        "{}",
        approved.message
    );
    assert_eq!(
        find(&pending, "Ready").map(|c| c.reason.as_str()),
        Some("Pending")
    );
    assert_eq!(
        find(&pending, "PolicySynced").map(|c| c.reason.as_str()),
        Some("AwaitingApproval")
    );
    assert_eq!(h.policies_in_namespace().await, Vec::<String>::new());
    assert!(h.policy_document(&arn).await.is_none());
    let listed = control_plane
        .run_kubectl(["get", "sacc", "oncall", "-n", &ns])
        .expect("kubectl get");
    assert!(
        listed.contains("APPROVAL") && listed.contains("Pending"),
        "{listed}"
    );
    let uid = pending.metadata.uid.clone().expect("uid");

    // Nobody else may take the request over without writing the spec: the requester changes
    // only with it (or the spec's writer could have a second identity rename the request, then
    // approve the spec).
    let (colleague, as_colleague) = person(
        &control_plane,
        &ns,
        "colleague",
        &["fleet-access-grant-editor"],
        dir.path(),
    )
    .await;
    let takeover = (control_plane.kubectl_with(&as_colleague).expect("kubectl"))
        .args([
            "annotate",
            "--overwrite",
            "-n",
            &ns,
            "sessionaccess",
            "oncall",
        ])
        .arg(format!("fleetaccess.io/requested-by={colleague}"))
        .output()
        .expect("kubectl runs");
    let error = String::from_utf8_lossy(&takeover.stderr);
    assert!(
        !takeover.status.success() && error.contains("changes only with the spec"),
        "{error}"
    );

    // The requester may not approve; nobody may approve in another's name. (Each case is
    // refused by one policy only: with two refusing, which one the API server reports varies.)
    let own = approval(&ns, "self", &requester, &uid, 1, None);
    refused(&as_requester, own, "someone else must approve it").await;
    let forged = approval(
        &ns,
        "forged",
        "system:serviceaccount:elsewhere:boss",
        &uid,
        1,
        None,
    );
    refused(&as_approver, forged, "must be your own user name").await;
    // The approver must approve the grant as it is.
    let stale = approval(&ns, "stale", &approver, &uid, 7, None);
    refused(&as_approver, stale, "is not the generation").await;

    // Approved: in force, and the status and an Event say by whom.
    apply(
        &as_approver,
        approval(&ns, "first", &approver, &uid, 1, None),
    )
    .await
    .expect("the approval");
    let ready = h.wait_condition("oncall", "Ready", "True").await;
    let record = ready
        .status
        .as_ref()
        .and_then(|s| s.approval.clone())
        .expect("recorded");
    assert_eq!(
        (record.name.as_str(), record.approved_by.as_str()),
        ("first", approver.as_str())
    );
    assert_eq!(record.requested_by, requester);
    assert_eq!(record.reason.as_deref(), Some("INC-1234"));
    assert!(h.policy_document(&arn).await.is_some(), "in force");
    let events = h.events_about("oncall").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Approved")
                && e.note.as_deref().is_some_and(|n| n.contains(&approver))),
        "{events:?}"
    );

    // A new spec needs a new approval: revoked until then.
    apply(&as_requester, grant(&ns, &user, Some(&requester), 1))
        .await
        .expect("a new spec");
    let changed = h.wait_condition("oncall", "Approved", "False").await;
    let message = &find(&changed, "Approved").expect("Approved").message;
    assert!(message.contains("generations 1 only"), "{message}");
    wait_for("the set to go", || async {
        h.policy_document(&arn).await.is_none().then_some(())
    })
    .await;

    // Approved for 30 minutes: IAM carries the approval's end.
    apply(
        &as_approver,
        approval(&ns, "second", &approver, &uid, 2, Some("30m")),
    )
    .await
    .expect("the second approval");
    let ready = h.wait_condition("oncall", "Ready", "True").await;
    let until = (ready.status.as_ref())
        .and_then(|s| s.approval.as_ref())
        .and_then(|a| a.expires_at.clone())
        .expect("the approval's end");
    let (document, _) = h.policy_document(&arn).await.expect("in force");
    let until = until.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    assert!(
        document.contains(&until),
        "DateLessThan {until}: {document}"
    );

    // The user's open session on the instance, and someone else's.
    let user_arn = |name: &str| format!("arn:aws:iam::{ACCOUNT}:user/{name}");
    let start = |client: aws_sdk_ssm::Client| async move {
        let started = (client.start_session())
            .target(PRODUCTION)
            .document_name("AWS-StartSSHSession")
            .send()
            .await
            .expect("session starts");
        started.session_id().expect("session id").to_owned()
    };
    let users = start(h.ssm_as(&user_arn(&user))).await;
    let others = start(h.ssm_as(&user_arn(&h.unique("someone-else")))).await;
    assert_eq!(
        h.active_sessions(PRODUCTION).await,
        BTreeSet::from([users.clone(), others.clone()])
    );
    // Who is connected now: the census counts the user's session, not the other one; then a
    // session the bridge opened for an in-cluster client of the grant (its Reason names it).
    let open_sessions = |count: i32, through_bridge: i32| {
        let grants = &h.grants;
        async move {
            wait_for(
                &format!("{count} open sessions, {through_bridge} through the bridge"),
                || async {
                    let open = grants.get("oncall").await.ok()?.status?.open_sessions?;
                    ((open.count, open.through_bridge) == (count, through_bridge)).then_some(open)
                },
            )
            .await
        }
    };
    open_sessions(1, 0).await;
    let bridge = format!("arn:aws:sts::{ACCOUNT}:assumed-role/{bridge_role}/pod");
    let bridges = (h.ssm_as(&bridge).start_session())
        .target(PRODUCTION)
        .document_name("AWS-StartSSHSession")
        .reason(format!(
            "fa/test for=tools/ansible-0 sa=ansible grant={ns}/oncall"
        ))
        .send()
        .await
        .expect("the bridge's session starts");
    open_sessions(2, 1).await;

    // Withdrawn: revoked, the user's session ended, and an Event says so.
    let approvals: Api<SessionAccessApproval> = h.namespace.api();
    approvals
        .delete("second", &DeleteParams::default())
        .await
        .expect("withdrawn");
    let withdrawn = h.wait_condition("oncall", "Approved", "False").await;
    assert_eq!(
        find(&withdrawn, "Approved").map(|c| c.reason.as_str()),
        Some("Pending")
    );
    wait_for("the set to go", || async {
        h.policy_document(&arn).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        h.active_sessions(PRODUCTION).await,
        BTreeSet::from([others])
    );
    assert_eq!(
        withdrawn
            .status
            .as_ref()
            .and_then(|s| s.sessions_ended.as_ref())
            .map(|e| e.count),
        Some(2),
        "the user's and the bridge's ({:?})",
        bridges.session_id()
    );
    open_sessions(0, 0).await;
    let events = h.events_about("oncall").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("ApprovalWithdrawn")
                && e.type_.as_deref() == Some("Warning")),
        "{events:?}"
    );

    // Without the admission policies, a self-approval gets in, and the operator refuses it.
    for binding in ["fleet-access-approvals", "fleet-access-approvers"] {
        control_plane
            .run_kubectl(["delete", "validatingadmissionpolicybinding", binding])
            .expect("the binding goes");
    }
    wait_for("the policies unloaded", || async {
        apply(
            &as_requester,
            approval(&ns, "own", &requester, &uid, 2, None),
        )
        .await
        .ok()
    })
    .await;
    let refused = wait_for("the self-approval judged", || async {
        let grant = h.grants.get("oncall").await.ok()?;
        find(&grant, "Approved")
            .is_some_and(|c| c.reason == "SelfApproval")
            .then_some(grant)
    })
    .await;
    assert_eq!(
        find(&refused, "Ready").map(|c| c.status.as_str()),
        Some("False")
    );
    assert!(h.policy_document(&arn).await.is_none(), "nothing in force");
    h.stop().await;
    control_plane.stop();
}
