//! What the controllers read: a grant's policies and documents in AWS (looked up by the names
//! it derives, owned or not by its tag), the managed instances its targets resolve to, the
//! sessions open on them, the endpoint objects in the bridge namespace, and the boundaries and
//! approvals of a grant's namespace. Reads only.

use std::collections::{BTreeMap, BTreeSet};

use fleet_access_crds::{SessionAccess, SessionAccessApproval, SessionAccessPolicy};
use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    networking::v1::NetworkPolicy,
};
use kube::{Api, ResourceExt, api::ListParams};

use crate::{
    Error, Result,
    aws::{ActiveSession, AwsErrorKind, AwsResult, InstanceInfo, with_retry},
    controller::Context,
    model::{
        census::Covered,
        combination::GroupMembers,
        desired::TargetSelection,
        endpoints::{self, ObservedEndpoints},
        naming::{self, OwnerTag},
        plan::ObservedPolicy,
    },
};

/// A managed policy by ARN: `None` when it does not exist; only its owner tag when it is not
/// `owner`'s (the plan refuses or ignores it without reading more).
pub async fn policy(
    arn: &str,
    owner: OwnerTag<'_>,
    ctx: &Context,
) -> Result<Option<ObservedPolicy>> {
    let iam = &ctx.iam;
    let Some(info) = with_retry(|| iam.get_policy(arn)).await? else {
        return Ok(None);
    };
    let mut observed = ObservedPolicy {
        arn: arn.to_owned(),
        owner: info.tags.get(owner.key).cloned(),
        document: String::new(),
        versions: Vec::new(),
        attached: BTreeSet::new(),
    };
    if owner.owns(&info.tags) {
        observed.versions = with_retry(|| iam.list_policy_versions(arn)).await?;
        observed.document =
            with_retry(|| iam.get_policy_document(arn, &info.default_version)).await?;
        observed.attached = (with_retry(|| iam.list_attachments(arn)).await?)
            .into_iter()
            .collect();
    }
    Ok(Some(observed))
}

/// A session document looked up by name.
pub enum DocumentLookup {
    /// No document has the name.
    Absent,
    /// It exists without the owner tag naming the grant.
    Foreign,
    /// It is the grant's; the content of its default version.
    Owned {
        /// The content.
        content: String,
    },
}

/// A session document by name, and whether it is `owner`'s.
pub async fn document(name: &str, owner: OwnerTag<'_>, ctx: &Context) -> Result<DocumentLookup> {
    let Some(tags) = with_retry(|| ctx.ssm.document_tags(name)).await? else {
        return Ok(DocumentLookup::Absent);
    };
    if !owner.owns(&tags) {
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

/// The names of the documents tagged as `owner`'s, through a paged listing (which may miss some
/// while other documents are deleted).
pub async fn documents_tagged(owner: OwnerTag<'_>, ctx: &Context) -> Result<Vec<String>> {
    Ok(with_retry(|| ctx.ssm.list_documents_tagged(owner.key, owner.value)).await?)
}

/// The managed instances `selection` lists by ID and those carrying its tags (none for
/// `allInstances`, which is never enumerated).
pub async fn instances(selection: &TargetSelection, ctx: &Context) -> AwsResult<Vec<InstanceInfo>> {
    let no_tags = Default::default();
    let mut found = Vec::new();
    if selection.all_instances {
        return Ok(found);
    }
    if !selection.instance_ids.is_empty() {
        found.extend(
            with_retry(|| {
                ctx.ssm
                    .describe_instances(&selection.instance_ids, &no_tags)
            })
            .await?,
        );
    }
    if !selection.tags.is_empty() {
        found.extend(with_retry(|| ctx.ssm.describe_instances(&[], &selection.tags)).await?);
    }
    Ok(found)
}

/// The active sessions on each instance `instances` covers (every instance: each that has one),
/// from one listing.
pub async fn sessions(
    instances: &Covered,
    ctx: &Context,
) -> AwsResult<Vec<(String, Vec<ActiveSession>)>> {
    let all = with_retry(|| ctx.ssm.active_sessions()).await?;
    let targets: BTreeSet<&String> = match instances {
        Covered::All => all.iter().map(|s| &s.target).collect(),
        Covered::Instances(listed) => listed.iter().collect(),
    };
    Ok((targets.into_iter())
        .map(|instance| {
            let on: Vec<ActiveSession> = (all.iter())
                .filter(|s| &s.target == instance)
                .cloned()
                .collect();
            (instance.clone(), on)
        })
        .collect())
}

/// The user names in each of `groups`, as IAM lists them now; a group that does not exist (or
/// no longer) has none.
pub async fn group_members(groups: BTreeSet<String>, ctx: &Context) -> AwsResult<GroupMembers> {
    let mut members = GroupMembers::new();
    for group in groups {
        let users = match with_retry(|| ctx.iam.group_members(&group)).await {
            Ok(arns) => (arns.iter())
                .filter_map(|arn| arn.rsplit('/').next().map(str::to_owned))
                .collect(),
            Err(error) if error.kind() == AwsErrorKind::NotFound => BTreeSet::new(),
            Err(error) => return Err(error),
        };
        members.insert(group, users);
    }
    Ok(members)
}

/// The operator's Services in the bridge namespace and grant `owner`'s NetworkPolicy.
pub async fn endpoints(owner: &str, ctx: &Context) -> Result<ObservedEndpoints> {
    let namespace = &ctx.settings.bridge_namespace;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = services
        .list(&ListParams::default().labels(&endpoints::managed_selector()))
        .await
        .map_err(Error::Kube)?;
    let mut policies = policies
        .list(&ListParams::default().labels(&endpoints::managed_selector()))
        .await
        .map_err(Error::Kube)?
        .items;
    let admitted_ports = policies
        .iter()
        .flat_map(endpoints::admitted_ports)
        .collect();
    let own = endpoints::network_policy_name(owner);
    let network_policy =
        (policies.iter().position(|p| p.name_any() == own)).map(|i| policies.swap_remove(i));
    Ok(ObservedEndpoints {
        services: (listed.items.into_iter())
            .map(|service| (service.name_any(), service))
            .collect(),
        network_policy,
        admitted_ports,
    })
}

/// The grants (`namespace/name`) that the operator's Services and NetworkPolicies in the
/// bridge namespace were made for.
pub async fn endpoint_owners(ctx: &Context) -> Result<BTreeSet<String>> {
    let namespace = &ctx.settings.bridge_namespace;
    let selector = ListParams::default().labels(&endpoints::managed_selector());
    let services = Api::<Service>::namespaced(ctx.client.clone(), namespace)
        .list(&selector)
        .await
        .map_err(Error::Kube)?;
    let policies = Api::<NetworkPolicy>::namespaced(ctx.client.clone(), namespace)
        .list(&selector)
        .await
        .map_err(Error::Kube)?;
    let owners = (services.items.iter())
        .flat_map(endpoints::grants_of_service)
        .chain(
            policies
                .items
                .iter()
                .filter_map(endpoints::grant_of_network_policy),
        );
    Ok(owners
        .map(|(namespace, name)| naming::grant_key(&namespace, &name))
        .collect())
}

/// What the boundaries judge a grant in `namespace` by: every `SessionAccessPolicy`, and the
/// namespace's labels (none when it is gone). Read at each reconcile, two small reads: the
/// controller's watches of both only trigger reconciles (kube's shared stores for secondary
/// watches need an unstable feature), and a grant must be judged on the current boundaries.
pub async fn boundaries(
    namespace: &str,
    ctx: &Context,
) -> Result<(Vec<SessionAccessPolicy>, BTreeMap<String, String>)> {
    let policies = Api::<SessionAccessPolicy>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?;
    let labels = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(namespace)
        .await
        .map_err(Error::Kube)?
        .map(|ns| ns.labels().clone())
        .unwrap_or_default();
    Ok((policies.items, labels))
}

/// The approvals of grants in `namespace`, or in every namespace the operator watches.
pub async fn approvals(
    namespace: Option<&str>,
    ctx: &Context,
) -> Result<Vec<SessionAccessApproval>> {
    watched(namespace, ctx).await
}

/// Every grant the operator watches (one namespace's, with `--watch-namespace`), read afresh
/// from the API server.
pub async fn grants(ctx: &Context) -> Result<Vec<SessionAccess>> {
    watched(None, ctx).await
}

/// Every `K` in `namespace`, or in every namespace the operator watches, read afresh.
async fn watched<K>(namespace: Option<&str>, ctx: &Context) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = match namespace.or(ctx.watch_namespace.as_deref()) {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::all(ctx.client.clone()),
    };
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?;
    Ok(list.items)
}

/// Every `SessionAccessPolicy`, and every namespace's labels: what the boundaries judge any
/// grant by (see [`boundaries`]), read once for a sync that judges many grants.
pub async fn all_boundaries(
    ctx: &Context,
) -> Result<(
    Vec<SessionAccessPolicy>,
    BTreeMap<String, BTreeMap<String, String>>,
)> {
    let policies = Api::<SessionAccessPolicy>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?;
    let namespaces = Api::<Namespace>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?;
    let labels = (namespaces.items.into_iter())
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();
    Ok((policies.items, labels))
}
