//! The JobManager: accepts jobs, schedules their subtasks into TaskManager slots, follows their
//! progress, restarts them after failures and decides their fate.
//!
//! - **Scheduling** uses slot sharing: slot `k` hosts subtask `k` of every vertex, so a job needs
//!   as many slots as its largest parallelism. Slots are taken round-robin over the TaskManagers
//!   with free slots, so a job spreads over the cluster. A job that does not fit waits (state
//!   `created`, with a message saying how many slots it needs and how many are free) and is
//!   deployed as soon as TaskManagers offer enough.
//! - **Attempts.** Each deployment of a job is an attempt; its subtasks, channels and checkpoint
//!   coordinator belong to it, and reports of older attempts are ignored.
//! - **Failover.** When a subtask fails or its TaskManager is lost, the attempt's other subtasks
//!   are cancelled. Once all have ended, the job's restart strategy decides: restart (after a
//!   delay, from the latest checkpoint this job completed) or fail. Failures that would repeat
//!   fail the job at once.
//! - **TaskManagers** register and unregister at any time ([`JobManager::register`]); a
//!   TaskManager whose gateway reports it [lost](TaskManagerGateway::lost) is removed and its
//!   subtasks count as failed.
//! - **Durability.** With a [`JobStore`], every job's definition and outcome is kept in object
//!   storage, so a JobManager that takes over (see [`crate::leader`]) resumes the running jobs.
//! - **Retention.** Ended jobs stay listed (with their counters and checkpoint history) until
//!   [`RETAINED_ENDED_JOBS`] newer ones have ended, so a long-running JobManager does not grow.
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, info_span, warn};

use freshet_engine::checkpoint::{
    RestoreSource, Storage, SubtaskCommand, fixed_parallelism_conflict,
};
use freshet_engine::metrics::MetricsSnapshot;
use freshet_engine::state::StateConfig;
use freshet_job::{JobSpec, Problems, RestartHistory, RestartSpec};

use crate::api::{JobException, RateWindow, Rates, TaskManagerView};
use crate::checkpoints::{
    CheckpointStats, CheckpointTotals, Coordinator, CoordinatorSettings, Totals,
    acquire_generation, completed_checkpoints,
};
use crate::store::{JobRecord, JobStore};
use freshet_control::{
    CheckpointSetup, JobId, Placement, SubtaskLocation, TaskDeployment, TaskEvent,
    TaskManagerGateway, TaskState, s3_options,
};
use freshet_plan::{Plan, plan};

/// Ended jobs a JobManager keeps listing; older ones are forgotten (their job store records stay).
pub const RETAINED_ENDED_JOBS: usize = 100;

/// Why a job could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The definition has problems.
    #[error("{0}")]
    Invalid(Problems),
    /// The checkpoint storage or the state to restore cannot be used.
    #[error("{0}")]
    State(String),
}

/// The state of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Accepted, waiting for slots.
    Created,
    /// Subtasks are running.
    Running,
    /// An attempt failed; the next one starts after the restart delay.
    Restarting,
    /// Every subtask finished.
    Finished,
    /// Failed for good.
    Failed(String),
    /// Cancelled by request.
    Cancelled,
}

impl JobState {
    /// Whether the job can no longer change state.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Finished | JobState::Failed(_) | JobState::Cancelled
        )
    }

    /// Its lowercase name (`running`, `failed`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Finished => "finished",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What is known about a job.
#[derive(Debug, Clone)]
pub struct JobStatus {
    /// Its state.
    pub state: JobState,
    /// Why it waits, or why it restarts.
    pub message: Option<String>,
    /// When it was submitted.
    pub started: Instant,
    /// How long it ran (so far).
    pub duration: Duration,
    /// Current (or last) attempt.
    pub attempt: u32,
    /// Restarts so far.
    pub restarts: u32,
    /// Final counters of the current attempt's subtasks that ended (finished, cancelled or
    /// failed, when they reported them), per (vertex, subtask).
    pub finished: BTreeMap<(usize, u32), MetricsSnapshot>,
    /// Accumulators summed over the current attempt's subtasks (wrapping).
    pub accumulators: BTreeMap<String, i64>,
}

/// How to start a job.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SubmitOptions {
    /// Start from this checkpoint or savepoint (a directory with `_metadata`). Without it, a job
    /// with checkpoints starts from the latest completed checkpoint in its checkpoint directory.
    pub restore: Option<String>,
    /// Start fresh even if the checkpoint directory holds completed checkpoints.
    pub ignore_checkpoints: bool,
    /// Allow restoring a snapshot with state of operators the job no longer has (that state is
    /// dropped).
    pub allow_non_restored_state: bool,
    /// The `traceparent` of the submission: the first deployment joins that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// Where an attempt starts from.
#[derive(Debug, Clone)]
enum Start {
    /// The latest completed checkpoint in the checkpoint directory, if any.
    Latest,
    /// Nothing.
    Fresh,
    /// This checkpoint or savepoint.
    From(String),
    /// The latest checkpoint of generation `since` or later (this job's own), else `or`.
    OwnLatest { since: u64, or: Option<String> },
}

/// One deployment of a job.
struct Attempt {
    number: u32,
    placement: Arc<Placement>,
    coordinator: Option<Arc<Coordinator>>,
    total: usize,
    ended: HashSet<(usize, u32)>,
    /// First failure: message, root cause, retryable.
    failure: Option<(String, bool, bool)>,
    /// A subtask found the restored snapshot damaged.
    damaged_snapshot: bool,
    /// TaskManagers it runs on.
    taskmanagers: Vec<Arc<dyn TaskManagerGateway>>,
    /// When it was deployed.
    started: Instant,
    /// Its subtasks deployed and not ended; dropping it ends the split enumerators' threads
    /// and the watermark aligner's.
    running: crate::splits::Running,
}

struct Runtime {
    status: JobStatus,
    attempt: Option<Attempt>,
    /// Earliest start of the next attempt (while created or restarting).
    next_start: Instant,
    cancel_requested: bool,
    /// Generation of the job's first attempt: checkpoints of this generation or later are its
    /// own (restarts resume from them).
    first_generation: Option<u64>,
    restored_from: Option<String>,
    /// The trace id of the current attempt's deployment.
    trace_id: Option<String>,
    /// Snapshots an attempt found damaged while restoring them; no restart uses them again.
    damaged: HashSet<String>,
    /// Checkpoint history of the last attempt that ended (kept so that a stopped job still
    /// shows the savepoint it stopped with).
    last_history: Vec<CheckpointStats>,
    /// The waiting message last logged, so it is logged once.
    logged_wait: Option<String>,
    /// What the restart strategy remembers of the failures so far.
    restart_history: RestartHistory,
    /// When it ended.
    ended_at: Option<Instant>,
    /// The failed attempts, newest last (at most [`RETAINED_EXCEPTIONS`]).
    exceptions: VecDeque<JobException>,
}

/// Lost TaskManagers the JobManager keeps listing.
pub const RETAINED_LOST_TASKMANAGERS: usize = 16;

/// Failed attempts a job keeps in its exception history.
pub const RETAINED_EXCEPTIONS: usize = 32;

/// How long a job waits to start again when its attempt's own threads could not be started.
const HELPER_RETRY: Duration = Duration::from_secs(1);

struct JobEntry {
    id: JobId,
    plan: Arc<Plan>,
    options: SubmitOptions,
    restart: RestartSpec,
    rt: Mutex<Runtime>,
    changed: Condvar,
    /// Checkpoint counts over all attempts.
    totals: Arc<CheckpointTotals>,
    /// Recent counter samples, for rates.
    samples: Mutex<RateWindow>,
}

impl JobEntry {
    fn rt(&self) -> MutexGuard<'_, Runtime> {
        self.rt.lock()
    }
}

/// A handle on a submitted job.
#[derive(Clone)]
pub struct JobHandle {
    /// Its id.
    pub id: JobId,
    entry: Arc<JobEntry>,
    jm: Arc<Inner>,
}

impl JobHandle {
    /// The planned graph.
    pub fn plan(&self) -> &Plan {
        &self.entry.plan
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        let mut s = self.entry.rt().status.clone();
        if !s.state.is_terminal() {
            s.duration = s.started.elapsed();
        }
        s
    }

    /// Waits until the job ended, or the timeout passes.
    pub fn wait_timeout(&self, timeout: Duration) -> JobStatus {
        let mut guard = self.entry.rt();
        self.entry
            .changed
            .wait_while_for(&mut guard, |r| !r.status.state.is_terminal(), timeout);
        drop(guard);
        self.status()
    }

    /// Waits until the job ended.
    pub fn wait(&self) -> JobStatus {
        let mut guard = self.entry.rt();
        self.entry
            .changed
            .wait_while(&mut guard, |r| !r.status.state.is_terminal());
        drop(guard);
        self.status()
    }

    /// Cancels the job: its subtasks are cancelled, and the job is cancelled once they ended.
    pub fn cancel(&self) {
        let mut rt = self.entry.rt();
        if rt.status.state.is_terminal() {
            return;
        }
        rt.cancel_requested = true;
        match &rt.attempt {
            Some(a) => {
                let tms = a.taskmanagers.clone();
                drop(rt);
                for tm in tms {
                    tm.cancel(&self.id);
                }
            }
            None => {
                end_job(&self.jm, &self.entry, &mut rt, JobState::Cancelled);
            }
        }
    }

    fn coordinator(&self) -> Option<Arc<Coordinator>> {
        self.entry
            .rt()
            .attempt
            .as_ref()
            .and_then(|a| a.coordinator.clone())
    }

    /// The checkpoint history of the current attempt, or of the last one once the job ended
    /// (empty when the job takes no checkpoints).
    pub fn checkpoints(&self) -> Vec<CheckpointStats> {
        match self.coordinator() {
            Some(c) => c.history(),
            None => self.entry.rt().last_history.clone(),
        }
    }

    /// Checkpoint counts over all the job's attempts.
    pub fn checkpoint_totals(&self) -> Totals {
        self.entry.totals.get()
    }

    /// The trace id of the current attempt's deployment (`None` without tracing).
    pub fn trace_id(&self) -> Option<String> {
        self.entry.rt().trace_id.clone()
    }

    /// The checkpoint or savepoint the current attempt started from.
    pub fn restored_from(&self) -> Option<String> {
        self.entry.rt().restored_from.clone()
    }

    /// Triggers a savepoint into a new directory under `dir` (default: the job's
    /// `checkpointing.savepoint_dir`); with `stop`, the job stops once it completes. Its trace is
    /// a child of the caller's `trace` (a W3C `traceparent`) when given. Waits for the outcome
    /// and returns the savepoint's location.
    pub fn savepoint(
        &self,
        dir: Option<&str>,
        stop: bool,
        trace: Option<&str>,
    ) -> Result<String, String> {
        let (_, _, rx) = self.trigger_savepoint(dir, stop, trace)?;
        rx.recv()
            .unwrap_or_else(|_| Err("the job ended before the savepoint completed".into()))
    }

    /// Triggers a savepoint into a new directory under `dir` (the job's savepoint directory if
    /// `None`) without waiting for it: its id, its location once completed, and a channel that
    /// yields the outcome. Its progress is also in [`JobHandle::checkpoints`].
    #[allow(clippy::type_complexity)]
    pub fn trigger_savepoint(
        &self,
        dir: Option<&str>,
        stop: bool,
        trace: Option<&str>,
    ) -> Result<
        (
            u64,
            String,
            crossbeam_channel::Receiver<Result<String, String>>,
        ),
        String,
    > {
        let spec = &self.entry.plan.spec;
        let Some(cp) = &spec.checkpointing else {
            return Err("the job has no checkpointing section; savepoints need one".into());
        };
        let Some(c) = self.coordinator() else {
            return Err(format!(
                "the job is {}; savepoints need it running",
                self.status().state.name()
            ));
        };
        let dir = dir.unwrap_or(&cp.savepoint_dir);
        let base = &self.entry.plan.base_dir;
        let parent = Storage::open(dir, base, &s3_options(spec)?).map_err(|e| e.to_string())?;
        let name = format!(
            "savepoint-{}-{}",
            spec.name,
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ")
        );
        let target = parent.child(&name).url().to_string();
        let (id, rx) = c.savepoint(target.clone(), stop, trace)?;
        Ok((id, target, rx))
    }

    /// The attempts that failed, newest last.
    pub fn exceptions(&self) -> Vec<JobException> {
        self.entry.rt().exceptions.iter().cloned().collect()
    }

    /// Where the current attempt's subtasks run (`None` between attempts).
    pub fn placement(&self) -> Option<Arc<Placement>> {
        self.entry
            .rt()
            .attempt
            .as_ref()
            .map(|a| a.placement.clone())
    }

    /// Counters of every subtask with their rates over the last seconds (see [`RateWindow`]).
    pub fn metrics_with_rates(&self) -> (BTreeMap<(usize, u32), MetricsSnapshot>, Option<Rates>) {
        let metrics = self.metrics();
        let attempt = self.entry.rt().status.attempt;
        let rates = self
            .entry
            .samples
            .lock()
            .sample(Instant::now(), attempt, &metrics);
        (metrics, rates)
    }

    /// Live counters of every running subtask, plus final counters of finished ones.
    pub fn metrics(&self) -> BTreeMap<(usize, u32), MetricsSnapshot> {
        let (mut out, tms) = {
            let rt = self.entry.rt();
            let tms = rt
                .attempt
                .as_ref()
                .map(|a| a.taskmanagers.clone())
                .unwrap_or_default();
            (rt.status.finished.clone(), tms)
        };
        for tm in tms {
            for s in tm.metrics(&self.id) {
                out.entry((s.vertex, s.subtask)).or_insert(s.metrics);
            }
        }
        out
    }
}

struct Inner {
    /// Leader epoch: sent with every request to TaskManagers, which refuse older epochs.
    epoch: u64,
    taskmanagers: Mutex<Vec<Arc<dyn TaskManagerGateway>>>,
    jobs: Mutex<HashMap<JobId, Arc<JobEntry>>>,
    /// Per job name, the number the next job id tries first.
    next_ids: Mutex<HashMap<String, u64>>,
    store: Option<JobStore>,
    events: Sender<TaskEvent>,
    /// Slots each job's running attempt holds, per TaskManager id.
    allocations: Mutex<HashMap<JobId, HashMap<String, usize>>>,
    /// TaskManagers lost lately, newest last (at most [`RETAINED_LOST_TASKMANAGERS`]).
    lost: Mutex<VecDeque<TaskManagerView>>,
    /// Wakes the scheduler (a TaskManager registered, a job is waiting).
    wake: (Mutex<bool>, Condvar),
}

impl Inner {
    fn wake(&self) {
        *self.wake.0.lock() = true;
        self.wake.1.notify_all();
    }

    fn jobs(&self) -> Vec<Arc<JobEntry>> {
        self.jobs.lock().values().cloned().collect()
    }

    fn taskmanagers(&self) -> Vec<Arc<dyn TaskManagerGateway>> {
        self.taskmanagers.lock().clone()
    }
}

/// The JobManager.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl JobManager {
    /// A JobManager with leader epoch `epoch` (0 when it is the only one), keeping jobs in
    /// `store` when given. TaskManagers join with [`JobManager::register`] and report on
    /// [`JobManager::event_sender`].
    pub fn new(epoch: u64, store: Option<JobStore>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            epoch,
            taskmanagers: Mutex::new(Vec::new()),
            jobs: Mutex::new(HashMap::new()),
            next_ids: Mutex::new(HashMap::new()),
            store,
            events: tx,
            allocations: Mutex::new(HashMap::new()),
            lost: Mutex::new(VecDeque::new()),
            wake: (Mutex::new(false), Condvar::new()),
        });
        let dispatcher = inner.clone();
        std::thread::Builder::new()
            .name("jobmanager-events".into())
            .spawn(move || dispatch(dispatcher, rx))
            .expect("spawning the JobManager event thread");
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("jobmanager-scheduler".into())
            .spawn(move || schedule_loop(weak))
            .expect("spawning the JobManager scheduler");
        let weak = Arc::downgrade(&inner);
        crate::metrics::register(
            &opentelemetry::global::meter("freshet"),
            Arc::new(move || {
                weak.upgrade()
                    .map(|inner| JobManager { inner }.jobs())
                    .unwrap_or_default()
            }),
        );
        JobManager { inner }
    }

    /// A JobManager with TaskManagers in its own process (the local mode): `start` makes them,
    /// given the channel they report on.
    pub fn with_local_taskmanagers(
        start: impl FnOnce(Sender<TaskEvent>) -> Vec<Arc<dyn TaskManagerGateway>>,
    ) -> Self {
        let jm = JobManager::new(0, None);
        for tm in start(jm.event_sender()) {
            jm.register(tm);
        }
        jm
    }

    /// The leader epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// The sender TaskManagers report on.
    pub fn event_sender(&self) -> Sender<TaskEvent> {
        self.inner.events.clone()
    }

    /// Adds a TaskManager (replacing one with the same id, whose subtasks are then lost).
    pub fn register(&self, tm: Arc<dyn TaskManagerGateway>) {
        let old = {
            let mut tms = self.inner.taskmanagers.lock();
            let old = tms
                .iter()
                .position(|t| t.id() == tm.id())
                .map(|i| tms.remove(i));
            info!(
                taskmanager = tm.id(),
                slots = tm.slots(),
                "TaskManager registered"
            );
            tms.push(tm.clone());
            old
        };
        if let Some(old) = old {
            lose_taskmanager(&self.inner, &old, "it registered again (restarted)");
        }
        self.inner.wake();
    }

    /// Removes a TaskManager; its subtasks count as failed with `reason`.
    pub fn unregister(&self, id: &str, reason: &str) {
        let old = {
            let mut tms = self.inner.taskmanagers.lock();
            tms.iter().position(|t| t.id() == id).map(|i| tms.remove(i))
        };
        if let Some(old) = old {
            lose_taskmanager(&self.inner, &old, reason);
        }
    }

    /// The TaskManagers lost lately, newest last.
    pub fn lost_taskmanagers(&self) -> Vec<TaskManagerView> {
        self.inner.lost.lock().iter().cloned().collect()
    }

    /// The registered TaskManagers.
    pub fn taskmanagers(&self) -> Vec<Arc<dyn TaskManagerGateway>> {
        self.inner.taskmanagers()
    }

    /// Slots in use per TaskManager id: by which job, how many.
    pub fn slots_in_use(&self) -> HashMap<String, Vec<(JobId, usize)>> {
        let mut out: HashMap<String, Vec<(JobId, usize)>> = HashMap::new();
        for (job, slots) in self.inner.allocations.lock().iter() {
            for (tm, n) in slots {
                out.entry(tm.clone()).or_default().push((job.clone(), *n));
            }
        }
        out
    }

    /// Every job this JobManager knows, oldest first.
    pub fn jobs(&self) -> Vec<JobHandle> {
        let jobs = self.inner.jobs.lock();
        let mut out: Vec<JobHandle> = jobs
            .values()
            .map(|entry| JobHandle {
                id: entry.id.clone(),
                entry: entry.clone(),
                jm: self.inner.clone(),
            })
            .collect();
        out.sort_by_key(|j| j.status().started);
        out
    }

    /// The job with this id, or the newest job with this name.
    pub fn job(&self, id_or_name: &str) -> Option<JobHandle> {
        let jobs = self.jobs();
        jobs.iter()
            .find(|j| j.id.0 == id_or_name)
            .or_else(|| {
                jobs.iter()
                    .rev()
                    .find(|j| j.entry.plan.spec.name == id_or_name)
            })
            .cloned()
    }

    /// Plans a job and schedules it.
    pub fn submit(&self, spec: JobSpec, base_dir: PathBuf) -> Result<JobHandle, SubmitError> {
        self.submit_with(spec, base_dir, SubmitOptions::default())
    }

    /// Plans a job and schedules it, from a snapshot if asked or if its checkpoints hold one.
    /// The snapshot to restore is checked now, so a bad one is refused instead of failing later.
    pub fn submit_with(
        &self,
        spec: JobSpec,
        base_dir: PathBuf,
        options: SubmitOptions,
    ) -> Result<JobHandle, SubmitError> {
        let id = self.new_id(&spec.name);
        self.add(id, spec, base_dir, options, None)
    }

    /// What [`JobManager::submit_with`] checks before it accepts a job, without submitting it:
    /// the plan, and whether the snapshot to restore (if any) fits it (operators matched by
    /// name, key groups, state bound to a parallelism). The dry run of an upgrade.
    pub fn check(
        &self,
        spec: &JobSpec,
        base_dir: &Path,
        options: &SubmitOptions,
    ) -> Result<(), SubmitError> {
        let plan = plan(spec, base_dir).map_err(SubmitError::Invalid)?;
        if let Some(r) = &options.restore {
            load_named(&plan, r, options)?;
        }
        Ok(())
    }

    /// Resumes the unfinished jobs of the job store (after this JobManager took over).
    pub fn resume_stored(&self) -> Result<usize, String> {
        let Some(store) = &self.inner.store else {
            return Ok(0);
        };
        let mut n = 0;
        for record in store.list()? {
            if record.ended {
                continue;
            }
            let id = JobId(record.id.clone());
            info!(job = %id, "resuming a job the previous JobManager ran");
            match self.add(
                id.clone(),
                record.spec,
                PathBuf::from(&record.base_dir),
                record.options,
                // attempts continue after the previous JobManager's, so nothing of theirs
                // (channels, reports) is mistaken for the new attempt's. Generations start
                // at 1: a 0 means the job never started (or takes no checkpoints), so it
                // starts as it was submitted (`--fresh`, `--restore`) rather than from
                // whatever its checkpoint directory holds.
                Some((
                    (record.first_generation > 0).then_some(record.first_generation),
                    record.attempt + 1,
                )),
            ) {
                Ok(_) => n += 1,
                Err(e) => {
                    warn!(job = %id, error = %e, "cannot resume the job; marking it failed");
                    let _ = store.mark_ended(&id.0, &format!("failed: {e}"));
                }
            }
        }
        Ok(n)
    }

    fn new_id(&self, name: &str) -> JobId {
        let jobs = self.inner.jobs.lock();
        let stored: HashSet<String> = self
            .inner
            .store
            .as_ref()
            .and_then(|s| s.ids().ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        // numbers only grow, so the id of a job that was forgotten is never given again
        let mut next = self.inner.next_ids.lock();
        let first = next.get(name).copied().unwrap_or(0);
        let (n, id) = (first..)
            .map(|n| (n, JobId(format!("{name}-{n}"))))
            .find(|(_, id)| !jobs.contains_key(id) && !stored.contains(&id.0))
            .expect("a free id");
        next.insert(name.to_string(), n + 1);
        id
    }

    fn add(
        &self,
        id: JobId,
        spec: JobSpec,
        base_dir: PathBuf,
        options: SubmitOptions,
        resume: Option<(Option<u64>, u32)>,
    ) -> Result<JobHandle, SubmitError> {
        let first_generation = resume.and_then(|r| r.0);
        let plan = Arc::new(plan(&spec, &base_dir).map_err(SubmitError::Invalid)?);
        // check the snapshot to restore now: a bad one is the submitter's problem
        if resume.is_none()
            && let Some(r) = &options.restore
        {
            load_named(&plan, r, &options)?;
        }
        let restart = spec
            .restart
            .clone()
            .unwrap_or_else(|| RestartSpec::default_for(spec.checkpointing.is_some()));
        let entry = Arc::new(JobEntry {
            id: id.clone(),
            plan: plan.clone(),
            options: options.clone(),
            restart,
            totals: Default::default(),
            rt: Mutex::new(Runtime {
                status: JobStatus {
                    state: JobState::Created,
                    message: None,
                    started: Instant::now(),
                    duration: Duration::ZERO,
                    attempt: resume.map(|r| r.1).unwrap_or(0),
                    restarts: 0,
                    finished: BTreeMap::new(),
                    accumulators: BTreeMap::new(),
                },
                attempt: None,
                next_start: Instant::now(),
                cancel_requested: false,
                first_generation,
                restored_from: None,
                trace_id: None,
                damaged: HashSet::new(),
                last_history: Vec::new(),
                logged_wait: None,
                restart_history: RestartHistory::default(),
                ended_at: None,
                exceptions: VecDeque::new(),
            }),
            samples: Default::default(),
            changed: Condvar::new(),
        });
        if let Some(store) = &self.inner.store {
            let record = JobRecord {
                id: id.0.clone(),
                spec: spec.clone(),
                base_dir: base_dir.to_string_lossy().into_owned(),
                options,
                first_generation: first_generation.unwrap_or(0),
                attempt: 0,
                ended: false,
                outcome: None,
            };
            store.put(&record).map_err(SubmitError::State)?;
        }
        self.inner.jobs.lock().insert(id.clone(), entry.clone());
        info!(job = %id, slots = plan.slots_needed(), "job accepted");
        // deploy now if the slots are there, so `submit` returns a running job when it can
        try_start(&self.inner, &entry);
        Ok(JobHandle {
            id,
            entry,
            jm: self.inner.clone(),
        })
    }
}

/// Starts the next attempt of a waiting job if its time has come and the slots are free.
fn try_start(inner: &Arc<Inner>, entry: &Arc<JobEntry>) {
    let mut rt = entry.rt();
    if rt.attempt.is_some() || rt.status.state.is_terminal() || Instant::now() < rt.next_start {
        return;
    }
    if rt.cancel_requested {
        end_job(inner, entry, &mut rt, JobState::Cancelled);
        return;
    }
    let plan = &entry.plan;
    let needed = plan.slots_needed() as usize;
    // free slots per TaskManager: offered minus those used by other jobs' attempts
    let tms: Vec<_> = inner
        .taskmanagers()
        .into_iter()
        .filter(|t| t.lost().is_none())
        .collect();
    let mut used: HashMap<String, usize> = HashMap::new();
    for (job, slots) in inner.allocations.lock().iter() {
        if *job != entry.id {
            for (tm, n) in slots {
                *used.entry(tm.clone()).or_default() += n;
            }
        }
    }
    let free: Vec<usize> = tms
        .iter()
        .map(|t| (t.slots() as usize).saturating_sub(used.get(t.id()).copied().unwrap_or(0)))
        .collect();
    let available: usize = free.iter().sum();
    if available < needed {
        let msg = format!(
            "waiting for {needed} free slots; {} TaskManager(s) offer {available} free",
            tms.len()
        );
        if rt.logged_wait.as_deref() != Some(&msg) {
            info!(job = %entry.id, "{msg}");
            rt.logged_wait = Some(msg.clone());
        }
        rt.status.message = Some(msg);
        entry.changed.notify_all();
        return;
    }
    // slot k hosts subtask k of every vertex; slots are taken round-robin over TaskManagers
    let mut owner = Vec::with_capacity(needed);
    let mut left = free.clone();
    while owner.len() < needed {
        for (t, l) in left.iter_mut().enumerate() {
            if *l > 0 && owner.len() < needed {
                *l -= 1;
                owner.push(t);
            }
        }
    }
    let number = rt.status.attempt;
    // the first attempt to take checkpoints fixes the job's first generation; until then the
    // job starts as it was submitted
    let start = match rt.first_generation {
        None => match (&entry.options.restore, entry.options.ignore_checkpoints) {
            (Some(l), _) => Start::From(l.clone()),
            (None, false) => Start::Latest,
            (None, true) => Start::Fresh,
        },
        Some(since) => Start::OwnLatest {
            since,
            or: rt.restored_from.clone().or(entry.options.restore.clone()),
        },
    };
    // the deployment's trace (the first, or a restart's recovery): the subtasks record how long
    // opening and restoring their state took under it
    let span = info_span!(
        parent: None,
        "job.deploy",
        trace_id = tracing::field::Empty,
        job = %entry.id,
        attempt = number,
        restart = rt.status.restarts > 0,
        restored_from = tracing::field::Empty,
    );
    let submitted = entry
        .options
        .trace
        .as_deref()
        .filter(|_| rt.status.restarts == 0);
    freshet_engine::trace::follow(&span, submitted);
    rt.trace_id = freshet_engine::trace::trace_id(&span);
    let _enter = span.enter();
    let startup = match prepare_state(
        plan,
        &start,
        entry.options.allow_non_restored_state,
        &rt.damaged,
    ) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("preparing state: {e}");
            warn!("{msg}");
            end_job(inner, entry, &mut rt, JobState::Failed(msg));
            return;
        }
    };
    if rt.first_generation.is_none() {
        rt.first_generation = startup.checkpoints.as_ref().map(|c| c.1);
    }
    if let Some(store) = &inner.store
        && let Err(e) = store.started(&entry.id.0, number, rt.first_generation.unwrap_or(0))
    {
        warn!(error = %e, "cannot record the job's attempt in the job store");
    }
    rt.restored_from = startup.restore.as_ref().map(|r| r.location.clone());
    if let Some(from) = &rt.restored_from {
        span.record("restored_from", from.as_str());
    }
    if let Some(r) = startup.restore.as_ref().filter(|r| r.metadata.end_of_input) {
        // allowed (its state can still be read, and a job may only want what it kept), but
        // rarely what a job that goes on over new input wants
        warn!(
            location = %r.location,
            "restoring the checkpoint taken when the job's input ended: its event time is at \
             the end, so every record that comes now is too late for its windows (it goes to \
             their late outputs) and every TTL has passed; to go on where the input was, \
             restore a savepoint or checkpoint taken before the end"
        );
    }
    let placement: Arc<Placement> = Arc::new(
        plan.vertices
            .iter()
            .enumerate()
            .flat_map(|(v, vx)| (0..vx.parallelism).map(move |i| (v, i)))
            .map(|(v, i)| {
                let tm = &tms[owner[i as usize]];
                (
                    (v, i),
                    SubtaskLocation {
                        taskmanager: tm.id().to_string(),
                        data_address: tm.data_address(),
                    },
                )
            })
            .collect(),
    );
    let by_id: HashMap<String, Arc<dyn TaskManagerGateway>> = tms
        .iter()
        .map(|t| (t.id().to_string(), t.clone()))
        .collect();
    let spec = plan.spec.clone();
    let command: crate::splits::Deliver = {
        let job = entry.id.clone();
        let placement = placement.clone();
        let by_id = by_id.clone();
        Arc::new(move |v: usize, i: u32, cmd: SubtaskCommand| {
            placement
                .get(&(v, i))
                .and_then(|l| by_id.get(&l.taskmanager))
                .is_some_and(|tm| tm.command(&job, v, i, cmd))
        })
    };
    let coordinator = startup
        .checkpoints
        .as_ref()
        .map(|(setup, generation, existing, last_id)| {
            let c = spec.checkpointing.clone().expect("checkpointing section");
            let settings = CoordinatorSettings {
                spec: c,
                job: spec.name.clone(),
                max_parallelism: spec.max_parallelism,
                subtasks: plan
                    .vertices
                    .iter()
                    .enumerate()
                    .flat_map(|(v, vx)| {
                        let source = plan.is_source(v);
                        (0..vx.parallelism).map(move |i| (v, i, source))
                    })
                    .collect(),
                s3: setup.s3.clone(),
                totals: entry.totals.clone(),
            };
            let command = command.clone();
            let send = Arc::new(move |v: usize, i: u32, cmd: SubtaskCommand| {
                command(v, i, cmd);
            });
            let weak = Arc::downgrade(inner);
            let job = entry.id.clone();
            let fail = Arc::new(move |msg: String, retryable: bool| {
                if let Some(inner) = weak.upgrade() {
                    fail_attempt(&inner, &job, msg, retryable);
                }
            });
            Coordinator::new(
                settings,
                setup.storage.clone(),
                *generation,
                existing,
                *last_id,
                send,
                fail,
            )
        });
    let spec_state = &spec.state;
    let state_root = spec_state
        .local_dir
        .as_ref()
        .map(|d| plan.base_dir.join(d))
        .unwrap_or_else(|| std::env::temp_dir().join("freshet-state"));
    let state = StateConfig {
        local_dir: state_root,
        memory_bytes: spec_state.memory_mb << 20,
        cache_keys: spec_state.cache_keys,
        write_buffer_bytes: spec_state.write_buffer_mb() << 20,
        memory: None,
        slot: 0,
    };
    let mut used_tms: Vec<Arc<dyn TaskManagerGateway>> = Vec::new();
    for t in &owner {
        if !used_tms.iter().any(|u| u.id() == tms[*t].id()) {
            used_tms.push(tms[*t].clone());
        }
    }
    // the attempt's own threads: split discovery and watermark alignment. Without them new
    // splits go unread and aligned sources stop after a batch, so the attempt waits for them;
    // threads already started end with `running`
    let running: crate::splits::Running = Arc::default();
    let helpers = match freshet_plan::split_enumerators(plan) {
        Ok(sources) => crate::splits::start(&entry.id.0, sources, &running, command.clone()),
        Err(e) => {
            warn!(error = %e, "splits found while running will not be read");
            Ok(())
        }
    }
    .and_then(
        |()| match crate::alignment::Aligner::new(plan, command.clone()) {
            Some(aligner) => aligner.start(entry.id.clone(), used_tms.clone(), &running),
            None => Ok(()),
        },
    );
    if let Err(e) = helpers {
        let msg =
            format!("cannot start the attempt's threads ({e}); trying again in {HELPER_RETRY:?}");
        warn!(job = %entry.id, "{msg}");
        rt.status.message = Some(msg);
        rt.next_start = Instant::now() + HELPER_RETRY;
        entry.changed.notify_all();
        return;
    }
    inner
        .allocations
        .lock()
        .insert(entry.id.clone(), slots_per_taskmanager(&placement));
    rt.attempt = Some(Attempt {
        number,
        placement: placement.clone(),
        coordinator: coordinator.clone(),
        total: plan.subtask_count() as usize,
        ended: HashSet::new(),
        failure: None,
        damaged_snapshot: false,
        taskmanagers: used_tms,
        started: Instant::now(),
        running: running.clone(),
    });
    rt.status.state = JobState::Running;
    rt.status.message = None;
    rt.logged_wait = None;
    rt.status.finished.clear();
    rt.status.accumulators.clear();
    entry.changed.notify_all();
    info!(
        vertices = plan.vertices.len(),
        subtasks = plan.subtask_count(),
        slots = needed,
        restored_from = rt.restored_from.as_deref().unwrap_or("-"),
        "deploying"
    );
    drop(rt);
    let trace = freshet_engine::trace::traceparent(&span);
    for (v, vertex) in plan.vertices.iter().enumerate() {
        for i in 0..vertex.parallelism {
            let tm = &tms[owner[i as usize]];
            let d = TaskDeployment {
                job: entry.id.clone(),
                attempt: number,
                plan: plan.clone(),
                vertex: v,
                subtask: i,
                state: state.clone(),
                checkpoints: startup.checkpoints.as_ref().map(|c| c.0.clone()),
                restore: startup.restore.clone(),
                placement: placement.clone(),
                trace: trace.clone(),
            };
            // commands sent after the deployment reach the subtask (they queue behind it)
            running.lock().insert((v, i));
            if let Err(error) = tm.deploy(d) {
                running.lock().remove(&(v, i));
                let _ = inner.events.send(TaskEvent {
                    job: entry.id.clone(),
                    attempt: number,
                    vertex: v,
                    subtask: i,
                    state: TaskState::lost(format!(
                        "deploying on TaskManager {}: {error}",
                        tm.id()
                    )),
                });
            }
        }
    }
    if let Some(c) = coordinator {
        c.start();
    }
}

fn slots_per_taskmanager(p: &Placement) -> HashMap<String, usize> {
    let mut slots: HashMap<String, HashSet<u32>> = HashMap::new();
    for ((_, i), l) in p {
        slots.entry(l.taskmanager.clone()).or_default().insert(*i);
    }
    slots.into_iter().map(|(k, v)| (k, v.len())).collect()
}

/// Ends a job for good.
fn end_job(inner: &Inner, entry: &JobEntry, rt: &mut Runtime, state: JobState) {
    if rt.status.state.is_terminal() {
        return;
    }
    rt.status.duration = rt.status.started.elapsed();
    info!(job = %entry.id, state = ?state, duration = ?rt.status.duration, "job ended");
    if let Some(store) = &inner.store {
        let outcome = match &state {
            JobState::Failed(e) => format!("failed: {e}"),
            s => s.name().to_string(),
        };
        if let Err(e) = store.mark_ended(&entry.id.0, &outcome) {
            warn!(job = %entry.id, error = %e, "cannot record the job's end");
        }
    }
    rt.status.state = state;
    rt.status.message = None;
    rt.ended_at = Some(Instant::now());
    entry.changed.notify_all();
    inner.wake();
}

/// Forgets the oldest ended jobs beyond [`RETAINED_ENDED_JOBS`].
fn forget_old_jobs(inner: &Inner) {
    let mut ended: Vec<(Instant, JobId)> = inner
        .jobs()
        .iter()
        .filter_map(|e| e.rt().ended_at.map(|t| (t, e.id.clone())))
        .collect();
    if ended.len() <= RETAINED_ENDED_JOBS {
        return;
    }
    ended.sort();
    let forget = ended.len() - RETAINED_ENDED_JOBS;
    let mut jobs = inner.jobs.lock();
    for (_, id) in ended.into_iter().take(forget) {
        jobs.remove(&id);
    }
}

/// The scheduler: starts waiting jobs, notices lost TaskManagers.
fn schedule_loop(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        for tm in inner.taskmanagers() {
            if let Some(reason) = tm.lost() {
                let removed = {
                    let mut tms = inner.taskmanagers.lock();
                    let before = tms.len();
                    tms.retain(|t| !Arc::ptr_eq(t, &tm));
                    before != tms.len()
                };
                if removed {
                    lose_taskmanager(&inner, &tm, &reason);
                }
            }
        }
        let jobs = inner.jobs();
        for entry in jobs {
            try_start(&inner, &entry);
        }
        forget_old_jobs(&inner);
        let (lock, cv) = &inner.wake;
        let mut woken = lock.lock();
        if !*woken {
            cv.wait_for(&mut woken, Duration::from_millis(200));
        }
        *woken = false;
    }
}

/// A TaskManager is gone: every subtask it ran counts as failed.
fn lose_taskmanager(inner: &Inner, tm: &Arc<dyn TaskManagerGateway>, reason: &str) {
    warn!(taskmanager = tm.id(), reason, "TaskManager lost");
    {
        let mut lost = inner.lost.lock();
        if lost.len() == RETAINED_LOST_TASKMANAGERS {
            lost.pop_front();
        }
        lost.push_back(TaskManagerView {
            id: tm.id().to_string(),
            slots: tm.slots(),
            slots_used: 0,
            jobs: BTreeMap::new(),
            data_address: tm.data_address(),
            lost: Some(reason.to_string()),
            lost_at_ms: Some(chrono::Utc::now().timestamp_millis()),
        });
    }
    let jobs = inner.jobs();
    for entry in jobs {
        let rt = entry.rt();
        let Some(a) = &rt.attempt else { continue };
        for ((v, i), l) in a.placement.iter() {
            if l.taskmanager == tm.id() && !a.ended.contains(&(*v, *i)) {
                let _ = inner.events.send(TaskEvent {
                    job: entry.id.clone(),
                    attempt: a.number,
                    vertex: *v,
                    subtask: *i,
                    state: TaskState::lost(format!("TaskManager {} lost: {reason}", tm.id())),
                });
            }
        }
    }
}

/// Fails a running attempt with `msg`, a condition outside any subtask: fenced by a newer run
/// (not `retryable`: the job ends), or too many failed checkpoints (the restart strategy decides).
fn fail_attempt(inner: &Arc<Inner>, job: &JobId, msg: String, retryable: bool) {
    let Some(entry) = inner.jobs.lock().get(job).cloned() else {
        return;
    };
    let tms = {
        let mut rt = entry.rt();
        let Some(a) = rt.attempt.as_mut() else { return };
        if a.failure.is_none() || (!retryable && a.failure.as_ref().is_some_and(|f| f.2)) {
            warn!(job = %job, error = %msg, "failing the attempt");
            a.failure = Some((msg, true, retryable));
        }
        a.taskmanagers.clone()
    };
    for tm in tms {
        tm.cancel(job);
    }
}

fn dispatch(jm: Arc<Inner>, rx: Receiver<TaskEvent>) {
    for ev in rx {
        let Some(entry) = jm.jobs.lock().get(&ev.job).cloned() else {
            continue;
        };
        let mut rt = entry.rt();
        let Some(a) = rt.attempt.as_mut() else {
            continue;
        };
        if ev.attempt != a.number {
            continue;
        }
        if let TaskState::Checkpoint(report) = ev.state {
            if let Some(c) = a.coordinator.clone() {
                drop(rt);
                c.report(ev.vertex, ev.subtask, report);
            }
            continue;
        }
        if matches!(ev.state, TaskState::Running) {
            continue;
        }
        a.running.lock().remove(&(ev.vertex, ev.subtask));
        if !a.ended.insert((ev.vertex, ev.subtask)) {
            continue;
        }
        let name = entry
            .plan
            .vertices
            .get(ev.vertex)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let task = format!("{name}#{}", ev.subtask);
        let mut state = ev.state;
        if let TaskState::Cancelled { metrics } = &state
            && !rt.cancel_requested
            && rt.attempt.as_ref().is_some_and(|a| a.failure.is_none())
        {
            // nobody here asked for it: its TaskManager gave up on this JobManager (missed
            // heartbeats); the subtask's work is lost, as if it had failed
            state = TaskState::Failed {
                error: "cancelled by its TaskManager, which lost contact with the JobManager"
                    .into(),
                root_cause: true,
                retryable: true,
                damaged_snapshot: false,
                metrics: *metrics,
            };
        }
        match state {
            TaskState::Running | TaskState::Checkpoint(_) => {}
            TaskState::Cancelled { metrics } => {
                if let Some(m) = metrics {
                    rt.status.finished.insert((ev.vertex, ev.subtask), m);
                }
            }
            TaskState::Finished {
                metrics,
                accumulators,
            } => {
                rt.status.finished.insert((ev.vertex, ev.subtask), metrics);
                for (k, v) in accumulators {
                    let e = rt.status.accumulators.entry(k).or_insert(0);
                    *e = e.wrapping_add(v);
                }
            }
            TaskState::Failed {
                error,
                root_cause,
                retryable,
                damaged_snapshot,
                metrics,
            } => {
                if let Some(m) = metrics {
                    rt.status.finished.insert((ev.vertex, ev.subtask), m);
                }
                let a = rt.attempt.as_mut().expect("attempt");
                a.damaged_snapshot |= damaged_snapshot;
                let first = a.failure.is_none();
                // a subtask that failed because its consumer went away reports a consequence;
                // the consumer's own error, when it arrives, is the one to report
                if first || (root_cause && !a.failure.as_ref().is_some_and(|f| f.1)) {
                    a.failure = Some((format!("{task}: {error}"), root_cause, retryable));
                    if !first {
                        warn!(job = %ev.job, %task, %error, "the attempt's root cause");
                    }
                }
                if first {
                    let consequence = !root_cause;
                    warn!(job = %ev.job, %task, %error, consequence, "subtask failed; cancelling the attempt");
                    let tms = a.taskmanagers.clone();
                    drop(rt);
                    for tm in tms {
                        tm.cancel(&ev.job);
                    }
                    rt = entry.rt();
                }
            }
        }
        // the attempt's fate is decided once every subtask has ended, so the reported cause is
        // the root cause and not whichever consequence arrived first
        let a = rt.attempt.as_ref().expect("attempt");
        if a.ended.len() < a.total {
            continue;
        }
        let a = rt.attempt.take().expect("attempt");
        if let Some(c) = &a.coordinator {
            c.stop();
            rt.last_history = c.history();
        }
        jm.allocations.lock().remove(&entry.id);
        jm.wake();
        match a.failure {
            _ if rt.cancel_requested => end_job(&jm, &entry, &mut rt, JobState::Cancelled),
            None => end_job(&jm, &entry, &mut rt, JobState::Finished),
            Some((msg, _, mut retryable)) => {
                if a.damaged_snapshot
                    && let Some(location) = rt.restored_from.clone()
                {
                    // an older checkpoint may do
                    warn!(%location, "the restored snapshot is damaged; restarts will not use it");
                    rt.damaged.insert(location);
                    retryable = true;
                }
                let delay = if retryable {
                    let rt = &mut *rt;
                    entry.restart.next_restart(
                        &mut rt.restart_history,
                        Instant::now(),
                        a.started.elapsed(),
                    )
                } else {
                    None
                };
                let exceptions = &mut rt.exceptions;
                if exceptions.len() == RETAINED_EXCEPTIONS {
                    exceptions.pop_front();
                }
                exceptions.push_back(JobException {
                    time_ms: chrono::Utc::now().timestamp_millis(),
                    attempt: a.number,
                    error: msg.clone(),
                    restart_delay_ms: delay.map(|d| d.as_millis() as u64),
                });
                match delay {
                    Some(delay) => {
                        let progress = entry.restart.progress(&rt.restart_history);
                        warn!(
                            job = %ev.job,
                            error = %msg,
                            restart = %progress,
                            delay = ?delay,
                            "attempt failed; restarting"
                        );
                        rt.status.state = JobState::Restarting;
                        rt.status.message = Some(format!("restart {progress} after: {msg}"));
                        rt.status.restarts += 1;
                        rt.status.attempt += 1;
                        rt.next_start = Instant::now() + delay;
                        entry.changed.notify_all();
                        drop(rt);
                        jm.wake();
                    }
                    None => {
                        let msg = match entry.restart.exhausted(&rt.restart_history) {
                            Some(why) if retryable => format!("{msg} ({why})"),
                            _ => msg,
                        };
                        end_job(&jm, &entry, &mut rt, JobState::Failed(msg))
                    }
                }
            }
        }
    }
}

/// What an attempt starts with: its checkpoint storage (with the attempt's generation, the
/// retained checkpoints and the last id used) and the snapshot to restore.
struct Startup {
    checkpoints: Option<(
        CheckpointSetup,
        u64,
        Vec<freshet_engine::checkpoint::CheckpointMetadata>,
        u64,
    )>,
    restore: Option<Arc<RestoreSource>>,
}

/// Why a snapshot was not restored.
enum Unusable {
    /// Its files are missing or damaged: an older one may do.
    Damaged(String),
    /// The job cannot take it (another job's state, an unreadable location): said to the user.
    Refused(SubmitError),
}

/// Loads a snapshot to restore, checks that the job can take its state and that every file it
/// references is stored with the recorded size.
fn load_verified(
    plan: &Plan,
    location: &str,
    options: &SubmitOptions,
) -> Result<RestoreSource, Unusable> {
    let r = load_restore(plan, location, options)?;
    freshet_engine::checkpoint::verify(&r.metadata, &r.root).map_err(Unusable::Damaged)?;
    Ok(r)
}

/// Loads the snapshot a user named. One that is damaged is refused, naming the job's newest
/// checkpoint that can be restored instead, if it has one.
fn load_named(
    plan: &Plan,
    location: &str,
    options: &SubmitOptions,
) -> Result<RestoreSource, SubmitError> {
    let why = match load_verified(plan, location, options) {
        Ok(r) => return Ok(r),
        Err(Unusable::Refused(e)) => return Err(e),
        Err(Unusable::Damaged(why)) => why,
    };
    let spec = &plan.spec;
    let usable = spec
        .checkpointing
        .as_ref()
        .and_then(|c| Storage::open(&c.dir, &plan.base_dir, &s3_options(spec).ok()?).ok())
        .map(|s| s.child(&spec.name))
        .and_then(|storage| {
            let existing = completed_checkpoints(&storage).ok()?;
            existing.iter().rev().find_map(|m| {
                let c = format!(
                    "{}/{}",
                    storage.url(),
                    freshet_engine::checkpoint::checkpoint_dir(m.id)
                );
                (c != location && load_verified(plan, &c, options).is_ok()).then_some(c)
            })
        });
    Err(SubmitError::State(format!(
        "{location} cannot be restored: {why}{}",
        usable
            .map(|c| format!("; the job's checkpoint {c} can be (--restore {c})"))
            .unwrap_or_default()
    )))
}

/// The first of `candidates` (newest first) that can be restored; damaged ones are reported and
/// skipped. An error when every candidate is damaged.
fn first_usable(
    plan: &Plan,
    candidates: &[String],
    known_damaged: &HashSet<String>,
    options: &SubmitOptions,
) -> Result<Option<RestoreSource>, SubmitError> {
    let mut damaged = Vec::new();
    for location in candidates {
        if known_damaged.contains(location) {
            damaged.push(format!(
                "{location}: a file was found damaged while restoring it"
            ));
            continue;
        }
        match load_verified(plan, location, options) {
            Ok(r) => return Ok(Some(r)),
            Err(Unusable::Refused(e)) => return Err(e),
            Err(Unusable::Damaged(why)) => {
                warn!(%location, problem = %why, "checkpoint cannot be restored; trying the one before it");
                damaged.push(format!("{location}: {why}"));
            }
        }
    }
    if damaged.is_empty() {
        return Ok(None);
    }
    Err(SubmitError::State(format!(
        "no checkpoint of the job can be restored: {}; start it without state (--fresh) or from a savepoint (--restore PATH)",
        damaged.join("; ")
    )))
}

/// Loads a snapshot to restore and checks that the job can take its state.
fn load_restore(
    plan: &Plan,
    location: &str,
    options: &SubmitOptions,
) -> Result<RestoreSource, Unusable> {
    let spec = &plan.spec;
    let s3 = s3_options(spec).map_err(|e| Unusable::Refused(SubmitError::State(e)))?;
    let r = RestoreSource::load(location, &plan.base_dir, &s3).map_err(|e| {
        let msg = format!("restoring {location}: {e}");
        match e {
            freshet_engine::EngineError::Corrupt { .. } => Unusable::Damaged(msg),
            _ => Unusable::Refused(SubmitError::State(msg)),
        }
    })?;
    if r.metadata.job != spec.name {
        warn!(snapshot_job = %r.metadata.job, job = %spec.name, "restoring a snapshot of another job");
    }
    let uids: HashSet<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    let unmatched: Vec<&String> = r
        .metadata
        .operators
        .iter()
        .filter(|(uid, snaps)| {
            !uids.contains(uid.as_str())
                && snaps
                    .iter()
                    .any(|s| !s.files.is_empty() || !s.state.is_empty())
        })
        .map(|(uid, _)| uid)
        .collect();
    if !unmatched.is_empty() && !options.allow_non_restored_state {
        return Err(Unusable::Refused(SubmitError::State(format!(
            "{location} has state of operator(s) {} that the job no longer has; rename them back, or allow dropping that state (--allow-non-restored-state)",
            unmatched
                .iter()
                .map(|u| format!("'{u}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ))));
    }
    // state bound to the parallelism it was taken at, and keyed state split into another
    // number of key groups, cannot be restored: refused now, before anything is deployed
    for node in &plan.nodes {
        if let Some(why) = r
            .metadata
            .operators
            .get(&node.name)
            .and_then(|snaps| fixed_parallelism_conflict(&node.name, snaps, node.parallelism))
        {
            return Err(Unusable::Refused(SubmitError::State(format!(
                "{location} cannot be restored: {why}"
            ))));
        }
    }
    let keyed = r
        .metadata
        .operators
        .values()
        .flatten()
        .any(|s| !s.files.is_empty());
    if keyed && r.metadata.max_parallelism != spec.max_parallelism {
        return Err(Unusable::Refused(SubmitError::State(format!(
            "{location} was taken with max_parallelism {} but the job has {}; keyed state cannot be redistributed across a different number of key groups",
            r.metadata.max_parallelism, spec.max_parallelism
        ))));
    }
    Ok(r)
}

fn prepare_state(
    plan: &Plan,
    start: &Start,
    allow_non_restored_state: bool,
    damaged: &HashSet<String>,
) -> Result<Startup, SubmitError> {
    let spec = &plan.spec;
    let s3 = s3_options(spec).map_err(SubmitError::State)?;
    let mut checkpoints = None;
    // the job's own completed checkpoints to start from, newest first
    let mut own: Vec<String> = Vec::new();
    // every completed checkpoint of the job, newest first
    let mut all: Vec<String> = Vec::new();
    if let Some(c) = &spec.checkpointing {
        let storage = Storage::open(&c.dir, &plan.base_dir, &s3)
            .map_err(|e| SubmitError::State(format!("checkpointing.dir: {e}")))?
            .child(&spec.name);
        let generation = acquire_generation(&storage).map_err(SubmitError::State)?;
        let mut existing = completed_checkpoints(&storage).map_err(SubmitError::State)?;
        // keep the newest `retain`; leftovers of crashed runs (directories without metadata)
        // are removed
        let complete: HashSet<String> = existing
            .iter()
            .map(|m| freshet_engine::checkpoint::checkpoint_dir(m.id))
            .collect();
        let entries = storage
            .list("")
            .map_err(|e| SubmitError::State(e.to_string()))?;
        let mut stale: Vec<String> = entries
            .iter()
            .filter_map(|p| p.split('/').next())
            .filter(|d| d.starts_with("chk-") && !complete.contains(*d))
            .map(str::to_string)
            .collect();
        while existing.len() > c.retain as usize {
            stale.push(freshet_engine::checkpoint::checkpoint_dir(
                existing.remove(0).id,
            ));
        }
        stale.sort();
        stale.dedup();
        for d in stale {
            let _ = storage.delete_dir(&d);
        }
        let last_id = existing.last().map(|m| m.id).unwrap_or(0);
        let since = match start {
            Start::OwnLatest { since, .. } => *since,
            _ => 0,
        };
        for m in existing.iter().rev() {
            let location = format!(
                "{}/{}",
                storage.url(),
                freshet_engine::checkpoint::checkpoint_dir(m.id)
            );
            if m.generation >= since {
                own.push(location.clone());
            }
            all.push(location);
        }
        checkpoints = Some((
            CheckpointSetup {
                storage,
                s3: s3.clone(),
            },
            generation,
            existing,
            last_id,
        ));
    }
    let options = SubmitOptions {
        allow_non_restored_state,
        ..Default::default()
    };
    // newest first; a checkpoint that fails verification gives way to the next older one, but
    // a location the user named is used or refused
    let restore = match start {
        Start::Fresh => None,
        Start::From(l) if damaged.contains(l) => {
            return Err(SubmitError::State(format!(
                "{l} cannot be restored: a file of it was found damaged while restoring it"
            )));
        }
        Start::From(l) => Some(load_named(plan, l, &options)?),
        Start::Latest => first_usable(plan, &own, damaged, &options)?,
        Start::OwnLatest { or, .. } => {
            own.extend(or.iter().cloned());
            // what the job first restored is damaged: the checkpoints before it may do
            if let Some(or) = or.as_ref().filter(|or| damaged.contains(*or))
                && let Some(at) = all.iter().position(|c| c == or)
            {
                own.extend(all[at + 1..].iter().cloned());
            }
            first_usable(plan, &own, damaged, &options)?
        }
    };
    let restore = restore.map(|mut r| {
        if let Some((setup, _, _, last_id)) = checkpoints.as_mut() {
            r.shared_with_job = r.metadata.kind
                == freshet_engine::checkpoint::SnapshotKind::Checkpoint
                && r.root.url() == setup.storage.url();
            *last_id = (*last_id).max(r.metadata.id);
        }
        Arc::new(r)
    });
    Ok(Startup {
        checkpoints,
        restore,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str) -> JobSpec {
        freshet_connectors::job_format().parse(
            &format!(
                "version: 1\nname: {name}\nsources:\n  s: {{connector: {{type: generator, fields: {{a: seq}}}}}}\nsinks:\n  o: {{input: s, connector: {{type: blackhole}}}}\n"
            ),
            "job.yaml",
            &[],
        )
        .unwrap()
    }

    #[test]
    fn only_the_newest_ended_jobs_are_kept() {
        // no TaskManagers: every job waits for slots until it is cancelled
        let jm = JobManager::new(0, None);
        let waiting = jm.submit(job("waiting"), std::env::temp_dir()).unwrap();
        let total = RETAINED_ENDED_JOBS + 3;
        let mut ids = Vec::new();
        for _ in 0..total {
            let h = jm.submit(job("short"), std::env::temp_dir()).unwrap();
            h.cancel();
            assert_eq!(h.status().state, JobState::Cancelled);
            ids.push(h.id.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while jm.jobs().len() > RETAINED_ENDED_JOBS + 1 {
            assert!(
                Instant::now() < deadline,
                "{} jobs still listed",
                jm.jobs().len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // the three that ended first are forgotten; the waiting job and the rest stay
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(jm.job(&id.0).is_some(), n >= 3, "job {id}");
        }
        assert!(jm.job(&waiting.id.0).is_some());
        assert_eq!(jm.jobs().len(), RETAINED_ENDED_JOBS + 1);
    }
}
