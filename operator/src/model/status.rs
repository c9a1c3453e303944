//! Pure status: the conditions of a `SessionAccess` (and of `SessionPreferences`) from what a
//! reconcile found and did. No I/O; the clock is an argument.
//!
//! Ready = PolicySynced ∧ TargetsResolved ∧ BridgeReady ∧ ¬Expired. A condition keeps its
//! `lastTransitionTime` while its status does not change.

use fleet_access_crds::v1alpha1::{
    PolicyStatus, SessionAccessStatus, SessionPreferencesStatus, TargetStatus,
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// Condition types.
pub const READY: &str = "Ready";
/// IAM policies and session documents match the grant.
pub const POLICY_SYNCED: &str = "PolicySynced";
/// The targets resolved to managed instances.
pub const TARGETS_RESOLVED: &str = "TargetsResolved";
/// The bridge endpoints exist (or none are asked for).
pub const BRIDGE_READY: &str = "BridgeReady";
/// The window has ended and the grant is revoked.
pub const EXPIRED: &str = "Expired";

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

/// Everything a reconcile learned, as input to the status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observations {
    /// The object's generation.
    pub generation: Option<i64>,
    /// Policies and documents.
    pub policy: Outcome,
    /// Target resolution.
    pub targets: Outcome,
    /// Bridge endpoints.
    pub bridge: Outcome,
    /// Whether the window has ended.
    pub expired: bool,
    /// The grant's policies with their default versions.
    pub policies: Vec<PolicyStatus>,
    /// Principal ARNs the policies are attached to.
    pub attached_principals: Vec<String>,
    /// Resolved instances.
    pub target_list: Vec<TargetStatus>,
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
            "spec.window.expiresAt has passed: the policies are revoked, endpoints removed and open sessions terminated; move expiresAt to grant access again",
        )
    } else {
        Outcome::no("WithinWindow", "the grant has not expired")
    };
    let ready = if seen.expired {
        Outcome::no("Expired", "the grant's window has ended")
    } else if !seen.policy.ok {
        Outcome::no(&seen.policy.reason, seen.policy.message.clone())
    } else if !seen.targets.ok {
        Outcome::no(&seen.targets.reason, seen.targets.message.clone())
    } else if !seen.bridge.ok {
        Outcome::no(&seen.bridge.reason, seen.bridge.message.clone())
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
        condition(POLICY_SYNCED, &seen.policy),
        condition(TARGETS_RESOLVED, &seen.targets),
        condition(BRIDGE_READY, &seen.bridge),
        condition(EXPIRED, &expired),
    ];
    SessionAccessStatus {
        observed_generation: seen.generation,
        conditions,
        policies: seen.policies.clone(),
        attached_principals: seen.attached_principals.clone(),
        target_count: i32::try_from(seen.target_list.len()).ok(),
        targets: seen.target_list.clone(),
    }
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

    fn seen(policy: Outcome) -> Observations {
        Observations {
            generation: Some(3),
            policy,
            targets: Outcome::yes("Resolved", "1 instance"),
            bridge: Outcome::yes("NotRequested", "no bridge"),
            expired: false,
            policies: Vec::new(),
            attached_principals: Vec::new(),
            target_list: Vec::new(),
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
    fn ready_follows_the_first_failing_condition() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let status = compute(
            None,
            &seen(Outcome::no("LimitExceeded", "too many policies")),
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
        let first = compute(None, &seen(Outcome::yes("Applied", "ok")), t0);
        let second = compute(Some(&first), &seen(Outcome::yes("Applied", "ok")), t1);
        assert_eq!(find(&second, READY).last_transition_time, Time(t0));
        let third = compute(Some(&second), &seen(Outcome::no("X", "y")), t1);
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
        let synced = compute(None, &seen(Outcome::yes("Synced", "ok")), t0);
        assert!(documents_follow_spec(Some(&synced), Some(3)));
        assert!(
            !documents_follow_spec(Some(&synced), Some(4)),
            "synced for an earlier generation only"
        );
        let failed = compute(None, &seen(Outcome::no("NotOwned", "taken")), t0);
        assert!(!documents_follow_spec(Some(&failed), Some(3)));
    }

    #[test]
    fn at_deletion_a_sync_of_the_generation_before_the_bump_counts() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let synced = compute(None, &seen(Outcome::yes("Synced", "ok")), t0);
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
}
