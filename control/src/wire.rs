//! The protocol (protobuf) form of the messages the JobManager and TaskManagers exchange.
use freshet_proto::{self as pb, task_event};

use crate::messages::{JobId, TaskDeployment, TaskEvent, TaskState};

/// `v` as JSON bytes (counters, checkpoint reports and definitions travel as JSON).
pub fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializable")
}

/// JSON bytes as a `T`; the error names `what` was being read.
pub fn from_json<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| format!("{what}: {e}"))
}

/// A task event as sent on the wire.
pub fn event_to_proto(ev: &TaskEvent) -> pb::TaskEvent {
    let state = match &ev.state {
        TaskState::Running => task_event::State::Running(pb::Empty {}),
        TaskState::Finished {
            metrics,
            accumulators,
        } => task_event::State::Finished(pb::TaskFinished {
            metrics: json(metrics),
            accumulators: accumulators.iter().cloned().collect(),
        }),
        TaskState::Failed {
            error,
            root_cause,
            retryable,
            damaged_snapshot,
            metrics,
        } => task_event::State::Failed(pb::TaskFailed {
            error: error.clone(),
            root_cause: *root_cause,
            retryable: *retryable,
            damaged_snapshot: *damaged_snapshot,
            metrics: metrics.as_ref().map(json).unwrap_or_default(),
        }),
        TaskState::Cancelled { metrics: None } => task_event::State::Cancelled(pb::Empty {}),
        TaskState::Cancelled {
            metrics: Some(metrics),
        } => task_event::State::CancelledWithCounters(pb::TaskCancelled {
            metrics: json(metrics),
        }),
        TaskState::Checkpoint(r) => task_event::State::Checkpoint(json(r)),
    };
    pb::TaskEvent {
        job: ev.job.0.clone(),
        attempt: ev.attempt,
        vertex: ev.vertex as u32,
        subtask: ev.subtask,
        state: Some(state),
    }
}

/// A task event received on the wire; the error says what is wrong with it.
pub fn event_from_proto(ev: pb::TaskEvent) -> Result<TaskEvent, String> {
    let state = match ev.state {
        None => return Err("task event without a state".into()),
        Some(task_event::State::Running(_)) => TaskState::Running,
        Some(task_event::State::Finished(f)) => TaskState::Finished {
            metrics: from_json(&f.metrics, "metrics")?,
            accumulators: f.accumulators.into_iter().collect(),
        },
        Some(task_event::State::Failed(f)) => TaskState::Failed {
            metrics: if f.metrics.is_empty() {
                None
            } else {
                Some(from_json(&f.metrics, "metrics")?)
            },
            error: f.error,
            root_cause: f.root_cause,
            retryable: f.retryable,
            damaged_snapshot: f.damaged_snapshot,
        },
        Some(task_event::State::Cancelled(_)) => TaskState::Cancelled { metrics: None },
        Some(task_event::State::CancelledWithCounters(c)) => TaskState::Cancelled {
            metrics: Some(from_json(&c.metrics, "metrics")?),
        },
        Some(task_event::State::Checkpoint(c)) => {
            TaskState::Checkpoint(from_json(&c, "checkpoint report")?)
        }
    };
    Ok(TaskEvent {
        job: JobId(ev.job),
        attempt: ev.attempt,
        vertex: ev.vertex as usize,
        subtask: ev.subtask,
        state,
    })
}

/// A deployment as sent on the wire.
pub fn deployment_to_proto(d: &TaskDeployment, epoch: u64) -> pb::DeployRequest {
    let mut placement: Vec<_> = d
        .placement
        .iter()
        .map(|((v, i), l)| pb::SubtaskLocation {
            vertex: *v as u32,
            subtask: *i,
            taskmanager_id: l.taskmanager.clone(),
            data_address: l.data_address.clone().unwrap_or_default(),
        })
        .collect();
    placement.sort_by_key(|l| (l.vertex, l.subtask));
    pb::DeployRequest {
        leader_epoch: epoch,
        job: d.job.0.clone(),
        attempt: d.attempt,
        plan: d.plan.to_json(),
        vertex: d.vertex as u32,
        subtask: d.subtask,
        checkpoint_storage: d
            .checkpoints
            .as_ref()
            .map(|c| c.storage.url().to_string())
            .unwrap_or_default(),
        restore: d
            .restore
            .as_ref()
            .map(|r| r.location.clone())
            .unwrap_or_default(),
        restore_shared: d.restore.as_ref().is_some_and(|r| r.shared_with_job),
        placement,
        state_dir: d.state.local_dir.to_string_lossy().into_owned(),
        trace: d.trace.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_engine::metrics::MetricsSnapshot;

    /// Every state a TaskManager reports arrives as it was sent.
    #[test]
    fn task_events_survive_the_wire() {
        let states = [
            TaskState::Running,
            TaskState::Finished {
                metrics: MetricsSnapshot {
                    records_in: 7,
                    watermark: 42,
                    ..Default::default()
                },
                accumulators: vec![("rows".into(), -3)],
            },
            TaskState::Failed {
                error: "disk full".into(),
                root_cause: true,
                retryable: true,
                damaged_snapshot: false,
                metrics: Some(MetricsSnapshot {
                    records_in: 5,
                    ..Default::default()
                }),
            },
            TaskState::lost("TaskManager tm-1 lost".into()),
            TaskState::Cancelled { metrics: None },
            TaskState::Cancelled {
                metrics: Some(MetricsSnapshot {
                    records_out: 9,
                    ..Default::default()
                }),
            },
        ];
        for state in states {
            let ev = TaskEvent {
                job: JobId("j-1".into()),
                attempt: 3,
                vertex: 2,
                subtask: 1,
                state,
            };
            let back = event_from_proto(event_to_proto(&ev)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{ev:?}"));
        }
        let empty = pb::TaskEvent {
            state: None,
            ..Default::default()
        };
        assert!(
            event_from_proto(empty)
                .unwrap_err()
                .contains("without a state")
        );
    }
}
