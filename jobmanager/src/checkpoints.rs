//! The checkpoint coordinator of one job: triggers checkpoints and savepoints, collects
//! acknowledgements, writes metadata, retains and cleans up.
//!
//! **Layout** under the job's checkpoint root (`<dir>/<job name>/`):
//! - `generations/<g>`: one marker per run of the job, written with a conditional put. A run
//!   takes the next free generation; before completing a checkpoint it checks that no newer
//!   generation exists, so a stale run (an old JobManager still alive) can never complete a
//!   checkpoint after a newer run started.
//! - `chk-<id>/_metadata`: written last, with a conditional put, so a checkpoint exists only once
//!   complete and two writers cannot both complete the same id. Its private files sit beside it.
//! - `shared/...`: RocksDB SST files, referenced by any number of checkpoints.
//!
//! **Retention.** The newest `retain` completed checkpoints are kept. When one falls out, its
//! directory is deleted (on a thread of its own, like every directory delete, so an object
//! store that refuses requests does not hold up the coordinator); shared files that no retained
//! checkpoint references are deleted when no checkpoint is in progress (a listing of `shared/`
//! against the retained metadata), which also removes files uploaded for abandoned checkpoints.
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, info_span, warn};

use freshet_engine::checkpoint::{
    Barrier, CheckpointId, CheckpointMetadata, METADATA, S3Options, SnapshotKind, Storage,
    SubtaskAck, SubtaskCommand, SubtaskReport, checkpoint_dir,
};
use freshet_job::CheckpointingSpec;

/// Sends a command to subtask (vertex, index).
pub type CommandSender = Arc<dyn Fn(usize, u32, SubtaskCommand) + Send + Sync>;

/// Fails the running attempt with a reason; the flag says whether the restart strategy may
/// start it again (too many failed checkpoints) or not (fenced by a newer run).
pub type FailAttempt = Arc<dyn Fn(String, bool) + Send + Sync>;

/// Status of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointStatus {
    /// Waiting for acknowledgements.
    InProgress,
    /// Metadata written.
    Completed,
    /// Declined, timed out, or fenced.
    Failed,
}

/// What is known about one checkpoint or savepoint.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CheckpointStats {
    /// Id.
    pub id: CheckpointId,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// Status.
    pub status: CheckpointStatus,
    /// Trigger time, milliseconds since the epoch.
    pub trigger_time_ms: i64,
    /// From trigger to completion (or now), milliseconds.
    pub duration_ms: u64,
    /// Longest barrier alignment of any subtask, milliseconds.
    pub alignment_ms: u64,
    /// Longest synchronous snapshot part of any subtask, milliseconds.
    pub sync_ms: u64,
    /// Size of the whole state it covers.
    pub full_bytes: u64,
    /// Bytes uploaded for it.
    pub uploaded_bytes: u64,
    /// Subtasks acknowledged / expected.
    pub acknowledged: usize,
    /// Subtasks expected.
    pub expected: usize,
    /// Where it is stored (completed only).
    pub path: Option<String>,
    /// Why it failed.
    pub failure: Option<String>,
    /// A stop-with-savepoint: the job stops once it completes.
    #[serde(default)]
    pub stop: bool,
}

/// Settings of a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Checkpoint settings of the job.
    pub spec: CheckpointingSpec,
    /// Job name.
    pub job: String,
    /// Key groups of the job.
    pub max_parallelism: u32,
    /// Every subtask (vertex, index), and which of them are sources.
    pub subtasks: Vec<(usize, u32, bool)>,
    /// S3 settings for savepoint targets.
    pub s3: S3Options,
    /// Counts kept across the job's attempts.
    pub totals: Arc<CheckpointTotals>,
}

/// What a job's checkpoints add up to over all its attempts (each attempt has a coordinator of
/// its own; these outlive them), for its metrics.
#[derive(Debug, Default)]
pub struct CheckpointTotals {
    inner: Mutex<Totals>,
}

/// A copy of [`CheckpointTotals`].
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Checkpoints and savepoints completed.
    pub completed: u64,
    /// Checkpoints and savepoints that failed.
    pub failed: u64,
    /// The newest completed one, and when it completed.
    pub last: Option<(CheckpointStats, Instant)>,
}

impl CheckpointTotals {
    /// The counts so far.
    pub fn get(&self) -> Totals {
        self.inner.lock().clone()
    }

    fn count(&self, stats: &CheckpointStats) {
        let mut t = self.inner.lock();
        match stats.status {
            CheckpointStatus::Completed => {
                t.completed += 1;
                t.last = Some((stats.clone(), Instant::now()));
            }
            CheckpointStatus::Failed => t.failed += 1,
            CheckpointStatus::InProgress => {}
        }
    }
}

/// A waiter for a savepoint's outcome: its path or the failure.
type Waiter = crossbeam_channel::Sender<Result<String, String>>;

struct Pending {
    barrier: Barrier,
    trigger_time_ms: i64,
    started: Instant,
    acks: BTreeMap<(usize, u32), SubtaskAck>,
    final_checkpoint: bool,
    waiter: Option<Waiter>,
    /// The checkpoint's span, ended when it completes or fails.
    span: tracing::Span,
}

struct Retained {
    id: CheckpointId,
    files: HashSet<String>,
}

struct State {
    next_id: CheckpointId,
    pending: BTreeMap<CheckpointId, Pending>,
    retained: VecDeque<Retained>,
    history: VecDeque<CheckpointStats>,
    last_trigger: Instant,
    last_completion: Option<Instant>,
    sources_finished: BTreeSet<(usize, u32)>,
    finishing: bool,
    /// The final checkpoint failed and is taken again once the interval has passed.
    retry_final: bool,
    stopped: bool,
    gc_needed: bool,
    /// Set when the coordinator must stop the job (fenced by a newer run).
    fatal: Option<String>,
    /// Checkpoints failed since the last one that completed.
    failed_in_a_row: u32,
    latest: Option<String>,
    /// The newest checkpoints that failed: subtasks still uploading for one when it failed
    /// write into its directory afterwards, so the directory is deleted again when their late
    /// acknowledgement arrives and at every collection.
    abandoned: VecDeque<CheckpointId>,
}

/// Failed checkpoints whose directories are swept again.
const ABANDONED: usize = 32;

/// Deletes checkpoint directories on a thread of its own: while the object store refuses
/// requests every delete is retried for seconds, which must not hold up triggering and timing
/// out checkpoints. The directories are never read again, so when they go does not matter,
/// except at the job's end, which waits for them ([`Deletes::wait`]).
struct Deletes {
    queue: crossbeam_channel::Sender<String>,
    /// Directories queued and not yet deleted.
    outstanding: Arc<(Mutex<usize>, Condvar)>,
}

impl Deletes {
    fn start(storage: Storage) -> Deletes {
        let (queue, rx) = crossbeam_channel::unbounded::<String>();
        let outstanding = Arc::new((Mutex::new(0usize), Condvar::new()));
        let counter = outstanding.clone();
        std::thread::Builder::new()
            .name("checkpoint-deletes".into())
            .spawn(move || {
                // ends when the coordinator (the only sender) is dropped
                for dir in rx {
                    if let Err(e) = storage.delete_dir(&dir) {
                        warn!(%dir, error = %e, "cannot delete a checkpoint directory");
                    }
                    let mut n = counter.0.lock();
                    *n -= 1;
                    if *n == 0 {
                        counter.1.notify_all();
                    }
                }
            })
            .expect("starting the checkpoint deleter");
        Deletes { queue, outstanding }
    }

    fn push(&self, dir: String) {
        *self.outstanding.0.lock() += 1;
        // the receiver lives as long as this sender
        let _ = self.queue.send(dir);
    }

    /// Waits until every queued directory is deleted (or its deletion failed).
    fn wait(&self) {
        let mut n = self.outstanding.0.lock();
        while *n > 0 {
            self.outstanding.1.wait(&mut n);
        }
    }
}

/// The coordinator. Call [`Coordinator::start`]; reports go to [`Coordinator::report`].
pub struct Coordinator {
    settings: CoordinatorSettings,
    storage: Storage,
    generation: u64,
    send: CommandSender,
    fail_attempt: FailAttempt,
    deletes: Deletes,
    state: Mutex<State>,
    wake: Condvar,
}

const HISTORY: usize = 100;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The checkpoints completed in a job's checkpoint root, oldest first, with their metadata.
pub fn completed_checkpoints(storage: &Storage) -> Result<Vec<CheckpointMetadata>, String> {
    let mut out = Vec::new();
    for path in storage.list("").map_err(|e| e.to_string())? {
        let Some(dir) = path.strip_suffix(&format!("/{METADATA}")) else {
            continue;
        };
        if !dir.starts_with("chk-") || dir.contains('/') {
            continue;
        }
        let Some(bytes) = storage.get(&path).map_err(|e| e.to_string())? else {
            continue; // deleted since the listing
        };
        match serde_json::from_slice::<CheckpointMetadata>(&bytes) {
            Ok(m) => out.push(m),
            // a damaged metadata file makes that checkpoint unusable, not the job
            Err(e) => {
                warn!(location = %format!("{}/{path}", storage.url()), error = %e, "checkpoint metadata cannot be read; the checkpoint is skipped")
            }
        }
    }
    out.sort_by_key(|m| m.id);
    Ok(out)
}

/// Takes the next generation of the job in `storage`: a conditional write of a marker, retried
/// if another run took the same number first.
pub fn acquire_generation(storage: &Storage) -> Result<u64, String> {
    for _ in 0..16 {
        let newest = newest_generation(storage)?;
        let g = newest + 1;
        if storage
            .put_if_absent(&format!("generations/{g:010}"), now_ms().to_string().into())
            .map_err(|e| e.to_string())?
        {
            return Ok(g);
        }
    }
    Err("could not take a job generation: other runs of the job keep starting".into())
}

fn newest_generation(storage: &Storage) -> Result<u64, String> {
    Ok(storage
        .list("generations")
        .map_err(|e| e.to_string())?
        .iter()
        .filter_map(|p| p.rsplit('/').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0))
}

impl Coordinator {
    /// A coordinator for a job run of `generation`, whose retained checkpoints are `existing`
    /// (oldest first); new ids continue after `last_id`.
    pub fn new(
        settings: CoordinatorSettings,
        storage: Storage,
        generation: u64,
        existing: &[CheckpointMetadata],
        last_id: CheckpointId,
        send: CommandSender,
        fail_attempt: FailAttempt,
    ) -> Arc<Self> {
        let retained = existing
            .iter()
            .map(|m| Retained {
                id: m.id,
                files: m.files().map(|f| f.path.clone()).collect(),
            })
            .collect();
        Arc::new(Coordinator {
            settings,
            deletes: Deletes::start(storage.clone()),
            storage,
            generation,
            send,
            fail_attempt,
            state: Mutex::new(State {
                next_id: last_id + 1,
                pending: BTreeMap::new(),
                retained,
                history: VecDeque::new(),
                last_trigger: Instant::now(),
                last_completion: None,
                sources_finished: BTreeSet::new(),
                finishing: false,
                retry_final: false,
                stopped: false,
                gc_needed: true,
                fatal: None,
                failed_in_a_row: 0,
                latest: None,
                abandoned: VecDeque::new(),
            }),
            wake: Condvar::new(),
        })
    }

    /// Starts the periodic trigger thread; it ends when [`Coordinator::stop`] is called.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || me.run())
            .expect("starting the checkpoint coordinator");
    }

    /// Stops triggering (the job ended).
    pub fn stop(&self) {
        let mut s = self.state.lock();
        if s.stopped {
            return;
        }
        s.stopped = true;
        let pending = std::mem::take(&mut s.pending);
        // the job ended: checkpoints still in flight will never complete; what they and the
        // subsumed checkpoints leave behind is deleted now (a fenced run touches nothing)
        if s.fatal.is_none() {
            for p in pending.values() {
                if p.barrier.kind == SnapshotKind::Checkpoint {
                    s.abandoned.push_back(p.barrier.id);
                }
            }
            if s.gc_needed || !pending.is_empty() {
                s.gc_needed = false;
                self.collect_garbage(&s);
            }
        }
        for (_, p) in pending {
            if let Some(w) = p.waiter {
                let _ = w.send(Err("the job ended before the savepoint completed".into()));
            }
        }
        self.wake.notify_all();
        drop(s);
        // a job that ended leaves only its retained checkpoints behind
        self.deletes.wait();
    }

    fn live_files(s: &State) -> HashSet<String> {
        s.retained
            .iter()
            .flat_map(|r| r.files.iter().cloned())
            .collect()
    }

    /// A fatal condition the job must fail with (the run was fenced by a newer one).
    pub fn fatal(&self) -> Option<String> {
        self.state.lock().fatal.clone()
    }

    /// The checkpoint history, newest last.
    pub fn history(&self) -> Vec<CheckpointStats> {
        let s = self.state.lock();
        let mut out: Vec<CheckpointStats> = s.history.iter().cloned().collect();
        for p in s.pending.values() {
            out.push(self.stats(p, CheckpointStatus::InProgress, None, None));
        }
        out.sort_by_key(|c| c.id);
        out
    }

    /// Path of the latest completed checkpoint of this run.
    pub fn latest(&self) -> Option<String> {
        self.state.lock().latest.clone()
    }

    fn run(self: Arc<Self>) {
        let interval = self.settings.spec.interval.0;
        let mut s = self.state.lock();
        loop {
            if s.stopped {
                return;
            }
            let now = Instant::now();
            // timeouts
            let timeout = self.settings.spec.timeout.0;
            let expired: Vec<CheckpointId> = s
                .pending
                .iter()
                .filter(|(_, p)| now.duration_since(p.started) >= timeout)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                self.fail(&mut s, id, format!("timed out after {timeout:?}"));
            }
            let paused = s
                .last_completion
                .is_some_and(|t| now.duration_since(t) < self.settings.spec.min_pause.0);
            let periodic = s
                .pending
                .values()
                .filter(|p| p.barrier.kind == SnapshotKind::Checkpoint)
                .count();
            if s.retry_final && now.duration_since(s.last_trigger) >= interval {
                s.retry_final = false;
                self.trigger(
                    &mut s,
                    SnapshotKind::Checkpoint,
                    None,
                    false,
                    true,
                    None,
                    None,
                );
            }
            if !s.finishing
                && now.duration_since(s.last_trigger) >= interval
                && periodic < self.settings.spec.max_concurrent as usize
                && !paused
            {
                self.trigger(
                    &mut s,
                    SnapshotKind::Checkpoint,
                    None,
                    false,
                    false,
                    None,
                    None,
                );
            }
            if s.pending.is_empty() && s.gc_needed {
                s.gc_needed = false;
                // under the lock: no checkpoint may start (and upload) while files are deleted
                self.collect_garbage(&s);
                continue;
            }
            let wait = interval
                .saturating_sub(now.duration_since(s.last_trigger))
                .clamp(Duration::from_millis(5), Duration::from_millis(100));
            self.wake.wait_for(&mut s, wait);
        }
    }

    /// Triggers a checkpoint or savepoint at every source subtask; its span is a child of
    /// `parent` (a `traceparent`) if given.
    #[allow(clippy::too_many_arguments)]
    fn trigger(
        &self,
        s: &mut State,
        kind: SnapshotKind,
        target: Option<String>,
        stop: bool,
        final_checkpoint: bool,
        waiter: Option<Waiter>,
        parent: Option<&str>,
    ) -> CheckpointId {
        let id = s.next_id;
        s.next_id += 1;
        s.last_trigger = Instant::now();
        // the checkpoint's trace: this span lasts until it completes or fails, and subtasks record
        // theirs under it, wherever they run, through the barrier
        let span = info_span!(
            parent: None,
            "checkpoint",
            trace_id = tracing::field::Empty,
            job = %self.settings.job,
            checkpoint = id,
            kind = ?kind,
            otel.status_code = tracing::field::Empty,
            failure = tracing::field::Empty,
        );
        // a savepoint someone asked for joins the asker's trace
        freshet_engine::trace::follow(&span, parent);
        let barrier = Barrier {
            id,
            kind,
            target,
            stop,
            trace: freshet_engine::trace::traceparent(&span),
        };
        let _entered = span.enter();
        tracing::debug!(?kind, stop, final_checkpoint, "triggering");
        s.pending.insert(
            id,
            Pending {
                barrier: barrier.clone(),
                trigger_time_ms: now_ms(),
                started: Instant::now(),
                acks: BTreeMap::new(),
                final_checkpoint,
                waiter,
                span: span.clone(),
            },
        );
        for (v, i, source) in &self.settings.subtasks {
            if *source {
                (self.send)(*v, *i, SubtaskCommand::Trigger(barrier.clone()));
            }
        }
        id
    }

    /// Triggers a savepoint into `target`; with `stop`, the job stops once it completes. Returns
    /// its id, and a channel that yields the savepoint's path or why it failed.
    pub fn savepoint(
        &self,
        target: String,
        stop: bool,
        parent: Option<&str>,
    ) -> Result<
        (
            CheckpointId,
            crossbeam_channel::Receiver<Result<String, String>>,
        ),
        String,
    > {
        let mut s = self.state.lock();
        if s.stopped {
            return Err("the job is not running".into());
        }
        if s.finishing {
            return Err("the job is finishing its input; no savepoint can be taken".into());
        }
        if stop && s.pending.values().any(|p| p.barrier.stop) {
            return Err("a stop-with-savepoint is already in progress".into());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let id = self.trigger(
            &mut s,
            SnapshotKind::Savepoint,
            Some(target),
            stop,
            false,
            Some(tx),
            parent,
        );
        self.wake.notify_all();
        Ok((id, rx))
    }

    /// Handles a subtask's report.
    pub fn report(&self, vertex: usize, subtask: u32, report: SubtaskReport) {
        let mut s = self.state.lock();
        if s.stopped {
            return;
        }
        match report {
            SubtaskReport::Ack(ack) => {
                let id = ack.checkpoint;
                let Some(p) = s.pending.get_mut(&id) else {
                    if s.abandoned.contains(&id) {
                        // uploaded for a checkpoint that failed meanwhile: its private files
                        // go now, its shared ones with the next collection
                        self.deletes.push(checkpoint_dir(id));
                        s.gc_needed = true;
                    }
                    return;
                };
                p.acks.insert((vertex, subtask), *ack);
                if p.acks.len() == self.settings.subtasks.len() {
                    self.complete(&mut s, id);
                }
            }
            SubtaskReport::Decline { checkpoint, reason } => {
                self.fail(&mut s, checkpoint, reason);
            }
            SubtaskReport::SourceFinished => {
                s.sources_finished.insert((vertex, subtask));
                let sources = self.settings.subtasks.iter().filter(|t| t.2).count();
                if s.sources_finished.len() == sources && !s.finishing {
                    s.finishing = true;
                    info!(job = %self.settings.job, "every source finished; taking the final checkpoint");
                    self.trigger(
                        &mut s,
                        SnapshotKind::Checkpoint,
                        None,
                        false,
                        true,
                        None,
                        None,
                    );
                }
            }
        }
        self.wake.notify_all();
    }

    fn stats(
        &self,
        p: &Pending,
        status: CheckpointStatus,
        path: Option<String>,
        failure: Option<String>,
    ) -> CheckpointStats {
        CheckpointStats {
            id: p.barrier.id,
            kind: p.barrier.kind,
            status,
            trigger_time_ms: p.trigger_time_ms,
            duration_ms: p.started.elapsed().as_millis() as u64,
            alignment_ms: p.acks.values().map(|a| a.alignment_ms).max().unwrap_or(0),
            sync_ms: p.acks.values().map(|a| a.sync_ms).max().unwrap_or(0),
            full_bytes: p.acks.values().map(|a| a.full_bytes).sum(),
            uploaded_bytes: p.acks.values().map(|a| a.uploaded_bytes).sum(),
            acknowledged: p.acks.len(),
            expected: self.settings.subtasks.len(),
            path,
            failure,
            stop: p.barrier.stop,
        }
    }

    fn record(&self, s: &mut State, stats: CheckpointStats) {
        self.settings.totals.count(&stats);
        s.history.push_back(stats);
        while s.history.len() > HISTORY {
            s.history.pop_front();
        }
    }

    fn fail(&self, s: &mut State, id: CheckpointId, reason: String) {
        let Some(p) = s.pending.remove(&id) else {
            return;
        };
        p.span.record("otel.status_code", "error");
        p.span.record("failure", reason.as_str());
        let _entered = p.span.enter();
        warn!(job = %self.settings.job, checkpoint = id, %reason, "checkpoint failed");
        for (v, i, _) in &self.settings.subtasks {
            (self.send)(*v, *i, SubtaskCommand::Abort(id));
        }
        let stats = self.stats(&p, CheckpointStatus::Failed, None, Some(reason.clone()));
        self.record(s, stats);
        match p.barrier.kind {
            SnapshotKind::Checkpoint => {
                self.deletes.push(checkpoint_dir(id));
                s.abandoned.push_back(id);
                if s.abandoned.len() > ABANDONED {
                    s.abandoned.pop_front();
                }
                s.failed_in_a_row += 1;
                let tolerable = self.settings.spec.tolerable_failures;
                if s.failed_in_a_row == tolerable + 1 && s.fatal.is_none() {
                    // nothing is committed while checkpoints fail: a restart from the latest
                    // completed checkpoint starts the uploads (and their connections) afresh,
                    // and the restart strategy bounds how long that goes on
                    self.fail_attempt(
                        format!(
                            "{} checkpoints failed in a row (checkpointing.tolerable_failures \
                             is {tolerable}); the last: {reason}",
                            s.failed_in_a_row
                        ),
                        true,
                    );
                }
            }
            SnapshotKind::Savepoint => {
                if let Some(t) = &p.barrier.target
                    && let Ok(dir) = Storage::open(t, std::path::Path::new("."), &self.settings.s3)
                {
                    let _ = dir.delete_dir("");
                }
            }
        }
        s.gc_needed = true;
        if let Some(w) = p.waiter {
            let _ = w.send(Err(reason));
        }
        if p.final_checkpoint {
            // the input has ended; the job can only finish through a final checkpoint, taken
            // again after the interval (not at once: a failure that comes back at once would
            // otherwise trigger checkpoints as fast as they fail)
            s.retry_final = true;
        }
    }

    fn complete(&self, s: &mut State, id: CheckpointId) {
        let p = s.pending.remove(&id).expect("pending");
        let span = p.span.clone();
        let _entered = span.enter();
        let mut operators: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for ack in p.acks.values() {
            for (uid, snap) in &ack.operators {
                operators.entry(uid.clone()).or_default().push(snap.clone());
            }
        }
        for snaps in operators.values_mut() {
            snaps.sort_by_key(|s| s.subtask);
        }
        let metadata = CheckpointMetadata {
            format: 1,
            job: self.settings.job.clone(),
            generation: self.generation,
            id,
            kind: p.barrier.kind,
            trigger_time_ms: p.trigger_time_ms,
            max_parallelism: self.settings.max_parallelism,
            operators,
            end_of_input: p.final_checkpoint,
        };
        let written =
            info_span!("checkpoint.metadata").in_scope(|| self.write_metadata(s, &p, &metadata));
        let path = match written {
            Ok(path) => path,
            Err(reason) => {
                s.pending.insert(id, p);
                self.fail(s, id, reason);
                return;
            }
        };
        // committed: tell every subtask (two-phase sinks commit now)
        for (v, i, _) in &self.settings.subtasks {
            (self.send)(*v, *i, SubtaskCommand::Complete(id));
        }
        let stats = self.stats(&p, CheckpointStatus::Completed, Some(path.clone()), None);
        info!(
            kind = ?p.barrier.kind,
            duration_ms = stats.duration_ms,
            sync_ms = stats.sync_ms,
            full_bytes = stats.full_bytes,
            uploaded_bytes = stats.uploaded_bytes,
            %path,
            "checkpoint completed"
        );
        self.record(s, stats);
        s.last_completion = Some(Instant::now());
        if p.barrier.kind == SnapshotKind::Checkpoint {
            s.failed_in_a_row = 0;
            s.latest = Some(path.clone());
            s.retained.push_back(Retained {
                id,
                files: metadata.files().map(|f| f.path.clone()).collect(),
            });
            while s.retained.len() > self.settings.spec.retain as usize {
                let old = s.retained.pop_front().expect("non-empty");
                self.deletes.push(checkpoint_dir(old.id));
                s.gc_needed = true;
            }
        }
        if let Some(w) = p.waiter {
            let _ = w.send(Ok(path));
        }
        let sources = self.settings.subtasks.iter().filter(|t| t.2);
        if p.final_checkpoint && p.acks.values().any(|a| a.output_pending) {
            // a subtask was still emitting what the end of input made due (its barrier went
            // between two batches): what follows is not covered yet, so another final
            // checkpoint follows after the interval
            info!("output still pending at the final checkpoint; taking another");
            s.retry_final = true;
        } else if p.final_checkpoint {
            for (v, i, _) in sources {
                (self.send)(*v, *i, SubtaskCommand::Finish);
            }
        } else if p.barrier.stop {
            for (v, i, _) in sources {
                (self.send)(*v, *i, SubtaskCommand::Suspend);
            }
        }
    }

    /// Fails the attempt, on another thread: failing it stops this coordinator, which takes
    /// the state lock the caller holds.
    fn fail_attempt(&self, reason: String, retryable: bool) {
        let fail = self.fail_attempt.clone();
        std::thread::spawn(move || fail(reason, retryable));
    }

    /// Writes the metadata with a conditional put, after checking no newer run took over.
    fn write_metadata(
        &self,
        s: &mut State,
        p: &Pending,
        m: &CheckpointMetadata,
    ) -> Result<String, String> {
        let newest = newest_generation(&self.storage)?;
        if newest > self.generation {
            let msg = format!(
                "a newer run of the job (generation {newest}) owns {}; this run (generation {}) stops",
                self.storage.url(),
                self.generation
            );
            s.fatal = Some(msg.clone());
            s.stopped = true;
            self.fail_attempt(msg.clone(), false);
            return Err(msg);
        }
        let body = serde_json::to_vec_pretty(m).map_err(|e| e.to_string())?;
        let (dir, rel) = match (&p.barrier.kind, &p.barrier.target) {
            (SnapshotKind::Savepoint, Some(t)) => (
                Storage::open(t, std::path::Path::new("."), &self.settings.s3)
                    .map_err(|e| e.to_string())?,
                METADATA.to_string(),
            ),
            _ => (
                self.storage.clone(),
                format!("{}/{METADATA}", checkpoint_dir(m.id)),
            ),
        };
        if !dir
            .put_if_absent(&rel, body.into())
            .map_err(|e| e.to_string())?
        {
            return Err(format!(
                "{}/{rel} already exists: another writer completed this checkpoint",
                dir.url()
            ));
        }
        Ok(match p.barrier.kind {
            SnapshotKind::Savepoint => dir.url().to_string(),
            SnapshotKind::Checkpoint => format!("{}/{}", dir.url(), checkpoint_dir(m.id)),
        })
    }

    /// Deletes shared files no retained checkpoint references, and what late uploads left in
    /// the directories of failed checkpoints. Only while no checkpoint is in progress.
    fn collect_garbage(&self, s: &State) {
        for id in &s.abandoned {
            self.deletes.push(checkpoint_dir(*id));
        }
        let live = Self::live_files(s);
        let files = match self.storage.list("shared") {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "cannot list shared checkpoint files");
                return;
            }
        };
        let mut deleted = 0;
        for f in files {
            if !live.contains(&f) {
                if let Err(e) = self.storage.delete(&f) {
                    warn!(file = %f, error = %e, "cannot delete an unused checkpoint file");
                } else {
                    deleted += 1;
                }
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, "deleted unused shared files");
        }
    }
}

/// Deletes the savepoint at `location`. Refused unless its metadata says it is a savepoint, so
/// a mistyped path never deletes a checkpoint (which the job owns) or anything else.
pub fn dispose_savepoint(location: &str, s3: &S3Options) -> Result<(), String> {
    let dir = Storage::open(location, std::path::Path::new("."), s3).map_err(|e| e.to_string())?;
    let bytes = dir
        .get(METADATA)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{location}: no {METADATA}; not a savepoint"))?;
    let metadata: CheckpointMetadata =
        serde_json::from_slice(&bytes).map_err(|e| format!("{location}/{METADATA}: {e}"))?;
    if metadata.kind != SnapshotKind::Savepoint {
        return Err(format!(
            "{location} is a checkpoint of job {}, not a savepoint; the job deletes its checkpoints itself",
            metadata.job
        ));
    }
    // the metadata goes first: a savepoint half deleted is no longer mistaken for a complete one
    dir.delete(METADATA).map_err(|e| e.to_string())?;
    dir.delete_dir("").map_err(|e| e.to_string())?;
    if !location.contains("://") {
        // a local directory keeps its (now empty) subdirectories after the files went
        let _ = std::fs::remove_dir_all(location);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_engine::KeyGroupRange;
    use freshet_engine::checkpoint::{FileRef, OperatorSnapshot};

    fn ack(id: CheckpointId, subtask: u32, files: &[&str]) -> SubtaskReport {
        let snapshot = OperatorSnapshot {
            subtask,
            parallelism: 2,
            key_groups: KeyGroupRange { start: 0, end: 127 },
            files: files
                .iter()
                .map(|p| FileRef {
                    name: p.rsplit('/').next().unwrap().into(),
                    path: p.to_string(),
                    size: 1,
                    checksum: None,
                })
                .collect(),
            state: Vec::new(),
        };
        SubtaskReport::Ack(Box::new(SubtaskAck {
            checkpoint: id,
            operators: BTreeMap::from([("op".to_string(), snapshot)]),
            full_bytes: 1,
            uploaded_bytes: 1,
            alignment_ms: 0,
            sync_ms: 0,
            async_ms: 0,
            output_pending: false,
        }))
    }

    /// Checkpoint storage in a new temporary directory (deleted when the guard drops).
    fn local_storage() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        let storage = Storage::open(&path, dir.path(), &S3Options::default()).unwrap();
        (dir, storage)
    }

    /// A coordinator of two source subtasks with the checkpointing settings `spec` (JSON).
    fn coordinator(storage: &Storage, spec: &str, fail: FailAttempt) -> Arc<Coordinator> {
        Coordinator::new(
            CoordinatorSettings {
                spec: serde_json::from_str(spec).unwrap(),
                job: "j".into(),
                max_parallelism: 128,
                subtasks: vec![(0, 0, true), (0, 1, true)],
                s3: S3Options::default(),
                totals: Default::default(),
            },
            storage.clone(),
            1,
            &[],
            0,
            Arc::new(|_, _, _| {}),
            fail,
        )
    }

    fn trigger(c: &Coordinator, kind: SnapshotKind) -> CheckpointId {
        let mut s = c.state.lock();
        let target =
            (kind == SnapshotKind::Savepoint).then(|| c.storage.child("savepoint").url().into());
        c.trigger(&mut s, kind, target, false, false, None, None)
    }

    fn decline(c: &Coordinator, id: CheckpointId) {
        let reason = format!("upload {id} refused");
        c.report(
            0,
            1,
            SubtaskReport::Decline {
                checkpoint: id,
                reason,
            },
        );
    }

    /// Checkpoints failing one after another fail the attempt (for the restart strategy) once
    /// there are more than `tolerable_failures` of them in a row; a completed checkpoint starts
    /// the count over, and failed savepoints do not count.
    #[test]
    fn too_many_failed_checkpoints_in_a_row_fail_the_attempt_for_a_restart() {
        let (_dir, storage) = local_storage();
        let (tx, rx) = crossbeam_channel::unbounded();
        let fail: FailAttempt = Arc::new(move |msg, retryable| tx.send((msg, retryable)).unwrap());
        let c = coordinator(
            &storage,
            r#"{"interval": "1h", "tolerable_failures": 2}"#,
            fail,
        );
        let quiet = |what: &str| {
            let got = rx.recv_timeout(Duration::from_millis(200));
            assert!(got.is_err(), "{what}: the attempt was failed: {got:?}");
        };
        for _ in 0..2 {
            let id = trigger(&c, SnapshotKind::Checkpoint);
            decline(&c, id);
        }
        quiet("two failures in a row");
        let id = trigger(&c, SnapshotKind::Checkpoint);
        c.report(0, 0, ack(id, 0, &[]));
        c.report(0, 1, ack(id, 1, &[]));
        assert_eq!(
            c.latest()
                .as_deref()
                .map(|l| l.ends_with(&checkpoint_dir(id))),
            Some(true)
        );
        for _ in 0..2 {
            let id = trigger(&c, SnapshotKind::Checkpoint);
            decline(&c, id);
            let id = trigger(&c, SnapshotKind::Savepoint);
            decline(&c, id);
        }
        quiet("two failures after a completed checkpoint, and failed savepoints");
        let id = trigger(&c, SnapshotKind::Checkpoint);
        decline(&c, id);
        let (msg, retryable) = rx.recv_timeout(Duration::from_secs(5)).expect("not failed");
        assert!(retryable, "{msg}");
        assert!(
            msg.contains("3 checkpoints failed in a row")
                && msg.contains(&format!("upload {id} refused")),
            "{msg}"
        );
        let id = trigger(&c, SnapshotKind::Checkpoint);
        decline(&c, id);
        quiet("a fourth failure (the attempt is failed once)");
    }

    /// A subtask still uploading when its checkpoint failed leaves nothing behind: the late
    /// acknowledgement deletes the checkpoint's directory again, and the next collection the
    /// shared files no retained checkpoint references.
    #[test]
    fn files_uploaded_for_a_failed_checkpoint_are_deleted_when_they_arrive_late() {
        let (_dir, storage) = local_storage();
        let c = coordinator(&storage, r#"{"interval": "1h"}"#, Arc::new(|_, _| {}));
        let id = trigger(&c, SnapshotKind::Checkpoint);
        let private = format!("{}/op/1/MANIFEST-000005", checkpoint_dir(id));
        let shared = "shared/op/1-000009.sst";
        c.report(0, 0, ack(id, 0, &[]));
        c.report(
            0,
            1,
            SubtaskReport::Decline {
                checkpoint: id,
                reason: "test".into(),
            },
        );
        // subtask 1 finishes its upload after the failure
        storage.put(&private, "m".into()).unwrap();
        storage.put(shared, "s".into()).unwrap();
        c.report(0, 1, ack(id, 1, &[&private, shared]));
        c.deletes.wait();
        assert_eq!(
            storage.get(&private).unwrap(),
            None,
            "the late private file stayed"
        );
        let s = c.state.lock();
        assert!(s.gc_needed && s.pending.is_empty());
        c.collect_garbage(&s);
        c.deletes.wait();
        assert_eq!(
            storage.get(shared).unwrap(),
            None,
            "the late shared file stayed"
        );
        assert!(storage.list(&checkpoint_dir(id)).unwrap().is_empty());
    }
}
