//! Retransmission timeout estimator (docs/protocol.md §4). Pure arithmetic on
//! `Duration`s: no clock, no I/O.
//!
//! Jacobson/Karels as SMP and the agent compute it (alpha 1/8, beta 1/4, initial SRTT 100 ms,
//! RTO = SRTT + max(10 ms, 4 RTTVAR)), with two differences the reference lacks:
//! * the result is clamped to `[floor, ceiling]` (the reference caps at 1 s, which retransmits
//!   far too eagerly over a slow path; docs/protocol.md §9.3 item 5 asks for a floor and a generous ceiling);
//! * Karn's rule: the caller only feeds samples from messages sent once, and each timeout doubles
//!   the RTO (exponential backoff, still capped by the ceiling) until a fresh sample arrives.

use std::time::Duration;

/// Initial smoothed RTT (the reference's `DefaultRoundTripTime`).
pub const INITIAL_SRTT: Duration = Duration::from_millis(100);
/// Initial RTO before any sample (the reference's `DefaultTransmissionTimeout`).
pub const INITIAL_RTO: Duration = Duration::from_millis(200);
/// The minimum variance term (the reference's `ClockGranularity`).
pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(10);

/// RTT/RTO state.
#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt: Duration,
    rttvar: Duration,
    /// RTO computed from the last sample, before backoff.
    base_rto: Duration,
    /// Number of consecutive timeouts since the last sample (each doubles the RTO).
    backoff_exponent: u32,
    floor: Duration,
    ceiling: Duration,
    samples: u64,
    latest: Option<Duration>,
}

impl RttEstimator {
    /// A fresh estimator clamped to `[floor, ceiling]` (a ceiling below the floor is raised to it).
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        let ceiling = ceiling.max(floor);
        Self {
            srtt: INITIAL_SRTT,
            rttvar: Duration::ZERO,
            base_rto: INITIAL_RTO.clamp(floor, ceiling),
            backoff_exponent: 0,
            floor,
            ceiling,
            samples: 0,
            latest: None,
        }
    }

    /// Feeds one RTT sample (from a message acked after a single transmission) and resets backoff.
    pub fn on_sample(&mut self, sample: Duration) {
        let delta = self.srtt.abs_diff(sample);
        // RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R|; SRTT <- 7/8 SRTT + 1/8 R
        self.rttvar = self.rttvar * 3 / 4 + delta / 4;
        self.srtt = self.srtt * 7 / 8 + sample / 8;
        let rto = self.srtt + (self.rttvar * 4).max(CLOCK_GRANULARITY);
        self.base_rto = rto.clamp(self.floor, self.ceiling);
        self.backoff_exponent = 0;
        self.samples += 1;
        self.latest = Some(sample);
    }

    /// Records a retransmission timeout: the next RTO doubles (up to the ceiling).
    pub fn on_timeout(&mut self) {
        // 2^16 times any floor is far past any sane ceiling; stop counting there.
        self.backoff_exponent = (self.backoff_exponent + 1).min(16);
    }

    /// The current retransmission timeout, including backoff.
    pub fn rto(&self) -> Duration {
        self.base_rto
            .saturating_mul(1u32 << self.backoff_exponent)
            .min(self.ceiling)
    }

    /// Smoothed RTT.
    pub fn srtt(&self) -> Duration {
        self.srtt
    }

    /// RTT variance.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Number of samples taken.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The most recent sample.
    pub fn latest(&self) -> Option<Duration> {
        self.latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn initial_rto_is_200ms() {
        let e = RttEstimator::new(MS(50), MS(10_000));
        assert_eq!(e.rto(), MS(200));
        assert_eq!(e.srtt(), MS(100));
    }

    #[test]
    fn one_sample_follows_jacobson_karels() {
        let mut e = RttEstimator::new(MS(1), MS(10_000));
        e.on_sample(MS(300));
        // rttvar = 0*3/4 + |100-300|/4 = 50; srtt = 100*7/8 + 300/8 = 87.5 + 37.5 = 125
        assert_eq!(e.rttvar(), MS(50));
        assert_eq!(e.srtt(), MS(125));
        // rto = 125 + max(10, 200) = 325
        assert_eq!(e.rto(), MS(325));
    }

    #[test]
    fn stable_samples_converge_to_srtt_plus_granularity() {
        let mut e = RttEstimator::new(MS(1), MS(10_000));
        for _ in 0..200 {
            e.on_sample(MS(40));
        }
        let srtt = e.srtt().as_secs_f64();
        assert!((srtt - 0.040).abs() < 0.000_5, "srtt {srtt}");
        let rto = e.rto().as_secs_f64();
        assert!((rto - 0.050).abs() < 0.001, "rto {rto}");
    }

    #[test]
    fn floor_and_ceiling_clamp() {
        let mut e = RttEstimator::new(MS(100), MS(400));
        for _ in 0..200 {
            e.on_sample(MS(1));
        }
        assert_eq!(e.rto(), MS(100));
        for _ in 0..5 {
            e.on_sample(MS(5_000));
        }
        assert_eq!(e.rto(), MS(400));
    }

    #[test]
    fn timeouts_double_until_ceiling_and_sample_resets() {
        let mut e = RttEstimator::new(MS(50), MS(1_000));
        assert_eq!(e.rto(), MS(200));
        e.on_timeout();
        assert_eq!(e.rto(), MS(400));
        e.on_timeout();
        assert_eq!(e.rto(), MS(800));
        e.on_timeout();
        assert_eq!(e.rto(), MS(1_000));
        for _ in 0..40 {
            e.on_timeout();
        }
        assert_eq!(e.rto(), MS(1_000));
        e.on_sample(MS(100));
        // srtt 100, rttvar 0 -> 100 + 10
        assert_eq!(e.rto(), MS(110));
    }
}
