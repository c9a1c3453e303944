//! The reconciler against real parts: a real kube-apiserver + etcd, IAM on moto, SSM on the
//! project's emulator with moto as its upstream (moto has no session or instance-information
//! APIs). Each test runs its own controller, in-process on a real client, scoped to its own
//! namespace, with its own metrics (so AWS calls can be counted).

mod support;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use aws_sdk_iam::error::ProvideErrorMetadata;
use fleet_access_operator::{
    aws::sdk::SdkAws,
    controller::{Context, reconcile},
    metrics::Metrics,
    model::{naming, policy::same_meaning},
    settings::Settings,
};
use fleet_access_tests::{ControlPlane, Moto};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use support::*;

#[tokio::test]
async fn create_update_and_delete_follow_the_grant() {
    let h = Harness::start("op-lifecycle", Duration::from_secs(300)).await;
    let alice = h.unique("alice");
    let oncall = h.unique("oncall");
    h.user(&alice).await;
    h.role(&oncall).await;
    let alices = h.set_arn(&format!("user/{alice}"));
    let arn = h.set_arn(&format!("role/{oncall}"));

    // Create: the exact policy exists, in alice's set, attached to her.
    let spec = json!({
        "principals": {"users": [alice]},
        "targets": {"instanceIds": ["i-0000000000000000a"]},
        "sessions": {"ssh": true},
    });
    h.create("web", spec).await;
    let grant = h.wait_condition("web", "Ready", "True").await;
    let (document, versions) = h.policy_document(&alices).await.expect("policy exists");
    assert!(same_meaning(&document, &h.expected_document(&grant)).expect("policies"));
    assert_eq!(versions, 1);
    assert_eq!(
        h.attachments(&alices).await,
        BTreeSet::from([format!("user/{alice}")])
    );
    let status = grant.status.clone().expect("status");
    assert_eq!(status.policies[0].arn, alices);
    assert_eq!(
        status.attached_principals,
        vec![format!("arn:aws:iam::{ACCOUNT}:user/{alice}")]
    );
    assert_eq!(status.targets[0].ping_status.as_deref(), Some("Online"));
    assert!(grant.finalizers().iter().any(|f| f == reconcile::FINALIZER));

    // Shell and a port: the grant's documents appear.
    let shell = naming::grant_object_name(&h.settings.cluster, h.namespace.name(), "web", "-shell");
    let port = fleet_access_crds::ssm_documents::port_document_name(&h.settings.cluster, 5432);
    h.set_spec(
        "web",
        json!({
            "principals": {"roles": [oncall]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ssh": true, "shell": true, "ports": [5432]},
        }),
    )
    .await;
    let grant = h.wait_condition("web", "Ready", "True").await;
    assert!(h.document_exists(&shell).await);
    assert!(h.document_exists(&port).await);
    // The status says how to connect: through the documents the policy allows.
    let connect = grant.status.expect("status").connect;
    let documents: Vec<&str> = connect.iter().map(|c| c.document.as_str()).collect();
    assert_eq!(
        documents,
        ["AWS-StartSSHSession", shell.as_str(), port.as_str()]
    );
    let forward = connect[2]
        .agent_bridge
        .as_deref()
        .expect("a forward command");
    assert_eq!(
        forward,
        format!(
            "agent-bridge forward i-0000000000000000a --document {port} --local 127.0.0.1:5432"
        )
    );
    // Principals changed: the role's set replaces the user's, which no grant needs any more.
    assert_eq!(
        h.attachments(&arn).await,
        BTreeSet::from([format!("role/{oncall}")])
    );
    assert!(
        h.policy_document(&alices).await.is_none(),
        "alice's set removed"
    );

    // Targets change again and again: versions follow, never more than 5.
    for (id, _, _) in &FLEET[2..8] {
        h.set_spec(
            "web",
            json!({
                "principals": {"roles": [oncall]},
                "targets": {"instanceIds": [id]},
                "sessions": {"ssh": true},
            }),
        )
        .await;
        let grant = h.wait_condition("web", "Ready", "True").await;
        let (document, versions) = h.policy_document(&arn).await.expect("policy");
        assert!(same_meaning(&document, &h.expected_document(&grant)).expect("policies"));
        assert!(versions <= 5, "{versions} versions");
        assert_eq!(
            grant.status.expect("status").policies[0].version_id,
            h.iam
                .get_policy()
                .policy_arn(&arn)
                .send()
                .await
                .expect("policy")
                .policy()
                .and_then(|p| p.default_version_id())
                .expect("default")
        );
    }
    // The shell and port documents are no longer wanted.
    assert!(!h.document_exists(&shell).await);
    assert!(!h.document_exists(&port).await);

    // Delete: nothing of the grant is left.
    h.delete("web").await;
    assert!(h.policy_document(&arn).await.is_none(), "policy deleted");
    assert!(h.attachments_of_role_empty(&oncall).await);

    // Every change of the grant's life was published as a Normal Event about it, saying what.
    // Events of one reason about one object may form one series (kube's recorder), which keeps
    // one of their notes: each reason's note names one of what it may be about.
    let alices_name = naming::identity_policy_name(&h.settings.cluster, "user", &alice, "");
    let roles_name = naming::identity_policy_name(&h.settings.cluster, "role", &oncall, "");
    let wanted: [(&str, &[&str]); 8] = [
        ("PolicyCreated", &[&alices_name, &roles_name]),
        ("PolicyAttached", &[&alice, &oncall]),
        ("PolicyDetached", &[&alice, &oncall]),
        ("PolicyVersionCreated", &[&arn]),
        ("PolicyVersionDeleted", &[&arn]),
        ("DocumentCreated", &[&shell, &port]),
        ("DocumentDeleted", &[&shell, &port]),
        ("PolicyDeleted", &[&alices, &arn]),
    ];
    let events = wait_for("the grant's Events", || async {
        let events = h.events_about("web").await;
        let all = (wanted.iter())
            .all(|(reason, _)| events.iter().any(|e| e.reason.as_deref() == Some(reason)));
        all.then_some(events)
    })
    .await;
    for (reason, subjects) in wanted {
        let notes: Vec<&str> = (events.iter())
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.note.as_deref())
            .collect();
        assert!(
            notes.iter().all(|n| subjects.iter().any(|s| n.contains(s))),
            "{reason}: {notes:?}"
        );
    }
    assert!(events.iter().all(|e| e.type_.as_deref() == Some("Normal")));
    h.stop().await;
}

impl Harness {
    async fn attachments_of_role_empty(&self, role: &str) -> bool {
        self.role_policies(role).await.is_empty()
    }

    /// The ARNs of the managed policies attached to `role`.
    async fn role_policies(&self, role: &str) -> Vec<String> {
        self.iam
            .list_attached_role_policies()
            .role_name(role)
            .send()
            .await
            .expect("attached")
            .attached_policies()
            .iter()
            .filter_map(|p| p.policy_arn().map(str::to_owned))
            .collect()
    }
}

#[tokio::test]
async fn a_deny_grant_attaches_a_deny_policy_to_a_group() {
    let h = Harness::start("op-deny", Duration::from_secs(300)).await;
    let contractors = h.unique("contractors");
    h.group(&contractors).await;
    h.create(
        "no-prod",
        json!({
            "effect": "Deny",
            "principals": {"groups": [contractors]},
            "targets": {"instanceIds": ["i-0000000000000000c"]},
        }),
    )
    .await;
    let grant = h.wait_condition("no-prod", "PolicySynced", "True").await;
    let arn = h.set_arn(&format!("group/{contractors}"));
    let (document, _) = h.policy_document(&arn).await.expect("policy");
    assert!(same_meaning(&document, &h.expected_document(&grant)).expect("policies"));
    let parsed: Value = serde_json::from_str(&document).expect("json");
    assert_eq!(parsed["Statement"][0]["Effect"], "Deny");
    assert_eq!(
        h.attachments(&arn).await,
        BTreeSet::from([format!("group/{contractors}")])
    );
    h.stop().await;
}

#[tokio::test]
async fn drift_is_repaired_and_a_steady_resync_writes_nothing() {
    let resync = Duration::from_secs(2);
    let h = Harness::start("op-drift", resync).await;
    let bob = h.unique("bob");
    h.user(&bob).await;
    h.create(
        "db",
        json!({
            "principals": {"users": [bob]},
            "targets": {"instanceIds": ["i-0000000000000000a", "i-0000000000000000b"]},
            "sessions": {"ssh": true, "shell": true},
        }),
    )
    .await;
    let grant = h.wait_condition("db", "Ready", "True").await;
    let arn = h.set_arn(&format!("user/{bob}"));

    // Steady state: several resyncs read AWS but write nothing.
    let writes = h.metrics.aws_write_calls();
    let calls = h.metrics.aws_calls_total();
    wait_for("three resyncs", || async {
        (h.metrics.aws_calls_total() >= calls + 3 * 5).then_some(())
    })
    .await;
    assert_eq!(
        h.metrics.aws_write_calls(),
        writes,
        "a steady resync writes nothing: {}",
        h.calls()
    );

    // Drift: detached and edited behind the operator's back.
    h.iam
        .detach_user_policy()
        .user_name(&bob)
        .policy_arn(&arn)
        .send()
        .await
        .expect("detach");
    let tampered = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Action": "ssm:StartSession", "Resource": "*"}]});
    h.iam
        .create_policy_version()
        .policy_arn(&arn)
        .policy_document(tampered.to_string())
        .set_as_default(true)
        .send()
        .await
        .expect("tamper");
    wait_for("drift repaired", || async {
        let (document, _) = h.policy_document(&arn).await?;
        let restored = same_meaning(&document, &h.expected_document(&grant)).ok()?
            && h.attachments(&arn).await.contains(&format!("user/{bob}"));
        restored.then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn tag_targets_resolve_to_instances_with_their_agent_state() {
    let h = Harness::start("op-tags", Duration::from_secs(300)).await;
    let carol = h.unique("carol");
    h.user(&carol).await;
    h.create(
        "staging",
        json!({
            "principals": {"users": [carol]},
            "targets": {"tags": {"Environment": "staging"}},
            "sessions": {"ssh": true},
        }),
    )
    .await;
    let grant = h.wait_condition("staging", "TargetsResolved", "True").await;
    let status = grant.status.expect("status");
    let targets: Vec<(String, Option<bool>)> = status
        .targets
        .iter()
        .map(|t| (t.instance_id.clone(), t.ssh_capable))
        .collect();
    assert_eq!(
        targets,
        vec![
            ("i-0000000000000000a".to_owned(), Some(true)),
            ("i-0000000000000000b".to_owned(), Some(false)),
        ]
    );
    assert_eq!(status.target_count, Some(2));
    h.stop().await;
}

/// A grant's window ends: its policy is revoked, the sessions its principal has open on its
/// instance are terminated (once; another principal's session on the same instance survives) and
/// it says Expired. The window first ends in an hour, so that the grant is seen in force however
/// slow the machine; once it has been, the window is moved to end a few seconds later.
#[tokio::test]
async fn expiry_revokes_the_policy_and_sets_expired() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    let h = Harness::start("op-expiry", Duration::from_secs(300)).await;
    let dave = h.unique("dave");
    h.user(&dave).await;
    let ending_in = |seconds: i64| {
        let expires_at = Timestamp::now() + SignedDuration::from_secs(seconds);
        json!({
            "principals": {"users": [dave]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ssh": true},
            "window": {"expiresAt": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
        })
    };
    h.create("temp", ending_in(3600)).await;
    let arn = h.set_arn(&format!("user/{dave}"));

    // In force before expiry.
    let grant = h.wait_condition("temp", "PolicySynced", "True").await;
    assert_eq!(
        find(&grant, "Expired").map(|c| c.status.as_str()),
        Some("False"),
        "not expired an hour before its end"
    );
    assert!(
        h.policy_document(&arn).await.is_some(),
        "in force before expiry"
    );
    // Open sessions on the grant's instance: the grant's principal's, to be terminated at
    // expiry, and another principal's, which another grant may allow and which must survive.
    let instance = "i-0000000000000000a";
    let user_arn = |name: &str| format!("arn:aws:iam::{ACCOUNT}:user/{name}");
    let (as_dave, as_mallory) = (user_arn(&dave), user_arn(&h.unique("mallory")));
    let daves = h.start_session_as(&as_dave, instance).await;
    let mallorys = h.start_session_as(&as_mallory, instance).await;
    assert_eq!(
        h.active_sessions(instance).await,
        BTreeSet::from([daves.clone(), mallorys.clone()])
    );

    // The window now ends in a few seconds: the operator expires the grant then (it requeues
    // the grant for its end, long before the 300 s resync), or at once if the change reaches it
    // later than that.
    h.set_spec("temp", ending_in(3)).await;
    let grant = h.wait_condition("temp", "Expired", "True").await;
    assert_eq!(
        find(&grant, "Ready").map(|c| c.reason.as_str()),
        Some("Expired")
    );
    assert!(h.policy_document(&arn).await.is_none(), "policy revoked");
    // The emulator ends only sessions whose data channel connected, so the operator's
    // TerminateSession call is what is checked here.
    assert_eq!(
        h.terminated(),
        1,
        "only the grant's principal's session is terminated: {}",
        h.calls()
    );
    assert_eq!(
        h.active_sessions(instance).await,
        BTreeSet::from([mallorys.clone()])
    );
    let ended = wait_for("the ended sessions recorded", || async {
        let grant = h.grants.get("temp").await.ok()?;
        grant.status?.sessions_ended
    })
    .await;
    assert_eq!(ended.count, 1);

    // Once: a later reconcile of the expired grant ends nothing more (IAM already refuses the
    // principal new sessions; a session started against the emulator anyway stays).
    let later = h.start_session_as(&as_dave, instance).await;
    let reconciles = || {
        h.metrics
            .reconcile_duration
            .with_label_values(&["SessionAccess"])
            .get_sample_count()
    };
    let before = reconciles();
    let touch = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
    h.grants
        .patch("temp", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .expect("annotated");
    wait_for("a reconcile after the change", || async {
        (reconciles() > before).then_some(())
    })
    .await;
    assert_eq!(
        h.active_sessions(instance).await,
        BTreeSet::from([mallorys.clone(), later.clone()]),
        "nothing ended twice: {}",
        h.calls()
    );

    // Nor when the window's end moves to a moment after the sessions were ended that has also
    // passed, and the grant now names mallory too: since it ended it grants nothing, so it
    // ends nothing.
    let new_end = ended.at.0 + SignedDuration::from_secs(1);
    wait_for("the new end to pass", || async {
        (Timestamp::now() > new_end).then_some(())
    })
    .await;
    let mut moved = ending_in(0);
    moved["window"]["expiresAt"] = json!(new_end.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    moved["principals"]["users"] = json!([dave, h.unique("mallory")]);
    h.set_spec("temp", moved).await;
    h.wait_condition("temp", "Expired", "True").await;
    assert_eq!(
        h.active_sessions(instance).await,
        BTreeSet::from([mallorys, later]),
        "an ended grant ends nothing more: {}",
        h.calls()
    );
    assert_eq!(h.terminated(), 1, "{}", h.calls());
    h.stop().await;
}

#[tokio::test]
async fn a_same_named_policy_without_the_owner_tag_is_not_adopted() {
    let h = Harness::start("op-foreign", Duration::from_secs(300)).await;
    let erin = h.unique("erin");
    h.user(&erin).await;
    let name = naming::identity_policy_name(&h.settings.cluster, "user", &erin, "");
    let foreign = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Action": "ssm:DescribeSessions", "Resource": "*"}]});
    h.iam
        .create_policy()
        .policy_name(&name)
        .path(naming::POLICY_PATH)
        .policy_document(foreign.to_string())
        .send()
        .await
        .expect("foreign policy");
    h.create(
        "taken",
        json!({
            "principals": {"users": [erin]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ssh": true},
        }),
    )
    .await;
    let grant = h.wait_condition("taken", "PolicySynced", "False").await;
    assert_eq!(
        find(&grant, "PolicySynced").map(|c| c.reason.as_str()),
        Some("NotOwned")
    );
    let arn = h.set_arn(&format!("user/{erin}"));
    let (document, versions) = h.policy_document(&arn).await.expect("still there");
    assert!(same_meaning(&document, &foreign.to_string()).expect("policies"));
    assert_eq!(versions, 1);
    assert!(h.attachments(&arn).await.is_empty());
    h.stop().await;
}

/// The bridge grants of one namespace hold at most the operator's limit of bridge ports
/// together: a grant that would go over is refused with its endpoints left as they were, and it
/// gets them once another grant gives ports back.
#[tokio::test]
async fn a_namespace_over_its_bridge_port_limit_gets_no_more() {
    use k8s_openapi::api::core::v1::Service;

    let h = Harness::start_with("op-port-limit", Duration::from_secs(300), |settings| {
        settings.max_bridge_ports_per_namespace = 3;
    })
    .await;
    let gina = h.unique("gina");
    h.user(&gina).await;
    h.role(h.settings.bridge_role.as_deref().expect("bridge role"))
        .await;
    let services: Api<Service> = h.namespace.api();
    let bridged = |instances: &[&str], ports: &[u16]| {
        json!({
            "principals": {"users": [gina]},
            "targets": {"instanceIds": instances},
            "sessions": {"ssh": true, "ports": [5432]},
            "bridge": {"ports": ports, "clients": [{"podSelector": {"matchLabels": {"app": "x"}}}]},
        })
    };
    // Two of three: the Service of instance a with ports 22 and 5432.
    h.create("first", bridged(&["i-0000000000000000a"], &[22, 5432]))
        .await;
    h.wait_condition("first", "BridgeReady", "True").await;
    // Two more would make four.
    h.create(
        "second",
        bridged(&["i-0000000000000000a", "i-0000000000000000c"], &[22, 5432]),
    )
    .await;
    let refused = h.wait_condition("second", "BridgeReady", "False").await;
    let message = &find(&refused, "BridgeReady").expect("BridgeReady").message;
    assert!(
        message.contains("would hold 4 ports") && message.contains("limit of 3 per namespace"),
        "{message}"
    );
    let names: Vec<String> = (services.list(&Default::default()).await)
        .expect("services")
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(
        names,
        ["i-0000000000000000a"],
        "no Service for the refused grant"
    );
    // Once the first grant gives its ports back, the second gets its endpoints.
    h.delete("first").await;
    h.set_spec(
        "second",
        bridged(&["i-0000000000000000a", "i-0000000000000000c"], &[22]),
    )
    .await;
    h.wait_condition("second", "BridgeReady", "True").await;
    h.stop().await;
}

/// The grants of one namespace hold at most the operator's limit of session documents
/// together (the account's quota is every tenant's): a grant that would go over grants nothing
/// and writes nothing, and it is let in as soon as an earlier grant gives documents back,
/// without a change of its own.
#[tokio::test]
async fn a_namespace_over_its_document_limit_grants_no_more() {
    use fleet_access_crds::ssm_documents::port_document_name;

    let h = Harness::start_with("op-doc-limit", Duration::from_secs(300), |settings| {
        settings.max_documents_per_namespace = 3;
    })
    .await;
    let hana = h.unique("hana");
    h.user(&hana).await;
    let forwarding = |ports: &[u16]| {
        json!({
            "principals": {"users": [hana]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ports": ports},
        })
    };
    let document = |port| port_document_name(&h.settings.cluster, port);
    // Two of three.
    h.create("first", forwarding(&[5432, 6379])).await;
    h.wait_condition("first", "Ready", "True").await;
    // 5432 again, and two more: four.
    h.create("second", forwarding(&[5432, 8080, 9090])).await;
    let over = h.wait_condition("second", "PolicySynced", "False").await;
    let synced = find(&over, "PolicySynced").expect("PolicySynced");
    assert_eq!(synced.reason, "DocumentLimit");
    assert!(
        synced.message.contains("would hold 4 session documents")
            && synced.message.contains("limit of 3 per namespace"),
        "{}",
        synced.message
    );
    assert_eq!(
        find(&over, "Ready").map(|c| c.status.as_str()),
        Some("False")
    );
    assert!(h.document_exists(&document(6379)).await);
    for port in [8080, 9090] {
        assert!(!h.document_exists(&document(port)).await, "{port}");
    }
    let (policy, _) = (h.policy_document(&h.set_arn(&format!("user/{hana}"))).await)
        .expect("the first grant's policy");
    assert!(policy.contains(&document(6379)));
    assert!(!policy.contains(&document(8080)), "{policy}");
    let warned = h.events_about("second").await;
    assert!(
        warned
            .iter()
            .any(|e| e.reason.as_deref() == Some("DocumentLimit")),
        "{warned:?}"
    );

    // The first grant goes: the second fits, without a change of its own (the resync is
    // five minutes away).
    h.delete("first").await;
    h.wait_condition("second", "Ready", "True").await;
    for port in [5432, 8080, 9090] {
        assert!(h.document_exists(&document(port)).await, "{port}");
    }
    assert!(!h.document_exists(&document(6379)).await);
    h.stop().await;
}

/// IAM judges a session's instance and its document apart, so grants reaching one principal
/// combine. An approved grant of SSH on a production instance, whose user an earlier grant
/// gives a shell on another instance through a group, would hand that user a shell in
/// production that nobody approved: it is left out (and holds nothing in IAM) until the
/// earlier grant goes.
#[tokio::test]
async fn an_approved_grant_does_not_combine_with_an_earlier_grant_of_its_users_group() {
    let h = Harness::start("op-combine", Duration::from_secs(300)).await;
    let (ivy, oncall) = (h.unique("ivy"), h.unique("oncall"));
    h.user(&ivy).await;
    h.group(&oncall).await;
    join_group(&h, &ivy, &oncall).await;
    let boundary = ApprovalScopes::set_up(&h, &ivy, &oncall).await;

    let left_out = boundary
        .approve_production_ssh(&h, &ivy, "PolicySynced", "False")
        .await;
    assert_eq!(
        find(&left_out, "Approved").map(|c| c.status.as_str()),
        Some("True")
    );
    assert_combines_with_dev_shell(&h, &left_out, &ivy, &oncall);
    let ivy_arn = h.set_arn(&format!("user/{ivy}"));
    assert_eq!(
        h.policy_document(&ivy_arn).await,
        None,
        "ivy holds nothing of her own"
    );
    let group_arn = h.set_arn(&format!("group/{oncall}"));
    let (policy_document, _) = h.policy_document(&group_arn).await.expect("the group's");
    assert!(
        policy_document.contains(ApprovalScopes::DEV),
        "{policy_document}"
    );
    let warned = h.events_about("prod-ssh").await;
    assert!(
        (warned.iter()).any(|e| e.reason.as_deref() == Some("CombinesWithGrant")),
        "{warned:?}"
    );

    // The shell grant goes: the approved grant is in force, without a change of its own.
    h.delete("dev-shell").await;
    h.wait_condition("prod-ssh", "Ready", "True").await;
    let (policy_document, _) = h.policy_document(&ivy_arn).await.expect("ivy's policy");
    assert!(
        policy_document.contains(ApprovalScopes::PRODUCTION),
        "{policy_document}"
    );
    assert_eq!(
        h.policy_document(&group_arn).await,
        None,
        "the group's went"
    );
    h.stop().await;
    boundary.remove();
}

/// Group membership is IAM's, and changes without any grant changing: a user who joins a group
/// after two grants of different scopes were judged apart would combine them from then on. The
/// census, which reads the groups' members anyway, has the grants judged again: the approved
/// grant is left out within a census period of her joining, and in force again once she leaves.
#[tokio::test]
async fn a_user_joining_or_leaving_a_group_has_the_grants_judged_again_at_the_next_census() {
    let control_plane = ControlPlane::shared().await.expect("control plane");
    control_plane
        .install_fleet_access(&fleet_access_crds::crds_yaml())
        .await
        .expect("fleet-access's API");
    let census = Duration::from_secs(1);
    let h = Harness::counting_sessions(
        control_plane,
        "op-regroup",
        Duration::from_secs(300),
        census,
    )
    .await;
    let (ivy, oncall) = (h.unique("ivy"), h.unique("oncall"));
    h.user(&ivy).await;
    h.group(&oncall).await;
    let boundary = ApprovalScopes::set_up(&h, &ivy, &oncall).await;
    // Ivy is no member yet: the two grants reach nobody in common, both are in force.
    boundary
        .approve_production_ssh(&h, &ivy, "Ready", "True")
        .await;
    let ivy_arn = h.set_arn(&format!("user/{ivy}"));
    assert!(h.policy_document(&ivy_arn).await.is_some(), "ivy's SSH");

    join_group(&h, &ivy, &oncall).await;
    let left_out = h.wait_condition("prod-ssh", "PolicySynced", "False").await;
    assert_combines_with_dev_shell(&h, &left_out, &ivy, &oncall);
    assert_eq!(
        h.policy_document(&ivy_arn).await,
        None,
        "ivy's SSH in production is revoked"
    );

    (h.iam
        .remove_user_from_group()
        .group_name(&oncall)
        .user_name(&ivy)
        .send()
        .await)
        .expect("ivy leaves the group");
    h.wait_condition("prod-ssh", "Ready", "True").await;
    let (policy_document, _) = h.policy_document(&ivy_arn).await.expect("ivy's policy");
    assert!(
        policy_document.contains(ApprovalScopes::PRODUCTION),
        "{policy_document}"
    );
    h.stop().await;
    boundary.remove();
}

async fn join_group(h: &Harness, user: &str, group: &str) {
    (h.iam
        .add_user_to_group()
        .group_name(group)
        .user_name(user)
        .send()
        .await)
        .expect("the user joins the group");
}

/// `left_out` is left out because `dev-shell` reaches `user` through `group`.
fn assert_combines_with_dev_shell(
    h: &Harness,
    left_out: &fleet_access_crds::SessionAccess,
    user: &str,
    group: &str,
) {
    let synced = find(left_out, "PolicySynced").expect("PolicySynced");
    assert_eq!(synced.reason, "CombinesWithGrant");
    let ns = h.namespace.name();
    for words in [
        format!("user/{user} (in group/{group})"),
        format!("grant {ns}/dev-shell"),
    ] {
        assert!(
            synced.message.contains(&words),
            "{words}: {}",
            synced.message
        );
    }
}

/// Two scopes in one namespace: a boundary that asks for approval on the production instance,
/// and a grant in force without one, `dev-shell`: a shell on the dev instance for `group`.
struct ApprovalScopes {
    control_plane: &'static ControlPlane,
    boundary: String,
}

impl ApprovalScopes {
    const PRODUCTION: &str = "i-0000000000000000c";
    const DEV: &str = "i-0000000000000000a";

    async fn set_up(h: &Harness, user: &str, group: &str) -> Self {
        let control_plane = ControlPlane::shared().await.expect("control plane");
        let ns = h.namespace.name();
        let boundary = format!("approve-{ns}");
        let policy = json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccessPolicy",
            "metadata": {"name": boundary},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "principals": {"users": [user], "groups": [group]},
                "targets": {"instanceIds": [Self::DEV, Self::PRODUCTION]},
                "sessions": {"ssh": true, "shell": true},
                "approval": {"instanceIds": [Self::PRODUCTION]},
            },
        });
        (control_plane.apply_yaml(&policy.to_string(), None).await).expect("the boundary");
        h.create(
            "dev-shell",
            json!({
                "principals": {"groups": [group]},
                "targets": {"instanceIds": [Self::DEV]},
                "sessions": {"shell": true},
            }),
        )
        .await;
        h.wait_condition("dev-shell", "Ready", "True").await;
        Self {
            control_plane,
            boundary,
        }
    }

    /// Requests `prod-ssh` (SSH on the production instance for `user`), approves it, and waits
    /// for its `condition` to be `status`.
    async fn approve_production_ssh(
        &self,
        h: &Harness,
        user: &str,
        condition: &str,
        status: &str,
    ) -> fleet_access_crds::SessionAccess {
        use fleet_access_crds::{SessionAccessApproval, v1alpha1::REQUESTED_BY_ANNOTATION};

        let requested = h
            .grant("prod-ssh")
            .users([user])
            .instance_ids([Self::PRODUCTION])
            .ssh()
            .annotation(REQUESTED_BY_ANNOTATION, "ivy")
            .build();
        let requested =
            (h.grants.create(&PostParams::default(), &requested).await).expect("created");
        h.wait_condition("prod-ssh", "Approved", "False").await;
        let approval: SessionAccessApproval = serde_json::from_value(json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccessApproval",
            "metadata": {"name": "prod-ssh-inc-1"},
            "spec": {
                "grant": {
                    "name": "prod-ssh",
                    "uid": requested.metadata.uid,
                    "generation": requested.metadata.generation,
                },
                "approvedBy": "oncall-lead",
            },
        }))
        .expect("an approval");
        (h.namespace.api::<SessionAccessApproval>())
            .create(&PostParams::default(), &approval)
            .await
            .expect("approved");
        h.wait_condition("prod-ssh", condition, status).await
    }

    fn remove(self) {
        (self.control_plane)
            .run_kubectl(["delete", "sessionaccesspolicy", &self.boundary])
            .expect("the boundary deleted");
    }
}

#[tokio::test]
async fn bridge_endpoints_merge_per_instance_and_admit_only_the_clients() {
    use fleet_access_crds::bridge_contract::EndpointAnnotations;
    use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};

    let h = Harness::start("op-bridge", Duration::from_secs(300)).await;
    let frank = h.unique("frank");
    h.user(&frank).await;
    h.role(h.settings.bridge_role.as_deref().expect("bridge role"))
        .await;
    let services: Api<Service> = h.namespace.api();
    let policies: Api<NetworkPolicy> = h.namespace.api();
    h.create(
        "ansible",
        json!({
            "principals": {"users": [frank]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ssh": true},
            "bridge": {"ports": [22], "clients": [{"podSelector": {"matchLabels": {"app": "ansible"}}}]},
        }),
    )
    .await;
    h.create(
        "backup",
        json!({
            "principals": {"users": [frank]},
            "targets": {"instanceIds": ["i-0000000000000000a", "i-0000000000000000c"]},
            "sessions": {"ssh": true, "ports": [5432]},
            "bridge": {"ports": [22, 5432], "clients": [{"podSelector": {"matchLabels": {"app": "backup"}}}]},
        }),
    )
    .await;
    h.wait_condition("ansible", "BridgeReady", "True").await;
    let backup = h.wait_condition("backup", "Ready", "True").await;
    assert_eq!(
        backup.status.expect("status").targets[0]
            .endpoint
            .as_deref(),
        Some(format!("i-0000000000000000a.{}", h.namespace.name()).as_str())
    );

    let endpoint = |service: &Service| {
        EndpointAnnotations::parse(service.metadata.annotations.as_ref().expect("annotations"))
            .expect("the contract")
    };
    let shared = endpoint(
        &services
            .get("i-0000000000000000a")
            .await
            .expect("service a"),
    );
    let ports: Vec<u16> = shared.ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![22, 5432]);
    let targets: BTreeSet<u16> = shared.ports.iter().map(|p| p.target_port).collect();
    assert_eq!(targets.len(), 2, "distinct target ports");
    let ssh_target = shared.ports[0].target_port;
    assert_eq!(shared.ports[0].document, "AWS-StartSSHSession");
    let other = endpoint(
        &services
            .get("i-0000000000000000c")
            .await
            .expect("service c"),
    );
    assert_eq!(other.ports.len(), 2);

    // The ansible grant's policy admits its clients to its port only.
    let ansible_policy = policies
        .get(
            &fleet_access_operator::model::endpoints::network_policy_name(&format!(
                "{}/ansible",
                h.namespace.name()
            )),
        )
        .await
        .expect("network policy");
    let rule = &ansible_policy.spec.expect("spec").ingress.expect("ingress")[0];
    let admitted: Vec<_> = rule
        .ports
        .as_ref()
        .expect("ports")
        .iter()
        .map(|p| p.port.clone())
        .collect();
    assert_eq!(
        admitted,
        vec![Some(
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(ssh_target))
        )]
    );
    assert_eq!(
        rule.from.as_ref().expect("from")[0]
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some([("app".to_owned(), "ansible".to_owned())].into())
    );

    // Removing one grant withdraws only its ports; the other keeps its target port.
    h.grants
        .delete("backup", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("backup gone", || async {
        h.grants
            .get_opt("backup")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let left = endpoint(
        &services
            .get("i-0000000000000000a")
            .await
            .expect("service a"),
    );
    assert_eq!(left.ports.len(), 1);
    assert_eq!(left.ports[0].target_port, ssh_target);
    assert!(
        services
            .get_opt("i-0000000000000000c")
            .await
            .expect("get")
            .is_none()
    );

    h.grants
        .delete("ansible", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("ansible gone", || async {
        h.grants
            .get_opt("ansible")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        services
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    assert!(
        policies
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    h.stop().await;
}

#[tokio::test]
async fn two_hundred_grants_reach_ready() {
    const COUNT: usize = 200;
    let h = Harness::start("op-scale", Duration::from_secs(300)).await;
    // One user per grant: IAM attaches at most 10 (20 raised) managed policies to one identity,
    // which the operator enforces.
    let users: Vec<String> = (0..COUNT).map(|i| h.unique(&format!("grace{i}"))).collect();
    for user in &users {
        h.user(user).await;
    }
    let started = tokio::time::Instant::now();
    for (i, user) in users.iter().enumerate() {
        h.create(
            &format!("g{i}"),
            json!({
                "principals": {"users": [user]},
                "targets": {"instanceIds": ["i-0000000000000000a"]},
                "sessions": {"ssh": true},
            }),
        )
        .await;
    }
    h.wait_all_ready(COUNT).await;
    let calls = h.metrics.aws_calls_total();
    let writes = h.metrics.aws_write_calls();
    println!(
        "{COUNT} grants Ready in {:.1} s; AWS calls per grant: {:.1} ({:.1} writes)",
        started.elapsed().as_secs_f64(),
        calls as f64 / COUNT as f64,
        writes as f64 / COUNT as f64
    );
    // Every user has its set of one policy, attached to it.
    assert_eq!(h.policies_in_namespace().await.len(), COUNT);
    for user in users.iter().step_by(20) {
        let attached = h.attachments(&h.set_arn(&format!("user/{user}"))).await;
        assert_eq!(attached, BTreeSet::from([format!("user/{user}")]));
    }
    h.stop().await;
}

#[tokio::test]
async fn owned_objects_deleted_behind_the_operators_back_are_repaired_promptly() {
    use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};

    // A resync far away, beyond any wait of the test: only the watches of owned objects can
    // repair within one.
    let resync = Duration::from_secs(3600);
    assert!(CONVERGE < resync);
    let h = Harness::start("op-owned", resync).await;
    let grace = h.unique("grace");
    h.user(&grace).await;
    h.role(h.settings.bridge_role.as_deref().expect("bridge role"))
        .await;
    let services: Api<Service> = h.namespace.api();
    let policies: Api<NetworkPolicy> = h.namespace.api();
    h.create(
        "tools",
        json!({
            "principals": {"users": [grace]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ssh": true},
            "bridge": {"ports": [22], "clients": [{"podSelector": {"matchLabels": {"app": "tools"}}}]},
        }),
    )
    .await;
    h.wait_condition("tools", "Ready", "True").await;
    let policy_name = fleet_access_operator::model::endpoints::network_policy_name(&format!(
        "{}/tools",
        h.namespace.name()
    ));
    let service = services.get("i-0000000000000000a").await.expect("service");
    let policy = policies.get(&policy_name).await.expect("network policy");

    services
        .delete("i-0000000000000000a", &DeleteParams::default())
        .await
        .expect("delete service");
    policies
        .delete(&policy_name, &DeleteParams::default())
        .await
        .expect("delete network policy");
    let repaired = wait_for("service and network policy re-created", || async {
        let s = services.get_opt("i-0000000000000000a").await.ok()??;
        let p = policies.get_opt(&policy_name).await.ok()??;
        (s.uid() != service.uid() && p.uid() != policy.uid()).then_some((s, p))
    })
    .await;
    let (service, policy) = repaired;
    assert_eq!(
        fleet_access_operator::model::endpoints::grants_of_service(&service),
        vec![(h.namespace.name().to_owned(), "tools".to_owned())]
    );
    assert_eq!(
        fleet_access_operator::model::endpoints::grant_of_network_policy(&policy),
        Some((h.namespace.name().to_owned(), "tools".to_owned()))
    );

    // An edit behind the operator's back (the grant's ports annotation removed) is repaired too.
    let annotation = fleet_access_operator::model::endpoints::GRANT_PORTS_ANNOTATION;
    let patch = json!({"metadata": {"annotations": {annotation: null}}});
    services
        .patch(
            "i-0000000000000000a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("tamper");
    wait_for("annotation restored", || async {
        let s = services.get_opt("i-0000000000000000a").await.ok()??;
        (!fleet_access_operator::model::endpoints::grants_of_service(&s).is_empty()).then_some(())
    })
    .await;
    // So is a Service pointed elsewhere (its record intact).
    let bridge_label = fleet_access_crds::bridge_contract::bridge_pod_selector()
        .into_keys()
        .next()
        .expect("a label");
    let patch = json!({"spec": {"selector": {bridge_label: "elsewhere"}}});
    services
        .patch(
            "i-0000000000000000a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("tamper");
    wait_for("selector restored", || async {
        let s = services.get_opt("i-0000000000000000a").await.ok()??;
        let selector = s.spec?.selector?;
        (selector == fleet_access_crds::bridge_contract::bridge_pod_selector()).then_some(())
    })
    .await;

    h.grants
        .delete("tools", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("tools gone", || async {
        h.grants
            .get_opt("tools")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    h.stop().await;
}

/// The account default document, through moto directly in a Region no other test uses (the
/// document is an account-and-Region singleton).
#[tokio::test]
async fn session_preferences_update_the_account_document_and_restore_it_on_delete() {
    use fleet_access_crds::SessionPreferences;
    use fleet_access_operator::{
        controller::preferences::{self, PREVIOUS_ANNOTATION},
        model::documents::ACCOUNT_SHELL_DOCUMENT,
    };

    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let control_plane = ControlPlane::shared().await.expect("control plane");
    control_plane
        .apply_yaml(&fleet_access_crds::crds_yaml(), None)
        .await
        .expect("CRDs apply");
    control_plane
        .wait_for_crd_established("sessionpreferences.fleetaccess.io", Duration::from_secs(30))
        .await
        .expect("established");
    let client = control_plane.client().await.expect("client");
    let moto = Moto::shared().await.expect("moto");
    let ssm_config = moto
        .sdk_config()
        .to_builder()
        .region(aws_config::Region::new("eu-north-1"))
        .build();
    let ssm = aws_sdk_ssm::Client::new(&ssm_config);
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    let aws = Arc::new(SdkAws::with_configs(
        &moto.sdk_config(),
        &ssm_config,
        metrics.clone(),
    ));
    let ctx = Arc::new(Context::new(
        client.clone(),
        aws.clone(),
        aws,
        Settings::default(),
        ACCOUNT.into(),
        metrics.clone(),
        Duration::from_secs(2),
        "test",
    ));
    let (stop, stopped) = oneshot::channel::<()>();
    let controller = tokio::spawn(async move {
        preferences::run(ctx, async {
            let _ = stopped.await;
        })
        .await;
    });
    let api: Api<SessionPreferences> = Api::all(client);
    // The default version's content and number, or `None` when there is no document.
    let content = || {
        let ssm = ssm.clone();
        async move {
            let out =
                get_document_if_exists(ssm.get_document().name(ACCOUNT_SHELL_DOCUMENT)).await?;
            Some((
                out.content().expect("content").to_owned(),
                out.document_version().expect("version").to_owned(),
            ))
        }
    };
    let versions = || {
        let ssm = ssm.clone();
        async move {
            let out = ssm
                .describe_document()
                .name(ACCOUNT_SHELL_DOCUMENT)
                .send()
                .await
                .expect("describe");
            let d = out.document().expect("document");
            (
                d.default_version().expect("default").to_owned(),
                d.latest_version().expect("latest").to_owned(),
            )
        }
    };
    let preferences = |spec: Value| -> SessionPreferences {
        serde_json::from_value(json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionPreferences",
            "metadata": {"name": "default"},
            "spec": spec,
        }))
        .expect("SessionPreferences")
    };
    let wait_ready = |api: Api<SessionPreferences>| async move {
        wait_for("SessionPreferences Ready", || async {
            let p = api.get("default").await.ok()?;
            let s = p.status.as_ref()?;
            (s.observed_generation == p.metadata.generation
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"))
            .then_some(p)
        })
        .await
    };
    let wait_gone = |api: Api<SessionPreferences>| async move {
        wait_for("SessionPreferences deleted", || async {
            api.get_opt("default").await.ok()?.is_none().then_some(())
        })
        .await
    };
    // Leftovers of an earlier run of this test in a long-lived moto (none is fine).
    if let Err(error) = ssm
        .delete_document()
        .name(ACCOUNT_SHELL_DOCUMENT)
        .send()
        .await
    {
        assert_eq!(error.code(), Some("InvalidDocument"), "{error:?}");
    }

    // 1. A document someone made by hand (as the console does) is there first.
    let original = json!({"schemaVersion": "1.0", "description": "made by hand",
        "sessionType": "Standard_Stream", "inputs": {"idleSessionTimeout": "35",
        "cloudWatchEncryptionEnabled": true, "s3EncryptionEnabled": true, "runAsEnabled": false}})
    .to_string();
    ssm.create_document()
        .name(ACCOUNT_SHELL_DOCUMENT)
        .content(&original)
        .document_type(aws_sdk_ssm::types::DocumentType::Session)
        .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
        .send()
        .await
        .expect("original document");
    let first = preferences(json!({
        "idleSessionTimeoutMinutes": 15,
        "cloudWatch": {"logGroupName": "/ssm/sessions", "encryptionEnabled": false, "streaming": true},
    }));
    api.create(&PostParams::default(), &first)
        .await
        .expect("created");
    let applied = wait_ready(api.clone()).await;
    let (document, version) = content().await.expect("document");
    assert!(
        preferences::same_content(&document, &preferences::desired_content(&first.spec)),
        "the document follows the spec: {document}"
    );
    assert_eq!(version, "2");
    assert_eq!(
        versions().await,
        ("2".into(), "2".into()),
        "new version is the default"
    );
    let status = applied.status.expect("status");
    assert_eq!(status.document_version.as_deref(), Some("2"));
    assert_eq!(status.had_previous_content, Some(true));
    let record: Value = serde_json::from_str(
        applied
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PREVIOUS_ANNOTATION))
            .expect("the original is recorded"),
    )
    .expect("json");
    assert_eq!(record["existed"], true);
    assert_eq!(record["version"], "1");

    // Steady state: resyncs (every 2 s) write nothing.
    let writes = metrics.aws_write_calls();
    let calls = metrics.aws_calls_total();
    wait_for("two resyncs", || async {
        (metrics.aws_calls_total() >= calls + 2).then_some(())
    })
    .await;
    assert_eq!(metrics.aws_write_calls(), writes, "a steady resync writes");

    // 2. A spec change: a new default version.
    let mut changed = api.get("default").await.expect("get");
    changed.spec = preferences(json!({"idleSessionTimeoutMinutes": 30})).spec;
    api.replace("default", &PostParams::default(), &changed)
        .await
        .expect("replaced");
    wait_for("version 3 is the default", || async {
        let (document, version) = content().await?;
        (version == "3"
            && preferences::same_content(&document, &preferences::desired_content(&changed.spec)))
        .then_some(())
    })
    .await;
    assert_eq!(versions().await, ("3".into(), "3".into()));
    wait_ready(api.clone()).await;

    // 3. Delete: the original content is the default again.
    api.delete("default", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(api.clone()).await;
    let (document, version) = content().await.expect("document");
    assert_eq!(document, original, "the original content is back");
    assert_eq!(version, "1", "as its own original version");

    // 4. No document before: created, then deleted on restore.
    ssm.delete_document()
        .name(ACCOUNT_SHELL_DOCUMENT)
        .send()
        .await
        .expect("delete original");
    let fresh = preferences(json!({"maxSessionDurationMinutes": 60}));
    api.create(&PostParams::default(), &fresh)
        .await
        .expect("created");
    let applied = wait_ready(api.clone()).await;
    assert_eq!(
        applied.status.expect("status").had_previous_content,
        Some(false)
    );
    let (document, _) = content().await.expect("created document");
    assert!(preferences::same_content(
        &document,
        &preferences::desired_content(&fresh.spec)
    ));
    api.delete("default", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(api.clone()).await;
    assert_eq!(content().await, None, "no document, as before");

    stop_controller(stop, controller).await;
}

/// Grants deleted all at once (one request after another, 20 ms apart, never waiting for a
/// cleanup): their cleanups overlap, each deleting documents while the others would page
/// through ListDocuments (whose NextToken is an offset in moto, so a deletion ahead of the
/// cursor makes the next page skip documents). No document and no policy may be left behind.
/// Before the operator looked its documents up by name, this left 3 to 30 of the 200
/// documents in each of six runs (the staggered deletes overlap cleanups and listings more
/// reliably than one DeleteCollection, which hit the race in only 2 of 6 runs).
#[tokio::test]
async fn many_grants_deleted_at_once_leave_no_document_and_no_policy() {
    const COUNT: usize = 50;
    let h = Harness::start("op-mass-delete", Duration::from_secs(300)).await;
    // Four documents per grant: 200 in all, four pages of ListDocuments. One user per grant
    // (IAM's quota of attached policies per identity).
    let mut grants = Vec::new();
    for i in 0..COUNT {
        let heidi = h.unique(&format!("heidi{i}"));
        h.user(&heidi).await;
        let spec = json!({
            "principals": {"users": [heidi]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"shell": true, "ports": [5432, 6379, 8080]},
        });
        grants.push(h.create(&format!("g{i}"), spec).await);
    }
    h.wait_all_ready(COUNT).await;
    let derived: Vec<String> = grants
        .iter()
        .flat_map(|g| h.derived_documents(g))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(derived.len(), 4 * COUNT);
    for name in &derived {
        assert!(h.document_exists(name).await, "{name} created");
    }
    assert_eq!(h.policies_in_namespace().await.len(), COUNT);

    // One after another without waiting: cleanups overlap with the listings of later ones.
    for grant in &grants {
        h.grants
            .delete(&grant.name_any(), &DeleteParams::default())
            .await
            .expect("delete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for("every grant gone", || async {
        let list = h.grants.list(&ListParams::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;

    let mut left = Vec::new();
    for name in &derived {
        if h.document_exists(name).await {
            left.push(name.clone());
        }
    }
    assert!(
        left.is_empty(),
        "{} of {} documents left behind: {left:?}",
        left.len(),
        derived.len()
    );
    assert_eq!(
        h.documents_tagged_in_namespace().await,
        Vec::<String>::new()
    );
    assert_eq!(h.policies_in_namespace().await, Vec::<String>::new());
    h.stop().await;
}

/// A grant whose spec has synced is cleaned up through the names it derives, without listing
/// documents. That relies on the API server bumping the generation once when an object with
/// finalizers is deleted (a sync of the generation before counts), which a second finalizer
/// holds the grant to show.
#[tokio::test]
async fn a_synced_grant_is_deleted_by_name_without_a_listing() {
    const HOLD: &str = "test.fleetaccess.io/hold";
    let h = Harness::start("op-delete-by-name", Duration::from_secs(300)).await;
    let judy = h.unique("judy");
    h.user(&judy).await;
    let spec = json!({
        "principals": {"users": [judy]},
        "targets": {"instanceIds": ["i-0000000000000000a"]},
        "sessions": {"shell": true, "ports": [5432]},
    });
    h.create("web", spec).await;
    let grant = h.wait_condition("web", "Ready", "True").await;
    let documents: Vec<String> = h
        .derived_documents(&grant)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(documents.len(), 2);
    let mut finalizers = grant.finalizers().to_vec();
    finalizers.push(HOLD.to_owned());
    h.grants
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
        )
        .await
        .expect("hold");
    let generation = grant.metadata.generation.expect("generation");
    let listings = || {
        h.metrics
            .aws_calls
            .with_label_values(&["ssm", "ListDocuments", "ok"])
            .get()
    };
    let listed_before = listings();

    h.grants
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    let held = wait_for("the operator's cleanup", || async {
        let grant = h.grants.get_opt("web").await.ok()??;
        (!grant.finalizers().iter().any(|f| f == reconcile::FINALIZER)).then_some(grant)
    })
    .await;
    assert_eq!(
        held.metadata.generation,
        Some(generation + 1),
        "the deletion bumped the generation once"
    );
    for name in &documents {
        assert!(!h.document_exists(name).await, "{name} deleted");
    }
    assert!(
        h.policy_document(&h.set_arn(&format!("user/{judy}")))
            .await
            .is_none()
    );
    assert_eq!(listings(), listed_before, "no listing: {}", h.calls());

    h.grants
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": []}})),
        )
        .await
        .expect("release");
    wait_for("the grant to go", || async {
        h.grants.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    h.stop().await;
}

/// A document under a grant's derived name is the grant's only if its owner tag says so: an
/// untagged one is refused (and left alone, also at cleanup), a tagged one is adopted.
#[tokio::test]
async fn a_same_named_document_is_adopted_only_with_the_grants_tag() {
    let h = Harness::start("op-doc-owner", Duration::from_secs(300)).await;
    let ivan = h.unique("ivan");
    h.user(&ivan).await;
    let spec = json!({
        "principals": {"users": [ivan]},
        "targets": {"instanceIds": ["i-0000000000000000a"]},
        "sessions": {"shell": true},
    });
    let by_hand = json!({"schemaVersion": "1.0", "description": "made by hand",
        "sessionType": "Standard_Stream", "inputs": {"idleSessionTimeout": "35"}});
    let taken =
        naming::grant_object_name(&h.settings.cluster, h.namespace.name(), "taken", "-shell");
    let mine = naming::grant_object_name(&h.settings.cluster, h.namespace.name(), "mine", "-shell");
    h.create_document(&taken, &by_hand, None).await;
    let owner = naming::owner_tag_value(&h.settings.cluster, h.namespace.name(), "mine");
    h.create_document(&mine, &by_hand, Some(&owner)).await;

    h.create("taken", spec.clone()).await;
    let grant = h.create("mine", spec).await;

    let refused = h.wait_condition("taken", "PolicySynced", "False").await;
    let condition = find(&refused, "PolicySynced").expect("condition");
    assert_eq!(condition.reason, "NotOwned");
    assert!(condition.message.contains(&taken), "{}", condition.message);
    assert_eq!(h.document_content(&taken).await, Some(by_hand.clone()));

    h.wait_condition("mine", "Ready", "True").await;
    let [(name, rendered)] = h
        .derived_documents(&grant)
        .try_into()
        .expect("one document");
    assert_eq!(name, mine);
    assert_eq!(
        h.document_content(&mine).await,
        Some(rendered),
        "adopted and updated"
    );

    for name in ["taken", "mine"] {
        h.grants
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_for("both grants gone", || async {
        let list = h.grants.list(&ListParams::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    assert!(
        !h.document_exists(&mine).await,
        "the adopted document is deleted"
    );
    assert_eq!(
        h.document_content(&taken).await,
        Some(by_hand),
        "the foreign document is left alone"
    );
    h.ssm
        .delete_document()
        .name(&taken)
        .send()
        .await
        .expect("test cleanup");
    h.stop().await;
}

/// Two clusters share the AWS account, and both have a grant `web` in a namespace of the same
/// name: the other cluster's operator has synced it (its policy attached to the same user, its
/// shell document), as this operator would under the other cluster's name. This operator
/// creates, changes and deletes only its own objects: the other's stay as they were.
#[tokio::test]
async fn another_clusters_objects_of_the_same_grant_are_never_touched() {
    let h = Harness::start("op-clusters", Duration::from_secs(300)).await;
    let judy = h.unique("judy");
    h.user(&judy).await;
    let namespace = h.namespace.name();
    let theirs = naming::owner_tag_value("other", namespace, "web");
    let their_policy = naming::grant_object_name("other", namespace, "web", "");
    let their_shell = naming::grant_object_name("other", namespace, "web", "-shell");
    let their_document = json!({"Version": "2012-10-17", "Statement": [{"Sid": "TheirOwn",
        "Effect": "Allow", "Action": "ssm:StartSession", "Resource": "*"}]});
    let created = h
        .iam
        .create_policy()
        .policy_name(&their_policy)
        .path(naming::POLICY_PATH)
        .policy_document(their_document.to_string())
        .tags(
            aws_sdk_iam::types::Tag::builder()
                .key(naming::OWNER_TAG)
                .value(&theirs)
                .build()
                .expect("tag"),
        )
        .send()
        .await
        .expect("their policy");
    let their_arn = created
        .policy()
        .and_then(|p| p.arn())
        .expect("arn")
        .to_owned();
    h.iam
        .attach_user_policy()
        .user_name(&judy)
        .policy_arn(&their_arn)
        .send()
        .await
        .expect("attached");
    let their_content = json!({"schemaVersion": "1.0", "description": "the other cluster's",
        "sessionType": "Standard_Stream", "inputs": {"idleSessionTimeout": "20"}});
    h.create_document(&their_shell, &their_content, Some(&theirs))
        .await;
    let untouched = || async {
        assert_eq!(
            h.attachments(&their_arn).await,
            BTreeSet::from([format!("user/{judy}")])
        );
        let (document, versions) = h.policy_document(&their_arn).await.expect("their policy");
        assert!(
            same_meaning(&document, &their_document.to_string()).unwrap_or(false),
            "{document}"
        );
        assert_eq!(versions, 1, "no version added");
        assert_eq!(
            h.document_content(&their_shell).await,
            Some(their_content.clone())
        );
    };

    let spec = |shell: bool| {
        json!({
            "principals": {"users": [judy]},
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ssh": true, "shell": shell},
        })
    };
    let grant = h.create("web", spec(true)).await;
    h.wait_condition("web", "Ready", "True").await;
    let ours = h.set_arn(&format!("user/{judy}"));
    assert_ne!(ours, their_arn);
    assert_eq!(
        h.attachments(&ours).await,
        BTreeSet::from([format!("user/{judy}")])
    );
    let [(our_shell, _)] = h
        .derived_documents(&grant)
        .try_into()
        .expect("one document");
    assert_ne!(our_shell, their_shell);
    assert!(h.document_exists(&our_shell).await);
    untouched().await;

    // A spec change removes our shell document, and only ours.
    h.set_spec("web", spec(false)).await;
    h.wait_condition("web", "Ready", "True").await;
    wait_for("our shell document to go", || async {
        (!h.document_exists(&our_shell).await).then_some(())
    })
    .await;
    untouched().await;

    // Deleting the grant removes everything of ours and nothing of theirs.
    h.delete("web").await;
    assert_eq!(h.policies_in_namespace().await, Vec::<String>::new());
    untouched().await;
    h.stop().await;
}

/// A grant of every instance lists none, yet its end ends its principal's sessions on every
/// instance (and nobody else's).
#[tokio::test]
async fn the_end_of_a_grant_of_every_instance_ends_its_principals_sessions_everywhere() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    let h = Harness::start("op-all-expiry", Duration::from_secs(300)).await;
    let erin = h.unique("erin");
    h.user(&erin).await;
    let ending_in = |seconds: i64| {
        let expires_at = Timestamp::now() + SignedDuration::from_secs(seconds);
        json!({
            "principals": {"users": [erin]},
            "targets": {"allInstances": true},
            "sessions": {"ssh": true},
            "window": {"expiresAt": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
        })
    };
    h.create("everywhere", ending_in(3600)).await;
    h.wait_condition("everywhere", "PolicySynced", "True").await;
    let user_arn = |name: &str| format!("arn:aws:iam::{ACCOUNT}:user/{name}");
    let (as_erin, as_mallory) = (user_arn(&erin), user_arn(&h.unique("mallory")));
    let (a, b) = ("i-0000000000000000a", "i-0000000000000000b");
    let erins = [
        h.start_session_as(&as_erin, a).await,
        h.start_session_as(&as_erin, b).await,
    ];
    let mallorys = h.start_session_as(&as_mallory, b).await;

    h.set_spec("everywhere", ending_in(3)).await;
    h.wait_condition("everywhere", "Expired", "True").await;
    let ended = wait_for("the ended sessions recorded", || async {
        let grant = h.grants.get("everywhere").await.ok()?;
        grant.status?.sessions_ended
    })
    .await;
    assert_eq!(ended.count, 2, "{}", h.calls());
    assert_eq!(h.terminated(), 2, "{}", h.calls());
    assert_eq!(h.active_sessions(a).await, BTreeSet::new(), "{erins:?}");
    assert_eq!(h.active_sessions(b).await, BTreeSet::from([mallorys]));
    h.stop().await;
}

/// The end of a Deny grant's window gives access back: its principals' open sessions stay, and
/// nothing is recorded as ended.
#[tokio::test]
async fn a_deny_grants_expiry_ends_no_session() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    let h = Harness::start("op-deny-expiry", Duration::from_secs(300)).await;
    let frank = h.unique("frank");
    h.user(&frank).await;
    let instance = "i-0000000000000000a";
    let ending_in = |seconds: i64| {
        let expires_at = Timestamp::now() + SignedDuration::from_secs(seconds);
        json!({
            "effect": "Deny",
            "principals": {"users": [frank]},
            "targets": {"instanceIds": [instance]},
            "window": {"expiresAt": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
        })
    };
    h.create("pause", ending_in(3600)).await;
    h.wait_condition("pause", "PolicySynced", "True").await;
    let franks = h
        .start_session_as(&format!("arn:aws:iam::{ACCOUNT}:user/{frank}"), instance)
        .await;

    h.set_spec("pause", ending_in(3)).await;
    let grant = h.wait_condition("pause", "Expired", "True").await;
    assert_eq!(grant.status.and_then(|s| s.sessions_ended), None);
    assert!(
        h.policy_document(&h.set_arn(&format!("user/{frank}")))
            .await
            .is_none(),
        "deny lifted"
    );
    assert!(h.active_sessions(instance).await.contains(&franks));
    assert_eq!(h.terminated(), 0, "{}", h.calls());
    h.stop().await;
}

/// IAM allows 10 managed policies per identity by default, and moto does not enforce it: the
/// operator counts before it writes, and refuses a grant that would go over, with nothing
/// created; once there is room, the grant applies.
#[tokio::test]
async fn a_grant_over_the_attachment_quota_is_refused_before_anything_is_written() {
    let h = Harness::start("op-quota", Duration::from_secs(300)).await;
    let role = h.unique("crowded");
    h.role(&role).await;
    let foreign = attach_foreign_policies(&h, &role, 10).await;
    let spec = json!({
        "principals": {"roles": [role]},
        "targets": {"instanceIds": ["i-0000000000000000a"]},
        "sessions": {"ssh": true, "ports": [5432]},
    });
    h.create("crowded", spec.clone()).await;
    let refused = h.wait_condition("crowded", "PolicySynced", "False").await;
    let condition = find(&refused, "PolicySynced").expect("PolicySynced");
    assert_eq!(condition.reason, "AttachmentQuota");
    assert!(
        condition.message.contains(&role) && condition.message.contains("quota of 10"),
        "{}",
        condition.message
    );
    assert!(
        h.policy_document(&h.set_arn(&format!("role/{role}")))
            .await
            .is_none(),
        "no policy created"
    );
    assert_eq!(
        h.documents_tagged_in_namespace().await,
        Vec::<String>::new(),
        "no document created"
    );

    // Room for it: one foreign policy goes; the next change of the grant applies it.
    h.iam
        .detach_role_policy()
        .role_name(&role)
        .policy_arn(&foreign[0])
        .send()
        .await
        .expect("detached");
    let mut spec = spec;
    spec["sessions"]["ports"] = json!([5433]);
    h.set_spec("crowded", spec).await;
    h.wait_condition("crowded", "Ready", "True").await;
    let attached = h.attachments(&h.set_arn(&format!("role/{role}"))).await;
    assert_eq!(attached, BTreeSet::from([format!("role/{role}")]));
    h.stop().await;
}

/// A bridge grant changed to a client selector the API server takes in the grant but would
/// refuse in a NetworkPolicy (a label key with a space): the operator refuses the change
/// before writing anything, naming the grant's field, and the endpoint and NetworkPolicy of
/// the grant's last good spec stay as they were.
#[tokio::test]
async fn a_client_selector_a_network_policy_would_refuse_is_refused_with_its_field() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    let h = Harness::start("op-selector", Duration::from_secs(300)).await;
    h.role(h.settings.bridge_role.as_deref().expect("bridge role"))
        .await;
    let spec = |labels: Value| {
        json!({
            "targets": {"instanceIds": ["i-0000000000000000a"]},
            "sessions": {"ports": [5432]},
            "bridge": {"ports": [5432], "clients": [{"podSelector": {"matchLabels": labels}}]},
        })
    };
    h.create("jobs", spec(json!({"app": "jobs"}))).await;
    h.wait_condition("jobs", "BridgeReady", "True").await;
    let policies: Api<NetworkPolicy> = h.namespace.api();
    let name = fleet_access_operator::model::endpoints::network_policy_name(&format!(
        "{}/jobs",
        h.namespace.name()
    ));
    let before = policies.get(&name).await.expect("its NetworkPolicy");

    h.set_spec("jobs", spec(json!({"app name": "jobs"}))).await;
    let refused = h.wait_condition("jobs", "Ready", "False").await;
    let ready = find(&refused, "Ready").expect("Ready");
    assert_eq!(ready.reason, "InvalidGrant", "{ready:?}");
    let policy = find(&refused, "PolicySynced").expect("PolicySynced");
    assert!(
        policy.message.contains(
            r#"spec.bridge.clients[0].podSelector.matchLabels["app name"]: the key "app name" is not a valid label key"#
        ),
        "{}",
        policy.message
    );
    let after = policies.get(&name).await.expect("still there");
    assert_eq!(after.spec, before.spec, "unchanged");
    h.stop().await;
}

/// Attaches `count` policies that are not the operator's to `role`: what leaves its policy set
/// less of the quota. Returns their ARNs.
async fn attach_foreign_policies(h: &Harness, role: &str, count: usize) -> Vec<String> {
    let mut foreign = Vec::new();
    for i in 0..count {
        let name = h.unique(&format!("other-{i}"));
        let arn = h
            .iam
            .create_policy()
            .policy_name(&name)
            .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:ListBucket","Resource":"*"}]}"#)
            .send()
            .await
            .expect("a policy")
            .policy()
            .and_then(|p| p.arn())
            .expect("its ARN")
            .to_owned();
        h.iam
            .attach_role_policy()
            .role_name(role)
            .policy_arn(&arn)
            .send()
            .await
            .expect("attached");
        foreign.push(arn);
    }
    foreign
}

/// A grant that loses its place in a shared policy set through another grant's change (an
/// earlier grant grew) says so at once, not at its next resync (300 s here, longer than the
/// test waits), and gets its place back as soon as there is room.
#[tokio::test]
async fn a_grant_another_grant_leaves_out_of_a_shared_set_says_so_at_once() {
    let h = Harness::start("op-moved", Duration::from_secs(300)).await;
    let role = h.unique("shared");
    h.role(&role).await;
    // Room for one policy of the operator's: about 6,000 characters.
    attach_foreign_policies(&h, &role, 9).await;
    let instances = |from: usize, count: usize| -> Vec<String> {
        (from..from + count)
            .map(|i| format!("i-{:017x}", 0x1000 + i))
            .collect()
    };
    let spec = |instance_ids: Vec<String>| {
        json!({
            "principals": {"roles": [role]},
            "targets": {"instanceIds": instance_ids},
            "sessions": {"ports": [5432]},
        })
    };
    h.create("first", spec(instances(0, 1))).await;
    h.wait_condition("first", "PolicySynced", "True").await;
    // 40 instances: about 2,600 characters, beside the first grant's one.
    h.create("second", spec(instances(100, 40))).await;
    h.wait_condition("second", "PolicySynced", "True").await;

    // The first grant grows to 70 instances: with the second's 40 they need two policies, so
    // the second (created later) is left out of the role's set.
    h.set_spec("first", spec(instances(0, 70))).await;
    let left_out = h.wait_condition("second", "PolicySynced", "False").await;
    let condition = find(&left_out, "PolicySynced").expect("PolicySynced");
    assert_eq!(condition.reason, "AttachmentQuota", "{condition:?}");
    let (document, _) =
        (h.policy_document(&h.set_arn(&format!("role/{role}"))).await).expect("the role's set");
    assert!(
        document.contains(&instances(0, 70)[69]),
        "the first grant's"
    );
    assert!(
        !document.contains(&instances(100, 1)[0]),
        "not the second's"
    );

    // It shrinks again: the second grant is back in, and says so.
    h.set_spec("first", spec(instances(0, 1))).await;
    h.wait_condition("second", "PolicySynced", "True").await;
    let (document, _) =
        (h.policy_document(&h.set_arn(&format!("role/{role}"))).await).expect("the role's set");
    assert!(
        document.contains(&instances(100, 1)[0]),
        "the second's again"
    );
    h.stop().await;
}

/// IAM attaches at most 10 managed policies to one identity by default, and moto does not
/// enforce it, so the test counts: 30 grants naming one role and 30 bridge grants (on the one
/// bridge role) must stay within the quota, each identity with one set merged from its grants.
/// Each grant adds its own instance and port, so no grant's statements are a copy of another's.
#[tokio::test]
async fn thirty_grants_on_one_role_and_thirty_bridge_grants_stay_within_the_quota() {
    const EACH: usize = 30;
    const QUOTA: usize = 10;
    let h = Harness::start("op-set-quota", Duration::from_secs(300)).await;
    let deployer = h.unique("deployer");
    h.role(&deployer).await;
    let bridge_role = h.settings.bridge_role.clone().expect("bridge role");
    h.role(&bridge_role).await;
    let instance = |i: usize| FLEET[i % FLEET.len()].0;
    let port = |i: usize| 5000 + u16::try_from(i).expect("port");
    for i in 0..EACH {
        h.create(
            &format!("deploy-{i}"),
            json!({
                "principals": {"roles": [deployer]},
                "targets": {"instanceIds": [instance(i)]},
                "sessions": {"ssh": true, "ports": [port(i)]},
            }),
        )
        .await;
        h.create(
            &format!("bridge-{i}"),
            json!({
                "targets": {"instanceIds": [instance(i)]},
                "sessions": {"ports": [port(i)]},
                "bridge": {"ports": [port(i)], "clients": [{"podSelector": {"matchLabels": {"app": "jobs"}}}]},
            }),
        )
        .await;
    }
    h.wait_all_ready(2 * EACH).await;

    for role in [&deployer, &bridge_role] {
        let arns = h.role_policies(role).await;
        assert!(
            !arns.is_empty() && arns.len() <= QUOTA,
            "{role} has {} managed policies: {arns:?}",
            arns.len()
        );
        // Every grant's instance and Port document is in the set.
        let mut documents = String::new();
        for arn in &arns {
            documents.push_str(&h.policy_document(arn).await.expect("policy").0);
        }
        for i in 0..EACH {
            let document =
                fleet_access_crds::ssm_documents::port_document_name(&h.settings.cluster, port(i));
            assert!(documents.contains(instance(i)), "{role}: {}", instance(i));
            assert!(documents.contains(&document), "{role}: {document}");
        }
        println!("{EACH} grants on {role}: {} managed policies", arns.len());
    }
    h.stop().await;
}

/// What a tenant who may edit its grants can do: strip the operator's finalizer and delete the
/// grant, so that no cleanup runs. The role's policy set then names a grant that no longer
/// exists, and its NetworkPolicy still admits its clients to a Service another grant keeps; the
/// sweep (at start and every resync) removes the set and withdraws the endpoints, while a
/// second grant, alive, keeps its own.
#[tokio::test]
async fn a_grant_deleted_with_its_finalizer_stripped_loses_its_access_at_the_sweep() {
    use fleet_access_operator::model::endpoints::{grant_ports, network_policy_name};
    use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};

    let h = Harness::start("op-orphan-sweep", Duration::from_secs(2)).await;
    let (gone, kept) = (h.unique("gone"), h.unique("kept"));
    h.role(&gone).await;
    h.role(&kept).await;
    h.role(&h.settings.bridge_role.clone().expect("bridge role"))
        .await;
    for (name, role) in [("vanishing", &gone), ("staying", &kept)] {
        h.create(
            name,
            json!({"principals": {"roles": [role]}, "targets": {"instanceIds": [FLEET[0].0]},
                "sessions": {"ssh": true},
                "bridge": {"clients": [{"podSelector": {"matchLabels": {"app": name}}}]}}),
        )
        .await;
    }
    h.wait_all_ready(2).await;
    let key = |name: &str| format!("{}/{name}", h.namespace.name());
    let (services, policies) = (
        h.namespace.api::<Service>(),
        h.namespace.api::<NetworkPolicy>(),
    );
    let recorded = |service: Option<Service>| -> BTreeSet<String> {
        service
            .map(|s| grant_ports(&s).into_keys().collect())
            .unwrap_or_default()
    };
    assert_eq!(
        recorded(services.get_opt(FLEET[0].0).await.expect("get")),
        BTreeSet::from([key("staying"), key("vanishing")])
    );
    assert_eq!(
        h.role_policies(&gone).await,
        [h.set_arn(&format!("role/{gone}"))]
    );

    h.grants
        .patch(
            "vanishing",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("the finalizer stripped");
    h.grants
        .delete("vanishing", &DeleteParams::default())
        .await
        .expect("deleted");
    let set = h.set_arn(&format!("role/{gone}"));
    wait_for("the orphaned set to be swept", || async {
        let attached = h.role_policies(&gone).await;
        let exists = h.policy_document(&set).await.is_some();
        (attached.is_empty() && !exists).then_some(())
    })
    .await;
    wait_for("the orphaned endpoints to be withdrawn", || async {
        let policy = policies
            .get_opt(&network_policy_name(&key("vanishing")))
            .await
            .ok()?;
        let service = services.get_opt(FLEET[0].0).await.ok()?;
        (policy.is_none() && recorded(service) == BTreeSet::from([key("staying")])).then_some(())
    })
    .await;
    assert_eq!(
        h.role_policies(&kept).await,
        [h.set_arn(&format!("role/{kept}"))],
        "the live grant's role keeps its set"
    );
    assert!(
        (policies
            .get_opt(&network_policy_name(&key("staying")))
            .await)
            .expect("get")
            .is_some(),
        "the live grant keeps its NetworkPolicy"
    );
    h.stop().await;
}
