//! The `StreamJob` custom resource (`freshet.dev/v1alpha1`): what a user applies with kubectl,
//! and what the operator reports back in its status.
//!
//! The spec holds the job definition (the same document `freshet run` takes) and how to run it:
//! image, parallelism, TaskManagers, checkpoint storage, upgrade mode, savepoint policy, nonces
//! and the desired state. Validation happens at apply time: the schema types every field, and CEL
//! rules (`x-kubernetes-validations`) check values, each with a message naming the field.
//!
//! `crds/streamjob.yaml` is the CustomResourceDefinition generated from these types
//! ([`crd_yaml`]); a test fails when it drifts from them. Regenerate it with
//! `freshet crd > crds/streamjob.yaml`.
// the derive's printer columns repeat `type_ = ...`, which this lint mistakes for duplicates
#![allow(clippy::duplicated_attributes)]
use kube::CustomResource;
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub mod spec;
pub mod status;

pub use spec::*;
pub use status::*;

/// The API group of Freshet's resources.
pub const GROUP: &str = "freshet.dev";

/// The desired state of a streaming job on Kubernetes.
#[derive(
    CustomResource, kube::KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default,
)]
#[kube(
    group = "freshet.dev",
    derive = "Default",
    version = "v1alpha1",
    kind = "StreamJob",
    namespaced,
    status = "StreamJobStatus",
    shortname = "sj",
    category = "freshet",
    doc = "A Freshet streaming job: its definition, how to run it, and how to change it safely",
    scale(
        spec_replicas_path = ".spec.parallelism",
        status_replicas_path = ".status.parallelism",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Lifecycle",
        type_ = "string",
        json_path = ".status.lifecycle",
        description = "Where the operator is with the job"
    ),
    printcolumn(
        name = "Job",
        type_ = "string",
        json_path = ".status.jobState",
        description = "State of the job on its JobManager"
    ),
    printcolumn(
        name = "Parallelism",
        type_ = "integer",
        json_path = ".spec.parallelism"
    ),
    printcolumn(
        name = "Last Savepoint",
        type_ = "date",
        json_path = ".status.lastSavepoint.time",
        description = "Age of the newest completed savepoint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = kube::core::Rule::new("!has(self.taskManagers) || !has(self.taskManagers.replicas) || self.taskManagers.replicas * (has(self.taskManagers.slots) ? self.taskManagers.slots : 1) >= self.parallelism").message("spec.taskManagers.replicas × spec.taskManagers.slots must be at least spec.parallelism"))]
#[serde(rename_all = "camelCase")]
pub struct StreamJobSpec {
    /// The job definition: the same document `freshet run` takes (sources, transforms, sinks).
    /// The operator sets its parallelism and checkpoint settings from this resource.
    #[schemars(schema_with = "spec::job_document")]
    pub job: serde_json::Value,
    /// Container image with the `freshet` binary, for the JobManager and the TaskManagers.
    #[x_kube(validation = kube::core::Rule::new("self.size() > 0").message("spec.image must name a container image"))]
    pub image: String,
    /// Image pull policy of every container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Parallelism of every operator that does not set its own (the scale subresource).
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 32768").message("spec.parallelism must be between 1 and 32768"))]
    pub parallelism: i32,
    /// TaskManager pods.
    #[serde(default)]
    pub task_managers: TaskManagersSpec,
    /// The JobManager pod.
    #[serde(default)]
    pub job_manager: JobManagerSpec,
    /// Checkpoints: how often and where.
    pub checkpointing: CheckpointingSpec,
    /// Savepoints: where, how often, how many are kept.
    #[serde(default)]
    pub savepoints: SavepointsSpec,
    /// How a running job is carried over a change that needs a restart.
    #[serde(default)]
    pub upgrade_mode: UpgradeMode,
    /// Change it (to any value) to take a savepoint now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_trigger_nonce: Option<i64>,
    /// Change it (to any value) to restart the job, carried over as `upgradeMode` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_nonce: Option<i64>,
    /// A savepoint or checkpoint to start from when the job is first deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_savepoint_path: Option<String>,
    /// Restore even if the snapshot holds state of operators the job no longer has (that state
    /// is dropped).
    #[serde(default)]
    pub allow_non_restored_state: bool,
    /// `running` or `suspended` (the job is stopped as `upgradeMode` says; pods are removed).
    #[serde(default)]
    pub state: DesiredState,
    /// What deleting the StreamJob does to a running job: `savepoint` (the default) stops it
    /// with a final savepoint before the StreamJob goes; `none` deletes it without one.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// What happens when the job of an upgrade does not prove itself: by default the operator
    /// rolls back to the last spec whose job did, from the state the upgrade started with.
    #[serde(default)]
    pub rollback: RollbackSpec,
    /// TLS and authentication: on by default, with certificates and a token the operator
    /// makes unless Secrets are named.
    #[serde(default)]
    pub security: SecuritySpec,
    /// Where the job's pods send metrics and traces, and whether Prometheus scrapes them.
    #[serde(default)]
    pub observability: ObservabilitySpec,
    /// A pod template merged into the JobManager and TaskManager pods (labels, annotations,
    /// tolerations, node selectors, extra containers or volumes; containers merge by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "spec::pod_template")]
    pub pod_template: Option<serde_json::Value>,
}

/// The CustomResourceDefinition as YAML, as checked in at `crds/streamjob.yaml`.
pub fn crd_yaml() -> String {
    let crd = StreamJob::crd();
    format!(
        "# Generated from the Rust types in crds/src; do not edit. Regenerate with:\n#   freshet crd > crds/streamjob.yaml\n{}",
        serde_yaml::to_string(&crd).expect("a CRD serialises")
    )
}
