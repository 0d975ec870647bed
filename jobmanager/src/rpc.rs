//! The gRPC control plane on the JobManager's side: the `JobManager` service that TaskManagers
//! and clients call, and [`RemoteTaskManager`], the gateway to a TaskManager in another process.
//!
//! Requests to a TaskManager (deploy, cancel, checkpoint commands) go through one queue per
//! TaskManager and are sent in order by one task, so a checkpoint trigger never overtakes the
//! deployment it refers to. Heartbeats go both ways: TaskManagers send theirs with live
//! counters; the JobManager pings each TaskManager. A TaskManager is lost after
//! `heartbeat_timeout` without a heartbeat from it, or after three pings in a row fail.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use freshet_engine::checkpoint::S3Options;
use freshet_job::JobSpec;
use freshet_proto as pb;
use freshet_proto::job_manager_server::{JobManager as JobManagerRpc, JobManagerServer};
use freshet_proto::task_manager_client::TaskManagerClient;
use freshet_security::net::ClientAuth;
use freshet_security::{Guard, Security};

use crate::api::JobDetails;
use crate::{
    JobHandle, JobId, JobManager, SubmitError, SubmitOptions, TaskDeployment, TaskEvent,
    TaskManagerGateway, TaskState,
};
use freshet_control::SubtaskStatus;
use freshet_control::wire::{deployment_to_proto, event_from_proto, from_json, json};

/// Heartbeat settings.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeats {
    /// Time between heartbeats.
    pub interval: Duration,
    /// A peer silent for this long is lost.
    pub timeout: Duration,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

enum Op {
    Deploy(Box<pb::DeployRequest>),
    Cancel(pb::CancelJobRequest),
    Command(pb::CommandRequest),
}

/// A TaskManager in another process, reached over gRPC.
pub struct RemoteTaskManager {
    id: String,
    slots: u32,
    data_address: String,
    epoch: u64,
    ops: mpsc::UnboundedSender<Op>,
    last_heartbeat: Mutex<Instant>,
    failed_pings: AtomicU32,
    heartbeats: Heartbeats,
    lost: Mutex<Option<String>>,
    metrics: Mutex<Vec<(JobId, u32, SubtaskStatus)>>,
    attempts: Mutex<HashMap<JobId, u32>>,
}

impl RemoteTaskManager {
    /// A gateway to the TaskManager registered with `req`; requests are sent from tasks on
    /// `runtime`. Deployment failures are reported on `events`.
    pub fn start(
        req: &pb::RegisterTaskManagerRequest,
        epoch: u64,
        heartbeats: Heartbeats,
        runtime: &tokio::runtime::Handle,
        events: crossbeam_channel::Sender<TaskEvent>,
        dialer: &freshet_security::net::Dialer,
    ) -> Arc<RemoteTaskManager> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Op>();
        let tm = Arc::new(RemoteTaskManager {
            id: req.taskmanager_id.clone(),
            slots: req.slots,
            data_address: req.data_address.clone(),
            epoch,
            ops: tx,
            last_heartbeat: Mutex::new(Instant::now()),
            failed_pings: AtomicU32::new(0),
            heartbeats,
            lost: Mutex::new(None),
            metrics: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
        });
        // a bad address fails every deployment to it with the reason, like an unreachable one
        let endpoint = dialer.endpoint(&req.control_address).unwrap_or_else(|_| {
            tonic::transport::Endpoint::from_static("http://invalid.invalid:1")
        });
        let channel = dialer.connect_lazy(endpoint.connect_timeout(Duration::from_secs(5)));
        let client = TaskManagerClient::new(channel);
        let weak = Arc::downgrade(&tm);
        let mut c = client.clone();
        runtime.spawn(async move {
            while let Some(op) = rx.recv().await {
                match op {
                    Op::Deploy(d) => {
                        let (job, attempt, vertex, subtask) = (
                            JobId(d.job.clone()),
                            d.attempt,
                            d.vertex as usize,
                            d.subtask,
                        );
                        if let Err(s) = c.deploy(*d).await {
                            let _ = events.send(TaskEvent {
                                job,
                                attempt,
                                vertex,
                                subtask,
                                state: TaskState::lost(format!("deploying: {}", s.message())),
                            });
                        }
                    }
                    Op::Cancel(r) => {
                        if let Err(s) = c.cancel_job(r).await {
                            debug!(error = %s.message(), "cancel request failed");
                        }
                    }
                    Op::Command(r) => {
                        if let Err(s) = c.command(r).await {
                            debug!(error = %s.message(), "command request failed");
                        }
                    }
                }
            }
        });
        let mut c = client;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(heartbeats.interval).await;
                let Some(tm) = weak.upgrade() else { return };
                if tm.lost.lock().is_some() {
                    return;
                }
                let ping = c
                    .job_manager_heartbeat(pb::JobManagerHeartbeatRequest {
                        leader_epoch: tm.epoch,
                    })
                    .await;
                match ping {
                    Ok(r) if r.get_ref().known => {
                        tm.failed_pings.store(0, Ordering::Relaxed);
                    }
                    Ok(_) => tm.mark_lost("it no longer knows this JobManager".into()),
                    Err(s) => {
                        let n = tm.failed_pings.fetch_add(1, Ordering::Relaxed) + 1;
                        if n >= 3 {
                            tm.mark_lost(format!("unreachable: {}", s.message()));
                        }
                    }
                }
            }
        });
        tm
    }

    fn mark_lost(&self, why: String) {
        let mut lost = self.lost.lock();
        if lost.is_none() {
            *lost = Some(why);
        }
    }

    /// Records a heartbeat with the TaskManager's live counters.
    pub fn heartbeat(&self, metrics: Vec<(JobId, u32, SubtaskStatus)>) {
        *self.last_heartbeat.lock() = Instant::now();
        *self.metrics.lock() = metrics;
    }

    fn send(&self, op: Op) {
        let _ = self.ops.send(op);
    }
}

impl TaskManagerGateway for RemoteTaskManager {
    fn id(&self) -> &str {
        &self.id
    }

    fn slots(&self) -> u32 {
        self.slots
    }

    fn deploy(&self, d: TaskDeployment) -> Result<(), String> {
        self.attempts.lock().insert(d.job.clone(), d.attempt);
        self.send(Op::Deploy(Box::new(deployment_to_proto(&d, self.epoch))));
        Ok(())
    }

    fn cancel(&self, job: &JobId) {
        self.send(Op::Cancel(pb::CancelJobRequest {
            leader_epoch: self.epoch,
            job: job.0.clone(),
        }));
    }

    fn command(
        &self,
        job: &JobId,
        vertex: usize,
        subtask: u32,
        cmd: freshet_engine::checkpoint::SubtaskCommand,
    ) -> bool {
        let attempt = self.attempts.lock().get(job).copied().unwrap_or(0);
        self.send(Op::Command(pb::CommandRequest {
            leader_epoch: self.epoch,
            job: job.0.clone(),
            attempt,
            vertex: vertex as u32,
            subtask,
            command: json(&cmd),
        }));
        true
    }

    fn metrics(&self, job: &JobId) -> Vec<SubtaskStatus> {
        let attempt = self.attempts.lock().get(job).copied();
        self.metrics
            .lock()
            .iter()
            .filter(|(j, a, _)| j == job && Some(*a) == attempt)
            .map(|(_, _, s)| s.clone())
            .collect()
    }

    fn data_address(&self) -> Option<String> {
        Some(self.data_address.clone())
    }

    fn lost(&self) -> Option<String> {
        if let Some(why) = self.lost.lock().clone() {
            return Some(why);
        }
        let silent = self.last_heartbeat.lock().elapsed();
        (silent > self.heartbeats.timeout).then(|| {
            format!(
                "no heartbeat for {:.1}s (timeout {:.1}s)",
                silent.as_secs_f64(),
                self.heartbeats.timeout.as_secs_f64()
            )
        })
    }
}

/// The JobManager service.
pub struct JobManagerService {
    jm: JobManager,
    heartbeats: Heartbeats,
    runtime: tokio::runtime::Handle,
    remotes: Mutex<HashMap<String, Arc<RemoteTaskManager>>>,
    security: Security,
    guard: Guard,
}

impl JobManagerService {
    /// Serves `jm` on `listen`; returns the bound address. The server runs on `runtime`.
    /// With TLS, TaskManagers must present a certificate of the cluster's CA, and clients
    /// such a certificate or one of the `security` tokens.
    pub fn serve(
        jm: JobManager,
        listen: &str,
        heartbeats: Heartbeats,
        runtime: &tokio::runtime::Handle,
        security: &Security,
    ) -> std::io::Result<SocketAddr> {
        let listener = runtime.block_on(tokio::net::TcpListener::bind(listen))?;
        let incoming = {
            let _entered = runtime.enter();
            security.incoming(listener, ClientAuth::Optional)?
        };
        let addr = incoming.local_addr();
        let service = JobManagerService {
            jm,
            heartbeats,
            runtime: runtime.clone(),
            remotes: Mutex::new(HashMap::new()),
            guard: security.guard(),
            security: security.clone(),
        };
        runtime.spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(JobManagerServer::new(service))
                .serve_with_incoming(incoming.into_stream())
                .await
            {
                warn!(error = %e, "JobManager service stopped");
            }
        });
        Ok(addr)
    }

    fn job(&self, job: &str) -> Result<JobHandle, Status> {
        self.jm
            .job(job)
            .ok_or_else(|| Status::not_found(format!("no job {job}")))
    }
}

/// The job, base directory and options of a submission.
#[allow(clippy::result_large_err)]
fn submission(req: pb::SubmitJobRequest) -> Result<(JobSpec, PathBuf, SubmitOptions), Status> {
    let spec = freshet_connectors::job_format()
        .parse(&req.definition, "job", &req.overrides)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let options = SubmitOptions {
        restore: (!req.restore.is_empty()).then_some(req.restore),
        ignore_checkpoints: req.fresh,
        allow_non_restored_state: req.allow_non_restored_state,
        trace: None,
    };
    let base = if req.base_dir.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(req.base_dir)
    };
    Ok((spec, base, options))
}

/// A refused submission as a gRPC status: a bad job is the caller's input, a snapshot that
/// does not fit is a precondition.
fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::Invalid(p) => Status::invalid_argument(p.to_string()),
        SubmitError::State(e) => Status::failed_precondition(e),
    }
}

/// A job as clients see it: the HTTP API's [`JobDetails`] in protocol form.
pub fn job_info(j: &JobHandle) -> pb::JobInfo {
    let JobDetails {
        overview: o,
        vertices,
        accumulators,
        ..
    } = JobDetails::of(j);
    pb::JobInfo {
        id: o.id,
        name: o.name,
        state: o.state,
        message: o.message.unwrap_or_default(),
        attempt: o.attempt,
        restarts: o.restarts,
        duration_seconds: o.duration_ms as f64 / 1000.0,
        restored_from: o.restored_from.unwrap_or_default(),
        vertices: vertices
            .iter()
            .map(|v| pb::VertexInfo {
                name: v.name.clone(),
                parallelism: v.parallelism,
                metrics: json(&v.metrics),
            })
            .collect(),
        accumulators: accumulators.into_iter().collect(),
        trace_id: o.trace_id.unwrap_or_default(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
}

#[tonic::async_trait]
impl JobManagerRpc for JobManagerService {
    async fn register_task_manager(
        &self,
        request: Request<pb::RegisterTaskManagerRequest>,
    ) -> Result<Response<pb::RegisterTaskManagerResponse>, Status> {
        self.guard.internal(&request)?;
        let req = request.into_inner();
        if req.slots == 0 {
            return Err(Status::invalid_argument(
                "a TaskManager must offer at least one slot",
            ));
        }
        info!(taskmanager = %req.taskmanager_id, slots = req.slots, control = %req.control_address, data = %req.data_address, "TaskManager registering");
        let tm = RemoteTaskManager::start(
            &req,
            self.jm.epoch(),
            self.heartbeats,
            &self.runtime,
            self.jm.event_sender(),
            &self.security.internal_dialer(),
        );
        {
            // TaskManagers come and go (a new pod is a new id): forget the lost ones
            let mut remotes = self.remotes.lock();
            remotes.retain(|_, t| t.lost().is_none());
            remotes.insert(req.taskmanager_id.clone(), tm.clone());
        }
        let jm = self.jm.clone();
        blocking(move || {
            jm.register(tm);
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::RegisterTaskManagerResponse {
            leader_epoch: self.jm.epoch(),
            heartbeat_interval_ms: self.heartbeats.interval.as_millis() as u64,
            heartbeat_timeout_ms: self.heartbeats.timeout.as_millis() as u64,
        }))
    }

    async fn task_manager_heartbeat(
        &self,
        request: Request<pb::TaskManagerHeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.guard.internal(&request)?;
        let req = request.into_inner();
        let tm = self.remotes.lock().get(&req.taskmanager_id).cloned();
        let Some(tm) = tm.filter(|t| t.lost().is_none()) else {
            return Ok(Response::new(pb::HeartbeatResponse { known: false }));
        };
        let mut metrics = Vec::with_capacity(req.metrics.len());
        for m in req.metrics {
            metrics.push((
                JobId(m.job),
                m.attempt,
                SubtaskStatus {
                    vertex: m.vertex as usize,
                    subtask: m.subtask,
                    metrics: from_json(&m.metrics, "metrics").map_err(Status::invalid_argument)?,
                },
            ));
        }
        tm.heartbeat(metrics);
        Ok(Response::new(pb::HeartbeatResponse { known: true }))
    }

    async fn report_tasks(
        &self,
        request: Request<pb::ReportTasksRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.guard.internal(&request)?;
        let events = self.jm.event_sender();
        for ev in request.into_inner().events {
            let _ = events.send(event_from_proto(ev).map_err(Status::invalid_argument)?);
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.guard.client(&request)?;
        let trace = freshet_security::traceparent(&request);
        let req = request.into_inner();
        let jm = self.jm.clone();
        blocking(move || {
            let (spec, base, mut options) = submission(req)?;
            options.trace = trace;
            jm.submit_with(spec, base, options)
                .map(|j| job_info(&j))
                .map_err(submit_status)
        })
        .await
        .map(Response::new)
    }

    async fn check_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.guard.client(&request)?;
        let req = request.into_inner();
        let jm = self.jm.clone();
        blocking(move || {
            let (spec, base, options) = submission(req)?;
            jm.check(&spec, &base, &options)
                .map(|()| pb::Empty {})
                .map_err(submit_status)
        })
        .await
        .map(Response::new)
    }

    async fn list_jobs(
        &self,
        request: Request<pb::Empty>,
    ) -> Result<Response<pb::JobList>, Status> {
        self.guard.client(&request)?;
        let jm = self.jm.clone();
        blocking(move || {
            Ok(pb::JobList {
                jobs: jm.jobs().iter().map(job_info).collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::JobInfo>, Status> {
        self.guard.client(&request)?;
        let j = self.job(&request.into_inner().job)?;
        blocking(move || Ok(job_info(&j))).await.map(Response::new)
    }

    async fn cancel_job(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.guard.client(&request)?;
        let j = self.job(&request.into_inner().job)?;
        blocking(move || {
            j.cancel();
            j.wait_timeout(Duration::from_secs(30));
            Ok(job_info(&j))
        })
        .await
        .map(Response::new)
    }

    async fn trigger_savepoint(
        &self,
        request: Request<pb::SavepointRequest>,
    ) -> Result<Response<pb::SavepointResponse>, Status> {
        self.guard.client(&request)?;
        let trace = freshet_security::traceparent(&request);
        let req = request.into_inner();
        let j = self.job(&req.job)?;
        blocking(move || {
            let dir = (!req.directory.is_empty()).then_some(req.directory);
            let (id, mut location, outcome) = j
                .trigger_savepoint(dir.as_deref(), req.stop, trace.as_deref())
                .map_err(Status::failed_precondition)?;
            if !req.detach {
                location = outcome
                    .recv()
                    .unwrap_or_else(|_| Err("the job ended before the savepoint completed".into()))
                    .map_err(Status::failed_precondition)?;
            }
            Ok(pb::SavepointResponse { location, id })
        })
        .await
        .map(Response::new)
    }

    async fn dispose_savepoint(
        &self,
        request: Request<pb::DisposeSavepointRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.guard.client(&request)?;
        let location = request.into_inner().location;
        blocking(move || {
            crate::checkpoints::dispose_savepoint(&location, &S3Options::default())
                .map(|()| pb::Empty {})
                .map_err(Status::failed_precondition)
        })
        .await
        .map(Response::new)
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::CheckpointList>, Status> {
        self.guard.client(&request)?;
        let j = self.job(&request.into_inner().job)?;
        blocking(move || {
            Ok(pb::CheckpointList {
                checkpoints: j.checkpoints().iter().map(json).collect(),
            })
        })
        .await
        .map(Response::new)
    }
}
