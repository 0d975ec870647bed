//! The control plane's vocabulary, shared by the JobManager and the TaskManagers: the messages
//! they exchange ([`messages`]), the [`TaskManagerGateway`] a JobManager reaches a TaskManager
//! through, and the protocol form those messages take between processes ([`wire`]).
#![warn(missing_docs)]

pub mod messages;
pub mod wire;

use freshet_engine::checkpoint::S3Options;
use freshet_job::JobSpec;

pub use messages::{
    CheckpointSetup, JobId, Placement, SubtaskLocation, SubtaskStatus, TaskDeployment, TaskEvent,
    TaskManagerGateway, TaskState,
};

/// The S3 settings of a job's checkpointing section, with the credentials it refers to read
/// in this process (the job holds only where they are). The error names the reference.
pub fn s3_options(spec: &JobSpec) -> Result<S3Options, String> {
    let s3 = spec
        .checkpointing
        .as_ref()
        .map(|c| c.s3.clone())
        .unwrap_or_default();
    let resolve = |field: &str, r: Option<freshet_job::SecretRef>| {
        r.map(|r| r.resolve())
            .transpose()
            .map_err(|e| format!("checkpointing.s3.{field}: {e}"))
    };
    Ok(S3Options {
        endpoint: s3.endpoint,
        region: s3.region,
        access_key_id: resolve("access_key_id", s3.access_key_id)?,
        secret_access_key: resolve("secret_access_key", s3.secret_access_key)?,
    })
}
