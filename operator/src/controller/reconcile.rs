//! The grant controller: watches `SessionAccess` and brings AWS and the bridge namespace to
//! what each grant stands for, in one direction:
//!
//! ```text
//!  watch ─▶ finalizer ─┬─ Apply:   boundary::admit, desired::compute ─▶ observe ─▶ plan ─▶ apply ─▶ status
//!                      └─ Cleanup: (nothing wanted) ─▶ observe ─▶ plan ─▶ apply
//! ```
//!
//! A grant its namespace's boundaries (`SessionAccessPolicy`) refuse, or one that waits for the
//! approval they require (`SessionAccessApproval`, `model::approval`), is applied like an
//! expired one: nothing wanted, so whatever it had is revoked, and its Admitted or Approved
//! condition says why. An approval limited in time narrows the grant's window to its end; a
//! withdrawn or lapsed approval also ends the sessions the grant had open.
//!
//! Four parts, each observed, planned and applied in turn: the policy sets of the grant's IAM
//! identities (`identities`, shared with every grant naming them), its own session documents
//! (`sync_aws`) and the cluster's shared ones (`shared`), the sessions to end at expiry, and the
//! endpoint Services and NetworkPolicy (`sync_endpoints`). Every change goes through the one
//! [`Applier`], and the status is words from typed facts (`model::status`). A finalizer
//! guarantees cleanup, which runs the same parts with nothing wanted.
//!
//! AWS objects are observed by the names the grant derives, and their owner tag says whether
//! they are the grant's. A listing of session documents by the owner tag only sweeps up the
//! documents of an earlier spec (after a spec change until a sync of the new spec succeeds, at
//! apply or at cleanup): a paged listing misses documents while other grants delete theirs, so
//! nothing may depend on it alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use fleet_access_crds::{
    SessionAccess, SessionAccessApproval, SessionAccessPolicy,
    v1alpha1::{PolicyStatus, SessionAccessStatus, SessionsEnded},
};
use futures::StreamExt;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use serde_json::json;

use crate::{
    Error, Result,
    aws::{Principal, PrincipalKind},
    controller::{
        Context, FIELD_MANAGER,
        apply::Applier,
        census, failure_key, identities,
        observe::{self, DocumentLookup},
        retry_pause,
    },
    model::{
        approval::{self, Verdict},
        boundary::{self, Admission},
        desired,
        endpoints::{self, Destination, WantedEndpoints},
        naming::{self, OwnerTag},
        plan::{self, Change, Known, Moment, SessionOwners, WantedDocument},
        policy::Effect,
        status::{self, EndpointsState, Observations, PoliciesState, TargetsState, Withheld},
    },
};

/// The finalizer that guarantees cleanup.
pub const FINALIZER: &str = "fleetaccess.io/cleanup";

/// Runs the controller until `shutdown` completes, over every namespace or only the
/// context's `watch_namespace`.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let namespace = ctx.watch_namespace.clone();
    let namespace = namespace.as_deref();
    use k8s_openapi::api::{
        core::v1::{Namespace, Service},
        networking::v1::NetworkPolicy,
    };

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
        .labels(&endpoints::managed_selector())
        .any_semantic();
    let scope = namespace.map(str::to_owned);
    let in_scope = move |(ns, name): (String, String)| {
        (scope.is_none() || scope.as_deref() == Some(ns.as_str()))
            .then(|| ObjectRef::<SessionAccess>::new(&name).within(&ns))
    };
    let (for_policies, for_approvals) = (in_scope.clone(), in_scope.clone());
    let approvals: Api<SessionAccessApproval> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // A grant that an identity's sync, or the shared documents', left out, or let in again,
    // while reconciling another grant.
    let moved = futures::stream::unfold(ctx.moved_grants.subscribe(), |mut rx| async move {
        let owner = rx.recv().await?;
        Some((owner, rx))
    })
    .filter_map({
        let in_scope = in_scope.clone();
        move |owner| {
            let grant = naming::owner_grant(&owner)
                .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                .and_then(&in_scope);
            async move { grant }
        }
    });
    let controller =
        Controller::new(grants, watcher::Config::default().any_semantic()).reconcile_on(moved);
    let known = controller.store();
    let counted = known.clone();
    // A boundary's change may admit or refuse any grant; a namespace's labels decide which
    // boundaries select its grants.
    let (for_boundaries, for_namespaces) = (known.clone(), known.clone());
    let controller = controller
        .watches(
            Api::<SessionAccessPolicy>::all(ctx.client.clone()),
            watcher::Config::default().any_semantic(),
            move |_| {
                (for_boundaries.state().iter())
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<Namespace>::all(ctx.client.clone()),
            watcher::Config::default().any_semantic(),
            move |namespace| {
                let name = namespace.name_any();
                (for_namespaces.state().iter())
                    .filter(|g| g.namespace().as_deref() == Some(name.as_str()))
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        // An approval given or withdrawn puts its grant in force or revokes it at once.
        .watches(
            approvals,
            watcher::Config::default().any_semantic(),
            move |approval| {
                let namespace = approval.namespace()?;
                for_approvals((namespace, approval.spec.grant.name.clone()))
            },
        )
        .watches(
            Api::<Service>::namespaced(ctx.client.clone(), &bridge_namespace),
            owned.clone(),
            move |service| {
                let owners = endpoints::grants_of_service(&service);
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
                endpoints::grant_of_network_policy(&policy).and_then(for_policies.clone())
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile ended with an error");
            }
        });
    // The sweep and the census stop with the controller (each is idempotent wherever it is
    // cut).
    tokio::select! {
        () = controller => {}
        () = sweep_orphans_every_resync(&ctx) => {}
        () = census::run(counted, &ctx) => {}
    }
}

/// At start, then at every resync interval, sweeps what grants that are gone without their
/// cleanup left (see [`sweep_orphans`]).
async fn sweep_orphans_every_resync(ctx: &Context) {
    loop {
        match sweep_orphans(ctx).await {
            Ok((sets, endpoints)) if !sets.is_empty() || !endpoints.is_empty() => {
                tracing::info!(policy_sets = sets.len(), endpoints_of = ?endpoints, "swept what grants that are gone left");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot sweep what gone grants left; trying again at the next resync")
            }
        }
        tokio::time::sleep(ctx.resync).await;
    }
}

/// Sweeps what grants gone without their cleanup (a finalizer stripped) left: the policy sets
/// of identities no grant names ([`identities::sweep_orphans`]), and the endpoints of grants in
/// scope that no longer exist (their NetworkPolicy still admits their clients, their Service
/// ports stay). What exists is read before the grants, so whatever was seen for a grant belongs
/// to a grant listed, or to one that is gone. Returns the identities and the grants swept.
async fn sweep_orphans(ctx: &Context) -> Result<(Vec<Principal>, Vec<String>)> {
    let with_sets = identities::identities_with_sets(ctx).await?;
    let owners = observe::endpoint_owners(ctx).await?;
    let grants = observe::grants(ctx).await?;
    let sets = identities::sweep_orphans(with_sets, &grants, ctx).await?;
    let live: BTreeSet<String> = grants.iter().map(grant_key).collect();
    let in_scope = |key: &&String| match &ctx.watch_namespace {
        Some(namespace) => naming::parse_grant_key(key).is_some_and(|(ns, _)| ns == namespace),
        None => true,
    };
    let gone: Vec<String> = owners.difference(&live).filter(in_scope).cloned().collect();
    let applier = Applier::new(ctx, None, OwnerTag::cluster(&ctx.settings.cluster));
    for key in &gone {
        sync_endpoints(&applier, key, &WantedEndpoints::default(), ctx).await?;
    }
    Ok((sets, gone))
}

/// Reconciles one grant.
pub async fn reconcile(grant: Arc<SessionAccess>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = namespace_of(&grant);
    let key = grant_key(&grant);
    let api: Api<SessionAccess> = Api::namespaced(ctx.client.clone(), &namespace);
    let timer = (ctx.metrics.reconcile_duration)
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
        ctx.forget_failures(&failure_key("SessionAccess", &key));
    }
    result
}

/// Requeues failed reconciles with a growing pause, counting them by kind.
pub fn error_policy(grant: Arc<SessionAccess>, error: &Error, ctx: Arc<Context>) -> Action {
    (ctx.metrics.reconcile_errors)
        .with_label_values(&[error.metric_label()])
        .inc();
    let key = failure_key("SessionAccess", &grant_key(&grant));
    let pause = retry_pause(ctx.count_failure(&key));
    tracing::warn!(grant = %grant.name_any(), %error, retry_in = ?pause, "reconcile failed");
    Action::requeue(pause)
}

/// `<namespace>/<name>`: how the grant's endpoints and metrics name it.
fn grant_key(grant: &SessionAccess) -> String {
    naming::grant_key(&namespace_of(grant), &grant.name_any())
}

/// `<cluster>/<namespace>/<name>`: the owner tag of the grant's AWS objects.
fn aws_owner(grant: &SessionAccess, ctx: &Context) -> String {
    naming::owner_tag_value(
        &ctx.settings.cluster,
        &namespace_of(grant),
        &grant.name_any(),
    )
}

fn namespace_of(grant: &SessionAccess) -> String {
    grant.namespace().unwrap_or_else(|| "default".into())
}

async fn apply(grant: &SessionAccess, api: &Api<SessionAccess>, ctx: &Context) -> Result<Action> {
    let (key, owner) = (grant_key(grant), aws_owner(grant, ctx));
    let now = Timestamp::now();
    let previous = grant.status.as_ref();
    let (admission, verdict) = judge(grant, ctx, now).await?;
    let refused = matches!(admission, Admission::Refused(_));
    let awaiting = !verdict.allows();
    let in_force = approval::effective(grant, &verdict);
    let desired = match desired::compute(&in_force, &ctx.settings) {
        Ok(desired) => desired,
        Err(error) => {
            ctx.set_expiry(grant, None);
            let seen = Observations {
                generation: grant.metadata.generation,
                admission,
                approval: verdict,
                policy: PoliciesState::Invalid(error.to_string()),
                targets: TargetsState::Invalid,
                bridge: EndpointsState::Invalid,
                expired: false,
                policies: Vec::new(),
                attached_principals: Vec::new(),
                target_list: Vec::new(),
                sessions_ended: None,
                connect: Vec::new(),
            };
            write_status(api, grant, &seen).await?;
            ctx.set_state(&key, Some("failed"));
            return Ok(Action::await_change());
        }
    };
    let expired = desired.expired(now);
    // The shared documents first: their sync says whether the grants before this one leave it
    // out, before anything of its own is written.
    let shared = ctx.shared_documents.sync(&grant.object_ref(&()), ctx).await;
    let left_out = (shared.as_ref().ok()).and_then(|left_out| left_out.get(&owner).cloned());
    // Outside its boundary, waiting for approval, or left out by the grants before it, a grant
    // stands for nothing: like an expired one, it is revoked.
    let withheld = match (refused, awaiting) {
        (true, _) => Some(Withheld::OutsideBoundary),
        (false, true) => Some(Withheld::AwaitingApproval),
        (false, false) => left_out,
    };
    let revoked = expired || withheld.is_some();
    ctx.set_expiry(grant, desired.expires_at);
    let applier = Applier::new(ctx, Some(grant.object_ref(&())), OwnerTag::grant(&owner));
    if let Admission::Refused(refusals) = &admission
        && newly_refused(previous, &admission)
    {
        let first = refusals
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        applier.warn("OutsideBoundary", &first).await;
    }
    if let Some(event) = status::approval_event(previous, &verdict) {
        match event.warning {
            true => applier.warn(event.reason, &event.note).await,
            false => applier.publish(event.reason, &event.note).await,
        }
    }
    if let Some((reason, note)) = status::left_out_event(previous, withheld.as_ref()) {
        applier.warn(reason, &note).await;
    }

    let found = observe::instances(&desired.targets, ctx).await;
    let endpoints = (desired.bridge.as_ref()).map(|bridge| {
        (
            ctx.settings.bridge_namespace.as_str(),
            bridge.ports.as_slice(),
        )
    });
    let (targets, target_list) = match found {
        Ok(found) => status::resolved_targets(&desired.targets, found, endpoints),
        Err(error) => (TargetsState::Unresolvable(error.to_string()), Vec::new()),
    };

    let wanted_documents = match revoked {
        true => Vec::new(),
        false => plan::wanted_documents(&desired),
    };
    let known = plan::known_objects(grant, ctx.scope(), Moment::Living);
    let contributes: BTreeSet<Principal> = match revoked {
        true => BTreeSet::new(),
        false => desired.contributions().into_keys().collect(),
    };
    // Then identities: a grant their quota leaves out gets no document of its own either.
    let synced = async {
        shared?;
        let policies = sync_identities(grant, &owner, &contributes, ctx).await?;
        sync_aws(&applier, &owner, &wanted_documents, &known, ctx).await?;
        Ok::<_, Error>(policies)
    }
    .await;
    let (policy, policies, attached_principals, failure) = match synced {
        Ok(policies) => (
            match withheld.clone() {
                Some(withheld) => PoliciesState::Revoked(withheld),
                None => PoliciesState::Synced {
                    policies: policies.len(),
                    documents: wanted_documents.len(),
                },
            },
            policies,
            (contributes.iter())
                .map(|p| p.arn(&ctx.settings.partition, &ctx.account))
                .collect(),
            None,
        ),
        Err(error) => {
            if !error.is_retryable() {
                // Terminal: reported in the condition and counted here; the grant is not
                // retried before the next resync or a change of the grant.
                (ctx.metrics.reconcile_errors)
                    .with_label_values(&[error.metric_label()])
                    .inc();
                tracing::warn!(grant = %grant.name_any(), %error, "terminal error: waiting for a change of the grant or the next resync");
            }
            // What the status recorded stays recorded until a sync succeeds.
            (
                PoliciesState::Failed(status::sync_failure(&error)),
                previous.map(|s| s.policies.clone()).unwrap_or_default(),
                (previous.map(|s| s.attached_principals.clone())).unwrap_or_default(),
                Some(error),
            )
        }
    };

    let resolved: Vec<String> = target_list.iter().map(|t| t.instance_id.clone()).collect();
    // The status lists the instances with the identities: while a failed sync keeps the
    // identities recorded, it keeps their instances too.
    let target_list = match failure {
        Some(_) => previous.map(|s| s.targets.clone()).unwrap_or_default(),
        None => target_list,
    };
    let wanted_endpoints = WantedEndpoints::of(&desired, &resolved, revoked);
    let synced = sync_endpoints(&applier, &key, &wanted_endpoints, ctx).await;
    // Sessions end when a grant that was granting stops: its window ends, its approval ends
    // (withdrawn or run out), or its boundary no longer admits it. Those the status records it
    // granting end, and no others (a refused grant ends nobody's). Only an Allow ends
    // sessions: the end of a Deny gives access back.
    let granted = status::granted(previous).filter(|_| desired.effect == Effect::Allow);
    let ending = granted.filter(|_| revoked);
    let sessions_ended = match &ending {
        Some(granted) => {
            // Endpoints not synced: every instance counts as still served (`None`), so only
            // the bridge's sessions of this grant alone end.
            let served = synced.as_ref().ok();
            end_sessions(&applier, &key, granted, served, ctx).await
        }
        None => None,
    };
    if ending.is_some() && sessions_ended.is_none() {
        // The status keeps recording what the grant granted, so the next attempt ends them.
        return Err(Error::SessionsNotEnded { grant: key });
    }
    let bridge = match (&desired.bridge, synced, withheld) {
        _ if expired => EndpointsState::Removed,
        (_, Ok(_), Some(withheld)) => EndpointsState::Revoked(withheld),
        (None, Ok(_), None) => EndpointsState::NotRequested,
        (Some(_), Ok(_), None) if wanted_endpoints.services.is_empty() => {
            EndpointsState::NoInstances
        }
        (Some(_), Ok(_), None) => EndpointsState::Ready {
            services: wanted_endpoints.services.len(),
            namespace: ctx.settings.bridge_namespace.clone(),
        },
        (_, Err(error), _) => EndpointsState::Failed(error.to_string()),
    };

    let seen = Observations {
        generation: grant.metadata.generation,
        admission,
        approval: verdict,
        policy,
        targets,
        bridge,
        expired,
        policies,
        attached_principals,
        target_list,
        sessions_ended,
        connect: match revoked {
            true => Vec::new(),
            false => desired.connect.clone(),
        },
    };
    let written = write_status(api, grant, &seen).await?;
    ctx.set_state(&key, Some(state_label(expired, &written)));
    next_action(
        failure,
        desired.expires_at.filter(|_| !expired),
        now,
        ctx.resync,
    )
}

/// Judges the grant against the boundaries of its namespace, and, when they require it, its
/// approvals (listed only then).
async fn judge(
    grant: &SessionAccess,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Admission, Verdict)> {
    let namespace = namespace_of(grant);
    let (boundaries, labels) = observe::boundaries(&namespace, ctx).await?;
    let judged = boundary::Grant {
        spec: &grant.spec,
        namespace: &namespace,
        namespace_labels: &labels,
        created: grant.metadata.creation_timestamp.as_ref().map(|t| t.0),
    };
    let required = approval::required_by(&judged, &boundaries);
    let approvals = match required.is_empty() {
        true => Vec::new(),
        false => observe::approvals(Some(&namespace), ctx).await?,
    };
    Ok((
        boundary::admit(&judged, &boundaries, now),
        approval::judge(grant, required, &approvals, now),
    ))
}

/// Whether `admission` refuses the grant where the recorded status did not, or for another
/// reason: then it is worth an Event.
fn newly_refused(previous: Option<&SessionAccessStatus>, admission: &Admission) -> bool {
    let recorded = (previous.into_iter())
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == status::ADMITTED);
    let words = status::admission_outcome(admission);
    recorded.is_none_or(|c| c.status != "False" || c.message != words.message)
}

/// Ends the sessions of what the grant `key` granted ([`status::granted`]): its principals'
/// on its instances (on any, for a grant of every instance), and the bridge's through its
/// endpoints (`served`: the instances some endpoint still serves; none known: every instance).
/// Returns what was ended, or `None` (logged) when the sessions could not all be listed and
/// ended, to be tried again.
async fn end_sessions(
    applier: &Applier<'_>,
    key: &str,
    granted: &status::Granted,
    served: Option<&BTreeSet<String>>,
    ctx: &Context,
) -> Option<SessionsEnded> {
    let named = |kind| {
        (granted.principals.iter())
            .filter(move |p| p.kind == kind)
            .map(|p| p.name.clone())
    };
    let listed = async {
        let mut users: BTreeSet<String> = named(PrincipalKind::User).collect();
        // A group deleted since has no members to end sessions of.
        let groups = named(PrincipalKind::Group).collect();
        let members = observe::group_members(groups, ctx).await?;
        users.extend(members.into_values().flatten());
        let owners = SessionOwners {
            account: ctx.account.clone(),
            grant: key.to_owned(),
            users,
            roles: named(PrincipalKind::Role).collect(),
            bridge_role: ctx.settings.bridge_role.clone(),
        };
        let open = observe::sessions(&granted.instances, ctx).await?;
        let every_instance = || open.iter().map(|(instance, _)| instance.clone()).collect();
        let served = served.cloned().unwrap_or_else(every_instance);
        Ok::<_, crate::aws::AwsError>(plan::sessions_to_end(&open, &owners, &served))
    };
    let changes = match listed.await {
        Ok(changes) => changes,
        Err(error) => {
            tracing::warn!(%error, "cannot list the sessions to end at expiry; trying again later");
            return None;
        }
    };
    let mut ended = 0;
    for change in &changes {
        // One session that cannot be ended must not keep the others open.
        match applier.apply(change).await {
            Ok(_) => ended += 1,
            Err(error) => tracing::warn!(%error, change = %change.describe(), "cannot end session"),
        }
    }
    (ended == changes.len()).then(|| SessionsEnded {
        at: Time(Timestamp::now()),
        count: i32::try_from(ended).unwrap_or(i32::MAX),
    })
}

/// The grant's state for the `grants` gauge.
fn state_label(expired: bool, status: &SessionAccessStatus) -> &'static str {
    let ready = (status.conditions.iter()).any(|c| c.type_ == status::READY && c.status == "True");
    match (expired, ready) {
        (true, _) => "expired",
        (false, true) => "ready",
        (false, false) => "failed",
    }
}

/// What follows a reconcile: a retryable failure goes to [`error_policy`] (backoff); success
/// and terminal failures wait for the next resync, or the expiry if sooner. A terminal failure
/// is thus retried only at the resync or when the grant changes, never in a hot loop.
fn next_action(
    failure: Option<Error>,
    expires_at: Option<Timestamp>,
    now: Timestamp,
    resync: Duration,
) -> Result<Action> {
    if let Some(error) = failure.filter(Error::is_retryable) {
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

/// Writes the status computed from `seen` unless it is the one recorded; returns it.
async fn write_status(
    api: &Api<SessionAccess>,
    grant: &SessionAccess,
    seen: &Observations,
) -> Result<SessionAccessStatus> {
    let previous = grant.status.as_ref();
    let status = status::compute(previous, seen, Timestamp::now());
    if previous != Some(&status) {
        // The open sessions are the census's field: applying them here would take them over.
        let written = SessionAccessStatus {
            open_sessions: None,
            ..status.clone()
        };
        let patch = json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccess",
            "status": written,
        });
        api.patch_status(
            &grant.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    }
    Ok(status)
}

async fn cleanup(grant: &SessionAccess, ctx: &Context) -> Result<Action> {
    let (key, owner) = (grant_key(grant), aws_owner(grant, ctx));
    let applier = Applier::new(ctx, Some(grant.object_ref(&())), OwnerTag::grant(&owner));
    remove_aws_objects(&applier, grant, &owner, ctx).await?;
    // The grant being deleted contributes nothing any more: its identities' sets lose it, and
    // the shared documents only it needed go.
    sync_identities(grant, &owner, &BTreeSet::new(), ctx).await?;
    ctx.shared_documents
        .sync(&grant.object_ref(&()), ctx)
        .await?;
    sync_endpoints(&applier, &key, &WantedEndpoints::default(), ctx).await?;
    ctx.set_state(&key, None);
    ctx.set_expiry(grant, None);
    Ok(Action::await_change())
}

// === IAM policies and session documents ===

/// Removes every session document (and policy of an earlier release) the deleted grant owns:
/// the ones it can name, then, unless the spec it is deleted with has synced, any other a
/// listing by its owner tag finds.
async fn remove_aws_objects(
    applier: &Applier<'_>,
    grant: &SessionAccess,
    owner: &str,
    ctx: &Context,
) -> Result<()> {
    let known = plan::known_objects(grant, ctx.scope(), Moment::Deleted);
    sync_aws(applier, owner, &[], &known, ctx).await
}

/// Brings the policy sets of the grant's identities up to date: those it contributes to
/// (`contributes`) and those its status says it did (which may lose it); returns the
/// policies of the sets it contributes to. Left out of a set for the quota, it fails with
/// [`Error::AttachmentQuota`].
async fn sync_identities(
    grant: &SessionAccess,
    owner: &str,
    contributes: &BTreeSet<Principal>,
    ctx: &Context,
) -> Result<Vec<PolicyStatus>> {
    let recorded = (grant.status.iter())
        .flat_map(|s| s.attached_principals.iter())
        .filter_map(|arn| Principal::from_arn(arn));
    let identities: BTreeSet<Principal> = contributes.iter().cloned().chain(recorded).collect();
    let subject = grant.object_ref(&());
    let mut policies = Vec::new();
    for identity in &identities {
        let synced = ctx.identities.sync(identity, Some(&subject), ctx).await?;
        if !contributes.contains(identity) {
            continue;
        }
        if synced.left_out.contains(owner) {
            return Err(Error::AttachmentQuota {
                principal: identity.to_string(),
                attached: synced.others,
                needed: synced.policies.len(),
                limit: ctx.settings.max_policies_per_identity,
            });
        }
        policies.extend(synced.policies.iter().cloned());
    }
    Ok(policies)
}

/// Brings the grant's session documents to the wanted state and removes what else it is
/// known to own (its own policies of an earlier release included).
async fn sync_aws(
    applier: &Applier<'_>,
    owner: &str,
    wanted_documents: &[WantedDocument],
    known: &Known,
    ctx: &Context,
) -> Result<()> {
    for arn in &known.policy_arns {
        let observed = observe::policy(arn, OwnerTag::grant(owner), ctx).await?;
        for change in plan::policy_changes(owner, None, observed.as_ref())? {
            applier.apply(&change).await?;
        }
    }
    sync_documents(
        applier,
        OwnerTag::grant(owner),
        wanted_documents,
        known,
        ctx,
    )
    .await
}

/// Brings `owner`'s session documents (a grant's, or the ones its cluster's grants share) to
/// `wanted`. Every known name (and every wanted name) is looked up directly, and its owner tag
/// tells `owner`'s document from someone else's; then, when documents under other names may
/// exist, a listing by the owner tag finds them for deletion.
pub(crate) async fn sync_documents(
    applier: &Applier<'_>,
    owner: OwnerTag<'_>,
    wanted: &[WantedDocument],
    known: &Known,
    ctx: &Context,
) -> Result<()> {
    let names: BTreeSet<&str> = (known.document_names.iter().map(String::as_str))
        .chain(wanted.iter().map(|d| d.name.as_str()))
        .collect();
    let mut owned = BTreeMap::new();
    let mut foreign = BTreeSet::new();
    for name in names {
        match observe::document(name, owner, ctx).await? {
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
        applier.apply(&change).await?;
    }
    if known.sweep_documents {
        sweep_orphan_documents(applier, owner, wanted, ctx).await?;
    }
    Ok(())
}

/// The most listings one sweep makes. A listing that finds no orphan left ends the sweep, so
/// the limit is reached only when tagged documents keep appearing.
const MAX_SWEEP_LISTINGS: usize = 5;

/// Deletes the grant's documents under names it does not want, found by listing its owner tag,
/// and lists again after each round of deletions until a listing finds no orphan left (a paged
/// listing may miss some while other documents are deleted).
async fn sweep_orphan_documents(
    applier: &Applier<'_>,
    owner: OwnerTag<'_>,
    wanted: &[WantedDocument],
    ctx: &Context,
) -> Result<()> {
    let mut deleted = BTreeSet::new();
    for _ in 0..MAX_SWEEP_LISTINGS {
        let listed = observe::documents_tagged(owner, ctx).await?;
        let orphans = plan::orphan_documents(wanted, &listed, &deleted);
        if orphans.is_empty() {
            return Ok(());
        }
        for change in &orphans {
            applier.apply(change).await?;
            if let Change::DeleteDocument { name } = change {
                deleted.insert(name.clone());
            }
        }
    }
    Err(Error::DocumentsKeepAppearing {
        tag: owner.key,
        owner: owner.value.to_owned(),
        listings: MAX_SWEEP_LISTINGS,
    })
}

// === bridge endpoints ===

/// Brings the endpoint Services and the NetworkPolicy of grant `key` to `wanted`; returns the
/// instances that have an endpoint Service afterwards (of any grant). Endpoint changes of
/// all grants are serialized: target ports are allocated across every grant.
async fn sync_endpoints(
    applier: &Applier<'_>,
    key: &str,
    wanted: &WantedEndpoints,
    ctx: &Context,
) -> Result<BTreeSet<String>> {
    let _allocation = ctx.endpoints.lock().await;
    let observed = observe::endpoints(key, ctx).await?;
    let namespace = &ctx.settings.bridge_namespace;
    let mut services = observed.services.clone();
    let limit = ctx.settings.max_bridge_ports_per_namespace;
    for change in endpoints::endpoint_changes(namespace, key, wanted, &observed, limit)? {
        applier.apply(&change).await?;
        match &change {
            Change::ApplyService(service) => {
                services.insert(service.name_any(), service.as_ref().clone());
            }
            Change::DeleteService { name, .. } => {
                services.remove(name);
            }
            _ => {}
        };
    }
    Ok((services.values())
        .map(|service| Destination::of_service(service).instance)
        .collect())
}

#[cfg(test)]
mod tests;
