//! The JobManager: accepts jobs, schedules their subtasks into TaskManager slots, follows their
//! progress and decides the job's fate.
//!
//! Scheduling uses slot sharing: slot `k` hosts subtask `k` of every vertex, so a job needs as
//! many slots as its largest parallelism, and slots are spread over TaskManagers round-robin.
//! A job finishes when every subtask finished; if one fails, the others are cancelled and the job
//! fails with the first error (restart strategies come with checkpoints).
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, info_span, warn};

use freshet_engine::metrics::MetricsSnapshot;
use freshet_job::{JobSpec, Problems};

use crate::messages::{JobId, TaskDeployment, TaskEvent, TaskManagerGateway, TaskState};
use crate::plan::{JobPlan, plan};

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

struct JobEntry {
    plan: Arc<JobPlan>,
    attempt: u32,
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
        {
            let mut s = self.entry.status.lock().expect("status lock");
            if s.state != JobState::Running {
                return;
            }
            s.state = JobState::Cancelled;
            s.duration = s.started.elapsed();
        }
        for tm in &self.jm.taskmanagers {
            tm.cancel(&self.id);
        }
        self.entry.done.notify_all();
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

    /// Plans and deploys a job.
    pub fn submit(&self, spec: JobSpec, base_dir: PathBuf) -> Result<JobHandle, SubmitError> {
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
        let entry = Arc::new(JobEntry {
            plan: plan.clone(),
            attempt: 0,
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
        info!(
            vertices = plan.vertices.len(),
            subtasks = plan.subtask_count(),
            slots = needed,
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
        Ok(handle)
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
        let mut s = entry.status.lock().expect("status lock");
        match ev.state {
            TaskState::Running => continue,
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
