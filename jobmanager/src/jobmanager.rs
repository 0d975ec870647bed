//! The JobManager: accepts jobs, schedules their subtasks into TaskManager slots, follows their
//! progress and decides the job's fate.
//!
//! Scheduling uses slot sharing: slot `k` hosts subtask `k` of every vertex, so a job needs as
//! many slots as its largest parallelism, and slots are spread over TaskManagers round-robin.
//! A job finishes when every subtask finished; if one fails, the others are cancelled and the job
//! fails with the first error (restart strategies come with checkpoints).
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, info_span, warn};

use freshet_engine::checkpoint::{RestoreSource, S3Options, Storage, SubtaskCommand};
use freshet_engine::metrics::MetricsSnapshot;
use freshet_engine::state::StateConfig;
use freshet_job::{JobSpec, Problems};

use crate::checkpoints::{
    CheckpointStats, Coordinator, CoordinatorSettings, acquire_generation, completed_checkpoints,
};
use crate::messages::{
    CheckpointSetup, JobId, TaskDeployment, TaskEvent, TaskManagerGateway, TaskState,
};
use crate::plan::{JobPlan, NodeKind, plan};

/// Why a job could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The definition has problems.
    #[error("{0}")]
    Invalid(Problems),
    /// Not enough slots.
    #[error(
        "job {job} needs {needed} slots but the cluster offers {available}; add TaskManagers or slots, or lower the parallelism"
    )]
    NotEnoughSlots {
        /// Job name.
        job: String,
        /// Slots needed.
        needed: u32,
        /// Slots offered.
        available: u32,
    },
    /// The checkpoint storage or the state to restore cannot be used.
    #[error("{0}")]
    State(String),
    /// A TaskManager refused a deployment.
    #[error("deploying {task} on TaskManager {taskmanager}: {error}")]
    Deploy {
        /// Which subtask.
        task: String,
        /// Which TaskManager.
        taskmanager: String,
        /// Why.
        error: String,
    },
}

/// The outcome of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Subtasks are running.
    Running,
    /// Every subtask finished.
    Finished,
    /// A subtask failed.
    Failed(String),
    /// Cancelled by request.
    Cancelled,
}

/// What is known about a job.
#[derive(Debug, Clone)]
pub struct JobStatus {
    /// Its state.
    pub state: JobState,
    /// When it was submitted.
    pub started: Instant,
    /// How long it ran (so far).
    pub duration: Duration,
    /// Final counters of finished subtasks per (vertex, subtask).
    pub finished: BTreeMap<(usize, u32), MetricsSnapshot>,
    /// Accumulators summed over subtasks (wrapping).
    pub accumulators: BTreeMap<String, i64>,
    /// The error the job failed with, and whether it is a root cause (rather than a subtask
    /// failing because another one went away).
    failure: Option<(String, bool)>,
}

/// How to start a job.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Start from this checkpoint or savepoint (a directory with `_metadata`). Without it, a job
    /// with checkpoints starts from the latest completed checkpoint in its checkpoint directory.
    pub restore: Option<String>,
    /// Start fresh even if the checkpoint directory holds completed checkpoints.
    pub ignore_checkpoints: bool,
    /// Allow restoring a snapshot with state of operators the job no longer has (that state is
    /// dropped).
    pub allow_non_restored_state: bool,
}

struct JobEntry {
    plan: Arc<JobPlan>,
    attempt: u32,
    coordinator: Option<Arc<Coordinator>>,
    restored_from: Option<String>,
    savepoint_dir: Option<String>,
    status: Mutex<JobStatus>,
    done: Condvar,
    remaining: Mutex<usize>,
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
    pub fn plan(&self) -> &JobPlan {
        &self.entry.plan
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        let mut s = self.entry.status.lock().expect("status lock").clone();
        if s.state == JobState::Running {
            s.duration = s.started.elapsed();
        }
        s
    }

    /// Waits until the job is no longer running, or the timeout passes.
    pub fn wait_timeout(&self, timeout: Duration) -> JobStatus {
        let guard = self.entry.status.lock().expect("status lock");
        let (guard, _) = self
            .entry
            .done
            .wait_timeout_while(guard, timeout, |s| s.state == JobState::Running)
            .expect("status lock");
        drop(guard);
        self.status()
    }

    /// Waits until the job is no longer running.
    pub fn wait(&self) -> JobStatus {
        let guard = self.entry.status.lock().expect("status lock");
        let guard = self
            .entry
            .done
            .wait_while(guard, |s| s.state == JobState::Running)
            .expect("status lock");
        drop(guard);
        self.status()
    }

    /// Cancels the job.
    pub fn cancel(&self) {
        self.end(JobState::Cancelled);
    }

    fn end(&self, state: JobState) {
        {
            let mut s = self.entry.status.lock().expect("status lock");
            if s.state != JobState::Running {
                return;
            }
            s.state = state;
            s.duration = s.started.elapsed();
        }
        if let Some(c) = &self.entry.coordinator {
            c.stop();
        }
        for tm in &self.jm.taskmanagers {
            tm.cancel(&self.id);
        }
        self.entry.done.notify_all();
    }

    /// The checkpoint history (empty when the job takes no checkpoints).
    pub fn checkpoints(&self) -> Vec<CheckpointStats> {
        self.entry
            .coordinator
            .as_ref()
            .map(|c| c.history())
            .unwrap_or_default()
    }

    /// The checkpoint or savepoint the job started from.
    pub fn restored_from(&self) -> Option<&str> {
        self.entry.restored_from.as_deref()
    }

    /// Triggers a savepoint into a new directory under `dir` (default: the job's
    /// `checkpointing.savepoint_dir`); with `stop`, the job stops once it completes. Waits for the
    /// outcome and returns the savepoint's location.
    pub fn savepoint(&self, dir: Option<&str>, stop: bool) -> Result<String, String> {
        let Some(c) = &self.entry.coordinator else {
            return Err("the job has no checkpointing section; savepoints need one".into());
        };
        let dir = dir
            .map(str::to_string)
            .or_else(|| self.entry.savepoint_dir.clone())
            .ok_or("no savepoint directory")?;
        let base = &self.entry.plan.base_dir;
        let s3 = s3_options(&self.entry.plan.spec);
        let parent = Storage::open(&dir, base, &s3).map_err(|e| e.to_string())?;
        let name = format!(
            "savepoint-{}-{}",
            self.entry.plan.spec.name,
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ")
        );
        let target = parent.child(&name).url().to_string();
        let rx = c.savepoint(target, stop)?;
        rx.recv()
            .unwrap_or_else(|_| Err("the job ended before the savepoint completed".into()))
    }

    /// Live counters of every running subtask, plus final counters of finished ones.
    pub fn metrics(&self) -> BTreeMap<(usize, u32), MetricsSnapshot> {
        let mut out = self.status().finished;
        for tm in &self.jm.taskmanagers {
            for s in tm.metrics(&self.id) {
                out.entry((s.vertex, s.subtask)).or_insert(s.metrics);
            }
        }
        out
    }
}

struct Inner {
    taskmanagers: Vec<Arc<dyn TaskManagerGateway>>,
    jobs: Mutex<HashMap<JobId, Arc<JobEntry>>>,
}

/// The JobManager.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
    events: Sender<TaskEvent>,
}

static JOB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl JobManager {
    /// A JobManager with the channel its TaskManagers report on. Call [`JobManager::start`] with
    /// the TaskManagers once they are created with the sender from [`JobManager::events`].
    pub fn events() -> (Sender<TaskEvent>, Receiver<TaskEvent>) {
        crossbeam_channel::unbounded()
    }

    /// Starts a JobManager over registered TaskManagers.
    pub fn start(
        taskmanagers: Vec<Arc<dyn TaskManagerGateway>>,
        events: (Sender<TaskEvent>, Receiver<TaskEvent>),
    ) -> Self {
        let inner = Arc::new(Inner {
            taskmanagers,
            jobs: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = events;
        let dispatcher = inner.clone();
        std::thread::Builder::new()
            .name("jobmanager-events".into())
            .spawn(move || dispatch(dispatcher, rx))
            .expect("spawning the JobManager event thread");
        JobManager { inner, events: tx }
    }

    /// The sender TaskManagers report on.
    pub fn event_sender(&self) -> Sender<TaskEvent> {
        self.events.clone()
    }

    /// Every job this JobManager knows, oldest first.
    pub fn jobs(&self) -> Vec<JobHandle> {
        let jobs = self.inner.jobs.lock().expect("jobs lock");
        let mut out: Vec<JobHandle> = jobs
            .iter()
            .map(|(id, entry)| JobHandle {
                id: id.clone(),
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

    /// Plans and deploys a job.
    pub fn submit(&self, spec: JobSpec, base_dir: PathBuf) -> Result<JobHandle, SubmitError> {
        self.submit_with(spec, base_dir, SubmitOptions::default())
    }

    /// Plans and deploys a job, from a snapshot if asked or if its checkpoints hold one.
    pub fn submit_with(
        &self,
        spec: JobSpec,
        base_dir: PathBuf,
        options: SubmitOptions,
    ) -> Result<JobHandle, SubmitError> {
        let plan = Arc::new(plan(&spec, &base_dir).map_err(SubmitError::Invalid)?);
        let needed = plan.slots_needed();
        let available: u32 = self.inner.taskmanagers.iter().map(|t| t.slots()).sum();
        if needed > available {
            return Err(SubmitError::NotEnoughSlots {
                job: spec.name.clone(),
                needed,
                available,
            });
        }
        let id = JobId(format!(
            "{}-{}",
            spec.name,
            JOB_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let span = info_span!("job", job = %id);
        let _enter = span.enter();
        let startup = prepare_state(&plan, &options)?;
        let entry = Arc::new(JobEntry {
            plan: plan.clone(),
            attempt: 0,
            coordinator: None,
            restored_from: startup.restore.as_ref().map(|r| r.location.clone()),
            savepoint_dir: spec.checkpointing.as_ref().map(|c| c.savepoint_dir.clone()),
            status: Mutex::new(JobStatus {
                state: JobState::Running,
                started: Instant::now(),
                duration: Duration::ZERO,
                finished: BTreeMap::new(),
                accumulators: BTreeMap::new(),
                failure: None,
            }),
            done: Condvar::new(),
            remaining: Mutex::new(plan.subtask_count() as usize),
        });
        let spec = Arc::new(spec);
        let tms = &self.inner.taskmanagers;
        // slot k hosts subtask k of every vertex; slots are spread over TaskManagers
        let mut slot_owner = Vec::new();
        'fill: while slot_owner.len() < needed as usize {
            for (t, tm) in tms.iter().enumerate() {
                if slot_owner.iter().filter(|o| **o == t).count() < tm.slots() as usize {
                    slot_owner.push(t);
                    if slot_owner.len() == needed as usize {
                        break 'fill;
                    }
                }
            }
        }
        let placement: HashMap<(usize, u32), usize> = plan
            .vertices
            .iter()
            .enumerate()
            .flat_map(|(v, vx)| (0..vx.parallelism).map(move |i| (v, i)))
            .map(|(v, i)| ((v, i), slot_owner[i as usize]))
            .collect();
        let mut entry = entry;
        if let Some((setup, generation, existing, last_id)) = &startup.checkpoints {
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
                        let source =
                            matches!(plan.nodes[vx.nodes[0]].kind, NodeKind::Source { .. });
                        (0..vx.parallelism).map(move |i| (v, i, source))
                    })
                    .collect(),
                s3: setup.s3.clone(),
            };
            let tms = tms.clone();
            let job = id.clone();
            let send = Arc::new(move |v: usize, i: u32, cmd: SubtaskCommand| {
                if let Some(t) = placement.get(&(v, i)) {
                    tms[*t].command(&job, v, i, cmd);
                }
            });
            let inner = Arc::downgrade(&self.inner);
            let job = id.clone();
            let on_fatal = Arc::new(move |msg: String| {
                if let Some(inner) = inner.upgrade() {
                    fail_job(&inner, &job, msg);
                }
            });
            let coordinator = Coordinator::new(
                settings,
                setup.storage.clone(),
                *generation,
                existing,
                *last_id,
                send,
                on_fatal,
            );
            Arc::get_mut(&mut entry)
                .expect("not shared yet")
                .coordinator = Some(coordinator);
        }
        self.inner
            .jobs
            .lock()
            .expect("jobs lock")
            .insert(id.clone(), entry.clone());
        let handle = JobHandle {
            id: id.clone(),
            entry: entry.clone(),
            jm: self.inner.clone(),
        };
        let state_root = spec
            .state
            .local_dir
            .as_ref()
            .map(|d| base_dir.join(d))
            .unwrap_or_else(|| std::env::temp_dir().join("freshet-state"));
        remove_dead_working_dirs(&state_root);
        let local_dir = state_root.join(format!("{id}-{}-{}", entry.attempt, std::process::id()));
        let state = StateConfig {
            local_dir,
            cache_keys: spec.state.cache_keys,
            block_cache_bytes: spec.state.block_cache_mb << 20,
            write_buffer_bytes: spec.state.write_buffer_mb << 20,
        };
        info!(
            vertices = plan.vertices.len(),
            subtasks = plan.subtask_count(),
            slots = needed,
            restored_from = entry.restored_from.as_deref().unwrap_or("-"),
            "deploying"
        );
        for (v, vertex) in plan.vertices.iter().enumerate() {
            for i in 0..vertex.parallelism {
                let tm = &tms[slot_owner[i as usize]];
                let d = TaskDeployment {
                    job: id.clone(),
                    attempt: entry.attempt,
                    spec: spec.clone(),
                    base_dir: base_dir.clone(),
                    vertex: v,
                    subtask: i,
                    state: state.clone(),
                    checkpoints: startup.checkpoints.as_ref().map(|c| c.0.clone()),
                    restore: startup.restore.clone(),
                };
                if let Err(error) = tm.deploy(d) {
                    handle.cancel();
                    return Err(SubmitError::Deploy {
                        task: format!("{}#{i}", vertex.name),
                        taskmanager: tm.id().to_string(),
                        error,
                    });
                }
            }
        }
        if let Some(c) = &entry.coordinator {
            c.start();
        }
        Ok(handle)
    }
}

/// What a job starts with: its checkpoint storage (with the run's generation, the retained
/// checkpoints and the last id used) and the snapshot to restore.
struct Startup {
    checkpoints: Option<(
        CheckpointSetup,
        u64,
        Vec<freshet_engine::checkpoint::CheckpointMetadata>,
        u64,
    )>,
    restore: Option<Arc<RestoreSource>>,
}

fn s3_options(spec: &JobSpec) -> S3Options {
    let s3 = spec
        .checkpointing
        .as_ref()
        .map(|c| c.s3.clone())
        .unwrap_or_default();
    S3Options {
        endpoint: s3.endpoint,
        region: s3.region,
        access_key_id: s3.access_key_id,
        secret_access_key: s3.secret_access_key,
    }
}

fn prepare_state(plan: &JobPlan, options: &SubmitOptions) -> Result<Startup, SubmitError> {
    let spec = &plan.spec;
    let base = &plan.base_dir;
    let s3 = s3_options(spec);
    let mut checkpoints = None;
    let mut latest = None;
    if let Some(c) = &spec.checkpointing {
        let storage = Storage::open(&c.dir, base, &s3)
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
        latest = existing.last().map(|m| {
            format!(
                "{}/{}",
                storage.url(),
                freshet_engine::checkpoint::checkpoint_dir(m.id)
            )
        });
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
    let location = match (&options.restore, options.ignore_checkpoints) {
        (Some(l), _) => Some(l.clone()),
        (None, false) => latest,
        (None, true) => None,
    };
    let restore = match location {
        None => None,
        Some(l) => {
            let mut r = RestoreSource::load(&l, base, &s3)
                .map_err(|e| SubmitError::State(format!("restoring {l}: {e}")))?;
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
                return Err(SubmitError::State(format!(
                    "{l} has state of operator(s) {} that the job no longer has; rename them back, or allow dropping that state (--allow-non-restored-state)",
                    unmatched
                        .iter()
                        .map(|u| format!("'{u}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if let Some((setup, _, _, last_id)) = checkpoints.as_mut() {
                r.shared_with_job = r.metadata.kind
                    == freshet_engine::checkpoint::SnapshotKind::Checkpoint
                    && r.root.url() == setup.storage.url();
                *last_id = (*last_id).max(r.metadata.id);
            }
            Some(Arc::new(r))
        }
    };
    Ok(Startup {
        checkpoints,
        restore,
    })
}

/// Removes working directories (`<job>-<attempt>-<pid>`) left by processes that are gone, e.g.
/// killed ones: their state lives on in checkpoints, the local copies are only clutter.
fn remove_dead_working_dirs(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::path::Path::new("/proc/self").exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Fails a running job with `msg` (a condition outside any subtask, such as being fenced).
fn fail_job(inner: &Arc<Inner>, job: &JobId, msg: String) {
    let Some(entry) = inner.jobs.lock().expect("jobs lock").get(job).cloned() else {
        return;
    };
    {
        let mut s = entry.status.lock().expect("status lock");
        if s.failure.is_none() {
            s.failure = Some((msg, true));
        }
    }
    for tm in &inner.taskmanagers {
        tm.cancel(job);
    }
}

fn dispatch(jm: Arc<Inner>, rx: Receiver<TaskEvent>) {
    for ev in rx {
        let Some(entry) = jm.jobs.lock().expect("jobs lock").get(&ev.job).cloned() else {
            continue;
        };
        if ev.attempt != entry.attempt {
            continue;
        }
        let name = entry
            .plan
            .vertices
            .get(ev.vertex)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let task = format!("{name}#{}", ev.subtask);
        if let TaskState::Checkpoint(report) = ev.state {
            if let Some(c) = &entry.coordinator {
                c.report(ev.vertex, ev.subtask, report);
            }
            continue;
        }
        let mut s = entry.status.lock().expect("status lock");
        match ev.state {
            TaskState::Running | TaskState::Checkpoint(_) => continue,
            TaskState::Finished {
                metrics,
                accumulators,
            } => {
                s.finished.insert((ev.vertex, ev.subtask), metrics);
                for (k, v) in accumulators {
                    let e = s.accumulators.entry(k).or_insert(0);
                    *e = e.wrapping_add(v);
                }
            }
            TaskState::Failed { error, root_cause } => {
                let first = s.failure.is_none();
                // a subtask that failed because its consumer went away reports a consequence;
                // the consumer's own error, when it arrives, is the one to report
                if first || (root_cause && !s.failure.as_ref().is_some_and(|f| f.1)) {
                    s.failure = Some((format!("{task}: {error}"), root_cause));
                }
                if first {
                    warn!(job = %ev.job, %task, %error, "subtask failed; cancelling the job");
                    drop(s);
                    for tm in &jm.taskmanagers {
                        tm.cancel(&ev.job);
                    }
                    s = entry.status.lock().expect("status lock");
                }
            }
            TaskState::Cancelled => {}
        }
        // the job's fate is decided once every subtask has ended, so the reported cause is the
        // root cause and not whichever consequence arrived first
        let mut left = entry.remaining.lock().expect("remaining lock");
        *left -= 1;
        if *left == 0 {
            if let Some(c) = &entry.coordinator {
                c.stop();
            }
            if s.state == JobState::Running {
                s.state = match &s.failure {
                    Some((msg, _)) => JobState::Failed(msg.clone()),
                    None => JobState::Finished,
                };
                s.duration = s.started.elapsed();
                info!(job = %ev.job, state = ?s.state, duration = ?s.duration, "job ended");
            }
            entry.done.notify_all();
        }
    }
}
