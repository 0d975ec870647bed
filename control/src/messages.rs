//! The messages between the JobManager and TaskManagers. In one process they travel over
//! channels; between processes the same messages travel over the control-plane RPC.
use std::collections::HashMap;
use std::sync::Arc;

use freshet_engine::checkpoint::{
    RestoreSource, S3Options, Storage, SubtaskCommand, SubtaskReport,
};
use freshet_engine::metrics::MetricsSnapshot;
use freshet_engine::state::StateConfig;
use freshet_plan::Plan;

/// Identifies a submitted job.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct JobId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// "Run subtask `subtask` of vertex `vertex` of this job."
#[derive(Debug, Clone)]
pub struct TaskDeployment {
    /// The job.
    pub job: JobId,
    /// Execution attempt (restarts increment it; channels of different attempts never mix).
    pub attempt: u32,
    /// The attempt's physical plan, as the JobManager made it.
    pub plan: Arc<Plan>,
    /// Vertex index in the plan.
    pub vertex: usize,
    /// Subtask index.
    pub subtask: u32,
    /// Keyed-state settings; `local_dir` is the root under which the TaskManager makes the
    /// attempt's working directory.
    pub state: StateConfig,
    /// Where checkpoints go; `None` when the job takes none.
    pub checkpoints: Option<CheckpointSetup>,
    /// The checkpoint or savepoint the job starts from.
    pub restore: Option<Arc<RestoreSource>>,
    /// Where every subtask of the attempt runs.
    pub placement: Arc<Placement>,
    /// The `traceparent` of the JobManager's span of this deployment.
    pub trace: Option<String>,
}

/// Where a subtask runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubtaskLocation {
    /// TaskManager id.
    pub taskmanager: String,
    /// Its data-plane address (`None` for TaskManagers in the JobManager's process, which share
    /// in-memory channels).
    pub data_address: Option<String>,
}

/// Where every subtask of a job attempt runs, by (vertex, subtask).
pub type Placement = HashMap<(usize, u32), SubtaskLocation>;

/// The checkpoint storage of a job.
#[derive(Debug, Clone)]
pub struct CheckpointSetup {
    /// The job's checkpoint root.
    pub storage: Storage,
    /// S3 settings for savepoint targets.
    pub s3: S3Options,
}

/// Where a subtask is in its life.
#[derive(Debug, Clone)]
pub enum TaskState {
    /// Deployed and running.
    Running,
    /// Finished: its inputs ended and everything was flushed.
    Finished {
        /// Final counters.
        metrics: MetricsSnapshot,
        /// Accumulators of its operators.
        accumulators: Vec<(String, i64)>,
    },
    /// Failed with an error.
    Failed {
        /// What went wrong.
        error: String,
        /// False when the subtask failed only because a subtask it sends to went away.
        root_cause: bool,
        /// Whether a restart may succeed (false for failures that would repeat).
        retryable: bool,
        /// The snapshot this attempt restored is damaged: restarts must not use it.
        damaged_snapshot: bool,
        /// Its counters when it failed (`None` when the subtask is gone without a report).
        metrics: Option<MetricsSnapshot>,
    },
    /// Stopped because the job was cancelled.
    Cancelled {
        /// Its counters when it stopped (`None` from a TaskManager that does not send them).
        metrics: Option<MetricsSnapshot>,
    },
    /// Not a change of state: a report about a checkpoint (acknowledgement, decline, or a
    /// source that reached the end of its input).
    Checkpoint(SubtaskReport),
}

impl TaskState {
    /// A failure outside the subtask (its TaskManager lost, unreachable, or refusing the
    /// deployment): the root cause, retryable, without counters.
    pub fn lost(error: String) -> TaskState {
        TaskState::Failed {
            error,
            root_cause: true,
            retryable: true,
            damaged_snapshot: false,
            metrics: None,
        }
    }
}

/// A TaskManager's report about one subtask.
#[derive(Debug, Clone)]
pub struct TaskEvent {
    /// The job.
    pub job: JobId,
    /// Attempt.
    pub attempt: u32,
    /// Vertex index.
    pub vertex: usize,
    /// Subtask index.
    pub subtask: u32,
    /// New state.
    pub state: TaskState,
}

/// Live counters of one running subtask.
#[derive(Debug, Clone)]
pub struct SubtaskStatus {
    /// Vertex index.
    pub vertex: usize,
    /// Subtask index.
    pub subtask: u32,
    /// Counters.
    pub metrics: MetricsSnapshot,
}

/// What the JobManager needs from a TaskManager.
pub trait TaskManagerGateway: Send + Sync {
    /// Its id.
    fn id(&self) -> &str;
    /// Number of slots it offers.
    fn slots(&self) -> u32;
    /// Starts a subtask. Progress is reported as [`TaskEvent`]s.
    fn deploy(&self, deployment: TaskDeployment) -> Result<(), String>;
    /// Cancels every subtask of a job.
    fn cancel(&self, job: &JobId);
    /// Passes a command to a running subtask (false if it is not running here).
    fn command(&self, job: &JobId, vertex: usize, subtask: u32, cmd: SubtaskCommand) -> bool;
    /// Counters of a job's subtasks running here.
    fn metrics(&self, job: &JobId) -> Vec<SubtaskStatus>;
    /// Its data-plane address, for TaskManagers in other processes.
    fn data_address(&self) -> Option<String> {
        None
    }
    /// Why it is lost (missed heartbeats, unreachable), once it is.
    fn lost(&self) -> Option<String> {
        None
    }
}
