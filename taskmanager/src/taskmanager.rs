//! The TaskManager: offers slots, runs the subtasks deployed to it (one thread each), wires their
//! channels, and reports their state to the JobManager.
//!
//! A cancelled subtask stops at its next element or wait; one stuck where cancellation cannot
//! reach it (a blocking call into an external system) would hold its attempt open forever, and
//! with it the job's restart. A watchdog started by each cancellation gives the subtasks
//! [`DEFAULT_CANCELLATION_TIMEOUT`] (or what [`TaskManager::with_cancellation_timeout`] sets) and
//! then declares the TaskManager broken: by default the process exits, its subtasks count as
//! lost, and the job restarts elsewhere (a supervisor such as Kubernetes restarts the process).
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use tracing::{debug, info_span};

use freshet_control::{
    JobId, SubtaskStatus, TaskDeployment, TaskEvent, TaskManagerGateway, TaskState,
};
use freshet_engine::channel::CancelToken;
use freshet_engine::checkpoint::{CheckpointHooks, LocalState, SubtaskCommand, SubtaskReport};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::SubtaskInfo;
use freshet_engine::partition::{EdgeWriter, Partitioning};
use freshet_engine::state::StateMemory;
use freshet_engine::task::{ChainedOperator, SubtaskSpec, TaskInput, run_subtask};
use freshet_engine::{EngineError, Result};
use freshet_plan::{Factory, NodeKind, Plan, instantiate};

use crate::network::Network;
use crate::shuffle::{ChannelKey, LocalShuffle};

/// A running subtask: (job, vertex, subtask).
pub(crate) type TaskKey = (JobId, usize, u32);

/// Per job, the newest attempt deployed here and its plan.
pub(crate) type Plans = Arc<PlanMap>;

/// Per job, the newest attempt deployed here and its plan.
pub(crate) type PlanMap = Mutex<HashMap<JobId, AttemptPlan>>;

/// The newest attempt of a job deployed here.
pub(crate) struct AttemptPlan {
    pub(crate) attempt: u32,
    /// Its plan, and the factories built from it per vertex: one set per vertex and attempt,
    /// shared by the vertex's subtasks here (both dropped while nothing of the job runs here).
    pub(crate) plan: Option<Arc<Plan>>,
    factories: HashMap<usize, Arc<Vec<Factory>>>,
}

/// Per job, the keyed-state memory its subtasks here share.
pub(crate) type Memories = Mutex<HashMap<JobId, Weak<StateMemory>>>;

/// How long cancelled subtasks get to end before the TaskManager gives up on them.
pub const DEFAULT_CANCELLATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Called with a description of the subtasks that ignored cancellation for too long.
pub type OnStuck = Arc<dyn Fn(&str) + Send + Sync>;

/// The default answer to stuck subtasks: this process cannot be trusted to run more work, so it
/// exits (code 70); its subtasks count as lost and their jobs restart elsewhere.
fn exit_on_stuck(what: &str) {
    tracing::error!(stuck = what, "subtasks ignored cancellation; exiting");
    eprintln!("{what}; the TaskManager exits so that their jobs can restart elsewhere");
    std::process::exit(70);
}

pub(crate) struct Running {
    attempt: u32,
    cancel: CancelToken,
    pub(crate) metrics: Arc<SubtaskMetrics>,
    commands: crossbeam_channel::Sender<SubtaskCommand>,
}

/// A TaskManager.
pub struct TaskManager {
    id: String,
    slots: u32,
    shuffle: Arc<LocalShuffle>,
    network: Option<Arc<Network>>,
    events: Sender<TaskEvent>,
    plans: Plans,
    running: Arc<Mutex<HashMap<TaskKey, Running>>>,
    /// Per job, the keyed-state memory its subtasks here share (alive while one of them is).
    memory: Arc<Memories>,
    cancellation_timeout: std::time::Duration,
    on_stuck: OnStuck,
    /// Tells this TaskManager's working directories from those of others in the process.
    instance: u64,
}

impl TaskManager {
    /// A TaskManager offering `slots`, exchanging data through `shuffle` and reporting on `events`.
    /// With a `network`, channels to subtasks placed on other TaskManagers go over it; without
    /// one, every TaskManager of the job shares `shuffle` (one process).
    pub fn new(
        id: impl Into<String>,
        slots: u32,
        shuffle: Arc<LocalShuffle>,
        network: Option<Arc<Network>>,
        events: Sender<TaskEvent>,
    ) -> Self {
        let id = id.into();
        let plans: Plans = Arc::new(Mutex::new(HashMap::new()));
        let running = Arc::new(Mutex::new(HashMap::new()));
        let memory = Arc::new(Mutex::new(HashMap::new()));
        crate::metrics::register(
            &opentelemetry::global::meter("freshet"),
            crate::metrics::Observed {
                id: id.clone(),
                slots,
                running: Arc::downgrade(&running),
                plans: Arc::downgrade(&plans),
                memory: Arc::downgrade(&memory),
            },
        );
        TaskManager {
            id,
            slots,
            shuffle,
            network,
            events,
            plans,
            running,
            memory,
            cancellation_timeout: DEFAULT_CANCELLATION_TIMEOUT,
            on_stuck: Arc::new(exit_on_stuck),
            instance: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        }
    }

    /// The keyed-state memory of `job` here, made on its first subtask with `per_slot` bytes per
    /// slot.
    fn state_memory(&self, job: &JobId, per_slot: usize) -> Arc<StateMemory> {
        let mut all = self.memory.lock();
        if let Some(m) = all.get(job).and_then(Weak::upgrade)
            && m.per_slot() == StateMemory::new_per_slot(per_slot)
        {
            return m;
        }
        all.retain(|_, m| m.strong_count() > 0);
        let m = StateMemory::new(per_slot);
        all.insert(job.clone(), Arc::downgrade(&m));
        m
    }

    /// Gives cancelled subtasks `timeout` to end; `on_stuck` is told about those that do not.
    pub fn with_cancellation_timeout(
        mut self,
        timeout: std::time::Duration,
        on_stuck: Option<OnStuck>,
    ) -> Self {
        self.cancellation_timeout = timeout;
        if let Some(f) = on_stuck {
            self.on_stuck = f;
        }
        self
    }

    /// Watches subtasks just cancelled: those still running (the same attempt) after the
    /// cancellation timeout are reported to `on_stuck`.
    fn watch_cancelled(&self, cancelled: Vec<(TaskKey, u32)>) {
        if cancelled.is_empty() {
            return;
        }
        let running = Arc::downgrade(&self.running);
        let timeout = self.cancellation_timeout;
        let on_stuck = self.on_stuck.clone();
        let spawned = std::thread::Builder::new()
            .name("cancel-watch".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + timeout;
                loop {
                    let Some(running) = running.upgrade() else {
                        return;
                    };
                    let stuck: Vec<String> = {
                        let running = running.lock();
                        cancelled
                            .iter()
                            .filter(|(k, a)| running.get(k).is_some_and(|r| r.attempt == *a))
                            .map(|((job, v, i), a)| {
                                format!("vertex {v} subtask {i} of job {job} (attempt {a})")
                            })
                            .collect()
                    };
                    if stuck.is_empty() {
                        return;
                    }
                    if std::time::Instant::now() >= deadline {
                        (on_stuck)(&format!(
                            "{} did not stop within {} of being cancelled",
                            stuck.join(", "),
                            humantime::format_duration(timeout)
                        ));
                        return;
                    }
                    drop(running);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch cancelled subtasks");
        }
    }

    /// The factories of the deployment's vertex, built from its plan on the first of the
    /// vertex's subtasks deployed here.
    fn factories_for(&self, d: &TaskDeployment) -> std::result::Result<Arc<Vec<Factory>>, String> {
        let mut plans = self.plans.lock();
        let fresh = plans.get(&d.job).is_none_or(|e| e.attempt != d.attempt);
        if fresh {
            // clear working directories that killed processes left behind
            remove_dead_working_dirs(&d.state.local_dir);
            // older attempts of the job will never run here again
            if let Some(older) = d.attempt.checked_sub(1) {
                self.shuffle.retire(&d.job, older);
            }
        }
        let attempt = || AttemptPlan {
            attempt: d.attempt,
            plan: None,
            factories: HashMap::new(),
        };
        let e = plans.entry(d.job.clone()).or_insert_with(attempt);
        if fresh {
            *e = attempt();
        }
        // (the factories were dropped with the plan)
        e.plan.get_or_insert_with(|| d.plan.clone());
        if let Some(f) = e.factories.get(&d.vertex) {
            return Ok(f.clone());
        }
        let f = Arc::new(instantiate(&d.plan, d.vertex)?);
        e.factories.insert(d.vertex, f.clone());
        Ok(f)
    }

    /// Builds the runnable subtask of a deployment.
    fn build(
        &self,
        d: &TaskDeployment,
        factories: &[Factory],
        cancel: CancelToken,
        metrics: Arc<SubtaskMetrics>,
        commands: crossbeam_channel::Receiver<SubtaskCommand>,
    ) -> Result<SubtaskSpec> {
        let plan = &*d.plan;
        let vertex = &plan.vertices[d.vertex];
        let capacity = plan.spec.pipeline.channel_capacity;
        let info = SubtaskInfo {
            job: plan.spec.name.clone(),
            vertex: vertex.name.clone(),
            index: d.subtask,
            parallelism: vertex.parallelism,
            max_parallelism: plan.spec.max_parallelism,
        };
        let key = |edge: usize, from: u32, to: u32| ChannelKey {
            job: d.job.clone(),
            attempt: d.attempt,
            edge,
            from,
            to,
        };
        // Writers for everything leaving (node, port) towards other vertices.
        let writers = |node: usize, port: usize| -> Result<Vec<EdgeWriter>> {
            plan.edges
                .iter()
                .enumerate()
                .filter(|(_, e)| e.from == (node, port))
                .map(|(ei, e)| {
                    let downstream = plan.vertices[e.to_vertex].parallelism;
                    let to: Vec<u32> = match e.partitioning {
                        Partitioning::Forward => vec![d.subtask],
                        _ => (0..downstream).collect(),
                    };
                    let targets = to
                        .into_iter()
                        .map(|j| self.sender(d, e.to_vertex, key(ei, d.subtask, j), capacity))
                        .collect::<Result<Vec<_>>>()?;
                    let mut writer = EdgeWriter::new(e.partitioning.clone(), targets);
                    if !e.watermarks {
                        writer = writer.without_watermarks();
                    }
                    if e.share_batches {
                        writer = writer.sharing_batches();
                    }
                    Ok(writer)
                })
                .collect::<Result<Vec<_>>>()
        };
        let head = vertex.nodes[0];
        let (input, rest) = match (&plan.nodes[head].kind, factories.first()) {
            (NodeKind::Source { watermarks, .. }, Some(Factory::Source(factory))) => {
                let source = factory(&info)?;
                let only = vertex.nodes.len() == 1;
                let main_outputs = if only { writers(head, 0)? } else { Vec::new() };
                let side_outputs = (1..plan.nodes[head].outputs.len())
                    .map(|p| writers(head, p))
                    .collect::<Result<_>>()?;
                (
                    TaskInput::Source {
                        uid: plan.nodes[head].name.clone(),
                        source,
                        watermarks: *watermarks,
                        main_outputs,
                        side_outputs,
                    },
                    &vertex.nodes[1..],
                )
            }
            (NodeKind::Operator, Some(Factory::Operator(_))) => {
                let mut inputs = Vec::new();
                for (ei, e) in plan
                    .edges
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.to_vertex == d.vertex)
                {
                    let upstream = plan.vertices[e.from_vertex].parallelism;
                    match e.partitioning {
                        Partitioning::Forward => inputs.push((
                            self.shuffle
                                .receiver(key(ei, d.subtask, d.subtask), capacity),
                            e.to.1,
                        )),
                        _ => {
                            for u in 0..upstream {
                                inputs.push((
                                    self.shuffle.receiver(key(ei, u, d.subtask), capacity),
                                    e.to.1,
                                ));
                            }
                        }
                    }
                }
                (TaskInput::Channels(inputs), &vertex.nodes[..])
            }
            _ => {
                return Err(EngineError::Operator(format!(
                    "{}: the plan's node and the recipe built for it disagree",
                    plan.nodes[head].name
                )));
            }
        };
        let mut chain = Vec::new();
        let chained = &factories[vertex.nodes.len() - rest.len()..];
        for (k, (node, factory)) in rest.iter().zip(chained).enumerate() {
            let n = &plan.nodes[*node];
            let Factory::Operator(factory) = factory else {
                return Err(EngineError::Operator(format!(
                    "source {} cannot be chained",
                    n.name
                )));
            };
            let last = k + 1 == rest.len();
            let mut outputs: Vec<Vec<EdgeWriter>> = Vec::new();
            for port in 0..n.outputs.len().max(1) {
                outputs.push(if port == 0 && !last {
                    Vec::new()
                } else {
                    writers(*node, port)?
                });
            }
            chain.push(ChainedOperator {
                name: n.name.clone(),
                operator: factory(&info),
                outputs,
            });
        }
        let events = self.events.clone();
        let (job, attempt, vertex, subtask) = (d.job.clone(), d.attempt, d.vertex, d.subtask);
        let checkpoints = d.checkpoints.as_ref().map(|c| CheckpointHooks {
            storage: c.storage.clone(),
            s3: c.s3.clone(),
            report: Arc::new(move |report: SubtaskReport| {
                let _ = events.send(TaskEvent {
                    job: job.clone(),
                    attempt,
                    vertex,
                    subtask,
                    state: TaskState::Checkpoint(report),
                });
            }),
        });
        let mut config = d.state.clone();
        config.memory = Some(self.state_memory(&d.job, config.memory_bytes));
        config.slot = d.subtask;
        // unique per TaskManager instance (several can share a process and a job id: local
        // clusters in one test process); the process id comes last, for the clean-up of
        // directories that dead processes left
        config.local_dir = config.local_dir.join(format!(
            "{}-{}-{}-{}/{}-{}",
            d.job,
            d.attempt,
            self.instance,
            std::process::id(),
            d.vertex,
            d.subtask
        ));
        Ok(SubtaskSpec {
            info,
            input,
            chain,
            cancel,
            metrics,
            local: LocalState {
                dir: config.local_dir.clone(),
                config,
            },
            commands,
            checkpoints,
            restore: d.restore.clone(),
            trace: d.trace.clone(),
        })
    }
}

impl TaskManager {
    /// The sending end of a channel to subtask `key.to` of `vertex`: in memory when that
    /// subtask runs in this process, over the network otherwise.
    fn sender(
        &self,
        d: &TaskDeployment,
        vertex: usize,
        key: ChannelKey,
        capacity: usize,
    ) -> Result<freshet_engine::channel::ChannelSender> {
        let remote = match (&self.network, d.placement.get(&(vertex, key.to))) {
            (Some(net), Some(loc)) if loc.taskmanager != self.id => {
                let addr = loc.data_address.clone().ok_or_else(|| {
                    EngineError::Operator(format!(
                        "TaskManager {} has no data address",
                        loc.taskmanager
                    ))
                })?;
                Some((net, addr))
            }
            _ => None,
        };
        match remote {
            Some((net, addr)) => net.sender(&addr, key, capacity),
            None => Ok(self.shuffle.sender(key, capacity)),
        }
    }

    /// Counters of every running subtask: (job, attempt, status).
    pub fn all_metrics(&self) -> Vec<(JobId, u32, SubtaskStatus)> {
        self.running
            .lock()
            .iter()
            .map(|((j, v, s), r)| {
                (
                    j.clone(),
                    r.attempt,
                    SubtaskStatus {
                        vertex: *v,
                        subtask: *s,
                        metrics: r.metrics.snapshot(),
                    },
                )
            })
            .collect()
    }

    /// Cancels every running subtask and waits up to `timeout` for them to end.
    pub fn cancel_all(&self, timeout: std::time::Duration) {
        let jobs: Vec<JobId> = {
            let running = self.running.lock();
            running.keys().map(|(j, _, _)| j.clone()).collect()
        };
        for j in &jobs {
            TaskManagerGateway::cancel(self, j);
        }
        let deadline = std::time::Instant::now() + timeout;
        while !self.running.lock().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Passes a command to a running subtask of attempt `attempt` (false if it is not running
    /// here, or belongs to another attempt).
    pub fn command_attempt(
        &self,
        job: &JobId,
        attempt: u32,
        vertex: usize,
        subtask: u32,
        cmd: SubtaskCommand,
    ) -> bool {
        let running = self.running.lock();
        match running.get(&(job.clone(), vertex, subtask)) {
            Some(r) if r.attempt == attempt => r.commands.send(cmd).is_ok(),
            _ => false,
        }
    }

    /// Number of running subtasks.
    pub fn running(&self) -> usize {
        self.running.lock().len()
    }
}

impl TaskManagerGateway for TaskManager {
    fn id(&self) -> &str {
        &self.id
    }

    fn slots(&self) -> u32 {
        self.slots
    }

    fn deploy(&self, d: TaskDeployment) -> std::result::Result<(), String> {
        let factories = self.factories_for(&d)?;
        let cancel = CancelToken::new();
        let metrics = Arc::new(SubtaskMetrics::default());
        let (commands_tx, commands) = crossbeam_channel::unbounded();
        let spec = self
            .build(&d, &factories, cancel.clone(), metrics.clone(), commands)
            .map_err(|e| e.to_string())?;
        let task = (d.job.clone(), d.vertex, d.subtask);
        // a cancelled or failed subtask reports the counters it stopped with
        let counters = metrics.clone();
        self.running.lock().insert(
            task.clone(),
            Running {
                attempt: d.attempt,
                cancel: cancel.clone(),
                metrics,
                commands: commands_tx,
            },
        );
        let events = self.events.clone();
        let running = self.running.clone();
        let plans = Arc::downgrade(&self.plans);
        let thread_name = format!("{}#{}", d.plan.vertices[d.vertex].name, d.subtask);
        let span = info_span!(target: "freshet::context", "task", taskmanager = %self.id, job = %d.job, task = %thread_name);
        std::thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            .spawn(move || {
                let _enter = span.enter();
                // a panic in an operator fails the subtask like an error does
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_subtask(spec)))
                        .unwrap_or_else(|panic| {
                            let msg = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
                            Err(EngineError::Operator(format!("panicked: {msg}")))
                        });
                let state = match outcome {
                    Ok(r) => TaskState::Finished {
                        metrics: r.metrics,
                        accumulators: r.accumulators,
                    },
                    Err(EngineError::Cancelled) => TaskState::Cancelled {
                        metrics: Some(counters.snapshot()),
                    },
                    // a peer gone because of the cancellation; an error of this subtask's own
                    // stays a failure even when the cancellation (which it may have caused:
                    // its consumers fail as soon as it stops) came before this line
                    Err(e) if e.is_consequence() && cancel.is_cancelled() => TaskState::Cancelled {
                        metrics: Some(counters.snapshot()),
                    },
                    Err(e) => TaskState::Failed {
                        root_cause: !e.is_consequence(),
                        retryable: e.is_retryable(),
                        damaged_snapshot: matches!(e, EngineError::Corrupt { .. }),
                        error: e.to_string(),
                        metrics: Some(counters.snapshot()),
                    },
                };
                debug!(?state, "subtask ended");
                let job_done = {
                    let mut running = running.lock();
                    // (a newer attempt may have taken the slot if this one was given up on)
                    if running.get(&task).is_some_and(|r| r.attempt == d.attempt) {
                        running.remove(&task);
                    }
                    !running.keys().any(|(j, _, _)| *j == d.job)
                };
                if job_done && let Some(plans) = plans.upgrade() {
                    // nothing of the job runs here: its plan is taken again if more of it comes
                    if let Some(e) = plans.lock().get_mut(&d.job)
                        && e.attempt == d.attempt
                    {
                        e.plan = None;
                        e.factories.clear();
                    }
                }
                let _ = events.send(TaskEvent {
                    job: d.job,
                    attempt: d.attempt,
                    vertex: d.vertex,
                    subtask: d.subtask,
                    state,
                });
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(())
    }

    fn cancel(&self, job: &JobId) {
        // the newest attempt deployed here: deployments reach a TaskManager before the cancel
        // that follows them, so every attempt up to this one is over
        let mut newest = None;
        let mut cancelled = Vec::new();
        for (k, r) in self.running.lock().iter() {
            if &k.0 == job {
                r.cancel.cancel();
                newest = newest.max(Some(r.attempt));
                cancelled.push((k.clone(), r.attempt));
            }
        }
        self.watch_cancelled(cancelled);
        let planned = self.plans.lock().get(job).map(|e| e.attempt);
        if let Some(attempt) = newest.max(planned) {
            self.shuffle.retire(job, attempt);
        }
    }

    fn command(&self, job: &JobId, vertex: usize, subtask: u32, cmd: SubtaskCommand) -> bool {
        let running = self.running.lock();
        match running.get(&(job.clone(), vertex, subtask)) {
            Some(r) => r.commands.send(cmd).is_ok(),
            None => false,
        }
    }

    fn metrics(&self, job: &JobId) -> Vec<SubtaskStatus> {
        self.running
            .lock()
            .iter()
            .filter(|((j, _, _), _)| j == job)
            .map(|((_, v, s), r)| SubtaskStatus {
                vertex: *v,
                subtask: *s,
                metrics: r.metrics.snapshot(),
            })
            .collect()
    }
}

/// Removes working directories (`<job>-<attempt>-<pid>`) left by processes that are gone, e.g.
/// killed ones: their state lives on in checkpoints, the local copies are only clutter.
pub fn remove_dead_working_dirs(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    // without /proc there is no telling which processes are alive
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
