//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several replicas exactly
//! one reconciles. This module owns the Lease record: [`decide`] is the pure rule (acquire,
//! renew or wait) and [`Elector`] the I/O around it (read, create, replace with the read
//! `resourceVersion` so that two replicas racing for the Lease cannot both win, release).
//!
//! ```text
//!            ┌──── holder is me ────▶ Renew ─┐
//!  read ─▶ decide ─ no holder / expired ─▶ Acquire ─┼─▶ replace(resourceVersion) ─▶ leading
//!            └──── someone else, fresh ─▶ Wait ──┘          409: lost the race ─▶ standby
//! ```
//!
//! Expiry is judged on this replica's own monotonic clock, as client-go does: a record counts
//! as expired when it has not changed for a whole `leaseDurationSeconds` since this replica
//! first saw it, so clock skew between machines does not matter. A leader that cannot renew
//! within the renew deadline (shorter than the lease duration) stops leading before anyone
//! else may take over. The identity must be unique per replica (the pod name is); a restarted
//! replica with the same identity takes its Lease back at once.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{PostParams, ResourceExt},
};
use tokio::{sync::watch, time::Instant};

use crate::{Error, Result};

/// How long a Lease holds and how often it is renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a record stays valid without renewal (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading (shorter than the duration,
    /// so it stops before another replica may take over).
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Timing {
    /// client-go's proportions (15 s / 10 s / 2 s) scaled to `lease_duration`.
    pub fn from_lease_duration(lease_duration: Duration) -> Self {
        Self {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration * 2 / 15,
        }
    }
}

/// What the Lease currently says, as far as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Who holds it; `None` (or empty) when released.
    pub holder: Option<String>,
    /// The holder's `leaseDurationSeconds`.
    pub duration: Duration,
    /// Changes on every write: how a standby sees that the holder is alive.
    pub version: String,
}

/// What to do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take it: it is free, released or expired.
    Acquire,
    /// Renew it: this replica holds it.
    Renew,
    /// Leave it: `holder` holds it and renewed it recently.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// The rule: renew our own record, take a free or expired one, otherwise wait. `seen_since`
/// is when this replica first saw the record at its current version.
pub fn decide(record: &Record, identity: &str, seen_since: Instant, now: Instant) -> Decision {
    match record.holder.as_deref() {
        None | Some("") => Decision::Acquire,
        Some(holder) if holder == identity => Decision::Renew,
        Some(holder) => {
            if now.saturating_duration_since(seen_since) >= record.duration {
                Decision::Acquire
            } else {
                Decision::Wait {
                    holder: holder.to_owned(),
                }
            }
        }
    }
}

/// The record of a Lease object.
pub fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity,
        duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        ),
        version: lease.resource_version().unwrap_or_default(),
    }
}

/// The spec this replica writes when it acquires (`acquired`) or renews a Lease.
fn spec_for(
    previous: Option<&LeaseSpec>,
    identity: &str,
    timing: &Timing,
    acquired: bool,
    now: Timestamp,
) -> LeaseSpec {
    let previous = previous.cloned().unwrap_or_default();
    let transitions = previous.lease_transitions.unwrap_or(0);
    let changed_hands = acquired && previous.holder_identity.as_deref() != Some(identity);
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(
            i32::try_from(timing.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
        ),
        acquire_time: if acquired {
            Some(MicroTime(now))
        } else {
            previous.acquire_time
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if changed_hands && previous.holder_identity.is_some() {
            transitions.saturating_add(1)
        } else {
            transitions
        }),
        ..LeaseSpec::default()
    }
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The record last read and when it was first seen at that version.
    seen: Option<(String, Instant)>,
    /// When this replica last wrote the Lease as its holder.
    renewed: Option<Instant>,
}

impl Elector {
    /// An elector for Lease `name` in `namespace`, as `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            seen: None,
            renewed: None,
        }
    }

    /// One round: read the Lease, decide, write. Returns whether this replica leads now.
    pub async fn step(&mut self) -> Result<bool> {
        let now = Instant::now();
        let lease = self.api.get_opt(&self.name).await.map_err(Error::Kube)?;
        let Some(lease) = lease else {
            let created = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec_for(
                    None,
                    &self.identity,
                    &self.timing,
                    true,
                    Timestamp::now(),
                )),
            };
            return match self.api.create(&PostParams::default(), &created).await {
                Ok(_) => {
                    self.renewed = Some(now);
                    tracing::info!(identity = %self.identity, lease = %self.name, "created the Lease: leading");
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(Error::Kube(e)),
            };
        };
        let record = record_of(&lease);
        let seen_since = match &self.seen {
            Some((version, since)) if *version == record.version => *since,
            _ => {
                self.seen = Some((record.version.clone(), now));
                now
            }
        };
        let acquired = match decide(&record, &self.identity, seen_since, now) {
            Decision::Wait { holder } => {
                tracing::debug!(%holder, "the Lease is held");
                self.renewed = None;
                return Ok(false);
            }
            Decision::Renew => false,
            Decision::Acquire => true,
        };
        let mut next = lease.clone();
        next.spec = Some(spec_for(
            lease.spec.as_ref(),
            &self.identity,
            &self.timing,
            acquired,
            Timestamp::now(),
        ));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                if acquired {
                    tracing::info!(identity = %self.identity, previous = ?record.holder, "acquired the Lease: leading");
                }
                self.seen = Some((written.resource_version().unwrap_or_default(), now));
                self.renewed = Some(now);
                Ok(true)
            }
            // Another replica wrote it first: read again next round.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Whether this replica still leads at `now`: it renewed within the renew deadline.
    fn still_leading(&self, now: Instant) -> bool {
        self.renewed
            .is_some_and(|at| now.saturating_duration_since(at) < self.timing.renew_deadline)
    }

    /// Gives the Lease up (on a clean shutdown), so that a standby takes over at once.
    pub async fn release(&mut self) -> Result<()> {
        let Some(lease) = self.api.get_opt(&self.name).await.map_err(Error::Kube)? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let mut next = lease;
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..spec
        });
        self.api
            .replace(&self.name, &PostParams::default(), &next)
            .await
            .map_err(Error::Kube)?;
        self.renewed = None;
        tracing::info!(identity = %self.identity, "released the Lease");
        Ok(())
    }

    /// Keeps trying to acquire and renew until `stop` turns true, publishing on `leading`
    /// whether this replica leads. Returns the elector so the caller can release the Lease
    /// once its controllers have stopped.
    pub async fn keep(
        mut self,
        leading: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        loop {
            if *stop.borrow() {
                break;
            }
            let stepped = self.step().await;
            if let Err(error) = &stepped {
                tracing::warn!(%error, "leader election: cannot read or write the Lease");
            }
            let now_leading = matches!(stepped, Ok(true)) || self.still_leading(Instant::now());
            leading.send_if_modified(|value| {
                let changed = *value != now_leading;
                *value = now_leading;
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = stop.changed() => {}
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>) -> Record {
        Record {
            holder: holder.map(str::to_owned),
            duration: Duration::from_secs(15),
            version: "1".into(),
        }
    }

    #[test]
    fn a_free_or_released_lease_is_acquired() {
        let now = Instant::now();
        assert_eq!(decide(&record(None), "a", now, now), Decision::Acquire);
        assert_eq!(decide(&record(Some("")), "a", now, now), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed_even_after_a_restart() {
        let now = Instant::now();
        assert_eq!(decide(&record(Some("a")), "a", now, now), Decision::Renew);
    }

    #[test]
    fn someone_elses_lease_is_taken_only_after_a_full_duration_unchanged() {
        let seen = Instant::now();
        let held = record(Some("b"));
        let wait = Decision::Wait { holder: "b".into() };
        assert_eq!(decide(&held, "a", seen, seen), wait);
        assert_eq!(
            decide(&held, "a", seen, seen + Duration::from_secs(14)),
            wait
        );
        assert_eq!(
            decide(&held, "a", seen, seen + Duration::from_secs(15)),
            Decision::Acquire
        );
    }

    #[test]
    fn acquiring_from_another_holder_counts_a_transition() {
        let timing = Timing::from_lease_duration(Duration::from_secs(15));
        let previous = LeaseSpec {
            holder_identity: Some("b".into()),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        };
        let now = Timestamp::now();
        let taken = spec_for(Some(&previous), "a", &timing, true, now);
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        let renewed = spec_for(Some(&taken), "a", &timing, false, now);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }

    #[test]
    fn the_renew_deadline_ends_before_the_lease_does() {
        let timing = Timing::from_lease_duration(Duration::from_secs(15));
        assert_eq!(timing.renew_deadline, Duration::from_secs(10));
        assert_eq!(timing.retry_period, Duration::from_secs(2));
    }
}
