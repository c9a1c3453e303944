//! Whether a grant needs a second person's approval, and whether it has one. Pure: the
//! controller passes the grant, its namespace's boundaries and approvals, and the clock.
//!
//! ```text
//!  boundaries selecting the namespace ─▶ required_by ─┐
//!  grant (uid, generation, requested-by) ─────────────┼─▶ judge ─▶ Verdict ─▶ effective grant
//!  SessionAccessApprovals of the namespace ───────────┘              (window narrowed to the
//!                                                                     approval's end)
//! ```
//!
//! An approval counts when it names the grant's uid and current generation, was given by
//! someone other than the grant's requester, and has not run out. Both names are proven by the
//! API server (`deploy/tenancy/approval-policy.yaml`); this module is the operator's own check
//! before any AWS write, and fails closed: a grant that needs approval and names no requester
//! is never in force.

use std::borrow::Cow;

use fleet_access_crds::{
    SessionAccess, SessionAccessApproval, SessionAccessPolicy,
    v1alpha1::{ApprovalStatus, Effect, REQUESTED_BY_ANNOTATION, Window},
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use kube::ResourceExt;

use crate::model::boundary::{self, Grant};

/// Why a grant that needs approval is not in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// No approval of this generation yet; `other_generations` are the generations earlier
    /// approvals were given for.
    Awaiting {
        /// The grant's requester.
        requested_by: String,
        /// The generation an approval must name.
        generation: i64,
        /// The uid an approval must name.
        uid: String,
        /// Generations that approvals of this grant name instead.
        other_generations: Vec<i64>,
    },
    /// The grant does not say who requested it, so no approval can be told from self-approval.
    RequesterUnknown,
    /// The only approvals of this generation are by the grant's own requester.
    SelfApproved {
        /// The approval.
        approval: String,
        /// Its approver, who is also the requester.
        by: String,
    },
    /// The approval of this generation ran out.
    Lapsed {
        /// The approval.
        approval: String,
        /// Its approver.
        by: String,
        /// When it ended.
        at: Timestamp,
    },
}

/// The approval verdict on one grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No boundary of the namespace requires approval of the grant.
    NotRequired,
    /// Approved; in force until `record.expires_at`, if set.
    Approved {
        /// The boundaries that require approval.
        required_by: Vec<String>,
        /// The approval, as the status records it.
        record: ApprovalStatus,
    },
    /// Required and not given.
    Pending {
        /// The boundaries that require approval.
        required_by: Vec<String>,
        /// Why not.
        why: Pending,
    },
}

impl Verdict {
    /// Whether the approval rules let the grant be in force.
    pub fn allows(&self) -> bool {
        !matches!(self, Verdict::Pending { .. })
    }

    /// When the approval ends, if it does.
    pub fn until(&self) -> Option<Timestamp> {
        match self {
            Verdict::Approved { record, .. } => record.expires_at.as_ref().map(|t| t.0),
            _ => None,
        }
    }

    /// The status record of the approval the grant is in force by.
    pub fn record(&self) -> Option<&ApprovalStatus> {
        match self {
            Verdict::Approved { record, .. } => Some(record),
            _ => None,
        }
    }
}

/// The boundaries (by name) that require approval of `grant`: those selecting its namespace
/// whose `approval` covers it. Deny grants need none. A boundary whose selector cannot be read
/// is left to [`boundary::admit`], which refuses the grant.
pub fn required_by(grant: &Grant<'_>, boundaries: &[SessionAccessPolicy]) -> Vec<String> {
    if grant.spec.effect == Effect::Deny {
        return Vec::new();
    }
    let targets = &grant.spec.targets;
    (boundaries.iter())
        .filter(|b| {
            boundary::selects(&b.spec.namespace_selector, grant.namespace_labels)
                .unwrap_or(false)
        })
        .filter(|b| {
            b.spec.approval.as_ref().is_some_and(|approval| {
                approval.always
                    || (!approval.instance_ids.is_empty()
                        // A tag may be put on any instance at any time.
                        && (targets.all_instances
                            || !targets.tags.is_empty()
                            || targets.instance_ids.iter().any(|i| approval.instance_ids.contains(i))))
            })
        })
        .map(ResourceExt::name_any)
        .collect()
}

/// Judges `grant`'s approvals among `approvals` (only those in the grant's namespace that
/// name it count: an approver's rights are per namespace), given the boundaries that require
/// one (`required_by`).
pub fn judge(
    grant: &SessionAccess,
    required_by: Vec<String>,
    approvals: &[SessionAccessApproval],
    now: Timestamp,
) -> Verdict {
    if required_by.is_empty() {
        return Verdict::NotRequired;
    }
    let pending = |why| Verdict::Pending {
        required_by: required_by.clone(),
        why,
    };
    let requested_by = grant.annotations().get(REQUESTED_BY_ANNOTATION);
    let (Some(requested_by), Some(uid), Some(generation)) = (
        requested_by.filter(|r| !r.is_empty()),
        grant.metadata.uid.as_deref(),
        grant.metadata.generation,
    ) else {
        return pending(Pending::RequesterUnknown);
    };
    let name = grant.name_any();
    let namespace = grant.namespace();
    let of_grant: Vec<&SessionAccessApproval> = (approvals.iter())
        .filter(|a| a.namespace() == namespace)
        .filter(|a| a.spec.grant.name == name && a.spec.grant.uid == uid)
        .collect();
    let (current, other): (Vec<_>, Vec<_>) =
        (of_grant.into_iter()).partition(|a| a.spec.grant.generation == generation);
    let (by_requester, by_others): (Vec<_>, Vec<_>) =
        (current.into_iter()).partition(|a| &a.spec.approved_by == requested_by);
    let mut judged: Vec<(ApprovalStatus, Option<Timestamp>)> = (by_others.into_iter())
        .filter_map(|a| {
            let at = a.metadata.creation_timestamp.as_ref()?.0;
            let until = (a.spec.duration.as_ref())
                .and_then(|d| d.seconds())
                .map(|seconds| {
                    (at.checked_add(SignedDuration::from_secs(seconds))).unwrap_or(Timestamp::MAX)
                });
            let record = ApprovalStatus {
                name: a.name_any(),
                approved_by: a.spec.approved_by.clone(),
                approved_at: Time(at),
                expires_at: until.map(Time),
                requested_by: requested_by.clone(),
                reason: a.spec.reason.clone(),
            };
            Some((record, until))
        })
        .collect();
    // The approval that lasts longest (one without an end first), then by name.
    judged.sort_by(|a, b| {
        let end = |u: &Option<Timestamp>| u.map_or(Timestamp::MAX, |t| t);
        end(&b.1)
            .cmp(&end(&a.1))
            .then_with(|| a.0.name.cmp(&b.0.name))
    });
    match judged.into_iter().next() {
        Some((record, until)) if until.is_none_or(|until| until > now) => Verdict::Approved {
            required_by,
            record,
        },
        Some((record, until)) => pending(Pending::Lapsed {
            approval: record.name,
            by: record.approved_by,
            at: until.unwrap_or(now),
        }),
        None => match by_requester.first() {
            Some(own) => pending(Pending::SelfApproved {
                approval: own.name_any(),
                by: own.spec.approved_by.clone(),
            }),
            None => {
                let mut other_generations: Vec<i64> =
                    other.iter().map(|a| a.spec.grant.generation).collect();
                other_generations.sort_unstable();
                other_generations.dedup();
                pending(Pending::Awaiting {
                    requested_by: requested_by.clone(),
                    generation,
                    uid: uid.to_owned(),
                    other_generations,
                })
            }
        },
    }
}

/// The grant as it is in force: its window narrowed to end when its approval does, so that IAM
/// enforces the approval's end on every StartSession, and the operator revokes at it.
pub fn effective<'a>(grant: &'a SessionAccess, verdict: &Verdict) -> Cow<'a, SessionAccess> {
    let Some(until) = verdict.until() else {
        return Cow::Borrowed(grant);
    };
    let ends = (grant.spec.window.as_ref())
        .and_then(|w| w.expires_at.as_ref())
        .map(|t| t.0);
    if ends.is_some_and(|ends| ends <= until) {
        return Cow::Borrowed(grant);
    }
    let mut narrowed = grant.clone();
    let window = narrowed.spec.window.get_or_insert_with(Window::default);
    window.expires_at = Some(Time(until));
    Cow::Owned(narrowed)
}

#[cfg(test)]
mod tests;
