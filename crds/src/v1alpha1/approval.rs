//! `SessionAccessApproval`: a second person's approval of one generation of one `SessionAccess`
//! grant, for grants whose boundary requires one (`SessionAccessPolicy.spec.approval`).
//!
//! The API server proves both names an approval is judged by: the grant's requester
//! ([`REQUESTED_BY_ANNOTATION`], which must be the user who last wrote the grant's spec) and
//! the approver (`spec.approvedBy`, which must be the user who creates the approval). The
//! admission policies in `deploy/tenancy/` check both against `request.userInfo`; the operator
//! then refuses an approval by the grant's own requester, of another generation or of another
//! grant that once had the name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::names::{HoursMinutes, InstanceId};

/// The annotation on a `SessionAccess` that names the user who last wrote its spec. Grants
/// that need approval must carry it; the admission policy refuses any other value than the
/// writer's own user name.
pub const REQUESTED_BY_ANNOTATION: &str = "fleetaccess.io/requested-by";

/// One person's approval of one generation of a grant. Immutable: to change it, delete it and
/// approve again; deleting it withdraws the approval, which revokes the grant.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetaccess.io",
    version = "v1alpha1",
    kind = "SessionAccessApproval",
    plural = "sessionaccessapprovals",
    singular = "sessionaccessapproval",
    namespaced,
    shortname = "saccapproval",
    category = "fleet-access",
    derive = "PartialEq",
    printcolumn(name = "Grant", type_ = "string", json_path = ".spec.grant.name"),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        json_path = ".spec.grant.generation"
    ),
    printcolumn(name = "Approved By", type_ = "string", json_path = ".spec.approvedBy"),
    printcolumn(name = "For", type_ = "string", json_path = ".spec.duration"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("an approval cannot be changed: delete it (which withdraws it) and approve again"))]
pub struct SessionAccessApprovalSpec {
    /// The grant approved, in this namespace, as it stands at one generation: a change of its
    /// spec needs a new approval.
    pub grant: ApprovedGrant,

    /// Your own Kubernetes user name (`kubectl auth whoami`); the admission policy refuses any
    /// other. It may not be the grant's requester.
    #[schemars(length(min = 1, max = 253))]
    pub approved_by: String,

    /// How long the grant is in force from the approval (8h, 90m, 1h30m). Without it, the
    /// grant's own window applies. IAM enforces the end on every StartSession.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<HoursMinutes>,

    /// Why, for the record (a ticket, an incident).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// The grant an approval is for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovedGrant {
    /// The SessionAccess's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its metadata.uid: a grant deleted and created again under the name is another grant.
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
    /// Its metadata.generation: the spec approved.
    #[x_kube(validation = Rule::new("self >= 1").message("must be the grant's metadata.generation (1 or more)"))]
    pub generation: i64,
}

/// Which Allow grants of the selected namespaces need a second person's approval before the
/// operator writes anything for them. Deny grants never do: they only take access away.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequirement {
    /// Every Allow grant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub always: bool,

    /// Allow grants that may reach one of these instances: those that list it, cover every
    /// instance, or target tags that resolve to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub instance_ids: Vec<InstanceId>,
}

impl ApprovalRequirement {
    /// Whether it requires approval of any grant at all.
    pub fn requires_any(&self) -> bool {
        self.always || !self.instance_ids.is_empty()
    }
}

/// The approval a grant is in force by, as the operator found it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    /// The SessionAccessApproval.
    pub name: String,
    /// Who approved.
    pub approved_by: String,
    /// When (the approval's creation).
    pub approved_at: Time,
    /// When the approval ends, if it has a duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The grant's requester it was checked against.
    pub requested_by: String,
    /// The approval's reason, if it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
