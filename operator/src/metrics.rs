//! The operator's Prometheus metrics, registered on a registry handed in (never the global
//! one). Label values are bounded: error kinds, AWS services and operation names, outcomes and
//! grant states; the one per-grant series (window end) exists once per grant with a window, so it
//! is bounded by the grants themselves and withdrawn when a grant goes.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Reconcile durations, in seconds: from a no-op resync to a slow first apply.
const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    /// Reconcile duration by resource kind.
    pub reconcile_duration: HistogramVec,
    /// Failed reconciles by error kind.
    pub reconcile_errors: IntCounterVec,
    /// AWS calls by service, operation and outcome (`ok` or the error code class).
    pub aws_calls: IntCounterVec,
    /// Grants by state (ready, failed, expired).
    pub grants: IntGaugeVec,
    /// 1 while this replica holds the leader Lease and runs the controllers, else 0.
    pub leader: IntGauge,
    /// Unix time at which a grant's window ends, by grant namespace and name; only for grants
    /// with `spec.window.expiresAt`. The labels are not `namespace`/`name`: a scrape adds the
    /// target pod's `namespace`, which would rename the grant's to `exported_namespace`.
    pub grant_expiry: IntGaugeVec,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "fleet_access_operator_reconcile_duration_seconds",
                "Time to reconcile one object.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "fleet_access_operator_reconcile_errors_total",
                "Reconciles that failed, by error kind.",
            ),
            &["reason"],
        )?;
        let aws_calls = IntCounterVec::new(
            Opts::new(
                "fleet_access_operator_aws_calls_total",
                "AWS API calls by service, operation and outcome.",
            ),
            &["service", "operation", "outcome"],
        )?;
        let grants = IntGaugeVec::new(
            Opts::new(
                "fleet_access_operator_grants",
                "SessionAccess grants by state.",
            ),
            &["state"],
        )?;
        let leader = IntGauge::new(
            "fleet_access_operator_leader",
            "1 while this replica holds the leader Lease and reconciles.",
        )?;
        let grant_expiry = IntGaugeVec::new(
            Opts::new(
                "fleet_access_operator_grant_expiry_timestamp_seconds",
                "Unix time at which a grant's window ends (spec.window.expiresAt); absent for \
                 grants without one.",
            ),
            &["grant_namespace", "grant_name"],
        )?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(grant_expiry.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(aws_calls.clone()))?;
        registry.register(Box::new(grants.clone()))?;
        for reason in crate::error::METRIC_LABELS {
            reconcile_errors.with_label_values(&[reason]);
        }
        Ok(Self {
            reconcile_duration,
            reconcile_errors,
            aws_calls,
            grants,
            leader,
            grant_expiry,
        })
    }

    /// AWS calls so far whose operation changes something (all outcomes).
    pub fn aws_write_calls(&self) -> u64 {
        self.aws_calls_where(crate::aws::is_write)
    }

    /// AWS calls so far, of every kind.
    pub fn aws_calls_total(&self) -> u64 {
        self.aws_calls_where(|_| true)
    }

    fn aws_calls_where(&self, keep: impl Fn(&str) -> bool) -> u64 {
        use prometheus::core::Collector;
        let mut total = 0;
        for family in self.aws_calls.collect() {
            for metric in family.get_metric() {
                let operation = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "operation")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                if keep(&operation) {
                    total += metric.get_counter().get_value() as u64;
                }
            }
        }
        total
    }
}
