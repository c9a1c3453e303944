//! Outgoing message pacing: a token bucket that keeps the data channel under the gateway's
//! ~1000 messages per second (docs/protocol.md §8; exceeding it closes the socket).
//! Pure: time is an argument.

use std::time::{Duration, Instant};

/// Default rate: 10% under the observed ~1000 msg/s limit (GIM paces at 900).
pub const DEFAULT_MESSAGES_PER_SECOND: u32 = 900;
/// Default burst: enough for a handful of acks plus a chunk run without waiting.
pub const DEFAULT_BURST: u32 = 50;

/// A token bucket over messages.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Duration,
    burst: u32,
    tokens: f64,
    updated: Instant,
}

impl Pacer {
    /// `rate` messages per second on average, with up to `burst` back to back.
    pub fn new(now: Instant, rate: u32, burst: u32) -> Self {
        let burst = burst.max(1);
        Self {
            interval: Duration::from_secs(1) / rate.max(1),
            burst,
            tokens: f64::from(burst),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated);
        self.tokens = (self.tokens + elapsed.as_secs_f64() / self.interval.as_secs_f64())
            .min(f64::from(self.burst));
        self.updated = now;
    }

    /// When the next message may go (now or later).
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.interval.mul_f64(1.0 - self.tokens)
        }
    }

    /// Records one message sent at `now`.
    pub fn consume(&mut self, now: Instant) {
        self.refill(now);
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    #[test]
    fn burst_then_steady_rate() {
        let t0 = origin();
        let mut p = Pacer::new(t0, 1000, 3);
        for _ in 0..3 {
            assert_eq!(p.ready_at(t0), t0);
            p.consume(t0);
        }
        let next = p.ready_at(t0);
        assert_eq!(next, t0 + Duration::from_millis(1));
        // Over one simulated second, at most rate + burst messages go out.
        let mut now = t0;
        let mut sent = 3;
        while now < t0 + Duration::from_secs(1) {
            now = p.ready_at(now);
            if now >= t0 + Duration::from_secs(1) {
                break;
            }
            p.consume(now);
            sent += 1;
        }
        assert!((1000..=1003).contains(&sent), "{sent}");
    }
}
