//! The parts of a `StreamJob` spec, with their schema and validation rules.
use k8s_openapi::api::core::v1::ResourceRequirements;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// TaskManager pods.
#[derive(kube::KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskManagersSpec {
    /// Number of TaskManager pods; by default as many as the parallelism needs
    /// (`ceil(parallelism / slots)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1").message("spec.taskManagers.replicas must be at least 1"))]
    pub replicas: Option<i32>,
    /// Task slots per TaskManager (slot k runs subtask k of every operator).
    #[serde(default = "one")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 256").message("spec.taskManagers.slots must be between 1 and 256"))]
    pub slots: i32,
    /// CPU and memory of each TaskManager container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for TaskManagersSpec {
    fn default() -> Self {
        TaskManagersSpec {
            replicas: None,
            slots: 1,
            resources: None,
        }
    }
}

fn one() -> i32 {
    1
}

/// The JobManager pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JobManagerSpec {
    /// CPU and memory of the JobManager container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Checkpoints.
#[derive(kube::KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointingSpec {
    /// Time between checkpoints (a duration such as `10s` or `1m30s`).
    #[serde(default = "ten_seconds")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('100ms')").message("spec.checkpointing.interval must be a duration of at least 100ms, such as 10s"))]
    pub interval: String,
    /// Where checkpoints, savepoints (by default) and the JobManager's high-availability
    /// records go: `s3://bucket/prefix`, or an absolute path on a volume every pod mounts.
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('s3://') || self.startsWith('/')").message("spec.checkpointing.storage must be an s3:// URI or an absolute path"))]
    pub storage: String,
    /// Completed checkpoints kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1").message("spec.checkpointing.retain must be at least 1"))]
    pub retain: Option<i32>,
    /// S3 settings, for `s3://` storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Spec>,
}

impl Default for CheckpointingSpec {
    fn default() -> Self {
        CheckpointingSpec {
            interval: ten_seconds(),
            storage: String::new(),
            retain: None,
            s3: None,
        }
    }
}

fn ten_seconds() -> String {
    "10s".into()
}

/// How the pods reach S3.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// Endpoint of an S3-compatible service (by default AWS for the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A Secret in the job's namespace with the keys `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (without it, the pods' own identity is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Savepoints.
#[derive(kube::KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SavepointsSpec {
    /// Where savepoints go; by default `<checkpointing.storage>/savepoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('s3://') || self.startsWith('/')").message("spec.savepoints.directory must be an s3:// URI or an absolute path"))]
    pub directory: Option<String>,
    /// Take a savepoint this often (a duration such as `6h`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1m')").message("spec.savepoints.interval must be a duration of at least 1m, such as 6h"))]
    pub interval: Option<String>,
    /// Completed savepoints kept in the history (older ones are deleted); 10 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1").message("spec.savepoints.maxCount must be at least 1"))]
    pub max_count: Option<i32>,
    /// Savepoints older than this are deleted (a duration such as `168h`); kept by default.
    /// The newest completed savepoint is always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) > duration('0s')").message("spec.savepoints.maxAge must be a positive duration, such as 168h"))]
    pub max_age: Option<String>,
}

/// How a running job is carried over a change that needs a restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeMode {
    /// Stop with a savepoint, start from it. If the savepoint fails, the change halts and the
    /// job keeps running.
    #[default]
    Savepoint,
    /// Cancel, start from the latest completed checkpoint.
    LastState,
    /// Cancel, start with empty state.
    Stateless,
}

impl UpgradeMode {
    /// The name users write.
    pub fn name(self) -> &'static str {
        match self {
            UpgradeMode::Savepoint => "savepoint",
            UpgradeMode::LastState => "last-state",
            UpgradeMode::Stateless => "stateless",
        }
    }
}

/// What deleting a StreamJob does to its running job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeletionPolicy {
    /// Stop the job with a savepoint first; the StreamJob stays (with a warning event) while
    /// the savepoint fails, until it succeeds or the policy is set to `none`.
    #[default]
    Savepoint,
    /// Delete without a final savepoint (the latest savepoints and checkpoints stay stored).
    None,
}

/// Rolling back an upgrade whose job does not prove itself. A new deployment is on probation
/// until its job completes a checkpoint (or finishes). If, on probation, the job fails,
/// restarts more than `maxRestarts` times, or `timeout` passes, the operator cancels it and
/// deploys the last spec whose job proved itself, restoring the savepoint or checkpoint the
/// upgrade restored; the new spec is not tried again until it changes.
#[derive(kube::KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollbackSpec {
    /// Roll back a failed upgrade (true by default); when false, the failed job is reported
    /// and left as it is.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long a new deployment has to prove itself (a duration, `5m` by default). Allow for
    /// the pods to start, the state to be restored and one checkpoint interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) > duration('0s')").message("spec.rollback.timeout must be a positive duration, such as 5m"))]
    pub timeout: Option<String>,
    /// Restarts of the new job on probation that count as failing (3 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 0").message("spec.rollback.maxRestarts must not be negative"))]
    pub max_restarts: Option<i32>,
}

impl Default for RollbackSpec {
    fn default() -> Self {
        RollbackSpec {
            enabled: true,
            timeout: None,
            max_restarts: None,
        }
    }
}

/// Whether the job should run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredState {
    /// Deployed and running.
    #[default]
    Running,
    /// Stopped as `upgradeMode` says, pods removed; setting `running` again resumes it.
    Suspended,
}

/// Image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull if the node does not have it.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn name(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Schema of `spec.job`: an object with at least one source and one sink; the rest of it is
/// checked by the operator when it validates the job (its errors name the field, as
/// `freshet validate` does).
pub fn job_document(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "The job definition: the same document `freshet run` takes.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["sources", "sinks"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "sources": {"type": "object", "minProperties": 1, "x-kubernetes-preserve-unknown-fields": true},
            "sinks": {"type": "object", "minProperties": 1, "x-kubernetes-preserve-unknown-fields": true}
        }
    })
}

/// Schema of `spec.podTemplate`: a pod template, kept as given.
pub fn pod_template(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "A pod template (metadata and spec) merged into every pod of the job.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Telemetry of the job's pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObservabilitySpec {
    /// The OTLP collector the JobManager and TaskManagers export metrics and traces to
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`), e.g. `http://otel-collector.monitoring:4317`. Without
    /// it, the operator's own (its `--otlp-endpoint`) if it has one; `none` exports nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The OTLP protocol: `grpc` or `http/protobuf` (with the endpoint, else the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Annotate the pods for Prometheus (`prometheus.io/scrape`, `prometheus.io/port`,
    /// `prometheus.io/path`: `/metrics` on the health port). On unless set to `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_scrape: Option<bool>,
}

/// An OTLP transport.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// Its name, as `OTEL_EXPORTER_OTLP_PROTOCOL` spells it.
    pub fn name(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// TLS and authentication of the job's pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecuritySpec {
    /// Mutual TLS between the JobManager and TaskManagers (control and data plane), TLS and
    /// a bearer token for clients of the JobManager. On unless set to `false`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and `ca.crt`, as cert-manager
    /// writes them; the certificate must be valid for the DNS name `freshet-internal`, for
    /// server and client use. Without it the operator makes `<name>-tls`, with a CA of the
    /// job's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    /// A Secret whose key `token` holds the bearer tokens clients must send (one per line).
    /// Without it the operator makes `<name>-token` with a random one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
}

impl Default for SecuritySpec {
    fn default() -> Self {
        SecuritySpec {
            enabled: true,
            tls_secret: None,
            token_secret: None,
        }
    }
}

fn yes() -> bool {
    true
}
