//! The TaskManager's metrics, through the OpenTelemetry API: every running subtask's counters
//! (attributes `job_name`, `job_id`, `vertex`, `subtask`, `taskmanager`), its keyed state's size, and
//! the TaskManager's slots, state memory and data-plane bytes. All are observed when a reader
//! collects, from the counters the subtasks bump once per batch.
use opentelemetry::KeyValue;
use opentelemetry::metrics::{AsyncInstrument, Meter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use freshet_control::JobId;
use freshet_engine::metrics::{MetricsSnapshot, StateSize, SubtaskMetrics};
use freshet_engine::state::StateMemory;

use crate::taskmanager::{Memories, PlanMap, Running, TaskKey};

/// What the callbacks read: weak references, so a dropped TaskManager reports nothing.
pub(crate) struct Observed {
    pub id: String,
    pub slots: u32,
    pub running: Weak<Mutex<HashMap<TaskKey, Running>>>,
    pub plans: Weak<PlanMap>,
    pub memory: Weak<Memories>,
}

/// One running subtask at collection time.
struct Subtask {
    attributes: Vec<KeyValue>,
    snapshot: MetricsSnapshot,
    metrics: Arc<SubtaskMetrics>,
}

impl Observed {
    fn subtasks(&self) -> Vec<Subtask> {
        let (Some(running), Some(plans)) = (self.running.upgrade(), self.plans.upgrade()) else {
            return Vec::new();
        };
        let names: HashMap<JobId, Arc<freshet_plan::Plan>> = plans
            .lock()
            .iter()
            .filter_map(|(j, e)| e.plan.clone().map(|p| (j.clone(), p)))
            .collect();
        running
            .lock()
            .iter()
            .map(|((job, v, s), r)| {
                let plan = names.get(job);
                let job_name = plan.map_or_else(|| job.0.clone(), |p| p.spec.name.clone());
                let vertex = plan
                    .and_then(|p| p.vertices.get(*v))
                    .map_or_else(|| v.to_string(), |x| x.name.clone());
                Subtask {
                    attributes: vec![
                        KeyValue::new("job_name", job_name),
                        KeyValue::new("job_id", job.0.clone()),
                        KeyValue::new("vertex", vertex),
                        KeyValue::new("subtask", i64::from(*s)),
                        KeyValue::new("taskmanager", self.id.clone()),
                    ],
                    snapshot: r.metrics.snapshot(),
                    metrics: r.metrics.clone(),
                }
            })
            .collect()
    }

    fn memories(&self) -> Vec<Arc<StateMemory>> {
        self.memory.upgrade().map_or_else(Vec::new, |m| {
            m.lock().values().filter_map(Weak::upgrade).collect()
        })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A counter of each subtask, from its snapshot.
fn counter(
    meter: &Meter,
    observed: &Arc<Observed>,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    value: fn(&MetricsSnapshot) -> f64,
) {
    let o = observed.clone();
    let callback = move |obs: &dyn AsyncInstrument<f64>| {
        for s in o.subtasks() {
            obs.observe(value(&s.snapshot), &s.attributes);
        }
    };
    meter
        .f64_observable_counter(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(callback)
        .build();
}

/// A gauge of each subtask; `None` is not reported (a watermark before the first).
fn gauge(
    meter: &Meter,
    observed: &Arc<Observed>,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    value: fn(&Subtask) -> Option<i64>,
) {
    let o = observed.clone();
    meter
        .i64_observable_gauge(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |obs| {
            for s in o.subtasks() {
                if let Some(v) = value(&s) {
                    obs.observe(v, &s.attributes);
                }
            }
        })
        .build();
}

/// A counter of each subtask with keyed state in RocksDB, from its state's counters.
fn state_counter(
    meter: &Meter,
    observed: &Arc<Observed>,
    name: &'static str,
    description: &'static str,
    value: fn(&StateSize) -> u64,
) {
    let o = observed.clone();
    meter
        .u64_observable_counter(name)
        .with_unit("{access}")
        .with_description(description)
        .with_callback(move |obs| {
            for s in o.subtasks() {
                let size = s.metrics.state_size();
                if size != StateSize::default() {
                    obs.observe(value(&size), &s.attributes);
                }
            }
        })
        .build();
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn watermark(ms: i64) -> Option<i64> {
    (ms != i64::MIN && ms != i64::MAX).then_some(ms)
}

/// Registers the TaskManager's instruments on `meter`.
pub(crate) fn register(meter: &Meter, observed: Observed) {
    let o = Arc::new(observed);
    counter(
        meter,
        &o,
        "freshet.task.records_in",
        "{record}",
        "Records a subtask received",
        |m| m.records_in as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.records_out",
        "{record}",
        "Records a subtask sent on its main output",
        |m| m.records_out as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.records_written",
        "{record}",
        "Records a sink subtask wrote",
        |m| m.records_written as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.input",
        "By",
        "Bytes of the Arrow arrays a subtask received",
        |m| m.bytes_in as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.output",
        "By",
        "Bytes of the Arrow arrays a subtask sent on its main output",
        |m| m.bytes_out as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.late_records",
        "{record}",
        "Records that arrived behind the watermark",
        |m| m.late_records as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.dead_letters",
        "{record}",
        "Records routed to a dead-letter output",
        |m| m.dead_letters as f64,
    );
    counter(
        meter,
        &o,
        "freshet.task.busy_time",
        "s",
        "Time a subtask spent working",
        |m| secs(m.busy_ns),
    );
    counter(
        meter,
        &o,
        "freshet.task.backpressured_time",
        "s",
        "Time a subtask spent blocked on a full output channel",
        |m| secs(m.backpressured_ns),
    );
    counter(
        meter,
        &o,
        "freshet.task.idle_time",
        "s",
        "Time a subtask spent waiting for input",
        |m| secs(m.idle_ns),
    );
    counter(
        meter,
        &o,
        "freshet.task.aligned_time",
        "s",
        "Time a source subtask spent paused by watermark alignment, ahead of its group",
        |m| secs(m.aligned_ns),
    );
    gauge(
        meter,
        &o,
        "freshet.task.input_watermark",
        "ms",
        "A subtask's combined input watermark (a source's: the one it emitted), epoch milliseconds",
        |s| watermark(s.snapshot.watermark),
    );
    gauge(
        meter,
        &o,
        "freshet.task.output_watermark",
        "ms",
        "The watermark a subtask last sent downstream, epoch milliseconds",
        |s| watermark(s.snapshot.output_watermark),
    );
    gauge(
        meter,
        &o,
        "freshet.task.watermark_lag",
        "ms",
        "Wall-clock time minus a subtask's input watermark",
        |s| watermark(s.snapshot.watermark).map(|w| now_ms().saturating_sub(w)),
    );
    gauge(
        meter,
        &o,
        "freshet.task.state.rows",
        "{row}",
        "Rows of a subtask's keyed state in RocksDB (estimated)",
        |s| {
            let size = s.metrics.state_size();
            (size != Default::default()).then_some(size.rows as i64)
        },
    );
    gauge(
        meter,
        &o,
        "freshet.task.state.disk",
        "By",
        "Bytes of a subtask's keyed-state files on local disk",
        |s| {
            let size = s.metrics.state_size();
            (size != Default::default()).then_some(size.disk_bytes as i64)
        },
    );
    let lags = o.clone();
    meter
        .i64_observable_gauge("freshet.source.split.lag")
        .with_unit("{record}")
        .with_description(
            "Records a source split (a Kafka partition) has beyond the subtask's position",
        )
        .with_callback(move |obs| {
            for s in lags.subtasks() {
                for (split, lag) in s.metrics.split_lags() {
                    let mut attributes = s.attributes.clone();
                    attributes.push(KeyValue::new("split", split));
                    obs.observe(lag, &attributes);
                }
            }
        })
        .build();
    state_counter(
        meter,
        &o,
        "freshet.task.state.cache.lookups",
        "Accesses of a subtask's keyed-state caches in front of RocksDB",
        |size| size.cache_lookups,
    );
    state_counter(
        meter,
        &o,
        "freshet.task.state.cache.misses",
        "Accesses of a subtask's keyed-state caches that read RocksDB",
        |size| size.cache_misses,
    );
    let tm = [KeyValue::new("taskmanager", o.id.clone())];
    let (t, obs) = (tm.clone(), o.clone());
    meter
        .u64_observable_gauge("freshet.taskmanager.slots")
        .with_unit("{slot}")
        .with_description("Slots the TaskManager offers")
        .with_callback(move |x| x.observe(u64::from(obs.slots), &t))
        .build();
    let (t, obs) = (tm.clone(), o.clone());
    meter
        .u64_observable_gauge("freshet.taskmanager.subtasks")
        .with_unit("{subtask}")
        .with_description("Subtasks running on the TaskManager (several share a slot)")
        .with_callback(move |x| {
            if let Some(r) = obs.running.upgrade() {
                x.observe(r.lock().len() as u64, &t);
            }
        })
        .build();
    let (t, obs) = (tm.clone(), o.clone());
    meter
        .u64_observable_gauge("freshet.taskmanager.rocksdb.memory")
        .with_unit("By")
        .with_description("Bytes RocksDB's block caches hold, memtables included")
        .with_callback(move |x| {
            let bytes: usize = obs.memories().iter().map(|m| m.rocksdb()).sum();
            x.observe(bytes as u64, &t);
        })
        .build();
    let (t, obs) = (tm.clone(), o.clone());
    meter
        .u64_observable_gauge("freshet.taskmanager.state_cache.memory")
        .with_unit("By")
        .with_description("Bytes the decoded-key state caches hold (estimated)")
        .with_callback(move |x| {
            let bytes: usize = obs.memories().iter().map(|m| m.decoded()).sum();
            x.observe(bytes as u64, &t);
        })
        .build();
    for (name, description, sent) in [
        (
            "freshet.taskmanager.network.sent",
            "Bytes the data plane sent to other TaskManagers",
            true,
        ),
        (
            "freshet.taskmanager.network.received",
            "Bytes the data plane received from other TaskManagers",
            false,
        ),
    ] {
        let t = tm.clone();
        meter
            .u64_observable_counter(name)
            .with_unit("By")
            .with_description(description)
            .with_callback(move |x| {
                let (s, r) = crate::network::bytes_transferred();
                x.observe(if sent { s } else { r }, &t);
            })
            .build();
    }
}
