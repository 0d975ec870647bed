//! The JobManager: plans jobs into parallel subtasks, schedules them into TaskManager slots and
//! follows them to completion.
//!
//! - [`plan`]: job definition → logical graph → chains (vertices) and edges. TaskManagers run the
//!   same planning, so a deployment only names a vertex and a subtask.
//! - [`messages`]: what the JobManager and TaskManagers say to each other, and the
//!   [`TaskManagerGateway`](messages::TaskManagerGateway) a TaskManager is reached through.
//! - [`jobmanager`]: submission, slot-sharing scheduling, job status and cancellation.
//! - [`checkpoints`]: the checkpoint coordinator: triggers, acknowledgements, metadata,
//!   retention and cleanup of checkpoint storage.
//! - [`http`]: the JSON API (jobs, checkpoints, savepoints, stop) the CLI talks to.
#![warn(missing_docs)]

pub mod checkpoints;
pub mod http;
pub mod jobmanager;
pub mod messages;
pub mod plan;

pub use jobmanager::{JobHandle, JobManager, JobState, JobStatus, SubmitError, SubmitOptions};
pub use messages::{JobId, TaskDeployment, TaskEvent, TaskManagerGateway, TaskState};
pub use plan::{JobPlan, plan};
