//! A TaskManager process: serves the `TaskManager` gRPC service, registers with the JobManager
//! and keeps heartbeating, forwards subtask reports, and runs the data plane.
//!
//! Fencing: every request from a JobManager carries its leader epoch. Requests of an older epoch
//! than the newest seen are refused. Registering with a JobManager (first start, after the
//! JobManager forgot this TaskManager, or with a new leader) first cancels every subtask still
//! running here: they belong to attempts the JobManager has given up on.
use anyhow::Context as _;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use freshet_control::wire::event_to_proto;
use freshet_control::{
    CheckpointSetup, JobId, SubtaskLocation, TaskDeployment, TaskEvent, TaskManagerGateway,
    s3_options,
};
use freshet_engine::checkpoint::{RestoreSource, Storage, SubtaskCommand};
use freshet_engine::state::StateConfig;
use freshet_plan::Plan;
use freshet_proto as pb;
use freshet_proto::job_manager_client::JobManagerClient;
use freshet_proto::task_manager_server::{TaskManager as TaskManagerRpc, TaskManagerServer};
use freshet_security::Security;
use freshet_security::net::ClientAuth;

use crate::network::Network;
use crate::shuffle::LocalShuffle;
use crate::taskmanager::{TaskManager, remove_dead_working_dirs};

/// How a TaskManager process is set up.
#[derive(Debug, Clone)]
pub struct TaskManagerConfig {
    /// Its id (unique in the cluster).
    pub id: String,
    /// The JobManager's address (`host:port`).
    pub jobmanager: String,
    /// Slots offered.
    pub slots: u32,
    /// Where the TaskManager service listens (`host:port`, port 0 for any).
    pub listen: String,
    /// Where the data plane listens.
    pub data_listen: String,
    /// Host name peers use to reach this process (default: the listen address's host).
    pub advertise_host: Option<String>,
    /// Root of subtask working directories, overriding the jobs' `state.local_dir`.
    pub state_dir: Option<PathBuf>,
    /// Cancelled subtasks still running after this long make the process exit.
    pub cancellation_timeout: Duration,
    /// TLS for the service, the data plane and the calls to the JobManager: with it, only
    /// processes with a certificate of the cluster's CA may connect.
    pub security: Security,
    /// Set while the TaskManager is registered with the JobManager (its readiness: slots the
    /// JobManager can use).
    pub registered: Arc<AtomicBool>,
}

struct Service {
    tm: Arc<TaskManager>,
    epoch: Arc<AtomicU64>,
    state_dir: Option<PathBuf>,
    restores: Mutex<HashMap<(String, u32), Arc<RestoreSource>>>,
}

impl Service {
    fn fence(&self, epoch: u64) -> Result<(), Status> {
        let current = self.epoch.load(Ordering::Acquire);
        if epoch < current {
            return Err(Status::failed_precondition(format!(
                "fenced: request of leader epoch {epoch}, this TaskManager follows epoch {current}"
            )));
        }
        if epoch > current {
            self.epoch.store(epoch, Ordering::Release);
            if current != 0 {
                warn!(
                    epoch,
                    "a new JobManager leads; cancelling subtasks of the old one"
                );
                self.tm.cancel_all(Duration::ZERO);
            }
        }
        Ok(())
    }

    fn deployment(&self, r: pb::DeployRequest) -> Result<TaskDeployment, String> {
        let plan = Arc::new(Plan::from_json(&r.plan)?);
        let (spec, base_dir) = (&plan.spec, &plan.base_dir);
        let s3 = s3_options(spec)?;
        let checkpoints = if r.checkpoint_storage.is_empty() {
            None
        } else {
            Some(CheckpointSetup {
                storage: Storage::open(&r.checkpoint_storage, base_dir, &s3)
                    .map_err(|e| format!("checkpoint storage: {e}"))?,
                s3: s3.clone(),
            })
        };
        let restore = if r.restore.is_empty() {
            None
        } else {
            let key = (r.job.clone(), r.attempt);
            let cached = self.restores.lock().get(&key).cloned();
            Some(match cached {
                Some(c) => c,
                None => {
                    let mut source = RestoreSource::load(&r.restore, base_dir, &s3)
                        .map_err(|e| format!("restoring {}: {e}", r.restore))?;
                    source.shared_with_job = r.restore_shared;
                    let source = Arc::new(source);
                    let mut restores = self.restores.lock();
                    restores.retain(|(j, _), _| *j != r.job);
                    restores.insert(key, source.clone());
                    source
                }
            })
        };
        let placement = r
            .placement
            .iter()
            .map(|l| {
                (
                    (l.vertex as usize, l.subtask),
                    SubtaskLocation {
                        taskmanager: l.taskmanager_id.clone(),
                        data_address: (!l.data_address.is_empty()).then(|| l.data_address.clone()),
                    },
                )
            })
            .collect();
        let state = StateConfig {
            local_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(&r.state_dir)),
            memory_bytes: spec.state.memory_mb << 20,
            cache_keys: spec.state.cache_keys,
            write_buffer_bytes: spec.state.write_buffer_mb() << 20,
            memory: None,
            slot: 0,
        };
        Ok(TaskDeployment {
            plan,
            job: JobId(r.job),
            attempt: r.attempt,
            vertex: r.vertex as usize,
            subtask: r.subtask,
            state,
            checkpoints,
            restore,
            placement: Arc::new(placement),
            trace: (!r.trace.is_empty()).then_some(r.trace),
        })
    }
}

/// The gRPC face of [`Service`].
struct Rpc(Arc<Service>);

impl std::ops::Deref for Rpc {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.0
    }
}

#[tonic::async_trait]
impl TaskManagerRpc for Rpc {
    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.fence(r.leader_epoch)?;
        let me = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let d = me.deployment(r).map_err(Status::invalid_argument)?;
            me.tm.deploy(d).map_err(Status::internal)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::Empty {}))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.fence(r.leader_epoch)?;
        self.tm.cancel(&JobId(r.job));
        Ok(Response::new(pb::Empty {}))
    }

    async fn command(
        &self,
        request: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.fence(r.leader_epoch)?;
        let cmd: SubtaskCommand = serde_json::from_slice(&r.command)
            .map_err(|e| Status::invalid_argument(format!("command: {e}")))?;
        self.tm
            .command_attempt(&JobId(r.job), r.attempt, r.vertex as usize, r.subtask, cmd);
        Ok(Response::new(pb::Empty {}))
    }

    async fn job_manager_heartbeat(
        &self,
        request: Request<pb::JobManagerHeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let epoch = request.into_inner().leader_epoch;
        Ok(Response::new(pb::HeartbeatResponse {
            known: epoch == self.epoch.load(Ordering::Acquire),
        }))
    }
}

fn advertised(bound: std::net::SocketAddr, host: &Option<String>) -> String {
    match host {
        Some(h) => format!("{h}:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// Runs a TaskManager process until it is killed.
pub fn run(config: TaskManagerConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tm-rpc")
        .build()?;
    // clients made here spawn their connection tasks on this runtime
    let _guard = runtime.enter();
    if let Some(dir) = &config.state_dir {
        remove_dead_working_dirs(dir);
    }
    remove_dead_working_dirs(&std::env::temp_dir().join("freshet-state"));
    let shuffle = Arc::new(LocalShuffle::new());
    let network = Network::start(
        &config.data_listen,
        shuffle.clone(),
        config.security.tls.clone(),
    )
    .with_context(|| format!("data plane on {}", config.data_listen))?;
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<TaskEvent>();
    let tm = Arc::new(
        TaskManager::new(
            config.id.clone(),
            config.slots,
            shuffle,
            Some(network.clone()),
            events_tx,
        )
        .with_cancellation_timeout(config.cancellation_timeout, None),
    );
    let epoch = Arc::new(AtomicU64::new(0));
    let service = Arc::new(Service {
        tm: tm.clone(),
        epoch: epoch.clone(),
        state_dir: config.state_dir.clone(),
        restores: Mutex::new(HashMap::new()),
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&config.listen))
        .with_context(|| format!("TaskManager service on {}", config.listen))?;
    // only the JobManager calls this service: with TLS it must show the cluster's certificate
    let incoming = config.security.incoming(listener, ClientAuth::Required)?;
    let control = incoming.local_addr();
    runtime.spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(TaskManagerServer::new(Rpc(service)))
            .serve_with_incoming(incoming.into_stream())
            .await
        {
            warn!(error = %e, "TaskManager service stopped");
        }
    });
    let register = pb::RegisterTaskManagerRequest {
        taskmanager_id: config.id.clone(),
        control_address: advertised(control, &config.advertise_host),
        data_address: advertised(network.address(), &config.advertise_host),
        slots: config.slots,
    };
    info!(id = %config.id, control = %register.control_address, data = %register.data_address, slots = config.slots, "TaskManager started");
    eprintln!(
        "TaskManager {} listening on {} (data {})",
        config.id, register.control_address, register.data_address
    );
    let dialer = config.security.internal_dialer();
    let endpoint = dialer
        .endpoint(&config.jobmanager)
        .context("JobManager address")?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let channel = dialer.connect_lazy(endpoint);
    let client = JobManagerClient::new(channel);
    {
        let mut client = client.clone();
        let handle = runtime.handle().clone();
        let id = config.id.clone();
        std::thread::Builder::new()
            .name("tm-reports".into())
            .spawn(move || forward_events(events_rx, &mut client, &handle, &id))?;
    }
    let mut client = client;
    let mut logged = false;
    loop {
        // every subtask still here belongs to an attempt the JobManager gave up on
        if tm.running() > 0 {
            warn!("cancelling subtasks before registering again");
            tm.cancel_all(Duration::from_secs(30));
        }
        let resp = match runtime.block_on(client.register_task_manager(register.clone())) {
            Ok(r) => r.into_inner(),
            Err(s) => {
                if !logged {
                    warn!(jobmanager = %config.jobmanager, error = %s.message(), "cannot register with the JobManager; retrying");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        logged = false;
        let previous = epoch.fetch_max(resp.leader_epoch, Ordering::AcqRel);
        if previous > resp.leader_epoch {
            warn!(
                epoch = resp.leader_epoch,
                newest = previous,
                "registered with a JobManager of an older epoch"
            );
        }
        config.registered.store(true, Ordering::Release);
        info!(
            jobmanager = %config.jobmanager,
            epoch = resp.leader_epoch,
            "registered with the JobManager"
        );
        let interval = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
        let timeout = Duration::from_millis(resp.heartbeat_timeout_ms.max(200));
        let mut last_ok = Instant::now();
        loop {
            std::thread::sleep(interval);
            let metrics = tm
                .all_metrics()
                .into_iter()
                .map(|(job, attempt, s)| pb::SubtaskMetrics {
                    job: job.0,
                    attempt,
                    vertex: s.vertex as u32,
                    subtask: s.subtask,
                    metrics: serde_json::to_vec(&s.metrics).unwrap_or_default(),
                })
                .collect();
            let beat = runtime.block_on(client.task_manager_heartbeat(
                pb::TaskManagerHeartbeatRequest {
                    taskmanager_id: config.id.clone(),
                    metrics,
                },
            ));
            match beat {
                Ok(r) if r.get_ref().known => last_ok = Instant::now(),
                Ok(_) => {
                    config.registered.store(false, Ordering::Release);
                    warn!("the JobManager no longer knows this TaskManager; registering again");
                    break;
                }
                Err(s) if last_ok.elapsed() > timeout => {
                    config.registered.store(false, Ordering::Release);
                    warn!(error = %s.message(), "JobManager lost; registering again");
                    break;
                }
                Err(_) => {}
            }
        }
    }
}

/// Sends subtask reports to the JobManager in order, in batches.
fn forward_events(
    events: crossbeam_channel::Receiver<TaskEvent>,
    client: &mut JobManagerClient<tonic::transport::Channel>,
    runtime: &tokio::runtime::Handle,
    id: &str,
) {
    while let Ok(first) = events.recv() {
        let mut batch = vec![event_to_proto(&first)];
        while let Ok(more) = events.try_recv() {
            batch.push(event_to_proto(&more));
            if batch.len() >= 256 {
                break;
            }
        }
        let request = pb::ReportTasksRequest {
            taskmanager_id: id.to_string(),
            events: batch,
        };
        // a report is never given up on while the JobManager may still take it: a lost
        // "finished" or "failed" would leave its attempt open for good
        let mut attempt: u32 = 0;
        loop {
            match runtime.block_on(client.report_tasks(request.clone())) {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    error!(error = %s.message(), "the JobManager refused a report; it is dropped");
                    break;
                }
                Err(s) => {
                    if attempt < 5 || attempt.is_multiple_of(30) {
                        warn!(error = %s.message(), attempt, "reporting to the JobManager failed; retrying");
                    }
                    std::thread::sleep(report_backoff(attempt));
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

/// The wait before retry `attempt` of a report: 200 ms doubling, at most 5 s.
fn report_backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64 << attempt.min(5)).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_retries_back_off_to_five_seconds_and_stay_there() {
        assert_eq!(report_backoff(0), Duration::from_millis(200));
        assert_eq!(report_backoff(3), Duration::from_millis(1600));
        assert_eq!(report_backoff(5), Duration::from_secs(5));
        assert_eq!(report_backoff(1000), Duration::from_secs(5));
    }

    #[test]
    fn requests_of_an_older_leader_epoch_are_refused() {
        let (events, _rx) = crossbeam_channel::unbounded();
        let tm = Arc::new(TaskManager::new(
            "tm",
            1,
            Arc::new(LocalShuffle::new()),
            None,
            events,
        ));
        let service = Service {
            tm,
            epoch: Arc::new(AtomicU64::new(0)),
            state_dir: None,
            restores: Mutex::new(HashMap::new()),
        };
        assert!(service.fence(5).is_ok());
        assert!(service.fence(5).is_ok());
        let refused = service.fence(4).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("epoch 4"),
            "{}",
            refused.message()
        );
        // a newer leader takes over; the previous one is refused from now on
        assert!(service.fence(6).is_ok());
        assert!(service.fence(5).is_err());
    }
}
