//! The controller: watches `SessionAccess` and, for each grant, observes AWS, computes the
//! desired state (`desired`), diffs it (`plan`), applies the changes through [`IamApi`] /
//! [`SsmApi`], and writes the status (`status`). A finalizer guarantees cleanup, which runs the
//! same applier with nothing desired.
//!
//! ```text
//!  watch ─▶ finalizer ─┬─ Apply:   observe ─▶ desired::compute ─▶ plan ─▶ apply ─▶ status
//!                      └─ Cleanup: observe ─▶ (nothing wanted)  ─▶ plan ─▶ apply
//! ```
//!
//! AWS objects are observed by the names the grant derives, and their owner tag says whether
//! they are the grant's. A listing of session documents by the owner tag only sweeps up the
//! documents of an earlier spec (after a spec change until a sync of the new spec succeeds, at
//! apply or at cleanup): a paged listing misses documents while other grants delete theirs, so
//! nothing may depend on it alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use fleet_access_crds::{
    SessionAccess, agent_version,
    v1alpha1::{PolicyStatus, SessionAccessStatus, TargetStatus},
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use serde_json::json;

use crate::{
    Error, Result,
    aws::{AwsError, IamApi, Principal, PrincipalKind, SsmApi, with_retry},
    metrics::Metrics,
    model::{
        desired::{self, Desired},
        naming::{OWNER_TAG, POLICY_PATH, owned_by},
        plan::{self, Change, ObservedPolicy, WantedDocument, WantedPolicy},
        status::{self, Observations, Outcome},
    },
    settings::Settings,
};

/// The finalizer that guarantees cleanup.
pub const FINALIZER: &str = "fleetaccess.io/cleanup";

/// The field manager of the status the operator writes.
pub const FIELD_MANAGER: &str = "fleet-access-operator";

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
            states: Mutex::new(BTreeMap::new()),
            endpoints: tokio::sync::Mutex::new(()),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    fn policy_arn(&self, name: &str) -> String {
        format!(
            "arn:{}:iam::{}:policy{POLICY_PATH}{name}",
            self.settings.partition, self.account
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
    fn set_expiry(&self, grant: &SessionAccess, expires_at: Option<Timestamp>) {
        let (namespace, name) = (grant.namespace().unwrap_or_default(), grant.name_any());
        let labels = [namespace.as_str(), name.as_str()];
        match expires_at {
            Some(at) => self
                .metrics
                .grant_expiry
                .with_label_values(&labels)
                .set(at.as_second()),
            // Absent already is fine.
            None => {
                let _ = self.metrics.grant_expiry.remove_label_values(&labels);
            }
        }
    }

    fn set_state(&self, grant: &str, state: Option<&'static str>) {
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

/// Runs the controller until `shutdown` completes, over every namespace or only `namespace`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};

    let grants: Api<SessionAccess> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // The endpoint Services and NetworkPolicies the operator writes live in the bridge
    // namespace, often apart from their grants (so no ownerReferences): they point back to
    // their grants through annotations, and a change or deletion behind the operator's back
    // reconciles those grants at once instead of at the next resync.
    let bridge_namespace = ctx.settings.bridge_namespace.clone();
    let owned = watcher::Config::default()
        .labels(&services_selector())
        .any_semantic();
    let scope = namespace.map(str::to_owned);
    let in_scope = move |(ns, name): (String, String)| {
        (scope.is_none() || scope.as_deref() == Some(ns.as_str()))
            .then(|| ObjectRef::<SessionAccess>::new(&name).within(&ns))
    };
    let for_policies = in_scope.clone();
    let controller = Controller::new(grants, watcher::Config::default().any_semantic());
    let known = controller.store();
    controller
        .watches(
            Api::<Service>::namespaced(ctx.client.clone(), &bridge_namespace),
            owned.clone(),
            move |service| {
                let owners = crate::model::endpoints::grants_of_service(&service);
                if owners.is_empty() {
                    // Stripped of its record: any grant with endpoints may own it.
                    return known
                        .state()
                        .iter()
                        .filter(|g| g.spec.bridge.as_ref().is_some_and(|b| b.enabled))
                        .map(|g| ObjectRef::from_obj(g.as_ref()))
                        .collect::<Vec<_>>();
                }
                owners
                    .into_iter()
                    .filter_map(in_scope.clone())
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &bridge_namespace),
            owned,
            move |policy| {
                crate::model::endpoints::grant_of_network_policy(&policy)
                    .and_then(for_policies.clone())
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile ended with an error");
            }
        })
        .await;
}

/// Reconciles one grant.
pub async fn reconcile(grant: Arc<SessionAccess>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = grant.namespace().unwrap_or_else(|| "default".into());
    let grant_key = grant_id(&grant);
    let api: Api<SessionAccess> = Api::namespaced(ctx.client.clone(), &namespace);
    let timer = ctx
        .metrics
        .reconcile_duration
        .with_label_values(&["SessionAccess"])
        .start_timer();
    let result = finalizer(&api, FINALIZER, grant, |event| async {
        match event {
            Event::Apply(grant) => apply(&grant, &api, &ctx).await,
            Event::Cleanup(grant) => cleanup(&grant, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    timer.observe_duration();
    if result.is_ok() {
        ctx.forget_failures(&failure_key("SessionAccess", &grant_key));
    }
    result
}

/// Requeues failed reconciles with a growing pause, counting them by kind.
pub fn error_policy(grant: Arc<SessionAccess>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.metric_label()])
        .inc();
    let key = failure_key("SessionAccess", &grant_id(&grant));
    let pause = retry_pause(ctx.count_failure(&key));
    tracing::warn!(grant = %grant.name_any(), %error, retry_in = ?pause, "reconcile failed");
    Action::requeue(pause)
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

// === apply ===

fn grant_id(grant: &SessionAccess) -> String {
    crate::model::naming::owner_tag_value(
        &grant.namespace().unwrap_or_else(|| "default".into()),
        &grant.name_any(),
    )
}

fn expiry(grant: &SessionAccess) -> Option<Timestamp> {
    grant
        .spec
        .window
        .as_ref()
        .and_then(|w| w.expires_at.as_ref())
        .map(|t| t.0)
}

async fn apply(grant: &SessionAccess, api: &Api<SessionAccess>, ctx: &Context) -> Result<Action> {
    let id = grant_id(grant);
    let now = Timestamp::now();
    let expired = expiry(grant).is_some_and(|at| at <= now);
    let previous = grant.status.clone();
    ctx.set_expiry(grant, expiry(grant));

    let desired = match desired::compute(grant, &ctx.settings) {
        Ok(d) => d,
        Err(error) => {
            let seen = Observations {
                generation: grant.metadata.generation,
                policy: Outcome::no("InvalidGrant", error.to_string()),
                targets: Outcome::no("InvalidGrant", "not resolved: the grant is invalid"),
                bridge: Outcome::no("InvalidGrant", "not applied: the grant is invalid"),
                expired,
                policies: Vec::new(),
                attached_principals: Vec::new(),
                target_list: Vec::new(),
            };
            write_status(api, grant, previous.as_ref(), &seen).await?;
            ctx.set_state(&id, Some("failed"));
            return Ok(Action::await_change());
        }
    };

    let known = known_objects(grant, Some(&desired), ctx);
    let (wanted_policies, wanted_documents) = if expired {
        (Vec::new(), Vec::new())
    } else {
        wanted(&desired, ctx)
    };

    let (targets_outcome, target_list) = resolve_targets(grant, &desired, ctx).await;
    if expired {
        terminate_sessions(grant, &target_list, ctx).await;
    }

    let synced = sync(grant, &id, &wanted_policies, &wanted_documents, &known, ctx).await;
    let (policy_outcome, policies, retry) = match synced {
        Ok(policies) => (
            Outcome::yes(
                "Synced",
                format!(
                    "{} IAM policies and {} session documents match the grant",
                    wanted_policies.len(),
                    wanted_documents.len()
                ),
            ),
            policies,
            None,
        ),
        Err(error) => {
            let retry = error.is_retryable();
            if !retry {
                // Terminal: reported in the condition and counted here; the grant is not
                // retried before the next resync or a change of the grant.
                ctx.metrics
                    .reconcile_errors
                    .with_label_values(&[error.metric_label()])
                    .inc();
                tracing::warn!(grant = %grant.name_any(), %error, "terminal error: waiting for a change of the grant or the next resync");
            }
            (sync_failure(&error), Vec::new(), Some((retry, error)))
        }
    };
    let attached_principals = if policy_outcome.ok {
        attached_arns(&wanted_policies, ctx)
    } else {
        previous
            .as_ref()
            .map(|s| s.attached_principals.clone())
            .unwrap_or_default()
    };
    let policies = if policy_outcome.ok {
        policies
    } else {
        previous
            .as_ref()
            .map(|s| s.policies.clone())
            .unwrap_or_default()
    };
    let wanted_endpoints = match &desired.bridge {
        Some(bridge) if !expired => endpoint_instances(bridge, &target_list)
            .into_iter()
            .map(|instance| (instance, bridge.ports.clone()))
            .collect(),
        _ => Vec::new(),
    };
    let clients = desired
        .bridge
        .as_ref()
        .map(|b| b.clients.clone())
        .unwrap_or_default();
    let endpoints = sync_endpoints(grant, &id, &wanted_endpoints, &clients, ctx).await;
    let bridge_outcome = match (&desired.bridge, endpoints) {
        _ if expired => Outcome::yes("Expired", "endpoints removed at expiry"),
        (None, Ok(_)) => Outcome::yes("NotRequested", "the grant asks for no bridge endpoints"),
        (Some(_), Ok(0)) => Outcome::no(
            "NoEndpoints",
            "no instance resolved for the bridge: check spec.targets",
        ),
        (Some(_), Ok(n)) => Outcome::yes(
            "EndpointsReady",
            format!(
                "{n} endpoint Services in namespace {}",
                ctx.settings.bridge_namespace
            ),
        ),
        (_, Err(error)) => Outcome::no("EndpointsFailed", error.to_string()),
    };
    let seen = Observations {
        generation: grant.metadata.generation,
        policy: policy_outcome,
        targets: targets_outcome,
        bridge: bridge_outcome,
        expired,
        policies,
        attached_principals,
        target_list,
    };
    write_status(api, grant, previous.as_ref(), &seen).await?;
    let state = if expired {
        "expired"
    } else if seen.policy.ok && seen.targets.ok && seen.bridge.ok {
        "ready"
    } else {
        "failed"
    };
    ctx.set_state(&id, Some(state));

    next_action(retry, expiry(grant).filter(|_| !expired), now, ctx.resync)
}

/// What follows a reconcile: a retryable failure goes to [`error_policy`] (backoff); success
/// and terminal failures wait for the next resync, or the expiry if sooner. A terminal failure
/// is thus retried only at the resync or when the grant changes, never in a hot loop.
fn next_action(
    failure: Option<(bool, Error)>,
    expires_at: Option<Timestamp>,
    now: Timestamp,
    resync: Duration,
) -> Result<Action> {
    if let Some((true, error)) = failure {
        return Err(error);
    }
    let mut requeue = resync;
    if let Some(at) = expires_at {
        let until = at.duration_since(now);
        let until = Duration::try_from(until).unwrap_or_default() + Duration::from_secs(1);
        requeue = requeue.min(until);
    }
    Ok(Action::requeue(requeue))
}

/// The condition for a failed sync: the AWS error code as reason, and what to do.
fn sync_failure(error: &Error) -> Outcome {
    match error {
        Error::Aws(aws) => {
            let advice = match aws.code.as_str() {
                "LimitExceeded" => {
                    "an IAM quota is reached (policies per account, attachments per principal or policy size): raise the quota or split the grant"
                }
                "MalformedPolicyDocument" => {
                    "IAM rejected the rendered policy: report this as a bug with the grant attached"
                }
                "NoSuchEntity" => {
                    "a principal does not exist in IAM: create it or fix spec.principals"
                }
                code if RETRYABLE_HINT.contains(&code) => {
                    "AWS is throttling or busy: the operator retries with backoff"
                }
                _ => "the operator retries; check the operator's AWS permissions",
            };
            Outcome::no(
                &pascal(&aws.code),
                format!("{} failed: {}: {advice}", aws.operation, aws.message),
            )
        }
        Error::NotOwned(e) => Outcome::no("NotOwned", e.to_string()),
        other => Outcome::no("SyncFailed", other.to_string()),
    }
}

const RETRYABLE_HINT: &[&str] = &[
    "Throttling",
    "ConcurrentModification",
    "EntityTemporarilyUnmodifiable",
    "ServiceFailure",
];

/// A condition reason must be CamelCase letters.
fn pascal(code: &str) -> String {
    let reason: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    if reason.is_empty() || !reason.starts_with(|c: char| c.is_ascii_alphabetic()) {
        "AwsError".into()
    } else {
        reason
    }
}

/// The grant's policies and documents as the plan wants them.
fn wanted(desired: &Desired, ctx: &Context) -> (Vec<WantedPolicy>, Vec<WantedDocument>) {
    let p = &desired.principals;
    let principals: BTreeSet<Principal> = p
        .users
        .iter()
        .map(|n| (PrincipalKind::User, n))
        .chain(p.roles.iter().map(|n| (PrincipalKind::Role, n)))
        .chain(p.groups.iter().map(|n| (PrincipalKind::Group, n)))
        .map(|(kind, name)| Principal {
            kind,
            name: name.clone(),
        })
        .collect();
    let mut policies: Vec<WantedPolicy> = desired
        .policies
        .iter()
        .map(|policy| WantedPolicy {
            name: policy.name.clone(),
            arn: ctx.policy_arn(&policy.name),
            document: policy.document.0.to_json(),
            principals: principals.clone(),
        })
        .collect();
    if let Some(bridge) = &desired.bridge {
        policies.push(WantedPolicy {
            name: bridge.policy.name.clone(),
            arn: ctx.policy_arn(&bridge.policy.name),
            document: bridge.policy.document.0.to_json(),
            principals: BTreeSet::from([Principal {
                kind: PrincipalKind::Role,
                name: bridge.role.clone(),
            }]),
        });
    }
    let documents = desired
        .documents
        .iter()
        .map(|d| WantedDocument {
            name: d.name.clone(),
            content: d.content.to_string(),
        })
        .collect();
    (policies, documents)
}

/// What the grant may own in AWS besides what it wants now: looked up, and removed when no
/// longer wanted.
struct Known {
    /// Policies: the ARNs its status records and the ones its names derive to (which covers a
    /// crash between creating a policy and recording it).
    policy_arns: BTreeSet<String>,
    /// Session documents: the names its spec derives, each looked up by name. Never found only
    /// through a listing: a paged listing misses documents while others are being deleted.
    document_names: BTreeSet<String>,
    /// Whether documents under names of an earlier spec may exist, so that a listing by the
    /// owner tag must look for them: after a spec change until a sync of the new generation
    /// succeeds. A steady grant is never listed, nor deleted through a listing.
    sweep_documents: bool,
}

/// What the grant may own, from its status, its spec and (when it can be computed) its
/// desired state.
fn known_objects(grant: &SessionAccess, desired: Option<&Desired>, ctx: &Context) -> Known {
    Known {
        policy_arns: known_policy_arns(grant, desired, ctx),
        document_names: desired::session_documents(grant)
            .into_iter()
            .map(|d| d.name)
            .collect(),
        sweep_documents: !status::documents_follow_spec(
            grant.status.as_ref(),
            grant.metadata.generation,
        ),
    }
}

/// Every policy ARN the grant may own: the ones its status records and the ones its names
/// derive to (which covers a crash between creating a policy and recording it).
fn known_policy_arns(
    grant: &SessionAccess,
    desired: Option<&Desired>,
    ctx: &Context,
) -> BTreeSet<String> {
    let mut arns: BTreeSet<String> = grant
        .status
        .iter()
        .flat_map(|s| s.policies.iter().map(|p| p.arn.clone()))
        .collect();
    if let Some(desired) = desired {
        arns.extend(desired.policies.iter().map(|p| ctx.policy_arn(&p.name)));
        if let Some(bridge) = &desired.bridge {
            arns.insert(ctx.policy_arn(&bridge.policy.name));
        }
    }
    arns
}

fn attached_arns(wanted: &[WantedPolicy], ctx: &Context) -> Vec<String> {
    let all: BTreeSet<String> = wanted
        .iter()
        .flat_map(|p| p.principals.iter())
        .map(|p| p.arn(&ctx.settings.partition, &ctx.account))
        .collect();
    all.into_iter().collect()
}

/// Brings IAM and SSM to the wanted state; returns the policies with their default versions.
async fn sync(
    grant: &SessionAccess,
    owner: &str,
    wanted_policies: &[WantedPolicy],
    wanted_documents: &[WantedDocument],
    known: &Known,
    ctx: &Context,
) -> Result<Vec<PolicyStatus>> {
    let statuses = sync_policies(grant, owner, wanted_policies, &known.policy_arns, ctx).await?;
    sync_documents(grant, owner, wanted_documents, known, ctx).await?;
    Ok(statuses)
}

/// Brings the grant's policies to `wanted` and removes the other `known_arns` it owns; returns
/// the wanted policies with their default versions.
async fn sync_policies(
    grant: &SessionAccess,
    owner: &str,
    wanted_policies: &[WantedPolicy],
    known_arns: &BTreeSet<String>,
    ctx: &Context,
) -> Result<Vec<PolicyStatus>> {
    let mut statuses = Vec::new();
    for wanted in wanted_policies {
        let observed = observe_policy(&wanted.arn, owner, ctx).await?;
        let changes = plan::policy_changes(owner, Some(wanted), observed.as_ref())?;
        let mut version = observed
            .as_ref()
            .and_then(|o| o.versions.iter().find(|v| v.is_default))
            .map(|v| v.id.clone());
        for change in &changes {
            if let Some(v) = apply_change(grant, owner, change, ctx).await? {
                version = Some(v);
            }
        }
        statuses.push(PolicyStatus {
            arn: wanted.arn.clone(),
            version_id: version.unwrap_or_else(|| "v1".into()),
        });
    }
    let wanted_arns: BTreeSet<&str> = wanted_policies.iter().map(|p| p.arn.as_str()).collect();
    for arn in known_arns
        .iter()
        .filter(|arn| !wanted_arns.contains(arn.as_str()))
    {
        let observed = observe_policy(arn, owner, ctx).await?;
        for change in plan::policy_changes(owner, None, observed.as_ref())? {
            apply_change(grant, owner, &change, ctx).await?;
        }
    }
    Ok(statuses)
}

/// Brings the grant's session documents to `wanted`. Every name the grant derives (and every
/// wanted name) is looked up directly, and its owner tag tells the grant's document from someone
/// else's; then, when documents of an earlier spec may exist, a listing by the owner tag finds
/// them for deletion.
async fn sync_documents(
    grant: &SessionAccess,
    owner: &str,
    wanted: &[WantedDocument],
    known: &Known,
    ctx: &Context,
) -> Result<()> {
    let names: BTreeSet<&str> = known
        .document_names
        .iter()
        .map(String::as_str)
        .chain(wanted.iter().map(|d| d.name.as_str()))
        .collect();
    let mut owned = BTreeMap::new();
    let mut foreign = BTreeSet::new();
    for name in names {
        match observe_document(name, owner, ctx).await? {
            DocumentLookup::Absent => {}
            DocumentLookup::Foreign => {
                foreign.insert(name.to_owned());
            }
            DocumentLookup::Owned { content } => {
                owned.insert(name.to_owned(), content);
            }
        }
    }
    for change in plan::document_changes(wanted, &owned, &foreign)? {
        apply_change(grant, owner, &change, ctx).await?;
    }
    if known.sweep_documents {
        sweep_orphan_documents(grant, owner, wanted, ctx).await?;
    }
    Ok(())
}

/// A session document looked up by name.
enum DocumentLookup {
    /// No document has the name.
    Absent,
    /// It exists without the owner tag naming the grant.
    Foreign,
    /// It is the grant's; the content of its default version.
    Owned { content: String },
}

async fn observe_document(name: &str, owner: &str, ctx: &Context) -> Result<DocumentLookup> {
    let Some(tags) = with_retry(|| ctx.ssm.document_tags(name)).await? else {
        return Ok(DocumentLookup::Absent);
    };
    if !owned_by(&tags, owner) {
        return Ok(DocumentLookup::Foreign);
    }
    // Gone between the two calls: absent.
    Ok(match with_retry(|| ctx.ssm.get_document(name)).await? {
        Some(document) => DocumentLookup::Owned {
            content: document.content,
        },
        None => DocumentLookup::Absent,
    })
}

/// The most listings one sweep makes. A listing that finds no orphan left ends the sweep, so
/// the limit is reached only when tagged documents keep appearing.
const MAX_SWEEP_LISTINGS: usize = 5;

/// Deletes the grant's documents under names it does not want, found by listing its owner tag,
/// and lists again after each round of deletions until a listing finds no orphan left (a paged
/// listing may miss some while other documents are deleted).
async fn sweep_orphan_documents(
    grant: &SessionAccess,
    owner: &str,
    wanted: &[WantedDocument],
    ctx: &Context,
) -> Result<()> {
    let mut deleted = BTreeSet::new();
    for _ in 0..MAX_SWEEP_LISTINGS {
        let listed = with_retry(|| ctx.ssm.list_documents_tagged(OWNER_TAG, owner)).await?;
        let orphans = plan::orphan_documents(wanted, &listed, &deleted);
        if orphans.is_empty() {
            return Ok(());
        }
        for change in &orphans {
            apply_change(grant, owner, change, ctx).await?;
            if let Change::DeleteDocument { name } = change {
                deleted.insert(name.clone());
            }
        }
    }
    Err(Error::DocumentsKeepAppearing {
        owner: owner.to_owned(),
        listings: MAX_SWEEP_LISTINGS,
    })
}

async fn observe_policy(arn: &str, owner: &str, ctx: &Context) -> Result<Option<ObservedPolicy>> {
    let Some(info) = with_retry(|| ctx.iam.get_policy(arn)).await? else {
        return Ok(None);
    };
    let tag = info.tags.get(OWNER_TAG).cloned();
    if !owned_by(&info.tags, owner) {
        return Ok(Some(ObservedPolicy {
            arn: arn.to_owned(),
            owner: tag,
            document: String::new(),
            versions: Vec::new(),
            attached: BTreeSet::new(),
        }));
    }
    let versions = with_retry(|| ctx.iam.list_policy_versions(arn)).await?;
    let document = with_retry(|| ctx.iam.get_policy_document(arn, &info.default_version)).await?;
    let attached = with_retry(|| ctx.iam.list_attachments(arn))
        .await?
        .into_iter()
        .collect();
    Ok(Some(ObservedPolicy {
        arn: arn.to_owned(),
        owner: tag,
        document,
        versions,
        attached,
    }))
}

/// Applies one change, publishes an Event for it, and returns the new default policy version
/// when the change made one.
async fn apply_change(
    grant: &SessionAccess,
    owner: &str,
    change: &Change,
    ctx: &Context,
) -> Result<Option<String>> {
    let tags = BTreeMap::from([(OWNER_TAG.to_owned(), owner.to_owned())]);
    let mut version = None;
    match change {
        Change::CreatePolicy { name, document } => {
            let info =
                with_retry(|| ctx.iam.create_policy(name, POLICY_PATH, document, &tags)).await?;
            version = Some(info.default_version);
        }
        Change::DeletePolicyVersion { arn, version } => {
            with_retry(|| ctx.iam.delete_policy_version(arn, version)).await?
        }
        Change::CreatePolicyVersion { arn, document } => {
            version = Some(with_retry(|| ctx.iam.create_policy_version(arn, document)).await?);
        }
        Change::Attach { arn, principal } => with_retry(|| ctx.iam.attach(arn, principal)).await?,
        Change::Detach { arn, principal } => {
            ignore_not_found(with_retry(|| ctx.iam.detach(arn, principal)).await)?
        }
        Change::DeletePolicy { arn } => {
            ignore_not_found(with_retry(|| ctx.iam.delete_policy(arn)).await)?
        }
        Change::CreateDocument { name, content } => {
            with_retry(|| ctx.ssm.create_document(name, content, &tags)).await?
        }
        Change::UpdateDocument { name, content } => {
            match with_retry(|| ctx.ssm.update_document(name, content)).await {
                Err(e) if e.code == "DuplicateDocumentContent" => {}
                other => {
                    other?;
                }
            }
        }
        Change::DeleteDocument { name } => {
            ignore_not_found(with_retry(|| ctx.ssm.delete_document(name)).await)?
        }
    }
    publish(grant, change.reason(), &change.describe(), ctx).await;
    Ok(version)
}

fn ignore_not_found(
    result: std::result::Result<(), AwsError>,
) -> std::result::Result<(), AwsError> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

async fn publish(grant: &SessionAccess, reason: &str, note: &str, ctx: &Context) {
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &grant.object_ref(&())).await {
        tracing::debug!(%error, "event not published");
    }
}

/// Resolves the targets through DescribeInstanceInformation: instance IDs as listed, tags to
/// the instances carrying them. `allInstances` is not enumerated.
async fn resolve_targets(
    grant: &SessionAccess,
    desired: &Desired,
    ctx: &Context,
) -> (Outcome, Vec<TargetStatus>) {
    let targets = &grant.spec.targets;
    if targets.all_instances {
        return (
            Outcome::yes(
                "AllInstances",
                "the grant covers every instance; none are listed",
            ),
            Vec::new(),
        );
    }
    let ids: Vec<String> = targets
        .instance_ids
        .iter()
        .map(ToString::to_string)
        .collect();
    let tags: BTreeMap<String, String> = targets
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    let mut found = Vec::new();
    for (ids, tags) in [(ids.clone(), BTreeMap::new()), (Vec::new(), tags)] {
        if ids.is_empty() && tags.is_empty() {
            continue;
        }
        match with_retry(|| ctx.ssm.describe_instances(&ids, &tags)).await {
            Ok(instances) => found.extend(instances),
            Err(error) => {
                return (
                    Outcome::no(
                        "DescribeInstanceInformationFailed",
                        format!("cannot resolve the targets: {error}; the policies still apply"),
                    ),
                    Vec::new(),
                );
            }
        }
    }
    found.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    found.dedup_by(|a, b| a.instance_id == b.instance_id);
    let bridged = desired.bridge.is_some();
    let namespace = &ctx.settings.bridge_namespace;
    let list: Vec<TargetStatus> = found
        .iter()
        .map(|i| TargetStatus {
            instance_id: i.instance_id.clone(),
            ping_status: i.ping_status.clone(),
            agent_version: i.agent_version.clone(),
            ssh_capable: i.agent_version.as_deref().map(agent_version::supports_ssh),
            endpoint: bridged.then(|| format!("{}.{namespace}", i.instance_id)),
        })
        .collect();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !found.iter().any(|i| &i.instance_id == *id))
        .collect();
    let outcome = if !missing.is_empty() {
        Outcome::no(
            "InstancesNotManaged",
            format!(
                "SSM does not know {} of the listed instances ({}): check the IDs and that the SSM Agent runs and is registered",
                missing.len(),
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    } else if list.is_empty() {
        Outcome::no(
            "NoInstances",
            "no managed instance matches spec.targets: check the tags or instance IDs",
        )
    } else {
        Outcome::yes("Resolved", format!("{} managed instances", list.len()))
    };
    (outcome, list)
}

/// Terminates the open sessions on the grant's instances (at expiry).
async fn terminate_sessions(grant: &SessionAccess, targets: &[TargetStatus], ctx: &Context) {
    for target in targets {
        let sessions = match with_retry(|| ctx.ssm.active_sessions(&target.instance_id)).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, instance = %target.instance_id, "cannot list sessions");
                continue;
            }
        };
        for session in sessions {
            match with_retry(|| ctx.ssm.terminate_session(&session)).await {
                Ok(()) => {
                    publish(
                        grant,
                        "SessionTerminated",
                        &format!(
                            "terminated session {session} on {} at expiry",
                            target.instance_id
                        ),
                        ctx,
                    )
                    .await
                }
                Err(error) => tracing::warn!(%error, %session, "cannot terminate session"),
            }
        }
    }
}

async fn write_status(
    api: &Api<SessionAccess>,
    grant: &SessionAccess,
    previous: Option<&SessionAccessStatus>,
    seen: &Observations,
) -> Result<()> {
    let status = status::compute(previous, seen, Timestamp::now());
    if previous == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccess",
        "status": status,
    });
    api.patch_status(
        &grant.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

// === cleanup ===

async fn cleanup(grant: &SessionAccess, ctx: &Context) -> Result<Action> {
    let id = grant_id(grant);
    remove_aws_objects(grant, &id, ctx).await?;
    sync_endpoints(grant, &id, &[], &[], ctx).await?;
    ctx.set_state(&id, None);
    ctx.set_expiry(grant, None);
    Ok(Action::await_change())
}

/// Removes every policy and session document the grant owns: the ones it can name directly,
/// then, unless the spec it is deleted with has synced, any other document a listing by its
/// owner tag finds.
async fn remove_aws_objects(grant: &SessionAccess, owner: &str, ctx: &Context) -> Result<()> {
    let desired = desired::compute(grant, &ctx.settings).ok();
    let known = Known {
        sweep_documents: !status::documents_follow_spec_at_deletion(
            grant.status.as_ref(),
            grant.metadata.generation,
        ),
        ..known_objects(grant, desired.as_ref(), ctx)
    };
    sync(grant, owner, &[], &[], &known, ctx).await?;
    Ok(())
}

// === bridge endpoints ===

/// The instances that get endpoints: the listed ones and those the tags resolved to.
fn endpoint_instances(bridge: &desired::BridgeGrant, targets: &[TargetStatus]) -> Vec<String> {
    let mut instances: BTreeSet<String> = bridge.instances.iter().cloned().collect();
    if !bridge.tags.is_empty() {
        instances.extend(targets.iter().map(|t| t.instance_id.clone()));
    }
    instances.into_iter().collect()
}

/// Brings the endpoint Services and the grant's NetworkPolicy to `wanted` (instance → ports);
/// returns how many Services carry the grant's ports.
async fn sync_endpoints(
    grant: &SessionAccess,
    owner: &str,
    wanted: &[(String, Vec<desired::BridgePort>)],
    clients: &[k8s_openapi::api::networking::v1::NetworkPolicyPeer],
    ctx: &Context,
) -> Result<usize> {
    use fleet_access_crds::bridge_contract::EndpointPort;
    use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};
    use kube::api::{DeleteParams, ListParams};

    let _allocation = ctx.endpoints.lock().await;
    let namespace = &ctx.settings.bridge_namespace;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = services
        .list(&ListParams::default().labels(&services_selector()))
        .await
        .map_err(Error::Kube)?;
    let mut current: BTreeMap<String, crate::model::endpoints::GrantPorts> = existing
        .items
        .iter()
        .map(|s| (s.name_any(), crate::model::endpoints::grant_ports(s)))
        .collect();
    let mut used: BTreeSet<u16> = current
        .values()
        .flat_map(|g| g.values().flatten().map(|p| p.target_port))
        .collect();
    let before = current.clone();
    for grants in current.values_mut() {
        grants.remove(owner);
    }
    let mut target_ports = BTreeSet::new();
    for (instance, ports) in wanted {
        let previous = before.get(instance).cloned().unwrap_or_default();
        let entry = current.entry(instance.clone()).or_default();
        let mut mine = Vec::new();
        for port in ports {
            // Reuse the target port this (instance, port) already has, from any grant.
            let reused = previous
                .values()
                .flatten()
                .find(|p| p.port == port.port)
                .map(|p| p.target_port);
            let target = match reused {
                Some(t) => t,
                None => {
                    let t =
                        crate::model::endpoints::allocate_target_port(&used).ok_or_else(|| {
                            Error::Config("no free target port on the bridge pods".into())
                        })?;
                    used.insert(t);
                    t
                }
            };
            target_ports.insert(target);
            mine.push(EndpointPort {
                port: port.port,
                target_port: target,
                document: port.document.clone(),
                port_parameter: port.port_parameter,
            });
        }
        entry.insert(owner.to_owned(), mine);
    }
    let existing: BTreeMap<String, &Service> =
        existing.items.iter().map(|s| (s.name_any(), s)).collect();
    for (instance, grants) in &current {
        // Unchanged when the recorded ports are the same and the Service still says so. A
        // Service stripped of every grant's record is left to its grants, which re-add theirs.
        let unchanged = before.get(instance) == Some(grants)
            && (grants.is_empty()
                || existing.get(instance).is_some_and(|s| {
                    crate::model::endpoints::service_matches(
                        s,
                        &crate::model::endpoints::render_service(namespace, instance, grants),
                    )
                }));
        if unchanged {
            continue;
        }
        if grants.is_empty() {
            match services.delete(instance, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
            publish(
                grant,
                "EndpointDeleted",
                &format!("deleted endpoint Service {namespace}/{instance}"),
                ctx,
            )
            .await;
        } else {
            let service = crate::model::endpoints::render_service(namespace, instance, grants);
            services
                .patch(
                    instance,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&service),
                )
                .await
                .map_err(Error::Kube)?;
            publish(
                grant,
                "EndpointApplied",
                &format!("applied endpoint Service {namespace}/{instance}"),
                ctx,
            )
            .await;
        }
    }
    let policy_name = crate::model::endpoints::network_policy_name(owner);
    if wanted.is_empty() {
        // Most grants never had one: look before deleting, so that their reconciles (every
        // resync) make no write request at all.
        let exists = policies
            .get_metadata_opt(&policy_name)
            .await
            .map_err(Error::Kube)?
            .is_some();
        if !exists {
            return Ok(0);
        }
        match policies
            .delete(&policy_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                publish(
                    grant,
                    "NetworkPolicyDeleted",
                    &format!("deleted NetworkPolicy {namespace}/{policy_name}"),
                    ctx,
                )
                .await
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(Error::Kube(e)),
        }
    } else {
        let policy = crate::model::endpoints::render_network_policy(
            namespace,
            owner,
            clients,
            &target_ports,
        );
        let existing = policies.get_opt(&policy_name).await.map_err(Error::Kube)?;
        if existing.as_ref().and_then(|p| p.spec.as_ref()) != policy.spec.as_ref() {
            policies
                .patch(
                    &policy_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&policy),
                )
                .await
                .map_err(Error::Kube)?;
            publish(
                grant,
                "NetworkPolicyApplied",
                &format!("applied NetworkPolicy {namespace}/{policy_name}"),
                ctx,
            )
            .await;
        }
    }
    Ok(wanted.len())
}

fn services_selector() -> String {
    crate::model::endpoints::managed_selector()
}

#[cfg(test)]
mod tests {
    //! Retry and terminal-error behaviour against a scripted fake of [`IamApi`] / [`SsmApi`]
    //! (no AWS), on tokio's paused clock so that the backoff costs no real time.

    use std::collections::VecDeque;

    use super::*;
    use crate::aws::{AwsResult, DocumentInfo, InstanceInfo, PolicyInfo, PolicyVersion};

    /// IAM that answers `create_policy` from a script of failures, then succeeds; every other
    /// IAM call succeeds with nothing. SSM keeps session documents in memory, and its listing by
    /// tag can be made to miss documents, as a paged listing does while others are deleted.
    /// Records the operations called.
    #[derive(Default)]
    struct FakeAws {
        create_failures: Mutex<VecDeque<&'static str>>,
        calls: Mutex<Vec<&'static str>>,
        documents: Mutex<BTreeMap<String, FakeDocument>>,
        /// Name → how many more listings miss it.
        missed_by_listings: Mutex<BTreeMap<String, usize>>,
    }

    /// A session document the fake keeps.
    struct FakeDocument {
        content: String,
        tags: BTreeMap<String, String>,
    }

    impl FakeAws {
        fn failing(codes: &[&'static str]) -> Arc<Self> {
            Arc::new(Self {
                create_failures: Mutex::new(codes.iter().copied().collect()),
                ..Self::default()
            })
        }

        /// A document that exists before the reconcile, tagged as `owner`'s (or untagged).
        fn with_document(
            self: Arc<Self>,
            name: &str,
            content: &str,
            owner: Option<&str>,
        ) -> Arc<Self> {
            let tags = owner
                .map(|o| BTreeMap::from([(OWNER_TAG.to_owned(), o.to_owned())]))
                .unwrap_or_default();
            self.documents.lock().expect("documents").insert(
                name.to_owned(),
                FakeDocument {
                    content: content.to_owned(),
                    tags,
                },
            );
            self
        }

        /// The next `listings` listings by tag miss `name`.
        fn missed_by_listings(self: Arc<Self>, name: &str, listings: usize) -> Arc<Self> {
            self.missed_by_listings
                .lock()
                .expect("missed")
                .insert(name.to_owned(), listings);
            self
        }

        fn document_names(&self) -> Vec<String> {
            self.documents
                .lock()
                .expect("documents")
                .keys()
                .cloned()
                .collect()
        }

        fn content(&self, name: &str) -> Option<String> {
            let documents = self.documents.lock().expect("documents");
            documents.get(name).map(|d| d.content.clone())
        }

        fn writes(&self) -> usize {
            let calls = self.calls.lock().expect("calls");
            calls.iter().filter(|c| crate::aws::is_write(c)).count()
        }

        fn record(&self, operation: &'static str) {
            self.calls.lock().expect("calls").push(operation);
        }

        fn count(&self, operation: &str) -> usize {
            let calls = self.calls.lock().expect("calls");
            calls.iter().filter(|c| **c == operation).count()
        }
    }

    fn error(operation: &'static str, code: &str) -> AwsError {
        AwsError {
            operation,
            code: code.into(),
            message: format!("scripted {code}"),
        }
    }

    #[async_trait::async_trait]
    impl IamApi for FakeAws {
        async fn get_policy(&self, _: &str) -> AwsResult<Option<PolicyInfo>> {
            self.record("GetPolicy");
            Ok(None)
        }
        async fn create_policy(
            &self,
            _: &str,
            _: &str,
            _: &str,
            tags: &BTreeMap<String, String>,
        ) -> AwsResult<PolicyInfo> {
            self.record("CreatePolicy");
            let next = self.create_failures.lock().expect("script").pop_front();
            match next {
                Some(code) => Err(error("CreatePolicy", code)),
                None => Ok(PolicyInfo {
                    arn: "arn".into(),
                    default_version: "v1".into(),
                    tags: tags.clone(),
                }),
            }
        }
        async fn get_policy_document(&self, _: &str, _: &str) -> AwsResult<String> {
            self.record("GetPolicyVersion");
            Ok(String::new())
        }
        async fn list_policy_versions(&self, _: &str) -> AwsResult<Vec<PolicyVersion>> {
            self.record("ListPolicyVersions");
            Ok(Vec::new())
        }
        async fn create_policy_version(&self, _: &str, _: &str) -> AwsResult<String> {
            self.record("CreatePolicyVersion");
            Ok("v2".into())
        }
        async fn delete_policy_version(&self, _: &str, _: &str) -> AwsResult<()> {
            self.record("DeletePolicyVersion");
            Ok(())
        }
        async fn list_attachments(&self, _: &str) -> AwsResult<Vec<Principal>> {
            self.record("ListEntitiesForPolicy");
            Ok(Vec::new())
        }
        async fn attach(&self, _: &str, _: &Principal) -> AwsResult<()> {
            self.record("AttachPolicy");
            Ok(())
        }
        async fn detach(&self, _: &str, _: &Principal) -> AwsResult<()> {
            self.record("DetachPolicy");
            Ok(())
        }
        async fn delete_policy(&self, _: &str) -> AwsResult<()> {
            self.record("DeletePolicy");
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl SsmApi for FakeAws {
        async fn get_document(&self, name: &str) -> AwsResult<Option<DocumentInfo>> {
            self.record("GetDocument");
            Ok(self.content(name).map(|content| DocumentInfo {
                content,
                default_version: "1".into(),
                latest_version: "1".into(),
            }))
        }
        async fn document_tags(&self, name: &str) -> AwsResult<Option<BTreeMap<String, String>>> {
            self.record("ListTagsForResource");
            let documents = self.documents.lock().expect("documents");
            Ok(documents.get(name).map(|d| d.tags.clone()))
        }
        async fn list_documents_tagged(&self, key: &str, value: &str) -> AwsResult<Vec<String>> {
            self.record("ListDocuments");
            let mut missed = self.missed_by_listings.lock().expect("missed");
            let documents = self.documents.lock().expect("documents");
            let mut names = Vec::new();
            for (name, document) in documents.iter() {
                if document.tags.get(key).is_none_or(|v| v != value) {
                    continue;
                }
                match missed.get_mut(name) {
                    Some(left) if *left > 0 => *left -= 1,
                    _ => names.push(name.clone()),
                }
            }
            Ok(names)
        }
        async fn create_document(
            &self,
            name: &str,
            content: &str,
            tags: &BTreeMap<String, String>,
        ) -> AwsResult<()> {
            self.record("CreateDocument");
            let mut documents = self.documents.lock().expect("documents");
            if documents.contains_key(name) {
                return Err(error("CreateDocument", "DocumentAlreadyExists"));
            }
            documents.insert(
                name.to_owned(),
                FakeDocument {
                    content: content.to_owned(),
                    tags: tags.clone(),
                },
            );
            Ok(())
        }
        async fn update_document(&self, name: &str, content: &str) -> AwsResult<String> {
            self.record("UpdateDocument");
            let mut documents = self.documents.lock().expect("documents");
            let Some(document) = documents.get_mut(name) else {
                return Err(error("UpdateDocument", "InvalidDocument"));
            };
            document.content = content.to_owned();
            Ok("2".into())
        }
        async fn delete_document(&self, name: &str) -> AwsResult<()> {
            self.record("DeleteDocument");
            let mut documents = self.documents.lock().expect("documents");
            match documents.remove(name) {
                Some(_) => Ok(()),
                None => Err(error("DeleteDocument", "InvalidDocument")),
            }
        }
        async fn get_document_version(&self, _: &str, _: &str) -> AwsResult<Option<String>> {
            self.record("GetDocument");
            Ok(None)
        }
        async fn latest_document_version(&self, _: &str) -> AwsResult<Option<String>> {
            self.record("DescribeDocument");
            Ok(None)
        }
        async fn set_default_document_version(&self, _: &str, _: &str) -> AwsResult<()> {
            self.record("UpdateDocumentDefaultVersion");
            Ok(())
        }
        async fn describe_instances(
            &self,
            _: &[String],
            _: &BTreeMap<String, String>,
        ) -> AwsResult<Vec<InstanceInfo>> {
            self.record("DescribeInstanceInformation");
            Ok(Vec::new())
        }
        async fn active_sessions(&self, _: &str) -> AwsResult<Vec<String>> {
            self.record("DescribeSessions");
            Ok(Vec::new())
        }
        async fn terminate_session(&self, _: &str) -> AwsResult<()> {
            self.record("TerminateSession");
            Ok(())
        }
    }

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

    fn grant() -> SessionAccess {
        serde_json::from_value(json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccess",
            "metadata": {"name": "web", "namespace": "ops"},
            "spec": {
                "principals": {"users": ["alice"]},
                "targets": {"instanceIds": ["i-0123456789abcdef0"]},
                "sessions": {"ssh": true},
            },
        }))
        .expect("grant")
    }

    async fn sync_grant(ctx: &Context) -> Result<Vec<PolicyStatus>> {
        apply_grant(&grant(), ctx).await
    }

    /// The AWS part of an apply: what `apply` syncs for `grant`.
    async fn apply_grant(grant: &SessionAccess, ctx: &Context) -> Result<Vec<PolicyStatus>> {
        let desired = desired::compute(grant, &ctx.settings).expect("desired");
        let (policies, documents) = wanted(&desired, ctx);
        let known = known_objects(grant, Some(&desired), ctx);
        sync(grant, &grant_id(grant), &policies, &documents, &known, ctx).await
    }

    /// A grant with a shell document and a port document, at `generation`, without status.
    fn grant_with_documents(generation: i64) -> SessionAccess {
        let mut grant = grant();
        grant.metadata.generation = Some(generation);
        grant.spec.sessions =
            serde_json::from_value(json!({"shell": true, "ports": [5432]})).expect("sessions");
        grant
    }

    /// Its documents: name → content, as the operator renders them.
    fn rendered_documents(grant: &SessionAccess) -> BTreeMap<String, String> {
        desired::session_documents(grant)
            .into_iter()
            .map(|d| (d.name, d.content.to_string()))
            .collect()
    }

    const OWNER: &str = "ops/web";

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
        assert_eq!(aws.count("DeleteDocument"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cleanup_lists_again_until_a_listing_finds_no_orphan_left() {
        // Two documents of ports the grant no longer has; the first listing misses one.
        let grant = grant_with_documents(3);
        let aws = Arc::new(FakeAws::default())
            .with_document("fleet-access.ops.web-port80", "{}", Some(OWNER))
            .with_document("fleet-access.ops.web-port81", "{}", Some(OWNER))
            .missed_by_listings("fleet-access.ops.web-port81", 1)
            .with_document("fleet-access.ops.other-shell", "{}", Some("ops/other"));
        let ctx = context(aws.clone());
        clean_up(&grant, &ctx).await;
        assert_eq!(aws.document_names(), vec!["fleet-access.ops.other-shell"]);
        assert_eq!(
            aws.count("ListDocuments"),
            3,
            "found one, found the other, none left"
        );
    }

    /// The AWS part of a cleanup: what `cleanup` removes for `grant`.
    async fn clean_up(grant: &SessionAccess, ctx: &Context) {
        remove_aws_objects(grant, &grant_id(grant), ctx)
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
            .with_document("fleet-access.ops.web-port80", "{}", Some(OWNER))
            .with_document("fleet-access.ops.other-shell", "{}", Some("ops/other"));
        let ctx = context(aws.clone());
        clean_up(&grant, &ctx).await;
        assert_eq!(aws.document_names(), vec!["fleet-access.ops.other-shell"]);
        assert_eq!(
            aws.count("ListDocuments"),
            2,
            "found the orphan, then none left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cleanup_leaves_a_foreign_document_under_the_grants_name() {
        let grant = grant_with_documents(1);
        let shell = "fleet-access.ops.web-shell";
        let aws = Arc::new(FakeAws::default())
            .with_document(shell, "{}", None)
            .with_document("fleet-access.ops.web-port5432", "{}", Some("ops/other"));
        let ctx = context(aws.clone());
        clean_up(&grant, &ctx).await;
        assert_eq!(aws.document_names().len(), 2);
        assert_eq!(aws.writes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tagged_document_the_listing_misses_is_adopted() {
        let grant = grant_with_documents(2);
        let shell = "fleet-access.ops.web-shell";
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
        assert_eq!(aws.count("CreateDocument"), 1, "the port document");
    }

    #[tokio::test(start_paused = true)]
    async fn a_document_under_the_grants_name_without_its_tag_is_refused() {
        let grant = grant_with_documents(1);
        let shell = "fleet-access.ops.web-shell";
        for owner in [None, Some("ops/other")] {
            let aws = Arc::new(FakeAws::default()).with_document(shell, "{}", owner);
            let ctx = context(aws.clone());
            let error = apply_grant(&grant, &ctx).await.expect_err("refused");
            assert!(matches!(error, Error::NotOwned(_)), "{error}");
            assert_eq!(sync_failure(&error).reason, "NotOwned");
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
        assert_eq!(aws.count("ListTagsForResource"), 2);
        assert_eq!(aws.count("GetDocument"), 2);
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
            "fleet-access.ops.web-port80",
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
        let outcome = sync_failure(&error);
        assert_eq!(outcome.reason, "ConcurrentModification");
        assert!(outcome.message.contains("retries with backoff"));
        let next = next_action(
            Some((true, error)),
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
        ctx.forget_failures(&failure_key("SessionAccess", &grant_id(&grant)));
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
            let outcome = sync_failure(&error);
            assert!(!outcome.ok);
            assert_eq!(outcome.reason, reason);
            assert!(outcome.message.contains(advice), "{}", outcome.message);
            let next = next_action(
                Some((false, error)),
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
}
