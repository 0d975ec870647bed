//! The JobManager: plans jobs into parallel subtasks, schedules them into TaskManager slots and
//! follows them to completion.
//!
//! - `freshet_plan`: job definition → the physical plan (vertices, edges, recipes) the
//!   JobManager makes once per submission and ships in every deployment.
//! - `freshet_control` (re-exported as [`messages`]): what the JobManager and TaskManagers say
//!   to each other, and the [`TaskManagerGateway`] a TaskManager is reached through.
//! - [`jobmanager`]: submission, slot-sharing scheduling, job status and cancellation.
//! - `alignment`: watermark alignment: sources of a group pause while ahead of the slowest
//!   other one by more than the group's drift.
//! - [`checkpoints`]: the checkpoint coordinator: triggers, acknowledgements, metadata,
//!   retention and cleanup of checkpoint storage.
//! - [`api`]: the typed views of jobs, vertices, checkpoints, exceptions and TaskManagers the
//!   HTTP API and the gRPC control plane return, and the rates derived from counter samples.
//! - [`http`]: the HTTP API (JSON, with an OpenAPI document) and the web UI on top of it.
//! - `metrics`: the JobManager's OpenTelemetry instruments (job state, restarts, checkpoints).
//! - [`ui`]: the web UI's embedded assets.
//! - [`rpc`]: the gRPC control plane: the JobManager service TaskManagers and clients call, and
//!   the gateway to TaskManagers in other processes.
//! - [`store`]: jobs kept in object storage, so another JobManager can resume them.
//! - [`leader`]: leader election with a fencing epoch between JobManagers.
#![warn(missing_docs)]

mod alignment;
pub mod api;
pub mod checkpoints;
pub mod http;
pub mod jobmanager;
pub mod leader;
mod metrics;
pub mod rpc;
mod splits;
pub mod store;
pub mod ui;

pub use freshet_control::messages;
pub use freshet_control::{
    JobId, TaskDeployment, TaskEvent, TaskManagerGateway, TaskState, s3_options,
};
pub use jobmanager::{JobHandle, JobManager, JobState, JobStatus, SubmitError, SubmitOptions};
