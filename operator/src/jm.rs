//! The operator's client of a job's JobManager (its gRPC control plane): submit, query, cancel,
//! savepoints and their disposal.
use serde::Deserialize;
use std::time::Duration;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use freshet_proto as pb;
use freshet_proto::job_manager_client::JobManagerClient;
use freshet_security::ClientToken;
use freshet_security::net::Dialer;

use crate::Error;

/// A connection to one JobManager.
#[derive(Clone)]
pub struct JobManager {
    addr: String,
    client: JobManagerClient<InterceptedService<Channel, ClientToken>>,
}

/// How the operator reaches a job's JobManager: through TLS with the job's CA and with its
/// bearer token, or (security off) plainly.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Makes the connection.
    pub dialer: Dialer,
    /// Sent with every call.
    pub token: ClientToken,
}

/// A checkpoint or savepoint as the JobManager lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    /// Id.
    pub id: u64,
    /// `checkpoint` or `savepoint`.
    pub kind: String,
    /// `in_progress`, `completed` or `failed`.
    pub status: String,
    /// Trigger time, milliseconds since the epoch.
    pub trigger_time_ms: i64,
    /// Where it is stored (completed only).
    #[serde(default)]
    pub path: Option<String>,
    /// Why it failed (failed only).
    #[serde(default)]
    pub failure: Option<String>,
    /// A stop-with-savepoint.
    #[serde(default)]
    pub stop: bool,
}

impl Snapshot {
    /// A completed one of `kind`.
    pub fn completed(&self, kind: &str) -> bool {
        self.kind == kind && self.status == "completed" && self.path.is_some()
    }
}

/// An error and its causes, `: `-separated (a transport error alone says little).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// States in which a job will not run again by itself.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "finished" | "failed" | "cancelled")
}

/// The longest the operator waits for an answer of a JobManager (savepoints are triggered,
/// not waited for, so no call needs long).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl JobManager {
    /// Connects to the JobManager at `addr` (`host:port`).
    pub async fn connect(addr: &str, access: &Access) -> Result<JobManager, Error> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::JobManager(format!("cannot reach the JobManager at {addr}: {e}"))
        };
        let endpoint = access
            .dialer
            .endpoint(addr)
            .map_err(|e| unreachable(&e))?
            .connect_timeout(Duration::from_secs(3))
            // a JobManager that accepts connections but does not answer (frozen, partitioned
            // mid-call) fails the pass, which is tried again, instead of holding it forever
            .timeout(REQUEST_TIMEOUT);
        let channel = access
            .dialer
            .connect(endpoint)
            .await
            .map_err(|e| unreachable(&with_causes(&e)))?;
        Ok(JobManager {
            addr: addr.to_string(),
            client: JobManagerClient::with_interceptor(channel, access.token.clone())
                .max_decoding_message_size(64 << 20),
        })
    }

    fn fail(&self, what: &str, s: tonic::Status) -> Error {
        Error::JobManager(format!("{what} at {}: {}", self.addr, s.message()))
    }

    /// Every job the JobManager knows.
    pub async fn jobs(&self) -> Result<Vec<pb::JobInfo>, Error> {
        let mut c = self.client.clone();
        c.list_jobs(pb::Empty {})
            .await
            .map(|r| r.into_inner().jobs)
            .map_err(|s| self.fail("listing jobs", s))
    }

    /// Job `id`, or `None` if the JobManager does not know it.
    pub async fn job(&self, id: &str) -> Result<Option<pb::JobInfo>, Error> {
        let mut c = self.client.clone();
        match c.get_job(pb::JobRef { job: id.into() }).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.fail("reading the job", s)),
        }
    }

    /// Submits a job. A refused definition is a spec error (it names the field).
    pub async fn submit(&self, req: pb::SubmitJobRequest) -> Result<pb::JobInfo, Error> {
        let mut c = self.client.clone();
        match c.submit_job(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if s.code() == Code::InvalidArgument => Err(Error::Spec(s.message().into())),
            Err(s) => Err(self.fail("submitting the job", s)),
        }
    }

    /// Asks the JobManager whether it would accept `req`, without submitting it: `Ok(None)` if
    /// so, `Ok(Some(reason))` if it refuses the job or the snapshot to restore, an error if it
    /// could not be asked. A JobManager too old to know the call accepts everything.
    pub async fn check(&self, req: pb::SubmitJobRequest) -> Result<Option<String>, Error> {
        let mut c = self.client.clone();
        match c.check_job(req).await {
            Ok(_) => Ok(None),
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                Ok(Some(s.message().to_string()))
            }
            Err(s) if s.code() == Code::Unimplemented => Ok(None),
            Err(s) => Err(self.fail("checking the job", s)),
        }
    }

    /// Cancels job `id` (waits up to 30 s for it to end).
    pub async fn cancel(&self, id: &str) -> Result<pb::JobInfo, Error> {
        let mut c = self.client.clone();
        c.cancel_job(pb::JobRef { job: id.into() })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.fail("cancelling the job", s))
    }

    /// Triggers a savepoint of job `id` into `directory` (stopping the job after it if `stop`)
    /// and returns its id at once; its outcome shows in [`JobManager::snapshots`]. A refusal
    /// (the job is not running, a stop is already in progress) is [`Error::Savepoint`].
    pub async fn trigger_savepoint(
        &self,
        id: &str,
        directory: &str,
        stop: bool,
    ) -> Result<u64, Error> {
        let mut c = self.client.clone();
        c.trigger_savepoint(pb::SavepointRequest {
            job: id.into(),
            directory: directory.into(),
            stop,
            detach: true,
        })
        .await
        .map(|r| r.into_inner().id)
        .map_err(|s| match s.code() {
            Code::FailedPrecondition | Code::NotFound => Error::Savepoint(s.message().to_string()),
            _ => self.fail("triggering a savepoint", s),
        })
    }

    /// The checkpoints and savepoints of job `id`, oldest first.
    pub async fn snapshots(&self, id: &str) -> Result<Vec<Snapshot>, Error> {
        let mut c = self.client.clone();
        let list = c
            .list_checkpoints(pb::JobRef { job: id.into() })
            .await
            .map_err(|s| self.fail("listing checkpoints", s))?
            .into_inner();
        let mut out: Vec<Snapshot> = list
            .checkpoints
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect();
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Deletes the savepoint at `location`.
    pub async fn dispose(&self, location: &str) -> Result<(), Error> {
        let mut c = self.client.clone();
        c.dispose_savepoint(pb::DisposeSavepointRequest {
            location: location.into(),
        })
        .await
        .map(|_| ())
        .map_err(|s| self.fail("deleting a savepoint", s))
    }
}
