//! The operator's own metrics, by StreamJob (attributes `namespace`, `name`), through the
//! OpenTelemetry API: reconciles, how long they took, and the failed ones by whether retrying
//! can help (`retryable`). Served with the process's other metrics at `/metrics` on the
//! operator's health address, and exported over OTLP when a collector is set.
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Counts of one StreamJob.
#[derive(Default, Clone, Copy)]
struct Counts {
    reconciles: u64,
    /// Failed passes, by whether retrying can help: `[false, true]`.
    failures: [u64; 2],
}

type Jobs = Arc<Mutex<HashMap<(String, String), Counts>>>;

/// The operator's instruments.
pub struct Metrics {
    /// Counts per StreamJob, observed by the counters (so a deleted StreamJob's series go).
    jobs: Jobs,
    duration: Histogram<f64>,
}

fn job(namespace: &str, name: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("namespace", namespace.to_string()),
        KeyValue::new("name", name.to_string()),
    ]
}

impl Default for Metrics {
    /// Instruments of the process's meter provider.
    fn default() -> Self {
        Metrics::new(&opentelemetry::global::meter("freshet"))
    }
}

impl Metrics {
    /// Instruments of `meter`.
    pub fn new(meter: &Meter) -> Metrics {
        let jobs: Jobs = Default::default();
        let all = jobs.clone();
        meter
            .u64_observable_counter("freshet.operator.reconciles")
            .with_unit("{reconcile}")
            .with_description("Reconcile passes of a StreamJob")
            .with_callback(move |o| {
                for ((ns, name), c) in all.lock().iter() {
                    o.observe(c.reconciles, &job(ns, name));
                }
            })
            .build();
        let all = jobs.clone();
        meter
            .u64_observable_counter("freshet.operator.reconcile_failures")
            .with_unit("{reconcile}")
            .with_description("Reconcile passes that failed, by whether retrying can help")
            .with_callback(move |o| {
                for ((ns, name), c) in all.lock().iter() {
                    for (retryable, n) in [(false, c.failures[0]), (true, c.failures[1])] {
                        if n > 0 {
                            let [a, b] = job(ns, name);
                            o.observe(
                                n,
                                &[a, b, KeyValue::new("retryable", retryable.to_string())],
                            );
                        }
                    }
                }
            })
            .build();
        let duration = meter
            .f64_histogram("freshet.operator.reconcile_duration")
            .with_unit("s")
            .with_description("How long a reconcile pass took")
            // 5 ms to about 20 s
            .with_boundaries((0..13).map(|i| 0.005 * 2f64.powi(i)).collect())
            .build();
        Metrics { jobs, duration }
    }

    /// Records one reconcile of `namespace/name`: how long it took and, if it failed, whether
    /// retrying can help.
    pub fn record(&self, namespace: &str, name: &str, took: Duration, failed: Option<bool>) {
        {
            let mut jobs = self.jobs.lock();
            let c = jobs.entry((namespace.into(), name.into())).or_default();
            c.reconciles += 1;
            if let Some(retryable) = failed {
                c.failures[retryable as usize] += 1;
            }
        }
        self.duration
            .record(took.as_secs_f64(), &job(namespace, name));
    }

    /// Forgets a StreamJob that is gone: its reconcile counts leave the output (the duration
    /// histogram keeps its series until the operator restarts; OpenTelemetry cannot drop one).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.jobs
            .lock()
            .remove(&(namespace.to_string(), name.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_failures_are_counted_by_stream_job() {
        let local = freshet_telemetry::LocalMetrics::new();
        let m = Metrics::new(&local.meter());
        m.record("shop", "orders", Duration::from_millis(250), None);
        m.record("shop", "orders", Duration::from_millis(500), Some(true));
        m.record("shop", "sales", Duration::from_millis(10), Some(false));
        let text = local.prometheus_text();
        for line in [
            r#"freshet_operator_reconciles_total{name="orders",namespace="shop"} 2"#,
            r#"freshet_operator_reconcile_failures_total{name="orders",namespace="shop",retryable="true"} 1"#,
            r#"freshet_operator_reconcile_failures_total{name="sales",namespace="shop",retryable="false"} 1"#,
            r#"freshet_operator_reconcile_duration_seconds_count{name="orders",namespace="shop"} 2"#,
            r#"freshet_operator_reconcile_duration_seconds_sum{name="orders",namespace="shop"} 0.75"#,
            r#"freshet_operator_reconcile_duration_seconds_bucket{name="orders",namespace="shop",le="0.32"} 1"#,
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        m.forget("shop", "orders");
        let text = local.prometheus_text();
        assert!(
            !text.contains(r#"freshet_operator_reconciles_total{name="orders""#),
            "{text}"
        );
        assert!(
            text.contains(r#"freshet_operator_reconciles_total{name="sales""#),
            "{text}"
        );
    }
}
