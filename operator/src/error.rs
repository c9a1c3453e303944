//! The operator's one error type.

use fleet_access_crds::validation::InvalidObject;

use crate::model::endpoints::EndpointError;

/// Everything that can go wrong in the operator, by the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A grant file could not be read. Check the path and permissions.
    #[error("cannot read {path}: {source}")]
    ReadGrant {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// A grant is invalid. The message names each field and what to change.
    #[error("invalid SessionAccess:\n{0}")]
    InvalidGrant(#[source] InvalidObject),
    /// `plan --boundaries`: the boundaries file is invalid.
    #[error("invalid SessionAccessPolicy:\n{0}")]
    InvalidBoundary(#[source] InvalidObject),

    /// `plan --boundaries`: grants outside the boundaries of their namespace, one line each.
    #[error("outside the boundaries:\n{0}")]
    OutsideBoundary(String),

    /// The grant needs more managed policies than IAM allows. Use tag targets instead of long
    /// instance lists, or split the grant.
    #[error(
        "the grant needs {needed} policies but IAM allows {limit} {what}: target instances by tag instead of listing them, or split the grant"
    )]
    TooManyPolicies {
        /// How many the grant would need.
        needed: usize,
        /// The limit.
        limit: usize,
        /// Which limit.
        what: &'static str,
    },

    /// The grant's statements do not fit the policy set of one of its identities within the
    /// account's quota of managed policies per identity: they are left out of that set.
    #[error(
        "{principal} has {attached} managed policies attached that are not this cluster's, and the policy set of the grants before this one takes {needed}: with this grant's statements it would exceed the quota of {limit} per identity; detach policies from it, raise the quota (and --max-policies-per-identity), target instances by tag, or name a group or another role instead"
    )]
    AttachmentQuota {
        /// The principal.
        principal: String,
        /// Policies attached to it that are not this cluster's.
        attached: usize,
        /// The policies of its set without this grant.
        needed: usize,
        /// The quota.
        limit: usize,
    },

    /// A sync shared by every grant that waited for it (an identity's policy set, the cluster's
    /// shared session documents) failed.
    #[error("{what}: {source}")]
    SharedSync {
        /// What was synced.
        what: String,
        /// Why.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// One statement cannot fit a policy even with a single resource (cannot happen with valid
    /// names; a bug if seen).
    #[error("statement {sid} does not fit in one IAM policy")]
    StatementTooLarge {
        /// The statement's Sid.
        sid: String,
    },

    /// The grant asks for bridge endpoints but the operator has no bridge role. Set
    /// `--bridge-role`.
    #[error(
        "the grant asks for bridge endpoints but the operator has no bridge role: set --bridge-role"
    )]
    NoBridgeRole,

    /// The grant names the bridge's role as a principal: that role serves every grant's
    /// endpoints, so a Deny on it would cut every tenant off the bridge, and an Allow would
    /// widen what all of them share.
    #[error(
        "spec.principals.roles: {role} is the bridge's role, which serves every grant's endpoints: a grant may not name it (the bridge gets its access from spec.bridge)"
    )]
    BridgeRoleNamed {
        /// The role as the grant wrote it.
        role: String,
    },

    /// An AWS call failed (after retries, for retryable errors). The code says why.
    #[error("{0}")]
    Aws(#[from] crate::aws::AwsError),

    /// A policy or document with the grant's name exists but is not the grant's.
    #[error("{0}")]
    NotOwned(#[from] crate::model::plan::NotOwned),

    /// Session documents tagged as the grant's kept turning up under names it does not want,
    /// listing after listing, while the operator deleted them: something else creates them.
    /// The reconcile is retried.
    #[error(
        "session documents tagged {tag}={owner} kept appearing in {listings} listings while being deleted: find what creates them; the operator retries"
    )]
    DocumentsKeepAppearing {
        /// The owner tag's key.
        tag: &'static str,
        /// Its value: the grant's, or the cluster's for shared documents.
        owner: String,
        /// How many listings found new ones.
        listings: usize,
    },

    /// A grant's window or approval ended, and not every session it had open could be listed
    /// and ended; the reconcile is retried, and the status keeps recording what the grant
    /// granted until they are.
    #[error(
        "{grant} no longer grants (its window or approval ended), but its open sessions could not all be ended yet: the operator retries"
    )]
    SessionsNotEnded {
        /// `<namespace>/<name>` of the grant.
        grant: String,
    },

    /// The grant's bridge endpoints cannot be planned (no free target port, or a Service name
    /// that serves another destination).
    #[error("{0}")]
    Endpoints(#[from] crate::model::endpoints::EndpointError),

    /// A Kubernetes API call failed; the reconcile is retried.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    /// Adding or removing the finalizer, or the reconcile it wraps, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// The operator's configuration is incomplete or wrong. The message says what to set.
    #[error("configuration: {0}")]
    Config(String),
}

/// Every value [`Error::metric_label`] gives: `reconcile_errors_total` counts each from zero, so
/// that the first error of a kind is an increase that `rate()` and `increase()` see.
pub const METRIC_LABELS: [&str; 24] = [
    "read_grant",
    "invalid_grant",
    "invalid_boundary",
    "outside_boundary",
    "too_many_policies",
    "attachment_quota",
    "statement_too_large",
    "no_bridge_role",
    "bridge_role_named",
    "aws_retryable",
    "aws_not_found",
    "aws_quota",
    "aws_invalid_document",
    "aws_access_denied",
    "aws",
    "not_owned",
    "no_free_target_port",
    "namespace_port_limit",
    "service_name_taken",
    "documents_keep_appearing",
    "sessions_not_ended",
    "kube",
    "finalizer",
    "config",
];

impl Error {
    /// A bounded label for metrics (one of [`METRIC_LABELS`]).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::ReadGrant { .. } => "read_grant",
            Error::InvalidGrant(_) => "invalid_grant",
            Error::InvalidBoundary(_) => "invalid_boundary",
            Error::OutsideBoundary(_) => "outside_boundary",
            Error::TooManyPolicies { .. } => "too_many_policies",
            Error::AttachmentQuota { .. } => "attachment_quota",
            Error::SharedSync { source, .. } => source.metric_label(),
            Error::StatementTooLarge { .. } => "statement_too_large",
            Error::NoBridgeRole => "no_bridge_role",
            Error::BridgeRoleNamed { .. } => "bridge_role_named",
            Error::Aws(e) => e.kind().metric_label(),
            Error::NotOwned(_) => "not_owned",
            Error::Endpoints(EndpointError::NoFreeTargetPort) => "no_free_target_port",
            Error::Endpoints(EndpointError::NamespacePortLimit { .. }) => "namespace_port_limit",
            Error::Endpoints(EndpointError::ServiceNameTaken { .. }) => "service_name_taken",
            Error::DocumentsKeepAppearing { .. } => "documents_keep_appearing",
            Error::SessionsNotEnded { .. } => "sessions_not_ended",
            Error::Kube(_) => "kube",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Config(_) => "config",
        }
    }

    /// Whether trying again soon may succeed (throttling, busy IAM, Kubernetes hiccups).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Aws(e) => e.is_retryable(),
            Error::SharedSync { source, .. } => source.is_retryable(),
            Error::Kube(_)
            | Error::Finalizer(_)
            | Error::DocumentsKeepAppearing { .. }
            | Error::SessionsNotEnded { .. } => true,
            _ => false,
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::{AwsError, AwsErrorKind};

    #[test]
    fn every_metric_label_is_counted_from_zero() {
        let aws = |code: &str| {
            Error::Aws(AwsError {
                operation: "GetPolicy",
                code: code.into(),
                message: String::new(),
            })
        };
        let errors = [
            aws("Throttling"),
            aws("NoSuchEntity"),
            aws("LimitExceeded"),
            aws("MalformedPolicyDocument"),
            aws("AccessDenied"),
            aws("DuplicateDocumentContent"),
            aws("Whatever"),
            Error::NoBridgeRole,
            Error::Config("x".into()),
        ];
        for error in &errors {
            assert!(METRIC_LABELS.contains(&error.metric_label()), "{error:?}");
        }
        let kinds = [
            AwsErrorKind::Throttled,
            AwsErrorKind::Busy,
            AwsErrorKind::ServerFault,
            AwsErrorKind::Transport,
            AwsErrorKind::NotFound,
            AwsErrorKind::Quota,
            AwsErrorKind::InvalidDocument,
            AwsErrorKind::DuplicateContent,
            AwsErrorKind::AccessDenied,
            AwsErrorKind::Other,
        ];
        for kind in kinds {
            assert!(METRIC_LABELS.contains(&kind.metric_label()), "{kind:?}");
        }
    }
}
