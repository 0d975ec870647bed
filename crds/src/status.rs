//! What the operator reports in a `StreamJob`'s status. Every step of a change is recorded here
//! before it is taken, so an operator that restarts at any point continues from the status.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::UpgradeMode;

/// The observed state of a `StreamJob`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamJobStatus {
    /// Where the operator is with the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// State of the job on its JobManager (`created`, `running`, `restarting`, `finished`,
    /// `failed`, `cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_state: Option<String>,
    /// Id of the job on its JobManager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The `metadata.generation` of the spec the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Parallelism of the deployed job (the scale subresource reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<i32>,
    /// Label selector of the job's TaskManager pods (the scale subresource reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// What runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<Deployed>,
    /// A change in progress (upgrade, rescale, restart, suspend, resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    /// The newest completed checkpoint of the running job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRecord>,
    /// The newest completed savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_savepoint: Option<SavepointRecord>,
    /// Savepoints taken, oldest first (completed and failed), trimmed by
    /// `spec.savepoints.maxCount` and `maxAge`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub savepoints: Vec<SavepointRecord>,
    /// The `spec.savepointTriggerNonce` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_trigger_nonce: Option<i64>,
    /// When the last periodic savepoint was attempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_periodic_savepoint: Option<Time>,
    /// A requested or periodic savepoint the JobManager is taking: the operator triggers it
    /// and looks for its outcome on later passes, never waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_in_progress: Option<PendingSavepoint>,
    /// The spec of the last deployment whose job proved itself (completed a checkpoint, or
    /// finished): what a failed upgrade rolls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<StableSpec>,
    /// What the change that halted (`UpgradeHalted`) was for: a hash of its spec but
    /// `savepointTriggerNonce`. It is not tried again until the spec changes otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted_target: Option<String>,
    /// `Ready`, `Reconciling`, `UpgradeHalted`, `SpecValid`, `JobFailed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The job's last restart after a failure, as the operator saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<RecoveryRecord>,
}

/// A restart of the job by its JobManager (after a failure), from its latest checkpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryRecord {
    /// The job (a later deployment is another job).
    pub job_id: String,
    /// The job's restarts so far.
    pub restarts: u32,
    /// The snapshot the restarted attempt restored, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// When the operator saw it.
    pub time: Time,
    /// Id of the trace of the restarted attempt's deployment, with each subtask's restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Where the operator is with a job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// Seen, nothing deployed yet.
    Created,
    /// Pods and job being deployed.
    Deploying,
    /// The job runs.
    Running,
    /// A change is being carried out.
    Upgrading,
    /// Stopped on request.
    Suspended,
    /// The job ended by itself (its sources are bounded).
    Finished,
    /// The job failed, or the spec cannot be deployed.
    Failed,
}

impl Lifecycle {
    /// The name the status shows.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Created => "created",
            Lifecycle::Deploying => "deploying",
            Lifecycle::Running => "running",
            Lifecycle::Upgrading => "upgrading",
            Lifecycle::Suspended => "suspended",
            Lifecycle::Finished => "finished",
            Lifecycle::Failed => "failed",
        }
    }
}

/// What runs now.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deployed {
    /// `metadata.generation` of the spec deployed.
    pub generation: i64,
    /// Hash of the spec fields whose change needs a restart.
    pub spec_hash: String,
    /// Parallelism deployed.
    pub parallelism: i32,
    /// `spec.restartNonce` deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_nonce: Option<i64>,
    /// How the job was started: `initial` (first deployment), `savepoint`, `last-state` or
    /// `stateless` (the mode actually used).
    pub started_with: String,
    /// The snapshot it restored, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// When it was submitted.
    pub time: Time,
    /// The spec deployed, as JSON (it becomes `stable` once its job proves itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
    /// When its job proved itself (completed a checkpoint, or finished); until then
    /// the deployment is on probation and a failing upgrade is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Time>,
    /// Id of the trace of the reconcile pass that deployed it: the JobManager's deployment and each
    /// subtask's restore are in it (OpenTelemetry; empty without a collector), to find it in
    /// the tracing backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A spec whose job proved itself.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StableSpec {
    /// Its `metadata.generation`.
    pub generation: i64,
    /// The spec, as JSON.
    pub spec: String,
}

/// A change in progress. It is written before its first step, and each step updates it, so
/// the operator resumes it after a restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// What is changing.
    pub kind: ChangeKind,
    /// `metadata.generation` being carried out.
    pub generation: i64,
    /// Hash of the target spec.
    pub spec_hash: String,
    /// The upgrade mode used.
    pub mode: UpgradeMode,
    /// The current step.
    pub phase: ChangePhase,
    /// The savepoint the old job stopped with (savepoint mode), once taken; for a rollback,
    /// the snapshot the failed upgrade restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<String>,
    /// When it started.
    pub started: Time,
    /// When its new deployment began (after the old job stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploying: Option<Time>,
}

/// What a change does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// New spec (also a rescale, and a changed `restartNonce`).
    Upgrade,
    /// `state: suspended`.
    Suspend,
    /// Back to the stable spec after an upgrade whose job did not prove itself.
    Rollback,
}

/// Step of a change.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ChangePhase {
    /// The old job is being stopped (with a savepoint in savepoint mode).
    Stopping,
    /// The new job is being deployed.
    Deploying,
}

/// A completed checkpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    /// Checkpoint id.
    pub id: i64,
    /// Where it is stored.
    pub path: String,
    /// When it was triggered.
    pub time: Time,
}

/// A savepoint triggered and not yet completed or failed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingSavepoint {
    /// Its id among the job's checkpoints and savepoints.
    pub id: u64,
    /// The job it is of.
    pub job_id: String,
    /// Why it was taken.
    pub trigger: SavepointTrigger,
    /// `spec.savepointTriggerNonce` it answers (manual savepoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<i64>,
    /// When it was triggered.
    pub time: Time,
    /// Id of the trace of the savepoint: the operator's request, the JobManager's savepoint and every
    /// subtask's part (OpenTelemetry; empty without a collector), to find it in
    /// the tracing backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A savepoint the operator took or tried to take.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SavepointRecord {
    /// Why it was taken.
    pub trigger: SavepointTrigger,
    /// `completed` or `failed`.
    pub state: SavepointState,
    /// Where it is stored (completed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// When it completed or failed.
    pub time: Time,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `spec.savepointTriggerNonce` of a manual savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<i64>,
    /// Id of the trace of the savepoint: the operator's request, the JobManager's savepoint and every
    /// subtask's part (OpenTelemetry; empty without a collector), to find it in
    /// the tracing backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Why a savepoint was taken.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SavepointTrigger {
    /// `spec.savepointTriggerNonce` changed.
    Manual,
    /// `spec.savepoints.interval`.
    Periodic,
    /// Before an upgrade, rescale or restart in savepoint mode.
    Upgrade,
    /// Before a suspend in savepoint mode.
    Suspend,
    /// Before the StreamJob is deleted (`deletionPolicy: savepoint`).
    Delete,
}

/// Outcome of a savepoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SavepointState {
    /// Stored.
    Completed,
    /// Not taken.
    Failed,
}
