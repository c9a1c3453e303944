//! A tunnel's life as its driver sees it happen: the setup milestones (the agent's first frame,
//! HandshakeComplete, the instance's first byte), reported to an observer the moment they
//! happen, and the session's idle and maximum-duration deadlines, kept among the driver's own
//! timers. Pure: the driver passes the instants in.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

/// A setup milestone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    /// The agent's first frame arrived.
    FirstFrame,
    /// HandshakeComplete arrived.
    Handshake,
    /// The instance's first byte arrived.
    FirstByte,
}

/// When each milestone happened, as far as the session got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Milestones {
    /// See [`Milestone::FirstFrame`].
    pub first_frame: Option<Instant>,
    /// See [`Milestone::Handshake`].
    pub handshake: Option<Instant>,
    /// See [`Milestone::FirstByte`].
    pub first_byte: Option<Instant>,
}

impl Milestones {
    /// Records `milestone` at `at` unless it happened before; true when it is new.
    pub(super) fn reach(&mut self, milestone: Milestone, at: Instant) -> bool {
        let slot = match milestone {
            Milestone::FirstFrame => &mut self.first_frame,
            Milestone::Handshake => &mut self.handshake,
            Milestone::FirstByte => &mut self.first_byte,
        };
        let new = slot.is_none();
        if new {
            *slot = Some(at);
        }
        new
    }
}

/// Told of each milestone as it is reached, with every one reached so far.
pub type SetupObserver = Arc<dyn Fn(Milestone, &Milestones) + Send + Sync>;

/// Which deadline ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No byte either way for the idle timeout.
    Idle,
    /// The maximum duration.
    MaxDuration,
}

/// A session's deadlines: none by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// End the session when no byte went either way for this long.
    pub idle: Option<Duration>,
    /// End the session this long after it started, whatever it does.
    pub max_duration: Option<Duration>,
}

impl Deadlines {
    /// The next deadline, for a session started at `started` that last carried a byte at
    /// `last_activity`.
    pub(super) fn next(&self, started: Instant, last_activity: Instant) -> Option<Instant> {
        let idle = self.idle.map(|idle| last_activity + idle);
        let max = self.max_duration.map(|max| started + max);
        idle.into_iter().chain(max).min()
    }

    /// Which deadline has passed at `now`, if any (the maximum duration first).
    pub(super) fn expired(
        &self,
        now: Instant,
        started: Instant,
        last_activity: Instant,
    ) -> Option<Expiry> {
        let passed = |deadline: Option<Instant>| deadline.is_some_and(|at| now >= at);
        if passed(self.max_duration.map(|max| started + max)) {
            Some(Expiry::MaxDuration)
        } else if passed(self.idle.map(|idle| last_activity + idle)) {
            Some(Expiry::Idle)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_milestone_is_reached_once() {
        let t0 = Instant::now();
        let mut milestones = Milestones::default();
        assert!(milestones.reach(Milestone::FirstFrame, t0));
        assert!(!milestones.reach(Milestone::FirstFrame, t0 + SECOND));
        assert!(milestones.reach(Milestone::FirstByte, t0 + 2 * SECOND));
        assert_eq!(
            milestones,
            Milestones {
                first_frame: Some(t0),
                handshake: None,
                first_byte: Some(t0 + 2 * SECOND),
            }
        );
    }

    #[test]
    fn the_idle_deadline_follows_activity_and_the_maximum_does_not() {
        let t0 = Instant::now();
        let deadlines = Deadlines {
            idle: Some(10 * SECOND),
            max_duration: Some(60 * SECOND),
        };
        assert_eq!(deadlines.next(t0, t0), Some(t0 + 10 * SECOND));
        assert_eq!(deadlines.next(t0, t0 + 55 * SECOND), Some(t0 + 60 * SECOND));
        assert_eq!(deadlines.expired(t0 + 9 * SECOND, t0, t0), None);
        assert_eq!(
            deadlines.expired(t0 + 10 * SECOND, t0, t0),
            Some(Expiry::Idle)
        );
        assert_eq!(
            deadlines.expired(t0 + 30 * SECOND, t0, t0 + 25 * SECOND),
            None
        );
        assert_eq!(
            deadlines.expired(t0 + 60 * SECOND, t0, t0 + 59 * SECOND),
            Some(Expiry::MaxDuration)
        );
        assert_eq!(Deadlines::default().next(t0, t0), None);
        assert_eq!(
            Deadlines::default().expired(t0 + 1000 * SECOND, t0, t0),
            None
        );
    }
}
