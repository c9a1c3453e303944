//! The `SessionPreferences` controller: the cluster-scoped singleton `default` becomes the
//! account's default session document `SSM-SessionManagerRunShell` (create-or-update, then
//! `UpdateDocumentDefaultVersion` so the console and the CLI read the same version); deleting
//! it restores what the document was before the operator took it over.
//!
//! Where the original is kept: in an annotation on the `SessionPreferences` object itself,
//! [`PREVIOUS_ANNOTATION`], as JSON `{"existed", "version", "content"}`. It is written before the
//! operator's first change to the document, and the finalizer that restores it is removed only
//! after the restore succeeded, so the record lives exactly as long as it is needed, in etcd,
//! whatever happens to the operator in between. The alternatives were weaker: SSM tags belong
//! to the document, not to a version, and only point at a version that someone may delete,
//! while the annotation carries the content itself (a session document is at most 64 KB, inside
//! the 256 KB annotation budget). Restoring prefers making the original version the default
//! again (no new version) and writes the content as a new version only when that version is gone.
//! A document that did not exist before is deleted on restore (SSM then uses its defaults).
//!
//! ```text
//!  Apply:   get document ─▶ (annotation missing? record it) ─▶ same meaning? ─┬─ yes: nothing
//!                                                                            ├─ absent: CreateDocument
//!                                                                            └─ else: UpdateDocument + default version
//!  Cleanup: annotation ─▶ existed? ─┬─ no: DeleteDocument
//!                                   └─ yes: original version as default (or its content as a new one)
//! ```

use std::{collections::BTreeMap, sync::Arc};

use fleet_access_crds::{SessionPreferences, v1alpha1::SessionPreferencesSpec};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        finalizer::{Event, finalizer},
        watcher,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    Error, Result,
    aws::{AwsErrorKind, AwsResult, with_retry},
    controller::{Context, FIELD_MANAGER, apply, failure_key, retry_pause},
    model::{
        documents::{ACCOUNT_SHELL_DOCUMENT, shell_document},
        status::{self, Outcome},
    },
};

/// The finalizer that guarantees the restore.
pub const FINALIZER: &str = "fleetaccess.io/restore-preferences";

/// The annotation that records the document as it was before the operator's first change.
pub const PREVIOUS_ANNOTATION: &str = "fleetaccess.io/previous-document";

/// The description written into the document.
const DESCRIPTION: &str =
    "fleet-access: the account's default Session Manager preferences (SessionPreferences/default)";

/// How many versions, newest first, are searched for one that already holds some content
/// (SSM refuses a new version identical to an old one).
const VERSION_SEARCH: u64 = 50;

/// The document as it was before the operator took it over.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Previous {
    /// Whether the document existed.
    pub existed: bool,
    /// Its default version then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its content then (empty when it did not exist).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
}

impl Previous {
    /// The record of what is there now: the default version's number and content, or nothing.
    pub fn of(current: Option<(&str, &str)>) -> Self {
        match current {
            Some((version, content)) => Self {
                existed: true,
                version: Some(version.to_owned()),
                content: content.to_owned(),
            },
            None => Self {
                existed: false,
                version: None,
                content: String::new(),
            },
        }
    }
}

/// One step that brings the document where it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// It already is.
    Nothing,
    /// Create it with this content.
    Create(String),
    /// Give it this content as its default version.
    Update(String),
    /// Delete it.
    Delete,
}

/// The content the spec stands for.
pub fn desired_content(spec: &SessionPreferencesSpec) -> String {
    shell_document(DESCRIPTION, &spec.logging).to_string()
}

/// Whether two documents mean the same: equal as JSON (key order and spacing aside), else equal
/// as text.
pub fn same_content(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The step for Apply, from the current default content.
pub fn apply_step(current: Option<&str>, desired: &str) -> Step {
    match current {
        None => Step::Create(desired.to_owned()),
        Some(content) if same_content(content, desired) => Step::Nothing,
        Some(_) => Step::Update(desired.to_owned()),
    }
}

/// The step for Cleanup, from the recorded original and the current default content.
pub fn restore_step(previous: &Previous, current: Option<&str>) -> Step {
    match (previous.existed, current) {
        (false, None) => Step::Nothing,
        (false, Some(_)) => Step::Delete,
        (true, None) => Step::Create(previous.content.clone()),
        (true, Some(content)) if same_content(content, &previous.content) => Step::Nothing,
        (true, Some(_)) => Step::Update(previous.content.clone()),
    }
}

/// The recorded original, when the annotation is there and readable.
pub fn recorded(preferences: &SessionPreferences) -> Option<Previous> {
    preferences
        .annotations()
        .get(PREVIOUS_ANNOTATION)
        .and_then(|text| serde_json::from_str(text).ok())
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<SessionPreferences> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "preferences reconcile ended with an error");
            }
        })
        .await;
}

/// Reconciles the singleton.
pub async fn reconcile(preferences: Arc<SessionPreferences>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<SessionPreferences> = Api::all(ctx.client.clone());
    let key = failure_key("SessionPreferences", &preferences.name_any());
    let timer = ctx
        .metrics
        .reconcile_duration
        .with_label_values(&["SessionPreferences"])
        .start_timer();
    let result = finalizer(&api, FINALIZER, preferences, |event| async {
        match event {
            Event::Apply(p) => apply(&p, &api, &ctx).await,
            Event::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    timer.observe_duration();
    if result.is_ok() {
        ctx.forget_failures(&key);
    }
    result
}

/// Requeues a failed reconcile with a growing pause, counting it by kind.
pub fn error_policy(
    preferences: Arc<SessionPreferences>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.metric_label()])
        .inc();
    let pause =
        retry_pause(ctx.count_failure(&failure_key("SessionPreferences", &preferences.name_any())));
    tracing::warn!(%error, retry_in = ?pause, "preferences reconcile failed");
    Action::requeue(pause)
}

async fn apply(
    preferences: &SessionPreferences,
    api: &Api<SessionPreferences>,
    ctx: &Context,
) -> Result<Action> {
    let result = sync(preferences, api, ctx).await;
    let (outcome, version, had_previous) = match &result {
        Ok((version, had_previous)) => (
            Outcome::yes(
                "Synced",
                format!(
                    "{ACCOUNT_SHELL_DOCUMENT} version {version} matches the spec and is the default version"
                ),
            ),
            Some(version.clone()),
            Some(*had_previous),
        ),
        Err(error) => (
            status::preferences_failure(error),
            None,
            recorded(preferences).map(|p| p.existed),
        ),
    };
    let status = status::preferences(
        preferences.status.as_ref(),
        &outcome,
        preferences.metadata.generation,
        version,
        had_previous,
        Timestamp::now(),
    );
    if preferences.status.as_ref() != Some(&status) {
        let patch = json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionPreferences",
            "status": status,
        });
        api.patch_status(
            &preferences.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    }
    match result {
        Ok(_) => Ok(Action::requeue(ctx.resync)),
        Err(error) if error.is_retryable() => Err(error),
        Err(error) => {
            // Terminal (such as content SSM rejects): shown in Ready, counted, and tried again
            // at the next resync or change, not in a loop.
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[error.metric_label()])
                .inc();
            tracing::warn!(%error, "preferences: terminal error");
            Ok(Action::requeue(ctx.resync))
        }
    }
}

/// Records the original if needed, then brings the document to the spec. Returns the default
/// version and whether a document existed before the operator took it over.
async fn sync(
    preferences: &SessionPreferences,
    api: &Api<SessionPreferences>,
    ctx: &Context,
) -> Result<(String, bool)> {
    let current = with_retry(|| ctx.ssm.get_document(ACCOUNT_SHELL_DOCUMENT)).await?;
    let previous = match recorded(preferences) {
        Some(previous) => previous,
        None => {
            let previous = Previous::of(
                current
                    .as_ref()
                    .map(|d| (d.default_version.as_str(), d.content.as_str())),
            );
            // Durable before the first change: a crash after this line still restores.
            let text = serde_json::to_string(&previous)
                .map_err(|e| Error::Config(format!("cannot record the original document: {e}")))?;
            let patch = json!({"metadata": {"annotations": {PREVIOUS_ANNOTATION: text}}});
            api.patch(
                &preferences.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(Error::Kube)?;
            previous
        }
    };
    let desired = desired_content(&preferences.spec);
    let version = match apply_step(current.as_ref().map(|d| d.content.as_str()), &desired) {
        Step::Nothing | Step::Delete => current
            .map(|d| d.default_version)
            .unwrap_or_else(|| "1".into()),
        Step::Create(content) => {
            let no_tags = BTreeMap::new();
            with_retry(|| {
                ctx.ssm
                    .create_document(ACCOUNT_SHELL_DOCUMENT, &content, &no_tags)
            })
            .await?;
            publish(
                preferences,
                "PreferencesCreated",
                &format!("created {ACCOUNT_SHELL_DOCUMENT}"),
                ctx,
            )
            .await;
            "1".into()
        }
        Step::Update(content) => {
            let version = set_content(&content, None, ctx).await?;
            publish(
                preferences,
                "PreferencesUpdated",
                &format!("{ACCOUNT_SHELL_DOCUMENT} version {version} is now the default"),
                ctx,
            )
            .await;
            version
        }
    };
    Ok((version, previous.existed))
}

async fn cleanup(preferences: &SessionPreferences, ctx: &Context) -> Result<Action> {
    // Without a record the operator never changed the document: nothing to restore.
    let Some(previous) = recorded(preferences) else {
        return Ok(Action::await_change());
    };
    let current = with_retry(|| ctx.ssm.get_document(ACCOUNT_SHELL_DOCUMENT)).await?;
    let note = match restore_step(&previous, current.as_ref().map(|d| d.content.as_str())) {
        Step::Nothing => None,
        Step::Delete => {
            match with_retry(|| ctx.ssm.delete_document(ACCOUNT_SHELL_DOCUMENT)).await {
                Err(e) if e.kind() != AwsErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            Some(format!(
                "deleted {ACCOUNT_SHELL_DOCUMENT}: it did not exist before"
            ))
        }
        Step::Create(content) => {
            let no_tags = BTreeMap::new();
            with_retry(|| {
                ctx.ssm
                    .create_document(ACCOUNT_SHELL_DOCUMENT, &content, &no_tags)
            })
            .await?;
            Some(format!(
                "re-created {ACCOUNT_SHELL_DOCUMENT} with its original content"
            ))
        }
        Step::Update(content) => {
            let version = set_content(&content, previous.version.as_deref(), ctx).await?;
            Some(format!(
                "restored {ACCOUNT_SHELL_DOCUMENT}: version {version}, the original content, is the default again"
            ))
        }
    };
    if let Some(note) = note {
        publish(preferences, "PreferencesRestored", &note, ctx).await;
    }
    Ok(Action::await_change())
}

/// Makes `content` the document's default version: the version `hint` when it still holds that
/// content, else a new version, else (SSM refusing a duplicate) the older version that holds it.
async fn set_content(content: &str, hint: Option<&str>, ctx: &Context) -> AwsResult<String> {
    let ssm = &ctx.ssm;
    if let Some(version) = hint
        && let Some(old) =
            with_retry(|| ssm.get_document_version(ACCOUNT_SHELL_DOCUMENT, version)).await?
        && same_content(&old, content)
    {
        with_retry(|| ssm.set_default_document_version(ACCOUNT_SHELL_DOCUMENT, version)).await?;
        return Ok(version.to_owned());
    }
    let duplicate = match with_retry(|| ssm.update_document(ACCOUNT_SHELL_DOCUMENT, content)).await
    {
        Ok(version) => return Ok(version),
        Err(e) if e.kind() == AwsErrorKind::DuplicateContent => e,
        Err(e) => return Err(e),
    };
    let latest = with_retry(|| ssm.latest_document_version(ACCOUNT_SHELL_DOCUMENT))
        .await?
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    for number in (1..=latest)
        .rev()
        .take(usize::try_from(VERSION_SEARCH).unwrap_or(usize::MAX))
    {
        let version = number.to_string();
        if let Some(old) =
            with_retry(|| ssm.get_document_version(ACCOUNT_SHELL_DOCUMENT, &version)).await?
            && same_content(&old, content)
        {
            with_retry(|| ssm.set_default_document_version(ACCOUNT_SHELL_DOCUMENT, &version))
                .await?;
            return Ok(version);
        }
    }
    Err(duplicate)
}

/// Publishes an Event about the preferences.
async fn publish(preferences: &SessionPreferences, reason: &str, note: &str, ctx: &Context) {
    apply::publish(&ctx.recorder, &preferences.object_ref(&()), reason, note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_creates_updates_or_leaves_alone() {
        let desired = r#"{"schemaVersion":"1.0","inputs":{"a":"1","b":true}}"#;
        assert_eq!(apply_step(None, desired), Step::Create(desired.into()));
        // AWS may return the JSON reformatted: same meaning, nothing to write.
        let reformatted =
            "{\n  \"inputs\": {\"b\": true, \"a\": \"1\"},\n  \"schemaVersion\": \"1.0\"\n}";
        assert_eq!(apply_step(Some(reformatted), desired), Step::Nothing);
        let other = r#"{"schemaVersion":"1.0","inputs":{"a":"2"}}"#;
        assert_eq!(
            apply_step(Some(other), desired),
            Step::Update(desired.into())
        );
    }

    #[test]
    fn restore_brings_back_what_was_there_or_nothing() {
        let original = Previous::of(Some(("1", r#"{"x":1}"#)));
        assert_eq!(
            restore_step(&original, Some(r#"{"x":2}"#)),
            Step::Update(r#"{"x":1}"#.into())
        );
        assert_eq!(
            restore_step(&original, Some(r#"{ "x": 1 }"#)),
            Step::Nothing
        );
        assert_eq!(
            restore_step(&original, None),
            Step::Create(r#"{"x":1}"#.into())
        );
        let absent = Previous::of(None);
        assert_eq!(restore_step(&absent, Some(r#"{"x":2}"#)), Step::Delete);
        assert_eq!(restore_step(&absent, None), Step::Nothing);
    }

    #[test]
    fn the_record_round_trips_through_the_annotation() {
        let original = Previous::of(Some(("3", "{\"schemaVersion\":\"1.0\"}")));
        let text = serde_json::to_string(&original).expect("serializes");
        let mut preferences = SessionPreferences::new(
            "default",
            SessionPreferencesSpec {
                logging: Default::default(),
            },
        );
        preferences
            .annotations_mut()
            .insert(PREVIOUS_ANNOTATION.into(), text);
        assert_eq!(recorded(&preferences), Some(original));
    }

    #[test]
    fn the_desired_content_is_a_standard_stream_session_document() {
        let content = desired_content(&SessionPreferencesSpec {
            logging: Default::default(),
        });
        let value: Value = serde_json::from_str(&content).expect("json");
        assert_eq!(value["sessionType"], "Standard_Stream");
        assert_eq!(value["schemaVersion"], "1.0");
    }
}
