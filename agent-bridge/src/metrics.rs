//! The bridge's Prometheus metrics, registered on a registry passed down from `main` (never the
//! global default). Label values are bounded: phase, document, outcome, direction, reason. Instance
//! IDs and session IDs go to log spans, not labels.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::protocol::Stats;

/// Metric name prefix.
const NAMESPACE: &str = "agent_bridge";

/// Setup phases, in order; `total` spans from the client's connect to the first byte.
pub const PHASES: [&str; 5] = [
    "start_session",
    "websocket_connect",
    "handshake",
    "first_byte",
    "total",
];

/// Buckets for setup phases: 1 ms to 30 s, denser where sessions usually set up (10 ms–2 s).
const SETUP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets for session durations: a second to a day.
const DURATION_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0];

/// Buckets for acknowledgement round trips: 100 µs to 10 s.
const RTT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Why connections are refused before a session starts (`connections_refused_total`'s label),
/// each counted from zero.
pub const REFUSAL_REASONS: [&str; 7] = [
    "limit_total",
    "limit_namespace",
    "limit_instance",
    "memory_budget",
    "memory_budget_namespace",
    "client_not_admitted",
    "endpoint_closed",
];

/// What the bridge watches in Kubernetes (`watch_failures_total`'s label), each counted from
/// zero.
pub const WATCHES: [&str; 4] = ["services", "pods", "network_policies", "namespaces"];

/// How a session ended, as a bounded label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The client or the instance closed it normally.
    Closed,
    /// The bridge terminated it (shutdown, endpoint removed, timeout).
    Terminated,
    /// StartSession failed.
    StartFailed,
    /// The data channel failed (connect, handshake, reconnect budget).
    ChannelFailed,
    /// The instance refused the port.
    PortRefused,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 5] = [
        Outcome::Closed,
        Outcome::Terminated,
        Outcome::StartFailed,
        Outcome::ChannelFailed,
        Outcome::PortRefused,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Terminated => "terminated",
            Outcome::StartFailed => "start_failed",
            Outcome::ChannelFailed => "channel_failed",
            Outcome::PortRefused => "port_refused",
        }
    }
}

/// Everything the bridge exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    setup: HistogramVec,
    started: IntCounterVec,
    ended: IntCounterVec,
    refused: IntCounterVec,
    active: IntGauge,
    bytes: IntCounterVec,
    duration: Histogram,
    retransmissions: IntCounter,
    reconnects: IntCounter,
    ack_rtt: Histogram,
    endpoints: IntGauge,
    watch_failures: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let hopts = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help)
                .namespace(NAMESPACE)
                .buckets(buckets.to_vec())
        };
        let metrics = Self {
            setup: HistogramVec::new(
                hopts(
                    "session_setup_seconds",
                    "Session setup latency by phase, each from the end of the one before: start_session (the StartSession call), websocket_connect (until the agent's first frame), handshake (until HandshakeComplete), first_byte (until the first byte from the instance); total spans the client's connect to the first byte.",
                    SETUP_BUCKETS,
                ),
                &["phase"],
            )?,
            started: IntCounterVec::new(
                opts(
                    "sessions_started_total",
                    "Sessions started, by session document.",
                ),
                &["document"],
            )?,
            ended: IntCounterVec::new(
                opts(
                    "sessions_ended_total",
                    "Sessions ended, by session document and outcome (closed, terminated, start_failed, channel_failed, port_refused).",
                ),
                &["document", "outcome"],
            )?,
            refused: IntCounterVec::new(
                opts(
                    "connections_refused_total",
                    "Client connections refused before a session started, by reason (limit_total, limit_namespace, limit_instance, memory_budget, memory_budget_namespace, client_not_admitted, endpoint_closed).",
                ),
                &["reason"],
            )?,
            active: IntGauge::with_opts(opts("sessions_active", "Sessions open now."))?,
            bytes: IntCounterVec::new(
                opts(
                    "transferred_bytes_total",
                    "Payload bytes carried, by direction (to_instance, from_instance).",
                ),
                &["direction"],
            )?,
            duration: Histogram::with_opts(hopts(
                "session_duration_seconds",
                "How long sessions lasted.",
                DURATION_BUCKETS,
            ))?,
            retransmissions: IntCounter::with_opts(opts(
                "retransmissions_total",
                "Data-channel messages sent again for lack of an acknowledgement.",
            ))?,
            reconnects: IntCounter::with_opts(opts(
                "reconnects_total",
                "Data-channel WebSockets restored with ResumeSession.",
            ))?,
            ack_rtt: Histogram::with_opts(hopts(
                "ack_rtt_seconds",
                "Smoothed acknowledgement round-trip time of each session when it ended.",
                RTT_BUCKETS,
            ))?,
            endpoints: IntGauge::with_opts(opts(
                "endpoints",
                "Listeners open now, one per instance and port.",
            ))?,
            watch_failures: IntCounterVec::new(
                opts(
                    "watch_failures_total",
                    "Failed requests of the bridge's Kubernetes watches, each retried with back-off, by what is watched (services, pods, network_policies, namespaces): while a watch fails, the bridge judges by what it last saw.",
                ),
                &["watch"],
            )?,
        };
        registry.register(Box::new(metrics.setup.clone()))?;
        registry.register(Box::new(metrics.started.clone()))?;
        registry.register(Box::new(metrics.ended.clone()))?;
        registry.register(Box::new(metrics.refused.clone()))?;
        registry.register(Box::new(metrics.active.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.retransmissions.clone()))?;
        registry.register(Box::new(metrics.reconnects.clone()))?;
        registry.register(Box::new(metrics.ack_rtt.clone()))?;
        registry.register(Box::new(metrics.endpoints.clone()))?;
        registry.register(Box::new(metrics.watch_failures.clone()))?;
        for phase in PHASES {
            metrics.setup.with_label_values(&[phase]);
        }
        for direction in ["to_instance", "from_instance"] {
            metrics.bytes.with_label_values(&[direction]);
        }
        for reason in REFUSAL_REASONS {
            metrics.refused.with_label_values(&[reason]);
        }
        for watch in WATCHES {
            metrics.watch_failures.with_label_values(&[watch]);
        }
        Ok(metrics)
    }

    /// Starts the session counters of `document` at zero, for every outcome: a counter series
    /// that first appears at 1 shows no increase to `rate()` and `increase()`, so the first
    /// session (or failure) of a document would be lost to the dashboard and the alerts.
    pub fn expect_document(&self, document: &str) {
        self.started.with_label_values(&[document]);
        for outcome in Outcome::ALL {
            self.ended.with_label_values(&[document, outcome.label()]);
        }
    }

    /// Records one setup phase.
    pub fn observe_setup(&self, phase: &'static str, took: Duration) {
        self.setup
            .with_label_values(&[phase])
            .observe(took.as_secs_f64());
    }

    /// A session started.
    pub fn session_started(&self, document: &str) {
        self.started.with_label_values(&[document]).inc();
        self.active.inc();
    }

    /// A session that [`Metrics::session_started`] counted ended; `stats` are its final counters.
    pub fn session_ended(&self, document: &str, outcome: Outcome, lasted: Duration, stats: &Stats) {
        self.active.dec();
        self.ended
            .with_label_values(&[document, outcome.label()])
            .inc();
        self.duration.observe(lasted.as_secs_f64());
        self.record_traffic(stats);
        if stats.rtt_samples > 0 {
            self.ack_rtt.observe(stats.srtt.as_secs_f64());
        }
    }

    /// A session that never started (StartSession failed).
    pub fn session_failed_to_start(&self, document: &str) {
        self.ended
            .with_label_values(&[document, Outcome::StartFailed.label()])
            .inc();
    }

    /// Adds a finished session's traffic.
    fn record_traffic(&self, stats: &Stats) {
        self.bytes
            .with_label_values(&["to_instance"])
            .inc_by(stats.bytes_sent);
        self.bytes
            .with_label_values(&["from_instance"])
            .inc_by(stats.bytes_received);
        self.retransmissions.inc_by(stats.retransmissions);
        self.reconnects.inc_by(stats.reconnects);
    }

    /// A connection was refused before it became a session.
    pub fn connection_refused(&self, reason: &'static str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// The counter of the failures of the watch of `watch` (one of [`WATCHES`]).
    pub fn watch_failures(&self, watch: &'static str) -> IntCounter {
        self.watch_failures.with_label_values(&[watch])
    }

    /// The number of open listeners.
    pub fn set_endpoints(&self, count: usize) {
        self.endpoints.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

/// The registry's content in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Encoding gathered families into a String cannot fail.
    let _ = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_shows_in_the_text_format() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        metrics.session_started("AWS-StartSSHSession");
        metrics.observe_setup("total", Duration::from_millis(20));
        let stats = Stats {
            bytes_sent: 10,
            bytes_received: 32,
            retransmissions: 2,
            ..Stats::default()
        };
        metrics.session_ended(
            "AWS-StartSSHSession",
            Outcome::Closed,
            Duration::from_secs(3),
            &stats,
        );
        let text = encode(&registry);
        assert!(text.contains(r#"agent_bridge_sessions_ended_total{document="AWS-StartSSHSession",outcome="closed"} 1"#), "{text}");
        assert!(
            text.contains(r#"agent_bridge_transferred_bytes_total{direction="from_instance"} 32"#)
        );
        assert!(text.contains("agent_bridge_sessions_active 0"));
        assert!(text.contains("agent_bridge_retransmissions_total 2"));
        assert!(text.contains(r#"agent_bridge_session_setup_seconds_count{phase="total"} 1"#));
    }

    #[test]
    fn registering_twice_on_one_registry_fails() {
        let registry = Registry::new();
        Metrics::register(&registry).unwrap();
        assert!(Metrics::register(&registry).is_err());
    }
}
