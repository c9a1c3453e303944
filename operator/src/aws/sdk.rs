//! [`IamApi`] and [`SsmApi`] over aws-sdk-iam and aws-sdk-ssm: the only module that imports
//! them. Every call is counted in [`Metrics::aws_calls`] by service, operation and outcome.

use std::collections::BTreeMap;

use aws_sdk_iam::error::ProvideErrorMetadata;
use aws_sdk_ssm::types::{
    DocumentFormat, DocumentKeyValuesFilter, DocumentType, InstanceInformationStringFilter,
    ResourceTypeForTagging, SessionState,
};

use super::{
    ActiveSession, AwsError, AwsResult, DocumentInfo, IamApi, InstanceInfo, PolicyInfo,
    PolicyVersion, Principal, PrincipalKind, SsmApi,
};
use crate::metrics::Metrics;

/// IAM and SSM through the AWS SDK.
#[derive(Clone)]
pub struct SdkAws {
    iam: aws_sdk_iam::Client,
    ssm: aws_sdk_ssm::Client,
    metrics: Metrics,
}

impl SdkAws {
    /// Clients from a loaded SDK configuration.
    pub fn new(config: &aws_config::SdkConfig, metrics: Metrics) -> Self {
        Self {
            iam: aws_sdk_iam::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            metrics,
        }
    }

    /// Clients with separate configurations for IAM and SSM (different endpoints).
    pub fn with_configs(
        iam: &aws_config::SdkConfig,
        ssm: &aws_config::SdkConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            iam: aws_sdk_iam::Client::new(iam),
            ssm: aws_sdk_ssm::Client::new(ssm),
            metrics,
        }
    }

    fn record<T, E>(
        &self,
        service: &'static str,
        operation: &'static str,
        result: Result<T, E>,
    ) -> AwsResult<T>
    where
        E: ProvideErrorMetadata + std::fmt::Display,
    {
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code().unwrap_or("Transport").to_owned(),
        };
        // Bound the label: known codes by name, anything else as "other".
        let outcome = match outcome.as_str() {
            "ok"
            | "NoSuchEntity"
            | "EntityAlreadyExists"
            | "LimitExceeded"
            | "MalformedPolicyDocument"
            | "DeleteConflict"
            | "Throttling"
            | "ConcurrentModification"
            | "EntityTemporarilyUnmodifiable"
            | "ServiceFailure"
            | "InvalidDocument"
            | "DocumentAlreadyExists"
            | "DuplicateDocumentContent"
            | "InvalidDocumentContent"
            | "InvalidDocumentVersion"
            | "InvalidResourceId"
            | "Transport" => outcome,
            // IAM says AccessDenied, SSM AccessDeniedException: one value for a missing
            // permission of the operator's role, which the troubleshooting guide explains.
            "AccessDenied" | "AccessDeniedException" => "AccessDenied".to_owned(),
            _ => "other".to_owned(),
        };
        self.metrics
            .aws_calls
            .with_label_values(&[service, operation, &outcome])
            .inc();
        result.map_err(|e| AwsError {
            operation,
            code: e.code().unwrap_or("Transport").to_owned(),
            message: e
                .message()
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string()),
        })
    }

    fn iam<T, E>(&self, operation: &'static str, result: Result<T, E>) -> AwsResult<T>
    where
        E: ProvideErrorMetadata + std::fmt::Display,
    {
        self.record("iam", operation, result)
    }

    fn ssm<T, E>(&self, operation: &'static str, result: Result<T, E>) -> AwsResult<T>
    where
        E: ProvideErrorMetadata + std::fmt::Display,
    {
        self.record("ssm", operation, result)
    }
}

fn not_found_is_none<T>(result: AwsResult<T>) -> AwsResult<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == crate::aws::AwsErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn build_error(operation: &'static str, e: impl std::fmt::Display) -> AwsError {
    AwsError {
        operation,
        code: "InvalidRequest".into(),
        message: e.to_string(),
    }
}

#[async_trait::async_trait]
impl IamApi for SdkAws {
    async fn get_policy(&self, arn: &str) -> AwsResult<Option<PolicyInfo>> {
        let out = self.iam(
            "GetPolicy",
            self.iam.get_policy().policy_arn(arn).send().await,
        );
        Ok(not_found_is_none(out)?.and_then(|out| {
            out.policy().map(|p| PolicyInfo {
                arn: p.arn().unwrap_or(arn).to_owned(),
                default_version: p.default_version_id().unwrap_or("v1").to_owned(),
                tags: p
                    .tags()
                    .iter()
                    .map(|t| (t.key().to_owned(), t.value().to_owned()))
                    .collect(),
            })
        }))
    }

    async fn create_policy(
        &self,
        name: &str,
        path: &str,
        document: &str,
        tags: &BTreeMap<String, String>,
    ) -> AwsResult<PolicyInfo> {
        let tags = tags
            .iter()
            .map(|(k, v)| aws_sdk_iam::types::Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| build_error("CreatePolicy", e))?;
        let out = self.iam(
            "CreatePolicy",
            self.iam
                .create_policy()
                .policy_name(name)
                .path(path)
                .policy_document(document)
                .set_tags(Some(tags.clone()))
                .send()
                .await,
        )?;
        let policy = out.policy();
        Ok(PolicyInfo {
            arn: policy.and_then(|p| p.arn()).unwrap_or_default().to_owned(),
            default_version: policy
                .and_then(|p| p.default_version_id())
                .unwrap_or("v1")
                .to_owned(),
            tags: tags
                .iter()
                .map(|t| (t.key().to_owned(), t.value().to_owned()))
                .collect(),
        })
    }

    async fn get_policy_document(&self, arn: &str, version: &str) -> AwsResult<String> {
        let out = self.iam(
            "GetPolicyVersion",
            self.iam
                .get_policy_version()
                .policy_arn(arn)
                .version_id(version)
                .send()
                .await,
        )?;
        Ok(out
            .policy_version()
            .and_then(|v| v.document())
            .unwrap_or_default()
            .to_owned())
    }

    async fn list_policy_versions(&self, arn: &str) -> AwsResult<Vec<PolicyVersion>> {
        let out = self.iam(
            "ListPolicyVersions",
            self.iam.list_policy_versions().policy_arn(arn).send().await,
        )?;
        Ok(out
            .versions()
            .iter()
            .map(|v| PolicyVersion {
                id: v.version_id().unwrap_or_default().to_owned(),
                is_default: v.is_default_version(),
            })
            .collect())
    }

    async fn create_policy_version(&self, arn: &str, document: &str) -> AwsResult<String> {
        let out = self.iam(
            "CreatePolicyVersion",
            self.iam
                .create_policy_version()
                .policy_arn(arn)
                .policy_document(document)
                .set_as_default(true)
                .send()
                .await,
        )?;
        Ok(out
            .policy_version()
            .and_then(|v| v.version_id())
            .unwrap_or_default()
            .to_owned())
    }

    async fn delete_policy_version(&self, arn: &str, version: &str) -> AwsResult<()> {
        self.iam(
            "DeletePolicyVersion",
            self.iam
                .delete_policy_version()
                .policy_arn(arn)
                .version_id(version)
                .send()
                .await,
        )
        .map(drop)
    }

    async fn list_attachments(&self, arn: &str) -> AwsResult<Vec<Principal>> {
        let mut principals = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self.iam(
                "ListEntitiesForPolicy",
                self.iam
                    .list_entities_for_policy()
                    .policy_arn(arn)
                    .set_marker(marker.clone())
                    .send()
                    .await,
            )?;
            let named = |kind, name: Option<&str>| {
                name.map(|n| Principal {
                    kind,
                    name: n.to_owned(),
                })
            };
            principals.extend(
                out.policy_users()
                    .iter()
                    .filter_map(|u| named(PrincipalKind::User, u.user_name())),
            );
            principals.extend(
                out.policy_roles()
                    .iter()
                    .filter_map(|r| named(PrincipalKind::Role, r.role_name())),
            );
            principals.extend(
                out.policy_groups()
                    .iter()
                    .filter_map(|g| named(PrincipalKind::Group, g.group_name())),
            );
            match (out.is_truncated(), out.marker()) {
                (true, Some(next)) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(principals)
    }

    // Three explicit calls, one per kind: the SDK's outputs share no trait, and
    // tests/tests/deploy_iam.rs reads the operations the operator calls from this source.
    async fn list_policies(&self, path_prefix: &str) -> AwsResult<Vec<(String, String)>> {
        let mut policies = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self.iam(
                "ListPolicies",
                (self.iam.list_policies())
                    .scope(aws_sdk_iam::types::PolicyScopeType::Local)
                    .path_prefix(path_prefix)
                    .set_marker(marker.clone())
                    .send()
                    .await,
            )?;
            policies.extend(
                (out.policies().iter())
                    .filter_map(|p| Some((p.policy_name()?.to_owned(), p.arn()?.to_owned()))),
            );
            marker = out.marker().map(str::to_owned);
            if !out.is_truncated || marker.is_none() {
                return Ok(policies);
            }
        }
    }

    async fn attached_policies(&self, principal: &Principal) -> AwsResult<Vec<String>> {
        let name = principal.name.as_str();
        let mut arns = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let (policies, truncated, next) = match principal.kind {
                PrincipalKind::User => {
                    let out = self.iam(
                        "ListAttachedUserPolicies",
                        (self.iam.list_attached_user_policies().user_name(name))
                            .set_marker(marker.clone())
                            .send()
                            .await,
                    )?;
                    let next = out.marker().map(str::to_owned);
                    (
                        out.attached_policies.unwrap_or_default(),
                        out.is_truncated,
                        next,
                    )
                }
                PrincipalKind::Role => {
                    let out = self.iam(
                        "ListAttachedRolePolicies",
                        (self.iam.list_attached_role_policies().role_name(name))
                            .set_marker(marker.clone())
                            .send()
                            .await,
                    )?;
                    let next = out.marker().map(str::to_owned);
                    (
                        out.attached_policies.unwrap_or_default(),
                        out.is_truncated,
                        next,
                    )
                }
                PrincipalKind::Group => {
                    let out = self.iam(
                        "ListAttachedGroupPolicies",
                        (self.iam.list_attached_group_policies().group_name(name))
                            .set_marker(marker.clone())
                            .send()
                            .await,
                    )?;
                    let next = out.marker().map(str::to_owned);
                    (
                        out.attached_policies.unwrap_or_default(),
                        out.is_truncated,
                        next,
                    )
                }
            };
            arns.extend(
                policies
                    .iter()
                    .filter_map(|p| p.policy_arn().map(str::to_owned)),
            );
            match (truncated, next) {
                (true, Some(next)) => marker = Some(next),
                _ => break,
            }
        }
        Ok(arns)
    }

    async fn attach(&self, arn: &str, principal: &Principal) -> AwsResult<()> {
        let name = principal.name.as_str();
        match principal.kind {
            PrincipalKind::User => self
                .iam(
                    "AttachUserPolicy",
                    self.iam
                        .attach_user_policy()
                        .user_name(name)
                        .policy_arn(arn)
                        .send()
                        .await,
                )
                .map(drop),
            PrincipalKind::Role => self
                .iam(
                    "AttachRolePolicy",
                    self.iam
                        .attach_role_policy()
                        .role_name(name)
                        .policy_arn(arn)
                        .send()
                        .await,
                )
                .map(drop),
            PrincipalKind::Group => self
                .iam(
                    "AttachGroupPolicy",
                    self.iam
                        .attach_group_policy()
                        .group_name(name)
                        .policy_arn(arn)
                        .send()
                        .await,
                )
                .map(drop),
        }
    }

    async fn detach(&self, arn: &str, principal: &Principal) -> AwsResult<()> {
        let name = principal.name.as_str();
        match principal.kind {
            PrincipalKind::User => self
                .iam(
                    "DetachUserPolicy",
                    self.iam
                        .detach_user_policy()
                        .user_name(name)
                        .policy_arn(arn)
                        .send()
                        .await,
                )
                .map(drop),
            PrincipalKind::Role => self
                .iam(
                    "DetachRolePolicy",
                    self.iam
                        .detach_role_policy()
                        .role_name(name)
                        .policy_arn(arn)
                        .send()
                        .await,
                )
                .map(drop),
            PrincipalKind::Group => self
                .iam(
                    "DetachGroupPolicy",
                    self.iam
                        .detach_group_policy()
                        .group_name(name)
                        .policy_arn(arn)
                        .send()
                        .await,
                )
                .map(drop),
        }
    }

    async fn delete_policy(&self, arn: &str) -> AwsResult<()> {
        self.iam(
            "DeletePolicy",
            self.iam.delete_policy().policy_arn(arn).send().await,
        )
        .map(drop)
    }

    async fn group_members(&self, group: &str) -> AwsResult<Vec<String>> {
        let mut members = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self.iam(
                "GetGroup",
                (self.iam.get_group().group_name(group))
                    .set_marker(marker.clone())
                    .send()
                    .await,
            )?;
            members.extend(out.users().iter().map(|u| u.arn().to_owned()));
            match (out.is_truncated(), out.marker()) {
                (true, Some(next)) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(members)
    }
}

#[async_trait::async_trait]
impl SsmApi for SdkAws {
    async fn get_document(&self, name: &str) -> AwsResult<Option<DocumentInfo>> {
        let out = self.ssm(
            "GetDocument",
            self.ssm.get_document().name(name).send().await,
        );
        Ok(not_found_is_none(out)?.map(|out| {
            let version = out.document_version().unwrap_or("1").to_owned();
            DocumentInfo {
                content: out.content().unwrap_or_default().to_owned(),
                default_version: version.clone(),
                latest_version: version,
            }
        }))
    }

    async fn document_tags(&self, name: &str) -> AwsResult<Option<BTreeMap<String, String>>> {
        let out = self.ssm(
            "ListTagsForResource",
            self.ssm
                .list_tags_for_resource()
                .resource_type(ResourceTypeForTagging::Document)
                .resource_id(name)
                .send()
                .await,
        );
        Ok(not_found_is_none(out)?.map(|out| {
            out.tag_list()
                .iter()
                .map(|t| (t.key().to_owned(), t.value().to_owned()))
                .collect()
        }))
    }

    async fn list_documents_tagged(&self, key: &str, value: &str) -> AwsResult<Vec<String>> {
        let filter = DocumentKeyValuesFilter::builder()
            .key(format!("tag:{key}"))
            .values(value)
            .build();
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self.ssm(
                "ListDocuments",
                self.ssm
                    .list_documents()
                    .filters(filter.clone())
                    .max_results(50)
                    .set_next_token(token.clone())
                    .send()
                    .await,
            )?;
            // The tag is checked here too: a document is the grant's only if it carries it,
            // whatever the service's filter matched.
            names.extend(
                out.document_identifiers()
                    .iter()
                    .filter(|d| {
                        d.tags()
                            .iter()
                            .any(|t| t.key() == key && t.value() == value)
                    })
                    .filter_map(|d| d.name().map(str::to_owned)),
            );
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => break,
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
        let tags = tags
            .iter()
            .map(|(k, v)| aws_sdk_ssm::types::Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| build_error("CreateDocument", e))?;
        self.ssm(
            "CreateDocument",
            self.ssm
                .create_document()
                .name(name)
                .content(content)
                .document_type(DocumentType::Session)
                .document_format(DocumentFormat::Json)
                .set_tags(Some(tags))
                .send()
                .await,
        )
        .map(drop)
    }

    async fn update_document(&self, name: &str, content: &str) -> AwsResult<String> {
        let out = self.ssm(
            "UpdateDocument",
            self.ssm
                .update_document()
                .name(name)
                .content(content)
                .document_version("$LATEST")
                .send()
                .await,
        )?;
        let version = out
            .document_description()
            .and_then(|d| d.document_version())
            .unwrap_or_default()
            .to_owned();
        self.ssm(
            "UpdateDocumentDefaultVersion",
            self.ssm
                .update_document_default_version()
                .name(name)
                .document_version(&version)
                .send()
                .await,
        )?;
        Ok(version)
    }

    async fn delete_document(&self, name: &str) -> AwsResult<()> {
        self.ssm(
            "DeleteDocument",
            self.ssm.delete_document().name(name).send().await,
        )
        .map(drop)
    }

    async fn get_document_version(&self, name: &str, version: &str) -> AwsResult<Option<String>> {
        let out = self.ssm(
            "GetDocument",
            self.ssm
                .get_document()
                .name(name)
                .document_version(version)
                .send()
                .await,
        );
        Ok(not_found_is_none(out)?.map(|out| out.content().unwrap_or_default().to_owned()))
    }

    async fn latest_document_version(&self, name: &str) -> AwsResult<Option<String>> {
        let out = self.ssm(
            "DescribeDocument",
            self.ssm.describe_document().name(name).send().await,
        );
        Ok(not_found_is_none(out)?.and_then(|out| {
            out.document()
                .and_then(|d| d.latest_version())
                .map(str::to_owned)
        }))
    }

    async fn set_default_document_version(&self, name: &str, version: &str) -> AwsResult<()> {
        self.ssm(
            "UpdateDocumentDefaultVersion",
            self.ssm
                .update_document_default_version()
                .name(name)
                .document_version(version)
                .send()
                .await,
        )
        .map(drop)
    }

    async fn describe_instances(
        &self,
        ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> AwsResult<Vec<InstanceInfo>> {
        let mut filters = Vec::new();
        if !ids.is_empty() {
            filters.push(
                InstanceInformationStringFilter::builder()
                    .key("InstanceIds")
                    .set_values(Some(ids.to_vec()))
                    .build()
                    .map_err(|e| build_error("DescribeInstanceInformation", e))?,
            );
        } else {
            for (key, value) in tags {
                filters.push(
                    InstanceInformationStringFilter::builder()
                        .key(format!("tag:{key}"))
                        .values(value)
                        .build()
                        .map_err(|e| build_error("DescribeInstanceInformation", e))?,
                );
            }
        }
        let mut instances = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self.ssm(
                "DescribeInstanceInformation",
                self.ssm
                    .describe_instance_information()
                    .set_filters(Some(filters.clone()))
                    .set_next_token(token.clone())
                    .send()
                    .await,
            )?;
            instances.extend(out.instance_information_list().iter().filter_map(|i| {
                i.instance_id().map(|id| InstanceInfo {
                    instance_id: id.to_owned(),
                    ping_status: i.ping_status().map(|p| p.as_str().to_owned()),
                    agent_version: i.agent_version().map(str::to_owned),
                })
            }));
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(instances)
    }

    async fn active_sessions(&self) -> AwsResult<Vec<ActiveSession>> {
        let mut sessions = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self.ssm(
                "DescribeSessions",
                self.ssm
                    .describe_sessions()
                    .state(SessionState::Active)
                    .set_next_token(token.clone())
                    .send()
                    .await,
            )?;
            sessions.extend((out.sessions().iter()).filter_map(|s| {
                Some(ActiveSession {
                    id: s.session_id()?.to_owned(),
                    target: s.target()?.to_owned(),
                    owner: s.owner().map(str::to_owned),
                    document: s.document_name().map(str::to_owned),
                    reason: s.reason().map(str::to_owned),
                })
            }));
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(sessions)
    }

    async fn terminate_session(&self, session_id: &str) -> AwsResult<()> {
        self.ssm(
            "TerminateSession",
            self.ssm
                .terminate_session()
                .session_id(session_id)
                .send()
                .await,
        )
        .map(drop)
    }
}
