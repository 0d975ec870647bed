//! The JobManager's API types: what the HTTP API returns (and the web UI shows), with their JSON
//! Schemas for the OpenAPI document. The gRPC control plane builds its replies from the same
//! views and sends the same checkpoint and counter types.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use freshet_engine::metrics::MetricsSnapshot;

use crate::checkpoints::CheckpointStats;
use crate::{JobHandle, JobManager, JobState};

/// A job in the jobs list.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobOverview {
    /// Its id.
    pub id: String,
    /// Its name (from the definition).
    pub name: String,
    /// `created`, `running`, `restarting`, `finished`, `failed` or `cancelled`.
    pub state: String,
    /// Why it waits or restarts, or why it failed.
    pub message: Option<String>,
    /// Current (or last) attempt.
    pub attempt: u32,
    /// Restarts so far.
    pub restarts: u32,
    /// How long it ran (so far), milliseconds.
    pub duration_ms: u64,
    /// The checkpoint or savepoint the current attempt started from.
    pub restored_from: Option<String>,
    /// The trace id of the current attempt's deployment.
    pub trace_id: Option<String>,
}

/// A job with its graph and live counters.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobDetails {
    /// What the jobs list shows.
    #[serde(flatten)]
    pub overview: JobOverview,
    /// The planned vertices (operator chains), in plan order.
    pub vertices: Vec<VertexDetails>,
    /// The edges between vertices.
    pub edges: Vec<EdgeView>,
    /// Accumulators summed over the current attempt's finished subtasks.
    pub accumulators: BTreeMap<String, i64>,
    /// Processing time the watermark lags are measured against, milliseconds since the epoch.
    pub now_ms: i64,
}

/// One vertex: a chain of operators run by `parallelism` subtasks.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VertexDetails {
    /// Its index in the plan (edges refer to it).
    pub index: usize,
    /// Its name (the chained operators' names).
    pub name: String,
    /// The operators it chains, in order.
    pub operators: Vec<String>,
    /// Number of subtasks.
    pub parallelism: u32,
    /// Counters of all its subtasks added up; its watermarks are the lowest of them.
    pub metrics: MetricsSnapshot,
    /// Rates over the last seconds; ratios are averaged over its subtasks.
    pub rates: Option<SubtaskRates>,
    /// Its subtasks.
    pub subtasks: Vec<SubtaskDetails>,
}

/// One subtask of a vertex.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SubtaskDetails {
    /// Its index.
    pub subtask: u32,
    /// The TaskManager it runs on (current attempt).
    pub taskmanager: Option<String>,
    /// Its counters.
    pub metrics: MetricsSnapshot,
    /// Rates over the last seconds.
    pub rates: Option<SubtaskRates>,
}

/// Rates of a subtask (or a vertex) over the last seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubtaskRates {
    /// The window the rates are measured over, milliseconds.
    pub window_ms: u64,
    /// Records received per second.
    pub records_in_per_s: f64,
    /// Records emitted per second.
    pub records_out_per_s: f64,
    /// Arrow bytes received per second.
    pub bytes_in_per_s: f64,
    /// Arrow bytes emitted per second.
    pub bytes_out_per_s: f64,
    /// Share of the time spent working (0–1).
    pub busy: f64,
    /// Share of the time spent waiting for room downstream (0–1).
    pub backpressured: f64,
    /// Share of the time spent waiting for input (0–1).
    pub idle: f64,
}

/// An edge between two vertices.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EdgeView {
    /// Producer vertex index.
    pub from: usize,
    /// Consumer vertex index.
    pub to: usize,
    /// How batches are spread: `forward`, `rebalance`, `broadcast`, or `hash(k1,k2)`.
    pub partitioning: String,
}

/// A failed attempt of a job.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobException {
    /// When the attempt's fate was decided, milliseconds since the epoch.
    pub time_ms: i64,
    /// The attempt that failed.
    pub attempt: u32,
    /// The root cause: the failing subtask and its error.
    pub error: String,
    /// The delay before the restart, or `None` when the job failed for good.
    pub restart_delay_ms: Option<u64>,
}

/// A job's checkpoint history.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointHistory {
    /// The job's id.
    pub job: String,
    /// Checkpoints and savepoints completed over all attempts.
    pub completed: u64,
    /// Checkpoints and savepoints failed over all attempts.
    pub failed: u64,
    /// The current (or last) attempt's checkpoints and savepoints, newest last.
    pub history: Vec<CheckpointStats>,
}

/// A TaskManager and its slots.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskManagerView {
    /// Its id.
    pub id: String,
    /// Slots it offers.
    pub slots: u32,
    /// Slots in use by running attempts.
    pub slots_used: usize,
    /// Which jobs hold its slots, and how many each.
    pub jobs: BTreeMap<String, usize>,
    /// Its data-plane address (`None` in the JobManager's process).
    pub data_address: Option<String>,
    /// Why it is lost, once it is.
    pub lost: Option<String>,
    /// When the JobManager gave it up, milliseconds since the epoch.
    pub lost_at_ms: Option<i64>,
}

/// The reply to a savepoint or stop request.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SavepointDone {
    /// Where the savepoint is.
    pub path: String,
}

/// The reply to a cancel request.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Cancelled {
    /// The job's id.
    pub cancelled: String,
}

/// Body of a savepoint or stop request.
#[derive(Debug, Default, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SavepointRequest {
    /// Directory to create the savepoint in (default: the job's `checkpointing.savepoint_dir`).
    #[serde(default)]
    pub dir: Option<String>,
}

/// An error reply.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

impl JobOverview {
    /// The overview of a job now.
    pub fn of(j: &JobHandle) -> JobOverview {
        let s = j.status();
        let message = match &s.state {
            JobState::Failed(e) => Some(e.clone()),
            _ => s.message.clone(),
        };
        JobOverview {
            id: j.id.0.clone(),
            name: j.plan().spec.name.clone(),
            state: s.state.name().into(),
            message,
            attempt: s.attempt,
            restarts: s.restarts,
            duration_ms: s.duration.as_millis() as u64,
            restored_from: j.restored_from(),
            trace_id: j.trace_id(),
        }
    }
}

impl JobDetails {
    /// A job's graph with its counters and rates now.
    pub fn of(j: &JobHandle) -> JobDetails {
        let overview = JobOverview::of(j);
        let (metrics, rates) = j.metrics_with_rates();
        let placement = j.placement();
        let plan = j.plan();
        let vertices = plan
            .vertices
            .iter()
            .enumerate()
            .map(|(index, vx)| {
                let subtasks: Vec<SubtaskDetails> = metrics
                    .range((index, 0)..=(index, u32::MAX))
                    .map(|(&(v, i), m)| SubtaskDetails {
                        subtask: i,
                        taskmanager: placement
                            .as_ref()
                            .and_then(|p| p.get(&(v, i)))
                            .map(|l| l.taskmanager.clone()),
                        metrics: *m,
                        rates: rates
                            .as_ref()
                            .and_then(|r| r.subtasks.get(&(v, i)).copied()),
                    })
                    .collect();
                let vertex_rates: Vec<SubtaskRates> =
                    subtasks.iter().filter_map(|s| s.rates).collect();
                VertexDetails {
                    index,
                    name: vx.name.clone(),
                    operators: vx
                        .nodes
                        .iter()
                        .map(|&n| plan.nodes[n].name.clone())
                        .collect(),
                    parallelism: vx.parallelism,
                    metrics: MetricsSnapshot::sum(subtasks.iter().map(|s| &s.metrics)),
                    rates: (!vertex_rates.is_empty()).then(|| SubtaskRates::combine(&vertex_rates)),
                    subtasks,
                }
            })
            .collect();
        let edges = plan
            .edges
            .iter()
            .map(|e| EdgeView {
                from: e.from_vertex,
                to: e.to_vertex,
                partitioning: partitioning_name(&e.partitioning),
            })
            .collect();
        JobDetails {
            overview,
            vertices,
            edges,
            accumulators: j.status().accumulators,
            now_ms: chrono::Utc::now().timestamp_millis(),
        }
    }
}

fn partitioning_name(p: &freshet_engine::partition::Partitioning) -> String {
    use freshet_engine::partition::Partitioning;
    match p {
        Partitioning::Forward => "forward".into(),
        Partitioning::Rebalance => "rebalance".into(),
        Partitioning::Broadcast => "broadcast".into(),
        Partitioning::Hash { key_columns, .. } => format!("hash({})", key_columns.join(",")),
    }
}

impl CheckpointHistory {
    /// A job's checkpoint history now.
    pub fn of(j: &JobHandle) -> CheckpointHistory {
        let totals = j.checkpoint_totals();
        CheckpointHistory {
            job: j.id.0.clone(),
            completed: totals.completed,
            failed: totals.failed,
            history: j.checkpoints(),
        }
    }
}

impl TaskManagerView {
    /// Every TaskManager registered with `jm`, in registration order, then those it lost lately
    /// (newest last) that have not registered again.
    pub fn all(jm: &JobManager) -> Vec<TaskManagerView> {
        let mut in_use = jm.slots_in_use();
        let mut out: Vec<TaskManagerView> = jm
            .taskmanagers()
            .iter()
            .map(|tm| {
                let jobs: BTreeMap<String, usize> = in_use
                    .remove(tm.id())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(job, n)| (job.0, n))
                    .collect();
                TaskManagerView {
                    id: tm.id().to_string(),
                    slots: tm.slots(),
                    slots_used: jobs.values().sum(),
                    jobs,
                    data_address: tm.data_address(),
                    lost: tm.lost(),
                    lost_at_ms: None,
                }
            })
            .collect();
        for gone in jm.lost_taskmanagers() {
            if !out.iter().any(|t| t.id == gone.id) {
                out.push(gone);
            }
        }
        out
    }
}

impl SubtaskRates {
    /// Rates of several subtasks together: their throughputs added up, their time shares
    /// averaged.
    pub fn combine(all: &[SubtaskRates]) -> SubtaskRates {
        let n = all.len().max(1) as f64;
        let mut out = SubtaskRates::default();
        for r in all {
            out.window_ms = out.window_ms.max(r.window_ms);
            out.records_in_per_s += r.records_in_per_s;
            out.records_out_per_s += r.records_out_per_s;
            out.bytes_in_per_s += r.bytes_in_per_s;
            out.bytes_out_per_s += r.bytes_out_per_s;
            out.busy += r.busy / n;
            out.backpressured += r.backpressured / n;
            out.idle += r.idle / n;
        }
        out
    }

    fn between(before: &MetricsSnapshot, after: &MetricsSnapshot, window: Duration) -> Self {
        let secs = window.as_secs_f64();
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let share = |a: u64, b: u64| (a.saturating_sub(b) as f64 / 1e9 / secs).clamp(0.0, 1.0);
        SubtaskRates {
            window_ms: window.as_millis() as u64,
            records_in_per_s: per_s(after.records_in, before.records_in),
            records_out_per_s: per_s(after.records_out, before.records_out),
            bytes_in_per_s: per_s(after.bytes_in, before.bytes_in),
            bytes_out_per_s: per_s(after.bytes_out, before.bytes_out),
            busy: share(after.busy_ns, before.busy_ns),
            backpressured: share(after.backpressured_ns, before.backpressured_ns),
            idle: share(after.idle_ns, before.idle_ns),
        }
    }
}

/// Rates of every subtask of a job.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    /// Per (vertex, subtask).
    pub subtasks: HashMap<(usize, u32), SubtaskRates>,
}

struct Sample {
    at: Instant,
    attempt: u32,
    metrics: BTreeMap<(usize, u32), MetricsSnapshot>,
}

/// Recent counter samples of one job, taken when someone asks for its counters: rates are the
/// difference to the newest sample at least [`RateWindow::SPAN`] old (or the oldest there is).
/// Nothing is sampled while nobody looks. TaskManagers in other processes report counters with
/// their heartbeats, so a window of several heartbeats keeps the rates steady.
#[derive(Default)]
pub struct RateWindow {
    samples: VecDeque<Sample>,
}

impl RateWindow {
    /// The window rates are measured over, when samples that old exist.
    pub const SPAN: Duration = Duration::from_secs(4);
    /// Samples closer together than this are not kept.
    const GAP: Duration = Duration::from_millis(200);

    /// Records the counters of `attempt` at `now` and returns the rates since an earlier sample
    /// of the same attempt (`None` without one at least [`RateWindow::GAP`] old).
    pub fn sample(
        &mut self,
        now: Instant,
        attempt: u32,
        metrics: &BTreeMap<(usize, u32), MetricsSnapshot>,
    ) -> Option<Rates> {
        // a restart's subtasks count from zero again
        self.samples.retain(|s| s.attempt == attempt);
        let base = self
            .samples
            .iter()
            .rev()
            .find(|s| now.duration_since(s.at) >= Self::SPAN)
            .or(self.samples.front())
            .filter(|s| now.duration_since(s.at) >= Self::GAP);
        let rates = base.map(|b| {
            let window = now.duration_since(b.at);
            Rates {
                subtasks: metrics
                    .iter()
                    .filter_map(|(k, m)| {
                        let before = b.metrics.get(k)?;
                        Some((*k, SubtaskRates::between(before, m, window)))
                    })
                    .collect(),
            }
        });
        if self
            .samples
            .back()
            .is_none_or(|s| now.duration_since(s.at) >= Self::GAP)
        {
            self.samples.push_back(Sample {
                at: now,
                attempt,
                metrics: metrics.clone(),
            });
        }
        // keep one sample older than the span, and every newer one
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.duration_since(s.at) >= Self::SPAN)
        {
            self.samples.pop_front();
        }
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(records: u64, busy_ns: u64) -> BTreeMap<(usize, u32), MetricsSnapshot> {
        BTreeMap::from([(
            (0, 0),
            MetricsSnapshot {
                records_in: records,
                busy_ns,
                ..Default::default()
            },
        )])
    }

    #[test]
    fn rates_come_from_a_sample_at_least_the_span_old() {
        let mut w = RateWindow::default();
        let t0 = Instant::now();
        assert!(
            w.sample(t0, 1, &counters(0, 0)).is_none(),
            "no earlier sample"
        );
        // too close to the first sample: no rate yet
        assert!(
            w.sample(t0 + Duration::from_millis(100), 1, &counters(5, 0))
                .is_none()
        );
        let r = w
            .sample(t0 + Duration::from_secs(1), 1, &counters(1000, 500_000_000))
            .expect("rates");
        let s = r.subtasks[&(0, 0)];
        assert_eq!(s.window_ms, 1000);
        assert!((s.records_in_per_s - 1000.0).abs() < 1e-6);
        assert!((s.busy - 0.5).abs() < 1e-9);
        // after the span the baseline moves forward: the rate reflects the last seconds only
        w.sample(t0 + Duration::from_secs(5), 1, &counters(1000, 0));
        let r = w
            .sample(t0 + Duration::from_secs(9), 1, &counters(9000, 0))
            .expect("rates");
        let s = r.subtasks[&(0, 0)];
        assert_eq!(s.window_ms, 4000);
        assert!((s.records_in_per_s - 2000.0).abs() < 1e-6, "{s:?}");
        assert!(w.samples.len() <= 3, "old samples are dropped");
    }

    #[test]
    fn a_new_attempt_starts_without_rates() {
        let mut w = RateWindow::default();
        let t0 = Instant::now();
        w.sample(t0, 1, &counters(5000, 0));
        assert!(
            w.sample(t0 + Duration::from_secs(2), 2, &counters(10, 0))
                .is_none()
        );
        let r = w
            .sample(t0 + Duration::from_secs(3), 2, &counters(110, 0))
            .expect("rates");
        assert!((r.subtasks[&(0, 0)].records_in_per_s - 100.0).abs() < 1e-6);
    }

    #[test]
    fn vertex_rates_add_throughput_and_average_shares() {
        let a = SubtaskRates {
            window_ms: 1000,
            records_in_per_s: 10.0,
            busy: 1.0,
            ..Default::default()
        };
        let b = SubtaskRates {
            window_ms: 1000,
            records_in_per_s: 30.0,
            busy: 0.0,
            backpressured: 0.5,
            ..Default::default()
        };
        let c = SubtaskRates::combine(&[a, b]);
        assert_eq!(c.records_in_per_s, 40.0);
        assert_eq!(c.busy, 0.5);
        assert_eq!(c.backpressured, 0.25);
    }
}
