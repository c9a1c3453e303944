//! The one applier: every [`Change`] the controllers plan, to IAM, SSM or Kubernetes, each
//! followed by an Event on the object whose reconcile made it. AWS calls go through
//! [`with_retry`]; removing what is already gone counts as done.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{ObjectReference, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Resource,
    api::{DeleteParams, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Error, Result,
    aws::{AwsErrorKind, AwsResult, with_retry},
    controller::{Context, FIELD_MANAGER},
    model::{
        naming::{OwnerTag, POLICY_PATH},
        plan::Change,
    },
};

/// Applies the changes made for one object.
pub struct Applier<'a> {
    ctx: &'a Context,
    /// The object the Events are about; with none, changes are logged instead.
    subject: Option<ObjectReference>,
    /// The owner tag of what is created.
    owner: OwnerTag<'a>,
}

impl<'a> Applier<'a> {
    /// An applier for changes made for `subject`, tagging what it creates as `owner`'s.
    pub fn new(ctx: &'a Context, subject: Option<ObjectReference>, owner: OwnerTag<'a>) -> Self {
        Self {
            ctx,
            subject,
            owner,
        }
    }

    /// Applies one change and publishes its Event; returns the new default policy version when
    /// the change made one.
    pub async fn apply(&self, change: &Change) -> Result<Option<String>> {
        let version = self.make(change).await?;
        self.publish(change.reason(), &change.describe()).await;
        Ok(version)
    }

    /// Publishes an Event about the subject.
    pub async fn publish(&self, reason: &str, note: &str) {
        match &self.subject {
            Some(subject) => publish(&self.ctx.recorder, subject, reason, note).await,
            None => tracing::info!(reason, note, "changed"),
        }
    }

    /// Publishes a Warning Event about the subject: something its owner must fix.
    pub async fn warn(&self, reason: &str, note: &str) {
        match &self.subject {
            Some(subject) => {
                let recorder = &self.ctx.recorder;
                publish_event(recorder, subject, EventType::Warning, reason, note).await;
            }
            None => tracing::warn!(reason, note, "warning"),
        }
    }

    async fn make(&self, change: &Change) -> Result<Option<String>> {
        let (iam, ssm) = (&self.ctx.iam, &self.ctx.ssm);
        let tags = BTreeMap::from([(self.owner.key.to_owned(), self.owner.value.to_owned())]);
        match change {
            Change::CreatePolicy { name, document } => {
                let info =
                    with_retry(|| iam.create_policy(name, POLICY_PATH, document, &tags)).await?;
                return Ok(Some(info.default_version));
            }
            Change::CreatePolicyVersion { arn, document } => {
                return Ok(Some(
                    with_retry(|| iam.create_policy_version(arn, document)).await?,
                ));
            }
            Change::DeletePolicyVersion { arn, version } => {
                with_retry(|| iam.delete_policy_version(arn, version)).await?
            }
            Change::Attach { arn, principal } => with_retry(|| iam.attach(arn, principal)).await?,
            Change::Detach { arn, principal } => {
                gone_is_done(with_retry(|| iam.detach(arn, principal)).await)?
            }
            Change::DeletePolicy { arn } => {
                gone_is_done(with_retry(|| iam.delete_policy(arn)).await)?
            }
            Change::CreateDocument { name, content } => {
                with_retry(|| ssm.create_document(name, content, &tags)).await?
            }
            Change::UpdateDocument { name, content } => {
                match with_retry(|| ssm.update_document(name, content)).await {
                    // The default version already holds the content.
                    Err(e) if e.kind() == AwsErrorKind::DuplicateContent => {}
                    other => {
                        other?;
                    }
                }
            }
            Change::DeleteDocument { name } => {
                gone_is_done(with_retry(|| ssm.delete_document(name)).await)?
            }
            Change::TerminateSession { session, .. } => {
                with_retry(|| ssm.terminate_session(session)).await?
            }
            Change::ApplyService(service) => self.server_side_apply(service.as_ref()).await?,
            Change::DeleteService { namespace, name } => {
                self.delete::<Service>(namespace, name).await?
            }
            Change::ApplyNetworkPolicy(policy) => self.server_side_apply(policy.as_ref()).await?,
            Change::DeleteNetworkPolicy { namespace, name } => {
                self.delete::<NetworkPolicy>(namespace, name).await?
            }
        }
        Ok(None)
    }

    /// Creates or updates a namespaced object the operator owns (server-side apply, forced).
    async fn server_side_apply<K>(&self, object: &K) -> Result<()>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + Serialize
            + DeserializeOwned,
        K::DynamicType: Default,
    {
        let meta = object.meta();
        let (Some(namespace), Some(name)) = (&meta.namespace, &meta.name) else {
            return Err(Error::Config(
                "an object to apply has no namespace or name".into(),
            ));
        };
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), namespace);
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(Error::Kube)?;
        Ok(())
    }

    /// Deletes a namespaced object; one already gone counts as deleted.
    async fn delete<K>(&self, namespace: &str, name: &str) -> Result<()>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + DeserializeOwned,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

/// Removing what does not exist is done.
fn gone_is_done(result: AwsResult<()>) -> AwsResult<()> {
    match result {
        Err(e) if e.kind() == AwsErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Publishes a Normal Event about `subject`; a failure to publish is logged, never fatal.
pub async fn publish(recorder: &Recorder, subject: &ObjectReference, reason: &str, note: &str) {
    publish_event(recorder, subject, EventType::Normal, reason, note).await;
}

async fn publish_event(
    recorder: &Recorder,
    subject: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, subject).await {
        tracing::debug!(%error, "event not published");
    }
}
