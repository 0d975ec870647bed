//! The JobManager's metrics, through the OpenTelemetry API: per job (attributes `job_name`, `job_id`; not `job`, which
//! Prometheus gives every series of a scrape target)
//! its state, uptime, restarts, restore time and checkpoints. Observed when a reader collects.
use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use std::sync::Arc;

use crate::JobHandle;
use crate::checkpoints::CheckpointStats;

/// Every job the JobManager knows, at collection time.
pub(crate) type Jobs = Arc<dyn Fn() -> Vec<JobHandle> + Send + Sync>;

fn attributes(j: &JobHandle) -> Vec<KeyValue> {
    vec![
        KeyValue::new("job_name", j.plan().spec.name.clone()),
        KeyValue::new("job_id", j.id.0.clone()),
    ]
}

/// A gauge per job; `None` is not reported.
fn job_gauge(
    meter: &Meter,
    jobs: &Jobs,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    value: fn(&JobHandle) -> Option<f64>,
) {
    let jobs = jobs.clone();
    meter
        .f64_observable_gauge(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |o| {
            for j in jobs() {
                if let Some(v) = value(&j) {
                    o.observe(v, &attributes(&j));
                }
            }
        })
        .build();
}

/// A gauge of the job's newest completed checkpoint.
fn last_checkpoint(
    meter: &Meter,
    jobs: &Jobs,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    value: fn(&CheckpointStats) -> f64,
) {
    let jobs = jobs.clone();
    meter
        .f64_observable_gauge(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |o| {
            for j in jobs() {
                if let Some((last, _)) = j.checkpoint_totals().last {
                    o.observe(value(&last), &attributes(&j));
                }
            }
        })
        .build();
}

/// Registers the JobManager's instruments on `meter`.
pub(crate) fn register(meter: &Meter, jobs: Jobs) {
    let all = jobs.clone();
    meter
        .u64_observable_gauge("freshet.job.state")
        .with_description(
            "1 for a job's current state (attribute `state`: created, running, restarting, finished, failed, cancelled)",
        )
        .with_callback(move |o| {
            for j in all() {
                let mut a = attributes(&j);
                a.push(KeyValue::new("state", j.status().state.name()));
                o.observe(1, &a);
            }
        })
        .build();
    let all = jobs.clone();
    meter
        .u64_observable_counter("freshet.job.restarts")
        .with_unit("{restart}")
        .with_description("Times a job restarted after a failure")
        .with_callback(move |o| {
            for j in all() {
                o.observe(u64::from(j.status().restarts), &attributes(&j));
            }
        })
        .build();
    for (name, description, completed) in [
        (
            "freshet.job.checkpoints.completed",
            "Checkpoints and savepoints completed",
            true,
        ),
        (
            "freshet.job.checkpoints.failed",
            "Checkpoints and savepoints that failed (declined, timed out, fenced)",
            false,
        ),
    ] {
        let all = jobs.clone();
        meter
            .u64_observable_counter(name)
            .with_unit("{checkpoint}")
            .with_description(description)
            .with_callback(move |o| {
                for j in all() {
                    let t = j.checkpoint_totals();
                    o.observe(
                        if completed { t.completed } else { t.failed },
                        &attributes(&j),
                    );
                }
            })
            .build();
    }
    job_gauge(
        meter,
        &jobs,
        "freshet.job.uptime",
        "s",
        "Time since the job was submitted (until it ended)",
        |j| Some(j.status().duration.as_secs_f64()),
    );
    job_gauge(
        meter,
        &jobs,
        "freshet.job.restore_time",
        "s",
        "How long the current attempt's slowest subtask took to open and restore its state (restored attempts only)",
        |j| {
            j.restored_from()?;
            let slowest = j.metrics().values().map(|m| m.open_ns).max()?;
            (slowest > 0).then(|| slowest as f64 / 1e9)
        },
    );
    job_gauge(
        meter,
        &jobs,
        "freshet.job.checkpoint.age",
        "s",
        "Time since the job's newest checkpoint completed",
        |j| {
            let (_, at) = j.checkpoint_totals().last?;
            Some(at.elapsed().as_secs_f64())
        },
    );
    last_checkpoint(
        meter,
        &jobs,
        "freshet.job.checkpoint.duration",
        "s",
        "Duration of the newest completed checkpoint, trigger to completion",
        |c| c.duration_ms as f64 / 1e3,
    );
    last_checkpoint(
        meter,
        &jobs,
        "freshet.job.checkpoint.alignment",
        "s",
        "Longest barrier alignment of any subtask in the newest completed checkpoint",
        |c| c.alignment_ms as f64 / 1e3,
    );
    last_checkpoint(
        meter,
        &jobs,
        "freshet.job.checkpoint.size",
        "By",
        "Size of the whole state the newest completed checkpoint covers",
        |c| c.full_bytes as f64,
    );
    last_checkpoint(
        meter,
        &jobs,
        "freshet.job.checkpoint.incremental_size",
        "By",
        "Bytes uploaded for the newest completed checkpoint",
        |c| c.uploaded_bytes as f64,
    );
}
