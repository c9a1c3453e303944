//! Which run of which bridge replica opened a session, and the sweep of the sessions that a
//! run ended without its shutdown (SIGKILL, an OOM kill, a lost node) left open at AWS, where
//! they would otherwise hold an instance's session until SSM's idle timeout.
//!
//! Every session `serve` starts carries its run's mark in StartSession's `Reason`, which AWS
//! keeps (DescribeSessions, CloudTrail):
//!
//! ```text
//! fleet-access bridge <cluster>/<namespace>/<pod> uid=<pod uid> run=<random, per process>
//! ```
//!
//! At start a run lists the Active sessions and terminates those marked by its own cluster and
//! namespace whose run is over: an earlier run of its own pod (a restarted container), or a run
//! of a pod that no longer exists or whose name now belongs to another pod. A session of a live
//! pod, its own current run's or another replica's, is never touched; nor one of another
//! cluster or namespace, or one without a mark. When a pod cannot be looked up, its sessions
//! are kept. [`fate`] is the decision, pure; [`sweep`] does the I/O.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tracing::{info, warn};

use crate::ssm::{ControlPlane, SdkControlPlane};

/// How a marked reason starts.
const PREFIX: &str = "fleet-access bridge ";
/// StartSession's limit on `Reason`.
const REASON_LIMIT: usize = 256;

/// One run of one bridge replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMark {
    cluster: String,
    namespace: String,
    pod: String,
    uid: String,
    run: String,
}

/// A mark that cannot be written into a Reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MarkError {
    /// A part is empty or holds a `/` or white space.
    #[error("the replica's {part} {value:?} must be non-empty, without '/' or white space")]
    BadPart {
        /// Which part (`cluster name`, `namespace`, `pod name`, `pod uid`).
        part: &'static str,
        /// Its value.
        value: String,
    },
    /// The whole mark is longer than StartSession's Reason allows.
    #[error(
        "the replica's mark {reason:?} is longer than the 256 characters of a session's Reason: \
         use a shorter --cluster-name"
    )]
    TooLong {
        /// The mark.
        reason: String,
    },
}

impl ReplicaMark {
    /// The mark of this process: `cluster` (set per cluster, so that bridges of two clusters
    /// sharing an IAM role never sweep each other's sessions), the pod's namespace, name and
    /// uid, and a fresh run id.
    pub fn for_this_run(
        cluster: &str,
        namespace: &str,
        pod: &str,
        uid: &str,
    ) -> Result<Self, MarkError> {
        let run = format!("{:08x}", uuid::Uuid::new_v4().as_u128() as u32);
        Self::new(cluster, namespace, pod, uid, &run)
    }

    fn new(
        cluster: &str,
        namespace: &str,
        pod: &str,
        uid: &str,
        run: &str,
    ) -> Result<Self, MarkError> {
        for (part, value) in [
            ("cluster name", cluster),
            ("namespace", namespace),
            ("pod name", pod),
            ("pod uid", uid),
        ] {
            if value.is_empty() || value.contains(|c: char| c == '/' || c.is_whitespace()) {
                return Err(MarkError::BadPart {
                    part,
                    value: value.to_owned(),
                });
            }
        }
        let mark = Self {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            uid: uid.to_owned(),
            run: run.to_owned(),
        };
        let reason = mark.reason();
        if reason.len() > REASON_LIMIT {
            return Err(MarkError::TooLong { reason });
        }
        Ok(mark)
    }

    /// The Reason of every session this run starts.
    pub fn reason(&self) -> String {
        format!(
            "{PREFIX}{}/{}/{} uid={} run={}",
            self.cluster, self.namespace, self.pod, self.uid, self.run
        )
    }

    /// Whether `other` was made by a bridge of the same cluster and namespace.
    fn same_fleet(&self, other: &Self) -> bool {
        self.cluster == other.cluster && self.namespace == other.namespace
    }

    /// The mark in a session's Reason; `None` for any other reason.
    pub fn parse(reason: &str) -> Option<Self> {
        let mut words = reason.strip_prefix(PREFIX)?.split(' ');
        let mut place = words.next()?.split('/');
        let (cluster, namespace, pod) = (place.next()?, place.next()?, place.next()?);
        let uid = words.next()?.strip_prefix("uid=")?;
        let run = words.next()?.strip_prefix("run=")?;
        if place.next().is_some() || run.is_empty() {
            return None;
        }
        Self::new(cluster, namespace, pod, uid, run).ok()
    }
}

/// What becomes of one marked session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Another cluster's or namespace's, this run's own, or a live replica's.
    Keep,
    /// An earlier run of this very pod left it.
    EarlierRun,
    /// Its pod is gone (or its name belongs to another pod now).
    PodGone,
}

/// The fate of a session marked `marked`, as seen by the run `me`; `live_uid` is the uid of
/// the pod named in the mark as the API server has it now (`None`: no such pod). Pure.
pub fn fate(me: &ReplicaMark, marked: &ReplicaMark, live_uid: Option<&str>) -> Fate {
    if !me.same_fleet(marked) {
        return Fate::Keep;
    }
    if marked.uid == me.uid {
        return if marked.run == me.run {
            Fate::Keep
        } else {
            Fate::EarlierRun
        };
    }
    if live_uid == Some(marked.uid.as_str()) {
        Fate::Keep
    } else {
        Fate::PodGone
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Sessions terminated.
    pub terminated: usize,
    /// Marked sessions of this cluster and namespace kept.
    pub kept: usize,
    /// Sessions that should have been terminated but could not be (or whose pod could not be
    /// looked up): they end at SSM's idle timeout.
    pub failed: usize,
}

/// Lists the Active sessions and terminates those whose run is over (see the module comment).
pub async fn sweep(me: &ReplicaMark, control: &SdkControlPlane, pods: &Api<Pod>) -> Swept {
    let sessions = match control.active_sessions().await {
        Ok(sessions) => sessions,
        Err(error) => {
            warn!(%error, "cannot list active sessions: sessions of dead replicas are left to SSM's idle timeout");
            return Swept::default();
        }
    };
    let mut swept = Swept::default();
    let mut live_uids: HashMap<String, Option<Option<String>>> = HashMap::new();
    for (session_id, reason) in sessions {
        let Some(marked) = ReplicaMark::parse(&reason) else {
            continue;
        };
        if !me.same_fleet(&marked) {
            continue;
        }
        let live_uid = match live_uids.get(&marked.pod) {
            Some(known) => known.clone(),
            None => {
                let looked_up = match pods.get_opt(&marked.pod).await {
                    Ok(pod) => Some(pod.and_then(|p| p.metadata.uid)),
                    Err(error) => {
                        warn!(pod = marked.pod, %error, "cannot look up a bridge pod: its sessions are kept");
                        None
                    }
                };
                live_uids.insert(marked.pod.clone(), looked_up.clone());
                looked_up
            }
        };
        let Some(live_uid) = live_uid else {
            swept.failed += 1;
            continue;
        };
        let fate = fate(me, &marked, live_uid.as_deref());
        if fate == Fate::Keep {
            swept.kept += 1;
            continue;
        }
        match control.terminate_session(&session_id).await {
            Ok(()) => {
                info!(
                    session_id,
                    pod = marked.pod,
                    run = marked.run,
                    ?fate,
                    "terminated a session a dead bridge run left open"
                );
                swept.terminated += 1;
            }
            Err(error) => {
                warn!(session_id, %error, "cannot terminate a session a dead bridge run left open");
                swept.failed += 1;
            }
        }
    }
    info!(?swept, "swept the sessions of dead bridge runs");
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(pod: &str, uid: &str, run: &str) -> ReplicaMark {
        ReplicaMark::new("prod", "fleet-access", pod, uid, run).expect("a valid mark")
    }

    #[test]
    fn a_mark_survives_the_reason_it_is_written_into() {
        let me =
            ReplicaMark::for_this_run("prod", "fleet-access", "agent-bridge-7d9f-x2x", "0b6a-41")
                .expect("a valid mark");
        let reason = me.reason();
        assert!(
            reason.starts_with(
                "fleet-access bridge prod/fleet-access/agent-bridge-7d9f-x2x uid=0b6a-41 run="
            ),
            "{reason}"
        );
        assert_eq!(ReplicaMark::parse(&reason), Some(me.clone()));
        // Words appended later (who asked, for example) do not hide the mark.
        assert_eq!(
            ReplicaMark::parse(&format!("{reason} client=team-a/ci-0")),
            Some(me)
        );
    }

    #[test]
    fn other_reasons_carry_no_mark() {
        for reason in [
            "",
            "fleet-access agent bridge",
            "agent-bridge proxy",
            "fleet-access bridge prod/fleet-access uid=u run=r",
            "fleet-access bridge prod/fleet-access/p/q uid=u run=r",
            "fleet-access bridge prod/fleet-access/p run=r uid=u",
            "fleet-access bridge prod/fleet-access/p uid= run=r",
            "fleet-access bridge prod/fleet-access/p uid=u run=",
        ] {
            assert_eq!(ReplicaMark::parse(reason), None, "{reason:?}");
        }
    }

    #[test]
    fn a_mark_too_long_or_with_a_separator_is_refused_with_what_to_fix() {
        let long = "c".repeat(200);
        let error = ReplicaMark::for_this_run(
            &long,
            "fleet-access",
            "agent-bridge-7d9f-x2x",
            &"u".repeat(36),
        )
        .expect_err("too long");
        assert!(error.to_string().contains("--cluster-name"), "{error}");
        let error = ReplicaMark::for_this_run("prod/eu", "ns", "pod", "uid").expect_err("a slash");
        assert!(error.to_string().contains("cluster name"), "{error}");
        assert!(ReplicaMark::for_this_run("prod", "ns", "", "uid").is_err());
    }

    #[test]
    fn only_runs_that_are_over_lose_their_sessions() {
        let me = mark("bridge-a", "uid-a", "run-2");
        // This run's own sessions, and those of a live replica.
        assert_eq!(
            fate(&me, &mark("bridge-a", "uid-a", "run-2"), Some("uid-a")),
            Fate::Keep
        );
        assert_eq!(
            fate(&me, &mark("bridge-b", "uid-b", "run-1"), Some("uid-b")),
            Fate::Keep
        );
        // An earlier run of this pod (a restarted container).
        assert_eq!(
            fate(&me, &mark("bridge-a", "uid-a", "run-1"), Some("uid-a")),
            Fate::EarlierRun
        );
        // A pod that is gone, or whose name another pod has now.
        assert_eq!(
            fate(&me, &mark("bridge-c", "uid-c", "run-1"), None),
            Fate::PodGone
        );
        assert_eq!(
            fate(&me, &mark("bridge-c", "uid-c", "run-1"), Some("uid-d")),
            Fate::PodGone
        );
        // Another cluster's or namespace's bridge, whatever its pod.
        let elsewhere =
            ReplicaMark::new("staging", "fleet-access", "bridge-c", "uid-c", "r").expect("mark");
        assert_eq!(fate(&me, &elsewhere, None), Fate::Keep);
        let other_namespace =
            ReplicaMark::new("prod", "team-b", "bridge-a", "uid-a", "r").expect("mark");
        assert_eq!(fate(&me, &other_namespace, None), Fate::Keep);
    }
}
