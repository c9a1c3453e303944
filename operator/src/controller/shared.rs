//! The session documents every grant of the cluster shares: one Port document per port, named
//! after it and tagged [`CLUSTER_TAG`](crate::model::naming::CLUSTER_TAG). A sync brings them
//! to the union of what the grants that [grant now](crate::controller::granting::granting)
//! need (a grant outside its boundary, waiting for approval, invalid or over creates none): it
//! creates the missing ones and deletes those no grant needs any more, looked up by name: the
//! names every listed grant derives (the ones being deleted included) and the names this
//! process has seen exist.
//! The first sync after a start also lists the documents by the tag, for those an earlier
//! process left. Grant reconciles ask for syncs, which are coalesced as identities' are, and
//! learn from each which grants the grants before them leave out.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::ObjectReference;

use crate::{
    Error, Result,
    controller::{Context, apply::Applier, coalesce::Coalesced, reconcile::sync_documents},
    model::{
        desired,
        naming::OwnerTag,
        plan::{self, Known},
        status::Withheld,
    },
};

/// The grants (owner tag values) a sync left out because of the grants before them, with why
/// ([`Granting::left_out`](crate::controller::granting::Granting::left_out)).
pub type LeftOut = BTreeMap<String, Withheld>;

/// The cluster's shared documents' syncs, one at a time.
#[derive(Default)]
pub struct SharedDocuments {
    syncs: Coalesced<(), LeftOut>,
    /// The shared documents that exist after the last sync, once a sync has listed them.
    existing: Mutex<Option<BTreeSet<String>>>,
    /// The grants the last sync left out.
    left_out: Mutex<BTreeSet<String>>,
}

impl SharedDocuments {
    /// Brings the shared documents up to date with every grant as it is now, and returns the
    /// grants left out; `subject` is the grant its Events are about.
    pub async fn sync(&self, subject: &ObjectReference, ctx: &Context) -> Result<Arc<LeftOut>> {
        let outcome = (self.syncs)
            .run(&(), || async {
                let left_out = self.sync_now(subject, ctx).await?;
                let now: BTreeSet<String> = left_out.keys().cloned().collect();
                let before = std::mem::replace(
                    &mut *self.left_out.lock().unwrap_or_else(|p| p.into_inner()),
                    now.clone(),
                );
                ctx.moved_grants.note(&before, &now);
                Ok(left_out)
            })
            .await;
        outcome.map_err(|source| Error::SharedSync {
            what: "the cluster's shared session documents".into(),
            source,
        })
    }
}

impl SharedDocuments {
    async fn sync_now(&self, subject: &ObjectReference, ctx: &Context) -> Result<LeftOut> {
        let cluster = &ctx.settings.cluster;
        let listed = ctx.granting.now(ctx).await?;
        let granting = &listed.granting;
        let wanted = (granting.granting.iter()).map(|d| d.documents.as_slice());
        let wanted = plan::wanted_shared_documents(wanted);
        // Every name any listed grant derives, granting or not, to find what to delete.
        let documents: Vec<Vec<desired::SessionDocument>> = (listed.grants.iter())
            .map(|grant| desired::session_documents(grant, cluster))
            .collect();
        let existing = self
            .existing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let known = Known {
            policy_arns: BTreeSet::new(),
            document_names: (documents.iter())
                .flat_map(|documents| documents.iter().filter(|d| d.shared))
                .map(|d| d.name.clone())
                .chain(existing.iter().flatten().cloned())
                .collect(),
            sweep_documents: existing.is_none(),
        };
        let owner = OwnerTag::cluster(cluster);
        let applier = Applier::new(ctx, Some(subject.clone()), owner);
        sync_documents(&applier, owner, &wanted, &known, ctx).await?;
        let now: BTreeSet<String> = wanted.into_iter().map(|d| d.name).collect();
        *self.existing.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        Ok(granting.left_out.clone())
    }
}
