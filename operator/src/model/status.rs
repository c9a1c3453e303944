//! Pure status: the conditions of a `SessionAccess` (and of `SessionPreferences`) from what a
//! reconcile found and did, as typed facts. Every word of every condition is written here. No
//! I/O; the clock is an argument.
//!
//! Ready = Admitted ∧ Approved ∧ PolicySynced ∧ TargetsResolved ∧ BridgeReady ∧ ¬Expired. A condition keeps its
//! `lastTransitionTime` while its status does not change.

use fleet_access_crds::{
    agent_version, bridge_contract,
    v1alpha1::{
        ConnectStatus, PolicyStatus, RemoteEndpointStatus, SessionAccessStatus,
        SessionPreferencesStatus, SessionsEnded, TargetStatus,
    },
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::{
    Error,
    aws::{AwsError, AwsErrorKind, InstanceInfo, Principal},
    model::{
        approval::{Pending, Verdict},
        boundary::Admission,
        census::Covered,
        combination::CombinesWith,
        desired::{BridgePort, Connection, TargetSelection},
        documents::OverDocumentLimit,
        naming,
    },
};

/// Condition types.
pub const READY: &str = "Ready";
/// Every `SessionAccessPolicy` of the grant's namespace admits it.
pub const ADMITTED: &str = "Admitted";
/// No approval is required, or a second person's approval puts the grant in force.
pub const APPROVED: &str = "Approved";
/// IAM policies and session documents match the grant.
pub const POLICY_SYNCED: &str = "PolicySynced";
/// The targets resolved to managed instances.
pub const TARGETS_RESOLVED: &str = "TargetsResolved";
/// The bridge endpoints exist (or none are asked for).
pub const BRIDGE_READY: &str = "BridgeReady";
/// The window has ended and the grant is revoked.
pub const EXPIRED: &str = "Expired";

/// The reason of [`TARGETS_RESOLVED`] for a grant of every instance.
const ALL_INSTANCES: &str = "AllInstances";

/// One condition's outcome: true/false with a reason and a message a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the condition holds.
    pub ok: bool,
    /// PascalCase reason.
    pub reason: String,
    /// What happened and what to do.
    pub message: String,
}

impl Outcome {
    /// A holding condition.
    pub fn yes(reason: &str, message: impl Into<String>) -> Self {
        Self {
            ok: true,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A failing condition.
    pub fn no(reason: &str, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// What became of the grant's IAM policies and session documents.
#[derive(Clone, Debug, PartialEq)]
pub enum PoliciesState {
    /// The grant is invalid (the message says why); nothing was applied.
    Invalid(String),
    /// Removed, or never written.
    Revoked(Withheld),
    /// They match the grant.
    Synced {
        /// How many policies.
        policies: usize,
        /// How many session documents.
        documents: usize,
    },
    /// Applying them failed ([`sync_failure`] words it).
    Failed(Outcome),
}

/// What the grant's targets resolved to.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetsState {
    /// The grant is invalid; nothing was resolved.
    Invalid,
    /// The grant covers every instance; none are listed.
    AllInstances,
    /// This many managed instances.
    Resolved(usize),
    /// SSM does not know these listed instances.
    NotManaged(Vec<String>),
    /// No managed instance matches.
    NoneMatch,
    /// The grant forwards to remote hosts, and these instances' agents (ID, version) are too
    /// old to: they would forward to their own port instead.
    AgentsTooOld(Vec<(String, String)>),
    /// DescribeInstanceInformation failed with this error.
    Unresolvable(String),
}

/// What became of the grant's bridge endpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum EndpointsState {
    /// The grant is invalid; nothing was applied.
    Invalid,
    /// The grant asks for none.
    NotRequested,
    /// Removed because the window ended.
    Removed,
    /// Removed, or never written.
    Revoked(Withheld),
    /// The grant asks for endpoints, but no instance resolved.
    NoInstances,
    /// This many Services in `namespace` carry the grant's ports.
    Ready {
        /// How many Services.
        services: usize,
        /// The bridge namespace.
        namespace: String,
    },
    /// Applying them failed with this error.
    Failed(String),
}

/// Why a grant that has not ended stands for nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Withheld {
    /// It is outside its boundary (see Admitted).
    OutsideBoundary,
    /// It waits for approval (see Approved).
    AwaitingApproval,
    /// An earlier grant of another scope reaches one of its principals, and IAM would combine
    /// them (PolicySynced says so).
    CombinesWith(CombinesWith),
    /// Its namespace's grants would hold more session documents with it than they may
    /// (PolicySynced says so).
    OverDocumentLimit(OverDocumentLimit),
}

impl Withheld {
    /// The reason, and the words that end "nothing is written: …".
    fn words(&self) -> (&'static str, String) {
        match self {
            Withheld::OutsideBoundary => (
                "OutsideBoundary",
                "the grant is outside its boundary (see Admitted)".into(),
            ),
            Withheld::AwaitingApproval => (
                "AwaitingApproval",
                "the grant waits for a second person's approval (see Approved)".into(),
            ),
            Withheld::CombinesWith(CombinesWith { grant, principal }) => (
                COMBINES_WITH_GRANT,
                format!(
                    "{principal} is also a principal of grant {}, admitted by other boundaries or another approval, and IAM judges a session's instance and its document apart: together the two grants would let {principal} start the sessions of each on the instances of the other, which neither allows; the earlier grant keeps its place: name another principal here (a role of its own), or give the two grants the same sessions or the same targets",
                    naming::owner_grant(grant)
                        .map_or_else(|| grant.clone(), |(ns, name)| format!("{ns}/{name}"))
                ),
            ),
            Withheld::OverDocumentLimit(OverDocumentLimit { needed, limit }) => (
                DOCUMENT_LIMIT,
                format!(
                    "with this grant its namespace's grants would hold {needed} session documents (each grant's own shell document, and one per port or remote host and port they forward to), over the operator's limit of {limit} per namespace (--max-documents-per-namespace), which keeps one tenant from taking the account's quota of 500; the earlier grants keep theirs: forward to fewer ports or remote hosts here or in an earlier grant"
                ),
            ),
        }
    }

    /// Whether another condition already fails for it (else PolicySynced does).
    fn shown_elsewhere(&self) -> bool {
        matches!(self, Withheld::OutsideBoundary | Withheld::AwaitingApproval)
    }
}

/// The reason of a grant over its namespace's share of session documents.
pub const DOCUMENT_LIMIT: &str = "DocumentLimit";

/// The reason of a grant that an earlier grant of another scope, reaching one of its
/// principals, leaves out.
pub const COMBINES_WITH_GRANT: &str = "CombinesWithGrant";

/// The Warning Event of a grant that the grants before it now leave out, where the recorded
/// status did not say so: its reason and note.
pub fn left_out_event(
    previous: Option<&SessionAccessStatus>,
    withheld: Option<&Withheld>,
) -> Option<(&'static str, String)> {
    let left_out = withheld.filter(|w| !w.shown_elsewhere())?;
    let recorded = (previous.into_iter())
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == POLICY_SYNCED);
    let (reason, why) = left_out.words();
    recorded
        .is_none_or(|c| c.reason != reason)
        .then(|| (reason, format!("nothing is granted: {why}")))
}

/// Everything a reconcile learned, as input to the status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observations {
    /// The object's generation.
    pub generation: Option<i64>,
    /// Whether the boundaries of the grant's namespace admit it.
    pub admission: Admission,
    /// Whether it needs approval, and has it.
    pub approval: Verdict,
    /// Policies and documents.
    pub policy: PoliciesState,
    /// Target resolution.
    pub targets: TargetsState,
    /// Bridge endpoints.
    pub bridge: EndpointsState,
    /// Whether the window has ended.
    pub expired: bool,
    /// The grant's policies with their default versions.
    pub policies: Vec<PolicyStatus>,
    /// Principal ARNs the policies are attached to.
    pub attached_principals: Vec<String>,
    /// Resolved instances.
    pub target_list: Vec<TargetStatus>,
    /// The sessions this reconcile ended at expiry, if it did (else what the status recorded
    /// stays).
    pub sessions_ended: Option<SessionsEnded>,
    /// How the grant's principals connect (none while it is not in force).
    pub connect: Vec<Connection>,
}

/// The status to write, given the previous one (for transition times) and the time now.
pub fn compute(
    previous: Option<&SessionAccessStatus>,
    seen: &Observations,
    now: Timestamp,
) -> SessionAccessStatus {
    let expired = if seen.expired {
        Outcome::yes(
            "WindowEnded",
            "spec.window.expiresAt has passed: the policies are revoked, endpoints removed and the grant's own sessions terminated (status.sessionsEnded); move expiresAt to grant access again",
        )
    } else {
        Outcome::no("WithinWindow", "the grant has not expired")
    };
    let (admitted, approved, policy, targets, bridge) = (
        admission_outcome(&seen.admission),
        approval_outcome(&seen.approval),
        policies_outcome(&seen.policy),
        targets_outcome(&seen.targets),
        endpoints_outcome(&seen.bridge),
    );
    let ready = if seen.expired {
        Outcome::no("Expired", "the grant's window has ended")
    } else if let Some(failing) =
        ([&admitted, &approved, &policy, &targets, &bridge].into_iter()).find(|o| !o.ok)
    {
        Outcome::no(&failing.reason, failing.message.clone())
    } else {
        Outcome::yes(
            "Applied",
            "IAM, SSM and the bridge endpoints match the grant",
        )
    };
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let condition = |type_: &str, outcome: &Outcome| {
        condition(previous_conditions, type_, outcome, seen.generation, now)
    };
    let conditions = vec![
        condition(READY, &ready),
        condition(ADMITTED, &admitted),
        condition(APPROVED, &approved),
        condition(POLICY_SYNCED, &policy),
        condition(TARGETS_RESOLVED, &targets),
        condition(BRIDGE_READY, &bridge),
        condition(EXPIRED, &expired),
    ];
    SessionAccessStatus {
        observed_generation: seen.generation,
        conditions,
        approval: seen.approval.record().cloned(),
        policies: seen.policies.clone(),
        attached_principals: seen.attached_principals.clone(),
        target_count: i32::try_from(seen.target_list.len()).ok(),
        targets: seen.target_list.clone(),
        sessions_ended: (seen.sessions_ended.clone())
            .or_else(|| previous.and_then(|p| p.sessions_ended.clone())),
        // The census's (under its own field manager): kept as recorded, never written here.
        open_sessions: previous.and_then(|p| p.open_sessions.clone()),
        connect: (seen.connect.iter())
            .map(|c| ConnectStatus {
                document: c.document.clone(),
                host: c.host.clone(),
                port: i32::from(c.port),
                agent_bridge: c.agent_bridge.clone(),
                aws_cli: c.aws_cli.clone(),
            })
            .collect(),
    }
}

/// The Admitted condition: the boundaries, or every refusal (each names its field and boundary).
pub fn admission_outcome(admission: &Admission) -> Outcome {
    match admission {
        Admission::Admitted { boundaries } => Outcome::yes(
            "WithinBoundary",
            format!("admitted by SessionAccessPolicy {}", boundaries.join(", ")),
        ),
        Admission::Refused(refusals) => {
            let refusals: Vec<String> = refusals.iter().map(ToString::to_string).collect();
            Outcome::no(
                "OutsideBoundary",
                format!(
                    "nothing is granted until the grant fits its namespace's boundaries: {}",
                    refusals.join("; ")
                ),
            )
        }
    }
}

/// The Approved condition: who approved and until when, or what is missing and how to give it.
pub fn approval_outcome(verdict: &Verdict) -> Outcome {
    let time = |t: &Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    match verdict {
        Verdict::NotRequired => Outcome::yes(
            "NotRequired",
            "no SessionAccessPolicy of the namespace requires approval of this grant",
        ),
        Verdict::Approved { record, .. } => Outcome::yes(
            "Approved",
            format!(
                "approved by {} at {} (SessionAccessApproval {}), requested by {}{}{}",
                record.approved_by,
                time(&record.approved_at.0),
                record.name,
                record.requested_by,
                match &record.expires_at {
                    Some(until) => format!(", until {}", time(&until.0)),
                    None => String::new(),
                },
                match &record.reason {
                    Some(reason) => format!(": {reason}"),
                    None => String::new(),
                }
            ),
        ),
        Verdict::Pending { required_by, why } => {
            let required = format!(
                "SessionAccessPolicy {} requires a second person's approval, and nothing is granted until then",
                required_by.join(", ")
            );
            match why {
                Pending::Awaiting {
                    requested_by,
                    generation,
                    uid,
                    other_generations,
                } => Outcome::no(
                    "Pending",
                    format!(
                        "{required}: someone other than {requested_by} creates a SessionAccessApproval with spec.grant {{name, uid: {uid}, generation: {generation}}}{}",
                        match other_generations.as_slice() {
                            [] => String::new(),
                            earlier => format!(
                                " (approvals exist for generations {} only: the spec changed since)",
                                earlier
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        }
                    ),
                ),
                Pending::RequesterUnknown => Outcome::no(
                    "RequesterUnknown",
                    format!(
                        "{required}, which needs to know who asked: apply the grant again with the annotation {}: <your user name> (kubectl auth whoami)",
                        fleet_access_crds::v1alpha1::REQUESTED_BY_ANNOTATION
                    ),
                ),
                Pending::SelfApproved { approval, by } => Outcome::no(
                    "SelfApproval",
                    format!(
                        "{required}: SessionAccessApproval {approval} is by {by}, who requested the grant, and does not count"
                    ),
                ),
                Pending::Lapsed { approval, by, at } => Outcome::no(
                    "ApprovalExpired",
                    format!(
                        "{required}: the approval by {by} (SessionAccessApproval {approval}) ended at {}; the grant is revoked until approved again",
                        time(at)
                    ),
                ),
            }
        }
    }
}

/// The PolicySynced condition.
fn policies_outcome(state: &PoliciesState) -> Outcome {
    match state {
        PoliciesState::Invalid(message) => Outcome::no("InvalidGrant", message.clone()),
        PoliciesState::Revoked(withheld) => {
            let (reason, why) = withheld.words();
            let message = format!("no IAM policy or session document: {why}");
            match withheld.shown_elsewhere() {
                true => Outcome::yes(reason, message),
                false => Outcome::no(reason, message),
            }
        }
        PoliciesState::Synced {
            policies,
            documents,
        } => Outcome::yes(
            "Synced",
            format!("{policies} IAM policies and {documents} session documents match the grant"),
        ),
        PoliciesState::Failed(outcome) => outcome.clone(),
    }
}

fn targets_outcome(state: &TargetsState) -> Outcome {
    match state {
        TargetsState::Invalid => Outcome::no("InvalidGrant", "not resolved: the grant is invalid"),
        TargetsState::AllInstances => Outcome::yes(
            ALL_INSTANCES,
            "the grant covers every instance; none are listed",
        ),
        TargetsState::Resolved(count) => {
            Outcome::yes("Resolved", format!("{count} managed instances"))
        }
        TargetsState::NotManaged(missing) => Outcome::no(
            "InstancesNotManaged",
            format!(
                "SSM does not know {} of the listed instances ({}): check the IDs and that the SSM Agent runs and is registered",
                missing.len(),
                missing.join(", ")
            ),
        ),
        TargetsState::NoneMatch => Outcome::no(
            "NoInstances",
            "no managed instance matches spec.targets: check the tags or instance IDs",
        ),
        TargetsState::AgentsTooOld(old) => {
            let listed: Vec<String> = (old.iter())
                .map(|(id, version)| format!("{id} ({version})"))
                .collect();
            Outcome::no(
                "AgentTooOld",
                format!(
                    "forwarding to remote hosts needs SSM Agent {} or later, and an older agent forwards to the instance's own port instead: update the agent on {} (AWS-UpdateSSMAgent) or leave them out of spec.targets",
                    agent_version::REMOTE_HOST_MIN_AGENT,
                    listed.join(", ")
                ),
            )
        }
        TargetsState::Unresolvable(error) => Outcome::no(
            "DescribeInstanceInformationFailed",
            format!("cannot resolve the targets: {error}; the policies still apply"),
        ),
    }
}

fn endpoints_outcome(state: &EndpointsState) -> Outcome {
    match state {
        EndpointsState::Invalid => Outcome::no("InvalidGrant", "not applied: the grant is invalid"),
        EndpointsState::NotRequested => {
            Outcome::yes("NotRequested", "the grant asks for no bridge endpoints")
        }
        EndpointsState::Removed => Outcome::yes("Expired", "endpoints removed at expiry"),
        EndpointsState::Revoked(withheld) => {
            let (reason, mut why) = withheld.words();
            if !withheld.shown_elsewhere() {
                why = "see PolicySynced".into();
            }
            Outcome::yes(reason, format!("no endpoints: {why}"))
        }
        EndpointsState::NoInstances => Outcome::no(
            "NoEndpoints",
            "no instance resolved for the bridge: check spec.targets",
        ),
        EndpointsState::Ready {
            services,
            namespace,
        } => Outcome::yes(
            "EndpointsReady",
            format!("{services} endpoint Services in namespace {namespace}"),
        ),
        EndpointsState::Failed(error) => Outcome::no("EndpointsFailed", error.clone()),
    }
}

/// The endpoints of the remote hosts behind `instance`, one per host.
fn remote_endpoints(
    instance: &str,
    endpoints: Option<(&str, &[BridgePort])>,
) -> Vec<RemoteEndpointStatus> {
    let Some((namespace, ports)) = endpoints else {
        return Vec::new();
    };
    let hosts: std::collections::BTreeSet<&str> =
        ports.iter().filter_map(|p| p.host.as_deref()).collect();
    (hosts.into_iter())
        .map(|host| RemoteEndpointStatus {
            host: host.to_owned(),
            endpoint: format!(
                "{}.{namespace}",
                bridge_contract::service_name(instance, Some(host))
            ),
        })
        .collect()
}

/// The targets' state and list from the instances SSM reported: `selection`'s listed IDs must
/// all be there. With `endpoints` (the bridge namespace and the grant's bridge ports), each
/// instance names its endpoint Services.
pub fn resolved_targets(
    selection: &TargetSelection,
    mut found: Vec<InstanceInfo>,
    endpoints: Option<(&str, &[BridgePort])>,
) -> (TargetsState, Vec<TargetStatus>) {
    if selection.all_instances {
        return (TargetsState::AllInstances, Vec::new());
    }
    found.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    found.dedup_by(|a, b| a.instance_id == b.instance_id);
    let list: Vec<TargetStatus> = (found.iter())
        .map(|i| TargetStatus {
            instance_id: i.instance_id.clone(),
            ping_status: i.ping_status.clone(),
            agent_version: i.agent_version.clone(),
            ssh_capable: i.agent_version.as_deref().map(agent_version::supports_ssh),
            endpoint: (endpoints.filter(|(_, ports)| ports.iter().any(|p| p.host.is_none())))
                .map(|(ns, _)| format!("{}.{ns}", i.instance_id)),
            remote_endpoints: remote_endpoints(&i.instance_id, endpoints),
        })
        .collect();
    let missing: Vec<String> = (selection.instance_ids.iter())
        .filter(|id| !found.iter().any(|i| &i.instance_id == *id))
        .cloned()
        .collect();
    let too_old: Vec<(String, String)> = (list.iter())
        .filter(|_| selection.remote_hosts)
        .filter_map(|t| Some((t.instance_id.clone(), t.agent_version.clone()?)))
        .filter(|(_, version)| !agent_version::supports_remote_hosts(version))
        .collect();
    let state = if !missing.is_empty() {
        TargetsState::NotManaged(missing)
    } else if list.is_empty() {
        TargetsState::NoneMatch
    } else if !too_old.is_empty() {
        TargetsState::AgentsTooOld(too_old)
    } else {
        TargetsState::Resolved(list.len())
    };
    (state, list)
}

/// The advice for an AWS error that is retried.
const RETRYING: &str = "AWS is throttling or busy: the operator retries with backoff";

/// The PolicySynced condition for a failed sync of a grant: AWS's error code as the reason,
/// and what to do.
pub fn sync_failure(error: &Error) -> Outcome {
    match error {
        Error::Aws(aws) => {
            let advice = match aws.kind() {
                AwsErrorKind::Quota => {
                    "an IAM quota is reached (policies per account, attachments per principal or policy size): raise the quota or split the grant"
                }
                AwsErrorKind::InvalidDocument => {
                    "IAM rejected the rendered policy: report this as a bug with the grant attached"
                }
                AwsErrorKind::NotFound => {
                    "a principal does not exist in IAM: create it or fix spec.principals"
                }
                kind if kind.is_retryable() => RETRYING,
                _ => "the operator retries; check the operator's AWS permissions",
            };
            aws_failure(aws, advice)
        }
        Error::NotOwned(e) => Outcome::no("NotOwned", e.to_string()),
        Error::AttachmentQuota { .. } => Outcome::no("AttachmentQuota", error.to_string()),
        // The reason of what failed in the shared sync, saying what it synced.
        Error::SharedSync { what, source } => {
            let inner = sync_failure(source);
            Outcome {
                message: format!("{what}: {}", inner.message),
                ..inner
            }
        }
        other => Outcome::no("SyncFailed", other.to_string()),
    }
}

/// The Ready condition of `SessionPreferences` after a failure, with what to do about it.
pub fn preferences_failure(error: &Error) -> Outcome {
    let Error::Aws(aws) = error else {
        return Outcome::no("SyncFailed", error.to_string());
    };
    let advice = match aws.kind() {
        kind if kind.is_retryable() => RETRYING,
        AwsErrorKind::InvalidDocument if aws.code == "MaxDocumentSizeExceeded" => {
            "the document is over 64 KB: shorten spec.shellProfile"
        }
        AwsErrorKind::InvalidDocument => {
            "SSM rejected the preferences document: check the spec values (log group, bucket, KMS key, timeouts)"
        }
        AwsErrorKind::Quota => {
            "an SSM document quota is reached: delete unused documents or versions"
        }
        _ => "check the operator's SSM permissions on the document",
    };
    aws_failure(aws, advice)
}

/// A failing condition for an AWS error: its code as the reason (a condition reason must be
/// CamelCase letters and digits), the call, AWS's message and the advice.
fn aws_failure(error: &AwsError, advice: &str) -> Outcome {
    let reason: String = (error.code.chars())
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let reason = if reason.starts_with(|c: char| c.is_ascii_alphabetic()) {
        reason
    } else {
        "AwsError".into()
    };
    Outcome::no(
        &reason,
        format!("{} failed: {}: {advice}", error.operation, error.message),
    )
}

/// One condition from its outcome, keeping the previous `lastTransitionTime` while the status
/// stays the same.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    outcome: &Outcome,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if outcome.ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: outcome.reason.clone(),
        message: outcome.message.clone(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status of `SessionPreferences`: Ready from the outcome, the document version written
/// and whether there was a document before the operator took it over.
pub fn preferences(
    previous: Option<&SessionPreferencesStatus>,
    ready: &Outcome,
    generation: Option<i64>,
    document_version: Option<String>,
    had_previous_content: Option<bool>,
    now: Timestamp,
) -> SessionPreferencesStatus {
    let conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    SessionPreferencesStatus {
        observed_generation: generation,
        conditions: vec![condition(conditions, READY, ready, generation, now)],
        document_version: document_version
            .or_else(|| previous.and_then(|p| p.document_version.clone())),
        had_previous_content,
    }
}

/// What a grant granted when its status was last written: the identities it wrote IAM for and
/// the instances it listed (or every instance). The end of its window or approval ends these
/// sessions, and no others: a grant that granted nothing (refused, awaiting approval, already
/// ended, or never synced) ends nobody's, whatever its spec names now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The identities its policies were attached to (users, roles, groups, the bridge's role).
    pub principals: Vec<Principal>,
    /// The instances it resolved, or all of them.
    pub instances: Covered,
}

/// What `status` records the grant granting, if anything: every instance when its targets
/// were last resolved as `allInstances` (not what its spec says now).
pub fn granted(status: Option<&SessionAccessStatus>) -> Option<Granted> {
    let status = status?;
    let principals: Vec<Principal> = (status.attached_principals.iter())
        .filter_map(|arn| Principal::from_arn(arn))
        .collect();
    let all_instances = (status.conditions.iter())
        .any(|c| c.type_ == TARGETS_RESOLVED && c.reason == ALL_INSTANCES);
    (!principals.is_empty()).then(|| Granted {
        principals,
        instances: match all_instances {
            true => Covered::All,
            false => Covered::Instances(
                (status.targets.iter())
                    .map(|t| t.instance_id.clone())
                    .collect(),
            ),
        },
    })
}

/// An Event about a grant's approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalEvent {
    /// Whether it is a Warning (else Normal).
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// What happened.
    pub note: String,
}

/// The Event worth publishing when the Approved condition changes from what `status` records:
/// an approval, a withdrawal, an approval that ran out, or a grant that starts waiting for
/// one. None when nothing changed, or when no approval is required.
pub fn approval_event(
    status: Option<&SessionAccessStatus>,
    verdict: &Verdict,
) -> Option<ApprovalEvent> {
    let recorded = (status.into_iter())
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == APPROVED);
    let outcome = approval_outcome(verdict);
    if recorded.is_some_and(|c| c.reason == outcome.reason && c.message == outcome.message) {
        return None;
    }
    let was_approved = recorded.is_some_and(|c| c.reason == "Approved");
    let event = |warning, reason| {
        Some(ApprovalEvent {
            warning,
            reason,
            note: outcome.message.clone(),
        })
    };
    match verdict {
        Verdict::NotRequired => None,
        Verdict::Approved { .. } => event(false, "Approved"),
        Verdict::Pending { why, .. } => match why {
            Pending::Lapsed { .. } => event(true, "ApprovalExpired"),
            Pending::SelfApproved { .. } => event(true, "SelfApproval"),
            Pending::RequesterUnknown => event(true, "RequesterUnknown"),
            // The approval of the spec the status describes is gone: withdrawn.
            Pending::Awaiting { generation, .. }
                if was_approved
                    && status.and_then(|s| s.observed_generation) == Some(*generation) =>
            {
                let by = (status.and_then(|s| s.approval.as_ref()))
                    .map(|a| {
                        format!(
                            "the approval by {} (SessionAccessApproval {}) was withdrawn",
                            a.approved_by, a.name
                        )
                    })
                    .unwrap_or_else(|| "the approval was withdrawn".into());
                Some(ApprovalEvent {
                    warning: true,
                    reason: "ApprovalWithdrawn",
                    note: format!("{by}: {}", outcome.message),
                })
            }
            Pending::Awaiting { .. } => event(false, "AwaitingApproval"),
        },
    }
}

/// Whether every session document the grant can own is under a name its current spec derives,
/// so that looking those names up finds them all: true when the grant never had another spec
/// (generation 1), or when PolicySynced is True for this generation (that sync removed the
/// documents of earlier specs). Otherwise documents named after an earlier spec (a port since
/// removed) may remain, and only a listing by the owner tag finds them.
pub fn documents_follow_spec(
    status: Option<&SessionAccessStatus>,
    generation: Option<i64>,
) -> bool {
    let Some(generation) = generation else {
        return false;
    };
    generation == 1
        || status.is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == POLICY_SYNCED
                    && c.status == "True"
                    && c.observed_generation == Some(generation)
            })
        })
}

/// The same question at cleanup. Deleting an object that has finalizers bumps its generation
/// once without changing its spec (kube-apiserver does; `reconcile_real`'s
/// `a_synced_grant_is_deleted_by_name_without_a_listing` shows it), so a sync of the generation
/// before the deletion counts as a sync of the spec the grant is deleted with.
pub fn documents_follow_spec_at_deletion(
    status: Option<&SessionAccessStatus>,
    generation: Option<i64>,
) -> bool {
    documents_follow_spec(status, generation)
        || generation.is_some_and(|g| g > 1 && documents_follow_spec(status, Some(g - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{aws::PrincipalKind, model::boundary::Refusal};

    fn seen(policy: PoliciesState) -> Observations {
        Observations {
            generation: Some(3),
            admission: Admission::Admitted {
                boundaries: vec!["team".into()],
            },
            approval: Verdict::NotRequired,
            policy,
            targets: TargetsState::Resolved(1),
            bridge: EndpointsState::NotRequested,
            expired: false,
            policies: Vec::new(),
            attached_principals: Vec::new(),
            target_list: Vec::new(),
            sessions_ended: None,
            connect: Vec::new(),
        }
    }

    fn seen_all_instances() -> Observations {
        Observations {
            targets: TargetsState::AllInstances,
            ..seen(synced())
        }
    }

    fn synced() -> PoliciesState {
        PoliciesState::Synced {
            policies: 1,
            documents: 0,
        }
    }

    fn find<'a>(status: &'a SessionAccessStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn a_grant_outside_its_boundary_is_not_ready_and_says_why() {
        let refused = Observations {
            admission: Admission::Refused(vec![Refusal {
                boundary: Some("team".into()),
                field: "spec.sessions.ports".into(),
                message: "port 3306 is not among the ports this boundary allows (5432)".into(),
            }]),
            ..seen(PoliciesState::Revoked(Withheld::OutsideBoundary))
        };
        let status = compute(None, &refused, Timestamp::from_second(1_000).expect("time"));
        let (ready, admitted) = (find(&status, READY), find(&status, ADMITTED));
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "OutsideBoundary")
        );
        assert_eq!(admitted.status, "False");
        assert!(
            admitted.message.ends_with("spec.sessions.ports: port 3306 is not among the ports this boundary allows (5432) (SessionAccessPolicy team)"),
            "{}",
            admitted.message
        );
        let inside = compute(
            None,
            &seen(synced()),
            Timestamp::from_second(1_000).expect("time"),
        );
        assert_eq!(
            find(&inside, ADMITTED).message,
            "admitted by SessionAccessPolicy team"
        );
    }

    #[test]
    fn a_grant_past_its_namespaces_documents_is_not_ready_and_warns_once() {
        let over = Withheld::OverDocumentLimit(OverDocumentLimit {
            needed: 51,
            limit: 50,
        });
        let observed = Observations {
            bridge: EndpointsState::Revoked(over.clone()),
            ..seen(PoliciesState::Revoked(over.clone()))
        };
        let status = compute(None, &observed, Timestamp::UNIX_EPOCH);
        let (ready, policies, bridge) = (
            find(&status, READY),
            find(&status, POLICY_SYNCED),
            find(&status, BRIDGE_READY),
        );
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", DOCUMENT_LIMIT)
        );
        assert_eq!(policies.status, "False");
        for words in [
            "would hold 51 session documents",
            "limit of 50 per namespace",
        ] {
            assert!(
                policies.message.contains(words),
                "{words}: {}",
                policies.message
            );
        }
        assert_eq!(bridge.message, "no endpoints: see PolicySynced");
        // The Warning goes out when the grant is newly over, not at every reconcile.
        let event = left_out_event(None, Some(&over)).expect("an Event");
        assert_eq!(event.0, DOCUMENT_LIMIT);
        assert!(event.1.contains("limit of 50"), "{}", event.1);
        assert_eq!(left_out_event(Some(&status), Some(&over)), None);
        assert_eq!(left_out_event(None, Some(&Withheld::OutsideBoundary)), None);
        let fits = compute(Some(&status), &seen(synced()), Timestamp::UNIX_EPOCH);
        assert_eq!(
            left_out_event(Some(&fits), Some(&over)).map(|e| e.0),
            Some(DOCUMENT_LIMIT)
        );
    }

    #[test]
    fn a_grant_awaiting_approval_is_not_ready_says_how_to_approve_and_ends_an_approval() {
        let approved = SessionAccessStatus {
            conditions: vec![Condition {
                type_: APPROVED.into(),
                status: "True".into(),
                reason: "Approved".into(),
                message: String::new(),
                observed_generation: Some(3),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        };
        let pending = Verdict::Pending {
            required_by: vec!["prod".into()],
            why: Pending::Awaiting {
                requested_by: "alice".into(),
                generation: 3,
                uid: "u-1".into(),
                other_generations: vec![2],
            },
        };
        let seen = Observations {
            approval: pending.clone(),
            bridge: EndpointsState::Revoked(Withheld::AwaitingApproval),
            ..seen(PoliciesState::Revoked(Withheld::AwaitingApproval))
        };
        let status = compute(Some(&approved), &seen, Timestamp::UNIX_EPOCH);
        let ready = find(&status, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Pending")
        );
        let message = &find(&status, APPROVED).message;
        for words in [
            "SessionAccessPolicy prod",
            "other than alice",
            "uid: u-1, generation: 3",
            "generations 2 only",
        ] {
            assert!(message.contains(words), "{words}: {message}");
        }
        assert_eq!(find(&status, POLICY_SYNCED).reason, "AwaitingApproval");
        assert_eq!(find(&status, BRIDGE_READY).reason, "AwaitingApproval");
        assert_eq!(status.approval, None);
    }

    #[test]
    fn a_grant_granted_what_its_status_records_attached_and_resolved() {
        let refused = SessionAccessStatus::default();
        assert_eq!(granted(None), None);
        assert_eq!(granted(Some(&refused)), None, "a grant that wrote no IAM");
        let in_force = SessionAccessStatus {
            attached_principals: vec![
                "arn:aws:iam::123456789012:user/alice".into(),
                "arn:aws:iam::123456789012:group/ops".into(),
                "arn:aws:iam::123456789012:role/fleet-access-bridge".into(),
            ],
            targets: vec![TargetStatus {
                instance_id: "i-1".into(),
                ping_status: None,
                agent_version: None,
                ssh_capable: None,
                endpoint: None,
                remote_endpoints: Vec::new(),
            }],
            ..SessionAccessStatus::default()
        };
        assert_eq!(
            granted(Some(&in_force)),
            Some(Granted {
                principals: vec![
                    Principal::new(PrincipalKind::User, "alice"),
                    Principal::new(PrincipalKind::Group, "ops"),
                    Principal::new(PrincipalKind::Role, "fleet-access-bridge"),
                ],
                instances: Covered::Instances(std::collections::BTreeSet::from(["i-1".into()])),
            })
        );
        // A grant of every instance granted every instance, however its targets read.
        let everywhere = SessionAccessStatus {
            conditions: compute(None, &seen_all_instances(), Timestamp::UNIX_EPOCH).conditions,
            ..in_force
        };
        assert_eq!(
            granted(Some(&everywhere)).map(|g| g.instances),
            Some(Covered::All)
        );
    }

    #[test]
    fn ready_follows_the_first_failing_condition() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let status = compute(
            None,
            &seen(PoliciesState::Failed(Outcome::no(
                "LimitExceeded",
                "too many policies",
            ))),
            t0,
        );
        let ready = find(&status, READY);
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "LimitExceeded");
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(find(&status, EXPIRED).status, "False");
    }

    #[test]
    fn transition_time_stays_while_status_holds() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let t1 = Timestamp::from_second(2_000).expect("time");
        let first = compute(None, &seen(synced()), t0);
        let second = compute(Some(&first), &seen(synced()), t1);
        assert_eq!(find(&second, READY).last_transition_time, Time(t0));
        let third = compute(
            Some(&second),
            &seen(PoliciesState::Failed(Outcome::no("X", "y"))),
            t1,
        );
        assert_eq!(find(&third, READY).last_transition_time, Time(t1));
    }

    #[test]
    fn documents_follow_the_spec_from_creation_and_after_a_sync_of_the_current_generation() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        assert!(documents_follow_spec(None, Some(1)), "never another spec");
        assert!(
            !documents_follow_spec(None, Some(2)),
            "an earlier spec, not synced"
        );
        assert!(!documents_follow_spec(None, None), "unknown generation");
        let synced = compute(None, &seen(synced()), t0);
        assert!(documents_follow_spec(Some(&synced), Some(3)));
        assert!(
            !documents_follow_spec(Some(&synced), Some(4)),
            "synced for an earlier generation only"
        );
        let failed = compute(
            None,
            &seen(PoliciesState::Failed(Outcome::no("NotOwned", "taken"))),
            t0,
        );
        assert!(!documents_follow_spec(Some(&failed), Some(3)));
    }

    #[test]
    fn at_deletion_a_sync_of_the_generation_before_the_bump_counts() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let synced = compute(None, &seen(synced()), t0);
        assert!(documents_follow_spec_at_deletion(Some(&synced), Some(3)));
        assert!(
            documents_follow_spec_at_deletion(Some(&synced), Some(4)),
            "synced at 3, deleted (bumped to 4)"
        );
        assert!(
            !documents_follow_spec_at_deletion(Some(&synced), Some(5)),
            "the spec changed after the sync, then deleted"
        );
        assert!(
            documents_follow_spec_at_deletion(None, Some(2)),
            "never another spec: created, then deleted"
        );
        assert!(!documents_follow_spec_at_deletion(None, Some(3)));
        assert!(
            !documents_follow_spec(Some(&synced), Some(4)),
            "outside deletion the generation before does not count"
        );
    }

    #[test]
    fn remote_hosts_need_agents_that_forward_to_them() {
        let instance = |id: &str, version: &str| InstanceInfo {
            instance_id: id.into(),
            ping_status: Some("Online".into()),
            agent_version: Some(version.into()),
        };
        let found = vec![
            instance("i-0000000000000000a", "3.3.4851.0"),
            instance("i-0000000000000000b", "3.0.1390.0"),
        ];
        let mut selection = TargetSelection {
            instance_ids: vec!["i-0000000000000000a".into(), "i-0000000000000000b".into()],
            ..TargetSelection::default()
        };
        let (state, _) = resolved_targets(&selection, found.clone(), None);
        assert_eq!(
            state,
            TargetsState::Resolved(2),
            "no remote host: any agent"
        );
        selection.remote_hosts = true;
        let (state, _) = resolved_targets(&selection, found, None);
        assert_eq!(
            state,
            TargetsState::AgentsTooOld(vec![("i-0000000000000000b".into(), "3.0.1390.0".into())])
        );
        let words = targets_outcome(&state);
        assert_eq!((words.ok, words.reason.as_str()), (false, "AgentTooOld"));
        assert!(
            words.message.contains("3.1.1188.0")
                && words.message.contains("i-0000000000000000b (3.0.1390.0)"),
            "{}",
            words.message
        );
    }
}
