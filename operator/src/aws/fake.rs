//! A fake of [`IamApi`] and [`SsmApi`] for the controllers' unit tests: scripted failures,
//! documents kept in memory, listings that can miss documents, and a record of the operations
//! called. Never used outside tests.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use crate::{
    aws::{
        ActiveSession, AwsError, AwsResult, DocumentInfo, IamApi, InstanceInfo, PolicyInfo,
        PolicyVersion, Principal, SsmApi, is_write,
    },
    model::naming::OWNER_TAG,
};

/// IAM that answers `create_policy` from a script of failures, then succeeds; every other
/// IAM call succeeds with nothing. SSM keeps session documents in memory, and its listing by
/// tag can be made to miss documents, as a paged listing does while others are deleted.
/// Records the operations called.
#[derive(Default)]
pub(crate) struct FakeAws {
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
    /// A fake whose `create_policy` fails with these codes, in order, then succeeds.
    pub(crate) fn failing(codes: &[&'static str]) -> Arc<Self> {
        Arc::new(Self {
            create_failures: Mutex::new(codes.iter().copied().collect()),
            ..Self::default()
        })
    }

    /// A document that exists before the reconcile, tagged as `owner`'s (or untagged).
    pub(crate) fn with_document(
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
    pub(crate) fn missed_by_listings(self: Arc<Self>, name: &str, listings: usize) -> Arc<Self> {
        self.missed_by_listings
            .lock()
            .expect("missed")
            .insert(name.to_owned(), listings);
        self
    }

    /// The names of the documents it keeps.
    pub(crate) fn document_names(&self) -> Vec<String> {
        self.documents
            .lock()
            .expect("documents")
            .keys()
            .cloned()
            .collect()
    }

    /// A document's content.
    pub(crate) fn content(&self, name: &str) -> Option<String> {
        let documents = self.documents.lock().expect("documents");
        documents.get(name).map(|d| d.content.clone())
    }

    /// How many write calls were made.
    pub(crate) fn writes(&self) -> usize {
        let calls = self.calls.lock().expect("calls");
        calls.iter().filter(|c| is_write(c)).count()
    }

    fn record(&self, operation: &'static str) {
        self.calls.lock().expect("calls").push(operation);
    }

    /// How many times `operation` was called.
    pub(crate) fn count(&self, operation: &str) -> usize {
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
    async fn attached_policies(&self, _: &Principal) -> AwsResult<Vec<String>> {
        self.record("ListAttachedPolicies");
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
    async fn list_policies(&self, _: &str) -> AwsResult<Vec<(String, String)>> {
        self.record("ListPolicies");
        Ok(Vec::new())
    }
    async fn group_members(&self, _: &str) -> AwsResult<Vec<String>> {
        self.record("GetGroup");
        Ok(Vec::new())
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
    async fn active_sessions(&self) -> AwsResult<Vec<ActiveSession>> {
        self.record("DescribeSessions");
        Ok(Vec::new())
    }
    async fn terminate_session(&self, _: &str) -> AwsResult<()> {
        self.record("TerminateSession");
        Ok(())
    }
}
