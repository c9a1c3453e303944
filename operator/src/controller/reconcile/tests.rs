//! Retry and terminal-error behaviour against the scripted fake of [`IamApi`] / [`SsmApi`]
//! (no AWS), on tokio's paused clock so that the backoff costs no real time.

use fleet_access_crds::{fixtures::GrantFixture, v1alpha1::PolicyStatus};
use kube::Client;

use super::*;
use crate::{
    aws::fake::FakeAws,
    controller::identities,
    metrics::Metrics,
    settings::{DEFAULT_CLUSTER, Settings},
};

/// A context whose Kubernetes client points at a closed loopback port: Events fail (and
/// are ignored); nothing else here talks to Kubernetes.
fn context(aws: Arc<FakeAws>) -> Context {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let config = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
    let client = Client::try_from(config).expect("client");
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    Context::new(
        client,
        aws.clone(),
        aws,
        Settings {
            account: Some("123456789012".into()),
            ..Settings::default()
        },
        "123456789012".into(),
        metrics,
        Duration::from_secs(300),
        "test",
    )
}

/// Grant `web` of ops: alice on one instance, with the sessions each grant below allows.
fn web() -> GrantFixture {
    GrantFixture::new("ops", "web")
        .users(["alice"])
        .instance_ids(["i-0123456789abcdef0"])
}

/// SSH only: no documents of its own.
fn grant() -> SessionAccess {
    web().ssh().build()
}

async fn sync_grant(ctx: &Context) -> Result<Vec<PolicyStatus>> {
    apply_grant(&grant(), ctx).await
}

/// The AWS part of an apply: what `apply` syncs for `grant` as the only grant of its
/// identities.
async fn apply_grant(grant: &SessionAccess, ctx: &Context) -> Result<Vec<PolicyStatus>> {
    let desired = desired::compute(grant, &ctx.settings).expect("desired");
    let documents = plan::wanted_documents(&desired);
    let known = plan::known_objects(grant, ctx.scope(), Moment::Living);
    let owner = aws_owner(grant, ctx);
    let applier = Applier::new(ctx, Some(grant.object_ref(&())), OwnerTag::grant(&owner));
    sync_aws(&applier, &owner, &documents, &known, ctx).await?;
    let mut policies = Vec::new();
    for (identity, statements) in desired.contributions() {
        let only = [(owner.clone(), statements)];
        let synced =
            identities::apply_set(&identity, &only, Some(&grant.object_ref(&())), ctx).await?;
        policies.extend(synced.policies);
    }
    Ok(policies)
}

/// A grant with a shell document and a port document, at `generation`, without status.
fn grant_with_documents(generation: i64) -> SessionAccess {
    web().shell().ports([5432]).generation(generation).build()
}

/// Its own documents (not the cluster's shared ones): name → content, as the operator renders
/// them.
fn rendered_documents(grant: &SessionAccess) -> BTreeMap<String, String> {
    desired::session_documents(grant, DEFAULT_CLUSTER)
        .into_iter()
        .filter(|d| !d.shared)
        .map(|d| (d.name, d.content.to_string()))
        .collect()
}

const OWNER: &str = "default/ops/web";

#[tokio::test(start_paused = true)]
async fn cleanup_deletes_the_grants_documents_that_every_listing_misses() {
    let grant = grant_with_documents(1);
    let mut aws = Arc::new(FakeAws::default());
    for (name, content) in rendered_documents(&grant) {
        aws = aws
            .with_document(&name, &content, Some(OWNER))
            .missed_by_listings(&name, usize::MAX);
    }
    let ctx = context(aws.clone());
    clean_up(&grant, &ctx).await;
    assert_eq!(aws.document_names(), Vec::<String>::new());
    assert_eq!(aws.count("DeleteDocument"), 1);
}

#[tokio::test(start_paused = true)]
async fn cleanup_lists_again_until_a_listing_finds_no_orphan_left() {
    // Two documents of ports the grant no longer has; the first listing misses one.
    let grant = grant_with_documents(3);
    let aws = Arc::new(FakeAws::default())
        .with_document("fleet-access.default.ops.web-port80", "{}", Some(OWNER))
        .with_document("fleet-access.default.ops.web-port81", "{}", Some(OWNER))
        .missed_by_listings("fleet-access.default.ops.web-port81", 1)
        .with_document(
            "fleet-access.default.ops.other-shell",
            "{}",
            Some("default/ops/other"),
        );
    let ctx = context(aws.clone());
    clean_up(&grant, &ctx).await;
    assert_eq!(
        aws.document_names(),
        vec!["fleet-access.default.ops.other-shell"]
    );
    assert_eq!(
        aws.count("ListDocuments"),
        3,
        "found one, found the other, none left"
    );
}

/// The AWS part of a cleanup: what `cleanup` removes for `grant`.
async fn clean_up(grant: &SessionAccess, ctx: &Context) {
    let owner = aws_owner(grant, ctx);
    let applier = Applier::new(ctx, Some(grant.object_ref(&())), OwnerTag::grant(&owner));
    remove_aws_objects(&applier, grant, &owner, ctx)
        .await
        .expect("removed");
}

/// The grant as the API server hands it to cleanup: deleted (its generation bumped once),
/// with PolicySynced True for generation `synced`.
fn deleted_grant_synced_at(generation: i64, synced: i64) -> SessionAccess {
    let mut grant = grant_with_documents(generation);
    grant.status = Some(
        serde_json::from_value(json!({"conditions": [{
            "type": "PolicySynced", "status": "True", "reason": "Synced", "message": "",
            "observedGeneration": synced, "lastTransitionTime": "2026-11-29T00:00:00Z",
        }]}))
        .expect("status"),
    );
    grant
}

#[tokio::test(start_paused = true)]
async fn cleanup_of_a_grant_whose_spec_synced_deletes_by_name_without_listing() {
    let grant = deleted_grant_synced_at(3, 2);
    let mut aws = Arc::new(FakeAws::default());
    for (name, content) in rendered_documents(&grant) {
        aws = aws.with_document(&name, &content, Some(OWNER));
    }
    let ctx = context(aws.clone());
    clean_up(&grant, &ctx).await;
    assert_eq!(aws.document_names(), Vec::<String>::new());
    assert_eq!(aws.count("ListDocuments"), 0);
}

#[tokio::test(start_paused = true)]
async fn cleanup_sweeps_when_the_spec_changed_after_its_last_sync() {
    // Synced at 2, the spec changed (3, a port removed), deleted before it synced (4).
    let grant = deleted_grant_synced_at(4, 2);
    let aws = Arc::new(FakeAws::default())
        .with_document("fleet-access.default.ops.web-port80", "{}", Some(OWNER))
        .with_document(
            "fleet-access.default.ops.other-shell",
            "{}",
            Some("default/ops/other"),
        );
    let ctx = context(aws.clone());
    clean_up(&grant, &ctx).await;
    assert_eq!(
        aws.document_names(),
        vec!["fleet-access.default.ops.other-shell"]
    );
    assert_eq!(
        aws.count("ListDocuments"),
        2,
        "found the orphan, then none left"
    );
}

#[tokio::test(start_paused = true)]
async fn cleanup_leaves_a_foreign_document_under_the_grants_name() {
    let grant = grant_with_documents(1);
    let shell = "fleet-access.default.ops.web-shell";
    let aws = Arc::new(FakeAws::default())
        .with_document(shell, "{}", None)
        .with_document(
            "fleet-access.default.ops.web-port5432",
            "{}",
            Some("default/ops/other"),
        );
    let ctx = context(aws.clone());
    clean_up(&grant, &ctx).await;
    assert_eq!(aws.document_names().len(), 2);
    assert_eq!(aws.writes(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_tagged_document_the_listing_misses_is_adopted() {
    let grant = grant_with_documents(2);
    let shell = "fleet-access.default.ops.web-shell";
    let aws = Arc::new(FakeAws::default())
        .with_document(shell, r#"{"schemaVersion":"1.0"}"#, Some(OWNER))
        .missed_by_listings(shell, usize::MAX);
    let ctx = context(aws.clone());
    apply_grant(&grant, &ctx)
        .await
        .expect("adopted, not refused");
    let rendered = rendered_documents(&grant);
    assert_eq!(aws.content(shell).as_ref(), rendered.get(shell));
    assert_eq!(aws.count("UpdateDocument"), 1);
    assert_eq!(aws.count("CreateDocument"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_document_under_the_grants_name_without_its_tag_is_refused() {
    let grant = grant_with_documents(1);
    let shell = "fleet-access.default.ops.web-shell";
    for owner in [None, Some("default/ops/other")] {
        let aws = Arc::new(FakeAws::default()).with_document(shell, "{}", owner);
        let ctx = context(aws.clone());
        let error = apply_grant(&grant, &ctx).await.expect_err("refused");
        assert!(matches!(error, Error::NotOwned(_)), "{error}");
        assert_eq!(status::sync_failure(&error).reason, "NotOwned");
        assert_eq!(aws.content(shell).as_deref(), Some("{}"), "left alone");
        assert_eq!(aws.count("UpdateDocument") + aws.count("DeleteDocument"), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_steady_grant_reads_its_documents_by_name_without_listing_or_writing() {
    let grant = grant_with_documents(1);
    let mut aws = Arc::new(FakeAws::default());
    for (name, content) in rendered_documents(&grant) {
        aws = aws.with_document(&name, &content, Some(OWNER));
    }
    let ctx = context(aws.clone());
    apply_grant(&grant, &ctx).await.expect("synced");
    assert_eq!(aws.count("ListDocuments"), 0);
    // The shell document only: the grant's status records no policy of an earlier release,
    // so the names of that release's Port documents are not looked up.
    assert_eq!(aws.count("ListTagsForResource"), 1);
    assert_eq!(aws.count("GetDocument"), 1);
    let document_writes = ["CreateDocument", "UpdateDocument", "DeleteDocument"]
        .iter()
        .map(|op| aws.count(op))
        .sum::<usize>();
    assert_eq!(document_writes, 0);
}

#[tokio::test(start_paused = true)]
async fn after_a_spec_change_documents_of_the_earlier_spec_are_swept() {
    // Generation 2, not yet synced: the port the grant had before is listed and deleted.
    let grant = grant_with_documents(2);
    let aws = Arc::new(FakeAws::default()).with_document(
        "fleet-access.default.ops.web-port80",
        "{}",
        Some(OWNER),
    );
    let ctx = context(aws.clone());
    apply_grant(&grant, &ctx).await.expect("synced");
    let mut expected: Vec<String> = rendered_documents(&grant).into_keys().collect();
    expected.sort();
    assert_eq!(aws.document_names(), expected);
    assert_eq!(
        aws.count("ListDocuments"),
        2,
        "found the orphan, then none left"
    );
}

#[tokio::test(start_paused = true)]
async fn busy_iam_is_retried_with_doubling_pauses_until_it_answers() {
    let aws = FakeAws::failing(&[
        "Throttling",
        "ConcurrentModification",
        "EntityTemporarilyUnmodifiable",
        "ServiceFailure",
    ]);
    let ctx = context(aws.clone());
    let started = tokio::time::Instant::now();
    let synced = sync_grant(&ctx).await.expect("synced after retries");
    assert_eq!(synced.len(), 1);
    assert_eq!(aws.count("CreatePolicy"), 5, "four failures, then success");
    assert_eq!(aws.count("AttachPolicy"), 1);
    // 100 + 200 + 400 + 800 ms of backoff (paused clock: exact).
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(started.elapsed() < Duration::from_millis(1600));
}

#[tokio::test(start_paused = true)]
async fn busy_iam_that_stays_busy_goes_to_the_error_policy_with_growing_pauses() {
    let aws = FakeAws::failing(&["ConcurrentModification"; 10]);
    let ctx = Arc::new(context(aws.clone()));
    let error = sync_grant(&ctx).await.expect_err("still busy");
    assert_eq!(aws.count("CreatePolicy"), 5, "five attempts per reconcile");
    assert!(error.is_retryable());
    assert_eq!(error.metric_label(), "aws_retryable");
    let outcome = status::sync_failure(&error);
    assert_eq!(outcome.reason, "ConcurrentModification");
    assert!(outcome.message.contains("retries with backoff"));
    let next = next_action(
        Some(error),
        None,
        Timestamp::now(),
        Duration::from_secs(300),
    );
    let error = next.expect_err("a retryable failure goes to the error policy");

    let grant = Arc::new(grant());
    let pauses: Vec<Action> = (0..8)
        .map(|_| error_policy(grant.clone(), &error, ctx.clone()))
        .collect();
    let expected: Vec<Action> = [5, 10, 20, 40, 80, 160, 300, 300]
        .into_iter()
        .map(|s| Action::requeue(Duration::from_secs(s)))
        .collect();
    assert_eq!(pauses, expected);
    // A success resets the backoff.
    ctx.forget_failures(&failure_key("SessionAccess", &grant_key(&grant)));
    assert_eq!(
        error_policy(grant, &error, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test(start_paused = true)]
async fn terminal_errors_are_not_retried_and_wait_for_the_resync() {
    for (code, reason, label, advice) in [
        ("LimitExceeded", "LimitExceeded", "aws_quota", "quota"),
        (
            "MalformedPolicyDocument",
            "MalformedPolicyDocument",
            "aws_invalid_document",
            "rejected the rendered policy",
        ),
    ] {
        let aws = FakeAws::failing(&[code]);
        let ctx = context(aws.clone());
        let error = sync_grant(&ctx).await.expect_err("terminal");
        assert_eq!(aws.count("CreatePolicy"), 1, "{code} is not retried");
        assert_eq!(aws.count("AttachPolicy"), 0);
        assert!(!error.is_retryable());
        assert_eq!(error.metric_label(), label);
        let outcome = status::sync_failure(&error);
        assert!(!outcome.ok);
        assert_eq!(outcome.reason, reason);
        assert!(outcome.message.contains(advice), "{}", outcome.message);
        let next = next_action(
            Some(error),
            None,
            Timestamp::now(),
            Duration::from_secs(300),
        );
        assert_eq!(
            next.expect("a terminal failure is reported in the status"),
            Action::requeue(Duration::from_secs(300)),
            "no hot loop: the next try is the resync"
        );
    }
}

#[test]
fn the_requeue_comes_early_for_an_expiry() {
    let now = Timestamp::now();
    let soon = now + k8s_openapi::jiff::SignedDuration::from_secs(10);
    assert_eq!(
        next_action(None, Some(soon), now, Duration::from_secs(300)).expect("ok"),
        Action::requeue(Duration::from_secs(11))
    );
}

#[test]
fn retry_pauses_double_up_to_five_minutes() {
    assert_eq!(retry_pause(1), Duration::from_secs(5));
    assert_eq!(retry_pause(2), Duration::from_secs(10));
    assert_eq!(retry_pause(7), Duration::from_secs(300));
    assert_eq!(retry_pause(u32::MAX), Duration::from_secs(300));
}

#[tokio::test(start_paused = true)]
async fn after_an_upgrade_the_grants_own_port_documents_of_the_earlier_release_are_deleted() {
    // Synced by an earlier release: its status records the grant's own policy, and the grant
    // had its own Port document, which this release replaces with the cluster's shared one.
    let mut grant = grant_with_documents(1);
    grant.status = Some(
        serde_json::from_value(json!({"policies": [{
            "arn": "arn:aws:iam::123456789012:policy/fleet-access/fleet-access.default.ops.web",
            "versionId": "v1",
        }]}))
        .expect("status"),
    );
    let earlier = "fleet-access.default.ops.web-port5432";
    let aws = Arc::new(FakeAws::default()).with_document(earlier, "{}", Some(OWNER));
    let ctx = context(aws.clone());
    apply_grant(&grant, &ctx).await.expect("synced");
    let mut expected: Vec<String> = rendered_documents(&grant).into_keys().collect();
    expected.sort();
    assert_eq!(
        aws.document_names(),
        expected,
        "the earlier Port document is gone"
    );
    assert_eq!(aws.count("DeleteDocument"), 1);
    assert_eq!(aws.count("ListDocuments"), 0, "found by name");
}
