//! The operator's narrow view of AWS: the IAM and SSM operations it needs, in domain verbs,
//! behind object-safe traits. `sdk` implements them over aws-sdk-iam / aws-sdk-ssm (the only
//! module that imports those crates). Errors carry AWS's error code and are classified once
//! ([`AwsErrorKind`]), so callers back off, count or advise by kind, never by code.

#[cfg(test)]
pub(crate) mod fake;
pub mod sdk;

use std::{collections::BTreeMap, fmt, future::Future, time::Duration};

/// A kind of IAM principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrincipalKind {
    /// An IAM user.
    User,
    /// An IAM role.
    Role,
    /// An IAM group.
    Group,
}

/// An IAM principal by kind and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Principal {
    /// User, role or group.
    pub kind: PrincipalKind,
    /// Its name.
    pub name: String,
}

impl PrincipalKind {
    /// `user`, `role` or `group`, as in ARNs.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Role => "role",
            PrincipalKind::Group => "group",
        }
    }

    /// The kind [`PrincipalKind::as_str`] names.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::User, Self::Role, Self::Group]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl Principal {
    /// A principal of `kind` named `name`.
    pub fn new(kind: PrincipalKind, name: &str) -> Self {
        Self {
            kind,
            name: name.to_owned(),
        }
    }

    /// The principal's ARN.
    pub fn arn(&self, partition: &str, account: &str) -> String {
        format!(
            "arn:{partition}:iam::{account}:{}/{}",
            self.kind.as_str(),
            self.name
        )
    }

    /// The principal an IAM ARN names (`arn:…:iam::<account>:user/[path/]name`), if any.
    pub fn from_arn(arn: &str) -> Option<Self> {
        let resource = arn.splitn(6, ':').nth(5)?;
        let (kind, path_and_name) = resource.split_once('/')?;
        let kind = match kind {
            "user" => PrincipalKind::User,
            "role" => PrincipalKind::Role,
            "group" => PrincipalKind::Group,
            _ => return None,
        };
        Some(Self::new(kind, path_and_name.rsplit('/').next()?))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.kind, self.name)
    }
}

/// A managed policy as IAM describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    /// Its ARN.
    pub arn: String,
    /// The default version, such as `v3`.
    pub default_version: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// One version of a managed policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVersion {
    /// Such as `v3`.
    pub id: String,
    /// Whether it is the default version.
    pub is_default: bool,
}

impl PolicyVersion {
    /// The version number (IAM numbers versions upwards: v1, v2, …), for ordering by age.
    pub fn number(&self) -> u64 {
        self.id
            .trim_start_matches(['v', 'V'])
            .parse()
            .unwrap_or(u64::MAX)
    }
}

/// A session document as SSM describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentInfo {
    /// The content of the default version.
    pub content: String,
    /// The default version.
    pub default_version: String,
    /// The latest version.
    pub latest_version: String,
}

/// A managed instance as DescribeInstanceInformation reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The instance ID.
    pub instance_id: String,
    /// Online, ConnectionLost or Inactive.
    pub ping_status: Option<String>,
    /// The SSM Agent version.
    pub agent_version: Option<String>,
}

/// An active session as DescribeSessions reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveSession {
    /// The session ID.
    pub id: String,
    /// The instance.
    pub target: String,
    /// The ARN of the IAM identity that started it (a user, or an assumed role's session).
    pub owner: Option<String>,
    /// The session document.
    pub document: Option<String>,
    /// The reason its starter gave (the bridge's names the client and the grant).
    pub reason: Option<String>,
}

/// An AWS call that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {code}: {message}")]
pub struct AwsError {
    /// The operation, such as `CreatePolicyVersion`.
    pub operation: &'static str,
    /// AWS's error code, or `Transport` when no answer came.
    pub code: String,
    /// AWS's message.
    pub message: String,
}

/// What an AWS error means to the operator. Decided from the error code here and nowhere
/// else: retries, metric labels and the advice in conditions all match on the kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwsErrorKind {
    /// AWS asks the caller to slow down. Retried.
    Throttled,
    /// Another write to the same entity overlaps, or IAM is still propagating one. Retried.
    Busy,
    /// A fault on AWS's side. Retried.
    ServerFault,
    /// No answer came (connection, timeout). Retried.
    Transport,
    /// The entity does not exist.
    NotFound,
    /// A quota is reached: policies per account, attachments per identity, documents or
    /// versions.
    Quota,
    /// AWS rejected a policy or document the operator rendered.
    InvalidDocument,
    /// A new document version would repeat the content of an existing one.
    DuplicateContent,
    /// The operator's own AWS identity may not make the call.
    AccessDenied,
    /// Anything else.
    Other,
}

impl AwsErrorKind {
    /// The kind of an AWS error code.
    pub fn of(code: &str) -> Self {
        match code {
            "Throttling" | "ThrottlingException" | "TooManyUpdates" | "RequestLimitExceeded" => {
                Self::Throttled
            }
            "ConcurrentModification" | "EntityTemporarilyUnmodifiable" => Self::Busy,
            "ServiceFailure" | "InternalServerError" => Self::ServerFault,
            "Transport" => Self::Transport,
            "NoSuchEntity" | "InvalidDocument" | "InvalidResourceId" | "DoesNotExistException" => {
                Self::NotFound
            }
            "LimitExceeded" | "DocumentLimitExceeded" | "DocumentVersionLimitExceeded" => {
                Self::Quota
            }
            "MalformedPolicyDocument"
            | "InvalidDocumentContent"
            | "InvalidDocumentSchemaVersion"
            | "MaxDocumentSizeExceeded" => Self::InvalidDocument,
            "DuplicateDocumentContent" => Self::DuplicateContent,
            "AccessDenied" | "AccessDeniedException" => Self::AccessDenied,
            _ => Self::Other,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Throttled | Self::Busy | Self::ServerFault | Self::Transport
        )
    }

    /// A bounded label for metrics.
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::Throttled | Self::Busy | Self::ServerFault | Self::Transport => "aws_retryable",
            Self::NotFound => "aws_not_found",
            Self::Quota => "aws_quota",
            Self::InvalidDocument => "aws_invalid_document",
            Self::AccessDenied => "aws_access_denied",
            Self::DuplicateContent | Self::Other => "aws",
        }
    }
}

impl AwsError {
    /// What the error means.
    pub fn kind(&self) -> AwsErrorKind {
        AwsErrorKind::of(&self.code)
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// The result of an AWS call.
pub type AwsResult<T> = std::result::Result<T, AwsError>;

/// How many times a retryable call is tried in all.
const RETRY_ATTEMPTS: u32 = 5;

/// The first pause after a retryable failure; it doubles each time.
const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(100);

/// Runs `call`, retrying retryable failures with exponential backoff.
pub async fn with_retry<T, F, Fut>(mut call: F) -> AwsResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = AwsResult<T>>,
{
    let mut pause = RETRY_FIRST_PAUSE;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.is_retryable() && attempt < RETRY_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "retrying AWS call");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The IAM operations the operator uses.
#[async_trait::async_trait]
pub trait IamApi: Send + Sync {
    /// The policy, or `None` when it does not exist.
    async fn get_policy(&self, arn: &str) -> AwsResult<Option<PolicyInfo>>;
    /// Creates a policy with its first version and tags.
    async fn create_policy(
        &self,
        name: &str,
        path: &str,
        document: &str,
        tags: &BTreeMap<String, String>,
    ) -> AwsResult<PolicyInfo>;
    /// The document of one version, as IAM returns it (possibly URL-encoded).
    async fn get_policy_document(&self, arn: &str, version: &str) -> AwsResult<String>;
    /// Every version of a policy.
    async fn list_policy_versions(&self, arn: &str) -> AwsResult<Vec<PolicyVersion>>;
    /// Creates a version and makes it the default; returns its ID.
    async fn create_policy_version(&self, arn: &str, document: &str) -> AwsResult<String>;
    /// Deletes a non-default version.
    async fn delete_policy_version(&self, arn: &str, version: &str) -> AwsResult<()>;
    /// The users, roles and groups the policy is attached to.
    async fn list_attachments(&self, arn: &str) -> AwsResult<Vec<Principal>>;
    /// The names and ARNs of the account's own managed policies under `path_prefix`.
    async fn list_policies(&self, path_prefix: &str) -> AwsResult<Vec<(String, String)>>;
    /// The ARNs of every managed policy attached to `principal` (whoever attached them).
    async fn attached_policies(&self, principal: &Principal) -> AwsResult<Vec<String>>;
    /// Attaches the policy to a principal.
    async fn attach(&self, arn: &str, principal: &Principal) -> AwsResult<()>;
    /// Detaches the policy from a principal.
    async fn detach(&self, arn: &str, principal: &Principal) -> AwsResult<()>;
    /// Deletes a policy (detached, with only its default version left).
    async fn delete_policy(&self, arn: &str) -> AwsResult<()>;
    /// The ARNs of a group's users.
    async fn group_members(&self, group: &str) -> AwsResult<Vec<String>>;
}

/// The SSM operations the operator uses.
#[async_trait::async_trait]
pub trait SsmApi: Send + Sync {
    /// The document's default version, or `None` when it does not exist.
    async fn get_document(&self, name: &str) -> AwsResult<Option<DocumentInfo>>;
    /// The document's tags (ListTagsForResource), or `None` when it does not exist.
    async fn document_tags(&self, name: &str) -> AwsResult<Option<BTreeMap<String, String>>>;
    /// Names of the documents carrying tag `key` = `value`, through a paged listing: a listing
    /// that runs while other documents are deleted may miss some, so callers look up the names
    /// they know directly and use this only to find what they cannot name.
    async fn list_documents_tagged(&self, key: &str, value: &str) -> AwsResult<Vec<String>>;
    /// Creates a Session document with tags.
    async fn create_document(
        &self,
        name: &str,
        content: &str,
        tags: &BTreeMap<String, String>,
    ) -> AwsResult<()>;
    /// Adds a version with new content and makes it the default; returns the version.
    async fn update_document(&self, name: &str, content: &str) -> AwsResult<String>;
    /// Deletes a document and all its versions.
    async fn delete_document(&self, name: &str) -> AwsResult<()>;
    /// The content of one version of a document, or `None` when that version does not exist.
    async fn get_document_version(&self, name: &str, version: &str) -> AwsResult<Option<String>>;
    /// The document's latest version number, or `None` when the document does not exist.
    async fn latest_document_version(&self, name: &str) -> AwsResult<Option<String>>;
    /// Makes an existing version the document's default.
    async fn set_default_document_version(&self, name: &str, version: &str) -> AwsResult<()>;
    /// Managed instances with these IDs, or (when `ids` is empty) carrying all these tags.
    async fn describe_instances(
        &self,
        ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> AwsResult<Vec<InstanceInfo>>;
    /// Every active session of the account and Region (one paged listing).
    async fn active_sessions(&self) -> AwsResult<Vec<ActiveSession>>;
    /// Terminates a session.
    async fn terminate_session(&self, session_id: &str) -> AwsResult<()>;
}

/// Whether an IAM or SSM operation changes anything (for counting write calls).
pub fn is_write(operation: &str) -> bool {
    !(operation.starts_with("Get")
        || operation.starts_with("List")
        || operation.starts_with("Describe"))
}
