//! The operator's own metrics, by StreamJob: reconciles, how long they took, and the failed
//! ones by whether retrying can help. Served in the Prometheus text format at `/metrics` on the
//! operator's health address.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// A StreamJob.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub namespace: String,
    pub name: String,
}

/// A StreamJob and whether the failure is worth retrying.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub namespace: String,
    pub name: String,
    /// `true` or `false`, as [`crate::Error::retryable`] says.
    pub retryable: String,
}

/// The operator's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<JobLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<JobLabels, Histogram>,
}

fn duration_histogram() -> Histogram {
    // 5 ms to about 20 s
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("freshet_operator");
        let reconciles = Family::<JobLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<JobLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "reconciles",
            "Reconcile passes of a StreamJob",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconcile passes that failed, by whether retrying can help",
            failures.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "How long a reconcile pass took",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
        }
    }
}

impl Metrics {
    /// Records one reconcile of `namespace/name`: how long it took and, if it failed, whether
    /// retrying can help.
    pub fn record(&self, namespace: &str, name: &str, took: Duration, failed: Option<bool>) {
        let job = JobLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.reconciles.get_or_create(&job).inc();
        self.duration
            .get_or_create(&job)
            .observe(took.as_secs_f64());
        if let Some(retryable) = failed {
            self.failures
                .get_or_create(&FailureLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    retryable: retryable.to_string(),
                })
                .inc();
        }
    }

    /// Forgets a StreamJob that is gone, so deleted jobs do not stay in the output.
    pub fn forget(&self, namespace: &str, name: &str) {
        let job = JobLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.reconciles.remove(&job);
        self.duration.remove(&job);
        for retryable in ["true", "false"] {
            self.failures.remove(&FailureLabels {
                namespace: namespace.into(),
                name: name.into(),
                retryable: retryable.into(),
            });
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // writing to a String cannot fail
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_failures_are_counted_by_stream_job() {
        let m = Metrics::default();
        m.record("shop", "orders", Duration::from_millis(250), None);
        m.record("shop", "orders", Duration::from_millis(500), Some(true));
        m.record("shop", "sales", Duration::from_millis(10), Some(false));
        let text = m.encode();
        for line in [
            r#"freshet_operator_reconciles_total{namespace="shop",name="orders"} 2"#,
            r#"freshet_operator_reconcile_failures_total{namespace="shop",name="orders",retryable="true"} 1"#,
            r#"freshet_operator_reconcile_failures_total{namespace="shop",name="sales",retryable="false"} 1"#,
            r#"freshet_operator_reconcile_duration_seconds_count{namespace="shop",name="orders"} 2"#,
            r#"freshet_operator_reconcile_duration_seconds_sum{namespace="shop",name="orders"} 0.75"#,
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        m.forget("shop", "orders");
        let text = m.encode();
        assert!(!text.contains(r#"name="orders""#), "{text}");
        assert!(text.contains(r#"name="sales""#), "{text}");
    }
}
